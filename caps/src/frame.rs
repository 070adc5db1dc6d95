//! Frames on the wire: a 2-byte big-endian length, then that many bytes (1 to
//! 65 535: one Noise message at most). Both the handshake messages and the
//! transport messages travel in frames. A zero length is a protocol error.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::Error;

/// Largest frame body: the largest Noise message.
pub const MAX_FRAME: usize = 65_535;
/// Bytes of the length prefix.
pub const HEADER: usize = 2;

/// Splits the first frame off `buf`: `Ok(Some((body, consumed)))` when a whole
/// frame is there, `Ok(None)` when more bytes are needed, an error for a
/// frame no peer of ours sends.
pub fn split(buf: &[u8]) -> Result<Option<(&[u8], usize)>, Error> {
    let Some(head) = buf.get(..HEADER) else {
        return Ok(None);
    };
    let len = usize::from(u16::from_be_bytes([head[0], head[1]]));
    if len == 0 {
        return Err(Error::Protocol("empty frame"));
    }
    match buf.get(HEADER..HEADER + len) {
        Some(body) => Ok(Some((body, HEADER + len))),
        None => Ok(None),
    }
}

/// Appends `body` as one frame to `out`.
pub fn encode(body: &[u8], out: &mut Vec<u8>) -> Result<(), Error> {
    let len = u16::try_from(body.len()).map_err(|_| Error::Protocol("frame too large"))?;
    if len == 0 {
        return Err(Error::Protocol("empty frame"));
    }
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body);
    Ok(())
}

/// Reads one frame into `buf` (replacing its contents). `Ok(false)` on a clean
/// end of stream before a frame starts; an end inside a frame is an error.
pub async fn read<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> Result<bool, Error> {
    let mut head = [0u8; HEADER];
    let mut got = 0;
    while got < HEADER {
        let n = r.read(&mut head[got..]).await.map_err(|source| Error::Io {
            what: "reading a frame",
            source,
        })?;
        if n == 0 {
            return if got == 0 {
                Ok(false)
            } else {
                Err(Error::Protocol("connection ended inside a frame header"))
            };
        }
        got += n;
    }
    let len = usize::from(u16::from_be_bytes(head));
    if len == 0 {
        return Err(Error::Protocol("empty frame"));
    }
    buf.clear();
    buf.resize(len, 0);
    r.read_exact(buf).await.map_err(|source| Error::Io {
        what: "reading a frame body",
        source,
    })?;
    Ok(true)
}

/// Writes `body` as one frame.
pub async fn write<W: AsyncWrite + Unpin>(w: &mut W, body: &[u8]) -> Result<(), Error> {
    let mut out = Vec::with_capacity(HEADER + body.len());
    encode(body, &mut out)?;
    w.write_all(&out).await.map_err(|source| Error::Io {
        what: "writing a frame",
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_whole_frames_only() {
        let mut buf = Vec::new();
        encode(b"abc", &mut buf).expect("encode");
        encode(b"d", &mut buf).expect("encode");
        let (body, used) = split(&buf).expect("ok").expect("a frame");
        assert_eq!((body, used), (&b"abc"[..], 5));
        assert_eq!(split(&buf[used..]).expect("ok"), Some((&b"d"[..], 3)));
        assert_eq!(split(&buf[..4]).expect("ok"), None);
        assert_eq!(split(&buf[..1]).expect("ok"), None);
        assert!(split(&[0, 0, 1]).is_err());
        assert!(encode(&[], &mut Vec::new()).is_err());
        assert!(encode(&vec![0; MAX_FRAME + 1], &mut Vec::new()).is_err());
    }
}
