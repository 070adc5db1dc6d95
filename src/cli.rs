//! The command line: parsing, and each subcommand to its module.

use crate::{backend_cmd, image_cmd, interrupt};
#[cfg(feature = "full")]
use crate::{bench_cmd, cap_cmd, daemon_cmd, fn_cmd, oci_cmd, systemd_cmd};
use clap::{Parser, Subcommand};
use std::ffi::OsString;
#[cfg(feature = "full")]
use std::path::PathBuf;

/// An immutable service host: build guest images from a declarative spec, boot them in
/// microVMs, and serve WebAssembly nanoservices with only the capabilities they are
/// granted.
#[cfg(feature = "full")]
#[derive(Debug, Parser)]
#[command(name = "hostd", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[cfg(feature = "full")]
#[derive(Debug, Subcommand)]
enum Command {
    /// Build an immutable guest image from a spec (see docs/spec.md).
    ///
    /// The same spec and inputs always give the same bytes; the image id is the sha256
    /// of the file. The output is written atomically: on any error the previous file,
    /// if any, is left as it was.
    Build {
        /// The spec file (TOML).
        spec: PathBuf,
        /// Where to write the image.
        #[arg(short, long, value_name = "IMAGE")]
        output: PathBuf,
        /// Kernel used for `kernel = "default"` [default: $HOSTD_KERNEL, else the
        /// kernel built by guest/kernel/build.sh in the hostd cache].
        #[arg(long, value_name = "FILE")]
        kernel: Option<PathBuf>,
        /// The directory the spec's relative paths (`kernel`, `files[].source`) may
        /// read from, symlinks resolved; anything outside it is refused [default: the
        /// spec's directory].
        #[arg(long, value_name = "DIR")]
        context: Option<PathBuf>,
        /// Sign the image with this minisign secret key (`hostd key new` makes one;
        /// `minisign -G` keys work too). `hostd run --trust KEY.pub` then checks it.
        #[arg(long, value_name = "KEY")]
        sign: Option<PathBuf>,
        /// Resolve the spec's packages again from the apt lists and rewrite its lock
        /// file (`app.lock` next to `app.toml`) instead of following it.
        #[arg(long)]
        update_lock: bool,
    },
    /// Verify an image and print its id, sections and manifest.
    ///
    /// Every section's sha256 is checked; a damaged image is refused with the name of
    /// the damaged section and a non-zero exit.
    Inspect {
        /// The image file.
        image: PathBuf,
        /// Print only the manifest, as JSON.
        #[arg(long)]
        manifest: bool,
        /// Also check the image's signature against these public keys (repeatable);
        /// fails when it is unsigned or signed by another key.
        #[arg(long, value_name = "PUBKEY")]
        trust: Vec<PathBuf>,
    },
    #[command(flatten)]
    Vm(VmCommand),
    /// OCI archives of images, for containerd (docs/containerd.md).
    Oci {
        #[command(subcommand)]
        cmd: oci_cmd::OciCommand,
    },
    /// Signing keys for images.
    Key {
        #[command(subcommand)]
        cmd: image_cmd::KeyCommand,
    },
    /// Run the host daemon: guests (and functions) behind a REST API on a Unix socket
    /// (docs/daemon.md).
    Daemon(daemon_cmd::DaemonArgs),
    /// Apply a fleet file: the daemon creates, replaces and removes guests to match it.
    Apply {
        /// The fleet file (TOML).
        file: PathBuf,
        #[command(flatten)]
        socket: daemon_cmd::SocketArg,
    },
    /// List the daemon's guests.
    Ps {
        #[command(flatten)]
        socket: daemon_cmd::SocketArg,
    },
    /// Create a guest in the daemon from an image, and start it.
    Up(daemon_cmd::UpArgs),
    /// Start a stopped guest.
    Start(daemon_cmd::NameArgs),
    /// Stop a guest (clean shutdown, then SIGKILL after the image's stop timeout).
    Stop(daemon_cmd::NameArgs),
    /// Stop and delete a guest.
    Rm(daemon_cmd::NameArgs),
    /// Print a guest's console.
    Logs {
        /// Keep printing new lines as they come.
        #[arg(short, long)]
        follow: bool,
        #[command(flatten)]
        args: daemon_cmd::NameArgs,
    },
    /// Capabilities on the wire: mint, list, revoke and hold them (docs/capabilities.md).
    Cap {
        #[command(subcommand)]
        cmd: cap_cmd::CapCommand,
    },
    /// WebAssembly nanoservices.
    Fn {
        #[command(subcommand)]
        cmd: fn_cmd::FnCommand,
    },
    /// The fleet's guests as systemd units, for hosts without NixOS (docs/nixos.md).
    Systemd {
        #[command(subcommand)]
        cmd: systemd_cmd::SystemdCommand,
    },
    /// Measure what each isolation level costs: the same workload as a native process,
    /// a container, a WebAssembly function and a microVM, side by side (docs/bench.md).
    Bench(bench_cmd::BenchArgs),
}

/// What `hostd` runs itself, without `hostd-full`: starting a VM and its devices.
#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // one value per process, parsed once
enum VmCommand {
    #[command(flatten)]
    Run(RunCommand),
    #[command(flatten)]
    Backend(BackendCommand),
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // one value per process, parsed once
enum RunCommand {
    /// Boot an image in a microVM; exits with the image's `main` service's exit code.
    ///
    /// The console is printed on stdout. Ctrl-C asks the guest to shut down cleanly
    /// (SIGTERM to every service, then power off); a second Ctrl-C stops it at once.
    Run(image_cmd::RunArgs),
}

#[derive(Debug, Subcommand)]
enum BackendCommand {
    /// A device backend process (started by `hostd run`; not for direct use).
    #[command(hide = true)]
    Backend {
        #[command(subcommand)]
        cmd: backend_cmd::BackendCommand,
    },
}

/// The command line of `hostd run` alone, and of `hostd backend` alone: parsing one
/// does not build every other subcommand's parser first (clap builds them all up front:
/// a sixth of the page faults of starting a VM with every subcommand, and still 100,000
/// instructions for the backends' when only `run` was wanted; `valgrind --tool=callgrind`).
#[derive(Debug, Parser)]
#[command(name = "hostd", version, propagate_version = true)]
struct OneCli<C: Subcommand> {
    #[command(subcommand)]
    command: C,
}

/// Runs the command line `args` (with the program's name first). `FULL`: this executable
/// has every subcommand (`hostd-full`); without it (`hostd`) only `run` and `backend` run
/// here and everything else is handed to `hostd-full` (lib.rs says why).
///
/// The caller passes the arguments: `hostd`'s own `main` (src/main.rs) takes them from
/// its C `main`, where the standard library has not read them with musl.
pub fn main<const FULL: bool>(args: Vec<OsString>) {
    hostd_vmm::mark_start();
    let words = || args.iter().skip(2).cloned().collect::<Vec<_>>();
    let vm = match args.get(1).and_then(|a| a.to_str()) {
        // The usual command lines without clap (quick_args.rs says why); clap for
        // the rest, and for help and errors.
        Some("run") => Some(VmCommand::Run(
            match crate::quick_args::run_args(&words()) {
                Some(args) => RunCommand::Run(args),
                None => OneCli::<RunCommand>::parse_from(&args).command,
            },
        )),
        Some("backend") => Some(VmCommand::Backend(
            match backend_cmd::quick_args(&words()) {
                Some(cmd) => BackendCommand::Backend { cmd },
                None => OneCli::<BackendCommand>::parse_from(&args).command,
            },
        )),
        _ => None,
    };
    let result = match vm {
        Some(cmd) => {
            // The VM path: no span registry to build at each start (vm_log.rs).
            crate::vm_log::init();
            hostd_vmm::phase("args");
            match cmd {
                VmCommand::Run(RunCommand::Run(args)) => image_cmd::run(&args),
                VmCommand::Backend(BackendCommand::Backend { cmd }) => backend_cmd::run(cmd),
            }
        }
        None if !FULL => exec_full(&args),
        None => other(&args),
    };
    interrupt::wait_if_interrupted();
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("hostd: error: {}", printable(&format!("{e:#}")));
            std::process::exit(1);
        }
    }
}

/// Every subcommand but `run` and `backend`, in `hostd-full`.
#[cfg(feature = "full")]
fn other(args: &[OsString]) -> anyhow::Result<i32> {
    let cli = Cli::parse_from(args);
    match &cli.command {
        // One JSON object a line (time, level, message, fields, spans), for log
        // collectors.
        Command::Daemon(a) if a.log_format == daemon_cmd::LogFormat::Json => {
            tracing_subscriber::fmt()
                .json()
                .with_env_filter(crate::vm_log::env_filter())
                .with_writer(std::io::stderr)
                .with_current_span(true)
                .init()
        }
        _ => tracing_subscriber::fmt()
            .with_env_filter(crate::vm_log::env_filter())
            .with_writer(std::io::stderr)
            // Plain text where stderr is no terminal (the journal, a log file).
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_target(false)
            .without_time()
            .init(),
    }
    match cli.command {
        // `main` takes these before clap; clap's command has them for its help.
        Command::Vm(VmCommand::Run(RunCommand::Run(args))) => image_cmd::run(&args),
        Command::Vm(VmCommand::Backend(BackendCommand::Backend { cmd })) => backend_cmd::run(cmd),
        Command::Build {
            spec,
            output,
            kernel,
            context,
            sign,
            update_lock,
        } => image_cmd::build(&spec, &output, kernel, context, sign, update_lock),
        Command::Inspect {
            image,
            manifest,
            trust,
        } => image_cmd::inspect(&image, manifest, &trust),
        Command::Key { cmd } => image_cmd::key(cmd),
        Command::Oci { cmd } => oci_cmd::run(cmd),
        Command::Cap { cmd } => cap_cmd::run(cmd),
        Command::Fn { cmd } => fn_cmd::run(cmd),
        Command::Systemd { cmd } => systemd_cmd::run(cmd),
        Command::Daemon(args) => daemon_cmd::daemon(args),
        Command::Apply { file, socket } => daemon_cmd::apply(&file, &socket),
        Command::Ps { socket } => daemon_cmd::ps(&socket),
        Command::Up(args) => daemon_cmd::up(args),
        Command::Start(args) => daemon_cmd::start_stop(&args, true),
        Command::Stop(args) => daemon_cmd::start_stop(&args, false),
        Command::Rm(args) => daemon_cmd::rm(&args),
        Command::Logs { follow, args } => daemon_cmd::logs(&args, follow),
        Command::Bench(args) => bench_cmd::run(&args),
    }
}

/// Without the other subcommands built in, `hostd-full` has them.
#[cfg(not(feature = "full"))]
fn other(args: &[OsString]) -> anyhow::Result<i32> {
    exec_full(args)
}

/// `s` with control characters other than newlines and tabs escaped (`\u{1b}`): an
/// error or a listing may quote a file's bytes (an image's section names, a manifest's
/// fields), and those must not drive the terminal.
pub fn printable(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// The executable that has every subcommand: `hostd-full` next to this one. Replaces
/// this process with it, same arguments; returns only on failure.
fn exec_full(args: &[OsString]) -> anyhow::Result<i32> {
    use anyhow::Context;
    use std::os::unix::process::CommandExt;
    let full = std::env::current_exe()
        .context("cannot find hostd's own executable")?
        .with_file_name(crate::FULL_EXE);
    let err = std::process::Command::new(&full)
        .arg0("hostd")
        .args(args.iter().skip(1))
        .exec();
    anyhow::bail!(
        "cannot run {}: {err} (hostd-full is installed next to hostd, with hostd-backend)",
        full.display()
    )
}
