//! The native QUIC API of a real `baton serve` process: the same tokens as HTTP, errors as
//! frames, cancellation freeing KV, many streams on one connection, and a peer sending garbage
//! losing its connection while the server keeps serving.

use std::time::{Duration, Instant};

use baton_client::{Client, ClientError, GenerateRequest, Prompt};
use baton_proto::{ErrorKind, Frame};
use serde_json::json;

#[path = "support/mod.rs"]
mod support;
use support::{post, start, stats, Server};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

async fn connect(s: &Server) -> Client {
    let addr = s.quic.as_ref().unwrap().parse().unwrap();
    let port = s.quic.as_ref().unwrap().rsplit(':').next().unwrap().to_string();
    let cert = std::fs::read(std::env::temp_dir().join(format!("baton-quic-{port}.der"))).unwrap();
    Client::connect(addr, "localhost", &cert).await.unwrap()
}

fn greedy(prompt: &str, max: u32) -> GenerateRequest {
    let mut r = GenerateRequest::new(Prompt::Text(prompt.into()));
    r.max_tokens = Some(max);
    r.temperature = 0.0;
    r.ignore_eos = true;
    r
}

/// Runs a request to the end: (token ids, final frame).
async fn run(c: &Client, r: &GenerateRequest) -> (Vec<u32>, Frame) {
    let mut g = c.generate(r).await.unwrap();
    let mut ids = Vec::new();
    loop {
        match g.next().await.unwrap().unwrap() {
            Frame::Token { id, .. } => ids.push(id),
            Frame::Started { .. } => {}
            last => return (ids, last),
        }
    }
}

#[test]
fn quic_gives_the_same_tokens_as_http_and_the_same_errors() {
    let s = start("quic-basic", &[]);
    let (_, r) = post(&s, "/v1/completions", &json!({"prompt": "Hello, world", "max_tokens": 10, "temperature": 0, "ignore_eos": true, "return_token_ids": true}));
    let want: Vec<u32> = r["choices"][0]["token_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    rt().block_on(async {
        let c = connect(&s).await;
        let (ids, last) = run(&c, &greedy("Hello, world", 10)).await;
        assert_eq!(ids, want);
        assert!(matches!(last, Frame::Done { completion_tokens: 10, .. }), "{last:?}");

        let mut bad = greedy("x", 4);
        bad.top_p = 0.0;
        let (_, last) = run(&c, &bad).await;
        assert!(matches!(&last, Frame::Error { kind: ErrorKind::BadRequest, param: Some(p), .. } if p == "top_p"), "{last:?}");
        let mut unknown = greedy("x", 4);
        unknown.model = Some("gpt-9".into());
        let (_, last) = run(&c, &unknown).await;
        assert!(matches!(last, Frame::Error { kind: ErrorKind::ModelNotFound, .. }), "{last:?}");
        let mut old = greedy("x", 4);
        old.version = 99;
        let (_, last) = run(&c, &old).await;
        assert!(matches!(&last, Frame::Error { kind: ErrorKind::BadRequest, param: Some(p), .. } if p == "version"), "{last:?}");

        // Sixteen concurrent streams on one connection all finish with the right tokens.
        let c = std::sync::Arc::new(c);
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let c = c.clone();
                tokio::spawn(async move { run(&c, &greedy("Hello, world", 10)).await.0 })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), want);
        }
    });
}

#[test]
fn cancelling_a_quic_request_frees_its_kv() {
    let s = start("quic-cancel", &[]);
    rt().block_on(async {
        let c = connect(&s).await;
        let mut g = c.generate(&greedy("x", 3000)).await.unwrap();
        for _ in 0..20 {
            g.next().await.unwrap();
        }
        assert_eq!(stats(&s)["running"], 1);
        g.cancel();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let st = stats(&s);
            if st["running"] == 0 && st["kv_cache_usage"].as_f64() == Some(0.0) {
                break;
            }
            assert!(Instant::now() < deadline, "KV not freed after cancel: {st}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}

#[test]
fn garbage_closes_that_connection_and_the_server_keeps_serving() {
    let s = start("quic-garbage", &[]);
    rt().block_on(async {
        let bad = connect(&s).await;
        let mut g = bad.send_raw(&[16, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]).await.unwrap();
        match g.next().await {
            Err(ClientError::Frame(_)) | Err(ClientError::Connection(_)) => {}
            other => panic!("garbage was answered: {:?}", other.map(|f| f.is_some())),
        }
        // An oversized length prefix is refused the same way.
        let bad2 = connect(&s).await;
        let mut g = bad2.send_raw(&u32::MAX.to_le_bytes()).await.unwrap();
        assert!(g.next().await.is_err());
        // A new connection is served normally.
        let good = connect(&s).await;
        let (ids, last) = run(&good, &greedy("still here", 3)).await;
        assert_eq!(ids.len(), 3);
        assert!(matches!(last, Frame::Done { .. }));
    });
    assert_eq!(post(&s, "/v1/completions", &json!({"prompt": "x", "max_tokens": 2})).0, 200);
}
