//! `baton serve`: the OpenAI-compatible server on this node. With no arguments it serves the
//! cached demo model on 127.0.0.1:8080.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use baton_serve::{serve, ServeOptions};

use crate::load;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: load::ModelArgs,
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// The model name clients send (default: the directory's name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// CPU threads for the engine (default: all cores).
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
    /// KV cache size in MiB.
    #[arg(long, default_value_t = 1024)]
    kv_cache_mb: usize,
    /// Sequences in the running batch at most.
    #[arg(long, default_value_t = 64)]
    max_num_seqs: usize,
    /// Tokens per engine step at most (prefill chunks and decodes together).
    #[arg(long, default_value_t = 512)]
    max_batched_tokens: usize,
    /// Reuse the KV cache of prompt prefixes seen before (on by default; vLLM's flag).
    #[arg(long, overrides_with = "no_enable_prefix_caching")]
    enable_prefix_caching: bool,
    /// Compute every prompt from its first token.
    #[arg(long)]
    no_enable_prefix_caching: bool,
    /// Requests allowed to wait; beyond, new requests get 429.
    #[arg(long, default_value_t = 1024)]
    max_waiting: usize,
    /// Seconds a request may take before it ends with a timeout error (504).
    #[arg(long, default_value_t = 600)]
    request_timeout: u64,
    /// Context length (default: the model's).
    #[arg(long)]
    max_model_len: Option<usize>,
    /// UDP address of the native QUIC client API.
    #[arg(long, default_value = "127.0.0.1:8081")]
    quic_listen: String,
    /// Turn the QUIC client API off.
    #[arg(long)]
    no_quic: bool,
    /// Where to write the QUIC server certificate (DER) that `baton client --cert` trusts
    /// (default: a file in the temp directory, printed at start).
    #[arg(long)]
    quic_cert_out: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let listen: SocketAddr = args.listen.parse().with_context(|| format!("--listen: {:?} is not HOST:PORT", args.listen))?;
    let model_dir = args.model.dir()?;
    let model_name = args.served_model_name.clone().unwrap_or_else(|| {
        model_dir.file_name().map_or_else(|| "model".to_string(), |n| n.to_string_lossy().into_owned())
    });
    if args.max_num_seqs == 0 || args.max_batched_tokens == 0 {
        anyhow::bail!("--max-num-seqs and --max-batched-tokens must be positive");
    }
    let quic_listen = if args.no_quic {
        None
    } else {
        Some(args.quic_listen.parse::<SocketAddr>().with_context(|| format!("--quic-listen: {:?} is not HOST:PORT", args.quic_listen))?)
    };
    let device = load::shard_device(args.device, args.threads.unwrap_or_else(load::default_threads), args.compute)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("baton-io")
        .build()
        .context("starting the async runtime")?;
    let device = runtime.block_on(device.spawn(model_dir.clone())).context("starting the GPU shard")?;
    let kv_cache_bytes = load::kv_cache_bytes(args.device, &model_dir, args.kv_cache_mb, baton_serve::BLOCK_SIZE)?;
    let opts = ServeOptions {
        pipeline: None,
        quic_listen,
        quic_cert_out: args.quic_cert_out.clone(),
        quic_identity: None,
        http_layer: None,
        request_timeout: std::time::Duration::from_secs(args.request_timeout),
        on_bound: None,
        peers: None,
        more_metrics: None,
        model_dir,
        model_name,
        listen,
        device,
        keep_device: false,
        kv_cache_bytes,
        max_num_seqs: args.max_num_seqs,
        max_batched_tokens: args.max_batched_tokens,
        prefix_caching: !args.no_enable_prefix_caching,
        max_waiting: args.max_waiting,
        max_model_len: args.max_model_len,
    };
    runtime.block_on(async move {
        serve(opts, shutdown_signal()).await
    })?;
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            tokio::select! {
                _ = ctrl_c => {},
                _ = term.recv() => {},
            }
            return;
        }
    }
    let _ = ctrl_c.await;
}
