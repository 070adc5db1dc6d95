//! Capabilities on the wire, the caller's side: a function granted the
//! capability `NAME` sends `http://NAME/…`; the host looks the capability up
//! in its cap store (the function never sees its keys), connects to the
//! capability's location, runs the Noise handshake and carries the HTTP
//! request and its response over the session.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use wasmtime_wasi_http::{RequestOptions, WasiBody};

use super::outbound::SendResult;
use super::FnCaps;

/// Connect timeout when the function sets none.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether `name` is a capability this host holds (so that a function without
/// the grant is told "capability not granted" rather than "host not granted").
pub(crate) fn is_held_capability(caps: &FnCaps, name: &str) -> bool {
    let Some(store) = &caps.cap_store else {
        return false;
    };
    hostd_caps::capability::check_name(name).is_ok() && matches!(store.held(name), Ok(Some(_)))
}

fn refused(caps: &FnCaps, name: &str, why: &str) -> wasmtime_wasi_http::Error {
    tracing::warn!(
        function = %caps.name,
        capability = %"cap",
        name = %name,
        "capability call failed: {why}"
    );
    wasmtime_wasi_http::Error::ConnectionRefused
}

/// Sends `request` to the service of the capability held as `name`.
pub(crate) async fn call(
    caps: Arc<FnCaps>,
    name: String,
    mut request: http::Request<WasiBody>,
    options: Option<RequestOptions>,
) -> SendResult {
    let Some(store) = caps.cap_store.clone() else {
        return Err(refused(&caps, &name, "this host has no cap store"));
    };
    let lookup = {
        let name = name.clone();
        tokio::task::spawn_blocking(move || store.held(&name)).await
    };
    let cap =
        match lookup {
            Ok(Ok(Some(cap))) => cap,
            Ok(Ok(None)) => return Err(refused(
                &caps,
                &name,
                "granted, but this host holds no capability by that name (hostd cap add NAME CAP)",
            )),
            Ok(Err(e)) => return Err(refused(&caps, &name, &e.to_string())),
            Err(e) => return Err(refused(&caps, &name, &e.to_string())),
        };
    let connect_timeout = options
        .and_then(|o| o.connect_timeout)
        .unwrap_or(CONNECT_TIMEOUT);
    let tcp = match tokio::time::timeout(
        connect_timeout,
        tokio::net::TcpStream::connect(cap.location.as_str()),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return Err(refused(
                &caps,
                &name,
                &format!("connecting to {}: {e}", cap.location),
            ))
        }
        Err(_) => return Err(wasmtime_wasi_http::Error::ConnectionTimeout),
    };
    let _ = tcp.set_nodelay(true);
    let peer = cap.location.clone();
    let plain = match hostd_caps::stream::connect(tcp, &cap, peer).await {
        Ok(p) => p,
        Err(e) => {
            let why = format!("handshake with {} failed: {e}", cap.location);
            return Err(refused(&caps, &name, &why));
        }
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(plain))
        .await
        .map_err(wasmtime_wasi_http::Error::from)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let path = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    *request.uri_mut() = path
        .parse()
        .map_err(|_| wasmtime_wasi_http::Error::HttpRequestUriInvalid)?;
    let host = http::HeaderValue::from_str(&name)
        .map_err(|_| wasmtime_wasi_http::Error::HttpRequestUriInvalid)?;
    request.headers_mut().insert(http::header::HOST, host);
    tracing::debug!(function = %caps.name, capability = %"cap", name = %name, id = %cap.id(), "capability call");
    let response = sender
        .send_request(request)
        .await
        .map_err(wasmtime_wasi_http::Error::from)?;
    Ok((
        response.map(|b| b.map_err(wasmtime_wasi_http::Error::from).boxed_unsync()),
        Box::new(async { Ok(()) })
            as Box<dyn std::future::Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
    ))
}
