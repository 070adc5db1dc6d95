//! Landlock: a ruleset that handles every file system access right and allows none.

use landlock::{Access, AccessFs, Ruleset, RulesetAttr, RulesetStatus, ABI};

/// Denies every file system access from now on (best effort: kernels without Landlock
/// leave it to the empty root and seccomp, and we say so).
pub fn deny_all_filesystem_access() {
    let abi = ABI::V2;
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .and_then(|r| r.create())
        .and_then(|r| r.restrict_self());
    match status {
        Ok(s) if s.ruleset == RulesetStatus::FullyEnforced => tracing::debug!("landlock: enforced"),
        Ok(s) => tracing::debug!(
            "landlock: {:?} (kernel without full Landlock support)",
            s.ruleset
        ),
        Err(e) => tracing::debug!("landlock: not available: {e}"),
    }
}

/// A Landlock ruleset built ahead of time (opening the paths it names), to be applied
/// later — for instance between fork and exec, where nothing may be opened.
#[derive(Debug)]
pub struct Prepared(landlock::RulesetCreated);

/// A ruleset that handles every file system access right and allows only: reading
/// (and executing) beneath each of `read`, reading and writing beneath each of
/// `read_write`. Paths that do not exist are left out.
pub fn prepare(
    read: &[&std::path::Path],
    read_write: &[&std::path::Path],
) -> Result<Prepared, super::JailError> {
    use landlock::{PathBeneath, PathFd, RulesetCreatedAttr};
    let abi = ABI::V2;
    let err = |e: &dyn std::fmt::Display| super::JailError(format!("landlock: {e}"));
    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .and_then(|r| r.create())
        .map_err(|e| err(&e))?;
    for (paths, access) in [
        (read, AccessFs::from_read(abi)),
        (read_write, AccessFs::from_all(abi)),
    ] {
        for p in paths.iter().filter(|p| p.exists()) {
            let fd = PathFd::new(p).map_err(|e| err(&e))?;
            ruleset = ruleset
                .add_rule(PathBeneath::new(fd, access))
                .map_err(|e| err(&e))?;
        }
    }
    Ok(Prepared(ruleset))
}

/// Applies a prepared ruleset to the calling thread (and what it executes). Only
/// system calls, no allocation: fit for between fork and exec.
pub fn apply(prepared: Prepared) -> Result<(), super::JailError> {
    prepared
        .0
        .restrict_self()
        .map(|_| ())
        .map_err(|e| super::JailError(format!("landlock: {e}")))
}
