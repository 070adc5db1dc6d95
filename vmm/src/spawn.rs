//! Starting a device backend without waiting for it: fork, and the parent goes on at
//! once while the child execs.
//!
//! `std::process::Command::spawn` returns only once the child has exec'd (it reads a
//! close-on-exec pipe to report a failed exec), so the VM's process waited for each
//! backend's exec in turn before it could go on with the VM: the exec (tearing down the
//! forked copy of this process's memory, mapping the backend's program) is the child's
//! work and can run on another CPU meanwhile. A failed exec is still reported: the
//! child writes its errno to a pipe before it exits with status 127, and
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
        })
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
    /// `read` is closed everywhere (the child closes its copy) or written to: forked
    /// early, the child waits for its exec (the bulk of a start's work) until its parent
    /// lets it go. Both ends should be close-on-exec.
    pub fn gate(&mut self, read: RawFd, write: RawFd) -> &mut Spawn {
        self.gate = Some((read, write));
        self
    }

    /// Forks; the child execs, the parent returns at once.
    pub fn start(&self) -> io::Result<Started> {
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
        // Everything the child uses is made before the fork: it allocates nothing.
        let mut argv: Vec<*const libc::c_char> = self.argv.iter().map(|a| a.as_ptr()).collect();
        argv.push(std::ptr::null());
        let mut envp: Vec<*const libc::c_char> = self.envp.iter().map(|e| e.as_ptr()).collect();
        envp.push(std::ptr::null());
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: the child calls only async-signal-safe functions on memory prepared
        // above (see `exec_child`) and ends in exec or _exit; this process may have
        // other threads, whose state the child never touches.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            let errno = self.exec_child(parent, null.as_raw_fd(), &argv, &envp);
            let bytes = errno.to_ne_bytes();
            // SAFETY: a write of 4 bytes from a local to our own pipe (async-signal-safe).
            unsafe { libc::write(wr.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
            // SAFETY: _exit is async-signal-safe and ends the child.
            unsafe { libc::_exit(127) }
        }
        Ok(Started {
            pid,
            program: self.program.to_string_lossy().into_owned(),
            exec_error: rd,
            status: None,
        })
    }

    /// In the child: what `Command` does before its exec (a process group of its own,
    /// stdin from /dev/null, an empty signal mask, SIGPIPE at its default), then the
    /// parent-death signal and fds, the namespace, and the exec. Returns the errno of
    /// the step that failed.
    fn exec_child(
        &self,
        parent: libc::pid_t,
        null: RawFd,
        argv: &[*const libc::c_char],
        envp: &[*const libc::c_char],
    ) -> i32 {
        let errno = || {
            io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO)
        };
        // Each call below is a plain system call on integers or on memory prepared
        // before the fork: async-signal-safe, nothing allocated.
        // SAFETY: as above.
        if unsafe { libc::setpgid(0, 0) } != 0 {
            return errno();
        }
        // SAFETY: as above; `null` is open (/dev/null).
        if unsafe { libc::dup2(null, 0) } < 0 {
            return errno();
        }
        // SAFETY: an all-zero sigset_t is a valid value to empty.
        let mut empty: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: a local sigset_t.
        unsafe { libc::sigemptyset(&mut empty) };
        // SAFETY: sets this thread's mask from a local.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) };
        // SAFETY: restores a default disposition.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
        if let Err(e) = crate::jail::die_with_parent_after_exec(parent) {
            return e.raw_os_error().unwrap_or(libc::EIO);
        }
        if let Some(fd) = self.keep_fd {
            // SAFETY: fcntl on an fd number only changes that fd's flags.
            if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } != 0 {
                return errno();
            }
        }
        if let Some(fd) = self.netns {
            // SAFETY: setns on an fd number has no memory effects.
            if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                return errno();
            }
        }
        if let Some((read, write)) = self.gate {
            // SAFETY: close and read on fd numbers, into a local byte.
            unsafe { libc::close(write) };
            let mut b = 0u8;
            loop {
                // SAFETY: as above.
                let n = unsafe { libc::read(read, (&mut b as *mut u8).cast(), 1) };
                if n >= 0 || errno() != libc::EINTR {
                    break;
                }
            }
        }
        // SAFETY: argv and envp are NULL-terminated arrays of NUL-terminated strings that
        // live until the exec; the program is a NUL-terminated path.
        unsafe { libc::execve(self.program.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        errno()
    }
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
    fn runs_the_program_with_its_arguments_and_only_the_kept_environment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("out");
        let script = format!(
            "echo \"$1 ${{PATH:+path}} ${{HOME:-nohome}}\" > {}; read x; echo \"stdin:$x\" >> {}",
            out.display(),
            out.display()
        );
        let mut c = Spawn::new(
            Path::new("/bin/sh"),
            ["-c", &script, "sh", "arg1"],
            &["PATH"],
        )
        .expect("spawn")
        .start()
        .expect("start");
        assert!(wait_end(&mut c).success());
        assert!(c.exec_error().is_none());
        let text = std::fs::read_to_string(&out).expect("out");
        assert_eq!(text, "arg1 path nohome\nstdin:\n");
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
