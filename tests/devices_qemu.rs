//! Devices through hostd's own vhost-user backends (separate, jailed processes) under
//! QEMU with our kernel's virtio drivers: persistent volumes, the verified read-only
//! root, and what happens when a backend dies.

mod common;

use common::{build, hostd, require_qemu_guest, run_with_deadline, spawn_running};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

fn counter_spec(hostname: &str) -> String {
    format!(
        r#"
name = "counter"
hostname = "{hostname}"
root = "erofs"
packages = ["busybox-static"]

[[volumes]]
name = "data"
size = "16M"
mount = "/data"

[services.count]
command = "/bin/busybox"
args = ["sh", "-c", "n=$(( $(/bin/busybox cat /data/count 2>/dev/null || echo 0) + 1 )); echo $n > /data/count; echo count=$n on $(/bin/busybox hostname)"]
main = true
"#
    )
}

fn run_in(image: &Path, state: &Path) -> common::Output {
    let mut cmd = hostd();
    cmd.args(["run", "--vmm", "qemu", "--timeout", "240", "--state-dir"])
        .arg(state)
        .arg(image);
    run_with_deadline(cmd, Duration::from_secs(300))
}

#[test]
fn volume_data_survives_reboots_and_new_image_versions() {
    if !require_qemu_guest() {
        return;
    }
    let state = tempfile::tempdir().expect("state dir");
    let (_d1, v1) = build(&counter_spec("v1"));
    for expected in ["count=1 on v1", "count=2 on v1"] {
        let out = run_in(&v1, state.path());
        assert_eq!(out.code(), Some(0), "{}", out.all());
        assert!(
            out.stdout.contains(expected),
            "want {expected}: {}",
            out.all()
        );
        assert!(out.stdout.contains("volume data (/dev/vd"), "{}", out.all());
    }
    // A new version of the image with the same volume name finds the same data.
    let (_d2, v2) = build(&counter_spec("v2"));
    let out = run_in(&v2, state.path());
    assert_eq!(out.code(), Some(0), "{}", out.all());
    assert!(out.stdout.contains("count=3 on v2"), "{}", out.all());
    assert!(state.path().join("volumes/data.ext4").exists());
}

const CANARY: &str = "hostd-verity-canary-";

#[test]
fn root_is_read_only_and_a_changed_block_is_an_io_error() {
    if !require_qemu_guest() {
        return;
    }
    // 2 MiB of canary: the guest reads only what it needs at boot (plus readahead), so
    // the file's last blocks stay unread until the service reads them.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("canary.bin"),
        CANARY.repeat((2 << 20) / CANARY.len()),
    )
    .expect("canary");
    std::fs::write(
        dir.path().join("app.toml"),
        r#"
name = "verity"
root = "erofs"
packages = ["busybox-static"]

[[files]]
path = "/canary.bin"
source = "canary.bin"

[services.check]
command = "/bin/busybox"
args = ["sh", "-c", "/bin/busybox touch /x 2>&1; echo waiting; /bin/busybox sleep 3; /bin/busybox md5sum /canary.bin 2>&1; echo done"]
main = true
"#,
    )
    .expect("spec");
    let image = dir.path().join("app.img");
    let mut cmd = hostd();
    cmd.arg("build")
        .arg(dir.path().join("app.toml"))
        .arg("-o")
        .arg(&image);
    let out = run_with_deadline(cmd, Duration::from_secs(120));
    assert!(out.status.success(), "{}", out.all());
    let state = tempfile::tempdir().expect("state dir");
    // Locate the canary's bytes inside the image file (the rootfs is uncompressed).
    let bytes = std::fs::read(&image).expect("read image");
    let at = bytes
        .windows(CANARY.len())
        .position(|w| w == CANARY.as_bytes())
        .expect("canary in the rootfs")
        + (2 << 20)
        - 8192;
    let mut cmd = hostd();
    cmd.args(["run", "--vmm", "qemu", "--timeout", "240", "--state-dir"])
        .arg(state.path())
        .arg(&image);
    let run = spawn_running(cmd);
    // hostd verified the whole image before booting; change it now, while the guest
    // runs and has not read the end of the canary yet.
    let tampered = run.wait_for("[check] waiting", Duration::from_secs(240));
    if tampered {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .expect("open image");
        f.write_all_at(b"X", at as u64).expect("tamper");
    }
    let out = run.finish(Duration::from_secs(300));
    let (status, console, host_log) = (out.status, out.stdout, out.stderr);
    assert!(tampered, "{console}");
    assert_eq!(status.code(), Some(0), "{console}\n{host_log}");
    assert!(console.contains("Read-only file system"), "{console}");
    assert!(
        console.contains("I/O error"),
        "the guest must see an I/O error:\n{console}"
    );
    assert!(
        host_log.contains("does not match its recorded sha256"),
        "the host must log it:\n{host_log}"
    );
}

#[test]
fn a_dead_backend_stops_the_vm_with_a_clear_error() {
    if !require_qemu_guest() {
        return;
    }
    let (_dir, image) = build(
        r#"
name = "longrun"
packages = ["busybox-static"]
[services.wait]
command = "/bin/busybox"
args = ["sh", "-c", "echo ready; exec /bin/busybox sleep 1000"]
main = true
"#,
    );
    let mut cmd = hostd();
    cmd.args(["run", "--vmm", "qemu", "--timeout", "240"])
        .arg(&image);
    let run = spawn_running(cmd);
    assert!(
        run.wait_for("[wait] ready", Duration::from_secs(240)),
        "the guest never became ready"
    );
    // The backends run below hostd (in the VM's own PID namespace): kill the rng one.
    fn children(pid: i32) -> Vec<i32> {
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }
    let mut below = children(run.child.id() as i32);
    let mut i = 0;
    while i < below.len() {
        let more = children(below[i]);
        below.extend(more);
        i += 1;
    }
    let backend = below
        .into_iter()
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| c.contains("backend\0rng"))
        })
        .expect("an rng backend process");
    // SAFETY: kill has no memory effects; the pid is a live child of our child.
    unsafe { libc::kill(backend, libc::SIGKILL) };
    let out = run.finish(Duration::from_secs(60));
    let (status, log) = (out.status, out.stderr);
    assert_ne!(status.code(), Some(0), "{log}");
    // The pid in the message is the one in the VM's PID namespace.
    assert!(
        log.contains("device backend rng (pid ") && log.contains(") was killed by signal 9"),
        "{log}"
    );
}
