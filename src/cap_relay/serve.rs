//! `hostd cap relay` (hidden): the relay's own process (the parent module says what it
//! does and why).

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use hostd_caps::{CapStore, Capability};
use hostd_devices::vhost_user::cap_link::{Decoder, Frame, WINDOW};
use hostd_images::abi::CAPS_TOKEN_LEN;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, Semaphore};

/// How long the relay waits to reach a capability's location.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest piece read from a service at once.
const CHUNK: usize = 16 * 1024;
/// How long a guest connection may take to send the token.
const TOKEN_TIMEOUT: Duration = Duration::from_secs(5);

/// `hostd cap relay` (hidden): serves the one capability link the vsock backend makes
/// to the listening socket on stdin, for the capabilities held as `names`.
pub fn serve(store: &CapStore, names: &[String], token_file: &Path) -> Result<i32> {
    let token: [u8; CAPS_TOKEN_LEN] = std::fs::read(token_file)
        .with_context(|| format!("cannot read the capability token {}", token_file.display()))?
        .try_into()
        .map_err(|_| anyhow::anyhow!("{}: not a capability token", token_file.display()))?;
    let token = Arc::new(token);
    let mut caps = Vec::new();
    for name in names {
        let cap = store
            .held(name)?
            .with_context(|| format!("this host holds no capability `{name}`"))?;
        caps.push((name.clone(), cap));
    }
    // SAFETY: fd 0 is the listening socket `hostd run` passed; nothing else owns it.
    let listener = unsafe {
        use std::os::fd::FromRawFd;
        std::os::unix::net::UnixListener::from_raw_fd(0)
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the relay's runtime")?;
    rt.block_on(async move {
        listener.set_nonblocking(true)?;
        let listener = tokio::net::UnixListener::from_std(listener)?;
        let (link, _) = listener.accept().await?;
        drop(listener);
        tracing::debug!("capability relay: the vsock backend connected");
        run_link(link, Arc::new(caps), token).await;
        Ok::<_, std::io::Error>(())
    })
    .context("capability relay")?;
    Ok(0)
}

/// What the relay passes to a connection's service side.
enum ToService {
    Data(Vec<u8>),
    Eof,
}

struct Conn {
    to_service: mpsc::UnboundedSender<ToService>,
    /// Bytes from the guest queued for the service, not yet credited back.
    queued: Arc<AtomicU32>,
    /// Credit for bytes to the guest.
    credit: Arc<Semaphore>,
    /// Whether its token was checked (until then it may be anything in the guest).
    token_checked: Arc<std::sync::atomic::AtomicBool>,
    /// The capability it asked for.
    name: String,
    task: tokio::task::JoinHandle<()>,
}

/// Serves the link until the backend hangs up or breaks the protocol.
async fn run_link(
    link: tokio::net::UnixStream,
    caps: Arc<Vec<(String, Capability)>>,
    token: Arc<[u8; CAPS_TOKEN_LEN]>,
) {
    let (mut rd, mut wr) = link.into_split();
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Frame>();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<u32>();
    let writer = tokio::spawn(async move {
        let mut buf = Vec::new();
        while let Some(f) = out_rx.recv().await {
            buf.clear();
            f.encode(&mut buf);
            while let Ok(f) = out_rx.try_recv() {
                f.encode(&mut buf);
            }
            if wr.write_all(&buf).await.is_err() {
                break;
            }
        }
    });
    let mut conns: HashMap<u32, Conn> = HashMap::new();
    let mut decoder = Decoder::default();
    let mut buf = vec![0u8; 64 * 1024];
    'link: loop {
        tokio::select! {
            Some(id) = done_rx.recv() => {
                conns.remove(&id);
            }
            n = rd.read(&mut buf) => {
                let n = match n {
                    Ok(0) | Err(_) => break 'link,
                    Ok(n) => n,
                };
                decoder.push(&buf[..n]);
                loop {
                    let frame = match decoder.next_frame() {
                        Ok(Some(f)) => f,
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!("capability relay: {e}; dropping the link");
                            break 'link;
                        }
                    };
                    handle(frame, &mut conns, &caps, &token, &out_tx, &done_tx);
                }
            }
        }
    }
    for (_, c) in conns.drain() {
        c.task.abort();
    }
    writer.abort();
}

fn handle(
    frame: Frame,
    conns: &mut HashMap<u32, Conn>,
    caps: &Arc<Vec<(String, Capability)>>,
    token: &Arc<[u8; CAPS_TOKEN_LEN]>,
    out: &mpsc::UnboundedSender<Frame>,
    done: &mpsc::UnboundedSender<u32>,
) {
    match frame {
        Frame::Open { id, cap } => {
            if let Some(old) = conns.remove(&id) {
                old.task.abort();
            }
            let Some((name, capability)) = caps.get(cap as usize).cloned() else {
                tracing::warn!(
                    "denied: capability not granted: the guest asked for capability {cap}; the VM holds {}",
                    caps.len()
                );
                let _ = out.send(Frame::Close { id });
                return;
            };
            let (to_service, from_guest) = mpsc::unbounded_channel();
            let queued = Arc::new(AtomicU32::new(0));
            let credit = Arc::new(Semaphore::new(WINDOW as usize));
            let token_checked = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let task = tokio::spawn(connection(
                id,
                name.clone(),
                capability,
                token.clone(),
                token_checked.clone(),
                from_guest,
                queued.clone(),
                credit.clone(),
                out.clone(),
                done.clone(),
            ));
            conns.insert(
                id,
                Conn {
                    to_service,
                    queued,
                    credit,
                    token_checked,
                    name,
                    task,
                },
            );
        }
        Frame::Data { id, bytes } => {
            let Some(c) = conns.get(&id) else { return };
            let len = bytes.len() as u32;
            if c.queued.load(Ordering::SeqCst).saturating_add(len) > WINDOW {
                tracing::warn!("capability relay: the vsock backend overran connection {id}'s window; closing it");
                if let Some(c) = conns.remove(&id) {
                    c.task.abort();
                }
                let _ = out.send(Frame::Close { id });
                return;
            }
            c.queued.fetch_add(len, Ordering::SeqCst);
            let _ = c.to_service.send(ToService::Data(bytes));
        }
        Frame::Eof { id } => {
            if let Some(c) = conns.get(&id) {
                let _ = c.to_service.send(ToService::Eof);
            }
        }
        Frame::Close { id } => {
            if let Some(c) = conns.remove(&id) {
                c.task.abort();
                if !c.token_checked.load(Ordering::SeqCst) {
                    deny(&c.name, "it was closed before sending this run's token");
                }
            }
        }
        Frame::Credit { id, n } => {
            if let Some(c) = conns.get(&id) {
                let room = (WINDOW as usize).saturating_sub(c.credit.available_permits());
                c.credit.add_permits((n as usize).min(room));
            }
        }
    }
}

/// One guest connection: to the capability's service over Noise, both ways.
#[allow(clippy::too_many_arguments)]
async fn connection(
    id: u32,
    name: String,
    cap: Capability,
    token: Arc<[u8; CAPS_TOKEN_LEN]>,
    token_checked: Arc<std::sync::atomic::AtomicBool>,
    mut from_guest: mpsc::UnboundedReceiver<ToService>,
    queued: Arc<AtomicU32>,
    credit: Arc<Semaphore>,
    out: mpsc::UnboundedSender<Frame>,
    done: mpsc::UnboundedSender<u32>,
) {
    let fail = |why: String| {
        tracing::warn!(capability = %name, "guest capability call failed: {why}");
        let _ = out.send(Frame::Close { id });
        let _ = done.send(id);
    };
    // Guest init's relay sends the run's token first; anything else is not init.
    let rest = match tokio::time::timeout(TOKEN_TIMEOUT, read_token(&mut from_guest)).await {
        Ok(Some((got, rest))) if same(&got, &token[..]) => {
            token_checked.store(true, Ordering::SeqCst);
            // The token's bytes are consumed here: credit them back to the guest.
            let n = got.len() as u32;
            queued.fetch_sub(n, Ordering::SeqCst);
            let _ = out.send(Frame::Credit { id, n });
            rest
        }
        outcome => {
            let why = match outcome {
                Ok(Some(_)) => "its first bytes are not this run's token",
                Ok(None) => "it ended before sending this run's token",
                Err(_) => "it sent no token in time",
            };
            // Checked (and refused): the Close below is not reported again.
            token_checked.store(true, Ordering::SeqCst);
            deny(&name, why);
            let _ = out.send(Frame::Close { id });
            let _ = done.send(id);
            return;
        }
    };
    let tcp = match tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect(cap.location.as_str()),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return fail(format!("connecting to {}: {e}", cap.location)),
        Err(_) => return fail(format!("connecting to {}: timed out", cap.location)),
    };
    let _ = tcp.set_nodelay(true);
    let plain = match hostd_caps::stream::connect(tcp, &cap, cap.location.clone()).await {
        Ok(p) => p,
        Err(e) => return fail(format!("handshake with {} failed: {e}", cap.location)),
    };
    tracing::debug!(capability = %name, id = %cap.id(), "guest capability call");
    let (mut service_rd, mut service_wr) = tokio::io::split(plain);
    let up_out = out.clone();
    // Guest -> service.
    let upstream = tokio::spawn(async move {
        // What came with the token (credited once written, like every other byte).
        if !rest.is_empty() {
            if service_wr.write_all(&rest).await.is_err() {
                return;
            }
            queued.fetch_sub(rest.len() as u32, Ordering::SeqCst);
            let _ = up_out.send(Frame::Credit {
                id,
                n: rest.len() as u32,
            });
        }
        while let Some(m) = from_guest.recv().await {
            match m {
                ToService::Data(bytes) => {
                    if service_wr.write_all(&bytes).await.is_err() {
                        break;
                    }
                    queued.fetch_sub(bytes.len() as u32, Ordering::SeqCst);
                    let _ = up_out.send(Frame::Credit {
                        id,
                        n: bytes.len() as u32,
                    });
                }
                ToService::Eof => {
                    let _ = service_wr.shutdown().await;
                    break;
                }
            }
        }
    });
    // Service -> guest, within the guest's window.
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match service_rd.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        match credit.acquire_many(n as u32).await {
            Ok(p) => p.forget(),
            Err(_) => break,
        }
        if out
            .send(Frame::Data {
                id,
                bytes: buf[..n].to_vec(),
            })
            .is_err()
        {
            break;
        }
    }
    // The service has answered all it will: the guest sees EOF after the data.
    let _ = out.send(Frame::Eof { id });
    let _ = upstream.await;
    let _ = done.send(id);
}

/// Reads the token from the start of a guest connection: the token's bytes and
/// whatever came after them in the same pieces; None if the connection ended first.
async fn read_token(
    from_guest: &mut mpsc::UnboundedReceiver<ToService>,
) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut got = Vec::with_capacity(CAPS_TOKEN_LEN);
    while got.len() < CAPS_TOKEN_LEN {
        match from_guest.recv().await? {
            ToService::Data(bytes) => got.extend_from_slice(&bytes),
            ToService::Eof => return None,
        }
    }
    let rest = got.split_off(CAPS_TOKEN_LEN);
    Some((got, rest))
}

/// Compares two byte strings in time independent of where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Logs a guest connection refused for want of the run's token.
fn deny(name: &str, why: &str) {
    tracing::warn!(
        capability = %name,
        "denied: capability not granted: a guest connection that did not come through guest init's relay ({why}): something in the guest went around the services' grants"
    );
}
