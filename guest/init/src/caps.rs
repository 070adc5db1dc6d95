//! Capabilities for guest services: a service that declares `capabilities = ["NAME"]`
//! finds, in its own mount namespace (`isolate.rs`), the Unix socket
//! `/run/hostd/caps/NAME`; every connection to it is a byte stream to the capability's
//! service, which the host reaches over Noise with a capability it holds (the guest
//! never sees a key). Services that do not declare NAME have no such socket.
//!
//! Init listens on each socket itself (`/run/hostd/capsock/SERVICE/NAME`, on a tmpfs per
//! service, detached in every service's namespace like the secrets store) and relays
//! each connection to the host's vsock port `VSOCK_CAPS_PORT_BASE + i` (`i`: the
//! capability's place in `abi::capability_names`), from a privileged port: the host's
//! backend refuses a capability connection from any other port, so a service running
//! as a user other than root cannot go around its grants over raw vsock. Each connection
//! starts with this run's capability token, which init received with the secrets
//! ([`abi::CAPS_TOKEN_SECRET`]) and keeps to itself: the host's relay refuses any
//! connection without it, so not even a root service (which can bind privileged ports)
//! reaches a capability it was not granted.
//! docs/capabilities.md ("From a guest service") says what holds against whom.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use hostd_images::abi;
use hostd_images::manifest::Manifest;

use crate::console::log;
use crate::sys;

/// The tmpfs holding every service's capability sockets; detached in each service's
/// namespace.
pub const STORE: &str = "/run/hostd/capsock";
/// Privileged local ports the relay connects from (the secrets fetch uses 1023).
const FIRST_LOCAL_PORT: u32 = 600;
const LAST_LOCAL_PORT: u32 = 1000;
/// How long to wait for the host to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

static NEXT_PORT: AtomicU32 = AtomicU32::new(FIRST_LOCAL_PORT);
/// This run's capability token, from the secrets payload.
static TOKEN: std::sync::OnceLock<[u8; abi::CAPS_TOKEN_LEN]> = std::sync::OnceLock::new();

/// Keeps the capability token the host sent with the secrets (a payload entry of the
/// wrong length is dropped: capability connections are then refused by the host).
pub fn set_token(bytes: &[u8]) {
    match <[u8; abi::CAPS_TOKEN_LEN]>::try_from(bytes) {
        Ok(t) => {
            let _ = TOKEN.set(t);
        }
        Err(_) => log("capabilities: the host's capability token has the wrong length; ignored"),
    }
}

/// Creates the sockets of every service that declares capabilities and starts
/// relaying them. Returns each such service's socket directory (what its
/// `/run/hostd/caps` shows), or None when no service declares any.
pub fn offer(m: &Manifest) -> Option<BTreeMap<String, String>> {
    let names = abi::capability_names(m);
    if names.is_empty() {
        return None;
    }
    let mut mounted = false;
    match make(m, &names, &mut mounted) {
        Ok(dirs) => Some(dirs),
        Err(e) => {
            log(&format!("capabilities: {e}; services get none"));
            // With the store mounted (maybe holding some sockets), services must still
            // start with it detached; without it, there is nothing to hide.
            mounted.then(BTreeMap::new)
        }
    }
}

fn make(
    m: &Manifest,
    names: &[String],
    mounted: &mut bool,
) -> Result<BTreeMap<String, String>, String> {
    crate::secrets::mount_store(STORE, abi::CAPS_DIR)?;
    *mounted = true;
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let mut dirs = BTreeMap::new();
    for (svc, spec) in &m.services {
        if spec.capabilities.is_empty() {
            continue;
        }
        if !svc
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'))
            || svc.starts_with('.')
        {
            log(&format!(
                "capabilities: service name `{svc}` cannot name a directory; it gets none"
            ));
            continue;
        }
        // A tmpfs per service, as for secrets: nothing of another service's below the
        // directory its namespace shows.
        let Some((dir, user)) =
            crate::secrets::service_dir(STORE, svc, &spec.user, &passwd, "capabilities")?
        else {
            continue;
        };
        for name in &spec.capabilities {
            let Some(index) = names.iter().position(|n| n == name) else {
                continue;
            };
            let path = format!("{dir}/{name}");
            let listener = UnixListener::bind(&path).map_err(|e| format!("bind {path}: {e}"))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| format!("chmod {path}: {e}"))?;
            std::os::unix::fs::chown(&path, Some(user.uid), Some(user.gid))
                .map_err(|e| format!("chown {path}: {e}"))?;
            let port = abi::VSOCK_CAPS_PORT_BASE + index as u32;
            let label = format!("{svc}/{name}");
            std::thread::Builder::new()
                .name(format!("cap {label}"))
                .spawn(move || serve(listener, port, label))
                .map_err(|e| format!("thread for {path}: {e}"))?;
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o500))
            .map_err(|e| format!("chmod {dir}: {e}"))?;
        std::os::unix::fs::chown(&dir, Some(user.uid), Some(user.gid))
            .map_err(|e| format!("chown {dir}: {e}"))?;
        log(&format!(
            "capabilities: service {svc} gets {}",
            spec.capabilities.join(", ")
        ));
        dirs.insert(svc.clone(), dir);
    }
    Ok(dirs)
}

/// Accepts connections on one service's socket for one capability, for good.
fn serve(listener: UnixListener, port: u32, label: String) {
    for conn in listener.incoming() {
        match conn {
            Ok(unix) => {
                let conn_label = label.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("cap {label}"))
                    .spawn(move || relay(unix, port, &conn_label));
                if let Err(e) = spawned {
                    log(&format!(
                        "capabilities: {label}: no thread for a connection: {e}"
                    ));
                }
            }
            Err(e) => {
                log(&format!("capabilities: {label}: accept: {e}"));
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Connects to the host's `port` from the next free privileged port.
fn connect(port: u32) -> std::io::Result<std::fs::File> {
    let span = LAST_LOCAL_PORT - FIRST_LOCAL_PORT + 1;
    let mut last = None;
    for _ in 0..span {
        let n = NEXT_PORT.fetch_add(1, Ordering::Relaxed);
        let local = FIRST_LOCAL_PORT + (n.wrapping_sub(FIRST_LOCAL_PORT)) % span;
        match sys::vsock_connect(abi::VSOCK_HOST_CID, port, Some(local), CONNECT_TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free privileged port")))
}

/// Copies `from` to `to` until EOF or an error, then ends `to`'s sending side.
fn copy(mut from: impl Read, mut to: impl Write, to_fd: i32) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    sys::shutdown_write(to_fd);
}

/// One service connection: to the host and back, until both sides are done.
fn relay(unix: UnixStream, port: u32, label: &str) {
    let vsock = match connect(port) {
        Ok(s) => s,
        Err(e) => {
            log(&format!(
                "capabilities: {label}: the host refused or did not answer (vsock port {port}): {e}"
            ));
            return;
        }
    };
    // vsock_connect bounds reads for its other users; a capability stream waits for as
    // long as the service takes.
    if let Err(e) = sys::clear_read_timeout(vsock.as_raw_fd()) {
        log(&format!("capabilities: {label}: {e}"));
        return;
    }
    let Some(token) = TOKEN.get() else {
        log(&format!(
            "capabilities: {label}: the host sent no capability token; connection dropped"
        ));
        return;
    };
    if let Err(e) = (&vsock).write_all(token) {
        log(&format!("capabilities: {label}: sending the token: {e}"));
        return;
    }
    let (Ok(vsock_in), Ok(unix_out)) = (vsock.try_clone(), unix.try_clone()) else {
        log(&format!(
            "capabilities: {label}: cannot duplicate the sockets"
        ));
        return;
    };
    let vsock_fd = vsock.as_raw_fd();
    let unix_fd = unix_out.as_raw_fd();
    let up = std::thread::Builder::new()
        .name(format!("cap {label} up"))
        .spawn(move || copy(unix, vsock, vsock_fd));
    copy(vsock_in, unix_out, unix_fd);
    if let Ok(up) = up {
        let _ = up.join();
    }
}
