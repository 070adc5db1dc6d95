//! `fns.toml`: which components serve which routes, and what each may touch.
//!
//! The format is documented in `docs/capabilities.md`. Everything a function
//! may reach is listed here; whatever is not listed is denied.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::Error;

/// Default memory limit of a function, in MiB.
pub const DEFAULT_MEMORY_MB: u64 = 64;
/// Default wall-clock limit of one request, in milliseconds.
pub const DEFAULT_TIME_MS: u64 = 5_000;
/// Largest `time_ms` a manifest may set (one hour).
pub const MAX_TIME_MS: u64 = 3_600_000;
/// Largest memory limit a manifest may set, in MiB (the pooling allocator
/// reserves address space for it in every slot).
pub const MAX_MEMORY_MB: u64 = 1024;
/// Default largest key-value value a function may write, in KiB.
pub const DEFAULT_KV_VALUE_KB: u64 = 1024;
/// Largest `kv_value_kb` a manifest may set (64 MiB).
pub const MAX_KV_VALUE_KB: u64 = 64 << 10;
/// Default size a function may grow a bucket to (keys and values), in MiB.
pub const DEFAULT_KV_BUCKET_MB: u64 = 64;
/// Largest `kv_bucket_mb` a manifest may set (1 TiB).
pub const MAX_KV_BUCKET_MB: u64 = 1 << 20;

/// A parsed, validated manifest with every path made absolute.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// Where key-value buckets are stored, if the manifest names a place.
    pub state_dir: Option<PathBuf>,
    /// The functions, by name.
    pub functions: Vec<Function>,
}

/// One function: a component, its routes and its grants.
#[derive(Debug, Clone)]
pub struct Function {
    /// The manifest's name for it (used in logs).
    pub name: String,
    /// The component file.
    pub component: PathBuf,
    /// Routes: an exact path (`/hello`) or a prefix ending in `/...` (`/api/...`).
    pub routes: Vec<Route>,
    /// Grants.
    pub grants: Grants,
    /// The capability service this function answers as, if any: calls made
    /// with a capability of this service reach it over Noise.
    pub service: Option<String>,
}

/// Longest route pattern.
const MAX_ROUTE_LEN: usize = 1024;

/// A route pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Matches one path exactly.
    Exact(String),
    /// Matches the prefix itself and everything below it (`/api` matches `/api` and `/api/x`).
    Prefix(String),
}

impl Route {
    fn parse(s: &str) -> Option<Route> {
        // A path as it arrives in a request: no query or fragment (they are not part of
        // the path matched), no spaces or control characters, a sane length.
        if !s.starts_with('/')
            || s.len() > MAX_ROUTE_LEN
            || !s
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'?' && b != b'#')
        {
            return None;
        }
        if let Some(prefix) = s.strip_suffix("/...") {
            return Some(Route::Prefix(prefix.to_owned()));
        }
        Some(Route::Exact(s.to_owned()))
    }

    /// Whether `path` (without query) matches, and how specific the match is.
    pub fn matches(&self, path: &str) -> Option<usize> {
        match self {
            Route::Exact(p) => (p == path).then(|| p.len() + 1),
            Route::Prefix(p) => {
                let rest = path.strip_prefix(p.as_str())?;
                (rest.is_empty() || rest.starts_with('/') || p.is_empty()).then_some(p.len())
            }
        }
    }
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Route::Exact(p) => f.write_str(p),
            Route::Prefix(p) => write!(f, "{p}/..."),
        }
    }
}

/// What one function may reach. Empty means nothing.
#[derive(Debug, Clone, Default)]
pub struct Grants {
    /// Outbound HTTP destinations: `host` (any port) or `host:port`.
    pub outbound: Vec<String>,
    /// Capabilities by the name the host holds them under: `http://NAME/…`
    /// reaches that capability's service over Noise.
    pub capabilities: Vec<String>,
    /// Key-value bucket names.
    pub buckets: Vec<String>,
    /// Config values (`wasi:config/store`).
    pub config: BTreeMap<String, String>,
    /// Secrets by name, and where on the host each comes from.
    pub secrets: BTreeMap<String, SecretSource>,
    /// Preopened directories.
    pub dirs: Vec<DirGrant>,
    /// Environment variables.
    pub env: BTreeMap<String, String>,
    /// Memory limit in bytes (all linear memories together).
    pub memory_bytes: u64,
    /// Wall-clock limit of one request, response body included.
    pub time_limit: std::time::Duration,
    /// Largest value the function may write to a bucket, in bytes.
    pub kv_max_value: u64,
    /// Size (keys plus values) beyond which the function may not grow a bucket, in bytes.
    pub kv_max_bucket: u64,
}

impl Grants {
    /// No grants, default limits (what `hostd fn serve app.wasm` uses).
    pub fn none() -> Grants {
        Grants {
            memory_bytes: DEFAULT_MEMORY_MB << 20,
            time_limit: std::time::Duration::from_millis(DEFAULT_TIME_MS),
            kv_max_value: DEFAULT_KV_VALUE_KB << 10,
            kv_max_bucket: DEFAULT_KV_BUCKET_MB << 20,
            ..Grants::default()
        }
    }

    /// Whether an outbound request to `host` (and `port`) is granted.
    pub fn allows_outbound(&self, host: &str, port: u16) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        self.outbound
            .iter()
            .any(|grant| match split_host_port(grant) {
                (h, None) => h.eq_ignore_ascii_case(host),
                (h, Some(p)) => h.eq_ignore_ascii_case(host) && p == port,
            })
    }
}

/// Splits `host:port` (IPv6 in brackets); a grant without a port matches any port.
fn split_host_port(s: &str) -> (&str, Option<u16>) {
    if let Some(rest) = s.strip_prefix('[') {
        if let Some((host, tail)) = rest.split_once(']') {
            let port = tail.strip_prefix(':').and_then(|p| p.parse().ok());
            return (host, port);
        }
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => match p.parse() {
            Ok(port) => (h, Some(port)),
            Err(_) => (s, None),
        },
        _ => (s, None),
    }
}

/// Where a secret's value lives on the host. Never in the manifest itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// A file, read when the function reveals the secret.
    File(PathBuf),
    /// An environment variable of the `hostd` process.
    Env(String),
}

/// A preopened directory.
#[derive(Debug, Clone)]
pub struct DirGrant {
    /// The host directory.
    pub host: PathBuf,
    /// Where the function sees it (e.g. `/data`).
    pub guest: String,
    /// Whether the function may write.
    pub writable: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    state_dir: Option<PathBuf>,
    #[serde(default)]
    functions: BTreeMap<String, RawFunction>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFunction {
    component: PathBuf,
    routes: Vec<String>,
    #[serde(default)]
    outbound: Vec<String>,
    #[serde(default)]
    buckets: Vec<String>,
    #[serde(default)]
    capabilities: Vec<String>,
    service: Option<String>,
    #[serde(default)]
    config: BTreeMap<String, String>,
    #[serde(default)]
    secrets: BTreeMap<String, RawSecret>,
    #[serde(default)]
    dirs: Vec<RawDir>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    memory_mb: Option<u64>,
    time_ms: Option<u64>,
    kv_value_kb: Option<u64>,
    kv_bucket_mb: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecret {
    file: Option<PathBuf>,
    env: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDir {
    host: PathBuf,
    guest: String,
    #[serde(default = "default_mode")]
    mode: String,
}

fn default_mode() -> String {
    "ro".to_owned()
}

impl Manifest {
    /// Reads and validates a manifest; relative paths are resolved against its directory.
    pub fn load(path: &Path) -> Result<Manifest, Error> {
        let bytes = crate::input::read_regular("manifest", path, crate::input::MAX_MANIFEST_BYTES)?;
        Self::from_bytes(&bytes, path)
    }

    /// Validates manifest bytes read from `path`.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Manifest, Error> {
        let text = std::str::from_utf8(bytes).map_err(|e| Error::Manifest {
            path: path.to_owned(),
            msg: format!("not UTF-8 text: {e}"),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(text, base).map_err(|msg| Error::Manifest {
            path: path.to_owned(),
            msg,
        })
    }

    /// Parses manifest text; `base` resolves relative paths.
    pub fn parse(text: &str, base: &Path) -> Result<Manifest, String> {
        let raw: RawManifest = toml::from_str(text).map_err(|e| e.to_string())?;
        Self::from_raw(raw, base)
    }

    /// As [`Manifest::parse`], from a document already parsed (or made in memory, as a
    /// deploy's grants are): errors name fields, never lines of a text no one wrote.
    pub fn from_table(doc: toml::Table, base: &Path) -> Result<Manifest, String> {
        let raw: RawManifest = serde_path_to_error::deserialize(toml::Value::Table(doc))
            .map_err(|e| format!("{}: {}", e.path(), e.inner().message().trim_end()))?;
        Self::from_raw(raw, base)
    }

    fn from_raw(raw: RawManifest, base: &Path) -> Result<Manifest, String> {
        if raw.functions.is_empty() {
            return Err("no [functions.NAME] tables: nothing to serve".into());
        }
        let mut functions = Vec::new();
        for (name, f) in raw.functions {
            functions.push(
                Self::function(&name, f, base).map_err(|e| format!("functions.{name}: {e}"))?,
            );
        }
        let mut services = BTreeMap::new();
        for f in &functions {
            if let Some(s) = &f.service {
                if let Some(other) = services.insert(s.clone(), f.name.clone()) {
                    return Err(format!(
                        "service {s:?} is claimed by both functions.{other} and functions.{}",
                        f.name
                    ));
                }
            }
        }
        let mut seen = BTreeMap::new();
        for f in &functions {
            for r in &f.routes {
                if let Some(other) = seen.insert(r.clone().to_string(), f.name.clone()) {
                    return Err(format!(
                        "route {r} is claimed by both functions.{other} and functions.{}",
                        f.name
                    ));
                }
            }
        }
        Ok(Manifest {
            state_dir: raw.state_dir.map(|d| base.join(d)),
            functions,
        })
    }

    fn function(name: &str, f: RawFunction, base: &Path) -> Result<Function, String> {
        if f.routes.is_empty() {
            return Err("routes is empty: give at least one, e.g. routes = [\"/hello\"]".into());
        }
        let routes = f
            .routes
            .iter()
            .map(|r| {
                Route::parse(r).ok_or_else(|| {
                    format!(
                        "route {:?} must be a path starting with '/', without spaces, '?' or '#', \
                         of at most {MAX_ROUTE_LEN} characters",
                        r.chars().take(80).collect::<String>()
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut seen_buckets = std::collections::BTreeSet::new();
        for b in &f.buckets {
            let ok = !b.is_empty()
                && b.len() <= 64
                && b.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
            if !ok {
                return Err(format!(
                    "bucket {b:?}: a bucket name is 1-64 letters, digits, '-', '_' or '.'"
                ));
            }
            if !seen_buckets.insert(b) {
                return Err(format!("bucket {b:?} is granted twice"));
            }
        }
        for (k, v) in &f.env {
            if k.is_empty() || k.contains(['=', '\0']) || v.contains('\0') {
                return Err(format!(
                    "env {k:?}: a variable's name is not empty and has no '=' or NUL, its value no NUL"
                ));
            }
        }
        for host in &f.outbound {
            if host.is_empty() || host.contains('/') || host.contains('*') {
                return Err(format!(
                    "outbound entry {host:?} must be a host or host:port (no scheme, path or wildcard)"
                ));
            }
        }
        for name in f.capabilities.iter().chain(f.service.iter()) {
            hostd_caps::capability::check_name(name).map_err(|e| {
                format!("capability {e} (a capability or service name, as in `hostd cap new NAME`)")
            })?;
        }
        let mut secrets = BTreeMap::new();
        for (sname, s) in f.secrets {
            let src = match (s.file, s.env) {
                (Some(file), None) => SecretSource::File(base.join(file)),
                (None, Some(var)) => SecretSource::Env(var),
                _ => {
                    return Err(format!(
                        "secrets.{sname}: give exactly one of file = \"PATH\" or env = \"VAR\""
                    ))
                }
            };
            secrets.insert(sname, src);
        }
        let mut dirs = Vec::new();
        for d in f.dirs {
            let writable = match d.mode.as_str() {
                "ro" => false,
                "rw" => true,
                other => return Err(format!("dirs: mode {other:?} must be \"ro\" or \"rw\"")),
            };
            if !d.guest.starts_with('/') {
                return Err(format!(
                    "dirs: guest path {:?} must be absolute, e.g. \"/data\"",
                    d.guest
                ));
            }
            // One spelling per directory: `/data/` and `/data` are the same preopen, and
            // `..` or `.` would name another one than it seems to.
            let parts: Vec<&str> = d.guest.split('/').filter(|p| !p.is_empty()).collect();
            if parts
                .iter()
                .any(|p| *p == "." || *p == ".." || p.contains('\0'))
            {
                return Err(format!(
                    "dirs: guest path {:?} may not hold '.' or '..'",
                    d.guest
                ));
            }
            let guest = format!("/{}", parts.join("/"));
            if dirs.iter().any(|g: &DirGrant| g.guest == guest) {
                return Err(format!(
                    "dirs: guest path {guest:?} is granted twice (which one would the function see?)"
                ));
            }
            dirs.push(DirGrant {
                host: base.join(d.host),
                guest,
                writable,
            });
        }
        let memory_mb = f.memory_mb.unwrap_or(DEFAULT_MEMORY_MB);
        if memory_mb == 0 || memory_mb > MAX_MEMORY_MB {
            return Err(format!(
                "memory_mb = {memory_mb} must be between 1 and {MAX_MEMORY_MB}"
            ));
        }
        let time_ms = f.time_ms.unwrap_or(DEFAULT_TIME_MS);
        if time_ms == 0 || time_ms > MAX_TIME_MS {
            return Err(format!(
                "time_ms = {time_ms} must be between 1 and {MAX_TIME_MS}"
            ));
        }
        let kv_value_kb = f.kv_value_kb.unwrap_or(DEFAULT_KV_VALUE_KB);
        if kv_value_kb == 0 || kv_value_kb > MAX_KV_VALUE_KB {
            return Err(format!(
                "kv_value_kb = {kv_value_kb} must be between 1 and {MAX_KV_VALUE_KB}"
            ));
        }
        let kv_bucket_mb = f.kv_bucket_mb.unwrap_or(DEFAULT_KV_BUCKET_MB);
        if kv_bucket_mb == 0 || kv_bucket_mb > MAX_KV_BUCKET_MB {
            return Err(format!(
                "kv_bucket_mb = {kv_bucket_mb} must be between 1 and {MAX_KV_BUCKET_MB}"
            ));
        }
        Ok(Function {
            name: name.to_owned(),
            component: base.join(f.component),
            routes,
            service: f.service,
            grants: Grants {
                outbound: f.outbound,
                capabilities: f.capabilities,
                buckets: f.buckets,
                config: f.config,
                secrets,
                dirs,
                env: f.env,
                memory_bytes: memory_mb << 20,
                time_limit: std::time::Duration::from_millis(time_ms),
                kv_max_value: kv_value_kb << 10,
                kv_max_bucket: kv_bucket_mb << 20,
            },
        })
    }

    /// A manifest serving one component at every path, with no grants.
    pub fn single(component: &Path) -> Manifest {
        Manifest {
            state_dir: None,
            functions: vec![Function {
                name: component
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "app".into()),
                component: component.to_owned(),
                routes: vec![Route::Prefix(String::new())],
                grants: Grants::none(),
                service: None,
            }],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grants_and_resolves_paths() {
        let m = Manifest::parse(
            r#"
            [functions.a]
            component = "a.wasm"
            routes = ["/a", "/api/..."]
            outbound = ["127.0.0.1", "example.org:8080"]
            buckets = ["b"]
            secrets = { tok = { env = "TOK" }, key = { file = "k.txt" } }
            dirs = [{ host = "data", guest = "/data" }, { host = "out", guest = "/out", mode = "rw" }]
            memory_mb = 16
            time_ms = 250
            capabilities = ["billing"]
            service = "front"
            "#,
            Path::new("/m"),
        )
        .expect("valid manifest");
        let f = &m.functions[0];
        assert_eq!(f.component, Path::new("/m/a.wasm"));
        assert_eq!(f.routes[1], Route::Prefix("/api".into()));
        assert!(f.grants.allows_outbound("127.0.0.1", 9999));
        assert!(f.grants.allows_outbound("example.org", 8080));
        assert!(!f.grants.allows_outbound("example.org", 80));
        assert!(!f.grants.allows_outbound("127.0.0.2", 80));
        assert_eq!(
            f.grants.secrets["key"],
            SecretSource::File("/m/k.txt".into())
        );
        assert!(!f.grants.dirs[0].writable && f.grants.dirs[1].writable);
        assert_eq!(f.grants.memory_bytes, 16 << 20);
        assert_eq!(f.grants.capabilities, ["billing"]);
        assert_eq!(f.service.as_deref(), Some("front"));
    }

    #[test]
    fn rejects_bad_manifests() {
        let bad = [
            "[functions.a]\ncomponent = \"a.wasm\"\nroutes = []",
            "[functions.a]\ncomponent = \"a.wasm\"\nroutes = [\"x\"]",
            "[functions.a]\ncomponent = \"a.wasm\"\nroutes = [\"/x\"]\nsecrets = { s = { value = \"inline\" } }",
            "[functions.a]\ncomponent = \"a.wasm\"\nroutes = [\"/x\"]\noutbound = [\"http://x\"]",
            "[functions.a]\ncomponent = \"a.wasm\"\nroutes = [\"/x\"]\nkv_bucket_mb = 0",
            "[functions.a]\ncomponent = \"a.wasm\"\nroutes = [\"/x\"]\ncapabilities = [\"a.b\"]",
            "[functions.a]\ncomponent = \"a.wasm\"\nroutes = [\"/x\"]\nservice = \"s\"\n[functions.b]\ncomponent = \"b.wasm\"\nroutes = [\"/y\"]\nservice = \"s\"",
            "[functions.a]\ncomponent = \"a.wasm\"\nroutes = [\"/x\"]\nkv_value_kb = 1000000",
            "[functions.a]\ncomponent = \"a.wasm\"\nroutes = [\"/x\"]\ntime_ms = 99999999999",
            "[functions.a]\ncomponent = \"a.wasm\"\nroutes = [\"/x\"]\n[functions.b]\ncomponent = \"b.wasm\"\nroutes = [\"/x\"]",
            "",
            // Routes no request path can have.
            "[functions.a]\ncomponent = \"a.wasm\"\nroutes = [\"/x?y\"]",
            "[functions.a]\ncomponent = \"a.wasm\"\nroutes = [\"/x#y\"]",
            "[functions.a]\ncomponent = \"a.wasm\"\nroutes = [\"/x y\"]",
            "[functions.a]\ncomponent = \"a.wasm\"\nroutes = [\"/x\\u0000\"]",
            // Buckets, env and dirs that say one thing twice or nothing at all.
            "[functions.a]\ncomponent = \"a.wasm\"\nroutes = [\"/x\"]\nbuckets = [\"\"]",
            "[functions.a]\ncomponent = \"a.wasm\"\nroutes = [\"/x\"]\nbuckets = [\"b\", \"b\"]",
            "[functions.a]\ncomponent = \"a.wasm\"\nroutes = [\"/x\"]\nbuckets = [\"a/b\"]",
            "[functions.a]\ncomponent = \"a.wasm\"\nroutes = [\"/x\"]\nenv = { \"A=B\" = \"x\" }",
            "[functions.a]\ncomponent = \"a.wasm\"\nroutes = [\"/x\"]\nenv = { \"\" = \"x\" }",
            "[functions.a]\ncomponent = \"a.wasm\"\nroutes = [\"/x\"]\ndirs = [{ host = \"d\", guest = \"/data\" }, { host = \"e\", guest = \"/data/\" }]",
            "[functions.a]\ncomponent = \"a.wasm\"\nroutes = [\"/x\"]\ndirs = [{ host = \"d\", guest = \"/data/../etc\" }]",
        ];
        for text in bad {
            assert!(
                Manifest::parse(text, Path::new("/")).is_err(),
                "accepted: {text}"
            );
        }
    }

    #[test]
    fn routes_match_most_specific() {
        let exact = Route::Exact("/hello".into());
        let prefix = Route::Prefix("/api".into());
        let all = Route::Prefix(String::new());
        assert!(exact.matches("/hello").is_some());
        assert!(exact.matches("/hello/x").is_none());
        assert!(prefix.matches("/api/x").is_some());
        assert!(prefix.matches("/apix").is_none());
        assert!(all.matches("/anything").is_some());
        assert!(prefix.matches("/api/x") > all.matches("/api/x"));
    }
}
