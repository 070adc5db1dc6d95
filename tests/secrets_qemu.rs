//! Secrets delivered over vsock at boot (issue 4): a granted service reads the host's
//! value from /run/secrets/NAME, other services cannot, and the value appears nowhere in
//! the image file or the volumes. Also a vsock round trip through the backend's echo
//! port. Under QEMU and under hostd's own VMM (which then also carries the erofs root
//! and the volume over virtio-blk, and virtio-rng).

mod common;

use common::{build, kvm_usable, require, require_qemu_guest, run_image_with};
use std::path::Path;

const SPEC: &str = r#"
name = "secrets"
root = "erofs"
packages = ["busybox-static"]

[[volumes]]
name = "data"
size = "16M"
mount = "/data"

[services.reader]
command = "/bin/busybox"
args = ["sh", "-c", "/bin/busybox sleep 2; echo got=$(/bin/busybox cat /run/secrets/db_password); /bin/busybox stat -c 'mode=%a uid=%u' /run/secrets/db_password; echo reader-done"]
user = "1000:1000"
secrets = ["db_password"]
main = true

[services.snoop]
command = "/bin/busybox"
args = ["sh", "-c", "/bin/busybox cat /run/secrets/db_password && echo LEAK; /bin/busybox cat /run/hostd/secrets/reader/db_password && echo LEAK; echo snoop-done"]
user = "1000:1000"

[services.rootsnoop]
command = "/bin/busybox"
args = ["sh", "-c", "/bin/busybox cat /run/secrets/db_password && echo LEAK; /bin/busybox ls /run/hostd/secrets/reader && echo LEAK; echo rootsnoop-done"]
"#;

fn random_value() -> String {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .expect("urandom");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn contains(file: &Path, needle: &[u8]) -> bool {
    let bytes = std::fs::read(file).unwrap_or_default();
    bytes.windows(needle.len()).any(|w| w == needle)
}

fn files_under(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            files_under(&p, out);
        } else {
            out.push(p);
        }
    }
}

#[test]
fn only_granted_services_read_host_secrets_and_vsock_round_trips() {
    granted_secrets_and_vsock("qemu");
}

#[test]
fn only_granted_services_read_host_secrets_and_vsock_round_trips_with_the_built_in_vmm() {
    if !require("/dev/kvm", kvm_usable(), "a host with KVM") {
        return;
    }
    granted_secrets_and_vsock("kvm");
}

fn granted_secrets_and_vsock(vmm: &str) {
    if !require_qemu_guest() {
        return;
    }
    let (dir, image) = build(SPEC);
    let value = format!("pw-{}", random_value());
    let secret = dir.path().join("db_password.txt");
    std::fs::write(&secret, &value).expect("write secret");
    let unused = dir.path().join("unused.txt");
    std::fs::write(&unused, "nobody-asked").expect("write secret");
    let state = tempfile::tempdir().expect("state dir");
    let out = run_image_with(
        vmm,
        &image,
        &[
            "--state-dir",
            state.path().to_str().expect("utf-8 path"),
            "--secret",
            &format!("db_password=@{}", secret.display()),
            "--secret",
            &format!("unused=@{}", unused.display()),
            "--cmdline",
            "hostd.vsock_selftest=1",
        ],
    );
    let all = out.all();
    assert_eq!(out.code(), Some(0), "{all}");
    // The vsock round trip through the backend's echo port.
    assert!(
        out.stdout
            .contains("hostd-init: vsock echo: hostd-vsock-ping"),
        "{all}"
    );
    assert!(
        out.stdout
            .contains("hostd-init: secrets received over vsock (1)"),
        "only declared secrets are delivered: {all}"
    );
    assert!(
        all.contains("unused is provided but no service of the image declares it"),
        "{all}"
    );
    // The granted service reads the value, 0400 and its own.
    assert!(
        out.stdout.contains(&format!("[reader] got={value}")),
        "{all}"
    );
    assert!(out.stdout.contains("[reader] mode=400 uid=1000"), "{all}");
    // The others cannot, as another user or as root.
    assert!(out.stdout.contains("[snoop] snoop-done"), "{all}");
    assert!(out.stdout.contains("[rootsnoop] rootsnoop-done"), "{all}");
    assert!(!out.stdout.contains("LEAK"), "{all}");
    let leaked_lines: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.contains(&value) && !l.contains("[reader] got="))
        .collect();
    assert!(leaked_lines.is_empty(), "{leaked_lines:?}");
    // The value is nowhere in the image or the volumes.
    assert!(
        !contains(&image, value.as_bytes()),
        "the image holds the secret"
    );
    let mut files = vec![];
    files_under(state.path(), &mut files);
    assert!(!files.is_empty(), "the volume exists");
    for f in files {
        assert!(
            !contains(&f, value.as_bytes()),
            "{} holds the secret",
            f.display()
        );
    }
}

#[test]
fn a_declared_secret_the_host_does_not_provide_is_a_warning() {
    if !require_qemu_guest() {
        return;
    }
    let (_dir, image) = build(SPEC);
    let state = tempfile::tempdir().expect("state dir");
    let out = run_image_with(
        "qemu",
        &image,
        &["--state-dir", state.path().to_str().expect("utf-8 path")],
    );
    let all = out.all();
    assert!(
        all.contains("secret db_password is declared by the image but not provided"),
        "{all}"
    );
    assert!(
        out.stdout
            .contains("service reader declares db_password but the host did not provide it"),
        "{all}"
    );
    assert!(out.stdout.contains("[reader] got="), "{all}");
    assert!(!out.stdout.contains("LEAK"), "{all}");
}
