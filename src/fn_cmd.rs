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
        /// Open client connections at most; at the cap a new connection closes the
        /// longest-idle one, or gets 503 when all are busy. Lowered to the open-file
        /// limit minus 512.
        #[arg(long, default_value_t = hostd_sandbox::server::connections::DEFAULT_MAX_CONNECTIONS as u64,
              value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
        max_connections: u64,
        /// Seconds a client has to finish sending a request's headers, from their first byte (then 408).
        #[arg(long, default_value = "10", value_parser = parse_seconds)]
        header_timeout: Duration,
        /// Seconds a connection may stay open without a request (then it is closed).
        #[arg(long, default_value = "30", value_parser = parse_seconds)]
        idle_timeout: Duration,
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
            max_connections,
            header_timeout,
            idle_timeout,
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
                connections: hostd_sandbox::server::ConnectionLimits {
                    max_connections: usize::try_from(max_connections)
                        .context("--max-connections")?,
                    header_timeout,
                    idle_timeout,
                },
            };
            hostd_sandbox::serve(&opts, |addr| {
                eprintln!("hostd fn serve: listening on http://{addr}");
            })
            .with_context(|| format!("hostd fn serve {}", target.display()))?;
            Ok(0)
        }
    }
}

/// Seconds (decimals allowed, e.g. `0.5`), from 0.01 to one day.
fn parse_seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(0.01..=86_400.0).contains(&secs) {
        return Err(format!("{s} must be between 0.01 and 86400 seconds"));
    }
    Ok(Duration::from_secs_f64(secs))
}
