//! The lock file: the first build of a spec with packages writes `app.lock`; later
//! builds follow it exactly, on another machine (another cache) and another day, and
//! give the same bytes; a .deb whose digest differs is refused by name; a locked
//! version that cannot be had says what to do. Needs apt and its lists (the packages
//! are downloaded into a fresh cache, as on a new machine).

mod common;

use common::{fake_kernel, hostd, require};
use std::path::Path;
use std::process::{Command, Output};

const SPEC: &str = "name = \"locked\"\nkernel = \"vmlinux\"\npackages = [\"busybox-static\"]\n\
                    [services.main]\ncommand = \"/bin/busybox\"\nargs = [\"true\"]\nmain = true\n";

#[must_use]
fn require_apt() -> bool {
    require(
        "apt lists with busybox-static",
        Command::new("apt-cache")
            .args(["show", "busybox-static"])
            .output()
            .is_ok_and(|o| o.status.success() && !o.stdout.is_empty()),
        "apt-get update",
    )
}

/// Builds `dir/app.toml` into `dir/app.img` with `cache` as hostd's cache.
fn build_in(dir: &Path, cache: &Path, extra: &[&str]) -> Output {
    hostd()
        .env("HOSTD_CACHE", cache)
        .arg("build")
        .arg(dir.join("app.toml"))
        .arg("-o")
        .arg(dir.join("app.img"))
        .args(extra)
        .output()
        .expect("run hostd build")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn project(root: &Path, name: &str) -> std::path::PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("app.toml"), SPEC).expect("spec");
    fake_kernel(&dir);
    dir
}

#[test]
fn the_lock_gives_the_same_bytes_elsewhere_and_refuses_a_tampered_deb() {
    if !require_apt() {
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let a = project(root.path(), "a");
    let out = build_in(&a, &root.path().join("cache-a"), &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("wrote lock file"), "{}", text(&out));
    let lock = std::fs::read_to_string(a.join("app.lock")).expect("app.lock written");
    assert!(lock.contains("name = \"busybox-static\""), "{lock}");
    assert!(lock.contains("sha256 = \""), "{lock}");

    // Another directory, another (empty) cache, a little later: the same bytes.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let b = project(root.path(), "b");
    std::fs::copy(a.join("app.lock"), b.join("app.lock")).expect("copy lock");
    let cache_b = root.path().join("cache-b");
    let out = build_in(&b, &cache_b, &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("followed lock file"), "{}", text(&out));
    let img_a = std::fs::read(a.join("app.img")).expect("a");
    let img_b = std::fs::read(b.join("app.img")).expect("b");
    assert!(img_a == img_b, "images differ");
    // The lock was followed, not rewritten.
    assert_eq!(
        std::fs::read_to_string(b.join("app.lock")).expect("lock"),
        lock
    );

    // One flipped byte in the cached .deb: refused, naming the package; no image.
    let deb = std::fs::read_dir(cache_b.join("debs"))
        .expect("debs")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("a cached .deb");
    let mut bytes = std::fs::read(&deb).expect("deb");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&deb, bytes).expect("tamper");
    std::fs::remove_file(b.join("app.img")).expect("rm");
    let out = build_in(&b, &cache_b, &[]);
    assert!(!out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("package `busybox-static`") && t.contains("sha256") && t.contains("delete it"),
        "{t}"
    );
    assert!(!b.join("app.img").exists());
}

#[test]
fn a_locked_version_that_cannot_be_had_and_a_stale_lock_say_what_to_do() {
    if !require_apt() {
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let dir = project(root.path(), "p");
    let cache = root.path().join("cache");
    let out = build_in(&dir, &cache, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let lock = std::fs::read_to_string(dir.join("app.lock")).expect("lock");

    // A version the archive no longer has (and the cache never had).
    let version = lock
        .lines()
        .find_map(|l| l.strip_prefix("version = \""))
        .expect("a locked version")
        .trim_end_matches('"')
        .to_string();
    std::fs::write(
        dir.join("app.lock"),
        lock.replace(&format!("\"{version}\""), "\"0.0.1-1\""),
    )
    .expect("edit lock");
    let out = build_in(&dir, &root.path().join("empty-cache"), &[]);
    assert!(!out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("package `busybox-static`")
            && t.contains("0.0.1-1")
            && t.contains("cannot be fetched")
            && t.contains("--update-lock"),
        "{t}"
    );

    // --update-lock resolves again and writes the current version back.
    let out = build_in(&dir, &cache, &["--update-lock"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        std::fs::read_to_string(dir.join("app.lock")).expect("lock"),
        lock
    );

    // The spec asks for more than the lock holds: refused until --update-lock.
    std::fs::write(
        dir.join("app.toml"),
        SPEC.replace("[\"busybox-static\"]", "[\"busybox-static\", \"dash\"]"),
    )
    .expect("spec");
    let out = build_in(&dir, &cache, &[]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("--update-lock"), "{}", text(&out));
}

/// The lock is an input like any other: a symlink out of the build context is refused
/// before anything is read through it (the build runs as root), and the file it names
/// is left as it was.
#[test]
fn a_lock_that_leads_out_of_the_build_context_is_refused() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = project(root.path(), "p");
    let outside = root.path().join("secret");
    std::fs::write(&outside, "not a lock\n").expect("write");
    std::os::unix::fs::symlink(&outside, dir.join("app.lock")).expect("symlink");
    let out = build_in(&dir, &root.path().join("cache"), &[]);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(
        t.contains("app.lock") && t.contains("outside the build context"),
        "{t}"
    );
    assert_eq!(
        std::fs::read_to_string(&outside).expect("read"),
        "not a lock\n"
    );
    assert!(!dir.join("app.img").exists());
}
