//! Snapshots of the built-in VMM (`hostd run --snapshot-cache`, docs/snapshots.md): the
//! first run of an image boots and snapshots the VM at guest init's snapshot point,
//! later runs restore it. Each test boots Linux once under the built-in VMM (about 30 s
//! on a nested PVM host) and restores it in a few seconds.

mod common;

use common::netns::{require_ip_and_curl, Netns};
use common::{
    build, hostd, is_root, kvm_usable, require, require_qemu_guest, run_with_deadline,
    spawn_running, Output,
};
use hostd_vmm::kvm::snapshot::{Header, HEADER_LEN};
use sha2::Digest;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// KVM and the guest kernel, or one SKIP line (a failure under CI=true).
fn prerequisites() -> bool {
    require("/dev/kvm", kvm_usable(), "a host with KVM") && require_qemu_guest()
}

fn run(image: &Path, cache: &Path) -> Output {
    let mut cmd = hostd();
    cmd.args(["run", "--timings", "--timeout", "600", "--snapshot-cache"])
        .arg(cache)
        .arg(image);
    run_with_deadline(cmd, Duration::from_secs(700))
}

/// The one snapshot file in `cache`.
fn snapshot_file(cache: &Path) -> Option<PathBuf> {
    let files: Vec<PathBuf> = std::fs::read_dir(cache)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "snap"))
        .collect();
    assert!(files.len() <= 1, "{files:?}");
    files.into_iter().next()
}

fn hello() -> (tempfile::TempDir, PathBuf) {
    build(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/images/examples/hello.toml"
        ))
        .expect("hello.toml"),
    )
}

const RESTORED: &str =
    "hostd-init: restored from a snapshot; clock set, random number generator reseeded";

/// Boots `image` once with an empty cache: it must exit 0 and leave a snapshot.
fn cold_run_takes_a_snapshot(image: &Path, cache: &Path) -> Output {
    let out = run(image, cache);
    assert_eq!(out.code(), Some(0), "{}", out.all());
    assert!(
        !out.stdout.contains("restored from a snapshot"),
        "{}",
        out.all()
    );
    assert!(
        out.stderr
            .contains("snapshot taken at guest init's snapshot point"),
        "{}",
        out.all()
    );
    assert!(snapshot_file(cache).is_some(), "{}", out.all());
    out
}

#[test]
fn hello_restored_from_its_snapshot_prints_its_output_and_exits_0() {
    if !prerequisites() {
        return;
    }
    let (_dir, image) = hello();
    let cache = tempfile::tempdir().expect("tempdir");
    let cold = cold_run_takes_a_snapshot(&image, cache.path());
    assert!(
        cold.stdout.contains("[hello] hello from hostd"),
        "{}",
        cold.all()
    );
    let snap = snapshot_file(cache.path()).expect("snapshot");
    let before = std::fs::read(&snap).expect("snapshot bytes");

    let warm = run(&image, cache.path());
    assert_eq!(warm.code(), Some(0), "{}", warm.all());
    assert!(
        warm.stderr.contains("restored from a snapshot"),
        "{}",
        warm.all()
    );
    assert!(warm.stdout.contains(RESTORED), "{}", warm.all());
    assert!(
        warm.stdout.contains("[hello] hello from hostd"),
        "{}",
        warm.all()
    );
    assert!(
        warm.stdout
            .contains("hostd-init: powering off (exit code 0)"),
        "{}",
        warm.all()
    );
    // The kernel did not boot again: nothing of its boot log, no new guest init start.
    assert!(
        !warm.stdout.contains("hostd-init: started"),
        "{}",
        warm.all()
    );
    // A restore leaves the snapshot as it was.
    assert_eq!(std::fs::read(&snap).expect("snapshot bytes"), before);
}

/// The 16 random bytes the service printed (`od` output on one line).
fn random_line(out: &Output) -> String {
    out.stdout
        .lines()
        .find_map(|l| l.split("[random] ").nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| panic!("no random bytes printed\n{}", out.all()))
}

#[test]
fn two_guests_restored_from_one_snapshot_read_different_random_bytes() {
    if !prerequisites() {
        return;
    }
    let (_dir, image) = build(
        r#"
name = "random"
memory = "128M"
packages = ["busybox-static"]

[services.random]
command = "/bin/busybox"
args = ["od", "-An", "-tx1", "-N16", "/dev/urandom"]
main = true
"#,
    );
    let cache = tempfile::tempdir().expect("tempdir");
    let cold = cold_run_takes_a_snapshot(&image, cache.path());
    let a = run(&image, cache.path());
    let b = run(&image, cache.path());
    for out in [&a, &b] {
        assert_eq!(out.code(), Some(0), "{}", out.all());
        assert!(out.stdout.contains(RESTORED), "{}", out.all());
    }
    let (c, a, b) = (random_line(&cold), random_line(&a), random_line(&b));
    assert_eq!(a.split_whitespace().count(), 16, "{a}");
    assert_ne!(a, b, "two restored guests read the same random bytes");
    assert_ne!(a, c);
    assert_ne!(b, c);
}

/// A run that found its snapshot unusable (`why` in the warning), booted instead and
/// ran hello to its end.
fn booted_instead(out: &Output, why: &str) {
    assert_eq!(out.code(), Some(0), "{}", out.all());
    assert!(
        out.stderr.contains(why) && out.stderr.contains("booting instead"),
        "{}",
        out.all()
    );
    assert!(
        !out.stdout.contains("restored from a snapshot"),
        "{}",
        out.all()
    );
    assert!(out.stdout.contains("hostd-init: started"), "{}", out.all());
    assert!(
        out.stdout.contains("[hello] hello from hostd"),
        "{}",
        out.all()
    );
    // A boot after a refused restore is a second VM process of the same run: what a
    // nested PVM host means is said once.
    assert!(
        out.stderr.matches("is a nested PVM hypervisor").count() <= 1,
        "{}",
        out.all()
    );
}

#[test]
fn a_corrupted_or_refused_snapshot_falls_back_to_a_cold_boot_and_is_replaced() {
    if !prerequisites() {
        return;
    }
    let (_dir, image) = hello();
    let cache = tempfile::tempdir().expect("tempdir");
    cold_run_takes_a_snapshot(&image, cache.path());
    let snap = snapshot_file(cache.path()).expect("snapshot");
    // Flip one byte of guest memory in the file (the header and state stay intact:
    // the damage shows only when memory is read back and its digest checked).
    let mut bytes = std::fs::read(&snap).expect("snapshot bytes");
    let at = bytes[4096..]
        .iter()
        .position(|&b| b != 0)
        .map(|i| i + 4096 + 0x100000)
        .expect("a non-zero byte of memory");
    bytes[at] ^= 0x55;
    std::fs::write(&snap, &bytes).expect("write corrupted snapshot");

    booted_instead(
        &run(&image, cache.path()),
        "does not match its digest (damaged)",
    );
    // The damaged snapshot was replaced by this boot's.
    let replaced =
        std::fs::read(snapshot_file(cache.path()).expect("new snapshot")).expect("bytes");
    assert_ne!(replaced, bytes);

    // Whole and with matching digests, but a state KVM refuses (every byte of the
    // vCPU's special registers 0xff, as a snapshot from another host kernel or CPU might
    // be): the restore fails before the guest runs, and the run boots instead.
    let snap = snapshot_file(cache.path()).expect("snapshot");
    let mut bytes = replaced;
    let len = bytes.len() as u64;
    let mut header = Header::parse(&bytes[..HEADER_LEN], len).expect("header");
    let (start, end) = (
        header.state_offset as usize,
        (header.state_offset + header.state_len) as usize,
    );
    let mut at = start;
    let mut damaged = 0;
    while at < end {
        // A record: tag, vCPU, length (u32, little-endian), bytes. Tag 2: KVM_SET_SREGS.
        let n = u32::from_le_bytes(bytes[at + 2..at + 6].try_into().expect("four bytes")) as usize;
        if bytes[at] == 2 {
            bytes[at + 6..at + 6 + n].fill(0xff);
            damaged += 1;
        }
        at += 6 + n;
    }
    assert_eq!(damaged, 1, "one vCPU's SREGS record");
    header.state_sha256 = sha2::Sha256::digest(&bytes[start..end]).into();
    bytes[..HEADER_LEN].copy_from_slice(&header.encode());
    std::fs::write(&snap, &bytes).expect("write the refused snapshot");
    booted_instead(&run(&image, cache.path()), "KVM_SET_SREGS");
    let again = std::fs::read(snapshot_file(cache.path()).expect("new snapshot")).expect("bytes");
    assert_ne!(again, bytes, "the refused snapshot was replaced");
}

/// One run of the web example in `ns` with the cache: waits for httpd (after a restore,
/// when `restored`), asks it with curl until it answers, stops the VM as Ctrl-C does.
/// Returns curl's answer and the run's output.
fn web_run(ns: &Netns, tap: &str, image: &Path, cache: &Path, restored: bool) -> (String, Output) {
    let mut cmd = ns.exec();
    cmd.arg(common::hostd_exe())
        .args(["run", "--timeout", "600", "--snapshot-cache"])
        .arg(cache)
        .args(["--net", &format!("tap={tap},ip=10.0.2.2/24,gw=10.0.2.1")])
        .arg(image);
    let run = spawn_running(cmd);
    let mut needles = vec!["service httpd started"];
    if restored {
        needles.push(RESTORED);
    }
    let started = run.wait_for_all(&needles, Duration::from_secs(600));
    let answer = if started {
        ns.curl_until("http://10.0.2.2/", "hostd web ok")
    } else {
        String::new()
    };
    run.signal(libc::SIGINT);
    (answer, run.finish(Duration::from_secs(90)))
}

#[test]
fn a_restored_web_image_answers_curl_over_a_tap() {
    if !prerequisites()
        || !require(
            "root (network namespaces, TAP)",
            is_root(),
            "run the tests as root",
        )
        || !require_ip_and_curl()
    {
        return;
    }
    let (_dir, image) = build(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/images/examples/web.toml"
        ))
        .expect("web.toml"),
    );
    let cache = tempfile::tempdir().expect("tempdir");
    let tap = "hostdsnap0";
    let ns = Netns::new(tap, "snap");
    let (answer, cold) = web_run(&ns, tap, &image, cache.path(), false);
    assert_eq!(answer.trim(), "hostd web ok", "{}", cold.all());
    assert!(snapshot_file(cache.path()).is_some(), "{}", cold.all());
    let (answer, warm) = web_run(&ns, tap, &image, cache.path(), true);
    assert!(warm.stdout.contains(RESTORED), "{}", warm.all());
    assert_eq!(answer.trim(), "hostd web ok", "{}", warm.all());
    assert!(
        warm.stdout.contains("network: eth0 10.0.2.2/24"),
        "{}",
        warm.all()
    );
    assert_eq!(warm.code(), Some(0), "{}", warm.all());
}
