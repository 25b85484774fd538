//! gpu_check: what scripts/gpu-check.sh runs on a GPU machine. (1) Every backend operation on
//! random inputs, CUDA against the CPU backend (relative error by norm: < 1e-3 on f32 paths,
//! < 1e-2 where bf16/f16 weights round the activations). (2) The Hugging Face parity fixtures
//! on the GPU. (3) Greedy generation, GPU against CPU, token for token wherever the CPU's top-2
//! gap exceeds 0.05. (4) Decode tokens/s at batch 1, 8, 32 and prefill tokens/s on the given
//! models, beside the HBM bandwidth floor. Prints one JSON line per result; exits non-zero if a
//! check fails.
//!
//! Usage: gpu_check FIXTURES_DIR [MODEL_DIR ...]

use std::path::{Path, PathBuf};

use baton_cuda::backend::CudaBackend;
use baton_engine::backend::{AttnShape, Backend, BatchLayout, SeqChunk};
use baton_engine::checkpoint::{DType, TensorBytes};
use baton_engine::rng::Rng;
use baton_engine::rope::Rope;
use baton_engine::{Checkpoint, CpuBackend, KvGeometry, LocalRunner, ModelConfig, SamplingParams, Stage, StageInput, StageOutput};
use serde_json::{json, Value};

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>().sqrt();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt().max(1e-12);
    num / den
}

/// Writes a one-tensor safetensors file and returns its bytes view (so both backends upload the
/// same stored weight).
fn tensor(dir: &Path, name: &str, dtype: DType, shape: &[usize], rng: &mut Rng) -> TensorBytes {
    let n: usize = shape.iter().product();
    let vals: Vec<f32> = (0..n).map(|_| rng.next_normal() * 0.5).collect();
    let (st, bytes): (safetensors::Dtype, Vec<u8>) = match dtype {
        DType::F32 => (safetensors::Dtype::F32, vals.iter().flat_map(|v| v.to_le_bytes()).collect()),
        DType::BF16 => (safetensors::Dtype::BF16, vals.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect()),
        DType::F16 => (safetensors::Dtype::F16, vals.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect()),
    };
    let sub = dir.join(name);
    std::fs::create_dir_all(&sub).expect("scratch dir");
    let view = safetensors::tensor::TensorView::new(st, shape.to_vec(), &bytes).expect("view");
    safetensors::serialize_to_file(vec![("w".to_string(), view)], None, &sub.join("model.safetensors")).expect("write");
    Checkpoint::open(&sub).expect("open").tensor("w", shape).expect("tensor")
}

/// Runs every operation on one backend and returns the outputs in a fixed order.
fn ops<B: Backend>(b: &B, dir: &Path) -> Vec<(String, bool, Vec<f32>)> {
    let mut rng = Rng::new(7);
    let mut out = Vec::new();
    let (rows, k, n) = (5usize, 96usize, 80usize);
    let x: Vec<f32> = (0..rows * k).map(|_| rng.next_normal()).collect();
    let xb = b.upload(&x).expect("upload");
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let w = b.weight(&tensor(dir, &format!("w{dtype:?}"), dtype, &[n, k], &mut rng)).expect("weight");
        let bias = b.weight(&tensor(dir, &format!("b{dtype:?}"), DType::F32, &[n], &mut rng)).expect("bias");
        let mut y = b.zeros(rows * n).expect("zeros");
        b.matmul(&xb, rows, &w, Some(&bias), &mut y).expect("matmul");
        out.push((format!("matmul_{dtype:?}"), dtype == DType::F32, b.download(&y).expect("download")));
        let mut e = b.zeros(3 * k).expect("zeros");
        let table = b.weight(&tensor(dir, &format!("e{dtype:?}"), dtype, &[50, k], &mut rng)).expect("table");
        b.embed(&table, &[3, 0, 49], &mut e).expect("embed");
        out.push((format!("embed_{dtype:?}"), true, b.download(&e).expect("download")));
    }
    let norm = b.weight(&tensor(dir, "norm", DType::F32, &[k], &mut rng)).expect("norm");
    let mut y = b.zeros(rows * k).expect("zeros");
    b.rms_norm(&xb, &norm, 1e-5, &mut y).expect("rms_norm");
    out.push(("rms_norm".into(), true, b.download(&y).expect("download")));
    let mut z = b.upload(&x).expect("upload");
    b.add(&mut z, &y).expect("add");
    out.push(("add".into(), true, b.download(&z).expect("download")));
    let mut s = b.zeros(rows * k).expect("zeros");
    b.silu_mul(&xb, &y, &mut s).expect("silu_mul");
    out.push(("silu_mul".into(), true, b.download(&s).expect("download")));
    // A ragged batch: a 7-token prefill chunk at 3 and a decode at 20, block size 4, GQA 4/2.
    let shape = AttnShape { num_heads: 4, num_kv_heads: 2, head_dim: 64, block_size: 4, sliding_window: None };
    let layout = BatchLayout {
        chunks: vec![
            SeqChunk { start_pos: 3, len: 7, block_table: vec![5, 1, 7], wants_logits: true },
            SeqChunk { start_pos: 20, len: 1, block_table: vec![0, 2, 3, 4, 6, 8], wants_logits: true },
        ],
    };
    let cfg = json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
                     "num_hidden_layers": 1, "intermediate_size": 8, "vocab_size": 8, "rope_theta": 500000.0,
                     "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}});
    let config = ModelConfig::from_json(Path::new("config.json"), &cfg).expect("config");
    let rope = Rope::new(&config);
    let batch = b.prepare_batch(&layout, &rope, shape).expect("batch");
    let t = 8;
    let qv: Vec<f32> = (0..t * 4 * 64).map(|_| rng.next_normal()).collect();
    let kv: Vec<f32> = (0..t * 2 * 64).map(|_| rng.next_normal()).collect();
    let vv: Vec<f32> = (0..t * 2 * 64).map(|_| rng.next_normal()).collect();
    let mut q = b.upload(&qv).expect("upload");
    let mut kk = b.upload(&kv).expect("upload");
    b.rope(&batch, &mut q, 4, 64).expect("rope");
    b.rope(&batch, &mut kk, 2, 64).expect("rope");
    out.push(("rope".into(), true, b.download(&q).expect("download")));
    let mut cache = b.kv_cache(9, 4, 128).expect("kv");
    // Earlier positions first (so attention reads defined values), then this batch.
    let fill: Vec<f32> = (0..9 * 4 * 128).map(|_| rng.next_normal()).collect();
    let prefill_layout = BatchLayout { chunks: (0..9).map(|blk| SeqChunk { start_pos: 0, len: 4, block_table: vec![blk], wants_logits: false }).collect() };
    let pb = b.prepare_batch(&prefill_layout, &rope, shape).expect("batch");
    let fk = b.upload(&fill).expect("upload");
    b.write_kv(&pb, &mut cache, &fk, &fk).expect("write_kv");
    let vb = b.upload(&vv).expect("upload");
    b.write_kv(&batch, &mut cache, &kk, &vb).expect("write_kv");
    let mut att = b.zeros(t * 4 * 64).expect("zeros");
    b.attention(&batch, &cache, &q, &mut att).expect("attention");
    out.push(("paged_attention".into(), true, b.download(&att).expect("download")));
    let mut g = b.zeros(2 * 4 * 64).expect("zeros");
    b.gather_rows(&att, 4 * 64, &[6, 7], &mut g).expect("gather");
    out.push(("gather_rows".into(), true, b.download(&g).expect("download")));
    out
}

fn load<B: Backend>(b: B, dir: &Path, blocks: usize) -> Stage<B> {
    let config = ModelConfig::from_dir(dir).expect("config");
    let ckpt = Checkpoint::open(dir).expect("checkpoint");
    Stage::load(b, &config, &ckpt, 0..config.num_layers, KvGeometry { block_size: 16, num_blocks: blocks }, &mut |_, _| {}).expect("load")
}

fn logits<B: Backend>(s: &mut Stage<B>, tokens: &[u32]) -> Vec<f32> {
    let layout = BatchLayout { chunks: vec![SeqChunk { start_pos: 0, len: tokens.len(), block_table: (0..tokens.len().div_ceil(16) as u32).collect(), wants_logits: true }] };
    match s.forward(&layout, StageInput::Tokens(tokens)).expect("forward") {
        StageOutput::Logits { data, .. } => data,
        StageOutput::Hidden(_) => panic!("not a whole model"),
    }
}

fn greedy<B: Backend>(stage: Stage<B>, prompt: &[u32]) -> Vec<u32> {
    let mut runner = LocalRunner::new(stage, 8).expect("runner");
    runner.generate(prompt, SamplingParams { ignore_eos: true, ..SamplingParams::greedy(32) }, &[], &mut |_| {}).expect("generate").token_ids
}

fn main() {
    let args: Vec<PathBuf> = std::env::args().skip(1).map(PathBuf::from).collect();
    let Some(fixtures) = args.first() else {
        eprintln!("usage: gpu_check FIXTURES_DIR [MODEL_DIR ...]");
        std::process::exit(2);
    };
    let gpu = match CudaBackend::new(0) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("gpu_check: {e}");
            std::process::exit(2);
        }
    };
    let cpu = CpuBackend::new(8).expect("cpu backend");
    let mut failed = false;
    let scratch = std::env::temp_dir().join(format!("baton-gpu-check-{}", std::process::id()));
    // (1) operations.
    let (c, g) = (ops(&cpu, &scratch.join("cpu")), ops(&gpu, &scratch.join("gpu")));
    for ((name, f32_path, a), (_, _, b)) in c.iter().zip(&g) {
        let e = rel_err(b, a);
        let limit = if *f32_path { 1e-3 } else { 1e-2 };
        failed |= !(e < limit);
        println!("{}", json!({"check": "op", "op": name, "rel_err": e, "limit": limit, "ok": e < limit}));
    }
    // (2) parity fixtures and (3) greedy against the CPU backend.
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixtures).map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default();
    dirs.sort();
    for dir in dirs {
        let Ok(text) = std::fs::read_to_string(dir.join("reference.json")) else { continue };
        let r: Value = serde_json::from_str(&text).expect("reference.json");
        let prompt: Vec<u32> = r["prompt_token_ids"].as_array().expect("ids").iter().map(|v| v.as_u64().unwrap_or(0) as u32).collect();
        let want: Vec<f32> = r["step_logits"][0].as_array().expect("logits").iter().map(|v| v.as_f64().unwrap_or(0.0) as f32).collect();
        let f32_model = r["stored_dtype"] == "float32";
        let mut s = load(CudaBackend::new(0).expect("gpu"), &dir, 64);
        let got = logits(&mut s, &prompt);
        let e = rel_err(&got, &want);
        let limit = if f32_model { 1e-3 } else { 1e-2 };
        failed |= !(e < limit);
        println!("{}", json!({"check": "parity", "fixture": dir.file_name().map(|n| n.to_string_lossy().into_owned()), "rel_err": e, "limit": limit, "ok": e < limit}));
        let on_gpu = greedy(s, &prompt);
        let on_cpu = greedy(load(CpuBackend::new(8).expect("cpu"), &dir, 64), &prompt);
        let gaps: Vec<f64> = r["top2_gap"].as_array().expect("gaps").iter().map(|v| v.as_f64().unwrap_or(0.0)).collect();
        let sure = gaps.iter().take_while(|g| **g > 0.05).count();
        let ok = on_gpu[..sure] == on_cpu[..sure];
        failed |= !ok;
        println!("{}", json!({"check": "greedy", "fixture": dir.file_name().map(|n| n.to_string_lossy().into_owned()), "compared_tokens": sure, "ok": ok}));
    }
    // (4) timings.
    let bandwidth = gpu.copy_bandwidth().unwrap_or(0.0);
    println!("{}", json!({"check": "bandwidth", "device_copy_bytes_per_s": bandwidth}));
    for model in &args[1..] {
        let mut runner = LocalRunner::new(load(CudaBackend::new(0).expect("gpu"), model, 32 * 160 / 16 + 64), 512).expect("runner");
        let vocab = ModelConfig::from_dir(model).expect("config").vocab_size as u64;
        let mut rng = Rng::new(1);
        let mut prompt = |len: usize| -> Vec<u32> { (0..len).map(|_| (rng.next_u64() % vocab) as u32).collect() };
        let long = prompt(512);
        runner.lockstep_batch(&[long.clone()], 0).expect("warm-up");
        let (prefill, _) = runner.lockstep_batch(&[long], 0).expect("prefill");
        let bytes = runner.stage.step_weight_bytes() as f64;
        let mut rows = Vec::new();
        for b in [1usize, 8, 32] {
            let prompts: Vec<Vec<u32>> = (0..b).map(|_| prompt(64)).collect();
            runner.lockstep_batch(&prompts, 4).expect("warm-up");
            let (_, decode) = runner.lockstep_batch(&prompts, 64).expect("decode");
            let steps_per_s = 64.0 / decode.as_secs_f64();
            let floor = if bandwidth > 0.0 { bandwidth / bytes } else { f64::NAN };
            rows.push(json!({"batch": b, "tokens_per_s": steps_per_s * b as f64, "ms_per_step": 1000.0 / steps_per_s,
                             "floor_steps_per_s": floor, "fraction_of_floor": steps_per_s / floor}));
        }
        println!("{}", json!({"check": "timing", "model": model.display().to_string(), "weight_bytes_per_step": bytes,
                              "prefill_512_tokens_per_s": 512.0 / prefill.as_secs_f64(), "decode": rows}));
    }
    let _ = std::fs::remove_dir_all(&scratch);
    if failed {
        eprintln!("gpu_check: some checks FAILED");
        std::process::exit(1);
    }
}
