//! Writes one valid message of every kind the fuzz targets read (fuzz/fuzz_targets/), as their
//! seed corpus: `cargo run --release -p baton-mesh --example fuzz_seeds -- DIR` makes
//! DIR/client_protocol, DIR/stage_wire, DIR/control_message and DIR/gossip_packet.

use std::net::SocketAddr;
use std::path::Path;

use baton_engine::SamplingParams;
use baton_mesh::control::ControlMessage;
use baton_mesh::gossip::{HeadedPipeline, NodeId, NodeInfo, NodeState, PacketReader, ServedLayers};
use baton_mesh::stage_wire::{sampling_to_wire, StageReply, StageRequest, WireChunk, WireHop, WireInput, WireNewSequence, WireSampled};
use baton_proto::{encode, ChatMessage, ErrorKind, Finish, Frame, NodeAddr, Prompt, Request};

fn write(dir: &Path, target: &str, seeds: Vec<Vec<u8>>) -> std::io::Result<()> {
    let dir = dir.join(target);
    std::fs::create_dir_all(&dir)?;
    for (i, s) in seeds.iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i}")), s)?;
    }
    println!("{}: {} seeds", dir.display(), seeds.len());
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).ok_or("usage: fuzz_seeds DIR")?;
    let dir = Path::new(&dir);

    // The client protocol: whole request frames (the server's side), frame bodies (the client's).
    let mut resumed = Request::new(Prompt::Tokens(vec![1, 2, 3]));
    resumed.resume_token_ids = vec![4, 5];
    resumed.stop = vec!["\n".into()];
    let requests = [Request::new(Prompt::Text("Hello".into())), resumed, Request::new(Prompt::Chat(vec![ChatMessage { role: "user".into(), content: "Hi".into() }]))];
    let frames = [
        Frame::Started { prompt_token_ids: vec![1, 2], nodes: vec![NodeAddr { name: "node-b".into(), addr: "127.0.0.1:9".into() }] },
        Frame::Token { id: 7, text: "a".into(), logprob: -0.5, top_logprobs: vec![(7, -0.5)] },
        Frame::Done { finish: Finish::Length, prompt_tokens: 2, completion_tokens: 1, tail: String::new() },
        Frame::Error { kind: ErrorKind::NotReady, message: "loading".into(), param: None },
    ];
    let mut client = Vec::new();
    for r in &requests {
        client.push(encode(r)?);
    }
    for f in &frames {
        client.push(encode(f)?[4..].to_vec());
    }
    write(dir, "client_protocol", client)?;

    // The stage wire: bodies (QUIC streams) and whole frames (UCX messages).
    let step = StageRequest::Step {
        epoch: 2,
        chunks: vec![WireChunk { start_pos: 0, len: 3, block_table: vec![0], wants_logits: true }],
        input: WireInput::Tokens(vec![1, 2, 3]),
        new_sequences: vec![WireNewSequence { id: 1, params: sampling_to_wire(&SamplingParams::greedy(4)), prompt: vec![1, 2, 3], eos: vec![2], generated: vec![] }],
        released: vec![],
        ids: vec![1],
    };
    let requests = [
        StageRequest::Ping { nonce: 1 },
        StageRequest::Query { nonce: 2 },
        StageRequest::Init { block_size: 16, num_blocks: 64, first_layer: 0, end_layer: 4, epoch: 2, head: "node-a".into() },
        StageRequest::ExportKv { epoch: 2, first_layer: 0, end_layer: 4, blocks: vec![0, 1] },
        StageRequest::Chain {
            head: "node-a".into(),
            route: vec![WireHop { name: "node-c".into(), control: "127.0.0.1:7003".into() }],
            epoch: 2,
            chunks: vec![WireChunk { start_pos: 0, len: 1, block_table: vec![0], wants_logits: true }],
            input: WireInput::Hidden(vec![0.25; 8]),
            new_sequences: vec![],
            released: vec![3],
            ids: vec![1],
        },
        step,
    ];
    let replies = [
        StageReply::Pong { nonce: 1, generation: 9, first_layer: 0, end_layer: 4, epoch: 2, loaded: true, draining: false, tensor_plane: "QUIC".into(), ucx_steps: 0, window_steps: 0, chained_steps: 0, busy_us: 1_500_000, head: "node-a".into(), loading_mib_done: 0, loading_mib_total: 0 },
        StageReply::Hidden { hidden: vec![0.5; 8], compute_us: 10 },
        StageReply::Sampled { tokens: vec![WireSampled { id: 1, token: 7, logprob: -0.1, top_logprobs: vec![], finish: 0 }], compute_us: 10 },
        StageReply::Error("no".into()),
        StageReply::Chained { tokens: vec![WireSampled { id: 1, token: 7, logprob: -0.1, top_logprobs: vec![], finish: 0 }], hops: vec![(10, 40, 3), (12, 0, 0)] },
        StageReply::Broken { stage: "node-c".into(), kind: 0, detail: "connection lost".into() },
    ];
    let mut stage = Vec::new();
    for r in &requests {
        let frame = encode(r)?;
        stage.push(frame[4..].to_vec());
        stage.push(frame);
    }
    for r in &replies {
        stage.push(encode(r)?[4..].to_vec());
    }
    write(dir, "stage_wire", stage)?;

    let pings = [ControlMessage::Ping { version: 1, nonce: 3 }, ControlMessage::Pong { version: 1, nonce: 3 }];
    write(dir, "control_message", pings.iter().map(|m| encode(m).map(|f| f[4..].to_vec())).collect::<Result<_, _>>()?)?;

    // Gossip: node-b announcing itself to node-a with its info (a head's) riding along.
    let addr = |port| SocketAddr::from(([127, 0, 0, 1], port));
    let mut b = PacketReader::new("node-b");
    let info = NodeInfo {
        name: "node-b".into(),
        generation: 1,
        version: 3,
        control: addr(9),
        http: Some(addr(8080)),
        quic: Some(addr(8081)),
        memory_bytes: 1 << 30,
        replica: 0,
        state: NodeState::Ready,
        head: true,
        serving: Some(ServedLayers { first: 0, end: 4, epoch: 2 }),
        us_per_layer_token: Some(12.5),
        busy_permille: 300,
        pipeline: Some(HeadedPipeline { epoch: 2, stages: 3 }),
        device: "cpu (2 threads)".into(),
    };
    b.publish(&info)?;
    let mut a = PacketReader::new("node-a");
    a.publish(&NodeInfo { name: "node-a".into(), head: false, pipeline: None, ..info.clone() })?;
    // A few rounds of the two talking: announce, feeds, the infos riding on them.
    let mut packets = Vec::new();
    let mut inflight = b.announce(NodeId { name: "node-a".into(), generation: 1, control: addr(9) });
    for _ in 0..4 {
        let mut next = Vec::new();
        for (to, data) in inflight {
            let (reader, from) = if to.name == "node-a" { (&mut a, "node-b") } else { (&mut b, "node-a") };
            next.extend(reader.read(from, &data).unwrap_or_default());
            packets.push(data);
        }
        inflight = next;
    }
    write(dir, "gossip_packet", packets)?;
    Ok(())
}
