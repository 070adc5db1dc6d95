//! The smallest useful nanoservice: answers every request with a greeting.

use wasi::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

struct Hello;

impl wasi::exports::http::incoming_handler::Guest for Hello {
    fn handle(_request: IncomingRequest, out: ResponseOutparam) {
        let resp = OutgoingResponse::new(Fields::new());
        let body = resp.body().expect("outgoing body");
        ResponseOutparam::set(out, Ok(resp));
        let stream = body.write().expect("body stream");
        stream
            .blocking_write_and_flush(b"hello from a nanoservice")
            .expect("write");
        drop(stream);
        OutgoingBody::finish(body, None).expect("finish");
    }
}

wasi::http::proxy::export!(Hello);
