//! `hostd bench` end to end: the native and WebAssembly tiers really run (the embedded
//! workload and the hello component), the JSON report holds every figure each tier can
//! give, finite and positive, the chart is written, and `--compare` flags a regression.
//! No timed assertions: the structure and the sanity of the figures only.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn bench(args: &[&str]) -> Output {
    Command::new(common::hostd_exe())
        .arg("bench")
        .args(args)
        .env("HOSTD_LOG", "warn")
        .output()
        .expect("run hostd bench")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn tier<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["tiers"]
        .as_array()
        .expect("tiers is an array")
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("no tier {name} in {report}"))
}

fn median(t: &Value, metric: &str) -> f64 {
    let m = &t["metrics"][metric];
    let runs = m["runs"].as_array().map_or(0, Vec::len);
    assert!(runs >= 1, "{} has no runs of {metric}: {t}", t["name"]);
    m["median"]
        .as_f64()
        .unwrap_or_else(|| panic!("{} / {metric}: no median in {t}", t["name"]))
}

fn positive(t: &Value, metric: &str) {
    let v = median(t, metric);
    assert!(
        v.is_finite() && v > 0.0,
        "{} / {metric} = {v}: not a positive finite figure",
        t["name"]
    );
}

#[test]
fn quick_native_and_wasm_write_a_full_report_and_compare_flags_regressions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("report.json");
    let svg = dir.path().join("report.svg");
    let out = bench(&[
        "--quick",
        "--only",
        "native,wasm",
        "--json",
        json.to_str().expect("utf-8 path"),
        "--svg",
        svg.to_str().expect("utf-8 path"),
    ]);
    assert!(out.status.success(), "hostd bench failed:\n{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("host kind") && stdout.contains("cold start to first 200"),
        "{stdout}"
    );

    let report: Value =
        serde_json::from_slice(&std::fs::read(&json).expect("the JSON report")).expect("JSON");
    assert_eq!(report["schema"], "hostd-bench/1");
    for field in ["cpu_model", "kernel", "host_kind"] {
        assert!(
            report["host"][field]
                .as_str()
                .is_some_and(|s| !s.is_empty()),
            "host.{field} missing: {report}"
        );
    }
    assert_eq!(report["method"]["quick"], true);
    assert_eq!(report["tiers"].as_array().map(Vec::len), Some(2));

    let native = tier(&report, "native");
    assert_eq!(native["status"], "ran", "{native}");
    for m in [
        "cold_start_ms",
        "requests_per_s",
        "p50_ms",
        "p99_ms",
        "syscall_ns",
        "pagefault_mib_s",
        "cpu_relative",
        "pss_mib",
    ] {
        positive(native, m);
    }
    // Host-wide free memory moves with everything else on the machine: finite only.
    assert!(median(native, "density_mib").is_finite());
    assert!(median(native, "p99_ms") >= median(native, "p50_ms"));
    assert!(native["metrics"]["cold_start_ms"]["runs"]
        .as_array()
        .is_some_and(|r| r.len() == 3));

    let wasm = tier(&report, "wasm");
    assert_eq!(wasm["status"], "ran", "{wasm}");
    for m in [
        "cold_start_ms",
        "requests_per_s",
        "p50_ms",
        "p99_ms",
        "pss_mib",
    ] {
        positive(wasm, m);
    }
    assert!(median(wasm, "density_mib").is_finite());
    // The loops cannot run in the function tier: absent, with the reason.
    for m in ["syscall_ns", "pagefault_mib_s", "cpu_relative"] {
        assert!(wasm["metrics"].get(m).is_none(), "{wasm}");
        assert!(wasm["notes"][m].as_str().is_some_and(|n| !n.is_empty()));
    }

    let chart = std::fs::read_to_string(&svg).expect("the SVG chart");
    assert!(chart.starts_with("<svg") && chart.trim_end().ends_with("</svg>"));
    assert!(
        chart.contains(">native<") && chart.contains(">wasm<"),
        "{chart}"
    );

    // --compare: an "earlier" report whose native requests/s were 1000x higher (so this
    // run is a regression whatever the noise) and whose system calls were 1000x slower
    // (an improvement, never flagged).
    let mut old = report.clone();
    let native_old = old["tiers"]
        .as_array_mut()
        .and_then(|t| t.iter_mut().find(|t| t["name"] == "native"))
        .expect("native");
    for (m, f) in [("requests_per_s", 1000.0), ("syscall_ns", 1000.0)] {
        let v = native_old["metrics"][m]["median"].as_f64().expect("median");
        native_old["metrics"][m]["median"] = Value::from(v * f);
    }
    let old_path = dir.path().join("old.json");
    std::fs::write(&old_path, old.to_string()).expect("write old report");
    let out = bench(&[
        "--quick",
        "--only",
        "native",
        "--compare",
        old_path.to_str().expect("utf-8 path"),
        "--threshold",
        "50",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let line = |label: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with("native") && l.contains(label))
            .unwrap_or_else(|| panic!("no compare row for {label}:\n{stdout}"))
            .to_string()
    };
    assert!(line("requests/s").contains("REGRESSION"), "{stdout}");
    assert!(!line("system call").contains("REGRESSION"), "{stdout}");
    assert!(stdout.contains("regression(s) beyond 50%"), "{stdout}");

    // A file that is not a report is refused with its name.
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{}").expect("write");
    let out = bench(&[
        "--only",
        "native",
        "--compare",
        bad.to_str().expect("utf-8"),
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains("bad.json"), "{}", text(&out));
    assert!(Path::new(&json).exists());
}
