//! The HTTP front: hyper on tokio, routing paths to pre-instantiated
//! components, one fresh store per request, graceful shutdown on SIGTERM.
//!
//! - [`capability`]: the capability responder (Noise in front of a function).
//! - [`connections`]: the connection cap, header-read and idle timeouts,
//!   accept back-off.
//! - `body`: the response body under the request's deadline.
//! - [`fd_limit`]: the open-file limit and the cap it allows.
//! - [`log_limit`]: rate-limited log lines.
//! - [`metrics`]: per-version request counts and latency histogram.
//!
//! Requests are routed through a [`RouteTable`]: each request takes one
//! snapshot of the table when it starts and is served wholly by the
//! functions in it, while a deploy swaps the whole table for the next request.

mod body;
pub mod capability;
pub mod connections;
pub mod fd_limit;
mod io;
pub mod log_limit;
pub mod metrics;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use wasmtime::component::Linker;
use wasmtime::{Engine, Store, Trap, UpdateDeadline};
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::WasiHttpView;

use self::body::{BodyDeadline, GuardedBody, Outcome, Phase};
pub use self::connections::ConnectionLimits;
use self::connections::RequestGuard;
use self::metrics::RequestMetrics;
use crate::capabilities::{self, Caps, FnCaps};
use crate::engine::deadline_ticks;
use crate::manifest::Route;
use crate::store::FnState;
use crate::Error;

/// Extra wall-clock time past a function's limit before the host stops a
/// request that is blocked outside WebAssembly (awaiting a slow upstream, a
/// slow client reading its response, a timer), where epoch deadlines cannot
/// reach it. The whole request, response body included, ends by
/// `time_ms` + this.
pub const HOST_GRACE: Duration = Duration::from_millis(500);

/// Running WebAssembly yields to the async runtime after this many epoch ticks
/// ([`crate::engine::EPOCH_TICK`] each), so a busy function delays others on its
/// worker thread by about that much, not by its whole time limit.
const YIELD_TICKS: u64 = 1;

/// A function ready to serve: its routes, grants and pre-instantiated component.
pub struct Deployed {
    pub(crate) caps: Arc<FnCaps>,
    pub(crate) routes: Vec<Route>,
    pub(crate) pre: ProxyPre<FnState>,
    /// Where its requests are counted, when someone reads them (deploys do).
    pub(crate) metrics: Option<Arc<RequestMetrics>>,
    /// Held by each request while its store may run, so the epoch (its deadline's
    /// clock) advances then and only then.
    pub(crate) clock: crate::engine::EpochClock,
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

/// All deployed functions of one server: one snapshot of the route table.
#[derive(Debug, Default)]
pub struct Router {
    pub(crate) functions: Vec<Arc<Deployed>>,
}

/// The route table a server reads: swapped whole, read once per request.
#[derive(Debug)]
pub struct RouteTable {
    current: ArcSwap<Router>,
}

impl RouteTable {
    /// A table serving `router`.
    pub fn new(router: Arc<Router>) -> RouteTable {
        RouteTable {
            current: ArcSwap::new(router),
        }
    }

    /// The table as it is now; a request holds this snapshot to its end.
    pub fn snapshot(&self) -> Arc<Router> {
        self.current.load_full()
    }

    /// Makes `router` the table for every request that starts from now on.
    pub fn replace(&self, router: Arc<Router>) {
        self.current.store(router);
    }
}

impl Router {
    fn find(&self, path: &str) -> Option<&Arc<Deployed>> {
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

    /// Handles one HTTP request; never fails at the hyper level. `guard`
    /// keeps the connection busy until the response body is done.
    pub(crate) async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        guard: RequestGuard,
    ) -> Result<Response<HyperOutgoingBody>, Infallible> {
        let guarded = |resp: Response<HyperOutgoingBody>, deadline| {
            resp.map(|b| GuardedBody::new(b, Some(guard), deadline).boxed_unsync())
        };
        let Some(deployed) = self.find(req.uri().path()) else {
            return Ok(guarded(Failure::NoRoute.response(), None));
        };
        let mut req = req;
        if req.uri().authority().is_none() && !req.headers().contains_key(hyper::header::HOST) {
            if req.version() >= hyper::Version::HTTP_11 {
                // RFC 9112 3.2: a 1.1 request without Host is answered 400. Not the
                // function's failure: it never ran.
                return Ok(guarded(
                    text_response(
                        StatusCode::BAD_REQUEST,
                        "an HTTP/1.1 request needs a Host header\n".into(),
                    ),
                    None,
                ));
            }
            // HTTP/1.0 may leave it out; wasi:http needs an authority, so the function
            // sees `localhost`.
            req.headers_mut().insert(
                hyper::header::HOST,
                hyper::header::HeaderValue::from_static("localhost"),
            );
        }
        let started = Instant::now();
        let result = run(deployed, req).await;
        if let Some(m) = &deployed.metrics {
            let status = result.as_ref().ok().map(|(r, _)| r.status().as_u16());
            m.record(status, started.elapsed());
        }
        match result {
            Ok((resp, deadline)) => Ok(guarded(resp, Some(deadline))),
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
                Ok(guarded(f.response(), None))
            }
        }
    }
}

/// How a request's task ended, as its supervisor saw it.
enum TaskEnd {
    Finished(Result<(), RunError>, bool),
    Panicked(String),
    TimedOut,
}

/// Runs one request in a fresh store. The request's task runs under a
/// supervisor that stops it at the deadline (`time_ms` + [`HOST_GRACE`]
/// after the start) wherever it is: running WebAssembly (the epoch deadline
/// has then already trapped it), blocked in the host, or writing a response
/// body nobody reads. The returned deadline cuts the response body at the same
/// instant.
async fn run<B>(
    deployed: &Deployed,
    req: Request<B>,
) -> Result<(Response<HyperOutgoingBody>, BodyDeadline), Failure>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<wasmtime_wasi_http::Error>,
{
    let caps = &deployed.caps;
    let limit = caps.grants.time_limit;
    let deadline = tokio::time::Instant::now() + limit + HOST_GRACE;
    let state = FnState::new(caps).map_err(|e| Failure::Host(e.to_string()))?;
    // Taken before the deadline is set and moved into the request's task, which drops
    // it when the store is gone (the task ended or was aborted at the deadline).
    let ticking = deployed.clock.hold();
    let mut store = Store::new(deployed.pre.engine(), state);
    store.limiter(|s| &mut s.limiter);
    // The WebAssembly yields to the runtime at every epoch tick and traps once its time
    // limit's ticks have passed: a function in a CPU loop shares its worker thread with
    // every other request instead of holding it for its whole time limit.
    let mut ticks_left = deadline_ticks(limit);
    store.set_epoch_deadline(YIELD_TICKS);
    store.epoch_deadline_callback(move |_| {
        ticks_left = ticks_left.saturating_sub(YIELD_TICKS);
        Ok(if ticks_left == 0 {
            UpdateDeadline::Interrupt
        } else {
            UpdateDeadline::YieldCustom(YIELD_TICKS, Box::pin(tokio::task::yield_now()))
        })
    });

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
    let outcome = Outcome::new(caps.clone());
    let started = Instant::now();
    let task_outcome = outcome.clone();
    let mut task = tokio::spawn(async move {
        let _ticking = ticking;
        let r = match pre.instantiate_async(&mut store).await {
            Err(e) => Err(RunError::Instantiate(e)),
            Ok(proxy) => {
                tracing::trace!(
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "instantiated"
                );
                proxy
                    .wasi_http_incoming_handler()
                    .call_handle(&mut store, incoming, out)
                    .await
                    .map_err(RunError::Call)
            }
        };
        if r.is_err() {
            // Before the store (and with it the response body's sender) goes.
            task_outcome.mark_failed();
        }
        let memory_hit = store.into_data().limiter.hit;
        (r, memory_hit)
    });

    let (end_tx, end_rx) = tokio::sync::oneshot::channel();
    let sup_caps = caps.clone();
    let sup_outcome = outcome.clone();
    tokio::spawn(async move {
        let end = match tokio::time::timeout_at(deadline, &mut task).await {
            Ok(Ok((r, memory_hit))) => TaskEnd::Finished(r, memory_hit),
            Ok(Err(join)) => TaskEnd::Panicked(join.to_string()),
            Err(_elapsed) => {
                sup_outcome.mark_failed();
                task.abort();
                TaskEnd::TimedOut
            }
        };
        // When nobody waits any more, the response has gone out already.
        if let Err(end) = end_tx.send(end) {
            after_response(&sup_caps, &sup_outcome, end);
        }
    });

    match receiver.await {
        Ok(Ok(resp)) => Ok((
            resp,
            BodyDeadline {
                at: deadline,
                outcome,
            },
        )),
        Ok(Err(code)) => Err(Failure::Trapped(format!(
            "function answered with error {code:?}"
        ))),
        Err(_) => match end_rx.await {
            Ok(TaskEnd::Finished(Ok(()), _)) => Err(Failure::Trapped(
                "function returned without setting a response".into(),
            )),
            Ok(TaskEnd::Finished(Err(e), memory_hit)) => Err(classify(&outcome, e, memory_hit)),
            Ok(TaskEnd::Panicked(m)) => Err(Failure::Host(format!("request task failed: {m}"))),
            Ok(TaskEnd::TimedOut) => {
                outcome.log_time_limit(Phase::Response);
                Err(Failure::TimeLimit)
            }
            Err(_) => Err(Failure::Host("request task vanished".into())),
        },
    }
}

/// Logs how a request ended after its response headers were sent.
fn after_response(caps: &FnCaps, outcome: &Outcome, end: TaskEnd) {
    match end {
        TaskEnd::Finished(Ok(()), _) => {}
        TaskEnd::TimedOut => outcome.log_time_limit(Phase::Body),
        TaskEnd::Finished(Err(RunError::Call(e) | RunError::Instantiate(e)), _) => {
            if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
                outcome.log_time_limit(Phase::Body);
            } else {
                tracing::warn!(function = %caps.name, "function trapped after its response headers were handed to the client (or the client left): {e:#}");
            }
        }
        TaskEnd::Panicked(m) => {
            tracing::error!(function = %caps.name, "request task failed: {m}")
        }
    }
}

enum RunError {
    Instantiate(wasmtime::Error),
    Call(wasmtime::Error),
}

fn classify(outcome: &Outcome, e: RunError, memory_hit: bool) -> Failure {
    let (e, instantiating) = match e {
        RunError::Instantiate(e) => (e, true),
        RunError::Call(e) => (e, false),
    };
    if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
        outcome.log_time_limit(Phase::Response);
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

/// Accepts connections on `listener` under `limits` until `shutdown`
/// resolves, then stops accepting and waits up to `grace` for in-flight
/// requests to finish.
pub async fn serve_on(
    router: Arc<Router>,
    listener: tokio::net::TcpListener,
    limits: ConnectionLimits,
    shutdown: impl std::future::Future<Output = ()>,
    grace: Duration,
) {
    let table = Arc::new(RouteTable::new(router));
    connections::serve(table, listener, limits, shutdown, grace).await;
}

/// As [`serve_on`], routing through `table`, which may be swapped while serving.
pub async fn serve_table(
    table: Arc<RouteTable>,
    listener: tokio::net::TcpListener,
    limits: ConnectionLimits,
    shutdown: impl std::future::Future<Output = ()>,
    grace: Duration,
) {
    connections::serve(table, listener, limits, shutdown, grace).await;
}

/// What a health check saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// The function answered with this status.
    Status(u16),
    /// The function failed without answering (the reason, for the user).
    Failed(String),
}

/// Sends one `GET path` to `deployed` directly, in a fresh store of its own
/// (not through any route table), and reads the whole response body.
pub(crate) async fn probe(deployed: &Deployed, path: &str) -> Probe {
    let req = match Request::get(path)
        .header(hyper::header::HOST, "localhost")
        .body(http_body_util::Empty::<Bytes>::new())
    {
        Ok(r) => r,
        Err(e) => return Probe::Failed(format!("bad health-check path {path:?}: {e}")),
    };
    match run(deployed, req).await {
        Ok((resp, _deadline)) => {
            let status = resp.status().as_u16();
            match resp.into_body().collect().await {
                Ok(_) => Probe::Status(status),
                Err(e) => Probe::Failed(format!("response body failed: {e}")),
            }
        }
        Err(f) => {
            let reason = match f {
                Failure::NoRoute => "no route".to_string(),
                Failure::Busy(m) => format!("no instance capacity: {m}"),
                Failure::TimeLimit => "time limit exceeded".to_string(),
                Failure::MemoryLimit => "memory limit exceeded".to_string(),
                Failure::Trapped(m) => format!("trapped: {m}"),
                Failure::Host(m) => format!("host error: {m}"),
            };
            Probe::Failed(reason)
        }
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

/// Connections the kernel queues for `accept` (it caps this at
/// `net.core.somaxconn`). A deep queue lets a burst of connections wait for
/// the accept loop instead of having their SYNs dropped and retried seconds later.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds `addr` (with `SO_REUSEADDR`, as `TcpListener::bind` does) and listens.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, Error> {
    let io = |source| Error::Io {
        what: format!("listening on {addr}"),
        source,
    };
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(io)?;
    socket.set_reuseaddr(true).map_err(io)?;
    socket.bind(addr).map_err(io)?;
    socket.listen(LISTEN_BACKLOG).map_err(io)
}
