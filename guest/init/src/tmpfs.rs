//! tmpfs mounts the manifest declares (spec `tmpfs`): writable, empty-at-boot
//! directories for what packages write at run time on a read-only root (logs, pid
//! files, caches). Each mount's root gets the mode and owner the builder recorded.

use hostd_images::manifest::Tmpfs;

use crate::sys;

/// The mount options for one tmpfs.
fn options(t: &Tmpfs) -> String {
    let mut o = format!("mode={:04o},uid={},gid={}", t.mode, t.uid, t.gid);
    if let Some(m) = t.size_mib {
        o.push_str(&format!(",size={m}m"));
    }
    o
}

/// Mounts every tmpfs, in manifest order. Errors name the mount point.
pub fn mount_all(mounts: &[Tmpfs]) -> Result<(), String> {
    for t in mounts {
        // On an initrd root the builder's directory is there too; this only matters
        // for a hand-made image.
        let _ = std::fs::create_dir_all(&t.path);
        let opts = options(t);
        sys::mount(
            "tmpfs",
            &t.path,
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            &opts,
        )
        .map_err(|e| format!("cannot mount tmpfs ({opts}) on {}: {e}", t.path))?;
        crate::console::log(&format!("tmpfs mounted on {} ({opts})", t.path));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_carry_mode_owner_and_size() {
        let t = Tmpfs {
            path: "/var/log/lighttpd".into(),
            size_mib: Some(16),
            mode: 0o750,
            uid: 33,
            gid: 33,
        };
        assert_eq!(options(&t), "mode=0750,uid=33,gid=33,size=16m");
        let t = Tmpfs {
            size_mib: None,
            mode: 0o1777,
            ..t
        };
        assert_eq!(options(&t), "mode=1777,uid=33,gid=33");
    }
}
