//! An outbound fetcher: returns the body of `?url=`, if the manifest grants its host.

use guest::wasi::http::types::{IncomingRequest, ResponseOutparam};

struct Fetch;

impl guest::wasi::exports::http::incoming_handler::Guest for Fetch {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let Some(url) = guest::query_param(&request, "url") else {
            return guest::respond(out, 400, b"usage: /fetch?url=http://host:port/path\n");
        };
        match guest::http_get(&url) {
            Ok((200, body)) => guest::respond(out, 200, &body),
            Ok((status, _)) => {
                guest::respond(out, 502, format!("upstream answered {status}\n").as_bytes())
            }
            Err(e) if e.contains("HttpRequestDenied") => guest::respond(
                out,
                403,
                format!("outbound request denied: {e}\n").as_bytes(),
            ),
            Err(e) => guest::respond(
                out,
                502,
                format!("outbound request failed: {e}\n").as_bytes(),
            ),
        }
    }
}

guest::wasi::http::proxy::export!(Fetch with_types_in guest::wasi);
