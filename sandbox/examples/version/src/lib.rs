//! Names the version serving it: answers `version NAME` with NAME from the
//! config value `version` its grants hold. A deploy that grants
//! `config = { version = "v2" }` makes every answer of that version say so,
//! which is how the deploy tests tell versions apart.

use guest::caps::wasi::config::store as config;
use guest::wasi::http::types::{IncomingRequest, ResponseOutparam};

struct Version;

impl guest::wasi::exports::http::incoming_handler::Guest for Version {
    fn handle(_request: IncomingRequest, out: ResponseOutparam) {
        match config::get("version") {
            Ok(Some(v)) => guest::respond(out, 200, format!("version {v}\n").as_bytes()),
            Ok(None) => guest::respond(out, 500, b"no config value `version` granted\n"),
            Err(e) => guest::respond(out, 403, format!("config denied: {e:?}\n").as_bytes()),
        }
    }
}

guest::wasi::http::proxy::export!(Version with_types_in guest::wasi);
