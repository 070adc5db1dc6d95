//! Signed images: an ed25519 signature in minisign's format (so keys made with
//! `minisign -G` work, and `hostd key new` makes the same kind) kept in the image's
//! last section, `signature`.
//!
//! What is signed is a statement of every other section, in table order: its name,
//! length and sha256. Every byte of an image is either in the header (covered by the
//! header digest), padding that must be zero, or in a section whose digest the header
//! records ([`crate::format`]), so the statement binds the whole content. A signed
//! image's content is reproducible; the signature itself is not (minisign's signatures
//! are randomised), so the file's id differs between two signings of the same content.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use crate::format::{digest_hex, sections, Header, Image};
use crate::input;

/// The statement's first line; changes if what is signed ever changes.
const STATEMENT_V1: &str = "hostd image signature v1\n";
/// The largest signature section or key file hostd reads.
const MAX_SIGNATURE: u64 = 4096;

/// Why signing or checking a signature failed.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    /// A key file could not be read or is not a minisign key.
    #[error("{path}: cannot use it as a {what} key")]
    Key {
        /// The key file.
        path: PathBuf,
        /// `secret` or `public`.
        what: &'static str,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The image has no signature but one was required.
    #[error("{image}: the image is not signed, and --trust requires a signature by {keys}")]
    Unsigned {
        /// The image file.
        image: PathBuf,
        /// The trusted keys' ids.
        keys: String,
    },
    /// The image's signature section is malformed.
    #[error("{image}: section `signature` is not a minisign signature")]
    Malformed {
        /// The image file.
        image: PathBuf,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Signed by a key that is not trusted.
    #[error("{image}: signed by key {key_id}, which is not among the trusted keys ({keys})")]
    Untrusted {
        /// The image file.
        image: PathBuf,
        /// The signing key's id.
        key_id: String,
        /// The trusted keys' ids.
        keys: String,
    },
    /// The signature does not verify.
    #[error("{image}: the signature by key {key_id} does not match the image's content")]
    Invalid {
        /// The image file.
        image: PathBuf,
        /// The signing key's id.
        key_id: String,
    },
    /// Making a signature failed.
    #[error("cannot sign the image")]
    Sign(#[source] minisign::PError),
    /// Writing a key failed.
    #[error("{path}: cannot write the key")]
    Write {
        /// The key file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn boxed(
    e: impl std::error::Error + Send + Sync + 'static,
) -> Box<dyn std::error::Error + Send + Sync> {
    Box::new(e)
}

/// A secret key to sign with (its bytes are never printed).
pub struct SigningKey {
    secret: minisign::SecretKey,
    public: minisign::PublicKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({})", key_id(&self.public))
    }
}

/// A public key that images may be signed by.
#[derive(Debug)]
pub struct TrustedKey {
    /// Where it was read from.
    pub path: PathBuf,
    key: minisign::PublicKey,
}

/// What a signature says about who signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signer {
    /// The signing key's id (16 hex digits, as minisign prints it).
    pub key_id: String,
    /// The signed ("trusted") comment: the image name and key id at signing time.
    pub comment: String,
}

/// A key's id as minisign prints it.
fn key_id(pk: &minisign::PublicKey) -> String {
    keynum_hex(pk.keynum())
}

fn keynum_hex(k: &[u8]) -> String {
    k.iter().rev().map(|b| format!("{b:02X}")).collect()
}

fn read_key_text(path: &Path, what: &'static str) -> Result<String, SignatureError> {
    let key_err = |source| SignatureError::Key {
        path: path.to_path_buf(),
        what,
        source,
    };
    let bytes = input::read_regular(path, MAX_SIGNATURE).map_err(|e| key_err(boxed(e)))?;
    String::from_utf8(bytes).map_err(|e| key_err(boxed(e)))
}

impl SigningKey {
    /// Reads a minisign secret key file. An encrypted key asks for its password on
    /// the terminal.
    pub fn load(path: &Path) -> Result<SigningKey, SignatureError> {
        let key_err = |source| SignatureError::Key {
            path: path.to_path_buf(),
            what: "secret",
            source,
        };
        let text = read_key_text(path, "secret")?;
        let key_box = minisign::SecretKeyBox::from_string(&text).map_err(|e| key_err(boxed(e)))?;
        // An unencrypted key (as `hostd key new` makes) loads as it is; anything else is
        // taken for an encrypted one, whose password minisign asks for on the terminal.
        let secret = key_box
            .clone()
            .into_unencrypted_secret_key()
            .or_else(|_| key_box.into_secret_key(None))
            .map_err(|e| key_err(boxed(e)))?;
        let public =
            minisign::PublicKey::from_secret_key(&secret).map_err(|e| key_err(boxed(e)))?;
        Ok(SigningKey { secret, public })
    }

    /// Makes a new unencrypted key pair and writes `PREFIX.key` (0600) and
    /// `PREFIX.pub`; refuses to replace existing files.
    pub fn generate(prefix: &Path) -> Result<(PathBuf, PathBuf, String), SignatureError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let kp = minisign::KeyPair::generate_unencrypted_keypair().map_err(SignatureError::Sign)?;
        let id = key_id(&kp.pk);
        // PREFIX.key and PREFIX.pub, the prefix kept whole (`release.v2` gives
        // `release.v2.key`, not `release.key`); a prefix given as one of the two names
        // stands for its stem.
        let stem = prefix
            .to_str()
            .and_then(|p| p.strip_suffix(".key").or_else(|| p.strip_suffix(".pub")))
            .map(PathBuf::from)
            .unwrap_or_else(|| prefix.to_path_buf());
        let with = |ext: &str| {
            let mut p = stem.clone().into_os_string();
            p.push(ext);
            PathBuf::from(p)
        };
        let (secret_path, public_path) = (with(".key"), with(".pub"));
        // Neither may exist: a new secret key beside an old public key is a pair that
        // does not match.
        for p in [&secret_path, &public_path] {
            if std::fs::symlink_metadata(p).is_ok() {
                return Err(SignatureError::Write {
                    path: p.clone(),
                    source: std::io::Error::from(std::io::ErrorKind::AlreadyExists),
                });
            }
        }
        let write = |path: &Path, mode: u32, text: String| {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(path)
                .and_then(|mut f| f.write_all(text.as_bytes()))
                .map_err(|source| SignatureError::Write {
                    path: path.to_path_buf(),
                    source,
                })
        };
        let sk_box = kp
            .sk
            .to_box(Some(&format!("hostd secret key {id}")))
            .map_err(SignatureError::Sign)?;
        let pk_box = kp.pk.to_box().map_err(SignatureError::Sign)?;
        write(&secret_path, 0o600, sk_box.into_string())?;
        if let Err(e) = write(&public_path, 0o644, pk_box.into_string()) {
            let _ = std::fs::remove_file(&secret_path);
            return Err(e);
        }
        Ok((secret_path, public_path, id))
    }

    /// The key's id.
    pub fn id(&self) -> String {
        key_id(&self.public)
    }

    /// Signs the statement of an (unsigned) image's header: the text of the
    /// `signature` section.
    pub fn sign(&self, header: &Header, image_name: &str) -> Result<Vec<u8>, SignatureError> {
        let comment = format!("hostd image {image_name}, key {}", self.id());
        let sig = minisign::sign(
            Some(&self.public),
            &self.secret,
            Cursor::new(statement(header)),
            Some(&comment),
            Some("hostd image signature"),
        )
        .map_err(SignatureError::Sign)?;
        Ok(sig.into_string().into_bytes())
    }
}

impl TrustedKey {
    /// Reads a minisign public key file.
    pub fn load(path: &Path) -> Result<TrustedKey, SignatureError> {
        let text = read_key_text(path, "public")?;
        let key = minisign::PublicKeyBox::from_string(&text)
            .and_then(|b| b.into_public_key())
            .map_err(|e| SignatureError::Key {
                path: path.to_path_buf(),
                what: "public",
                source: boxed(e),
            })?;
        Ok(TrustedKey {
            path: path.to_path_buf(),
            key,
        })
    }

    /// The key's id.
    pub fn id(&self) -> String {
        key_id(&self.key)
    }
}

/// What is signed: every section but `signature`, by name, length and sha256.
pub fn statement(header: &Header) -> Vec<u8> {
    let mut s = String::from(STATEMENT_V1);
    for sec in header
        .sections
        .iter()
        .filter(|s| s.name != sections::SIGNATURE)
    {
        s.push_str(&format!(
            "{} {} {}\n",
            sec.name,
            sec.length,
            digest_hex(&sec.sha256)
        ));
    }
    s.into_bytes()
}

fn read_box(image: &Image) -> Result<Option<minisign::SignatureBox>, SignatureError> {
    let malformed = |source| SignatureError::Malformed {
        image: image.path().to_path_buf(),
        source,
    };
    if image.section(sections::SIGNATURE).is_err() {
        return Ok(None);
    }
    let s = image
        .section(sections::SIGNATURE)
        .map_err(|e| malformed(boxed(e)))?;
    if s.length > MAX_SIGNATURE {
        return Err(malformed(boxed(std::io::Error::other(format!(
            "{} bytes; at most {MAX_SIGNATURE}",
            s.length
        )))));
    }
    let bytes = image
        .read_section(sections::SIGNATURE)
        .map_err(|e| malformed(boxed(e)))?;
    let text = String::from_utf8(bytes).map_err(|e| malformed(boxed(e)))?;
    minisign::SignatureBox::from_string(&text)
        .map(Some)
        .map_err(|e| malformed(boxed(e)))
}

/// Who signed `image`, without checking the signature (for `hostd inspect`): `None`
/// when unsigned.
pub fn signer_unverified(image: &Image) -> Result<Option<Signer>, SignatureError> {
    Ok(read_box(image)?.map(|b| Signer {
        key_id: keynum_hex(b.keynum()),
        comment: b.trusted_comment().unwrap_or_default(),
    }))
}

/// Checks that `image` is signed by one of `trusted` and that the signature covers its
/// content. `image` must have been opened with [`Image::open`] (every digest checked).
pub fn verify(image: &Image, trusted: &[TrustedKey]) -> Result<Signer, SignatureError> {
    let keys = trusted
        .iter()
        .map(|k| k.id())
        .collect::<Vec<_>>()
        .join(", ");
    let path = image.path().to_path_buf();
    let sig = read_box(image)?.ok_or_else(|| SignatureError::Unsigned {
        image: path.clone(),
        keys: keys.clone(),
    })?;
    let key_id = keynum_hex(sig.keynum());
    let key =
        trusted
            .iter()
            .find(|k| k.id() == key_id)
            .ok_or_else(|| SignatureError::Untrusted {
                image: path.clone(),
                key_id: key_id.clone(),
                keys,
            })?;
    minisign::verify(
        &key.key,
        &sig,
        Cursor::new(statement(&image.header)),
        true,
        false,
        false,
    )
    .map_err(|_| SignatureError::Invalid {
        image: path,
        key_id: key_id.clone(),
    })?;
    Ok(Signer {
        key_id,
        comment: sig.trusted_comment().unwrap_or_default(),
    })
}
