//! The jail of a running VM (issue 11): while a guest runs under the built-in VMM and
//! under QEMU, the VMM or QEMU process and every device backend run with a uid other
//! than 0, in mount and PID namespaces of their own, under a seccomp filter, without
//! capabilities, with only the fds they need, in a cgroup with a memory limit. And a
//! backend whose code tries to map executable memory or start a process dies with SIGSYS.

mod common;

use common::{hostd, is_root, require};
use std::os::unix::process::ExitStatusExt;
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
