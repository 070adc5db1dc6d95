//! Linux boot benchmark: the hello image (images/examples/hello.toml, our guest kernel,
//! guest init, one service) booted by `hostd run` with hostd's own KVM monitor and with
//! `--vmm qemu` (QEMU `microvm`, KVM where hardware KVM exists, else TCG), side by side
//! in one run, the same image file and the same device backends.
//!
//! Measured from this process for both: spawn → `hostd-init: started` (the guest's
//! PID 1 runs) → `[hello] hello from hostd` → process exit (code 0), and peak RSS
//! (wait4: the largest of hostd, its backends and QEMU). On a nested PVM host the
//! built-in monitor's figure is what its kernel-mode emulation costs (docs/pvm.md).
//!
//! `cargo bench --bench boot_linux` — prints a table and writes target/bench/boot_linux.json.
//! BOOT_LINUX_RUNS sets the runs per monitor (default 3).

mod common;

use common::{kvm_usable, median, spawn_and_measure, write_json, Sample};
use std::path::{Path, PathBuf};
use std::process::Command;

const MARKERS: [&str; 2] = ["hostd-init: started", "[hello] hello from hostd"];

/// This checkout's guest kernel (guest/kernel/build.sh, cached).
fn kernel() -> PathBuf {
    let out = Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/guest/kernel/build.sh"
        ))
        .output()
        .expect("run guest/kernel/build.sh");
    assert!(
        out.status.success(),
        "kernel build failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_string();
    PathBuf::from(dir).join("vmlinux")
}

fn build_image(kernel: &Path, out: &Path) {
    let status = Command::new(env!("CARGO_BIN_EXE_hostd"))
        .arg("build")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/images/examples/hello.toml"
        ))
        .arg("-o")
        .arg(out)
        .env("HOSTD_KERNEL", kernel)
        .status()
        .expect("run hostd build");
    assert!(status.success(), "hostd build failed");
}

fn hostd_run(image: &Path, vmm: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hostd"));
    c.args(["run", "--timings", "--timeout", "600", "--vmm", vmm])
        .arg(image);
    c.env("HOSTD_LOG", "warn,hostd_vmm=error");
    c
}

fn fmt_ms(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.0}")
    } else {
        "never".into()
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let runs: usize = std::env::var("BOOT_LINUX_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let kernel = kernel();
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("hello.img");
    build_image(&kernel, &image);
    let pvm = Path::new("/sys/module/kvm_pvm").exists();

    let mut peers: Vec<(String, &str)> = Vec::new();
    if kvm_usable() {
        let kind = if pvm { "KVM, nested PVM" } else { "KVM" };
        peers.push((format!("hostd (built-in VMM, {kind})"), "kvm"));
    }
    let qemu_accel = if kvm_usable() && !pvm { "KVM" } else { "TCG" };
    peers.push((format!("hostd --vmm qemu (microvm, {qemu_accel})"), "qemu"));

    println!("boot_linux: {runs} runs each, medians; hello image, 128 MiB, 1 vCPU; ms from spawn");
    println!(
        "{:<40} {:>10} {:>10} {:>10} {:>14} {:>6}",
        "monitor", "init", "service", "exit", "peak RSS KiB", "ok"
    );
    let mut json = Vec::new();
    for (name, vmm) in &peers {
        let samples: Vec<Sample> = (0..runs)
            .filter_map(|_| spawn_and_measure(hostd_run(&image, vmm), &MARKERS))
            .collect();
        if samples.is_empty() {
            println!("{name:<40} failed to run");
            continue;
        }
        let ok = samples
            .iter()
            .filter(|s| s.exit_status == 0 && s.markers_ms.iter().all(Option::is_some))
            .count();
        let marker = |i: usize| {
            median(
                samples
                    .iter()
                    .map(|s| s.markers_ms[i].unwrap_or(f64::INFINITY))
                    .collect(),
            )
        };
        let (init, service) = (marker(0), marker(1));
        let exit = median(samples.iter().map(|s| s.to_exit_ms).collect());
        let rss = median(samples.iter().map(|s| s.max_rss_kib as f64).collect());
        println!(
            "{name:<40} {:>10} {:>10} {:>10} {rss:>14.0} {ok:>3}/{}",
            fmt_ms(init),
            fmt_ms(service),
            fmt_ms(exit),
            samples.len()
        );
        if let Some(t) = samples.last().and_then(|s| s.internal.clone()) {
            println!("    last run, hostd's own: {t}");
        }
        let num = |v: f64| {
            if v.is_finite() {
                format!("{v:.1}")
            } else {
                "null".into()
            }
        };
        json.push(format!(
            "{{\"monitor\":\"{name}\",\"vmm\":\"{vmm}\",\"runs\":{},\"ok_runs\":{ok},\"median_init_ms\":{},\"median_service_ms\":{},\"median_exit_ms\":{},\"median_peak_rss_kib\":{rss:.0}}}",
            samples.len(),
            num(init),
            num(service),
            num(exit)
        ));
    }
    write_json(
        "boot_linux",
        &format!("\"image\":\"images/examples/hello.toml\",\"pvm_host\":{pvm},"),
        &json,
    );
}
