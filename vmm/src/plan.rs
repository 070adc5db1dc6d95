//! What turns an image (or a bare kernel) plus run options into what a runner boots:
//! the image opened and verified (signature too when keys are given), kernel and
//! initrd payloads, the command line (the image's, the network's, the caller's), vCPUs
//! and memory, the root disk, volumes (locked), the network card, rng and the secrets
//! the image's services declare.
//!
//! `hostd run` (the CLI) and the daemon share it: the CLI boots a [`Plan`]; the daemon,
//! which runs each guest as its own `hostd run` process, checks a declaration's network
//! and memory with the same parsers before it records it ([`NetConfig::parse`],
//! [`parse_memory`]). Runners (`kvm`, `qemu`) stay unaware of images.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};

use hostd_images::format::{digest_hex, sections, Image, ImageError};
use hostd_images::manifest::{Manifest, Volume};
use hostd_images::names;
use hostd_images::signature::{self, SignatureError, Signer, TrustedKey};
use hostd_images::verity::VerityError;

use crate::backends::DeviceBackend;
use crate::payload::Payload;
use crate::volumes::{VolumeError, VolumeLock};
use crate::BASE_CMDLINE;

/// The guest's vsock CID.
pub const GUEST_CID: u64 = 3;
/// Smallest memory (a bare `--kernel` guest may be tiny; images need 32 MiB).
pub const MIN_MEM_MIB: u32 = 1;
/// Room kept on the kernel command line for each device argument a runner adds
/// (`virtio_mmio.device=4K@0xfeb00000:12` and a space).
const CMDLINE_PER_DEVICE: usize = 48;
/// The command line of a bare `--kernel` boot when none is given.
const BARE_KERNEL_CMDLINE: &str = "console=ttyS0 reboot=t panic=-1";

/// Why a run could not be planned. Messages name the option or file that was wrong;
/// causes are sources, never folded into the message.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// Neither an image nor a kernel was given.
    #[error("give an image or --kernel")]
    NothingToBoot,
    /// `--mem` is not a size.
    #[error("--mem: {0}")]
    MemorySyntax(String),
    /// `--mem` is out of range.
    #[error("--mem {given}: expected {MIN_MEM_MIB}M to 64G")]
    MemoryRange {
        /// The size as given.
        given: String,
    },
    /// `--cmdline` holds something a command line cannot.
    #[error("--cmdline: {0}")]
    Cmdline(String),
    /// `--vcpus` is out of range.
    #[error("--vcpus {0}: expected 1 to 32")]
    Vcpus(u32),
    /// A kernel or initrd file could not be read.
    #[error("{what} {}: cannot read it", path.display())]
    ReadPayload {
        /// `--kernel` or `--initrd`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The image could not be opened, is damaged, or lacks a section.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// A trusted key could not be read, or the signature does not verify.
    #[error(transparent)]
    Signature(#[from] SignatureError),
    /// The rootfs section does not have the size the manifest records.
    #[error(
        "{}: section `rootfs` is {section} bytes but the manifest records {manifest}; the image is damaged, rebuild it",
        path.display()
    )]
    RootfsSize {
        /// The image.
        path: PathBuf,
        /// The section's length.
        section: u64,
        /// The manifest's `root.size`.
        manifest: u64,
    },
    /// The rootfs section and its hash table do not fit each other.
    #[error("{}", path.display())]
    Verity {
        /// The image.
        path: PathBuf,
        /// The cause.
        #[source]
        source: VerityError,
    },
    /// A section of the image could not be opened again for loading.
    #[error("{}: cannot open it again", path.display())]
    Reopen {
        /// The image.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A volume could not be locked or made.
    #[error(transparent)]
    Volume(#[from] VolumeError),
    /// A volume's file could not be examined.
    #[error(transparent)]
    VolumeSize(io::Error),
    /// `--secret-dir` could not be listed.
    #[error("--secret-dir {}: cannot list it", dir.display())]
    SecretDir {
        /// The directory.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// An entry of `--secret-dir` could not be read.
    #[error("--secret-dir {}", dir.display())]
    SecretDirEntry {
        /// The directory.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A secret's file does not exist.
    #[error("secret {name}: cannot find {}", file.display())]
    SecretMissing {
        /// The secret.
        name: String,
        /// The file as given.
        file: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A secret's file could not be read (or is too large, or not a regular file).
    #[error("secret {name}: cannot read {}", file.display())]
    SecretRead {
        /// The secret.
        name: String,
        /// The file.
        file: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The command line would not fit with the runner's device arguments.
    #[error(
        "the kernel command line would be about {total} bytes with the runner's device \
         arguments; at most {max} fit (shorten --cmdline or the image's `cmdline`)"
    )]
    CmdlineTooLong {
        /// The estimated length.
        total: usize,
        /// The most that fits.
        max: usize,
    },
}

/// Why a `--net` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetError {
    /// A part without `=`.
    #[error("`{0}`: expected key=value")]
    Syntax(String),
    /// `tap=` is not an interface name.
    #[error("tap: `{0}` is not an interface name (1-15 letters, digits, `-`, `_`, `.`)")]
    Tap(String),
    /// `ip=` is not an IPv4 address.
    #[error("ip: `{0}` is not an IPv4 address")]
    Ip(String),
    /// `ip=`'s prefix is not 0-32.
    #[error("ip: bad prefix `{0}`")]
    Prefix(String),
    /// `gw=` is not an IPv4 address.
    #[error("gw: `{0}` is not an IPv4 address")]
    Gateway(String),
    /// `mac=` is not a MAC address.
    #[error("mac: `{0}` is not a MAC address (52:54:00:12:34:56)")]
    Mac(String),
    /// `mac=` is a multicast address.
    #[error("mac: `{0}` is a multicast address")]
    Multicast(String),
    /// `dns=` is not an IP address.
    #[error("dns: `{0}` is not an IP address")]
    Dns(String),
    /// More `dns=` than the guest takes.
    #[error("dns: at most {} servers", names::MAX_DNS)]
    TooManyDns,
    /// An unknown key.
    #[error("unknown key `{0}` (tap, ip, gw, mac, dns)")]
    UnknownKey(String),
    /// No `tap=`.
    #[error("tap=NAME is required")]
    NoTap,
}

/// A network card backed by an existing TAP device, and the guest's eth0 address:
/// `tap=NAME[,ip=ADDR/PREFIX][,gw=GATEWAY][,mac=MAC][,dns=ADDR]…`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The TAP device.
    pub tap: String,
    /// `ADDR/PREFIX` of the guest's eth0.
    pub ip: Option<String>,
    /// The guest's default gateway.
    pub gw: Option<String>,
    /// The card's MAC address (lowercase).
    pub mac: String,
    /// DNS servers for the guest's /etc/resolv.conf (`dns=`, repeatable).
    pub dns: Vec<String>,
}

impl NetConfig {
    /// Parses `tap=NAME[,ip=ADDR/PREFIX][,gw=GATEWAY][,mac=MAC][,dns=ADDR]…`.
    pub fn parse(s: &str) -> Result<NetConfig, NetError> {
        let mut net = NetConfig {
            tap: String::new(),
            ip: None,
            gw: None,
            mac: "52:54:00:12:34:56".into(),
            dns: Vec::new(),
        };
        for part in s.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| NetError::Syntax(part.into()))?;
            match k {
                "tap" => {
                    // IFNAMSIZ: 15 bytes and a NUL; no `/`, whitespace or `:`.
                    if v.is_empty()
                        || v.len() > 15
                        || !v
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                    {
                        return Err(NetError::Tap(v.into()));
                    }
                    net.tap = v.to_string()
                }
                "ip" => {
                    let (a, p) = v.split_once('/').unwrap_or((v, "24"));
                    a.parse::<std::net::Ipv4Addr>()
                        .map_err(|_| NetError::Ip(a.into()))?;
                    p.parse::<u8>()
                        .ok()
                        .filter(|p| *p <= 32)
                        .ok_or_else(|| NetError::Prefix(p.into()))?;
                    net.ip = Some(format!("{a}/{p}"));
                }
                "gw" => {
                    v.parse::<std::net::Ipv4Addr>()
                        .map_err(|_| NetError::Gateway(v.into()))?;
                    net.gw = Some(v.to_string());
                }
                "mac" => {
                    let octets: Vec<&str> = v.split(':').collect();
                    if octets.len() != 6
                        || !octets
                            .iter()
                            .all(|o| o.len() == 2 && u8::from_str_radix(o, 16).is_ok())
                    {
                        return Err(NetError::Mac(v.into()));
                    }
                    let first = u8::from_str_radix(octets[0], 16).unwrap_or(1);
                    if first & 1 == 1 {
                        return Err(NetError::Multicast(v.into()));
                    }
                    net.mac = v.to_ascii_lowercase()
                }
                "dns" => {
                    v.parse::<std::net::IpAddr>()
                        .map_err(|_| NetError::Dns(v.into()))?;
                    if net.dns.len() == names::MAX_DNS {
                        return Err(NetError::TooManyDns);
                    }
                    net.dns.push(v.to_string());
                }
                _ => return Err(NetError::UnknownKey(k.into())),
            }
        }
        if net.tap.is_empty() {
            return Err(NetError::NoTap);
        }
        Ok(net)
    }

    /// The guest's command-line arguments for this card's address, gateway and DNS.
    fn cmdline_args(&self) -> String {
        let ip = self
            .ip
            .as_ref()
            .map(|ip| format!("hostd.ip={ip}"))
            .unwrap_or_default();
        let gw = self
            .gw
            .as_ref()
            .map(|gw| format!(" hostd.gw={gw}"))
            .unwrap_or_default();
        let dns = if self.dns.is_empty() {
            String::new()
        } else {
            format!(" {}{}", hostd_images::abi::CMDLINE_DNS, self.dns.join(","))
        };
        format!("{ip}{gw}{dns}")
    }
}

/// Why a `NAME=@FILE` secret argument was refused.
#[derive(Debug, thiserror::Error)]
pub enum SecretArgError {
    /// No `=`.
    #[error("`{0}`: expected NAME=@FILE")]
    Syntax(String),
    /// A literal value instead of a file.
    #[error(
        "`{0}`: give the value as a file, NAME=@FILE (a value on the command line would show in ps)"
    )]
    Literal(String),
    /// The name is not a secret name.
    #[error(transparent)]
    Name(#[from] hostd_devices::vhost_user::vsock::VsockError),
    /// Nothing after `@`.
    #[error("`{0}`: no file after `@`")]
    NoFile(String),
}

/// Parses a secret argument `NAME=@FILE`.
pub fn parse_secret_arg(s: &str) -> Result<(String, PathBuf), SecretArgError> {
    let (name, file) = s
        .split_once('=')
        .ok_or_else(|| SecretArgError::Syntax(s.into()))?;
    let file = file
        .strip_prefix('@')
        .ok_or_else(|| SecretArgError::Literal(s.into()))?;
    hostd_devices::vhost_user::vsock::check_secret_name(name)?;
    if file.is_empty() {
        return Err(SecretArgError::NoFile(s.into()));
    }
    Ok((name.to_string(), PathBuf::from(file)))
}

/// Parses a memory size (`512M`, `1G`) and checks it is `MIN_MEM_MIB` to 64 GiB.
pub fn parse_memory(m: &str) -> Result<u32, PlanError> {
    let mib = hostd_images::spec::parse_size_mib(m).map_err(PlanError::MemorySyntax)?;
    if !(MIN_MEM_MIB..=*names::MEMORY_MIB.end()).contains(&mib) {
        return Err(PlanError::MemoryRange { given: m.into() });
    }
    Ok(mib)
}

/// What to boot and how: everything `hostd run` takes but the choice of runner.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// The image to boot.
    pub image: Option<PathBuf>,
    /// A bare kernel instead of an image.
    pub kernel: Option<PathBuf>,
    /// Initrd for `kernel`.
    pub initrd: Option<PathBuf>,
    /// vCPUs (default: the image's, or 1).
    pub vcpus: Option<u32>,
    /// Memory, e.g. `512M` (default: the image's, or 256M).
    pub mem: Option<String>,
    /// Appended after the image's command line; with `kernel`, the whole command line.
    pub cmdline: Option<String>,
    /// A network card.
    pub net: Option<NetConfig>,
    /// Where volumes live (default: [`crate::volumes::state_dir`]).
    pub state_dir: Option<PathBuf>,
    /// Secrets offered: `(NAME, FILE)`.
    pub secrets: Vec<(String, PathBuf)>,
    /// Every file of this directory is offered as a secret named after it.
    pub secret_dir: Option<PathBuf>,
    /// Boot only an image signed by one of these public keys.
    pub trust: Vec<PathBuf>,
    /// The capability relay the vsock backend connects to (set by a runner that carries
    /// the capabilities the image's services declare; None: their connections are
    /// refused).
    pub caps_link: Option<CapsRelay>,
}

/// The capability relay of a run, as the vsock backend is given it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapsRelay {
    /// The relay's Unix socket.
    pub socket: PathBuf,
    /// The file holding this run's capability token (delivered to guest init with the
    /// secrets, [`hostd_images::abi::CAPS_TOKEN_SECRET`]).
    pub token: PathBuf,
}

/// What a run boots, resolved from an image or a bare kernel.
#[derive(Debug)]
pub struct Plan {
    /// The image's name (or the kernel's path).
    pub name: String,
    /// Kernel: a file range read (and checked) only while loading.
    pub kernel: Payload,
    /// Initrd, likewise.
    pub initrd: Option<Payload>,
    /// The whole kernel command line (without the runner's device arguments).
    pub cmdline: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// How long services get to stop.
    pub stop_timeout_secs: u32,
    /// The image's read-only root file system (its `rootfs` section), if it has one.
    pub root: Option<DeviceBackend>,
    /// The image's volumes.
    pub volumes: Vec<Volume>,
    /// Every secret some service declares.
    pub declared_secrets: BTreeSet<String>,
    /// Every capability some service declares, in port order
    /// (`hostd_images::abi::capability_names`).
    pub capabilities: Vec<String>,
}

/// Opens and verifies an image: every digest, the manifest and the sections it needs,
/// and, when keys are given, its signature.
pub fn open_image(
    path: &Path,
    trust: &[PathBuf],
) -> Result<(Image, Manifest, Option<Signer>), PlanError> {
    // Verified in full once per version of the file (root keeps a record of verified
    // versions, hostd_images::stamp); what the guest reads is checked as it is read.
    let image = match hostd_images::stamp::VerifiedCache::for_this_user() {
        Some(cache) => Image::open_cached(path, &cache)?,
        None => Image::open(path)?,
    };
    let manifest = image.manifest()?;
    let signer = if trust.is_empty() {
        None
    } else {
        let keys = trust
            .iter()
            .map(|p| TrustedKey::load(p))
            .collect::<Result<Vec<_>, _>>()?;
        Some(signature::verify(&image, &keys)?)
    };
    Ok((image, manifest, signer))
}

/// Resolves what to boot: checks the options, opens and verifies the image, builds the
/// command line.
pub fn resolve(opts: &RunOptions) -> Result<Plan, PlanError> {
    let memory = |default: u32| -> Result<u32, PlanError> {
        opts.mem.as_deref().map_or(Ok(default), parse_memory)
    };
    if let Some(c) = &opts.cmdline {
        names::check_cmdline(c).map_err(PlanError::Cmdline)?;
    }
    if let Some(v) = opts.vcpus {
        if !names::VCPUS.contains(&v) {
            return Err(PlanError::Vcpus(v));
        }
    }
    if let Some(kernel) = &opts.kernel {
        let read = |p: &Path, what: &'static str| {
            Payload::whole_file(p, hostd_images::input::MAX_KERNEL).map_err(|source| {
                PlanError::ReadPayload {
                    what,
                    path: p.to_owned(),
                    source,
                }
            })
        };
        let bytes = read(kernel, "--kernel")?;
        let initrd = match &opts.initrd {
            Some(p) => Some(read(p, "--initrd")?),
            None => None,
        };
        return Ok(Plan {
            // As `display()` would print it, without the formatting machinery's
            // padding code (code run once is what a start costs, docs/startup.md).
            name: kernel.to_string_lossy().into_owned(),
            kernel: bytes,
            initrd,
            cmdline: opts
                .cmdline
                .clone()
                .unwrap_or_else(|| BARE_KERNEL_CMDLINE.into()),
            vcpus: opts.vcpus.unwrap_or(1),
            memory_mib: memory(256)?,
            stop_timeout_secs: 5,
            root: None,
            volumes: vec![],
            declared_secrets: Default::default(),
            capabilities: vec![],
        });
    }
    let path = opts.image.as_deref().ok_or(PlanError::NothingToBoot)?;
    let (image, manifest, signer) = open_image(path, &opts.trust)?;
    if let Some(s) = signer {
        tracing::info!("signature verified: key {} ({})", s.key_id, s.comment);
    }
    let net_args = opts
        .net
        .as_ref()
        .map(NetConfig::cmdline_args)
        .unwrap_or_default();
    let cmdline = [
        BASE_CMDLINE,
        manifest.cmdline.as_str(),
        net_args.as_str(),
        opts.cmdline.as_deref().unwrap_or(""),
    ]
    .iter()
    .filter(|s| !s.is_empty())
    .copied()
    .collect::<Vec<_>>()
    .join(" ");
    tracing::info!("image {} (sha256:{})", manifest.name, &image.id[..12]);
    let rootfs = match &manifest.root {
        None => None,
        Some(root) => {
            let s = image.section(sections::ROOTFS)?;
            let hashes = image.section(sections::ROOTFS_HASHES)?;
            if s.length != root.size {
                return Err(PlanError::RootfsSize {
                    path: path.to_owned(),
                    section: s.length,
                    manifest: root.size,
                });
            }
            hostd_images::verity::check_lengths(s.length, hashes.length).map_err(|source| {
                PlanError::Verity {
                    path: path.to_owned(),
                    source,
                }
            })?;
            // Served by the block backend straight from the image file, every block
            // checked against the hash table whose digest the verified header holds.
            Some(DeviceBackend::Block {
                id: "rootfs".into(),
                file: std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()),
                offset: s.offset,
                length: s.length,
                read_only: true,
                verity: Some((hashes.offset, hashes.length, digest_hex(&hashes.sha256))),
            })
        }
    };
    Ok(Plan {
        name: manifest.name.clone(),
        kernel: section_payload(&image, sections::KERNEL)?,
        initrd: Some(section_payload(&image, sections::INITRD)?),
        cmdline,
        vcpus: opts.vcpus.unwrap_or(manifest.vcpus),
        memory_mib: memory(manifest.memory_mib)?,
        stop_timeout_secs: manifest.stop_timeout_secs,
        root: rootfs,
        volumes: manifest.volumes.clone(),
        declared_secrets: manifest
            .services
            .values()
            .flat_map(|s| s.secrets.iter().cloned())
            .collect(),
        capabilities: hostd_images::abi::capability_names(&manifest),
    })
}

/// A section of a verified image, to be read (and checked again) while it is loaded.
fn section_payload(image: &Image, name: &str) -> Result<Payload, PlanError> {
    let s = image.section(name)?;
    Payload::section(
        image.path(),
        s.offset,
        s.length,
        s.sha256,
        image.stamp,
        format!("{} (section `{name}`)", image.path().display()),
    )
    .map_err(|source| PlanError::Reopen {
        path: image.path().to_owned(),
        source,
    })
}

/// The secrets the host offers: `secrets`, then every file of `secret_dir` (a secret
/// of `secrets` of the same name wins). Files must exist and be readable.
pub fn host_secrets(opts: &RunOptions) -> Result<Vec<(String, PathBuf)>, PlanError> {
    let mut out: BTreeMap<String, PathBuf> = Default::default();
    if let Some(dir) = &opts.secret_dir {
        let entries = std::fs::read_dir(dir).map_err(|source| PlanError::SecretDir {
            dir: dir.clone(),
            source,
        })?;
        for e in entries {
            let e = e.map_err(|source| PlanError::SecretDirEntry {
                dir: dir.clone(),
                source,
            })?;
            if !e.file_type().map(|t| t.is_file()).unwrap_or(false) {
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            if hostd_devices::vhost_user::vsock::check_secret_name(&name).is_err() {
                tracing::warn!(
                    "--secret-dir {}: skipping `{name}`: not a valid secret name",
                    dir.display()
                );
                continue;
            }
            out.insert(name, e.path());
        }
    }
    for (name, file) in &opts.secrets {
        out.insert(name.clone(), file.clone());
    }
    out.into_iter()
        .map(|(name, file)| {
            let f = std::fs::canonicalize(&file).map_err(|source| PlanError::SecretMissing {
                name: name.clone(),
                file: file.clone(),
                source,
            })?;
            hostd_images::input::read_regular(&f, hostd_images::input::MAX_SECRET).map_err(
                |source| PlanError::SecretRead {
                    name: name.clone(),
                    file: f.clone(),
                    source,
                },
            )?;
            Ok((name, f))
        })
        .collect()
}

/// The devices a run attaches, in the order the guest sees them: the root disk first
/// (/dev/vda), then the volumes in manifest order (serials vol0, vol1, …), the network
/// card, rng, then vsock when secrets are declared or offered or capabilities carried. Each volume is locked
/// for this VM for as long as the returned locks live.
pub fn devices(
    plan: &Plan,
    opts: &RunOptions,
) -> Result<(Vec<DeviceBackend>, Vec<VolumeLock>), PlanError> {
    let mut devices: Vec<DeviceBackend> = plan.root.iter().cloned().collect();
    let mut locks = Vec::new();
    let state = opts
        .state_dir
        .clone()
        .unwrap_or_else(crate::volumes::state_dir);
    let holder = format!("VM {} (hostd pid {})", plan.name, std::process::id());
    for (i, v) in plan.volumes.iter().enumerate() {
        locks.push(crate::volumes::lock(&state, &v.name, &holder)?);
        let file = crate::volumes::ensure(&state, &v.name, v.size_mib)?;
        let length = std::fs::metadata(&file)
            .map_err(PlanError::VolumeSize)?
            .len();
        devices.push(DeviceBackend::Block {
            id: format!("vol{i}"),
            file,
            offset: 0,
            length,
            read_only: false,
            verity: None,
        });
    }
    if let Some(net) = &opts.net {
        devices.push(DeviceBackend::Net {
            tap: net.tap.clone(),
            mac: net.mac.clone(),
        });
    }
    devices.push(DeviceBackend::Rng);
    let offered = host_secrets(opts)?;
    let caps = match (&opts.caps_link, plan.capabilities.len()) {
        (_, 0) => None,
        (Some(relay), n) => Some(crate::backends::CapsLink {
            socket: relay.socket.clone(),
            token: relay.token.clone(),
            count: n as u32,
        }),
        (None, _) => {
            tracing::warn!(
                "the image's services declare capabilities ({}) but this runner carries none; their connections will be refused",
                plan.capabilities.join(", ")
            );
            None
        }
    };
    if !plan.declared_secrets.is_empty() || !offered.is_empty() || caps.is_some() {
        for name in &plan.declared_secrets {
            if !offered.iter().any(|(n, _)| n == name) {
                tracing::warn!(
                    "secret {name} is declared by the image but not provided (--secret {name}=@FILE); services that declare it will not find /run/secrets/{name}"
                );
            }
        }
        let mut secrets = Vec::new();
        for (name, file) in offered {
            if plan.declared_secrets.contains(&name) {
                secrets.push((name, file));
            } else {
                tracing::warn!(
                    "secret {name} is provided but no service of the image declares it; not delivered"
                );
            }
        }
        devices.push(DeviceBackend::Vsock {
            cid: GUEST_CID,
            secrets,
            caps,
        });
    }
    check_cmdline_fits(&plan.cmdline, devices.len())?;
    Ok((devices, locks))
}

/// Refuses a command line that, with the runner's own device arguments, would not fit
/// the kernel's (which would cut it silently).
fn check_cmdline_fits(cmdline: &str, devices: usize) -> Result<(), PlanError> {
    let total = cmdline.len() + CMDLINE_PER_DEVICE * (devices + 1);
    if total >= crate::layout::CMDLINE_MAX_SIZE {
        return Err(PlanError::CmdlineTooLong {
            total,
            max: crate::layout::CMDLINE_MAX_SIZE - 1,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_and_backend_agree_on_capability_ports() {
        use hostd_devices::vhost_user::vsock;
        assert_eq!(
            hostd_images::abi::VSOCK_CAPS_PORT_BASE,
            vsock::CAPS_PORT_BASE
        );
        assert_eq!(hostd_images::abi::MAX_CAPABILITIES as u32, vsock::MAX_CAPS);
        // The capability ports stay clear of the secrets and echo ports.
        const { assert!(vsock::CAPS_PORT_BASE > vsock::ECHO_PORT) };
    }

    #[test]
    fn secrets_come_from_files_only() {
        assert_eq!(
            parse_secret_arg("db_password=@/run/pw").ok(),
            Some(("db_password".to_string(), PathBuf::from("/run/pw")))
        );
        assert!(matches!(
            parse_secret_arg("db_password=hunter2"),
            Err(SecretArgError::Literal(_))
        ));
        assert!(matches!(
            parse_secret_arg("../x=@/run/pw"),
            Err(SecretArgError::Name(_))
        ));
        assert!(matches!(
            parse_secret_arg("x=@"),
            Err(SecretArgError::NoFile(_))
        ));
        assert!(matches!(
            parse_secret_arg("x"),
            Err(SecretArgError::Syntax(_))
        ));
    }

    #[test]
    fn net_parses_and_names_the_bad_part() {
        let n = NetConfig::parse("tap=tap0,ip=10.0.0.2/24,gw=10.0.0.1,dns=1.1.1.1").expect("valid");
        assert_eq!(n.tap, "tap0");
        assert_eq!(
            n.cmdline_args(),
            format!(
                "hostd.ip=10.0.0.2/24 hostd.gw=10.0.0.1 {}1.1.1.1",
                hostd_images::abi::CMDLINE_DNS
            )
        );
        assert_eq!(NetConfig::parse("ip=10.0.0.2"), Err(NetError::NoTap));
        assert_eq!(
            NetConfig::parse("tap=t,mac=01:00:00:00:00:00"),
            Err(NetError::Multicast("01:00:00:00:00:00".into()))
        );
        assert_eq!(
            NetConfig::parse("tap=t,ip=10.0.0.2/33"),
            Err(NetError::Prefix("33".into()))
        );
        assert_eq!(
            NetConfig::parse("tap=t,x=1"),
            Err(NetError::UnknownKey("x".into()))
        );
    }

    #[test]
    fn memory_is_checked() {
        assert_eq!(parse_memory("512M").ok(), Some(512));
        assert!(matches!(
            parse_memory("65G"),
            Err(PlanError::MemoryRange { .. })
        ));
        assert!(matches!(
            parse_memory("lots"),
            Err(PlanError::MemorySyntax(_))
        ));
    }
}
