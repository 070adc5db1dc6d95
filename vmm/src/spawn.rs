//! Starting a device backend without waiting for it: a child that shares this process's
//! memory until its exec (`clone(CLONE_VM)`, [`Spawn::start`]), and the parent goes on
//! at once while the child execs.
//!
//! `std::process::Command::spawn` returns only once the child has exec'd (it reads a
//! close-on-exec pipe to report a failed exec), so the VM's process waited for each
//! backend's exec in turn before it could go on with the VM: the exec (mapping the
//! backend's program) is the child's work and can run on another CPU meanwhile. A fork
//! copied this process's page tables and left both to copy-on-write faults after it;
//! the shared memory has none of that. A failed exec is still reported: the child
//! writes its errno to a pipe before it exits with status 127, and
//! [`Started::exec_error`] reads it once the child is seen to have ended.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;

/// What a child is started with: its program, arguments and environment (nothing else
/// of this process's is kept), no stdin, a process group of its own, killed when the
/// calling thread ends, every fd but stdout, stderr and `keep_fd` closed at its exec.
#[derive(Debug)]
pub struct Spawn {
    program: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    /// Left open across the exec.
    keep_fd: Option<RawFd>,
    /// A network namespace to enter before the exec.
    netns: Option<RawFd>,
    /// A pipe (read end, write end) whose read the child waits on, just before its
    /// exec, until the parent writes to it or closes it ([`Spawn::gate`]).
    gate: Option<(RawFd, RawFd)>,
    /// Started at the lowest CPU priority ([`Spawn::low_priority_start`]).
    low_priority: bool,
}

fn c(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| io::Error::other(format!("NUL in {s:?}")))
}

impl Spawn {
    /// `program` with `args` (argv[0] is `program`) and, of this process's environment,
    /// only the variables named in `keep_env`.
    pub fn new<I, S>(program: &Path, args: I, keep_env: &[&str]) -> io::Result<Spawn>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let program = c(program.as_os_str())?;
        let mut argv = vec![program.clone()];
        for a in args {
            argv.push(c(a.as_ref())?);
        }
        let mut envp = Vec::new();
        for k in keep_env {
            if let Some(v) = std::env::var_os(k) {
                let mut kv = k.as_bytes().to_vec();
                kv.push(b'=');
                kv.extend_from_slice(v.as_bytes());
                envp.push(c(OsStr::from_bytes(&kv))?);
            }
        }
        Ok(Spawn {
            program,
            argv,
            envp,
            keep_fd: None,
            netns: None,
            gate: None,
            low_priority: false,
        })
    }

    /// Sets `key` to `value` in the child's environment.
    pub fn env(&mut self, key: &str, value: &str) -> io::Result<&mut Spawn> {
        self.envp.push(c(OsStr::new(&format!("{key}={value}")))?);
        Ok(self)
    }

    /// Keeps `fd` open (not close-on-exec) in the child.
    pub fn keep_fd(&mut self, fd: RawFd) -> &mut Spawn {
        self.keep_fd = Some(fd);
        self
    }

    /// The child enters the network namespace `fd` before it execs.
    pub fn netns(&mut self, fd: RawFd) -> &mut Spawn {
        self.netns = Some(fd);
        self
    }

    /// The child execs only once the write end `write` of the pipe whose read end is
    /// `read` is closed everywhere (the child closes its copy) or written to: started
    /// early, the child waits for its exec (the bulk of a start's work) until its parent
    /// lets it go. Both ends should be close-on-exec.
    pub fn gate(&mut self, read: RawFd, write: RawFd) -> &mut Spawn {
        self.gate = Some((read, write));
        self
    }

    /// The child starts at the lowest CPU priority (nice 19), with an `RLIMIT_NICE`
    /// that lets it return to this process's priority once its start is done, without
    /// privilege (hostd-devices' `jail::end_low_priority_start`). A start that nothing
    /// waits for then runs on CPU time the rest of the host leaves, not the VM's vCPUs'
    /// (in the nested test host a backend's exec and jail are tens of ms of CPU, while
    /// the guest prints its first lines).
    pub fn low_priority_start(&mut self) -> &mut Spawn {
        self.low_priority = true;
        self
    }

    /// Starts the child, which execs; the parent returns at once.
    ///
    /// The child is a `clone(CLONE_VM)` of this process, not a fork: it shares this
    /// process's memory until its exec (nothing is copied, and this process takes no
    /// copy-on-write faults afterwards while it sets its VM up), on a stack of its own,
    /// with a copy of the fd table and of the signal handlers. Until its exec it runs
    /// [`child_main`] alone: raw system calls on memory prepared here and never freed
    /// ([`ChildPlan`], leaked with its stack: a few pages per backend for the life of
    /// the VM's process), no C library call (it shares this thread's thread-local
    /// `errno`), every signal blocked: the program starts with every signal blocked
    /// and must empty its mask itself (hostd and hostd-backend do, `vm_start::init`).
    pub fn start(self) -> io::Result<Started> {
        let null = std::fs::File::open("/dev/null")?;
        let mut fds = [0; 2];
        // SAFETY: a valid array of two ints.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd that nothing else owns.
        let rd = unsafe { OwnedFd::from_raw_fd(fds[0]) };
        // SAFETY: as above.
        let wr = unsafe { OwnedFd::from_raw_fd(fds[1]) };
        let program = self.program.to_string_lossy().into_owned();
        // Everything the child reads, leaked: it must outlive the child's use of it,
        // which this process does not see end (the exec).
        let nul_ended = |strings: &[CString]| -> Vec<*const libc::c_char> {
            strings
                .iter()
                .map(|s| s.as_ptr())
                .chain([std::ptr::null()])
                .collect()
        };
        let plan: &'static ChildPlan = Box::leak(Box::new(ChildPlan {
            argv: nul_ended(&self.argv),
            envp: nul_ended(&self.envp),
            spawn: self,
            parent: std::process::id() as libc::pid_t,
            null: null.as_raw_fd(),
            report: wr.as_raw_fd(),
        }));
        // SAFETY: an anonymous private mapping; checked below.
        let stack = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                CHILD_STACK,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if stack == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // The child starts with every signal blocked (it inherits this thread's mask)
        // and keeps them so through its exec: no handler of this process's may run on
        // its stack.
        let old = set_signal_mask(!0);
        // The stack's top (it grows down): the end of the page-aligned mapping.
        let top = stack
            .cast::<u8>()
            .wrapping_add(CHILD_STACK)
            .cast::<libc::c_void>();
        // SAFETY: `top` ends the child's own mapping; `child_main` is given a 'static
        // plan and runs only raw system calls on it and on that stack (see its
        // documentation).
        let pid = unsafe {
            libc::clone(
                child_main,
                top,
                libc::CLONE_VM | libc::SIGCHLD,
                (plan as *const ChildPlan).cast_mut().cast(),
            )
        };
        let clone_error = io::Error::last_os_error();
        set_signal_mask(old);
        if pid < 0 {
            return Err(clone_error);
        }
        Ok(Started {
            pid,
            program,
            exec_error: rd,
            status: None,
        })
    }
}

/// The kernel's signal set: 64 signals, 8 bytes.
const SIGSET_SIZE: usize = 8;

/// The stack of a child until its exec (it needs a few hundred bytes; only the pages it
/// touches are ever allocated).
const CHILD_STACK: usize = 64 << 10;

/// What a child does before its exec, prepared by [`Spawn::start`] and never freed.
struct ChildPlan {
    /// The program, its arguments and environment, and the fds to keep and enter.
    spawn: Spawn,
    /// `spawn`'s arguments and environment as NULL-terminated arrays.
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    parent: libc::pid_t,
    null: RawFd,
    /// Where a failed step's errno goes (close-on-exec).
    report: RawFd,
}

/// Sets the calling thread's signal mask (the kernel's 64 bits, with the raw call: the
/// C library's would leave its own two signals unblocked); returns the one before.
fn set_signal_mask(mask: u64) -> u64 {
    let mut old = 0u64;
    // SAFETY: sets this thread's mask from a local, the old one into a local.
    unsafe {
        raw_syscall(
            libc::SYS_rt_sigprocmask,
            [
                libc::SIG_SETMASK as usize,
                &mask as *const u64 as usize,
                &mut old as *mut u64 as usize,
                SIGSET_SIZE,
            ],
        )
    };
    old
}

/// A system call without the C library (which would set the thread-local `errno` that
/// a `CLONE_VM` child shares with the thread that started it): the kernel's result, a
/// negative errno on failure.
///
/// # Safety
/// As for the system call `nr` with these arguments.
unsafe fn raw_syscall(nr: libc::c_long, a: [usize; 4]) -> isize {
    let ret: isize;
    // SAFETY: the x86-64 Linux system call convention: number in rax, arguments in
    // rdi, rsi, rdx, r10; rcx and r11 clobbered; the result in rax. The caller answers
    // for what the call itself does.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") nr as isize => ret,
            in("rdi") a[0],
            in("rsi") a[1],
            in("rdx") a[2],
            in("r10") a[3],
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// The child of [`Spawn::start`], before its exec: most of what `Command` does (a
/// process group of its own, stdin from /dev/null, SIGPIPE at its default; but every
/// signal stays blocked, see below), then the parent-death signal, fds close-on-exec
/// but the kept one, the network namespace, the gate, and the exec. A failed step's
/// errno goes to the report pipe and the child exits with 127.
///
/// Only raw system calls on the plan (which outlives it) and locals: it shares its
/// parent's memory and thread-local state, so it allocates nothing, panics nowhere and
/// calls nothing of the C library.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `Spawn::start` passes a leaked, never mutated ChildPlan.
    let plan = unsafe { &*arg.cast::<ChildPlan>() };
    let errno = child_steps(plan);
    let bytes = errno.to_ne_bytes();
    // SAFETY: a write of 4 bytes from a local to our own pipe.
    unsafe {
        raw_syscall(
            libc::SYS_write,
            [
                plan.report as usize,
                bytes.as_ptr() as usize,
                bytes.len(),
                0,
            ],
        )
    };
    // SAFETY: ends this process (exit_group: it is a thread group of one).
    unsafe { raw_syscall(libc::SYS_exit_group, [127, 0, 0, 0]) };
    127
}

/// A raw system call on integers, on memory that outlives it or on locals, as
/// `Err(errno)` on failure.
fn call(nr: libc::c_long, a: [usize; 4]) -> Result<isize, i32> {
    // SAFETY: each caller passes what its system call expects (integers, or pointers to
    // memory that outlives the call).
    let r = unsafe { raw_syscall(nr, a) };
    if r < 0 {
        Err((-r) as i32)
    } else {
        Ok(r)
    }
}

/// Between the start of a child and its exec: SIGKILL when the thread that started it
/// ends (PR_SET_PDEATHSIG; a child whose `parent` is gone already exits at once, as
/// nothing would kill it later), and every fd past stderr marked close-on-exec. Raw
/// system calls only: also for a `CLONE_VM` child ([`child_main`]). Err(errno).
pub(crate) fn die_with_parent_after_exec(parent: libc::pid_t) -> Result<(), i32> {
    call(
        libc::SYS_prctl,
        [
            libc::PR_SET_PDEATHSIG as usize,
            libc::SIGKILL as usize,
            0,
            0,
        ],
    )?;
    if call(libc::SYS_getppid, [0; 4]) != Ok(parent as isize) {
        // SAFETY: ends this process (a thread group of one, between fork and exec).
        unsafe { raw_syscall(libc::SYS_exit_group, [1, 0, 0, 0]) };
    }
    // CLOSE_RANGE_CLOEXEC rather than closing them now, so that an exec-error pipe
    // (the standard library's, or [`ChildPlan::report`]) still works.
    const CLOSE_RANGE_CLOEXEC: usize = 1 << 2;
    call(
        libc::SYS_close_range,
        [3, u32::MAX as usize, CLOSE_RANGE_CLOEXEC, 0],
    )?;
    Ok(())
}

/// [`child_main`]'s steps; returns the errno of the one that failed (the exec's, if
/// none before it did).
fn child_steps(plan: &ChildPlan) -> i32 {
    let spawn = &plan.spawn;
    // Every signal stays blocked through the exec, which puts every handler back at
    // its default: no handler of this process's ever runs in the child (on its stack,
    // with its parent's thread-local state). The program empties its mask at its start
    // (hostd's and hostd-backend's `vm_start::init`). SIGPIPE, which hostd ignores, back
    // at its default (an ignored signal stays ignored across an exec), as `Command`
    // leaves it.
    let default = KernelSigaction::default();
    let default_ptr = &default as *const KernelSigaction as usize;
    let steps: [(libc::c_long, [usize; 4]); 3] = [
        (
            libc::SYS_rt_sigaction,
            [libc::SIGPIPE as usize, default_ptr, 0, SIGSET_SIZE],
        ),
        (libc::SYS_setpgid, [0, 0, 0, 0]),
        (libc::SYS_dup2, [plan.null as usize, 0, 0, 0]),
    ];
    for (nr, a) in steps {
        if let Err(e) = call(nr, a) {
            return e;
        }
    }
    if let Err(e) = die_with_parent_after_exec(plan.parent) {
        return e;
    }
    // Every fd past stderr is close-on-exec now; the kept one not.
    if let Some(fd) = spawn.keep_fd {
        if let Err(e) = call(libc::SYS_fcntl, [fd as usize, libc::F_SETFD as usize, 0, 0]) {
            return e;
        }
    }
    if spawn.low_priority {
        // Its priority (its parent's) as `RLIMIT_NICE` counts it, 20 - nice: what the
        // kernel's getpriority returns. Best effort: without that limit in place the
        // priority stays as it is (the child could not come back from nice 19).
        if let Ok(priority) = call(
            libc::SYS_getpriority,
            [libc::PRIO_PROCESS as usize, 0, 0, 0],
        ) {
            let rl = [priority as u64; 2];
            if call(
                libc::SYS_setrlimit,
                [libc::RLIMIT_NICE as usize, rl.as_ptr() as usize, 0, 0],
            )
            .is_ok()
            {
                let _ = call(
                    libc::SYS_setpriority,
                    [libc::PRIO_PROCESS as usize, 0, 19, 0],
                );
            }
        }
    }
    if let Some(fd) = spawn.netns {
        if let Err(e) = call(
            libc::SYS_setns,
            [fd as usize, libc::CLONE_NEWNET as usize, 0, 0],
        ) {
            return e;
        }
    }
    if let Some((read, write)) = spawn.gate {
        let _ = call(libc::SYS_close, [write as usize, 0, 0, 0]);
        let mut b = 0u8;
        while call(
            libc::SYS_read,
            [read as usize, &mut b as *mut u8 as usize, 1, 0],
        ) == Err(libc::EINTR)
        {}
    }
    match call(
        libc::SYS_execve,
        [
            spawn.program.as_ptr() as usize,
            plan.argv.as_ptr() as usize,
            plan.envp.as_ptr() as usize,
            0,
        ],
    ) {
        Err(e) => e,
        Ok(_) => libc::EIO,
    }
}

/// The kernel's `struct sigaction` for rt_sigaction (not the C library's: handler,
/// flags, restorer, then a 64-bit mask). All zero: SIG_DFL, no flags, empty mask.
#[repr(C)]
#[derive(Default)]
struct KernelSigaction {
    handler: libc::sighandler_t,
    flags: libc::c_ulong,
    restorer: usize,
    mask: u64,
}

/// A child [`Spawn::start`] started (the counterpart of `std::process::Child`).
#[derive(Debug)]
pub struct Started {
    pid: libc::pid_t,
    /// What it was to run, for messages.
    program: String,
    /// The child's errno, if it could not exec (closed at its exec).
    exec_error: OwnedFd,
    /// Once reaped.
    status: Option<ExitStatus>,
}

impl Started {
    /// Its process id.
    pub fn id(&self) -> u32 {
        self.pid as u32
    }

    fn wait_flags(&mut self, flags: libc::c_int) -> io::Result<Option<ExitStatus>> {
        if self.status.is_none() {
            let mut status = 0;
            // A signal handler installed without SA_RESTART interrupts the wait: again,
            // as `Child::wait` does.
            let r = loop {
                // SAFETY: waitpid of our own child into a local.
                let r = unsafe { libc::waitpid(self.pid, &mut status, flags) };
                if r >= 0 {
                    break r;
                }
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            };
            if r == self.pid {
                self.status = Some(ExitStatus::from_raw(status));
            }
        }
        Ok(self.status)
    }

    /// Its exit status if it has ended (reaping it), else None.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.wait_flags(libc::WNOHANG)
    }

    /// Waits for its end.
    pub fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            if let Some(s) = self.wait_flags(0)? {
                return Ok(s);
            }
        }
    }

    /// SIGKILL, unless it was reaped already.
    pub fn kill(&mut self) -> io::Result<()> {
        if self.status.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the process has already been reaped",
            ));
        }
        // SAFETY: kill of our own child, not reaped yet (so its pid is not reused).
        if unsafe { libc::kill(self.pid, libc::SIGKILL) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Why it could not exec (`PROGRAM: error`), if that is how it ended (read once it
    /// has ended).
    pub fn exec_error(&self) -> Option<String> {
        let mut b = [0u8; 4];
        // SAFETY: a read of at most 4 bytes into a local from our own (non-blocking) pipe.
        let n = unsafe { libc::read(self.exec_error.as_raw_fd(), b.as_mut_ptr().cast(), 4) };
        (n == 4).then(|| {
            let e = io::Error::from_raw_os_error(i32::from_ne_bytes(b));
            format!("{}: {e}", self.program)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait_end(c: &mut Started) -> ExitStatus {
        c.wait().expect("wait")
    }

    #[test]
    fn runs_the_program_with_its_arguments_and_only_the_kept_and_given_environment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("out");
        let script = format!(
            "echo \"$1 ${{PATH:+path}} ${{HOME:-nohome}} $EXTRA\" > {}; read x; echo \"stdin:$x\" >> {}",
            out.display(),
            out.display()
        );
        let mut s = Spawn::new(
            Path::new("/bin/sh"),
            ["-c", &script, "sh", "arg1"],
            &["PATH"],
        )
        .expect("spawn");
        s.env("EXTRA", "given").expect("env");
        let mut c = s.start().expect("start");
        assert!(wait_end(&mut c).success());
        assert!(c.exec_error().is_none());
        let text = std::fs::read_to_string(&out).expect("out");
        assert_eq!(text, "arg1 path nohome given\nstdin:\n");
    }

    #[test]
    fn a_failed_exec_is_reported() {
        let mut c = Spawn::new(Path::new("/nonexistent/program"), ["x"], &[])
            .expect("spawn")
            .start()
            .expect("start");
        assert_eq!(wait_end(&mut c).code(), Some(127));
        let e = c.exec_error().expect("an exec error");
        assert!(
            e.starts_with("/nonexistent/program: No such file or directory"),
            "{e}"
        );
    }

    #[test]
    fn only_the_kept_fd_is_inherited() {
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let (kept, _k2) = std::os::unix::net::UnixStream::pair().expect("pair");
        let script = format!(
            "[ -e /proc/self/fd/{} ] && echo kept; [ -e /proc/self/fd/{} ] || echo closed",
            kept.as_raw_fd(),
            a.as_raw_fd()
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("out");
        let script = format!("({script}) > {}", out.display());
        let mut s = Spawn::new(Path::new("/bin/sh"), ["-c", &script], &[]).expect("spawn");
        s.keep_fd(kept.as_raw_fd());
        let mut c = s.start().expect("start");
        assert!(wait_end(&mut c).success());
        assert_eq!(
            std::fs::read_to_string(&out).expect("out"),
            "kept\nclosed\n"
        );
        drop(b);
    }

    #[test]
    fn the_program_starts_with_every_signal_blocked_and_sigpipe_at_its_default() {
        // As hostd does: SIGPIPE ignored, a handler installed, and here also a signal
        // blocked in the starting thread.
        extern "C" fn on_usr1(_: libc::c_int) {}
        // SAFETY: a no-op handler.
        unsafe { libc::signal(libc::SIGUSR1, on_usr1 as *const () as libc::sighandler_t) };
        // SAFETY: SIGPIPE ignored, as the Rust runtime does anyway.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("out");
        // grep's own masks, as the shell's exec leaves them (the shell's own may be all
        // blocked while it forks).
        let script = format!(
            "exec grep -E '^Sig(Blk|Ign)' /proc/self/status > {}",
            out.display()
        );
        // Waited for in the thread that started it: the child dies with that thread.
        let status = std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: an all-zero sigset_t is a valid value to fill.
                let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
                // SAFETY: a local set.
                unsafe { libc::sigaddset(&mut set, libc::SIGUSR2) };
                // SAFETY: blocks SIGUSR2 in this thread only, from a local.
                unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
                let mut c = Spawn::new(Path::new("/bin/sh"), ["-c", &script], &[])
                    .expect("spawn")
                    .start()
                    .expect("start");
                wait_end(&mut c)
            })
            .join()
            .expect("thread")
        });
        assert!(status.success(), "{status:?}");
        let text = std::fs::read_to_string(&out).expect("out");
        let mask = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| u64::from_str_radix(v.trim(), 16).expect("hex"))
                .expect("a mask")
        };
        // All but SIGKILL and SIGSTOP, which cannot be blocked.
        let unblockable = (1 << (libc::SIGKILL - 1)) | (1 << (libc::SIGSTOP - 1));
        assert_eq!(mask("SigBlk:"), !unblockable, "{text}");
        assert_eq!(mask("SigIgn:") & (1 << (libc::SIGPIPE - 1)), 0, "{text}");
    }

    #[test]
    fn kill_ends_it_and_try_wait_sees_it() {
        let mut c = Spawn::new(Path::new("/bin/sleep"), ["60"], &[])
            .expect("spawn")
            .start()
            .expect("start");
        assert!(c.try_wait().expect("try_wait").is_none());
        c.kill().expect("kill");
        assert_eq!(wait_end(&mut c).signal(), Some(libc::SIGKILL));
        assert!(c.try_wait().expect("try_wait").is_some());
        assert!(c.kill().is_err(), "a reaped child is not signalled");
    }
}
