//! The HTTP front: hyper on tokio, routing paths to pre-instantiated
//! components, one fresh store per request, graceful shutdown on SIGTERM.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use wasmtime::component::Linker;
use wasmtime::{Engine, Store, Trap};
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::WasiHttpView;

use crate::capabilities::{self, Caps, FnCaps};
use crate::engine::deadline_ticks;
use crate::manifest::Route;
use crate::store::FnState;
use crate::Error;

/// Extra wall-clock time past a function's limit before the host gives up on
/// a request that is blocked outside WebAssembly (e.g. awaiting a slow
/// upstream), where epoch deadlines cannot reach it.
const HOST_GRACE: Duration = Duration::from_millis(500);

/// A function ready to serve: its routes, grants and pre-instantiated component.
pub struct Deployed {
    pub(crate) caps: Arc<FnCaps>,
    pub(crate) routes: Vec<Route>,
    pub(crate) pre: ProxyPre<FnState>,
}

impl std::fmt::Debug for Deployed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deployed")
            .field("function", &self.caps.name)
            .field("routes", &self.routes)
            .finish()
    }
}

/// The linker every function is instantiated against: WASI p2, `wasi:http`,
/// and hostd's capabilities; filesystem `open-at` goes through the guard.
pub fn linker(engine: &Engine) -> Result<Linker<FnState>, Error> {
    let mut linker = Linker::<FnState>::new(engine);
    let build = |linker: &mut Linker<FnState>| -> wasmtime::Result<()> {
        wasmtime_wasi::p2::add_to_linker_async(linker)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(linker)?;
        capabilities::filesystem::add_open_at_guard(linker)?;
        capabilities::bindings::Imports::add_to_linker::<FnState, Caps>(
            linker,
            FnState::caps_view,
        )?;
        Ok(())
    };
    build(&mut linker).map_err(|e| Error::Engine(format!("setting up the linker: {e:#}")))?;
    Ok(linker)
}

/// Why a request produced no response from the function.
enum Failure {
    NoRoute,
    Busy(String),
    TimeLimit,
    MemoryLimit,
    Trapped(String),
    Host(String),
}

impl Failure {
    fn response(&self) -> Response<HyperOutgoingBody> {
        let (status, body) = match self {
            Failure::NoRoute => (
                StatusCode::NOT_FOUND,
                "no function serves this path\n".to_string(),
            ),
            Failure::Busy(m) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("no capacity for another instance: {m}\n"),
            ),
            Failure::TimeLimit => (
                StatusCode::GATEWAY_TIMEOUT,
                "function exceeded its time limit\n".to_string(),
            ),
            Failure::MemoryLimit => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "function exceeded its memory limit\n".to_string(),
            ),
            Failure::Trapped(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "function trapped\n".to_string(),
            ),
            Failure::Host(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "function failed\n".to_string(),
            ),
        };
        text_response(status, body)
    }
}

fn text_response(status: StatusCode, body: String) -> Response<HyperOutgoingBody> {
    let body = Full::new(Bytes::from(body))
        .map_err(|never| match never {})
        .boxed_unsync();
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// All deployed functions of one server.
#[derive(Debug)]
pub struct Router {
    pub(crate) functions: Vec<Deployed>,
}

impl Router {
    fn find(&self, path: &str) -> Option<&Deployed> {
        self.functions
            .iter()
            .flat_map(|d| {
                d.routes
                    .iter()
                    .filter_map(move |r| r.matches(path).map(|score| (score, d)))
            })
            .max_by_key(|(score, _)| *score)
            .map(|(_, d)| d)
    }

    /// Handles one HTTP request; never fails at the hyper level.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<HyperOutgoingBody>, Infallible> {
        let Some(deployed) = self.find(req.uri().path()) else {
            return Ok(Failure::NoRoute.response());
        };
        match run(deployed, req).await {
            Ok(resp) => Ok(resp),
            Err(f) => {
                let name = &deployed.caps.name;
                match &f {
                    Failure::Trapped(e) => {
                        tracing::warn!(function = %name, "function trapped: {e}")
                    }
                    Failure::Host(e) => tracing::error!(function = %name, "request failed: {e}"),
                    Failure::Busy(e) => {
                        tracing::warn!(function = %name, "instance pool exhausted: {e}")
                    }
                    _ => {}
                }
                Ok(f.response())
            }
        }
    }
}

/// Runs one request in a fresh store.
async fn run(
    deployed: &Deployed,
    req: Request<Incoming>,
) -> Result<Response<HyperOutgoingBody>, Failure> {
    let caps = &deployed.caps;
    let limit = caps.grants.time_limit;
    let state = FnState::new(caps).map_err(|e| Failure::Host(e.to_string()))?;
    let mut store = Store::new(deployed.pre.engine(), state);
    store.limiter(|s| &mut s.limiter);
    store.set_epoch_deadline(deadline_ticks(limit));
    store.epoch_deadline_trap();

    let (sender, receiver) = tokio::sync::oneshot::channel();
    let incoming = store
        .data_mut()
        .http()
        .new_incoming_request(Scheme::Http, req)
        .map_err(|e| Failure::Host(format!("{e:#}")))?;
    let out = store
        .data_mut()
        .http()
        .new_response_outparam(sender)
        .map_err(|e| Failure::Host(format!("{e:#}")))?;
    let pre = deployed.pre.clone();
    let started = Instant::now();
    let task = tokio::spawn(async move {
        let proxy = match pre.instantiate_async(&mut store).await {
            Ok(p) => p,
            Err(e) => return (Err(RunError::Instantiate(e)), store.into_data().limiter.hit),
        };
        tracing::trace!(
            elapsed_us = started.elapsed().as_micros() as u64,
            "instantiated"
        );
        let r = proxy
            .wasi_http_incoming_handler()
            .call_handle(&mut store, incoming, out)
            .await
            .map_err(RunError::Call);
        (r, store.into_data().limiter.hit)
    });
    let abort = task.abort_handle();

    let outcome = tokio::time::timeout(limit + HOST_GRACE, async {
        match receiver.await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(code)) => Err(Failure::Trapped(format!(
                "function answered with error {code:?}"
            ))),
            Err(_) => Err(match task.await {
                Ok((Ok(()), _)) => {
                    Failure::Trapped("function returned without setting a response".into())
                }
                Ok((Err(e), memory_hit)) => classify(caps, e, memory_hit),
                Err(join) => Failure::Host(format!("request task failed: {join}")),
            }),
        }
    })
    .await;
    match outcome {
        Ok(r) => r,
        Err(_elapsed) => {
            abort.abort();
            log_time_limit(caps);
            Err(Failure::TimeLimit)
        }
    }
}

enum RunError {
    Instantiate(wasmtime::Error),
    Call(wasmtime::Error),
}

fn log_time_limit(caps: &FnCaps) {
    tracing::warn!(
        function = %caps.name,
        capability = %"time",
        limit_ms = caps.grants.time_limit.as_millis() as u64,
        "stopped: time limit exceeded"
    );
}

fn classify(caps: &FnCaps, e: RunError, memory_hit: bool) -> Failure {
    let (e, instantiating) = match e {
        RunError::Instantiate(e) => (e, true),
        RunError::Call(e) => (e, false),
    };
    if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
        log_time_limit(caps);
        return Failure::TimeLimit;
    }
    if memory_hit {
        return Failure::MemoryLimit;
    }
    if instantiating {
        let msg = format!("{e:#}");
        if msg.contains("concurrent") || msg.contains("pool") || msg.contains("limit") {
            return Failure::Busy(msg);
        }
        return Failure::Host(format!("instantiating: {msg}"));
    }
    Failure::Trapped(format!("{e:#}"))
}

/// Accepts connections on `listener` until `shutdown` resolves, then stops
/// accepting and waits up to `grace` for in-flight requests to finish.
pub async fn serve_on(
    router: Arc<Router>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
    grace: Duration,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let router = router.clone();
                let service = hyper::service::service_fn(move |req| router.clone().handle(req));
                let conn = hyper::server::conn::http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(%peer, "connection ended: {e}");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!("shutting down: no new connections; waiting for in-flight requests");
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all requests finished"),
        () = tokio::time::sleep(grace) => tracing::warn!("gave up waiting for in-flight requests after {grace:?}"),
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
        }
        _ => {
            tracing::warn!("cannot install signal handlers; serving until killed");
            std::future::pending::<()>().await;
        }
    }
}

/// Binds `addr`.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, Error> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Io {
            what: format!("listening on {addr}"),
            source,
        })
}
