//! The vhost-user front end (the VMM side of `devices::virtio::vhost_user`): a hostile
//! driver writes the virtio-mmio registers of a vhost-user device (bring-ups with any
//! features and queue geometry, raw register accesses, resets at any point, notifies,
//! config reads), the control thread's `Activation::complete` runs in between, and a
//! hostile backend answers over the real socket: any features, protocol features and
//! config space, and it can die at any request.
//!
//! The backend is a protocol peer: the vhost crate's own backend request handler (what
//! every hostd backend runs) parses each message, and the peer checks what the front
//! end asks of it against the vhost-user protocol and the driver's state:
//! - nothing before SET_OWNER; acked features and protocol features were offered;
//! - the memory table is the guest's memory, every fd with it;
//! - ring indexes exist; ring sizes are powers of two up to the queue maximum; every
//!   ring lies inside guest memory (its whole extent, aligned);
//! - a running ring (started by its kick fd, stopped by GET_VRING_BASE) is never
//!   reconfigured, and is started only once it has a size and addresses;
//! - after each control step, every ring the backend runs belongs to a queue the driver
//!   made ready on a device that is still DRIVER_OK (so a reset stops them all).
//!
//! Input layout: a header (features, protocol features, queues, device type, the request
//! the backend dies at, config space), then operations, each a kind byte and its
//! arguments (see [`run`]); missing bytes read as zero.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, OnceLock};

use hostd_devices::bus::BusDevice;
use hostd_devices::virtio::mmio::{status, MmioTransport};
use hostd_devices::virtio::vhost_user::{Activation, VhostUserDevice};
use hostd_devices::Interrupt;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Backend, BackendReqHandler, Error as VuError, GpuBackend, VhostUserBackendReqHandlerMut,
};
use vhost::VhostUserMemoryRegionBase;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

type VuResult<T> = Result<T, VuError>;

/// Guest memory: 64 KiB, file-backed as the VMM's is (the front end sends its fd).
const MEM: u64 = 0x10000;
/// VIRTIO_F_VERSION_1.
const VERSION_1: u64 = 1 << 32;
/// VHOST_USER_F_PROTOCOL_FEATURES.
const PROTOCOL_FEATURES: u64 = 1 << 30;
/// The largest ring the front end may ask for (its queues' maximum size).
const MAX_RING: u32 = 256;
/// Register offsets (virtio 1.2, 4.2.2).
const QUEUE_SEL: u64 = 0x030;
const QUEUE_READY: u64 = 0x044;
const STATUS: u64 = 0x070;

struct NoIrq;
impl Interrupt for NoIrq {
    fn trigger(&self) {}
}

/// Reads the input front to back; past its end every value is zero.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn bytes(&mut self, n: usize) -> &[u8] {
        let (head, tail) = self.0.split_at(n.min(self.0.len()));
        self.0 = tail;
        head
    }
    fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }
    fn u16(&mut self) -> u16 {
        u16::from(self.u8()) | u16::from(self.u8()) << 8
    }
    fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | u32::from(self.u16()) << 16
    }
    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | u64::from(self.u32()) << 32
    }
}

/// One ring as the backend sees it.
#[derive(Debug, Default, Clone, Copy)]
struct Ring {
    num: Option<u32>,
    addr: Option<(u64, u64, u64)>,
    started: bool,
}

/// The backend's side of the connection: answers as the input says and checks every
/// request. A violation is recorded (and the connection dropped) rather than panicked
/// on here, so the front end's thread is never left waiting for a reply.
struct Peer {
    features: u64,
    protocol: u64,
    config: Vec<u8>,
    /// The request (1-based) at which the backend dies; 0: never.
    die_at: u32,
    requests: u32,
    dead: bool,
    violation: Option<String>,
    owned: bool,
    acked_protocol: u64,
    /// The guest memory as the front end's memory table describes it:
    /// (guest address, size, front end's address).
    table: Option<(u64, u64, u64)>,
    /// Where the guest memory really is in this process.
    host: u64,
    rings: Vec<Ring>,
}

impl Peer {
    /// Counts a request; fails it if the backend dies now or already broke a rule.
    fn request(&mut self, needs_owner: bool) -> VuResult<()> {
        self.requests += 1;
        if self.requests == self.die_at {
            self.dead = true;
        }
        if needs_owner && !self.owned {
            self.violate("a request before SET_OWNER".into());
        }
        if self.dead || self.violation.is_some() {
            return Err(VuError::BackendInternalError);
        }
        Ok(())
    }

    fn violate(&mut self, what: String) {
        self.violation.get_or_insert(what);
    }

    fn ring(&mut self, index: u32, what: &str) -> VuResult<&mut Ring> {
        if index as usize >= self.rings.len() {
            self.violate(format!("{what} for ring {index} of {}", self.rings.len()));
            return Err(VuError::InvalidParam);
        }
        Ok(&mut self.rings[index as usize])
    }

    /// Rejects changes to a ring the backend is running.
    fn configurable(&mut self, index: u32, what: &str) -> VuResult<()> {
        if self.ring(index, what)?.started {
            self.violate(format!("{what} on running ring {index}"));
            return Err(VuError::InvalidParam);
        }
        Ok(())
    }

    /// Whether `len` bytes at the front end's address `va`, aligned to `align`, lie
    /// inside the guest memory of the memory table.
    fn inside(&self, va: u64, len: u64, align: u64) -> bool {
        let Some((_, size, base)) = self.table else {
            return false;
        };
        va.is_multiple_of(align)
            && va >= base
            && va.checked_add(len).is_some_and(|end| end <= base + size)
    }

    fn unexpected<T>(&mut self, what: &str) -> VuResult<T> {
        self.violate(format!("unexpected request {what}"));
        Err(VuError::InvalidOperation("unexpected"))
    }
}

impl VhostUserBackendReqHandlerMut for Peer {
    fn set_owner(&mut self) -> VuResult<()> {
        self.request(false)?;
        if self.owned {
            self.violate("SET_OWNER twice".into());
        }
        self.owned = true;
        Ok(())
    }
    fn reset_owner(&mut self) -> VuResult<()> {
        self.unexpected("RESET_OWNER")
    }
    fn reset_device(&mut self) -> VuResult<()> {
        self.unexpected("RESET_DEVICE")
    }
    fn get_features(&mut self) -> VuResult<u64> {
        self.request(true)?;
        Ok(self.features)
    }
    fn set_features(&mut self, features: u64) -> VuResult<()> {
        self.request(true)?;
        if features & !self.features != 0 {
            self.violate(format!(
                "SET_FEATURES {features:#x} acks features not offered ({:#x})",
                self.features
            ));
        }
        Ok(())
    }
    fn set_mem_table(
        &mut self,
        regions: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        self.request(true)?;
        if self.rings.iter().any(|r| r.started) {
            self.violate("SET_MEM_TABLE while rings run".into());
        }
        let table: Vec<(u64, u64, u64, u64)> = regions
            .iter()
            .map(|r| (r.guest_phys_addr, r.memory_size, r.user_addr, r.mmap_offset))
            .collect();
        if table != [(0, MEM, self.host, 0)] || files.len() != 1 {
            self.violate(format!(
                "memory table {table:x?} with {} fds is not the guest's memory ({:#x} bytes at {:#x})",
                files.len(),
                MEM,
                self.host
            ));
        }
        self.table = Some((0, MEM, self.host));
        Ok(None)
    }
    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        self.request(true)?;
        self.configurable(index, "SET_VRING_NUM")?;
        if !num.is_power_of_two() || num > MAX_RING {
            self.violate(format!("SET_VRING_NUM {num} for ring {index}"));
        }
        self.ring(index, "SET_VRING_NUM")?.num = Some(num);
        Ok(())
    }
    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        desc: u64,
        used: u64,
        avail: u64,
        _log: u64,
    ) -> VuResult<()> {
        self.request(true)?;
        self.configurable(index, "SET_VRING_ADDR")?;
        let Some(num) = self.ring(index, "SET_VRING_ADDR")?.num else {
            self.violate(format!(
                "SET_VRING_ADDR before SET_VRING_NUM for ring {index}"
            ));
            return Err(VuError::InvalidParam);
        };
        let n = u64::from(num);
        for (what, va, len, align) in [
            ("descriptor table", desc, 16 * n, 16),
            ("available ring", avail, 6 + 2 * n, 2),
            ("used ring", used, 6 + 8 * n, 4),
        ] {
            if !self.inside(va, len, align) {
                self.violate(format!(
                    "ring {index}'s {what} ({len} bytes at {va:#x}) is not inside guest memory ({:x?})",
                    self.table
                ));
            }
        }
        self.ring(index, "SET_VRING_ADDR")?.addr = Some((desc, avail, used));
        Ok(())
    }
    fn set_vring_base(&mut self, index: u32, _base: u32) -> VuResult<()> {
        self.request(true)?;
        self.configurable(index, "SET_VRING_BASE")
    }
    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        self.request(true)?;
        let ring = self.ring(index, "GET_VRING_BASE")?;
        // Stops the ring; it needs its setup again before it starts.
        *ring = Ring::default();
        Ok(VhostUserVringState::new(index, 0))
    }
    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.request(true)?;
        let ring = *self.ring(index.into(), "SET_VRING_KICK")?;
        if fd.is_none() || ring.num.is_none() || ring.addr.is_none() {
            self.violate(format!(
                "ring {index} started with kick fd {fd:?} and setup {ring:?}"
            ));
        }
        self.ring(index.into(), "SET_VRING_KICK")?.started = true;
        Ok(())
    }
    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.request(true)?;
        self.ring(index.into(), "SET_VRING_CALL")?;
        if fd.is_none() {
            self.violate(format!("SET_VRING_CALL without an fd for ring {index}"));
        }
        Ok(())
    }
    fn set_vring_err(&mut self, _index: u8, _fd: Option<File>) -> VuResult<()> {
        self.unexpected("SET_VRING_ERR")
    }
    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        self.request(true)?;
        if self.features & PROTOCOL_FEATURES == 0 {
            self.violate("GET_PROTOCOL_FEATURES without the protocol features bit".into());
        }
        Ok(VhostUserProtocolFeatures::from_bits_truncate(self.protocol))
    }
    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        self.request(true)?;
        // The vhost crate's handler offers REPLY_ACK on every backend's behalf.
        let offered = VhostUserProtocolFeatures::from_bits_truncate(self.protocol).bits()
            | VhostUserProtocolFeatures::REPLY_ACK.bits();
        if features & !offered != 0 {
            self.violate(format!(
                "SET_PROTOCOL_FEATURES {features:#x} acks features not offered ({offered:#x})"
            ));
        }
        self.acked_protocol = features;
        Ok(())
    }
    fn get_queue_num(&mut self) -> VuResult<u64> {
        self.unexpected("GET_QUEUE_NUM")
    }
    fn set_vring_enable(&mut self, index: u32, _enable: bool) -> VuResult<()> {
        self.request(true)?;
        self.ring(index, "SET_VRING_ENABLE")?;
        Ok(())
    }
    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        self.request(true)?;
        if self.acked_protocol & VhostUserProtocolFeatures::CONFIG.bits() == 0 {
            self.violate("GET_CONFIG without the CONFIG protocol feature".into());
        }
        let start = (offset as usize).min(self.config.len());
        let end = start.saturating_add(size as usize).min(self.config.len());
        let mut out = self.config[start..end].to_vec();
        out.resize(size as usize, 0);
        Ok(out)
    }
    fn set_config(&mut self, _: u32, _: &[u8], _: VhostUserConfigFlags) -> VuResult<()> {
        self.unexpected("SET_CONFIG")
    }
    fn set_backend_req_fd(&mut self, _backend: Backend) {
        self.violate("unexpected request SET_BACKEND_REQ_FD".into());
    }
    fn set_gpu_socket(&mut self, _gpu: GpuBackend) -> VuResult<()> {
        self.unexpected("GPU_SET_SOCKET")
    }
    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        self.unexpected("GET_SHARED_OBJECT")
    }
    fn get_inflight_fd(
        &mut self,
        _inflight: &VhostUserInflight,
    ) -> VuResult<(VhostUserInflight, File)> {
        self.unexpected("GET_INFLIGHT_FD")
    }
    fn set_inflight_fd(&mut self, _inflight: &VhostUserInflight, _file: File) -> VuResult<()> {
        self.unexpected("SET_INFLIGHT_FD")
    }
    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        self.unexpected("GET_MAX_MEM_SLOTS")
    }
    fn add_mem_region(
        &mut self,
        _region: &VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        self.unexpected("ADD_MEM_REG")
    }
    fn remove_mem_region(&mut self, _region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        self.unexpected("REM_MEM_REG")
    }
    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        self.unexpected("SET_DEVICE_STATE_FD")
    }
    fn check_device_state(&mut self) -> VuResult<()> {
        self.unexpected("CHECK_DEVICE_STATE")
    }
    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        self.unexpected("GET_SHMEM_CONFIG")
    }
    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VuResult<()> {
        self.unexpected("SET_LOG_BASE")
    }
}

fn lock(peer: &Mutex<Peer>) -> MutexGuard<'_, Peer> {
    peer.lock().unwrap_or_else(|p| p.into_inner())
}

/// The backend's end of the connection, once the front end connected.
struct Link {
    peer: Arc<Mutex<Peer>>,
    /// Signalled by the front end's thread when an operation returned.
    done: EventFd,
    handler: Option<(BackendReqHandler<Mutex<Peer>>, UnixStream)>,
    alive: bool,
}

/// A job for the front end's thread.
type Job = Box<dyn FnOnce() + Send>;

/// Runs `job` on the front end's thread: one for the whole process, so that a run does
/// not pay for a thread per operation.
fn front_end(job: Job) {
    static FRONT_END: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    let sender = FRONT_END.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("vhost-user front end".into())
            .spawn(move || rx.into_iter().for_each(|job| job()))
            .unwrap_or_else(|e| panic!("front end thread: {e}"));
        Mutex::new(tx)
    });
    let sent = sender.lock().unwrap_or_else(|p| p.into_inner()).send(job);
    assert!(sent.is_ok(), "the front end's thread is gone");
}

fn readable(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

impl Link {
    /// Runs `op` (the front end's side) on the front end's thread while this thread
    /// serves the backend's side, until `op` returned and every message it sent was
    /// handled.
    fn drive<R: Send + 'static>(
        &mut self,
        listener: &UnixListener,
        op: impl FnOnce() -> R + Send + 'static,
    ) -> R {
        let (result_tx, result) = mpsc::channel();
        let done = self
            .done
            .try_clone()
            .unwrap_or_else(|e| panic!("eventfd: {e}"));
        front_end(Box::new(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(op));
            let _ = result_tx.send(r);
            let _ = done.write(1);
        }));
        loop {
            let mut fds = vec![readable(self.done.as_raw_fd())];
            match &self.handler {
                None => fds.push(readable(listener.as_raw_fd())),
                Some((_, sock)) if self.alive => fds.push(readable(sock.as_raw_fd())),
                Some(_) => {}
            }
            // SAFETY: `fds` is a valid array of `fds.len()` pollfds for the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if n < 0 {
                continue;
            }
            if fds.get(1).is_some_and(|p| p.revents != 0) {
                self.serve_one(listener);
                continue;
            }
            if fds[0].revents != 0 {
                let _ = self.done.read();
                break;
            }
        }
        match result.recv() {
            Ok(Ok(r)) => r,
            Ok(Err(panic)) => std::panic::resume_unwind(panic),
            Err(_) => panic!("the front end's thread is gone"),
        }
    }

    fn serve_one(&mut self, listener: &UnixListener) {
        let Some((handler, sock)) = &mut self.handler else {
            if let Ok((sock, _)) = listener.accept() {
                if let Ok(clone) = sock.try_clone() {
                    let handler = BackendReqHandler::from_stream(sock, self.peer.clone());
                    self.handler = Some((handler, clone));
                }
            }
            return;
        };
        if let Err(e) = handler.handle_request() {
            let mut peer = lock(&self.peer);
            if !peer.dead && peer.violation.is_none() {
                peer.violate(format!(
                    "the backend's protocol handler refused a message: {e}"
                ));
            }
        }
        let peer = lock(&self.peer);
        if peer.dead || peer.violation.is_some() {
            // The backend is gone: the front end's next read or write fails.
            let _ = sock.shutdown(std::net::Shutdown::Both);
            self.alive = false;
        }
    }
}

/// A fresh listening socket for one run's front end to connect to, at a path of its own
/// (runs may go on in parallel, as `cargo test` runs tests); the caller removes the path.
fn listener() -> (UnixListener, PathBuf) {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "hostd-fuzz-vhost-user-{}-{}.sock",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).unwrap_or_else(|e| panic!("bind {}: {e}", path.display()));
    (listener, path)
}

fn memory() -> GuestMemoryMmap {
    static MEMORY: OnceLock<GuestMemoryMmap> = OnceLock::new();
    MEMORY
        .get_or_init(|| {
            let file = tempfile::tempfile().unwrap_or_else(|e| panic!("memory file: {e}"));
            file.set_len(MEM)
                .unwrap_or_else(|e| panic!("memory file: {e}"));
            GuestMemoryMmap::from_ranges_with_files([(
                GuestAddress(0),
                MEM as usize,
                Some(FileOffset::new(file, 0)),
            )])
            .unwrap_or_else(|e| panic!("guest memory: {e}"))
        })
        .clone()
}

/// The driver's side: register accesses, with the queue selector it last wrote.
struct Driver {
    transport: MmioTransport,
    queue_sel: u32,
}

impl Driver {
    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Ok(v) = <[u8; 4]>::try_from(data).map(u32::from_le_bytes) {
            match offset {
                QUEUE_SEL => self.queue_sel = v,
                STATUS if v == 0 => self.queue_sel = 0,
                _ => {}
            }
        }
        self.transport.write(offset, data);
    }
    fn w(&mut self, offset: u64, v: u32) {
        self.write(offset, &v.to_le_bytes());
    }
    fn r(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.transport.read(offset, &mut b);
        u32::from_le_bytes(b)
    }
    /// Whether queue `i` is ready, leaving the driver's queue selector as it was.
    fn ready(&mut self, i: usize) -> bool {
        let sel = self.queue_sel;
        self.transport.write(QUEUE_SEL, &(i as u32).to_le_bytes());
        let ready = self.r(QUEUE_READY) == 1;
        self.transport.write(QUEUE_SEL, &sel.to_le_bytes());
        ready
    }
    /// A driver's bring-up: features acked from what the device offers, then some
    /// queues set up (sizes and addresses from the input, sane or not), then DRIVER_OK.
    fn bring_up(&mut self, r: &mut Reader, queues: usize) {
        let mask = r.u64();
        let queue_mask = r.u8();
        self.w(STATUS, 3); // ACKNOWLEDGE | DRIVER
        self.w(0x014, 0);
        let lo = self.r(0x010);
        self.w(0x014, 1);
        let hi = self.r(0x010);
        let offered = u64::from(lo) | u64::from(hi) << 32;
        let acked = offered & (mask | VERSION_1);
        self.w(0x024, 0);
        self.w(0x020, acked as u32);
        self.w(0x024, 1);
        self.w(0x020, (acked >> 32) as u32);
        self.w(STATUS, 0xb); // | FEATURES_OK
        for q in 0..queues {
            if queue_mask & (1 << q) == 0 {
                continue;
            }
            let layout = r.u8();
            self.w(QUEUE_SEL, q as u32);
            let (size, desc, avail, used) = if layout & 0x80 == 0 {
                // Sane: a power-of-two size and the rings in this queue's 16 KiB.
                let base = 0x4000 * q as u32;
                (1u32 << (layout % 9), base, base + 0x1000, base + 0x2000)
            } else {
                (u32::from(r.u16()), r.u32(), r.u32(), r.u32())
            };
            self.w(0x038, size);
            self.w(0x080, desc);
            self.w(0x090, avail);
            self.w(0x0a0, used);
            self.w(QUEUE_READY, 1);
        }
        self.w(STATUS, 0xf); // | DRIVER_OK
    }
}

/// After a control step: every ring the backend runs is a ready queue of a live device.
fn check_rings(driver: &mut Driver, peer: &Mutex<Peer>) {
    let started: Vec<usize> = lock(peer)
        .rings
        .iter()
        .enumerate()
        .filter(|(_, r)| r.started)
        .map(|(i, _)| i)
        .collect();
    let driver_ok = driver.transport.status() & status::DRIVER_OK != 0;
    for i in started {
        assert!(
            driver_ok,
            "the backend still runs ring {i} after the driver reset the device"
        );
        assert!(
            driver.ready(i),
            "the backend runs ring {i}, a queue the driver did not make ready"
        );
    }
}

/// The control thread's step: tells the backend what the driver did. Returns false when
/// the backend failed (the VMM then stops the VM).
fn control(
    driver: &mut Driver,
    link: &mut Link,
    listener: &UnixListener,
    activation: &Activation,
    peer: &Mutex<Peer>,
) -> bool {
    let activation = activation.clone();
    let result = link.drive(listener, move || activation.complete());
    let violation = lock(peer).violation.take();
    if let Some(v) = violation {
        panic!("vhost-user front end: {v}");
    }
    if result.is_err() {
        return false;
    }
    check_rings(driver, peer);
    true
}

/// One input: see the module's documentation.
pub fn run(data: &[u8]) {
    let mut r = Reader(data);
    let flags = r.u8();
    let mut features = r.u64();
    if flags & 1 != 0 {
        features |= VERSION_1;
    }
    if flags & 2 != 0 {
        features |= PROTOCOL_FEATURES;
    }
    let mut protocol = r.u64();
    if flags & 4 != 0 {
        protocol |= VhostUserProtocolFeatures::CONFIG.bits();
    }
    let queues = usize::from(r.u8() % 4) + 1;
    let device_type = [1, 2, 4, 19][usize::from(r.u8() % 4)];
    let die_at = u32::from(r.u8());
    let config_len = usize::from(r.u8() % 80);
    let config = r.bytes(config_len).to_vec();

    let mem = memory();
    let host = mem
        .get_host_address(GuestAddress(0))
        .unwrap_or_else(|e| panic!("guest memory: {e}")) as u64;
    let peer = Arc::new(Mutex::new(Peer {
        features,
        protocol,
        config,
        die_at,
        requests: 0,
        dead: false,
        violation: None,
        owned: false,
        acked_protocol: 0,
        table: None,
        host,
        rings: vec![Ring::default(); queues],
    }));
    let (listener, path) = listener();
    let listener = &listener;
    let mut link = Link {
        peer: peer.clone(),
        done: EventFd::new(EFD_NONBLOCK).unwrap_or_else(|e| panic!("eventfd: {e}")),
        handler: None,
        alive: true,
    };
    let (socket, front_mem) = (path.clone(), mem.clone());
    let connected = link.drive(listener, move || {
        VhostUserDevice::connect(&socket, device_type, queues, &front_mem)
    });
    // The connection is made (or never will be): the path has done its job.
    let _ = std::fs::remove_file(&path);
    let violation = lock(&peer).violation.take();
    if let Some(v) = violation {
        panic!("vhost-user front end: {v}");
    }
    let Ok((device, activation)) = connected else {
        // The backend died or refused: the VMM reports it and does not start.
        return;
    };
    let mut driver = Driver {
        transport: MmioTransport::new(Box::new(device), mem.clone(), Arc::new(NoIrq)),
        queue_sel: 0,
    };
    for _ in 0..64 {
        if r.0.is_empty() {
            break;
        }
        match r.u8() % 8 {
            0 => {
                let offset = u64::from(r.u8() % 0x40) * 4;
                let v = r.u32();
                driver.w(offset, v);
            }
            1 => {
                let offset = u64::from(r.u16() % 0x140);
                let width = [1usize, 2, 4, 8][usize::from(r.u8() % 4)];
                let value = r.u64().to_le_bytes();
                if r.u8() & 1 == 0 {
                    let mut buf = [0u8; 8];
                    driver.transport.read(offset, &mut buf[..width]);
                } else {
                    driver.write(offset, &value[..width]);
                }
            }
            2 | 3 => driver.bring_up(&mut r, queues),
            4 => driver.w(STATUS, 0), // reset, at any point
            5 => {
                let q = u32::from(r.u8()) % (queues as u32 + 1);
                driver.w(0x050, q);
            }
            _ => {
                if !control(&mut driver, &mut link, listener, &activation, &peer) {
                    return;
                }
            }
        }
    }
    control(&mut driver, &mut link, listener, &activation, &peer);
}
