//! Three nodes of a pipeline started in one process through the library (`node::run`), over
//! the QUIC tensor plane: a request entering at the head gives, token for token, what the whole
//! model gives on one engine; a stage node's own `/metrics` counts the garbage a peer sent it,
//! and the stage serves on; every node stops when its shutdown future resolves. A stage whose
//! engine starts failing every step (its process answering all along) is treated as lost: its
//! layers are re-placed and the requests go on, none failed.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use baton_engine::backend::{AttnShape, Backend, BatchLayout};
use baton_engine::checkpoint::TensorBytes;
use baton_engine::rope::Rope;
use baton_engine::{demo, Checkpoint, CpuBackend, EngineError, KvGeometry, LocalRunner, ModelConfig, SamplingParams, Stage};
use baton_mesh::config::ClusterConfig;
use baton_mesh::tensor_plane::PlaneChoice;
use baton_node::node::{run, NodeOptions};

fn free_udp() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn free_tcp() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// What one engine gives for `prompt`, greedy.
fn reference(dir: &std::path::Path, prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    let config = ModelConfig::from_dir(dir).unwrap();
    let ckpt = Checkpoint::open(dir).unwrap();
    let stage = Stage::load(CpuBackend::new(1).unwrap(), &config, &ckpt, 0..config.num_layers, KvGeometry { block_size: 16, num_blocks: 64 }, &mut |_, _| {}).unwrap();
    let mut runner = LocalRunner::new(stage, 512).unwrap();
    let params = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(max_tokens) };
    runner.generate(prompt, params, &[], &mut |_| {}).unwrap().token_ids
}

/// The CPU backend, whose every step fails with an engine error while `broken` is set.
struct Breakable {
    cpu: CpuBackend,
    broken: Arc<AtomicBool>,
}

impl Backend for Breakable {
    type Weight = <CpuBackend as Backend>::Weight;
    type Buffer = <CpuBackend as Backend>::Buffer;
    type KvCache = <CpuBackend as Backend>::KvCache;
    type Batch = <CpuBackend as Backend>::Batch;

    fn name(&self) -> String {
        format!("breakable {}", self.cpu.name())
    }
    fn weight(&self, t: &TensorBytes) -> baton_engine::Result<Self::Weight> {
        self.cpu.weight(t)
    }
    fn zeros(&self, len: usize) -> baton_engine::Result<Self::Buffer> {
        self.cpu.zeros(len)
    }
    fn upload(&self, data: &[f32]) -> baton_engine::Result<Self::Buffer> {
        self.cpu.upload(data)
    }
    fn download(&self, buf: &Self::Buffer) -> baton_engine::Result<Vec<f32>> {
        self.cpu.download(buf)
    }
    fn kv_cache(&self, num_blocks: usize, block_size: usize, kv_dim: usize) -> baton_engine::Result<Self::KvCache> {
        self.cpu.kv_cache(num_blocks, block_size, kv_dim)
    }
    fn prepare_batch(&self, layout: &BatchLayout, rope: &Rope, attn: AttnShape) -> baton_engine::Result<Self::Batch> {
        if self.broken.load(Ordering::SeqCst) {
            return Err(EngineError::BackendUnavailable("this device broke (test)".into()));
        }
        self.cpu.prepare_batch(layout, rope, attn)
    }
    fn embed(&self, table: &Self::Weight, tokens: &[u32], out: &mut Self::Buffer) -> baton_engine::Result<()> {
        self.cpu.embed(table, tokens, out)
    }
    fn matmul(&self, x: &Self::Buffer, rows: usize, w: &Self::Weight, bias: Option<&Self::Weight>, out: &mut Self::Buffer) -> baton_engine::Result<()> {
        self.cpu.matmul(x, rows, w, bias, out)
    }
    fn rms_norm(&self, x: &Self::Buffer, weight: &Self::Weight, eps: f32, out: &mut Self::Buffer) -> baton_engine::Result<()> {
        self.cpu.rms_norm(x, weight, eps, out)
    }
    fn add(&self, x: &mut Self::Buffer, y: &Self::Buffer) -> baton_engine::Result<()> {
        self.cpu.add(x, y)
    }
    fn silu_mul(&self, gate: &Self::Buffer, up: &Self::Buffer, out: &mut Self::Buffer) -> baton_engine::Result<()> {
        self.cpu.silu_mul(gate, up, out)
    }
    fn rope(&self, batch: &Self::Batch, x: &mut Self::Buffer, heads: usize, head_dim: usize) -> baton_engine::Result<()> {
        self.cpu.rope(batch, x, heads, head_dim)
    }
    fn write_kv(&self, batch: &Self::Batch, cache: &mut Self::KvCache, k: &Self::Buffer, v: &Self::Buffer) -> baton_engine::Result<()> {
        self.cpu.write_kv(batch, cache, k, v)
    }
    fn attention(&self, batch: &Self::Batch, cache: &Self::KvCache, q: &Self::Buffer, out: &mut Self::Buffer) -> baton_engine::Result<()> {
        self.cpu.attention(batch, cache, q, out)
    }
    fn gather_rows(&self, x: &Self::Buffer, width: usize, rows: &[usize], out: &mut Self::Buffer) -> baton_engine::Result<()> {
        self.cpu.gather_rows(x, width, rows, out)
    }
    fn read_kv_blocks(&self, cache: &Self::KvCache, blocks: &[u32], block_size: usize) -> baton_engine::Result<Vec<f32>> {
        self.cpu.read_kv_blocks(cache, blocks, block_size)
    }
    fn write_kv_blocks(&self, cache: &mut Self::KvCache, blocks: &[u32], block_size: usize, data: &[f32]) -> baton_engine::Result<()> {
        self.cpu.write_kv_blocks(cache, blocks, block_size, data)
    }
}

/// Three nodes in this process (node-a the head with HTTP, node-b with HTTP, node-c), `special`
/// on its own device; returns once the head serves.
struct Three {
    dir: std::path::PathBuf,
    model: std::path::PathBuf,
    cluster: ClusterConfig,
    head: SocketAddr,
    http_b: u16,
    control_b: u16,
    stop: tokio::sync::watch::Sender<bool>,
    nodes: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

async fn start_three(name: &str, special: (&str, baton_shard::Device)) -> Three {
    let dir = std::env::temp_dir().join(format!("baton-in-process-{}-{name}", std::process::id()));
    let model = dir.join("model");
    let mut preset = demo::TINY.clone();
    preset.num_layers = 6;
    demo::write_model(&preset, &model, 3).unwrap();
    let (ca, cb, cc, http, http_b) = (free_udp(), free_udp(), free_udp(), free_tcp(), free_tcp());
    let path = dir.join("cluster.toml");
    let text = format!(
        r#"
[cluster]
name = "in-process"
[model]
path = "{}"
[[nodes]]
name = "node-a"
control = "127.0.0.1:{ca}"
http = "127.0.0.1:{http}"
memory_gb = 1
[[nodes]]
name = "node-b"
control = "127.0.0.1:{cb}"
http = "127.0.0.1:{http_b}"
memory_gb = 1
[[nodes]]
name = "node-c"
control = "127.0.0.1:{cc}"
memory_gb = 1
"#,
        model.display()
    );
    std::fs::write(&path, text).unwrap();
    let cluster = ClusterConfig::from_file(&path).unwrap();
    baton_mesh::pki::init(&cluster).unwrap();

    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let mut nodes = Vec::new();
    for name in ["node-c", "node-b", "node-a"] {
        let opts = NodeOptions {
            cluster: cluster.clone(),
            cluster_path: path.clone(),
            me: cluster.node(name).unwrap().clone(),
            model_dir: model.clone(),
            device: if name == special.0 { special.1.clone() } else { baton_shard::Device::cpu(1) },
            kv_cache_mb: 16,
            max_num_seqs: 64,
            prefix_caching: true,
            micro_batches: None,
            stage_links: Default::default(),
            tensor_plane: PlaneChoice::Quic,
            request_timeout: Duration::from_secs(60),
            signals: false,
        };
        let mut stop = stop_rx.clone();
        nodes.push(tokio::spawn(run(opts, async move {
            let _ = stop.wait_for(|s| *s).await;
        })));
    }
    let head: SocketAddr = format!("127.0.0.1:{http}").parse().unwrap();
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = client.get(format!("http://{head}/health")).send().await {
            if r.status().is_success() {
                break;
            }
        }
        assert!(Instant::now() < deadline, "the in-process head never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Three { dir, model, cluster, head, http_b, control_b: cb, stop, nodes }
}

impl Three {
    async fn stop(self) {
        self.stop.send_replace(true);
        for n in self.nodes {
            tokio::time::timeout(Duration::from_secs(30), n).await.expect("a node did not stop").unwrap().unwrap();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A greedy completion of `prompt` at `addr`: its token ids.
async fn complete(client: &reqwest::Client, addr: &str, prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    let body = serde_json::json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true, "return_token_ids": true});
    let reply: serde_json::Value = client.post(format!("http://{addr}/v1/completions")).json(&body).send().await.unwrap().json().await.unwrap();
    reply["choices"][0]["token_ids"].as_array().unwrap_or_else(|| panic!("{reply}")).iter().map(|t| t.as_u64().unwrap() as u32).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_in_one_process_serve_like_one_engine() {
    let three = start_three("serve", ("node-b", baton_shard::Device::cpu(1))).await;
    let (head, model, cb, http_b) = (three.head, three.model.clone(), three.control_b, three.http_b);
    let client = reqwest::Client::new();
    let prompt = vec![5u32, 17, 42, 9, 300];
    assert_eq!(complete(&client, &head.to_string(), &prompt, 24).await, reference(&model, &prompt, 24));
    let mesh: serde_json::Value = client.get(format!("http://{head}/v1/mesh")).send().await.unwrap().json().await.unwrap();
    assert_eq!(mesh["epoch"], 1, "{mesh}");
    let dropped = "baton:peer_messages_dropped_total{kind=\"malformed_control\"}";
    let head_metrics = client.get(format!("http://{head}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(head_metrics.contains(&format!("{dropped} 0")), "{head_metrics}");

    // A peer with the cluster's certificate of node-c sends node-b garbage: node-b closes that
    // connection, counts it on its own /metrics, and the pipeline still answers the same.
    let tls = three.cluster.tls_dir.clone();
    let peer = baton_mesh::control::ControlNode::bind("127.0.0.1:0".parse().unwrap(), baton_mesh::pki::load(&tls, "node-c").unwrap(), Default::default()).unwrap();
    let link = peer.connect(format!("127.0.0.1:{cb}").parse().unwrap(), "node-b").await.unwrap();
    let _ = link.send_raw(b"\x08\x00\x00\x00garbage!").await;
    tokio::time::timeout(Duration::from_secs(10), link.connection.closed()).await.expect("node-b kept a connection that sent garbage");
    let stage_metrics = client.get(format!("http://127.0.0.1:{http_b}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(stage_metrics.contains(&format!("{dropped} 1")), "{stage_metrics}");
    assert_eq!(complete(&client, &format!("127.0.0.1:{http_b}"), &prompt, 24).await, reference(&model, &prompt, 24));
    three.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_whose_engine_keeps_failing_is_replaced_and_no_request_fails() {
    let broken = Arc::new(AtomicBool::new(false));
    let flag = broken.clone();
    let device = baton_shard::Device::new("breakable cpu", move || Ok(Breakable { cpu: CpuBackend::new(1)?, broken: flag.clone() }));
    // node-c: the last stage, behind node-b on the chain, so its errors reach the head through
    // node-b (`StageReply::Broken`).
    let three = start_three("failing", ("node-c", device)).await;
    let (head, model) = (three.head.to_string(), three.model.clone());
    let client = reqwest::Client::new();
    let prompt = vec![5u32, 17, 42, 9, 300];
    let want = reference(&model, &prompt, 24);
    assert_eq!(complete(&client, &head, &prompt, 24).await, want);

    // node-c's engine fails every step from now on, its process answering every probe: the
    // requests still complete with one engine's tokens, and node-c is lost, not retried forever.
    broken.store(true, Ordering::SeqCst);
    for _ in 0..3 {
        assert_eq!(complete(&client, &head, &prompt, 24).await, want);
    }
    let mesh: serde_json::Value = client.get(format!("http://{head}/v1/mesh")).send().await.unwrap().json().await.unwrap();
    let lost = mesh["changes"].as_array().unwrap().iter().find(|c| c["reason"] == "node_lost").unwrap_or_else(|| panic!("node-c was never lost: {mesh}")).clone();
    assert_eq!(lost["nodes"], serde_json::json!(["node-c"]), "{mesh}");
    let metrics = client.get(format!("http://{head}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("baton:request_failure_total 0"), "{metrics}");
    three.stop().await;
}
