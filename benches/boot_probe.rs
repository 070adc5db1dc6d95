//! Boot benchmark: the same freestanding probe guest (guest/probe) booted by hostd's
//! own VMM and by QEMU's `microvm` machine (KVM and TCG), side by side in one run.
//!
//! Measured from this process, the same way for every monitor: spawn → the guest's
//! first serial line (`probe: started`, printed right after the boot-marker write) →
//! process exit; and the monitor's peak RSS (wait4's ru_maxrss). The guest has 64 MiB
//! of which the probe touches well under 1 MiB, so peak RSS is essentially the
//! monitor's own overhead. hostd's own boot-marker timings are reported too.
//!
//! hostd runs twice: jailed (the default) and with `--no-sandbox`, so that the start-up
//! cost of the jail is measured side by side under the same load.
//!
//! `cargo bench --bench boot_probe` — prints a table and writes target/bench/boot_probe.json.
#![allow(clippy::print_stdout)] // a benchmark's figures are its output

mod common;

use common::{kvm_usable, median, spawn_and_measure, write_json, Sample};
use std::path::{Path, PathBuf};
use std::process::Command;

const RUNS: usize = 10;

/// Builds one monitor's command line for a run.
type MakeCommand = Box<dyn Fn() -> Command>;

fn build_probe() -> PathBuf {
    let out = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/guest/probe/build.sh"))
        .output()
        .expect("run guest/probe/build.sh");
    assert!(
        out.status.success(),
        "probe build failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .lines()
            .last()
            .unwrap_or_default(),
    )
}

fn qemu(probe: &Path, accel: &str) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-M",
        "microvm,x-option-roms=off,isa-serial=on,acpi=off",
        "-accel",
        accel,
        "-m",
        "64M",
    ])
    .args([
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-serial",
        "stdio",
    ])
    .args(["-device", "isa-debug-exit,iobase=0x501,iosize=1"])
    .args([
        "-global",
        "virtio-mmio.force-legacy=false",
        "-device",
        "virtio-rng-device",
    ])
    .arg("-kernel")
    .arg(probe)
    .args(["-append", "console=ttyS0 probe.exit=0"]);
    c
}

fn hostd(probe: &Path, sandbox: bool) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hostd"));
    c.arg("run");
    if !sandbox {
        c.arg("--no-sandbox");
    }
    c.args([
        "--timings",
        "--mem",
        "64M",
        "--cmdline",
        "console=ttyS0 probe.exit=0",
        "--kernel",
    ])
    .arg(probe);
    c.env("HOSTD_LOG", "warn,hostd_vmm=error");
    c
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let probe = build_probe();
    let kvm = kvm_usable();
    let qemu_ok = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok();
    let mut peers: Vec<(&str, MakeCommand)> = Vec::new();
    if kvm {
        let p = probe.clone();
        peers.push((
            "hostd (built-in VMM, KVM)",
            Box::new(move || hostd(&p, true)),
        ));
        // The same without the jail (no PID namespace, cgroup, uid change, pivot_root,
        // Landlock or seccomp for the VMM and its backend): what the jailing costs.
        let p = probe.clone();
        peers.push(("hostd --no-sandbox", Box::new(move || hostd(&p, false))));
    }
    if qemu_ok {
        if kvm {
            let p = probe.clone();
            peers.push(("qemu microvm (KVM)", Box::new(move || qemu(&p, "kvm"))));
        }
        let p = probe.clone();
        peers.push(("qemu microvm (TCG)", Box::new(move || qemu(&p, "tcg"))));
    }
    let mut json = Vec::new();
    println!("boot_probe: {RUNS} runs each, medians; guest: guest/probe, 64 MiB, 1 vCPU");
    println!(
        "{:<28} {:>14} {:>12} {:>14}",
        "monitor", "first line ms", "exit ms", "peak RSS KiB"
    );
    for (name, make) in &peers {
        let samples: Vec<Sample> = (0..RUNS)
            .filter_map(|_| spawn_and_measure(make(), &["probe: started"]))
            .collect();
        let ok = samples
            .iter()
            .filter(|s| s.exit_status == 0 || s.exit_status == 1)
            .count();
        if samples.is_empty() {
            println!("{name:<28} failed to run");
            continue;
        }
        // A run without the line counts as never reaching it (infinity), not as 0.
        let first = median(
            samples
                .iter()
                .map(|s| s.markers_ms[0].unwrap_or(f64::INFINITY))
                .collect(),
        );
        let exit = median(samples.iter().map(|s| s.to_exit_ms).collect());
        let rss = median(samples.iter().map(|s| s.max_rss_kib as f64).collect());
        println!("{name:<28} {first:>14.1} {exit:>12.1} {rss:>14.0}");
        if let Some(t) = samples.last().and_then(|s| s.internal.clone()) {
            println!("    last run, hostd's own: {t}");
        }
        json.push(format!(
            "{{\"monitor\":\"{name}\",\"runs\":{},\"ok_runs\":{ok},\"median_first_line_ms\":{first:.2},\"median_exit_ms\":{exit:.2},\"median_peak_rss_kib\":{rss:.0}}}",
            samples.len()
        ));
    }
    write_json("boot_probe", "\"guest_memory_mib\":64,", &json);
}
