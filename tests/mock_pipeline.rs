//! Eight `baton node` processes on modeled H100s (`devices = ["mock:h100"]` in cluster.toml,
//! a config-only model: no weights anywhere) form one pipeline of eight stages on loopback,
//! and every stream through it has, token for token, what one mock node generates alone.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

#[path = "support/mod.rs"]
mod support;

use support::cluster::{free_tcp, free_udp, log_tail, mesh, metric, spawn_node, stream, Nodes};

/// One mock node's greedy tokens for `prompt`.
fn one_mock_node(model: &std::path::Path, prompt: &str, max_tokens: usize) -> Vec<u64> {
    let out = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["generate", "--model", model.to_str().unwrap(), "--device", "mock:h100", "--prompt", prompt, "--max-tokens", &max_tokens.to_string(), "--ignore-eos", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["token_ids"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect()
}

#[test]
fn an_eight_stage_mock_pipeline_matches_one_mock_node() {
    let dir = support::scratch("mock-pipeline");
    std::fs::create_dir_all(&dir).unwrap();
    let model = dir.join("model");
    let out = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["gen-model", "--preset", "tiny", "--layers", "16", "--config-only", "--out", model.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!model.join("model.safetensors").exists());

    let names: Vec<String> = (0..8).map(|i| format!("node-{i}")).collect();
    let http = free_tcp();
    let mut toml = format!("[cluster]\nname = \"test\"\n[model]\npath = \"{}\"\n[placement]\nmode = \"auto\"\n", model.display());
    for (i, n) in names.iter().enumerate() {
        toml += &format!("[[nodes]]\nname = \"{n}\"\ncontrol = \"127.0.0.1:{}\"\nmemory_gb = 1\ndevices = [\"mock:h100\"]\n", free_udp());
        if i == 0 {
            toml += &format!("http = \"127.0.0.1:{http}\"\n");
        }
    }
    let cfg = dir.join("cluster.toml");
    std::fs::write(&cfg, toml).unwrap();
    let bin = env!("CARGO_BIN_EXE_baton");
    assert!(Command::new(bin).args(["cluster", "init", cfg.to_str().unwrap()]).status().unwrap().success());
    let mut nodes = Nodes(Vec::new());
    for n in names.iter().rev() {
        nodes.0.push(spawn_node(&cfg, n, &["--tensor-plane", "quic"], None));
    }
    let head = support::Server { child: Command::new("true").spawn().unwrap(), addr: format!("127.0.0.1:{http}"), quic: None, model: model.clone() };
    let deadline = Instant::now() + Duration::from_secs(90);
    while !support::health_ok(&head.addr) {
        assert!(Instant::now() < deadline, "the head never became ready\n{}", log_tail(&cfg, "node-0"));
        std::thread::sleep(Duration::from_millis(100));
    }
    // Eight stages of two layers each, every one on a modeled card.
    let view = mesh(&head);
    let stages: Vec<(String, u64, u64)> = view["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| Some((n["name"].as_str()?.to_string(), n["layers"][0].as_u64()?, n["layers"][1].as_u64()?)))
        .collect();
    assert_eq!(stages.len(), 8, "{view}");
    assert!(stages.iter().all(|(_, a, b)| b - a == 2), "{view}");
    assert!(log_tail(&cfg, "node-3").contains("mock:h100"), "{}", log_tail(&cfg, "node-3"));
    // The head's KV is what a stage's card leaves after its layers, not the host budget.
    let head_log = log_tail(&cfg, "node-0");
    assert!(head_log.contains("card leaves after layers"), "{head_log}");

    let max_tokens = 24;
    let prompts = ["Hello", "Eight stages", "Once upon a time"];
    let want: Vec<Vec<u64>> = prompts.iter().map(|p| one_mock_node(&model, p, max_tokens)).collect();
    let (h, want_ref) = (&head, &want);
    std::thread::scope(|scope| {
        let clients: Vec<_> = (0..prompts.len()).map(|i| scope.spawn(move || stream(h, prompts[i], max_tokens))).collect();
        for (i, c) in clients.into_iter().enumerate() {
            let (status, tokens, text) = c.join().unwrap();
            assert_eq!(status, 200, "{}: {text}", prompts[i]);
            assert_eq!(tokens, want_ref[i], "{}: tokens differ from one mock node's", prompts[i]);
        }
    });
    assert_eq!(metric(&head, "baton:request_failure_total"), 0.0);
    drop(nodes);
}
