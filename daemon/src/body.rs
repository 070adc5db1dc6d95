//! Request bodies the daemon refuses part-way.
//!
//! A client that sends a body larger than the daemon takes is still writing when the
//! daemon decides to answer 413. If the daemon answered and closed at once, the client
//! would get a broken pipe on its next write and, depending on timing, never read the
//! answer that says what was wrong. So after refusing, the daemon reads and drops what
//! the client still sends (as a web server's lingering close does), up to a bound in
//! bytes and time, and only then answers.

use std::time::Duration;

use axum::body::BodyDataStream;
use futures_util::StreamExt;

use crate::error::ApiError;

/// At most this much more is read and dropped after a refusal.
pub const DRAIN_MAX_BYTES: u64 = 1 << 30;
/// For at most this long.
pub const DRAIN_MAX_TIME: Duration = Duration::from_secs(30);

/// Reads the rest of `stream` and drops it (bounded by [`DRAIN_MAX_BYTES`] and
/// [`DRAIN_MAX_TIME`]).
pub async fn drain(stream: &mut BodyDataStream) {
    let mut dropped = 0u64;
    let read = async {
        while let Some(Ok(chunk)) = stream.next().await {
            dropped += chunk.len() as u64;
            if dropped > DRAIN_MAX_BYTES {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_MAX_TIME, read).await;
}

/// Reads a whole body of at most `max` bytes. A larger one is drained (see the module
/// documentation) and refused with 413, saying "`what` may be at most …"; a body the
/// connection cut short is a 400.
pub async fn read_capped(
    body: axum::body::Body,
    max: usize,
    what: &str,
) -> Result<axum::body::Bytes, ApiError> {
    let mut stream = body.into_data_stream();
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad_request(format!("reading the body: {e}")))?;
        if out.len() + chunk.len() > max {
            drain(&mut stream).await;
            let limit = if max >= 1 << 20 {
                format!("{} MiB", max >> 20)
            } else {
                format!("{} KiB", max >> 10)
            };
            return Err(ApiError::too_large(format!(
                "{what} may be at most {limit}"
            )));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out.into())
}
