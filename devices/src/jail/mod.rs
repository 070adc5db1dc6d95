//! Jails: what a VMM thread or a device backend process gives up before it touches
//! anything a guest controls.
//!
//! - [`seccomp`]: syscall filters (one per thread kind or device, defined next to the
//!   code whose syscalls they list).
//! - [`caps`]: no capabilities, no_new_privs.
//! - [`namespaces`]: new mount/IPC/UTS/network namespaces and `pivot_root` into an
//!   empty, read-only tmpfs: nothing of the host's file system is left to open.
//! - [`landlock`]: a Landlock ruleset that grants no file system access at all (where
//!   the kernel supports Landlock).

pub mod caps;
pub mod landlock;
pub mod namespaces;
pub mod seccomp;

/// Why jailing failed.
#[derive(Debug, thiserror::Error)]
#[error("jail: {0}")]
pub struct JailError(pub String);

/// Puts the calling process into a jail: namespaces and an empty root, Landlock,
/// no capabilities, no_new_privs, small rlimits. `keep_net` keeps the host's network
/// namespace (the net backend's TAP fd works either way; it is for backends that
/// must reach host sockets by path — none today). The seccomp filter comes last and
/// separately (see [`seccomp::install`]), once the backend has set up what it needs.
pub fn enter(keep_net: bool) -> Result<(), JailError> {
    namespaces::enter_empty_root(keep_net)?;
    landlock::deny_all_filesystem_access();
    limit_resources()?;
    caps::drop_capabilities()?;
    Ok(())
}

fn limit_resources() -> Result<(), JailError> {
    for (res, limit) in [(libc::RLIMIT_CORE, 0), (libc::RLIMIT_NOFILE, 256)] {
        let rl = libc::rlimit {
            rlim_cur: limit,
            rlim_max: limit,
        };
        // SAFETY: a valid rlimit struct for a valid resource.
        if unsafe { libc::setrlimit(res, &rl) } != 0 {
            return Err(JailError(format!(
                "setrlimit: {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    Ok(())
}
