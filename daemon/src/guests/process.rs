//! One guest's VM process: `hostd run IMAGE …` in its own session, its console appended
//! to a file, watched through a pidfd.

use std::fs::OpenOptions;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use tokio::io::unix::AsyncFd;

use crate::fleet::{self, Vmm};

/// How a process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
    /// Ended while not our child (re-adopted): its status is not ours to read.
    Unknown,
}

impl Exit {
    /// Whether this is a clean exit (code 0).
    pub fn clean(&self) -> bool {
        *self == Exit::Code(0)
    }
    /// The exit code, when there is one.
    pub fn code(&self) -> Option<i32> {
        match self {
            Exit::Code(c) => Some(*c),
            _ => None,
        }
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exited with code {c}"),
            Exit::Signal(s) => write!(f, "killed by signal {s}"),
            Exit::Unknown => write!(f, "exited (adopted, status unknown)"),
        }
    }
}

/// The arguments of `hostd run` for a guest.
pub fn run_args(decl: &fleet::Guest, image: &Path, volumes: &Path) -> Vec<String> {
    let mut a = vec!["run".to_owned(), "--vmm".to_owned()];
    a.push(
        match decl.vmm {
            Vmm::Builtin => "kvm",
            Vmm::Qemu => "qemu",
        }
        .to_owned(),
    );
    if let Some(v) = decl.vcpus {
        a.push(format!("--vcpus={v}"));
    }
    if let Some(m) = &decl.memory {
        a.push(format!("--mem={m}"));
    }
    if let Some(n) = &decl.net {
        a.push(format!("--net={n}"));
    }
    for (name, file) in &decl.secrets {
        a.push(format!("--secret={name}=@{}", file.display()));
    }
    for k in &decl.trust {
        a.push(format!("--trust={}", k.display()));
    }
    a.push(format!("--state-dir={}", volumes.display()));
    a.push(image.display().to_string());
    a
}

/// Starts `runner ARGS` in its own session with stdout and stderr appended to
/// `console`. The process is not tied to the daemon's life: it survives a daemon crash.
pub fn spawn(runner: &Path, args: &[String], console: &Path) -> std::io::Result<Child> {
    let log = OpenOptions::new().create(true).append(true).open(console)?;
    let err = log.try_clone()?;
    let mut cmd = Command::new(runner);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(err));
    // SAFETY: the hook only calls setsid, which is async-signal-safe, allocates nothing
    // and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(new_session);
    }
    cmd.spawn()
}

/// setsid(): the child leaves the daemon's session and process group.
fn new_session() -> std::io::Result<()> {
    // SAFETY: setsid takes no arguments and touches no memory.
    if unsafe { libc::setsid() } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Field 22 of /proc/PID/stat (the process's start time in clock ticks since boot),
/// or None when there is no such process.
pub fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: split after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    // rest starts at field 3; field 22 is the 20th after it.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the process `pid` is a zombie (exited, not yet reaped).
pub fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rfind(')')
                .and_then(|i| s[i + 1..].split_whitespace().next().map(|st| st == "Z"))
        })
        .unwrap_or(false)
}

/// A pidfd for `pid`.
pub fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(std::io::Error::other)?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is
    // passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(std::io::Error::other)?;
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Waits until the process behind `pidfd` has exited; for our own child, reaps it and
/// returns its status.
pub async fn wait(pidfd: OwnedFd, child: Option<Child>) -> Exit {
    // SAFETY: an OwnedFd is a valid open fd, moved into the AsyncFd, which owns it until
    // dropped and always returns the same fd.
    let registered =
        unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) };
    match registered {
        Ok(fd) => {
            // A pidfd becomes readable once when the process exits.
            if let Ok(mut g) = fd.readable().await {
                g.retain_ready();
            }
        }
        Err(e) => tracing::warn!("cannot watch a pidfd: {e}"),
    }
    match child {
        Some(mut c) => match c.wait() {
            Ok(s) => {
                use std::os::unix::process::ExitStatusExt;
                match (s.code(), s.signal()) {
                    (Some(c), _) => Exit::Code(c),
                    (None, Some(sig)) => Exit::Signal(sig),
                    _ => Exit::Unknown,
                }
            }
            Err(_) => Exit::Unknown,
        },
        None => Exit::Unknown,
    }
}

/// Sends `sig` to `pid` (or, negative, to its process group).
pub fn signal(pid: i32, sig: i32) {
    // SAFETY: kill takes no memory; the worst a stale pid can do is signal nothing.
    unsafe { libc::kill(pid, sig) };
}

/// The console file of a guest.
pub fn console_path(guest_dir: &Path) -> PathBuf {
    guest_dir.join("console.log")
}
