//! seccomp-bpf filters built with seccompiler. Each thread kind and each device backend
//! defines its own filter next to the code whose syscalls it lists; this module has the
//! shared pieces.

use std::collections::BTreeMap;

use super::JailError;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Syscalls every jailed thread needs once running: memory management by the
/// allocator, futexes, signal return, thread exit, writing logs, closing their own fds.
pub const COMMON_SYSCALLS: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_futex,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_sched_yield,
    libc::SYS_clock_gettime,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// A filter allowing `syscalls` unconditionally and `ioctls` (by request number) on
/// any fd; anything else kills the process with SIGSYS.
pub fn filter(syscalls: &[i64], ioctls: &[u64]) -> Result<BpfProgram, JailError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        syscalls.iter().map(|s| (*s, vec![])).collect();
    // fcntl(fd, F_GETFD) at least: Rust's standard library checks an fd is still open
    // when it closes it (debug builds). Callers that list fcntl get all of it.
    let getfd = SeccompCondition::new(
        1,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        libc::F_GETFD as u64,
    )
    .and_then(|c| SeccompRule::new(vec![c]))
    .map_err(|e| JailError(e.to_string()))?;
    rules.entry(libc::SYS_fcntl).or_insert(vec![getfd]);
    if !ioctls.is_empty() {
        let ioctl_rules = ioctls
            .iter()
            .map(|req| {
                SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, *req)
                    .and_then(|c| SeccompRule::new(vec![c]))
                    .map_err(|e| JailError(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        rules.insert(libc::SYS_ioctl, ioctl_rules);
    }
    let f = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| JailError(e.to_string()))?;
    f.try_into()
        .map_err(|e: seccompiler::BackendError| JailError(e.to_string()))
}

/// Installs `prog` on the calling thread (and sets no_new_privs, which seccomp needs).
pub fn install(prog: &BpfProgram) -> Result<(), JailError> {
    seccompiler::apply_filter(prog).map_err(|e| JailError(e.to_string()))
}

/// Test support: runs `forbidden` in a forked child after installing `prog`, and
/// returns the signal that killed the child (SIGSYS when the filter denied it).
#[doc(hidden)]
pub fn child_killed_by(prog: &BpfProgram, forbidden: fn()) -> Option<i32> {
    // SAFETY: the child only installs the prebuilt filter, makes raw syscalls and
    // _exits; it does not touch locks another thread of the parent could hold.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        if install(prog).is_err() {
            // SAFETY: _exit is async-signal-safe.
            unsafe { libc::_exit(100) };
        }
        forbidden();
        // SAFETY: as above.
        unsafe { libc::_exit(0) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child with a valid out-pointer.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status))
}
