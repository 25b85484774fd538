//! The native QUIC client protocol, both ways: bytes as a server reads them from a client
//! stream (a length-prefixed frame, then a `Request`, then the serving layer's checks) and as a
//! client reads a server's `Frame`s. Nothing may panic; what decodes must encode back to itself.

#![no_main]

use baton_proto::{decode, encode, read_frame, Frame, Request};
use libfuzzer_sys::fuzz_target;

static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();

fuzz_target!(|data: &[u8]| {
    // The server's path: one frame off the stream, then the request, then its checks.
    let rt = RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().build().expect("a runtime"));
    let mut stream = data;
    if let Ok(Some(body)) = rt.block_on(read_frame(&mut stream)) {
        if let Ok(request) = decode::<Request>(&body) {
            let again = encode(&request).expect("a decoded request encodes");
            let back = decode::<Request>(&again[4..]).expect("re-decodes");
            // NaN parameters are not equal to themselves; compare the bytes.
            assert_eq!(encode(&back).expect("encodes"), again);
            let _ = baton_serve::quic::to_api(back);
        }
    }
    // The client's path: a frame body as it came.
    if let Ok(frame) = decode::<Frame>(data) {
        let again = encode(&frame).expect("a decoded frame encodes");
        let back = decode::<Frame>(&again[4..]).expect("re-decodes");
        // NaN log-probabilities are not equal to themselves; compare the bytes instead.
        assert_eq!(encode(&back).expect("encodes"), again);
    }
});
