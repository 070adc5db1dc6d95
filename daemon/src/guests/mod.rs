//! Guests: each one a `hostd run` process the daemon starts, watches (pidfd), stops
//! (SIGTERM, then SIGKILL after the image's stop timeout), restarts per its policy with
//! exponential backoff, and re-adopts after its own restart.

pub mod console;
mod dirwatch;
pub mod process;
pub mod record;

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::error::{chain, ApiError, DaemonError};
use crate::fleet::{self, ImageSource, Restart};
use crate::images::{ImageStore, ImageStoreError, StoredImage};
use crate::store::Store;
use console::Console;
use dirwatch::DirWatch;
use process::Exit;
use record::{Desired, GuestRecord, GuestState, GuestStatus, Origin};

/// First restart delay.
pub const BACKOFF_START: Duration = Duration::from_secs(1);
/// Longest restart delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Uptime after which the backoff starts over.
pub const BACKOFF_RESET: Duration = Duration::from_secs(60);
/// Time given beyond the image's stop timeout before SIGKILL (`hostd run` itself gives
/// its monitor this much for a clean power-off).
const STOP_MARGIN: Duration = Duration::from_secs(15);

/// The restart delay after `consecutive` quick failures in a row (0: the first).
pub fn backoff(consecutive: u32) -> Duration {
    BACKOFF_START
        .checked_mul(1u32.checked_shl(consecutive).unwrap_or(u32::MAX))
        .unwrap_or(BACKOFF_MAX)
        .min(BACKOFF_MAX)
}

/// sha256 of a guest's canonical JSON declaration and its image digest.
pub fn config_digest(decl: &fleet::Guest, image_digest: &str) -> String {
    let mut h = Sha256::new();
    // Serializing a struct of plain fields and BTreeMaps cannot fail.
    h.update(serde_json::to_vec(decl).unwrap_or_default());
    h.update(b"\n");
    h.update(image_digest.as_bytes());
    hex::encode(h.finalize())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What the guest manager needs to know.
#[derive(Debug, Clone)]
pub struct GuestsConfig {
    /// The program started as `PROGRAM run …` for each guest (the hostd binary).
    pub runner: PathBuf,
    /// The state directory (guest consoles in `guests/NAME/`, each guest's volumes in
    /// `guest-volumes/NAME/`).
    pub state_dir: PathBuf,
}

#[derive(Debug)]
struct Entry {
    rec: GuestRecord,
    state: GuestState,
    /// Bumped whenever a process starts or a pending restart is cancelled; a watcher or
    /// backoff timer of an older generation does nothing.
    gen: u64,
    adopted: bool,
    consecutive: u32,
    backoff: Option<Duration>,
    console: Arc<Console>,
    exited: watch::Sender<u64>,
}

/// Every guest of the daemon.
#[derive(Debug)]
pub struct Guests {
    cfg: GuestsConfig,
    store: Arc<Store>,
    images: Arc<ImageStore>,
    map: Mutex<BTreeMap<String, Entry>>,
    me: Weak<Guests>,
    /// Wakes each console's tail when its guest's directory changes (None: inotify
    /// could not be had; the consoles poll).
    watch: Option<Arc<DirWatch>>,
    /// Held while a fleet is applied (one apply at a time).
    pub apply_lock: tokio::sync::Mutex<()>,
    /// Images a create or an apply has resolved and not yet given to a record: kept by
    /// [`Guests::collect_images`] as if a guest used them.
    pins: Pins,
}

/// Digests pinned, with how many pins each.
type Pins = Arc<Mutex<BTreeMap<String, usize>>>;

/// Keeps an image in the store while it is held (see [`Guests::resolve_image`]).
#[derive(Debug)]
pub struct ImagePin {
    pins: Pins,
    digest: String,
}

impl Drop for ImagePin {
    fn drop(&mut self) {
        let mut pins = self.pins.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = pins.get_mut(&self.digest) {
            *n -= 1;
            if *n == 0 {
                pins.remove(&self.digest);
            }
        }
    }
}

impl Guests {
    /// The state database.
    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    /// Loads every guest from the store: re-adopts the VM processes still running (same
    /// pid and start time), and starts per policy those that should run but do not.
    /// Must run inside the tokio runtime.
    pub fn load(
        cfg: GuestsConfig,
        store: Arc<Store>,
        images: Arc<ImageStore>,
    ) -> Result<Arc<Guests>, DaemonError> {
        let records = store.guests()?;
        let guests = Arc::new_cyclic(|me| Guests {
            cfg,
            store,
            images,
            map: Mutex::new(BTreeMap::new()),
            me: me.clone(),
            watch: DirWatch::start()
                .map_err(|e| {
                    tracing::warn!("no inotify ({e}); guest consoles are polled every 100 ms")
                })
                .ok(),
            apply_lock: tokio::sync::Mutex::new(()),
            pins: Pins::default(),
        });
        for rec in records {
            guests.insert_loaded(rec);
        }
        Ok(guests)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn guest_dir(&self, name: &str) -> PathBuf {
        self.cfg.state_dir.join("guests").join(name)
    }

    /// The `--state-dir` of a guest's `hostd run`: its volumes are files in `volumes/`
    /// there. Its own, so two guests whose images declare a volume of the same name do
    /// not share it; kept when the guest is deleted (a guest made again under the name,
    /// e.g. by a fleet that dropped it for a while, finds its data).
    fn volumes_dir(&self, name: &str) -> PathBuf {
        self.cfg.state_dir.join("guest-volumes").join(name)
    }

    fn new_entry(&self, rec: GuestRecord) -> Entry {
        let dir = self.guest_dir(&rec.name);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            tracing::warn!("guest {}: cannot create {}: {e}", rec.name, dir.display());
        }
        Entry {
            console: Console::start(process::console_path(&dir), self.watch.as_ref()),
            rec,
            state: GuestState::Stopped,
            gen: 0,
            adopted: false,
            consecutive: 0,
            backoff: None,
            exited: watch::channel(0).0,
        }
    }

    fn insert_loaded(&self, mut rec: GuestRecord) {
        let name = rec.name.clone();
        let mut adopt: Option<(u32, OwnedFd)> = None;
        if let Some(pid) = rec.pid {
            let alive = rec.start_ticks.is_some()
                && process::start_ticks(pid) == rec.start_ticks
                && !process::is_zombie(pid);
            match alive.then(|| process::pidfd_open(pid)) {
                Some(Ok(fd)) => adopt = Some((pid, fd)),
                Some(Err(e)) => tracing::warn!("guest {name}: cannot watch pid {pid}: {e}"),
                None => {}
            }
            if adopt.is_none() {
                rec.pid = None;
                rec.start_ticks = None;
                rec.last_exit = Some("exited while the daemon was down (status unknown)".into());
                rec.exit_code = None;
            }
        }
        let mut e = self.new_entry(rec);
        let mut map = self.lock();
        if let Some((pid, fd)) = adopt {
            tracing::info!("guest {name}: re-adopted its running VM process (pid {pid})");
            e.state = GuestState::Running;
            e.adopted = true;
            e.gen = 1;
            self.watch(name.clone(), 1, fd, None);
        } else if e.rec.desired == Desired::Running && e.rec.decl.restart != Restart::Never {
            if let Err(err) = self.launch(&mut e) {
                e.state = GuestState::Exited;
                e.rec.last_exit = Some(format!("cannot start: {}", chain(&err)));
            }
        } else if e.rec.desired == Desired::Running {
            e.state = GuestState::Exited;
        }
        self.persist(&e.rec);
        map.insert(name, e);
    }

    fn persist(&self, rec: &GuestRecord) {
        if let Err(e) = self.store.put_guest(rec) {
            tracing::error!("guest {}: cannot save its state: {}", rec.name, chain(&e));
        }
    }

    /// Starts the VM process of `e` (the map is locked by the caller).
    fn launch(&self, e: &mut Entry) -> Result<(), DaemonError> {
        let name = e.rec.name.clone();
        let image = self
            .images
            .get(&e.rec.image_digest)
            .ok_or_else(|| DaemonError::Spawn {
                name: name.clone(),
                runner: self.cfg.runner.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("image sha256:{} is not in the store", e.rec.image_digest),
                ),
            })?;
        let dir = self.guest_dir(&name);
        let volumes = self.volumes_dir(&name);
        for d in [&dir, &volumes] {
            std::fs::create_dir_all(d).map_err(|source| DaemonError::Io {
                what: "cannot create",
                path: d.to_path_buf(),
                source,
            })?;
        }
        adopt_shared_volumes(&self.cfg.state_dir, &image, &volumes, &name)?;
        let args = process::run_args(&e.rec.decl, &image, &volumes);
        let spawn_err = |source| DaemonError::Spawn {
            name: name.clone(),
            runner: self.cfg.runner.clone(),
            source,
        };
        e.console.mark_launch();
        let child = process::spawn(&self.cfg.runner, &args, &process::console_path(&dir))
            .map_err(spawn_err)?;
        let pid = child.id();
        let pidfd = process::pidfd_open(pid).map_err(spawn_err)?;
        e.gen += 1;
        e.state = GuestState::Running;
        e.adopted = false;
        e.backoff = None;
        e.rec.pid = Some(pid);
        e.rec.start_ticks = process::start_ticks(pid);
        e.rec.started_at_ms = Some(now_ms());
        self.persist(&e.rec);
        tracing::info!("guest {name}: started (pid {pid}): {}", args.join(" "));
        self.watch(name, e.gen, pidfd, Some(child));
        Ok(())
    }

    fn watch(&self, name: String, gen: u64, pidfd: OwnedFd, child: Option<Child>) {
        let me = self.me.clone();
        tokio::spawn(async move {
            let exit = process::wait(pidfd, child).await;
            if let Some(me) = me.upgrade() {
                me.on_exit(&name, gen, exit);
            }
        });
    }

    fn on_exit(&self, name: &str, gen: u64, exit: Exit) {
        let mut map = self.lock();
        let Some(e) = map.get_mut(name) else { return };
        if e.gen != gen {
            return;
        }
        let uptime = e
            .rec
            .started_at_ms
            .map(|t| Duration::from_millis(now_ms().saturating_sub(t)))
            .unwrap_or_default();
        tracing::info!("guest {name}: VM process {exit}");
        e.rec.pid = None;
        e.rec.start_ticks = None;
        e.rec.started_at_ms = None;
        e.rec.last_exit = Some(exit.to_string());
        e.rec.exit_code = exit.code();
        e.adopted = false;
        e.exited.send_modify(|n| *n += 1);
        let restart = match e.rec.decl.restart {
            Restart::Always => true,
            Restart::OnFailure => !exit.clean(),
            Restart::Never => false,
        };
        if e.rec.desired == Desired::Stopped || e.state == GuestState::Stopping {
            e.state = GuestState::Stopped;
        } else if !restart {
            e.state = GuestState::Exited;
        } else {
            if uptime >= BACKOFF_RESET {
                e.consecutive = 0;
            }
            let delay = backoff(e.consecutive);
            e.consecutive = e.consecutive.saturating_add(1);
            e.state = GuestState::BackingOff;
            e.backoff = Some(delay);
            tracing::info!(
                "guest {name}: restarting in {delay:?} ({:?})",
                e.rec.decl.restart
            );
            let me = self.me.clone();
            let name = name.to_owned();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                if let Some(me) = me.upgrade() {
                    me.restart_after_backoff(&name, gen);
                }
            });
        }
        self.persist(&e.rec);
    }

    fn restart_after_backoff(&self, name: &str, gen: u64) {
        let mut map = self.lock();
        let Some(e) = map.get_mut(name) else { return };
        if e.gen != gen || e.state != GuestState::BackingOff {
            return;
        }
        e.rec.restarts = e.rec.restarts.saturating_add(1);
        if let Err(err) = self.launch(e) {
            tracing::error!("guest {name}: {}", chain(&err));
            e.state = GuestState::Exited;
            e.backoff = None;
            e.rec.last_exit = Some(format!("cannot start: {}", chain(&err)));
            self.persist(&e.rec);
        }
    }

    fn status(e: &Entry) -> GuestStatus {
        let running = matches!(e.state, GuestState::Running | GuestState::Stopping);
        GuestStatus {
            name: e.rec.name.clone(),
            state: e.state,
            desired: e.rec.desired,
            origin: e.rec.origin,
            pid: e.rec.pid,
            uptime_secs: running
                .then(|| {
                    e.rec
                        .started_at_ms
                        .map(|t| now_ms().saturating_sub(t) / 1000)
                })
                .flatten(),
            adopted: e.adopted,
            restarts: e.rec.restarts,
            backoff_ms: (e.state == GuestState::BackingOff)
                .then(|| e.backoff.map(|d| d.as_millis() as u64))
                .flatten(),
            last_exit: e.rec.last_exit.clone(),
            exit_code: e.rec.exit_code,
            image_digest: e.rec.image_digest.clone(),
            config_digest: e.rec.config_digest.clone(),
            boot: e.console.boot_timings(),
            spec: e.rec.decl.clone(),
        }
    }

    /// Every guest, by name.
    pub fn list(&self) -> Vec<GuestStatus> {
        self.lock().values().map(Self::status).collect()
    }

    /// One guest.
    pub fn get(&self, name: &str) -> Result<GuestStatus, ApiError> {
        self.lock()
            .get(name)
            .map(Self::status)
            .ok_or_else(|| not_found(name))
    }

    /// The records of every guest (for reconcile).
    pub fn records(&self) -> Vec<GuestRecord> {
        self.lock().values().map(|e| e.rec.clone()).collect()
    }

    /// The console of a guest.
    pub fn console(&self, name: &str) -> Result<Arc<Console>, ApiError> {
        self.lock()
            .get(name)
            .map(|e| Arc::clone(&e.console))
            .ok_or_else(|| not_found(name))
    }

    /// Resolves a declared image to a stored, verified one (importing an image file).
    ///
    /// The image is pinned until the returned pin is dropped: hold it until the record
    /// that uses the image is in place, or a removal or `POST /images/gc` meanwhile could
    /// take the image away from under it.
    pub async fn resolve_image(
        &self,
        src: &ImageSource,
    ) -> Result<(StoredImage, ImagePin), ApiError> {
        // A collection may remove an imported image before the pin is in place: then it
        // is imported again (a file or a spec; a digest is gone for good).
        for _ in 0..3 {
            let image = self.resolve_unpinned(src).await?;
            let pin = {
                // Under the guests' lock, which collections hold while they decide.
                let _map = self.lock();
                let mut pins = self.pins.lock().unwrap_or_else(|e| e.into_inner());
                *pins.entry(image.digest.clone()).or_default() += 1;
                ImagePin {
                    pins: Arc::clone(&self.pins),
                    digest: image.digest.clone(),
                }
            };
            if self.images.get(&image.digest).is_some() {
                return Ok((image, pin));
            }
            tracing::info!(
                "image sha256:{} was collected while it was resolved; again",
                image.digest
            );
        }
        Err(ApiError::conflict(
            "the image was removed from the store while it was being resolved; try again",
        ))
    }

    async fn resolve_unpinned(&self, src: &ImageSource) -> Result<StoredImage, ApiError> {
        match src {
            ImageSource::Digest(hex) => match self.images.describe(hex) {
                Some(Ok(i)) => Ok(i),
                Some(Err(e)) => Err(image_error(e)),
                None => Err(ApiError::bad_request(format!(
                    "no image sha256:{hex} in the daemon's store: upload it first (POST /images)"
                ))),
            },
            ImageSource::File(path) => {
                let images = Arc::clone(&self.images);
                let path = path.clone();
                tokio::task::spawn_blocking(move || images.import_file(&path))
                    .await
                    .map_err(|e| ApiError::internal(&e))?
                    .map_err(image_error)
            }
            ImageSource::Spec(path) => {
                let built = self.build_spec(path).await?;
                let images = Arc::clone(&self.images);
                tokio::task::spawn_blocking(move || images.import_file(&built))
                    .await
                    .map_err(|e| ApiError::internal(&e))?
                    .map_err(image_error)
            }
        }
    }

    /// Builds the image of a spec with `hostd systemd build-image`, the build the
    /// systemd units use: cached in `STATE/builds/KEY/image.img` (KEY: the sha256 of the
    /// spec's path), rebuilt only when the spec or its lock file changed.
    async fn build_spec(&self, spec: &Path) -> Result<PathBuf, ApiError> {
        let key = hex::encode(Sha256::digest(spec.as_os_str().as_encoded_bytes()));
        let out = self
            .cfg
            .state_dir
            .join("builds")
            .join(&key[..32])
            .join("image.img");
        let mut cmd = std::process::Command::new(&self.cfg.runner);
        cmd.args(["systemd", "build-image"])
            .arg(spec)
            .arg(&out)
            .stdin(std::process::Stdio::null());
        tracing::info!("building {} -> {}", spec.display(), out.display());
        let result = tokio::task::spawn_blocking(move || cmd.output())
            .await
            .map_err(|e| ApiError::internal(&e))?;
        let output = result.map_err(|e| {
            ApiError::internal(&DaemonError::Spawn {
                name: spec.display().to_string(),
                runner: self.cfg.runner.clone(),
                source: e,
            })
        })?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let last = stderr
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("the build failed");
            return Err(ApiError::bad_request(format!(
                "{}: cannot build it: {last}",
                spec.display()
            )));
        }
        Ok(out)
    }

    /// Creates a guest (and starts it when `start`). 409 if the name is taken.
    pub async fn create(
        &self,
        name: &str,
        decl: fleet::Guest,
        origin: Origin,
        start: bool,
    ) -> Result<GuestStatus, ApiError> {
        if self.lock().contains_key(name) {
            return Err(ApiError::conflict(format!(
                "guest {name} exists: remove it first (`hostd rm {name}`)"
            )));
        }
        check_trust(&decl)?;
        let (image, _pin) = self.resolve_image(&decl.image).await?;
        let rec = new_record(name, decl, &image, origin, start);
        self.insert(rec)
    }

    /// Inserts a new record (replacing nothing) and starts it if it should run.
    fn insert(&self, rec: GuestRecord) -> Result<GuestStatus, ApiError> {
        let name = rec.name.clone();
        let mut map = self.lock();
        if map.contains_key(&name) {
            return Err(ApiError::conflict(format!("guest {name} exists")));
        }
        self.store.put_guest(&rec)?;
        let mut e = self.new_entry(rec);
        let started = if e.rec.desired == Desired::Running {
            self.launch(&mut e)
        } else {
            Ok(())
        };
        let status = Self::status(&e);
        map.insert(name, e);
        started?;
        Ok(status)
    }

    /// Starts a stopped guest (desired state: running).
    pub fn start(&self, name: &str) -> Result<GuestStatus, ApiError> {
        let mut map = self.lock();
        let e = map.get_mut(name).ok_or_else(|| not_found(name))?;
        if e.state == GuestState::Stopping {
            // Refused, so nothing changes: the desired state stays what the stop set.
            return Err(ApiError::conflict(format!(
                "guest {name} is stopping; start it once it has stopped"
            )));
        }
        e.rec.desired = Desired::Running;
        match e.state {
            GuestState::Running | GuestState::Stopping => {}
            GuestState::Stopped | GuestState::Exited | GuestState::BackingOff => {
                e.consecutive = 0;
                self.launch(e)?;
            }
        }
        self.persist(&e.rec);
        Ok(Self::status(e))
    }

    /// Stops a guest (desired state: stopped): SIGTERM, then after the image's stop
    /// timeout SIGKILL to its whole process group. Returns once it has exited.
    pub async fn stop(&self, name: &str) -> Result<GuestStatus, ApiError> {
        let (mut rx, pid, timeout) = {
            let mut map = self.lock();
            let e = map.get_mut(name).ok_or_else(|| not_found(name))?;
            e.rec.desired = Desired::Stopped;
            self.persist(&e.rec);
            match (e.state, e.rec.pid) {
                (GuestState::Running | GuestState::Stopping, Some(pid)) => {
                    let rx = e.exited.subscribe();
                    if e.state == GuestState::Running {
                        e.state = GuestState::Stopping;
                        tracing::info!("guest {name}: stopping (SIGTERM to pid {pid})");
                        process::signal(pid as i32, libc::SIGTERM);
                    }
                    let t = Duration::from_secs(u64::from(e.rec.stop_timeout_secs)) + STOP_MARGIN;
                    (rx, pid, t)
                }
                _ => {
                    // Backing off or exited: cancel a pending restart.
                    e.gen += 1;
                    e.state = GuestState::Stopped;
                    e.backoff = None;
                    return Ok(Self::status(e));
                }
            }
        };
        if tokio::time::timeout(timeout, rx.changed()).await.is_err() {
            tracing::warn!("guest {name}: did not stop within {timeout:?}; SIGKILL");
            process::kill_session(pid);
            let _ = tokio::time::timeout(Duration::from_secs(10), rx.changed()).await;
        }
        self.get(name)
    }

    /// Stops a guest and deletes it: record, console, ring.
    pub async fn remove(&self, name: &str) -> Result<(), ApiError> {
        self.stop(name).await?;
        let e = self.lock().remove(name).ok_or_else(|| not_found(name))?;
        e.console.close();
        self.store.delete_guest(name)?;
        let dir = self.guest_dir(name);
        if let Err(err) = std::fs::remove_dir_all(&dir) {
            tracing::warn!("guest {name}: cannot remove {}: {err}", dir.display());
        }
        tracing::info!("guest {name}: removed");
        // Its image goes too, unless another guest uses it.
        if let Err(err) = self.collect_images(Some(&e.rec.image_digest)) {
            tracing::warn!("guest {name}: {}", chain(&err));
        }
        Ok(())
    }

    /// Removes the store's images no guest uses (`only`: just that digest, if unused).
    pub fn collect_images(
        &self,
        only: Option<&str>,
    ) -> Result<crate::images::GcReport, crate::images::ImageStoreError> {
        // Under the guests' lock: no record can start using an image while it goes.
        let map = self.lock();
        let mut keep = map
            .values()
            .map(|e| e.rec.image_digest.clone())
            .collect::<std::collections::BTreeSet<_>>();
        keep.extend(
            self.pins
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .keys()
                .cloned(),
        );
        self.images.collect_garbage(&keep, only)
    }

    /// Replaces a guest's configuration: stops it, swaps the record, starts the new one
    /// if it should run.
    pub async fn replace(&self, rec: GuestRecord) -> Result<GuestStatus, ApiError> {
        let name = rec.name.clone();
        self.stop(&name).await?;
        let mut map = self.lock();
        let e = map.get_mut(&name).ok_or_else(|| not_found(&name))?;
        e.rec = rec;
        e.gen += 1;
        e.consecutive = 0;
        e.state = GuestState::Stopped;
        self.store.put_guest(&e.rec)?;
        if e.rec.desired == Desired::Running {
            self.launch(e)?;
        }
        Ok(Self::status(e))
    }

    /// Marks a guest as owned by the fleet (a hand-made guest a fleet now names, with
    /// the same configuration).
    pub fn adopt_into_fleet(&self, name: &str) {
        if let Some(e) = self.lock().get_mut(name) {
            if e.rec.origin != Origin::Fleet {
                e.rec.origin = Origin::Fleet;
                self.persist(&e.rec);
            }
        }
    }

    /// Inserts a new record made by reconcile.
    pub fn insert_record(&self, rec: GuestRecord) -> Result<GuestStatus, ApiError> {
        self.insert(rec)
    }
}

/// The guest's trusted keys are public keys that can be read now: a missing or bad one
/// would refuse every boot (and crash-loop the guest) instead of its creation.
pub fn check_trust(decl: &fleet::Guest) -> Result<(), ApiError> {
    for key in &decl.trust {
        hostd_images::signature::TrustedKey::load(key)
            .map_err(|e| ApiError::bad_request(format!("trust: {}: {e}", key.display())))?;
    }
    Ok(())
}

/// A new guest record.
pub fn new_record(
    name: &str,
    decl: fleet::Guest,
    image: &StoredImage,
    origin: Origin,
    start: bool,
) -> GuestRecord {
    GuestRecord {
        name: name.to_owned(),
        config_digest: config_digest(&decl, &image.digest),
        decl,
        image_digest: image.digest.clone(),
        stop_timeout_secs: image.stop_timeout_secs,
        origin,
        desired: if start {
            Desired::Running
        } else {
            Desired::Stopped
        },
        pid: None,
        start_ticks: None,
        started_at_ms: None,
        restarts: 0,
        last_exit: None,
        exit_code: None,
    }
}

fn not_found(name: &str) -> ApiError {
    ApiError::not_found(format!("no guest named {name}"))
}

/// The API error for an image that could not be stored.
pub fn image_error(e: ImageStoreError) -> ApiError {
    match &e {
        ImageStoreError::TooLarge { .. } => ApiError::too_large(chain(&e)),
        ImageStoreError::Invalid { .. }
        | ImageStoreError::Body { .. }
        | ImageStoreError::Read { .. } => ApiError::bad_request(chain(&e)),
        ImageStoreError::Store { .. } => ApiError::internal(&e),
    }
}

/// Whether `p` is absolute (API paths must be: the daemon has no useful cwd).
pub fn check_absolute(what: &str, p: &Path) -> Result<(), ApiError> {
    if p.is_absolute() {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "{what}: `{}` is relative; give an absolute path",
            p.display()
        )))
    }
}

/// Daemons before this one gave every guest the same `--state-dir`, `STATE/volumes`, so
/// the volumes of all guests were files in `STATE/volumes/volumes/`. A guest that starts
/// takes from there each volume its image declares and it has none of yet: moved, under
/// the volume's lock (one a guest of an older daemon may still hold: then the guest is
/// not started, and says why, as a guest that cannot start does).
fn adopt_shared_volumes(
    state_dir: &Path,
    image: &Path,
    own: &Path,
    guest: &str,
) -> Result<(), DaemonError> {
    use hostd_vmm::volumes;
    let shared = state_dir.join("volumes");
    let any_left = std::fs::read_dir(shared.join("volumes")).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.path().extension().is_some_and(|x| x == "ext4"))
    });
    if !any_left {
        return Ok(());
    }
    // Verified in full once per version of the file (hostd run's record of it), not at
    // each start of each guest while old volumes are left there.
    let opened = match hostd_images::stamp::VerifiedCache::for_this_user() {
        Some(cache) => hostd_images::format::Image::open_cached(image, &cache),
        None => hostd_images::format::Image::open(image),
    };
    let manifest = opened
        .and_then(|i| i.manifest())
        .map_err(|source| DaemonError::Image {
            path: image.to_owned(),
            source,
        })?;
    for v in &manifest.volumes {
        let (from, to) = (
            volumes::volume_path(&shared, &v.name),
            volumes::volume_path(own, &v.name),
        );
        if to.exists() || !from.is_file() {
            continue;
        }
        let failed = |source: std::io::Error| DaemonError::Io {
            what: "cannot move the shared volume",
            path: from.clone(),
            source,
        };
        let _held = volumes::lock(
            &shared,
            &v.name,
            &format!("the daemon, moving it to guest {guest}"),
        )
        .map_err(|e| failed(std::io::Error::other(e.to_string())))?;
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(failed)?;
        }
        std::fs::rename(&from, &to).map_err(failed)?;
        tracing::info!(
            "guest {guest}: volume {} moved from the shared {} to its own {}",
            v.name,
            from.display(),
            to.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_one_second_to_a_minute() {
        let secs: Vec<u64> = (0..9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }

    fn decl() -> fleet::Guest {
        fleet::validate_guest(
            "web",
            fleet::GuestDecl {
                image: Some("/srv/web.img".into()),
                autostart: true,
                ..Default::default()
            },
            Path::new("/"),
        )
        .expect("valid")
    }

    #[test]
    fn config_digest_changes_with_the_declaration_and_the_image_only() {
        let a = decl();
        let d = config_digest(&a, "aa");
        assert_eq!(d, config_digest(&a.clone(), "aa"));
        assert_ne!(d, config_digest(&a, "ab"));
        let mut b = a.clone();
        b.memory = Some("512M".into());
        assert_ne!(d, config_digest(&b, "aa"));
        let mut c = a;
        c.restart = Restart::Always;
        assert_ne!(d, config_digest(&c, "aa"));
    }

    #[test]
    fn run_args_follow_the_declaration() {
        let mut g = decl();
        g.vmm = fleet::Vmm::Qemu;
        g.memory = Some("256M".into());
        g.secrets.insert("db".into(), "/run/keys/db".into());
        let a = process::run_args(
            &g,
            Path::new("/s/images/sha256/x"),
            Path::new("/s/guest-volumes/a"),
        );
        assert_eq!(
            a,
            [
                "run",
                "--vmm",
                "qemu",
                "--mem=256M",
                "--secret=db=@/run/keys/db",
                "--state-dir=/s/guest-volumes/a",
                "/s/images/sha256/x"
            ]
        );
    }

    #[test]
    fn start_ticks_tell_this_process() {
        let me = std::process::id();
        let t = process::start_ticks(me).expect("own stat");
        assert_eq!(process::start_ticks(me), Some(t));
        assert!(!process::is_zombie(me));
    }
}
