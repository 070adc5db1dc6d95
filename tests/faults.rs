//! Faults during a run (issue 20): `kill -9` of `hostd run` during start-up and while
//! the guest runs, under both monitors, leaves no process of that VM and no temporary
//! file; Ctrl-C during boot stops the guest at once with exit code 130.

mod common;

use common::{build, hostd, is_root, kvm_usable, require, require_qemu_guest, spawn_running};
use std::path::Path;
use std::time::{Duration, Instant};

const SPEC: &str = r#"
name = "faults"
root = "erofs"
packages = ["busybox-static"]

[services.app]
command = "/bin/busybox"
args = ["sh", "-c", "echo fault-test-ready; /bin/busybox sleep 600"]
main = true
"#;

/// A process and its start time (so that a reused pid is not mistaken for it).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Proc {
    pid: u32,
    start: String,
    cmdline: String,
}

fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    Some(after.split_whitespace().map(str::to_string).collect())
}

/// Every process below `root`, now.
fn descendants(root: u32) -> Vec<Proc> {
    let mut all = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let Some(f) = stat_fields(pid) else { continue };
        // After "pid (comm) ": state, ppid, …, starttime is field 22 of the full line.
        let ppid: u32 = f.get(1).and_then(|p| p.parse().ok()).unwrap_or(0);
        let start = f.get(19).cloned().unwrap_or_default();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        all.push((
            ppid,
            Proc {
                pid,
                start,
                cmdline,
            },
        ));
    }
    let mut found: Vec<Proc> = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (_, c) in all.iter().filter(|(pp, _)| *pp == p) {
            frontier.push(c.pid);
            found.push(c.clone());
        }
    }
    found
}

fn alive(p: &Proc) -> bool {
    stat_fields(p.pid)
        .is_some_and(|f| f.get(19) == Some(&p.start) && f.first().is_some_and(|s| s != "Z"))
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// hostd's per-VM cgroups of `pid` that still hold a process.
fn populated_cgroups(pid: u32) -> Vec<String> {
    let name = format!("hostd-vm-{pid}");
    let mut out = Vec::new();
    let text = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    for l in text.lines() {
        let mut parts = l.splitn(3, ':');
        let (Some(_), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let base = if ctrls.is_empty() {
            "/sys/fs/cgroup/unified".to_string()
        } else {
            format!("/sys/fs/cgroup/{}", ctrls.trim_start_matches("name="))
        };
        let procs = Path::new(&base)
            .join(path.trim_start_matches('/'))
            .join(&name)
            .join("cgroup.procs");
        if let Ok(t) = std::fs::read_to_string(&procs) {
            if !t.trim().is_empty() {
                out.push(format!("{}: {}", procs.display(), t.trim()));
            }
        }
    }
    out
}

#[derive(Debug, Clone, Copy)]
enum When {
    /// As soon as the first device backend exists.
    StartUp,
    /// Once the guest's service runs.
    Running,
}

fn kill_hostd_run(vmm: &str, when: When) {
    if !require("root", is_root(), "run the tests as root") || !require_qemu_guest() {
        return;
    }
    let (_dir, image) = build(SPEC);
    let tmp = tempfile::tempdir().expect("tempdir");
    let state = tempfile::tempdir().expect("state");
    let mut cmd = hostd();
    cmd.env("TMPDIR", tmp.path())
        .args(["run", "--vmm", vmm, "--timeout", "400", "--state-dir"])
        .arg(state.path())
        .arg(&image);
    let running = spawn_running(cmd);
    let pid = running.child.id();
    let mut seen: Vec<Proc> = Vec::new();
    let note = |seen: &mut Vec<Proc>| {
        for p in descendants(pid) {
            if !seen.contains(&p) {
                seen.push(p);
            }
        }
    };
    match when {
        When::StartUp => {
            let end = Instant::now() + Duration::from_secs(60);
            while !seen.iter().any(|p| p.cmdline.contains(" backend ")) && Instant::now() < end {
                note(&mut seen);
                std::thread::sleep(Duration::from_millis(2));
            }
            assert!(
                seen.iter().any(|p| p.cmdline.contains(" backend ")),
                "no backend started within 60 s: {seen:#?}"
            );
        }
        When::Running => {
            let ready = running.wait_for("fault-test-ready", Duration::from_secs(400));
            note(&mut seen);
            assert!(ready, "the guest never became ready");
        }
    }
    running.signal(libc::SIGKILL);
    let _ = running.finish(Duration::from_secs(30));
    // Everything of the VM goes within 10 s.
    let end = Instant::now() + Duration::from_secs(10);
    let mut left: Vec<Proc> = seen.clone();
    while Instant::now() < end {
        left = seen.iter().filter(|p| alive(p)).cloned().collect();
        if left.is_empty() && populated_cgroups(pid).is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!seen.is_empty(), "the VM's processes were never seen");
    assert!(
        left.is_empty(),
        "processes of the VM outlived `hostd run`: {left:#?}"
    );
    assert!(
        populated_cgroups(pid).is_empty(),
        "{:?}",
        populated_cgroups(pid)
    );
    assert_eq!(
        entries(tmp.path()),
        Vec::<String>::new(),
        "temporary files left behind"
    );
    // Nothing of the run stays; the cache of verified image versions
    // (/run/hostd/verified, images/src/stamp.rs) and KVM's supported CPUID
    // (/run/hostd/kvm-cpuid, vmm/src/kvm/cpuid_cache.rs) and the empty network namespace
    // (/run/hostd/empty-netns, vmm/src/jail/netns.rs) are shared by all runs by design.
    let run_hostd: Vec<String> = entries(Path::new("/run/hostd"))
        .into_iter()
        .filter(|e| !["verified", "kvm-cpuid", "empty-netns"].contains(&e.as_str()))
        .collect();
    assert_eq!(
        run_hostd,
        Vec::<String>::new(),
        "the host's /run/hostd must hold nothing of the run"
    );
}

#[test]
fn kill_9_of_hostd_run_during_start_up_under_qemu_leaves_nothing() {
    kill_hostd_run("qemu", When::StartUp);
}

#[test]
fn kill_9_of_hostd_run_while_the_guest_runs_under_qemu_leaves_nothing() {
    kill_hostd_run("qemu", When::Running);
}

#[test]
fn kill_9_of_hostd_run_during_start_up_under_the_built_in_vmm_leaves_nothing() {
    if !require("/dev/kvm", kvm_usable(), "a host with KVM") {
        return;
    }
    kill_hostd_run("kvm", When::StartUp);
}

#[test]
fn kill_9_of_hostd_run_while_the_guest_runs_under_the_built_in_vmm_leaves_nothing() {
    if !require("/dev/kvm", kvm_usable(), "a host with KVM") {
        return;
    }
    kill_hostd_run("kvm", When::Running);
}

fn ctrl_c_during_boot(vmm: &str) {
    if !require_qemu_guest() {
        return;
    }
    let (_dir, image) = build(SPEC);
    let tmp = tempfile::tempdir().expect("tempdir");
    let state = tempfile::tempdir().expect("state");
    let mut cmd = hostd();
    cmd.env("TMPDIR", tmp.path())
        .args(["run", "--vmm", vmm, "--timeout", "400", "--state-dir"])
        .arg(state.path())
        .arg(&image);
    let running = spawn_running(cmd);
    let pid = running.child.id();
    // Once a backend runs, the VM is being set up; the guest has not reached init.
    let end = Instant::now() + Duration::from_secs(60);
    while !descendants(pid)
        .iter()
        .any(|p| p.cmdline.contains(" backend "))
        && Instant::now() < end
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    running.signal(libc::SIGINT);
    let out = running.finish(Duration::from_secs(30));
    assert_eq!(out.code(), Some(130), "{}", out.all());
    assert!(
        !out.stdout.contains("fault-test-ready"),
        "the guest booted on after Ctrl-C: {}",
        out.all()
    );
    assert_eq!(
        entries(tmp.path()),
        Vec::<String>::new(),
        "temporary files left behind"
    );
}

#[test]
fn ctrl_c_during_boot_under_qemu_stops_the_guest_with_130() {
    ctrl_c_during_boot("qemu");
}

#[test]
fn ctrl_c_during_boot_under_the_built_in_vmm_stops_the_guest_with_130() {
    if !require("/dev/kvm", kvm_usable(), "a host with KVM") {
        return;
    }
    ctrl_c_during_boot("kvm");
}
