//! vhost-user virtio-net over a TAP device, with the offloads the TAP carries.
//!
//! Two queues: rx (0) and tx (1). Offered ([`frames::OFFLOAD_FEATURES`]): checksum
//! offload both ways (CSUM, GUEST_CSUM), TCP segmentation both ways (HOST_TSO4/6,
//! GUEST_TSO4/6, with ECN), mergeable receive buffers (MRG_RXBUF), plus indirect
//! descriptors and event indexes. The TAP is opened with `IFF_VNET_HDR`, so the
//! `virtio_net_hdr` in front of each frame is the TAP's own: it passes through unchanged
//! (tx: after checks; rx: `num_buffers` filled in). When the driver acks its features
//! the TAP is told the header size they imply (TUNSETVNETHDRSZ) and which offloads it
//! may hand the guest (TUNSETOFFLOAD, from the acked GUEST_* features).
//!
//! - [`tap`]: opening the TAP before the jail, the two ioctls after it, the filter.
//! - [`frames`]: headers, features and the chain handling of both queues (fuzzed).
//! - [`frontend_relay`]: QEMU's vhost-user-net message order made vhost-user-backend's.
//! - here: the backend, which moves frames between the queues and the TAP.
//!
//! The worker's epoll watches the TAP edge-triggered (see [`NetBackend::TAP_EVENT`]): a
//! frame the guest has no buffer for waits (one in [`NetBackend`], the rest in the TAP's
//! own queue) until the guest posts rx buffers and kicks the rx queue.

pub mod frames;
pub mod frontend_relay;
pub mod tap;

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::rng::VHOST_USER_F_PROTOCOL_FEATURES;
use super::Memory;
use crate::virtio::VIRTIO_F_VERSION_1;

pub use frames::{
    read_tx_frame, rx_queue, tx_queue, used_needs_notification, write_rx_frame, FrameError,
    Negotiated, Pass, MAX_FRAME, NET_HDR_LEN, OFFLOAD_FEATURES, VIRTIO_NET_F_MAC,
};
pub use tap::{net_filter, open_tap, parse_mac, NetError, NET_IOCTLS, NET_SYSCALLS};

/// Index of the receive queue.
pub const RX_QUEUE: u16 = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: u16 = 1;

/// A log line at most once per interval, counting the ones left out: a guest that sends
/// nothing but bad frames must not flood the host's logs.
#[derive(Debug)]
struct RateLimited {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimited {
    const INTERVAL: Duration = Duration::from_secs(5);

    fn new() -> Self {
        RateLimited {
            last: None,
            suppressed: 0,
        }
    }

    /// Calls `log` with the count of lines suppressed since the last one, or counts
    /// this one as suppressed.
    fn log(&mut self, count: usize, log: impl FnOnce(u64)) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Self::INTERVAL)
        {
            self.suppressed = self.suppressed.saturating_add(count as u64);
            return;
        }
        log(self.suppressed);
        self.last = Some(now);
        self.suppressed = 0;
    }
}

/// The virtio-net backend.
#[derive(Debug)]
pub struct NetBackend {
    tap: File,
    name: String,
    mac: [u8; 6],
    mem: Memory,
    neg: Negotiated,
    /// The length of a frame in `rx_buf`, read from the TAP, that found no rx buffer yet.
    pending: Option<usize>,
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
    drops: RateLimited,
}

impl NetBackend {
    /// The epoll id of the TAP fd: ids up to and including the number of queues are the
    /// library's (queues, then its exit/enable event).
    pub const TAP_EVENT: u16 = 3;

    /// Serves `tap` (from [`open_tap`]) to a guest that sees `mac`.
    pub fn new(tap: File, name: &str, mac: [u8; 6]) -> Self {
        NetBackend {
            tap,
            name: name.to_string(),
            mac,
            mem: Memory::new(GuestMemoryMmap::new()),
            neg: Negotiated::default(),
            pending: None,
            rx_buf: vec![0u8; NET_HDR_LEN + MAX_FRAME],
            tx_buf: Vec::with_capacity(NET_HDR_LEN + MAX_FRAME),
            drops: RateLimited::new(),
        }
    }

    /// The TAP fd, to register with the worker's epoll (edge-triggered, id
    /// [`Self::TAP_EVENT`]).
    pub fn tap_fd(&self) -> RawFd {
        self.tap.as_raw_fd()
    }

    /// Uses `mem` as guest memory.
    pub fn set_memory(&mut self, mem: Memory) {
        self.mem = mem;
    }

    fn config(&self) -> [u8; 6] {
        self.mac
    }

    /// Logs (rate-limited) why frames of a pass were dropped.
    fn log_drops(&mut self, queue: &str, pass: &Pass) {
        if pass.dropped == 0 {
            return;
        }
        let name = &self.name;
        let (n, why) = (pass.dropped, pass.first_error.as_ref());
        self.drops.log(n, |suppressed| {
            let why = why.map(ToString::to_string).unwrap_or_default();
            tracing::warn!(
                "net: {name}: {queue}: {n} frame(s) or chain(s) dropped, first: {why} \
                 ({suppressed} more since the last such line)"
            );
        });
    }

    fn tx(&mut self, vring: &VringRwLock) -> io::Result<()> {
        let tap = &mut self.tap;
        let name = &self.name;
        let mut sink = |frame: &[u8]| match tap.write(frame) {
            Ok(n) if n == frame.len() => {}
            Ok(n) => tracing::debug!("net: {name}: short write {n} of {}", frame.len()),
            Err(e) => tracing::debug!("net: {name}: frame of {} bytes dropped: {e}", frame.len()),
        };
        let mut state = vring.get_mut();
        let mut total = Pass::default();
        loop {
            state.disable_notification().map_err(io::Error::other)?;
            let pass = tx_queue(
                state.get_queue_mut(),
                self.mem.memory(),
                self.neg,
                &mut self.tx_buf,
                &mut sink,
            )
            .map_err(io::Error::other)?;
            if pass.used > 0 && state.needs_notification().map_err(io::Error::other)? {
                state.signal_used_queue()?;
            }
            total.dropped += pass.dropped;
            if total.first_error.is_none() {
                total.first_error = pass.first_error;
            }
            if !state.enable_notification().map_err(io::Error::other)? {
                break;
            }
        }
        drop(state);
        self.log_drops("tx", &total);
        Ok(())
    }

    fn rx(&mut self, vring: &VringRwLock) -> io::Result<()> {
        let mut state = vring.get_mut();
        if !state.is_enabled() || !state.get_queue().ready() {
            tracing::trace!(
                "net: {}: rx queue not set up yet (enabled {}, ready {})",
                self.name,
                state.is_enabled(),
                state.get_queue().ready()
            );
            // Frames stay in the TAP until the driver sets the queue up.
            return Ok(());
        }
        let tap = &mut self.tap;
        let name = &self.name;
        let mut source = |buf: &mut [u8]| loop {
            match tap.read(buf) {
                Ok(0) => return None,
                Ok(n) => return Some(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) => {
                    tracing::warn!("net: {name}: reading the TAP: {e}");
                    return None;
                }
            }
        };
        let mut total = Pass::default();
        loop {
            state.disable_notification().map_err(io::Error::other)?;
            let old = state.get_queue().next_used();
            let pass = rx_queue(
                state.get_queue_mut(),
                self.mem.memory(),
                self.neg,
                &mut self.rx_buf,
                &mut self.pending,
                &mut source,
            )
            .map_err(io::Error::other)?;
            tracing::trace!("net: {name}: rx {pass:?}");
            // Not `needs_notification`: its count misses entries published together.
            if used_needs_notification(state.get_queue(), &*self.mem.memory(), old)
                .map_err(io::Error::other)?
            {
                state.signal_used_queue()?;
            }
            total.dropped += pass.dropped;
            if total.first_error.is_none() {
                total.first_error = pass.first_error;
            }
            // Notifications on: with a frame waiting, the driver's next rx kick (new
            // buffers) brings us back; without, the TAP's next frame does.
            let more = state.enable_notification().map_err(io::Error::other)?;
            if !(pass.starved && more) {
                break;
            }
        }
        drop(state);
        self.log_drops("rx", &total);
        Ok(())
    }

    /// Tells the TAP what the driver acked: the header size and the offloads it may
    /// hand the guest.
    fn negotiate(&mut self, acked: u64) {
        let neg = Negotiated::new(acked);
        if neg.hdr_len() != self.neg.hdr_len() {
            if let Err(e) = tap::set_vnet_hdr_len(&self.tap, neg.hdr_len()) {
                tracing::error!(
                    "net: {}: TUNSETVNETHDRSZ {}: {e}; frames will be garbled",
                    self.name,
                    neg.hdr_len()
                );
            }
            // A frame read with the old header size.
            self.pending = None;
        }
        let offloads = neg.tap_offloads();
        match tap::set_offloads(&self.tap, offloads) {
            Ok(()) => tracing::debug!(
                "net: {}: acked {acked:#x}, header {} bytes, TAP offloads {offloads:#x}",
                self.name,
                neg.hdr_len()
            ),
            Err(e) => {
                // The TAP then sends whole, checksummed frames, which every driver takes.
                tracing::warn!("net: {}: TUNSETOFFLOAD {offloads:#x}: {e}", self.name);
            }
        }
        self.neg = neg;
    }
}

impl VhostUserBackendMut for NetBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        2
    }
    /// QEMU's virtio-mmio reports 1024 (VIRTQUEUE_MAX_SIZE) as QueueNumMax whatever the
    /// device's queue size, and Linux takes it.
    fn max_queue_size(&self) -> usize {
        1024
    }
    /// VHOST_USER_F_PROTOCOL_FEATURES is required by QEMU 7.2's `-netdev vhost-user`
    /// (without it, it does not start vhost: "unable to start vhost net: 22"). That QEMU
    /// also sends SET_VRING_ENABLE when the guest acks its features, before SET_FEATURES
    /// reached us, which vhost-user-backend refuses, ending the first connection; see
    /// [`super::serve_with_listeners`] for how the backend survives that.
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | VHOST_USER_F_PROTOCOL_FEATURES
            | VIRTIO_NET_F_MAC
            | OFFLOAD_FEATURES
            | super::RING_FEATURES
    }
    fn acked_features(&mut self, features: u64) {
        self.negotiate(features);
    }
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
    }
    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        super::config_window(&self.config(), offset, size)
    }
    fn set_event_idx(&mut self, _enabled: bool) {}
    fn update_memory(&mut self, mem: Memory) -> io::Result<()> {
        self.mem = mem;
        Ok(())
    }
    fn handle_event(
        &mut self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread: usize,
    ) -> io::Result<()> {
        let (Some(rx), Some(tx)) = (
            vrings.get(usize::from(RX_QUEUE)),
            vrings.get(usize::from(TX_QUEUE)),
        ) else {
            return Err(io::Error::other("net: fewer than two vrings"));
        };
        tracing::trace!("net: {}: event {device_event} {evset:?}", self.name);
        match device_event {
            RX_QUEUE => self.rx(rx),
            TX_QUEUE => self.tx(tx),
            Self::TAP_EVENT => {
                if evset.intersects(EventSet::ERROR | EventSet::HANG_UP) {
                    tracing::warn!("net: {}: TAP reports {evset:?}", self.name);
                }
                self.rx(rx)
            }
            other => Err(io::Error::other(format!(
                "net: event for unknown id {other}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_holds_the_mac_and_the_offloads_are_offered() {
        let f = tempfile::tempfile().unwrap_or_else(|e| panic!("{e}"));
        let b = NetBackend::new(f, "t", [1, 2, 3, 4, 5, 6]);
        assert_eq!(b.get_config(0, 6), vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(b.get_config(4, 4), vec![5, 6, 0, 0]);
        assert_eq!(b.features() & VIRTIO_NET_F_MAC, VIRTIO_NET_F_MAC);
        assert_eq!(b.features() & OFFLOAD_FEATURES, OFFLOAD_FEATURES);
    }

    #[test]
    fn drop_logs_are_rate_limited() {
        let mut r = RateLimited::new();
        let mut lines = Vec::new();
        for _ in 0..100 {
            r.log(2, |s| lines.push(s));
        }
        assert_eq!(lines, vec![0], "one line, then counting");
        assert_eq!(r.suppressed, 198);
    }
}
