//! virtio-net frames on the queues: the `virtio_net_hdr` in front of each frame, what
//! the driver acked of the offloads, and the chain handling of both queues (split from
//! the TAP so it can be fuzzed: [`tx_queue`] hands each header and frame to a sink,
//! [`rx_queue`] takes them from a source).
//!
//! The TAP speaks the same header (`IFF_VNET_HDR`, its size set to the one the acked
//! features imply), so headers pass through unchanged: on tx after [`check_tx_header`]
//! refused what a hostile driver could make of them, on rx with `num_buffers` filled in.

use std::io::{Read, Write};
use std::ops::Deref;

use virtio_queue::{DescriptorChain, Queue, QueueT, Reader, Writer};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

use crate::virtio::VIRTIO_F_VERSION_1;

use super::tap::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN};

/// VIRTIO_NET_F_CSUM: the driver may leave tx checksums to us (partial checksums).
pub const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
/// VIRTIO_NET_F_GUEST_CSUM: we may deliver frames with partial checksums.
pub const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
/// VIRTIO_NET_F_MAC: the device has a MAC address in its config space.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// VIRTIO_NET_F_GUEST_TSO4: we may deliver TCP/IPv4 segments larger than the MTU.
pub const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
/// VIRTIO_NET_F_GUEST_TSO6: ... TCP/IPv6.
pub const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << 8;
/// VIRTIO_NET_F_GUEST_ECN: ... with ECN.
pub const VIRTIO_NET_F_GUEST_ECN: u64 = 1 << 9;
/// VIRTIO_NET_F_HOST_TSO4: the driver may send TCP/IPv4 segments larger than the MTU.
pub const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
/// VIRTIO_NET_F_HOST_TSO6: ... TCP/IPv6.
pub const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
/// VIRTIO_NET_F_HOST_ECN: ... with ECN.
pub const VIRTIO_NET_F_HOST_ECN: u64 = 1 << 13;
/// VIRTIO_NET_F_MRG_RXBUF: a received frame may span several rx chains.
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;

/// The offloads offered: what the TAP carries (checksums and TCP segmentation both
/// ways, ECN) and mergeable receive buffers. UFO is not offered: Linux guests no longer
/// send it and TCP is what it is for.
pub const OFFLOAD_FEATURES: u64 = VIRTIO_NET_F_CSUM
    | VIRTIO_NET_F_GUEST_CSUM
    | VIRTIO_NET_F_GUEST_TSO4
    | VIRTIO_NET_F_GUEST_TSO6
    | VIRTIO_NET_F_GUEST_ECN
    | VIRTIO_NET_F_HOST_TSO4
    | VIRTIO_NET_F_HOST_TSO6
    | VIRTIO_NET_F_HOST_ECN
    | VIRTIO_NET_F_MRG_RXBUF;

/// Size of `virtio_net_hdr_v1` (VIRTIO_F_VERSION_1 or MRG_RXBUF: with `num_buffers`).
pub const NET_HDR_LEN: usize = 12;
/// Size of the legacy `virtio_net_hdr` (neither of those acked).
pub const LEGACY_HDR_LEN: usize = 10;
/// Largest frame carried either way: a 64 KiB packet (a TSO segment at most) plus an
/// Ethernet header and a VLAN tag. It bounds what a chain can make us allocate.
pub const MAX_FRAME: usize = 65536 + 14 + 4;
/// Shortest frame written to the TAP: an Ethernet header.
pub const MIN_FRAME: usize = 14;

/// `flags`: the checksum from `csum_start` on is still to be done, into
/// `csum_start + csum_offset`.
pub const HDR_F_NEEDS_CSUM: u8 = 1;
/// `flags` (rx): the checksum was checked.
pub const HDR_F_DATA_VALID: u8 = 2;
/// `gso_type`: not a segment to split.
pub const GSO_NONE: u8 = 0;
/// `gso_type`: TCP/IPv4 segmentation.
pub const GSO_TCPV4: u8 = 1;
/// `gso_type`: TCP/IPv6 segmentation.
pub const GSO_TCPV6: u8 = 4;
/// `gso_type` bit: set ECN (CWR) on the segments.
pub const GSO_ECN: u8 = 0x80;

/// What the driver acked, as the frame code needs it. Before SET_FEATURES: version 1,
/// no offloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated(u64);

impl Default for Negotiated {
    fn default() -> Self {
        Negotiated(VIRTIO_F_VERSION_1)
    }
}

impl Negotiated {
    /// From the acked feature bits.
    pub fn new(acked: u64) -> Self {
        Negotiated(acked)
    }
    /// Whether `feature` (a `VIRTIO_NET_F_*` bit) was acked.
    pub fn has(self, feature: u64) -> bool {
        self.0 & feature == feature
    }
    /// The header size the features imply (virtio 1.2, 5.1.6).
    pub fn hdr_len(self) -> usize {
        if self.has(VIRTIO_F_VERSION_1) || self.has(VIRTIO_NET_F_MRG_RXBUF) {
            NET_HDR_LEN
        } else {
            LEGACY_HDR_LEN
        }
    }
    /// Whether a received frame may span several chains.
    pub fn mergeable(self) -> bool {
        self.has(VIRTIO_NET_F_MRG_RXBUF)
    }
    /// The `TUN_F_*` offloads the TAP may use towards this driver: the GUEST_ ones.
    pub fn tap_offloads(self) -> u32 {
        if !self.has(VIRTIO_NET_F_GUEST_CSUM) {
            return 0;
        }
        let mut f = TUN_F_CSUM;
        for (feature, flag) in [
            (VIRTIO_NET_F_GUEST_TSO4, TUN_F_TSO4),
            (VIRTIO_NET_F_GUEST_TSO6, TUN_F_TSO6),
            (VIRTIO_NET_F_GUEST_ECN, TUN_F_TSO_ECN),
        ] {
            if self.has(feature) {
                f |= flag;
            }
        }
        f
    }
}

/// The fields of a `virtio_net_hdr` (little-endian on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NetHdr {
    /// `HDR_F_*`.
    pub flags: u8,
    /// `GSO_*`.
    pub gso_type: u8,
    /// Length of the headers to copy into each segment.
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where checksumming starts.
    pub csum_start: u16,
    /// Where, from `csum_start`, the checksum goes.
    pub csum_offset: u16,
}

impl NetHdr {
    /// The header at the start of `b` (at least [`LEGACY_HDR_LEN`] bytes).
    pub fn parse(b: &[u8]) -> Option<NetHdr> {
        let u16_at =
            |i: usize| -> Option<u16> { Some(u16::from_le_bytes([*b.get(i)?, *b.get(i + 1)?])) };
        Some(NetHdr {
            flags: *b.first()?,
            gso_type: *b.get(1)?,
            hdr_len: u16_at(2)?,
            gso_size: u16_at(4)?,
            csum_start: u16_at(6)?,
            csum_offset: u16_at(8)?,
        })
    }
}

/// Why a driver's tx header was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum HeaderError {
    /// Flags other than NEEDS_CSUM.
    #[error("tx header flags {0:#x}: only NEEDS_CSUM may be set")]
    Flags(u8),
    /// NEEDS_CSUM without VIRTIO_NET_F_CSUM acked.
    #[error("tx header asks for a checksum, but VIRTIO_NET_F_CSUM was not negotiated")]
    CsumNotNegotiated,
    /// The checksum field lies beyond the frame.
    #[error("tx checksum at {start} + {offset} lies beyond the {frame}-byte frame")]
    CsumOutOfFrame {
        /// `csum_start`.
        start: u16,
        /// `csum_offset`.
        offset: u16,
        /// Frame length.
        frame: usize,
    },
    /// A `gso_type` we do not know or did not offer.
    #[error("tx header gso_type {0:#x} is unknown or was not negotiated")]
    GsoType(u8),
    /// A segment without NEEDS_CSUM, or with a zero segment size.
    #[error("tx segment (gso_type {gso_type:#x}, gso_size {gso_size}) without a checksum to do or a segment size")]
    GsoIncomplete {
        /// `gso_type`.
        gso_type: u8,
        /// `gso_size`.
        gso_size: u16,
    },
    /// `hdr_len` beyond the frame.
    #[error("tx header hdr_len {hdr_len} lies beyond the {frame}-byte frame")]
    HdrLen {
        /// `hdr_len`.
        hdr_len: u16,
        /// Frame length.
        frame: usize,
    },
}

/// Checks a driver's tx header against the frame it came with and the acked features:
/// only what the TAP may be handed passes (the kernel checks again; this keeps a
/// hostile guest's nonsense off it and says what was wrong).
pub fn check_tx_header(h: &NetHdr, frame: usize, neg: Negotiated) -> Result<(), HeaderError> {
    if h.flags & !HDR_F_NEEDS_CSUM != 0 {
        return Err(HeaderError::Flags(h.flags));
    }
    let csum = h.flags & HDR_F_NEEDS_CSUM != 0;
    if csum {
        if !neg.has(VIRTIO_NET_F_CSUM) {
            return Err(HeaderError::CsumNotNegotiated);
        }
        let end = usize::from(h.csum_start) + usize::from(h.csum_offset) + 2;
        if end > frame {
            return Err(HeaderError::CsumOutOfFrame {
                start: h.csum_start,
                offset: h.csum_offset,
                frame,
            });
        }
    }
    let ecn = h.gso_type & GSO_ECN != 0;
    let allowed = match h.gso_type & !GSO_ECN {
        GSO_NONE => !ecn,
        GSO_TCPV4 => neg.has(VIRTIO_NET_F_HOST_TSO4),
        GSO_TCPV6 => neg.has(VIRTIO_NET_F_HOST_TSO6),
        _ => false,
    };
    if !allowed || (ecn && !neg.has(VIRTIO_NET_F_HOST_ECN)) {
        return Err(HeaderError::GsoType(h.gso_type));
    }
    if h.gso_type != GSO_NONE && (!csum || h.gso_size == 0) {
        return Err(HeaderError::GsoIncomplete {
            gso_type: h.gso_type,
            gso_size: h.gso_size,
        });
    }
    if usize::from(h.hdr_len) > frame {
        return Err(HeaderError::HdrLen {
            hdr_len: h.hdr_len,
            frame,
        });
    }
    Ok(())
}

/// Why a chain was not served.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
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
    /// A tx header refused.
    #[error(transparent)]
    Header(#[from] HeaderError),
    /// An rx frame that does not fit the buffers of the chain (which is not too small
    /// for every frame: that one is a [`FrameError::BadChain`]), or, with mergeable
    /// buffers, every buffer of the ring.
    #[error("rx frame of {frame} bytes does not fit {room} writable bytes")]
    NoRoom {
        /// Frame length.
        frame: usize,
        /// Writable bytes in the chain(s).
        room: usize,
    },
    /// An rx frame from the TAP that is not a header and a frame, or whose offloads
    /// the driver did not ack.
    #[error("rx frame of {0} bytes from the TAP dropped: short, or offloads not negotiated")]
    BadRx(usize),
    /// Copying failed midway.
    #[error("copying the frame: {0}")]
    Copy(String),
}

/// Reads one tx chain, header and frame, into `buf` and checks the header. Bounds:
/// the chain's readable bytes must hold a header and an Ethernet header and at most
/// [`MAX_FRAME`] bytes of frame.
pub fn read_tx_frame<T>(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<T>,
    neg: Negotiated,
    buf: &mut Vec<u8>,
) -> Result<(), FrameError>
where
    T: Deref,
    T::Target: GuestMemory + Sized,
{
    let mut r: Reader<'_, ()> = Reader::new(mem, chain).map_err(|_| FrameError::BadChain)?;
    let total = r.available_bytes();
    let hdr_len = neg.hdr_len();
    let frame_len = total
        .checked_sub(hdr_len)
        .filter(|n| *n >= MIN_FRAME)
        .ok_or(FrameError::TooShort(total))?;
    if frame_len > MAX_FRAME {
        return Err(FrameError::TooLarge(frame_len));
    }
    buf.resize(total, 0);
    r.read_exact(buf)
        .map_err(|e| FrameError::Copy(e.to_string()))?;
    let hdr = NetHdr::parse(buf).ok_or(FrameError::TooShort(total))?;
    check_tx_header(&hdr, frame_len, neg)?;
    Ok(())
}

/// Makes the TAP's header in front of an rx frame the driver's: flags cleared when it
/// did not ack GUEST_CSUM, `num_buffers` set (version 1 headers). False when the frame
/// carries an offload the driver did not ack (the TAP was told only the acked ones, so
/// that is a frame from before the driver's features came) or is too short.
pub fn prepare_rx_header(frame: &mut [u8], neg: Negotiated, num_buffers: u16) -> bool {
    let hdr_len = neg.hdr_len();
    if frame.len() < hdr_len + MIN_FRAME {
        return false;
    }
    let Some(h) = NetHdr::parse(frame) else {
        return false;
    };
    let gso_ok = match h.gso_type & !GSO_ECN {
        GSO_NONE => true,
        GSO_TCPV4 => neg.has(VIRTIO_NET_F_GUEST_TSO4),
        GSO_TCPV6 => neg.has(VIRTIO_NET_F_GUEST_TSO6),
        _ => false,
    } && (h.gso_type & GSO_ECN == 0 || neg.has(VIRTIO_NET_F_GUEST_ECN));
    let csum_ok = h.flags & HDR_F_NEEDS_CSUM == 0 || neg.has(VIRTIO_NET_F_GUEST_CSUM);
    if !gso_ok || !csum_ok {
        return false;
    }
    if !neg.has(VIRTIO_NET_F_GUEST_CSUM) {
        frame[0] = 0;
    }
    if hdr_len == NET_HDR_LEN {
        frame[10..12].copy_from_slice(&num_buffers.to_le_bytes());
    }
    true
}

/// Writes `frame` (header included, prepared) into one rx chain; returns the bytes
/// written (the used length). A frame that does not fit is refused before anything is
/// written.
pub fn write_rx_frame<T>(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<T>,
    frame: &[u8],
    hdr_len: usize,
) -> Result<u32, FrameError>
where
    T: Deref,
    T::Target: GuestMemory + Sized,
{
    let mut w: Writer<'_, ()> = Writer::new(mem, chain).map_err(|_| FrameError::BadChain)?;
    let room = w.available_bytes();
    if room < hdr_len + MIN_FRAME {
        // Not a receive buffer at all (e.g. no writable descriptor): it could never hold
        // a frame, so it is returned rather than kept.
        return Err(FrameError::BadChain);
    }
    if frame.len() > room {
        return Err(FrameError::NoRoom {
            frame: frame.len(),
            room,
        });
    }
    w.write_all(frame)
        .map_err(|e| FrameError::Copy(e.to_string()))?;
    u32::try_from(w.bytes_written()).map_err(|e| FrameError::Copy(e.to_string()))
}

/// What one pass over a queue did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pass {
    /// Frames carried.
    pub frames: usize,
    /// Frames or chains dropped (malformed, too large, no room, header refused).
    pub dropped: usize,
    /// Chains returned to the driver (the used ring needs signalling).
    pub used: usize,
    /// rx only: a frame is waiting and the driver offered no buffer for it.
    pub starved: bool,
    /// Why the first dropped frame or chain was dropped.
    pub first_error: Option<FrameError>,
}

impl Pass {
    fn drop_one(&mut self, e: FrameError) {
        self.dropped += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e);
        }
    }
}

/// Serves every available tx chain of `queue`: each well-formed frame goes to `sink`
/// with its header in front (read into `buf`), every chain is returned as used with
/// length 0.
pub fn tx_queue<M>(
    queue: &mut Queue,
    mem: M,
    neg: Negotiated,
    buf: &mut Vec<u8>,
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
        match read_tx_frame(&mem, chain, neg, buf) {
            Ok(()) => {
                sink(buf);
                pass.frames += 1;
            }
            Err(e) => pass.drop_one(e),
        }
        queue.add_used(&*mem, head, 0)?;
        pass.used += 1;
    }
    Ok(pass)
}

/// Delivers frames (header included, as the TAP gives them) into the available rx
/// chains of `queue`. Frames are read into `buf` by `source`, which returns their
/// length or `None` when it has nothing more; `pending` is the length of a frame left
/// in `buf` by an earlier pass that found no buffer, delivered first. When the driver
/// offers no more chains the frame in hand stays pending and `starved` is set.
///
/// One chain per frame: a frame larger than the chain in hand is dropped and the chain
/// kept for the next frame; a malformed chain is returned unused (length 0) and the
/// frame goes to the next chain. With mergeable buffers (MRG_RXBUF acked), a frame
/// takes as many chains as it needs, their count in the header's `num_buffers`; it
/// waits until that many are available, and is dropped only when the whole ring could
/// not hold it.
pub fn rx_queue<M>(
    queue: &mut Queue,
    mem: M,
    neg: Negotiated,
    buf: &mut [u8],
    pending: &mut Option<usize>,
    source: &mut dyn FnMut(&mut [u8]) -> Option<usize>,
) -> Result<Pass, virtio_queue::Error>
where
    M: Deref<Target = GuestMemoryMmap> + Clone,
{
    let mut pass = Pass::default();
    if !queue.ready() {
        pass.starved = pending.is_some();
        return Ok(pass);
    }
    let hdr_len = neg.hdr_len();
    // A chain popped for a frame that turned out not to fit, kept for the next frame.
    let mut held: Option<DescriptorChain<M>> = None;
    while let Some(len) = pending.take().or_else(|| source(buf)) {
        let Some(frame) = buf.get_mut(..len) else {
            pass.drop_one(FrameError::BadRx(len));
            continue;
        };
        if !prepare_rx_header(frame, neg, 1) {
            pass.drop_one(FrameError::BadRx(len));
            continue;
        }
        if neg.mergeable() {
            match rx_merged(queue, &mem, frame, hdr_len, &mut pass)? {
                Merged::Done => {}
                Merged::Starved => {
                    *pending = Some(len);
                    pass.starved = true;
                    break;
                }
            }
            continue;
        }
        let chain = match held.take() {
            Some(c) => c,
            None => match queue.pop_descriptor_chain(mem.clone()) {
                Some(c) => c,
                None => {
                    *pending = Some(len);
                    pass.starved = true;
                    break;
                }
            },
        };
        let head = chain.head_index();
        match write_rx_frame(&mem, chain.clone(), frame, hdr_len) {
            Ok(used) => {
                queue.add_used(&*mem, head, used)?;
                pass.used += 1;
                pass.frames += 1;
            }
            Err(e @ FrameError::NoRoom { .. }) => {
                pass.drop_one(e);
                held = Some(chain);
            }
            Err(e) => {
                queue.add_used(&*mem, head, 0)?;
                pass.used += 1;
                pass.drop_one(e);
                *pending = Some(len);
            }
        }
    }
    if held.is_some() {
        // Give the unused chain back: the next pass pops it again.
        queue.set_next_avail(queue.next_avail().wrapping_sub(1));
    }
    Ok(pass)
}

/// How a mergeable delivery ended.
enum Merged {
    /// Delivered, or dropped (counted in the pass).
    Done,
    /// Not enough chains yet: every chain popped was given back.
    Starved,
}

/// Delivers one prepared frame over as many chains as it needs (MRG_RXBUF).
fn rx_merged<M>(
    queue: &mut Queue,
    mem: &M,
    frame: &mut [u8],
    hdr_len: usize,
    pass: &mut Pass,
) -> Result<Merged, virtio_queue::Error>
where
    M: Deref<Target = GuestMemoryMmap> + Clone,
{
    let mut writers: Vec<(u16, Writer<'_, ()>)> = Vec::new();
    let mut bad: Vec<u16> = Vec::new();
    let mut room = 0usize;
    let ring = usize::from(queue.size());
    while room < frame.len() {
        if writers.len() + bad.len() >= ring {
            // The whole ring cannot hold it: drop it, and give every chain back empty.
            for (head, _) in &writers {
                queue.add_used(&**mem, *head, 0)?;
            }
            for head in &bad {
                queue.add_used(&**mem, *head, 0)?;
            }
            pass.used += writers.len() + bad.len();
            pass.drop_one(FrameError::NoRoom {
                frame: frame.len(),
                room,
            });
            return Ok(Merged::Done);
        }
        let Some(chain) = queue.pop_descriptor_chain(mem.clone()) else {
            let popped = u16::try_from(writers.len() + bad.len()).unwrap_or(u16::MAX);
            queue.set_next_avail(queue.next_avail().wrapping_sub(popped));
            return Ok(Merged::Starved);
        };
        let head = chain.head_index();
        match Writer::<'_, ()>::new(&**mem, chain) {
            // The first buffer must hold the whole header (virtio 1.2, 5.1.6.3.2).
            Ok(w) if w.available_bytes() >= if writers.is_empty() { hdr_len } else { 1 } => {
                room += w.available_bytes();
                writers.push((head, w));
            }
            _ => bad.push(head),
        }
    }
    for head in &bad {
        queue.add_used(&**mem, *head, 0)?;
        pass.used += 1;
        pass.drop_one(FrameError::BadChain);
    }
    let count = u16::try_from(writers.len()).unwrap_or(u16::MAX);
    if hdr_len == NET_HDR_LEN {
        if let Some(n) = frame.get_mut(10..12) {
            n.copy_from_slice(&count.to_le_bytes());
        }
    }
    let mut rest: &[u8] = frame;
    let mut failed = None;
    let mut used = Vec::with_capacity(writers.len());
    for (head, mut w) in writers {
        let n = rest.len().min(w.available_bytes());
        let (now, later) = rest.split_at(n);
        rest = later;
        let len = match w.write_all(now) {
            Ok(()) => u32::try_from(n).unwrap_or(0),
            Err(e) => {
                failed.get_or_insert(FrameError::Copy(e.to_string()));
                0
            }
        };
        used.push((head, len));
    }
    // The driver takes `num_buffers` entries as soon as it sees the first: all of them
    // appear at once (virtio 1.2, 5.1.6.4.2).
    add_used_together(queue, &**mem, &used)?;
    pass.used += used.len();
    match failed {
        None => pass.frames += 1,
        Some(e) => pass.drop_one(e),
    }
    Ok(Merged::Done)
}

/// Puts `entries` (head, length) on the used ring and makes them visible to the driver
/// together, with one store of the used index. (`Queue::add_used` publishes each entry
/// on its own: a driver polling the ring meanwhile, as Linux's NAPI does from another
/// CPU, would find a merged frame's first buffer without the rest and drop the frame.)
///
/// `Queue`'s count of entries added since the last notification check counts only the
/// last entry: decide about notifying with [`used_needs_notification`].
pub fn add_used_together<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    entries: &[(u16, u32)],
) -> Result<(), virtio_queue::Error> {
    let Some((&(last_head, last_len), first)) = entries.split_last() else {
        return Ok(());
    };
    let size = queue.size();
    if entries.iter().any(|&(head, _)| head >= size) {
        // Nothing written, nothing published.
        return Err(virtio_queue::Error::InvalidDescriptorIndex);
    }
    let start = queue.next_used();
    for (i, &(head, len)) in (0u16..).zip(first) {
        // Ring layout: flags (2), idx (2), then 8-byte elements (id u32, len u32).
        let slot = u64::from(start.wrapping_add(i) % size);
        let addr = GuestAddress(queue.used_ring())
            .checked_add(4 + slot * 8)
            .ok_or(virtio_queue::Error::AddressOverflow)?;
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&elem, addr)
            .map_err(virtio_queue::Error::GuestMemory)?;
    }
    let before_last = u16::try_from(first.len()).map_err(|_| virtio_queue::Error::InvalidSize)?;
    queue.set_next_used(start.wrapping_add(before_last));
    // Writes the last entry and then (release) the index past all of them.
    let published = queue.add_used(mem, last_head, last_len);
    if published.is_err() {
        queue.set_next_used(start);
    }
    published
}

/// Whether the driver asked to be notified of the used entries from index `old` up to
/// the queue's next one: always without EVENT_IDX; with it, when its `used_event` lies
/// among them (virtio 1.2, 2.7.10). Counts every entry since `old`, also those that
/// [`add_used_together`] published.
pub fn used_needs_notification<M: GuestMemory>(
    queue: &Queue,
    mem: &M,
    old: u16,
) -> Result<bool, virtio_queue::Error> {
    let new = queue.next_used();
    if new == old {
        return Ok(false);
    }
    if !queue.event_idx_enabled() {
        return Ok(true);
    }
    // The used entries are written before the driver's wish is read.
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    // used_event follows the available ring: flags (2), idx (2), ring (2 per entry).
    let addr = GuestAddress(queue.avail_ring())
        .checked_add(4 + 2 * u64::from(queue.size()))
        .ok_or(virtio_queue::Error::AddressOverflow)?;
    let event: u16 = mem
        .load(addr, std::sync::atomic::Ordering::Acquire)
        .map(u16::from_le)
        .map_err(virtio_queue::Error::GuestMemory)?;
    Ok(new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old))
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;

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

    /// A header and `frame(len, seed)`.
    fn with_hdr(hdr: [u8; NET_HDR_LEN], len: usize, seed: u8) -> Vec<u8> {
        let mut v = hdr.to_vec();
        v.extend(frame(len, seed));
        v
    }

    fn offloads() -> Negotiated {
        Negotiated::new(VIRTIO_F_VERSION_1 | OFFLOAD_FEATURES)
    }

    /// Runs rx_queue over `frames` (popped from the end).
    fn rx(
        q: &mut Queue,
        mem: &GuestMemoryMmap,
        neg: Negotiated,
        pending: &mut Option<usize>,
        buf: &mut [u8],
        frames: &mut Vec<Vec<u8>>,
    ) -> Pass {
        rx_queue(q, mem, neg, buf, pending, &mut |b: &mut [u8]| {
            let f = frames.pop()?;
            b[..f.len()].copy_from_slice(&f);
            Some(f.len())
        })
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn tx_sends_header_and_frame_across_descriptors() {
        let mem = memory();
        let f = with_hdr([0; NET_HDR_LEN], 60, 7);
        mem.write_slice(&f[..32], GuestAddress(0x8000))
            .unwrap_or_else(|e| panic!("{e}"));
        mem.write_slice(&f[32..], GuestAddress(0x9000))
            .unwrap_or_else(|e| panic!("{e}"));
        let mut q = queue(
            &mem,
            &[
                &[(0x8000, 32, 0), (0x9000, 40, 0)],
                &[(0xA000, 5, 0)], // too short: dropped, still returned
            ],
        );
        let mut sent = Vec::new();
        let mut buf = Vec::new();
        let pass = tx_queue(&mut q, &mem, Negotiated::default(), &mut buf, &mut |fr| {
            sent.push(fr.to_vec())
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(sent, vec![f]);
        assert_eq!((pass.frames, pass.dropped, pass.used), (1, 1, 2));
        assert_eq!(pass.first_error, Some(FrameError::TooShort(5)));
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
        let mut buf = Vec::new();
        let pass = tx_queue(&mut q, &mem, offloads(), &mut buf, &mut |_| sent += 1)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((sent, pass.dropped, pass.used), (0, 2, 2));
    }

    fn hdr(flags: u8, gso_type: u8, hdr_len: u16, gso_size: u16, start: u16, off: u16) -> NetHdr {
        NetHdr {
            flags,
            gso_type,
            hdr_len,
            gso_size,
            csum_start: start,
            csum_offset: off,
        }
    }

    #[test]
    fn a_tso_header_passes_and_hostile_ones_are_refused() {
        let all = offloads();
        let none = Negotiated::default();
        // A TCP/IPv4 segment as Linux sends it: checksum from the TCP header on.
        let tso = hdr(HDR_F_NEEDS_CSUM, GSO_TCPV4, 66, 1448, 34, 16);
        assert_eq!(check_tx_header(&tso, 65000, all), Ok(()));
        assert_eq!(
            check_tx_header(&hdr(0, GSO_TCPV6 | GSO_ECN, 0, 0, 0, 0), 100, all),
            Err(HeaderError::GsoIncomplete {
                gso_type: GSO_TCPV6 | GSO_ECN,
                gso_size: 0
            })
        );
        assert_eq!(
            check_tx_header(&tso, 65000, none),
            Err(HeaderError::CsumNotNegotiated)
        );
        let only_csum = Negotiated::new(VIRTIO_F_VERSION_1 | VIRTIO_NET_F_CSUM);
        assert_eq!(
            check_tx_header(&tso, 65000, only_csum),
            Err(HeaderError::GsoType(GSO_TCPV4))
        );
        for bad_type in [2, 3, 5, 6, 0x7f, GSO_ECN] {
            assert_eq!(
                check_tx_header(&hdr(HDR_F_NEEDS_CSUM, bad_type, 0, 1, 0, 0), 100, all),
                Err(HeaderError::GsoType(bad_type)),
                "{bad_type}"
            );
        }
        assert_eq!(
            check_tx_header(&hdr(HDR_F_DATA_VALID, 0, 0, 0, 0, 0), 100, all),
            Err(HeaderError::Flags(HDR_F_DATA_VALID))
        );
        assert_eq!(
            check_tx_header(&hdr(HDR_F_NEEDS_CSUM, 0, 0, 0, 90, 9), 100, all),
            Err(HeaderError::CsumOutOfFrame {
                start: 90,
                offset: 9,
                frame: 100
            })
        );
        assert_eq!(
            check_tx_header(
                &hdr(HDR_F_NEEDS_CSUM, 0, 0, 0, u16::MAX, u16::MAX),
                100,
                all
            ),
            Err(HeaderError::CsumOutOfFrame {
                start: u16::MAX,
                offset: u16::MAX,
                frame: 100
            })
        );
        assert_eq!(
            check_tx_header(
                &hdr(HDR_F_NEEDS_CSUM, GSO_TCPV4, 101, 1448, 34, 16),
                100,
                all
            ),
            Err(HeaderError::HdrLen {
                hdr_len: 101,
                frame: 100
            })
        );
    }

    #[test]
    fn tx_drops_a_refused_header_and_returns_the_chain() {
        let mem = memory();
        let mut bad = with_hdr([0; NET_HDR_LEN], 60, 1);
        bad[1] = GSO_TCPV4; // segmentation not negotiated
        mem.write_slice(&bad, GuestAddress(0x8000))
            .unwrap_or_else(|e| panic!("{e}"));
        let mut q = queue(&mem, &[&[(0x8000, bad.len() as u32, 0)]]);
        let mut sent = 0;
        let mut buf = Vec::new();
        let pass = tx_queue(&mut q, &mem, Negotiated::default(), &mut buf, &mut |_| {
            sent += 1
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((sent, pass.dropped, pass.used), (0, 1, 1));
        assert_eq!(
            pass.first_error,
            Some(FrameError::Header(HeaderError::GsoType(GSO_TCPV4)))
        );
    }

    #[test]
    fn tap_offloads_follow_the_guest_features() {
        assert_eq!(Negotiated::default().tap_offloads(), 0);
        assert_eq!(
            offloads().tap_offloads(),
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
        );
        // Segmentation without checksums means nothing to the TAP.
        assert_eq!(Negotiated::new(VIRTIO_NET_F_GUEST_TSO4).tap_offloads(), 0);
        assert_eq!(Negotiated::new(0).hdr_len(), LEGACY_HDR_LEN);
        assert_eq!(
            Negotiated::new(VIRTIO_NET_F_MRG_RXBUF).hdr_len(),
            NET_HDR_LEN
        );
        assert_eq!(Negotiated::default().hdr_len(), NET_HDR_LEN);
    }

    #[test]
    fn rx_passes_the_tap_header_through_with_one_buffer() {
        let mem = memory();
        let mut q = queue(&mem, &[&[(0x8000, 8, F_WRITE), (0x9000, 200, F_WRITE)]]);
        // A partial checksum from the TAP, as it sends them with TUN_F_CSUM.
        let mut h = [0u8; NET_HDR_LEN];
        h[0] = HDR_F_NEEDS_CSUM;
        h[6..8].copy_from_slice(&34u16.to_le_bytes());
        h[8..10].copy_from_slice(&16u16.to_le_bytes());
        let f = with_hdr(h, 100, 3);
        let mut frames = vec![f.clone()];
        let mut pending = None;
        let mut buf = vec![0u8; 4096];
        let pass = rx(
            &mut q,
            &mem,
            offloads(),
            &mut pending,
            &mut buf,
            &mut frames,
        );
        assert_eq!((pass.frames, pass.used, pass.starved), (1, 1, false));
        let mut got = vec![0u8; f.len()];
        mem.read_slice(&mut got[..8], GuestAddress(0x8000))
            .unwrap_or_else(|e| panic!("{e}"));
        mem.read_slice(&mut got[8..], GuestAddress(0x9000))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got[..10], h[..10], "header unchanged");
        assert_eq!(got[10..12], 1u16.to_le_bytes(), "num_buffers");
        assert_eq!(got[NET_HDR_LEN..], f[NET_HDR_LEN..]);
    }

    #[test]
    fn rx_without_guest_csum_clears_flags_and_refuses_segments() {
        let mem = memory();
        let mut q = queue(&mem, &[&[(0x8000, 200, F_WRITE)]]);
        let mut valid = [0u8; NET_HDR_LEN];
        valid[0] = HDR_F_DATA_VALID;
        let mut seg = [0u8; NET_HDR_LEN];
        seg[0] = HDR_F_NEEDS_CSUM;
        seg[1] = GSO_TCPV4;
        // Popped from the end: the segment first (dropped), then the valid one.
        let mut frames = vec![with_hdr(valid, 50, 0), with_hdr(seg, 100, 0)];
        let mut pending = None;
        let mut buf = vec![0u8; 4096];
        let pass = rx(
            &mut q,
            &mem,
            Negotiated::default(),
            &mut pending,
            &mut buf,
            &mut frames,
        );
        assert_eq!((pass.frames, pass.dropped), (1, 1));
        let mut got = [0u8; NET_HDR_LEN];
        mem.read_slice(&mut got, GuestAddress(0x8000))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got[0], 0, "flags cleared");
    }

    #[test]
    fn rx_drops_a_frame_too_big_and_keeps_the_chain_for_the_next() {
        let mem = memory();
        let mut q = queue(&mem, &[&[(0x8000, 100, F_WRITE)]]);
        // Popped in reverse: the big one comes first, then the small one, then one
        // that finds no buffer.
        let z = [0u8; NET_HDR_LEN];
        let mut frames = vec![with_hdr(z, 30, 9), with_hdr(z, 50, 1), with_hdr(z, 500, 0)];
        let mut pending = None;
        let mut buf = vec![0u8; 4096];
        let pass = rx(
            &mut q,
            &mem,
            Negotiated::default(),
            &mut pending,
            &mut buf,
            &mut frames,
        );
        assert_eq!((pass.frames, pass.dropped, pass.used), (1, 1, 1));
        assert!(pass.starved);
        assert_eq!(pending, Some(NET_HDR_LEN + 30), "waits for the next buffer");
        assert_eq!(buf[NET_HDR_LEN..NET_HDR_LEN + 30], frame(30, 9)[..]);
        let mut got = vec![0u8; 50];
        mem.read_slice(&mut got, GuestAddress(0x8000 + NET_HDR_LEN as u64))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got, frame(50, 1));
    }

    #[test]
    fn rx_gives_back_an_unused_chain_when_the_source_runs_dry() {
        let mem = memory();
        let mut q = queue(&mem, &[&[(0x8000, 100, F_WRITE)]]);
        let z = [0u8; NET_HDR_LEN];
        let mut frames = vec![with_hdr(z, 500, 0)];
        let mut pending = None;
        let mut buf = vec![0u8; 4096];
        let neg = Negotiated::default();
        let pass = rx(&mut q, &mem, neg, &mut pending, &mut buf, &mut frames);
        assert_eq!((pass.used, pass.dropped, pass.starved), (0, 1, false));
        assert_eq!(q.next_avail(), 0, "the chain is still available");
        let mut frames = vec![with_hdr(z, 20, 0)];
        let pass = rx(&mut q, &mem, neg, &mut pending, &mut buf, &mut frames);
        assert_eq!((pass.frames, pass.used), (1, 1));
    }

    #[test]
    fn rx_into_a_read_only_chain_returns_it_empty_and_keeps_the_frame() {
        let mem = memory();
        let mut q = queue(&mem, &[&[(0x8000, 100, 0)]]);
        let mut frames = vec![with_hdr([0; NET_HDR_LEN], 20, 0)];
        let mut pending = None;
        let mut buf = vec![0u8; 4096];
        let pass = rx(
            &mut q,
            &mem,
            Negotiated::default(),
            &mut pending,
            &mut buf,
            &mut frames,
        );
        assert_eq!((pass.frames, pass.used, pass.dropped), (0, 1, 1));
        assert!(pending.is_some() && pass.starved);
    }

    #[test]
    fn rx_merges_a_large_frame_over_several_buffers() {
        let mem = memory();
        // Four 1500-byte buffers, as a Linux guest posts them with MRG_RXBUF.
        let mut q = queue(
            &mem,
            &[
                &[(0x10000, 1500, F_WRITE)],
                &[(0x20000, 1500, F_WRITE)],
                &[(0x30000, 1500, F_WRITE)],
                &[(0x40000, 1500, F_WRITE)],
            ],
        );
        let f = with_hdr([0; NET_HDR_LEN], 4000 - NET_HDR_LEN, 5);
        let small = with_hdr([0; NET_HDR_LEN], 60, 6);
        let mut frames = vec![small.clone(), f.clone()];
        let mut pending = None;
        let mut buf = vec![0u8; MAX_FRAME + NET_HDR_LEN];
        let pass = rx(
            &mut q,
            &mem,
            offloads(),
            &mut pending,
            &mut buf,
            &mut frames,
        );
        assert_eq!((pass.frames, pass.used, pass.dropped), (2, 4, 0));
        assert_eq!(used_idx(&q, &mem), 4);
        assert_eq!(
            [0, 1, 2, 3].map(|s| used_entry(&q, &mem, s)),
            [(0, 1500), (1, 1500), (2, 1000), (3, small.len() as u32)]
        );
        let mut got = vec![0u8; 4500];
        for (i, a) in [0x10000u64, 0x20000, 0x30000].iter().enumerate() {
            mem.read_slice(&mut got[i * 1500..(i + 1) * 1500], GuestAddress(*a))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        assert_eq!(got[10..12], 3u16.to_le_bytes(), "num_buffers");
        assert_eq!(got[NET_HDR_LEN..4000], f[NET_HDR_LEN..]);
        let mut got = vec![0u8; small.len()];
        mem.read_slice(&mut got, GuestAddress(0x40000))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got[10..12], 1u16.to_le_bytes());
        assert_eq!(got[NET_HDR_LEN..], small[NET_HDR_LEN..]);
    }

    fn used_idx(q: &Queue, mem: &GuestMemoryMmap) -> u16 {
        q.used_idx(mem, std::sync::atomic::Ordering::Acquire)
            .unwrap_or_else(|e| panic!("{e}"))
            .0
    }

    fn used_entry(q: &Queue, mem: &GuestMemoryMmap, slot: u64) -> (u32, u32) {
        let mut e = [0u8; 8];
        mem.read_slice(&mut e, GuestAddress(q.used_ring() + 4 + 8 * slot))
            .unwrap_or_else(|e| panic!("{e}"));
        let word = |b: &[u8]| u32::from_le_bytes(b.try_into().unwrap_or([0; 4]));
        (word(&e[..4]), word(&e[4..]))
    }

    #[test]
    fn entries_used_together_appear_together_or_not_at_all() {
        let mem = memory();
        let mut q = queue(&mem, &[&[(0x10000, 1500, F_WRITE)]]);
        // Across the end of the 16-entry ring.
        q.set_next_used(14);
        add_used_together(&mut q, &mem, &[(3, 1500), (4, 1500), (5, 100)])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            used_idx(&q, &mem),
            17,
            "the index moves once, past all three"
        );
        assert_eq!(q.next_used(), 17);
        assert_eq!(used_entry(&q, &mem, 14), (3, 1500));
        assert_eq!(used_entry(&q, &mem, 15), (4, 1500));
        assert_eq!(used_entry(&q, &mem, 0), (5, 100));
        // A bad head anywhere: nothing is published, the queue stays where it was (a
        // driver polling in between would otherwise see the first buffers on their own).
        for bad in [[(6, 1), (7, 1), (16, 1)], [(16, 1), (6, 1), (7, 1)]] {
            assert!(add_used_together(&mut q, &mem, &bad).is_err());
            assert_eq!((used_idx(&q, &mem), q.next_used()), (17, 17));
        }
        add_used_together(&mut q, &mem, &[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(used_idx(&q, &mem), 17);
    }

    #[test]
    fn the_notification_counts_every_entry_published_together() {
        let mem = memory();
        let mut q = queue(&mem, &[&[(0x10000, 1500, F_WRITE)]]);
        let used_event = |mem: &GuestMemoryMmap, q: &Queue, v: u16| {
            mem.write_obj(v.to_le(), GuestAddress(q.avail_ring() + 4 + 2 * 16))
                .unwrap_or_else(|e| panic!("{e}"));
        };
        assert!(
            !used_needs_notification(&q, &mem, 0).unwrap_or(true),
            "nothing new"
        );
        add_used_together(&mut q, &mem, &[(0, 1), (1, 1), (2, 1)])
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            used_needs_notification(&q, &mem, 0).unwrap_or(false),
            "no EVENT_IDX"
        );
        q.set_event_idx(true);
        // The driver wants to hear when entry 0 (the first of the three) is used:
        // Queue's own check, counting only the last entry, would stay silent.
        used_event(&mem, &q, 0);
        assert!(used_needs_notification(&q, &mem, 0).unwrap_or(false));
        used_event(&mem, &q, 2);
        assert!(used_needs_notification(&q, &mem, 0).unwrap_or(false));
        used_event(&mem, &q, 3);
        assert!(
            !used_needs_notification(&q, &mem, 0).unwrap_or(true),
            "not yet"
        );
        used_event(&mem, &q, 0);
        assert!(
            !q.needs_notification(&mem).unwrap_or(true),
            "Queue's own check counts only the last entry"
        );
        // Two more after a check at 3: entry 1 was told already, 3 is new.
        add_used_together(&mut q, &mem, &[(3, 1), (4, 1)]).unwrap_or_else(|e| panic!("{e}"));
        used_event(&mem, &q, 1);
        assert!(!used_needs_notification(&q, &mem, 3).unwrap_or(true));
        used_event(&mem, &q, 3);
        assert!(used_needs_notification(&q, &mem, 3).unwrap_or(false));
    }

    #[test]
    fn rx_merged_waits_for_enough_buffers_then_drops_what_the_ring_cannot_hold() {
        let mem = memory();
        let mut q = queue(
            &mem,
            &[&[(0x10000, 1500, F_WRITE)], &[(0x20000, 1500, F_WRITE)]],
        );
        let mut frames = vec![with_hdr([0; NET_HDR_LEN], 3500, 0)];
        let mut pending = None;
        let mut buf = vec![0u8; MAX_FRAME + NET_HDR_LEN];
        let pass = rx(
            &mut q,
            &mem,
            offloads(),
            &mut pending,
            &mut buf,
            &mut frames,
        );
        assert!(pass.starved && pending.is_some());
        assert_eq!(
            (pass.used, q.next_avail()),
            (0, 0),
            "both chains given back"
        );
        // A ring of 16 one-byte buffers can never hold it.
        let descs: Vec<[(u64, u32, u16); 1]> = (0..16)
            .map(|i| [(0x10000 + i * 0x100, 1, F_WRITE)])
            .collect();
        let chains: Vec<&[(u64, u32, u16)]> = descs.iter().map(|d| &d[..]).collect();
        let mut q = queue(&mem, &chains);
        let pass = rx(
            &mut q,
            &mem,
            offloads(),
            &mut pending,
            &mut buf,
            &mut frames,
        );
        assert_eq!((pass.frames, pass.dropped, pass.starved), (0, 1, false));
        assert!(pending.is_none());
    }
}
