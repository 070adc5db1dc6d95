//! Images with a read-only erofs root (`root = "erofs"`): built reproducibly with a
//! sha256 per 4 KiB block, booted under QEMU with the `rootfs` section attached as a
//! read-only virtio-blk disk straight from the image file. Assertions are on what a
//! user sees: the console, the exit code, the image's bytes.

mod common;

use common::{build, hostd, require, require_qemu_guest, run_image, run_with_deadline};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// mkfs.erofs (erofs-utils) is what the builder packs the root with.
#[must_use]
fn require_mkfs_erofs() -> bool {
    require(
        "mkfs.erofs",
        Command::new("mkfs.erofs").arg("--help").output().is_ok(),
        "apt-get install erofs-utils",
    )
}

const SPEC: &str = r##"
name = "ro-root"
packages = ["busybox-static"]
root = "erofs"

[[files]]
path = "/etc/app/greeting"
contents = "hello from the read-only root\n"
mode = "0640"
owner = "33:33"

[[files]]
path = "/usr/local/bin/report"
mode = "0755"
contents = """#!/bin/busybox sh
cat /etc/app/greeting
/bin/busybox stat -c 'greeting mode %a owner %u:%g' /etc/app/greeting
/bin/busybox grep ' / ' /proc/mounts | /bin/busybox cut -d' ' -f1-4
[ -e /init ] && echo 'initramfs visible' || echo 'initramfs gone'
/bin/busybox touch /written-to-root 2>&1; echo "write to / exit $?"
/bin/busybox mkdir /etc/new 2>&1; echo "mkdir in /etc exit $?"
echo tmp-writable > /tmp/t && cat /tmp/t
echo run-writable > /run/r && cat /run/r
cat /run/boot-step
"""

[[boot]]
name = "prepare"
command = "/bin/busybox"
args = ["sh", "-c", "echo boot step on the new root > /run/boot-step"]

[services.report]
command = "/usr/local/bin/report"
main = true

[[volumes]]
name = "data"
size = "16M"
mount = "/srv/data"
"##;

#[test]
fn services_run_from_the_read_only_root_and_cannot_write_to_it() {
    if !require_qemu_guest() || !require_mkfs_erofs() {
        return;
    }
    let (_dir, image) = build(SPEC);
    let out = run_image(&image, &[]);
    let c = &out.stdout;
    assert_eq!(out.code(), Some(0), "{}", out.all());
    for want in [
        "hostd-init: root file system /dev/vda (erofs, read-only) mounted",
        "hostd-init: boot step prepare done",
        // The spec's file, with its mode and owner.
        "[report] hello from the read-only root",
        "[report] greeting mode 640 owner 33:33",
        // `/` is the erofs disk, mounted read-only; the initramfs is out of sight.
        "[report] /dev/vda / erofs ro,",
        "[report] initramfs gone",
        // Writing to / fails with EROFS, anywhere below it too.
        "[report] touch: /written-to-root: Read-only file system",
        "[report] write to / exit 1",
        "[report] mkdir: can't create directory '/etc/new': Read-only file system",
        "[report] mkdir in /etc exit 1",
        // /tmp and /run are writable tmpfs, and boot steps ran on the new root.
        "[report] tmp-writable",
        "[report] run-writable",
        "[report] boot step on the new root",
        "hostd-init: powering off (exit code 0)",
    ] {
        assert!(c.contains(want), "console lacks {want:?}:\n{}", out.all());
    }
    let mounted = common::line_of(c, "root file system /dev/vda").unwrap_or(usize::MAX);
    let boot = common::line_of(c, "boot step prepare running").unwrap_or(0);
    assert!(mounted < boot, "root mounted after the boot steps:\n{c}");
}

fn section<'a>(img: &'a [u8], name: &str) -> &'a [u8] {
    let (_, off, len) = common::sections(img)
        .into_iter()
        .find(|s| s.0 == name)
        .unwrap_or_else(|| panic!("no section {name}"));
    &img[off..off + len]
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// A minimal ELF header: enough for the builder to accept the file as a vmlinux.
fn fake_kernel(dir: &Path) {
    let mut k = b"\x7fELF\x02\x01\x01".to_vec();
    k.resize(64 * 1024, 0xAB);
    std::fs::write(dir.join("vmlinux"), k).expect("write kernel");
}

#[test]
fn erofs_images_are_reproducible_and_hash_every_block() {
    let apt = Command::new("apt-cache")
        .args(["show", "busybox-static"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !require("apt-get (to fetch busybox-static)", apt, "apt-get update") || !require_mkfs_erofs()
    {
        return;
    }
    // Two places, two times, the host file with two different mtimes.
    let spec = format!(
        "{}\n[[files]]\npath = \"/etc/app/from-host\"\nsource = \"host.txt\"\nowner = \"1000:1000\"\n",
        SPEC.replacen("name = \"ro-root\"", "name = \"ro-root\"\nkernel = \"vmlinux\"", 1)
    );
    let dirs = [
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    ];
    let mut images = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        fake_kernel(dir.path());
        std::fs::write(dir.path().join("host.txt"), "from the host\n").expect("write");
        let f = std::fs::File::options()
            .write(true)
            .open(dir.path().join("host.txt"))
            .expect("open");
        f.set_modified(
            std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000 + i as u64 * 7_000_000),
        )
        .expect("set mtime");
        std::fs::write(dir.path().join("app.toml"), &spec).expect("write spec");
        let mut cmd = hostd();
        cmd.arg("build")
            .arg(dir.path().join("app.toml"))
            .arg("-o")
            .arg(dir.path().join("app.img"));
        let out = run_with_deadline(cmd, Duration::from_secs(180));
        assert!(out.status.success(), "{}", out.all());
        images.push(std::fs::read(dir.path().join("app.img")).expect("read image"));
        if i == 0 {
            std::thread::sleep(Duration::from_millis(1100));
        }
    }
    let (a, b) = (&images[0], &images[1]);
    eprintln!(
        "image digests: sha256:{} and sha256:{}",
        hex(&Sha256::digest(a)),
        hex(&Sha256::digest(b))
    );
    let names: Vec<String> = common::sections(a).into_iter().map(|s| s.0).collect();
    assert_eq!(
        names,
        ["manifest", "kernel", "initrd", "rootfs", "rootfs-hashes"]
    );
    for name in &names {
        assert!(
            section(a, name) == section(b, name),
            "section {name} differs between two builds"
        );
    }
    assert!(a == b, "the two images differ");

    // The rootfs is erofs, padded to 4 KiB; the hash section is the sha256 of each of
    // its 4 KiB blocks, in order.
    let rootfs = section(a, "rootfs");
    assert_eq!(rootfs.len() % 4096, 0);
    assert_eq!(
        rootfs.get(1024..1028),
        Some(&[0xe2, 0xe1, 0xf5, 0xe0][..]),
        "erofs magic"
    );
    let hashes = section(a, "rootfs-hashes");
    assert_eq!(hashes.len(), rootfs.len() / 4096 * 32);
    for (i, (block, want)) in rootfs.chunks(4096).zip(hashes.chunks(32)).enumerate() {
        assert_eq!(&Sha256::digest(block)[..], want, "hash of block {i}");
    }
    // The manifest records the root; the initrd holds init, not the packages.
    let manifest: serde_json::Value =
        serde_json::from_slice(section(a, "manifest")).expect("manifest json");
    assert_eq!(manifest["root"]["fs"], "erofs");
    assert_eq!(manifest["root"]["size"], rootfs.len() as u64);
    assert_eq!(manifest["root"]["block_size"], 4096);
    assert_eq!(manifest["root"]["sha256"], hex(&Sha256::digest(rootfs)));
    // One flipped byte in either section and hostd refuses the image, naming it.
    let bad = dirs[0].path().join("bad.img");
    for name in ["rootfs", "rootfs-hashes"] {
        let (_, off, len) = common::sections(a)
            .into_iter()
            .find(|s| s.0 == name)
            .expect("section");
        let mut img = a.clone();
        img[off + len / 2] ^= 0x01;
        std::fs::write(&bad, &img).expect("write");
        for sub in [&["inspect"][..], &["run", "--vmm", "qemu"][..]] {
            let mut cmd = hostd();
            cmd.args(sub).arg(&bad);
            let out = run_with_deadline(cmd, Duration::from_secs(60));
            assert!(
                !out.status.success() && out.stderr.contains(&format!("section `{name}`")),
                "hostd {sub:?} did not refuse a changed {name}:\n{}",
                out.all()
            );
            assert!(
                !out.stdout.contains("hostd-init"),
                "a damaged image was booted"
            );
        }
    }
    assert_eq!(
        cpio_names(section(a, "initrd")),
        [
            "dev",
            "dev/console",
            "etc",
            "etc/hostd",
            "etc/hostd/manifest.json",
            "init",
            "newroot",
            "proc",
            "run",
            "sys",
            "tmp"
        ],
        "the initrd holds more than init needs before the root is mounted"
    );
}

/// Entry names of a cpio newc archive.
fn cpio_names(mut c: &[u8]) -> Vec<String> {
    let field = |h: &[u8], i: usize| {
        usize::from_str_radix(
            std::str::from_utf8(&h[6 + i * 8..14 + i * 8]).expect("hex"),
            16,
        )
        .expect("hex")
    };
    let pad4 = |n: usize| n.div_ceil(4) * 4;
    let mut names = Vec::new();
    while c.len() >= 110 && c.starts_with(b"070701") {
        let (filesize, namesize) = (field(c, 6), field(c, 11));
        let name = String::from_utf8_lossy(&c[110..110 + namesize - 1]).into_owned();
        if name == "TRAILER!!!" {
            break;
        }
        names.push(name);
        c = &c[pad4(pad4(110 + namesize) + filesize)..];
    }
    names
}

#[test]
fn a_guest_without_its_root_disk_powers_off_with_a_clear_error() {
    if !require_qemu_guest() || !require_mkfs_erofs() {
        return;
    }
    let (dir, image) = build(SPEC);
    // Boot the image's kernel and initrd on their own: the manifest asks for a root
    // that no runner attached.
    let img = std::fs::read(&image).expect("read image");
    let kernel = dir.path().join("kernel");
    let initrd = dir.path().join("initrd");
    std::fs::write(&kernel, section(&img, "kernel")).expect("write");
    std::fs::write(&initrd, section(&img, "initrd")).expect("write");
    let mut cmd = hostd();
    cmd.args(["run", "--vmm", "qemu", "--timeout", "240", "--kernel"])
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--cmdline", "console=ttyS0 reboot=t panic=-1 quiet"]);
    let out = run_with_deadline(cmd, Duration::from_secs(300));
    assert_eq!(out.code(), Some(125), "{}", out.all());
    assert!(
        out.stdout
            .contains("hostd-init: /dev/vda did not appear within 5s"),
        "{}",
        out.all()
    );
    assert!(
        !out.stdout.contains("service report started"),
        "{}",
        out.all()
    );
}
