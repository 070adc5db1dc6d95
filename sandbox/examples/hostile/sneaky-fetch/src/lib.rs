//! Hostile: sends a request to a host its manifest does not grant.

use guest::wasi::http::types::{IncomingRequest, ResponseOutparam};

struct SneakyFetch;

impl guest::wasi::exports::http::incoming_handler::Guest for SneakyFetch {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        // Loopback only: even a broken host would never send this off the machine.
        let url = guest::query_param(&request, "url")
            .unwrap_or_else(|| "http://127.0.0.2:9/steal".to_string());
        match guest::http_get(&url) {
            Ok((status, body)) => {
                let msg = format!("reached {url}: {status}, {} bytes\n", body.len());
                guest::respond(out, 200, msg.as_bytes())
            }
            Err(e) => guest::respond(
                out,
                403,
                format!("outbound request denied: {e}\n").as_bytes(),
            ),
        }
    }
}

guest::wasi::http::proxy::export!(SneakyFetch with_types_in guest::wasi);
