//! Starting a root service without copying init: `posix_spawn(3)`.
//!
//! `Command::spawn` forks whenever it must run code in the child (here: clearing the
//! signal mask init keeps blocked, which `posix_spawn` can do but `Command` does not
//! ask it to), and a fork copies init's page tables and makes its next writes
//! copy-on-write faults. On a nested PVM host every one of those is guest kernel work
//! run through KVM's instruction emulator: hello's one `fork`+`exec` took 550-650 ms
//! there, against 240-260 ms with `posix_spawn`, which musl implements with
//! `CLONE_VM | CLONE_VFORK` (the child runs on init's memory until it execs). This path
//! serves services that run as root outside the secrets namespaces (a uid or gid change
//! and the namespaces stay with `Command` and `isolate.rs`), with the same result as
//! `Command`: the program (searched in the child's `PATH` when it has no `/`), its
//! arguments and environment only, stdin from /dev/null, stdout and stderr to the given
//! pipe, `workdir` as its working directory, a process group of its own, no blocked
//! signals, SIGPIPE back to its default, and an error when it cannot be executed.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::sys::cstr;

/// Checks a posix_spawn* return value (an errno, not -1).
fn ok(r: libc::c_int) -> io::Result<()> {
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(r))
    }
}

/// `program` as `execvp` would find it in `path` (the child's `PATH`).
fn resolve(program: &str, path: &str) -> io::Result<CString> {
    if program.contains('/') {
        return cstr(program);
    }
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let candidate = Path::new(dir).join(program);
        let Ok(name) = CString::new(candidate.as_os_str().as_bytes()) else {
            continue;
        };
        // SAFETY: a valid NUL-terminated path; access only reads it.
        if unsafe { libc::access(name.as_ptr(), libc::X_OK) } == 0 && candidate.is_file() {
            return Ok(name);
        }
    }
    Err(io::Error::from_raw_os_error(libc::ENOENT))
}

struct FileActions(libc::posix_spawn_file_actions_t);

impl Drop for FileActions {
    fn drop(&mut self) {
        // SAFETY: initialised in `spawn` before this value was made.
        unsafe { libc::posix_spawn_file_actions_destroy(&mut self.0) };
    }
}

struct Attr(libc::posix_spawnattr_t);

impl Drop for Attr {
    fn drop(&mut self) {
        // SAFETY: initialised in `spawn` before this value was made.
        unsafe { libc::posix_spawnattr_destroy(&mut self.0) };
    }
}

/// Starts `program` with `args` and exactly `env`, as described in the module comment.
/// Returns its pid.
pub fn spawn(
    program: &str,
    args: &[String],
    env: &[(String, String)],
    workdir: &str,
    out: &OwnedFd,
    err: &OwnedFd,
) -> io::Result<libc::pid_t> {
    let child_path = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map_or("", |(_, v)| v.as_str());
    let path = resolve(program, child_path)?;
    let argv_owned = std::iter::once(program)
        .chain(args.iter().map(String::as_str))
        .map(cstr)
        .collect::<io::Result<Vec<_>>>()?;
    let envp_owned = env
        .iter()
        .map(|(k, v)| cstr(&format!("{k}={v}")))
        .collect::<io::Result<Vec<_>>>()?;
    let mut argv: Vec<*mut libc::c_char> =
        argv_owned.iter().map(|s| s.as_ptr().cast_mut()).collect();
    argv.push(std::ptr::null_mut());
    let mut envp: Vec<*mut libc::c_char> =
        envp_owned.iter().map(|s| s.as_ptr().cast_mut()).collect();
    envp.push(std::ptr::null_mut());
    let dev_null = cstr("/dev/null")?;
    let dir = cstr(workdir)?;

    // SAFETY: zeroed is the state posix_spawn_file_actions_init expects to overwrite.
    let mut actions = FileActions(unsafe { std::mem::zeroed() });
    // SAFETY: a valid pointer to storage for the actions.
    ok(unsafe { libc::posix_spawn_file_actions_init(&mut actions.0) })?;
    // SAFETY: here and below, the actions were initialised; every path is a
    // NUL-terminated string that outlives the posix_spawn call; the fds are open.
    ok(unsafe {
        libc::posix_spawn_file_actions_addopen(
            &mut actions.0,
            0,
            dev_null.as_ptr(),
            libc::O_RDONLY,
            0,
        )
    })?;
    // SAFETY: as above.
    ok(unsafe { libc::posix_spawn_file_actions_adddup2(&mut actions.0, out.as_raw_fd(), 1) })?;
    // SAFETY: as above.
    ok(unsafe { libc::posix_spawn_file_actions_adddup2(&mut actions.0, err.as_raw_fd(), 2) })?;
    // SAFETY: as above.
    ok(unsafe { libc::posix_spawn_file_actions_addchdir_np(&mut actions.0, dir.as_ptr()) })?;

    // SAFETY: zeroed is the state posix_spawnattr_init expects to overwrite.
    let mut attr = Attr(unsafe { std::mem::zeroed() });
    // SAFETY: a valid pointer to storage for the attributes.
    ok(unsafe { libc::posix_spawnattr_init(&mut attr.0) })?;
    // SAFETY: sigset_t is plain data that sigemptyset fills.
    let mut none: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut pipe_only: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers to the two sets; SIGPIPE is a valid signal.
    #[allow(clippy::multiple_unsafe_ops_per_block)]
    unsafe {
        libc::sigemptyset(&mut none);
        libc::sigemptyset(&mut pipe_only);
        libc::sigaddset(&mut pipe_only, libc::SIGPIPE);
    }
    // SAFETY: initialised attributes and valid sets, copied by the calls.
    ok(unsafe { libc::posix_spawnattr_setsigmask(&mut attr.0, &none) })?;
    // SAFETY: as above. Rust's runtime ignores SIGPIPE, and an ignored signal stays
    // ignored across exec; Command resets it the same way.
    ok(unsafe { libc::posix_spawnattr_setsigdefault(&mut attr.0, &pipe_only) })?;
    // SAFETY: initialised attributes; 0 makes the child the leader of a new group.
    ok(unsafe { libc::posix_spawnattr_setpgroup(&mut attr.0, 0) })?;
    let flags =
        libc::POSIX_SPAWN_SETSIGMASK | libc::POSIX_SPAWN_SETSIGDEF | libc::POSIX_SPAWN_SETPGROUP;
    // SAFETY: initialised attributes; the flags are valid posix_spawn flags.
    ok(unsafe { libc::posix_spawnattr_setflags(&mut attr.0, flags as libc::c_short) })?;

    let mut pid: libc::pid_t = 0;
    // SAFETY: every pointer is valid for the call: the path, the NULL-terminated argv
    // and envp arrays of NUL-terminated strings, the initialised actions and attributes.
    // musl's posix_spawn returns the child's exec (or set-up) error, if any.
    ok(unsafe {
        libc::posix_spawn(
            &mut pid,
            path.as_ptr(),
            &actions.0,
            &attr.0,
            argv.as_ptr(),
            envp.as_ptr(),
        )
    })?;
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn run(
        program: &str,
        args: &[&str],
        env: &[(&str, &str)],
        dir: &str,
    ) -> (io::Result<i32>, String) {
        let (mut read, write) = crate::spawn::pipe().expect("pipe");
        let err = write.try_clone().expect("dup");
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let r = spawn(program, &args, &env, dir, &write, &err);
        drop((write, err));
        let mut out = String::new();
        if let Ok(pid) = &r {
            read.read_to_string(&mut out).expect("read");
            let mut status = 0;
            // SAFETY: our own child; status is a valid out-pointer.
            unsafe { libc::waitpid(*pid, &mut status, 0) };
        }
        (r, out)
    }

    /// The child gets what `Command` would give it even though this process blocks
    /// signals and ignores SIGPIPE, as init does.
    #[test]
    fn the_child_starts_clean() {
        // SAFETY: sigset_t is plain data; blocking SIGUSR1 in this test thread (the
        // spawning one, whose mask a posix_spawn child would inherit) and ignoring
        // SIGPIPE (Rust's runtime already does) have no memory effects.
        #[allow(clippy::multiple_unsafe_ops_per_block)]
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGUSR1);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        }
        // grep itself reports what it was started with (a shell would reset its mask).
        let (r, status) = run(
            "grep",
            &["-E", "^(SigBlk|SigIgn)", "/proc/self/status"],
            &[("PATH", "/usr/bin:/bin")],
            "/",
        );
        r.expect("spawn grep");
        assert!(status.contains("SigBlk:\t0000000000000000"), "{status}");
        let (r, out) = run(
            "sh",
            &[
                "-c",
                "pwd; echo \"$HOME $X\"; wc -c; echo pgid $(cut -d' ' -f5 /proc/$$/stat) >&2",
            ],
            &[("PATH", "/usr/bin:/bin"), ("HOME", "/h"), ("X", "y")],
            "/tmp",
        );
        let pid = r.expect("spawn");
        // SIGPIPE (bit 12) is not ignored. (glibc's posix_spawn, which these host tests
        // use, leaves its own internal signals 32 and 33 ignored; musl's, in the guest,
        // does not.)
        let ignored = status
            .split("SigIgn:\t")
            .nth(1)
            .and_then(|s| s.get(..16))
            .and_then(|h| u64::from_str_radix(h, 16).ok());
        assert_eq!(ignored.map(|m| m & (1 << 12)), Some(0), "{status}");
        assert!(out.contains("/tmp\n"), "{out}");
        assert!(out.contains("/h y\n"), "{out}");
        assert!(out.contains("\n0\n"), "stdin is /dev/null: {out}");
        let pgid = out
            .split("pgid ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse::<i32>().ok());
        assert_eq!(pgid, Some(pid), "{out}");
    }

    #[test]
    fn failures_are_errors() {
        let (r, _) = run(
            "no-such-program-here",
            &[],
            &[("PATH", "/usr/bin:/bin")],
            "/",
        );
        assert_eq!(r.err().and_then(|e| e.raw_os_error()), Some(libc::ENOENT));
        let (r, _) = run("/bin/true", &[], &[], "/no/such/dir");
        assert_eq!(r.err().and_then(|e| e.raw_os_error()), Some(libc::ENOENT));
        let (r, _) = run("/etc/passwd", &[], &[], "/");
        assert_eq!(r.err().and_then(|e| e.raw_os_error()), Some(libc::EACCES));
        let (r, _) = run("/bin/true", &["a\0b"], &[], "/");
        assert!(r.is_err());
    }
}
