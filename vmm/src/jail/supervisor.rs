//! Jailer-style start of a VM: `hostd run` forks one child into a new PID namespace —
//! the VM's process (the built-in VMM itself, or the parent of QEMU) — moves it into the
//! VM's cgroup and waits for it, forwarding Ctrl-C and SIGTERM.
//!
//! The child is PID 1 of its namespace: every process of the VM (device backends, QEMU)
//! is its descendant, so when it ends — because the guest ended, or because `hostd run`
//! was killed (the child asked the kernel for SIGKILL when its parent dies) — the kernel
//! kills every other process of the VM. Nothing of a VM outlives its `hostd run`.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use super::cgroup::{Limits, VmCgroup};
use super::JailError;
use crate::boot::{Outcome, Timings};

/// A pidfd of `hostd run`, held by the VM's process so that it can check, each time it
/// asks to die with its parent, that the parent is still there (`getppid` cannot tell:
/// the parent lives outside the child's PID namespace). -1 outside a supervised VM.
static PARENT_PIDFD: AtomicI32 = AtomicI32::new(-1);

/// The VM's process's end of a pipe that `hostd run` closes once it has written the VM's
/// cgroup limits ([`limits_in_place`]). -1 when there is nothing to wait for.
static LIMITS_FD: AtomicI32 = AtomicI32::new(-1);

/// In the VM's process: waits until `hostd run` has written the VM's cgroup limits,
/// which it does while this process sets the VM up (the cgroup was made, and this
/// process is in it, before its fork), and returns what `hostd run` prepared for it
/// meanwhile (the `prepare` of [`run`]; empty without); returns at once, with nothing,
/// where there is nothing to wait for. Called before the guest (or QEMU) runs. Whether
/// the writes worked is for `hostd run` to say (it warns, as when it cannot make a
/// cgroup at all).
pub fn limits_in_place() -> Vec<u8> {
    let fd = LIMITS_FD.swap(-1, Ordering::SeqCst);
    if fd < 0 {
        return Vec::new();
    }
    // SAFETY: the read end of the pipe, owned by nothing else (taken out of LIMITS_FD).
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // The pipe's end is its writer's close; a short or failed read leaves the caller
    // to do the work itself.
    let mut prepared = Vec::new();
    let _ = std::fs::File::from(fd).read_to_end(&mut prepared);
    crate::phase("limits");
    prepared
}

fn os(what: &str) -> JailError {
    JailError(format!("{what}: {}", std::io::Error::last_os_error()))
}

/// Whether this process is a VM's process started by [`run`] (and so may give up root
/// once its children run: the PID namespace ends them when it ends).
pub fn supervised() -> bool {
    PARENT_PIDFD.load(Ordering::SeqCst) >= 0
}

/// Asks the kernel for SIGKILL when the parent (`hostd run`) dies, then checks that it
/// has not died already (in which case the process ends at once). Call again after any
/// uid change, which clears the request.
pub fn die_with_hostd() -> Result<(), JailError> {
    // SAFETY: prctl with integer arguments has no memory effects.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
        return Err(os("PR_SET_PDEATHSIG"));
    }
    let fd = PARENT_PIDFD.load(Ordering::SeqCst);
    if fd >= 0 {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no waiting. A pidfd polls readable once its process
        // has exited.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        if n > 0 && p.revents & libc::POLLIN != 0 {
            // SAFETY: _exit is always sound.
            unsafe { libc::_exit(1) };
        }
    }
    Ok(())
}

/// This process's threads: the link count of /proc/self/task, which the kernel gives as
/// its threads plus two (one `statx`, no directory to list or text to parse).
fn threads() -> usize {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/task").map_or(usize::MAX, |m| {
        usize::try_from(m.nlink()).map_or(usize::MAX, |n| n.saturating_sub(2))
    })
}

fn encode(r: &Result<Outcome, String>) -> String {
    let t = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
    match r {
        Ok(o) => format!(
            "ok\n{}\n{}\n{}\n{}\n{}\n{}\n",
            o.exit_code,
            t(o.timings.vm_started_ms),
            t(o.timings.init_started_ms),
            t(o.timings.first_service_ms),
            t(o.timings.exited_ms),
            o.timings
                .phases
                .iter()
                .map(|(n, ms)| format!("{n}={ms}"))
                .collect::<Vec<_>>()
                .join(";")
        ),
        Err(e) => format!("err\n{e}"),
    }
}

fn decode(s: &str) -> Option<Result<Outcome, String>> {
    if let Some(e) = s.strip_prefix("err\n") {
        return Some(Err(e.to_string()));
    }
    let mut l = s.strip_prefix("ok\n")?.lines();
    let exit_code = l.next()?.parse().ok()?;
    let mut t = || l.next().and_then(|v| v.parse().ok());
    let (vm_started_ms, init_started_ms, first_service_ms, exited_ms) = (t(), t(), t(), t());
    let phases = l
        .next()
        .unwrap_or_default()
        .split(';')
        .filter_map(|p| {
            let (n, ms) = p.split_once('=')?;
            Some((n.to_string(), ms.parse().ok()?))
        })
        .collect();
    Some(Ok(Outcome {
        exit_code,
        timings: Timings {
            vm_started_ms,
            init_started_ms,
            first_service_ms,
            exited_ms,
            phases,
        },
    }))
}

/// Runs `vm` in the VM's own process (see the module's documentation), in a cgroup with
/// `limits`, and returns its outcome. Must be called while `hostd run` has a single
/// thread (the child of a fork only has the forking thread); otherwise, or without
/// root, `vm` runs in this process with a warning. `prepare` runs in `hostd run` once
/// the VM's process is started and its limits written, on a CPU that process does not
/// use meanwhile: its bytes reach that process through [`limits_in_place`].
pub fn run<F>(limits: Limits, prepare: Option<fn() -> Vec<u8>>, vm: F) -> Result<Outcome, String>
where
    F: FnOnce() -> Result<Outcome, String>,
{
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        tracing::warn!("not root: the VM runs without its own PID namespace and cgroup");
        return vm();
    }
    if threads() != 1 {
        tracing::warn!("hostd run has several threads: the VM runs without its own PID namespace");
        return vm();
    }
    let cgroup = match VmCgroup::create(super::vm_pid()) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!("the VM runs without a cgroup of its own: {e}");
            None
        }
    };
    crate::phase("cgroup");
    start(cgroup, limits, prepare, vm).map_err(|e| e.to_string())?
}

fn start<F>(
    cgroup: Option<VmCgroup>,
    limits: Limits,
    prepare: Option<fn() -> Vec<u8>>,
    vm: F,
) -> Result<Result<Outcome, String>, JailError>
where
    F: FnOnce() -> Result<Outcome, String>,
{
    let me = std::process::id() as libc::pid_t;
    // SAFETY: pidfd_open of our own pid, no flags; the result is checked.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, me, 0) } as RawFd;
    if pidfd < 0 {
        return Err(os("pidfd_open"));
    }
    // SAFETY: a fresh fd that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    let mut fds = [0; 2];
    // SAFETY: a valid array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(os("pipe2"));
    }
    // SAFETY: a fresh fd that nothing else owns.
    let rd = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    // SAFETY: as above.
    let wr = unsafe { OwnedFd::from_raw_fd(fds[1]) };
    // Closed by this process once it has written the cgroup's limits and what `prepare`
    // made.
    // SAFETY: a valid array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(os("pipe2"));
    }
    // SAFETY: a fresh fd that nothing else owns.
    let limits_rd = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    // SAFETY: as above.
    let limits_wr = unsafe { OwnedFd::from_raw_fd(fds[1]) };
    let own_pid_ns = std::fs::File::open("/proc/self/ns/pid")
        .map_err(|e| JailError(format!("/proc/self/ns/pid: {e}")))?;
    let seen = crate::signals::count();
    // SAFETY: unshare with a namespace flag has no memory effects; it applies to the
    // children this thread creates from now on.
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
        return Err(os("unshare(CLONE_NEWPID)"));
    }
    // Straight into a v2 cgroup where the kernel can (then the child need not move
    // itself in), else fork and the child enters it.
    let into = cgroup
        .as_ref()
        .and_then(VmCgroup::v2_fd)
        .and_then(|fd| fork_into_cgroup(&fd));
    let entered = into.is_some();
    // SAFETY: this process has one thread (checked by the caller), so the child gets
    // every lock in the state the only thread left it in.
    let pid = into.unwrap_or_else(|| unsafe { libc::fork() });
    if pid == 0 {
        crate::phase("vm process");
        drop(rd);
        drop(limits_wr);
        drop(own_pid_ns);
        if cgroup.is_some() || prepare.is_some() {
            LIMITS_FD.store(limits_rd.as_raw_fd(), Ordering::SeqCst);
            std::mem::forget(limits_rd);
        } else {
            drop(limits_rd);
        }
        crate::volumes::close_inherited_locks();
        PARENT_PIDFD.store(pidfd.as_raw_fd(), Ordering::SeqCst);
        std::mem::forget(pidfd);
        let result = child(cgroup.as_ref().filter(|_| !entered), vm);
        // The cgroup is the parent's to remove.
        std::mem::forget(cgroup);
        let mut w = std::fs::File::from(wr);
        let _ = w.write_all(encode(&result).as_bytes());
        let _ = std::io::stdout().flush();
        // SAFETY: ends the VM's process (and with it its PID namespace); nothing of
        // ours is half-written.
        unsafe { libc::_exit(0) };
    }
    // The parent: its later children belong in its own PID namespace again.
    // SAFETY: a valid namespace fd of the right type.
    unsafe { libc::setns(own_pid_ns.as_raw_fd(), libc::CLONE_NEWPID) };
    if pid < 0 {
        return Err(os("fork"));
    }
    drop(wr);
    drop(pidfd);
    drop(limits_rd);
    // The VM's limits, while its process starts (it waits for them before its guest
    // runs): the writes are ~5 ms of a start in the nested test host.
    if let Some(cg) = &cgroup {
        if let Err(e) = cg.limit(limits) {
            tracing::warn!("the VM's cgroup has no limits: {e}");
        }
    }
    if let Some(prepare) = prepare {
        // Small (4.4 KiB of filters: the pipe holds it whole, so this never waits for the
        // reader); a failed write leaves the VM's process to do the work itself.
        let _ = std::fs::File::from(limits_wr).write_all(&prepare());
    } else {
        drop(limits_wr);
    }
    if let Some(cg) = &cgroup {
        cg.remove_stale();
    }
    // What the VM's process needs (its kernel and initrd files among it) is its own
    // now; this process keeps none of it while the VM runs.
    drop(vm);
    let status = wait_forwarding(pid, seen);
    let mut text = String::new();
    let _ = std::fs::File::from(rd).read_to_string(&mut text);
    drop(cgroup);
    Ok(decode(&text).unwrap_or_else(|| {
        Err(if libc::WIFSIGNALED(status) {
            format!(
                "the VM's process was killed by signal {}",
                libc::WTERMSIG(status)
            )
        } else {
            format!(
                "the VM's process ended (status {}) without a result",
                libc::WEXITSTATUS(status)
            )
        })
    }))
}

/// prctl PR_GET_TID_ADDRESS: the address this thread gave `set_tid_address`.
#[cfg(target_env = "gnu")]
const PR_GET_TID_ADDRESS: libc::c_int = 40;

/// `fork()` with the child created in the cgroup v2 directory `cgroup`
/// (`clone3(CLONE_INTO_CGROUP)`, Linux 5.7): the child need not move itself in through
/// `cgroup.procs`, the largest single step of a VM's start on a v2 host (its write
/// lock waits for an RCU grace period; a fork only reads it). None when the kernel or
/// the C library does not allow it (the caller then forks and the child enters).
///
/// The child returns here like a fork's, and runs on: the caller has a single thread,
/// so no lock is held by another, and nothing in hostd registers `pthread_atfork`
/// handlers. What the C library's own fork does besides, done here too: the thread id
/// that it keeps for the thread ([`own_tid_word`]) is set to the child's by the kernel
/// (`CLONE_CHILD_SETTID`), and with glibc cleared at its end (`CLONE_CHILD_CLEARTID`).
/// Robust mutexes, the one thing left unregistered in the child, are not used.
fn fork_into_cgroup(cgroup: &OwnedFd) -> Option<libc::pid_t> {
    /// `struct clone_args` up to `cgroup` (CLONE_ARGS_SIZE_VER2).
    #[repr(C)]
    #[derive(Default)]
    struct CloneArgs {
        flags: u64,
        pidfd: u64,
        child_tid: u64,
        parent_tid: u64,
        exit_signal: u64,
        stack: u64,
        stack_size: u64,
        tls: u64,
        set_tid: u64,
        set_tid_size: u64,
        cgroup: u64,
    }
    const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
    let (tid, clear) = own_tid_word()?;
    let args = CloneArgs {
        flags: CLONE_INTO_CGROUP
            | libc::CLONE_CHILD_SETTID as u64
            | if clear {
                libc::CLONE_CHILD_CLEARTID as u64
            } else {
                0
            },
        child_tid: tid as u64,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: cgroup.as_raw_fd() as u64,
        ..CloneArgs::default()
    };
    // SAFETY: clone3 without CLONE_VM or a stack behaves as fork (see above for what
    // makes that sound here); `args` lives through the call and `tid` is this thread's
    // own id word, which the kernel writes in the child's copy of memory only.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if pid < 0 {
        tracing::debug!(
            "clone3(CLONE_INTO_CGROUP): {}; forking instead",
            std::io::Error::last_os_error()
        );
        return None;
    }
    Some(pid as libc::pid_t)
}

/// Where the C library keeps this thread's id, which a fork sets to the child's: the
/// word's address, and whether the library also has the kernel clear it when the
/// thread ends. None when it is not known (the caller then forks as usual).
fn own_tid_word() -> Option<(*mut libc::c_int, bool)> {
    // glibc gives set_tid_address the id's own word, which PR_GET_TID_ADDRESS returns.
    #[cfg(target_env = "gnu")]
    let found = {
        let mut tid: *mut libc::c_int = std::ptr::null_mut();
        // SAFETY: PR_GET_TID_ADDRESS writes one pointer to the address given.
        let r = unsafe { libc::prctl(PR_GET_TID_ADDRESS, &mut tid as *mut *mut libc::c_int) };
        (r == 0 && !tid.is_null()).then_some((tid, true))
    };
    // musl gives set_tid_address a lock of its own and keeps the id in the thread's
    // descriptor (`struct pthread`, at pthread_self()): `tid` follows `self`, `dtv`,
    // `prev`, `next`, `sysinfo` and `canary`, 48 bytes in on x86_64. Its fork sets it in
    // the child (from gettid) and clears nothing. Taken only when the word there is this
    // thread's id as the kernel gives it; else the usual fork.
    #[cfg(not(target_env = "gnu"))]
    let found = {
        const MUSL_TID_OFFSET: usize = 48;
        // SAFETY: pthread_self has no preconditions.
        let word = (unsafe { libc::pthread_self() } as usize + MUSL_TID_OFFSET) as *mut libc::c_int;
        // SAFETY: gettid has no preconditions.
        let me = unsafe { libc::syscall(libc::SYS_gettid) } as libc::c_int;
        // SAFETY: musl's descriptor is larger than 52 bytes and lives as long as the
        // thread.
        (cfg!(target_env = "musl") && unsafe { word.read() } == me).then_some((word, false))
    };
    found
}

/// Waits for the VM's process, passing on each SIGINT/SIGTERM/SIGHUP this process gets
/// after `seen` as one SIGINT (the child counts them the same way). Sleeps on a pidfd of
/// the child and an eventfd the signal handler writes to, so it wakes only when the child
/// ends or a signal arrives (an idle VM costs this process no wake-ups).
fn wait_forwarding(pid: libc::pid_t, mut seen: u32) -> libc::c_int {
    // SAFETY: pidfd_open of our own child, no flags; the result is checked.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as RawFd;
    // SAFETY: a fresh fd that nothing else owns.
    let pidfd = (raw >= 0).then(|| unsafe { OwnedFd::from_raw_fd(raw) });
    let wake = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).ok();
    let _on_signal = wake.as_ref().map(crate::signals::WakeOnSignal::new);
    loop {
        let mut status = 0;
        // SAFETY: waiting for our own child with a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid || r < 0 {
            return status;
        }
        // A signal counted from here on also writes to `wake`: none is missed by the
        // sleep below.
        let n = crate::signals::count();
        while seen < n {
            seen += 1;
            // SAFETY: kill has no memory effects; `pid` is our live child.
            unsafe { libc::kill(pid, libc::SIGINT) };
        }
        match (&pidfd, &wake) {
            (Some(pidfd), Some(wake)) => {
                let mut pfds = [pidfd.as_raw_fd(), wake.as_raw_fd()].map(|fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                });
                // SAFETY: two valid pollfds for the duration of the call.
                unsafe { libc::poll(pfds.as_mut_ptr(), 2, -1) };
                let _ = wake.read();
            }
            // Without pidfds (Linux before 5.3) or an eventfd: look every 5 ms.
            _ => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn child<F>(cgroup: Option<&VmCgroup>, vm: F) -> Result<Outcome, String>
where
    F: FnOnce() -> Result<Outcome, String>,
{
    die_with_hostd().map_err(|e| e.to_string())?;
    // Its own process group: a terminal's Ctrl-C reaches `hostd run` only, which passes
    // it on once.
    // SAFETY: setpgid on ourselves has no memory effects.
    unsafe { libc::setpgid(0, 0) };
    if let Some(cg) = cgroup {
        cg.enter().map_err(|e| e.to_string())?;
    }
    // SAFETY: unshare with namespace flags has no memory effects.
    if unsafe { libc::unshare(libc::CLONE_NEWIPC | libc::CLONE_NEWUTS) } != 0 {
        return Err(os("unshare(IPC, UTS)").to_string());
    }
    vm()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The child of `fork_into_cgroup` starts in the cgroup, and the C library's idea
    /// of its thread id is its own (a raw clone3 would otherwise leave the parent's).
    #[test]
    fn a_child_is_forked_straight_into_a_v2_cgroup() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            assert!(
                std::env::var_os("CI").is_none(),
                "mounting a cgroup2 hierarchy needs root"
            );
            eprintln!("SKIP: not root (mounting a cgroup2 hierarchy needs it)");
            return;
        }
        let mnt = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let m = std::ffi::CString::new(mnt.path().as_os_str().as_encoded_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
        let ty = c"cgroup2";
        // SAFETY: valid NUL-terminated strings, no data.
        let r = unsafe { libc::mount(ty.as_ptr(), m.as_ptr(), ty.as_ptr(), 0, std::ptr::null()) };
        assert_eq!(r, 0, "mount cgroup2: {}", std::io::Error::last_os_error());
        struct Unmount(std::ffi::CString);
        impl Drop for Unmount {
            fn drop(&mut self) {
                // SAFETY: a valid path; detaching has no memory effects.
                unsafe { libc::umount2(self.0.as_ptr(), libc::MNT_DETACH) };
            }
        }
        let _unmount = Unmount(m);
        let name = format!("hostd-test-{}", std::process::id());
        let dir = mnt.path().join(&name);
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
        let fd = OwnedFd::from(std::fs::File::open(&dir).unwrap_or_else(|e| panic!("{e}")));
        let Some(pid) = fork_into_cgroup(&fd) else {
            panic!(
                "clone3(CLONE_INTO_CGROUP) refused: {}",
                std::io::Error::last_os_error()
            );
        };
        if pid == 0 {
            let cg = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
            let in_cgroup = cg.lines().any(|l| l == format!("0::/{name}"));
            let cached = match own_tid_word() {
                // SAFETY: the C library's own thread-id word of this thread.
                Some((tid, _)) => unsafe { *tid },
                None => -1,
            };
            // SAFETY: gettid has no preconditions.
            let real = unsafe { libc::gettid() };
            // A thread works in the child as after fork.
            let thread = std::thread::spawn(|| 7).join().unwrap_or(0);
            let code = match (in_cgroup, cached == real, thread == 7) {
                (true, true, true) => 0,
                (false, _, _) => 1,
                (_, false, _) => 2,
                _ => 3,
            };
            // SAFETY: ends the child without running the parent's test harness.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: our own child, a valid out-pointer.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        let _ = std::fs::remove_dir(&dir);
        assert!(libc::WIFEXITED(status), "child status {status:#x}");
        assert_eq!(
            libc::WEXITSTATUS(status),
            0,
            "1: not in the cgroup, 2: stale thread id, 3: no thread"
        );
    }

    /// The link count of /proc/self/task follows the threads.
    #[test]
    fn threads_are_counted_from_the_task_directory() {
        // Other tests' threads may come and go between two looks: a few tries.
        let agree = || {
            (0..100)
                .any(|_| threads() == std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count()))
        };
        assert!(agree());
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            let _ = rx.recv();
        });
        assert!(agree());
        drop(tx);
        let _ = t.join();
    }

    #[test]
    fn outcomes_survive_the_pipe() {
        let ok = Ok(Outcome {
            exit_code: 7,
            timings: Timings {
                vm_started_ms: Some(1.5),
                init_started_ms: None,
                first_service_ms: Some(30.25),
                exited_ms: Some(40.0),
                phases: vec![("cgroup".into(), 0.5), ("vm process".into(), 1.25)],
            },
        });
        let back = decode(&encode(&ok)).expect("decodes");
        let o = back.expect("ok");
        assert_eq!(o.exit_code, 7);
        assert_eq!(o.timings.vm_started_ms, Some(1.5));
        assert_eq!(o.timings.init_started_ms, None);
        assert_eq!(o.timings.first_service_ms, Some(30.25));
        assert_eq!(
            o.timings.phases,
            vec![
                ("cgroup".to_string(), 0.5),
                ("vm process".to_string(), 1.25)
            ]
        );
        let err: Result<Outcome, String> = Err("device backend rng died\nline 2".into());
        assert_eq!(
            decode(&encode(&err)).expect("decodes").err().as_deref(),
            Some("device backend rng died\nline 2")
        );
        assert!(decode("").is_none());
    }
}
