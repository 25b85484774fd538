//! A stage served over the control plane drops what a peer should not send: work of a plan
//! epoch it does not serve (a head's step or KV request from before a re-plan) is refused with
//! an error and counted as stale; a malformed frame closes that one connection and is counted;
//! after both the stage still serves its head's current work, step for step. An observer's
//! query renews no head's lease; the head's ping does.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use baton_engine::demo;
use baton_mesh::control::{ControlNode, DropKind};
use baton_mesh::pki::generate;
use baton_mesh::stage_service::{self, call, StageService};
use baton_mesh::stage_wire::{sampling_to_wire, StageReply, StageRequest, WireChunk, WireInput, WireNewSequence};
use baton_mesh::tensor_plane::{PlaneChoice, TensorPlane};
use baton_engine::SamplingParams;

const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const PROMPT: [u32; 5] = [3, 17, 42, 99, 5];

fn step(epoch: u64) -> StageRequest {
    StageRequest::Step {
        epoch,
        chunks: vec![WireChunk { start_pos: 0, len: PROMPT.len() as u32, block_table: vec![0, 1], wants_logits: true }],
        input: WireInput::Tokens(PROMPT.to_vec()),
        new_sequences: vec![WireNewSequence { id: 1, params: sampling_to_wire(&SamplingParams::greedy(4)), prompt: PROMPT.to_vec(), eos: vec![], generated: vec![] }],
        released: vec![],
        ids: vec![1],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_drops_stale_epochs_and_malformed_frames_and_keeps_serving() {
    let dir = std::env::temp_dir().join(format!("baton-stage-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    demo::write_model(&demo::TINY, &dir, 7).unwrap();
    let layers = demo::TINY.num_layers as u32;

    let ids = generate("test", &[("node-a".into(), LOCAL), ("node-b".into(), LOCAL)]).unwrap().nodes;
    let stage_node = Arc::new(ControlNode::bind(SocketAddr::new(LOCAL, 0), ids[1].clone(), Arc::default()).unwrap());
    let stage_addr = stage_node.local_addr().unwrap();
    let shard = baton_shard::Device::cpu(1).spawn(dir.clone()).await.unwrap();
    let plane = Arc::new(TensorPlane::start(PlaneChoice::Quic, "node-b").await.unwrap());
    let svc = Arc::new(StageService::new(shard, plane, stage_node.drops().clone()));
    tokio::spawn(stage_service::serve(stage_node.clone(), svc, None));

    let head = ControlNode::bind(SocketAddr::new(LOCAL, 0), ids[0].clone(), Arc::default()).unwrap();
    let link = head.connect(stage_addr, "node-b").await.unwrap();
    let init = StageRequest::Init { block_size: 4, num_blocks: 16, first_layer: 0, end_layer: layers, epoch: 2, head: "node-a".into() };
    assert!(matches!(call(&link, &init).await.unwrap(), StageReply::Ready { epoch: 2, .. }));

    // A step and a KV export of epoch 1, sent after the stage took epoch 2: refused, counted.
    match call(&link, &step(1)).await.unwrap() {
        StageReply::Refused(e) => assert!(e.contains("epoch"), "{e}"),
        other => panic!("a step of a stale epoch was answered: {other:?}"),
    }
    let export = StageRequest::ExportKv { epoch: 1, first_layer: 0, end_layer: layers, blocks: vec![0] };
    assert!(matches!(call(&link, &export).await.unwrap(), StageReply::Refused(_)));
    assert_eq!(stage_node.drops().get(DropKind::StaleEpoch), 2, "{:?}", stage_node.drops().snapshot());

    // Garbage on the same connection: that connection is closed, and counted.
    let mut recv = link.send_raw(b"\x10\x00\x00\x00 certainly not an rkyv StageRequest").await.unwrap();
    let _ = recv.read_to_end(1 << 10).await;
    let closed = tokio::time::timeout(std::time::Duration::from_secs(10), link.connection.closed()).await;
    assert!(closed.is_ok(), "the stage kept a connection that sent garbage");
    assert_eq!(stage_node.drops().get(DropKind::MalformedControl), 1, "{:?}", stage_node.drops().snapshot());

    // The head reconnects: the stage still serves epoch 2 and samples its first token.
    let link = head.connect(stage_addr, "node-b").await.unwrap();
    match call(&link, &StageRequest::Ping { nonce: 9 }).await.unwrap() {
        StageReply::Pong { nonce: 9, epoch: 2, loaded: true, head, .. } => assert_eq!(head, "node-a"),
        other => panic!("{other:?}"),
    }
    match call(&link, &step(2)).await.unwrap() {
        StageReply::Sampled { tokens, .. } => assert_eq!(tokens.len(), 1),
        other => panic!("the stage did not serve its epoch's step: {other:?}"),
    }

    // An observer's query (`baton status`, even with the head's certificate) renews no lease:
    // past the lease with only queries, the stage names no head; the head's own ping renews it.
    let quiet = std::time::Instant::now();
    while quiet.elapsed() < stage_service::HEAD_LEASE + std::time::Duration::from_millis(200) {
        assert!(matches!(call(&link, &StageRequest::Query { nonce: 1 }).await.unwrap(), StageReply::Pong { .. }));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    match call(&link, &StageRequest::Query { nonce: 2 }).await.unwrap() {
        StageReply::Pong { head, .. } => assert_eq!(head, "", "queries kept the head's lease"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(call(&link, &StageRequest::Ping { nonce: 3 }).await.unwrap(), StageReply::Pong { .. }));
    match call(&link, &StageRequest::Query { nonce: 4 }).await.unwrap() {
        StageReply::Pong { head, .. } => assert_eq!(head, "node-a"),
        other => panic!("{other:?}"),
    }
    let total: u64 = stage_node.drops().snapshot().iter().map(|(_, n)| n).sum();
    assert_eq!(total, 3, "{:?}", stage_node.drops().snapshot());
    let _ = std::fs::remove_dir_all(&dir);
}
