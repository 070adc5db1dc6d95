//! What a real-package image costs: the python3 image (`packages = ["python3"]` and a
//! `main` service running python, as tests/packages_qemu.rs builds it).
//!
//! - **cold build**: an empty `.deb` cache (`HOSTD_CACHE` a fresh directory) and no lock
//!   file: the closure is resolved from the apt lists, every `.deb` is downloaded with
//!   `apt-get download`, checked, unpacked and packed into the erofs root;
//! - **warm build**: the `.deb`s cached and the lock present (what every later build of
//!   a spec is);
//! - both as wall-clock time and as CPU time (user + system of hostd and of the
//!   programs it waited for), since on a shared machine the wall clock mostly says how
//!   loaded it was;
//! - **image size**;
//! - **time to first service** under both monitors: spawn of `hostd run` → guest init's
//!   `service main started` line on the console (ms, measured from this process the
//!   same way for both), and under QEMU the whole run to python's exit (code 0). On a
//!   nested PVM host the built-in VMM's python then takes minutes (docs/pvm.md), so its
//!   runs are stopped (SIGKILL) once the service started.
//!
//! Each figure is the median of N runs: `BUILD_PACKAGES_RUNS` (default 3) for builds and
//! QEMU, `BUILD_PACKAGES_KVM_RUNS` (default the same) for the built-in VMM (0 skips it).
//! `cargo bench --bench build_packages` prints a table and writes
//! target/bench/build_packages.json.
#![allow(clippy::print_stdout)] // a benchmark's figures are its output

mod common;

use common::{kvm_usable, median, write_json};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// The image of tests/packages_qemu.rs.
const PYTHON: &str = r#"
name = "py"
packages = ["python3"]

[services.main]
command = "/usr/bin/python3"
args = ["-c", """
import json, sqlite3, hashlib
db = sqlite3.connect(':memory:')
db.execute('create table t (v text)')
db.execute('insert into t values (?)', (json.dumps({'answer': 42}),))
row = db.execute('select v from t').fetchone()[0]
print('python says', json.loads(row)['answer'], hashlib.sha256(b'abc').hexdigest()[:16], 'sqlite', sqlite3.sqlite_version)
"""]
main = true
"#;

/// Guest init's line when the service has been started.
const FIRST_SERVICE: &str = "hostd-init: service main started";
/// The service's output.
const PYTHON_OUTPUT: &str = "[main] python says 42";

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

/// One build's wall-clock time and CPU time (user + system of hostd and the programs
/// it ran and waited for: dpkg-deb, mkfs.erofs, apt-get), in ms. On a shared machine
/// the CPU time says what the build costs; the wall clock also says how loaded it was.
#[derive(Clone, Copy)]
struct BuildTime {
    wall_ms: f64,
    cpu_ms: f64,
}

/// `hostd build spec -o out` with `cache` as HOSTD_CACHE; its times, or the error.
fn timed_build(kernel: &Path, spec: &Path, out: &Path, cache: &Path) -> Result<BuildTime, String> {
    let _ = std::fs::remove_file(out);
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_hostd"))
        .arg("build")
        .arg(spec)
        .arg("-o")
        .arg(out)
        .env("HOSTD_KERNEL", kernel)
        .env("HOSTD_CACHE", cache)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let stderr = child.stderr.take();
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut e) = stderr {
            let _ = std::io::Read::read_to_string(&mut e, &mut s);
        }
        s
    });
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; we wait for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid out-pointers; the pid is our child, not yet reaped.
    let rc = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    let wall_ms = start.elapsed().as_secs_f64() * 1e3;
    let err = err.join().unwrap_or_default();
    let tv = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    if rc > 0 && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
        Ok(BuildTime {
            wall_ms,
            cpu_ms: tv(usage.ru_utime) + tv(usage.ru_stime),
        })
    } else {
        Err(err)
    }
}

/// One boot: ms to the first-service line, ms to the process's exit (None when it was
/// stopped at the first service), and whether python's output came with exit code 0.
struct Boot {
    first_service_ms: Option<f64>,
    exit_ms: Option<f64>,
    ok: bool,
}

fn boot(image: &Path, vmm: &str, stop_at_service: bool) -> Option<Boot> {
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_hostd"))
        .args(["run", "--timings", "--timeout", "1800", "--vmm", vmm])
        .arg(image)
        .env("HOSTD_LOG", "warn,hostd_vmm=error")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .stdin(Stdio::null())
        .spawn()
        .ok()?;
    let stdout = child.stdout.take()?;
    let mut first = None;
    let mut said = false;
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        if first.is_none() && line.contains(FIRST_SERVICE) {
            first = Some(start.elapsed().as_secs_f64() * 1e3);
            if stop_at_service {
                let _ = child.kill();
                break;
            }
        }
        said |= line.contains(PYTHON_OUTPUT);
    }
    let status = child.wait().ok()?;
    let exit = start.elapsed().as_secs_f64() * 1e3;
    Some(Boot {
        first_service_ms: first,
        exit_ms: (!stop_at_service).then_some(exit),
        ok: if stop_at_service {
            first.is_some()
        } else {
            said && status.code() == Some(0)
        },
    })
}

fn fmt(v: f64, unit: &str) -> String {
    if v.is_finite() {
        format!("{v:.0} {unit}")
    } else {
        "failed".into()
    }
}

fn num(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.1}")
    } else {
        "null".into()
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let runs: usize = std::env::var("BUILD_PACKAGES_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let kvm_runs: usize = std::env::var("BUILD_PACKAGES_KVM_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(runs);
    let kernel = kernel();
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = dir.path().join("py.toml");
    std::fs::write(&spec, PYTHON).expect("write spec");
    let lock = dir.path().join("py.lock");
    let image = dir.path().join("py.img");

    // Cold: a fresh cache and no lock each time.
    let mut cold = Vec::new();
    let mut cache = dir.path().join("cache-0");
    for i in 0..runs {
        let _ = std::fs::remove_file(&lock);
        cache = dir.path().join(format!("cache-{i}"));
        std::fs::create_dir_all(&cache).expect("cache dir");
        match timed_build(&kernel, &spec, &image, &cache) {
            Ok(ms) => cold.push(ms),
            Err(e) => println!("cold build {i} failed: {e}"),
        }
        if i + 1 < runs {
            let _ = std::fs::remove_dir_all(&cache);
        }
    }
    // Warm: the last cold run's cache, and its lock.
    let mut warm = Vec::new();
    for i in 0..runs {
        match timed_build(&kernel, &spec, &image, &cache) {
            Ok(ms) => warm.push(ms),
            Err(e) => println!("warm build {i} failed: {e}"),
        }
    }
    let size = std::fs::metadata(&image).map(|m| m.len()).unwrap_or(0);
    let packages = std::fs::read_to_string(&lock)
        .map(|l| l.matches("[[package]]").count())
        .unwrap_or(0);
    let wall = |v: &[BuildTime]| median(v.iter().map(|b| b.wall_ms).collect());
    let cpu = |v: &[BuildTime]| median(v.iter().map(|b| b.cpu_ms).collect());
    let (cold_ms, warm_ms) = (wall(&cold), wall(&warm));
    let (cold_cpu, warm_cpu) = (cpu(&cold), cpu(&warm));

    println!(
        "build_packages: python3 image ({packages} packages), medians of {runs} run(s); load average {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .next()
            .unwrap_or("?")
    );
    println!(
        "{:<44} {:>14} {:>14} {:>6}",
        "", "wall clock", "CPU (u+s)", "ok"
    );
    for (what, v, w, c) in [
        (
            "build, cold (empty .deb cache, no lock)",
            &cold,
            cold_ms,
            cold_cpu,
        ),
        (
            "build, warm (.debs cached, lock present)",
            &warm,
            warm_ms,
            warm_cpu,
        ),
    ] {
        println!(
            "{what:<44} {:>14} {:>14} {:>3}/{runs}",
            fmt(w, "ms"),
            fmt(c, "ms"),
            v.len()
        );
    }
    println!(
        "{:<44} {:>14}",
        "image size",
        format!("{:.1} MiB", size as f64 / (1024.0 * 1024.0))
    );

    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    let mut peers: Vec<(String, &str, usize, bool)> = Vec::new();
    let qemu_accel = if kvm_usable() && !pvm { "KVM" } else { "TCG" };
    peers.push((
        format!("hostd --vmm qemu ({qemu_accel})"),
        "qemu",
        runs,
        false,
    ));
    if kvm_usable() && kvm_runs > 0 {
        let kind = if pvm { "KVM, nested PVM" } else { "KVM" };
        peers.push((
            format!("hostd (built-in VMM, {kind})"),
            "kvm",
            kvm_runs,
            true,
        ));
    }
    println!(
        "\n{:<44} {:>16} {:>16} {:>6}",
        "monitor", "first service", "python exit", "ok"
    );
    let mut boots_json = Vec::new();
    for (name, vmm, n, stop) in &peers {
        let samples: Vec<Boot> = (0..*n).filter_map(|_| boot(&image, vmm, *stop)).collect();
        let ok = samples.iter().filter(|b| b.ok).count();
        let first = median(
            samples
                .iter()
                .map(|b| b.first_service_ms.unwrap_or(f64::INFINITY))
                .collect(),
        );
        let exit = median(
            samples
                .iter()
                .map(|b| b.exit_ms.unwrap_or(f64::INFINITY))
                .collect(),
        );
        let exit_s = if *stop {
            "(stopped)".to_string()
        } else {
            fmt(exit, "ms")
        };
        println!(
            "{name:<44} {:>16} {exit_s:>16} {ok:>3}/{}",
            fmt(first, "ms"),
            samples.len()
        );
        boots_json.push(format!(
            "{{\"monitor\":\"{name}\",\"vmm\":\"{vmm}\",\"runs\":{},\"ok_runs\":{ok},\"median_first_service_ms\":{},\"median_exit_ms\":{}}}",
            samples.len(),
            num(first),
            if *stop { "null".into() } else { num(exit) }
        ));
    }
    let list = |v: &[BuildTime], cpu: bool| {
        v.iter()
            .map(|x| format!("{:.1}", if cpu { x.cpu_ms } else { x.wall_ms }))
            .collect::<Vec<_>>()
            .join(",")
    };
    write_json(
        "build_packages",
        &format!(
            "\"image\":\"python3\",\"packages\":{packages},\"pvm_host\":{pvm},\"image_bytes\":{size},\"builds\":{{\"cold_ms\":[{}],\"warm_ms\":[{}],\"cold_cpu_ms\":[{}],\"warm_cpu_ms\":[{}],\"median_cold_ms\":{},\"median_warm_ms\":{},\"median_cold_cpu_ms\":{},\"median_warm_cpu_ms\":{}}},",
            list(&cold, false),
            list(&warm, false),
            list(&cold, true),
            list(&warm, true),
            num(cold_ms),
            num(warm_ms),
            num(cold_cpu),
            num(warm_cpu)
        ),
        &boots_json,
    );
}
