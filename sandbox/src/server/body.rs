//! Response bodies as hyper sends them. Each holds its connection's request
//! guard (the connection counts as busy, not idle, until the body is done);
//! a function's body also carries the request's deadline, so the time limit
//! covers the whole response: a function streaming forever, or a client
//! reading one byte a second, is cut off at the deadline (the connection is
//! closed before the body's end, which the client sees as a truncated body).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;

use super::connections::RequestGuard;
use crate::capabilities::FnCaps;

/// Where a request was when its time limit passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Before the function set its response: the client gets `504`.
    Response,
    /// While the response body was being sent: the connection is closed.
    Body,
}

/// What a request's task, its supervisor and its response body share.
#[derive(Debug)]
pub(crate) struct Outcome {
    caps: Arc<FnCaps>,
    failed: AtomicBool,
    logged: AtomicBool,
}

impl Outcome {
    pub(crate) fn new(caps: Arc<FnCaps>) -> Arc<Outcome> {
        Arc::new(Outcome {
            caps,
            failed: AtomicBool::new(false),
            logged: AtomicBool::new(false),
        })
    }

    /// The function trapped or was stopped: a body that ends now is incomplete.
    /// Called before the request's store is dropped.
    pub(crate) fn mark_failed(&self) {
        self.failed.store(true, Ordering::SeqCst);
    }

    fn failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// Logs (once per request) that the time limit stopped the request.
    pub(crate) fn log_time_limit(&self, phase: Phase) {
        if self.logged.swap(true, Ordering::SeqCst) {
            return;
        }
        let limit_ms = self.caps.grants.time_limit.as_millis() as u64;
        match phase {
            Phase::Response => tracing::warn!(
                function = %self.caps.name,
                capability = %"time",
                limit_ms,
                "stopped: time limit exceeded"
            ),
            Phase::Body => tracing::warn!(
                function = %self.caps.name,
                capability = %"time",
                limit_ms,
                "stopped: time limit exceeded while sending the response body; connection closed"
            ),
        }
    }
}

/// A function's body is cut at `at`.
#[derive(Debug)]
pub(crate) struct BodyDeadline {
    pub(crate) at: tokio::time::Instant,
    pub(crate) outcome: Arc<Outcome>,
}

/// A response body with its connection's request guard and, for a function's
/// response, its deadline.
pub(crate) struct GuardedBody {
    inner: HyperOutgoingBody,
    deadline: Option<(Pin<Box<tokio::time::Sleep>>, Arc<Outcome>)>,
    /// `None` for a capability call (its Noise session has no connection limits).
    request: Option<RequestGuard>,
}

impl GuardedBody {
    pub(crate) fn new(
        inner: HyperOutgoingBody,
        request: Option<RequestGuard>,
        deadline: Option<BodyDeadline>,
    ) -> GuardedBody {
        GuardedBody {
            inner,
            deadline: deadline.map(|d| (Box::pin(tokio::time::sleep_until(d.at)), d.outcome)),
            request,
        }
    }
}

impl Body for GuardedBody {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some((sleep, outcome)) = &mut self.deadline {
            if sleep.as_mut().poll(cx).is_ready() {
                outcome.mark_failed();
                outcome.log_time_limit(Phase::Body);
                if let Some(r) = &self.request {
                    r.abort_connection();
                }
                return Poll::Ready(Some(Err(wasmtime_wasi_http::Error::HttpResponseTimeout)));
            }
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            // The function's store went away without finishing its body (it
            // trapped or was stopped): end with an error so that hyper closes
            // the connection instead of presenting a truncated body as whole.
            Poll::Ready(None) if self.deadline.as_ref().is_some_and(|(_, o)| o.failed()) => {
                if let Some(r) = &self.request {
                    r.abort_connection();
                }
                Poll::Ready(Some(Err(wasmtime_wasi_http::Error::HttpResponseIncomplete)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
