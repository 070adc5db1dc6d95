//! Secrets: fetched from the host over vsock at boot (never from the image or a
//! volume), before any boot step or service runs, on the one connection the host
//! serves them to (it refuses every later one); stored on a tmpfs per service only
//! init can reach (`/run/hostd/secrets/SERVICE/NAME`, 0400, owned by the service's
//! user), and shown to each service, in mount and PID namespaces of its own
//! (`isolate.rs`), as `/run/secrets/NAME` — only the secrets it declares. Services
//! that declare none see an empty, read-only /run/secrets. docs/security.md says
//! what holds against whom.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::time::Duration;

use hostd_images::abi;
use hostd_images::manifest::Manifest;

use crate::console::log;
use crate::sys;

/// The tmpfs holding every service's secrets; detached in each service's namespace.
pub const STORE: &str = "/run/hostd/secrets";
/// How long to wait for the host's answer.
const TIMEOUT: Duration = Duration::from_secs(10);
/// The guest port init fetches the secrets from: a privileged one (at most 1023, so
/// only root can bind it), as the host's backend requires.
const CLIENT_PORT: u32 = 1023;

/// A secret name as the host's backend checks it: a plain file name.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'))
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Parses the payload: `NAME=HEX\n` lines. Bad lines are reported and skipped.
pub fn parse(payload: &[u8]) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for (i, line) in payload.split(|b| *b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let parsed = std::str::from_utf8(line)
            .ok()
            .and_then(|l| l.split_once('='))
            .filter(|(n, _)| valid_name(n))
            .and_then(|(n, h)| Some((n.to_string(), unhex(h)?)));
        match parsed {
            Some((n, v)) => {
                out.insert(n, v);
            }
            None => log(&format!(
                "secrets: line {} from the host is malformed; skipped",
                i + 1
            )),
        }
    }
    out
}

fn receive() -> Result<BTreeMap<String, Vec<u8>>, String> {
    let mut s = sys::vsock_connect(
        abi::VSOCK_HOST_CID,
        abi::VSOCK_SECRETS_PORT,
        Some(CLIENT_PORT),
        TIMEOUT,
    )
    .map_err(|e| {
        format!(
            "connect to the host (vsock port {}): {e}",
            abi::VSOCK_SECRETS_PORT
        )
    })?;
    let mut payload = Vec::new();
    let read = s.read_to_end(&mut payload);
    let parsed = parse(&payload);
    payload.fill(0);
    read.map_err(|e| format!("read: {e}"))?;
    Ok(parsed)
}

/// The `hostd.vsock_selftest=1` round trip: a line to the host's echo port and back.
fn selftest() {
    let result = (|| -> Result<String, String> {
        let mut s = sys::vsock_connect(abi::VSOCK_HOST_CID, abi::VSOCK_ECHO_PORT, None, TIMEOUT)
            .map_err(|e| format!("connect: {e}"))?;
        s.write_all(b"hostd-vsock-ping\n")
            .map_err(|e| format!("write: {e}"))?;
        let mut got = Vec::new();
        let mut byte = [0u8; 1];
        while got.len() < 256 {
            match s.read(&mut byte) {
                Ok(0) => break,
                Ok(_) if byte[0] == b'\n' => break,
                Ok(_) => got.push(byte[0]),
                Err(e) => return Err(format!("read: {e}")),
            }
        }
        Ok(String::from_utf8_lossy(&got).into_owned())
    })();
    match result {
        Ok(line) => log(&format!("{}{line}", abi::LINE_VSOCK_ECHO)),
        Err(e) => log(&format!("vsock self-test failed: {e}")),
    }
}

/// `hostd-init vsock-probe PORT [LOCAL_PORT]`: what any program in the guest can do
/// with vsock, for the tests (docs/security.md): connects to the host's PORT (from
/// LOCAL_PORT when given), sends one line, and prints on stdout what came back. Exit
/// code 0 when anything came back.
pub fn probe(port: &str, local: Option<&str>) -> i32 {
    let say = |what: &str| {
        let _ = writeln!(std::io::stdout(), "vsock-probe: port {port}: {what}");
    };
    let Ok(port_n) = port.parse::<u32>() else {
        say("not a port number");
        return 2;
    };
    let Ok(local) = local.map(str::parse::<u32>).transpose() else {
        say("not a local port number");
        return 2;
    };
    let mut s = match sys::vsock_connect(abi::VSOCK_HOST_CID, port_n, local, Duration::from_secs(3))
    {
        Ok(s) => s,
        Err(e) => {
            say(&format!("connect failed: {e}"));
            return 1;
        }
    };
    let _ = s.write_all(b"hostd-vsock-probe\n");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                // The echo port never closes: one line is the whole answer.
                if port_n == abi::VSOCK_ECHO_PORT && got.ends_with(b"\n") {
                    break;
                }
            }
            Err(e) => {
                say(&format!("read failed: {e}"));
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&got).replace('\n', "\\n");
    say(&format!("received {} bytes: {text}", got.len()));
    i32::from(got.is_empty())
}

/// Mounts `store`, the tmpfs (0700, root's) holding every service's directory, and
/// makes `view`, where each service's namespace shows its own directory. Used for the
/// secrets and the capability sockets alike.
pub(crate) fn mount_store(store: &str, view: &str) -> Result<(), String> {
    std::fs::create_dir_all(store).map_err(|e| format!("mkdir {store}: {e}"))?;
    std::fs::create_dir_all(view).map_err(|e| format!("mkdir {view}: {e}"))?;
    sys::mount(
        "tmpfs",
        store,
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "mode=0700",
    )
    .map_err(|e| format!("mount tmpfs on {store}: {e}"))
}

/// Makes `STORE/SERVICE`, a tmpfs of its own (mode 0700, owned by root until the
/// caller hands it over), for a service whose user `spec_user` resolves in `passwd`:
/// what that service's namespace shows of the store then holds nothing of any other
/// service's, not even by inode (open_by_handle_at needs only a mount of the same file
/// system). None, with a log line prefixed `what`, when the user does not resolve. Used
/// for the secrets and the capability sockets alike.
pub(crate) fn service_dir(
    store: &str,
    svc: &str,
    spec_user: &str,
    passwd: &str,
    what: &str,
) -> Result<Option<(String, crate::spawn::User)>, String> {
    let user = match crate::spawn::resolve_user(spec_user, passwd) {
        Ok(u) => u,
        Err(e) => {
            log(&format!("{what}: service {svc}: {e}"));
            return Ok(None);
        }
    };
    let dir = format!("{store}/{svc}");
    std::fs::create_dir(&dir).map_err(|e| format!("mkdir {dir}: {e}"))?;
    sys::mount(
        "tmpfs",
        &dir,
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "mode=0700",
    )
    .map_err(|e| format!("mount tmpfs on {dir}: {e}"))?;
    Ok(Some((dir, user)))
}

/// Takes the capability token out of the received secrets (no service can declare it)
/// and hands it to the capability relay.
fn take_caps_token(received: &mut BTreeMap<String, Vec<u8>>) {
    if let Some(mut token) = received.remove(abi::CAPS_TOKEN_SECRET) {
        crate::caps::set_token(&token);
        token.fill(0);
    }
}

/// Fetches and stores the secrets the manifest's services declare. Returns, when any
/// service declares secrets, each such service's directory in the store (what
/// [`crate::isolate::child_isolated`] mounts for it); None leaves services as they were.
pub fn deliver(m: &Manifest, cmdline: &str) -> Option<BTreeMap<String, String>> {
    if cmdline
        .split_whitespace()
        .any(|w| w == abi::VSOCK_SELFTEST_FLAG)
    {
        selftest();
    }
    if m.services.values().all(|s| s.secrets.is_empty()) {
        // Nothing to deliver, but the host serves its secrets port to the first
        // connection only: take it, so no service ever can. (Without a vsock device
        // the connect fails at once.)
        if let Ok(mut r) = receive() {
            take_caps_token(&mut r);
            for v in r.values_mut() {
                v.fill(0);
            }
            log(&format!(
                "secrets: none declared; the host's secrets port is used up for this boot ({} received, none kept)",
                r.len()
            ));
        }
        return None;
    }
    let mut received = match receive() {
        Ok(mut r) => {
            take_caps_token(&mut r);
            log(&format!("{}{})", abi::LINE_SECRETS_RECEIVED, r.len()));
            r
        }
        Err(e) => {
            log(&format!(
                "secrets: {e}; services get no secrets (did the runner attach the vsock device?)"
            ));
            BTreeMap::new()
        }
    };
    if !std::path::Path::new("/proc/self/ns/pid").exists() {
        log("secrets: this kernel has no PID namespaces (CONFIG_PID_NS); services cannot be isolated from each other's secrets and will not start (use hostd's kernel, or add CONFIG_PID_NS=y)");
    }
    let result = store(m, &received);
    // Init keeps no copy.
    for v in received.values_mut() {
        v.fill(0);
    }
    match result {
        Ok(dirs) => Some(dirs),
        Err(e) => {
            log(&format!("secrets: {e}"));
            // Still isolate: every service gets an empty /run/secrets.
            Some(BTreeMap::new())
        }
    }
}

/// Mounts an empty secrets store (for services isolated for another reason, with an
/// empty /run/secrets each).
pub fn empty_store() -> Result<(), String> {
    std::fs::create_dir_all(STORE).map_err(|e| format!("mkdir {STORE}: {e}"))?;
    std::fs::create_dir_all(abi::SECRETS_DIR)
        .map_err(|e| format!("mkdir {}: {e}", abi::SECRETS_DIR))?;
    sys::mount(
        "tmpfs",
        STORE,
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "mode=0700",
    )
    .map_err(|e| format!("mount tmpfs on {STORE}: {e}"))
}

fn store(
    m: &Manifest,
    received: &BTreeMap<String, Vec<u8>>,
) -> Result<BTreeMap<String, String>, String> {
    mount_store(STORE, abi::SECRETS_DIR)?;
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let mut dirs = BTreeMap::new();
    for (svc, spec) in &m.services {
        if spec.secrets.is_empty() {
            continue;
        }
        if !valid_name(svc) {
            log(&format!(
                "secrets: service name `{svc}` cannot name a directory; it gets none"
            ));
            continue;
        }
        let Some((dir, user)) = service_dir(STORE, svc, &spec.user, &passwd, "secrets")? else {
            continue;
        };
        for name in &spec.secrets {
            let Some(value) = received.get(name) else {
                log(&format!(
                    "secrets: service {svc} declares {name} but the host did not provide it"
                ));
                continue;
            };
            let path = format!("{dir}/{name}");
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o400)
                .open(&path)
                .map_err(|e| format!("create {path}: {e}"))?;
            f.write_all(value)
                .map_err(|e| format!("write {path}: {e}"))?;
            std::os::unix::fs::chown(&path, Some(user.uid), Some(user.gid))
                .map_err(|e| format!("chown {path}: {e}"))?;
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o500))
            .map_err(|e| format!("chmod {dir}: {e}"))?;
        std::os::unix::fs::chown(&dir, Some(user.uid), Some(user.gid))
            .map_err(|e| format!("chown {dir}: {e}"))?;
        log(&format!(
            "secrets: service {svc} gets {}",
            spec.secrets
                .iter()
                .filter(|n| received.contains_key(*n))
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        ));
        dirs.insert(svc.clone(), dir);
    }
    Ok(dirs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_lines() {
        let p = parse(b"db=7077\nbad\n../x=00\nodd=7\napi=\n");
        assert_eq!(p.get("db").map(|v| v.as_slice()), Some(&b"pw"[..]));
        assert_eq!(p.get("api").map(|v| v.len()), Some(0));
        assert_eq!(p.len(), 2);
    }
}
