//! Hostile: asks for a secret granted to another function.

use guest::caps::hostd::capabilities::secrets::Secret;
use guest::wasi::http::types::{IncomingRequest, ResponseOutparam};

struct SecretThief;

impl guest::wasi::exports::http::incoming_handler::Guest for SecretThief {
    fn handle(_request: IncomingRequest, out: ResponseOutparam) {
        match Secret::open("api-token").and_then(|s| s.reveal()) {
            Ok(v) => guest::respond(out, 200, format!("stole {} bytes\n", v.len()).as_bytes()),
            Err(e) => guest::respond(out, 403, format!("secret denied: {e:?}\n").as_bytes()),
        }
    }
}

guest::wasi::http::proxy::export!(SecretThief with_types_in guest::wasi);
