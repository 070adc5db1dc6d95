//! The read-only root file system: when the manifest has a `root`, guest init mounts
//! [`abi::ROOT_DEVICE`] read-only on [`NEW_ROOT`], moves the basic mounts (/proc,
//! /sys, /dev, /run, /tmp) into it and makes it `/` the way `switch_root` does
//! (chdir, `mount --move . /`, chroot). The initramfs stays in memory underneath,
//! unreachable; it holds only init and the manifest, so there is nothing worth freeing.

use std::path::Path;
use std::time::{Duration, Instant};

use hostd_images::abi;
use hostd_images::manifest::RootInfo;

use crate::sys;

/// Where the root is mounted before the switch (a directory of the initrd).
pub const NEW_ROOT: &str = "/newroot";

/// Mounts that move from the initramfs into the new root. Their submounts (/dev/pts,
/// /dev/shm) move with them.
const MOVED: [&str; 5] = ["/dev", "/proc", "/sys", "/run", "/tmp"];

/// How long to wait for the kernel to create the root device node in devtmpfs.
const DEVICE_WAIT: Duration = Duration::from_secs(5);

/// Mounts the read-only root and switches to it. Errors say what failed and what to
/// check; the caller logs them and powers off.
pub fn switch_to(root: &RootInfo) -> Result<(), String> {
    if root.fs != "erofs" {
        return Err(format!(
            "the manifest's root file system type is `{}`; this init mounts only erofs (rebuild the image with this hostd)",
            root.fs
        ));
    }
    let dev = abi::ROOT_DEVICE;
    let start = Instant::now();
    while !Path::new(dev).exists() {
        if start.elapsed() > DEVICE_WAIT {
            return Err(format!(
                "{dev} did not appear within {DEVICE_WAIT:?}: the runner did not attach the image's `rootfs` section as the first virtio-blk disk"
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = std::fs::create_dir_all(NEW_ROOT);
    // nodev: /dev is a devtmpfs of its own. Set-id bits keep working (packages may
    // rely on them); nothing on the root can be changed.
    sys::mount(
        dev,
        NEW_ROOT,
        &root.fs,
        libc::MS_RDONLY | libc::MS_NODEV,
        "",
    )
    .map_err(|e| {
        format!(
            "cannot mount the root file system {dev} ({}, read-only) on {NEW_ROOT}: {e} (is the `rootfs` section attached, and is it intact?)",
            root.fs
        )
    })?;
    for m in MOVED {
        let target = format!("{NEW_ROOT}{m}");
        sys::mount(m, &target, "", libc::MS_MOVE, "").map_err(|e| {
            format!("cannot move {m} to {target}: {e} (the root file system lacks the mount point {m}?)")
        })?;
    }
    std::env::set_current_dir(NEW_ROOT)
        .map_err(|e| format!("cannot change directory to {NEW_ROOT}: {e}"))?;
    sys::mount(".", "/", "", libc::MS_MOVE, "")
        .map_err(|e| format!("cannot move {NEW_ROOT} to /: {e}"))?;
    std::os::unix::fs::chroot(".").map_err(|e| format!("cannot chroot into the new root: {e}"))?;
    std::env::set_current_dir("/").map_err(|e| format!("cannot change directory to /: {e}"))?;
    Ok(())
}
