//! Density benchmark (issue #18): how much host memory each idle VM costs outside the
//! guest's own RAM, measured the way Kata and gVisor report it.
//!
//! Builds one small service image (erofs root, one volume, rng; its service prints
//! `idle-ready` and sleeps), starts N copies of it at once under the built-in VMM and
//! under the QEMU runner, waits until every guest's service runs, lets them settle, and
//! reads for each VM every process of it (`hostd run`, the VM process or QEMU, each
//! vhost-user backend) from /proc/PID/smaps_rollup: PSS (and its anon/file/shmem parts),
//! and the guest memory actually touched (the allocated blocks of the guest-memory
//! memfd). Per VM it prints and writes: PSS of `hostd run`, of the monitor, of its
//! backends, their sum minus the guest memory touched (the overhead), and the host's
//! MemAvailable drop per VM (before the start vs. all running: noisy, since the start
//! takes minutes on a host doing other work), the MemAvailable the host gets back per VM
//! when all N are stopped (measured seconds apart, so far less noisy), and spawn →
//! `idle-ready`. Then, over a window of DENSITY_IDLE_S seconds (default 10), what the idle
//! VMs cost in CPU: per VM, the CPU time and wake-ups (context switches) per second of
//! its host-side threads (`hostd run`, the monitor's own threads, the backends) and,
//! apart, of its guest vCPU threads (the guest kernel's own timer work), from
//! /proc/PID/task/*/stat and status.
//!
//! `cargo bench --bench density` — prints a table per runner and writes
//! target/bench/density.json. DENSITY_N copies (default 10), DENSITY_START (`serial`:
//! each once the one before is ready, the default for the built-in VMM; `parallel`: all
//! at once, the default for QEMU), DENSITY_VMMS (default
//! `kvm,qemu`), HOSTD_BIN (a `hostd` to measure instead of this build's, e.g. an older
//! one for before/after; it also builds the image), HOSTD_KERNEL (default: the cached
//! guest kernel).
#![allow(clippy::print_stdout)] // a benchmark's figures are its output

mod common;

use common::{kvm_usable, median, write_json};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The idle service image (shared with tests/lean_memory.rs).
const SPEC: &str = include_str!("../tests/fixtures/idle.toml");

const READY: &str = "idle-ready";

fn hostd_bin() -> PathBuf {
    std::env::var_os("HOSTD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_hostd")))
}

fn kernel() -> PathBuf {
    std::env::var_os("HOSTD_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
            PathBuf::from(home).join(".cache/hostd/kernel/default/vmlinux")
        })
}

/// One process's memory, KiB.
#[derive(Debug, Default, Clone)]
struct ProcMem {
    pid: i32,
    role: &'static str,
    pss: u64,
    pss_anon: u64,
    pss_file: u64,
    pss_shmem: u64,
}

fn smaps(pid: i32, role: &'static str) -> Option<ProcMem> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    Some(ProcMem {
        pid,
        role,
        pss: field("Pss"),
        pss_anon: field("Pss_Anon"),
        pss_file: field("Pss_File"),
        pss_shmem: field("Pss_Shmem"),
    })
}

/// Every process on the host and its parent.
fn parents() -> BTreeMap<i32, i32> {
    let mut map = BTreeMap::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The field after the last ')' (comm may hold spaces): state, then ppid.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse().ok());
        if let Some(ppid) = ppid {
            map.insert(pid, ppid);
        }
    }
    map
}

/// `root` and all its descendants.
fn tree(root: i32, parents: &BTreeMap<i32, i32>) -> Vec<i32> {
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(parents.iter().filter(|(_, pp)| **pp == p).map(|(c, _)| *c));
        i += 1;
    }
    out
}

fn role(pid: i32, root: i32) -> &'static str {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let exe = args.first().copied().unwrap_or_default();
    if args.get(1).copied() == Some(b"backend".as_slice()) {
        "backend"
    } else if pid == root {
        "hostd run"
    } else if exe.ends_with(b"hostd") || String::from_utf8_lossy(exe).contains("qemu-system") {
        "monitor"
    } else {
        "other"
    }
}

/// CPU time (clock ticks) and context switches of a set of threads, host side and vCPU.
#[derive(Debug, Default, Clone, Copy)]
struct Activity {
    host_ticks: u64,
    host_switches: u64,
    vcpu_ticks: u64,
    vcpu_switches: u64,
}

/// Whether a thread runs guest code: the built-in VMM's `vcpuN`, QEMU's `CPU N/KVM` or
/// `CPU N/TCG`.
fn is_vcpu_thread(comm: &str) -> bool {
    comm.starts_with("vcpu") || (comm.starts_with("CPU ") && comm.contains('/'))
}

/// Every thread of `pids` so far.
fn activity(pids: &[i32]) -> Activity {
    let mut a = Activity::default();
    for pid in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let dir = t.path();
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
            // utime and stime: fields 14 and 15, the 12th and 13th after the ')'.
            let ticks: u64 = stat
                .rsplit_once(')')
                .map(|(_, rest)| {
                    rest.split_whitespace()
                        .skip(11)
                        .take(2)
                        .filter_map(|v| v.parse::<u64>().ok())
                        .sum()
                })
                .unwrap_or(0);
            let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
            let switches: u64 = status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum();
            if is_vcpu_thread(comm.trim()) {
                a.vcpu_ticks += ticks;
                a.vcpu_switches += switches;
            } else {
                a.host_ticks += ticks;
                a.host_switches += switches;
            }
        }
    }
    a
}

/// KiB of guest memory actually allocated: the largest memfd any process of the VM
/// holds (the guest memory; its blocks are the pages the guest or a device touched).
fn guest_touched_kib(pids: &[i32]) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut seen = BTreeMap::new();
    for pid in pids {
        for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let is_memfd = std::fs::read_link(e.path())
                .map(|l| l.to_string_lossy().starts_with("/memfd:"))
                .unwrap_or(false);
            if let (true, Ok(m)) = (is_memfd, std::fs::metadata(e.path())) {
                seen.insert((m.dev(), m.ino()), (m.size(), m.blocks() * 512 / 1024));
            }
        }
    }
    seen.values()
        .max_by_key(|(size, _)| *size)
        .map(|(_, kib)| *kib)
        .unwrap_or(0)
}

fn mem_available_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

struct Vm {
    child: Child,
    _state: tempfile::TempDir,
    ready_ms: Option<f64>,
}

/// Per-VM figures, KiB (boot in ms).
#[derive(Debug, Default)]
struct Row {
    launcher_pss: u64,
    monitor_pss: u64,
    monitor_pss_anon: u64,
    backends_pss: u64,
    backends: usize,
    guest_touched: u64,
    overhead: u64,
    ready_ms: f64,
    /// While idle, per second: CPU ms and wake-ups of the host-side threads, then of the
    /// vCPU threads.
    host_cpu_ms_s: f64,
    host_wakeups_s: f64,
    vcpu_cpu_ms_s: f64,
    vcpu_wakeups_s: f64,
}

/// How the N copies are started: all at once, or each once the one before it is ready
/// (`serial`, the default for the built-in VMM: on a nested PVM host each boot is
/// emulated CPU work, and ten at once on two cores take far longer than ten in a row;
/// the memory each VM holds once idle is the same either way).
fn serial_start(vmm: &str) -> bool {
    match std::env::var("DENSITY_START").as_deref() {
        Ok("serial") => true,
        Ok("parallel") => false,
        _ => vmm == "kvm",
    }
}

/// What one runner's N VMs measured: a row per VM, and the host's MemAvailable drop
/// per VM at start and its rise per VM when they were stopped (KiB).
struct Measured {
    rows: Vec<Row>,
    drop_per_vm: i64,
    freed_per_vm: i64,
}

/// MemAvailable once it has stopped rising after the VMs were killed (the kernel frees
/// guest memory as each process exits), within a few seconds.
fn mem_available_settled() -> u64 {
    let mut last = mem_available_kib();
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(500));
        let now = mem_available_kib();
        if now <= last + 256 {
            return now.max(last);
        }
        last = now;
    }
    last
}

fn run_vmm(image: &Path, vmm: &str, n: usize) -> Option<Measured> {
    let before = mem_available_kib();
    let serial = serial_start(vmm);
    let (tx, rx) = mpsc::channel::<(usize, f64)>();
    let mut vms: Vec<Vm> = Vec::new();
    // Per VM when started one by one, for all together otherwise.
    let limit = Duration::from_secs(match (vmm, serial) {
        ("kvm", true) => 900,
        ("kvm", false) => 120 + 60 * n as u64,
        _ => 300,
    });
    let mut ready = 0;
    let mut wait_ready = |vms: &mut Vec<Vm>, want: usize, since: Instant| {
        while ready < want {
            let left = limit.saturating_sub(since.elapsed());
            match rx.recv_timeout(left) {
                Ok((i, ms)) => {
                    if vms[i].ready_ms.is_none() {
                        vms[i].ready_ms = Some(ms);
                        ready += 1;
                    }
                }
                Err(_) => break,
            }
        }
        ready
    };
    let all = Instant::now();
    for i in 0..n {
        let state = tempfile::tempdir().ok()?;
        let mut cmd = Command::new(hostd_bin());
        cmd.args(["run", "--vmm", vmm, "--state-dir"])
            .arg(state.path())
            .arg(image)
            .env("HOSTD_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let spawned = Instant::now();
        let mut child = cmd.spawn().ok()?;
        let stdout = child.stdout.take()?;
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains(READY) {
                    let _ = tx.send((i, spawned.elapsed().as_secs_f64() * 1e3));
                }
            }
        });
        vms.push(Vm {
            child,
            _state: state,
            ready_ms: None,
        });
        if serial && wait_ready(&mut vms, i + 1, spawned) <= i {
            println!("  guest {i} did not print `{READY}` within {limit:?}; not starting more");
            break;
        }
    }
    drop(tx);
    let started = vms.len();
    let ready = if serial {
        ready
    } else {
        wait_ready(&mut vms, n, all)
    };
    if ready < n {
        println!("  only {ready} of {n} guests ({started} started) printed `{READY}`");
    }
    // Let start-up garbage settle (backends finish their set-up, the guests go idle).
    std::thread::sleep(Duration::from_secs(5));
    let after = mem_available_kib();
    let parents = parents();
    let mut rows = Vec::new();
    for vm in &vms {
        let root = vm.child.id() as i32;
        let pids = tree(root, &parents);
        let mut row = Row {
            ready_ms: vm.ready_ms.unwrap_or(f64::NAN),
            guest_touched: guest_touched_kib(&pids),
            ..Row::default()
        };
        let mut total = 0;
        for pid in &pids {
            let Some(m) = smaps(*pid, role(*pid, root)) else {
                continue;
            };
            total += m.pss;
            match m.role {
                "hostd run" => row.launcher_pss += m.pss,
                "monitor" => {
                    row.monitor_pss += m.pss;
                    row.monitor_pss_anon += m.pss_anon;
                }
                "backend" => {
                    row.backends_pss += m.pss;
                    row.backends += 1;
                }
                _ => {}
            }
            if std::env::var_os("DENSITY_VERBOSE").is_some() {
                println!(
                    "    pid {} {:<9} pss {:>6} anon {:>6} file {:>6} shmem {:>6}",
                    m.pid, m.role, m.pss, m.pss_anon, m.pss_file, m.pss_shmem
                );
            }
        }
        row.overhead = total.saturating_sub(row.guest_touched);
        rows.push(row);
    }
    let running = mem_available_kib();
    // The idle VMs' CPU: every thread of each, at the start and end of a window.
    let window = Duration::from_secs(
        std::env::var("DENSITY_IDLE_S")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10),
    );
    let trees: Vec<Vec<i32>> = vms
        .iter()
        .map(|vm| tree(vm.child.id() as i32, &parents))
        .collect();
    let first: Vec<Activity> = trees.iter().map(|t| activity(t)).collect();
    let t0 = Instant::now();
    std::thread::sleep(window);
    let secs = t0.elapsed().as_secs_f64();
    // SAFETY: sysconf has no preconditions.
    let tick_ms = 1000.0 / (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64);
    for ((row, t), a) in rows.iter_mut().zip(&trees).zip(&first) {
        let b = activity(t);
        let rate = |after: u64, before: u64| after.saturating_sub(before) as f64 / secs;
        row.host_cpu_ms_s = rate(b.host_ticks, a.host_ticks) * tick_ms;
        row.host_wakeups_s = rate(b.host_switches, a.host_switches);
        row.vcpu_cpu_ms_s = rate(b.vcpu_ticks, a.vcpu_ticks) * tick_ms;
        row.vcpu_wakeups_s = rate(b.vcpu_switches, a.vcpu_switches);
    }
    for vm in &mut vms {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(vm.child.id() as i32, libc::SIGTERM) };
    }
    for vm in &mut vms {
        let _ = vm.child.wait();
    }
    let freed = mem_available_settled();
    let count = vms.len().max(1) as i64;
    Some(Measured {
        rows,
        drop_per_vm: (before as i64 - after as i64) / count,
        freed_per_vm: (freed as i64 - running as i64) / count,
    })
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn main() {
    let n: usize = std::env::var("DENSITY_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let vmms = std::env::var("DENSITY_VMMS").unwrap_or_else(|_| "kvm,qemu".into());
    let kernel = kernel();
    if !kernel.exists() {
        println!("density: no guest kernel at {} (build it with guest/kernel/build.sh or set HOSTD_KERNEL); skipped", kernel.display());
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let spec = dir.path().join("idle.toml");
    std::fs::write(&spec, SPEC).expect("write spec");
    let image = dir.path().join("idle.img");
    let built = Command::new(hostd_bin())
        .arg("build")
        .arg(&spec)
        .arg("-o")
        .arg(&image)
        .arg("--kernel")
        .arg(&kernel)
        .status()
        .expect("run hostd build");
    assert!(built.success(), "hostd build failed");
    let image_bytes = std::fs::metadata(&image).map(|m| m.len()).unwrap_or(0);
    println!(
        "density: {n} idle copies of a {:.1} MiB image (erofs root, one volume, rng), hostd {}",
        image_bytes as f64 / 1048576.0,
        hostd_bin().display()
    );
    let mut results = Vec::new();
    for vmm in vmms.split(',').map(str::trim).filter(|v| !v.is_empty()) {
        if vmm == "kvm" && !kvm_usable() {
            println!("{vmm}: /dev/kvm is not usable here; skipped");
            continue;
        }
        println!(
            "\n{vmm}: starting {n} {} …",
            if serial_start(vmm) {
                "one after another (each once the one before is ready; DENSITY_START=parallel for all at once)"
            } else {
                "at once"
            }
        );
        let Some(Measured {
            rows,
            drop_per_vm: drop_kib,
            freed_per_vm: freed_kib,
        }) = run_vmm(&image, vmm, n)
        else {
            println!("{vmm}: could not start the VMs");
            continue;
        };
        println!(
            "  {:>3} {:>10} {:>10} {:>10} {:>9} {:>10} {:>12} {:>9}",
            "vm", "hostd run", "monitor", "mon. anon", "backends", "guest RAM", "overhead", "ready"
        );
        for (i, r) in rows.iter().enumerate() {
            println!(
                "  {:>3} {:>6.1} MiB {:>6.1} MiB {:>6.1} MiB {:>2}×{:>4.1} MiB {:>6.1} MiB {:>8.1} MiB {:>7.1} s",
                i,
                mib(r.launcher_pss),
                mib(r.monitor_pss),
                mib(r.monitor_pss_anon),
                r.backends,
                mib(r.backends_pss) / r.backends.max(1) as f64,
                mib(r.guest_touched),
                mib(r.overhead),
                r.ready_ms / 1e3
            );
        }
        let med = |f: &dyn Fn(&Row) -> u64| median(rows.iter().map(|r| f(r) as f64).collect());
        let overhead = med(&|r| r.overhead);
        let touched = med(&|r| r.guest_touched);
        let ready = median(rows.iter().map(|r| r.ready_ms).collect());
        println!(
            "  median overhead {:.1} MiB per VM outside guest RAM (goal ≤ 5 MiB); MemAvailable freed when stopped {:.1} MiB per VM ({:.1} MiB minus guest RAM touched); MemAvailable drop at start {:.1} MiB per VM ({:.1} minus guest RAM; noisy); median spawn → ready {:.1} s",
            overhead / 1024.0,
            freed_kib as f64 / 1024.0,
            (freed_kib as f64 - touched) / 1024.0,
            drop_kib as f64 / 1024.0,
            (drop_kib as f64 - touched) / 1024.0,
            ready / 1e3
        );
        let medf = |f: &dyn Fn(&Row) -> f64| median(rows.iter().map(f).collect());
        let idle = [
            medf(&|r| r.host_cpu_ms_s),
            medf(&|r| r.host_wakeups_s),
            medf(&|r| r.vcpu_cpu_ms_s),
            medf(&|r| r.vcpu_wakeups_s),
        ];
        println!(
            "  idle, per VM (medians): host-side threads (hostd run, monitor, backends) {:.2} ms CPU/s, {:.1} wake-ups/s; guest vCPU threads {:.2} ms CPU/s, {:.1} wake-ups/s",
            idle[0], idle[1], idle[2], idle[3]
        );
        let vms: Vec<String> = rows
            .iter()
            .map(|r| {
                format!(
                    "{{\"hostd_run_pss_kib\":{},\"monitor_pss_kib\":{},\"monitor_pss_anon_kib\":{},\"backends\":{},\"backends_pss_kib\":{},\"guest_touched_kib\":{},\"overhead_kib\":{},\"ready_ms\":{:.0},\"idle_host_cpu_ms_per_s\":{:.3},\"idle_host_wakeups_per_s\":{:.2},\"idle_vcpu_cpu_ms_per_s\":{:.3},\"idle_vcpu_wakeups_per_s\":{:.2}}}",
                    r.launcher_pss, r.monitor_pss, r.monitor_pss_anon, r.backends, r.backends_pss, r.guest_touched, r.overhead,
                    if r.ready_ms.is_finite() { r.ready_ms } else { -1.0 },
                    r.host_cpu_ms_s, r.host_wakeups_s, r.vcpu_cpu_ms_s, r.vcpu_wakeups_s
                )
            })
            .collect();
        results.push(format!(
            "{{\"vmm\":\"{vmm}\",\"n\":{n},\"idle_host_cpu_ms_per_s\":{:.3},\"idle_host_wakeups_per_s\":{:.2},\"idle_vcpu_cpu_ms_per_s\":{:.3},\"idle_vcpu_wakeups_per_s\":{:.2},\"median_overhead_kib\":{overhead:.0},\"mem_available_drop_per_vm_kib\":{drop_kib},\"mem_available_freed_per_vm_kib\":{freed_kib},\"median_ready_ms\":{:.0},\"vms\":[{}]}}",
            idle[0],
            idle[1],
            idle[2],
            idle[3],
            if ready.is_finite() { ready } else { -1.0 },
            vms.join(",")
        ));
    }
    write_json(
        "density",
        &format!(
            "\"hostd\":{:?},\"image_bytes\":{image_bytes},",
            hostd_bin().display().to_string()
        ),
        &results,
    );
}
