//! What can go wrong deploying, rolling back or removing a function.

use std::path::PathBuf;

/// Errors of [`super::FunctionHost`]. Each variant is one kind of failure a
/// caller may answer differently (the daemon maps them to HTTP statuses).
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// The function name is not 1-63 of `a-z 0-9 - _` starting with a letter or digit.
    #[error("function name {name:?} is invalid: use 1-63 of a-z, 0-9, `-`, `_`, starting with a letter or digit")]
    InvalidName {
        /// The name given.
        name: String,
    },
    /// The digest is not 64 lowercase hex digits (optionally after `sha256:`).
    #[error("component digest {digest:?} is invalid: give 64 lowercase hex digits, optionally after `sha256:`")]
    InvalidDigest {
        /// The digest given.
        digest: String,
    },
    /// The routes, grants or health-check path do not validate.
    #[error("function {function}: {msg}")]
    InvalidSpec {
        /// The function.
        function: String,
        /// What is wrong, naming the field.
        msg: String,
    },
    /// Uploaded bytes are not a WebAssembly component (no `\0asm` magic) or too large.
    #[error("the upload is not a WebAssembly component: {msg}")]
    NotAComponent {
        /// What is wrong with it.
        msg: String,
    },
    /// No component with this digest is in the store.
    #[error("no component sha256:{digest} in the store: upload it first")]
    UnknownComponent {
        /// The digest.
        digest: String,
    },
    /// A stored component no longer hashes to its name.
    #[error("stored component {} does not match its sha256 (changed on disk); upload it again", path.display())]
    CorruptComponent {
        /// The file.
        path: PathBuf,
    },
    /// A stored component cannot be read (not a regular file, too large, I/O).
    #[error("reading a stored component")]
    Unreadable {
        /// The cause, naming the file.
        #[source]
        source: crate::Error,
    },
    /// No such function.
    #[error("no function {name:?}")]
    UnknownFunction {
        /// The name.
        name: String,
    },
    /// No such version of the function.
    #[error("function {function} has no version {version}")]
    UnknownVersion {
        /// The function.
        function: String,
        /// The version asked for.
        version: u64,
    },
    /// A route is already served by another function.
    #[error("route {route} is already served by function {other}")]
    RouteConflict {
        /// The route.
        route: String,
        /// The function serving it.
        other: String,
    },
    /// The component does not compile or does not fit `wasi:http/proxy`, or
    /// a grant could not be set up.
    #[error("function {function}: the new version cannot be served")]
    Prepare {
        /// The function.
        function: String,
        /// Why.
        #[source]
        source: crate::Error,
    },
    /// A version deployed with others was ready, but recording them failed: none of
    /// them is live.
    #[error("function {function}: the new version was not made live: {why}")]
    NotMadeLive {
        /// The function.
        function: String,
        /// Why.
        why: String,
    },
    /// The health check of the new version did not answer 2xx; nothing changed.
    #[error("function {function}: health check GET {path} of the new version {outcome}; the live version is unchanged")]
    HealthCheck {
        /// The function.
        function: String,
        /// The path requested.
        path: String,
        /// What happened (`answered 503`, `failed: trapped …`).
        outcome: String,
    },
    /// A file of the store could not be read or written.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The deploy database failed.
    #[error("function database {}", path.display())]
    Database {
        /// The database file.
        path: PathBuf,
        /// The cause (boxed: redb's error is large).
        #[source]
        source: Box<redb::Error>,
    },
    /// A record in the database does not parse (written by another version of hostd?).
    #[error("function database {}: record {key} is unreadable", path.display())]
    Record {
        /// The database file.
        path: PathBuf,
        /// The record's key.
        key: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The engine or runtime could not be set up.
    #[error("setting up the function host")]
    Setup(#[source] crate::Error),
}
