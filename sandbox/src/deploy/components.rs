//! The content-addressed component store: `DIR/components/sha256/HEX.wasm`.
//!
//! A component is written under a random temporary name, synced, and renamed
//! to its digest, so a reader never sees half a file; reading it back checks
//! the digest again, so a file changed on disk is refused, never served.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use super::DeployError;
use crate::engine::hex as to_hex;
use crate::input;

/// Largest component the store takes (the same bound `hostd fn serve` reads).
pub const MAX_COMPONENT_BYTES: u64 = input::MAX_COMPONENT_BYTES;

/// Components by sha256.
#[derive(Debug, Clone)]
pub struct ComponentStore {
    dir: PathBuf,
}

/// The 64 hex digits of `digest` (which may start with `sha256:`), if valid.
pub fn parse_digest(digest: &str) -> Result<String, DeployError> {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    if hex.len() == 64
        && hex
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    {
        Ok(hex.to_owned())
    } else {
        Err(DeployError::InvalidDigest {
            digest: digest.chars().take(80).collect(),
        })
    }
}

impl ComponentStore {
    /// The store under `state_dir` (created, mode 0700, if missing).
    pub fn open(state_dir: &Path) -> Result<ComponentStore, DeployError> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = state_dir.join("components/sha256");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| DeployError::Io {
                what: "creating the component store",
                path: dir.clone(),
                source,
            })?;
        Ok(ComponentStore { dir })
    }

    /// Where the component with digest `hex` lives.
    pub fn path(&self, hex: &str) -> PathBuf {
        self.dir.join(format!("{hex}.wasm"))
    }

    /// Stores `bytes` (a component) and returns its sha256 in hex. Storing
    /// the same bytes twice keeps one file.
    pub fn put(&self, bytes: &[u8]) -> Result<String, DeployError> {
        if bytes.len() as u64 > MAX_COMPONENT_BYTES {
            return Err(DeployError::NotAComponent {
                msg: format!(
                    "{} bytes is more than the limit of {MAX_COMPONENT_BYTES} bytes",
                    bytes.len()
                ),
            });
        }
        if !bytes.starts_with(b"\0asm") {
            return Err(DeployError::NotAComponent {
                msg: "it does not start with the WebAssembly magic \\0asm".into(),
            });
        }
        let hex = to_hex(&Sha256::digest(bytes));
        let path = self.path(&hex);
        if self.get(&hex).is_ok() {
            // Stored again: its time in the store without a version starts anew
            // ([`ComponentStore::collect`]).
            let _ = std::fs::File::open(&path).and_then(|f| f.set_modified(SystemTime::now()));
            return Ok(hex);
        }
        let io = |what| {
            let path = path.clone();
            move |source| DeployError::Io { what, path, source }
        };
        let mut tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .suffix(".wasm")
            .tempfile_in(&self.dir)
            .map_err(io("creating a temporary file for"))?;
        tmp.write_all(bytes).map_err(io("writing"))?;
        tmp.as_file().sync_all().map_err(io("syncing"))?;
        tmp.persist(&path)
            .map_err(|e| e.error)
            .map_err(io("renaming into place"))?;
        tracing::info!(component = %hex, bytes = bytes.len(), "component stored");
        Ok(hex)
    }

    /// Removes each component `keep` does not hold that was stored (or stored again)
    /// more than `min_age` ago, and temporary files as old (uploads cut off). What
    /// is younger may be about to be deployed: a component is stored, then deployed
    /// in a second request. Returns how many files went and their bytes.
    pub fn collect(&self, keep: &BTreeSet<String>, min_age: Duration) -> (usize, u64) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return (0, 0);
        };
        let now = SystemTime::now();
        let (mut files, mut bytes) = (0, 0);
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let garbage = name.starts_with(".tmp-")
                || name
                    .strip_suffix(".wasm")
                    .is_some_and(|hex| parse_digest(hex).is_ok() && !keep.contains(hex));
            let Ok(meta) = entry.metadata() else { continue };
            let old = meta
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .is_some_and(|age| age > min_age);
            if garbage && old && meta.is_file() && std::fs::remove_file(entry.path()).is_ok() {
                files += 1;
                bytes += meta.len();
            }
        }
        (files, bytes)
    }

    /// The bytes of component `hex`, checked against their digest.
    pub fn get(&self, hex: &str) -> Result<Vec<u8>, DeployError> {
        let path = self.path(hex);
        if !path.exists() {
            return Err(DeployError::UnknownComponent {
                digest: hex.to_owned(),
            });
        }
        let bytes = input::read_regular("component", &path, MAX_COMPONENT_BYTES)
            .map_err(|source| DeployError::Unreadable { source })?;
        if to_hex(&Sha256::digest(&bytes)) != hex {
            return Err(DeployError::CorruptComponent { path });
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_by_digest_and_refuses_changed_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ComponentStore::open(dir.path()).expect("open");
        let bytes = b"\0asm\x0d\0\x01\0 not really a component".to_vec();
        let hex = store.put(&bytes).expect("put");
        assert_eq!(store.put(&bytes).expect("put again"), hex);
        assert_eq!(store.get(&hex).expect("get"), bytes);
        assert_eq!(parse_digest(&format!("sha256:{hex}")).expect("parse"), hex);
        std::fs::write(store.path(&hex), b"\0asm changed").expect("tamper");
        assert!(matches!(
            store.get(&hex),
            Err(DeployError::CorruptComponent { .. })
        ));
        // A put of the right bytes repairs it.
        assert_eq!(store.put(&bytes).expect("repair"), hex);
        assert_eq!(store.get(&hex).expect("get"), bytes);
        assert!(matches!(
            store.put(b"plain text"),
            Err(DeployError::NotAComponent { .. })
        ));
        assert!(matches!(
            parse_digest("../../etc/passwd"),
            Err(DeployError::InvalidDigest { .. })
        ));
        assert!(matches!(
            store.get(&"0".repeat(64)),
            Err(DeployError::UnknownComponent { .. })
        ));
    }

    #[test]
    fn components_no_version_keeps_go_once_old_enough() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ComponentStore::open(dir.path()).expect("open");
        let kept = store.put(b"\0asm kept").expect("put");
        let dropped = store.put(b"\0asm dropped").expect("put");
        let keep = BTreeSet::from([kept.clone()]);
        // Young: a deploy may be on its way.
        assert_eq!(store.collect(&keep, Duration::from_secs(3600)), (0, 0));
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(store.collect(&keep, Duration::from_millis(10)).0, 1);
        assert!(store.get(&kept).is_ok());
        assert!(matches!(
            store.get(&dropped),
            Err(DeployError::UnknownComponent { .. })
        ));
        // Stored again, it is young again.
        let old = store.path(&kept);
        let f = std::fs::File::open(&old).expect("open");
        f.set_modified(SystemTime::now() - Duration::from_secs(7200))
            .expect("age it");
        store.put(b"\0asm kept").expect("put again");
        assert_eq!(
            store.collect(&BTreeSet::new(), Duration::from_secs(3600)),
            (0, 0)
        );
    }
}
