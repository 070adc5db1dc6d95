//! The namespaces a service (or boot step) starts in once secrets were delivered, so
//! that it reaches only the secrets it declares (docs/security.md):
//!
//! - a mount namespace of its own, where `/run/secrets` is a read-only bind of its own
//!   secrets tmpfs (or an empty tmpfs), the store holding every service's secrets is
//!   detached, `/run/hostd/caps` is a read-only bind of its own capability sockets
//!   (`caps.rs`; nothing when it was granted none) with the socket store detached too,
//!   and `/proc` is a fresh proc mount of
//! - a PID namespace of its own: no other service's process (nor init) is visible in
//!   it, so `/proc/PID/root` cannot lead into another service's mount namespace, and
//!   `/proc/1` is the service's own reaper.
//!
//! Three processes per service, all forked without exec from init's [`Command`]:
//!
//! ```text
//! init ── P (init's PID namespace: the pid init supervises, leader of the process group)
//!          └── A (PID 1 of the new namespace: the reaper)
//!                └── B (PID 2: execs the program)
//! ```
//!
//! A PID namespace's init ignores every signal it has no handler for, and the kernel
//! kills the whole namespace when it exits, so the program must not be PID 1 itself.
//! All three stay in P's process group, so init's signals to the group (SIGTERM to stop,
//! SIGKILL after the stop timeout) reach the program and whatever else of its group
//! directly, as they did without namespaces; P and A keep every signal blocked and never
//! act on one but SIGKILL (which ends A, and with A the namespace) and A's SIGCHLD. When
//! B exits, A hands B's wait status to P through a pipe and exits (the kernel then kills
//! what is left in the namespace). P ends the way B ended (the same exit code, or the
//! same signal), so the supervisor sees exactly what it saw before.
//!
//! P and A close every file descriptor they do not need (std's exec-error pipe, the
//! output pipes), so `Command::spawn` returns once B has exec'd and the console relay
//! sees EOF when the program's own output ends.

use std::ffi::CString;
use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

use crate::sys::{check, cstr};

/// What a child sees of the delivered secrets (see `secrets.rs`).
#[derive(Debug, Clone)]
pub struct SecretsView {
    /// The directory bind-mounted on /run/secrets, or None for an empty one.
    pub granted: Option<String>,
    /// When capability sockets were offered: the directory bind-mounted on
    /// /run/hostd/caps (None: the service was granted none). None: no capability store.
    pub caps: Option<Option<String>>,
    /// The child's uid and gid (set here, after the mounts, instead of by std, which
    /// changes them before `pre_exec` closures run).
    pub uid: u32,
    /// See `uid`.
    pub gid: u32,
}

/// Everything the forked processes need, built before the fork: after it they only
/// make system calls (no allocation, no locks), as a child of a threaded process must.
#[derive(Debug)]
struct Isolation {
    granted: Option<CString>,
    /// The service's capability socket directory, the mount point, and the store.
    caps_granted: Option<CString>,
    caps_target: CString,
    caps_store: Option<CString>,
    target: CString,
    store: CString,
    root: CString,
    tmpfs: CString,
    empty_opts: CString,
    proc_fs: CString,
    proc_dir: CString,
    uid: u32,
    gid: u32,
}

/// Makes `cmd`'s child run in a mount and a PID namespace of its own (see the module
/// documentation), whose `mount_point` holds only `view.granted` (read-only) and where
/// `store` is detached; the program runs as `view.uid`/`view.gid`.
pub fn child_isolated(
    cmd: &mut Command,
    view: &SecretsView,
    mount_point: &str,
    store: &str,
) -> io::Result<()> {
    let iso = Isolation {
        granted: view.granted.as_deref().map(cstr).transpose()?,
        caps_granted: view
            .caps
            .clone()
            .flatten()
            .as_deref()
            .map(cstr)
            .transpose()?,
        caps_target: cstr(hostd_images::abi::CAPS_DIR)?,
        caps_store: view
            .caps
            .is_some()
            .then(|| cstr(crate::caps::STORE))
            .transpose()?,
        target: cstr(mount_point)?,
        store: cstr(store)?,
        root: cstr("/")?,
        tmpfs: cstr("tmpfs")?,
        empty_opts: cstr("mode=0555")?,
        proc_fs: cstr("proc")?,
        proc_dir: cstr("/proc")?,
        uid: view.uid,
        gid: view.gid,
    };
    // SAFETY: the closure runs between fork and exec in the child std forked. It makes
    // only system calls (sigprocmask, pipe2, unshare, fork, mount, umount2, prctl,
    // close_range, waitpid, sigtimedwait, kill, read, write, setgroups, setgid, setuid,
    // _exit) on data built before the fork; it allocates nothing and takes no lock. The
    // two processes that never exec leave through `_exit` only.
    unsafe { cmd.pre_exec(move || iso.enter()) };
    Ok(())
}

fn fill_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigfillset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe { libc::sigfillset(&mut set) };
    set
}

fn set_mask(how: libc::c_int, set: &libc::sigset_t) -> io::Result<()> {
    // SAFETY: `set` is an initialised sigset_t; the old mask is not wanted.
    check(unsafe { libc::sigprocmask(how, set, std::ptr::null_mut()) })
}

fn fork() -> io::Result<libc::pid_t> {
    // SAFETY: the caller is single-threaded (a child of fork) and goes on with system
    // calls only, or execs.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(pid)
}

/// Closes every descriptor but `keep`.
fn close_all_but(keep: libc::c_int) {
    let keep = keep as libc::c_uint;
    if keep > 0 {
        // SAFETY: close_range only closes this process's descriptors.
        unsafe { libc::syscall(libc::SYS_close_range, 0, keep - 1, 0) };
    }
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_close_range, keep + 1, libc::c_uint::MAX, 0) };
}

fn exit_now(code: i32) -> ! {
    // SAFETY: _exit ends the process without running anything of the parent's.
    unsafe { libc::_exit(code) }
}

impl Isolation {
    /// Runs in P: sets up the namespaces and returns only in B, ready to exec.
    fn enter(&self) -> io::Result<()> {
        // P and A take signals only through waiting for them; B clears the mask.
        set_mask(libc::SIG_SETMASK, &fill_set())?;
        let mut fds = [0; 2];
        // SAFETY: `fds` is a valid two-element array for pipe2 to fill.
        check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
        let [status_r, status_w] = fds;
        // SAFETY: unshare changes only this process's namespaces (the PID namespace
        // applies to the children it forks from now on).
        check(unsafe { libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWPID) })?;
        let a = fork()?;
        if a > 0 {
            stand_in(a, status_r)
        }
        // A: PID 1 of the new PID namespace, in the new mount namespace.
        // SAFETY: prctl with integer arguments; P's death (a SIGKILL to its group)
        // takes A, and with it the namespace, along.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
        // SAFETY: our copy of the read end, not used in A.
        unsafe { libc::close(status_r) };
        self.mount_view()?;
        let b = fork()?;
        if b > 0 {
            reaper(b, status_w)
        }
        // B: the program.
        if self.uid != 0 || self.gid != 0 {
            // SAFETY: dropping privileges with plain integer arguments.
            check(unsafe { libc::setgroups(0, std::ptr::null()) })?;
            // SAFETY: as above.
            check(unsafe { libc::setgid(self.gid) })?;
            // SAFETY: as above.
            check(unsafe { libc::setuid(self.uid) })?;
        }
        // SAFETY: sigset_t is plain data; sigemptyset initialises it.
        let mut empty: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `empty` is a valid sigset_t.
        unsafe { libc::sigemptyset(&mut empty) };
        set_mask(libc::SIG_SETMASK, &empty)
    }

    /// In A: the service's view of the file systems.
    fn mount_view(&self) -> io::Result<()> {
        let null = std::ptr::null::<libc::c_char>();
        // SAFETY: every pointer is a NUL-terminated string built before the fork, or null
        // where mount(2) allows it.
        check(unsafe {
            libc::mount(
                null,
                self.root.as_ptr(),
                null,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            )
        })?;
        match &self.granted {
            Some(dir) => {
                // SAFETY: as above.
                check(unsafe {
                    libc::mount(
                        dir.as_ptr(),
                        self.target.as_ptr(),
                        null,
                        libc::MS_BIND,
                        std::ptr::null(),
                    )
                })?;
                // SAFETY: as above.
                check(unsafe {
                    libc::mount(
                        null,
                        self.target.as_ptr(),
                        null,
                        libc::MS_REMOUNT
                            | libc::MS_BIND
                            | libc::MS_RDONLY
                            | libc::MS_NOSUID
                            | libc::MS_NODEV
                            | libc::MS_NOEXEC,
                        std::ptr::null(),
                    )
                })?;
            }
            // SAFETY: as above.
            None => check(unsafe {
                libc::mount(
                    self.tmpfs.as_ptr(),
                    self.target.as_ptr(),
                    self.tmpfs.as_ptr(),
                    libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    self.empty_opts.as_ptr().cast(),
                )
            })?,
        }
        if let Some(dir) = &self.caps_granted {
            // SAFETY: as above.
            check(unsafe {
                libc::mount(
                    dir.as_ptr(),
                    self.caps_target.as_ptr(),
                    null,
                    libc::MS_BIND,
                    std::ptr::null(),
                )
            })?;
            // SAFETY: as above.
            check(unsafe {
                libc::mount(
                    null,
                    self.caps_target.as_ptr(),
                    null,
                    libc::MS_REMOUNT
                        | libc::MS_BIND
                        | libc::MS_RDONLY
                        | libc::MS_NOSUID
                        | libc::MS_NODEV
                        | libc::MS_NOEXEC,
                    std::ptr::null(),
                )
            })?;
        }
        if let Some(store) = &self.caps_store {
            // Every service's capability sockets: only its own stay, under caps_target.
            // SAFETY: as above.
            check(unsafe { libc::umount2(store.as_ptr(), libc::MNT_DETACH) })?;
        }
        // The store and every service's tmpfs below it.
        // SAFETY: as above.
        check(unsafe { libc::umount2(self.store.as_ptr(), libc::MNT_DETACH) })?;
        // init's /proc shows every process of the guest; this one only the namespace's.
        // SAFETY: as above.
        check(unsafe { libc::umount2(self.proc_dir.as_ptr(), libc::MNT_DETACH) })?;
        // SAFETY: as above.
        check(unsafe {
            libc::mount(
                self.proc_fs.as_ptr(),
                self.proc_dir.as_ptr(),
                self.proc_fs.as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                std::ptr::null(),
            )
        })
    }
}

/// P: waits for A, then ends the way the program ended.
fn stand_in(a: libc::pid_t, status_r: libc::c_int) -> ! {
    close_all_but(status_r);
    let mut a_status = 0;
    loop {
        // SAFETY: `a_status` is a valid out-pointer.
        let r = unsafe { libc::waitpid(a, &mut a_status, 0) };
        if r == a {
            break;
        }
        if r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            exit_now(1);
        }
    }
    let mut buf = [0u8; 4];
    // SAFETY: `buf` is valid for 4 bytes; A has exited, so the read does not block.
    let n = unsafe { libc::read(status_r, buf.as_mut_ptr().cast(), buf.len()) };
    // Without B's status (A was killed first), A's own.
    let status = if n == 4 {
        i32::from_ne_bytes(buf)
    } else {
        a_status
    };
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        // SAFETY: resets one signal's disposition to the default; no handler involved.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
        // SAFETY: sigset_t is plain data; sigemptyset initialises it.
        let mut one: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `one` is a valid sigset_t.
        unsafe { libc::sigemptyset(&mut one) };
        // SAFETY: `one` is initialised; `sig` came from the kernel.
        unsafe { libc::sigaddset(&mut one, sig) };
        // SAFETY: getpid has no preconditions.
        let me = unsafe { libc::getpid() };
        // SAFETY: kill has no memory effects.
        unsafe { libc::kill(me, sig) };
        let _ = set_mask(libc::SIG_UNBLOCK, &one);
        // Not deadly after all (cannot happen for a signal that killed B).
        exit_now(128 + sig)
    }
    exit_now(if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        1
    })
}

/// A: PID 1 of the service's namespace. Reaps, and reports B's end. Other signals stay
/// blocked and pending (one each at most, but for real-time ones, which only a root
/// program of the namespace could send it).
fn reaper(b: libc::pid_t, status_w: libc::c_int) -> ! {
    close_all_but(status_w);
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut chld: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `chld` is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut chld) };
    // SAFETY: `chld` is initialised and SIGCHLD a valid signal.
    unsafe { libc::sigaddset(&mut chld, libc::SIGCHLD) };
    loop {
        // SAFETY: `chld` is initialised; a null siginfo and a null timeout are allowed.
        unsafe { libc::sigtimedwait(&chld, std::ptr::null_mut(), std::ptr::null()) };
        loop {
            let mut status = 0;
            // SAFETY: `status` is a valid out-pointer.
            let p = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if p <= 0 {
                break;
            }
            if p == b {
                let bytes = status.to_ne_bytes();
                // SAFETY: `bytes` is valid for its length. P reads it after A exits.
                unsafe { libc::write(status_w, bytes.as_ptr().cast(), bytes.len()) };
                exit_now(0)
            }
        }
    }
}
