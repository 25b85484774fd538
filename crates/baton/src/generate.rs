//! `baton generate`: one prompt through the engine, streamed to stdout, with its speed.

use std::io::Write;

use baton_engine::{Detokenizer, SamplingParams};
use serde_json::json;

use crate::load;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: load::ModelArgs,
    /// The prompt text.
    #[arg(long, default_value = "The quick brown fox")]
    prompt: String,
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// 0 means greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long)]
    seed: Option<u64>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// CPU threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Arithmetic of the CPU matrix products: `exact` (f32, the parity tests' contract) or
    /// `bf16` (bf16 activations and AVX512_BF16 dot products for bf16 weights; see README).
    #[arg(long, default_value = "exact")]
    compute: baton_engine::Compute,
    /// Where the engine runs.
    /// `cpu`, `cuda`, or a modeled GPU: `mock:h100`, `mock:a100`, `mock:l40s` (`mock:h100:192GiB`:
    /// that card with another memory size).
    #[arg(long, default_value = "cpu")]
    device: load::Device,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let threads = args.threads.unwrap_or_else(load::default_threads);
    let model = args.model.dir()?;
    let tok = load::tokenizer(&model)?;
    let prompt = tok.encode(&args.prompt)?;
    crate::with_backend!(args.device, threads, args.compute, |backend| generate_on(backend, &args, &model, &tok, &prompt))
}

fn generate_on<B: baton_engine::Backend>(backend: B, args: &Args, model: &std::path::Path, tok: &baton_engine::TextTokenizer, prompt: &[u32]) -> anyhow::Result<()> {
    let mut m = load::load(backend, model, prompt.len() + args.max_tokens, 512)?;

    let params = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        seed: args.seed,
        max_tokens: args.max_tokens,
        ignore_eos: args.ignore_eos,
        ..Default::default()
    };
    params.validate().map_err(|e| anyhow::anyhow!("--{}", e.replace('_', "-")))?;

    let mut detok = Detokenizer::default();
    let mut stdout = std::io::stdout().lock();
    let mut stream_err = None;
    let stream = !args.json;
    let generation = m.runner.generate(prompt, params, &tok.eos_token_ids, &mut |s| {
        if stream {
            match detok.push(tok, s.token) {
                Ok(piece) => {
                    let _ = stdout.write_all(piece.as_bytes());
                    let _ = stdout.flush();
                }
                Err(e) => stream_err = Some(e),
            }
        }
    })?;
    if let Some(e) = stream_err {
        return Err(e.into());
    }
    if args.json {
        let text = tok.decode(&generation.token_ids)?;
        let out = json!({
            "prompt_token_ids": generation.prompt_token_ids,
            "token_ids": generation.token_ids,
            "text": text,
            "finish_reason": generation.finish_reason.as_str(),
            "prefill_tokens_per_s": generation.prefill_tokens_per_s(),
            "decode_tokens_per_s": generation.decode_tokens_per_s(),
        });
        writeln!(stdout, "{out}")?;
    } else {
        let rest = detok.flush(tok)?;
        writeln!(stdout, "{rest}")?;
        eprintln!(
            "prompt {} tokens, generated {} ({}); prefill {:.1} tokens/s, decode {:.1} tokens/s",
            generation.prompt_token_ids.len(),
            generation.token_ids.len(),
            generation.finish_reason.as_str(),
            generation.prefill_tokens_per_s(),
            generation.decode_tokens_per_s()
        );
    }
    Ok(())
}
