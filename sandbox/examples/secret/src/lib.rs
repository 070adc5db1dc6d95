//! A secret reader: shows a config value and proves it holds the granted secret.

use guest::caps::hostd::capabilities::secrets::Secret;
use guest::caps::wasi::config::store as config;
use guest::wasi::http::types::{IncomingRequest, ResponseOutparam};

struct SecretReader;

impl guest::wasi::exports::http::incoming_handler::Guest for SecretReader {
    fn handle(_request: IncomingRequest, out: ResponseOutparam) {
        let greeting = match config::get("greeting") {
            Ok(Some(g)) => g,
            Ok(None) => "(none)".to_string(),
            Err(e) => {
                return guest::respond(out, 403, format!("config denied: {e:?}\n").as_bytes())
            }
        };
        let token = match Secret::open("api-token").and_then(|s| s.reveal()) {
            Ok(t) => t,
            Err(e) => {
                return guest::respond(out, 403, format!("secret denied: {e:?}\n").as_bytes())
            }
        };
        let token = String::from_utf8_lossy(&token);
        let body = format!(
            "{greeting}; api-token is {} bytes: {}\n",
            token.trim().len(),
            token.trim()
        );
        guest::respond(out, 200, body.as_bytes());
    }
}

guest::wasi::http::proxy::export!(SecretReader with_types_in guest::wasi);
