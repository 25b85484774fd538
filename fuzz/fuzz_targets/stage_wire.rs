//! The stage wire, as a stage reads a head's requests and a head reads a stage's replies (over
//! QUIC streams, or whole UCX messages through `frame_body`), then turns them into the engine's
//! types. Nothing may panic; what decodes must encode back to the same bytes.

#![no_main]

use baton_mesh::stage_wire::{layout_from_wire, sampling_from_wire, StageReply, StageRequest};
use baton_proto::{decode, encode, frame_body};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for body in [Some(data), frame_body(data).ok()].into_iter().flatten() {
        if let Ok(req) = decode::<StageRequest>(body) {
            let again = encode(&req).expect("a decoded request encodes");
            let back = decode::<StageRequest>(&again[4..]).expect("re-decodes");
            assert_eq!(encode(&back).expect("encodes"), again);
            if let StageRequest::Step { chunks, new_sequences, .. } = &req {
                let _ = layout_from_wire(chunks);
                for s in new_sequences {
                    let _ = sampling_from_wire(&s.params);
                }
            }
        }
        if let Ok(reply) = decode::<StageReply>(body) {
            let again = encode(&reply).expect("a decoded reply encodes");
            let back = decode::<StageReply>(&again[4..]).expect("re-decodes");
            assert_eq!(encode(&back).expect("encodes"), again);
        }
    }
});
