//! Networking through hostd's own net backend (a jailed process on a TAP device), under
//! QEMU and under hostd's own VMM: the web example answers a real HTTP client on the
//! host side. Everything runs in a network namespace the test creates and deletes.

mod common;

use common::netns::{tool, Netns};
use common::{
    hostd, is_root, kvm_usable, require, require_qemu_guest, run_with_deadline, spawn_running,
};
use std::time::{Duration, Instant};

#[test]
fn web_example_answers_curl_over_a_tap() {
    web_example_answers_curl("qemu");
}

/// The same through hostd's own monitor (on a nested PVM host: with its PVM support,
/// docs/pvm.md).
#[test]
fn web_example_answers_curl_over_a_tap_with_the_built_in_vmm() {
    if !require("/dev/kvm", kvm_usable(), "a host with KVM") {
        return;
    }
    web_example_answers_curl("kvm");
}

fn web_example_answers_curl(vmm: &str) {
    if !require_qemu_guest()
        || !require(
            "root (network namespaces, TAP)",
            is_root(),
            "run the tests as root",
        )
        || !require(
            "ip and curl",
            tool("ip") && tool("curl"),
            "apt-get install iproute2 curl",
        )
    {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("web.img");
    let mut build = hostd();
    build
        .arg("build")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/images/examples/web.toml"
        ))
        .arg("-o")
        .arg(&image);
    let out = run_with_deadline(build, Duration::from_secs(120));
    assert!(out.status.success(), "{}", out.all());

    let tap = "hostdtap0";
    let ns = Netns::new(tap, vmm);
    let mut cmd = ns.exec();
    cmd.arg(env!("CARGO_BIN_EXE_hostd"))
        .args([
            "run",
            "--vmm",
            vmm,
            "--timeout",
            "400",
            "--net",
            &format!("tap={tap},ip=10.0.2.2/24,gw=10.0.2.1"),
        ])
        .arg(&image);
    let run = spawn_running(cmd);
    let started = run.wait_for("service httpd started", Duration::from_secs(400));
    let mut answer = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while started && Instant::now() < deadline {
        let out = ns
            .exec()
            .args(["curl", "-s", "--max-time", "5", "http://10.0.2.2/"])
            .output()
            .expect("curl");
        answer = String::from_utf8_lossy(&out.stdout).into_owned();
        if answer.contains("hostd web ok") {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    // A clean shutdown, as Ctrl-C would do it (ip netns exec execs hostd: same pid).
    run.signal(libc::SIGINT);
    let out = run.finish(Duration::from_secs(60));
    let status = out.status;
    let console = format!("{}\n--- host ---\n{}", out.stdout, out.stderr);
    assert!(started, "httpd never started:\n{console}");
    assert_eq!(answer.trim(), "hostd web ok", "console:\n{console}");
    assert!(console.contains("network: eth0 10.0.2.2/24"), "{console}");
    assert_eq!(status.code(), Some(0), "{console}");
}

#[test]
fn a_missing_tap_is_a_clear_error() {
    if !require_qemu_guest() || !require("root", is_root(), "run the tests as root") {
        return;
    }
    let mut cmd = hostd();
    cmd.args([
        "run",
        "--vmm",
        "qemu",
        "--timeout",
        "60",
        "--net",
        "tap=hostdnotap9",
    ])
    .arg("--kernel")
    .arg(common::kernel());
    let out = run_with_deadline(cmd, Duration::from_secs(120));
    assert_ne!(out.code(), Some(0), "{}", out.all());
    assert!(
        out.stderr.contains("hostdnotap9") && out.stderr.contains("ip tuntap add"),
        "{}",
        out.all()
    );
}
