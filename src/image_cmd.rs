//! `hostd build`, `hostd inspect`, `hostd run`: wiring between the CLI, the image
//! crate and the runners.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hostd_images::builder::{self, BuildOptions};
use hostd_images::format::{digest_hex, sections, Image};
use hostd_images::manifest::Manifest;
use hostd_images::names;
use hostd_images::signature::{self, Signer, SigningKey, TrustedKey};
use hostd_vmm::backends::DeviceBackend;
use hostd_vmm::kvm::{CpuTemplate, KvmConfig};
use hostd_vmm::qemu::{self, Accel, QemuOptions, StagedFiles};
use hostd_vmm::volumes::VolumeLock;
use hostd_vmm::{BootSpec, BASE_CMDLINE};

/// Guest init, built from guest/init by build.rs.
static GUEST_INIT: &[u8] = include_bytes!(env!("HOSTD_INIT_PATH"));

/// hostd's cache directory: $HOSTD_CACHE, else ~/.cache/hostd.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("HOSTD_CACHE") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache").join("hostd")
}

fn default_kernel(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os("HOSTD_KERNEL").map(PathBuf::from))
        .unwrap_or_else(|| cache_dir().join("kernel").join("default").join("vmlinux"))
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// `hostd key`.
#[derive(Debug, clap::Subcommand)]
pub enum KeyCommand {
    /// Make a new signing key pair: PREFIX.key (secret, mode 0600, unencrypted) and
    /// PREFIX.pub (public). Sign with `hostd build --sign PREFIX.key`; check with
    /// `hostd run --trust PREFIX.pub`. Existing files are never replaced.
    New {
        /// Path prefix of the two key files.
        prefix: PathBuf,
    },
}

/// `hostd key`.
pub fn key(cmd: KeyCommand) -> Result<i32> {
    match cmd {
        KeyCommand::New { prefix } => {
            let (secret, public, id) = SigningKey::generate(&prefix)?;
            eprintln!(
                "hostd: key {id}: secret key {} (keep it private), public key {}",
                secret.display(),
                public.display()
            );
            Ok(0)
        }
    }
}

/// `hostd build`.
pub fn build(
    spec: &Path,
    output: &Path,
    kernel: Option<PathBuf>,
    context: Option<PathBuf>,
    sign: Option<PathBuf>,
    update_lock: bool,
) -> Result<i32> {
    crate::interrupt::remove_scratch_on_signals();
    let kernel = default_kernel(kernel);
    let cache = cache_dir();
    let key = sign.as_deref().map(SigningKey::load).transpose()?;
    eprintln!("hostd: building {} -> {}", spec.display(), output.display());
    let report = builder::build(&BuildOptions {
        spec,
        output,
        init: GUEST_INIT,
        default_kernel: &kernel,
        cache: &cache,
        context: context.as_deref(),
        sign: key.as_ref(),
        update_lock,
        progress: &crate::progress::CliProgress::new(),
    })?;
    if let Some(p) = &report.packages {
        for note in &p.notes {
            eprintln!("hostd: {note}");
        }
        eprintln!(
            "hostd: {} package(s) with dependencies, {} of .debs; {} {}",
            p.count,
            mib(p.deb_bytes),
            if p.lock_written {
                "wrote lock file"
            } else {
                "followed lock file"
            },
            p.lock.display()
        );
    }
    let signed = key
        .map(|k| format!(", signed by key {}", k.id()))
        .unwrap_or_default();
    eprintln!(
        "hostd: built image {} ({}, {} service(s), {} package(s){signed})",
        report.id,
        mib(report.size),
        report.manifest.services.len(),
        report.manifest.packages.len()
    );
    Ok(0)
}

/// Opens and verifies an image: every digest, the manifest and the sections it needs,
/// and, when keys are given, its signature.
fn open_image(path: &Path, trust: &[PathBuf]) -> Result<(Image, Manifest, Option<Signer>)> {
    let image = Image::open(path)?;
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

/// `hostd inspect`.
pub fn inspect(path: &Path, manifest_only: bool, trust: &[PathBuf]) -> Result<i32> {
    let (image, _, verified) = open_image(path, trust)?;
    let manifest_bytes = image.read_section(sections::MANIFEST)?;
    let mut out = String::new();
    if manifest_only {
        out.push_str(&String::from_utf8_lossy(&manifest_bytes));
    } else {
        out.push_str(&format!("image     {}\n", path.display()));
        out.push_str(&format!("id        sha256:{}\n", image.id));
        out.push_str(&format!("format    {}\n", image.header.version));
        let signed = match (verified, signature::signer_unverified(&image)?) {
            (Some(s), _) => format!("key {} (verified: {})", s.key_id, s.comment),
            (None, Some(s)) => format!(
                "key {} (not verified; give --trust KEY.pub to check it)",
                s.key_id
            ),
            (None, None) => "no".into(),
        };
        out.push_str(&format!("signed    {signed}\n"));
        out.push_str(&format!(
            "size      {} ({} bytes)\n",
            mib(image.header.file_length),
            image.header.file_length
        ));
        out.push_str("sections  (every sha256 verified)\n");
        for s in &image.header.sections {
            out.push_str(&format!(
                "  {:<13} offset {:>10}  length {:>10}  sha256 {}  ok\n",
                s.name,
                s.offset,
                s.length,
                digest_hex(&s.sha256)
            ));
        }
        out.push_str("manifest\n");
        for line in String::from_utf8_lossy(&manifest_bytes).lines() {
            out.push_str("  ");
            out.push_str(line);
            out.push('\n');
        }
    }
    print_out(&out);
    Ok(0)
}

fn print_out(s: &str) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    let _ = o.write_all(s.as_bytes());
    let _ = o.flush();
}

/// Which monitor boots the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum VmmKind {
    /// hostd's own VMM on KVM.
    Kvm,
    /// QEMU's `microvm` machine (KVM where it works, TCG elsewhere).
    Qemu,
}

/// QEMU accelerator choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccelArg {
    /// KVM if this host's KVM can run a Linux guest, else TCG.
    Auto,
    /// KVM.
    Kvm,
    /// TCG (software emulation).
    Tcg,
}

/// CPU template for the built-in VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TemplateArg {
    /// `pvm` on hosts whose /dev/kvm is a nested PVM hypervisor, else `host`.
    Auto,
    /// Everything KVM supports.
    Host,
    /// For nested PVM hosts (docs/pvm.md): hide what the host's instruction emulator
    /// cannot run (XSAVE, POPCNT, SMAP, …), also on the kernel command line (`noxsave
    /// clearcpuid=…`), turn on hostd's kernel patch for system calls
    /// (`syscall_via_fault`), and `nopv` with several vCPUs. (The VMM's instruction
    /// assist is on whenever the host is PVM, whatever the template.)
    Pvm,
}

/// Arguments of `hostd run`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["image", "kernel"])))]
pub struct RunArgs {
    /// The image to boot.
    pub image: Option<PathBuf>,
    /// Boot a bare kernel instead of an image (ELF vmlinux with a PVH note; QEMU also
    /// takes a bzImage), as Firecracker's boot-source does.
    #[arg(long, value_name = "FILE", conflicts_with = "image")]
    pub kernel: Option<PathBuf>,
    /// Initrd for --kernel.
    #[arg(long, value_name = "FILE", requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// Which monitor boots the guest.
    #[arg(long, value_enum, default_value = "kvm")]
    pub vmm: VmmKind,
    /// QEMU accelerator (with --vmm qemu).
    #[arg(long, value_enum, default_value = "auto")]
    pub accel: AccelArg,
    /// CPU template (with --vmm kvm).
    #[arg(long, value_enum, default_value = "auto")]
    pub cpu_template: TemplateArg,
    /// vCPUs [default: the image's, or 1].
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// Guest memory, e.g. 512M or 1G [default: the image's, or 256M].
    #[arg(long, value_name = "SIZE")]
    pub mem: Option<String>,
    /// Kernel command line: appended after the image's; with --kernel, the whole
    /// command line [default with --kernel: "console=ttyS0 reboot=t panic=-1"].
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,
    /// Print when the VM started, guest init started, the first service started and the
    /// VM exited (ms since hostd started), on stderr.
    #[arg(long)]
    pub timings: bool,
    /// Stop the VM and fail after this many seconds.
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// Attach a network card backed by an existing TAP device, and give the guest's
    /// eth0 an address: `tap=NAME[,ip=ADDR/PREFIX][,gw=GATEWAY][,mac=MAC]`. Create the
    /// TAP first: `ip tuntap add NAME mode tap && ip link set NAME up`.
    #[arg(long, value_name = "tap=NAME,...", value_parser = parse_net)]
    pub net: Option<NetArg>,
    /// Where volumes live [default: $HOSTD_STATE, else ~/.local/share/hostd].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Debugging only: run the VMM and the device backends without seccomp filters,
    /// jails or dropped capabilities.
    #[arg(long)]
    pub no_sandbox: bool,
    /// Deliver a secret at boot (over vsock) to the services that declare it, as
    /// /run/secrets/NAME: `NAME=@FILE` (repeatable). The value never touches the image
    /// or a volume.
    #[arg(long = "secret", value_name = "NAME=@FILE", value_parser = parse_secret)]
    pub secrets: Vec<(String, PathBuf)>,
    /// Deliver every file in DIR as a secret named after the file.
    #[arg(long, value_name = "DIR")]
    pub secret_dir: Option<PathBuf>,
    /// Boot only an image signed by one of these public keys (repeatable; minisign
    /// format, as `hostd key new` writes): an unsigned image, or one signed by any
    /// other key, is refused.
    #[arg(long, value_name = "PUBKEY", requires = "image")]
    pub trust: Vec<PathBuf>,
}

/// `--secret NAME=@FILE`.
fn parse_secret(s: &str) -> Result<(String, PathBuf), String> {
    let (name, file) = s
        .split_once('=')
        .ok_or(format!("`{s}`: expected NAME=@FILE"))?;
    let file = file.strip_prefix('@').ok_or(format!(
        "`{s}`: give the value as a file, NAME=@FILE (a value on the command line would show in ps)"
    ))?;
    hostd_devices::vhost_user::vsock::check_secret_name(name).map_err(|e| e.to_string())?;
    if file.is_empty() {
        return Err(format!("`{s}`: no file after `@`"));
    }
    Ok((name.to_string(), PathBuf::from(file)))
}

/// The secrets the host offers: `--secret`s, then every file of `--secret-dir` (a
/// `--secret` of the same name wins). Files must exist and be readable.
fn host_secrets(args: &RunArgs) -> Result<Vec<(String, PathBuf)>> {
    let mut out: std::collections::BTreeMap<String, PathBuf> = Default::default();
    if let Some(dir) = &args.secret_dir {
        let entries = std::fs::read_dir(dir)
            .with_context(|| format!("--secret-dir {}: cannot list it", dir.display()))?;
        for e in entries {
            let e = e.with_context(|| format!("--secret-dir {}", dir.display()))?;
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
    for (name, file) in &args.secrets {
        out.insert(name.clone(), file.clone());
    }
    out.into_iter()
        .map(|(name, file)| {
            let f = std::fs::canonicalize(&file)
                .with_context(|| format!("secret {name}: cannot find {}", file.display()))?;
            hostd_images::input::read_regular(&f, hostd_images::input::MAX_SECRET)
                .with_context(|| format!("secret {name}: cannot read {}", f.display()))?;
            Ok((name, f))
        })
        .collect()
}

/// `--net tap=NAME[,ip=ADDR/PREFIX][,gw=GATEWAY][,mac=MAC]`.
#[derive(Debug, Clone)]
pub struct NetArg {
    tap: String,
    ip: Option<String>,
    gw: Option<String>,
    mac: String,
}

fn parse_net(s: &str) -> Result<NetArg, String> {
    let mut net = NetArg {
        tap: String::new(),
        ip: None,
        gw: None,
        mac: "52:54:00:12:34:56".into(),
    };
    for part in s.split(',') {
        let (k, v) = part
            .split_once('=')
            .ok_or(format!("`{part}`: expected key=value"))?;
        match k {
            "tap" => {
                // IFNAMSIZ: 15 bytes and a NUL; no `/`, whitespace or `:`.
                if v.is_empty()
                    || v.len() > 15
                    || !v
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                {
                    return Err(format!(
                        "tap: `{v}` is not an interface name (1-15 letters, digits, `-`, `_`, `.`)"
                    ));
                }
                net.tap = v.to_string()
            }
            "ip" => {
                let (a, p) = v.split_once('/').unwrap_or((v, "24"));
                a.parse::<std::net::Ipv4Addr>()
                    .map_err(|_| format!("ip: `{a}` is not an IPv4 address"))?;
                p.parse::<u8>()
                    .ok()
                    .filter(|p| *p <= 32)
                    .ok_or(format!("ip: bad prefix `{p}`"))?;
                net.ip = Some(format!("{a}/{p}"));
            }
            "gw" => {
                v.parse::<std::net::Ipv4Addr>()
                    .map_err(|_| format!("gw: `{v}` is not an IPv4 address"))?;
                net.gw = Some(v.to_string());
            }
            "mac" => {
                let octets: Vec<&str> = v.split(':').collect();
                if octets.len() != 6
                    || !octets
                        .iter()
                        .all(|o| o.len() == 2 && u8::from_str_radix(o, 16).is_ok())
                {
                    return Err(format!(
                        "mac: `{v}` is not a MAC address (52:54:00:12:34:56)"
                    ));
                }
                let first = u8::from_str_radix(octets[0], 16).unwrap_or(1);
                if first & 1 == 1 {
                    return Err(format!("mac: `{v}` is a multicast address"));
                }
                net.mac = v.to_ascii_lowercase()
            }
            _ => return Err(format!("unknown key `{k}` (tap, ip, gw, mac)")),
        }
    }
    if net.tap.is_empty() {
        return Err("tap=NAME is required".into());
    }
    Ok(net)
}

/// What `hostd run` boots, resolved from an image or from --kernel.
struct Resolved {
    /// The image's name (or the kernel's path).
    name: String,
    kernel: Vec<u8>,
    kernel_name: String,
    initrd: Option<Vec<u8>>,
    cmdline: String,
    vcpus: u32,
    memory_mib: u32,
    stop_timeout_secs: u32,
    /// The image's read-only root file system (its `rootfs` section), if it has one.
    root: Option<DeviceBackend>,
    /// The image's volumes.
    volumes: Vec<hostd_images::manifest::Volume>,
    /// Every secret some service declares.
    declared_secrets: std::collections::BTreeSet<String>,
}

fn resolve(args: &RunArgs) -> Result<Resolved> {
    // A flag for the other monitor would be ignored; say so instead.
    if args.vmm == VmmKind::Kvm && args.accel != AccelArg::Auto {
        bail!("--accel applies to --vmm qemu only (the built-in VMM always uses KVM)");
    }
    if args.vmm == VmmKind::Qemu && args.cpu_template != TemplateArg::Auto {
        bail!("--cpu-template applies to the built-in VMM only (--vmm kvm)");
    }
    let memory = |default: u32| -> Result<u32> {
        match &args.mem {
            Some(m) => {
                let mib = hostd_images::spec::parse_size_mib(m)
                    .map_err(|e| anyhow::anyhow!("--mem: {e}"))?;
                if !(MIN_MEM_MIB..=*names::MEMORY_MIB.end()).contains(&mib) {
                    bail!("--mem {m}: expected {MIN_MEM_MIB}M to 64G");
                }
                Ok(mib)
            }
            None => Ok(default),
        }
    };
    if let Some(c) = &args.cmdline {
        names::check_cmdline(c).map_err(|e| anyhow::anyhow!("--cmdline: {e}"))?;
    }
    if let Some(v) = args.vcpus {
        if !names::VCPUS.contains(&v) {
            bail!("--vcpus {v}: expected 1 to 32");
        }
    }
    if let Some(t) = args.timeout {
        if !(1..=MAX_TIMEOUT_SECS).contains(&t) {
            bail!("--timeout {t}: expected 1 to {MAX_TIMEOUT_SECS} seconds");
        }
    }
    if let Some(kernel) = &args.kernel {
        let read = |p: &Path, what: &str| {
            hostd_images::input::read_regular(p, hostd_images::input::MAX_KERNEL)
                .with_context(|| format!("{what} {}: cannot read it", p.display()))
        };
        let bytes = read(kernel, "--kernel")?;
        let initrd = match &args.initrd {
            Some(p) => Some(read(p, "--initrd")?),
            None => None,
        };
        return Ok(Resolved {
            name: kernel.display().to_string(),
            kernel: bytes,
            kernel_name: kernel.display().to_string(),
            initrd,
            cmdline: args
                .cmdline
                .clone()
                .unwrap_or_else(|| "console=ttyS0 reboot=t panic=-1".into()),
            vcpus: args.vcpus.unwrap_or(1),
            memory_mib: memory(256)?,
            stop_timeout_secs: 5,
            root: None,
            volumes: vec![],
            declared_secrets: Default::default(),
        });
    }
    let path = args.image.as_deref().context("give an image or --kernel")?;
    let (image, manifest, signer) = open_image(path, &args.trust)?;
    if let Some(s) = signer {
        tracing::info!("signature verified: key {} ({})", s.key_id, s.comment);
    }
    let net_args = args
        .net
        .as_ref()
        .map(|n| {
            let ip =
                n.ip.as_ref()
                    .map(|ip| format!("hostd.ip={ip}"))
                    .unwrap_or_default();
            let gw =
                n.gw.as_ref()
                    .map(|gw| format!(" hostd.gw={gw}"))
                    .unwrap_or_default();
            format!("{ip}{gw}")
        })
        .unwrap_or_default();
    let cmdline = [
        BASE_CMDLINE,
        manifest.cmdline.as_str(),
        net_args.as_str(),
        args.cmdline.as_deref().unwrap_or(""),
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
                bail!(
                    "{}: section `rootfs` is {} bytes but the manifest records {}; the image is damaged, rebuild it",
                    path.display(),
                    s.length,
                    root.size
                );
            }
            hostd_images::verity::check_lengths(s.length, hashes.length)
                .with_context(|| format!("{}", path.display()))?;
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
    Ok(Resolved {
        name: manifest.name.clone(),
        kernel: image.read_section(sections::KERNEL)?,
        kernel_name: format!("{} (section `kernel`)", path.display()),
        initrd: Some(image.read_section(sections::INITRD)?),
        cmdline,
        vcpus: args.vcpus.unwrap_or(manifest.vcpus),
        memory_mib: memory(manifest.memory_mib)?,
        stop_timeout_secs: manifest.stop_timeout_secs,
        root: rootfs,
        volumes: manifest.volumes.clone(),
        declared_secrets: manifest
            .services
            .values()
            .flat_map(|s| s.secrets.iter().cloned())
            .collect(),
    })
}

/// The devices a run attaches, in the order the guest sees them: the root disk first
/// (/dev/vda), then the volumes in manifest order (serials vol0, vol1, …), then rng.
/// Each volume is locked for this VM for as long as the returned locks live.
fn devices_for(r: &Resolved, args: &RunArgs) -> Result<(Vec<DeviceBackend>, Vec<VolumeLock>)> {
    let mut devices: Vec<DeviceBackend> = r.root.iter().cloned().collect();
    let mut locks = Vec::new();
    let state = args
        .state_dir
        .clone()
        .unwrap_or_else(hostd_vmm::volumes::state_dir);
    let holder = format!("VM {} (hostd pid {})", r.name, std::process::id());
    for (i, v) in r.volumes.iter().enumerate() {
        locks.push(hostd_vmm::volumes::lock(&state, &v.name, &holder)?);
        let file = hostd_vmm::volumes::ensure(&state, &v.name, v.size_mib)?;
        let length = std::fs::metadata(&file)?.len();
        devices.push(DeviceBackend::Block {
            id: format!("vol{i}"),
            file,
            offset: 0,
            length,
            read_only: false,
            verity: None,
        });
    }
    if let Some(net) = &args.net {
        devices.push(DeviceBackend::Net {
            tap: net.tap.clone(),
            mac: net.mac.clone(),
        });
    }
    devices.push(DeviceBackend::Rng);
    let offered = host_secrets(args)?;
    if !r.declared_secrets.is_empty() || !offered.is_empty() {
        for name in &r.declared_secrets {
            if !offered.iter().any(|(n, _)| n == name) {
                tracing::warn!(
                    "secret {name} is declared by the image but not provided (--secret {name}=@FILE); services that declare it will not find /run/secrets/{name}"
                );
            }
        }
        let mut secrets = Vec::new();
        for (name, file) in offered {
            if r.declared_secrets.contains(&name) {
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
        });
    }
    check_cmdline_fits(&r.cmdline, devices.len())?;
    Ok((devices, locks))
}

/// The guest's vsock CID.
const GUEST_CID: u64 = 3;

/// Smallest `--mem` (a bare `--kernel` guest may be tiny; images need 32 MiB).
const MIN_MEM_MIB: u32 = 1;
/// Longest `--timeout`: a year.
const MAX_TIMEOUT_SECS: u64 = 365 * 24 * 3600;
/// Room kept on the kernel command line for each device argument a runner adds
/// (`virtio_mmio.device=4K@0xfeb00000:12` and a space).
const CMDLINE_PER_DEVICE: usize = 48;

/// Refuses a command line that, with the runner's own device arguments, would not fit
/// the kernel's (which would cut it silently).
fn check_cmdline_fits(cmdline: &str, devices: usize) -> Result<()> {
    let total = cmdline.len() + CMDLINE_PER_DEVICE * (devices + 1);
    if total >= hostd_vmm::layout::CMDLINE_MAX_SIZE {
        bail!(
            "the kernel command line would be about {total} bytes with the runner's device \
             arguments; at most {} fit (shorten --cmdline or the image's `cmdline`)",
            hostd_vmm::layout::CMDLINE_MAX_SIZE - 1
        );
    }
    Ok(())
}

/// `hostd run`.
pub fn run(args: &RunArgs) -> Result<i32> {
    // Under systemd (Type=notify): READY=1 once guest init has started the services.
    hostd_vmm::ready::init_from_env();
    // Ctrl-C, SIGTERM and SIGHUP from here on are counted, never fatal: the runner stops
    // the VM (at once while it boots) and every staged file is removed.
    hostd_vmm::signals::install();
    let r = resolve(args)?;
    tracing::info!(
        "booting with {} vCPU(s), {} MiB ({:?})",
        r.vcpus,
        r.memory_mib,
        args.vmm
    );
    let timeout = args.timeout.map(Duration::from_secs);
    let outcome = match args.vmm {
        VmmKind::Qemu => {
            let staged = StagedFiles::new().context("cannot create a temporary directory")?;
            let kernel = staged.put("kernel", &r.kernel)?;
            let initrd = match &r.initrd {
                Some(i) => Some(staged.put("initrd", i)?),
                None => None,
            };
            let (devices, _volume_locks) = devices_for(&r, args)?;
            let boot = BootSpec {
                kernel,
                initrd,
                cmdline: r.cmdline,
                vcpus: r.vcpus,
                memory_mib: r.memory_mib,
                devices,
                sandbox_devices: !args.no_sandbox,
            };
            qemu::run(
                &boot,
                &QemuOptions {
                    accel: match args.accel {
                        AccelArg::Auto => Accel::Auto,
                        AccelArg::Kvm => Accel::Kvm,
                        AccelArg::Tcg => Accel::Tcg,
                    },
                    shutdown_grace: Duration::from_secs(u64::from(r.stop_timeout_secs) + 15),
                    timeout,
                },
            )?
        }
        VmmKind::Kvm => {
            if args.no_sandbox {
                tracing::warn!(
                    "--no-sandbox: the VMM runs without seccomp filters and keeps its capabilities"
                );
            }
            let (devices, _volume_locks) = devices_for(&r, args)?;
            // Decided now: once the VM runs, this thread's seccomp filter forbids opening
            // /dev/kvm again.
            let pvm_host = hostd_vmm::host::kvm_kind() == hostd_vmm::host::KvmKind::Pvm;
            let kernel = hostd_vmm::kvm::memory::memfd_with(c"hostd-kernel", &r.kernel)
                .context("cannot stage the kernel")?;
            hostd_vmm::kvm::run(KvmConfig {
                kernel,
                kernel_name: r.kernel_name,
                initrd: r.initrd,
                cmdline: r.cmdline,
                vcpus: r.vcpus as u8,
                memory_mib: r.memory_mib,
                template: match args.cpu_template {
                    TemplateArg::Auto => None,
                    TemplateArg::Host => Some(CpuTemplate::Host),
                    TemplateArg::Pvm => Some(CpuTemplate::Pvm),
                },
                devices,
                timeout,
                sandbox: !args.no_sandbox,
            })
            .map_err(|e| {
                // The hint is for a guest that failed to run, not for an image or flag
                // that was refused before it started.
                let guest_failed = matches!(e, hostd_vmm::kvm::KvmError::Guest(_));
                let hint = if pvm_host && guest_failed {
                    "\n  hint: this host's /dev/kvm is a nested PVM hypervisor, on which a guest kernel \
                     runs only with hostd's patches and command line (guest/kernel/, docs/pvm.md); \
                     `hostd run --vmm qemu` boots the same image under QEMU"
                } else {
                    ""
                };
                anyhow::anyhow!("{e}{hint}")
            })?
        }
    };
    if args.timings {
        eprintln!("hostd: {}", outcome.timings);
    }
    Ok(i32::from(outcome.exit_code))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_come_from_files_only() {
        assert_eq!(
            parse_secret("db_password=@/run/pw").ok(),
            Some(("db_password".to_string(), PathBuf::from("/run/pw")))
        );
        let literal = parse_secret("db_password=hunter2")
            .err()
            .unwrap_or_default();
        assert!(literal.contains("NAME=@FILE"), "{literal}");
        assert!(parse_secret("../x=@/run/pw").is_err());
        assert!(parse_secret("x=@").is_err());
        assert!(parse_secret("x").is_err());
    }
}
