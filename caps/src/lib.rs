//! hostd's capabilities on the wire.
//!
//! A capability is what a caller needs to reach one service: the service's
//! Noise static public key, a pre-shared key (psk) of its own, and a hint where
//! the service listens. Whoever holds it may call the service; nobody else can
//! complete a handshake. See `docs/capabilities.md` ("Capabilities on the wire").
//!
//! - [`capability`]: the printable `hostd-cap:` value (versioned, checksummed;
//!   its `Display` never shows the keys).
//! - [`store`]: the host's cap store: service key pairs (0600 files), the
//!   capabilities minted for each service (revocable one by one), and the
//!   capabilities this host holds by name for its functions.
//! - [`session`]: the handshake (`Noise_NKpsk2_25519_ChaChaPoly_BLAKE2s`),
//!   with the steps as plain functions over byte buffers.
//! - [`frame`]: length-prefixed frames, bounded.
//! - [`stream`]: an established session as a plaintext byte stream (what HTTP
//!   runs on), and the async initiator/responder over any socket.

pub mod capability;
pub mod frame;
pub mod session;
pub mod store;
pub mod stream;

pub use capability::Capability;
pub use store::CapStore;

/// Errors of the capability layer. Each says what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A `hostd-cap:` value could not be read.
    #[error("not a valid capability: {0}")]
    Format(&'static str),
    /// A service or capability name is not acceptable.
    #[error("name {name:?}: {why}")]
    Name {
        /// The name given.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The cap store could not be read or written.
    #[error("cap store {}: {what}", path.display())]
    Store {
        /// The file or directory.
        path: std::path::PathBuf,
        /// What was being done.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A cap store file holds something hostd did not write.
    #[error("cap store {}: {why}", path.display())]
    StoreContent {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Nothing in the store has this name or id.
    #[error("{0}")]
    NotFound(String),
    /// The Noise protocol failed (a wrong key or psk, a changed or replayed message).
    #[error("noise {step}")]
    Noise {
        /// Which step failed.
        step: &'static str,
        /// snow's error.
        #[source]
        source: snow::Error,
    },
    /// The peer broke the protocol (a bad frame, an unknown capability).
    #[error("protocol: {0}")]
    Protocol(&'static str),
    /// Reading or writing the connection failed.
    #[error("connection: {what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The handshake took longer than allowed.
    #[error("handshake not finished within {0:?}")]
    Timeout(std::time::Duration),
    /// The system random number generator failed.
    #[error("random number generator")]
    Random(#[source] getrandom::Error),
}

/// The default state directory: `$XDG_STATE_HOME/hostd/fn` or `~/.local/state/hostd/fn`.
pub fn default_state_dir() -> Option<std::path::PathBuf> {
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|x| !x.is_empty()) {
        return Some(std::path::PathBuf::from(x).join("hostd/fn"));
    }
    std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".local/state/hostd/fn"))
}
