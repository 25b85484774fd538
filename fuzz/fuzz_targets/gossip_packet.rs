//! Gossip packets as a node reads them off a peer's connection: the SWIM header's sender
//! checked against the connection's name, then SWIM's own decoding (members, suspicions,
//! broadcasts) and each node's info inside. The packet is read as if it came on the connection
//! of the sender it names (so the identity check passes and SWIM sees it) and once as if from
//! another (so it must be dropped as forged). Nothing may panic, and state carries over from
//! packet to packet as on a live node.

#![no_main]

use std::sync::Mutex;

use baton_mesh::control::DropKind;
use baton_mesh::gossip::{NodeId, PacketReader};
use foca::{Codec, PostcardCodec};
use libfuzzer_sys::fuzz_target;

static READER: Mutex<Option<PacketReader>> = Mutex::new(None);

fuzz_target!(|data: &[u8]| {
    let mut reader = READER.lock().unwrap_or_else(|p| p.into_inner());
    let reader = reader.get_or_insert_with(|| PacketReader::new("node-a"));
    match Codec::<NodeId>::decode_header(&mut PostcardCodec, data) {
        Ok(header) => {
            let sender = header.src.name.clone();
            let _ = reader.read(&sender, data);
            let other = format!("{sender}-not");
            assert_eq!(reader.read(&other, data).err(), Some(DropKind::ForgedGossip));
        }
        Err(_) => assert_eq!(reader.read("node-b", data).err(), Some(DropKind::MalformedGossip)),
    }
    let _ = reader.members();
});
