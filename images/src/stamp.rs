//! What identifies one version of a file without reading it: device, inode, size and
//! the modification and status-change times. Any write to the file, a truncation or a
//! replacement by another file changes it (the kernel sets the status-change time on
//! every change; no system call sets it back). Used to verify an image once and, while
//! its stamp holds, not hash the same bytes again: within a run (open, then load) and
//! across runs (a cache of verified images, [`VerifiedCache`]).
//!
//! File times have the resolution of the kernel's coarse clock (a few milliseconds on
//! many kernels), so a second write within that tick of the first can leave them
//! unchanged ("racy git"). A stamp is therefore only *settled*, and only used, when the
//! file's last change lies at least [`SETTLE`] in the past; a file changed more recently
//! is hashed every time.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

/// One version of a file, as `fstat` describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// How long ago a file must have last changed for its stamp to be trusted.
pub const SETTLE: Duration = Duration::from_secs(1);

impl FileStamp {
    /// The stamp of an open file.
    pub fn of(file: &File) -> io::Result<FileStamp> {
        let m = file.metadata()?;
        Ok(FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }

    /// The stamp of an open file whose last change is at least [`SETTLE`] old, else
    /// None (it may still be changing within one tick of the file clock).
    pub fn settled(file: &File) -> io::Result<Option<FileStamp>> {
        let stamp = FileStamp::of(file)?;
        let changed = UNIX_EPOCH
            + Duration::new(
                u64::try_from(stamp.ctime.0).unwrap_or(0),
                u32::try_from(stamp.ctime.1).unwrap_or(0),
            );
        let age = SystemTime::now()
            .duration_since(changed)
            .unwrap_or(Duration::ZERO);
        Ok((age >= SETTLE).then_some(stamp))
    }

    /// Whether `file` is still this version.
    pub fn holds_for(&self, file: &File) -> bool {
        FileStamp::of(file).is_ok_and(|s| s == *self)
    }

    fn key(&self) -> String {
        let text = format!(
            "{}:{}:{}:{}.{}:{}.{}",
            self.dev, self.ino, self.size, self.mtime.0, self.mtime.1, self.ctime.0, self.ctime.1
        );
        hex(&Sha256::digest(text.as_bytes()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Images verified in full earlier (every section's digest and the whole file's), by
/// stamp: an entry holds the image id and the header digest of the version it was made
/// for. Only root keeps one (in a root-only directory); an entry is only ever a reason
/// to skip the up-front full pass, never to trust bytes: what a guest consumes is still
/// checked as it is read (the kernel and initrd against the stamp or their digests, the
/// root file system block by block).
#[derive(Debug, Clone)]
pub struct VerifiedCache {
    dir: PathBuf,
}

impl VerifiedCache {
    /// A cache in `dir` (created, mode 0700, when first written).
    pub fn new(dir: &Path) -> VerifiedCache {
        VerifiedCache {
            dir: dir.to_path_buf(),
        }
    }

    /// The cache `hostd run` uses: /run/hostd/verified (cleared at every boot) when
    /// running as root, else none.
    pub fn for_this_user() -> Option<VerifiedCache> {
        // SAFETY: geteuid has no preconditions.
        (unsafe { libc::geteuid() } == 0)
            .then(|| VerifiedCache::new(Path::new("/run/hostd/verified")))
    }

    /// The image id and header digest recorded for this version of a file, if any.
    pub fn lookup(&self, stamp: &FileStamp) -> Option<(String, [u8; 32])> {
        let text = std::fs::read_to_string(self.dir.join(stamp.key())).ok()?;
        let mut lines = text.lines();
        let id = lines.next()?.to_string();
        let digest = lines.next()?;
        if id.len() != 64 || digest.len() != 64 || lines.next().is_some() {
            return None;
        }
        let mut header = [0u8; 32];
        for (i, b) in header.iter_mut().enumerate() {
            *b = u8::from_str_radix(digest.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some((id, header))
    }

    /// Records that this version of a file was verified in full. Failures are only
    /// logged: the cache is an optimisation.
    pub fn record(&self, stamp: &FileStamp, id: &str, header_digest: &[u8; 32]) {
        use std::os::unix::fs::DirBuilderExt;
        let made = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir);
        let entry = format!("{id}\n{}\n", hex(header_digest));
        if let Err(e) = made.and_then(|()| {
            crate::format::write_atomically(&self.dir.join(stamp.key()), entry.as_bytes())
        }) {
            tracing::debug!(
                "cannot record a verified image in {}: {e}",
                self.dir.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_write_changes_the_stamp_and_entries_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        std::fs::write(&path, b"one").expect("write");
        let f = File::open(&path).expect("open");
        // Just written: not settled yet.
        assert_eq!(FileStamp::settled(&f).expect("stat"), None);
        std::thread::sleep(SETTLE + Duration::from_millis(100));
        let stamp = FileStamp::settled(&f).expect("stat").expect("settled");
        assert!(stamp.holds_for(&f));
        let cache = VerifiedCache::new(&dir.path().join("cache"));
        assert!(cache.lookup(&stamp).is_none());
        let id = "ab".repeat(32);
        cache.record(&stamp, &id, &[7u8; 32]);
        assert_eq!(cache.lookup(&stamp), Some((id, [7u8; 32])));
        // Same size, same content length: still a new version.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|mut w| w.write_all(b"two"))
            .expect("rewrite");
        assert!(!stamp.holds_for(&f));
        let again = FileStamp::of(&f).expect("stamp");
        assert!(cache.lookup(&again).is_none());
    }
}
