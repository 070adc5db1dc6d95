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

/// Defaults of `block --id`, `net --mac` and `vsock --cid` (clap's and `quick_args`').
const DEFAULT_BLOCK_ID: &str = "hostd";
const DEFAULT_MAC: &str = "52:54:00:12:34:56";
const DEFAULT_CID: u64 = 3;

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
        #[arg(long, default_value = DEFAULT_BLOCK_ID)]
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
        #[arg(long, default_value = DEFAULT_MAC)]
        mac: String,
    },
    /// virtio-vsock; serves secrets to the guest on host port 1025 and echoes on 1026.
    Vsock {
        #[command(flatten)]
        common: Common,
        /// The guest's CID.
        #[arg(long, default_value_t = DEFAULT_CID)]
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

/// The backend command lines `hostd run` writes, read without clap: `KIND` then known
/// options (`--name VALUE`, `--name=VALUE`, flags). Anything else (help, an unknown,
/// repeated or valueless option, a value that does not parse or starts with `-`, a
/// missing required option, `--caps` without `--caps-link`, words that are not UTF-8)
/// is `None`, and clap parses the same words and gives its help or its error; a command
/// line this takes gives the same [`BackendCommand`] as clap would (tests below).
///
/// Why: clap builds the whole backend command (four kinds and all their options) before
/// it reads a word. In the nested test host, where code run for the first time is
/// translated by QEMU, a backend ran ~28 ms of its own code between its log set-up and
/// its jail (docs/startup.md), on the CPU the VM's set-up shares; `hostd run` had the
/// same cost until its own parser (src/quick_args.rs).
pub fn quick_args(words: &[std::ffi::OsString]) -> Option<BackendCommand> {
    let words: Vec<&str> = words.iter().map(|w| w.to_str()).collect::<Option<_>>()?;
    let (kind, rest) = words.split_first()?;
    let mut given: Vec<(&str, Option<&str>)> = Vec::new();
    let mut i = 0;
    while i < rest.len() {
        let word = rest[i].strip_prefix("--")?;
        let (name, inline) = match word.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (word, None),
        };
        let takes_value = takes_value(kind, name)?;
        let value = match (takes_value, inline) {
            (false, Some(_)) => return None,
            (false, None) => None,
            (true, Some(v)) => Some(v),
            (true, None) => {
                i += 1;
                Some(*rest.get(i)?)
            }
        };
        if value.is_some_and(|v| v.starts_with('-') || v.is_empty()) {
            return None;
        }
        if name != "secret" && given.iter().any(|(n, _)| *n == name) {
            return None;
        }
        given.push((name, value));
        i += 1;
    }
    let one = |name: &str| given.iter().find(|(n, _)| *n == name).map(|(_, v)| *v);
    let flag = |name: &str| one(name).is_some();
    // A value that parses, or None for an option not given; Err for one that does not.
    fn parsed<T: std::str::FromStr>(v: Option<Option<&str>>) -> Result<Option<T>, ()> {
        match v {
            None => Ok(None),
            Some(v) => v.ok_or(())?.parse().map(Some).map_err(|_| ()),
        }
    }
    let string = |name: &str| one(name).flatten().map(str::to_string);
    let common = Common {
        socket: PathBuf::from(one("socket")??),
        listen_fd: parsed(one("listen-fd")).ok()?,
        no_sandbox: flag("no-sandbox"),
        in_vm_netns: flag("in-vm-netns"),
        jail_id: parsed(one("jail-id")).ok()?,
        guest_mib: parsed(one("guest-mib")).ok()?.unwrap_or(DEFAULT_GUEST_MIB),
        selftest: string("selftest"),
    };
    Some(match *kind {
        "rng" => BackendCommand::Rng { common },
        "block" => BackendCommand::Block {
            common,
            file: PathBuf::from(one("file")??),
            offset: parsed(one("offset")).ok()?.unwrap_or(0),
            length: parsed(one("length")).ok()?,
            read_only: flag("read-only"),
            verity: string("verity"),
            id: string("id").unwrap_or_else(|| DEFAULT_BLOCK_ID.into()),
        },
        "net" => BackendCommand::Net {
            common,
            tap: string("tap")?,
            mac: string("mac").unwrap_or_else(|| DEFAULT_MAC.into()),
        },
        "vsock" => {
            let caps_link = one("caps-link").flatten().map(PathBuf::from);
            if one("caps").is_some() && caps_link.is_none() {
                return None;
            }
            BackendCommand::Vsock {
                common,
                cid: parsed(one("cid")).ok()?.unwrap_or(DEFAULT_CID),
                secrets: given
                    .iter()
                    .filter(|(n, _)| *n == "secret")
                    .map(|(_, v)| v.map(str::to_string))
                    .collect::<Option<_>>()?,
                caps: parsed(one("caps")).ok()?.unwrap_or(0),
                caps_link,
            }
        }
        _ => return None,
    })
}

/// Options every backend takes, and those of each kind: (long name, takes a value).
const COMMON_OPTIONS: &[(&str, bool)] = &[
    ("socket", true),
    ("listen-fd", true),
    ("no-sandbox", false),
    ("in-vm-netns", false),
    ("jail-id", true),
    ("guest-mib", true),
    ("selftest", true),
];

fn kind_options(kind: &str) -> Option<&'static [(&'static str, bool)]> {
    Some(match kind {
        "rng" => &[],
        "block" => &[
            ("file", true),
            ("offset", true),
            ("length", true),
            ("read-only", false),
            ("verity", true),
            ("id", true),
        ],
        "net" => &[("tap", true), ("mac", true)],
        "vsock" => &[
            ("cid", true),
            ("secret", true),
            ("caps", true),
            ("caps-link", true),
        ],
        _ => return None,
    })
}

/// Whether `name` is an option of backend `kind` and takes a value; None if unknown.
fn takes_value(kind: &str, name: &str) -> Option<bool> {
    COMMON_OPTIONS
        .iter()
        .chain(kind_options(kind)?)
        .find(|(n, _)| *n == name)
        .map(|(_, v)| *v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};
    use std::ffi::OsString;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: BackendCommand,
    }

    fn words(line: &str) -> Vec<OsString> {
        line.split(' ').map(OsString::from).collect()
    }

    fn clap(line: &str) -> Option<String> {
        let argv = std::iter::once(OsString::from("backend")).chain(words(line));
        Cli::try_parse_from(argv)
            .ok()
            .map(|c| format!("{:?}", c.cmd))
    }

    fn quick(line: &str) -> Option<String> {
        quick_args(&words(line)).map(|c| format!("{c:?}"))
    }

    /// Command lines as `hostd run` writes them (vmm/src/backends.rs), and others clap
    /// takes: the same result both ways.
    #[test]
    fn the_usual_command_lines_give_what_clap_gives() {
        for line in [
            "rng --socket /run/hostd/d/rng.sock --listen-fd 11 --guest-mib 64 --jail-id 1879240001 --in-vm-netns",
            "rng --socket /s --no-sandbox",
            "rng --socket=/s --guest-mib=128 --selftest=open-passwd",
            "block --id root --file /img --offset 4096 --length 8192 --read-only --verity 1:2:ab --socket /s --listen-fd 3 --guest-mib 256 --jail-id 7",
            "block --file /img --socket /s",
            "net --tap tap0 --mac 52:54:00:00:00:01 --socket /s --listen-fd 4 --guest-mib 64 --jail-id 8",
            "net --tap tap0 --socket /s",
            "vsock --cid 3 --secret a=/p --secret b=/q --caps 2 --caps-link /r --socket /s --listen-fd 5 --guest-mib 64 --jail-id 9 --in-vm-netns",
            "vsock --socket /s",
        ] {
            let q = quick(line);
            assert!(q.is_some(), "not taken: {line}");
            assert_eq!(q, clap(line), "{line}");
        }
    }

    /// What is left to clap: it gives its help or its error for these.
    #[test]
    fn anything_else_is_left_to_clap() {
        for line in [
            "rng",
            "rng --help",
            "rng --socket",
            "rng --socket /s --socket /t",
            "rng --socket /s --tap t",
            "rng --socket /s --no-sandbox=yes",
            "rng --socket /s --guest-mib lots",
            "rng --socket /s --listen-fd -1",
            "rng --socket /s extra",
            "block --socket /s",
            "block --socket /s --file /f --offset -4",
            "net --socket /s",
            "vsock --socket /s --caps 2",
            "vsock --socket /s --cid",
            "disk --socket /s",
            "--socket /s",
        ] {
            assert_eq!(quick(line), None, "{line}");
        }
    }

    /// Every option clap knows for a kind is known here, with or without a value as
    /// there; and no other.
    #[test]
    fn every_option_clap_knows_is_known_here() {
        let cmd = Cli::command();
        for sub in cmd.get_subcommands() {
            let kind = sub.get_name();
            let mut known: Vec<(String, bool)> = COMMON_OPTIONS
                .iter()
                .chain(kind_options(kind).unwrap_or_else(|| panic!("kind {kind} unknown here")))
                .map(|(n, v)| (n.to_string(), *v))
                .collect();
            known.sort();
            let mut clap_args: Vec<(String, bool)> = sub
                .get_arguments()
                .filter_map(|a| {
                    let long = a.get_long()?;
                    (long != "help").then(|| (long.to_string(), a.get_action().takes_values()))
                })
                .collect();
            clap_args.sort();
            assert_eq!(known, clap_args, "{kind}");
        }
    }
}
