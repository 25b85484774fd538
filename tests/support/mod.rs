//! Shared by the process-level tests: start `baton serve` on loopback, speak HTTP/1.0 to it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod cluster;

pub fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("baton-serve-test-{}-{name}", std::process::id()))
}

pub fn tiny_model(name: &str) -> PathBuf {
    let dir = scratch(name);
    let out = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["gen-model", "--preset", "tiny", "--out", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    dir
}

/// A running server, killed when dropped.
pub struct Server {
    pub child: Child,
    /// HTTP address.
    pub addr: String,
    /// QUIC address, when the server runs the QUIC API.
    pub quic: Option<String>,
    pub model: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn start(name: &str, extra: &[&str]) -> Server {
    let model = tiny_model(name);
    let mut child = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["serve", "--model", model.to_str().unwrap(), "--listen", "127.0.0.1:0", "--served-model-name", "tiny", "--threads", "2"])
        .args(extra)
        .args(if extra.contains(&"--no-quic") { &[][..] } else { &["--quic-listen", "127.0.0.1:0"][..] })
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    // Lines before the address (the CPU kernels chosen) are skipped.
    while stderr.read_line(&mut line).unwrap() > 0 && !line.contains("http://") {
        line.clear();
    }
    let addr = line.split("http://").nth(1).and_then(|s| s.split_whitespace().next()).unwrap_or_else(|| panic!("no address in {line:?}")).to_string();
    let mut quic = None;
    if !extra.contains(&"--no-quic") {
        line.clear();
        stderr.read_line(&mut line).unwrap();
        quic = line.split("quic://").nth(1).and_then(|s| s.split_whitespace().next()).map(str::to_string);
        assert!(quic.is_some(), "no QUIC address in {line:?}");
    }
    // Keep draining stderr so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in stderr.lines() {});
    let server = Server { child, addr, quic, model };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !health_ok(&server.addr) {
        assert!(Instant::now() < deadline, "server never became ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    server
}

/// Whether `addr` answers /health with 200 (any connection error is "not yet").
pub fn health_ok(addr: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut c) = std::net::TcpStream::connect(addr) else { return false };
    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
    let mut raw = String::new();
    let answered = c.write_all(b"GET /health HTTP/1.0\r\nHost: x\r\n\r\n").is_ok() && c.read_to_string(&mut raw).is_ok();
    answered && (raw.starts_with("HTTP/1.1 200") || raw.starts_with("HTTP/1.0 200"))
}

/// One HTTP/1.0 exchange (the body ends when the server closes).
pub fn http(s: &Server, method: &str, path: &str, body: Option<&str>) -> (u16, String, String) {
    let mut conn = TcpStream::connect(&s.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let body = body.unwrap_or("");
    write!(conn, "{method} {path} HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut raw = String::new();
    conn.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, head.to_string(), body.to_string())
}

pub fn post(s: &Server, path: &str, body: &Value) -> (u16, Value) {
    let (status, _, text) = http(s, "POST", path, Some(&body.to_string()));
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")))
}

/// The `data:` payloads of an SSE response, `[DONE]` excluded (asserted last).
pub fn sse(s: &Server, path: &str, body: &Value) -> Vec<Value> {
    let (status, head, text) = http(s, "POST", path, Some(&body.to_string()));
    assert_eq!(status, 200, "{text}");
    assert!(head.to_lowercase().contains("text/event-stream"), "{head}");
    let data: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "stream did not end with [DONE]: {text}");
    data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect()
}

pub fn stats(s: &Server) -> Value {
    serde_json::from_str(&http(s, "GET", "/v1/stats", None).2).unwrap()
}

