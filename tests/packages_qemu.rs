//! Real services from real Debian packages: a spec names only the packages it wants,
//! hostd pulls in their dependency closure from the build host's apt lists, and the
//! programs run in the guest. Assertions are on what a user sees: the service's
//! output and the VM's exit code.

mod common;

use common::{
    build, hostd, kvm_usable, require, require_qemu_guest, run_image_with, run_with_deadline,
};
use std::process::Command;
use std::time::Duration;

/// mkfs.erofs packs roots above the size threshold; apt must know the packages.
#[must_use]
fn require_packages(names: &[&str]) -> bool {
    require(
        "mkfs.erofs",
        Command::new("mkfs.erofs").arg("--help").output().is_ok(),
        "apt-get install erofs-utils",
    ) && names.iter().all(|n| {
        require(
            &format!("package {n} in the apt lists"),
            Command::new("apt-cache")
                .args(["show", "--", n])
                .output()
                .is_ok_and(|o| o.status.success() && !o.stdout.is_empty()),
            "apt-get update",
        )
    })
}

/// Only `python3`: its C library, loader, shared libraries and standard library come
/// from the closure. json, sqlite3 (a C extension over libsqlite3) and hashlib (over
/// libssl) all load.
const PYTHON: &str = r#"
name = "py"
packages = ["python3"]

[services.main]
command = "/usr/bin/python3"
args = ["-c", """
import json, sqlite3, hashlib
db = sqlite3.connect(':memory:')
db.execute('create table t (v text)')
db.execute('insert into t values (?)', (json.dumps({'answer': 42}),))
row = db.execute('select v from t').fetchone()[0]
print('python says', json.loads(row)['answer'], hashlib.sha256(b'abc').hexdigest()[:16], 'sqlite', sqlite3.sqlite_version)
"""]
main = true
"#;

fn python_runs_under(vmm: &str) {
    let (_dir, image) = build(PYTHON);
    let out = if vmm == "kvm" {
        // Measured here: guest init after 13-100 s (depending on the host's load),
        // python's start-up and queries about 6 minutes more.
        let mut cmd = hostd();
        cmd.args(["run", "--vmm", "kvm", "--timings", "--timeout", "1800"])
            .arg(&image);
        run_with_deadline(cmd, Duration::from_secs(1900))
    } else {
        run_image_with(vmm, &image, &[])
    };
    assert!(
        out.stdout
            .contains("[main] python says 42 ba7816bf8f01cfea sqlite 3."),
        "{}",
        out.all()
    );
    assert_eq!(out.code(), Some(0), "{}", out.all());
    // Over the size threshold, the root is the verified erofs disk, not RAM.
    assert!(
        out.stdout.contains("(erofs, read-only) mounted"),
        "{}",
        out.all()
    );
}

#[test]
fn python3_from_its_package_alone_runs_under_qemu() {
    if !require_qemu_guest() || !require_packages(&["python3"]) {
        return;
    }
    python_runs_under("qemu");
}

/// The same image under hostd's own VMM. On a nested PVM host every guest system call
/// and page fault goes through KVM's instruction emulator (docs/pvm.md), so this takes
/// minutes (about 8 measured here); the deadline is generous.
#[test]
fn python3_from_its_package_alone_runs_under_the_builtin_vmm() {
    if !require("/dev/kvm", kvm_usable(), "a host with KVM")
        || !require_qemu_guest()
        || !require_packages(&["python3"])
    {
        return;
    }
    python_runs_under("kvm");
}

/// redis-server runs as the account the spec declares (maintainer scripts, which would
/// have made it, do not run); a second service's redis-cli reaches it.
const REDIS: &str = r#"
name = "redis"
packages = ["redis-server", "redis-tools", "dash"]
# init-system-helpers depends on `usrmerge | usr-is-merged`; usrmerge brings perl.
exclude = ["usrmerge"]

[[users]]
name = "redis"
uid = 999
gid = 999
home = "/var/lib/redis"

[services.redis]
command = "/usr/bin/redis-server"
args = ["--port", "6379", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", "/tmp"]
user = "redis"

[services.check]
command = "/bin/dash"
args = ["-c", '''
n=0
until [ "$(redis-cli ping 2>/dev/null)" = PONG ]; do
  n=$((n+1)); [ $n -gt 5000 ] && { echo redis never answered; exit 1; }
done
echo "ping: $(redis-cli ping)"
redis-cli set greeting "hello from redis-cli" >/dev/null
echo "get: $(redis-cli get greeting)"
pid=$(redis-cli info server | while IFS=: read k v; do [ "$k" = process_id ] && echo "${v%?}"; done)
while read k v rest; do [ "$k" = Uid: ] && echo "redis-server uid: $v"; done < /proc/$pid/status
grep_user() { while IFS=: read n x uid rest; do [ "$n" = redis ] && echo "passwd: redis $uid"; done < /etc/passwd; }
grep_user
exit 0
''']
main = true
depends_on = ["redis"]
"#;

#[test]
fn redis_runs_as_its_declared_user_and_answers_redis_cli() {
    if !require_qemu_guest() || !require_packages(&["redis-server", "redis-tools", "dash"]) {
        return;
    }
    let (dir, image) = build(REDIS);
    let out = run_image_with("qemu", &image, &[]);
    for want in [
        "[redis] ",
        "Ready to accept connections",
        "[check] ping: PONG",
        "[check] get: hello from redis-cli",
        "[check] redis-server uid: 999",
        "[check] passwd: redis 999",
    ] {
        assert!(
            out.stdout.contains(want),
            "missing {want:?}:\n{}",
            out.all()
        );
    }
    assert_eq!(out.code(), Some(0), "{}", out.all());
    // The exclusion held: the lock names usr-is-merged, not usrmerge or perl.
    let lock = std::fs::read_to_string(dir.path().join("app.lock")).expect("app.lock");
    assert!(lock.contains("name = \"usr-is-merged\""), "{lock}");
    assert!(!lock.contains("name = \"usrmerge\""), "{lock}");
    assert!(!lock.contains("name = \"perl\""), "{lock}");
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Packs `dir` as a reproducible tar with GNU tar.
fn tar_of(dir: &std::path::Path) -> Vec<u8> {
    let out = Command::new("tar")
        .args([
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--mtime=@0",
            "-C",
        ])
        .arg(dir)
        .args(["-cf", "-", "."])
        .output()
        .expect("run tar");
    assert!(out.status.success(), "tar failed");
    out.stdout
}

/// Writes an oci-archive with two layers (the first gzip-compressed) into `root`,
/// the second whiting out a file and making a directory opaque. Returns the image
/// manifest's digest.
fn write_oci_archive(root: &std::path::Path, archive: &std::path::Path) -> String {
    let l1 = root.join("l1");
    let l2 = root.join("l2");
    for (path, text) in [
        (l1.join("etc/app/keep.txt"), "kept from layer one\n"),
        (l1.join("etc/app/gone.txt"), "must be whited out\n"),
        (l1.join("opt/old/a.txt"), "hidden by the opaque dir\n"),
        (l2.join("etc/app/.wh.gone.txt"), ""),
        (l2.join("opt/old/.wh..wh..opq"), ""),
        (l2.join("opt/old/b.txt"), "layer two's b\n"),
        (l2.join("etc/app/added.txt"), "added by layer two\n"),
    ] {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, text).expect("write");
    }
    let layer1_tar = tar_of(&l1);
    let gz = {
        use std::io::Write;
        let mut child = Command::new("gzip")
            .args(["-n", "-c"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("gzip");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(&layer1_tar)
            .expect("feed gzip");
        let out = child.wait_with_output().expect("gzip");
        out.stdout
    };
    let layer2_tar = tar_of(&l2);
    let layout = root.join("layout");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("mkdir blobs");
    let put = |bytes: &[u8]| -> String {
        let h = sha256_hex(bytes);
        std::fs::write(blobs.join(&h), bytes).expect("blob");
        format!("sha256:{h}")
    };
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":["sha256:{}","sha256:{}"]}}}}"#,
        sha256_hex(&layer1_tar),
        sha256_hex(&layer2_tar)
    );
    let config_digest = put(config.as_bytes());
    let l1_digest = put(&gz);
    let l2_digest = put(&layer2_tar);
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{l1_digest}","size":{}}},{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{l2_digest}","size":{}}}]}}"#,
        config.len(),
        gz.len(),
        layer2_tar.len()
    );
    let manifest_digest = put(manifest.as_bytes());
    std::fs::write(
        layout.join("index.json"),
        format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{manifest_digest}","size":{},"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#,
            manifest.len()
        ),
    )
    .expect("index.json");
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .expect("oci-layout");
    std::fs::write(archive, tar_of(&layout)).expect("archive");
    manifest_digest
}

#[test]
fn an_oci_archive_with_two_layers_and_whiteouts_is_the_root() {
    if !require_qemu_guest() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let digest = write_oci_archive(dir.path(), &dir.path().join("base.oci.tar"));
    let spec = dir.path().join("app.toml");
    std::fs::write(
        &spec,
        r#"
name = "oci"
base = "oci-archive:base.oci.tar"
packages = ["busybox-static"]

[services.main]
command = "/bin/busybox"
args = ["sh", "-c", "cat /etc/app/keep.txt /etc/app/added.txt; echo old: $(/bin/busybox ls /opt/old); [ -e /etc/app/gone.txt ] || echo gone.txt is gone"]
main = true
"#,
    )
    .expect("spec");
    let image = dir.path().join("app.img");
    let out = hostd()
        .arg("build")
        .arg(&spec)
        .arg("-o")
        .arg(&image)
        .output()
        .expect("build");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let inspect = hostd()
        .arg("inspect")
        .arg(&image)
        .output()
        .expect("inspect");
    let shown = String::from_utf8_lossy(&inspect.stdout);
    assert!(shown.contains(&digest), "{digest} not in:\n{shown}");
    let out = run_image_with("qemu", &image, &[]);
    for want in [
        "[main] kept from layer one",
        "[main] added by layer two",
        "[main] old: b.txt",
        "[main] gone.txt is gone",
    ] {
        assert!(
            out.stdout.contains(want),
            "missing {want:?}:\n{}",
            out.all()
        );
    }
    assert_eq!(out.code(), Some(0), "{}", out.all());
    // The same archive, the same image.
    let again = dir.path().join("again.img");
    let out = hostd()
        .arg("build")
        .arg(&spec)
        .arg("-o")
        .arg(&again)
        .output()
        .expect("build");
    assert!(out.status.success());
    assert!(std::fs::read(&image).expect("img") == std::fs::read(&again).expect("again"));
}
