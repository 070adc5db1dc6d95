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
        VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES | VIRTIO_NET_F_MAC
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

/// QEMU 7.2's `-netdev vhost-user` and vhost-user-backend disagree on message order.
/// QEMU (which will not start vhost-user-net without VHOST_USER_F_PROTOCOL_FEATURES)
/// sends SET_VRING_ENABLE when the guest acks its features, before SET_FEATURES, and
/// not again after it (traced here with strace); vhost-user-backend refuses
/// SET_VRING_ENABLE until SET_FEATURES acked the bit and ends the connection
/// ("inactive feature"). This relay sits between the frontend's connection and the
/// daemon's and passes frontend messages on whole, with their fds, except that
/// SET_VRING_ENABLE before the first SET_FEATURES is held back and replayed right after
/// it (when SET_FEATURES acked protocol features; otherwise the rings start enabled and
/// it is dropped, as is any later one). Messages that ask for a reply are always
/// forwarded, so the frontend is never left waiting. Replies flow back untouched.
pub mod frontend_relay {
    use std::io::{self, Write};
    use std::net::Shutdown;
    use std::os::fd::{FromRawFd, OwnedFd, RawFd};
    use std::os::unix::net::{UnixListener, UnixStream};

    use vmm_sys_util::sock_ctrl_msg::ScmSocket;

    const SET_FEATURES: u32 = 2;
    const SET_VRING_ENABLE: u32 = 18;
    const NEED_REPLY: u32 = 1 << 3;
    const HDR: usize = 12;
    /// vhost-user's largest message body.
    const MAX_BODY: usize = 0x1000;
    const MAX_FDS: usize = 32;
    /// Early SET_VRING_ENABLE messages kept (two per queue pair is what QEMU sends).
    const MAX_EARLY: usize = 64;
    const PROTOCOL_FEATURES: u64 = 1 << 30;

    /// A listening socket for the daemon and a connection to it, on an abstract unix
    /// address: called inside the jail's private network namespace (before the seccomp
    /// filter), where no other process can reach the address.
    pub fn inner_pair(tag: &str) -> io::Result<(UnixListener, UnixStream)> {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("hostd-{}-{tag}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        let listener = UnixListener::bind_addr(&addr)?;
        let client = UnixStream::connect_addr(&addr)?;
        Ok((listener, client))
    }

    /// Receives up to `buf.len()` bytes and the fds that came with them.
    fn recv(sock: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
        let mut fds: [RawFd; MAX_FDS] = [-1; MAX_FDS];
        let mut iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        // SAFETY: the iovec describes `buf`, which may take any bytes; `fds` has room
        // for MAX_FDS descriptors.
        let (n, nfds) = unsafe { sock.recv_with_fds(&mut iov, &mut fds) }
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        let owned = fds
            .get(..nfds)
            .unwrap_or(&[])
            .iter()
            // SAFETY: recvmsg just gave us these descriptors; nothing else owns them.
            .map(|fd| unsafe { OwnedFd::from_raw_fd(*fd) })
            .collect();
        Ok((n, owned))
    }

    /// Fills `buf` (recvmsg only: std's `Read` for sockets is recvfrom(2), which the
    /// filter does not allow), adding any fds that arrive to `fds`. False on a clean
    /// end of stream before the first byte.
    fn recv_exact(sock: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<bool> {
        let mut done = 0;
        while done < buf.len() {
            let (n, more) = recv(sock, buf.get_mut(done..).unwrap_or(&mut []))?;
            fds.extend(more);
            if n == 0 {
                if done == 0 {
                    return Ok(false);
                }
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            done += n;
        }
        Ok(true)
    }

    /// Sends `data` with `fds` attached to the first byte; the rest without.
    fn send(sock: &UnixStream, data: &[u8], fds: &[OwnedFd]) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let n = sock
            .send_with_fds(&[data], &raw)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        let mut w = sock;
        w.write_all(data.get(n..).unwrap_or(&[]))
    }

    /// Copies `from` to `to`, fds included, until `from` ends.
    fn copy(from: &UnixStream, to: &UnixStream) -> io::Result<()> {
        let mut buf = vec![0u8; HDR + MAX_BODY];
        loop {
            let (n, fds) = recv(from, &mut buf)?;
            if n == 0 {
                return Ok(());
            }
            send(to, buf.get(..n).unwrap_or(&[]), &fds)?;
        }
    }

    /// Relays one frontend connection to the daemon (see the module docs) until either
    /// side hangs up.
    pub fn relay(frontend: UnixStream, daemon: UnixStream) -> io::Result<()> {
        let (back_from, back_to) = (daemon.try_clone()?, frontend.try_clone()?);
        let back = std::thread::Builder::new()
            .name("vhost-user-relay".into())
            .spawn(move || {
                let r = copy(&back_from, &back_to);
                let _ = back_to.shutdown(Shutdown::Both);
                r
            })?;
        let result = forward(&frontend, &daemon);
        let _ = daemon.shutdown(Shutdown::Both);
        let _ = frontend.shutdown(Shutdown::Both);
        let _ = back.join();
        result
    }

    fn forward(frontend: &UnixStream, daemon: &UnixStream) -> io::Result<()> {
        // Whether SET_FEATURES came, and whether the last one acked
        // VHOST_USER_F_PROTOCOL_FEATURES.
        let mut features_seen = false;
        let mut protocol_acked = false;
        // SET_VRING_ENABLE messages held back until SET_FEATURES.
        let mut early: Vec<Vec<u8>> = Vec::new();
        loop {
            let mut hdr = [0u8; HDR];
            let mut fds = Vec::new();
            if !recv_exact(frontend, &mut hdr, &mut fds)? {
                return Ok(());
            }
            let word = |i: usize| {
                let mut w = [0u8; 4];
                w.copy_from_slice(hdr.get(i..i + 4).unwrap_or(&[0; 4]));
                u32::from_le_bytes(w)
            };
            let (code, flags, size) = (word(0), word(4), word(8) as usize);
            if size > MAX_BODY {
                return Err(io::Error::other(format!(
                    "frontend message {code} of {size} bytes"
                )));
            }
            let mut body = vec![0u8; size];
            if !recv_exact(frontend, &mut body, &mut fds)? && size > 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let mut msg = hdr.to_vec();
            msg.extend_from_slice(&body);
            match code {
                SET_VRING_ENABLE if !features_seen && flags & NEED_REPLY == 0 => {
                    if early.len() < MAX_EARLY {
                        early.push(msg);
                    }
                    continue;
                }
                SET_VRING_ENABLE if !protocol_acked && flags & NEED_REPLY == 0 => {
                    tracing::debug!(
                        "vhost-user: SET_VRING_ENABLE without acked protocol features dropped"
                    );
                    continue;
                }
                SET_FEATURES => {
                    send(daemon, &msg, &fds)?;
                    features_seen = true;
                    protocol_acked = <[u8; 8]>::try_from(body.as_slice())
                        .is_ok_and(|b| u64::from_le_bytes(b) & PROTOCOL_FEATURES != 0);
                    for m in early.drain(..) {
                        if protocol_acked {
                            tracing::debug!("vhost-user: early SET_VRING_ENABLE replayed");
                            send(daemon, &m, &[])?;
                        }
                    }
                    continue;
                }
                _ => {}
            }
            send(daemon, &msg, &fds)?;
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

    fn msg(code: u32, body: &[u8]) -> Vec<u8> {
        let mut m = code.to_le_bytes().to_vec();
        m.extend_from_slice(&1u32.to_le_bytes()); // version 1
        m.extend_from_slice(&(body.len() as u32).to_le_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn the_relay_replays_an_early_vring_enable_after_set_features() {
        use std::io::Read;
        use std::os::unix::net::UnixStream;
        let (mut qemu, relay_front) = UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        let (relay_daemon, mut daemon) = UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        let t = std::thread::spawn(move || frontend_relay::relay(relay_front, relay_daemon));
        let mut enable_body = 0u32.to_le_bytes().to_vec();
        enable_body.extend_from_slice(&1u32.to_le_bytes());
        let enable = msg(18, &enable_body);
        let features = msg(2, &(VIRTIO_F_VERSION_1 | (1 << 30)).to_le_bytes());
        let get = msg(1, &[]);
        for m in [&enable, &features, &get] {
            qemu.write_all(m).unwrap_or_else(|e| panic!("{e}"));
        }
        let mut got = vec![0u8; features.len() + enable.len() + get.len()];
        daemon
            .read_exact(&mut got)
            .unwrap_or_else(|e| panic!("{e}"));
        let want: Vec<u8> = [features, enable, get].concat();
        assert_eq!(
            got, want,
            "SET_FEATURES, then the held-back enable, then the rest"
        );
        // Replies go back as they are.
        let reply = msg(1, &7u64.to_le_bytes());
        daemon.write_all(&reply).unwrap_or_else(|e| panic!("{e}"));
        let mut back = vec![0u8; reply.len()];
        qemu.read_exact(&mut back).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, reply);
        drop(qemu);
        assert!(t.join().is_ok_and(|r| r.is_ok()));
    }

    #[test]
    fn the_relay_drops_vring_enable_when_protocol_features_are_not_acked() {
        use std::io::Read;
        use std::os::unix::net::UnixStream;
        let (mut qemu, relay_front) = UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        let (relay_daemon, mut daemon) = UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        let t = std::thread::spawn(move || frontend_relay::relay(relay_front, relay_daemon));
        let enable = msg(18, &[0, 0, 0, 0, 1, 0, 0, 0]);
        let features = msg(2, &VIRTIO_F_VERSION_1.to_le_bytes());
        for m in [&enable, &features, &enable] {
            qemu.write_all(m).unwrap_or_else(|e| panic!("{e}"));
        }
        drop(qemu);
        let mut got = Vec::new();
        daemon
            .read_to_end(&mut got)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got, features);
        assert!(t.join().is_ok_and(|r| r.is_ok()));
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
