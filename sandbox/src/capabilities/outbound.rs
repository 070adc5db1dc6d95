//! Outbound HTTP: the `wasi:http` outgoing-request hook checks every request's
//! destination against the function's `outbound` grants before a connection
//! is attempted. A denied request fails with `HTTP-request-denied`.
//!
//! A request to `http://NAME/…` where `NAME` is one of the function's granted
//! `capabilities` goes over Noise instead (see [`super::wire`]).

use std::future::Future;
use std::sync::Arc;

use http_body_util::BodyExt;
use wasmtime_wasi_http::{RequestOptions, WasiBody, WasiHttpHooks};

use super::FnCaps;

/// The per-request `wasi:http` hooks of one function.
#[derive(Debug, Clone)]
pub struct OutboundPolicy {
    caps: Arc<FnCaps>,
}

impl OutboundPolicy {
    /// Hooks enforcing `caps.grants.outbound`.
    pub fn new(caps: Arc<FnCaps>) -> OutboundPolicy {
        OutboundPolicy { caps }
    }
}

pub(crate) type SendResult = wasmtime_wasi_http::Result<(
    http::Response<WasiBody>,
    Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
)>;

impl WasiHttpHooks for OutboundPolicy {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
    ) -> Box<dyn Future<Output = SendResult> + Send> {
        drop(fut);
        let uri = request.uri();
        let host = uri.host().unwrap_or("");
        let https = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        if !https && uri.port().is_none() && self.caps.grants.capabilities.iter().any(|c| c == host)
        {
            let name = host.to_owned();
            return Box::new(super::wire::call(self.caps.clone(), name, request, options));
        }
        if super::wire::is_held_capability(&self.caps, host) {
            tracing::warn!(
                function = %self.caps.name,
                capability = %"cap",
                name = %host,
                "denied: capability not granted"
            );
            return Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) });
        }
        if !self.caps.grants.allows_outbound(host, port) {
            tracing::warn!(
                function = %self.caps.name,
                capability = %"outbound",
                destination = %format_args!("{host}:{port}"),
                "denied: outbound host not granted"
            );
            return Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) });
        }
        Box::new(async move {
            let (response, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            Ok((
                response.map(BodyExt::boxed_unsync),
                Box::new(io) as Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
            ))
        })
    }
}
