//! The wasmtime engine: pooling allocator, epoch deadlines, and an on-disk
//! cache of compiled components keyed by component digest and engine hash.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::{input, Error};

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

/// Loads a component: from the compile cache when a verified artifact is
/// there, otherwise compiles it and stores the artifact.
///
/// The cache directory must belong to this user and not be writable by group
/// or others (else the cache is not used, with a warning). An artifact is named
/// `<component sha256>-<engine hash>-<artifact sha256>.cwasm`: the whole file
/// is hashed and compared with its name before wasmtime sees a byte of it, so
/// a changed or truncated artifact is refused (and replaced), never loaded.
/// Artifacts are written under an unpredictable temporary name (`O_EXCL`,
/// mode 0600) and renamed into place.
pub fn load_component(
    engine: &Engine,
    path: &Path,
    cache_dir: Option<&Path>,
) -> Result<Component, Error> {
    let bytes = input::read_regular("component", path, input::MAX_COMPONENT_BYTES)?;
    load_component_bytes(engine, &bytes, path, cache_dir)
}

/// As [`load_component`], for component bytes already read (and checked) by
/// the caller; `path` names them in errors and logs.
pub fn load_component_bytes(
    engine: &Engine,
    bytes: &[u8],
    path: &Path,
    cache_dir: Option<&Path>,
) -> Result<Component, Error> {
    let compile = |bytes: &[u8]| {
        Component::new(engine, bytes).map_err(|e| {
            // A core module (wasm version 1) is the common mistake: say so.
            let hint = if bytes.starts_with(b"\0asm\x01\0\0\0") {
                " (this is a core WebAssembly module, not a component: build for \
                 wasm32-wasip2, or wrap it with `wasm-tools component new`)"
            } else {
                ""
            };
            Error::Component {
                path: path.to_owned(),
                msg: format!("{e:#}{hint}"),
            }
        })
    };
    let Some(cache_dir) = cache_dir else {
        return compile(bytes);
    };
    if let Err(e) = prepare_cache_dir(cache_dir) {
        tracing::warn!(cache = %cache_dir.display(), "not using the compile cache: {e}");
        return compile(bytes);
    }
    let prefix = format!("{}-{}-", hex(&Sha256::digest(bytes)), engine_hash(engine));
    if let Some(c) = load_cached(engine, cache_dir, &prefix) {
        tracing::debug!(component = %path.display(), "compiled component loaded from cache");
        return Ok(c);
    }
    let component = compile(bytes)?;
    match component.serialize() {
        Ok(serialized) => {
            let name = format!("{prefix}{}.cwasm", hex(&Sha256::digest(&serialized)));
            if let Err(e) = write_atomically(cache_dir, &name, &serialized) {
                tracing::warn!(cache = %cache_dir.display(), "could not cache compiled component: {e}");
            }
        }
        Err(e) => tracing::warn!("could not serialize compiled component: {e:#}"),
    }
    Ok(component)
}

/// Why the compile cache directory is not used.
#[derive(Debug, thiserror::Error)]
pub enum CacheDirError {
    /// It could not be created or inspected.
    #[error("cannot create or inspect it: {0}")]
    Io(std::io::Error),
    /// It is not a directory.
    #[error("it is not a directory")]
    NotADirectory,
    /// Someone else owns it.
    #[error("it is owned by uid {owner}, not by this user (uid {me})")]
    Owner {
        /// Its owner.
        owner: u32,
        /// Our effective uid.
        me: u32,
    },
    /// Others may write into it.
    #[error("it is writable by group or others (mode {mode:o}); run chmod go-w on it")]
    Mode {
        /// Its permission bits.
        mode: u32,
    },
}

/// Creates the cache directory (mode 0700) if needed and checks that only
/// this user can write into it.
pub fn prepare_cache_dir(dir: &Path) -> Result<(), CacheDirError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(CacheDirError::Io)?;
    let meta = std::fs::metadata(dir).map_err(CacheDirError::Io)?;
    if !meta.is_dir() {
        return Err(CacheDirError::NotADirectory);
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(CacheDirError::Owner {
            owner: meta.uid(),
            me,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(CacheDirError::Mode { mode });
    }
    Ok(())
}

/// Whether `name` is `<prefix><64 hex digits>.cwasm`; returns the digits.
fn artifact_digest<'a>(name: &'a str, prefix: &str) -> Option<&'a str> {
    let digest = name.strip_prefix(prefix)?.strip_suffix(".cwasm")?;
    (digest.len() == 64
        && digest
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    .then_some(digest)
}

/// The first artifact in `dir` for `prefix` whose content matches its name
/// and that wasmtime accepts. Artifacts that do not match are removed.
fn load_cached(engine: &Engine, dir: &Path, prefix: &str) -> Option<Component> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(cache = %dir.display(), "cannot list the compile cache: {e}");
            return None;
        }
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(expected) = name.to_str().and_then(|n| artifact_digest(n, prefix)) else {
            continue;
        };
        let artifact = entry.path();
        let bytes =
            match input::read_regular("cached artifact", &artifact, input::MAX_ARTIFACT_BYTES) {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(artifact = %artifact.display(), "refusing cached artifact: {e}");
                    continue;
                }
            };
        let actual = hex(&Sha256::digest(&bytes));
        if actual != expected {
            tracing::warn!(
                artifact = %artifact.display(),
                sha256 = %actual,
                "refusing cached artifact: its sha256 does not match its name (changed or corrupted); removing it and compiling again"
            );
            if let Err(e) = std::fs::remove_file(&artifact) {
                tracing::warn!(artifact = %artifact.display(), "cannot remove refused artifact: {e}");
            }
            continue;
        }
        // SAFETY: `deserialize` requires bytes produced by `serialize` of a
        // compatible engine. These bytes hash to the sha256 recorded in the
        // file name when this process family serialized them, the name binds
        // them to this engine's compatibility hash, and the cache directory
        // was checked to be owned by this user and writable by no one else.
        // The bytes were read into memory once, so what was verified is
        // exactly what is deserialized.
        match unsafe { Component::deserialize(engine, &bytes) } {
            Ok(c) => return Some(c),
            Err(e) => {
                tracing::warn!(artifact = %artifact.display(), "ignoring unusable cached artifact: {e:#}")
            }
        }
    }
    None
}

/// Writes `bytes` as `dir/name`: first to a new file with a random name
/// (created exclusively, mode 0600), then renamed over `name`, so readers
/// never see half an artifact and nobody can predict or pre-create the file.
fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .suffix(".cwasm")
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(dir.join(name)).map_err(|e| e.error)?;
    Ok(())
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The one thread that advances the engine's epoch; stops when dropped. It ticks only
/// while some request holds a [`Ticking`] from its [`EpochClock`] and otherwise sleeps
/// until one does: an idle server or daemon wakes for nothing (it used to tick every
/// 5 ms, 200 wake-ups a second, with no request in flight). A deadline is counted from
/// when its request set it, so the epochs not counted while idle change none.
#[derive(Debug)]
pub struct EpochTicker {
    clock: EpochClock,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Requests in flight and whether the ticker should end.
#[derive(Debug, Default)]
struct ClockState {
    holders: usize,
    stop: bool,
    /// Epochs advanced so far.
    ticks: u64,
    /// The ticker waits for a holder.
    parked: bool,
}

/// What a request holds to keep the engine's epoch advancing while it runs.
#[derive(Debug, Clone, Default)]
pub struct EpochClock(Arc<(Mutex<ClockState>, Condvar)>);

impl EpochClock {
    fn lock(&self) -> std::sync::MutexGuard<'_, ClockState> {
        self.0 .0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps the epoch advancing until the returned guard is dropped. Take it before the
    /// store's deadline is set, and keep it as long as the store may run code.
    pub fn hold(&self) -> Ticking {
        let mut st = self.lock();
        st.holders += 1;
        if st.holders == 1 {
            self.0 .1.notify_one();
        }
        Ticking(self.clone())
    }

    /// Requests holding the clock now.
    pub fn holders(&self) -> usize {
        self.lock().holders
    }

    /// Epochs the ticker advanced so far, and whether it now waits for a holder.
    pub fn ticks(&self) -> (u64, bool) {
        let st = self.lock();
        (st.ticks, st.parked)
    }
}

/// A request's hold on the [`EpochClock`].
#[derive(Debug)]
pub struct Ticking(EpochClock);

impl Drop for Ticking {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.holders = st.holders.saturating_sub(1);
    }
}

impl EpochTicker {
    /// Starts the thread that advances `engine`'s epoch every [`EPOCH_TICK`] while its
    /// clock is held.
    pub fn start(engine: &Engine) -> Result<EpochTicker, Error> {
        let clock = EpochClock::default();
        let engine = engine.clone();
        let c = clock.clone();
        let thread = std::thread::Builder::new()
            .name("hostd-epoch".into())
            .spawn(move || loop {
                {
                    let mut st = c.lock();
                    while st.holders == 0 && !st.stop {
                        st.parked = true;
                        st = c.0 .1.wait(st).unwrap_or_else(|e| e.into_inner());
                    }
                    st.parked = false;
                    if st.stop {
                        return;
                    }
                }
                std::thread::sleep(EPOCH_TICK);
                engine.increment_epoch();
                c.lock().ticks += 1;
            })
            .map_err(|source| Error::Io {
                what: "starting the epoch ticker thread".into(),
                source,
            })?;
        Ok(EpochTicker {
            clock,
            thread: Some(thread),
        })
    }

    /// The clock requests hold while they run.
    pub fn clock(&self) -> EpochClock {
        self.clock.clone()
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.clock.lock().stop = true;
        self.clock.0 .1.notify_one();
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

/// The default state directory: `$XDG_STATE_HOME/hostd/fn` or `~/.local/state/hostd/fn`
/// (in hostd-caps, whose store lives under it, so that `hostd run` finds it without
/// the WebAssembly tier).
pub use hostd_caps::default_state_dir;

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits (up to 10 s, however loaded the machine) until `f` holds.
    fn until(what: &str, f: impl Fn() -> bool) {
        let end = std::time::Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(std::time::Instant::now() < end, "{what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn the_epoch_advances_only_while_a_request_holds_the_clock() {
        let engine = Engine::default();
        let ticker = EpochTicker::start(&engine).expect("ticker");
        let clock = ticker.clock();
        until("the ticker parks", || clock.ticks().1);
        std::thread::sleep(EPOCH_TICK * 10);
        assert_eq!(
            clock.ticks(),
            (0, true),
            "no tick with nobody holding the clock"
        );
        let a = clock.hold();
        let b = clock.hold();
        until("ticking while held", || clock.ticks().0 >= 2);
        drop(a);
        let t = clock.ticks().0;
        until("still ticking while one request holds it", || {
            clock.ticks().0 >= t + 2
        });
        drop(b);
        assert_eq!(clock.holders(), 0);
        // The tick under way when the last hold went may still land; then it parks.
        until("parked after the last hold", || clock.ticks().1);
        let t = clock.ticks();
        std::thread::sleep(EPOCH_TICK * 10);
        assert_eq!(clock.ticks(), t, "no tick after the last hold");
        // Dropping the ticker ends its thread even while the clock is held.
        let _held = clock.hold();
        drop(ticker);
    }
}
