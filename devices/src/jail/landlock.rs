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
