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
//! cost of the jail is measured side by side under the same load. On a nested PVM host
//! a third row runs it jailed with `--cpu-template host`: the default template there
//! (`pvm`) appends the Linux workarounds of docs/pvm.md (about 170 characters) to the
//! kernel command line, which the probe echoes byte by byte, two exits a byte; with
//! `host` the guest prints the same bytes under hostd as under Firecracker.
//!
//! With `FIRECRACKER=/path/to/firecracker` (a binary built by hand, never part of this
//! repository), Firecracker boots the same probe (`--no-api --config-file`, its default
//! seccomp filters), and the bench prints hostd/Firecracker ratios of wall time (spawn →
//! exit; the probe ends by triple fault under a monitor without its exit port) and of
//! CPU time (user + system of the monitor and every process it waited for). The runs
//! alternate between monitors, round by round, so load changes hit all alike.
//!
//! `HOSTD_BIN` measures another hostd build than the bench's own (a release build, with
//! its `hostd-backend` next to it); `HOSTD_BASELINE=/path/to/hostd` adds an older build,
//! jailed, as one more monitor (before/after in one run).
//!
//! `cargo bench --bench boot_probe` — prints a table and writes target/bench/boot_probe.json.
#![allow(clippy::print_stdout)] // a benchmark's figures are its output

mod common;

use common::{kvm_usable, median, spawn_and_measure, write_json, Sample};
use std::path::{Path, PathBuf};
use std::process::Command;

const RUNS: usize = 10;
const FIRECRACKER: &str = "firecracker";

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

/// The hostd under test: `HOSTD_BIN` (e.g. a release build, with its `hostd-backend`
/// next to it) or the one cargo built for this bench.
fn hostd_bin() -> PathBuf {
    std::env::var_os("HOSTD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_hostd")))
}

fn hostd(probe: &Path, sandbox: bool) -> Command {
    hostd_at(&hostd_bin(), probe, sandbox)
}

/// hostd, jailed, with `--cpu-template host` (no PVM kernel arguments on the command line).
fn hostd_host_template(probe: &Path) -> Command {
    let mut c = hostd(probe, true);
    c.args(["--cpu-template", "host"]);
    c
}

fn hostd_at(bin: &Path, probe: &Path, sandbox: bool) -> Command {
    let mut c = Command::new(bin);
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

/// Firecracker with the probe: a config file (no API socket), 64 MiB, 1 vCPU, and an entropy
/// device, as hostd always attaches one (the probe does its virtio-rng round trip on both).
fn firecracker(fc: &Path, config: &Path) -> Command {
    let mut c = Command::new(fc);
    c.args(["--no-api", "--level", "Error", "--config-file"])
        .arg(config);
    c
}

fn firecracker_config(probe: &Path) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&dir).expect("create target/bench");
    let path = dir.join("boot_probe-firecracker.json");
    let config = format!(
        "{{\"boot-source\":{{\"kernel_image_path\":\"{}\",\"boot_args\":\"console=ttyS0 probe.exit=0\"}},\
         \"drives\":[],\"entropy\":{{}},\"machine-config\":{{\"vcpu_count\":1,\"mem_size_mib\":64}}}}",
        probe.display()
    );
    std::fs::write(&path, config).expect("write the Firecracker config");
    path
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
        if std::path::Path::new("/sys/module/kvm_pvm").exists() {
            let p = probe.clone();
            peers.push((
                "hostd --cpu-template host",
                Box::new(move || hostd_host_template(&p)),
            ));
        }
        // Another build (HOSTD_BASELINE, e.g. the last release before a change): before
        // and after side by side in one run.
        if let Some(base) = std::env::var_os("HOSTD_BASELINE").map(PathBuf::from) {
            let p = probe.clone();
            peers.push((
                "baseline hostd (HOSTD_BASELINE)",
                Box::new(move || hostd_at(&base, &p, true)),
            ));
        }
    }
    let firecracker_bin = std::env::var_os("FIRECRACKER").map(PathBuf::from);
    match &firecracker_bin {
        Some(fc) if kvm => {
            let (fc, config) = (fc.clone(), firecracker_config(&probe));
            peers.push((FIRECRACKER, Box::new(move || firecracker(&fc, &config))));
        }
        Some(_) => println!("FIRECRACKER set but /dev/kvm is not usable: Firecracker skipped"),
        None => println!("FIRECRACKER not set: no Firecracker figures (see the bench's header)"),
    }
    if qemu_ok {
        if kvm {
            let p = probe.clone();
            peers.push(("qemu microvm (KVM)", Box::new(move || qemu(&p, "kvm"))));
        }
        let p = probe.clone();
        peers.push(("qemu microvm (TCG)", Box::new(move || qemu(&p, "tcg"))));
    }
    println!("boot_probe: {RUNS} alternating rounds, medians; guest: guest/probe, 64 MiB, 1 vCPU");
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); peers.len()];
    for _ in 0..RUNS {
        for ((_, make), got) in peers.iter().zip(samples.iter_mut()) {
            got.extend(spawn_and_measure(make(), &["probe: started"]));
        }
    }
    println!(
        "{:<28} {:>14} {:>10} {:>10} {:>14}",
        "monitor", "first line ms", "exit ms", "CPU ms", "peak RSS KiB"
    );
    let mut json = Vec::new();
    let mut medians: Vec<(&str, f64, f64)> = Vec::new();
    for ((name, _), samples) in peers.iter().zip(&samples) {
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
        let cpu = median(samples.iter().map(|s| s.cpu_ms).collect());
        let rss = median(samples.iter().map(|s| s.max_rss_kib as f64).collect());
        println!("{name:<28} {first:>14.1} {exit:>10.1} {cpu:>10.1} {rss:>14.0}");
        if let Some(t) = samples.last().and_then(|s| s.internal.clone()) {
            println!("    last run, hostd's own: {t}");
        }
        medians.push((name, exit, cpu));
        json.push(format!(
            "{{\"monitor\":\"{name}\",\"runs\":{},\"ok_runs\":{ok},\"median_first_line_ms\":{first:.2},\"median_exit_ms\":{exit:.2},\"median_cpu_ms\":{cpu:.2},\"median_peak_rss_kib\":{rss:.0}}}",
            samples.len()
        ));
    }
    if let Some(&(_, fc_exit, fc_cpu)) = medians.iter().find(|m| m.0 == FIRECRACKER) {
        for &(name, exit, cpu) in medians.iter().filter(|m| m.0.starts_with("hostd")) {
            let (wall, cpu) = (exit / fc_exit, cpu / fc_cpu);
            println!("{name} / Firecracker: wall {wall:.2}, CPU {cpu:.2} (goal: at most 1.0 each)");
            json.push(format!(
                "{{\"ratio\":\"{name} / Firecracker\",\"wall\":{wall:.3},\"cpu\":{cpu:.3}}}"
            ));
        }
    }
    write_json("boot_probe", "\"guest_memory_mib\":64,", &json);
}
