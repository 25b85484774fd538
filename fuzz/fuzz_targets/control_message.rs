//! Control-plane messages (ping and pong between nodes) as a node reads them. Nothing may
//! panic; what decodes must encode back to itself.

#![no_main]

use baton_mesh::control::ControlMessage;
use baton_proto::{decode, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = decode::<ControlMessage>(data) {
        let again = encode(&msg).expect("a decoded message encodes");
        assert_eq!(decode::<ControlMessage>(&again[4..]).expect("re-decodes"), msg);
    }
});
