//! Jails: what a VMM thread or a device backend process gives up before it touches
//! anything a guest controls.
//!
//! - [`seccomp`]: syscall filters (one per thread kind or device, defined next to the
//!   code whose syscalls they list).
//! - [`caps`]: no capabilities, no_new_privs.
//! - [`identity`]: an unprivileged uid of its own, not dumpable, dies with its parent.
//! - [`namespaces`]: new mount/IPC/UTS/network namespaces and `pivot_root` into an
//!   empty, read-only tmpfs: nothing of the host's file system is left to open.
//! - [`landlock`]: a Landlock ruleset that grants no file system access at all (where
//!   the kernel supports Landlock).

pub mod caps;
pub mod identity;
pub mod landlock;
pub mod namespaces;
pub mod seccomp;

/// Why jailing failed.
#[derive(Debug, thiserror::Error)]
#[error("jail: {0}")]
pub struct JailError(pub String);

/// How to jail a process.
#[derive(Debug, Clone, Default)]
pub struct JailOptions {
    /// Keep the host's network namespace (the net backend's TAP fd works either way;
    /// it is for backends that must reach host sockets by path — none today).
    pub keep_net: bool,
    /// Become this uid and gid once the namespaces and mounts are set up (see
    /// [`identity`]); `None` keeps the uid (only for tests of the other parts).
    pub id: Option<u32>,
    /// The pid that started this process: after the uid change, the request to die with
    /// it is made again (a uid change clears it) and checked.
    pub parent: Option<libc::pid_t>,
    /// RLIMIT_AS in bytes: all the memory the process may map, guest memory included.
    pub max_address_space: Option<u64>,
    /// RLIMIT_NPROC: how many threads the process may have in all (its uid is its own,
    /// so the kernel's per-uid count is this process's threads). New processes are
    /// refused by the seccomp filter in any case.
    pub max_threads: Option<u64>,
}

/// Puts the calling process into a jail: namespaces and an empty root, Landlock, small
/// rlimits, not dumpable, no capabilities in any set, no_new_privs, and — with
/// `opts.id` — an unprivileged uid and gid of its own. The seccomp filter comes last and
/// separately (see [`seccomp::install`]), once the backend has set up what it needs.
pub fn enter(opts: &JailOptions) -> Result<(), JailError> {
    enter_filesystem(opts)?;
    enter_identity(opts)
}

/// The first half of [`enter`]: the namespaces and the empty root, Landlock and the
/// rlimits. These act on the calling thread (the rlimits on the process), so a process
/// may take them while another of its threads still works where it was: the built-in
/// VMM does, while its VM-creating thread finishes (that thread ends before any guest
/// code runs, and threads started later inherit the caller's). [`enter_identity`] must
/// follow once the caller is the process's only thread.
pub fn enter_filesystem(opts: &JailOptions) -> Result<(), JailError> {
    namespaces::enter_empty_root(opts.keep_net)?;
    landlock::deny_all_filesystem_access();
    limit_resources(opts)
}

/// The second half of [`enter`]: not dumpable, no capabilities, the unprivileged uid
/// and gid, the parent-death request again. Call with one thread (the uid change and
/// the capability sets are per thread).
pub fn enter_identity(opts: &JailOptions) -> Result<(), JailError> {
    identity::not_dumpable()?;
    caps::drop_bounding_set();
    if let Some(id) = opts.id {
        identity::become_unprivileged(id)?;
        // A uid change makes the process dumpable again where fs.suid_dumpable says so.
        identity::not_dumpable()?;
    }
    if let Some(parent) = opts.parent {
        identity::die_with_parent(parent)?;
    }
    caps::drop_capabilities()?;
    Ok(())
}

/// Ends a start at the lowest CPU priority (the built-in VMM starts its backends so:
/// hostd-vmm's `Spawn::low_priority_start`): back to the priority `RLIMIT_NICE`
/// allows, which that start set to the parent's. Nothing when the limit allows no
/// more than the priority the process has (the default limit, 0, allows nothing).
/// Needs no privilege; call before the seccomp filter, which has no `setpriority`.
pub fn end_low_priority_start() {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: fills a local rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NICE, &mut rl) } != 0
        || !(1..=40).contains(&rl.rlim_cur)
    {
        return;
    }
    // The kernel's getpriority: 20 - nice, as the limit counts.
    // SAFETY: reads this process's priority.
    let now = unsafe { libc::syscall(libc::SYS_getpriority, libc::PRIO_PROCESS, 0) };
    if now >= 1 && (now as u64) < rl.rlim_cur {
        let nice = 20 - rl.rlim_cur as libc::c_int;
        // SAFETY: sets this process's own priority.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    }
}

fn limit_resources(opts: &JailOptions) -> Result<(), JailError> {
    let mut limits = vec![(libc::RLIMIT_CORE, 0), (libc::RLIMIT_NOFILE, 256)];
    if let Some(bytes) = opts.max_address_space {
        limits.push((libc::RLIMIT_AS, bytes));
    }
    if let Some(n) = opts.max_threads {
        limits.push((libc::RLIMIT_NPROC, n));
    }
    for (res, limit) in limits {
        let rl = libc::rlimit {
            rlim_cur: limit,
            rlim_max: limit,
        };
        // SAFETY: a valid rlimit struct for a valid resource.
        if unsafe { libc::setrlimit(res, &rl) } != 0 {
            return Err(JailError(format!(
                "setrlimit({res}, {limit}): {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    Ok(())
}
