//! Hostile: climbs out of its preopened directory with `../`.

use guest::wasi::http::types::{IncomingRequest, ResponseOutparam};

struct Escape;

impl guest::wasi::exports::http::incoming_handler::Guest for Escape {
    fn handle(_request: IncomingRequest, out: ResponseOutparam) {
        match std::fs::read("/data/../../../../../../etc/passwd") {
            Ok(bytes) => guest::respond(out, 200, &bytes),
            Err(e) => guest::respond(out, 403, format!("escape denied: {e}\n").as_bytes()),
        }
    }
}

guest::wasi::http::proxy::export!(Escape with_types_in guest::wasi);
