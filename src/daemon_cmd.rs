//! `hostd daemon` and its thin clients: `hostd apply`, `ps`, `up`, `start`, `stop`,
//! `rm`, `logs`. The work is in the hostd-daemon crate; this is CLI wiring.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use hostd_daemon::client::{Client, ClientError};
use hostd_daemon::fleet::Fleet;
use hostd_daemon::guests::record::GuestStatus;
use hostd_daemon::hyper::Method;
use hostd_daemon::reconcile::ApplyReport;
use hostd_daemon::server::{self, Options, DEFAULT_SOCKET, DEFAULT_STATE_DIR};

/// The API socket: `--socket`, else $HOSTD_SOCKET, else /run/hostd/hostd.sock.
#[derive(Debug, Clone, clap::Args)]
pub struct SocketArg {
    /// The daemon's API socket [default: $HOSTD_SOCKET, else /run/hostd/hostd.sock].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

impl SocketArg {
    fn path(&self) -> PathBuf {
        self.socket
            .clone()
            .or_else(|| std::env::var_os("HOSTD_SOCKET").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
    }
    pub(crate) fn client(&self) -> Result<Client> {
        Ok(Client::new(&self.path())?)
    }
}

/// Arguments of `hostd daemon`.
#[derive(Debug, clap::Args)]
pub struct DaemonArgs {
    #[command(flatten)]
    pub socket: SocketArg,
    /// Where the daemon keeps its database, images, consoles and volumes.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// A fleet file to apply at start (the API answers meanwhile; with systemd, READY
    /// is sent once it is applied).
    #[arg(long, value_name = "FILE")]
    pub fleet: Option<PathBuf>,
    /// Largest image accepted (`POST /images` or a path), in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 4096)]
    pub max_image_mib: u64,
    /// Where the function front listens (HTTP, ADDR:PORT or HOST:PORT).
    #[arg(long, value_name = "ADDR", value_parser = crate::fn_cmd::listen_addr)]
    pub listen: Option<std::net::SocketAddr>,
    /// How logs are written to stderr.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// `hostd daemon --log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One readable line per event.
    Text,
    /// One JSON object per line: `timestamp`, `level`, `fields.message`, the other fields
    /// and the current span.
    Json,
}

/// Arguments of `hostd up`.
#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// The image: a file, or sha256:DIGEST of an image in the daemon's store.
    pub image: String,
    /// The guest's name.
    #[arg(long)]
    pub name: String,
    /// Which monitor boots it.
    #[arg(long, value_enum, default_value = "kvm")]
    pub vmm: crate::image_cmd::VmmKind,
    /// vCPUs [default: the image's].
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// Memory, e.g. 512M [default: the image's].
    #[arg(long, value_name = "SIZE")]
    pub mem: Option<String>,
    /// Restart policy: always, on-failure or never.
    #[arg(long, default_value = "on-failure")]
    pub restart: String,
    /// A network card, as `hostd run --net` takes it.
    #[arg(long, value_name = "tap=NAME,...")]
    pub net: Option<String>,
    /// Create it without starting it.
    #[arg(long)]
    pub no_start: bool,
    #[command(flatten)]
    pub socket: SocketArg,
}

/// The guest commands that only name a guest.
#[derive(Debug, clap::Args)]
pub struct NameArgs {
    /// The guest.
    pub name: String,
    #[command(flatten)]
    pub socket: SocketArg,
}

fn out(s: &str) {
    let mut o = std::io::stdout().lock();
    let _ = o.write_all(s.as_bytes());
    let _ = o.flush();
}

/// Runs a client call; a daemon that is not running is one clear line and exit 1.
pub(crate) fn call<T>(f: impl FnOnce() -> Result<T, ClientError>) -> Result<T> {
    match f() {
        Ok(v) => Ok(v),
        Err(e @ ClientError::NotRunning { .. }) => {
            eprintln!("hostd: {e}");
            std::process::exit(1);
        }
        Err(e) => Err(e.into()),
    }
}

/// `hostd daemon`.
pub fn daemon(args: DaemonArgs) -> Result<i32> {
    let fleet = args.fleet.as_deref().map(Fleet::load).transpose()?;
    let runner = crate::hostd_exe().context("cannot find the hostd binary")?;
    server::run(Options {
        socket: args.socket.path(),
        state_dir: args.state_dir,
        fleet,
        runner,
        max_image_bytes: args.max_image_mib.saturating_mul(1 << 20),
        listen: args.listen,
    })?;
    Ok(0)
}

/// `hostd apply FILE`.
pub fn apply(file: &Path, socket: &SocketArg) -> Result<i32> {
    let fleet = Fleet::load(file)?;
    let c = socket.client()?;
    let r: ApplyReport = call(|| c.json(Method::PUT, "/fleet", Some(&fleet)))?;
    let mut s = String::new();
    for (what, names) in [
        ("created", &r.created),
        ("replaced", &r.replaced),
        ("removed", &r.removed),
        ("unchanged", &r.unchanged),
    ] {
        for n in names {
            s.push_str(&format!("{what:<9} {n}\n"));
        }
    }
    let f = &r.functions;
    for (what, names) in [
        ("deployed", &f.deployed),
        ("removed", &f.removed),
        ("unchanged", &f.unchanged),
    ] {
        for n in names {
            s.push_str(&format!("{what:<9} function {n}\n"));
        }
    }
    out(&s);
    for (n, why) in &f.failed {
        eprintln!("hostd: function {n} not deployed: {why}");
    }
    Ok(if f.failed.is_empty() { 0 } else { 1 })
}

/// `hostd ps`.
pub fn ps(socket: &SocketArg) -> Result<i32> {
    let c = socket.client()?;
    let guests: Vec<GuestStatus> = call(|| c.json(Method::GET, "/guests", None::<&()>))?;
    let mut s = format!(
        "{:<24} {:<12} {:>8} {:>9} {:>8}  {:<8} {:<19} {}\n",
        "NAME", "STATE", "PID", "UPTIME", "RESTARTS", "ORIGIN", "IMAGE", "BOOT (VM/INIT/SERVICE)"
    );
    let ms = |v: Option<u64>| v.map(|v| format!("{v}ms")).unwrap_or_else(|| "-".into());
    for g in guests {
        let state = serde_json::to_value(g.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let boot = g
            .boot
            .as_ref()
            .map(|b| {
                format!(
                    "{}/{}/{}",
                    ms(b.vm_started_ms),
                    ms(b.init_started_ms),
                    ms(b.first_service_ms)
                )
            })
            .unwrap_or_else(|| "-".into());
        s.push_str(&format!(
            "{:<24} {:<12} {:>8} {:>9} {:>8}  {:<8} {:<19} {boot}\n",
            g.name,
            state,
            g.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            g.uptime_secs
                .map(|u| format!("{u}s"))
                .unwrap_or_else(|| "-".into()),
            g.restarts,
            format!("{:?}", g.origin).to_lowercase(),
            format!("sha256:{}", &g.image_digest[..g.image_digest.len().min(12)]),
        ));
    }
    out(&s);
    Ok(0)
}

/// `hostd up IMAGE --name N`.
pub fn up(args: UpArgs) -> Result<i32> {
    let image = if args.image.starts_with("sha256:") {
        args.image.clone()
    } else {
        std::path::absolute(&args.image)
            .with_context(|| format!("image {}", args.image))?
            .to_string_lossy()
            .into_owned()
    };
    let body = serde_json::json!({
        "name": args.name,
        "image": image,
        "vmm": match args.vmm {
            crate::image_cmd::VmmKind::Kvm => "builtin",
            crate::image_cmd::VmmKind::Qemu => "qemu",
        },
        "vcpus": args.vcpus,
        "memory": args.mem,
        "restart": args.restart,
        "net": args.net,
        "start": !args.no_start,
    });
    let c = args.socket.client()?;
    let g: GuestStatus = call(|| c.json(Method::POST, "/guests", Some(&body)))?;
    eprintln!(
        "hostd: guest {} created{}",
        g.name,
        g.pid
            .map(|p| format!(", running (pid {p})"))
            .unwrap_or_default()
    );
    Ok(0)
}

/// `hostd start N` / `hostd stop N`.
pub fn start_stop(args: &NameArgs, start: bool) -> Result<i32> {
    let c = args.socket.client()?;
    let verb = if start { "start" } else { "stop" };
    let path = format!("/guests/{}/{verb}", urlencode(&args.name));
    let g: GuestStatus = call(|| c.json(Method::POST, &path, None::<&()>))?;
    eprintln!(
        "hostd: guest {}: {}",
        g.name,
        serde_json::to_value(g.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    );
    Ok(0)
}

/// `hostd rm N`.
pub fn rm(args: &NameArgs) -> Result<i32> {
    let c = args.socket.client()?;
    let path = format!("/guests/{}", urlencode(&args.name));
    let a = call(|| c.raw(Method::DELETE, &path, "application/json", Vec::new()))?;
    hostd_daemon::client::check(&a)?;
    eprintln!("hostd: guest {} removed", args.name);
    Ok(0)
}

/// `hostd logs [-f] N`.
pub fn logs(args: &NameArgs, follow: bool) -> Result<i32> {
    let c = args.socket.client()?;
    let path = format!(
        "/guests/{}/logs{}",
        urlencode(&args.name),
        if follow { "?follow=1" } else { "" }
    );
    call(|| {
        c.stream(&path, |chunk| {
            let mut o = std::io::stdout().lock();
            o.write_all(chunk).and_then(|_| o.flush()).is_ok()
        })
    })?;
    Ok(0)
}

/// Percent-encodes what is not a safe path segment byte (the daemon then refuses the
/// name with a clear error instead of the request going to another route).
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
