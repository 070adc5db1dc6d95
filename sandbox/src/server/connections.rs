//! Client connections: the connection cap, the header-read and idle
//! timeouts, accept back-off when file descriptors run out, and what each
//! cut-off answers and logs.
//!
//! | event | the client gets | log line (at most one a second per kind) |
//! | --- | --- | --- |
//! | no request on a connection for the idle timeout | the connection closed, no response | `closed idle connection` |
//! | a request's headers not complete within the header timeout | `408`, then closed | `closed connection: request headers not received in time` |
//! | a new connection at the cap, some connection idle | the longest-idle connection closed | `connection limit reached: closed the longest-idle connection` |
//! | a new connection at the cap, every connection busy | `503`, then closed | `connection limit reached and every connection busy: answered 503` |
//! | a response body cut at its request's deadline (see `body.rs`) | the connection reset | (the function's time-limit line) |
//! | `accept` fails for lack of file descriptors | (waits in the backlog) | `accept: out of file descriptors` |

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, Semaphore};

use super::io::TrackedIo;
use super::log_limit::LogLimiter;
use super::RouteTable;

/// Default connection cap.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Default time a client has to send a request's headers, from their first byte.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a connection may stay open without a request.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Refusals (`503`) being written at once; past it a refused connection is
/// closed without an answer.
const MAX_REFUSALS_IN_FLIGHT: usize = 64;
/// How long a `503` or `408` waits for the client to take it before closing.
const LINGER: Duration = Duration::from_secs(1);
/// How much a closing connection reads (and discards) so that the client sees
/// the answer rather than a reset.
const DRAIN_LIMIT: usize = 64 << 10;
/// Connections chosen for closing but not closed yet may take the count this
/// far past the cap; beyond it the accept loop waits for them to close (new
/// connections wait in the kernel's listen queue meanwhile), so the file
/// descriptors in use stay bounded.
const EVICTION_SLACK: usize = 32;
/// First and longest pause after `accept` failed.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));

/// Limits on client connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Open connections at most (lowered to fit the open-file limit).
    pub max_connections: usize,
    /// Time from a request's first byte to the end of its headers.
    pub header_timeout: Duration,
    /// Time a connection may stay open with no request.
    pub idle_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// One connection's state, shared by its socket, its requests and its watchdog.
#[derive(Debug)]
pub(crate) struct ConnState {
    base: Instant,
    /// Requests being served (their response bodies not yet done).
    in_request: AtomicU32,
    /// Milliseconds since `base` when the connection last became idle.
    idle_since: AtomicU64,
    /// Milliseconds since `base` (plus one) when bytes of the next request
    /// first arrived; 0 while none have.
    head_started: AtomicU64,
    /// Whether a request was ever served on it (a keep-alive client that is
    /// likely to send another).
    served: AtomicBool,
    /// Whether a read since it became idle found the socket empty. Until
    /// then a request may be waiting unread in the kernel (its task not yet
    /// run), and closing the connection would reset it.
    seen_empty: AtomicBool,
    /// Chosen to make room for a new connection.
    evicted: AtomicBool,
    /// A response body was cut at its deadline: close with a reset, dropping
    /// what the kernel still holds for a client that reads too slowly.
    abort: AtomicBool,
    /// Wakes the watchdog (a request's first bytes arrived, or eviction).
    wake: Notify,
}

impl ConnState {
    fn new(base: Instant) -> ConnState {
        let now = base.elapsed().as_millis() as u64;
        ConnState {
            base,
            in_request: AtomicU32::new(0),
            idle_since: AtomicU64::new(now),
            head_started: AtomicU64::new(0),
            served: AtomicBool::new(false),
            seen_empty: AtomicBool::new(false),
            evicted: AtomicBool::new(false),
            abort: AtomicBool::new(false),
            wake: Notify::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    /// Called by the socket when a read finds nothing to read.
    pub(crate) fn on_read_pending(&self) {
        if self.in_request.load(Ordering::SeqCst) == 0
            && self.head_started.load(Ordering::SeqCst) == 0
        {
            self.seen_empty.store(true, Ordering::SeqCst);
        }
    }

    /// Called by the socket whenever bytes arrive.
    pub(crate) fn on_bytes_read(&self) {
        self.seen_empty.store(false, Ordering::SeqCst);
        if self.in_request.load(Ordering::SeqCst) == 0
            && self.head_started.load(Ordering::SeqCst) == 0
        {
            self.head_started.store(self.now_ms() + 1, Ordering::SeqCst);
            self.wake.notify_one();
        }
    }

    /// A request's headers are complete; the connection is busy until the guard drops.
    pub(crate) fn begin_request(self: &Arc<Self>) -> RequestGuard {
        self.in_request.fetch_add(1, Ordering::SeqCst);
        self.head_started.store(0, Ordering::SeqCst);
        self.served.store(true, Ordering::SeqCst);
        self.seen_empty.store(false, Ordering::SeqCst);
        RequestGuard(self.clone())
    }

    /// Undoes an eviction of a connection found to have a request waiting: it
    /// counts as receiving its headers from now on (never chosen again before
    /// they are in, and held to the header timeout).
    fn rescue(&self) {
        self.evicted.store(false, Ordering::SeqCst);
        self.on_bytes_read();
    }

    fn is_idle(&self) -> bool {
        self.in_request.load(Ordering::SeqCst) == 0 && !self.evicted.load(Ordering::SeqCst)
    }

    fn verdict(&self, limits: &ConnectionLimits) -> Verdict {
        if self.evicted.load(Ordering::SeqCst) {
            return Verdict::Evicted;
        }
        let now = self.now_ms();
        let at = |ms: u64| Verdict::WaitUntil(self.base + Duration::from_millis(ms));
        if self.in_request.load(Ordering::SeqCst) > 0 {
            // The request has its own deadline; look again later.
            return at(now + limits.idle_timeout.as_millis() as u64);
        }
        let head = self.head_started.load(Ordering::SeqCst);
        if head != 0 {
            let due = head - 1 + limits.header_timeout.as_millis() as u64;
            return if now >= due {
                Verdict::HeaderTimeout
            } else {
                at(due)
            };
        }
        let due = self.idle_since.load(Ordering::SeqCst) + limits.idle_timeout.as_millis() as u64;
        if now >= due {
            Verdict::Idle
        } else {
            at(due)
        }
    }
}

/// Held while a request is served (moved into its response body).
#[derive(Debug)]
pub(crate) struct RequestGuard(Arc<ConnState>);

impl RequestGuard {
    /// The response was cut off: the connection ends with a reset.
    pub(crate) fn abort_connection(&self) {
        self.0.abort.store(true, Ordering::SeqCst);
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let c = &self.0;
        if c.in_request.fetch_sub(1, Ordering::SeqCst) == 1 {
            c.head_started.store(0, Ordering::SeqCst);
            c.idle_since.store(c.now_ms(), Ordering::SeqCst);
        }
    }
}

enum Verdict {
    WaitUntil(Instant),
    Idle,
    HeaderTimeout,
    Evicted,
}

#[derive(Debug, Default)]
struct Logs {
    idle: LogLimiter,
    header: LogLimiter,
    evicted: LogLimiter,
    refused: LogLimiter,
    accept: LogLimiter,
}

/// Every open connection of one server.
#[derive(Debug)]
pub(crate) struct Registry {
    limits: ConnectionLimits,
    base: Instant,
    next_id: AtomicU64,
    conns: Mutex<HashMap<u64, Arc<ConnState>>>,
    changed: Notify,
    refusals: Arc<Semaphore>,
    logs: Logs,
}

enum Admission {
    Admitted(u64, Arc<ConnState>),
    Full,
}

impl Registry {
    pub(crate) fn new(limits: ConnectionLimits) -> Arc<Registry> {
        Arc::new(Registry {
            limits,
            base: Instant::now(),
            next_id: AtomicU64::new(0),
            conns: Mutex::new(HashMap::new()),
            changed: Notify::new(),
            refusals: Arc::new(Semaphore::new(MAX_REFUSALS_IN_FLIGHT)),
            logs: Logs::default(),
        })
    }

    fn conns(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<ConnState>>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn len(&self) -> usize {
        self.conns().len()
    }

    /// Marks the longest-idle connection for closing; false if none is idle.
    ///
    /// Order of preference: connections that never carried a request (opened
    /// and left silent; those last seen empty first), then keep-alive
    /// connections between requests (those seen empty first), then
    /// connections in the middle of sending their headers; the longest idle
    /// first within each. Closing a connection with an unread request resets
    /// it, which its client sees as an error; a client that already got
    /// answers on its connection is kept over new silent ones: in a flood of
    /// new connections, most are not yet looked at when the cap is reached,
    /// and preferring them over a served client's connection that was seen
    /// empty reset that client's next request (seen under load in CI).
    fn evict_longest_idle(conns: &HashMap<u64, Arc<ConnState>>) -> bool {
        let victim = conns.values().filter(|c| c.is_idle()).min_by_key(|c| {
            (
                c.head_started.load(Ordering::SeqCst) != 0,
                c.served.load(Ordering::SeqCst),
                !c.seen_empty.load(Ordering::SeqCst),
                c.idle_since.load(Ordering::SeqCst),
            )
        });
        match victim {
            Some(v) => {
                v.evicted.store(true, Ordering::SeqCst);
                v.wake.notify_one();
                true
            }
            None => false,
        }
    }

    fn admit(&self) -> Admission {
        let mut conns = self.conns();
        if conns.len() >= self.limits.max_connections {
            if !Self::evict_longest_idle(&conns) {
                return Admission::Full;
            }
            if let Some(suppressed) = self.logs.evicted.check() {
                tracing::info!(
                    max_connections = self.limits.max_connections,
                    suppressed,
                    "connection limit reached: closed the longest-idle connection"
                );
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(ConnState::new(self.base));
        conns.insert(id, state.clone());
        Admission::Admitted(id, state)
    }

    fn remove(&self, id: u64) {
        self.conns().remove(&id);
        self.changed.notify_waiters();
    }

    /// Serves `stream`, or refuses it when every connection is busy.
    fn start(
        self: &Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        table: &Arc<RouteTable>,
        stop: &watch::Receiver<bool>,
    ) {
        match self.admit() {
            Admission::Admitted(id, state) => {
                tokio::spawn(connection(
                    self.clone(),
                    id,
                    state,
                    stream,
                    peer,
                    table.clone(),
                    stop.clone(),
                ));
            }
            Admission::Full => {
                if let Some(suppressed) = self.logs.refused.check() {
                    tracing::warn!(
                        max_connections = self.limits.max_connections,
                        %peer,
                        suppressed,
                        "connection limit reached and every connection busy: answered 503"
                    );
                }
                // A refusal holds a file descriptor for up to LINGER; past
                // MAX_REFUSALS_IN_FLIGHT the connection is just closed.
                if let Ok(permit) = self.refusals.clone().try_acquire_owned() {
                    let body = format!(
                        "server at its connection limit ({} connections, all busy); try again later\n",
                        self.limits.max_connections
                    );
                    tokio::spawn(async move {
                        close_with(
                            stream,
                            &plain_response("503 Service Unavailable", &body, true),
                        )
                        .await;
                        drop(permit);
                    });
                }
            }
        }
    }

    /// Waits until fewer than cap + [`EVICTION_SLACK`] connections are open
    /// (evicted connections are closing), at most 100 ms at a time.
    async fn wait_for_room(&self) {
        let room = self.limits.max_connections + EVICTION_SLACK;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(100);
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.len() < room {
                return;
            }
            tokio::select! {
                () = changed => {}
                () = tokio::time::sleep_until(deadline) => return,
            }
        }
    }

    /// Waits until every connection has ended, at most until `deadline`.
    async fn wait_empty(&self, deadline: tokio::time::Instant) -> bool {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.len() == 0 {
                return true;
            }
            tokio::select! {
                () = changed => {}
                () = tokio::time::sleep_until(deadline) => return false,
            }
        }
    }
}

/// Removes the connection from the registry when its task ends.
struct Registered {
    registry: Arc<Registry>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.remove(self.id);
    }
}

/// A complete HTTP/1.1 response with `connection: close`.
fn plain_response(status: &str, body: &str, retry: bool) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n{}connection: close\r\n\r\n{body}",
        body.len(),
        if retry { "retry-after: 1\r\n" } else { "" }
    )
    .into_bytes()
}

/// Writes `response`, half-closes, and reads what the client still sends
/// (bounded in time and bytes) so that closing does not reset the connection
/// before the client has read the answer.
async fn close_with(mut stream: TcpStream, response: &[u8]) {
    let _ = tokio::time::timeout(LINGER, async {
        stream.write_all(response).await?;
        stream.shutdown().await?;
        let mut buf = [0u8; 4096];
        let mut drained = 0;
        while drained < DRAIN_LIMIT {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            drained += n;
        }
        Ok::<(), std::io::Error>(())
    })
    .await;
}

/// Serves one connection with hyper, watching its idle and header deadlines.
async fn connection(
    registry: Arc<Registry>,
    id: u64,
    state: Arc<ConnState>,
    stream: TcpStream,
    peer: SocketAddr,
    table: Arc<RouteTable>,
    mut stop: watch::Receiver<bool>,
) {
    let _registered = Registered {
        registry: registry.clone(),
        id,
    };
    let _ = stream.set_nodelay(true);
    let stream = Arc::new(stream);
    let limits = registry.limits;
    let end = {
        let io = TokioIo::new(TrackedIo::new(stream.clone(), state.clone()));
        let conn_state = state.clone();
        let service = hyper::service::service_fn(move |req| {
            let guard = conn_state.begin_request();
            // One snapshot per request: it is served wholly by this table.
            table.snapshot().handle(req, guard)
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .serve_connection(io, service);
        tokio::pin!(conn);
        let mut stopping = false;
        loop {
            if !stopping && *stop.borrow() {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
            let until = match state.verdict(&limits) {
                Verdict::WaitUntil(t) => t,
                Verdict::Evicted if has_unread_bytes(&stream) => {
                    // Chosen while its request sat unread in the kernel (this
                    // task had not run yet, as under a flood on a loaded
                    // host): closing would reset a client that did nothing
                    // wrong. It stays, and its request is read now; the
                    // registry is over its cap by one until a later
                    // admission evicts an idle connection.
                    state.rescue();
                    continue;
                }
                other => break other,
            };
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, "connection ended: {e}");
                    }
                    if state.abort.load(Ordering::SeqCst) {
                        // Linger 0: close sends a reset and frees the send
                        // buffer instead of waiting for a slow reader to drain it.
                        let _ = rustix::net::sockopt::set_socket_linger(&*stream, Some(Duration::ZERO));
                    }
                    return;
                }
                () = tokio::time::sleep_until(until.into()) => {}
                () = state.wake.notified() => {}
                r = stop.changed(), if !stopping => {
                    if r.is_err() {
                        stopping = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
        }
    };
    match end {
        Verdict::Idle => {
            if let Some(suppressed) = registry.logs.idle.check() {
                tracing::info!(
                    %peer,
                    idle_timeout_ms = limits.idle_timeout.as_millis() as u64,
                    suppressed,
                    "closed idle connection: no request within the idle timeout"
                );
            }
        }
        Verdict::HeaderTimeout => {
            if let Some(suppressed) = registry.logs.header.check() {
                tracing::warn!(
                    %peer,
                    header_timeout_ms = limits.header_timeout.as_millis() as u64,
                    suppressed,
                    "closed connection: request headers not received in time; answered 408"
                );
            }
            if let Ok(stream) = Arc::try_unwrap(stream) {
                let body = format!(
                    "request headers not received within {} ms\n",
                    limits.header_timeout.as_millis()
                );
                close_with(stream, &plain_response("408 Request Timeout", &body, false)).await;
            }
        }
        Verdict::Evicted | Verdict::WaitUntil(_) => {}
    }
}

/// Whether the kernel holds bytes of this connection that were not read yet.
fn has_unread_bytes(stream: &TcpStream) -> bool {
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    matches!(
        rustix::net::recv(
            stream,
            &mut byte[..],
            rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT,
        ),
        Ok((_, n)) if n > 0
    )
}

/// Whether `e` means the process or system ran out of file descriptors.
fn out_of_fds(e: &std::io::Error) -> bool {
    let code = e.raw_os_error();
    code == Some(rustix::io::Errno::MFILE.raw_os_error())
        || code == Some(rustix::io::Errno::NFILE.raw_os_error())
}

/// Accepts connections on `listener` until `shutdown` resolves, then stops
/// accepting, lets every connection finish its request in flight, and waits
/// for them at most `grace`.
pub(crate) async fn serve(
    table: Arc<RouteTable>,
    listener: TcpListener,
    limits: ConnectionLimits,
    shutdown: impl std::future::Future<Output = ()>,
    grace: Duration,
) {
    let registry = Registry::new(limits);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut backoff = ACCEPT_BACKOFF.0;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            () = registry.wait_for_room() => {}
        }
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    backoff = ACCEPT_BACKOFF.0;
                    registry.start(stream, peer, &table, &stop_rx);
                }
                Err(e) => {
                    let fds = out_of_fds(&e);
                    if fds {
                        // Free a descriptor for the next accept, if any connection is idle.
                        Registry::evict_longest_idle(&registry.conns());
                    }
                    if let Some(suppressed) = registry.logs.accept.check() {
                        if fds {
                            tracing::warn!(
                                open_connections = registry.len(),
                                backoff_ms = backoff.as_millis() as u64,
                                suppressed,
                                "accept: out of file descriptors ({e}); closing the longest-idle connection and backing off"
                            );
                        } else {
                            tracing::warn!(suppressed, "accept failed: {e}");
                        }
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF.1);
                }
            },
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!("shutting down: no new connections; waiting for in-flight requests");
    let _ = stop_tx.send(true);
    if registry
        .wait_empty(
            tokio::time::Instant::now()
                .checked_add(grace)
                // A grace too long to add: a year is "wait for them".
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(365 * 86_400)),
        )
        .await
    {
        tracing::info!("all requests finished");
    } else {
        tracing::warn!("gave up waiting for in-flight requests after {grace:?}");
    }
}
