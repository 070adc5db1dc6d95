//! vhost-user virtio-net over a TAP device.
//!
//! Two queues: rx (0) and tx (1). No offloads are offered (no checksum, no TSO/UFO, no
//! mergeable rx buffers), so every frame travels whole and the 12-byte
//! `virtio_net_hdr_v1` in front of it is all zeros on rx (apart from `num_buffers` = 1)
//! and ignored on tx.
//!
//! The TAP fd is opened before the jail ([`open_tap`]: an existing interface, attached
//! with `IFF_TAP | IFF_NO_PI`, non-blocking); afterwards the process only ever reads and
//! writes that fd. The worker's epoll watches it edge-triggered (see
//! [`NetBackend::TAP_EVENT`]): a frame the guest has no buffer for waits (one in
//! [`NetBackend`], the rest in the TAP's own queue) until the guest posts rx buffers
//! and kicks the rx queue.
//!
//! The chain handling is split from the TAP so it can be fuzzed: [`tx_queue`] hands
//! each frame to a sink, [`rx_queue`] takes frames from a source.

use std::fs::File;
use std::io::{self, Read, Write};
use std::ops::Deref;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use virtio_queue::{DescriptorChain, Queue, QueueT, Reader, Writer};
use vm_memory::{GuestAddressSpace, GuestMemory, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::rng::VHOST_USER_F_PROTOCOL_FEATURES;
use super::Memory;
use crate::virtio::VIRTIO_F_VERSION_1;

/// VIRTIO_NET_F_MAC: the device has a MAC address in its config space.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// Index of the receive queue.
pub const RX_QUEUE: u16 = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: u16 = 1;
/// Size of `virtio_net_hdr_v1` (VIRTIO_F_VERSION_1 always includes `num_buffers`).
pub const NET_HDR_LEN: usize = 12;
/// Largest frame carried either way: a 64 KiB packet plus an Ethernet header and a VLAN
/// tag. Without offloads nothing near this arrives; it bounds what a chain can make us
/// allocate.
pub const MAX_FRAME: usize = 65536 + 14 + 4;
/// Shortest frame written to the TAP: an Ethernet header.
const MIN_FRAME: usize = 14;
/// Linux's IFNAMSIZ, including the terminating NUL.
const IFNAMSIZ: usize = 16;
/// TUNSETIFF = _IOW('T', 202, int).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// The syscalls virtio-net needs beyond every backend's: none. read(2) and write(2) on
/// the TAP fd are in the common list, and epoll_ctl (registering the TAP) in
/// [`super::BACKEND_SYSCALLS`]; the TAP is opened and configured before the filter.
pub const NET_SYSCALLS: &[i64] = &[];

/// What went wrong setting up the net backend.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// No interface of that name.
    #[error(
        "TAP device {0:?} does not exist: create it first, e.g. `ip tuntap add {0} mode tap && ip link set {0} up`"
    )]
    NoSuchTap(String),
    /// A name the kernel cannot take.
    #[error("invalid TAP device name {0:?}: 1 to 15 characters, no '/', no NUL")]
    BadName(String),
    /// /dev/net/tun could not be opened.
    #[error("cannot open /dev/net/tun: {0} (is the tun module loaded, and are we root?)")]
    OpenTun(io::Error),
    /// TUNSETIFF failed.
    #[error("cannot attach to TAP device {name:?}: {source} (is it a TAP device, created with `ip tuntap add {name} mode tap`, and not in use by another process?)")]
    Attach {
        /// The interface.
        name: String,
        /// The error.
        source: io::Error,
    },
    /// A MAC address that does not parse.
    #[error("invalid MAC address {0:?}: expected six hex bytes such as 52:54:00:12:34:56")]
    BadMac(String),
}

/// Why a chain was not served.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The descriptors do not describe guest memory (or overflow).
    #[error("malformed descriptor chain")]
    BadChain,
    /// A tx chain shorter than the virtio-net header plus an Ethernet header.
    #[error("tx chain of {0} bytes is shorter than a header and a frame")]
    TooShort(usize),
    /// A tx frame larger than [`MAX_FRAME`].
    #[error("tx frame of {0} bytes is larger than {MAX_FRAME}")]
    TooLarge(usize),
    /// An rx frame that does not fit the buffers of the chain (which is not too small
    /// for every frame: that one is a [`FrameError::BadChain`]).
    #[error("rx frame of {frame} bytes does not fit a chain of {room} writable bytes")]
    NoRoom {
        /// Frame length.
        frame: usize,
        /// Writable bytes in the chain.
        room: usize,
    },
    /// Copying failed midway.
    #[error("copying the frame: {0}")]
    Copy(String),
}

/// Parses `52:54:00:12:34:56`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], NetError> {
    let bad = || NetError::BadMac(s.to_string());
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let p = parts.next().ok_or_else(bad)?;
        if p.len() != 2 {
            return Err(bad());
        }
        *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(mac)
}

/// Opens the existing TAP interface `name` (`IFF_TAP | IFF_NO_PI`), non-blocking and
/// close-on-exec. A missing interface is an error naming it: attaching to a name that
/// does not exist would otherwise create a fresh, unconfigured TAP.
pub fn open_tap(name: &str) -> Result<File, NetError> {
    if name.is_empty() || name.len() >= IFNAMSIZ || name.contains('/') || name.contains('\0') {
        return Err(NetError::BadName(name.to_string()));
    }
    let cname = std::ffi::CString::new(name).map_err(|_| NetError::BadName(name.to_string()))?;
    // SAFETY: a valid NUL-terminated string; the call only reads it.
    if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
        return Err(NetError::NoSuchTap(name.to_string()));
    }
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(NetError::OpenTun)?;
    // struct ifreq: the name (IFNAMSIZ bytes), then a union whose first member we use
    // is `short ifr_flags`; 40 bytes in all on x86_64.
    let mut ifr = [0u8; 40];
    ifr[..name.len()].copy_from_slice(name.as_bytes());
    let flags = (libc::IFF_TAP | libc::IFF_NO_PI) as i16;
    ifr[IFNAMSIZ..IFNAMSIZ + 2].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads (and may write back) a struct ifreq; `ifr` is a properly
    // sized, writable buffer that outlives the call, and the fd is ours.
    let r = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, ifr.as_mut_ptr()) };
    if r < 0 {
        return Err(NetError::Attach {
            name: name.to_string(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(tun)
}

/// Reads one tx chain: skips the header, returns the frame. Bounds: the chain's readable
/// bytes must hold a header and an Ethernet header and at most [`MAX_FRAME`] bytes.
pub fn read_tx_frame<T>(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<T>,
) -> Result<Vec<u8>, FrameError>
where
    T: Deref,
    T::Target: GuestMemory + Sized,
{
    let mut r: Reader<'_, ()> = Reader::new(mem, chain).map_err(|_| FrameError::BadChain)?;
    let total = r.available_bytes();
    let frame_len = total
        .checked_sub(NET_HDR_LEN)
        .filter(|n| *n >= MIN_FRAME)
        .ok_or(FrameError::TooShort(total))?;
    if frame_len > MAX_FRAME {
        return Err(FrameError::TooLarge(frame_len));
    }
    let mut hdr = [0u8; NET_HDR_LEN];
    r.read_exact(&mut hdr)
        .map_err(|e| FrameError::Copy(e.to_string()))?;
    let mut frame = vec![0u8; frame_len];
    r.read_exact(&mut frame)
        .map_err(|e| FrameError::Copy(e.to_string()))?;
    Ok(frame)
}

/// The rx header: no flags, no GSO, no checksum, one buffer.
pub fn rx_header() -> [u8; NET_HDR_LEN] {
    let mut h = [0u8; NET_HDR_LEN];
    h[10..12].copy_from_slice(&1u16.to_le_bytes()); // num_buffers
    h
}

/// Writes the header and `frame` into one rx chain; returns the bytes written (the used
/// length). A frame that does not fit is refused before anything is written.
pub fn write_rx_frame<T>(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<T>,
    frame: &[u8],
) -> Result<u32, FrameError>
where
    T: Deref,
    T::Target: GuestMemory + Sized,
{
    let mut w: Writer<'_, ()> = Writer::new(mem, chain).map_err(|_| FrameError::BadChain)?;
    let room = w.available_bytes();
    if room < NET_HDR_LEN + MIN_FRAME {
        // Not a receive buffer at all (e.g. no writable descriptor): it could never hold
        // a frame, so it is returned rather than kept.
        return Err(FrameError::BadChain);
    }
    let need = NET_HDR_LEN.saturating_add(frame.len());
    if need > room {
        return Err(FrameError::NoRoom {
            frame: frame.len(),
            room,
        });
    }
    w.write_all(&rx_header())
        .and_then(|()| w.write_all(frame))
        .map_err(|e| FrameError::Copy(e.to_string()))?;
    u32::try_from(w.bytes_written()).map_err(|e| FrameError::Copy(e.to_string()))
}

/// What one pass over a queue did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    /// Frames carried.
    pub frames: usize,
    /// Frames or chains dropped (malformed, too large, no room).
    pub dropped: usize,
    /// Chains returned to the driver (the used ring needs signalling).
    pub used: usize,
    /// rx only: a frame is waiting and the driver offered no buffer for it.
    pub starved: bool,
}

/// Serves every available tx chain of `queue`: each well-formed frame goes to `sink`,
/// every chain is returned as used with length 0.
pub fn tx_queue<M>(
    queue: &mut Queue,
    mem: M,
    sink: &mut dyn FnMut(&[u8]),
) -> Result<Pass, virtio_queue::Error>
where
    M: Deref<Target = GuestMemoryMmap> + Clone,
{
    let mut pass = Pass::default();
    if !queue.ready() {
        return Ok(pass);
    }
    while let Some(chain) = queue.pop_descriptor_chain(mem.clone()) {
        let head = chain.head_index();
        match read_tx_frame(&mem, chain) {
            Ok(frame) => {
                sink(&frame);
                pass.frames += 1;
            }
            Err(e) => {
                tracing::debug!("net: tx chain {head} dropped: {e}");
                pass.dropped += 1;
            }
        }
        queue.add_used(&*mem, head, 0)?;
        pass.used += 1;
    }
    Ok(pass)
}

/// Delivers frames into the available rx chains of `queue`: first `pending` (a frame
/// read earlier that found no buffer), then whatever `source` yields, until `source`
/// has nothing more or the driver offers no more chains (the frame in hand is then left
/// in `pending` and `starved` is set). A frame larger than the chain in hand is dropped
/// and the chain is kept for the next frame; a malformed chain is returned unused
/// (length 0) and the frame goes to the next chain.
pub fn rx_queue<M>(
    queue: &mut Queue,
    mem: M,
    pending: &mut Option<Vec<u8>>,
    source: &mut dyn FnMut() -> Option<Vec<u8>>,
) -> Result<Pass, virtio_queue::Error>
where
    M: Deref<Target = GuestMemoryMmap> + Clone,
{
    let mut pass = Pass::default();
    if !queue.ready() {
        pass.starved = pending.is_some();
        return Ok(pass);
    }
    // A chain popped for a frame that turned out not to fit, kept for the next frame.
    let mut held: Option<DescriptorChain<M>> = None;
    while let Some(frame) = pending.take().or_else(&mut *source) {
        let chain = match held.take() {
            Some(c) => c,
            None => match queue.pop_descriptor_chain(mem.clone()) {
                Some(c) => c,
                None => {
                    *pending = Some(frame);
                    pass.starved = true;
                    break;
                }
            },
        };
        let head = chain.head_index();
        match write_rx_frame(&mem, chain.clone(), &frame) {
            Ok(len) => {
                queue.add_used(&*mem, head, len)?;
                pass.used += 1;
                pass.frames += 1;
            }
            Err(e @ FrameError::NoRoom { .. }) => {
                tracing::debug!("net: rx frame dropped: {e}");
                pass.dropped += 1;
                held = Some(chain);
            }
            Err(e) => {
                tracing::debug!("net: rx chain {head} returned unused: {e}");
                queue.add_used(&*mem, head, 0)?;
                pass.used += 1;
                pass.dropped += 1;
                *pending = Some(frame);
            }
        }
    }
    if held.is_some() {
        // Give the unused chain back: the next pass pops it again.
        queue.set_next_avail(queue.next_avail().wrapping_sub(1));
    }
    Ok(pass)
}

/// The virtio-net backend.
#[derive(Debug)]
pub struct NetBackend {
    tap: File,
    name: String,
    mac: [u8; 6],
    mem: Memory,
    /// A frame read from the TAP that found no rx buffer yet.
    pending: Option<Vec<u8>>,
    buf: Vec<u8>,
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
            pending: None,
            buf: vec![0u8; MAX_FRAME],
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

    fn tx(&mut self, vring: &VringRwLock) -> io::Result<()> {
        let tap = &mut self.tap;
        let name = &self.name;
        let mut sink = |frame: &[u8]| match tap.write(frame) {
            Ok(n) if n == frame.len() => {}
            Ok(n) => tracing::debug!("net: {name}: short write {n} of {}", frame.len()),
            Err(e) => tracing::debug!("net: {name}: frame of {} bytes dropped: {e}", frame.len()),
        };
        let mut state = vring.get_mut();
        loop {
            state.disable_notification().map_err(io::Error::other)?;
            let pass = tx_queue(state.get_queue_mut(), self.mem.memory(), &mut sink)
                .map_err(io::Error::other)?;
            if pass.used > 0 {
                state.signal_used_queue()?;
            }
            if !state.enable_notification().map_err(io::Error::other)? {
                return Ok(());
            }
        }
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
        let buf = &mut self.buf;
        let name = &self.name;
        let mut source = || loop {
            match tap.read(buf) {
                Ok(0) => return None,
                Ok(n) => return buf.get(..n).map(<[u8]>::to_vec),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) => {
                    tracing::warn!("net: {name}: reading the TAP: {e}");
                    return None;
                }
            }
        };
        loop {
            state.disable_notification().map_err(io::Error::other)?;
            let pass = rx_queue(
                state.get_queue_mut(),
                self.mem.memory(),
                &mut self.pending,
                &mut source,
            )
            .map_err(io::Error::other)?;
            tracing::trace!("net: {name}: rx {pass:?}");
            if pass.used > 0 {
                state.signal_used_queue()?;
            }
            // Notifications on: with a frame waiting, the driver's next rx kick (new
            // buffers) brings us back; without, the TAP's next frame does.
            let more = state.enable_notification().map_err(io::Error::other)?;
            if !(pass.starved && more) {
                return Ok(());
            }
        }
    }
}

impl VhostUserBackendMut for NetBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        2
    }
    fn max_queue_size(&self) -> usize {
        256
    }
    /// VHOST_USER_F_PROTOCOL_FEATURES is required by QEMU 7.2's `-netdev vhost-user`
    /// (without it, it does not start vhost: "unable to start vhost net: 22"). That QEMU
    /// also sends SET_VRING_ENABLE when the guest acks its features, before SET_FEATURES
    /// reached us, which vhost-user-backend refuses, ending the first connection; see
    /// [`super::serve_with_listeners`] for how the backend survives that.
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES | VIRTIO_NET_F_MAC
    }
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
    }
    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let c = self.config();
        let start = (offset as usize).min(c.len());
        let end = start.saturating_add(size as usize).min(c.len());
        let mut out = c[start..end].to_vec();
        out.resize(size as usize, 0);
        out
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
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)])
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// A queue with one chain per entry of `chains`: (address, length, flags) per
    /// descriptor.
    fn queue(mem: &GuestMemoryMmap, chains: &[&[(u64, u32, u16)]]) -> Queue {
        let mq = MockSplitQueue::new(mem, 16);
        let mut descs = Vec::new();
        for chain in chains {
            let base = descs.len();
            for (i, (addr, len, flags)) in chain.iter().enumerate() {
                let next = if i + 1 < chain.len() {
                    (base + i + 1) as u16
                } else {
                    0
                };
                let f = if i + 1 < chain.len() {
                    flags | F_NEXT
                } else {
                    *flags
                };
                descs.push(RawDescriptor::from(SplitDescriptor::new(
                    *addr, *len, f, next,
                )));
            }
        }
        mq.build_multiple_desc_chains(&descs)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut q: Queue = mq.create_queue().unwrap_or_else(|e| panic!("{e}"));
        q.set_ready(true);
        q
    }

    fn frame(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_add(seed)).collect()
    }

    #[test]
    fn tx_skips_the_header_and_sends_the_frame_across_descriptors() {
        let mem = memory();
        let f = frame(60, 7);
        mem.write_slice(&[0xAA; NET_HDR_LEN], GuestAddress(0x8000))
            .unwrap_or_else(|e| panic!("{e}"));
        mem.write_slice(&f[..20], GuestAddress(0x8000 + NET_HDR_LEN as u64))
            .unwrap_or_else(|e| panic!("{e}"));
        mem.write_slice(&f[20..], GuestAddress(0x9000))
            .unwrap_or_else(|e| panic!("{e}"));
        let mut q = queue(
            &mem,
            &[
                &[(0x8000, NET_HDR_LEN as u32 + 20, 0), (0x9000, 40, 0)],
                &[(0xA000, 5, 0)], // too short: dropped, still returned
            ],
        );
        let mut sent = Vec::new();
        let pass = tx_queue(&mut q, &mem, &mut |fr| sent.push(fr.to_vec()))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(sent, vec![f]);
        assert_eq!((pass.frames, pass.dropped, pass.used), (1, 1, 2));
    }

    #[test]
    fn tx_refuses_chains_outside_memory_and_oversized_frames() {
        let mem = memory();
        let mut q = queue(
            &mem,
            &[
                &[(0xFFFF_0000, 100, 0)],
                &[(0x1000, MAX_FRAME as u32 + 100, 0)],
            ],
        );
        let mut sent = 0;
        let pass = tx_queue(&mut q, &mem, &mut |_| sent += 1).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((sent, pass.dropped, pass.used), (0, 2, 2));
    }

    #[test]
    fn rx_writes_a_zero_header_with_one_buffer_then_the_frame() {
        let mem = memory();
        let mut q = queue(&mem, &[&[(0x8000, 8, F_WRITE), (0x9000, 200, F_WRITE)]]);
        let f = frame(100, 3);
        let mut frames = vec![f.clone()];
        let mut pending = None;
        let pass = rx_queue(&mut q, &mem, &mut pending, &mut || frames.pop())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((pass.frames, pass.used, pass.starved), (1, 1, false));
        let mut got = vec![0u8; NET_HDR_LEN + f.len()];
        mem.read_slice(&mut got[..8], GuestAddress(0x8000))
            .unwrap_or_else(|e| panic!("{e}"));
        mem.read_slice(&mut got[8..], GuestAddress(0x9000))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got[..NET_HDR_LEN], rx_header());
        assert_eq!(got[..10], [0u8; 10]);
        assert_eq!(got[NET_HDR_LEN..], f[..]);
    }

    #[test]
    fn rx_drops_a_frame_too_big_and_keeps_the_chain_for_the_next() {
        let mem = memory();
        let mut q = queue(&mem, &[&[(0x8000, 100, F_WRITE)]]);
        // Popped in reverse: the big one comes first, then the small one, then one
        // that finds no buffer.
        let mut frames = vec![frame(30, 9), frame(50, 1), frame(500, 0)];
        let mut pending = None;
        let pass = rx_queue(&mut q, &mem, &mut pending, &mut || frames.pop())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((pass.frames, pass.dropped, pass.used), (1, 1, 1));
        assert!(pass.starved);
        assert_eq!(pending, Some(frame(30, 9)), "waits for the next buffer");
        let mut got = vec![0u8; 50];
        mem.read_slice(&mut got, GuestAddress(0x8000 + NET_HDR_LEN as u64))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got, frame(50, 1));
    }

    #[test]
    fn rx_gives_back_an_unused_chain_when_the_source_runs_dry() {
        let mem = memory();
        let mut q = queue(&mem, &[&[(0x8000, 100, F_WRITE)]]);
        let mut frames = vec![frame(500, 0)];
        let mut pending = None;
        let pass = rx_queue(&mut q, &mem, &mut pending, &mut || frames.pop())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((pass.used, pass.dropped, pass.starved), (0, 1, false));
        assert_eq!(q.next_avail(), 0, "the chain is still available");
        let mut frames = vec![frame(20, 0)];
        let pass = rx_queue(&mut q, &mem, &mut pending, &mut || frames.pop())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((pass.frames, pass.used), (1, 1));
    }

    #[test]
    fn rx_into_a_read_only_chain_returns_it_empty_and_keeps_the_frame() {
        let mem = memory();
        let mut q = queue(&mem, &[&[(0x8000, 100, 0)]]);
        let mut frames = vec![frame(20, 0)];
        let mut pending = None;
        let pass = rx_queue(&mut q, &mem, &mut pending, &mut || frames.pop())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((pass.frames, pass.used, pass.dropped), (0, 1, 1));
        assert!(pending.is_some() && pass.starved);
    }

    #[test]
    fn macs_parse_and_config_holds_the_mac() {
        assert_eq!(
            parse_mac("52:54:00:12:34:ab").ok(),
            Some([0x52, 0x54, 0, 0x12, 0x34, 0xab])
        );
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "5:54:00:12:34:56",
            "zz:54:00:12:34:56",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
        let f = tempfile::tempfile().unwrap_or_else(|e| panic!("{e}"));
        let b = NetBackend::new(f, "t", [1, 2, 3, 4, 5, 6]);
        assert_eq!(b.get_config(0, 6), vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(b.get_config(4, 4), vec![5, 6, 0, 0]);
        assert_eq!(b.features() & VIRTIO_NET_F_MAC, VIRTIO_NET_F_MAC);
    }

    #[test]
    fn a_missing_tap_is_named_with_how_to_create_it() {
        let e = open_tap("hostdnope0")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("\"hostdnope0\" does not exist")
                && e.contains("ip tuntap add hostdnope0 mode tap"),
            "{e}"
        );
        assert!(matches!(open_tap("a/b"), Err(NetError::BadName(_))));
        assert!(matches!(
            open_tap("0123456789abcdef"),
            Err(NetError::BadName(_))
        ));
    }
}
