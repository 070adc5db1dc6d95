//! Per-version function figures in the Prometheus/OpenMetrics text format:
//! `hostd_function_requests_total`, `hostd_function_non_2xx_total`,
//! `hostd_function_errors_total` and the histogram
//! `hostd_function_latency_seconds`, labelled by function and version.

use std::fmt::Write;

use hostd_sandbox::deploy::FunctionHost;

/// The figures of every version of every function, as metric families.
pub fn render(host: &FunctionHost) -> String {
    let mut rows = Vec::new();
    if let Ok(functions) = host.list() {
        for f in functions {
            if let Ok(versions) = host.versions(&f.name) {
                rows.extend(versions);
            }
        }
    }
    let mut out = String::new();
    let labels = |v: &hostd_sandbox::deploy::VersionInfo| {
        format!(
            "function=\"{}\",version=\"{}\"",
            v.record.function, v.record.version
        )
    };
    for (name, help, get) in [
        (
            "hostd_function_requests",
            "Requests routed to each function version",
            (|m: &hostd_sandbox::server::metrics::MetricsSnapshot| m.requests) as fn(&_) -> u64,
        ),
        (
            "hostd_function_non_2xx",
            "Answers outside 2xx, by function version",
            |m| m.non_2xx,
        ),
        (
            "hostd_function_errors",
            "Requests the function failed (trap, limits, no capacity)",
            |m| m.errors,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}.");
        let _ = writeln!(out, "# TYPE {name} counter");
        for v in &rows {
            let _ = writeln!(out, "{name}_total{{{}}} {}", labels(v), get(&v.metrics));
        }
    }
    let name = "hostd_function_latency_seconds";
    let _ = writeln!(out, "# HELP {name} Time from routing to response headers.");
    let _ = writeln!(out, "# TYPE {name} histogram");
    for v in &rows {
        let l = labels(v);
        for (le, n) in &v.metrics.latency_buckets {
            let _ = writeln!(out, "{name}_bucket{{{l},le=\"{le}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{l},le=\"+Inf\"}} {}",
            v.metrics.requests
        );
        let _ = writeln!(
            out,
            "{name}_sum{{{l}}} {}",
            v.metrics.latency_sum.as_secs_f64()
        );
        let _ = writeln!(out, "{name}_count{{{l}}} {}", v.metrics.requests);
    }
    out
}

/// `text` (an OpenMetrics exposition ending in `# EOF`) with the functions'
/// families added before its end.
pub fn append(text: String, host: &FunctionHost) -> String {
    let mut body = match text.strip_suffix("# EOF\n") {
        Some(b) => b.to_owned(),
        None => text,
    };
    body.push_str(&render(host));
    body.push_str("# EOF\n");
    body
}
