//! Device backends run jailed: nothing of the host's file system is visible, and a
//! syscall outside the device's filter kills the process.

mod common;

use common::{hostd, is_root, require, run_with_deadline};
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

fn selftest(kind: &[&str], test: &str) -> common::Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = hostd();
    cmd.arg("backend")
        .args(kind)
        .arg("--socket")
        .arg(dir.path().join("s.sock"))
        .args(["--selftest", test]);
    run_with_deadline(cmd, Duration::from_secs(30))
}

/// Runs selftest `test` on each backend kind: rng, and block over a scratch file.
fn selftest_each(test: &str) -> Vec<(Vec<String>, common::Output)> {
    let image = tempfile::NamedTempFile::new().expect("file");
    std::fs::write(image.path(), vec![0u8; 8192]).expect("write");
    let file = image.path().to_string_lossy().into_owned();
    [
        vec!["rng".to_string()],
        vec!["block".into(), "--file".into(), file],
    ]
    .into_iter()
    .map(|kind| {
        let args: Vec<&str> = kind.iter().map(String::as_str).collect();
        let out = selftest(&args, test);
        (kind, out)
    })
    .collect()
}

#[test]
fn backends_cannot_open_host_files() {
    if !require(
        "root (namespaces, pivot_root)",
        is_root(),
        "run the tests as root",
    ) {
        return;
    }
    for (kind, out) in selftest_each("open-passwd") {
        assert!(out.status.success(), "{kind:?}: {}", out.all());
        assert!(
            out.stderr
                .contains("selftest: open /etc/passwd: No such file or directory")
                || out
                    .stderr
                    .contains("selftest: open /etc/passwd: Permission denied"),
            "{kind:?}: {}",
            out.all()
        );
    }
}

#[test]
fn a_syscall_outside_the_filter_kills_the_backend() {
    if !require(
        "root (namespaces, pivot_root)",
        is_root(),
        "run the tests as root",
    ) {
        return;
    }
    for (kind, out) in selftest_each("forbidden-syscall") {
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGSYS),
            "{kind:?}: {}",
            out.all()
        );
        assert!(
            out.stderr.contains("calling socket(2)") && !out.stderr.contains("was allowed"),
            "{}",
            out.all()
        );
    }
}

#[test]
fn every_thread_of_a_waiting_backend_is_jailed() {
    if !require(
        "root (namespaces, pivot_root)",
        is_root(),
        "run the tests as root",
    ) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("s.sock");
    let mut child = hostd()
        .args(["backend", "rng", "--socket"])
        .arg(&socket)
        .spawn()
        .expect("spawn backend");
    let start = std::time::Instant::now();
    while !socket.exists() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    // Give it a moment to finish jailing and start its vring worker.
    std::thread::sleep(Duration::from_millis(300));
    let own_mnt = std::fs::read_link("/proc/self/ns/mnt").expect("own mount ns");
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{}/task", child.id()))
        .expect("tasks")
        .flatten()
    {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let field = |k: &str| {
            status
                .lines()
                .find(|l| l.starts_with(k))
                .and_then(|l| l.split_whitespace().nth(1))
                .unwrap_or("?")
                .to_string()
        };
        let mnt = std::fs::read_link(task.path().join("ns/mnt")).ok();
        threads.push((
            field("Name:"),
            field("Seccomp:"),
            field("CapEff:"),
            mnt != Some(own_mnt.clone()),
        ));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        threads.len() >= 2,
        "expected the main thread and the vring worker: {threads:?}"
    );
    for (name, seccomp, caps, own_ns) in &threads {
        assert_eq!(
            seccomp, "2",
            "thread {name} runs without a seccomp filter: {threads:?}"
        );
        assert_eq!(
            caps, "0000000000000000",
            "thread {name} kept capabilities: {threads:?}"
        );
        assert!(
            own_ns,
            "thread {name} shares the host's mount namespace: {threads:?}"
        );
    }
}
