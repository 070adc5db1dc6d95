//! seccomp-bpf filters built with seccompiler. Each thread kind and each device backend
//! defines its own filter next to the code whose syscalls it lists; this module has the
//! shared pieces.

use std::collections::BTreeMap;

use super::JailError;
use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
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

/// `prctl` options a jailed thread may use: naming itself (the standard library names
/// threads it starts). Everything else (`PR_SET_SECCOMP`, `PR_SET_PDEATHSIG`,
/// `PR_SET_DUMPABLE`, `PR_CAP_AMBIENT`, …) is denied.
pub const PRCTL_OPTIONS: &[u64] = &[libc::PR_SET_NAME as u64, libc::PR_GET_NAME as u64];

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, JailError> {
    // The low 32 bits: each of these arguments is an int (or flags that fit in one) for
    // the kernel, whatever the caller left in the upper half of the register.
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
        .map_err(|e| JailError(e.to_string()))
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, JailError> {
    SeccompRule::new(conditions).map_err(|e| JailError(e.to_string()))
}

/// The argument rules for syscalls broader than any jailed thread needs, applied
/// whenever a filter lists them:
/// - `clone` only with `CLONE_THREAD` (threads, never processes);
/// - `mmap`, `mprotect` never with `PROT_EXEC` (no new code);
/// - `prctl` only with [`PRCTL_OPTIONS`].
fn argument_rules(syscall: i64) -> Result<Option<Vec<SeccompRule>>, JailError> {
    let thread = libc::CLONE_THREAD as u64;
    let exec = libc::PROT_EXEC as u64;
    Ok(match syscall {
        libc::SYS_clone => Some(vec![rule(vec![cond(
            0,
            SeccompCmpOp::MaskedEq(thread),
            thread,
        )?])?]),
        libc::SYS_mmap | libc::SYS_mprotect => {
            Some(vec![rule(vec![cond(2, SeccompCmpOp::MaskedEq(exec), 0)?])?])
        }
        libc::SYS_prctl => Some(
            PRCTL_OPTIONS
                .iter()
                .map(|o| rule(vec![cond(0, SeccompCmpOp::Eq, *o)?]))
                .collect::<Result<_, _>>()?,
        ),
        _ => None,
    })
}

/// A filter allowing `syscalls` and `ioctls` (by request number) on any fd; anything
/// else kills the process with SIGSYS. `clone`, `mmap`, `mprotect` and `prctl` are
/// allowed only with the arguments [`argument_rules`] lets through. `clone3` (whose
/// flags live in memory a filter cannot read) is never allowed: a filter that allows
/// `clone` answers it with ENOSYS, so that the C library falls back to `clone`, whose
/// flags it can check.
pub fn filter(syscalls: &[i64], ioctls: &[u64]) -> Result<BpfProgram, JailError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for s in syscalls {
        if *s == libc::SYS_clone3 {
            continue;
        }
        rules.insert(*s, argument_rules(*s)?.unwrap_or_default());
    }
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
    let threads = rules.contains_key(&libc::SYS_clone);
    let f = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| JailError(e.to_string()))?;
    let prog: BpfProgram = f
        .try_into()
        .map_err(|e: seccompiler::BackendError| JailError(e.to_string()))?;
    Ok(if threads {
        clone3_is_enosys(prog)
    } else {
        prog
    })
}

/// Puts three instructions before `prog`: load the syscall number; if it is `clone3`,
/// return ENOSYS; else go on with `prog` (whose jumps are relative, so they still hold;
/// it loads the architecture itself first). `clone3`'s number is the same for every
/// ABI the kernel can enter on x86_64, so no architecture check is needed before it.
fn clone3_is_enosys(prog: BpfProgram) -> BpfProgram {
    const BPF_LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const BPF_JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const BPF_RET_K: u16 = 0x06; // BPF_RET | BPF_K
    const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
    let mut out = vec![
        // seccomp_data.nr is at offset 0.
        sock_filter {
            code: BPF_LD_W_ABS,
            jt: 0,
            jf: 0,
            k: 0,
        },
        sock_filter {
            code: BPF_JEQ_K,
            jt: 0,
            jf: 1,
            k: libc::SYS_clone3 as u32,
        },
        sock_filter {
            code: BPF_RET_K,
            jt: 0,
            jf: 0,
            k: SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
        },
    ];
    out.extend(prog);
    out
}

/// Installs `prog` on the calling thread (and sets no_new_privs, which seccomp needs).
pub fn install(prog: &BpfProgram) -> Result<(), JailError> {
    seccompiler::apply_filter(prog).map_err(|e| JailError(e.to_string()))
}

/// Installs `prog` on the calling thread on top of the filter it already has, with the
/// seccomp(2) call alone: for a thread started by a filtered thread, which inherited its
/// filter and its no_new_privs (which [`install`] would set again with a `prctl` the
/// inherited filter may deny). The inherited filter must allow `seccomp`; the thread is
/// then held by both.
pub fn install_stacked(prog: &BpfProgram) -> Result<(), JailError> {
    let fprog = libc::sock_fprog {
        len: u16::try_from(prog.len()).map_err(|_| JailError("filter too long".into()))?,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: SECCOMP_SET_MODE_FILTER reads `fprog` and the instructions it points to,
    // which `prog` holds for the duration of the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &fprog as *const libc::sock_fprog,
        )
    };
    if r != 0 {
        return Err(JailError(format!(
            "seccomp(SECCOMP_SET_MODE_FILTER): {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// Calls a filter must deny, shared by the backends' selftests and the filter tests:
/// each makes one call and does nothing with its result (the caller expects SIGSYS).
#[doc(hidden)]
pub mod probes {
    /// mmap(2) of an anonymous page with PROT_EXEC.
    pub fn mmap_exec() {
        // SAFETY: a fresh anonymous mapping; nothing is executed from it, and it is
        // never unmapped (the process ends next).
        unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
    }

    /// mprotect(2) of a page of our own heap to PROT_EXEC.
    pub fn mprotect_exec() {
        let page = vec![0u8; 8192];
        let addr = (page.as_ptr() as usize + 4095) & !4095;
        // SAFETY: a page inside our own live allocation; if the call were allowed the
        // page would only become executable, and nothing jumps there.
        unsafe {
            libc::mprotect(
                addr as *mut libc::c_void,
                4096,
                libc::PROT_READ | libc::PROT_EXEC,
            )
        };
    }

    /// clone(2) without CLONE_THREAD: a new process.
    pub fn new_process() {
        // SAFETY: a raw clone with only an exit signal; should it be allowed, the child
        // leaves at once without touching anything.
        let pid = unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0) };
        if pid == 0 {
            // SAFETY: _exit in the child is always sound.
            unsafe { libc::_exit(0) };
        }
    }
}

/// Test support: runs `forbidden` in a forked child after installing `prog`, and
/// returns the signal that killed the child (SIGSYS when the filter denied it).
#[doc(hidden)]
pub fn child_killed_by(prog: &BpfProgram, forbidden: fn()) -> Option<i32> {
    child_status(prog, forbidden).err()
}

/// Test support: runs `f` in a forked child after installing `prog`; `Ok(exit code)`
/// when the child exited (0 when `f` returned; `f` may `_exit` with its own code),
/// `Err(signal)` when a signal killed it.
#[doc(hidden)]
pub fn child_status(prog: &BpfProgram, f: fn()) -> Result<i32, i32> {
    // SAFETY: the child only installs the prebuilt filter, runs `f` (raw syscalls, or
    // allocations, which glibc's fork keeps usable) and _exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        if install(prog).is_err() {
            // SAFETY: _exit is async-signal-safe.
            unsafe { libc::_exit(100) };
        }
        f();
        // SAFETY: as above.
        unsafe { libc::_exit(0) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child with a valid out-pointer.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    if libc::WIFSIGNALED(status) {
        Err(libc::WTERMSIG(status))
    } else {
        Ok(libc::WEXITSTATUS(status))
    }
}
