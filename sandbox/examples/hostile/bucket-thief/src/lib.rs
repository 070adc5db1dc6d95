//! Hostile: opens a bucket granted to another function.

use guest::caps::wasi::keyvalue::{atomics, store};
use guest::wasi::http::types::{IncomingRequest, ResponseOutparam};

struct BucketThief;

impl guest::wasi::exports::http::incoming_handler::Guest for BucketThief {
    fn handle(_request: IncomingRequest, out: ResponseOutparam) {
        match store::open("counters") {
            Ok(bucket) => {
                let n = atomics::increment(&bucket, "hits", 1000);
                guest::respond(out, 200, format!("tampered: {n:?}\n").as_bytes())
            }
            Err(e) => guest::respond(out, 403, format!("bucket denied: {e:?}\n").as_bytes()),
        }
    }
}

guest::wasi::http::proxy::export!(BucketThief with_types_in guest::wasi);
