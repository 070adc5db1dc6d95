//! Device backends run jailed: nothing of the host's file system is visible, and a
//! syscall outside the device's filter kills the process.

mod common;

use common::{hostd, require, run_with_deadline};
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

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

#[test]
fn backends_cannot_open_host_files() {
    if !require(
        "root (namespaces, pivot_root)",
        is_root(),
        "run the tests as root",
    ) {
        return;
    }
    let image = tempfile::NamedTempFile::new().expect("file");
    std::fs::write(image.path(), vec![0u8; 8192]).expect("write");
    let file = image.path().to_string_lossy().into_owned();
    for kind in [vec!["rng"], vec!["block", "--file", file.as_str()]] {
        let out = selftest(&kind, "open-passwd");
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
    let image = tempfile::NamedTempFile::new().expect("file");
    std::fs::write(image.path(), vec![0u8; 8192]).expect("write");
    let file = image.path().to_string_lossy().into_owned();
    for kind in [vec!["rng"], vec!["block", "--file", file.as_str()]] {
        let out = selftest(&kind, "forbidden-syscall");
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
