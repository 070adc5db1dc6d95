//! `hostd build`, `hostd inspect`, `hostd run`: wiring between the CLI, the image
//! crate and the runners.

use anyhow::{bail, Context, Result};
#[cfg(feature = "full")]
use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;

#[cfg(feature = "full")]
use hostd_images::builder::{self, BuildOptions};
#[cfg(feature = "full")]
use hostd_images::format::{digest_hex, sections};
#[cfg(feature = "full")]
use hostd_images::signature::{self, SigningKey};
use hostd_vmm::kvm::{CpuTemplate, KvmConfig};
use hostd_vmm::plan::{self, NetConfig, RunOptions};
use hostd_vmm::qemu::{self, Accel, QemuOptions, StagedFiles};
use hostd_vmm::BootSpec;

#[cfg(feature = "full")]
/// Guest init, built from guest/init by build.rs.
static GUEST_INIT: &[u8] = include_bytes!(env!("HOSTD_INIT_PATH"));

#[cfg(feature = "full")]
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

#[cfg(feature = "full")]
fn default_kernel(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os("HOSTD_KERNEL").map(PathBuf::from))
        .unwrap_or_else(|| cache_dir().join("kernel").join("default").join("vmlinux"))
}

#[cfg(feature = "full")]
fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

#[cfg(feature = "full")]
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

#[cfg(feature = "full")]
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

#[cfg(feature = "full")]
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
    if let Some(k) = sign.as_deref() {
        // The image would replace the secret key it is signed with.
        anyhow::ensure!(
            !hostd_images::input::same_path(k, output)
                && !hostd_images::input::same_path(&k.with_extension("pub"), output),
            "{}: it is the signing key (--sign) or its public key; choose another output path",
            output.display()
        );
    }
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

#[cfg(feature = "full")]
/// `hostd inspect`.
pub fn inspect(path: &Path, manifest_only: bool, trust: &[PathBuf]) -> Result<i32> {
    let (image, _, verified) = plan::open_image(path, trust)?;
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
    print_out(&crate::cli::printable(&out));
    Ok(0)
}

#[cfg(feature = "full")]
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
    /// VM exited (ms since hostd started), on stderr; with the built-in VMM also when
    /// each start-up step up to the first KVM_RUN ended (docs/startup.md).
    #[arg(long)]
    pub timings: bool,
    /// Stop the VM and fail after this many seconds.
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// Attach a network card backed by an existing TAP device, and give the guest's
    /// eth0 an address: `tap=NAME[,ip=ADDR/PREFIX][,gw=GATEWAY][,mac=MAC][,dns=ADDR]…`
    /// (`dns=`, up to 3, replaces the image's DNS servers in the guest's
    /// /etc/resolv.conf). Create the TAP first: `ip tuntap add NAME mode tap && ip link
    /// set NAME up`.
    #[arg(long, value_name = "tap=NAME,...", value_parser = parse_net)]
    pub net: Option<NetConfig>,
    /// Where volumes live [default: $HOSTD_STATE, else ~/.local/share/hostd]; its
    /// `caps/` is the cap store holding the capabilities the image's services declare
    /// (`hostd cap add NAME CAP --state-dir DIR`) [default for those: `hostd cap`'s].
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
    /// Built-in VMM: keep snapshots in DIR. The first run of an image and configuration
    /// snapshots the VM when guest init is ready (before volumes, secrets and services);
    /// later runs restore that snapshot instead of booting (docs/snapshots.md).
    #[arg(long, value_name = "DIR")]
    pub snapshot_cache: Option<PathBuf>,
    /// Boot only an image signed by one of these public keys (repeatable; minisign
    /// format, as `hostd key new` writes): an unsigned image, or one signed by any
    /// other key, is refused.
    #[arg(long, value_name = "PUBKEY", requires = "image")]
    pub trust: Vec<PathBuf>,
}

/// `--secret NAME=@FILE`.
fn parse_secret(s: &str) -> Result<(String, PathBuf), plan::SecretArgError> {
    plan::parse_secret_arg(s)
}

/// `--net tap=NAME[,ip=ADDR/PREFIX][,gw=GATEWAY][,mac=MAC][,dns=ADDR]…`.
fn parse_net(s: &str) -> Result<NetConfig, plan::NetError> {
    NetConfig::parse(s)
}

/// Longest `--timeout`: a year.
const MAX_TIMEOUT_SECS: u64 = 365 * 24 * 3600;

/// Checks what only the CLI knows (which runner, the timeout) and turns the arguments
/// into the shared [`RunOptions`].
fn run_options(args: &RunArgs) -> Result<RunOptions> {
    // A flag for the other monitor would be ignored; say so instead.
    if args.vmm == VmmKind::Kvm && args.accel != AccelArg::Auto {
        bail!("--accel applies to --vmm qemu only (the built-in VMM always uses KVM)");
    }
    if args.vmm == VmmKind::Qemu && args.snapshot_cache.is_some() {
        bail!("--snapshot-cache applies to the built-in VMM only (--vmm kvm)");
    }
    if args.vmm == VmmKind::Qemu && args.cpu_template != TemplateArg::Auto {
        bail!("--cpu-template applies to the built-in VMM only (--vmm kvm)");
    }
    // clap's `requires` on these two is not enforced when the other of image and
    // --kernel is given (they conflict): without these checks the initrd or the keys
    // were ignored, and a bare kernel booted although keys were asked for.
    if args.initrd.is_some() && args.kernel.is_none() {
        bail!("--initrd applies to --kernel only (an image carries its own initrd)");
    }
    if !args.trust.is_empty() && args.image.is_none() {
        bail!("--trust checks an image's signature; a bare --kernel carries none");
    }
    if let Some(t) = args.timeout {
        if !(1..=MAX_TIMEOUT_SECS).contains(&t) {
            bail!("--timeout {t}: expected 1 to {MAX_TIMEOUT_SECS} seconds");
        }
    }
    Ok(RunOptions {
        image: args.image.clone(),
        kernel: args.kernel.clone(),
        initrd: args.initrd.clone(),
        vcpus: args.vcpus,
        mem: args.mem.clone(),
        cmdline: args.cmdline.clone(),
        net: args.net.clone(),
        state_dir: args.state_dir.clone(),
        secrets: args.secrets.clone(),
        secret_dir: args.secret_dir.clone(),
        trust: args.trust.clone(),
        caps_link: None,
    })
}

/// `hostd run`.
pub fn run(args: &RunArgs) -> Result<i32> {
    // Under systemd (Type=notify): READY=1 once guest init has started the services.
    hostd_vmm::ready::init_from_env();
    // Ctrl-C, SIGTERM and SIGHUP from here on are counted, never fatal: the runner stops
    // the VM (at once while it boots) and every staged file is removed.
    hostd_vmm::signals::install();
    let mut opts = run_options(args)?;
    let r = plan::resolve(&opts)?;
    hostd_vmm::phase("image");
    // Capabilities the services declare: each held by this host (checked now, before
    // anything boots), carried by a relay of their own (src/cap_relay.rs).
    let _relay = crate::cap_relay::start(&r.capabilities, args.state_dir.as_deref())?;
    if let Some(relay) = &_relay {
        opts.caps_link = Some(plan::CapsRelay {
            socket: relay.socket().to_path_buf(),
            token: relay.token_file().to_path_buf(),
        });
    }
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
            let kernel = staged.put_kernel("kernel", &r.kernel)?;
            let initrd = match &r.initrd {
                Some(i) => Some(staged.put_payload("initrd", i)?),
                None => None,
            };
            let (devices, _volume_locks) = plan::devices(&r, &opts)?;
            // Staged: the image's fds are closed before the VM's process is forked.
            drop(r.kernel);
            drop(r.initrd);
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
            let (devices, _volume_locks) = plan::devices(&r, &opts)?;
            // Decided now: once the VM runs, this thread's seccomp filter forbids opening
            // /dev/kvm again.
            let pvm_host = hostd_vmm::host::kvm_kind() == hostd_vmm::host::KvmKind::Pvm;
            let mut cfg = KvmConfig {
                kernel: r.kernel,
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
                snapshot: None,
            };
            if let Some(dir) = &args.snapshot_cache {
                cfg.snapshot =
                    hostd_vmm::kvm::snapshot::SnapshotCache::for_config(dir.clone(), &cfg);
                if cfg.snapshot.is_none() {
                    tracing::warn!(
                        "--snapshot-cache: a kernel without a digest (--kernel) is not snapshotted; booting"
                    );
                }
            }
            hostd_vmm::kvm::run(cfg)
            .map_err(|e| {
                // The hint is for a guest that failed to run, not for an image or flag
                // that was refused before it started, nor a timeout or too little memory
                // (with the sandbox every error arrives as the VM process's text).
                let text = e.to_string();
                let not_the_guest = [
                    "(--timeout)",
                    "give the VM more memory",
                    "cannot load kernel",
                    "KVM: ",
                ];
                let guest_failed = matches!(e, hostd_vmm::kvm::KvmError::Guest(_))
                    && !not_the_guest.iter().any(|n| text.contains(n));
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
        if let Some(line) = outcome.timings.phases_line() {
            eprintln!("hostd: {line}");
        }
    }
    Ok(i32::from(outcome.exit_code))
}
