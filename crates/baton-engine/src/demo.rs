//! Seeded random-weight models written in exactly the Hugging Face layout, so tests, CI and the
//! default `serve` need no download: config.json, model.safetensors, tokenizer.json (a byte-level
//! BPE trained here on a small embedded text), tokenizer_config.json with a ChatML template, and
//! generation_config.json.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde_json::{json, Value};

use crate::error::{EngineError, Result};
use crate::rng::Rng;

/// The shapes `baton gen-model` knows.
#[derive(Debug, Clone, PartialEq)]
pub struct Preset {
    pub name: &'static str,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub tie_word_embeddings: bool,
    pub rope_theta: f32,
    pub max_position_embeddings: usize,
    /// Too large for random weights here: written config-only, for a mock device.
    pub config_only: bool,
}

/// Small and fast: for tests.
pub const TINY: Preset = Preset {
    name: "tiny",
    hidden_size: 64,
    num_layers: 4,
    num_heads: 4,
    num_kv_heads: 2,
    intermediate_size: 128,
    vocab_size: 512,
    tie_word_embeddings: false,
    rope_theta: 10_000.0,
    max_position_embeddings: 4096,
    config_only: false,
};

/// SmolLM2-135M's shape, in bf16: for benchmarks and the default demo.
pub const BENCH: Preset = Preset {
    name: "bench",
    hidden_size: 576,
    num_layers: 30,
    num_heads: 9,
    num_kv_heads: 3,
    intermediate_size: 1536,
    vocab_size: 49152,
    tie_word_embeddings: true,
    rope_theta: 100_000.0,
    max_position_embeddings: 8192,
    config_only: false,
};

/// Llama-3.2-1B's shape, in bf16: for GPU timings.
pub const LLAMA_1B: Preset = Preset {
    name: "llama-1b",
    hidden_size: 2048,
    num_layers: 16,
    num_heads: 32,
    num_kv_heads: 8,
    intermediate_size: 8192,
    vocab_size: 128256,
    tie_word_embeddings: true,
    rope_theta: 500_000.0,
    max_position_embeddings: 8192,
    config_only: false,
};

/// Meta's Llama-3-8B shape (config-only: for `--device mock:GPU`).
pub const LLAMA3_8B: Preset = Preset {
    name: "llama3-8b",
    hidden_size: 4096,
    num_layers: 32,
    num_heads: 32,
    num_kv_heads: 8,
    intermediate_size: 14336,
    vocab_size: 128256,
    tie_word_embeddings: false,
    rope_theta: 500_000.0,
    max_position_embeddings: 8192,
    config_only: true,
};

/// Meta's Llama-3-70B shape (config-only).
pub const LLAMA3_70B: Preset = Preset {
    name: "llama3-70b",
    hidden_size: 8192,
    num_layers: 80,
    num_heads: 64,
    num_kv_heads: 8,
    intermediate_size: 28672,
    vocab_size: 128256,
    tie_word_embeddings: false,
    rope_theta: 500_000.0,
    max_position_embeddings: 8192,
    config_only: true,
};

/// Meta's Llama-3.1-405B shape (config-only; its 128k context without the rope scaling).
pub const LLAMA3_405B: Preset = Preset {
    name: "llama3-405b",
    hidden_size: 16384,
    num_layers: 126,
    num_heads: 128,
    num_kv_heads: 8,
    intermediate_size: 53248,
    vocab_size: 128256,
    tie_word_embeddings: false,
    rope_theta: 500_000.0,
    max_position_embeddings: 131072,
    config_only: true,
};

pub const PRESETS: [&Preset; 6] = [&TINY, &BENCH, &LLAMA_1B, &LLAMA3_8B, &LLAMA3_70B, &LLAMA3_405B];

pub fn preset(name: &str) -> Option<&'static Preset> {
    PRESETS.iter().copied().find(|p| p.name == name)
}

const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
const CHAT_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Text the demo tokenizer's merges are learned from.
const CORPUS: &str = "Baton serves large language models across many machines. A model is split into \
pipeline stages, each a contiguous range of transformer layers, and every stage keeps the key and \
value cache of its own layers in fixed-size blocks. The scheduler admits new requests at every \
iteration, mixes chunked prefill with decoding under a token budget, and preempts when the cache \
is full. When machines join or leave, the placement of stages is rebalanced and requests in flight \
continue. The quick brown fox jumps over the lazy dog. Hello, world! How are you today? I am fine, \
thank you. One, two, three, four, five, six, seven, eight, nine, ten. The weather is nice and the \
sun is shining; people are walking in the park with their dogs and children are playing. \
Numbers like 2024, 42 and 3.14159 appear in text, as do words such as tokenizer, attention, \
inference, latency, throughput, memory, bandwidth, network and cluster.";

/// Writes a seeded random model of `preset` into `dir` (created if needed).
pub fn write_model(preset: &Preset, dir: &Path, seed: u64) -> Result<()> {
    write_config_only(preset, dir, seed)?;
    let p = preset;
    let head_dim = p.hidden_size / p.num_heads;
    let mut rng = Rng::new(seed);
    let (h, i, v) = (p.hidden_size, p.intermediate_size, p.vocab_size);
    let (qd, kvd) = (p.num_heads * head_dim, p.num_kv_heads * head_dim);
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, std: f32, rng: &mut Rng| {
        let n: usize = shape.iter().product();
        let mut bytes = Vec::with_capacity(n * 2);
        for _ in 0..n {
            let x = if std == 0.0 { 1.0 } else { rng.next_normal() * std };
            bytes.extend_from_slice(&half::bf16::from_f32(x).to_le_bytes());
        }
        tensors.push((name, shape, bytes));
    };
    let std = 0.02;
    add("model.embed_tokens.weight".into(), vec![v, h], std, &mut rng);
    for l in 0..p.num_layers {
        let pre = format!("model.layers.{l}");
        add(format!("{pre}.input_layernorm.weight"), vec![h], 0.0, &mut rng);
        add(format!("{pre}.self_attn.q_proj.weight"), vec![qd, h], std, &mut rng);
        add(format!("{pre}.self_attn.k_proj.weight"), vec![kvd, h], std, &mut rng);
        add(format!("{pre}.self_attn.v_proj.weight"), vec![kvd, h], std, &mut rng);
        add(format!("{pre}.self_attn.o_proj.weight"), vec![h, qd], std, &mut rng);
        add(format!("{pre}.post_attention_layernorm.weight"), vec![h], 0.0, &mut rng);
        add(format!("{pre}.mlp.gate_proj.weight"), vec![i, h], std, &mut rng);
        add(format!("{pre}.mlp.up_proj.weight"), vec![i, h], std, &mut rng);
        add(format!("{pre}.mlp.down_proj.weight"), vec![h, i], std, &mut rng);
    }
    add("model.norm.weight".into(), vec![h], 0.0, &mut rng);
    if !p.tie_word_embeddings {
        add("lm_head.weight".into(), vec![v, h], std, &mut rng);
    }
    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, shape.clone(), bytes)
                .map(|view| (name.clone(), view))
                .map_err(|e| EngineError::Safetensors {
                    path: dir.join("model.safetensors"),
                    message: e.to_string(),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let st_path = dir.join("model.safetensors");
    safetensors::serialize_to_file(views, Some(meta), &st_path).map_err(|e| EngineError::Safetensors {
        path: st_path.clone(),
        message: e.to_string(),
    })?;

    Ok(())
}

/// Writes `preset`'s config.json, tokenizer and generation config into `dir` (created if
/// needed), without weights: what a mock device runs (`baton gen-model --config-only`).
pub fn write_config_only(preset: &Preset, dir: &Path, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| EngineError::io(dir, e))?;
    let p = preset;
    let head_dim = p.hidden_size / p.num_heads;
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": p.hidden_size,
        "intermediate_size": p.intermediate_size,
        "num_hidden_layers": p.num_layers,
        "num_attention_heads": p.num_heads,
        "num_key_value_heads": p.num_kv_heads,
        "head_dim": head_dim,
        "vocab_size": p.vocab_size,
        "max_position_embeddings": p.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": p.rope_theta,
        "rope_scaling": null,
        "tie_word_embeddings": p.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": false,
        "mlp_bias": false,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
        "baton_preset": p.name,
        "baton_seed": seed,
    });
    write_json(&dir.join("config.json"), &config)?;

    write_json(&dir.join("tokenizer.json"), &tokenizer_json(p.vocab_size, seed))?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &json!({
            "bos_token": "<|endoftext|>",
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "unk_token": null,
            "add_bos_token": false,
            "model_max_length": p.max_position_embeddings,
            "tokenizer_class": "GPT2Tokenizer",
            "chat_template": CHAT_TEMPLATE,
        }),
    )?;
    write_json(
        &dir.join("generation_config.json"),
        &json!({"bos_token_id": 0, "eos_token_id": [0, 2]}),
    )?;
    Ok(())
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|source| EngineError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    std::fs::write(path, text).map_err(|e| EngineError::io(path, e))
}

/// GPT-2's reversible mapping of bytes to printable characters.
fn byte_chars() -> [char; 256] {
    let printable: Vec<u32> = ('!' as u32..='~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut chars = [' '; 256];
    let mut extra = 0;
    for b in 0..256u32 {
        let c = if printable.contains(&b) {
            b
        } else {
            extra += 1;
            255 + extra
        };
        chars[b as usize] = char::from_u32(c).unwrap_or('?');
    }
    chars
}

/// A byte-level BPE with `vocab_size` entries: special tokens, the 256 bytes, merges learned
/// from [`CORPUS`], then (if the vocabulary is larger than the corpus supports) extra tokens made
/// of two existing ones, so every id decodes to text.
fn tokenizer_json(vocab_size: usize, seed: u64) -> Value {
    let chars = byte_chars();
    let mut vocab: BTreeMap<String, usize> = BTreeMap::new();
    let mut by_id: Vec<String> = Vec::new();
    let push = |s: String, vocab: &mut BTreeMap<String, usize>, by_id: &mut Vec<String>| {
        if !vocab.contains_key(&s) && by_id.len() < vocab_size {
            vocab.insert(s.clone(), by_id.len());
            by_id.push(s);
        }
    };
    for s in SPECIAL_TOKENS {
        push(s.to_string(), &mut vocab, &mut by_id);
    }
    for c in chars {
        push(c.to_string(), &mut vocab, &mut by_id);
    }

    // Words as byte-level symbol sequences, a leading space attached (GPT-2 style).
    let mut words: BTreeMap<Vec<String>, usize> = BTreeMap::new();
    let flush = |w: &mut String, words: &mut BTreeMap<Vec<String>, usize>| {
        if !w.is_empty() {
            let syms = w.bytes().map(|b| chars[b as usize].to_string()).collect();
            *words.entry(syms).or_insert(0) += 1;
            w.clear();
        }
    };
    for (wi, word) in CORPUS.split(' ').enumerate() {
        let mut piece = if wi > 0 { " ".to_string() } else { String::new() };
        let mut last_alnum: Option<bool> = None;
        for ch in word.chars() {
            let alnum = ch.is_alphanumeric();
            if last_alnum.is_some_and(|l| l != alnum) {
                flush(&mut piece, &mut words);
            }
            piece.push(ch);
            last_alnum = Some(alnum);
        }
        flush(&mut piece, &mut words);
    }

    let mut merges: Vec<String> = Vec::new();
    let mut words: Vec<(Vec<String>, usize)> = words.into_iter().collect();
    while by_id.len() < vocab_size {
        let mut pairs: BTreeMap<(String, String), usize> = BTreeMap::new();
        for (syms, n) in &words {
            for w in syms.windows(2) {
                *pairs.entry((w[0].clone(), w[1].clone())).or_insert(0) += n;
            }
        }
        // Most frequent pair; ties go to the first in order, so training is deterministic.
        let Some(((a, b), count)) = pairs.into_iter().fold(None, |best: Option<((String, String), usize)>, (p, n)| match best {
            Some((_, bn)) if bn >= n => best,
            _ => Some((p, n)),
        }) else {
            break;
        };
        if count < 2 {
            break;
        }
        let merged = format!("{a}{b}");
        merges.push(format!("{a} {b}"));
        push(merged.clone(), &mut vocab, &mut by_id);
        for (syms, _) in &mut words {
            let mut out = Vec::with_capacity(syms.len());
            let mut i = 0;
            while i < syms.len() {
                if i + 1 < syms.len() && syms[i] == a && syms[i + 1] == b {
                    out.push(merged.clone());
                    i += 2;
                } else {
                    out.push(std::mem::take(&mut syms[i]));
                    i += 1;
                }
            }
            *syms = out;
        }
    }
    let mut rng = Rng::new(seed ^ 0x7015);
    let first_regular = SPECIAL_TOKENS.len();
    while by_id.len() < vocab_size {
        let pick = |rng: &mut Rng, n: usize| first_regular + (rng.next_u64() % (n - first_regular) as u64) as usize;
        let (x, y) = (pick(&mut rng, by_id.len()), pick(&mut rng, by_id.len()));
        let s = format!("{}{}", by_id[x], by_id[y]);
        if s.chars().count() <= 12 {
            push(s, &mut vocab, &mut by_id);
        }
    }

    let added: Vec<Value> = SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(id, content)| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        }
    })
}
