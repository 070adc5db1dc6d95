//! Device backends speaking vhost-user: each runs in its own jailed process (see
//! [`crate::jail`]) and gets from the VMM (ours or QEMU) only the guest memory fds, the
//! queue addresses and the kick/call eventfds.
//!
//! - [`rng`]: virtio-rng from getrandom(2).
//! - [`block`]: virtio-blk over one file region: the image's read-only root file system
//!   (every 4 KiB block checked against its recorded sha256) or a read-write volume.
//! - [`net`]: virtio-net over a TAP device.
//! - [`vsock`]: virtio-vsock whose host side (secrets, echo) lives in the backend;
//!   capability connections go over [`cap_link`] to `hostd run`'s relay.

pub mod block;
pub mod cap_link;
pub mod net;
pub mod rng;
pub mod vsock;

use std::io;
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackendMut, VhostUserDaemon, VringRwLock, VringT};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::jail;

/// Guest memory as the backends see it.
pub type Memory = GuestMemoryAtomic<GuestMemoryMmap>;
/// A descriptor chain over that memory.
pub type Chain = DescriptorChain<GuestMemoryLoadGuard<GuestMemoryMmap>>;

/// Why a backend stopped.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// Setting up failed (socket, files, jail, filter).
    #[error("{0}")]
    Setup(String),
    /// The vhost-user connection failed.
    #[error("vhost-user: {0}")]
    Protocol(String),
}

/// Pops every available chain of `vring`, lets `handle` serve it (returning how many
/// bytes it wrote into the chain), returns it as used, and signals the driver. Loops
/// until the driver offers nothing more, with notifications re-enabled.
pub fn drain<F>(vring: &VringRwLock, mem: &Memory, mut handle: F) -> io::Result<()>
where
    F: FnMut(Chain) -> u32,
{
    loop {
        vring
            .disable_notification()
            .map_err(|e| io::Error::other(e.to_string()))?;
        let mut used = false;
        {
            let mut state = vring.get_mut();
            let queue = state.get_queue_mut();
            while let Some(chain) = queue.pop_descriptor_chain(mem.memory()) {
                let head = chain.head_index();
                let len = handle(chain);
                queue
                    .add_used(&*mem.memory(), head, len)
                    .map_err(|e| io::Error::other(e.to_string()))?;
                used = true;
            }
        }
        if used
            && vring
                .needs_notification()
                .map_err(|e| io::Error::other(e.to_string()))?
        {
            vring.signal_used_queue()?;
        }
        if !vring
            .enable_notification()
            .map_err(|e| io::Error::other(e.to_string()))?
        {
            return Ok(());
        }
    }
}

/// Where a backend takes its one vhost-user connection from.
#[derive(Debug)]
pub enum Socket {
    /// Bind and listen on this path (a backend started by hand).
    Bind(PathBuf),
    /// A socket already listening, inherited from the VMM that started the backend and
    /// bound there at `path` (`hostd run` binds each backend's socket itself, so that it
    /// can connect at once, with no wait for the backend to come up: the connection
    /// waits in the socket's backlog until the backend accepts it).
    Inherited {
        /// The listening socket.
        fd: OwnedFd,
        /// Where the VMM bound it (for messages).
        path: PathBuf,
    },
}

impl Socket {
    /// An inherited fd, checked to be a listening Unix stream socket: anything else is
    /// refused with a clear error rather than failing later in accept.
    pub fn inherited(fd: RawFd, path: PathBuf) -> io::Result<Socket> {
        let option = |name: libc::c_int| -> io::Result<libc::c_int> {
            let mut value: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: getsockopt with a valid int out-pointer and its length; a bad fd or
            // one that is no socket gives EBADF or ENOTSOCK.
            let r = unsafe {
                libc::getsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    name,
                    (&mut value as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            if r == 0 {
                Ok(value)
            } else {
                Err(io::Error::last_os_error())
            }
        };
        let checked = (|| {
            Ok::<_, io::Error>(
                option(libc::SO_DOMAIN)? == libc::AF_UNIX
                    && option(libc::SO_TYPE)? == libc::SOCK_STREAM
                    && option(libc::SO_ACCEPTCONN)? != 0,
            )
        })();
        match checked {
            Ok(true) => {}
            Ok(false) => {
                return Err(io::Error::other(format!(
                    "fd {fd} is not a listening Unix stream socket"
                )))
            }
            Err(e) => return Err(io::Error::other(format!("fd {fd}: {e}"))),
        }
        // SAFETY: checked above to be an open socket; this process owns it from now on
        // (it was inherited for exactly this use).
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Ok(Socket::Inherited { fd, path })
    }

    /// The path, for messages.
    pub fn path(&self) -> &Path {
        match self {
            Socket::Bind(p) => p,
            Socket::Inherited { path, .. } => path,
        }
    }

    fn listen(self) -> io::Result<Listener> {
        match self {
            Socket::Bind(path) => {
                Listener::new(&path, true).map_err(|e| io::Error::other(e.to_string()))
            }
            Socket::Inherited { fd, .. } => Ok(Listener::from(UnixListener::from(fd))),
        }
    }
}

/// Serves one vhost-user connection on `socket` with `backend`: binds the socket, enters
/// the jail `sandbox` describes (none with `None`: --no-sandbox), installs `filter`,
/// accepts the VMM's connection, and returns when the VMM hangs up.
pub fn serve<B>(
    name: &str,
    socket: Socket,
    backend: B,
    sandbox: Option<&jail::JailOptions>,
    filter: impl FnOnce() -> Result<seccompiler::BpfProgram, jail::JailError>,
    selftest: Option<&str>,
) -> Result<(), BackendError>
where
    B: VhostUserBackendMut<Bitmap = (), Vring = VringRwLock> + Send + Sync + 'static,
{
    serve_inner(name, socket, backend, sandbox, filter, selftest, &[], false)
}

/// [`serve`], with extra fds the backend's worker watches, and the frontend's messages
/// passed through [`net::frontend_relay`] (QEMU 7.2's `-netdev vhost-user` sends
/// SET_VRING_ENABLE too early for vhost-user-backend; see there). Each `(fd, id)` is
/// registered edge-triggered for input with the worker's epoll, and readiness arrives
/// as `handle_event(id, ..)` (ids up to and including the backend's number of queues
/// are the library's own).
pub fn serve_with_listeners<B>(
    name: &str,
    socket: Socket,
    backend: B,
    sandbox: Option<&jail::JailOptions>,
    filter: impl FnOnce() -> Result<seccompiler::BpfProgram, jail::JailError>,
    selftest: Option<&str>,
    listeners: &[(RawFd, u16)],
) -> Result<(), BackendError>
where
    B: VhostUserBackendMut<Bitmap = (), Vring = VringRwLock> + Send + Sync + 'static,
{
    let listeners: Vec<(RawFd, u16, EventSet)> = listeners
        .iter()
        .map(|(fd, id)| (*fd, *id, EventSet::IN | EventSet::EDGE_TRIGGERED))
        .collect();
    serve_inner(
        name, socket, backend, sandbox, filter, selftest, &listeners, true,
    )
}

/// [`serve`], with extra fds the backend's worker watches (see
/// [`serve_with_listeners`]), without the frontend relay.
pub fn serve_watching<B>(
    name: &str,
    socket: Socket,
    backend: B,
    sandbox: Option<&jail::JailOptions>,
    filter: impl FnOnce() -> Result<seccompiler::BpfProgram, jail::JailError>,
    selftest: Option<&str>,
    listeners: &[(RawFd, u16, EventSet)],
) -> Result<(), BackendError>
where
    B: VhostUserBackendMut<Bitmap = (), Vring = VringRwLock> + Send + Sync + 'static,
{
    serve_inner(
        name, socket, backend, sandbox, filter, selftest, listeners, false,
    )
}

type Daemon<B> = VhostUserDaemon<Arc<RwLock<B>>>;

/// A daemon for `backend` with `listeners` registered on its (first) worker.
fn new_daemon<B>(
    name: &str,
    backend: &Arc<RwLock<B>>,
    listeners: &[(RawFd, u16, EventSet)],
) -> Result<Daemon<B>, BackendError>
where
    B: VhostUserBackendMut<Bitmap = (), Vring = VringRwLock> + Send + Sync + 'static,
{
    let setup =
        |what: &str, e: &dyn std::fmt::Display| BackendError::Setup(format!("{name}: {what}: {e}"));
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let daemon = VhostUserDaemon::new(name.to_string(), backend.clone(), mem)
        .map_err(|e| setup("vhost-user daemon", &e))?;
    if !listeners.is_empty() {
        let handlers = daemon.get_epoll_handlers();
        let worker = handlers
            .first()
            .ok_or_else(|| setup("epoll", &"the daemon has no worker"))?;
        for (fd, id, events) in listeners {
            worker
                .register_listener(*fd, *events, u64::from(*id))
                .map_err(|e| setup(&format!("watching fd {fd} as event {id}"), &e))?;
        }
    }
    Ok(daemon)
}

#[allow(clippy::too_many_arguments)]
fn serve_inner<B>(
    name: &str,
    socket: Socket,
    backend: B,
    sandbox: Option<&jail::JailOptions>,
    filter: impl FnOnce() -> Result<seccompiler::BpfProgram, jail::JailError>,
    selftest: Option<&str>,
    listeners: &[(RawFd, u16, EventSet)],
    relay: bool,
) -> Result<(), BackendError>
where
    B: VhostUserBackendMut<Bitmap = (), Vring = VringRwLock> + Send + Sync + 'static,
{
    let setup =
        |what: &str, e: &dyn std::fmt::Display| BackendError::Setup(format!("{name}: {what}: {e}"));
    let path = socket.path().to_path_buf();
    let mut listener = socket
        .listen()
        .map_err(|e| setup(&format!("listen on {}", path.display()), &e))?;
    let backend = Arc::new(RwLock::new(backend));
    // glibc gives each new thread its own malloc arena, and the first time such an
    // arena shrinks it opens /proc/sys/vm/overcommit_memory, which the jail forbids
    // (measured: the rootfs backend's vring worker died with SIGSYS on openat). One
    // arena for every thread never does.
    // SAFETY: mallopt only sets an allocator parameter; no thread runs yet.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1)
    };
    if let Some(opts) = sandbox {
        jail::enter(opts).map_err(|e| setup("jail", &e))?;
    }
    // Inside the jail's own network namespace, before the filter (socket, bind, connect).
    let inner = if relay {
        Some(net::frontend_relay::inner_pair(name).map_err(|e| setup("relay socket", &e))?)
    } else {
        None
    };
    if selftest == Some("open-passwd") {
        // The jail leaves nothing to open: report what open(2) says, then go on.
        match std::fs::File::open("/etc/passwd") {
            Ok(_) => eprintln!("selftest: open /etc/passwd: succeeded"),
            Err(e) => eprintln!("selftest: open /etc/passwd: {e}"),
        }
        std::mem::forget(listener);
        return Ok(());
    }
    let prog = match sandbox {
        Some(_) => Some(filter().map_err(|e| setup("seccomp filter", &e))?),
        None => None,
    };
    // The start is done (exec, jail, filter compiled): the backend's normal priority
    // back, if the VMM started it at the lowest.
    jail::end_low_priority_start();
    if let Some(prog) = prog {
        jail::seccomp::install(&prog).map_err(|e| setup("seccomp", &e))?;
    }
    // The daemon starts its vring worker thread, the one that handles what the guest
    // writes: only now, so that it inherits the jail and the filter (namespaces,
    // capabilities, Landlock and seccomp are per thread).
    let mut daemon = new_daemon(name, &backend, listeners)?;
    if let Some(test) = selftest {
        if let Some((what, call)) = forbidden_call(test) {
            eprintln!("selftest: calling {what}, which no backend filter allows");
            call();
            eprintln!("selftest: {what} was allowed");
            leave(daemon, listener);
            return Ok(());
        }
    }
    tracing::debug!("{name}: waiting for the VMM on {}", path.display());
    let result = match inner {
        None => {
            daemon
                .start(&mut listener)
                .map_err(|e| BackendError::Protocol(e.to_string()))?;
            daemon.wait()
        }
        Some((inner_listener, inner_client)) => {
            daemon
                .start(&mut Listener::from(inner_listener))
                .map_err(|e| BackendError::Protocol(e.to_string()))?;
            let frontend = loop {
                match listener.accept() {
                    Ok(Some(s)) => break Ok(s),
                    Ok(None) => continue,
                    Err(e) => break Err(e),
                }
            };
            match frontend {
                Ok(frontend) => {
                    if let Err(e) = net::frontend_relay::relay(frontend, inner_client) {
                        tracing::debug!("{name}: relay: {e}");
                    }
                    daemon.wait()
                }
                Err(e) => {
                    leave(daemon, listener);
                    return Err(BackendError::Protocol(e.to_string()));
                }
            }
        }
    };
    leave(daemon, listener);
    match result {
        Ok(()) => Ok(()),
        // The VMM going away is how a backend's life normally ends.
        Err(e) if e.to_string().contains("disconnect") || e.to_string().contains("Disconnect") => {
            Ok(())
        }
        Err(e) => Err(BackendError::Protocol(e.to_string())),
    }
}

/// The selftests that make one call a backend's filter must deny (the process should
/// die with SIGSYS before it reports back).
fn forbidden_call(test: &str) -> Option<(&'static str, fn())> {
    use crate::jail::seccomp::probes;
    fn socket() {
        // SAFETY: a raw syscall with integer arguments.
        unsafe { libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0) };
    }
    fn prctl_other() {
        // SAFETY: prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) };
    }
    match test {
        "forbidden-syscall" => Some(("socket(2)", socket)),
        "mmap-exec" => Some(("mmap(2) with PROT_EXEC", probes::mmap_exec)),
        "mprotect-exec" => Some(("mprotect(2) with PROT_EXEC", probes::mprotect_exec)),
        "fork" => Some(("clone(2) without CLONE_THREAD", probes::new_process)),
        "prctl-dumpable" => Some(("prctl(PR_SET_DUMPABLE)", prctl_other)),
        _ => None,
    }
}

/// Ends a backend's use of its daemon and listener without dropping them: the vring
/// worker threads stay parked in epoll_wait and dropping the daemon would join them
/// forever, and dropping the listener would unlink the socket, which the jail forbids
/// (the VMM that started us removes its socket directory). The process exits next.
fn leave<B>(daemon: VhostUserDaemon<B>, listener: Listener)
where
    B: vhost_user_backend::VhostUserBackend + Clone + 'static,
{
    std::mem::forget(daemon);
    std::mem::forget(listener);
}

/// Bytes `[offset, offset + size)` of a device's config space, zero-filled past its end
/// (the front end asks with its own offsets and sizes).
pub fn config_window(config: &[u8], offset: u32, size: u32) -> Vec<u8> {
    let start = (offset as usize).min(config.len());
    let end = start.saturating_add(size as usize).min(config.len());
    let mut out = config[start..end].to_vec();
    out.resize(size as usize, 0);
    out
}

/// The vring a kick event is for: the daemon reports queue kicks as `device_event` =
/// queue index, with `EventSet::IN`.
pub fn kicked_vring(
    device_event: u16,
    evset: vmm_sys_util::epoll::EventSet,
    vrings: &[VringRwLock],
) -> io::Result<&VringRwLock> {
    if evset != vmm_sys_util::epoll::EventSet::IN {
        return Err(io::Error::other(format!("unexpected event set {evset:?}")));
    }
    vrings
        .get(usize::from(device_event))
        .ok_or_else(|| io::Error::other(format!("event for unknown queue {device_event}")))
}

/// Ring features every backend offers: indirect descriptors and event indexes (both
/// handled by virtio-queue). QEMU's vhost-user front ends set them whether or not they
/// were offered, and a backend must then accept them.
pub const RING_FEATURES: u64 = (1 << 28) | (1 << 29);

/// Syscalls every vhost-user backend needs after the jail: the vhost-user protocol
/// (accept, messages with fds, mapping guest memory from the fds it receives), the
/// epoll worker, eventfds, threads.
pub const BACKEND_SYSCALLS: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    // Threads only (see jail::seccomp::filter: clone needs CLONE_THREAD, and clone3 is
    // answered with ENOSYS so the C library falls back to clone).
    libc::SYS_clone,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    // Naming threads only (jail::seccomp::PRCTL_OPTIONS).
    libc::SYS_prctl,
    libc::SYS_shutdown,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_dup,
    libc::SYS_fcntl,
    // Never with PROT_EXEC (jail::seccomp::filter), like mmap.
    libc::SYS_mprotect,
    // Creating the daemon after the filter: its signal setup and std's hash seeds.
    libc::SYS_rt_sigaction,
    libc::SYS_getrandom,
    libc::SYS_sched_getaffinity,
    libc::SYS_poll,
    libc::SYS_ppoll,
];

/// The filter for a backend: [`jail::seccomp::COMMON_SYSCALLS`], [`BACKEND_SYSCALLS`]
/// and the device's own `extra` syscalls; no ioctls.
pub fn backend_filter(extra: &[i64]) -> Result<seccompiler::BpfProgram, jail::JailError> {
    let mut syscalls = jail::seccomp::COMMON_SYSCALLS.to_vec();
    syscalls.extend_from_slice(BACKEND_SYSCALLS);
    syscalls.extend_from_slice(extra);
    jail::seccomp::filter(&syscalls, &[])
}
