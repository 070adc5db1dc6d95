//! The capability responder: a listener (TCP or Unix socket) in front of the
//! functions that answer as capability services. It terminates the Noise
//! handshake with the service's private key (which stays in the host's cap
//! store), checks the capability's psk against the service's capabilities that
//! are not revoked (read from the store at every handshake), and hands the
//! decrypted HTTP request to the service's function in-process, exactly as a
//! routed request (fresh store, time and memory limits); the response goes back
//! over the session.
//!
//! Each connection carries one request (no keep-alive): a caller makes a new
//! handshake per call, so a revocation applies to the next call. Its headers
//! must arrive within [`HEADER_TIMEOUT`] of the handshake, and at most
//! [`MAX_CONNECTIONS`] connections are served at once (more wait in the
//! listen queue).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hostd_caps::capability::KEY_LEN;
use hostd_caps::session::Keys;
use hostd_caps::CapStore;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use super::body::GuardedBody;
use super::log_limit::LogLimiter;
use super::{run, Deployed};

/// Time from the end of the handshake to the end of the request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Capability connections served at once.
pub const MAX_CONNECTIONS: usize = 1024;

/// The services this process answers, and the store holding their keys.
#[derive(Debug)]
pub struct CapServices {
    store: Arc<CapStore>,
    by_service: BTreeMap<String, Arc<Deployed>>,
    refused_log: LogLimiter,
}

impl CapServices {
    /// Services by name, keyed in `store`.
    pub fn new(store: Arc<CapStore>, by_service: BTreeMap<String, Arc<Deployed>>) -> CapServices {
        CapServices {
            store,
            by_service,
            refused_log: LogLimiter::new(),
        }
    }

    /// Whether any function answers as a service.
    pub fn is_empty(&self) -> bool {
        self.by_service.is_empty()
    }
}

/// Only the services this process serves can be called, whatever else the store keys.
impl Keys for CapServices {
    fn service_key(&self, service: &str) -> Option<[u8; KEY_LEN]> {
        self.by_service
            .contains_key(service)
            .then(|| self.store.service_key(service))
            .flatten()
    }

    fn psk(&self, service: &str, id: &[u8; 8]) -> Option<[u8; KEY_LEN]> {
        self.store.psk(service, id)
    }
}

/// Accepts capability connections on a TCP listener until the task is dropped.
pub async fn serve_tcp(services: Arc<CapServices>, listener: tokio::net::TcpListener) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let services = services.clone();
                tokio::spawn(async move {
                    connection(services, stream, peer.to_string()).await;
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::warn!("capability listener: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Accepts capability connections on a Unix socket until the task is dropped.
pub async fn serve_unix(services: Arc<CapServices>, listener: tokio::net::UnixListener) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, _)) => {
                let services = services.clone();
                tokio::spawn(async move {
                    connection(services, stream, "unix".into()).await;
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::warn!("capability listener: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One connection: handshake, then one HTTP request to the service's function.
pub async fn connection<S>(services: Arc<CapServices>, io: S, peer: String)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (service, cap_id, plain) =
        match hostd_caps::stream::accept(io, &*services, peer.clone()).await {
            Ok(a) => a,
            Err(e) => {
                if let Some(suppressed) = services.refused_log.check() {
                    tracing::warn!(peer = %peer, suppressed, "capability handshake refused: {e}");
                }
                return;
            }
        };
    let Some(deployed) = services.by_service.get(&service).cloned() else {
        return;
    };
    tracing::debug!(peer = %peer, service = %service, id = %cap_id, function = %deployed.caps.name, "capability connection accepted");
    let handler = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let deployed = deployed.clone();
        async move {
            let resp = match run(&deployed, req).await {
                Ok((resp, deadline)) => {
                    resp.map(|b| GuardedBody::new(b, None, Some(deadline)).boxed_unsync())
                }
                Err(f) => f
                    .response()
                    .map(|b| GuardedBody::new(b, None, None).boxed_unsync()),
            };
            Ok::<_, Infallible>(resp)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(false)
        .serve_connection(TokioIo::new(plain), handler);
    if let Err(e) = conn.await {
        tracing::debug!(peer = %peer, service = %service, "capability connection ended: {e}");
    }
}
