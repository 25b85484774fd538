//! A three-node cluster.toml on loopback and `baton node` processes for it (the mesh and
//! elastic-mesh tests).

use std::process::{Child, Command, Stdio};

use serde_json::{json, Value};

pub struct Nodes(pub Vec<Child>);

impl Drop for Nodes {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A port below the kernel's ephemeral range (32768 and up on Linux) that is free now. The
/// nodes bind the ports cluster.toml names only later, so a port from the ephemeral range could
/// meanwhile be taken by any outgoing connection or UCX listener of the tests running beside
/// this one; ports below it are only ever taken on purpose.
fn unused_port(free: impl Fn(u16) -> bool) -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7919);
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + (start.wrapping_add(n.wrapping_mul(131)) % 12_000) as u16;
        if free(port) {
            return port;
        }
    }
}

pub fn free_udp() -> u16 {
    unused_port(|p| std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok())
}

pub fn free_tcp() -> u16 {
    unused_port(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
}

/// `baton node` for `name` of `cfg` (1 thread, 64 MiB of KV), with extra arguments and
/// UCX_TLS (unset when `None`), stderr appended to `NAME.log` beside `cfg` (see [`log_tail`]).
pub fn spawn_node(cfg: &std::path::Path, name: &str, extra: &[&str], ucx_tls: Option<&str>) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_baton"));
    cmd.args(["node", "--cluster", cfg.to_str().unwrap(), "--name", name, "--threads", "1", "--kv-cache-mb", "64"]).args(extra);
    match ucx_tls {
        Some(tls) => cmd.env("UCX_TLS", tls),
        None => cmd.env_remove("UCX_TLS"),
    };
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log_path(cfg, name)).unwrap();
    cmd.stdout(Stdio::null()).stderr(Stdio::from(log)).spawn().unwrap()
}

pub fn log_path(cfg: &std::path::Path, name: &str) -> std::path::PathBuf {
    cfg.with_file_name(format!("{name}.log"))
}

/// All a node has logged so far.
pub fn log_text(cfg: &std::path::Path, name: &str) -> String {
    std::fs::read_to_string(log_path(cfg, name)).unwrap_or_default()
}

/// The last lines a node wrote (for failure messages).
pub fn log_tail(cfg: &std::path::Path, name: &str) -> String {
    let text = std::fs::read_to_string(log_path(cfg, name)).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Ports of a test cluster.
pub struct Ports {
    pub http: u16,
    pub quic: u16,
    pub control_b: u16,
    pub http_b: u16,
    pub quic_b: u16,
    pub http_c: u16,
}

/// A three-node cluster.toml on free loopback ports.
pub fn write_cluster(name: &str, model: &std::path::Path) -> (std::path::PathBuf, Ports) {
    let dir = super::scratch(name);
    std::fs::create_dir_all(&dir).unwrap();
    let (ca, cb, cc, http, quic, http_b, quic_b, http_c) = (free_udp(), free_udp(), free_udp(), free_tcp(), free_udp(), free_tcp(), free_udp(), free_tcp());
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
quic = "127.0.0.1:{quic_b}"
memory_gb = 1
[[nodes]]
name = "node-c"
control = "127.0.0.1:{cc}"
http = "127.0.0.1:{http_c}"
memory_gb = 1
"#,
            model = model.display()
        ),
    )
    .unwrap();
    (cfg, Ports { http, quic, control_b: cb, http_b, quic_b, http_c })
}

/// A tiny model with 12 layers, so three nodes split it 4/4/4, two 6/6, and taking a third
/// node back improves the slowest stage past the planner's threshold.
pub fn deep_tiny_model(name: &str) -> std::path::PathBuf {
    let dir = super::scratch(name);
    let out = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["gen-model", "--preset", "tiny", "--layers", "12", "--out", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    dir
}

/// What one node gives for `prompt`, greedy.
pub fn reference(model: &std::path::Path, prompt: &str, max_tokens: usize) -> Vec<u64> {
    let out = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["generate", "--model", model.to_str().unwrap(), "--prompt", prompt, "--max-tokens", &max_tokens.to_string(), "--ignore-eos", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["token_ids"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect()
}

/// Streams one greedy completion; returns the HTTP status and every token id streamed.
pub fn stream(head: &super::Server, prompt: &str, max_tokens: usize) -> (u16, Vec<u64>, String) {
    let body = json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true, "stream": true, "return_token_ids": true});
    let (status, _, text) = super::http(head, "POST", "/v1/completions", Some(&body.to_string()));
    let mut tokens = Vec::new();
    for data in text.lines().filter_map(|l| l.strip_prefix("data: ")).filter(|d| *d != "[DONE]") {
        let v: Value = serde_json::from_str(data).unwrap_or(Value::Null);
        if let Some(ids) = v["choices"][0]["token_ids"].as_array() {
            tokens.extend(ids.iter().filter_map(Value::as_u64));
        }
    }
    (status, tokens, text)
}

/// A sample of `/metrics` (a head's requests and latencies, an entry node's own counters); a
/// sample the node does not export fails the test, never reads as 0.
pub fn metric(node: &super::Server, name: &str) -> f64 {
    let text = super::http(node, "GET", "/metrics", None).2;
    text.lines().find_map(|l| l.strip_prefix(name)?.trim().parse().ok()).unwrap_or_else(|| panic!("{} exports no {name}:\n{text}", node.addr))
}

pub fn mesh(head: &super::Server) -> Value {
    serde_json::from_str(&super::http(head, "GET", "/v1/mesh", None).2).unwrap_or(Value::Null)
}

pub fn node_state(view: &Value, name: &str) -> String {
    view["nodes"].as_array().and_then(|n| n.iter().find(|n| n["name"] == name)).map_or(String::new(), |n| n["state"].as_str().unwrap_or("").to_string())
}
