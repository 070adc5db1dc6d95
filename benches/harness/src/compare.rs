//! `--compare`: this report's medians against an earlier report's, with regressions
//! beyond a threshold flagged.

use crate::report::{metric, Better, Report, METRICS};

/// One metric of one tier in both reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub tier: String,
    pub metric: &'static str,
    pub old: f64,
    pub new: f64,
    /// new / old.
    pub ratio: f64,
    /// How much worse, in percent (negative: better), taking the metric's direction
    /// into account.
    pub worse_pct: f64,
    pub regression: bool,
}

/// Every (tier, metric) with a finite, positive median in both reports, in table order;
/// `regression` when the new figure is worse than the old by more than `threshold_pct`.
pub fn compare(old: &Report, new: &Report, threshold_pct: f64) -> Vec<Row> {
    let mut rows = Vec::new();
    for t in &new.tiers {
        let Some(o) = old.tier(&t.name) else { continue };
        for m in METRICS {
            let (Some(n), Some(p)) = (t.metrics.get(m.key), o.metrics.get(m.key)) else {
                continue;
            };
            // Every metric is a positive quantity; zero or below (a density swamped by
            // other processes) has no meaningful ratio.
            if !(n.median.is_finite() && p.median.is_finite() && n.median > 0.0 && p.median > 0.0) {
                continue;
            }
            let ratio = n.median / p.median;
            let worse_pct = match m.better {
                Better::Lower => (ratio - 1.0) * 100.0,
                Better::Higher => (1.0 / ratio - 1.0) * 100.0,
            };
            rows.push(Row {
                tier: t.name.clone(),
                metric: metric(m.key).map_or(m.key, |d| d.key),
                old: p.median,
                new: n.median,
                ratio,
                worse_pct,
                regression: worse_pct > threshold_pct,
            });
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::HostInfo;
    use crate::report::{Method, Stat, TierResult, SCHEMA};

    fn report(cold: f64, rps: f64) -> Report {
        let mut t = TierResult::skipped("native", "");
        t.status = "ran".into();
        t.metrics
            .insert("cold_start_ms".into(), Stat::of(vec![cold]));
        t.metrics
            .insert("requests_per_s".into(), Stat::of(vec![rps]));
        Report {
            schema: SCHEMA.into(),
            host: HostInfo {
                cpu_model: "x".into(),
                cpus: 1,
                kernel: "k".into(),
                host_kind: "none".into(),
                mem_total_mib: 1,
            },
            method: Method {
                quick: true,
                warmup_runs: 0,
                runs: 1,
                concurrency: 1,
                load_secs: 1.0,
                loop_budget_ms: 1,
                density_instances: 1,
                order: vec!["native".into()],
            },
            tiers: vec![t],
        }
    }

    #[test]
    fn flags_only_regressions_beyond_the_threshold_in_the_metrics_direction() {
        let old = report(10.0, 1000.0);
        // Cold start 30% slower (worse), requests/s 50% higher (better).
        let rows = compare(&old, &report(13.0, 1500.0), 10.0);
        assert_eq!(rows.len(), 2);
        assert!(rows[0].regression && (rows[0].worse_pct - 30.0).abs() < 1e-9);
        assert!(!rows[1].regression && rows[1].worse_pct < 0.0);
        // Requests/s halved: 100% worse.
        let rows = compare(&old, &report(10.0, 500.0), 10.0);
        assert!(!rows[0].regression && rows[1].regression);
        assert!((rows[1].worse_pct - 100.0).abs() < 1e-9);
        // A figure at zero or below on either side is not compared.
        assert_eq!(compare(&old, &report(-1.0, 500.0), 10.0).len(), 1);
    }
}
