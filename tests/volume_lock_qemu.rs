//! A volume is attached to one VM at a time: while one `hostd run` holds volume `data`,
//! a second one that wants it is refused, naming the VM that holds it; once the first
//! ends, the volume is free again.

mod common;

use common::{build, hostd, require_qemu_guest, run_with_deadline, spawn_running};
use std::time::Duration;

const SPEC: &str = r#"
name = "holder"
memory = "128M"
packages = ["busybox-static"]

[[volumes]]
name = "data"
size = "16M"
mount = "/data"

[services.hold]
command = "/bin/busybox"
args = ["sh", "-c", "echo holding; /bin/busybox sleep 600"]
main = true
"#;

#[test]
fn a_second_vm_with_the_same_volume_is_refused_while_the_first_runs() {
    if !require_qemu_guest() {
        return;
    }
    let (dir, image) = build(SPEC);
    let state = dir.path().join("state");
    let run = |timeout: &str| {
        let mut cmd = hostd();
        cmd.args(["run", "--vmm", "qemu", "--timeout", timeout, "--state-dir"])
            .arg(&state)
            .arg(&image);
        cmd
    };
    let first = spawn_running(run("300"));
    assert!(
        first.wait_for("[hold] holding", Duration::from_secs(240)),
        "the first VM did not start"
    );
    let second = run_with_deadline(run("60"), Duration::from_secs(120));
    assert_eq!(second.code(), Some(1), "{}", second.all());
    assert!(
        second.stderr.contains(&format!(
            "volume `data`: in use by VM holder (hostd pid {})",
            first.child.id()
        )),
        "{}",
        second.all()
    );
    assert!(
        !second.stdout.contains("hostd-init"),
        "the second VM booted"
    );
    first.signal(libc::SIGINT);
    let out = first.finish(Duration::from_secs(120));
    assert!(out.stdout.contains("[hold] holding"), "{}", out.all());
    // Free again: a third run gets it (and is stopped at once by its timeout).
    let third = run_with_deadline(run("1"), Duration::from_secs(120));
    assert!(!third.stderr.contains("in use by"), "{}", third.all());
}
