//! `hostd fn …`: the WebAssembly nanoservice tier (wiring only; the work is in `sandbox/`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Subcommand;
use hostd_daemon::functions::api::{
    DeployRequest, Function, RollbackRequest, StoredComponent, Version,
};
use hostd_daemon::hyper::Method;

use crate::daemon_cmd::{call, SocketArg};

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
        /// Address to listen on, ADDR:PORT or HOST:PORT (port 0 picks a free port; the
        /// address is printed).
        #[arg(long, default_value = "127.0.0.1:8080", value_parser = listen_addr)]
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
        /// Seconds to wait for in-flight requests after SIGTERM (at most a day).
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=86_400))]
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
        /// Address (TCP) where functions with `service = "…"` answer capability
        /// calls over Noise (port 0 picks a free one; logged as `capability listener ready`).
        #[arg(long, value_parser = listen_addr)]
        cap_listen: Option<SocketAddr>,
        /// Unix socket where functions with `service = "…"` answer capability calls.
        #[arg(long)]
        cap_unix: Option<PathBuf>,
    },
    /// Deploy a component as the next version of a function on the daemon
    /// (uploaded, compiled, health-checked if asked, then switched atomically).
    Deploy(DeployArgs),
    /// List the daemon's functions and their live versions.
    Ls(LsArgs),
    /// List a function's versions.
    Versions(FnNameArgs),
    /// Make an earlier version live again (default: the one that was live before the live
    /// one; never one rolled away from).
    Rollback(RollbackArgs),
    /// Stop serving a function and forget its versions.
    Rm(FnNameArgs),
}

/// Runs a `hostd fn` subcommand and returns the process exit code.
pub fn run(cmd: FnCommand) -> anyhow::Result<i32> {
    match cmd {
        FnCommand::Deploy(args) => deploy(args),
        FnCommand::Ls(args) => {
            let client = args.socket.client()?;
            let fns: Vec<Function> = call(|| client.json(Method::GET, "/functions", None::<&()>))?;
            let mut s = format!(
                "{:<24} {:>7} {:>8} {:<19} {}\n",
                "NAME", "LIVE", "VERSIONS", "COMPONENT", "ROUTES"
            );
            for f in fns {
                s.push_str(&format!(
                    "{:<24} {:>7} {:>8} {:<19} {}\n",
                    f.name,
                    f.live.version,
                    f.versions,
                    f.live.component.get(..19).unwrap_or(&f.live.component),
                    f.live.routes.join(" ")
                ));
            }
            out(&s);
            Ok(0)
        }
        FnCommand::Versions(args) => {
            let client = args.socket.client()?;
            let versions: Vec<Version> = call(|| {
                client.json(
                    Method::GET,
                    &format!("/functions/{}/versions", args.name),
                    None::<&()>,
                )
            })?;
            print_versions(&versions);
            Ok(0)
        }
        FnCommand::Rollback(args) => {
            let client = args.socket.client()?;
            let v: Version = call(|| {
                client.json(
                    Method::POST,
                    &format!("/functions/{}/rollback", args.name),
                    Some(&RollbackRequest {
                        version: args.target,
                    }),
                )
            })?;
            out(&format!("{} version {} live\n", v.function, v.version));
            Ok(0)
        }
        FnCommand::Rm(args) => {
            let client = args.socket.client()?;
            let a = call(|| {
                client.raw(
                    Method::DELETE,
                    &format!("/functions/{}", args.name),
                    "application/json",
                    Vec::new(),
                )
            })?;
            call(|| hostd_daemon::client::check(&a))?;
            out(&format!("{} removed\n", args.name));
            Ok(0)
        }
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
            cap_listen,
            cap_unix,
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
                cap_listen,
                cap_unix,
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

/// Arguments of `hostd fn deploy`.
#[derive(Debug, clap::Args)]
pub struct DeployArgs {
    /// The function's name.
    #[arg(value_parser = function_name)]
    pub name: String,
    /// The component (.wasm, wasi:http/proxy).
    pub component: PathBuf,
    /// A route (`/exact` or `/prefix/...`); repeat for more [default: the grants file's `routes`].
    #[arg(long = "route", value_name = "ROUTE")]
    pub routes: Vec<String>,
    /// Grants: a TOML file with the fields of an fns.toml function table
    /// (config, outbound, buckets, secrets, dirs, env, memory_mb, time_ms …),
    /// or an fns.toml whose [functions.NAME] table is used. Relative paths are
    /// taken from the file's directory.
    #[arg(long, value_name = "FILE")]
    pub grants: Option<PathBuf>,
    /// A path the new version must answer 2xx to a GET before it goes live.
    #[arg(long, value_name = "PATH")]
    pub health: Option<String>,
    #[command(flatten)]
    pub socket: SocketArg,
}

/// An address to listen on: `ADDR:PORT`, or `HOST:PORT` resolved now (`localhost:8080`;
/// its first address).
pub fn listen_addr(s: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    s.to_socket_addrs()
        .map_err(|e| format!("{e} (expected ADDR:PORT or HOST:PORT, e.g. 127.0.0.1:8080)"))?
        .next()
        .ok_or_else(|| format!("{s} has no address"))
}

/// A function's name as the daemon takes it, checked before anything is sent (a name
/// with `/` or a space came back as "no such route" or "invalid uri character").
fn function_name(s: &str) -> Result<String, String> {
    hostd_sandbox::deploy::check_name(s)
        .map(|()| s.to_owned())
        .map_err(|_| {
            "a function's name is 1-63 of a-z, 0-9, '-' and '_', starting with a letter or digit"
                .to_owned()
        })
}

/// Arguments of the `hostd fn` commands that name a function.
#[derive(Debug, clap::Args)]
pub struct FnNameArgs {
    /// The function's name.
    #[arg(value_parser = function_name)]
    pub name: String,
    #[command(flatten)]
    pub socket: SocketArg,
}

/// Arguments of `hostd fn rollback`.
#[derive(Debug, clap::Args)]
pub struct RollbackArgs {
    /// The function's name.
    #[arg(value_parser = function_name)]
    pub name: String,
    /// The version to make live [default: the one that was live before the live one].
    #[arg(value_name = "VERSION")]
    pub target: Option<u64>,
    #[command(flatten)]
    pub socket: SocketArg,
}

/// Arguments of `hostd fn ls`.
#[derive(Debug, clap::Args)]
pub struct LsArgs {
    #[command(flatten)]
    pub socket: SocketArg,
}

/// Reads a grants file: a table of fns.toml fields, or an fns.toml whose
/// `[functions.NAME]` table is taken; relative paths made absolute.
fn read_grants(path: &Path, name: &str) -> Result<(toml::Table, Vec<String>)> {
    let bytes = hostd_sandbox::input::read_regular(
        "grants file",
        path,
        hostd_sandbox::input::MAX_MANIFEST_BYTES,
    )?;
    let text = String::from_utf8(bytes)
        .map_err(|_| anyhow::anyhow!("grants file {}: not UTF-8 text", path.display()))?;
    let mut table: toml::Table = text
        .parse()
        .with_context(|| format!("grants file {}", path.display()))?;
    if let Some(toml::Value::Table(fns)) = table.get("functions") {
        table = match fns.get(name) {
            Some(toml::Value::Table(t)) => t.clone(),
            _ => anyhow::bail!(
                "grants file {}: it has [functions.*] tables but none named {name}",
                path.display()
            ),
        };
    }
    table.remove("component");
    let routes = match table.remove("routes") {
        Some(toml::Value::Array(a)) => a
            .into_iter()
            .map(|r| match r {
                toml::Value::String(s) => Ok(s),
                other => anyhow::bail!(
                    "grants file {}: route {other} is not a string",
                    path.display()
                ),
            })
            .collect::<Result<Vec<_>>>()?,
        Some(_) => anyhow::bail!("grants file {}: `routes` must be a list", path.display()),
        None => Vec::new(),
    };
    let base = path
        .canonicalize()
        .ok()
        .and_then(|p| p.parent().map(Path::to_owned))
        .unwrap_or_else(|| PathBuf::from("/"));
    hostd_daemon::fleet::absolutize_function(&mut table, &base);
    Ok((table, routes))
}

fn print_versions(versions: &[Version]) {
    let mut s = format!(
        "{:<8} {:<5} {:<5} {:<19} {:<24} {:>9} {:>7} {:>9}\n",
        "VERSION", "LIVE", "WARM", "COMPONENT", "ROUTES", "REQUESTS", "NON2XX", "P99 MS"
    );
    for v in versions {
        s.push_str(&format!(
            "{:<8} {:<5} {:<5} {:<19} {:<24} {:>9} {:>7} {:>9}\n",
            v.version,
            if v.live { "yes" } else { "" },
            if v.warm { "yes" } else { "" },
            v.component.get(..19).unwrap_or(&v.component),
            v.routes.join(","),
            v.metrics.requests,
            v.metrics.non_2xx,
            v.metrics
                .p99_ms
                .map(|p| format!("{p:.3}"))
                .unwrap_or_else(|| "-".into()),
        ));
    }
    out(&s);
}

fn out(s: &str) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    let _ = o.write_all(s.as_bytes());
    let _ = o.flush();
}

/// `hostd fn deploy`: uploads the component, then deploys it as a new version.
fn deploy(args: DeployArgs) -> Result<i32> {
    // A regular file within the daemon's upload limit, checked before anything is sent
    // (a FIFO hung here, /dev/zero was read until memory ran out).
    let bytes = hostd_sandbox::input::read_regular(
        "component",
        &args.component,
        hostd_daemon::functions::MAX_COMPONENT_BYTES as u64,
    )?;
    let (grants, file_routes) = match &args.grants {
        Some(p) => read_grants(p, &args.name)?,
        None => (toml::Table::new(), Vec::new()),
    };
    let routes = if args.routes.is_empty() {
        file_routes
    } else {
        args.routes
    };
    anyhow::ensure!(
        !routes.is_empty(),
        "give at least one --route (e.g. --route /{}/...) or `routes` in the grants file",
        args.name
    );
    let client = args.socket.client()?;
    let answer = call(|| client.raw(Method::PUT, "/components", "application/wasm", bytes))?;
    call(|| hostd_daemon::client::check(&answer))?;
    let stored: StoredComponent = serde_json::from_slice(&answer.body)
        .context("the daemon's answer to PUT /components is not the JSON expected")?;
    let req = DeployRequest {
        component: stored.digest,
        routes,
        grants: serde_json::to_value(&grants)?
            .as_object()
            .cloned()
            .unwrap_or_default(),
        health_check: args.health,
    };
    let v: Version = call(|| {
        client.json(
            Method::POST,
            &format!("/functions/{}/versions", args.name),
            Some(&req),
        )
    })
    .with_context(|| {
        format!(
            "{} (uploaded as {}) was not deployed",
            args.component.display(),
            req.component
        )
    })?;
    out(&format!(
        "{} version {} live: {} on {}\n",
        v.function,
        v.version,
        v.component,
        v.routes.join(" ")
    ));
    Ok(0)
}
