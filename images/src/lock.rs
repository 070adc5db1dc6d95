//! The lock file (`app.lock` next to `app.toml`): the exact package closure a spec
//! resolved to, so later builds (on another machine, another day) unpack the same
//! bytes. Written by the first build of a spec with packages, rewritten by
//! `hostd build --update-lock`; otherwise read and followed exactly. TOML, entries
//! sorted by name.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

use crate::names;

/// The lock file format version.
pub const LOCK_VERSION: u32 = 1;

/// Why a lock file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Reading or writing failed.
    #[error("{path}")]
    Io {
        /// The lock file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Not a lock file hostd can read.
    #[error("{path}: {message} (delete it or run `hostd build --update-lock` to make a new one)")]
    Invalid {
        /// The lock file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The spec asks for other packages than the lock was made for.
    #[error(
        "{path} was made for packages {locked:?} excluding {locked_exclude:?}, but the spec now \
         asks for {wanted:?} excluding {wanted_exclude:?}; run `hostd build --update-lock` to \
         resolve again"
    )]
    Stale {
        /// The lock file.
        path: PathBuf,
        /// `packages` when the lock was made.
        locked: Vec<String>,
        /// `exclude` when the lock was made.
        locked_exclude: Vec<String>,
        /// `packages` now.
        wanted: Vec<String>,
        /// `exclude` now.
        wanted_exclude: Vec<String>,
    },
}

/// A lock file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lock {
    /// [`LOCK_VERSION`].
    pub version: u32,
    /// The spec's `packages` this was resolved from.
    pub packages: Vec<String>,
    /// The spec's `exclude`.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// The closure, sorted by name.
    #[serde(rename = "package", default)]
    pub locked: Vec<LockedPackage>,
}

/// One pinned package.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockedPackage {
    /// Name.
    pub name: String,
    /// Exact version.
    pub version: String,
    /// `amd64` or `all`.
    pub architecture: String,
    /// sha256 of the .deb, lower-case hex.
    pub sha256: String,
    /// Size of the .deb in bytes.
    pub size: u64,
}

/// The lock file of a spec: the spec's path with the extension `lock`.
pub fn path_for(spec: &Path) -> PathBuf {
    spec.with_extension("lock")
}

impl Lock {
    /// Reads a lock file; `None` when there is none.
    pub fn load(path: &Path) -> Result<Option<Lock>, LockError> {
        let bytes = match crate::input::read_regular(path, crate::input::MAX_SPEC) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(LockError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let invalid = |message: String| LockError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let text = String::from_utf8(bytes).map_err(|_| invalid("not UTF-8 text".into()))?;
        let lock: Lock = toml::from_str(&text).map_err(|e| invalid(e.message().to_string()))?;
        if lock.version != LOCK_VERSION {
            return Err(invalid(format!(
                "lock format version {} (this hostd reads {LOCK_VERSION})",
                lock.version
            )));
        }
        let mut previous: Option<&str> = None;
        for (i, p) in lock.locked.iter().enumerate() {
            let ok = names::is_debian_package(&p.name)
                && names::is_debian_version(&p.version)
                && (p.architecture == crate::packages::index::ARCH || p.architecture == "all")
                && p.sha256.len() == 64
                && p.sha256
                    .bytes()
                    .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c));
            if !ok {
                return Err(invalid(format!(
                    "package[{i}] is not a package name, version, architecture and sha256"
                )));
            }
            if previous.is_some_and(|prev| prev >= p.name.as_str()) {
                return Err(invalid(format!(
                    "package[{i}] `{}` is out of order or twice",
                    p.name
                )));
            }
            previous = Some(&p.name);
        }
        Ok(Some(lock))
    }

    /// Checks that this lock was made for `packages` and `exclude`.
    pub fn check_matches(
        &self,
        path: &Path,
        packages: &[String],
        exclude: &[String],
    ) -> Result<(), LockError> {
        if self.packages != packages || self.exclude != exclude {
            return Err(LockError::Stale {
                path: path.to_path_buf(),
                locked: self.packages.clone(),
                locked_exclude: self.exclude.clone(),
                wanted: packages.to_vec(),
                wanted_exclude: exclude.to_vec(),
            });
        }
        Ok(())
    }

    /// The file's text: a comment, then TOML.
    pub fn to_text(&self) -> String {
        let body = toml::to_string(self).unwrap_or_default();
        format!(
            "# Written by `hostd build`: the exact packages this spec's image is built from.\n\
             # Keep it next to the spec (and in version control); `hostd build --update-lock`\n\
             # resolves the packages again.\n\n{body}"
        )
    }

    /// Writes the lock file atomically.
    pub fn save(&self, path: &Path) -> Result<(), LockError> {
        use std::os::unix::fs::PermissionsExt;
        let io = |source| LockError::Io {
            path: path.to_path_buf(),
            source,
        };
        crate::format::write_atomically(path, self.to_text().as_bytes()).map_err(io)?;
        // A file to commit next to the spec: readable like the spec.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_checks() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = path_for(&dir.path().join("app.toml"));
        assert!(path.ends_with("app.lock"));
        assert!(matches!(Lock::load(&path), Ok(None)));
        let lock = Lock {
            version: LOCK_VERSION,
            packages: vec!["python3".into()],
            exclude: vec![],
            locked: vec![
                LockedPackage {
                    name: "libc6".into(),
                    version: "2.36-9+deb12u9".into(),
                    architecture: "amd64".into(),
                    sha256: "ab".repeat(32),
                    size: 10,
                },
                LockedPackage {
                    name: "python3".into(),
                    version: "3.11.2-1+b1".into(),
                    architecture: "amd64".into(),
                    sha256: "cd".repeat(32),
                    size: 20,
                },
            ],
        };
        lock.save(&path).unwrap_or_else(|e| panic!("{e}"));
        let back = Lock::load(&path)
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("no lock"));
        assert_eq!(back, lock);
        assert!(back.check_matches(&path, &["python3".into()], &[]).is_ok());
        let e = back
            .check_matches(&path, &["python3".into(), "curl".into()], &[])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("--update-lock"), "{e}");
        let bad = lock.to_text().replace("libc6", "--evil");
        std::fs::write(&path, bad).unwrap_or_else(|e| panic!("{e}"));
        assert!(Lock::load(&path).is_err());
        let unsorted = lock
            .to_text()
            .replace("\"python3\"\nversion = \"3", "\"aa\"\nversion = \"3");
        std::fs::write(&path, unsorted).unwrap_or_else(|e| panic!("{e}"));
        let e = Lock::load(&path)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("out of order"), "{e}");
    }
}
