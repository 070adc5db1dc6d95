//! The jail of a running VM (issue 11): while a guest runs under the built-in VMM and
//! under QEMU, the VMM or QEMU process and every device backend run with a uid other
//! than 0, in mount and PID namespaces of their own, under a seccomp filter, without
//! capabilities, with only the fds they need, in a cgroup with a memory limit. And a
//! backend whose code tries to map executable memory or start a process dies with SIGSYS.

mod common;

use common::{build, hostd, is_root, kvm_usable, require, require_qemu_guest, spawn_running};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::Duration;

// ---- backends: argument filters, uid, rlimits ---------------------------------------

fn backend_selftest(kind: &[&str], test: &str) -> common::Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = hostd();
    cmd.arg("backend")
        .args(kind)
        .arg("--socket")
        .arg(dir.path().join("s.sock"))
        .args(["--selftest", test]);
    common::run_with_deadline(cmd, Duration::from_secs(30))
}

fn require_root() -> bool {
    require(
        "root (namespaces, pivot_root, uid changes)",
        is_root(),
        "run the tests as root",
    )
}

#[test]
fn a_backend_that_maps_executable_memory_or_starts_a_process_dies_with_sigsys() {
    if !require_root() {
        return;
    }
    let image = tempfile::NamedTempFile::new().expect("file");
    std::fs::write(image.path(), vec![0u8; 8192]).expect("write");
    let file = image.path().to_string_lossy().into_owned();
    let kinds: [Vec<&str>; 3] = [
        vec!["rng"],
        vec!["block", "--file", &file],
        vec!["vsock", "--cid", "3"],
    ];
    for kind in &kinds {
        for (test, what) in [
            ("mmap-exec", "mmap(2) with PROT_EXEC"),
            ("mprotect-exec", "mprotect(2) with PROT_EXEC"),
            ("fork", "clone(2) without CLONE_THREAD"),
            ("prctl-dumpable", "prctl(PR_SET_DUMPABLE)"),
        ] {
            let out = backend_selftest(kind, test);
            assert_eq!(
                out.status.signal(),
                Some(libc::SIGSYS),
                "{kind:?} {test}: {}",
                out.all()
            );
            assert!(
                out.stderr.contains(&format!("calling {what}"))
                    && !out.stderr.contains("was allowed"),
                "{kind:?} {test}: {}",
                out.all()
            );
        }
    }
}

/// `Key:` field of a /proc status text.
fn field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

/// The soft limit of `name` in /proc/PID/limits ("unlimited" or a number).
fn limit(pid: u32, name: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| {
            l[name.len()..]
                .split_whitespace()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_default()
}

#[test]
fn a_waiting_backend_runs_unprivileged_with_bounded_threads_and_memory() {
    if !require_root() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("s.sock");
    let mut child = hostd()
        .args(["backend", "rng", "--guest-mib", "64", "--socket"])
        .arg(&socket)
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("spawn backend");
    let pid = child.id();
    let start = std::time::Instant::now();
    // Jailed once the uid changed (the socket exists before that).
    let mut status = String::new();
    while start.elapsed() < Duration::from_secs(10) {
        status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        if field(&status, "Seccomp:") == "2" {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let nproc = limit(pid, "Max processes");
    let address_space = limit(pid, "Max address space");
    let _ = child.kill();
    let _ = child.wait();
    let uids: Vec<u32> = field(&status, "Uid:")
        .split_whitespace()
        .filter_map(|u| u.parse().ok())
        .collect();
    assert_eq!(uids.len(), 4, "{status}");
    assert!(uids.iter().all(|u| *u != 0), "still root: {status}");
    assert!(
        field(&status, "Gid:").split_whitespace().all(|g| g != "0"),
        "{status}"
    );
    assert_eq!(field(&status, "Groups:"), "", "{status}");
    assert_eq!(field(&status, "CapEff:"), "0000000000000000", "{status}");
    assert_eq!(field(&status, "CapBnd:"), "0000000000000000", "{status}");
    assert_eq!(field(&status, "NoNewPrivs:"), "1", "{status}");
    assert_eq!(nproc, "16");
    // 64 MiB of guest memory plus the backend's own 512 MiB.
    assert_eq!(address_space, ((64u64 + 512) << 20).to_string());
}

// ---- a running VM --------------------------------------------------------------------

const SPEC: &str = r#"
name = "jailed"
root = "erofs"
packages = ["busybox-static"]

[[volumes]]
name = "data"
size = "8M"
mount = "/data"

[services.app]
command = "/bin/busybox"
args = ["sh", "-c", "echo jail-test-ready; /bin/busybox sleep 600"]
secrets = ["token"]
main = true
"#;

/// One process of the host, as the test sees it.
#[derive(Debug, Clone)]
struct Proc {
    pid: u32,
    ppid: u32,
    cmdline: Vec<String>,
}

fn procs() -> Vec<Proc> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid …; comm may hold spaces and parentheses.
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        let ppid = after
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
            .unwrap_or_default()
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        out.push(Proc { pid, ppid, cmdline });
    }
    out
}

/// Every process below `root` (not `root` itself).
fn descendants(root: u32) -> Vec<Proc> {
    let all = procs();
    let mut found: Vec<Proc> = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for c in all.iter().filter(|c| c.ppid == p) {
            frontier.push(c.pid);
            found.push(c.clone());
        }
    }
    found
}

/// What a jailed process may hold open: each fd's link target must start with one of
/// `allowed`.
fn unexpected_fds(pid: u32, allowed: &[&str]) -> Vec<String> {
    let mut bad = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let target = std::fs::read_link(e.path())
            .map(|t| t.to_string_lossy().into_owned())
            .unwrap_or_default();
        // /dev/null shows as "/null" once the process's /dev is out of sight (after
        // its pivot_root): know it by its device number instead.
        let null = {
            use std::os::unix::fs::{FileTypeExt, MetadataExt};
            std::fs::metadata(e.path())
                .is_ok_and(|m| m.file_type().is_char_device() && m.rdev() == libc::makedev(1, 3))
        };
        if !null && !allowed.iter().any(|a| target.starts_with(a)) {
            bad.push(format!("fd {}: {target}", e.file_name().to_string_lossy()));
        }
    }
    bad
}

/// Every fd kind a VM's processes use: stdio pipes (or /dev/null for stdin), the
/// vhost-user sockets, eventfds, epoll, guest memory as a memfd.
const COMMON_FDS: &[&str] = &[
    "pipe:",
    "socket:",
    "anon_inode:[eventfd]",
    "anon_inode:[eventpoll]",
    "/memfd:",
];

/// What the built-in VMM holds besides: KVM's fds, and a pidfd of `hostd run` (to
/// check it is alive when it asks to die with it).
const VMM_FDS: &[&str] = &[
    "/dev/kvm",
    "anon_inode:kvm-vm",
    "anon_inode:kvm-vcpu",
    "anon_inode:[pidfd]",
];

/// What QEMU holds besides (its own event loop's and TCG's fds).
const QEMU_FDS: &[&str] = &[
    "anon_inode:[signalfd]",
    "anon_inode:[timerfd]",
    "/dev/urandom",
];

/// The memory limit of the cgroup `pid` is in (v1 memory hierarchy or v2), if any.
fn memory_limit(pid: u32) -> Option<(String, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    for l in text.lines() {
        let mut parts = l.splitn(3, ':');
        let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        let file = if ctrls.split(',').any(|c| c == "memory") {
            format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes")
        } else if ctrls.is_empty() && Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            format!("/sys/fs/cgroup{path}/memory.max")
        } else {
            continue;
        };
        let v = std::fs::read_to_string(&file).ok()?;
        return v.trim().parse().ok().map(|n| (path.to_string(), n));
    }
    None
}

/// The names of `pid`'s environment variables.
fn env_names(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter(|v| !v.is_empty())
        .map(|v| {
            let v = String::from_utf8_lossy(v);
            v.split('=').next().unwrap_or_default().to_string()
        })
        .collect()
}

/// Variables a VM's process may have: backends keep the log filter, QEMU nothing;
/// backends are given the stack size of their library's threads (hostd-devices'
/// `thread::min_stack_env`), a value of hostd's, not of its environment.
const ENV_ALLOWED: &[&str] = &["HOSTD_LOG", "RUST_LOG", "RUST_BACKTRACE", "RUST_MIN_STACK"];

/// For a process hostd started with exec (backends, QEMU; not the VM's own process,
/// which is hostd forked): nothing of hostd's environment but the log filter.
fn check_clean_env(p: &Proc, problems: &mut Vec<String>) {
    let env = env_names(p.pid);
    if env.iter().any(|v| !ENV_ALLOWED.contains(&v.as_str())) {
        problems.push(format!(
            "pid {} ({}): environment not clean: {env:?}",
            p.pid,
            p.cmdline.join(" ")
        ));
    }
}

/// Not dumpable: the kernel then gives /proc/PID/* to root, whatever the process's uid
/// (and refuses ptrace and core dumps). QEMU, started by exec, is dumpable again (it
/// has RLIMIT_CORE 0 and dump-guest-core=off instead).
fn check_not_dumpable(p: &Proc, problems: &mut Vec<String>) {
    use std::os::unix::fs::MetadataExt;
    // Not /proc/PID itself: world-readable directories there always show the uid.
    let owner = std::fs::metadata(format!("/proc/{}/status", p.pid))
        .map(|m| m.uid())
        .ok();
    if owner != Some(0) {
        problems.push(format!(
            "pid {} ({}): dumpable (/proc/PID/status owned by {owner:?})",
            p.pid,
            p.cmdline.join(" ")
        ));
    }
}

fn check_jailed(p: &Proc, extra_fds: &[&str], problems: &mut Vec<String>) {
    let pid = p.pid;
    let name = format!("pid {pid} ({})", p.cmdline.join(" "));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    if field(&status, "Uid:").split_whitespace().any(|u| u == "0") {
        problems.push(format!("{name}: runs as uid 0: {}", field(&status, "Uid:")));
    }
    if field(&status, "Seccomp:") != "2" {
        problems.push(format!("{name}: no seccomp filter"));
    }
    if field(&status, "CapEff:") != "0000000000000000" {
        problems.push(format!(
            "{name}: capabilities {}",
            field(&status, "CapEff:")
        ));
    }
    for ns in ["mnt", "pid", "net"] {
        let own = std::fs::read_link(format!("/proc/self/ns/{ns}")).ok();
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).ok();
        if theirs.is_none() || theirs == own {
            problems.push(format!("{name}: shares the host's {ns} namespace"));
        }
    }
    let allowed: Vec<&str> = COMMON_FDS.iter().chain(extra_fds).copied().collect();
    for fd in unexpected_fds(pid, &allowed) {
        problems.push(format!("{name}: unexpected {fd}"));
    }
    match memory_limit(pid) {
        Some((path, limit)) if path.contains("hostd-vm-") && limit < (1 << 40) => {}
        other => problems.push(format!(
            "{name}: no per-VM cgroup with a memory limit: {other:?}"
        )),
    }
}

fn jailed_vm(vmm: &str) {
    if !require_root() || !require_qemu_guest() {
        return;
    }
    let (dir, image) = build(SPEC);
    let token = dir.path().join("token");
    std::fs::write(&token, "t0ken").expect("write secret");
    let state = tempfile::tempdir().expect("state dir");
    let mut cmd = hostd();
    cmd.args(["run", "--vmm", vmm, "--timeout", "400", "--state-dir"])
        .arg(state.path())
        .arg("--secret")
        .arg(format!("token=@{}", token.display()))
        .arg(&image);
    let running = spawn_running(cmd);
    let hostd_pid = running.child.id();
    let ready = running.wait_for("jail-test-ready", Duration::from_secs(400));
    let tree = descendants(hostd_pid);
    let mut problems = Vec::new();
    let backends: Vec<&Proc> = tree
        .iter()
        .filter(|p| p.cmdline.get(1).is_some_and(|a| a == "backend"))
        .collect();
    let monitor: Vec<&Proc> = tree
        .iter()
        .filter(|p| {
            if vmm == "qemu" {
                p.cmdline.first().is_some_and(|a| a.contains("qemu-system"))
            } else {
                // The VMM: hostd's own process, forked by `hostd run` (same command line).
                p.ppid == hostd_pid && p.cmdline.get(1).is_some_and(|a| a == "run")
            }
        })
        .collect();
    let monitor_fds = if vmm == "qemu" { QEMU_FDS } else { VMM_FDS };
    for p in &monitor {
        check_jailed(p, monitor_fds, &mut problems);
        if vmm == "qemu" {
            check_clean_env(p, &mut problems);
        } else {
            check_not_dumpable(p, &mut problems);
        }
    }
    // Under QEMU, the VM's own process (forked by `hostd run`, parent of QEMU and the
    // backends) is jailed too once they run: its pipes to QEMU and the pidfd of
    // `hostd run`.
    let vm_process: Vec<&Proc> = tree
        .iter()
        .filter(|p| p.ppid == hostd_pid && p.cmdline.get(1).is_some_and(|a| a == "run"))
        .collect();
    if vmm == "qemu" {
        for p in &vm_process {
            check_jailed(p, &["anon_inode:[pidfd]"], &mut problems);
            check_not_dumpable(p, &mut problems);
        }
    }
    let mine = nice_of("/proc/self/stat");
    for p in &backends {
        let extra: Vec<String> = if p.cmdline.get(2).is_some_and(|k| k == "block") {
            // A block backend serves its file: the image (root file system) or a volume.
            vec![
                image.to_string_lossy().into_owned(),
                state.path().to_string_lossy().into_owned(),
            ]
        } else {
            Vec::new()
        };
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        check_jailed(p, &extra, &mut problems);
        check_clean_env(p, &mut problems);
        check_not_dumpable(p, &mut problems);
        // Started with every signal blocked (vmm/src/spawn.rs), unblocked at its start.
        let status = std::fs::read_to_string(format!("/proc/{}/status", p.pid)).unwrap_or_default();
        if field(&status, "SigBlk:") != "0000000000000000" {
            problems.push(format!(
                "pid {}: signals blocked: {}",
                p.pid,
                field(&status, "SigBlk:")
            ));
        }
        // Started at the lowest priority under the built-in VMM (spawn.rs), at the
        // VM's own again once started: every thread at this test's nice value.
        let tasks = std::fs::read_dir(format!("/proc/{}/task", p.pid))
            .map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
            .unwrap_or_default();
        for t in tasks {
            let nice = nice_of(&t.join("stat").to_string_lossy());
            if nice != mine {
                problems.push(format!(
                    "pid {} ({}): nice {nice:?}, not {mine:?}",
                    p.pid,
                    t.display()
                ));
            }
        }
    }
    // Under the built-in VMM, the VM's process and its backends (no net backend here) are
    // in the empty network namespace every VM shares (vmm/src/jail/netns.rs): the one
    // mounted on /run/hostd/empty-netns, not the host's (checked above). Under QEMU each
    // VM has its own (its process has its private /run/hostd by then).
    let shared = std::fs::metadata("/run/hostd/empty-netns").map(|m| {
        use std::os::unix::fs::MetadataExt;
        format!("net:[{}]", m.ino())
    });
    let shared_netns = if vmm == "kvm" {
        vm_process.iter().chain(&monitor).chain(&backends).collect()
    } else {
        Vec::new()
    };
    for p in shared_netns {
        let theirs = std::fs::read_link(format!("/proc/{}/ns/net", p.pid))
            .map(|l| l.to_string_lossy().into_owned());
        if theirs.as_ref().ok() != shared.as_ref().ok() || shared.is_err() {
            problems.push(format!(
                "pid {} ({}): network namespace {theirs:?}, not the shared empty one {shared:?}",
                p.pid,
                p.cmdline.join(" ")
            ));
        }
    }
    running.signal(libc::SIGKILL);
    let out = running.finish(Duration::from_secs(60));
    assert!(ready, "the guest never became ready: {}", out.all());
    assert_eq!(monitor.len(), 1, "one {vmm} process expected: {tree:#?}");
    assert_eq!(vm_process.len(), 1, "one VM process expected: {tree:#?}");
    // Root disk, volume, rng, vsock.
    assert_eq!(backends.len(), 4, "four backends expected: {tree:#?}");
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn under_qemu_the_monitor_and_every_backend_are_jailed() {
    jailed_vm("qemu");
}

#[test]
fn under_the_built_in_vmm_the_monitor_and_every_backend_are_jailed() {
    if !require("/dev/kvm", kvm_usable(), "a host with KVM") {
        return;
    }
    jailed_vm("kvm");
}

/// The nice value in a /proc/…/stat file (its 19th field), if it can be read.
fn nice_of(stat: &str) -> Option<i64> {
    let text = std::fs::read_to_string(stat).ok()?;
    let after = &text[text.rfind(')')? + 1..];
    after.split_whitespace().nth(16)?.parse().ok()
}
