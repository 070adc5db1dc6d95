//! Device backends as separate, jailed processes (`hostd backend …`) speaking
//! vhost-user: started before the VMM, watched while it runs, killed after.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// One device backend to start.
#[derive(Debug, Clone)]
pub enum DeviceBackend {
    /// virtio-rng.
    Rng,
    /// virtio-blk over a file region.
    Block {
        /// Serial number the guest sees; also names the backend in messages.
        id: String,
        /// The file.
        file: PathBuf,
        /// Region start.
        offset: u64,
        /// Region length.
        length: u64,
        /// Refuse writes.
        read_only: bool,
        /// Per-block hash table in the same file: offset, length, sha256 of the table.
        verity: Option<(u64, u64, String)>,
    },
    /// virtio-net over an existing TAP device on the host.
    Net {
        /// The TAP interface.
        tap: String,
        /// The guest's MAC address (52:54:00:12:34:56 form).
        mac: String,
    },
    /// virtio-vsock with the host side in the backend (secrets on port 1025, echo on
    /// 1026).
    Vsock {
        /// The guest's CID.
        cid: u64,
        /// Secrets to deliver: name and the host file holding the value (the backend
        /// reads it; values never go on a command line).
        secrets: Vec<(String, PathBuf)>,
        /// The capability relay to carry capability ports to, if any.
        caps: Option<CapsLink>,
    },
}

/// Where the vsock backend sends capability connections: the Unix socket of `hostd
/// run`'s capability relay, and how many capability ports to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapsLink {
    /// The relay's socket (the backend connects before it jails itself).
    pub socket: PathBuf,
    /// The file holding the run's capability token, delivered to guest init as the
    /// secret [`hostd_images::abi::CAPS_TOKEN_SECRET`].
    pub token: PathBuf,
    /// Capability ports (1100..1100+count).
    pub count: u32,
}

impl DeviceBackend {
    pub(crate) fn name(&self) -> String {
        match self {
            DeviceBackend::Rng => "rng".into(),
            DeviceBackend::Block { id, .. } => format!("blk-{id}"),
            DeviceBackend::Net { tap, .. } => format!("net-{tap}"),
            DeviceBackend::Vsock { .. } => "vsock".into(),
        }
    }

    fn args(&self) -> Vec<String> {
        match self {
            DeviceBackend::Rng => vec!["rng".into()],
            DeviceBackend::Block {
                id,
                file,
                offset,
                length,
                read_only,
                verity,
            } => {
                let mut a = vec![
                    "block".into(),
                    "--id".into(),
                    id.clone(),
                    "--file".into(),
                    file.to_string_lossy().into_owned(),
                    "--offset".into(),
                    offset.to_string(),
                    "--length".into(),
                    length.to_string(),
                ];
                if *read_only {
                    a.push("--read-only".into());
                }
                if let Some((o, l, d)) = verity {
                    a.push("--verity".into());
                    a.push(format!("{o}:{l}:{d}"));
                }
                a
            }
            DeviceBackend::Net { tap, mac } => vec![
                "net".into(),
                "--tap".into(),
                tap.clone(),
                "--mac".into(),
                mac.clone(),
            ],
            DeviceBackend::Vsock { cid, secrets, caps } => {
                let mut a = vec!["vsock".into(), "--cid".into(), cid.to_string()];
                for (name, path) in secrets {
                    a.push("--secret".into());
                    a.push(format!("{name}={}", path.to_string_lossy()));
                }
                if let Some(link) = caps {
                    a.push("--secret".into());
                    a.push(format!(
                        "{}={}",
                        hostd_images::abi::CAPS_TOKEN_SECRET,
                        link.token.to_string_lossy()
                    ));
                    a.push("--caps".into());
                    a.push(link.count.to_string());
                    a.push("--caps-link".into());
                    a.push(link.socket.to_string_lossy().into_owned());
                }
                a
            }
        }
    }

    /// The QEMU arguments that attach this backend on `socket` (on the virtio-mmio bus):
    /// the `-chardev socket,id=dev{index}`, a `-device`, and for net the
    /// `-netdev vhost-user` the device sits on.
    fn qemu_device_args(&self, index: usize, socket: &Path) -> Vec<String> {
        let chardev = format!("dev{index}");
        let mut a = vec![
            "-chardev".to_string(),
            format!(
                "socket,id={chardev},path={}",
                socket.to_string_lossy().replace(',', ",,")
            ),
        ];
        a.extend(self.qemu_device_only(&chardev, index));
        a
    }

    fn qemu_device_only(&self, chardev: &str, index: usize) -> Vec<String> {
        match self {
            DeviceBackend::Rng => vec![
                "-device".into(),
                format!("vhost-user-rng,chardev={chardev}"),
            ],
            DeviceBackend::Block { .. } => vec![
                "-device".into(),
                format!("vhost-user-blk,chardev={chardev},num-queues=1"),
            ],
            DeviceBackend::Net { mac, .. } => vec![
                "-netdev".into(),
                format!("vhost-user,id=net{index},chardev={chardev}"),
                "-device".into(),
                format!("virtio-net-device,netdev=net{index},mac={mac}"),
            ],
            // QEMU reads the guest CID from the backend's config space.
            DeviceBackend::Vsock { .. } => vec![
                "-device".into(),
                format!("vhost-user-vsock-device,chardev={chardev}"),
            ],
        }
    }
}

/// Why backends could not be started.
#[derive(Debug, thiserror::Error)]
pub enum BackendsError {
    /// A backend did not come up.
    #[error("device backend {name}: {message}")]
    Start {
        /// Which backend.
        name: String,
        /// What happened.
        message: String,
    },
    /// A backend died (the message names it and how).
    #[error("{0}")]
    Died(String),
}

fn dir_path(dir: &Option<tempfile::TempDir>) -> PathBuf {
    dir.as_ref()
        .map(|d| d.path().to_path_buf())
        .unwrap_or_default()
}

/// How the front end reaches the backends' sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sockets {
    /// Bound by path in the VM's runtime directory, for QEMU to connect to.
    Named,
    /// Without a name in any file system, each connected by the calling process as it
    /// is made ([`unnamed_connected`]): for the built-in VMM, which takes the connections
    /// with [`RunningBackends::connections`].
    Connected,
}

/// Running backend processes and their sockets.
#[derive(Debug)]
pub struct RunningBackends {
    dir: Option<tempfile::TempDir>,
    /// With [`Sockets::Connected`], this process's connection to each backend, in the
    /// order of `devices`, until [`RunningBackends::connections`] takes them.
    connections: Vec<UnixStream>,
    children: Vec<(String, crate::spawn::Started)>,
    /// A pidfd per child (readable once it has ended), where the kernel has pidfds.
    exit_fds: Vec<Option<std::os::fd::OwnedFd>>,
    /// Name, socket, and the QEMU arguments attaching it.
    devices: Vec<(String, PathBuf, Vec<String>)>,
    /// The write end of the pipe the started backends wait on before their exec, until
    /// [`RunningBackends::release`] closes it.
    gate: Option<std::os::fd::OwnedFd>,
}

/// The device backends' own small program, looked for next to `hostd`.
pub const BACKEND_EXE: &str = "hostd-backend";

/// The program backends run: [`BACKEND_EXE`] next to `exe` when it is there (it links only
/// the device backends, so each backend process relocates and maps a fraction of what
/// re-executing all of `hostd` costs; benches/density.rs measures both), else `exe`.
/// Both take the same `backend …` arguments and jail themselves the same way.
pub fn backend_exe(exe: &Path) -> PathBuf {
    let small = exe.with_file_name(BACKEND_EXE);
    if small.is_file() {
        small
    } else {
        exe.to_path_buf()
    }
}

impl RunningBackends {
    /// Starts every backend (re-executing `exe`), each on a socket that listens from the
    /// start: see [`RunningBackends::spawn`] and [`RunningBackends::ensure_alive`].
    pub fn start(
        exe: &Path,
        backends: &[DeviceBackend],
        sandbox: bool,
        memory_mib: u32,
        host_net: Option<&std::os::fd::OwnedFd>,
    ) -> Result<Self, BackendsError> {
        let mut running =
            Self::spawn(exe, backends, sandbox, memory_mib, host_net, Sockets::Named)?;
        running.release();
        running.ensure_alive()?;
        Ok(running)
    }

    /// Starts every backend (re-executing `exe`) without waiting for them, so that the
    /// caller can set the VM up while they exec and jail themselves. Each backend gets
    /// its own unprivileged uid (slot 1.. of this VM's jail ids), an address space
    /// bounded by `memory_mib` of guest memory plus its own needs, no stdin, a clean
    /// environment, no inherited fd but stdout and stderr, and dies with the calling
    /// thread (keep calling [`RunningBackends::check`] from that same thread: the kernel
    /// sends the parent-death signal when the creating *thread* exits).
    ///
    /// With `host_net` (from [`crate::jail::empty_netns_for_backends`]: this process is
    /// in an empty network namespace of its own), jailed backends stay in that one
    /// rather than each creating another, but for the net backend, which goes back to
    /// `host_net` to open its TAP and then leaves it for a namespace of its own.
    ///
    /// `sockets` says whether the sockets are named in a directory of the VM's runtime
    /// directory (QEMU connects by path), or unnamed and connected here at once (the
    /// built-in VMM: no directory, no private tmpfs, nothing to remove).
    pub fn spawn(
        exe: &Path,
        backends: &[DeviceBackend],
        sandbox: bool,
        memory_mib: u32,
        host_net: Option<&std::os::fd::OwnedFd>,
        sockets: Sockets,
    ) -> Result<Self, BackendsError> {
        let dir = match sockets {
            Sockets::Named => Some(
                tempfile::Builder::new()
                    .prefix("hostd-devices-")
                    .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
                    .tempdir_in(crate::jail::runtime_dir())
                    .map_err(|e| BackendsError::Start {
                        name: "all".into(),
                        message: format!("cannot create a socket directory: {e}"),
                    })?,
            ),
            Sockets::Connected => None,
        };
        // The backends are started here and wait before their exec (`Spawn::gate`) until
        // `release`: their exec and start, tens of ms of CPU each in the nested test host,
        // would otherwise compete with the VM's set-up for the CPUs, while nothing needs
        // them before the guest's drivers do (their sockets listen already).
        let mut gate = [0; 2];
        // SAFETY: a valid array of two ints.
        if unsafe { libc::pipe2(gate.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(BackendsError::Start {
                name: "all".into(),
                message: format!("pipe2: {}", std::io::Error::last_os_error()),
            });
        }
        use std::os::fd::{FromRawFd, OwnedFd};
        // SAFETY: a fresh fd that nothing else owns.
        let gate_read = unsafe { OwnedFd::from_raw_fd(gate[0]) };
        // SAFETY: as above.
        let gate_write = unsafe { OwnedFd::from_raw_fd(gate[1]) };
        let mut running = RunningBackends {
            dir,
            connections: Vec::new(),
            children: Vec::new(),
            exit_fds: Vec::new(),
            devices: Vec::new(),
            gate: None,
        };
        let exe = backend_exe(exe);
        for (slot, b) in backends.iter().enumerate() {
            let name = b.name();
            // Bound and listening here, before the backend exists: the VMM (or QEMU) can
            // connect at once and its first message waits in the backlog until the
            // backend, jailed, accepts. No waiting for a socket file to appear.
            let (listener, socket) = match sockets {
                Sockets::Named => {
                    let socket = dir_path(&running.dir).join(format!("{name}.sock"));
                    let listener =
                        UnixListener::bind(&socket).map_err(|e| BackendsError::Start {
                            name: name.clone(),
                            message: format!("cannot listen on {}: {e}", socket.display()),
                        })?;
                    (listener, socket)
                }
                Sockets::Connected => {
                    let (listener, stream, address) =
                        unnamed_connected().map_err(|e| BackendsError::Start {
                            name: name.clone(),
                            message: format!("its socket: {e}"),
                        })?;
                    running.connections.push(stream);
                    (listener, PathBuf::from(address))
                }
            };
            let listen_fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
            let mut args: Vec<std::ffi::OsString> = vec!["backend".into()];
            args.extend(b.args().into_iter().map(Into::into));
            args.extend([
                "--socket".into(),
                socket.clone().into_os_string(),
                "--listen-fd".into(),
                listen_fd.to_string().into(),
                "--guest-mib".into(),
                memory_mib.to_string().into(),
                "--jail-id".into(),
                crate::jail::vm_jail_id(slot as u32 + 1).to_string().into(),
            ]);
            if !sandbox {
                args.push("--no-sandbox".into());
            }
            let host_net = host_net.map(std::os::fd::AsRawFd::as_raw_fd);
            let to_host_net = match (host_net, b) {
                (Some(fd), DeviceBackend::Net { .. }) => Some(fd),
                (Some(_), _) => {
                    args.push("--in-vm-netns".into());
                    None
                }
                (None, _) => None,
            };
            let start_error = |e: std::io::Error| BackendsError::Start {
                name: name.clone(),
                message: format!("{}: {e}", exe.display()),
            };
            // Not waited for: the backend execs (and jails itself) while this process
            // goes on (spawn.rs). Its own process group: a terminal's Ctrl-C reaches only
            // hostd, which turns it into a clean guest shutdown; the backends end when
            // their VMM hangs up. The listener is the one fd it keeps.
            let mut spawn =
                crate::spawn::Spawn::new(&exe, &args, crate::jail::LOG_ENV).map_err(start_error)?;
            spawn.keep_fd(listen_fd);
            // Its library's threads (vhost-user-backend's) with stacks as small as ours.
            let (key, value) = hostd_devices::thread::min_stack_env();
            spawn.env(key, &value).map_err(start_error)?;
            spawn.gate(
                std::os::fd::AsRawFd::as_raw_fd(&gate_read),
                std::os::fd::AsRawFd::as_raw_fd(&gate_write),
            );
            if let Some(fd) = to_host_net {
                spawn.netns(fd);
            }
            if matches!(sockets, Sockets::Connected) {
                // The built-in VMM's guest runs before the backends start (the gate),
                // and needs none of them for a while: their starts take no CPU time
                // from its vCPUs (the backend returns to this priority once started).
                spawn.low_priority_start();
            }
            let child = spawn.start().map_err(start_error)?;
            // The backend holds the socket now: when it dies, a connection waiting in the
            // backlog is reset rather than left hanging.
            drop(listener);
            running.exit_fds.push(pidfd(child.id()));
            running.children.push((name.clone(), child));
            // QEMU's arguments name a socket file; a connected device has none.
            let args = match sockets {
                Sockets::Named => b.qemu_device_args(running.devices.len(), &socket),
                Sockets::Connected => Vec::new(),
            };
            running.devices.push((name, socket, args));
        }
        running.gate = Some(gate_write);
        Ok(running)
    }

    /// Lets the backends [`RunningBackends::spawn`] started exec (closes the pipe they
    /// wait on). The built-in VMM calls it once its guest runs; until then their sockets
    /// listen, and a connection waits in the backlog.
    pub fn release(&mut self) {
        self.gate = None;
    }

    /// Checks that no backend [`RunningBackends::spawn`] started has died yet. There is
    /// nothing to wait for: each socket listens from the start (bound by `spawn`), and a
    /// connection to it waits until its backend accepts.
    pub fn ensure_alive(&mut self) -> Result<(), BackendsError> {
        match self.check() {
            None => Ok(()),
            Some(message) => Err(BackendsError::Died(message)),
        }
    }

    /// What to report when talking to a backend failed with `error`: a backend that
    /// died says more than the broken connection does (waits up to 2 s for its end to
    /// be seen), else `error`.
    pub fn explain(&mut self, error: String) -> String {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            if let Some(died) = self.check() {
                return format!("{died} ({error})");
            }
            if Instant::now() > deadline {
                return error;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// QEMU arguments: shared guest memory (memfd, so backends can map it) is set up by
    /// the caller with `memory-backend=mem`; this adds the object and every device.
    pub fn qemu_args(&self, memory_mib: u32) -> Vec<String> {
        let mut a = vec![
            "-object".to_string(),
            format!("memory-backend-memfd,id=mem,size={memory_mib}M,share=on"),
        ];
        for (_, _, device_args) in &self.devices {
            a.extend(device_args.iter().cloned());
        }
        a
    }

    /// Descriptors that poll readable when a backend ends (pidfds, opened at spawn, so
    /// usable after the jail), for a loop that sleeps until something happens; `None`
    /// where the kernel has no pidfds: then call [`RunningBackends::check`] periodically.
    pub fn exit_fds(&self) -> Option<Vec<std::os::fd::RawFd>> {
        self.exit_fds
            .iter()
            .map(|fd| fd.as_ref().map(std::os::fd::AsRawFd::as_raw_fd))
            .collect()
    }

    /// Whether any backend has died: a message naming it and how, or None.
    pub fn check(&mut self) -> Option<String> {
        for (name, child) in &mut self.children {
            if let Ok(Some(status)) = child.try_wait() {
                if let Some(e) = child.exec_error() {
                    return Some(format!(
                        "device backend {name} (pid {}) could not be started: {e}",
                        child.id()
                    ));
                }
                use std::os::unix::process::ExitStatusExt;
                let how = match (status.code(), status.signal()) {
                    (_, Some(libc::SIGSYS)) => {
                        "was killed by its seccomp filter (SIGSYS)".to_string()
                    }
                    (_, Some(sig)) => format!("was killed by signal {sig}"),
                    (Some(c), _) => format!("exited with status {c}"),
                    _ => "exited".to_string(),
                };
                return Some(format!("device backend {name} (pid {}) {how}", child.id()));
            }
        }
        None
    }
}

/// A pidfd for the child `pid` (Linux 5.3), or None.
pub(crate) fn pidfd(pid: u32) -> Option<std::os::fd::OwnedFd> {
    // SAFETY: pidfd_open of our own child, no flags; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    // SAFETY: a fresh fd that nothing else owns.
    (fd >= 0).then(|| unsafe { std::os::fd::FromRawFd::from_raw_fd(fd as std::os::fd::RawFd) })
}

impl Drop for RunningBackends {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            // A VMM that gave up root may not signal its backends (each has a uid of its
            // own): they end when it hangs up, or with its pid namespace. Wait only for
            // one we could kill.
            if child.kill().is_ok() {
                let _ = child.wait();
            }
        }
    }
}

impl RunningBackends {
    /// Leaves the socket directory in place for good (no cleanup on drop): for a process
    /// about to lose its file system (the directory lives in the VM's private tmpfs,
    /// which goes with the VM).
    pub fn keep_sockets(&mut self) {
        if let Some(d) = self.dir.take() {
            let _ = d.keep();
        }
    }

    /// Gives the socket directory and every socket to `id` (QEMU's uid), so that QEMU
    /// can connect to them.
    pub fn share_sockets_with(&self, id: u32) -> Result<(), crate::jail::JailError> {
        if let Some(dir) = &self.dir {
            crate::jail::give_to(dir.path(), id)?;
        }
        for (_, socket, _) in &self.devices {
            crate::jail::give_to(socket, id)?;
        }
        Ok(())
    }

    /// This process's connection to each running backend ([`Sockets::Connected`]), named
    /// for messages, with its virtio device type and queue count, in the order they were
    /// given (for the built-in VMM's vhost-user front end). Empty after the first call.
    pub fn connections(
        &mut self,
        backends: &[DeviceBackend],
    ) -> Vec<(String, UnixStream, u32, usize)> {
        std::mem::take(&mut self.connections)
            .into_iter()
            .zip(self.devices.iter().zip(backends))
            .map(|(stream, ((name, socket, _), b))| {
                let (device_type, queues) = match b {
                    DeviceBackend::Rng => (4, 1),
                    DeviceBackend::Block { .. } => (2, 1),
                    DeviceBackend::Vsock { .. } => (19, 3),
                    #[allow(unreachable_patterns)]
                    _ => (1, 2),
                };
                (
                    format!("{name} ({})", socket.display()),
                    stream,
                    device_type,
                    queues,
                )
            })
            .collect()
    }
}

/// A listening Unix stream socket with no name in any file system, and this process's
/// connection to it, with the address the kernel gave it (`@` and five hex digits, as
/// `ss -x` shows it). Binding with no path asks the kernel for an unused address in the
/// abstract namespace of this process's network namespace (`unix(7)`, autobind): no
/// directory to make, nothing to remove, and nothing left behind however the VM ends.
///
/// Only this connection may reach the backend: the backlog holds one connection, and
/// ours is made right after `listen`, non-blocking, so it fails rather than waits if
/// anything else connected first (the backend accepts one connection, ever). In a jailed
/// VM the namespace is the empty one only hostd's jailed processes share, none of which
/// may create a socket once jailed (seccomp).
fn unnamed_connected() -> std::io::Result<(UnixListener, UnixStream, String)> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::linux::net::SocketAddrExt;
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that nothing else owns.
    let listener = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_un is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    // SAFETY: the address lives through the call; a length of the family alone asks
    // for an abstract address of the kernel's choosing.
    checked("bind", unsafe {
        libc::bind(
            listener.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sa_family_t>() as libc::socklen_t,
        )
    })?;
    // SAFETY: listen(2) on our socket; a backlog of 0 holds one pending connection.
    checked("listen", unsafe { libc::listen(listener.as_raw_fd(), 0) })?;
    let listener = UnixListener::from(listener);
    let stream = connect_nonblocking(&listener).map_err(|e| {
        if e.raw_os_error() == Some(libc::EAGAIN) {
            std::io::Error::other("another connection reached it first")
        } else {
            std::io::Error::new(e.kind(), format!("connect: {e}"))
        }
    })?;
    stream.set_nonblocking(false)?;
    let address = listener.local_addr()?;
    let name = address
        .as_abstract_name()
        .map(String::from_utf8_lossy)
        .unwrap_or_default();
    let address = format!("@{name}");
    Ok((listener, stream, address))
}

/// `r` of the system call `what` as a result (its errno, named, when not 0).
fn checked(what: &str, r: libc::c_int) -> std::io::Result<()> {
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    Err(std::io::Error::new(e.kind(), format!("{what}: {e}")))
}

/// A non-blocking connection to `listener`'s address: EAGAIN rather than a wait when its
/// backlog is full.
fn connect_nonblocking(listener: &UnixListener) -> std::io::Result<UnixStream> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: an all-zero sockaddr_un is a valid value for getsockname to fill.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: the out-buffer and its length live through the call.
    checked("getsockname", unsafe {
        libc::getsockname(
            listener.as_raw_fd(),
            (&mut addr as *mut libc::sockaddr_un).cast(),
            &mut len,
        )
    })?;
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that nothing else owns.
    let stream = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: the address getsockname filled, with its length.
    let r = unsafe {
        libc::connect(
            stream.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    };
    if r != 0 {
        // Unwrapped: the caller tells EAGAIN (no room) from the rest.
        return Err(std::io::Error::last_os_error());
    }
    Ok(UnixStream::from(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An unnamed socket is reachable only through the connection made with it: its
    /// backlog has no room for another, and what the acceptor gets is that connection.
    #[test]
    fn an_unnamed_socket_holds_only_its_own_connection() {
        use std::io::{Read, Write};
        use std::os::linux::net::SocketAddrExt;
        let (listener, mut ours, address) = unnamed_connected().expect("unnamed socket");
        assert!(address.starts_with('@') && address.len() > 1, "{address}");
        let name = listener
            .local_addr()
            .expect("local address")
            .as_abstract_name()
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .expect("an abstract address");
        assert_eq!(format!("@{name}"), address);
        // Another connection finds no room (non-blocking: it would wait otherwise).
        let other = connect_nonblocking(&listener).expect_err("a second connection was queued");
        assert_eq!(other.raw_os_error(), Some(libc::EAGAIN), "{other}");
        let (mut accepted, _) = listener.accept().expect("accept");
        ours.write_all(b"hello").expect("write");
        let mut got = [0; 5];
        accepted.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"hello");
    }

    #[test]
    fn a_vsock_device_passes_secret_paths_never_values() {
        let vsock = DeviceBackend::Vsock {
            cid: 3,
            secrets: vec![("db_password".into(), PathBuf::from("/etc/hostd/db"))],
            caps: None,
        };
        assert_eq!(
            vsock.args(),
            [
                "vsock",
                "--cid",
                "3",
                "--secret",
                "db_password=/etc/hostd/db"
            ]
        );
        assert_eq!(
            vsock.qemu_device_args(1, Path::new("/run/v.sock")),
            [
                "-chardev",
                "socket,id=dev1,path=/run/v.sock",
                "-device",
                "vhost-user-vsock-device,chardev=dev1"
            ]
        );
    }

    #[test]
    fn a_net_device_brings_its_netdev() {
        let net = DeviceBackend::Net {
            tap: "tap0".into(),
            mac: "52:54:00:12:34:56".into(),
        };
        assert_eq!(
            net.qemu_device_args(2, Path::new("/run/n.sock")),
            [
                "-chardev",
                "socket,id=dev2,path=/run/n.sock",
                "-netdev",
                "vhost-user,id=net2,chardev=dev2",
                "-device",
                "virtio-net-device,netdev=net2,mac=52:54:00:12:34:56"
            ]
        );
        assert_eq!(
            net.args(),
            ["net", "--tap", "tap0", "--mac", "52:54:00:12:34:56"]
        );
        assert_eq!(
            DeviceBackend::Rng.qemu_device_args(0, Path::new("/run/r.sock")),
            [
                "-chardev",
                "socket,id=dev0,path=/run/r.sock",
                "-device",
                "vhost-user-rng,chardev=dev0"
            ]
        );
    }
}
