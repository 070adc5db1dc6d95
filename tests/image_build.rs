//! `hostd build` and `hostd inspect` end to end: reproducible images, refusal of damaged
//! images and malformed specs. These use a stand-in kernel file (the builder only
//! checks its format), so they need no QEMU and no kernel build.

mod common;

use common::{fake_kernel, hostd, run_with_deadline};
use std::path::Path;
use std::time::Duration;

const SPEC: &str = r#"
name = "repro"
kernel = "vmlinux"
memory = "192M"
vcpus = 2

[[files]]
path = "/etc/app/config.txt"
source = "config.txt"
mode = "0640"
owner = "33:33"

[[files]]
path = "/etc/motd"
contents = "hello\n"

[[files]]
path = "/bin/sh"
symlink = "busybox"

[[boot]]
name = "prepare"
command = "/bin/busybox"
args = ["mkdir", "-p", "/run/app"]

[services.db]
command = "/bin/busybox"
args = ["sleep", "1000"]

[services.web]
command = "/bin/busybox"
args = ["httpd", "-f"]
depends_on = ["db"]
restart = "on-failure"
main = true
env = { B = "2", A = "1" }

[[volumes]]
name = "data"
size = "64M"
mount = "/data"
"#;

fn build_in(dir: &Path, spec: &str) -> common::Output {
    std::fs::write(dir.join("app.toml"), spec).expect("write spec");
    let mut cmd = hostd();
    cmd.arg("build")
        .arg(dir.join("app.toml"))
        .arg("-o")
        .arg(dir.join("app.img"));
    run_with_deadline(cmd, Duration::from_secs(120))
}

fn set_mtime(path: &Path, secs: i64) {
    let ts = [libc_timespec(secs), libc_timespec(secs)];
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: valid NUL-terminated path and a two-element timespec array.
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), ts.as_ptr(), 0) };
    assert_eq!(r, 0, "utimensat");
}

fn libc_timespec(secs: i64) -> libc::timespec {
    libc::timespec {
        tv_sec: secs,
        tv_nsec: 0,
    }
}

#[test]
fn same_spec_in_two_places_at_two_times_gives_identical_bytes() {
    let a = tempfile::tempdir().expect("tempdir");
    let b = tempfile::tempdir().expect("tempdir");
    for (dir, mtime) in [(a.path(), 1_000_000_000), (b.path(), 1_700_000_000)] {
        fake_kernel(dir);
        std::fs::write(dir.join("config.txt"), "port = 80\n").expect("write");
        set_mtime(&dir.join("config.txt"), mtime);
        set_mtime(&dir.join("vmlinux"), mtime);
    }
    let out_a = build_in(a.path(), SPEC);
    assert!(out_a.status.success(), "{}", out_a.all());
    std::thread::sleep(Duration::from_millis(1100));
    let out_b = build_in(b.path(), SPEC);
    assert!(out_b.status.success(), "{}", out_b.all());
    let img_a = std::fs::read(a.path().join("app.img")).expect("read");
    let img_b = std::fs::read(b.path().join("app.img")).expect("read");
    assert!(
        img_a == img_b,
        "images differ:\n{}\n{}",
        out_a.stderr,
        out_b.stderr
    );

    // inspect verifies and shows the id and the manifest.
    let mut cmd = hostd();
    cmd.arg("inspect").arg(a.path().join("app.img"));
    let out = run_with_deadline(cmd, Duration::from_secs(60));
    assert!(out.status.success(), "{}", out.all());
    for want in [
        "id        sha256:",
        "manifest",
        "kernel",
        "initrd",
        "\"depends_on\"",
        "\"on-failure\"",
    ] {
        assert!(
            out.stdout.contains(want),
            "inspect lacks {want:?}:\n{}",
            out.stdout
        );
    }
    // A changed input changes the image.
    std::fs::write(b.path().join("config.txt"), "port = 81\n").expect("write");
    let out_c = build_in(b.path(), SPEC);
    assert!(out_c.status.success(), "{}", out_c.all());
    assert_ne!(
        img_a,
        std::fs::read(b.path().join("app.img")).expect("read")
    );
}

fn refuses(img: &Path, needle: &str) {
    for sub in [&["inspect"][..], &["run", "--vmm", "qemu"][..]] {
        let mut cmd = hostd();
        cmd.args(sub).arg(img);
        let out = run_with_deadline(cmd, Duration::from_secs(60));
        assert!(
            !out.status.success(),
            "hostd {sub:?} accepted a damaged image:\n{}",
            out.all()
        );
        assert!(
            out.stderr.contains(needle),
            "hostd {sub:?}: error lacks {needle:?}:\n{}",
            out.all()
        );
        assert!(
            !out.stdout.contains("hostd-init"),
            "a damaged image was booted"
        );
    }
}

#[test]
fn damaged_images_are_refused_naming_the_section() {
    let dir = tempfile::tempdir().expect("tempdir");
    fake_kernel(dir.path());
    std::fs::write(dir.path().join("config.txt"), "x").expect("write");
    let out = build_in(dir.path(), SPEC);
    assert!(out.status.success(), "{}", out.all());
    let good = std::fs::read(dir.path().join("app.img")).expect("read");
    let sections = common::sections(&good);
    assert_eq!(
        sections.iter().map(|s| s.0.as_str()).collect::<Vec<_>>(),
        ["manifest", "kernel", "initrd"]
    );
    let bad = dir.path().join("bad.img");
    for (name, off, len) in &sections {
        for at in [*off, off + len / 2, off + len - 1] {
            let mut img = good.clone();
            img[at] ^= 0x01;
            std::fs::write(&bad, &img).expect("write");
            refuses(&bad, &format!("section `{name}`"));
        }
    }
    // Truncated anywhere: in a section, in the header, to nothing.
    for len in [good.len() - 1, good.len() / 2, 100, 0] {
        std::fs::write(&bad, &good[..len]).expect("write");
        refuses(&bad, "truncated");
    }
    let mut img = good.clone();
    img[..8].copy_from_slice(b"NOTANIMG");
    std::fs::write(&bad, &img).expect("write");
    refuses(&bad, "wrong magic");
    // A flipped byte in the section table.
    let mut img = good.clone();
    img[64 + 20] ^= 0x10;
    std::fs::write(&bad, &img).expect("write");
    refuses(&bad, "header digest");
    // The original is intact and still accepted.
    let mut cmd = hostd();
    cmd.arg("inspect").arg(dir.path().join("app.img"));
    assert!(run_with_deadline(cmd, Duration::from_secs(60))
        .status
        .success());
}

#[test]
fn malformed_specs_name_the_field_and_keep_the_old_image() {
    let dir = tempfile::tempdir().expect("tempdir");
    fake_kernel(dir.path());
    std::fs::write(dir.path().join("config.txt"), "x").expect("write");
    assert!(build_in(dir.path(), SPEC).status.success());
    let before = std::fs::read(dir.path().join("app.img")).expect("read");
    let cases: &[(&str, &str)] = &[
        (r#"restart = "on-failure""#, "services.web.restart"),
        (r#"depends_on = ["db"]"#, "services.web.depends_on"),
        (r#"size = "64M""#, "volumes[0].size"),
        (r#"mode = "0640""#, "files[0].mode"),
        (r#"source = "config.txt""#, "files[0].source"),
        (r#"path = "/etc/app/config.txt""#, "files[0].path"),
    ];
    let replacements = [
        r#"restart = "sometimes""#,
        r#"depends_on = ["cache"]"#,
        r#"size = "64X""#,
        r#"mode = "rw-r--r--""#,
        r#"source = "missing.txt""#,
        // A name the guest's kernel would not create (NAME_MAX).
        &format!(r#"path = "/etc/{}""#, "n".repeat(300)),
    ];
    for ((from, field), to) in cases.iter().zip(&replacements) {
        let out = build_in(dir.path(), &SPEC.replacen(from, to, 1));
        assert!(!out.status.success(), "accepted a spec with {to}");
        assert!(
            out.stderr.contains(field) && out.stderr.contains("app.toml"),
            "error for {to} does not name {field}:\n{}",
            out.stderr
        );
    }
    let out = build_in(
        dir.path(),
        "name = \"x\"\n[services.a]\ncomand = \"/bin/a\"\n",
    );
    assert!(out.stderr.contains("comand"), "{}", out.stderr);
    let out = build_in(dir.path(), "name = \"x\"\n[services.a\n");
    assert!(
        !out.status.success() && out.stderr.contains("line 2"),
        "{}",
        out.stderr
    );
    assert_eq!(
        before,
        std::fs::read(dir.path().join("app.img")).expect("read"),
        "a failed build touched the old image"
    );
}
