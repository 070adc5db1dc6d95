//! Sessions over sockets: the async initiator and responder, and the pump that
//! turns an established session into a plaintext byte stream.
//!
//! After the handshake, each direction is a sequence of frames, each one Noise
//! transport message of at most [`MAX_PLAINTEXT`] bytes of plaintext. The
//! plaintext of one direction, concatenated, is an ordinary byte stream; hostd
//! runs HTTP/1.1 on it. A frame that does not decrypt (changed, replayed, out of
//! order, or keyed with another psk) ends the connection with one log line.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use snow::TransportState;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};

use crate::capability::Capability;
use crate::session::{self, Accepted, Initiator, Keys, MAX_PLAINTEXT};
use crate::{frame, Error};

/// How long either side waits for the handshake to finish.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Buffer of the in-process pipe between the pump and HTTP.
const PIPE: usize = 256 << 10;

/// Runs the handshake as the caller of `cap` over `io` and returns the
/// plaintext stream. `peer` names the connection in log lines.
pub async fn connect<S>(io: S, cap: &Capability, peer: String) -> Result<DuplexStream, Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut io = io;
    let transport = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let (init, hello) = Initiator::start(cap)?;
        frame::write(&mut io, &hello).await?;
        let mut buf = Vec::new();
        if !frame::read(&mut io, &mut buf).await? {
            return Err(Error::Protocol(
                "the service closed the connection during the handshake (unknown or revoked capability?)",
            ));
        }
        init.finish(&buf)
    })
    .await
    .map_err(|_| Error::Timeout(HANDSHAKE_TIMEOUT))??;
    Ok(pump(io, transport, peer))
}

/// Runs the responder's handshake over `io` against `keys`; returns what
/// was accepted (service, capability id) and the plaintext stream.
pub async fn accept<S>(
    io: S,
    keys: &(dyn Keys + Sync),
    peer: String,
) -> Result<(String, String, DuplexStream), Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut io = io;
    let mut buf = Vec::new();
    let got = tokio::time::timeout(HANDSHAKE_TIMEOUT, frame::read(&mut io, &mut buf))
        .await
        .map_err(|_| Error::Timeout(HANDSHAKE_TIMEOUT))??;
    if !got {
        return Err(Error::Protocol("connection closed before the handshake"));
    }
    let Accepted {
        service,
        cap_id,
        reply,
        transport,
    } = session::respond(&buf, keys)?;
    frame::write(&mut io, &reply).await?;
    Ok((service, cap_id, pump(io, transport, peer)))
}

/// Moves bytes between the socket (frames of Noise messages) and the returned
/// plaintext stream until either side ends or a frame fails to decrypt.
pub fn pump<S>(io: S, transport: TransportState, peer: String) -> DuplexStream
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (ours, theirs) = tokio::io::duplex(PIPE);
    let (mut net_r, mut net_w) = tokio::io::split(io);
    let (mut plain_r, mut plain_w) = tokio::io::split(ours);
    let t = Arc::new(Mutex::new(transport));
    let t_in = t.clone();
    let peer_in = peer.clone();
    // Socket -> plaintext.
    let inbound = tokio::spawn(async move {
        let mut buf = Vec::new();
        loop {
            match frame::read(&mut net_r, &mut buf).await {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    tracing::warn!(peer = %peer_in, "capability connection closed: bad frame: {e}");
                    break;
                }
            }
            let plain = {
                let mut guard = match t_in.lock() {
                    Ok(g) => g,
                    Err(_) => break,
                };
                session::open(&mut guard, &buf)
            };
            match plain {
                Ok(p) => {
                    if plain_w.write_all(&p).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(peer = %peer_in, "capability connection closed: frame did not decrypt: {e}");
                    break;
                }
            }
        }
        let _ = plain_w.shutdown().await;
    });
    // Plaintext -> socket.
    tokio::spawn(async move {
        let mut buf = vec![0u8; MAX_PLAINTEXT];
        loop {
            let n = match plain_r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let sealed = {
                let mut guard = match t.lock() {
                    Ok(g) => g,
                    Err(_) => break,
                };
                session::seal(&mut guard, &buf[..n])
            };
            let Ok(sealed) = sealed else { break };
            if frame::write(&mut net_w, &sealed).await.is_err() {
                break;
            }
        }
        let _ = net_w.shutdown().await;
        // When the reader ends first (HTTP done), stop reading too.
        if !inbound.is_finished() {
            tokio::time::sleep(Duration::from_secs(1)).await;
            inbound.abort();
        }
        tracing::trace!(peer = %peer, "capability connection done");
    });
    theirs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::CapStore;

    #[tokio::test]
    async fn plaintext_round_trip_over_a_socket_pair() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = CapStore::new(dir.path());
        let cap = store.mint("echo", "local:1").expect("mint");
        let (a, b) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(async move {
            let (service, id, mut plain) = accept(b, &store, "test".into()).await.expect("accept");
            let mut got = vec![0u8; 200_000];
            plain.read_exact(&mut got).await.expect("read");
            plain.write_all(&got).await.expect("echo");
            plain.shutdown().await.expect("shutdown");
            (service, id)
        });
        let mut plain = connect(a, &cap, "test".into()).await.expect("connect");
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        plain.write_all(&data).await.expect("write");
        let mut back = Vec::new();
        plain.read_to_end(&mut back).await.expect("read back");
        assert_eq!(back, data);
        let (service, id) = server.await.expect("server");
        assert_eq!((service.as_str(), id), ("echo", cap.id()));
    }
}
