//! Three nodes of a pipeline started in one process through the library (`node::run`), over
//! the QUIC tensor plane: a request entering at the head gives, token for token, what the whole
//! model gives on one engine; a stage node's own `/metrics` counts the garbage a peer sent it,
//! and the stage serves on; every node stops when its shutdown future resolves.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use baton_engine::{demo, Checkpoint, CpuBackend, KvGeometry, LocalRunner, ModelConfig, SamplingParams, Stage};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_in_one_process_serve_like_one_engine() {
    let dir = std::env::temp_dir().join(format!("baton-in-process-{}", std::process::id()));
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

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut nodes = Vec::new();
    for name in ["node-c", "node-b", "node-a"] {
        let opts = NodeOptions {
            cluster: cluster.clone(),
            cluster_path: path.clone(),
            me: cluster.node(name).unwrap().clone(),
            model_dir: model.clone(),
            device: baton_shard::Device::cpu(1),
            kv_cache_mb: 16,
            micro_batches: None,
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
    let prompt = vec![5u32, 17, 42, 9, 300];
    let body = serde_json::json!({"prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": true, "return_token_ids": true});
    let reply: serde_json::Value = client.post(format!("http://{head}/v1/completions")).json(&body).send().await.unwrap().json().await.unwrap();
    let got: Vec<u32> = reply["choices"][0]["token_ids"].as_array().unwrap_or_else(|| panic!("{reply}")).iter().map(|t| t.as_u64().unwrap() as u32).collect();
    assert_eq!(got, reference(&model, &prompt, 24));
    let mesh: serde_json::Value = client.get(format!("http://{head}/v1/mesh")).send().await.unwrap().json().await.unwrap();
    assert_eq!(mesh["epoch"], 1, "{mesh}");
    let dropped = "baton:peer_messages_dropped_total{kind=\"malformed_control\"}";
    let head_metrics = client.get(format!("http://{head}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(head_metrics.contains(&format!("{dropped} 0")), "{head_metrics}");

    // A peer with the cluster's certificate of node-c sends node-b garbage: node-b closes that
    // connection, counts it on its own /metrics, and the pipeline still answers the same.
    let tls = cluster.tls_dir.clone();
    let peer = baton_mesh::control::ControlNode::bind("127.0.0.1:0".parse().unwrap(), baton_mesh::pki::load(&tls, "node-c").unwrap(), Default::default()).unwrap();
    let link = peer.connect(format!("127.0.0.1:{cb}").parse().unwrap(), "node-b").await.unwrap();
    let _ = link.send_raw(b"\x08\x00\x00\x00garbage!").await;
    tokio::time::timeout(Duration::from_secs(10), link.connection.closed()).await.expect("node-b kept a connection that sent garbage");
    let stage_metrics = client.get(format!("http://127.0.0.1:{http_b}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(stage_metrics.contains(&format!("{dropped} 1")), "{stage_metrics}");
    let reply: serde_json::Value = client.post(format!("http://127.0.0.1:{http_b}/v1/completions")).json(&body).send().await.unwrap().json().await.unwrap();
    assert_eq!(reply["choices"][0]["token_ids"], serde_json::json!(reference(&model, &prompt, 24)), "{reply}");

    stop_tx.send_replace(true);
    for n in nodes {
        tokio::time::timeout(Duration::from_secs(30), n).await.expect("a node did not stop").unwrap().unwrap();
    }
    let _ = std::fs::remove_dir_all(&dir);
}
