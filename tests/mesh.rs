//! A three-node pipeline on loopback, each node a real `baton node` process: requests entering
//! the head give token for token what one node gives, 32 concurrent streams all finish
//! correctly, and garbage sent to a node's control port leaves the mesh serving.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[path = "support/mod.rs"]
mod support;

struct Nodes(Vec<Child>);

impl Drop for Nodes {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_udp() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn free_tcp() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A three-node cluster.toml on free loopback ports; returns (file, head http port, node-b
/// control port, node-b http port).
fn write_cluster(name: &str, model: &std::path::Path) -> (std::path::PathBuf, u16, u16, u16) {
    let dir = support::scratch(name);
    std::fs::create_dir_all(&dir).unwrap();
    let (ca, cb, cc, http, quic, http_b) = (free_udp(), free_udp(), free_udp(), free_tcp(), free_udp(), free_tcp());
    let cfg = dir.join("cluster.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[cluster]
name = "test"
[model]
path = "{model}"
[placement]
mode = "auto"
[[nodes]]
name = "node-a"
control = "127.0.0.1:{ca}"
http = "127.0.0.1:{http}"
quic = "127.0.0.1:{quic}"
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
            model = model.display()
        ),
    )
    .unwrap();
    (cfg, http, cb, http_b)
}

#[test]
fn bootstrap_starts_reports_and_stops_a_local_cluster() {
    let bin = env!("CARGO_BIN_EXE_baton");
    let model = support::tiny_model("boot-model");
    let (cfg, http, _, _) = write_cluster("boot", &model);
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/bootstrap.sh");
    let out = Command::new("bash").arg(&script).arg(&cfg).env("BATON", bin).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let stop = || Command::new("bash").arg(&script).arg(&cfg).arg("--stop").env("BATON", bin).output().unwrap();
    if !out.status.success() {
        stop();
        panic!("bootstrap failed: {text}\n{}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(text.contains(&format!("http://127.0.0.1:{http}/v1")), "{text}");
    assert_eq!(text.matches("stage loaded").count(), 2, "{text}");
    assert!(text.contains("head") && text.contains("ready"), "{text}");
    let stopped = stop();
    assert_eq!(String::from_utf8_lossy(&stopped.stdout).matches("stopped").count(), 3);
    let server = support::Server { child: Command::new("true").spawn().unwrap(), addr: format!("127.0.0.1:{http}"), quic: None, model };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(&server.addr).is_ok() {
        assert!(Instant::now() < deadline, "the head still listens after --stop");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_three_stage_pipeline_matches_one_node() {
    let bin = env!("CARGO_BIN_EXE_baton");
    let model = support::tiny_model("mesh-model");
    let (cfg, http, cb, http_b) = write_cluster("mesh", &model);
    assert!(Command::new(bin).args(["cluster", "init", cfg.to_str().unwrap()]).status().unwrap().success());
    let check = Command::new(bin).args(["cluster", "check", cfg.to_str().unwrap()]).output().unwrap();
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(text.contains("node-a") && text.contains("layers 0..2") && text.contains("layers 3..4"), "{text}");

    let mut nodes = Nodes(Vec::new());
    for name in ["node-c", "node-b", "node-a"] {
        let mut child = Command::new(bin)
            .args(["node", "--cluster", cfg.to_str().unwrap(), "--name", name, "--threads", "1", "--kv-cache-mb", "64"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        std::thread::spawn(move || for _ in stderr.lines() {});
        nodes.0.push(child);
    }
    let server = support::Server { child: Command::new("true").spawn().unwrap(), addr: format!("127.0.0.1:{http}"), quic: None, model: model.clone() };
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(&server.addr).is_err() || support::http(&server, "GET", "/health", None).0 != 200 {
        assert!(Instant::now() < deadline, "the pipeline head never became ready");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Token for token what one node gives (`baton generate`, no server).
    let prompts = ["Hello, world", "The quick brown fox jumps over the lazy dog", "1 2 3"];
    let mut expected = Vec::new();
    for p in prompts {
        let out = Command::new(bin)
            .args(["generate", "--model", model.to_str().unwrap(), "--prompt", p, "--max-tokens", "16", "--ignore-eos", "--json"])
            .output()
            .unwrap();
        let want: Value = serde_json::from_slice(&out.stdout).unwrap();
        let (status, got) = support::post(&server, "/v1/completions", &json!({"prompt": p, "max_tokens": 16, "temperature": 0, "ignore_eos": true, "return_token_ids": true}));
        assert_eq!(status, 200, "{got}");
        assert_eq!(got["choices"][0]["token_ids"], want["token_ids"], "prompt {p:?}: the pipeline differs from one node");
        expected.push(want["token_ids"].clone());
    }

    // A request entering at another node (node-b's HTTP) is forwarded to the head.
    let via_b = support::Server { child: Command::new("true").spawn().unwrap(), addr: format!("127.0.0.1:{http_b}"), quic: None, model: model.clone() };
    let (status, got) = support::post(&via_b, "/v1/completions", &json!({"prompt": prompts[0], "max_tokens": 16, "temperature": 0, "ignore_eos": true, "return_token_ids": true}));
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["choices"][0]["token_ids"], expected[0], "a request entering at node-b differs");
    let chunks = support::sse(&via_b, "/v1/completions", &json!({"prompt": prompts[1], "max_tokens": 16, "temperature": 0, "ignore_eos": true, "stream": true, "return_token_ids": true}));
    let streamed: Vec<Value> = chunks.iter().filter_map(|c| c["choices"][0]["token_ids"].as_array()).flatten().cloned().collect();
    assert_eq!(Value::Array(streamed), expected[1]);
    let (status, err) = support::post(&via_b, "/v1/completions", &json!({"prompt": "x", "temperature": -1}));
    assert_eq!((status, err["error"]["param"].clone()), (400, json!("temperature")));

    // Garbage datagrams at a stage's control port: the mesh keeps serving.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..50u8 {
        sock.send_to(&[i; 1200], format!("127.0.0.1:{cb}")).unwrap();
    }

    // 32 concurrent streams through the pipeline.
    let server_ref = &server;
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..32)
            .map(|i| {
                let p = prompts[i % 3];
                scope.spawn(move || {
                    let chunks = support::sse(server_ref, "/v1/completions", &json!({"prompt": p, "max_tokens": 16, "temperature": 0, "ignore_eos": true, "stream": true, "return_token_ids": true}));
                    chunks.iter().filter_map(|c| c["choices"][0]["token_ids"].as_array()).flatten().cloned().collect::<Vec<Value>>()
                })
            })
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            assert_eq!(Value::Array(h.join().unwrap()), expected[i % 3], "stream {i}");
        }
    });
}
