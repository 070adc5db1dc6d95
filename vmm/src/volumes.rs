//! Persistent volumes: one ext4 file per volume name in hostd's state directory,
//! created with its declared size (sparse) and formatted the first time it is used.
//! The same name is the same data, across reboots and new versions of an image.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Why a volume could not be prepared.
#[derive(Debug, thiserror::Error)]
#[error("volume `{name}`: {message}")]
pub struct VolumeError {
    /// Volume name.
    pub name: String,
    /// What went wrong and what to do.
    pub message: String,
}

/// hostd's state directory: $HOSTD_STATE, else ~/.local/share/hostd.
pub fn state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("HOSTD_STATE") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".local/share/hostd")
}

/// The file backing volume `name` under `state`.
pub fn volume_path(state: &Path, name: &str) -> PathBuf {
    state.join("volumes").join(format!("{name}.ext4"))
}

/// Returns the volume's file, creating and formatting it on first use. An existing
/// volume is used as it is (it is never shrunk or reformatted; a larger declared size
/// is reported, not applied).
pub fn ensure(state: &Path, name: &str, size_mib: u32) -> Result<PathBuf, VolumeError> {
    let err = |message: String| VolumeError {
        name: name.to_string(),
        message,
    };
    let path = volume_path(state, name);
    if let Ok(meta) = std::fs::metadata(&path) {
        let want = u64::from(size_mib) << 20;
        if meta.len() < want {
            tracing::warn!(
                "volume {name} is {} MiB, the image declares {size_mib} MiB; keeping its size",
                meta.len() >> 20
            );
        }
        return Ok(path);
    }
    let dir = path.parent().unwrap_or(state);
    std::fs::create_dir_all(dir)
        .map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
    // Build under a temporary name so a failure never leaves a half-made volume.
    let tmp = dir.join(format!(".{name}.ext4.new"));
    let file = std::fs::File::create(&tmp)
        .map_err(|e| err(format!("cannot create {}: {e}", tmp.display())))?;
    file.set_len(u64::from(size_mib) << 20)
        .map_err(|e| err(format!("cannot size {}: {e}", tmp.display())))?;
    drop(file);
    tracing::info!(
        "creating volume {name} ({size_mib} MiB) at {}",
        path.display()
    );
    let out = Command::new("mkfs.ext4")
        // 4 KiB blocks: the block backend announces a 4 KiB logical block size.
        .args(["-q", "-F", "-b", "4096", "-L"])
        .arg(format!("vol-{name}"))
        .args(["-E", "root_owner=0:0"])
        .arg(&tmp)
        .output()
        .map_err(|e| {
            err(format!(
                "cannot run mkfs.ext4: {e} (apt-get install e2fsprogs)"
            ))
        })?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(format!(
            "mkfs.ext4 failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    std::fs::rename(&tmp, &path)
        .map_err(|e| err(format!("cannot move the new volume into place: {e}")))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volumes_are_created_once_and_kept() {
        if Command::new("mkfs.ext4").arg("-V").output().is_err() {
            eprintln!("SKIP: mkfs.ext4 missing (apt-get install e2fsprogs)");
            return;
        }
        let state = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let p = ensure(state.path(), "data", 16).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0),
            16 << 20
        );
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .and_then(|f| std::os::unix::fs::FileExt::write_all_at(&f, b"marker", 15 << 20))
            .unwrap_or_else(|e| panic!("{e}"));
        let again = ensure(state.path(), "data", 32).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(again, p);
        let mut buf = [0u8; 6];
        std::fs::File::open(&p)
            .and_then(|f| std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, 15 << 20))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&buf, b"marker", "an existing volume is never reformatted");
    }
}
