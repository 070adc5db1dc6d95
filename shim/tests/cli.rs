//! The shim binary as containerd starts it. (The end-to-end tests with a real
//! containerd are in the workspace's tests/containerd.rs; this test also makes `cargo
//! test --workspace` build the binary they use.)

use std::process::Command;

#[test]
fn refuses_to_start_without_a_namespace() {
    let out = Command::new(env!("CARGO_BIN_EXE_containerd-shim-hostd-v1"))
        .args(["-id", "x", "start"])
        .output()
        .expect("run the shim");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("io.containerd.hostd.v1") && err.contains("namespace"),
        "{err}"
    );
}
