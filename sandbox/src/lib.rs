//! hostd's WebAssembly tier: `wasi:http/proxy` components in wasmtime, each
//! holding only the capabilities its manifest grants.
//!
//! - [`manifest`]: `fns.toml` (routes and grants; see `docs/capabilities.md`).
//! - [`engine`]: pooling allocator, epoch ticker, on-disk compile cache
//!   (checked directory, artifacts verified by digest).
//! - [`input`]: every user file is a regular file read with a size bound.
//! - [`capabilities`]: outbound HTTP, key-value, config, secrets, filesystem.
//! - [`server`]: the hyper front, connection limits, per-request deadlines.
//! - [`store`]: per-request stores, memory limiter, resource-table cap.
//! - [`deploy`]: a function host for long-running processes: versions,
//!   atomic route switches, rollback, persistence, per-version metrics.

pub mod capabilities;
pub mod deploy;
pub mod engine;
pub mod input;
pub mod manifest;
pub mod server;
pub mod store;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime_wasi_http::p2::bindings::ProxyPre;

use crate::capabilities::keyvalue::KvStore;
use crate::capabilities::FnCaps;
use crate::manifest::Manifest;
use crate::server::{Deployed, Router};

/// Errors of the WebAssembly tier. Each says what was wrong and where.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The manifest is invalid.
    #[error("manifest {}: {msg}", path.display())]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A component could not be compiled or does not fit `wasi:http/proxy`.
    #[error("component {}: {msg}", path.display())]
    Component {
        /// The component file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A grant could not be set up (e.g. a preopened directory is missing).
    #[error("function {function}: {msg}")]
    Grant {
        /// The function's manifest name.
        function: String,
        /// What failed.
        msg: String,
    },
    /// The key-value database could not be opened.
    #[error("key-value state {}: {msg} (is another `hostd fn serve` using this --state-dir?)", path.display())]
    State {
        /// The database file.
        path: PathBuf,
        /// What failed.
        msg: String,
    },
    /// The cap store could not be used.
    #[error("capabilities on the wire")]
    Caps(#[source] hostd_caps::Error),
    /// The wasmtime engine could not be configured.
    #[error("wasmtime engine: {0}")]
    Engine(String),
    /// An input file is not a regular file (a FIFO, a device, a directory …).
    #[error("{what} {}: is {kind}, not a regular file", path.display())]
    NotRegular {
        /// What the file was to be (manifest, component, secret …).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What it is instead.
        kind: &'static str,
    },
    /// An input file is larger than hostd reads.
    #[error("{what} {}: {size} bytes is more than the limit of {max} bytes", path.display())]
    TooLarge {
        /// What the file was to be.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Its size (or how much was read before giving up).
        size: u64,
        /// The limit.
        max: u64,
    },
}

/// How to run `hostd fn serve`.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// A `fns.toml` manifest, or a single `.wasm` component served at `/` with no grants.
    pub target: PathBuf,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Where key-value state lives (overrides the manifest's `state_dir`).
    pub state_dir: Option<PathBuf>,
    /// Where compiled components are cached; `None` disables the cache.
    pub cache_dir: Option<PathBuf>,
    /// How long to wait for in-flight requests after SIGTERM.
    pub shutdown_grace: Duration,
    /// Connection limits: cap, header-read and idle timeouts.
    pub connections: server::ConnectionLimits,
    /// Where the capability responder listens (TCP), if anywhere.
    pub cap_listen: Option<SocketAddr>,
    /// Where the capability responder listens (Unix socket), if anywhere.
    pub cap_unix: Option<PathBuf>,
}

/// Reads the serve target: a component (a `.wasm` name, or a file starting
/// with the wasm magic) served alone, or a manifest.
fn load_target(target: &Path) -> Result<Manifest, Error> {
    if target.extension().is_some_and(|e| e == "wasm") {
        return Ok(Manifest::single(target));
    }
    let bytes = input::read_regular("manifest", target, input::MAX_COMPONENT_BYTES)?;
    if bytes.starts_with(b"\0asm") {
        return Ok(Manifest::single(target));
    }
    if bytes.len() as u64 > input::MAX_MANIFEST_BYTES {
        return Err(Error::TooLarge {
            what: "manifest",
            path: target.to_owned(),
            size: bytes.len() as u64,
            max: input::MAX_MANIFEST_BYTES,
        });
    }
    Manifest::from_bytes(&bytes, target)
}

/// A loaded server: engine, compiled and pre-instantiated functions.
#[derive(Debug)]
pub struct Prepared {
    router: Arc<Router>,
    cap_services: Arc<server::capability::CapServices>,
    _ticker: engine::EpochTicker,
}

/// Loads the manifest (or single component), compiles (or loads from cache)
/// and pre-instantiates every function.
pub fn prepare(opts: &ServeOptions) -> Result<Prepared, Error> {
    let manifest = load_target(&opts.target)?;
    let max_memory = manifest
        .functions
        .iter()
        .map(|f| f.grants.memory_bytes)
        .max()
        .unwrap_or(manifest::DEFAULT_MEMORY_MB << 20);
    let engine = engine::build_engine(max_memory)?;
    let ticker = engine::EpochTicker::start(&engine)?;
    let linker = server::linker(&engine)?;

    let needs_kv = manifest
        .functions
        .iter()
        .any(|f| !f.grants.buckets.is_empty());
    let kv = if needs_kv {
        let dir = opts
            .state_dir
            .clone()
            .or_else(|| manifest.state_dir.clone())
            .or_else(engine::default_state_dir)
            .ok_or_else(|| Error::Engine("no state directory: pass --state-dir".into()))?;
        let kv = KvStore::open(&dir)?;
        tracing::info!(state = %dir.display(), "key-value state opened");
        Some(Arc::new(kv))
    } else {
        None
    };

    // The cap store lives in the state directory; it is only written when a
    // function answers as a service (its key is made) or by `hostd cap`.
    let cap_store = opts
        .state_dir
        .clone()
        .or_else(|| manifest.state_dir.clone())
        .or_else(engine::default_state_dir)
        .map(|d| Arc::new(hostd_caps::CapStore::new(d.join("caps"))));
    let mut services = std::collections::BTreeMap::new();

    let mut functions = Vec::new();
    for f in manifest.functions {
        let t = Instant::now();
        let component = engine::load_component(&engine, &f.component, opts.cache_dir.as_deref())?;
        let pre = linker
            .instantiate_pre(&component)
            .and_then(ProxyPre::new)
            .map_err(|e| Error::Component {
                path: f.component.clone(),
                msg: format!("not a wasi:http/proxy component hostd can serve: {e:#}"),
            })?;
        for d in &f.grants.dirs {
            if !d.host.is_dir() {
                return Err(Error::Grant {
                    function: f.name.clone(),
                    msg: format!("preopened directory {} does not exist", d.host.display()),
                });
            }
        }
        tracing::info!(
            function = %f.name,
            routes = %f.routes.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(" "),
            ready_ms = t.elapsed().as_millis() as u64,
            "function deployed"
        );
        let kv = if f.grants.buckets.is_empty() {
            None
        } else {
            kv.clone()
        };
        if (f.service.is_some() || !f.grants.capabilities.is_empty()) && cap_store.is_none() {
            return Err(Error::Grant {
                function: f.name.clone(),
                msg: "capabilities need a state directory for the cap store: pass --state-dir"
                    .into(),
            });
        }
        let caps = Arc::new(FnCaps {
            name: f.name,
            grants: f.grants,
            kv,
            cap_store: cap_store.clone(),
        });
        let deployed = Arc::new(Deployed {
            caps,
            routes: f.routes,
            pre,
            metrics: None,
            clock: ticker.clock(),
        });
        if let (Some(service), Some(store)) = (f.service, &cap_store) {
            let (_, public) = store.service_keypair(&service).map_err(Error::Caps)?;
            tracing::info!(
                function = %deployed.caps.name,
                service = %service,
                public_key = %hex_prefix(&public),
                "function answers as a capability service"
            );
            services.insert(service, deployed.clone());
        }
        functions.push(deployed);
    }
    let cap_services = Arc::new(server::capability::CapServices::new(
        cap_store.unwrap_or_else(|| Arc::new(hostd_caps::CapStore::new(PathBuf::new()))),
        services,
    ));
    Ok(Prepared {
        router: Arc::new(Router { functions }),
        cap_services,
        _ticker: ticker,
    })
}

/// The first bytes of a public key, for log lines.
fn hex_prefix(key: &[u8]) -> String {
    key.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Runs `hostd fn serve` until SIGTERM/SIGINT; `on_ready` is called with the
/// bound address once the server accepts connections.
pub fn serve(opts: &ServeOptions, on_ready: impl FnOnce(SocketAddr)) -> Result<(), Error> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|source| Error::Io {
            what: "starting the tokio runtime".into(),
            source,
        })?;
    let nofile = server::fd_limit::raise_nofile_limit();
    let mut limits = opts.connections;
    let cap = server::fd_limit::connection_cap(limits.max_connections, nofile);
    if cap < limits.max_connections {
        tracing::warn!(
            requested = limits.max_connections,
            max_connections = cap,
            open_file_limit = nofile.unwrap_or(u64::MAX),
            reserve = server::fd_limit::FD_RESERVE,
            "connection cap lowered to fit the open-file limit"
        );
        limits.max_connections = cap;
    }
    let prepared = prepare(opts)?;
    rt.block_on(async {
        let listener = server::bind(opts.listen).await?;
        let addr = listener.local_addr().map_err(|source| Error::Io {
            what: "reading the listening address".into(),
            source,
        })?;
        tracing::info!(
            %addr,
            max_connections = limits.max_connections,
            header_timeout_ms = limits.header_timeout.as_millis() as u64,
            idle_timeout_ms = limits.idle_timeout.as_millis() as u64,
            "listening"
        );
        if let Some(cap_addr) = opts.cap_listen {
            let cap_listener = server::bind(cap_addr).await?;
            let bound = cap_listener.local_addr().map_err(|source| Error::Io {
                what: "reading the capability listener's address".into(),
                source,
            })?;
            tracing::info!(addr = %bound, "capability listener ready");
            tokio::spawn(server::capability::serve_tcp(
                prepared.cap_services.clone(),
                cap_listener,
            ));
        }
        if let Some(path) = &opts.cap_unix {
            let _ = std::fs::remove_file(path);
            let cap_listener =
                tokio::net::UnixListener::bind(path).map_err(|source| Error::Io {
                    what: format!("listening on {}", path.display()),
                    source,
                })?;
            tracing::info!(path = %path.display(), "capability listener ready");
            tokio::spawn(server::capability::serve_unix(
                prepared.cap_services.clone(),
                cap_listener,
            ));
        }
        if opts.cap_listen.is_none() && opts.cap_unix.is_none() && !prepared.cap_services.is_empty() {
            tracing::warn!("functions answer as capability services, but there is no --cap-listen or --cap-unix: nobody can call them");
        }
        on_ready(addr);
        server::serve_on(
            prepared.router.clone(),
            listener,
            limits,
            server::shutdown_signal(),
            opts.shutdown_grace,
        )
        .await;
        Ok(())
    })
}

/// Figures for benchmarks: instantiates `component` `n` times, each in a fresh
/// store exactly as a request would (pooling engine, grants-free state,
/// `ProxyPre`), and returns the time each instantiation took. With
/// `pooling == false` the engine uses wasmtime's default on-demand allocator.
pub fn measure_instantiation(
    component: &Path,
    n: usize,
    pooling: bool,
) -> Result<Vec<Duration>, Error> {
    let engine = if pooling {
        engine::build_engine(manifest::DEFAULT_MEMORY_MB << 20)?
    } else {
        let mut config = wasmtime::Config::new();
        config.epoch_interruption(true);
        wasmtime::Engine::new(&config).map_err(|e| Error::Engine(format!("{e:#}")))?
    };
    let linker = server::linker(&engine)?;
    let loaded = engine::load_component(&engine, component, None)?;
    let pre = linker
        .instantiate_pre(&loaded)
        .and_then(ProxyPre::new)
        .map_err(|e| Error::Component {
            path: component.to_owned(),
            msg: format!("{e:#}"),
        })?;
    let caps = Arc::new(FnCaps {
        name: "bench".into(),
        grants: manifest::Grants::none(),
        kv: None,
        cap_store: None,
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| Error::Io {
            what: "starting the tokio runtime".into(),
            source,
        })?;
    rt.block_on(async {
        let mut times = Vec::with_capacity(n);
        for _ in 0..n {
            let state = store::FnState::new(&caps)?;
            let t = Instant::now();
            let mut s = wasmtime::Store::new(&engine, state);
            s.limiter(|s| &mut s.limiter);
            s.set_epoch_deadline(u64::MAX / 2);
            pre.instantiate_async(&mut s)
                .await
                .map_err(|e| Error::Engine(format!("instantiating: {e:#}")))?;
            times.push(t.elapsed());
        }
        Ok(times)
    })
}
