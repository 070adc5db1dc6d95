//! A key-value counter: each request adds one to `hits` in bucket `counters`.

use guest::caps::wasi::keyvalue::{atomics, store};
use guest::wasi::http::types::{IncomingRequest, ResponseOutparam};

struct Counter;

impl guest::wasi::exports::http::incoming_handler::Guest for Counter {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let key = guest::query_param(&request, "key").unwrap_or_else(|| "hits".to_string());
        let bucket = match store::open("counters") {
            Ok(b) => b,
            Err(e) => {
                return guest::respond(out, 403, format!("cannot open bucket: {e:?}\n").as_bytes())
            }
        };
        match atomics::increment(&bucket, &key, 1) {
            Ok(n) => guest::respond(out, 200, format!("{n}\n").as_bytes()),
            Err(e) => guest::respond(out, 500, format!("increment failed: {e:?}\n").as_bytes()),
        }
    }
}

guest::wasi::http::proxy::export!(Counter with_types_in guest::wasi);
