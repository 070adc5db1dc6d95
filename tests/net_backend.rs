//! The virtio-net backend (`hostd backend net`): jailed like every backend, attached to
//! an existing TAP device, and a missing TAP is an error that says how to create it.

mod common;

use common::{hostd, is_root, require, run_with_deadline};
use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::Duration;

/// A TAP device that exists for the life of the value.
struct Tap(String);

impl Tap {
    /// Creates `hostdt<pid><suffix>`; None (after one SKIP line, or a panic under CI)
    /// when this host cannot.
    fn create(suffix: &str) -> Option<Tap> {
        if !require(
            "root (namespaces, pivot_root, creating a TAP device)",
            is_root(),
            "run the tests as root",
        ) || !require(
            "/dev/net/tun",
            std::path::Path::new("/dev/net/tun").exists(),
            "load the tun module: modprobe tun",
        ) {
            return None;
        }
        let name = format!("hostdt{}{suffix}", std::process::id() % 100_000);
        let out = Command::new("ip")
            .args(["tuntap", "add", &name, "mode", "tap"])
            .output();
        let ok = out.as_ref().is_ok_and(|o| o.status.success());
        if !require(
            "`ip tuntap add` (iproute2)",
            ok,
            &format!("apt-get install iproute2; ip said: {out:?}"),
        ) {
            return None;
        }
        Some(Tap(name))
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).output();
    }
}

fn net_backend(tap: &str, selftest: Option<&str>) -> common::Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = hostd();
    cmd.args(["backend", "net", "--tap", tap, "--mac", "52:54:00:12:34:56"])
        .arg("--socket")
        .arg(dir.path().join("s.sock"));
    if let Some(t) = selftest {
        cmd.args(["--selftest", t]);
    }
    run_with_deadline(cmd, Duration::from_secs(30))
}

#[test]
fn the_net_backend_is_jailed_and_filtered() {
    let Some(tap) = Tap::create("j") else { return };
    // The jail leaves nothing of the host's file system to open.
    let out = net_backend(&tap.0, Some("open-passwd"));
    assert!(out.status.success(), "{}", out.all());
    assert!(
        out.stderr
            .contains("selftest: open /etc/passwd: No such file or directory")
            || out
                .stderr
                .contains("selftest: open /etc/passwd: Permission denied"),
        "{}",
        out.all()
    );
    // A syscall outside its filter kills it.
    let out = net_backend(&tap.0, Some("forbidden-syscall"));
    assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{}", out.all());
    assert!(
        out.stderr.contains("calling socket(2)") && !out.stderr.contains("was allowed"),
        "{}",
        out.all()
    );
}

#[test]
fn a_missing_tap_is_named_with_how_to_create_it() {
    let name = format!("hostdx{}", std::process::id() % 100_000);
    let out = net_backend(&name, None);
    assert!(!out.status.success(), "{}", out.all());
    assert!(
        out.stderr
            .contains(&format!("TAP device \"{name}\" does not exist"))
            && out
                .stderr
                .contains(&format!("ip tuntap add {name} mode tap")),
        "{}",
        out.all()
    );
}

#[test]
fn a_bad_mac_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = hostd();
    cmd.args(["backend", "net", "--tap", "lo", "--mac", "52:54:00:12:34"])
        .arg("--socket")
        .arg(dir.path().join("s.sock"));
    let out = run_with_deadline(cmd, Duration::from_secs(30));
    assert!(!out.status.success(), "{}", out.all());
    assert!(
        out.stderr
            .contains("invalid MAC address \"52:54:00:12:34\""),
        "{}",
        out.all()
    );
}
