//! Prefix caching end to end: `baton serve` with caching on (the default) and off answer every
//! greedy request with the same tokens, for repeated prompts, prompts sharing a beginning and
//! prompts sharing nothing, one at a time and concurrently; the cache's hits show in
//! `usage.prompt_tokens_details.cached_tokens`, `/metrics` and `/v1/stats`; KV usage returns to
//! 0 with cached blocks counted free. Then the same through a three-stage pipeline of
//! `baton node`s, against one node's `baton generate`.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[path = "support/mod.rs"]
mod support;
use support::cluster::{spawn_node, write_cluster, Nodes};
use support::{post, sse, start, stats};

/// Token-id prompts: two 70-token prefixes with several endings, and one unrelated prompt.
fn prompts() -> Vec<Vec<u32>> {
    let prefix = |p: u32| (0..70).map(move |i| 3 + (p * 71 + i * 13) % 400);
    let mut out = Vec::new();
    for p in 0..2 {
        for ending in 0..3u32 {
            out.push(prefix(p).chain((0..5 + ending).map(|k| 3 + (ending * 31 + k * 7) % 400)).collect());
        }
    }
    out.push((0..40).map(|i| 3 + (i * 29) % 400).collect());
    out
}

fn complete(s: &support::Server, prompt: &[u32]) -> (Value, Option<u64>) {
    let (status, r) = post(s, "/v1/completions", &json!({"prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": true, "return_token_ids": true}));
    assert_eq!(status, 200, "{r}");
    let cached = r["usage"].get("prompt_tokens_details").map(|d| d["cached_tokens"].as_u64().unwrap());
    (r["choices"][0]["token_ids"].clone(), cached)
}

/// Polls `/v1/stats` until no KV block is in use.
fn wait_kv_free(s: &support::Server) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = stats(s);
        if st["kv_cache_usage"].as_f64() == Some(0.0) && st["running"] == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "KV still in use with nothing running: {st}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn caching_changes_no_output_and_reports_its_hits() {
    let on = start("prefix-on", &["--no-quic"]);
    let off = start("prefix-off", &["--no-quic", "--no-enable-prefix-caching"]);
    let ps = prompts();
    let mut want = Vec::new();
    for p in &ps {
        let (tokens, cached) = complete(&off, p);
        assert_eq!(cached, None, "caching is off: no prompt_tokens_details");
        want.push(tokens);
    }
    // Twice through: the first pass sees each prefix once (the later endings hit it), the
    // second hits every prompt's full blocks.
    for pass in 0..2 {
        for (i, p) in ps.iter().enumerate() {
            let (tokens, cached) = complete(&on, p);
            assert_eq!(tokens, want[i], "pass {pass}, prompt {i}: caching changed the output");
            let cached = cached.expect("caching is on: usage.prompt_tokens_details.cached_tokens");
            assert_eq!(cached % 16, 0, "whole blocks only");
            assert!(cached < p.len() as u64, "the last prompt token is always computed");
            // Seen before: every full block but the one holding the last token (the second
            // pass); or the shared prefix's 4 full blocks (a new ending, the first pass).
            let expected = match (pass, i % 3) {
                (1, _) => (p.len() as u64 - 1) / 16 * 16,
                (_, 0) => 0,
                _ => 64,
            };
            assert_eq!(cached, expected, "pass {pass}, prompt {i} ({} tokens)", p.len());
        }
    }
    // Concurrently, streamed, with usage: the same tokens, and a shared prefix's blocks in
    // use by several sequences at once.
    let handles: Vec<_> = (0..12)
        .map(|k| {
            let (addr, p, want) = (on.addr.clone(), ps[k % ps.len()].clone(), want[k % ps.len()].clone());
            std::thread::spawn(move || {
                let s = support::Server { child: Command::new("true").spawn().unwrap(), addr, quic: None, model: Default::default() };
                let chunks = sse(&s, "/v1/completions", &json!({"prompt": p, "max_tokens": 10, "temperature": 0, "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}, "return_token_ids": true}));
                let got: Vec<Value> = chunks.iter().filter_map(|c| c["choices"].get(0)?["token_ids"].as_array()).flatten().cloned().collect();
                assert_eq!(Value::Array(got), want, "concurrent request {k}");
                chunks.last().unwrap()["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap()
            })
        })
        .collect();
    let hits: Vec<u64> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(hits.iter().all(|&h| h >= 32), "every prompt was seen before: {hits:?}");

    wait_kv_free(&on);
    let st = stats(&on);
    let pc = &st["prefix_cache"];
    assert!(pc["hit_rate"].as_f64().unwrap() > 0.5, "{st}");
    assert!(pc["cached_blocks"].as_u64().unwrap() > 0, "{st}");
    let queried = support::cluster::metric(&on, "baton:prefix_cache_queries_total");
    let hit = support::cluster::metric(&on, "baton:prefix_cache_hits_total");
    assert_eq!(queried as u64, pc["queried_tokens"].as_u64().unwrap());
    assert!(hit > 0.0 && hit < queried, "{hit} of {queried}");
    assert_eq!(stats(&off)["prefix_cache"], Value::Null);
}

#[test]
fn caching_changes_no_output_through_a_three_stage_pipeline() {
    let bin = env!("CARGO_BIN_EXE_baton");
    let model = support::tiny_model("prefix-mesh-model");
    let (cfg, ports) = write_cluster("prefix-mesh", &model);
    assert!(Command::new(bin).args(["cluster", "init", cfg.to_str().unwrap()]).status().unwrap().success());
    let mut nodes = Nodes(Vec::new());
    for name in ["node-c", "node-b", "node-a"] {
        nodes.0.push(spawn_node(&cfg, name, &["--tensor-plane", "quic"], None));
    }
    let head = support::Server { child: Command::new("true").spawn().unwrap(), addr: format!("127.0.0.1:{}", ports.http), quic: None, model: model.clone() };
    let deadline = Instant::now() + Duration::from_secs(90);
    while !support::health_ok(&head.addr) {
        assert!(Instant::now() < deadline, "the pipeline head never became ready:\n{}", support::cluster::log_tail(&cfg, "node-a"));
        std::thread::sleep(Duration::from_millis(100));
    }
    let system = "You are a terse assistant that answers in one short line. Be exact. ";
    let prompts = [format!("{system}What is two plus two?"), format!("{system}Name a colour."), format!("{system}What is two plus two?"), "Something else entirely".to_string()];
    for (i, p) in prompts.iter().enumerate() {
        let want = support::cluster::reference(&model, p, 12);
        let (status, r) = post(&head, "/v1/completions", &json!({"prompt": p, "max_tokens": 12, "temperature": 0, "ignore_eos": true, "return_token_ids": true}));
        assert_eq!(status, 200, "{r}");
        let got: Vec<u64> = r["choices"][0]["token_ids"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect();
        assert_eq!(got, want, "prompt {i}: the cached pipeline differs from one node");
        let cached = r["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
        if i == 0 || i == 3 {
            assert_eq!(cached, 0, "prompt {i} was never seen");
        } else {
            assert!(cached >= 16, "prompt {i} shares the system prompt, yet {cached} tokens were cached");
        }
    }
    wait_kv_free(&head);
}
