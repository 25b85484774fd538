//! `baton gen-model`: writes a demo model in the Hugging Face layout.

use std::path::PathBuf;

use anyhow::{anyhow, Context};
use baton_engine::demo;

#[derive(clap::Args)]
pub struct Args {
    /// Which shape: `tiny` (fast tests), `bench` (SmolLM2-135M's shape, bf16), `llama-1b`
    /// (Llama-3.2-1B's shape, bf16, for GPU timings), or, config-only, `llama3-8b`,
    /// `llama3-70b`, `llama3-405b` (for `--device mock:GPU`).
    #[arg(long)]
    preset: String,
    /// Write config.json and the tokenizer only, no weights: what `--device mock:GPU` runs.
    #[arg(long)]
    config_only: bool,
    /// Directory to write (created if needed).
    #[arg(long)]
    out: PathBuf,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Override the preset's number of transformer layers (e.g. a deeper tiny model to split
    /// over many pipeline stages in tests).
    #[arg(long)]
    layers: Option<usize>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let preset = demo::preset(&args.preset).ok_or_else(|| {
        let names: Vec<&str> = demo::PRESETS.iter().map(|p| p.name).collect();
        anyhow!("--preset: unknown preset {:?} (known: {})", args.preset, names.join(", "))
    })?;
    let mut preset = preset.clone();
    if let Some(n) = args.layers {
        if n == 0 {
            anyhow::bail!("--layers: a model needs at least one layer");
        }
        preset.num_layers = n;
    }
    let preset = &preset;
    if args.config_only {
        demo::write_config_only(preset, &args.out, args.seed).with_context(|| format!("writing {}", args.out.display()))?;
        eprintln!("wrote the `{}` model's config and tokenizer (no weights: for --device mock:GPU) to {}", preset.name, args.out.display());
        return Ok(());
    }
    if preset.config_only {
        anyhow::bail!("--preset {}: its weights would not fit here; add --config-only (no weights) and run it with --device mock:h100", preset.name);
    }
    demo::write_model(preset, &args.out, args.seed).with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("wrote the `{}` demo model to {}", preset.name, args.out.display());
    Ok(())
}
