//! The host's cap store, a directory (by default `STATE_DIR/caps`, mode 0700):
//!
//! ```text
//! services/NAME.key     the service's X25519 key pair (JSON, hex), mode 0600
//! services/NAME.caps    the capabilities minted for it: id, psk, location, revoked
//! held/NAME.cap         a capability this host holds, granted to functions by NAME
//! ```
//!
//! Every file is written to a temporary name (0600) and renamed into place, so
//! a reader never sees half of one. The responder reads `NAME.caps` on every
//! handshake: a revocation takes effect at the next connection, without a restart.
//! Private keys and psks never leave these files except into a handshake (and,
//! for a minted capability, once onto the minting command's standard output).

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::capability::{check_name, id_of, Capability, KEY_LEN};
use crate::session::{generate_keypair, Keys};
use crate::Error;

/// A key pair: (private, public).
pub type KeyPair = ([u8; KEY_LEN], [u8; KEY_LEN]);

/// Largest store file hostd reads.
const MAX_FILE: u64 = 1 << 20;

/// A cap store directory.
#[derive(Debug, Clone)]
pub struct CapStore {
    dir: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct KeyFile {
    private: String,
    public: String,
}

/// One capability minted for a service, as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Minted {
    /// Its id (safe to show).
    pub id: String,
    /// Its psk (hex). Secret.
    psk: String,
    /// The location written into it.
    pub location: String,
    /// Whether it was revoked.
    pub revoked: bool,
}

/// A service and the capabilities minted for it (psks left out).
#[derive(Debug, Clone)]
pub struct ServiceEntry {
    /// The service's name.
    pub service: String,
    /// Its static public key (hex).
    pub public_key: String,
    /// Its capabilities.
    pub caps: Vec<Minted>,
}

fn key32(hex_text: &str) -> Option<[u8; KEY_LEN]> {
    let raw = hex::decode(hex_text).ok()?;
    raw.try_into().ok()
}

impl CapStore {
    /// The store in `dir` (created, mode 0700, when first written).
    pub fn new(dir: impl Into<PathBuf>) -> CapStore {
        CapStore { dir: dir.into() }
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn services(&self) -> PathBuf {
        self.dir.join("services")
    }

    fn held_dir(&self) -> PathBuf {
        self.dir.join("held")
    }

    fn ensure_dir(&self, dir: &Path) -> Result<(), Error> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| Error::Store {
                path: dir.to_owned(),
                what: "creating the directory",
                source,
            })
    }

    fn read(&self, path: &Path) -> Result<Option<Vec<u8>>, Error> {
        let io = |what, source| Error::Store {
            path: path.to_owned(),
            what,
            source,
        };
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("reading", e)),
        };
        if !meta.is_file() || meta.len() > MAX_FILE {
            return Err(Error::StoreContent {
                path: path.to_owned(),
                why: "not a regular file of at most 1 MiB".into(),
            });
        }
        std::fs::read(path).map(Some).map_err(|e| io("reading", e))
    }

    /// Writes `bytes` to `path` atomically, mode 0600.
    fn write(&self, path: &Path, bytes: &[u8]) -> Result<(), Error> {
        let dir = path.parent().unwrap_or(&self.dir).to_owned();
        self.ensure_dir(&dir)?;
        let io = |what, source| Error::Store {
            path: path.to_owned(),
            what,
            source,
        };
        let mut tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .permissions(std::fs::Permissions::from_mode(0o600))
            .tempfile_in(&dir)
            .map_err(|e| io("creating a temporary file", e))?;
        tmp.write_all(bytes).map_err(|e| io("writing", e))?;
        tmp.as_file().sync_all().map_err(|e| io("syncing", e))?;
        tmp.persist(path)
            .map_err(|e| io("renaming into place", e.error))?;
        Ok(())
    }

    fn parse_json<T: for<'de> Deserialize<'de>>(path: &Path, bytes: &[u8]) -> Result<T, Error> {
        serde_json::from_slice(bytes).map_err(|e| Error::StoreContent {
            path: path.to_owned(),
            why: e.to_string(),
        })
    }

    /// The key pair of `service` (private, public), made when it has none yet.
    pub fn service_keypair(&self, service: &str) -> Result<KeyPair, Error> {
        check_name(service)?;
        let path = self.services().join(format!("{service}.key"));
        if let Some(pair) = self.load_keypair(&path)? {
            return Ok(pair);
        }
        self.ensure_dir(&self.services())?;
        let (private, public) = generate_keypair()?;
        let text = serde_json::to_vec(&KeyFile {
            private: hex::encode(private),
            public: hex::encode(public),
        })
        .map_err(|e| Error::StoreContent {
            path: path.clone(),
            why: e.to_string(),
        })?;
        // Created exclusively: two processes making the key at once keep one.
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(mut f) => {
                f.write_all(&text)
                    .and_then(|()| f.sync_all())
                    .map_err(|source| Error::Store {
                        path: path.clone(),
                        what: "writing the service key",
                        source,
                    })?;
                tracing::info!(service, key = %path.display(), "created the service's static key");
                Ok((private, public))
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => self
                .load_keypair(&path)?
                .ok_or_else(|| Error::NotFound(format!("{} vanished", path.display()))),
            Err(source) => Err(Error::Store {
                path,
                what: "creating the service key",
                source,
            }),
        }
    }

    fn load_keypair(&self, path: &Path) -> Result<Option<KeyPair>, Error> {
        let Some(bytes) = self.read(path)? else {
            return Ok(None);
        };
        let kf: KeyFile = Self::parse_json(path, &bytes)?;
        match (key32(&kf.private), key32(&kf.public)) {
            (Some(private), Some(public)) => Ok(Some((private, public))),
            _ => Err(Error::StoreContent {
                path: path.to_owned(),
                why: "keys are not 64 hex digits".into(),
            }),
        }
    }

    fn caps_path(&self, service: &str) -> PathBuf {
        self.services().join(format!("{service}.caps"))
    }

    fn load_minted(&self, service: &str) -> Result<Vec<Minted>, Error> {
        let path = self.caps_path(service);
        match self.read(&path)? {
            Some(bytes) => Self::parse_json(&path, &bytes),
            None => Ok(Vec::new()),
        }
    }

    fn save_minted(&self, service: &str, caps: &[Minted]) -> Result<(), Error> {
        let path = self.caps_path(service);
        let bytes = serde_json::to_vec_pretty(caps).map_err(|e| Error::StoreContent {
            path: path.clone(),
            why: e.to_string(),
        })?;
        self.write(&path, &bytes)
    }

    /// Mints a new capability for `service` (making its key pair if needed).
    pub fn mint(&self, service: &str, location: &str) -> Result<Capability, Error> {
        let (_, public) = self.service_keypair(service)?;
        let cap = Capability::mint(service, location, public)?;
        let mut caps = self.load_minted(service)?;
        caps.push(Minted {
            id: cap.id(),
            psk: hex::encode(cap.psk),
            location: location.to_owned(),
            revoked: false,
        });
        self.save_minted(service, &caps)?;
        tracing::info!(service, id = %cap.id(), "minted a capability");
        Ok(cap)
    }

    /// Every service with a key here, and its capabilities.
    pub fn list(&self) -> Result<Vec<ServiceEntry>, Error> {
        let names = names_in(&self.services(), ".key")?;
        let mut out = Vec::new();
        for service in names {
            let (_, public) = self.service_keypair(&service)?;
            out.push(ServiceEntry {
                public_key: hex::encode(public),
                caps: self.load_minted(&service)?,
                service,
            });
        }
        Ok(out)
    }

    /// Revokes the capability with this id (or a unique prefix of it, at least
    /// 6 digits); returns its service and full id.
    pub fn revoke(&self, id: &str) -> Result<(String, String), Error> {
        if id.len() < 6 {
            return Err(Error::NotFound(format!(
                "capability id {id:?} is too short: give at least 6 of its digits (hostd cap ls)"
            )));
        }
        let mut found = Vec::new();
        for s in self.list()? {
            for c in &s.caps {
                if c.id.starts_with(id) {
                    found.push((s.service.clone(), c.id.clone()));
                }
            }
        }
        match found.as_slice() {
            [(service, full)] => {
                let mut caps = self.load_minted(service)?;
                for c in caps.iter_mut().filter(|c| &c.id == full) {
                    c.revoked = true;
                }
                self.save_minted(service, &caps)?;
                tracing::info!(service = %service, id = %full, "revoked a capability");
                Ok((service.clone(), full.clone()))
            }
            [] => Err(Error::NotFound(format!(
                "no capability with id {id} in {} (hostd cap ls lists them)",
                self.dir.display()
            ))),
            _ => Err(Error::NotFound(format!(
                "id {id} matches {} capabilities: give more digits",
                found.len()
            ))),
        }
    }

    /// Keeps `cap` under `name`, for functions granted `name`.
    pub fn hold(&self, name: &str, cap: &Capability) -> Result<(), Error> {
        check_name(name)?;
        let path = self.held_dir().join(format!("{name}.cap"));
        self.write(&path, format!("{}\n", cap.reveal()).as_bytes())
    }

    /// The capability held under `name`, if any.
    pub fn held(&self, name: &str) -> Result<Option<Capability>, Error> {
        check_name(name)?;
        let path = self.held_dir().join(format!("{name}.cap"));
        let Some(bytes) = self.read(&path)? else {
            return Ok(None);
        };
        let text = String::from_utf8_lossy(&bytes);
        Capability::parse(&text)
            .map(Some)
            .map_err(|e| Error::StoreContent {
                path,
                why: e.to_string(),
            })
    }

    /// Names of the capabilities held, sorted.
    pub fn list_held(&self) -> Result<Vec<(String, Capability)>, Error> {
        let names = names_in(&self.held_dir(), ".cap")?;
        let mut out = Vec::new();
        for n in names {
            if let Some(c) = self.held(&n)? {
                out.push((n, c));
            }
        }
        Ok(out)
    }
}

/// The valid names of the files in `dir` ending in `suffix` (without it), sorted;
/// none when `dir` does not exist yet.
fn names_in(dir: &Path, suffix: &str) -> Result<Vec<String>, Error> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(Error::Store {
                path: dir.to_path_buf(),
                what: "listing",
                source,
            })
        }
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(suffix))
                .map(str::to_owned)
        })
        .filter(|n| check_name(n).is_ok())
        .collect();
    names.sort();
    Ok(names)
}

impl Keys for CapStore {
    fn service_key(&self, service: &str) -> Option<[u8; KEY_LEN]> {
        let path = self.services().join(format!("{service}.key"));
        match self.load_keypair(&path) {
            Ok(pair) => pair.map(|(private, _)| private),
            Err(e) => {
                tracing::warn!(service, "cap store: {e}");
                None
            }
        }
    }

    fn psk(&self, service: &str, id: &[u8; 8]) -> Option<[u8; KEY_LEN]> {
        let want = hex::encode(id);
        let caps = match self.load_minted(service) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(service, "cap store: {e}");
                return None;
            }
        };
        let c = caps.iter().find(|c| c.id == want && !c.revoked)?;
        let psk = key32(&c.psk)?;
        // The id is a hash of the psk: a record whose psk does not match its id is refused.
        (id_of(&psk) == want).then_some(psk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capability::wire_id;

    #[test]
    fn mint_list_revoke_one_of_two() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = CapStore::new(dir.path().join("caps"));
        let a = store.mint("svc", "127.0.0.1:7000").expect("mint a");
        let b = store.mint("svc", "127.0.0.1:7000").expect("mint b");
        assert_eq!(a.public_key, b.public_key, "one key per service");
        assert!(store.psk("svc", &wire_id(&a.psk)).is_some());
        store.revoke(&a.id()).expect("revoke");
        assert!(store.psk("svc", &wire_id(&a.psk)).is_none());
        assert_eq!(store.psk("svc", &wire_id(&b.psk)), Some(b.psk));
        let listed = store.list().expect("list");
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].caps.iter().filter(|c| c.revoked).count(), 1);
        let key = dir.path().join("caps/services/svc.key");
        let mode = std::fs::metadata(&key).expect("key").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let caps_mode = std::fs::metadata(dir.path().join("caps/services/svc.caps"))
            .expect("caps")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(caps_mode, 0o600);
        assert!(store.revoke("zz").is_err());
    }

    #[test]
    fn holds_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = CapStore::new(dir.path());
        let cap = Capability::mint("svc", "10.0.0.1:1", [3; 32]).expect("mint");
        store.hold("billing", &cap).expect("hold");
        assert_eq!(store.held("billing").expect("read"), Some(cap));
        assert_eq!(store.held("other").expect("read"), None);
        assert!(store
            .hold("../x", &Capability::mint("s", "h:1", [1; 32]).expect("m"))
            .is_err());
    }
}
