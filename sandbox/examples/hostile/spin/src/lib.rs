//! Hostile: never returns. Epoch deadlines stop it.

use guest::wasi::http::types::{IncomingRequest, ResponseOutparam};

struct Spin;

impl guest::wasi::exports::http::incoming_handler::Guest for Spin {
    fn handle(_request: IncomingRequest, out: ResponseOutparam) {
        let mut x: u64 = 0;
        loop {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            if x == 42 {
                break;
            }
        }
        guest::respond(out, 200, b"unreachable\n");
    }
}

guest::wasi::http::proxy::export!(Spin with_types_in guest::wasi);
