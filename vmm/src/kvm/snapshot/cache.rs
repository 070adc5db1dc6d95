//! The snapshot cache directory: keys, finding a usable snapshot, storing a new one.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{io, Header, SnapshotError, State, HEADER_LEN};

/// `hostd run --snapshot-cache DIR`: where snapshots live and which one this run's
/// image and configuration would use.
#[derive(Debug, Clone)]
pub struct SnapshotCache {
    /// The cache directory.
    pub dir: PathBuf,
    /// SHA-256 over the kernel's and initrd's digests (so the image), the command line,
    /// vCPUs, memory, CPU template and devices: a change of any makes another key.
    pub key: [u8; 32],
}

impl SnapshotCache {
    /// The cache for booting `cfg`'s kernel and initrd with its settings, or `None`
    /// when the kernel has no digest to key on (a bare `--kernel`).
    pub fn for_config(dir: PathBuf, cfg: &crate::kvm::KvmConfig) -> Option<SnapshotCache> {
        let mut h = Sha256::new();
        // The version changes whenever the VMM changes what a guest sees of its CPU or
        // devices for the same settings: v2 offers the TSC-deadline timer, which a
        // guest booted with it keeps using after a restore.
        h.update(b"hostd snapshot key v2\0");
        h.update(cfg.kernel.sha256()?);
        match &cfg.initrd {
            Some(i) => h.update(i.sha256()?),
            None => h.update([0u8; 32]),
        }
        for part in [
            cfg.cmdline.clone(),
            cfg.vcpus.to_string(),
            cfg.memory_mib.to_string(),
            format!("{:?}", cfg.template),
        ] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        for d in &cfg.devices {
            let name = d.name();
            h.update((name.len() as u64).to_le_bytes());
            h.update(name.as_bytes());
        }
        Some(SnapshotCache {
            dir,
            key: h.finalize().into(),
        })
    }

    /// The snapshot file for this key.
    pub fn path(&self) -> PathBuf {
        let hex: String = self.key.iter().map(|b| format!("{b:02x}")).collect();
        self.dir.join(format!("{hex}.snap"))
    }
}

/// A snapshot found valid so far (header, key, state digest and records): memory is
/// checked while it is read back.
#[derive(Debug)]
pub struct Saved {
    /// The open file.
    pub file: File,
    /// Its path.
    pub path: PathBuf,
    /// Its header.
    pub header: Header,
    /// Its state.
    pub state: State,
}

/// What a run with a snapshot cache prepared before the VM's process starts: the
/// snapshot to restore, if a valid one exists, and a temporary file for a new one.
#[derive(Debug)]
pub struct Prepared {
    /// The snapshot to restore from.
    pub saved: Option<Saved>,
    /// A new snapshot is written here (then [`Prepared::finish`] renames it).
    pub tmp: Option<(File, PathBuf)>,
    /// The final name.
    pub path: PathBuf,
    /// The key.
    pub key: [u8; 32],
}

/// Opens a snapshot and checks all but its memory.
pub fn open(path: &Path, key: &[u8; 32], mem_len: u64) -> Result<Saved, SnapshotError> {
    // Non-blocking and not through a symbolic link: a FIFO put there cannot hang the
    // run (its open waited for a writer, with Ctrl-C counted but not acted on).
    let mut file = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(path)
        .map_err(io(path))?;
    let meta = file.metadata().map_err(io(path))?;
    if !meta.is_file() {
        return Err(SnapshotError::Mismatch("not a regular file".into()));
    }
    let len = meta.len();
    let mut head = [0u8; HEADER_LEN];
    file.read_exact(&mut head).map_err(io(path))?;
    let header = Header::parse(&head, len)?;
    if &header.key != key {
        return Err(SnapshotError::KeyMismatch);
    }
    if header.mem_len != mem_len {
        return Err(SnapshotError::Mismatch(format!(
            "{} bytes of memory for a VM of {mem_len}",
            header.mem_len
        )));
    }
    let mut state = vec![0u8; header.state_len as usize];
    file.read_exact_at(&mut state, header.state_offset)
        .map_err(io(path))?;
    let d: [u8; 32] = Sha256::digest(&state).into();
    if d != header.state_sha256 {
        return Err(SnapshotError::Digest("state"));
    }
    let state = State::decode(&state)?;
    Ok(Saved {
        file,
        path: path.to_owned(),
        header,
        state,
    })
}

impl Prepared {
    /// Looks for this key's snapshot (a damaged or mismatched one is reported and
    /// removed: this run boots and replaces it) and opens a temporary file for a new
    /// one.
    pub fn new(cache: &SnapshotCache, mem_len: u64) -> Result<Prepared, SnapshotError> {
        std::fs::create_dir_all(&cache.dir).map_err(io(&cache.dir))?;
        let path = cache.path();
        let saved = match open(&path, &cache.key, mem_len) {
            Ok(s) => Some(s),
            Err(SnapshotError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                None
            }
            Err(e) => {
                warn_unusable(&path, &e);
                let _ = std::fs::remove_file(&path);
                None
            }
        };
        let tmp_path = cache.dir.join(format!(".{}.tmp", std::process::id()));
        // Made here and nowhere else: never through a link or into a file that exists
        // (whatever is at the name, left by a killed run with this pid or planted, is
        // removed first: a link is removed, not its target).
        let create = || {
            File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp_path)
        };
        let tmp = match create() {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                std::fs::remove_file(&tmp_path).map_err(io(&tmp_path))?;
                create()
            }
            r => r,
        }
        .map_err(io(&tmp_path))?;
        Ok(Prepared {
            saved,
            tmp: Some((tmp, tmp_path)),
            path,
            key: cache.key,
        })
    }

    /// After the VM ended: moves a complete new snapshot into place, or removes the
    /// temporary file. Returns whether a snapshot was stored.
    pub fn finish(self) -> bool {
        let Some((file, tmp)) = self.tmp else {
            return false;
        };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let mut head = [0u8; HEADER_LEN];
        let complete = len > 0
            && file.read_exact_at(&mut head, 0).is_ok()
            && Header::parse(&head, len).is_ok_and(|h| h.key == self.key);
        drop(file);
        if complete {
            match std::fs::rename(&tmp, &self.path) {
                Ok(()) => {
                    tracing::info!("snapshot stored: {}", self.path.display());
                    return true;
                }
                Err(e) => tracing::warn!("cannot store the snapshot {}: {e}", self.path.display()),
            }
        }
        let _ = std::fs::remove_file(&tmp);
        false
    }
}

/// The one warning for a snapshot that cannot be restored.
pub fn warn_unusable(path: &Path, e: &SnapshotError) {
    let msg = crate::kvm::causes(e);
    tracing::warn!(
        "snapshot {}: {msg}; booting instead (a new snapshot replaces it)",
        path.display()
    );
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn cache(dir: &Path) -> SnapshotCache {
        SnapshotCache {
            dir: dir.to_owned(),
            key: [7; 32],
        }
    }

    /// A FIFO where the snapshot would be: refused at once (its open used to wait for a
    /// writer for ever), removed, and the run goes on without a snapshot to restore.
    #[test]
    fn a_fifo_in_place_of_the_snapshot_is_not_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let c = cache(dir.path());
        let path = std::ffi::CString::new(c.path().as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
        let p = Prepared::new(&c, 1 << 20).unwrap();
        assert!(p.saved.is_none());
        assert!(
            std::fs::symlink_metadata(c.path()).is_err(),
            "the FIFO stays"
        );
        assert!(!p.finish());
    }

    /// Links planted at the temporary file's name (this process's pid) or at the
    /// snapshot's: neither target is opened for writing, truncated or read.
    #[test]
    fn links_in_the_cache_are_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let cache_dir = dir.path().join("cache");
        std::fs::create_dir(&cache_dir).unwrap();
        let c = cache(&cache_dir);
        let tmp = cache_dir.join(format!(".{}.tmp", std::process::id()));
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        std::os::unix::fs::symlink(&victim, c.path()).unwrap();
        let p = Prepared::new(&c, 1 << 20).unwrap();
        assert!(p.saved.is_none());
        let (file, path) = p.tmp.as_ref().unwrap();
        assert_eq!(path, &tmp);
        assert!(file.metadata().unwrap().is_file());
        assert!(!std::fs::symlink_metadata(&tmp).unwrap().is_symlink());
        assert!(!p.finish());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(
            std::fs::symlink_metadata(c.path()).is_err(),
            "the link stays"
        );
    }
}
