//! The few places guest init talks to the kernel directly: mounts, hostname, I/O
//! ports, signals, reboot. Every `unsafe` block of the init lives here, but for the
//! namespaces a service starts in (`isolate.rs`).

use std::ffi::CString;
use std::io;

pub(crate) fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in string"))
}

pub(crate) fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// mount(2).
pub fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    let (s, t, f, d) = (cstr(source)?, cstr(target)?, cstr(fstype)?, cstr(data)?);
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    check(unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, d.as_ptr().cast()) })
}

/// sethostname(2).
pub fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })
}

/// Access to `len` x86 I/O ports from `first`, for this thread, while the value lives.
/// Needs CAP_SYS_RAWIO (PID 1 has it). The permission is dropped again on drop, because
/// the kernel copies a thread's I/O permission bitmap into every process it forks or
/// spawns, and an exec keeps it: a service started while init held it could write the
/// VMM's boot-marker, snapshot or exit port itself. So init holds it only around its
/// own port I/O, and one grant serves a run of accesses (each `ioperm` is guest kernel
/// work: the resume information's 20 reads with a grant each took 115-150 ms on a
/// nested PVM host).
pub struct Ports {
    first: u16,
    len: u16,
}

impl Ports {
    /// Grants access to `first .. first + len`.
    pub fn grant(first: u16, len: u16) -> io::Result<Ports> {
        // SAFETY: ioperm only changes this thread's I/O permission bitmap.
        check(unsafe { libc::ioperm(libc::c_ulong::from(first), libc::c_ulong::from(len), 1) })?;
        Ok(Ports { first, len })
    }

    fn check(&self, port: u16, width: u16) {
        debug_assert!(
            port >= self.first
                && u32::from(port) + u32::from(width)
                    <= u32::from(self.first) + u32::from(self.len),
            "port {port:#x} outside the grant"
        );
    }

    /// Writes one byte to `port`.
    pub fn outb(&self, port: u16, value: u8) {
        self.check(port, 1);
        // SAFETY: this thread may access the port (the grant); `out` has no memory
        // effects.
        unsafe {
            std::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
        };
    }

    /// Reads one byte from `port`.
    pub fn inb(&self, port: u16) -> u8 {
        self.check(port, 1);
        inb_as_is(port)
    }

    /// Reads four bytes from `port`.
    pub fn inl(&self, port: u16) -> u32 {
        self.check(port, 4);
        let value: u32;
        // SAFETY: as for `outb`.
        unsafe {
            std::arch::asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags))
        };
        value
    }
}

impl Drop for Ports {
    fn drop(&mut self) {
        // SAFETY: as in `grant`; clearing the bits (the kernel frees the bitmap once
        // none is left).
        unsafe {
            libc::ioperm(
                libc::c_ulong::from(self.first),
                libc::c_ulong::from(self.len),
                0,
            )
        };
    }
}

/// Reads one byte from `port` with whatever I/O permission this thread has, and none
/// asked for: without one the CPU faults and the process dies of SIGSEGV (what the
/// `port-probe` mode shows about a service's permissions).
pub fn inb_as_is(port: u16) -> u8 {
    let value: u8;
    // SAFETY: `in` has no memory effects; without permission it raises #GP, which the
    // kernel turns into SIGSEGV for this process.
    unsafe {
        std::arch::asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    };
    value
}

/// `hostd-init port-probe PORT` (hex): reads the port as an ordinary program would and
/// says so; dies of SIGSEGV when the process may not (what a service must get).
pub fn port_probe(arg: &str) -> i32 {
    use std::io::Write;
    let mut out = std::io::stdout();
    let Ok(port) = u16::from_str_radix(arg.trim_start_matches("0x"), 16) else {
        let _ = writeln!(out, "port-probe: not a hex port: {arg}");
        return 2;
    };
    let _ = writeln!(out, "port-probe: reading port {port:#x}");
    let _ = out.flush();
    let v = inb_as_is(port);
    let _ = writeln!(out, "port-probe: port {port:#x} readable: {v:#x}");
    0
}

/// Writes one byte to an x86 I/O port, holding access to it only for the write.
pub fn outb(port: u16, value: u8) -> io::Result<()> {
    Ports::grant(port, 1)?.outb(port, value);
    Ok(())
}

/// The signals PID 1 handles synchronously with [`wait_signal`].
pub const HANDLED: [libc::c_int; 5] = [
    libc::SIGCHLD,
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGPWR,
];

fn handled_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for s in HANDLED {
        // SAFETY: `set` is a valid, initialised sigset_t and `s` a valid signal number.
        unsafe { libc::sigaddset(&mut set, s) };
    }
    set
}

/// Blocks the handled signals in the calling thread (and every thread it starts later).
/// Children get an empty mask back through [`child_unblocks_signals`].
pub fn block_signals() -> io::Result<()> {
    let set = handled_set();
    // SAFETY: `set` is initialised; the old mask is not needed.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(())
}

/// Waits up to `timeout` for one of the handled signals. `None` on timeout.
pub fn wait_signal(timeout: std::time::Duration) -> Option<libc::c_int> {
    let set = handled_set();
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(1 << 30) as _,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: `set` and `ts` are valid for the call; a null siginfo is allowed.
    let r = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) };
    (r > 0).then_some(r)
}

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// exit(code).
    Code(i32),
    /// Killed by a signal.
    Signal(i32),
}

impl Exit {
    /// The shell convention: the code, or 128 + signal.
    pub fn code(self) -> i32 {
        match self {
            Exit::Code(c) => c,
            Exit::Signal(s) => 128 + s,
        }
    }

    /// Whether the child succeeded.
    pub fn success(self) -> bool {
        self == Exit::Code(0)
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exited with code {c}"),
            Exit::Signal(s) => write!(f, "was killed by signal {s} ({})", signal_name(*s)),
        }
    }
}

fn signal_name(s: i32) -> &'static str {
    match s {
        libc::SIGTERM => "SIGTERM",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGINT => "SIGINT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGSYS => "SIGSYS",
        _ => "signal",
    }
}

/// Reaps one exited child without blocking: `Some((pid, exit))`, or `None` when no
/// child has exited (or there are no children).
pub fn reap_one() -> Option<(i32, Exit)> {
    let mut status = 0;
    // SAFETY: `status` is a valid out-pointer.
    let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
    if pid <= 0 {
        return None;
    }
    let exit = if libc::WIFEXITED(status) {
        Exit::Code(libc::WEXITSTATUS(status))
    } else {
        Exit::Signal(libc::WTERMSIG(status))
    };
    Some((pid, exit))
}

/// Sends a signal to a whole process group.
pub fn kill_group(pgid: i32, sig: libc::c_int) {
    // SAFETY: kill has no memory effects; a stale pgid yields ESRCH, which is fine.
    unsafe { libc::kill(-pgid, sig) };
}

/// Sends a signal to every process but PID 1.
pub fn kill_all(sig: libc::c_int) {
    // SAFETY: kill(-1) has no memory effects and never signals the caller (PID 1).
    unsafe { libc::kill(-1, sig) };
}

/// Asks PID 1 (this process) to shut down, from any thread.
pub fn request_shutdown() {
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() };
    // SAFETY: kill has no memory effects.
    unsafe { libc::kill(me, libc::SIGTERM) };
}

/// Turns off echo on the console so the host's control lines are not printed back.
pub fn console_no_echo(fd: libc::c_int) {
    // SAFETY: termios is plain data, filled by tcgetattr before use.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is a valid out-pointer; a non-tty fd just fails.
    if unsafe { libc::tcgetattr(fd, &mut t) } == 0 {
        t.c_lflag &= !(libc::ECHO | libc::ECHONL);
        // SAFETY: `t` is a valid termios obtained above.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) };
    }
}

/// Flushes file systems, reports `code` on the exit port and resets the machine.
/// `reboot=t` on the command line makes the reset a triple fault, which both QEMU
/// (`-no-reboot`) and the built-in VMM treat as the end of the VM.
pub fn power_off(code: u8) -> ! {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    // The last lines are in the console tty's buffer until the serial driver has sent
    // them; the exit port ends the VM at once (seen on real KVM: the power-off line
    // lost). Wait until they are out (fd 2 is /dev/console; not a tty: no wait).
    // SAFETY: tcdrain only waits on the descriptor.
    unsafe { libc::tcdrain(2) };
    let _ = outb(hostd_images::abi::EXIT_PORT, code);
    // SAFETY: reboot only needs CAP_SYS_BOOT; if it fails we fall through to exit.
    unsafe { libc::reboot(libc::LINUX_REBOOT_CMD_RESTART) };
    // Not PID 1 (a test run), or reboot was refused.
    std::process::exit(i32::from(code))
}

/// Makes `cmd`'s child start with an empty signal mask. PID 1 blocks the signals it
/// waits for, and std does not reset the mask it passes on (measured: services could
/// not be stopped with SIGTERM).
pub fn child_unblocks_signals(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and calls only sigemptyset and
    // sigprocmask, which are async-signal-safe; it touches no shared state.
    #[allow(clippy::multiple_unsafe_ops_per_block)]
    unsafe {
        cmd.pre_exec(|| {
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            if libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        })
    };
}

/// umount(2).
pub fn umount(target: &str) -> io::Result<()> {
    let t = cstr(target)?;
    // SAFETY: a valid NUL-terminated path.
    check(unsafe { libc::umount(t.as_ptr()) })
}

/// An AF_INET datagram socket for interface and route ioctls.
#[derive(Debug)]
pub struct NetSocket(std::os::fd::OwnedFd);

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= r.ifr_name.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    for (d, s) in r.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(r)
}

fn sockaddr_in(addr: std::net::Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; the generic form is what the
    // ioctls take.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

impl NetSocket {
    /// A new socket.
    pub fn new() -> io::Result<Self> {
        // SAFETY: socket with constant arguments; the fd is checked and owned below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd nobody else owns.
        Ok(NetSocket(unsafe {
            std::os::fd::FromRawFd::from_raw_fd(fd)
        }))
    }

    fn ioctl<T>(&self, req: u64, arg: &mut T) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: `arg` is the structure type `req` expects, valid for the call.
        // (musl takes the request as c_int, glibc as c_ulong; the values fit both.)
        check(unsafe { libc::ioctl(self.0.as_raw_fd(), req as _, arg as *mut T) })
    }

    /// Sets the interface up (and running).
    pub fn up(&self, name: &str) -> io::Result<()> {
        let mut r = ifreq(name)?;
        self.ioctl(libc::SIOCGIFFLAGS, &mut r)?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        let flags = unsafe { r.ifr_ifru.ifru_flags };
        r.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        self.ioctl(libc::SIOCSIFFLAGS, &mut r)
    }

    /// Sets the interface's IPv4 address and netmask.
    pub fn set_addr(
        &self,
        name: &str,
        addr: std::net::Ipv4Addr,
        mask: std::net::Ipv4Addr,
    ) -> io::Result<()> {
        let mut r = ifreq(name)?;
        r.ifr_ifru.ifru_addr = sockaddr_in(addr);
        self.ioctl(libc::SIOCSIFADDR, &mut r)?;
        let mut r = ifreq(name)?;
        r.ifr_ifru.ifru_netmask = sockaddr_in(mask);
        self.ioctl(libc::SIOCSIFNETMASK, &mut r)
    }

    /// Adds a default route via `gw`.
    pub fn default_route(&self, gw: std::net::Ipv4Addr) -> io::Result<()> {
        // SAFETY: rtentry is plain data; all-zero is a valid value.
        let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
        rt.rt_dst = sockaddr_in(std::net::Ipv4Addr::UNSPECIFIED);
        rt.rt_genmask = sockaddr_in(std::net::Ipv4Addr::UNSPECIFIED);
        rt.rt_gateway = sockaddr_in(gw);
        rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
        self.ioctl(libc::SIOCADDRT, &mut rt)
    }
}

/// Ends the sending side of socket `fd` (the peer reads EOF); errors are ignored (the
/// peer may be gone already).
pub fn shutdown_write(fd: std::os::fd::RawFd) {
    // SAFETY: shutdown(2) on a descriptor the caller holds open; no memory is passed.
    unsafe { libc::shutdown(fd, libc::SHUT_WR) };
}

/// Lets reads on socket `fd` wait for as long as it takes (no SO_RCVTIMEO).
pub fn clear_read_timeout(fd: std::os::fd::RawFd) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 0,
    };
    // SAFETY: a valid timeval of the size given, on a socket the caller holds open.
    check(unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    })
}

/// A connected AF_VSOCK stream socket to `cid`:`port`, with `timeout` on reads, from
/// `local_port` when given (ports up to 1023 need `CAP_NET_BIND_SERVICE`).
pub fn vsock_connect(
    cid: u32,
    port: u32,
    local_port: Option<u32>,
    timeout: std::time::Duration,
) -> io::Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    // SAFETY: socket(2) with constant arguments; the fd is checked below.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nobody else owns; the File closes it.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    // SAFETY: a valid timeval of the size given, on our socket.
    check(unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    })?;
    if let Some(local) = local_port {
        // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
        let mut me: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        me.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        me.svm_cid = libc::VMADDR_CID_ANY;
        me.svm_port = local;
        // SAFETY: `me` is a valid sockaddr_vm of the length given.
        check(unsafe {
            libc::bind(
                fd,
                (&me as *const libc::sockaddr_vm).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        })?;
    }
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    // SAFETY: `addr` is a valid sockaddr_vm of the length given.
    check(unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    })?;
    Ok(file)
}
