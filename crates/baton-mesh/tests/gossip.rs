//! The gossip's identity check: a SWIM packet whose header claims a sender other than the
//! certificate of the connection it came on is dropped; the same packet from its real sender
//! is taken; garbage is dropped without harm; each drop is counted by kind.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use baton_mesh::control::{ControlNode, DropKind};
use baton_mesh::gossip::{Gossip, NodeId, NodeInfo, NodeState};
use baton_mesh::pki::generate;
use foca::{AccumulatingRuntime, Config, Foca, PostcardCodec};
use rand::SeedableRng;

const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// An announce from `name` to node-a, as that node's own SWIM would send it.
fn announce_from(name: &str, to: &NodeId) -> Vec<u8> {
    let me = NodeId { name: name.to_string(), generation: 7, control: SocketAddr::new(LOCAL, 9) };
    let config = Config::new_lan(std::num::NonZeroU32::new(3).unwrap());
    let mut swim = Foca::new(me, config, rand::rngs::SmallRng::seed_from_u64(1), PostcardCodec);
    let mut rt = AccumulatingRuntime::new();
    swim.announce(to.clone(), &mut rt).unwrap();
    rt.to_send().expect("an announce to send").1.to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gossip_packet_claiming_another_identity_is_dropped() {
    let ids = generate("test", &[("node-a".into(), LOCAL), ("node-b".into(), LOCAL), ("node-c".into(), LOCAL)]).unwrap().nodes;
    let node = Arc::new(ControlNode::bind(SocketAddr::new(LOCAL, 0), ids[0].clone(), Arc::default()).unwrap());
    let control = node.local_addr().unwrap();
    let info = NodeInfo {
        name: "node-a".into(),
        generation: 1,
        version: 0,
        control,
        http: None,
        quic: None,
        memory_bytes: 1 << 30,
        replica: 0,
        state: NodeState::Ready,
        head: false,
        serving: None,
        us_per_layer_token: None,
        busy_permille: 0,
        pipeline: None, device: "cpu".into(),
    };
    let gossip = Gossip::start(node.clone(), info, Vec::new());
    let a = NodeId { name: "node-a".into(), generation: 1, control };
    let forged = announce_from("node-b", &a);

    // node-c's connection carries a packet that says it is from node-b: dropped.
    gossip.receive("node-c", &forged);
    assert!(!gossip.alive().contains(&"node-b".to_string()), "a forged sender became a member");
    // Garbage from a real peer: dropped, nothing changes.
    gossip.receive("node-b", b"\xff\xff\x00 not a SWIM packet");
    assert!(gossip.alive().is_empty());
    // The same packet on node-b's own connection: node-b is a member.
    gossip.receive("node-b", &forged);
    assert_eq!(gossip.alive(), vec!["node-b".to_string()]);
    // Each drop was counted, by kind, and nothing else.
    let drops = node.drops();
    assert_eq!((drops.get(DropKind::ForgedGossip), drops.get(DropKind::MalformedGossip)), (1, 1));
    assert_eq!(drops.snapshot().iter().map(|(_, n)| n).sum::<u64>(), 2, "{:?}", drops.snapshot());
}
