//! Progress of long build steps (downloads, unpacking), reported to whoever drives the
//! build: the CLI draws a bar on a terminal and prints plain lines otherwise.

/// Receives progress. Implementations must not fail: progress is only shown.
pub trait Progress: Sync {
    /// A step begins: `what` (e.g. "downloading"), `total` units (`bytes` says whether
    /// they are bytes or items).
    fn begin(&self, what: &str, total: u64, bytes: bool);
    /// `n` more units done; `item` names the last one.
    fn advance(&self, n: u64, item: &str);
    /// The step is over.
    fn end(&self);
}

/// Shows nothing.
#[derive(Debug, Default)]
pub struct Silent;

impl Progress for Silent {
    fn begin(&self, _: &str, _: u64, _: bool) {}
    fn advance(&self, _: u64, _: &str) {}
    fn end(&self) {}
}

impl std::fmt::Debug for dyn Progress + '_ {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Progress")
    }
}
