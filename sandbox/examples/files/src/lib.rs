//! A file reader: returns a file from the read-only preopened directory `/data`.

use guest::wasi::http::types::{IncomingRequest, ResponseOutparam};

struct Files;

impl guest::wasi::exports::http::incoming_handler::Guest for Files {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let name = guest::query_param(&request, "name").unwrap_or_else(|| "hello.txt".to_string());
        if name.contains('/') {
            return guest::respond(out, 400, b"name must be a plain file name\n");
        }
        let prefix = std::env::var("GREETING").unwrap_or_default();
        match std::fs::read(format!("/data/{name}")) {
            Ok(bytes) => {
                let mut body = prefix.into_bytes();
                body.extend_from_slice(&bytes);
                guest::respond(out, 200, &body)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                guest::respond(out, 404, b"no such file\n")
            }
            Err(e) => guest::respond(out, 403, format!("cannot read: {e}\n").as_bytes()),
        }
    }
}

guest::wasi::http::proxy::export!(Files with_types_in guest::wasi);
