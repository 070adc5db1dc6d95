//! `hostd fn …`: the WebAssembly nanoservice tier (wiring only; the work is in `sandbox/`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;

/// Subcommands of `hostd fn`.
#[derive(Debug, Subcommand)]
pub enum FnCommand {
    /// Serve WebAssembly components (wasi:http) from a manifest or a single .wasm file.
    ///
    /// Stops on SIGTERM or SIGINT: no new connections are accepted and requests
    /// in flight finish (up to --shutdown-grace).
    Serve {
        /// fns.toml manifest, or a single component .wasm served at `/` with no grants.
        target: PathBuf,
        /// Address to listen on (port 0 picks a free port; the address is printed).
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Directory for key-value state [default: the manifest's state_dir, else ~/.local/state/hostd/fn].
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Directory for compiled components [default: ~/.cache/hostd/fn].
        #[arg(long, conflicts_with = "no_cache")]
        cache_dir: Option<PathBuf>,
        /// Compile components on every start instead of using the on-disk cache.
        #[arg(long)]
        no_cache: bool,
        /// Seconds to wait for in-flight requests after SIGTERM.
        #[arg(long, default_value_t = 30)]
        shutdown_grace: u64,
    },
}

/// Runs a `hostd fn` subcommand and returns the process exit code.
pub fn run(cmd: FnCommand) -> anyhow::Result<i32> {
    match cmd {
        FnCommand::Serve {
            target,
            listen,
            state_dir,
            cache_dir,
            no_cache,
            shutdown_grace,
        } => {
            let cache_dir = if no_cache {
                None
            } else {
                cache_dir.or_else(hostd_sandbox::engine::default_cache_dir)
            };
            let opts = hostd_sandbox::ServeOptions {
                target: target.clone(),
                listen,
                state_dir,
                cache_dir,
                shutdown_grace: Duration::from_secs(shutdown_grace),
            };
            hostd_sandbox::serve(&opts, |addr| {
                eprintln!("hostd fn serve: listening on http://{addr}");
            })
            .with_context(|| format!("hostd fn serve {}", target.display()))?;
            Ok(0)
        }
    }
}
