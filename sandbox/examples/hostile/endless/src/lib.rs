//! Hostile: answers 200 and streams its body forever, 4 KiB at a time.
//! `?interval_ms=N` sleeps N ms (in the host, where epoch deadlines do not
//! reach) between chunks; without it, it writes as fast as the client reads.

use guest::wasi::clocks::monotonic_clock;
use guest::wasi::http::types::{Fields, IncomingRequest, OutgoingResponse, ResponseOutparam};

struct Endless;

impl guest::wasi::exports::http::incoming_handler::Guest for Endless {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let interval_ms: u64 = guest::query_param(&request, "interval_ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let resp = OutgoingResponse::new(Fields::new());
        let Ok(body) = resp.body() else { return };
        ResponseOutparam::set(out, Ok(resp));
        let Ok(stream) = body.write() else { return };
        let chunk = [b'x'; 4096];
        loop {
            if stream.blocking_write_and_flush(&chunk).is_err() {
                return;
            }
            if interval_ms > 0 {
                monotonic_clock::subscribe_duration(interval_ms * 1_000_000).block();
            }
        }
    }
}

guest::wasi::http::proxy::export!(Endless with_types_in guest::wasi);
