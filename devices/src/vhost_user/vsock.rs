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
//! - [`CAPS_PORT_BASE`]` + i`: the `i`-th capability the image's services declare
//!   (when the runner gave the backend a capability link: see [`super::cap_link`]).
//!   Like the secrets port, only a connection from a privileged guest port (guest
//!   init's relay, which offers each service only the capabilities it was granted) is
//!   accepted; its bytes go both ways over the link to `hostd run`'s relay, which
//!   carries them to the capability's service over Noise. The backend itself opens no
//!   socket and never sees a key.
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

use super::cap_link::{self, Frame};
use super::rng::VHOST_USER_F_PROTOCOL_FEATURES;
use super::{drain, Memory};
use crate::virtio::VIRTIO_F_VERSION_1;

/// The host's CID.
pub const HOST_CID: u64 = 2;
/// The port serving secrets.
pub const SECRETS_PORT: u32 = 1025;
/// The port echoing what it receives.
pub const ECHO_PORT: u32 = 1026;
/// The first capability port (the same number as `hostd_images::abi::VSOCK_CAPS_PORT_BASE`).
pub const CAPS_PORT_BASE: u32 = 1100;
/// Most capability ports (`hostd_images::abi::MAX_CAPABILITIES`).
pub const MAX_CAPS: u32 = 64;
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
/// SHUTDOWN flag: the sender will receive no more.
const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more.
const SHUTDOWN_SEND: u32 = 2;

const RX: usize = 0;
const TX: usize = 1;

/// The syscalls virtio-vsock needs beyond every backend's: none. It opens no host
/// socket: the capability link is connected before the jail, and afterwards only read
/// and written (both in every backend's list).
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
    /// A capability, by index; `link` numbers the connection on the capability link.
    Cap {
        index: u32,
        link: u32,
    },
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
    /// Capability connections: bytes from the guest passed to the link and not yet
    /// credited back by the relay (at most [`BUF_ALLOC`], the credit the guest has).
    unacked_in: u32,
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
    /// How many capability ports are served (0: no capability link).
    caps: u32,
    /// Frames for the capability link, not yet written.
    link_out: Vec<u8>,
    /// The next link connection number.
    next_link: u32,
    /// Link connection number -> connection key.
    links: BTreeMap<u32, (u32, u32)>,
}

impl Host {
    /// A host side for a guest with `guest_cid`, serving `secrets`.
    pub fn new(guest_cid: u64, secrets: &[(String, Vec<u8>)]) -> Host {
        Host {
            guest_cid,
            secrets: Secrets::Waiting(encode_secrets(secrets)),
            conns: BTreeMap::new(),
            control: VecDeque::new(),
            caps: 0,
            link_out: Vec::new(),
            next_link: 0,
            links: BTreeMap::new(),
        }
    }

    /// Serves `count` capability ports ([`CAPS_PORT_BASE`]..), whose connections go to
    /// the capability link ([`Host::link_output`], [`Host::link_receive`]).
    pub fn serve_capabilities(&mut self, count: u32) {
        self.caps = count.min(MAX_CAPS);
    }

    /// Bytes to write to the capability link (take what was written).
    pub fn link_output(&mut self) -> &mut Vec<u8> {
        &mut self.link_out
    }

    /// Forgets connection `key`, resetting it towards the guest (`rst`) and telling the
    /// link (when it is a capability connection).
    fn drop_conn(&mut self, key: (u32, u32), rst: bool) {
        let Some(conn) = self.conns.remove(&key) else {
            return;
        };
        if let Service::Cap { link, .. } = conn.service {
            self.links.remove(&link);
            Frame::Close { id: link }.encode(&mut self.link_out);
        }
        if rst {
            let h = Header {
                src_cid: HOST_CID,
                dst_cid: self.guest_cid,
                src_port: key.1,
                dst_port: key.0,
                len: 0,
                kind: TYPE_STREAM,
                op: OP_RST,
                flags: 0,
                buf_alloc: BUF_ALLOC,
                fwd_cnt: 0,
            };
            self.push_control(h);
        }
    }

    /// Handles one frame from the capability link (the relay). A frame for a
    /// connection that is gone is ignored; one that breaks the rules resets its
    /// connection.
    pub fn link_receive(&mut self, frame: Frame) {
        let id = match &frame {
            Frame::Open { id, .. }
            | Frame::Data { id, .. }
            | Frame::Eof { id }
            | Frame::Close { id }
            | Frame::Credit { id, .. } => *id,
        };
        let Some(&key) = self.links.get(&id) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            self.links.remove(&id);
            return;
        };
        match frame {
            Frame::Data { bytes, .. } => {
                if conn.close_after || conn.out.len() + bytes.len() > cap_link::WINDOW as usize {
                    tracing::warn!(
                        "vsock: the capability relay overran connection {id}'s window; reset"
                    );
                    self.drop_conn(key, true);
                } else {
                    conn.out.extend(bytes.iter().copied());
                }
            }
            Frame::Eof { .. } => conn.close_after = true,
            Frame::Close { .. } => {
                // The relay has forgotten it already: no Close back.
                self.links.remove(&id);
                self.conns.remove(&key);
                self.rst(&Header {
                    src_cid: self.guest_cid,
                    dst_cid: HOST_CID,
                    src_port: key.0,
                    dst_port: key.1,
                    ..Header::default()
                });
            }
            Frame::Credit { n, .. } => {
                let n = n.min(conn.unacked_in);
                conn.unacked_in -= n;
                conn.fwd_cnt = conn.fwd_cnt.wrapping_add(n);
                let h = Header {
                    src_cid: HOST_CID,
                    dst_cid: self.guest_cid,
                    src_port: key.1,
                    dst_port: key.0,
                    len: 0,
                    kind: TYPE_STREAM,
                    op: OP_CREDIT_UPDATE,
                    flags: 0,
                    buf_alloc: BUF_ALLOC,
                    fwd_cnt: conn.fwd_cnt,
                };
                self.push_control(h);
            }
            Frame::Open { .. } => {
                tracing::warn!("vsock: the capability relay sent an Open frame; ignored");
            }
        }
    }

    /// The capability link is gone: every capability connection is reset, and no new
    /// one is accepted.
    pub fn link_lost(&mut self) {
        if self.caps > 0 {
            tracing::warn!("vsock: the capability link to hostd run is gone; capability connections are reset from now on");
        }
        self.caps = 0;
        let keys: Vec<_> = self.links.values().copied().collect();
        for key in keys {
            self.drop_conn(key, true);
        }
        self.link_out.clear();
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
                p if (CAPS_PORT_BASE..CAPS_PORT_BASE + MAX_CAPS).contains(&p) => {
                    let index = p - CAPS_PORT_BASE;
                    if index >= self.caps {
                        tracing::warn!(
                            "vsock: denied: capability not granted: guest port {} asked for capability port {p}, and this VM holds no capability {index} (the image declares fewer, or the runner gave none)",
                            h.src_port
                        );
                        self.rst(&h);
                        return Ok(());
                    }
                    if h.src_port > LAST_PRIVILEGED_PORT {
                        tracing::warn!(
                            "vsock: denied: capability not granted: a connection from guest port {} to capability port {p}: not a privileged port (guest init's relay connects from one, for the services granted the capability); something in the guest that is not root tried",
                            h.src_port
                        );
                        self.rst(&h);
                        return Ok(());
                    }
                    Service::Cap { index, link: 0 }
                }
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
                unacked_in: 0,
            };
            if let Service::Cap { index, .. } = service {
                let link = self.next_link;
                self.next_link = self.next_link.wrapping_add(1);
                conn.service = Service::Cap { index, link };
                self.links.insert(link, key);
                Frame::Open {
                    id: link,
                    cap: index,
                }
                .encode(&mut self.link_out);
            }
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
        if let Service::Cap { link, .. } = conn.service {
            match h.op {
                OP_RW => {
                    let len = payload.len() as u32;
                    if conn.unacked_in.saturating_add(len) > BUF_ALLOC {
                        // More than the credit we gave it.
                        self.drop_conn(key, true);
                        return Ok(());
                    }
                    conn.unacked_in += len;
                    if !payload.is_empty() {
                        Frame::Data {
                            id: link,
                            bytes: payload.to_vec(),
                        }
                        .encode(&mut self.link_out);
                    }
                }
                OP_CREDIT_REQUEST => {
                    let fwd_cnt = conn.fwd_cnt;
                    let mut r = self.reply(&h, OP_CREDIT_UPDATE);
                    r.fwd_cnt = fwd_cnt;
                    self.push_control(r);
                }
                OP_CREDIT_UPDATE | OP_RESPONSE => {}
                OP_SHUTDOWN if h.flags & SHUTDOWN_RCV == 0 => {
                    // The guest sends no more but still reads: a half close, passed on.
                    Frame::Eof { id: link }.encode(&mut self.link_out);
                }
                OP_RST => self.drop_conn(key, false),
                _ => self.drop_conn(key, true),
            }
            return Ok(());
        }
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
                    // (Capability connections were handled above.)
                    Service::Secrets | Service::Cap { .. } => {
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
                if let Service::Cap { link, .. } = c.service {
                    // Passed on to the guest: the relay may send as many more.
                    Frame::Credit {
                        id: link,
                        n: n as u32,
                    }
                    .encode(&mut self.link_out);
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
    /// The capability link (non-blocking; as a File, so that reads are read(2), not
    /// recvfrom(2), which the filter does not allow) and its decoder.
    link: Option<std::fs::File>,
    decoder: cap_link::Decoder,
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
            link: None,
            decoder: cap_link::Decoder::default(),
        })
    }

    /// The epoll id of the capability link: ids up to and including the number of
    /// queues (3) are the library's.
    pub const LINK_EVENT: u16 = 4;

    /// Serves `count` capabilities over `link` (connected to `hostd run`'s relay; made
    /// non-blocking here). Serve it with [`super::serve_watching`] and
    /// [`Self::listeners`].
    pub fn with_capabilities(
        mut self,
        link: std::os::unix::net::UnixStream,
        count: u32,
    ) -> io::Result<Self> {
        link.set_nonblocking(true)?;
        self.link = Some(std::fs::File::from(std::os::fd::OwnedFd::from(link)));
        self.host.serve_capabilities(count);
        Ok(self)
    }

    /// What the worker's epoll must watch besides the queues (for
    /// [`super::serve_watching`]): the capability link, if there is one, edge-triggered
    /// for input and for room to write.
    pub fn listeners(&self) -> Vec<(std::os::fd::RawFd, u16, EventSet)> {
        use std::os::fd::AsRawFd;
        self.link
            .iter()
            .map(|l| {
                (
                    l.as_raw_fd(),
                    Self::LINK_EVENT,
                    EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED,
                )
            })
            .collect()
    }

    /// Reads every frame the relay sent, and hands it to the host side.
    fn link_in(&mut self) {
        let Some(link) = self.link.as_mut() else {
            return;
        };
        let mut buf = [0u8; 16 * 1024];
        let lost = loop {
            match link.read(&mut buf) {
                Ok(0) => break true,
                Ok(n) => self.decoder.push(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("vsock: reading the capability link: {e}");
                    break true;
                }
            }
        };
        loop {
            match self.decoder.next_frame() {
                Ok(Some(f)) => self.host.link_receive(f),
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!("vsock: {e}");
                    self.drop_link();
                    return;
                }
            }
        }
        if lost {
            self.drop_link();
        }
    }

    /// Writes what the host side has for the relay, as much as the link takes now (the
    /// rest when epoll says it is writable again).
    fn link_flush(&mut self) {
        let Some(link) = self.link.as_mut() else {
            self.host.link_output().clear();
            return;
        };
        let out = self.host.link_output();
        let mut written = 0;
        let mut lost = false;
        while written < out.len() {
            match link.write(&out[written..]) {
                Ok(0) => {
                    lost = true;
                    break;
                }
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("vsock: writing the capability link: {e}");
                    lost = true;
                    break;
                }
            }
        }
        out.drain(..written);
        if lost {
            self.drop_link();
        }
    }

    fn drop_link(&mut self) {
        self.link = None;
        self.host.link_lost();
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
        if device_event != Self::LINK_EVENT && evset != EventSet::IN {
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
            Self::LINK_EVENT => self.link_in(),
            n => return Err(io::Error::other(format!("event for unknown queue {n}"))),
        }
        self.process_rx(rx)?;
        self.link_flush();
        Ok(())
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

    fn link_frames(host: &mut Host) -> Vec<Frame> {
        let mut d = cap_link::Decoder::default();
        d.push(&std::mem::take(host.link_output()));
        std::iter::from_fn(|| d.next_frame().ok().flatten()).collect()
    }

    #[test]
    fn capability_ports_go_to_the_link_from_privileged_ports_only() {
        let mut host = Host::new(GUEST, &[]);
        host.serve_capabilities(2);
        let cap1 = CAPS_PORT_BASE + 1;
        // Unprivileged guest port, or a capability the VM does not hold: RST, no frame.
        host.receive(&pkt(OP_REQUEST, 40000, cap1, &[])).ok();
        host.receive(&pkt(OP_REQUEST, 900, CAPS_PORT_BASE + 2, &[]))
            .ok();
        let out = all_out(&mut host);
        assert!(
            out.len() == 2 && out.iter().all(|(h, _)| h.op == OP_RST),
            "{out:?}"
        );
        assert!(link_frames(&mut host).is_empty());
        // From init's relay: accepted, and announced on the link.
        host.receive(&pkt(OP_REQUEST, 900, cap1, &[])).ok();
        assert_eq!(all_out(&mut host)[0].0.op, OP_RESPONSE);
        assert_eq!(link_frames(&mut host), vec![Frame::Open { id: 0, cap: 1 }]);
        host.receive(&pkt(OP_RW, 900, cap1, b"hello")).ok();
        assert_eq!(
            link_frames(&mut host),
            vec![Frame::Data {
                id: 0,
                bytes: b"hello".to_vec()
            }]
        );
        // The relay's answer reaches the guest, and is credited back to the relay.
        host.link_receive(Frame::Data {
            id: 0,
            bytes: b"world".to_vec(),
        });
        let out = all_out(&mut host);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].0.op, out[0].1.as_slice()), (OP_RW, &b"world"[..]));
        assert_eq!(link_frames(&mut host), vec![Frame::Credit { id: 0, n: 5 }]);
        // The relay passed the guest's 5 bytes on: the guest gets its credit back.
        host.link_receive(Frame::Credit { id: 0, n: 5 });
        let out = all_out(&mut host);
        assert_eq!((out[0].0.op, out[0].0.fwd_cnt), (OP_CREDIT_UPDATE, 5));
        // The service is done: the guest sees SHUTDOWN after the data.
        host.link_receive(Frame::Eof { id: 0 });
        let out = all_out(&mut host);
        assert_eq!(
            (out[0].0.op, out[0].0.flags),
            (OP_SHUTDOWN, SHUTDOWN_SEND),
            "{out:?}"
        );
        // The guest closes: the relay is told.
        host.receive(&pkt(OP_RST, 900, cap1, &[])).ok();
        assert_eq!(link_frames(&mut host), vec![Frame::Close { id: 0 }]);
    }

    #[test]
    fn capability_connections_keep_to_their_credit() {
        let mut host = Host::new(GUEST, &[]);
        host.serve_capabilities(1);
        host.receive(&pkt(OP_REQUEST, 901, CAPS_PORT_BASE, &[]))
            .ok();
        all_out(&mut host);
        link_frames(&mut host);
        // The guest may have BUF_ALLOC bytes not yet credited, no more.
        let big = vec![7u8; MAX_PAYLOAD];
        host.receive(&pkt(OP_RW, 901, CAPS_PORT_BASE, &big)).ok();
        assert_eq!(link_frames(&mut host).len(), 1);
        host.receive(&pkt(OP_RW, 901, CAPS_PORT_BASE, b"x")).ok();
        assert_eq!(link_frames(&mut host), vec![Frame::Close { id: 0 }]);
        assert_eq!(all_out(&mut host)[0].0.op, OP_RST);
        // A relay overrunning its window resets the connection too.
        host.receive(&pkt(OP_REQUEST, 902, CAPS_PORT_BASE, &[]))
            .ok();
        all_out(&mut host);
        link_frames(&mut host);
        host.link_receive(Frame::Data {
            id: 1,
            bytes: vec![1; cap_link::WINDOW as usize + 1],
        });
        assert_eq!(link_frames(&mut host), vec![Frame::Close { id: 1 }]);
        // When the link goes, new connections are refused.
        host.link_lost();
        host.receive(&pkt(OP_REQUEST, 903, CAPS_PORT_BASE, &[]))
            .ok();
        assert!(all_out(&mut host).iter().all(|(h, _)| h.op == OP_RST));
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
