//! The `baton` binary as a user runs it: gen-model then generate, JSON output, and clear errors
//! for bad input (exit status non-zero, the message naming the file or flag).

use std::path::PathBuf;
use std::process::{Command, Output};

fn baton(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(args)
        .env("BATON_HOME", scratch("home"))
        .output()
        .expect("run baton")
}

fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("baton-cli-test-{}-{name}", std::process::id()))
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "baton failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout.clone()).expect("utf-8 stdout")
}

fn fails_with(out: &Output, needles: &[&str]) {
    assert!(!out.status.success(), "baton succeeded unexpectedly");
    let err = String::from_utf8_lossy(&out.stderr);
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}: {err}");
    }
    assert!(!err.contains("panicked"), "baton panicked: {err}");
}

#[test]
fn gen_model_then_generate_json_is_deterministic() {
    let dir = scratch("tiny");
    let d = dir.to_str().unwrap();
    ok(&baton(&["gen-model", "--preset", "tiny", "--out", d]));
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        assert!(dir.join(f).exists(), "{f} missing");
    }
    let run = || {
        let out = ok(&baton(&["generate", "--model", d, "--prompt", "Hello, world", "--max-tokens", "12", "--ignore-eos", "--json", "--threads", "2"]));
        serde_json::from_str::<serde_json::Value>(out.trim()).expect("one JSON object")
    };
    let a = run();
    let b = run();
    assert_eq!(a["token_ids"], b["token_ids"], "greedy generation is not deterministic");
    assert_eq!(a["token_ids"].as_array().unwrap().len(), 12);
    assert!(!a["prompt_token_ids"].as_array().unwrap().is_empty());
    assert!(a["text"].is_string());
    assert!(a["prefill_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(a["decode_tokens_per_s"].as_f64().unwrap() > 0.0);

    // Seeded sampling reproduces; streaming mode prints text and the speed line.
    let seeded = |seed: &str| ok(&baton(&["generate", "--model", d, "--max-tokens", "8", "--temperature", "1.0", "--seed", seed, "--ignore-eos", "--json"]));
    let s1: serde_json::Value = serde_json::from_str(seeded("5").trim()).unwrap();
    let s2: serde_json::Value = serde_json::from_str(seeded("5").trim()).unwrap();
    assert_eq!(s1["token_ids"], s2["token_ids"]);
    let out = baton(&["generate", "--model", d, "--max-tokens", "4"]);
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("decode"));
}

#[test]
fn bad_input_gives_clear_errors() {
    fails_with(&baton(&["gen-model", "--preset", "huge", "--out", "/tmp/x"]), &["--preset", "huge", "tiny"]);
    let missing = scratch("nonexistent");
    fails_with(&baton(&["generate", "--model", missing.to_str().unwrap()]), &["config.json"]);
    let dir = scratch("tiny-bad");
    let d = dir.to_str().unwrap();
    ok(&baton(&["gen-model", "--preset", "tiny", "--out", d]));
    fails_with(&baton(&["generate", "--model", d, "--temperature=-1"]), &["temperature"]);
    // Without a GPU (CI), selecting CUDA is a clear error, never a panic.
    let cuda = baton(&["generate", "--model", d, "--device", "cuda", "--max-tokens", "2"]);
    if !cuda.status.success() {
        fails_with(&cuda, &["CUDA"]);
        // `serve` opens the device before it listens: the same clear error, at once.
        fails_with(&baton(&["serve", "--model", d, "--device", "cuda", "--listen", "127.0.0.1:0", "--no-quic"]), &["--device cuda", "CUDA"]);
    }
    std::fs::write(dir.join("tokenizer.json"), "{}").unwrap();
    fails_with(&baton(&["generate", "--model", d]), &["tokenizer.json"]);
}
