//! containerd hands the image's layers to the shim as mounts (an overlay of the
//! snapshot's layers, or a bind of one directory); the shim mounts them on the
//! bundle's `rootfs` at create and unmounts them at delete.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};

/// A mount that failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot mount {kind} {source_path} on {target}")]
pub struct MountError {
    kind: String,
    source_path: String,
    target: PathBuf,
    #[source]
    source: nix::Error,
}

/// One mount as containerd describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// File system type (`overlay`, `bind`…).
    pub kind: String,
    /// Source.
    pub source: String,
    /// Options: flags (`ro`, `rbind`…) and file-system data (`lowerdir=…`).
    pub options: Vec<String>,
}

/// Splits options into mount flags and the data string.
fn flags_and_data(kind: &str, options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => flags &= !MsFlags::MS_RDONLY,
            "bind" => flags |= MsFlags::MS_BIND,
            "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "suid" | "dev" | "exec" | "defaults" => {}
            other => data.push(other.to_string()),
        }
    }
    if kind == "bind" {
        flags |= MsFlags::MS_BIND;
    }
    (flags, data.join(","))
}

/// Mounts each of `mounts` on `target`, in order.
pub fn mount_all(mounts: &[Mount], target: &Path) -> Result<(), MountError> {
    for m in mounts {
        let (flags, data) = flags_and_data(&m.kind, &m.options);
        let fail = |source| MountError {
            kind: m.kind.clone(),
            source_path: m.source.clone(),
            target: target.to_path_buf(),
            source,
        };
        let data = (!data.is_empty()).then_some(data.as_str());
        nix::mount::mount(
            Some(m.source.as_str()),
            target,
            Some(m.kind.as_str()),
            flags & !MsFlags::MS_RDONLY,
            data,
        )
        .map_err(fail)?;
        // A bind mount ignores MS_RDONLY until remounted.
        if flags.contains(MsFlags::MS_RDONLY) {
            nix::mount::mount(
                None::<&str>,
                target,
                None::<&str>,
                flags | MsFlags::MS_REMOUNT,
                None::<&str>,
            )
            .map_err(fail)?;
        }
    }
    Ok(())
}

/// Unmounts everything on `target` (detached, so a busy file system does not block).
pub fn unmount_all(target: &Path) {
    for _ in 0..16 {
        if nix::mount::umount2(target, MntFlags::MNT_DETACH).is_err() {
            break;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn options_split_into_flags_and_data() {
        let o: Vec<String> = ["ro", "rbind", "lowerdir=/a:/b", "index=off"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (f, d) = flags_and_data("overlay", &o);
        assert!(f.contains(MsFlags::MS_RDONLY | MsFlags::MS_BIND | MsFlags::MS_REC));
        assert_eq!(d, "lowerdir=/a:/b,index=off");
        let (f, d) = flags_and_data("bind", &[]);
        assert_eq!((f, d.as_str()), (MsFlags::MS_BIND, ""));
    }
}
