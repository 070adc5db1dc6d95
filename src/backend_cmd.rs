//! `hostd backend …` (hidden): one device backend process, started by `hostd run` for
//! each device. It binds its vhost-user socket, opens the files it serves, jails itself
//! and serves the VMM until it hangs up.

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use sha2::{Digest, Sha256};
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use hostd_devices::jail::identity::{die_with_parent, jail_id, IDS_PER_VM};
use hostd_devices::jail::JailOptions;
use hostd_devices::vhost_user::block::{BlockBackend, Verity, BLOCK_SYSCALLS};
use hostd_devices::vhost_user::net::{net_filter, open_tap, parse_mac, NetBackend};
use hostd_devices::vhost_user::rng::{RngBackend, RNG_SYSCALLS};
use hostd_devices::vhost_user::vsock::{VsockBackend, VSOCK_SYSCALLS};
use hostd_devices::vhost_user::{
    backend_filter, serve, serve_watching, serve_with_listeners, Socket,
};

/// Guest memory assumed when `--guest-mib` is not given (a backend started by hand).
const DEFAULT_GUEST_MIB: u64 = 1024;

/// Address space a backend may use besides guest memory: its mapped executable and
/// libraries, one arena of heap, the stacks of its few threads (8 MiB each, reserved).
/// Measured: a waiting backend maps about 120 MiB.
const BACKEND_OVERHEAD_MIB: u64 = 512;

/// Threads a backend may have in all: the main thread, the vhost-user connection
/// handler, the vring worker(s) and the net relay; the rest is headroom.
const BACKEND_MAX_THREADS: u64 = 16;

impl Common {
    /// The vhost-user socket: the one `hostd run` bound and passed (`--listen-fd`), else
    /// `--socket` to bind here. Call once.
    fn endpoint(&self) -> Result<Socket> {
        match self.listen_fd {
            Some(fd) => Ok(Socket::inherited(fd, self.socket.clone())?),
            None => Ok(Socket::Bind(self.socket.clone())),
        }
    }

    /// The jail for this backend, or None with --no-sandbox.
    fn jail(&self, parent: libc::pid_t) -> Option<JailOptions> {
        if self.no_sandbox {
            return None;
        }
        Some(JailOptions {
            keep_net: self.in_vm_netns,
            id: Some(
                self.jail_id
                    .unwrap_or_else(|| jail_id(std::process::id(), IDS_PER_VM - 1)),
            ),
            parent: Some(parent),
            max_address_space: Some(self.guest_mib.saturating_add(BACKEND_OVERHEAD_MIB) << 20),
            max_threads: Some(BACKEND_MAX_THREADS),
        })
    }
}

/// Largest secret value `hostd backend vsock` accepts (1 MiB).
const MAX_SECRET: usize = 1 << 20;

/// Options every backend takes.
#[derive(Debug, clap::Args)]
pub struct Common {
    /// The vhost-user socket to listen on.
    #[arg(long)]
    socket: PathBuf,
    /// Internal (`hostd run`): fd N is a socket already listening at `--socket`,
    /// inherited from the VMM, which binds it itself so that it can connect at once.
    #[arg(long, hide = true, value_name = "N")]
    listen_fd: Option<i32>,
    /// Debugging only: no jail, no seccomp filter.
    #[arg(long)]
    no_sandbox: bool,
    /// Internal (`hostd run`): the network namespace this backend starts in is already
    /// its VM's own empty one, which the jail keeps rather than creating another.
    #[arg(long, hide = true)]
    in_vm_netns: bool,
    /// The unprivileged uid and gid to run as once jailed [default: one of hostd's
    /// jail range derived from this process's pid].
    #[arg(long, value_name = "ID")]
    jail_id: Option<u32>,
    /// Guest memory the backend will map, in MiB: its address space is limited to this
    /// plus a fixed allowance for its own code, heap and thread stacks.
    #[arg(long, value_name = "MIB", default_value_t = DEFAULT_GUEST_MIB)]
    guest_mib: u64,
    /// Test hook: `open-passwd` (report what opening /etc/passwd does inside the jail),
    /// or make one call the filter does not allow: `forbidden-syscall` (socket),
    /// `mmap-exec`, `mprotect-exec`, `fork` (clone without CLONE_THREAD),
    /// `prctl-dumpable`.
    #[arg(long, hide = true)]
    selftest: Option<String>,
}

/// A device backend.
#[derive(Debug, Subcommand)]
pub enum BackendCommand {
    /// virtio-rng.
    Rng {
        #[command(flatten)]
        common: Common,
    },
    /// virtio-blk over a file region.
    Block {
        #[command(flatten)]
        common: Common,
        /// The file to serve.
        #[arg(long)]
        file: PathBuf,
        /// Start of the region in the file.
        #[arg(long, default_value_t = 0)]
        offset: u64,
        /// Length of the region [default: the rest of the file].
        #[arg(long)]
        length: Option<u64>,
        /// Refuse writes.
        #[arg(long)]
        read_only: bool,
        /// Per-block sha256 table in the same file: OFFSET:LENGTH:SHA256 (the table's own
        /// digest, from the verified image header). Implies --read-only.
        #[arg(long, value_name = "OFFSET:LENGTH:SHA256")]
        verity: Option<String>,
        /// Serial number the guest sees (/sys/block/vdX/serial).
        #[arg(long, default_value = "hostd")]
        id: String,
    },
    /// virtio-net over an existing TAP device.
    Net {
        #[command(flatten)]
        common: Common,
        /// The TAP interface (create it first: `ip tuntap add NAME mode tap`).
        #[arg(long)]
        tap: String,
        /// The guest's MAC address, e.g. 52:54:00:12:34:56.
        #[arg(long, default_value = "52:54:00:12:34:56")]
        mac: String,
    },
    /// virtio-vsock; serves secrets to the guest on host port 1025 and echoes on 1026.
    Vsock {
        #[command(flatten)]
        common: Common,
        /// The guest's CID.
        #[arg(long, default_value_t = 3)]
        cid: u64,
        /// A secret to deliver: NAME=PATH (the file is read before the jail; values
        /// never appear on a command line).
        #[arg(long = "secret", value_name = "NAME=PATH")]
        secrets: Vec<String>,
        /// Serve this many capability ports (1100..), carried over --caps-link.
        #[arg(long, default_value_t = 0, requires = "caps_link")]
        caps: u32,
        /// The Unix socket of `hostd run`'s capability relay (connected before the
        /// jail; the backend opens no socket afterwards).
        #[arg(long, value_name = "PATH")]
        caps_link: Option<PathBuf>,
    },
}

/// Runs a backend to completion.
pub fn run(cmd: BackendCommand) -> Result<i32> {
    // A backend never outlives the hostd that started it (even one killed with SIGKILL
    // before its VMM connected). `hostd run` already asked for this between fork and
    // exec and checked its parent then (RunningBackends::start); this covers a backend
    // started by hand. The jail asks again after its uid change, which clears it.
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() };
    die_with_parent(parent)?;
    match cmd {
        BackendCommand::Rng { common } => {
            serve(
                "rng",
                common.endpoint()?,
                RngBackend::default(),
                common.jail(parent).as_ref(),
                || backend_filter(RNG_SYSCALLS),
                common.selftest.as_deref(),
            )?;
        }
        BackendCommand::Block {
            common,
            file,
            offset,
            length,
            read_only,
            verity,
            id,
        } => {
            let f = OpenOptions::new()
                .read(true)
                .write(!read_only && verity.is_none())
                .open(&file)
                .with_context(|| format!("cannot open {}", file.display()))?;
            let size = f.metadata()?.len();
            let length = length.unwrap_or(size.saturating_sub(offset));
            if offset.checked_add(length).is_none_or(|end| end > size) {
                bail!(
                    "{}: region {offset}+{length} runs past the end of the file ({size} bytes)",
                    file.display()
                );
            }
            let verity = match verity {
                None => None,
                Some(spec) => {
                    let parts: Vec<&str> = spec.split(':').collect();
                    let [o, l, digest] = parts[..] else {
                        bail!("--verity: expected OFFSET:LENGTH:SHA256")
                    };
                    let (o, l): (u64, u64) = (o.parse()?, l.parse()?);
                    let mut raw = vec![0u8; usize::try_from(l)?];
                    f.read_exact_at(&mut raw, o)
                        .context("reading the hash table")?;
                    let got = hostd_images::format::digest_hex(&Sha256::digest(&raw).into());
                    if got != digest {
                        bail!("{}: the rootfs hash table changed on disk (sha256 {got}, expected {digest})", file.display());
                    }
                    Some(Verity::new(&raw, length).map_err(anyhow::Error::msg)?)
                }
            };
            let backend = BlockBackend::new(f, offset, length, read_only, verity, &id);
            serve(
                &format!("block-{id}"),
                common.endpoint()?,
                backend,
                common.jail(parent).as_ref(),
                || backend_filter(BLOCK_SYSCALLS),
                common.selftest.as_deref(),
            )?;
        }
        BackendCommand::Net { common, tap, mac } => {
            let mac = parse_mac(&mac)?;
            let file = open_tap(&tap)?;
            let backend = NetBackend::new(file, &tap, mac);
            let fd = backend.tap_fd();
            serve_with_listeners(
                &format!("net-{tap}"),
                common.endpoint()?,
                backend,
                common.jail(parent).as_ref(),
                net_filter,
                common.selftest.as_deref(),
                &[(fd, NetBackend::TAP_EVENT)],
            )?;
        }
        BackendCommand::Vsock {
            common,
            cid,
            secrets,
            caps,
            caps_link,
        } => {
            if cid < 3 || cid > u64::from(u32::MAX) {
                bail!("--cid {cid}: guest CIDs start at 3");
            }
            let mut values = Vec::new();
            for s in &secrets {
                let (name, path) = s
                    .split_once('=')
                    .with_context(|| format!("--secret {s}: expected NAME=PATH"))?;
                let value = std::fs::read(path)
                    .with_context(|| format!("secret {name}: cannot read {path}"))?;
                if value.len() > MAX_SECRET {
                    bail!(
                        "secret {name}: {path} holds {} bytes; secrets are limited to {MAX_SECRET} bytes",
                        value.len()
                    );
                }
                values.push((name.to_string(), value));
            }
            let mut backend = VsockBackend::new(cid, &values)?;
            drop(values);
            if let Some(path) = &caps_link {
                let link = std::os::unix::net::UnixStream::connect(path).with_context(|| {
                    format!("cannot reach the capability relay at {}", path.display())
                })?;
                backend = backend
                    .with_capabilities(link, caps)
                    .context("capability link")?;
            }
            let listeners = backend.listeners();
            serve_watching(
                "vsock",
                common.endpoint()?,
                backend,
                common.jail(parent).as_ref(),
                || backend_filter(VSOCK_SYSCALLS),
                common.selftest.as_deref(),
                &listeners,
            )?;
        }
    }
    Ok(0)
}
