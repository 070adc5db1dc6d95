//! vhost-user virtio-vsock, with the host side of every connection inside the backend.
//!
//! The guest (CID from `--cid`) can reach two services on the host (CID 2):
//! - [`SECRETS_PORT`]: the first connection from a privileged guest port (at most
//!   [`LAST_PRIVILEGED_PORT`]: only root in the guest can bind one) gets the secrets the
//!   backend was given before it jailed itself, one `NAME=HEX\n` line each; then the
//!   backend shuts its side down (EOF) and forgets them. Guest init makes that
//!   connection before any boot step or service runs; every other connection (a
//!   service trying its luck, or init after a reboot) is reset and logged on the host.
//!   See docs/security.md.
//! - [`ECHO_PORT`]: every byte the guest sends comes back (for round-trip tests).
//!
//! Any other port, or a packet for a connection that does not exist, gets RST. Every
//! header and length the guest writes is checked ([`Header::parse`], [`Host::receive`]);
//! credit (`buf_alloc`/`fwd_cnt`) is honoured both ways.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read, Write};
use std::ops::Deref;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestAddressSpace;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;

use super::rng::VHOST_USER_F_PROTOCOL_FEATURES;
use super::{drain, Memory};
use crate::virtio::VIRTIO_F_VERSION_1;

/// The host's CID.
pub const HOST_CID: u64 = 2;
/// The port serving secrets.
pub const SECRETS_PORT: u32 = 1025;
/// The port echoing what it receives.
pub const ECHO_PORT: u32 = 1026;
/// Guest ports up to this one can be bound only with `CAP_NET_BIND_SERVICE` (Linux's
/// vsock rule), i.e. by root in the guest; guest init fetches the secrets from one.
pub const LAST_PRIVILEGED_PORT: u32 = 1023;

/// Size of a virtio-vsock packet header.
pub const HEADER_LEN: usize = 44;
/// Largest payload accepted from or sent to the guest in one packet.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// What each host-side connection can buffer (announced as `buf_alloc`).
const BUF_ALLOC: u32 = 64 * 1024;
/// Most connections open at once.
const MAX_CONNECTIONS: usize = 64;
/// Most control packets (RST, RESPONSE, CREDIT_UPDATE…) waiting for rx buffers.
const MAX_CONTROL: usize = 1024;

const TYPE_STREAM: u16 = 1;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
/// SHUTDOWN flag: the sender will send no more.
const SHUTDOWN_SEND: u32 = 2;

const RX: usize = 0;
const TX: usize = 1;

/// The syscalls virtio-vsock needs beyond every backend's: none (no host sockets).
pub const VSOCK_SYSCALLS: &[i64] = &[];

/// What was wrong with a packet from the guest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VsockError {
    /// Shorter than a header.
    #[error("packet of {0} bytes is shorter than the {HEADER_LEN}-byte header")]
    Short(usize),
    /// The header's length disagrees with what follows it.
    #[error("header says {said} payload bytes, the chain holds {got}")]
    Length {
        /// From the header.
        said: u32,
        /// In the chain.
        got: usize,
    },
    /// Payload over [`MAX_PAYLOAD`].
    #[error("payload of {0} bytes is over the {MAX_PAYLOAD}-byte limit")]
    TooLong(u32),
    /// Secret names must be plain file names.
    #[error("secret name `{0}` is not a plain file name (letters, digits, `_`, `-`, `.`)")]
    BadName(String),
}

/// A virtio-vsock packet header (all fields little-endian on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type (1 = stream).
    pub kind: u16,
    /// Operation.
    pub op: u16,
    /// Operation flags.
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed.
    pub fwd_cnt: u32,
}

fn le<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(s) = b.get(at..at + N) {
        out.copy_from_slice(s);
    }
    out
}

impl Header {
    /// Parses the first [`HEADER_LEN`] bytes of `b`.
    pub fn parse(b: &[u8]) -> Result<Header, VsockError> {
        if b.len() < HEADER_LEN {
            return Err(VsockError::Short(b.len()));
        }
        Ok(Header {
            src_cid: u64::from_le_bytes(le(b, 0)),
            dst_cid: u64::from_le_bytes(le(b, 8)),
            src_port: u32::from_le_bytes(le(b, 16)),
            dst_port: u32::from_le_bytes(le(b, 20)),
            len: u32::from_le_bytes(le(b, 24)),
            kind: u16::from_le_bytes(le(b, 28)),
            op: u16::from_le_bytes(le(b, 30)),
            flags: u32::from_le_bytes(le(b, 32)),
            buf_alloc: u32::from_le_bytes(le(b, 36)),
            fwd_cnt: u32::from_le_bytes(le(b, 40)),
        })
    }

    /// The wire form.
    pub fn bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Checks a secret name: what guest init will use as a file name.
pub fn check_secret_name(name: &str) -> Result<(), VsockError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(VsockError::BadName(name.to_string()))
    }
}

/// The secrets payload: `NAME=HEX\n` per secret.
pub fn encode_secrets(secrets: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in secrets {
        out.extend_from_slice(name.as_bytes());
        out.push(b'=');
        for b in value {
            out.extend_from_slice(format!("{b:02x}").as_bytes());
        }
        out.push(b'\n');
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Service {
    Secrets,
    Echo,
}

#[derive(Debug)]
struct Conn {
    service: Service,
    /// The guest's buffer size and what it has consumed of what we sent.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes we have sent on this connection (wrapping, like the counters).
    tx_cnt: u32,
    /// Bytes we have consumed of what the guest sent (our `fwd_cnt`).
    fwd_cnt: u32,
    /// Data waiting to go to the guest.
    out: VecDeque<u8>,
    /// Send SHUTDOWN once `out` is empty.
    close_after: bool,
    shutdown_sent: bool,
}

impl Conn {
    fn peer_free(&self) -> usize {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight) as usize
    }
}

/// The secrets payload, served once.
enum Secrets {
    /// Not asked for yet.
    Waiting(Vec<u8>),
    /// Handed to the first connection (guest port): never again.
    Served(u32),
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // Never the values, not even in a debug log.
            Secrets::Waiting(p) => write!(f, "Waiting({} bytes)", p.len()),
            Secrets::Served(port) => write!(f, "Served(to guest port {port})"),
        }
    }
}

/// The host side of every connection: a state machine fed with packets the guest sent
/// and asked for packets to give it. Knows nothing of guest memory (fuzzed as is).
#[derive(Debug)]
pub struct Host {
    guest_cid: u64,
    secrets: Secrets,
    /// Keyed by (guest port, host port).
    conns: BTreeMap<(u32, u32), Conn>,
    control: VecDeque<Header>,
}

impl Host {
    /// A host side for a guest with `guest_cid`, serving `secrets`.
    pub fn new(guest_cid: u64, secrets: &[(String, Vec<u8>)]) -> Host {
        Host {
            guest_cid,
            secrets: Secrets::Waiting(encode_secrets(secrets)),
            conns: BTreeMap::new(),
            control: VecDeque::new(),
        }
    }

    fn reply(&self, to: &Header, op: u16) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: to.dst_port,
            dst_port: to.src_port,
            len: 0,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: 0,
        }
    }

    fn push_control(&mut self, h: Header) {
        if self.control.len() < MAX_CONTROL {
            self.control.push_back(h);
        } else {
            tracing::debug!("vsock: control queue full; dropping {h:?}");
        }
    }

    fn rst(&mut self, to: &Header) {
        if to.op != OP_RST {
            let r = self.reply(to, OP_RST);
            self.push_control(r);
        }
    }

    /// Handles one packet from the guest (header followed by payload).
    pub fn receive(&mut self, packet: &[u8]) -> Result<(), VsockError> {
        let h = Header::parse(packet)?;
        let payload = &packet[HEADER_LEN..];
        if h.len as usize > MAX_PAYLOAD {
            return Err(VsockError::TooLong(h.len));
        }
        if payload.len() < h.len as usize {
            return Err(VsockError::Length {
                said: h.len,
                got: payload.len(),
            });
        }
        let payload = &payload[..h.len as usize];
        if h.src_cid != self.guest_cid || h.dst_cid != HOST_CID {
            // Spoofed or misdirected: nobody to answer to.
            tracing::debug!(
                "vsock: dropping a packet from cid {} to cid {}",
                h.src_cid,
                h.dst_cid
            );
            return Ok(());
        }
        if h.kind != TYPE_STREAM {
            self.rst(&h);
            return Ok(());
        }
        let key = (h.src_port, h.dst_port);
        if h.op == OP_REQUEST {
            let service = match h.dst_port {
                SECRETS_PORT => Service::Secrets,
                ECHO_PORT => Service::Echo,
                _ => {
                    self.rst(&h);
                    return Ok(());
                }
            };
            if self.conns.contains_key(&key) || self.conns.len() >= MAX_CONNECTIONS {
                self.rst(&h);
                return Ok(());
            }
            if service == Service::Secrets && h.src_port > LAST_PRIVILEGED_PORT {
                tracing::warn!(
                    "vsock: refused a connection from guest port {} to the secrets port: not a privileged port (guest init connects from one); something in the guest that is not root tried",
                    h.src_port
                );
                self.rst(&h);
                return Ok(());
            }
            if let (Service::Secrets, Secrets::Served(first)) = (service, &self.secrets) {
                tracing::warn!(
                    "vsock: refused a connection from guest port {} to the secrets port: the secrets were handed out once this boot (to guest init, port {first}); something in the guest asked again",
                    h.src_port
                );
                self.rst(&h);
                return Ok(());
            }
            let mut conn = Conn {
                service,
                peer_buf_alloc: h.buf_alloc,
                peer_fwd_cnt: h.fwd_cnt,
                tx_cnt: 0,
                fwd_cnt: 0,
                out: VecDeque::new(),
                close_after: false,
                shutdown_sent: false,
            };
            if service == Service::Secrets {
                let served = Secrets::Served(h.src_port);
                if let Secrets::Waiting(mut payload) = std::mem::replace(&mut self.secrets, served)
                {
                    conn.out.extend(payload.iter().copied());
                    // Only the connection's buffer holds them now.
                    payload.fill(0);
                }
                conn.close_after = true;
                tracing::info!(
                    "vsock: secrets handed to guest port {} (the first connection); the port now refuses every other",
                    h.src_port
                );
            }
            self.conns.insert(key, conn);
            let r = self.reply(&h, OP_RESPONSE);
            self.push_control(r);
            return Ok(());
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            self.rst(&h);
            return Ok(());
        };
        conn.peer_buf_alloc = h.buf_alloc;
        conn.peer_fwd_cnt = h.fwd_cnt;
        match h.op {
            OP_RW => {
                if conn.out.len() + payload.len() > BUF_ALLOC as usize {
                    // The guest sent more than the credit we gave it.
                    self.conns.remove(&key);
                    self.rst(&h);
                    return Ok(());
                }
                match conn.service {
                    Service::Echo => conn.out.extend(payload.iter().copied()),
                    Service::Secrets => {
                        conn.fwd_cnt = conn.fwd_cnt.wrapping_add(payload.len() as u32);
                    }
                }
            }
            OP_CREDIT_REQUEST => {
                let fwd_cnt = conn.fwd_cnt;
                let mut r = self.reply(&h, OP_CREDIT_UPDATE);
                r.fwd_cnt = fwd_cnt;
                self.push_control(r);
            }
            OP_CREDIT_UPDATE | OP_RESPONSE => {}
            OP_SHUTDOWN => {
                // We never keep a half-closed connection open: reset and forget it.
                self.conns.remove(&key);
                self.rst(&h);
            }
            OP_RST => {
                self.conns.remove(&key);
            }
            _ => {
                self.conns.remove(&key);
                self.rst(&h);
            }
        }
        Ok(())
    }

    /// Whether [`Host::next`] has something to send.
    pub fn has_output(&self) -> bool {
        !self.control.is_empty()
            || self.conns.values().any(|c| {
                (!c.out.is_empty() && c.peer_free() > 0)
                    || (c.out.is_empty() && c.close_after && !c.shutdown_sent)
            })
    }

    /// The next packet for the guest, header and payload, fitting in `room` bytes
    /// (at least a header's worth), or None.
    pub fn next(&mut self, room: usize) -> Option<Vec<u8>> {
        if room < HEADER_LEN {
            return None;
        }
        if let Some(h) = self.control.pop_front() {
            return Some(h.bytes().to_vec());
        }
        let guest_cid = self.guest_cid;
        for ((gport, hport), c) in self.conns.iter_mut() {
            let base = Header {
                src_cid: HOST_CID,
                dst_cid: guest_cid,
                src_port: *hport,
                dst_port: *gport,
                len: 0,
                kind: TYPE_STREAM,
                op: OP_RW,
                flags: 0,
                buf_alloc: BUF_ALLOC,
                fwd_cnt: c.fwd_cnt,
            };
            if !c.out.is_empty() && c.peer_free() > 0 {
                let n = c
                    .out
                    .len()
                    .min(c.peer_free())
                    .min(room - HEADER_LEN)
                    .min(MAX_PAYLOAD);
                if n == 0 {
                    continue;
                }
                let data: Vec<u8> = c.out.drain(..n).collect();
                c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
                if c.service == Service::Echo {
                    // Echoed bytes leave our buffer: consumed.
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
                }
                let h = Header {
                    len: n as u32,
                    fwd_cnt: c.fwd_cnt,
                    ..base
                };
                let mut p = h.bytes().to_vec();
                p.extend_from_slice(&data);
                return Some(p);
            }
            if c.out.is_empty() && c.close_after && !c.shutdown_sent {
                c.shutdown_sent = true;
                let h = Header {
                    op: OP_SHUTDOWN,
                    flags: SHUTDOWN_SEND,
                    ..base
                };
                return Some(h.bytes().to_vec());
            }
        }
        None
    }
}

/// The vsock backend.
#[derive(Debug)]
pub struct VsockBackend {
    guest_cid: u64,
    host: Host,
    mem: Memory,
}

impl VsockBackend {
    /// A device for a guest with `guest_cid`, serving `secrets` on [`SECRETS_PORT`].
    pub fn new(guest_cid: u64, secrets: &[(String, Vec<u8>)]) -> Result<Self, VsockError> {
        for (name, _) in secrets {
            check_secret_name(name)?;
        }
        Ok(VsockBackend {
            guest_cid,
            host: Host::new(guest_cid, secrets),
            mem: Memory::new(vm_memory::GuestMemoryMmap::new()),
        })
    }

    /// Reads every packet the guest queued on tx.
    fn process_tx(&mut self, vring: &VringRwLock) -> io::Result<()> {
        let mem = self.mem.clone();
        let host = &mut self.host;
        drain(vring, &mem, |chain| {
            receive_chain(host, &mem.memory(), chain);
            0
        })
    }

    /// Fills rx buffers with whatever the host side has to send.
    fn process_rx(&mut self, vring: &VringRwLock) -> io::Result<()> {
        let mem = self.mem.clone();
        let used = {
            let mut state = vring.get_mut();
            rx_queue(&mut self.host, state.get_queue_mut(), mem.memory())
                .map_err(|e| io::Error::other(e.to_string()))?
        };
        if used > 0 {
            vring.signal_used_queue()?;
        }
        Ok(())
    }
}

/// Reads one tx chain (header and payload, readable descriptors only) and hands the
/// packet to `host`. Malformed chains are dropped.
fn receive_chain<M>(host: &mut Host, mem: &GuestMemoryMmap, chain: DescriptorChain<M>)
where
    M: Deref<Target = GuestMemoryMmap>,
{
    let Ok(mut r) = chain.reader(mem) else {
        tracing::debug!("vsock: unreadable tx chain dropped");
        return;
    };
    let len = r.available_bytes().min(HEADER_LEN + MAX_PAYLOAD);
    let mut buf = vec![0u8; len];
    if r.read_exact(&mut buf).is_err() {
        return;
    }
    if let Err(e) = host.receive(&buf) {
        tracing::debug!("vsock: bad packet from the guest: {e}");
    }
}

/// Serves every chain on the tx `queue` (as the backend does, without notifications).
/// Returns how many chains were used.
pub fn tx_queue<M>(host: &mut Host, queue: &mut Queue, mem: M) -> Result<usize, virtio_queue::Error>
where
    M: Deref<Target = GuestMemoryMmap> + Clone,
{
    let mut used = 0;
    if !queue.ready() {
        return Ok(0);
    }
    while let Some(chain) = queue.pop_descriptor_chain(mem.clone()) {
        let head = chain.head_index();
        receive_chain(host, &mem, chain);
        queue.add_used(&*mem, head, 0)?;
        used += 1;
    }
    Ok(used)
}

/// Fills rx chains of `queue` with what `host` has to send. Returns how many chains
/// were used.
pub fn rx_queue<M>(host: &mut Host, queue: &mut Queue, mem: M) -> Result<usize, virtio_queue::Error>
where
    M: Deref<Target = GuestMemoryMmap> + Clone,
{
    let mut used = 0;
    if !queue.ready() {
        return Ok(0);
    }
    while host.has_output() {
        let Some(chain) = queue.pop_descriptor_chain(mem.clone()) else {
            break;
        };
        let head = chain.head_index();
        let written = match chain.writer(&mem) {
            Ok(mut w) => match host.next(w.available_bytes()) {
                Some(p) if w.write_all(&p).is_ok() => p.len() as u32,
                _ => 0,
            },
            Err(_) => 0,
        };
        queue.add_used(&*mem, head, written)?;
        used += 1;
    }
    Ok(used)
}

impl VhostUserBackendMut for VsockBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        3
    }
    fn max_queue_size(&self) -> usize {
        1024
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES | super::RING_FEATURES
    }
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
    }
    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        super::config_window(&self.guest_cid.to_le_bytes(), offset, size)
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
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        let (Some(rx), Some(tx)) = (vrings.get(RX), vrings.get(TX)) else {
            return Err(io::Error::other("vsock: missing queues"));
        };
        match device_event {
            0 => {}
            1 => self.process_tx(tx)?,
            // The event queue: we send no events (no transport reset).
            2 => return Ok(()),
            n => return Err(io::Error::other(format!("event for unknown queue {n}"))),
        }
        self.process_rx(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: u64 = 3;

    fn pkt(op: u16, src_port: u32, dst_port: u32, payload: &[u8]) -> Vec<u8> {
        let h = Header {
            src_cid: GUEST,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len: payload.len() as u32,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 0,
        };
        let mut p = h.bytes().to_vec();
        p.extend_from_slice(payload);
        p
    }

    fn all_out(host: &mut Host) -> Vec<(Header, Vec<u8>)> {
        let mut v = vec![];
        while let Some(p) = host.next(HEADER_LEN + 8) {
            let h = Header::parse(&p).unwrap_or_default();
            v.push((h, p[HEADER_LEN..].to_vec()));
        }
        v
    }

    #[test]
    fn secrets_are_sent_then_shut_down() {
        let mut host = Host::new(GUEST, &[("db".into(), b"pw".to_vec())]);
        assert_eq!(
            host.receive(&pkt(OP_REQUEST, 1023, SECRETS_PORT, &[])),
            Ok(())
        );
        let out = all_out(&mut host);
        assert_eq!(out[0].0.op, OP_RESPONSE);
        assert_eq!(out[0].0.dst_port, 1023);
        let data: Vec<u8> = out
            .iter()
            .filter(|(h, _)| h.op == OP_RW)
            .flat_map(|(_, d)| d.clone())
            .collect();
        assert_eq!(data, b"db=7077\n");
        assert_eq!(
            out.last().map(|(h, _)| (h.op, h.flags)),
            Some((OP_SHUTDOWN, SHUTDOWN_SEND))
        );
    }

    #[test]
    fn the_secrets_port_serves_the_first_connection_only() {
        let mut host = Host::new(GUEST, &[("db".into(), b"pw".to_vec())]);
        // From an unprivileged port (not root in the guest): RST, and nothing used up.
        host.receive(&pkt(OP_REQUEST, 40000, SECRETS_PORT, &[]))
            .ok();
        let out = all_out(&mut host);
        assert!(
            out.len() == 1 && out[0].0.op == OP_RST && out[0].0.dst_port == 40000,
            "{out:?}"
        );
        host.receive(&pkt(OP_REQUEST, 1000, SECRETS_PORT, &[])).ok();
        let first: Vec<u8> = all_out(&mut host)
            .into_iter()
            .filter(|(h, _)| h.op == OP_RW)
            .flat_map(|(_, d)| d)
            .collect();
        assert_eq!(first, b"db=7077\n");
        // While the first is still open, and after it is gone, from any port: RST only.
        for port in [5001, 1000, 1023] {
            if port == 1023 {
                host.receive(&pkt(OP_RST, 1000, SECRETS_PORT, &[])).ok();
            }
            host.receive(&pkt(OP_REQUEST, port, SECRETS_PORT, &[])).ok();
            let out = all_out(&mut host);
            assert!(
                out.iter().all(|(h, d)| h.op == OP_RST && d.is_empty()),
                "{out:?}"
            );
            assert!(out.iter().any(|(h, _)| h.dst_port == port), "{out:?}");
        }
        // A refused connection cannot be talked into data either.
        host.receive(&pkt(OP_RW, 1023, SECRETS_PORT, b"x")).ok();
        host.receive(&pkt(OP_CREDIT_REQUEST, 1023, SECRETS_PORT, &[]))
            .ok();
        assert!(all_out(&mut host).iter().all(|(h, _)| h.op == OP_RST));
        assert!(!format!("{host:?}").contains("7077"));
        // The echo port is unaffected.
        host.receive(&pkt(OP_REQUEST, 7, ECHO_PORT, &[])).ok();
        host.receive(&pkt(OP_RW, 7, ECHO_PORT, b"hi")).ok();
        let echoed: Vec<u8> = all_out(&mut host)
            .into_iter()
            .filter(|(h, _)| h.op == OP_RW)
            .flat_map(|(_, d)| d)
            .collect();
        assert_eq!(echoed, b"hi");
    }

    #[test]
    fn echo_respects_credit_and_unknown_ports_get_rst() {
        let mut host = Host::new(GUEST, &[]);
        host.receive(&pkt(OP_REQUEST, 7, ECHO_PORT, &[])).ok();
        let mut p = pkt(OP_RW, 7, ECHO_PORT, b"hello");
        // The guest has room for 3 bytes only.
        p[36..40].copy_from_slice(&3u32.to_le_bytes());
        host.receive(&p).ok();
        let out = all_out(&mut host);
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].1, b"hel");
        host.receive(&pkt(OP_REQUEST, 8, 9999, &[])).ok();
        host.receive(&pkt(OP_RW, 9, ECHO_PORT, b"x")).ok();
        let out = all_out(&mut host);
        assert!(out.iter().all(|(h, _)| h.op == OP_RST), "{out:?}");
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn malformed_packets_are_errors() {
        let mut host = Host::new(GUEST, &[]);
        assert_eq!(host.receive(&[0u8; 10]), Err(VsockError::Short(10)));
        let mut p = pkt(OP_RW, 1, ECHO_PORT, b"abc");
        p[24..28].copy_from_slice(&100u32.to_le_bytes());
        assert!(matches!(host.receive(&p), Err(VsockError::Length { .. })));
        assert!(check_secret_name("../x").is_err());
        assert!(check_secret_name("db_password").is_ok());
    }
}
