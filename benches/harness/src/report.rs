//! The JSON report `hostd bench` writes and `--compare` reads.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::host::HostInfo;

/// The report format's name and version, checked when a report is read back.
pub const SCHEMA: &str = "hostd-bench/1";

/// Whether a smaller or a larger figure is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    Lower,
    Higher,
}

/// One metric: its key in the JSON, how the table and chart name it, its unit.
#[derive(Debug, Clone, Copy)]
pub struct MetricDef {
    pub key: &'static str,
    pub label: &'static str,
    pub unit: &'static str,
    pub better: Better,
}

/// Every metric, in the order tables and charts show them (docs/bench.md explains each).
pub const METRICS: &[MetricDef] = &[
    MetricDef {
        key: "cold_start_ms",
        label: "cold start to first 200",
        unit: "ms",
        better: Better::Lower,
    },
    MetricDef {
        key: "requests_per_s",
        label: "requests/s",
        unit: "req/s",
        better: Better::Higher,
    },
    MetricDef {
        key: "p50_ms",
        label: "latency p50",
        unit: "ms",
        better: Better::Lower,
    },
    MetricDef {
        key: "p99_ms",
        label: "latency p99",
        unit: "ms",
        better: Better::Lower,
    },
    MetricDef {
        key: "syscall_ns",
        label: "system call",
        unit: "ns",
        better: Better::Lower,
    },
    MetricDef {
        key: "pagefault_mib_s",
        label: "page faults",
        unit: "MiB/s",
        better: Better::Higher,
    },
    MetricDef {
        key: "cpu_relative",
        label: "CPU loop vs native",
        unit: "x",
        better: Better::Lower,
    },
    MetricDef {
        key: "pss_mib",
        label: "memory per instance (PSS)",
        unit: "MiB",
        better: Better::Lower,
    },
    MetricDef {
        key: "density_mib",
        label: "host memory per instance (density)",
        unit: "MiB",
        better: Better::Lower,
    },
];

/// The definition of a metric key, if it is one.
pub fn metric(key: &str) -> Option<&'static MetricDef> {
    METRICS.iter().find(|m| m.key == key)
}

/// A metric's runs and their median and p99.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Stat {
    pub median: f64,
    pub p99: f64,
    pub runs: Vec<f64>,
}

impl Stat {
    pub fn of(runs: Vec<f64>) -> Stat {
        Stat {
            median: crate::median(runs.clone()),
            p99: crate::percentile(runs.clone(), 99.0),
            runs,
        }
    }
}

/// One tier's results, or why it did not run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TierResult {
    pub name: String,
    /// `ran` or `skipped`.
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What the runtime is (`crun 1.8.1`, `hostd fn serve`, `QEMU 7.2 (TCG)` …).
    #[serde(default)]
    pub runtime: String,
    #[serde(default)]
    pub metrics: BTreeMap<String, Stat>,
    /// Per metric: why it is missing, or what dominates it on this host.
    #[serde(default)]
    pub notes: BTreeMap<String, String>,
}

impl TierResult {
    pub fn skipped(name: &str, reason: impl Into<String>) -> TierResult {
        TierResult {
            name: name.into(),
            status: "skipped".into(),
            reason: Some(reason.into()),
            runtime: String::new(),
            metrics: BTreeMap::new(),
            notes: BTreeMap::new(),
        }
    }
}

/// How the figures were taken.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Method {
    pub quick: bool,
    pub warmup_runs: usize,
    pub runs: usize,
    pub concurrency: usize,
    pub load_secs: f64,
    pub loop_budget_ms: u64,
    pub density_instances: usize,
    /// The tiers in the order each round visits them (A B A B …).
    pub order: Vec<String>,
}

/// A whole `hostd bench` report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub schema: String,
    pub host: HostInfo,
    pub method: Method,
    pub tiers: Vec<TierResult>,
}

/// Errors reading a report back.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot read {path}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a hostd bench report")]
    Parse {
        path: std::path::PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} is a {found:?} report; this hostd reads {SCHEMA:?}")]
    Schema {
        path: std::path::PathBuf,
        found: String,
    },
}

impl Report {
    pub fn load(path: &std::path::Path) -> Result<Report, ReportError> {
        let text = std::fs::read_to_string(path).map_err(|source| ReportError::Read {
            path: path.into(),
            source,
        })?;
        let r: Report = serde_json::from_str(&text).map_err(|source| ReportError::Parse {
            path: path.into(),
            source,
        })?;
        if r.schema != SCHEMA {
            return Err(ReportError::Schema {
                path: path.into(),
                found: r.schema,
            });
        }
        Ok(r)
    }

    pub fn tier(&self, name: &str) -> Option<&TierResult> {
        self.tiers.iter().find(|t| t.name == name)
    }
}

/// A figure for a table: 3 significant digits, no exponent.
pub fn fmt_value(v: f64) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_has_a_unique_key_and_values_format() {
        for (i, m) in METRICS.iter().enumerate() {
            assert!(METRICS[i + 1..].iter().all(|o| o.key != m.key));
            assert_eq!(metric(m.key).map(|d| d.key), Some(m.key));
        }
        assert_eq!(fmt_value(1234.5), "1234");
        assert_eq!(fmt_value(12.345), "12.3");
        assert_eq!(fmt_value(0.01234), "0.012");
        assert_eq!(fmt_value(f64::NAN), "-");
        let s = Stat::of(vec![3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.p99), (2.0, 3.0));
    }
}
