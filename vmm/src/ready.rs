//! Readiness for a service manager: when `hostd run` runs as a systemd `Type=notify`
//! unit, `READY=1` goes to `$NOTIFY_SOCKET` once guest init reports that it started the
//! image's services (the moment `--timings` calls "first service").
//!
//! The socket is connected by [`init_from_env`] at start, before any jail: the report
//! comes later from the runner's console relay (QEMU) or control thread (built-in VMM),
//! which by then may sit in an empty root with a seccomp filter that allows `write` on
//! a descriptor it holds but neither `socket` nor `connect`. The notification's sender
//! is then a process below `hostd run` in its cgroup: units need `NotifyAccess=all`.
//! (The `sd-notify` crate opens its socket at each call, which the jail forbids.)

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

static SOCKET: OnceLock<UnixDatagram> = OnceLock::new();
static SENT: AtomicBool = AtomicBool::new(false);

/// Connects to `$NOTIFY_SOCKET` when it is set (a path, or `@name` for an abstract
/// socket) and removes it from the environment, so that the device backends and QEMU
/// do not see it. Without the variable, nothing happens; a socket that cannot be
/// reached is logged and ignored.
pub fn init_from_env() {
    let Some(addr) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    // Changing the environment races only with threads reading it: `hostd run` calls
    // this first, before it starts any.
    std::env::remove_var("NOTIFY_SOCKET");
    match connect(&addr.to_string_lossy()) {
        Ok(s) => {
            let _ = SOCKET.set(s);
        }
        Err(e) => tracing::warn!(
            "NOTIFY_SOCKET {}: cannot connect ({e}); the service manager will not learn when the guest is ready",
            addr.to_string_lossy()
        ),
    }
}

fn connect(addr: &str) -> std::io::Result<UnixDatagram> {
    let s = UnixDatagram::unbound()?;
    if let Some(name) = addr.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        let a = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        s.connect_addr(&a)?;
    } else {
        s.connect(addr)?;
    }
    Ok(s)
}

/// Whether a manager waits for [`services_started`] (so runners need not look).
pub fn awaited() -> bool {
    SOCKET.get().is_some() && !SENT.load(Ordering::SeqCst)
}

/// Reports `READY=1` (once per run; later calls do nothing). Uses only `write(2)` on
/// the socket connected at start.
pub fn services_started() {
    let Some(s) = SOCKET.get() else {
        return;
    };
    if SENT.swap(true, Ordering::SeqCst) {
        return;
    }
    let msg = b"READY=1\nSTATUS=guest services started\n";
    // SAFETY: `msg` is valid for its length; the descriptor is the socket held in SOCKET
    // for the life of the process. One datagram: written whole or not at all.
    let n = unsafe { libc::write(s.as_raw_fd(), msg.as_ptr().cast(), msg.len()) };
    if n < 0 {
        tracing::warn!(
            "cannot tell the service manager the guest is ready: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one test that touches NOTIFY_SOCKET and the process-wide socket.
    #[test]
    fn ready_is_sent_once_to_the_socket_named_by_the_environment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let manager = UnixDatagram::bind(&path).expect("bind");
        manager.set_nonblocking(true).expect("nonblocking");
        assert!(!awaited());
        std::env::set_var("NOTIFY_SOCKET", &path);
        init_from_env();
        assert!(std::env::var_os("NOTIFY_SOCKET").is_none());
        assert!(awaited());
        services_started();
        services_started();
        let mut buf = [0u8; 256];
        let n = manager.recv(&mut buf).expect("one datagram");
        assert_eq!(
            &buf[..n],
            b"READY=1\nSTATUS=guest services started\n".as_slice()
        );
        assert!(manager.recv(&mut buf).is_err(), "a second READY was sent");
        assert!(!awaited());
    }
}
