//! The capability relay of `hostd run`: how a guest service reaches a capability.
//!
//! `hostd run` checks that this host holds every capability the image's services
//! declare, binds a Unix socket in a private directory and starts this relay as its own
//! process (`hostd cap relay`, not jailed: it reads the cap store and opens network
//! connections; started before the VM's process, so that `hostd run` stays
//! single-threaded for its jail). The vsock backend connects to the socket before it
//! jails itself and multiplexes every guest connection to a capability port over it
//! ([`hostd_devices::vhost_user::cap_link`]). For each, the relay connects to the
//! capability's location, runs the Noise handshake as its caller (hostd-caps, the
//! same initiator functions use) and carries the bytes both ways. The guest never sees
//! a key; the backend never opens a socket.
//!
//! The backend is jailed but faces the guest: the relay treats what it sends as
//! untrusted (bounded frames, a window per connection, a capability index checked
//! against the list).
//!
//! Only guest init's relay may use a capability port: `hostd run` makes a random token
//! for each run, gives it to guest init with the secrets (init keeps it; no service can
//! declare it) and to this relay, and the relay refuses every connection whose first
//! bytes are not that token. A program in the guest that goes around init's sockets —
//! even one running as root, which can bind the privileged ports the backend asks for —
//! reaches no capability.

use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context, Result};
use hostd_caps::CapStore;
use hostd_images::abi::CAPS_TOKEN_LEN;

// The relay itself (`hostd cap relay`) runs in `hostd-full`; `hostd run` only starts it.
#[cfg(feature = "full")]
mod serve;
#[cfg(feature = "full")]
pub use serve::serve;

/// The cap store `hostd run` reads: `STATE/caps`, with `--state-dir STATE`, else the
/// one `hostd fn serve` and `hostd cap` use by default.
pub fn store_for(state_dir: Option<&Path>) -> Result<CapStore> {
    let dir = state_dir
        .map(Path::to_path_buf)
        .or_else(hostd_caps::default_state_dir)
        .context("no state directory for the cap store: pass --state-dir")?;
    Ok(CapStore::new(dir.join("caps")))
}

/// A running relay: its process and socket. Dropping it ends the relay.
#[derive(Debug)]
pub struct Running {
    child: Child,
    socket: PathBuf,
    token: PathBuf,
    _dir: tempfile::TempDir,
}

impl Running {
    /// The socket the vsock backend connects to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The file holding this run's capability token (0600, in the relay's private
    /// directory; the vsock backend reads it as a secret before it jails itself).
    pub fn token_file(&self) -> &Path {
        &self.token
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the relay for `names` (in port order), all of which `store` must hold:
/// None when there are none. A capability the host does not hold is an error before
/// anything boots.
pub fn start(names: &[String], store_dir: Option<&Path>) -> Result<Option<Running>> {
    if names.is_empty() {
        return Ok(None);
    }
    let store = store_for(store_dir)?;
    for name in names {
        match store.held(name) {
            Ok(Some(_)) => {}
            Ok(None) => bail!(
                "the image's services use the capability `{name}`, which this host does not hold in {}; add it with `hostd cap add {name} CAP --state-dir DIR` and run with the same --state-dir",
                store.dir().display()
            ),
            Err(e) => {
                return Err(anyhow::Error::new(e)
                    .context(format!("reading the capability `{name}` the image uses")))
            }
        }
    }
    let dir = tempfile::Builder::new()
        .prefix("hostd-caps-")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .tempdir()
        .context("cannot create a directory for the capability relay's socket")?;
    let socket = dir.path().join("caps.sock");
    let token = dir.path().join("token");
    let mut bytes = [0u8; CAPS_TOKEN_LEN];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .context("cannot read /dev/urandom for the capability token")?;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&token)
        .and_then(|mut f| std::io::Write::write_all(&mut f, &bytes))
        .with_context(|| format!("cannot write {}", token.display()))?;
    let listener = std::os::unix::net::UnixListener::bind(&socket)
        .with_context(|| format!("cannot listen on {}", socket.display()))?;
    let exe = std::env::current_exe().context("cannot find hostd's own executable")?;
    let mut cmd = Command::new(exe);
    // A clean environment (but the log settings), killed with `hostd run`, no fd but
    // the three standard ones.
    hostd_vmm::jail::clean_child(&mut cmd, hostd_vmm::jail::LOG_ENV);
    cmd.arg("cap")
        .arg("relay")
        .arg("--state-dir")
        .arg(store.dir().parent().unwrap_or(Path::new("/")))
        .arg("--token-file")
        .arg(&token)
        .args(names)
        // The listening socket is the relay's stdin.
        .stdin(Stdio::from(OwnedFd::from(listener)))
        // Its own process group: Ctrl-C reaches `hostd run`, which stops the VM first.
        .process_group(0);
    let child = cmd.spawn().context("cannot start the capability relay")?;
    Ok(Some(Running {
        child,
        socket,
        token,
        _dir: dir,
    }))
}
