//! The built-in VMM's side of vhost-user: a [`VirtioDevice`] whose queues are served by
//! a backend in another process. The VMM keeps only the virtio-mmio register file.
//!
//! The handshake (features, config space, memory table) runs on a thread of its own per
//! device ([`VhostUserDevice::start`]), so that the VM boots while the backend still
//! execs and jails itself; the transport waits for it only when the driver first asks
//! for something the backend must answer (features, config space). After that, what
//! talks to the backend socket happens on the VMM's control thread, when the driver sets
//! DRIVER_OK or resets ([`Activation::complete`], polled by the control loop). vCPU
//! threads only write the kick eventfd; a small thread per device turns the backend's
//! call eventfd into the transport's interrupt status plus the guest interrupt.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::VirtioDevice;
use crate::Interrupt;

/// VHOST_USER_F_PROTOCOL_FEATURES.
const PROTOCOL_FEATURES: u64 = 1 << 30;
/// How much config space we read from the backend (virtio-blk's is 60 bytes).
const CONFIG_SIZE: u32 = 64;

/// Why a vhost-user device could not be set up.
#[derive(Debug, Clone, thiserror::Error)]
#[error("vhost-user {socket}: {message}")]
pub struct FrontendError {
    /// The backend's socket.
    pub socket: String,
    /// What failed.
    pub message: String,
}

impl FrontendError {
    /// Makes `socket`'s errors from what failed and why.
    fn maker(socket: &str) -> impl Fn(&str, &dyn std::fmt::Display) -> FrontendError + '_ {
        move |what: &str, e: &dyn std::fmt::Display| FrontendError {
            socket: socket.to_string(),
            message: format!("{what}: {e}"),
        }
    }
}

/// What the backend answered in the handshake.
#[derive(Debug)]
struct Hello {
    /// Its features, without VHOST_USER_F_PROTOCOL_FEATURES.
    features: u64,
    config: Vec<u8>,
    /// It speaks the protocol features (and so VRING_ENABLE).
    protocol: bool,
}

/// The handshake's outcome, set once by the thread that runs it and waited for by the
/// transport (vCPU threads) and the control thread.
#[derive(Debug)]
struct Link {
    state: Mutex<Option<Result<Arc<Hello>, FrontendError>>>,
    done: Condvar,
}

impl Link {
    fn new() -> Self {
        Link {
            state: Mutex::new(None),
            done: Condvar::new(),
        }
    }

    /// Records the outcome unless one is there already; wakes every waiter.
    fn set(&self, outcome: Result<Arc<Hello>, FrontendError>) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.is_none() {
            *state = Some(outcome);
        }
        self.done.notify_all();
    }

    /// Blocks until the handshake ended.
    fn wait(&self) -> Result<Arc<Hello>, FrontendError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(outcome) = state.as_ref() {
                return outcome.clone();
            }
            state = self.done.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// How the handshake ended, or `None` while it runs (never blocks).
    fn outcome(&self) -> Option<Result<Arc<Hello>, FrontendError>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Ends it as failed, unless it ended already.
    fn fail(&self, socket: &str, why: String) {
        self.set(Err(FrontendError {
            socket: socket.to_string(),
            message: why,
        }));
    }
}

/// What the driver did that the control thread has yet to tell the backend.
#[derive(Debug, Default)]
struct Pending {
    /// The driver reset the device: the rings the backend runs must be stopped.
    reset: bool,
    /// The driver set DRIVER_OK: its acked features and queue setup.
    activation: Option<(u64, Vec<QueueSetup>)>,
}

/// Shared between the transport (vCPU threads) and the control thread.
type PendingActivation = Arc<Mutex<Pending>>;

/// One queue as the driver set it up.
#[derive(Debug, Clone, Copy)]
struct QueueSetup {
    ready: bool,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    /// Where the backend starts taking requests: 0 on a fresh queue, the saved position
    /// in a VM restored from a snapshot.
    next_avail: u16,
}

/// A virtio device served by a vhost-user backend.
pub struct VhostUserDevice {
    socket: String,
    device_type: u32,
    link: Arc<Link>,
    max_sizes: Vec<u16>,
    kicks: Vec<EventFd>,
    calls: Vec<Arc<EventFd>>,
    acked: u64,
    pending: PendingActivation,
    /// Signalled when the driver leaves work for the control thread (an activation or a
    /// reset), so that it acts at once instead of at its next periodic look.
    wake: Option<Arc<EventFd>>,
}

impl std::fmt::Debug for VhostUserDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.debug_struct("VhostUserDevice")
            .field("socket", &self.socket)
            .field("type", &self.device_type)
            .finish()
    }
}

/// What the control loop needs to finish a device's activation later.
#[derive(Clone)]
pub struct Activation {
    socket: String,
    link: Arc<Link>,
    /// Set by the handshake before it reports success.
    frontend: Arc<Mutex<Option<Frontend>>>,
    pending: PendingActivation,
    kicks: Vec<Arc<EventFd>>,
    calls: Vec<Arc<EventFd>>,
    mem: GuestMemoryMmap,
    /// The rings the backend was started on (sent a kick fd) and not stopped since.
    started: Arc<Mutex<Vec<bool>>>,
}

impl std::fmt::Debug for Activation {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.debug_struct("Activation")
            .field("socket", &self.socket)
            .finish()
    }
}

impl VhostUserDevice {
    /// Connects to the backend at `socket`, negotiates, reads its config space and
    /// hands it the guest memory table, all before it returns.
    pub fn connect(
        socket: &Path,
        device_type: u32,
        queues: usize,
        mem: &GuestMemoryMmap,
    ) -> Result<(Self, Activation), FrontendError> {
        let name = socket.display().to_string();
        let stream = UnixStream::connect(socket).map_err(|e| FrontendError {
            socket: name.clone(),
            message: format!("connect: {e}"),
        })?;
        let (dev, activation, handshake) = Self::prepare(stream, &name, device_type, queues, mem)?;
        handshake.run();
        dev.link.wait()?;
        Ok((dev, activation))
    }

    /// The device for the backend at the other end of `stream` (named `name` in
    /// messages; connected already, which does not wait for a backend whose socket
    /// listens), before any word with it: the returned [`Handshake`] talks to the
    /// backend, on whatever thread the VMM runs it, while the VM already boots. The
    /// device answers the driver's first question that needs the backend (features,
    /// config space) when the handshake is done, and [`Activation::failed`] tells the
    /// control loop if it failed.
    pub fn prepare(
        stream: UnixStream,
        name: &str,
        device_type: u32,
        queues: usize,
        mem: &GuestMemoryMmap,
    ) -> Result<(Self, Activation, Handshake), FrontendError> {
        let err = FrontendError::maker(name);
        let mut kicks = Vec::new();
        let mut calls = Vec::new();
        for _ in 0..queues {
            kicks.push(Arc::new(
                EventFd::new(EFD_NONBLOCK).map_err(|e| err("eventfd", &e))?,
            ));
            calls.push(Arc::new(EventFd::new(0).map_err(|e| err("eventfd", &e))?));
        }
        let link = Arc::new(Link::new());
        let frontend = Arc::new(Mutex::new(None));
        let pending = Arc::new(Mutex::new(Pending::default()));
        let activation = Activation {
            socket: name.to_string(),
            link: link.clone(),
            frontend: frontend.clone(),
            pending: pending.clone(),
            kicks: kicks.clone(),
            calls: calls.clone(),
            mem: mem.clone(),
            started: Arc::new(Mutex::new(vec![false; queues])),
        };
        let dev = VhostUserDevice {
            socket: name.to_string(),
            device_type,
            link: link.clone(),
            max_sizes: vec![256; queues],
            kicks: kicks
                .iter()
                .map(|k| k.try_clone())
                .collect::<Result<_, _>>()
                .map_err(|e| err("eventfd", &e))?,
            calls,
            acked: 0,
            pending,
            wake: None,
        };
        let handshake = Handshake {
            stream,
            socket: name.to_string(),
            queues,
            mem: mem.clone(),
            link,
            frontend,
        };
        Ok((dev, activation, handshake))
    }

    /// Has `wake` signalled whenever the driver leaves work for
    /// [`Activation::complete`] (the control thread polls it).
    pub fn wake_on_pending(&mut self, wake: Arc<EventFd>) {
        self.wake = Some(wake);
    }

    fn wake_control(&self) {
        if let Some(w) = &self.wake {
            let _ = w.write(1);
        }
    }

    /// The call eventfds: the backend signals them when it used buffers.
    pub fn call_fds(&self) -> Vec<Arc<EventFd>> {
        self.calls.clone()
    }
}

/// A device's handshake with its backend, not yet run (see [`VhostUserDevice::prepare`]).
pub struct Handshake {
    stream: UnixStream,
    socket: String,
    queues: usize,
    mem: GuestMemoryMmap,
    link: Arc<Link>,
    frontend: Arc<Mutex<Option<Frontend>>>,
}

impl std::fmt::Debug for Handshake {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.debug_struct("Handshake")
            .field("socket", &self.socket)
            .finish()
    }
}

impl Handshake {
    /// Talks to the backend until it answered everything (or failed), and lets the
    /// device and its activation go on.
    pub fn run(self) {
        let outcome =
            handshake(self.stream, &self.socket, self.queues, &self.mem).map(|(fe, hello)| {
                *self.frontend.lock().unwrap_or_else(|p| p.into_inner()) = Some(fe);
                Arc::new(hello)
            });
        self.link.set(outcome);
    }

    /// Ends it without running it: the device fails with `why`.
    pub fn fail(self, why: String) {
        self.link.fail(&self.socket, why);
    }
}

/// The vhost-user handshake on `stream`: owner, features, protocol features, config
/// space, the guest memory table.
fn handshake(
    stream: UnixStream,
    socket: &str,
    queues: usize,
    mem: &GuestMemoryMmap,
) -> Result<(Frontend, Hello), FrontendError> {
    let err = FrontendError::maker(socket);
    let mut fe = Frontend::from_stream(stream, queues as u64);
    fe.set_owner().map_err(|e| err("SET_OWNER", &e))?;
    let features = fe.get_features().map_err(|e| err("GET_FEATURES", &e))?;
    let mut protocol = false;
    let mut config = vec![0u8; CONFIG_SIZE as usize];
    if features & PROTOCOL_FEATURES != 0 {
        protocol = true;
        let offered = fe
            .get_protocol_features()
            .map_err(|e| err("GET_PROTOCOL_FEATURES", &e))?;
        let want = offered & VhostUserProtocolFeatures::CONFIG;
        fe.set_protocol_features(want)
            .map_err(|e| err("SET_PROTOCOL_FEATURES", &e))?;
        if want.contains(VhostUserProtocolFeatures::CONFIG) {
            let (_, payload) = fe
                .get_config(0, CONFIG_SIZE, VhostUserConfigFlags::WRITABLE, &config)
                .map_err(|e| err("GET_CONFIG", &e))?;
            let n = payload.len().min(config.len());
            config[..n].copy_from_slice(&payload[..n]);
        }
    }
    let mut regions = Vec::new();
    for region in mem.iter() {
        let fo = region
            .file_offset()
            .ok_or_else(|| err("memory table", &"guest memory is not file-backed (memfd)"))?;
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| err("memory table", &e))?;
        regions.push(VhostUserMemoryRegionInfo {
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
            mmap_offset: fo.start(),
            mmap_handle: fo.file().as_raw_fd(),
        });
    }
    fe.set_mem_table(&regions)
        .map_err(|e| err("SET_MEM_TABLE", &e))?;
    let hello = Hello {
        features: features & !PROTOCOL_FEATURES,
        config,
        protocol,
    };
    Ok((fe, hello))
}

/// Turns backend "used buffers" signals into the transport's interrupt status and a
/// guest interrupt. Runs on its own thread per queue; returns when the eventfd fails.
pub fn forward_interrupts(call: Arc<EventFd>, status: Arc<AtomicU32>, irq: Arc<dyn Interrupt>) {
    while call.read().is_ok() {
        status.fetch_or(1, Ordering::SeqCst);
        irq.trigger();
    }
}

impl Activation {
    /// Why the handshake failed, once it has (never blocks): the VM cannot go on with
    /// this device.
    pub fn failed(&self) -> Option<FrontendError> {
        self.link.outcome()?.err()
    }

    /// Ends a handshake still under way as failed (the VM is stopping), so that nothing
    /// waits for it any longer.
    pub fn abandon(&self) {
        self.link.fail(
            &self.socket,
            "the VM stopped before the backend answered".into(),
        );
    }

    /// Tells the backend what the driver did since the last call: a reset stops every
    /// ring the backend runs (GET_VRING_BASE, as the vhost-user spec has rings stopped),
    /// an activation sends the setup of the queues the driver made ready. Until the
    /// handshake has succeeded nothing is taken (the driver's reset at probe comes before
    /// it ends; its failure is [`Activation::failed`]'s to report); this never waits for
    /// the backend to answer it. Returns whether
    /// anything was sent, or an error the VMM reports (the device is then dead to the
    /// guest).
    pub fn complete(&self) -> Result<bool, FrontendError> {
        let Some(Ok(hello)) = self.link.outcome() else {
            return Ok(false);
        };
        let (reset, activation) = {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            (
                std::mem::take(&mut pending.reset),
                pending.activation.take(),
            )
        };
        if !reset && activation.is_none() {
            return Ok(false);
        }
        let err = FrontendError::maker(&self.socket);
        let mut frontend = self.frontend.lock().unwrap_or_else(|p| p.into_inner());
        let fe = frontend
            .as_mut()
            .ok_or_else(|| err("handshake", &"no connection"))?;
        let mut started = self.started.lock().unwrap_or_else(|p| p.into_inner());
        if reset {
            for (i, running) in started.iter_mut().enumerate() {
                if *running {
                    fe.get_vring_base(i)
                        .map_err(|e| err("GET_VRING_BASE", &e))?;
                    *running = false;
                }
            }
        }
        let Some((acked, queues)) = activation else {
            return Ok(true);
        };
        let features = acked | if hello.protocol { PROTOCOL_FEATURES } else { 0 };
        fe.set_features(features)
            .map_err(|e| err("SET_FEATURES", &e))?;
        // Queues the driver did not make ready are not the device's to use (virtio 1.2,
        // 4.2.2: QueueReady); their registers hold whatever the driver left there.
        for (i, q) in queues.iter().enumerate().filter(|(_, q)| q.ready) {
            let host = |gpa: u64| -> Result<u64, FrontendError> {
                self.mem
                    .get_host_address(GuestAddress(gpa))
                    .map(|p| p as u64)
                    .map_err(|e| err("queue address", &e))
            };
            let config = VringConfigData {
                queue_max_size: 256,
                queue_size: q.size,
                flags: 0,
                desc_table_addr: host(q.desc)?,
                used_ring_addr: host(q.used)?,
                avail_ring_addr: host(q.avail)?,
                log_addr: None,
            };
            fe.set_vring_num(i, q.size)
                .map_err(|e| err("SET_VRING_NUM", &e))?;
            fe.set_vring_addr(i, &config)
                .map_err(|e| err("SET_VRING_ADDR", &e))?;
            fe.set_vring_base(i, q.next_avail)
                .map_err(|e| err("SET_VRING_BASE", &e))?;
            fe.set_vring_call(i, &self.calls[i])
                .map_err(|e| err("SET_VRING_CALL", &e))?;
            fe.set_vring_kick(i, &self.kicks[i])
                .map_err(|e| err("SET_VRING_KICK", &e))?;
            if let Some(running) = started.get_mut(i) {
                *running = true;
            }
            if hello.protocol {
                fe.set_vring_enable(i, true)
                    .map_err(|e| err("SET_VRING_ENABLE", &e))?;
            }
        }
        Ok(true)
    }
}

impl VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u32 {
        self.device_type
    }
    fn features(&self) -> u64 {
        // A failed handshake offers nothing; the control loop stops the VM with its error.
        self.link.wait().map(|h| h.features).unwrap_or(0)
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.max_sizes
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Ok(hello) = self.link.wait() else {
            return;
        };
        let config = &hello.config;
        let start = (offset as usize).min(config.len());
        let end = start.saturating_add(data.len()).min(config.len());
        data[..end - start].copy_from_slice(&config[start..end]);
    }
    fn acked_features(&mut self, features: u64) {
        self.acked = features;
    }
    fn activate(&mut self, queues: &[Queue]) {
        let setup = queues
            .iter()
            .map(|q| QueueSetup {
                ready: q.ready(),
                size: q.size(),
                desc: q.desc_table(),
                avail: q.avail_ring(),
                used: q.used_ring(),
                next_avail: q.next_avail(),
            })
            .collect();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .activation = Some((self.acked, setup));
        self.wake_control();
    }
    fn reset(&mut self) {
        // An activation the control thread has not sent yet is void, and whatever rings
        // the backend runs must stop before the driver reuses their memory.
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.activation = None;
        pending.reset = true;
        drop(pending);
        self.acked = 0;
        self.wake_control();
    }
    fn process_queue(&mut self, index: usize, _queue: &mut Queue, _mem: &GuestMemoryMmap) -> bool {
        if let Some(kick) = self.kicks.get(index) {
            let _ = kick.write(1);
        }
        // Used buffers are signalled by the backend through the call eventfd.
        false
    }
}
