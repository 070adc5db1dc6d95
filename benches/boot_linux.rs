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
//! Then what a booted guest's work costs under each: one image whose service times
//! (busybox `time`, in the guest) 10,000 one-byte `dd` reads and writes (20,000 system
//! calls), 20 fork+exec of `true`, and 16 MiB through a pipe into `sha256sum`. On a
//! nested PVM host guest user code runs natively but every kernel entry runs emulated.
//!
//! `cargo bench --bench boot_linux` — prints tables and writes target/bench/boot_linux.json.
//! BOOT_LINUX_RUNS sets the boot runs per monitor (default 3); the workload runs once.
#![allow(clippy::print_stdout)] // a benchmark's figures are its output

mod common;

use common::{kvm_usable, median, spawn_and_measure, write_json, Sample};
use std::path::{Path, PathBuf};
use std::process::Command;

const MARKERS: [&str; 2] = ["hostd-init: started", "[hello] hello from hostd"];

/// The workload image: each step timed by busybox `time` inside the guest.
const WORKLOAD: &str = r#"
name = "workload"
memory = "128M"
packages = ["busybox-static"]

[services.work]
command = "/bin/busybox"
args = ["sh", "-c", "B=/bin/busybox; $B time $B sh -c '/bin/busybox dd if=/dev/zero of=/dev/null bs=1 count=10000 2>/dev/null'; $B time $B sh -c 'i=0; while [ $i -lt 20 ]; do i=$((i+1)); /bin/busybox true; done'; $B time $B sh -c '/bin/busybox dd if=/dev/zero bs=1M count=16 2>/dev/null | /bin/busybox sha256sum >/dev/null'; echo workload-done"]
main = true
"#;

const STEPS: [&str; 3] = [
    "20,000 syscalls (dd bs=1)",
    "20 fork+exec",
    "16 MiB pipe + sha256",
];

/// The `real` times busybox `time` printed, in seconds, in order (`real\t0m 6.90s`).
fn real_times(stdout: &str) -> Vec<f64> {
    stdout
        .lines()
        .filter_map(|l| l.split("real").nth(1))
        .filter_map(|t| {
            let t = t.trim().trim_end_matches('s');
            let (m, s) = t.split_once('m')?;
            Some(m.trim().parse::<f64>().ok()? * 60.0 + s.trim().parse::<f64>().ok()?)
        })
        .collect()
}

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

fn build_image(kernel: &Path, spec: &Path, out: &Path) {
    let status = Command::new(env!("CARGO_BIN_EXE_hostd"))
        .arg("build")
        .arg(spec)
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
    let hello = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/images/examples/hello.toml"
    ));
    build_image(&kernel, hello, &image);
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

    // The workload: once per monitor.
    let spec = dir.path().join("workload.toml");
    std::fs::write(&spec, WORKLOAD).expect("write workload spec");
    let work_image = dir.path().join("workload.img");
    build_image(&kernel, &spec, &work_image);
    println!("\nin-guest work (busybox time, seconds; one run each)");
    println!(
        "{:<40} {:>26} {:>14} {:>22}",
        "monitor", STEPS[0], STEPS[1], STEPS[2]
    );
    let mut work_json = Vec::new();
    for (name, vmm) in &peers {
        let out = hostd_run(&work_image, vmm).output().expect("run hostd");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let t = real_times(&stdout);
        if t.len() != STEPS.len() || !stdout.contains("workload-done") {
            println!("{name:<40} failed: {}", stdout.lines().last().unwrap_or(""));
            continue;
        }
        println!("{name:<40} {:>26.2} {:>14.2} {:>22.2}", t[0], t[1], t[2]);
        work_json.push(format!(
            "{{\"monitor\":\"{name}\",\"vmm\":\"{vmm}\",\"syscalls_20000_s\":{:.3},\"fork_exec_20_s\":{:.3},\"pipe_sha256_16mib_s\":{:.3}}}",
            t[0], t[1], t[2]
        ));
    }
    write_json(
        "boot_linux",
        &format!(
            "\"image\":\"images/examples/hello.toml\",\"pvm_host\":{pvm},\"workload\":[{}],",
            work_json.join(",")
        ),
        &json,
    );
}
