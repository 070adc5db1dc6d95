//! The wasmtime engine: pooling allocator, epoch deadlines, and an on-disk
//! cache of compiled components keyed by component digest and engine hash.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::Error;

/// How often the epoch ticker advances the engine's epoch. Deadlines are
/// counted in these ticks, so a time limit is enforced to within one tick.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Concurrent instances the pooling allocator keeps slots for. A request that
/// finds every slot taken is answered 503.
pub const POOL_INSTANCES: u32 = 256;

/// Builds the engine shared by every function.
///
/// `max_memory` is the largest memory limit of any function; the pool
/// reserves that much address space per memory slot.
pub fn build_engine(max_memory: u64) -> Result<Engine, Error> {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(POOL_INSTANCES)
        .total_core_instances(POOL_INSTANCES * 4)
        .total_memories(POOL_INSTANCES * 2)
        .total_tables(POOL_INSTANCES * 4)
        .total_stacks(POOL_INSTANCES)
        .max_memory_size(usize::try_from(max_memory).unwrap_or(usize::MAX));
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    Engine::new(&config).map_err(|e| Error::Engine(format!("{e:#}")))
}

/// A hex digest naming this engine's compilation settings; compiled artifacts
/// from another wasmtime version or configuration get another name.
pub fn engine_hash(engine: &Engine) -> String {
    let mut h = std::hash::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    format!("{:016x}", h.finish())
}

/// Loads a component: from the compile cache when present, otherwise compiles
/// it and stores the artifact (written to a temporary file, then renamed, so
/// concurrent servers never read half an artifact).
pub fn load_component(
    engine: &Engine,
    path: &Path,
    cache_dir: Option<&Path>,
) -> Result<Component, Error> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        what: format!("reading component {}", path.display()),
        source,
    })?;
    let compile = |bytes: &[u8]| {
        Component::new(engine, bytes).map_err(|e| Error::Component {
            path: path.to_owned(),
            msg: format!("{e:#}"),
        })
    };
    let Some(cache_dir) = cache_dir else {
        return compile(&bytes);
    };
    let digest = hex(&Sha256::digest(&bytes));
    let artifact = cache_dir.join(format!("{digest}-{}.cwasm", engine_hash(engine)));
    if artifact.is_file() {
        // SAFETY: `deserialize_file` trusts the file to be a wasmtime artifact
        // produced by this engine configuration. The cache directory belongs to
        // hostd, the file name binds the artifact to the component's sha256 and
        // the engine's compatibility hash, and wasmtime itself checks the
        // artifact's header and version before using it.
        match unsafe { Component::deserialize_file(engine, &artifact) } {
            Ok(c) => {
                tracing::debug!(component = %path.display(), artifact = %artifact.display(), "compiled component loaded from cache");
                return Ok(c);
            }
            Err(e) => {
                tracing::warn!(artifact = %artifact.display(), "ignoring unusable cached artifact: {e:#}")
            }
        }
    }
    let component = compile(&bytes)?;
    match component.serialize() {
        Ok(serialized) => {
            if let Err(e) = write_atomically(cache_dir, &artifact, &serialized) {
                tracing::warn!(cache = %cache_dir.display(), "could not cache compiled component: {e}");
            }
        }
        Err(e) => tracing::warn!("could not serialize compiled component: {e:#}"),
    }
    Ok(component)
}

fn write_atomically(dir: &Path, target: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = target.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, target)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The one thread that advances the engine's epoch; stops when dropped.
#[derive(Debug)]
pub struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EpochTicker {
    /// Starts ticking `engine` every [`EPOCH_TICK`].
    pub fn start(engine: &Engine) -> Result<EpochTicker, Error> {
        let stop = Arc::new(AtomicBool::new(false));
        let engine = engine.clone();
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("hostd-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })
            .map_err(|source| Error::Io {
                what: "starting the epoch ticker thread".into(),
                source,
            })?;
        Ok(EpochTicker {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Deadline in epoch ticks for a time limit (at least one tick).
pub fn deadline_ticks(limit: Duration) -> u64 {
    (limit.as_micros() / EPOCH_TICK.as_micros()).max(1) as u64 + 1
}

/// The default cache directory: `$XDG_CACHE_HOME/hostd/fn` or `~/.cache/hostd/fn`.
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return Some(PathBuf::from(x).join("hostd/fn"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/hostd/fn"))
}

/// The default state directory: `$XDG_STATE_HOME/hostd/fn` or `~/.local/state/hostd/fn`.
pub fn default_state_dir() -> Option<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|x| !x.is_empty()) {
        return Some(PathBuf::from(x).join("hostd/fn"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state/hostd/fn"))
}
