//! The VMM process's jail: the shared pieces live in `hostd_devices::jail`; this module
//! adds what `hostd run` itself sets up for the processes of one VM: its private runtime
//! directory, the jail ids of the VM, and a clean start for every child it spawns.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

pub mod cgroup;
pub mod netns;
pub mod supervisor;

pub use hostd_devices::jail::caps::drop_capabilities;
pub use hostd_devices::jail::identity::{jail_id, not_dumpable};
pub use hostd_devices::jail::seccomp::*;
pub use hostd_devices::jail::JailError;

/// The environment variables a child of `hostd run` keeps (the log filter); everything
/// else of hostd's environment stays behind.
pub const LOG_ENV: &[&str] = &["HOSTD_LOG", "RUST_LOG", "RUST_BACKTRACE"];

/// Where each VM's private runtime directory is mounted (a tmpfs in the VM's own mount
/// namespace; on the host it stays an empty directory).
pub const RUNTIME_MOUNT: &str = "/run/hostd";

static VM_PID: OnceLock<u32> = OnceLock::new();

/// The host pid of this `hostd run` (recorded at start, before any namespace): the
/// VM's jail ids derive from it.
pub fn vm_pid() -> u32 {
    *VM_PID.get_or_init(std::process::id)
}

/// The uid (= gid) of `slot` of this VM: 0 for the VMM or QEMU, 1.. for the backends.
pub fn vm_jail_id(slot: u32) -> u32 {
    jail_id(vm_pid(), slot)
}

/// This VM's private runtime directory under QEMU (its backends' sockets, its kernel
/// and initrd; the built-in VMM needs none: its backends' sockets have no name), 0700.
/// As root, the calling thread (call it from the thread that starts the VM's
/// processes) moves into a mount namespace of its own and mounts a fresh tmpfs on
/// [`RUNTIME_MOUNT`]: nothing written there ever reaches the host's file system, and it
/// is gone with the last process of the VM, however that process ends (`kill -9`
/// included). Without root, a private temporary directory that is removed on a clean
/// exit only.
pub fn runtime_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| match private_tmpfs() {
        Ok(p) => p,
        Err(e) => {
            tracing::debug!("no private runtime tmpfs ({e}); using a temporary directory");
            match tempfile::Builder::new()
                .prefix("hostd-vm-")
                .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .tempdir()
            {
                Ok(d) => d.keep(),
                Err(_) => std::env::temp_dir(),
            }
        }
    })
}

fn check(what: &str, r: libc::c_int) -> Result<(), JailError> {
    if r != 0 {
        return Err(JailError(format!(
            "{what}: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

fn private_tmpfs() -> Result<PathBuf, JailError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(JailError("not root".into()));
    }
    let dir = PathBuf::from(RUNTIME_MOUNT);
    crate::host::private_dir(&dir)
        .map_err(|e| JailError(format!("mkdir {}: {e}", dir.display())))?;
    // SAFETY: unshare with a namespace flag has no memory effects.
    check("unshare(CLONE_NEWNS)", unsafe {
        libc::unshare(libc::CLONE_NEWNS)
    })?;
    // SAFETY: valid NUL-terminated strings; null data is allowed.
    check("make / private", unsafe {
        libc::mount(
            c"none".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    })?;
    let target = std::ffi::CString::new(RUNTIME_MOUNT).map_err(|e| JailError(e.to_string()))?;
    // SAFETY: valid NUL-terminated strings.
    check("mount tmpfs", unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            // Others may pass through (QEMU, under its own uid, reaches the directories
            // given to it), not list.
            c"mode=0711".as_ptr().cast(),
        )
    })?;
    netns::PRIVATE_MOUNTS.store(true, std::sync::atomic::Ordering::SeqCst);
    Ok(dir)
}

/// Prepares `cmd` to start a child of the VM cleanly: no stdin, only the `keep`
/// variables of hostd's environment, every inherited fd but stdin, stdout and stderr
/// closed on exec (whatever flag it was created with), and — between fork and exec —
/// a request to be killed when the calling thread exits, checked against a parent that
/// died before the request was in place.
pub fn clean_child(cmd: &mut Command, keep: &[&str]) {
    cmd.stdin(Stdio::null());
    cmd.env_clear();
    for k in keep {
        if let Some(v) = std::env::var_os(k) {
            cmd.env(k, v);
        }
    }
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs between fork and exec and makes only raw system calls
    // (prctl, getppid, close_range); it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            crate::spawn::die_with_parent_after_exec(parent)
                .map_err(std::io::Error::from_raw_os_error)
        })
    };
}

fn last_error() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// Address space the built-in VMM may use besides guest memory: its executable, heap,
/// and one stack per thread.
pub const VMM_OVERHEAD_BYTES: u64 = 1 << 30;

/// Set once this process moved into a network namespace of its own
/// ([`empty_netns_for_backends`]): its jail then keeps it rather than creating another.
static OWN_NETNS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Moves the VM's process into an empty network namespace before it starts its device
/// backends, which then share it (`hostd-backend --in-vm-netns`) instead of each
/// creating one: a namespace costs about 1 ms of CPU to create here (its loopback
/// device and per-namespace sysctls) and more in a kernel worker to tear down. The
/// namespace is the one every VM on this host shares ([`netns`], made by the first VM
/// after a boot), or, if that cannot be had, a new one of this VM's own. Nothing is
/// lost: none of these processes may create a socket once jailed (their seccomp
/// filters), the namespace's loopback is down and none of them can raise it, and the
/// VMM and its backends are connected anyway (vhost-user).
///
/// Returns the host's network namespace, which a backend that needs the host's network
/// (net, for its TAP) goes back to before it execs; None without root (nothing
/// changed then).
pub fn empty_netns_for_backends() -> Result<Option<std::os::fd::OwnedFd>, JailError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let host = std::fs::File::open("/proc/self/ns/net")
        .map_err(|e| JailError(format!("/proc/self/ns/net: {e}")))?;
    if let Err(e) = netns::enter_shared(&host) {
        tracing::debug!("the shared empty network namespace: {e}; this VM makes its own");
        // SAFETY: unshare with a namespace flag has no memory effects.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(JailError(format!(
                "unshare(CLONE_NEWNET): {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    OWN_NETNS.store(true, std::sync::atomic::Ordering::SeqCst);
    Ok(Some(host.into()))
}

/// The built-in VMM's jail, taken in two steps once its devices are connected:
/// [`enter_vmm_files`] (new mount (an empty, read-only root), IPC, UTS and network
/// namespaces (the network one already entered when [`empty_netns_for_backends`] ran),
/// Landlock, RLIMIT_AS of the guest's memory plus [`VMM_OVERHEAD_BYTES`], RLIMIT_NPROC)
/// while its VM-creating thread may still be at work, then [`enter_vmm_identity`] (not
/// dumpable, no capabilities, the VM's slot-0 uid) once it is alone, before any other
/// of its threads exist. Without root (no supervisor either), only the capabilities
/// are dropped.
///
/// The options of both steps.
fn vmm_jail(threads: u64, guest_bytes: u64) -> hostd_devices::jail::JailOptions {
    hostd_devices::jail::JailOptions {
        keep_net: OWN_NETNS.load(std::sync::atomic::Ordering::SeqCst),
        id: Some(vm_jail_id(0)),
        parent: None,
        max_address_space: Some(guest_bytes.saturating_add(VMM_OVERHEAD_BYTES)),
        max_threads: Some(threads),
    }
}

/// The first step of the VMM's jail (namespaces, empty root, Landlock, rlimits), for the
/// calling thread: it may run while another thread of the process is still at work
/// (`hostd_devices::jail::enter_filesystem`). Nothing without root.
pub fn enter_vmm_files(threads: u64, guest_bytes: u64) -> Result<(), JailError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    hostd_devices::jail::enter_filesystem(&vmm_jail(threads, guest_bytes))
}

/// The second step of the VMM's jail (not dumpable, no capabilities, the VM's uid),
/// once the calling thread is the process's only one. Without root, only the
/// capabilities are dropped.
pub fn enter_vmm_identity() -> Result<(), JailError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return drop_capabilities();
    }
    // The uid and the parent are all the identity step reads of the options.
    hostd_devices::jail::enter_identity(&vmm_jail(0, 0))?;
    // The uid change cleared the parent-death request.
    supervisor::die_with_hostd()
}

/// Jails the process that runs QEMU (the VM's process under the supervisor) once QEMU
/// and the backends run: the same jail as the built-in VMM's (empty root, Landlock,
/// rlimits, no capabilities) as QEMU's own uid, so that it may still signal QEMU but
/// nothing else. `threads` bounds QEMU's and its threads together (same uid).
pub fn enter_qemu_parent(threads: u64) -> Result<(), JailError> {
    hostd_devices::jail::enter(&hostd_devices::jail::JailOptions {
        keep_net: OWN_NETNS.load(std::sync::atomic::Ordering::SeqCst),
        id: Some(vm_jail_id(0)),
        parent: None,
        max_address_space: None,
        max_threads: Some(threads),
    })?;
    supervisor::die_with_hostd()
}

/// Gives `path` (a directory or file this VM's runtime directory holds) to `id`, so
/// that QEMU, running as `id`, can use it.
pub fn give_to(path: &Path, id: u32) -> Result<(), JailError> {
    std::os::unix::fs::chown(path, Some(id), Some(id))
        .map_err(|e| JailError(format!("chown {}: {e}", path.display())))
}

/// Prepares `cmd` (QEMU) to run as the unprivileged `id` (uid and gid), with
/// `extra_group` (the group of /dev/kvm, when QEMU uses KVM) as its only supplementary
/// group, a network namespace of its own (empty), an empty capability bounding set,
/// no_new_privs, no core dumps, at most `threads` threads and 1024 fds, under the
/// `landlock` ruleset — and, after the uid change that
/// clears it, the request to be killed with its parent again. Call after
/// [`clean_child`].
pub fn run_as(
    cmd: &mut Command,
    id: u32,
    extra_group: Option<u32>,
    threads: u64,
    landlock: Option<hostd_devices::jail::landlock::Prepared>,
) {
    let parent = std::process::id() as libc::pid_t;
    let landlock = std::sync::Mutex::new(landlock);
    // SAFETY: the closure runs between fork and exec and calls only async-signal-safe
    // functions (prctl, setrlimit, setgroups, setres[ug]id, getppid, the landlock
    // system calls); it allocates nothing. The lock is uncontended in the child.
    unsafe {
        cmd.pre_exec(move || {
            become_after_fork(id, extra_group, threads, parent)?;
            let ruleset = landlock.lock().ok().and_then(|mut l| l.take());
            if let Some(r) = ruleset {
                hostd_devices::jail::landlock::apply(r).map_err(std::io::Error::other)?;
            }
            Ok(())
        })
    };
}

/// Between fork and exec: see [`run_as`].
fn become_after_fork(
    id: u32,
    extra_group: Option<u32>,
    threads: u64,
    parent: libc::pid_t,
) -> std::io::Result<()> {
    // QEMU needs no network of its own (a net device's TAP is its backend's): an empty
    // network namespace, the VM's when its process entered one (IPC and UTS are the
    // VM's already).
    if !OWN_NETNS.load(std::sync::atomic::Ordering::SeqCst) {
        // SAFETY: unshare with a namespace flag has no memory effects.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(last_error());
        }
    }
    // prctl calls only: async-signal-safe.
    hostd_devices::jail::caps::drop_bounding_set();
    for (res, limit) in [
        (libc::RLIMIT_CORE, 0),
        (libc::RLIMIT_NPROC, threads),
        (libc::RLIMIT_NOFILE, 1024),
    ] {
        let rl = libc::rlimit {
            rlim_cur: limit,
            rlim_max: limit,
        };
        // SAFETY: a valid rlimit for a valid resource.
        if unsafe { libc::setrlimit(res, &rl) } != 0 {
            return Err(last_error());
        }
    }
    let groups = [extra_group.unwrap_or(id)];
    let n = usize::from(extra_group.is_some());
    // SAFETY: `groups` holds at least `n` gids.
    if unsafe { libc::setgroups(n, groups.as_ptr()) } != 0 {
        return Err(last_error());
    }
    // SAFETY: plain integer arguments.
    if unsafe { libc::setresgid(id, id, id) } != 0 {
        return Err(last_error());
    }
    // SAFETY: plain integer arguments.
    if unsafe { libc::setresuid(id, id, id) } != 0 {
        return Err(last_error());
    }
    // SAFETY: prctl with integer arguments has no memory effects.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(last_error());
    }
    // The uid change cleared the parent-death request: ask again, check again.
    // SAFETY: prctl with integer arguments has no memory effects.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
        return Err(last_error());
    }
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } != parent {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(1) };
    }
    Ok(())
}
