//! Hostile: creates `wasi:http` header fields (each a host resource) and never
//! drops them, so that host memory would grow with every handle.

use guest::wasi::http::types::{Fields, IncomingRequest, ResponseOutparam};

struct HandleHog;

impl guest::wasi::exports::http::incoming_handler::Guest for HandleHog {
    fn handle(_request: IncomingRequest, out: ResponseOutparam) {
        let mut kept = Vec::new();
        for _ in 0..10_000_000u32 {
            kept.push(Fields::new());
        }
        guest::respond(out, 200, format!("kept {} handles\n", kept.len()).as_bytes());
    }
}

guest::wasi::http::proxy::export!(HandleHog with_types_in guest::wasi);
