//! The capability link: one Unix stream between the jailed vsock backend and the
//! capability relay `hostd run` starts (not jailed: it holds the capabilities and may
//! open network connections). The backend never opens a socket itself; it multiplexes
//! every guest connection to a capability port over this one stream, which it
//! connected to before it jailed itself.
//!
//! A frame is `kind` (1 byte), `id` (u32 LE: the backend's number for the guest
//! connection), `len` (u32 LE) and `len` bytes (at most [`MAX_FRAME_PAYLOAD`]):
//!
//! | kind | sent by | payload | meaning |
//! |---|---|---|---|
//! | [`Kind::Open`] | backend | u32 LE: capability index | the guest opened a connection to port `VSOCK_CAPS_PORT_BASE + index` |
//! | [`Kind::Data`] | both | bytes | stream bytes (backend: from the guest; relay: for the guest) |
//! | [`Kind::Eof`] | both | none | the sender will send no more data on `id` |
//! | [`Kind::Close`] | both | none | `id` is gone (reset); nothing more either way |
//! | [`Kind::Credit`] | both | u32 LE: n | the receiver of n bytes of `Data` has passed them on (the sender may send n more) |
//!
//! Flow control: neither side has more than [`WINDOW`] bytes of `Data` per connection
//! not yet credited back. A side that gets more, or a malformed frame, treats it as a
//! protocol error (the relay drops the link; the backend resets the connection).

/// Bytes of `Data` one side may have in flight per connection before a `Credit`.
pub const WINDOW: u32 = 64 * 1024;
/// Largest payload of one frame.
pub const MAX_FRAME_PAYLOAD: usize = 64 * 1024;
/// Size of a frame's header.
pub const FRAME_HEADER: usize = 9;

/// What a frame says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A new connection to a capability.
    Open = 1,
    /// Stream bytes.
    Data = 2,
    /// No more data from the sender.
    Eof = 3,
    /// The connection is gone.
    Close = 4,
    /// Bytes passed on: the peer may send as many more.
    Credit = 5,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Open,
            2 => Kind::Data,
            3 => Kind::Eof,
            4 => Kind::Close,
            5 => Kind::Credit,
            _ => return None,
        })
    }
}

/// What was wrong with the link's bytes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LinkError {
    /// An unknown frame kind.
    #[error("capability link: unknown frame kind {0}")]
    Kind(u8),
    /// A payload over [`MAX_FRAME_PAYLOAD`].
    #[error("capability link: frame payload of {0} bytes is over the limit")]
    TooLong(u32),
    /// `Open` or `Credit` without its 4-byte payload, or a payload where none belongs.
    #[error("capability link: a {0:?} frame with a {1}-byte payload")]
    Payload(Kind, usize),
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// See [`Kind::Open`].
    Open {
        /// Connection.
        id: u32,
        /// Capability index.
        cap: u32,
    },
    /// See [`Kind::Data`].
    Data {
        /// Connection.
        id: u32,
        /// Bytes.
        bytes: Vec<u8>,
    },
    /// See [`Kind::Eof`].
    Eof {
        /// Connection.
        id: u32,
    },
    /// See [`Kind::Close`].
    Close {
        /// Connection.
        id: u32,
    },
    /// See [`Kind::Credit`].
    Credit {
        /// Connection.
        id: u32,
        /// Bytes passed on.
        n: u32,
    },
}

fn put(out: &mut Vec<u8>, kind: Kind, id: u32, payload: &[u8]) {
    out.push(kind as u8);
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
}

impl Frame {
    /// Appends the wire form to `out`. `Data` longer than [`MAX_FRAME_PAYLOAD`] is split
    /// into several frames.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Frame::Open { id, cap } => put(out, Kind::Open, *id, &cap.to_le_bytes()),
            Frame::Data { id, bytes } => {
                for chunk in bytes.chunks(MAX_FRAME_PAYLOAD) {
                    put(out, Kind::Data, *id, chunk);
                }
            }
            Frame::Eof { id } => put(out, Kind::Eof, *id, &[]),
            Frame::Close { id } => put(out, Kind::Close, *id, &[]),
            Frame::Credit { id, n } => put(out, Kind::Credit, *id, &n.to_le_bytes()),
        }
    }
}

/// Reassembles frames from the bytes of the stream, as they arrive.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    /// Adds bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame, None until one has arrived, or an error (after which the
    /// link is unusable: frames have no resynchronisation point).
    pub fn next_frame(&mut self) -> Result<Option<Frame>, LinkError> {
        let Some(header) = self.buf.get(..FRAME_HEADER) else {
            return Ok(None);
        };
        let kind_byte = header[0];
        let id = u32::from_le_bytes([header[1], header[2], header[3], header[4]]);
        let len = u32::from_le_bytes([header[5], header[6], header[7], header[8]]);
        let kind = Kind::from_byte(kind_byte).ok_or(LinkError::Kind(kind_byte))?;
        if len as usize > MAX_FRAME_PAYLOAD {
            return Err(LinkError::TooLong(len));
        }
        let end = FRAME_HEADER + len as usize;
        let Some(payload) = self.buf.get(FRAME_HEADER..end) else {
            return Ok(None);
        };
        let word = || -> Result<u32, LinkError> {
            match payload {
                [a, b, c, d] => Ok(u32::from_le_bytes([*a, *b, *c, *d])),
                _ => Err(LinkError::Payload(kind, payload.len())),
            }
        };
        let empty = || {
            if payload.is_empty() {
                Ok(())
            } else {
                Err(LinkError::Payload(kind, payload.len()))
            }
        };
        let frame = match kind {
            Kind::Open => Frame::Open { id, cap: word()? },
            Kind::Data => Frame::Data {
                id,
                bytes: payload.to_vec(),
            },
            Kind::Eof => {
                empty()?;
                Frame::Eof { id }
            }
            Kind::Close => {
                empty()?;
                Frame::Close { id }
            }
            Kind::Credit => Frame::Credit { id, n: word()? },
        };
        self.buf.drain(..end);
        Ok(Some(frame))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_byte_by_byte() {
        let frames = vec![
            Frame::Open { id: 7, cap: 2 },
            Frame::Data {
                id: 7,
                bytes: b"GET / HTTP/1.1\r\n".to_vec(),
            },
            Frame::Credit { id: 7, n: 16 },
            Frame::Eof { id: 7 },
            Frame::Close { id: 7 },
        ];
        let mut wire = Vec::new();
        for f in &frames {
            f.encode(&mut wire);
        }
        let mut d = Decoder::default();
        let mut got = Vec::new();
        for b in wire {
            d.push(&[b]);
            while let Some(f) = d.next_frame().expect("well-formed") {
                got.push(f);
            }
        }
        assert_eq!(got, frames);
    }

    #[test]
    fn long_data_is_split_and_bad_frames_are_errors() {
        let mut wire = Vec::new();
        Frame::Data {
            id: 1,
            bytes: vec![9; MAX_FRAME_PAYLOAD + 5],
        }
        .encode(&mut wire);
        let mut d = Decoder::default();
        d.push(&wire);
        let lens: Vec<usize> = std::iter::from_fn(|| match d.next_frame() {
            Ok(Some(Frame::Data { bytes, .. })) => Some(bytes.len()),
            _ => None,
        })
        .collect();
        assert_eq!(lens, vec![MAX_FRAME_PAYLOAD, 5]);
        let mut d = Decoder::default();
        d.push(&[9, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(d.next_frame(), Err(LinkError::Kind(9)));
        let mut d = Decoder::default();
        d.push(&[2, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(d.next_frame(), Err(LinkError::TooLong(_))));
        let mut d = Decoder::default();
        d.push(&[1, 0, 0, 0, 0, 1, 0, 0, 0, 5]);
        assert_eq!(d.next_frame(), Err(LinkError::Payload(Kind::Open, 1)));
    }
}
