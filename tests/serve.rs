//! `baton serve` as a process, spoken to over real HTTP on loopback: completions and chat,
//! streaming and not, logprobs, every error status, cancellation freeing KV, 64 concurrent
//! streams, metrics, and graceful shutdown.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[path = "support/mod.rs"]
mod support;
use support::{http, post, sse, start, stats};

#[test]
fn completions_match_the_engine_and_streaming_matches_non_streaming() {
    let s = start("basic", &[]);
    let req = json!({"model": "tiny", "prompt": "Hello, world", "max_tokens": 12, "temperature": 0, "ignore_eos": true, "return_token_ids": true});
    let (status, r) = post(&s, "/v1/completions", &req);
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["object"], "text_completion");
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    assert_eq!(r["usage"]["completion_tokens"], 12);
    let ids = r["choices"][0]["token_ids"].as_array().unwrap().clone();
    assert_eq!(ids.len(), 12);

    // The same request through `baton generate` (no server) gives the same tokens.
    let out = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["generate", "--model", s.model.to_str().unwrap(), "--prompt", "Hello, world", "--max-tokens", "12", "--ignore-eos", "--json"])
        .output()
        .unwrap();
    let g: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(g["token_ids"].as_array().unwrap(), &ids);
    assert_eq!(g["prompt_token_ids"], r["prompt_token_ids"]);

    // Streaming: same text, chunk by chunk, then the usage chunk.
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    sreq["stream_options"] = json!({"include_usage": true});
    let chunks = sse(&s, "/v1/completions", &sreq);
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
    assert_eq!(text, r["choices"][0]["text"].as_str().unwrap());
    let streamed_ids: Vec<Value> = chunks.iter().filter_map(|c| c["choices"][0]["token_ids"].as_array()).flatten().cloned().collect();
    assert_eq!(streamed_ids, ids);
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 12);
    assert_eq!(chunks[chunks.len() - 2]["choices"][0]["finish_reason"], "length");

    // A token-id prompt gives the same continuation.
    let (_, r2) = post(&s, "/v1/completions", &json!({"prompt": r["prompt_token_ids"], "max_tokens": 12, "temperature": 0, "ignore_eos": true, "return_token_ids": true}));
    assert_eq!(r2["choices"][0]["token_ids"].as_array().unwrap(), &ids);

    // Logprobs: top-3 per token, chosen token's logprob present.
    let (_, r3) = post(&s, "/v1/completions", &json!({"prompt": "Hi", "max_tokens": 4, "temperature": 0, "logprobs": 3, "ignore_eos": true}));
    let lp = &r3["choices"][0]["logprobs"];
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 4);
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 3);
    assert!(lp["token_logprobs"][0].as_f64().unwrap() < 0.0);

    // Seeded sampling reproduces.
    let seeded = json!({"prompt": "Hi", "max_tokens": 8, "temperature": 1.0, "top_p": 0.9, "seed": 7, "ignore_eos": true, "return_token_ids": true});
    let a = post(&s, "/v1/completions", &seeded).1;
    let b = post(&s, "/v1/completions", &seeded).1;
    assert_eq!(a["choices"][0]["token_ids"], b["choices"][0]["token_ids"]);
}

#[test]
fn chat_completions_render_the_template_and_stream() {
    let s = start("chat", &[]);
    let req = json!({"model": "tiny", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                     "max_completion_tokens": 6, "temperature": 0, "ignore_eos": true, "logprobs": true, "top_logprobs": 2});
    let (status, r) = post(&s, "/v1/chat/completions", &req);
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["object"], "chat.completion");
    assert_eq!(r["choices"][0]["message"]["role"], "assistant");
    assert_eq!(r["choices"][0]["logprobs"]["content"].as_array().unwrap().len(), 6);
    assert_eq!(r["choices"][0]["logprobs"]["content"][0]["top_logprobs"].as_array().unwrap().len(), 2);
    // <|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n
    assert!(r["usage"]["prompt_tokens"].as_u64().unwrap() > 10);
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    let chunks = sse(&s, "/v1/chat/completions", &sreq);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, r["choices"][0]["message"]["content"].as_str().unwrap());
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "length");
}

#[test]
fn errors_have_openai_bodies_and_the_right_status() {
    let s = start("errors", &["--max-model-len", "64"]);
    let check = |body: &str, path: &str, want: u16, param: Option<&str>| {
        let (status, _, text) = http(&s, "POST", path, Some(body));
        assert_eq!(status, want, "{body} -> {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert!(v["error"]["message"].is_string(), "{text}");
        if let Some(p) = param {
            assert_eq!(v["error"]["param"], p, "{text}");
        }
    };
    check("{not json", "/v1/completions", 400, None);
    check(r#"{"prompt": "x", "temperature": -1}"#, "/v1/completions", 400, Some("temperature"));
    check(r#"{"prompt": "x", "top_p": 2}"#, "/v1/completions", 400, Some("top_p"));
    check(r#"{"prompt": "x", "max_tokens": "ten"}"#, "/v1/completions", 400, Some("max_tokens"));
    check(r#"{"prompt": [1, 99999999]}"#, "/v1/completions", 400, Some("prompt"));
    check(r#"{"prompt": "x", "n": 2}"#, "/v1/completions", 400, Some("n"));
    check(r#"{"messages": []}"#, "/v1/chat/completions", 400, Some("messages"));
    check(r#"{"model": "gpt-9", "prompt": "x"}"#, "/v1/completions", 404, Some("model"));
    let long = "word ".repeat(200);
    check(&json!({"prompt": long}).to_string(), "/v1/completions", 400, None);
    check(r#"{"prompt": "x", "max_tokens": 100}"#, "/v1/completions", 400, None);
    // The server still serves after all of that.
    assert_eq!(post(&s, "/v1/completions", &json!({"prompt": "x", "max_tokens": 2})).0, 200);
}

#[test]
fn a_full_queue_answers_429_with_retry_after() {
    let s = start("busy", &["--max-num-seqs", "1", "--max-waiting", "1"]);
    // Hold the one running slot and the one queue slot with long requests.
    let addr = s.addr.clone();
    let long = json!({"prompt": "x", "max_tokens": 3000, "ignore_eos": true, "stream": true}).to_string();
    let mut holders = Vec::new();
    for _ in 0..2 {
        let mut c = TcpStream::connect(&addr).unwrap();
        write!(c, "POST /v1/completions HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{long}", long.len()).unwrap();
        holders.push(c);
        std::thread::sleep(Duration::from_millis(200));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, head, body) = http(&s, "POST", "/v1/completions", Some(r#"{"prompt": "y", "max_tokens": 2}"#));
        if status == 429 {
            assert!(head.to_lowercase().contains("retry-after: 1"), "{head}");
            assert!(body.contains("rate_limit_error"), "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "never got 429 (last {status})");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(holders);
}

#[test]
fn a_client_that_disconnects_frees_its_kv_at_once() {
    let s = start("cancel", &[]);
    let body = json!({"prompt": "x", "max_tokens": 3000, "ignore_eos": true, "stream": true}).to_string();
    let mut c = TcpStream::connect(&s.addr).unwrap();
    write!(c, "POST /v1/completions HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut buf = [0u8; 4096];
    let mut got = 0;
    while got < 2000 {
        got += c.read(&mut buf).unwrap();
    }
    let st = stats(&s);
    assert_eq!(st["running"], 1, "{st}");
    assert!(st["kv_cache_usage"].as_f64().unwrap() > 0.0);
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = stats(&s);
        if st["running"] == 0 && st["kv_cache_usage"].as_f64() == Some(0.0) {
            assert_eq!(st["requests"]["abort"], 1, "{st}");
            break;
        }
        assert!(Instant::now() < deadline, "KV not freed after the client left: {st}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sixty_four_concurrent_streams_all_finish_correctly() {
    let s = start("concurrent", &[]);
    let prompts: Vec<String> = (0..8).map(|i| format!("Request number {i} says hello")).collect();
    // Expected outputs, one request at a time.
    let expected: Vec<Value> = prompts
        .iter()
        .map(|p| post(&s, "/v1/completions", &json!({"prompt": p, "max_tokens": 24, "temperature": 0, "ignore_eos": true, "return_token_ids": true})).1["choices"][0]["token_ids"].clone())
        .collect();
    let server = &s;
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..64)
            .map(|i| {
                let p = prompts[i % 8].clone();
                scope.spawn(move || {
                    let chunks = sse(server, "/v1/completions", &json!({"prompt": p, "max_tokens": 24, "temperature": 0, "ignore_eos": true, "stream": true, "return_token_ids": true}));
                    chunks.iter().filter_map(|c| c["choices"][0]["token_ids"].as_array()).flatten().cloned().collect::<Vec<Value>>()
                })
            })
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            let got = h.join().unwrap();
            assert_eq!(Value::Array(got), expected[i % 8], "stream {i} differs from the same request run alone");
        }
    });
    let metrics = http(&s, "GET", "/metrics", None).2;
    for name in ["baton:time_to_first_token_seconds_bucket", "baton:inter_token_latency_seconds_count", "baton:e2e_request_latency_seconds_sum",
                 "baton:request_queue_time_seconds", "baton:num_requests_running", "baton:kv_cache_usage_perc", "baton:generation_tokens_total"] {
        assert!(metrics.contains(name), "/metrics lacks {name}");
    }
    let st = stats(&s);
    assert_eq!(st["requests"]["length"], 72, "{st}");
    assert!(st["histograms"]["iteration_sequences"]["max"].as_f64().unwrap() > 1.0, "requests were never batched together");
}

#[test]
fn sigterm_finishes_running_requests_then_exits() {
    let mut s = start("shutdown", &[]);
    let addr = s.addr.clone();
    let runner = std::thread::spawn(move || {
        let mut c = TcpStream::connect(&addr).unwrap();
        let body = json!({"prompt": "x", "max_tokens": 3000, "ignore_eos": true}).to_string();
        write!(c, "POST /v1/completions HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
        let mut raw = String::new();
        c.read_to_string(&mut raw).unwrap();
        raw
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while stats(&s)["running"] != 1 {
        assert!(Instant::now() < deadline, "the long request never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    let pid = s.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    std::thread::sleep(Duration::from_millis(20));
    let (status, _, _) = http(&s, "POST", "/v1/completions", Some(r#"{"prompt": "late", "max_tokens": 2}"#));
    assert_eq!(status, 503, "a request during shutdown must be refused");
    let raw = runner.join().unwrap();
    assert!(raw.starts_with("HTTP/1.0 200") || raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert!(raw.contains("\"completion_tokens\":3000"), "the running request did not finish: {raw}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(code) = s.child.try_wait().unwrap() {
            assert!(code.success(), "exit status {code}");
            break;
        }
        assert!(Instant::now() < deadline, "server did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `resume_token_ids` (what an entry node sends when the head it forwarded a stream to died):
/// the continuation is exactly the rest of an uninterrupted run, seeded sampling and penalties
/// included, the text goes on where the client's ends, a chat stream gets no second role chunk,
/// the usage counts every token, and a resume with nothing left or a bad id is a 400.
#[test]
fn a_resumed_request_continues_exactly_where_the_first_head_stopped() {
    let s = start("resume", &[]);
    let base = json!({"prompt": "Once upon a time", "max_tokens": 30, "temperature": 0.9, "top_p": 0.95, "seed": 11,
                      "presence_penalty": 0.5, "ignore_eos": true, "stream": true, "return_token_ids": true,
                      "stream_options": {"include_usage": true}});
    let whole = sse(&s, "/v1/completions", &base);
    let ids = |chunks: &[Value]| -> Vec<u64> { chunks.iter().filter_map(|c| c["choices"][0]["token_ids"].as_array()).flatten().filter_map(Value::as_u64).collect() };
    let text = |chunks: &[Value]| -> String { chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect() };
    let all = ids(&whole);
    assert_eq!(all.len(), 30);
    for cut in [1, 13, 29] {
        let mut resumed = base.clone();
        resumed["resume_token_ids"] = json!(all[..cut]);
        let rest = sse(&s, "/v1/completions", &resumed);
        assert_eq!(ids(&rest), all[cut..], "resumed after {cut} tokens");
        let first: String = whole.iter().take(cut).filter_map(|c| c["choices"][0]["text"].as_str()).collect();
        assert_eq!(first + &text(&rest), text(&whole), "the text goes on where it stopped (cut {cut})");
        assert_eq!(rest.last().unwrap()["usage"]["completion_tokens"], 30);
    }
    // Chat: the resumed stream has no role chunk of its own.
    let chat = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 10, "temperature": 0, "ignore_eos": true, "stream": true, "return_token_ids": true});
    let whole = sse(&s, "/v1/chat/completions", &chat);
    let all: Vec<u64> = whole.iter().filter_map(|c| c["choices"][0]["token_ids"].as_array()).flatten().filter_map(Value::as_u64).collect();
    let mut resumed = chat.clone();
    resumed["resume_token_ids"] = json!(all[..4]);
    let rest = sse(&s, "/v1/chat/completions", &resumed);
    assert!(rest.iter().all(|c| c["choices"][0]["delta"].get("role").is_none()), "{rest:?}");
    let rest_ids: Vec<u64> = rest.iter().filter_map(|c| c["choices"][0]["token_ids"].as_array()).flatten().filter_map(Value::as_u64).collect();
    assert_eq!(rest_ids, all[4..]);
    // Bad resumes.
    let mut full = base.clone();
    full["stream"] = json!(false);
    full["resume_token_ids"] = json!(vec![1u64; 30]);
    let (status, body) = post(&s, "/v1/completions", &full);
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "resume_token_ids", "{body}");
    full["resume_token_ids"] = json!([1, 99_999_999]);
    let (status, body) = post(&s, "/v1/completions", &full);
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "resume_token_ids", "{body}");
}
