//! Zero-downtime function deploys for a long-running process (the daemon).
//!
//! A [`FunctionHost`] keeps functions, each a series of immutable versions
//! (component digest + routes + grants), and serves the live version of each
//! through one route table that is swapped whole:
//!
//! - [`FunctionHost::put_component`] stores a component by its sha256
//!   (`DIR/components/sha256/HEX.wasm`).
//! - [`FunctionHost::deploy`] compiles the new version (or loads it from the
//!   digest-keyed compile cache) and pre-instantiates it, optionally sends it
//!   a health-check GET in a store of its own, and only then switches the
//!   route table. A request takes one snapshot of the table when it starts,
//!   so it is served wholly by the old or wholly by the new version.
//! - The last [`HostOptions::keep_warm`] versions of each function stay
//!   compiled, so [`FunctionHost::rollback`] to one of them is a pointer move.
//! - Versions and live pointers are kept in `DIR/functions.redb`; a new
//!   [`FunctionHost::open`] on the same directory serves the same live
//!   versions, loading them from the compile cache.
//! - Each version counts its requests, non-2xx answers, errors and latency
//!   ([`crate::server::metrics::MetricsSnapshot`]).

mod components;
mod error;
mod spec;
mod state;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use wasmtime::component::Linker;
use wasmtime::Engine;
use wasmtime_wasi_http::p2::bindings::ProxyPre;

pub use self::components::{parse_digest, ComponentStore};
pub use self::error::DeployError;
pub use self::spec::{check_name, DeploySpec, VersionRecord};
use self::state::DeployState;
use self::state::Switch;
use crate::capabilities::keyvalue::KvStore;
use crate::capabilities::FnCaps;
use crate::server::metrics::{MetricsSnapshot, RequestMetrics};
use crate::server::{self, ConnectionLimits, Deployed, Probe, RouteTable, Router};
use crate::store::FnState;
use crate::{engine, manifest};

/// Compiled versions kept per function unless told otherwise.
pub const DEFAULT_KEEP_WARM: usize = 5;

/// How to open a [`FunctionHost`].
#[derive(Debug, Clone)]
pub struct HostOptions {
    /// The state directory: component store, deploy database, key-value database.
    pub state_dir: PathBuf,
    /// The compile cache; `None` compiles every time.
    pub cache_dir: Option<PathBuf>,
    /// Compiled versions kept per function (the live one included), at least 1.
    pub keep_warm: usize,
}

impl HostOptions {
    /// Options with the defaults: the compile cache in `state_dir/cache`.
    pub fn new(state_dir: &Path) -> HostOptions {
        HostOptions {
            state_dir: state_dir.to_owned(),
            cache_dir: Some(state_dir.join("cache")),
            keep_warm: DEFAULT_KEEP_WARM,
        }
    }
}

/// One version as the host reports it.
#[derive(Debug, Clone)]
pub struct VersionInfo {
    /// The immutable part: digest, routes, grants.
    pub record: VersionRecord,
    /// Whether it is the one serving.
    pub live: bool,
    /// Whether it is compiled and ready (a rollback to it is a pointer move).
    pub warm: bool,
    /// Its requests since this process started.
    pub metrics: MetricsSnapshot,
}

/// One function as the host reports it.
#[derive(Debug, Clone)]
pub struct FunctionInfo {
    /// Its name.
    pub name: String,
    /// The live version.
    pub live: VersionInfo,
    /// How many versions it has.
    pub versions: usize,
}

/// A function host: see the module documentation. Cheap to clone; clones
/// share everything.
#[derive(Debug, Clone)]
pub struct FunctionHost {
    inner: Arc<Inner>,
}

struct Inner {
    opts: HostOptions,
    engine: Engine,
    linker: Linker<FnState>,
    ticker: engine::EpochTicker,
    components: ComponentStore,
    state: DeployState,
    kv: Mutex<Option<Arc<KvStore>>>,
    table: Arc<RouteTable>,
    /// Serializes deploys, rollbacks and removals (each reads, then changes).
    changes: tokio::sync::Mutex<()>,
    /// What is compiled and live; held only briefly.
    functions: Mutex<BTreeMap<String, FnEntry>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FunctionHost")
            .field("state_dir", &self.opts.state_dir)
            .finish()
    }
}

/// A version compiled, pre-instantiated and healthy, not yet live.
struct PreparedVersion {
    record: VersionRecord,
    routes: Vec<manifest::Route>,
    deployed: Arc<Deployed>,
    metrics: Arc<RequestMetrics>,
}

#[derive(Default)]
struct FnEntry {
    live: u64,
    /// Compiled versions.
    warm: BTreeMap<u64, Arc<Deployed>>,
    /// Counters by version (kept while the function exists).
    metrics: BTreeMap<u64, Arc<RequestMetrics>>,
}

/// `e` and its causes, joined with `: ` (for a log line).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl FunctionHost {
    /// Opens the host on `opts.state_dir` and makes every function's live
    /// version ready (from the compile cache when it is there), so a
    /// restarted process serves what it served before as soon as this returns.
    pub fn open(opts: HostOptions) -> Result<FunctionHost, DeployError> {
        let t = Instant::now();
        std::fs::create_dir_all(&opts.state_dir).map_err(|source| DeployError::Io {
            what: "creating the state directory",
            path: opts.state_dir.clone(),
            source,
        })?;
        // One engine for every version: its settings (and so the compile
        // cache's key) never depend on what is deployed.
        let engine =
            engine::build_engine(manifest::MAX_MEMORY_MB << 20).map_err(DeployError::Setup)?;
        let ticker = engine::EpochTicker::start(&engine).map_err(DeployError::Setup)?;
        let linker = server::linker(&engine).map_err(DeployError::Setup)?;
        let components = ComponentStore::open(&opts.state_dir)?;
        let state = DeployState::open(&opts.state_dir)?;
        let mut opts = opts;
        opts.keep_warm = opts.keep_warm.max(1);
        let inner = Arc::new(Inner {
            opts,
            engine,
            linker,
            ticker,
            components,
            state,
            kv: Mutex::new(None),
            table: Arc::new(RouteTable::new(Arc::new(Router::default()))),
            changes: tokio::sync::Mutex::new(()),
            functions: Mutex::new(BTreeMap::new()),
        });
        let live = inner.state.live()?;
        let n = live.len();
        for (name, version) in live {
            let record = inner.state.version(&name, version)?.ok_or_else(|| {
                DeployError::UnknownVersion {
                    function: name.clone(),
                    version,
                }
            })?;
            let metrics = Arc::new(RequestMetrics::default());
            let mut entry = FnEntry {
                live: version,
                ..FnEntry::default()
            };
            // One function that cannot be loaded (its component changed on
            // disk, a granted directory is gone) must not keep the others
            // from serving: it is listed, not served, until a deploy or
            // rollback fixes it.
            match inner.prepare(&record, metrics.clone()) {
                Ok(deployed) => {
                    entry.warm.insert(version, deployed);
                }
                Err(e) => tracing::error!(
                    function = %name,
                    version,
                    "cannot serve the live version: {}",
                    error_chain(&e)
                ),
            }
            entry.metrics.insert(version, metrics);
            inner.lock().insert(name, entry);
        }
        inner.publish(&inner.lock());
        inner.collect_components();
        tracing::info!(
            state = %inner.opts.state_dir.display(),
            functions = n,
            ready_ms = t.elapsed().as_millis() as u64,
            "function host ready"
        );
        Ok(FunctionHost { inner })
    }

    /// The route table the front serves from.
    pub fn table(&self) -> Arc<RouteTable> {
        self.inner.table.clone()
    }

    /// The component store.
    pub fn components(&self) -> &ComponentStore {
        &self.inner.components
    }

    /// Stores a component; returns its sha256 (hex).
    pub fn put_component(&self, bytes: &[u8]) -> Result<String, DeployError> {
        self.inner.components.put(bytes)
    }

    /// Deploys `spec` as the next version of `name` (creating the function if
    /// new) and makes it live once it is compiled, pre-instantiated and (if
    /// asked) healthy. On any error the live version is unchanged.
    pub async fn deploy(&self, name: &str, spec: DeploySpec) -> Result<VersionInfo, DeployError> {
        let _changing = self.inner.changes.lock().await;
        // What earlier deploys that failed (or were never made) left.
        self.inner.collect_components();
        let t = Instant::now();
        // Routes are checked before compiling: a conflict fails fast.
        let prepared = self.prepare_version(name, spec, true).await?;
        let version = self
            .inner
            .make_live(vec![prepared], t)
            .pop()
            .unwrap_or_else(|| Err(DeployError::UnknownFunction { name: name.into() }))?;
        self.version_info(name, version)
    }

    /// Deploys several functions at once, each as [`FunctionHost::deploy`] does, and
    /// makes those that compiled (and passed their health checks) live together: one
    /// database transaction and one swap of the route table, with routes checked
    /// against the table as it will be. So functions can trade routes (f takes g's
    /// route while g moves to another), which one deploy after another refuses. A
    /// version whose routes another function keeps (or two of them claim) is not made
    /// live; the others are. Outcomes in the order given; names must differ.
    pub async fn deploy_together(
        &self,
        specs: Vec<(String, DeploySpec)>,
    ) -> Vec<(String, Result<VersionInfo, DeployError>)> {
        let _changing = self.inner.changes.lock().await;
        self.inner.collect_components();
        let t = Instant::now();
        // Each function's preparation: failed, or its place among those made live.
        let mut prepared: Vec<(String, Result<usize, DeployError>)> = Vec::new();
        let mut ready = Vec::new();
        for (name, spec) in specs {
            let outcome = if prepared.iter().any(|(n, _)| *n == name) {
                Err(DeployError::InvalidSpec {
                    function: name.clone(),
                    msg: "deployed twice in one batch".into(),
                })
            } else {
                self.prepare_version(&name, spec, false).await.map(|p| {
                    ready.push(p);
                    ready.len() - 1
                })
            };
            prepared.push((name, outcome));
        }
        let mut live: Vec<Option<Result<u64, DeployError>>> = self
            .inner
            .make_live(ready, t)
            .into_iter()
            .map(Some)
            .collect();
        prepared
            .into_iter()
            .map(|(name, outcome)| {
                let made = outcome.and_then(|i| {
                    live.get_mut(i)
                        .and_then(Option::take)
                        .unwrap_or_else(|| Err(DeployError::UnknownFunction { name: name.clone() }))
                });
                let r = made.and_then(|v| self.version_info(&name, v));
                (name, r)
            })
            .collect()
    }

    /// Checks `spec`, compiles and pre-instantiates it as the next version of `name`
    /// and runs its health check: everything before it can be made live. With
    /// `routes_now`, its routes are first checked against the live table (a single
    /// deploy fails fast; a batch checks them against the table it makes).
    async fn prepare_version(
        &self,
        name: &str,
        spec: DeploySpec,
        routes_now: bool,
    ) -> Result<PreparedVersion, DeployError> {
        check_name(name)?;
        let component = parse_digest(&spec.component)?;
        if let Some(p) = &spec.health_check {
            spec::check_health_path(name, p)?;
        }
        let version = self.inner.state.last_version(name)? + 1;
        let record = VersionRecord {
            function: name.to_owned(),
            version,
            component,
            routes: spec.routes,
            grants: spec.grants,
            health_check: spec.health_check,
            created_unix_ms: now_ms(),
        };
        let function = {
            let path = self.inner.components.path(&record.component);
            spec::resolve(&record, &path)?
        };
        if routes_now {
            self.inner.check_routes(name, &function.routes)?;
        }
        let metrics = Arc::new(RequestMetrics::default());
        let deployed = {
            let inner = self.inner.clone();
            let record = record.clone();
            let metrics = metrics.clone();
            tokio::task::spawn_blocking(move || inner.prepare(&record, metrics))
                .await
                .map_err(|e| {
                    DeployError::Setup(crate::Error::Engine(format!("compile task failed: {e}")))
                })??
        };
        if let Some(path) = &record.health_check {
            let outcome = match server::probe(&deployed, path).await {
                Probe::Status(s) if (200..300).contains(&s) => None,
                Probe::Status(s) => Some(format!("answered {s}")),
                Probe::Failed(why) => Some(format!("failed: {why}")),
            };
            if let Some(outcome) = outcome {
                tracing::warn!(function = %name, version, %path, %outcome, "health check failed; not promoted");
                return Err(DeployError::HealthCheck {
                    function: name.to_owned(),
                    path: path.clone(),
                    outcome,
                });
            }
        }
        Ok(PreparedVersion {
            record,
            routes: function.routes,
            deployed,
            metrics,
        })
    }

    /// Makes `version` (default: the one that was live before the live one) live again.
    /// A warm version switches at once; an older one is loaded first (from
    /// the compile cache when it is there).
    pub async fn rollback(
        &self,
        name: &str,
        version: Option<u64>,
    ) -> Result<VersionInfo, DeployError> {
        check_name(name)?;
        let _changing = self.inner.changes.lock().await;
        let live = self.inner.live_of(name)?;
        // By default the version that was live before this one (deploys record it), not
        // merely the next lower number: after v1, v2, a rollback to v1 and a deploy of
        // v3, it is v1, not v2 that was rolled away from. Without a record (a database
        // from before there was one): the next lower.
        let target = match version {
            Some(v) => v,
            None => match self.inner.state.previous(name)?.last() {
                Some(v) => *v,
                None => self
                    .inner
                    .state
                    .versions(name)?
                    .iter()
                    .rev()
                    .map(|r| r.version)
                    .find(|v| *v < live)
                    .ok_or_else(|| DeployError::UnknownVersion {
                        function: name.to_owned(),
                        version: live.saturating_sub(1),
                    })?,
            },
        };
        let record =
            self.inner
                .state
                .version(name, target)?
                .ok_or_else(|| DeployError::UnknownVersion {
                    function: name.to_owned(),
                    version: target,
                })?;
        let resolved = spec::resolve(&record, &self.inner.components.path(&record.component))?;
        let warm = self
            .inner
            .lock()
            .get(name)
            .and_then(|e| e.warm.get(&target).cloned());
        let deployed = match warm {
            Some(d) => d,
            None => {
                let metrics = self.inner.metrics_of(name, target);
                let inner = self.inner.clone();
                let r = record.clone();
                tokio::task::spawn_blocking(move || inner.prepare(&r, metrics))
                    .await
                    .map_err(|e| {
                        DeployError::Setup(crate::Error::Engine(format!(
                            "compile task failed: {e}"
                        )))
                    })??
            }
        };
        {
            let mut functions = self.inner.lock();
            self.inner
                .check_routes_locked(&functions, name, &resolved.routes)?;
            self.inner.state.set_live(name, target, Switch::Rollback)?;
            let entry = functions.entry(name.to_owned()).or_default();
            entry.live = target;
            entry.warm.insert(target, deployed);
            self.inner.trim(entry);
            self.inner.publish(&functions);
        }
        tracing::info!(function = %name, from = live, to = target, "function rolled back");
        self.version_info(name, target)
    }

    /// Stops serving `name` and forgets its versions (their components go from the store
    /// an hour after their upload unless another version refers to them).
    pub async fn remove(&self, name: &str) -> Result<(), DeployError> {
        check_name(name)?;
        let _changing = self.inner.changes.lock().await;
        self.inner.live_of(name)?;
        let mut functions = self.inner.lock();
        self.inner.state.remove(name)?;
        functions.remove(name);
        self.inner.publish(&functions);
        drop(functions);
        self.inner.collect_components();
        tracing::info!(function = %name, "function removed");
        Ok(())
    }

    /// Every function with its live version.
    pub fn list(&self) -> Result<Vec<FunctionInfo>, DeployError> {
        let names: Vec<String> = self.inner.lock().keys().cloned().collect();
        let mut out = Vec::new();
        for name in names {
            let versions = match self.versions(&name) {
                Ok(v) => v,
                // Removed meanwhile.
                Err(DeployError::UnknownFunction { .. }) => continue,
                Err(e) => return Err(e),
            };
            if let Some(live) = versions.iter().find(|v| v.live).cloned() {
                out.push(FunctionInfo {
                    name,
                    live,
                    versions: versions.len(),
                });
            }
        }
        Ok(out)
    }

    /// Every version of `name`, oldest first.
    pub fn versions(&self, name: &str) -> Result<Vec<VersionInfo>, DeployError> {
        check_name(name)?;
        let records = self.inner.state.versions(name)?;
        let functions = self.inner.lock();
        let entry = functions
            .get(name)
            .ok_or_else(|| DeployError::UnknownFunction {
                name: name.to_owned(),
            })?;
        Ok(records
            .into_iter()
            .map(|record| Inner::info(entry, record))
            .collect())
    }

    fn version_info(&self, name: &str, version: u64) -> Result<VersionInfo, DeployError> {
        self.versions(name)?
            .into_iter()
            .find(|v| v.record.version == version)
            .ok_or_else(|| DeployError::UnknownVersion {
                function: name.to_owned(),
                version,
            })
    }

    /// Serves the live versions on `listener` until `shutdown`, with the
    /// same connection limits and deadlines as `hostd fn serve`.
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
        limits: ConnectionLimits,
        shutdown: impl std::future::Future<Output = ()>,
        grace: Duration,
    ) {
        server::serve_table(self.table(), listener, limits, shutdown, grace).await;
    }
}

/// How long a stored component no version refers to is kept: a deploy stores its
/// component, then deploys it in a second request; one that never came (or failed)
/// leaves it for this long.
pub const UNUSED_COMPONENT_GRACE: std::time::Duration = std::time::Duration::from_secs(3600);

impl Inner {
    /// Removes the components no version refers to, stored more than
    /// [`UNUSED_COMPONENT_GRACE`] ago (the caller holds `changes`, or nothing deploys
    /// yet).
    fn collect_components(&self) {
        let keep = match self.state.components() {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!("not collecting unused components: {}", error_chain(&e));
                return;
            }
        };
        let (files, bytes) = self.components.collect(&keep, UNUSED_COMPONENT_GRACE);
        if files > 0 {
            tracing::info!(files, bytes, "removed components no version refers to");
        }
    }
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, FnEntry>> {
        // A panic while holding the lock leaves consistent data (every change
        // is applied whole), so a poisoned lock is still usable.
        self.functions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn live_of(&self, name: &str) -> Result<u64, DeployError> {
        self.lock()
            .get(name)
            .map(|e| e.live)
            .ok_or_else(|| DeployError::UnknownFunction {
                name: name.to_owned(),
            })
    }

    fn metrics_of(&self, name: &str, version: u64) -> Arc<RequestMetrics> {
        let mut functions = self.lock();
        let entry = functions.entry(name.to_owned()).or_default();
        entry.metrics.entry(version).or_default().clone()
    }

    fn info(entry: &FnEntry, record: VersionRecord) -> VersionInfo {
        let v = record.version;
        VersionInfo {
            live: entry.live == v,
            warm: entry.warm.contains_key(&v),
            metrics: entry
                .metrics
                .get(&v)
                .map(|m| m.snapshot())
                .unwrap_or_else(|| RequestMetrics::default().snapshot()),
            record,
        }
    }

    /// Makes the prepared versions live together (see
    /// [`FunctionHost::deploy_together`]): those whose routes no function keeping its
    /// live version serves, and no other of them claims, in one transaction and one
    /// table swap. Outcomes (the version made live) in the order given.
    fn make_live(
        &self,
        prepared: Vec<PreparedVersion>,
        started: Instant,
    ) -> Vec<Result<u64, DeployError>> {
        if prepared.is_empty() {
            return Vec::new();
        }
        let mut functions = self.lock();
        let mut outcomes: Vec<Option<DeployError>> = prepared.iter().map(|_| None).collect();
        // Who serves each route once the still-candidate versions are live: a refused
        // candidate keeps its live version's routes, which may refuse another.
        loop {
            let candidate = |i: usize| outcomes[i].is_none();
            let mut owner: BTreeMap<String, String> = BTreeMap::new();
            for (name, entry) in functions.iter() {
                let replaced = prepared
                    .iter()
                    .enumerate()
                    .any(|(i, p)| p.record.function == *name && candidate(i));
                if replaced {
                    continue;
                }
                if let Some(live) = entry.warm.get(&entry.live) {
                    for r in &live.routes {
                        owner.insert(r.to_string(), name.clone());
                    }
                }
            }
            let mut refused = None;
            'find: for (i, p) in prepared.iter().enumerate().filter(|(i, _)| candidate(*i)) {
                for r in &p.routes {
                    let route = r.to_string();
                    match owner.get(&route) {
                        Some(other) if *other != p.record.function => {
                            refused = Some((i, route, other.clone()));
                            break 'find;
                        }
                        _ => {
                            owner.insert(route, p.record.function.clone());
                        }
                    }
                }
            }
            match refused {
                Some((i, route, other)) => {
                    outcomes[i] = Some(DeployError::RouteConflict { route, other });
                }
                None => break,
            }
        }
        let records: Vec<&VersionRecord> = prepared
            .iter()
            .zip(&outcomes)
            .filter(|(_, o)| o.is_none())
            .map(|(p, _)| &p.record)
            .collect();
        if !records.is_empty() {
            if let Err(e) = self.state.insert_live_all(&records) {
                let why = error_chain(&e);
                return prepared
                    .iter()
                    .zip(outcomes)
                    .map(|(p, o)| {
                        Err(o.unwrap_or_else(|| DeployError::NotMadeLive {
                            function: p.record.function.clone(),
                            why: why.clone(),
                        }))
                    })
                    .collect();
            }
        }
        let mut results = Vec::new();
        for (p, o) in prepared.into_iter().zip(outcomes) {
            if let Some(e) = o {
                results.push(Err(e));
                continue;
            }
            let PreparedVersion {
                record,
                deployed,
                metrics,
                ..
            } = p;
            let entry = functions.entry(record.function.clone()).or_default();
            entry.live = record.version;
            entry.warm.insert(record.version, deployed);
            entry.metrics.insert(record.version, metrics);
            self.trim(entry);
            tracing::info!(
                function = %record.function,
                version = record.version,
                component = %record.component,
                routes = %record.routes.join(" "),
                live_ms = started.elapsed().as_millis() as u64,
                "function version deployed and live"
            );
            results.push(Ok(record.version));
        }
        self.publish(&functions);
        results
    }

    fn check_routes(&self, name: &str, routes: &[manifest::Route]) -> Result<(), DeployError> {
        self.check_routes_locked(&self.lock(), name, routes)
    }

    /// Whether another function's live version serves one of `routes`.
    fn check_routes_locked(
        &self,
        functions: &BTreeMap<String, FnEntry>,
        name: &str,
        routes: &[manifest::Route],
    ) -> Result<(), DeployError> {
        for (other, entry) in functions.iter().filter(|(n, _)| n.as_str() != name) {
            let Some(live) = entry.warm.get(&entry.live) else {
                continue;
            };
            if let Some(r) = routes.iter().find(|r| live.routes.contains(r)) {
                return Err(DeployError::RouteConflict {
                    route: r.to_string(),
                    other: other.clone(),
                });
            }
        }
        Ok(())
    }

    /// Drops compiled versions beyond `keep_warm`, newest and live kept.
    fn trim(&self, entry: &mut FnEntry) {
        while entry.warm.len() > self.opts.keep_warm {
            let Some(oldest) = entry.warm.keys().copied().find(|v| *v != entry.live) else {
                break;
            };
            entry.warm.remove(&oldest);
        }
    }

    /// Builds the route table from every function's live version and swaps it in.
    fn publish(&self, functions: &BTreeMap<String, FnEntry>) {
        let router = Router {
            functions: functions
                .values()
                .filter_map(|e| e.warm.get(&e.live).cloned())
                .collect(),
        };
        self.table.replace(Arc::new(router));
    }

    fn kv(&self) -> Result<Arc<KvStore>, DeployError> {
        let mut kv = self.kv.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = kv.as_ref() {
            return Ok(k.clone());
        }
        let store = Arc::new(KvStore::open(&self.opts.state_dir).map_err(DeployError::Setup)?);
        *kv = Some(store.clone());
        Ok(store)
    }

    /// Compiles (or loads from the cache) and pre-instantiates `record`.
    fn prepare(
        &self,
        record: &VersionRecord,
        metrics: Arc<RequestMetrics>,
    ) -> Result<Arc<Deployed>, DeployError> {
        let path = self.components.path(&record.component);
        let function = spec::resolve(record, &path)?;
        let bytes = self.components.get(&record.component)?;
        // Messages name the component by its digest, as its deployer knows it (not by
        // the store's file).
        let shown = PathBuf::from(format!("sha256:{}", record.component));
        let prepare_err = |source| DeployError::Prepare {
            function: record.function.clone(),
            source,
        };
        let component = engine::load_component_bytes(
            &self.engine,
            &bytes,
            &shown,
            self.opts.cache_dir.as_deref(),
        )
        .map_err(prepare_err)?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .and_then(ProxyPre::new)
            .map_err(|e| {
                prepare_err(crate::Error::Component {
                    path: shown.clone(),
                    msg: format!("not a wasi:http/proxy component hostd can serve: {e:#}"),
                })
            })?;
        let kv = if function.grants.buckets.is_empty() {
            None
        } else {
            Some(self.kv()?)
        };
        Ok(Arc::new(Deployed {
            caps: Arc::new(FnCaps {
                name: record.function.clone(),
                grants: function.grants,
                kv,
                // Deployed versions hold no capabilities on the wire (yet):
                // a granted one is refused with a log line.
                cap_store: None,
            }),
            routes: function.routes,
            pre,
            metrics: Some(metrics),
            clock: self.ticker.clock(),
        }))
    }
}
