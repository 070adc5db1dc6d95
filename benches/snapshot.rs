//! Snapshot benchmark: time to the first service output of the hello image
//! (images/examples/hello.toml) under the built-in VMM, booted cold vs restored from a
//! snapshot (`hostd run --snapshot-cache`, docs/snapshots.md), same image file, one run.
//!
//! Measured from this process: spawn → `[hello] hello from hostd` → exit, medians; and
//! hostd's own timings of the last run of each (`--timings`: when the restored VM's
//! vCPUs started, when the service started). Cold runs have no cache (no snapshot is
//! written on their path); one extra run fills the cache first.
//!
//! `cargo bench --bench snapshot` — prints a table and writes target/bench/snapshot.json.
//! SNAPSHOT_RUNS sets the runs per mode (default 3).
#![allow(clippy::print_stdout)] // a benchmark's figures are its output

mod common;

use common::{kvm_usable, median, spawn_and_measure, write_json, Sample};
use std::path::{Path, PathBuf};
use std::process::Command;

const MARKERS: [&str; 1] = ["[hello] hello from hostd"];

/// This checkout's guest kernel (guest/kernel/build.sh, cached).
fn kernel() -> PathBuf {
    let out = Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/guest/kernel/build.sh"
        ))
        .output()
        .expect("run guest/kernel/build.sh");
    assert!(out.status.success(), "kernel build failed");
    let dir = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_string();
    PathBuf::from(dir).join("vmlinux")
}

fn hostd_run(image: &Path, cache: Option<&Path>) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hostd"));
    c.args(["run", "--timings", "--timeout", "600"]);
    if let Some(dir) = cache {
        c.arg("--snapshot-cache").arg(dir);
    }
    c.arg(image);
    c.env("HOSTD_LOG", "warn,hostd_vmm=error");
    c
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if !kvm_usable() {
        println!("snapshot: /dev/kvm is not usable here; nothing measured");
        return;
    }
    let runs: usize = std::env::var("SNAPSHOT_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let kernel = kernel();
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("hello.img");
    let status = Command::new(env!("CARGO_BIN_EXE_hostd"))
        .arg("build")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/images/examples/hello.toml"
        ))
        .arg("-o")
        .arg(&image)
        .env("HOSTD_KERNEL", &kernel)
        .status()
        .expect("run hostd build");
    assert!(status.success(), "hostd build failed");
    let cache = dir.path().join("snapshots");
    // Fill the cache: one boot that snapshots.
    let fill = spawn_and_measure(hostd_run(&image, Some(&cache)), &MARKERS);
    assert!(
        fill.is_some_and(|s| s.exit_status == 0),
        "the run that takes the snapshot failed"
    );

    println!("snapshot: {runs} runs each, medians; hello image, 128 MiB, 1 vCPU, built-in VMM; ms from spawn");
    println!(
        "{:<28} {:>16} {:>10} {:>6}",
        "start", "first output", "exit", "ok"
    );
    let mut json = Vec::new();
    let mut firsts = Vec::new();
    for (name, cache) in [
        ("cold boot", None),
        ("restored from snapshot", Some(cache.as_path())),
    ] {
        let samples: Vec<Sample> = (0..runs)
            .filter_map(|_| spawn_and_measure(hostd_run(&image, cache), &MARKERS))
            .collect();
        let ok = samples
            .iter()
            .filter(|s| s.exit_status == 0 && s.markers_ms[0].is_some())
            .count();
        let first = median(
            samples
                .iter()
                .map(|s| s.markers_ms[0].unwrap_or(f64::INFINITY))
                .collect(),
        );
        let exit = median(samples.iter().map(|s| s.to_exit_ms).collect());
        println!(
            "{name:<28} {first:>16.0} {exit:>10.0} {ok:>3}/{}",
            samples.len()
        );
        let internal = samples
            .last()
            .and_then(|s| s.internal.clone())
            .unwrap_or_default();
        if !internal.is_empty() {
            println!("    last run, hostd's own: {internal}");
        }
        firsts.push(first);
        json.push(format!(
            "{{\"start\":\"{name}\",\"runs\":{},\"ok_runs\":{ok},\"median_first_output_ms\":{first:.1},\"median_exit_ms\":{exit:.1},\"last_internal\":\"{}\"}}",
            samples.len(),
            internal.replace('"', "'")
        ));
    }
    if let [cold, warm] = firsts[..] {
        println!(
            "restore speeds first output up {:.1}x (goal: restored first output <= 100 ms)",
            cold / warm
        );
    }
    write_json(
        "snapshot",
        &format!(
            "\"image\":\"images/examples/hello.toml\",\"pvm_host\":{},",
            Path::new("/sys/module/kvm_pvm").exists()
        ),
        &json,
    );
}
