//! The chart: one group per metric, one horizontal bar per tier (its median, a tick at
//! its p99 when runs differ), a log scale when a metric's figures span more than 20x.
//! Plain SVG written by hand.

use std::fmt::Write;

use crate::report::{fmt_value, Better, Report, METRICS};

const WIDTH: f64 = 960.0;
const LABEL_W: f64 = 170.0;
const BAR_W: f64 = 640.0;
const ROW_H: f64 = 20.0;
const GROUP_GAP: f64 = 18.0;
const TITLE_H: f64 = 22.0;
/// One colour per tier, by position in the report.
const COLOURS: &[&str] = &[
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The SVG document for `report`.
pub fn render(report: &Report) -> String {
    let mut body = String::new();
    let mut y = 60.0;
    for m in METRICS {
        let bars: Vec<(usize, &str, f64, f64)> = report
            .tiers
            .iter()
            .enumerate()
            .filter_map(|(i, t)| {
                let s = t.metrics.get(m.key)?;
                (s.median.is_finite() && s.median > 0.0).then_some((
                    i,
                    t.name.as_str(),
                    s.median,
                    s.p99,
                ))
            })
            .collect();
        // Figures a bar cannot show (zero or below: e.g. a density that other processes'
        // memory swamped) are listed under the group, never dropped silently.
        let undrawn: Vec<String> = report
            .tiers
            .iter()
            .filter_map(|t| {
                let s = t.metrics.get(m.key)?;
                (!(s.median.is_finite() && s.median > 0.0))
                    .then(|| format!("{} {}", t.name, fmt_value(s.median)))
            })
            .collect();
        if bars.is_empty() && undrawn.is_empty() {
            continue;
        }
        if bars.is_empty() {
            let _ = writeln!(
                body,
                r#"<text x="10" y="{:.0}" class="title">{} ({})</text><text x="{LABEL_W}" y="{:.0}" class="note">not drawn (zero or below): {}</text>"#,
                y + 14.0,
                esc(m.label),
                esc(m.unit),
                y + 32.0,
                esc(&undrawn.join(", "))
            );
            y += TITLE_H + ROW_H + GROUP_GAP;
            continue;
        }
        let max = bars.iter().map(|b| b.2.max(b.3)).fold(0.0, f64::max);
        let min = bars.iter().map(|b| b.2).fold(f64::INFINITY, f64::min);
        let log = max / min > 20.0;
        // Log scale: from a decade below the smallest figure to the decade above the largest.
        let lo = if log { min.log10().floor() - 1.0 } else { 0.0 };
        let hi = if log { max.log10().ceil() } else { max };
        let x_of = |v: f64| {
            let f = if log {
                (v.log10() - lo) / (hi - lo)
            } else {
                v / hi
            };
            LABEL_W + BAR_W * f.clamp(0.0, 1.0)
        };
        let better = match m.better {
            Better::Lower => "lower is better",
            Better::Higher => "higher is better",
        };
        let scale = if log { ", log scale" } else { "" };
        let _ = writeln!(
            body,
            r#"<text x="10" y="{:.0}" class="title">{} ({}) — {}{}</text>"#,
            y + 14.0,
            esc(m.label),
            esc(m.unit),
            better,
            scale
        );
        y += TITLE_H;
        if log {
            let mut d = lo;
            while d <= hi + 1e-9 {
                let x = x_of(10f64.powf(d));
                let _ = writeln!(
                    body,
                    r##"<line x1="{x:.1}" y1="{:.0}" x2="{x:.1}" y2="{:.0}" stroke="#ddd"/><text x="{x:.1}" y="{:.0}" class="tick">{}</text>"##,
                    y,
                    y + ROW_H * bars.len() as f64,
                    y + ROW_H * bars.len() as f64 + 10.0,
                    fmt_value(10f64.powf(d))
                );
                d += 1.0;
            }
        }
        for (i, name, median, p99) in &bars {
            let colour = COLOURS[i % COLOURS.len()];
            let w = (x_of(*median) - LABEL_W).max(1.0);
            let _ = writeln!(
                body,
                r#"<text x="{:.0}" y="{:.0}" class="label">{}</text><rect x="{LABEL_W}" y="{:.0}" width="{w:.1}" height="{:.0}" fill="{colour}"/><text x="{:.1}" y="{:.0}" class="value">{}</text>"#,
                LABEL_W - 8.0,
                y + 14.0,
                esc(name),
                y + 3.0,
                ROW_H - 6.0,
                LABEL_W + w + 6.0,
                y + 14.0,
                fmt_value(*median)
            );
            if p99.is_finite() && *p99 > *median * 1.001 {
                let x = x_of(*p99);
                let _ = writeln!(
                    body,
                    r##"<line x1="{x:.1}" y1="{:.0}" x2="{x:.1}" y2="{:.0}" stroke="#333" stroke-width="2"/>"##,
                    y + 1.0,
                    y + ROW_H - 1.0
                );
            }
            y += ROW_H;
        }
        if log {
            y += 10.0;
        }
        if !undrawn.is_empty() {
            let _ = writeln!(
                body,
                r#"<text x="{LABEL_W}" y="{:.0}" class="note">not drawn (zero or below): {}</text>"#,
                y + 12.0,
                esc(&undrawn.join(", "))
            );
            y += 16.0;
        }
        y += GROUP_GAP;
    }
    let skipped: Vec<String> = report
        .tiers
        .iter()
        .filter(|t| t.status != "ran")
        .map(|t| {
            let reason = t.reason.as_deref().unwrap_or("");
            // The first line of the reason: a failure's may carry the tier's output.
            let reason = reason.lines().next().unwrap_or("");
            format!("{} — {}: {reason}", t.status, t.name)
        })
        .collect();
    for s in &skipped {
        let _ = writeln!(
            body,
            r#"<text x="10" y="{:.0}" class="note">{}</text>"#,
            y + 12.0,
            esc(s)
        );
        y += 16.0;
    }
    let h = &report.host;
    let header = format!(
        "hostd bench — {} ({} CPUs), kernel {}, host: {} — medians, tick = p99",
        h.cpu_model, h.cpus, h.kernel, h.host_kind
    );
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{:.0}" viewBox="0 0 {WIDTH} {:.0}">
<style>text{{font-family:sans-serif;font-size:12px;fill:#222}} .title{{font-weight:bold;font-size:13px}} .label{{text-anchor:end}} .tick{{font-size:9px;fill:#777;text-anchor:middle}} .head{{font-size:14px;font-weight:bold}} .note{{font-size:11px;fill:#555}}</style>
<rect width="100%" height="100%" fill="white"/>
<text x="10" y="24" class="head">{}</text>
{body}</svg>
"##,
        y + 20.0,
        y + 20.0,
        esc(&header)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::HostInfo;
    use crate::report::{Method, Stat, TierResult, SCHEMA};

    #[test]
    fn draws_positive_figures_lists_the_rest_and_escapes_text() {
        let mut a = TierResult::skipped("native", "");
        a.status = "ran".into();
        a.metrics
            .insert("cold_start_ms".into(), Stat::of(vec![2.0, 3.0]));
        a.metrics.insert("density_mib".into(), Stat::of(vec![-4.0]));
        let mut b = a.clone();
        b.name = "microvm-qemu".into();
        b.metrics
            .insert("cold_start_ms".into(), Stat::of(vec![4000.0]));
        b.metrics
            .insert("density_mib".into(), Stat::of(vec![120.0]));
        let c = TierResult::skipped("wasmtime-serve", "wasmtime <x> is not on PATH");
        let r = Report {
            schema: SCHEMA.into(),
            host: HostInfo {
                cpu_model: "Test & CPU".into(),
                cpus: 2,
                kernel: "6.1".into(),
                host_kind: "none".into(),
                mem_total_mib: 1,
            },
            method: Method {
                quick: true,
                warmup_runs: 1,
                runs: 2,
                concurrency: 1,
                load_secs: 1.0,
                loop_budget_ms: 1,
                density_instances: 1,
                order: vec![],
            },
            tiers: vec![a, b, c],
        };
        let svg = render(&r);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        // 2 ms against 4000 ms: a log scale.
        assert!(svg.contains("cold start to first 200 (ms) — lower is better, log scale"));
        assert!(svg.contains("not drawn (zero or below): native -4.00"));
        assert!(svg.contains("Test &amp; CPU") && svg.contains("wasmtime &lt;x&gt;"));
        assert_eq!(svg.matches("<rect ").count(), 1 + 2 + 1);
    }
}
