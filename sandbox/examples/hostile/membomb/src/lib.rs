//! Hostile: allocates 1 MiB blocks forever. `StoreLimits` refuses growth past the limit.

use guest::wasi::http::types::{IncomingRequest, ResponseOutparam};

struct MemBomb;

impl guest::wasi::exports::http::incoming_handler::Guest for MemBomb {
    fn handle(_request: IncomingRequest, out: ResponseOutparam) {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            let mut block = vec![0u8; 1 << 20];
            block[4095] = 1;
            hoard.push(std::hint::black_box(block));
            if hoard.len() == usize::MAX {
                break;
            }
        }
        guest::respond(out, 200, b"unreachable\n");
    }
}

guest::wasi::http::proxy::export!(MemBomb with_types_in guest::wasi);
