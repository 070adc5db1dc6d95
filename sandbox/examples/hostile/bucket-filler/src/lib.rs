//! Hostile: writes `?mb=N` MB (default 100) into bucket `fill`, in values of
//! `?value_kb=K` KiB (default 512), until a write fails. Answers 507 with the
//! error the host gave, or 200 when everything fit.

use guest::caps::wasi::keyvalue::store;
use guest::wasi::http::types::{IncomingRequest, ResponseOutparam};

struct BucketFiller;

impl guest::wasi::exports::http::incoming_handler::Guest for BucketFiller {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let param = |name: &str, default: u64| {
            guest::query_param(&request, name)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(default)
        };
        let total = param("mb", 100) << 20;
        let value_len = (param("value_kb", 512) << 10).max(1);
        let bucket = match store::open("fill") {
            Ok(b) => b,
            Err(e) => {
                return guest::respond(out, 403, format!("cannot open bucket: {e:?}\n").as_bytes())
            }
        };
        let value = vec![0xa5u8; value_len as usize];
        let mut written = 0u64;
        let mut i = 0u64;
        while written < total {
            if let Err(e) = bucket.set(&format!("chunk-{i}"), &value) {
                let msg = match e {
                    store::Error::Other(m) => m,
                    other => format!("{other:?}"),
                };
                return guest::respond(
                    out,
                    507,
                    format!("wrote {written} bytes, then: {msg}\n").as_bytes(),
                );
            }
            written += value_len;
            i += 1;
        }
        guest::respond(out, 200, format!("wrote {written} bytes\n").as_bytes())
    }
}

guest::wasi::http::proxy::export!(BucketFiller with_types_in guest::wasi);
