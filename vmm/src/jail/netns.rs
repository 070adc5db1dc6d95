//! One empty network namespace for every VM's jailed processes on this host.
//!
//! The VM's process and its device backends (but net's, which makes its own after
//! opening its TAP) live in an empty network namespace. Making a fresh one per VM
//! (`unshare(CLONE_NEWNET)`: the loopback device, the per-namespace sysctls) cost ~0.95
//! ms of CPU per probe run on this host (`perf record` of 20 runs: `copy_net_ns`, the
//! largest item of the VM process's set-up) plus its teardown in a kernel worker. So
//! the first VM after a boot makes one and bind-mounts it on [`PATH`] (under /run,
//! cleared at boot; root only), and every later VM joins it with `setns`.
//!
//! Nothing is lost by sharing it: none of these processes may create a socket once
//! jailed (their seccomp filters allow no `socket`, `socketpair`, `bind` or `connect`),
//! the namespace's loopback is down and none of them may raise it (no capabilities);
//! what a VM's processes share with each other they share through the file
//! descriptors `hostd run` gives them, not the network. A namespace that turns out to
//! be the host's own, or a [`PATH`] that is not a namespace (its mount gone, e.g. made
//! inside `ip netns exec`'s private mount namespace), is replaced; anything that fails
//! falls back to a namespace of the VM's own, as before.

use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Where the shared empty network namespace is mounted (`umount` it to drop it).
pub const PATH: &str = "/run/hostd/empty-netns";

/// Set once the process (its thread that starts the VM's processes) has its private
/// /run/hostd (`jail::runtime_dir`): [`PATH`] is out of its sight from then on. So
/// under `--vmm qemu`, whose VM process makes that directory first, each VM makes a
/// namespace of its own, as before.
pub(crate) static PRIVATE_MOUNTS: AtomicBool = AtomicBool::new(false);

/// Moves the calling thread into the shared empty network namespace, making it first
/// if there is none. `host` is the thread's namespace before (which the shared one must
/// not be). Err(reason) leaves the thread where it was.
pub fn enter_shared(host: &std::fs::File) -> Result<(), String> {
    if PRIVATE_MOUNTS.load(Ordering::SeqCst) {
        return Err("this process has its private /run/hostd already".into());
    }
    let host_ino = host.metadata().map_err(|e| e.to_string())?.ino();
    if join(host_ino).is_ok() {
        return Ok(());
    }
    let dir = Path::new(PATH).parent().unwrap_or(Path::new("/"));
    crate::host::private_dir(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    // One maker at a time; whoever waited joins what the first made.
    let lock = std::fs::File::open(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    // SAFETY: flock on an open fd has no memory effects; the lock goes with the fd.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(format!("flock {}: {}", dir.display(), last_error()));
    }
    if join(host_ino).is_ok() {
        return Ok(());
    }
    make(host)
}

/// Joins the namespace at [`PATH`] if it is one and not the host's (`host_ino`).
fn join(host_ino: u64) -> Result<(), String> {
    let ns = std::fs::File::open(PATH).map_err(|e| e.to_string())?;
    let ino = ns.metadata().map_err(|e| e.to_string())?.ino();
    if ino == host_ino {
        return Err("it is the host's own network namespace".into());
    }
    // SAFETY: setns on an open fd has no memory effects; a file that is not a network
    // namespace is refused (EINVAL) and nothing changes.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!("setns: {}", last_error()));
    }
    Ok(())
}

/// Makes a new empty namespace, enters it and mounts it on [`PATH`]; on failure, goes
/// back to `host`.
fn make(host: &std::fs::File) -> Result<(), String> {
    // SAFETY: unshare with a namespace flag has no memory effects.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(format!("unshare(CLONE_NEWNET): {}", last_error()));
    }
    let mounted = (|| {
        let target = std::ffi::CString::new(PATH).map_err(|e| e.to_string())?;
        // Whatever is mounted there is not a namespace this VM may join: gone with it.
        for _ in 0..8 {
            // SAFETY: a NUL-terminated path; a lazy unmount has no memory effects.
            if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
                break;
            }
        }
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(PATH)
            .map_err(|e| format!("create {PATH}: {e}"))?;
        // SAFETY: NUL-terminated paths; a bind mount has no data argument.
        let r = unsafe {
            libc::mount(
                c"/proc/thread-self/ns/net".as_ptr(),
                target.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            )
        };
        if r != 0 {
            return Err(format!("bind-mount on {PATH}: {}", last_error()));
        }
        Ok(())
    })();
    if let Err(e) = mounted {
        // SAFETY: setns on an open fd has no memory effects.
        if unsafe { libc::setns(host.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            // The thread is in a fresh empty namespace of its own: as good as before.
            tracing::debug!("back to the host's network namespace: {}", last_error());
        }
        return Err(e);
    }
    Ok(())
}

fn last_error() -> std::io::Error {
    std::io::Error::last_os_error()
}
