//! Volumes: the runner attaches volume `i` of the manifest as a virtio-blk disk whose
//! serial is `vol{i}` (/sys/block/vdX/serial); guest init mounts each at its mount
//! point (ext4, formatted by the host when the volume was created).

use std::path::Path;
use std::time::{Duration, Instant};

use hostd_images::manifest::Volume;

use crate::sys;

/// How long to wait for the kernel to find all volume disks.
const DEVICE_WAIT: Duration = Duration::from_secs(5);

/// The block device whose serial is `serial`, e.g. `/dev/vdb`.
fn device_with_serial(serial: &str) -> Option<String> {
    let entries = std::fs::read_dir("/sys/block").ok()?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let s = std::fs::read_to_string(e.path().join("serial")).unwrap_or_default();
        if s.trim_end_matches(['\0', '\n']) == serial {
            return Some(format!("/dev/{name}"));
        }
    }
    None
}

/// Mounts every volume. Errors name the volume and what is missing.
pub fn mount_all(volumes: &[Volume]) -> Result<(), String> {
    for (i, v) in volumes.iter().enumerate() {
        let serial = format!("vol{i}");
        let start = Instant::now();
        let dev = loop {
            if let Some(d) = device_with_serial(&serial) {
                break d;
            }
            if start.elapsed() > DEVICE_WAIT {
                return Err(format!(
                    "volume {}: no disk with serial {serial} appeared within {DEVICE_WAIT:?} (the runner did not attach it)",
                    v.name
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if !Path::new(&v.mount).is_dir() {
            // A read-only root cannot grow a mount point; the builder creates them.
            let _ = std::fs::create_dir_all(&v.mount);
        }
        sys::mount(&dev, &v.mount, "ext4", libc::MS_NOSUID | libc::MS_NODEV, "").map_err(|e| {
            format!(
                "volume {}: cannot mount {dev} (ext4) on {}: {e}",
                v.name, v.mount
            )
        })?;
        crate::console::log(&format!("volume {} ({dev}) mounted on {}", v.name, v.mount));
    }
    Ok(())
}

/// Flushes and unmounts every volume (at power-off), last mounted first.
pub fn unmount_all(volumes: &[Volume]) {
    for v in volumes.iter().rev() {
        if let Err(e) = sys::umount(&v.mount) {
            crate::console::log(&format!(
                "volume {}: cannot unmount {}: {e}",
                v.name, v.mount
            ));
        }
    }
}
