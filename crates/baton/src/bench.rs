//! `baton bench engine`: decode tokens/s at several batch sizes and prefill tokens/s on one
//! process, beside the memory-bandwidth floor measured on the same machine.


use baton_engine::rng::Rng;
use baton_engine::Backend;
use bandwidth::read_bandwidth;
use serde_json::json;

use crate::load;

/// `baton bench [OPTIONS]` load-tests an OpenAI-compatible server; `baton bench engine` measures
/// the engine alone.
#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Command {
    #[command(subcommand)]
    sub: Option<Sub>,
    #[command(flatten)]
    http: crate::bench_http::HttpArgs,
}

#[derive(clap::Subcommand)]
enum Sub {
    /// Engine speed on this machine: decode at several batch sizes, prefill, bandwidth floor.
    Engine(EngineArgs),
    /// One activation hop over QUIC and (when built in) UCX shared memory and TCP, beside memcpy.
    Hop(crate::bench_hop::HopArgs),
}

#[derive(clap::Args)]
pub struct EngineArgs {
    #[command(flatten)]
    model: load::ModelArgs,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Arithmetic of the CPU matrix products: `exact` (f32, the parity tests' contract) or
    /// `bf16` (bf16 activations and AVX512_BF16 dot products for bf16 weights; see README).
    #[arg(long, default_value = "exact")]
    compute: baton_engine::Compute,
    /// Where the engine runs.
    /// `cpu`, `cuda`, or a modeled GPU: `mock:h100`, `mock:a100`, `mock:l40s` (`mock:h100:192GiB`:
    /// that card with another memory size).
    #[arg(long, default_value = "cpu")]
    device: load::Device,
    /// Decode batch sizes, comma-separated.
    #[arg(long, default_value = "1,8,32", value_delimiter = ',')]
    batch: Vec<usize>,
    /// Prompt tokens per sequence before decoding.
    #[arg(long, default_value_t = 64)]
    prompt_len: usize,
    /// Decode steps timed per batch size.
    #[arg(long, default_value_t = 32)]
    steps: usize,
    /// Tokens in the prefill measurement.
    #[arg(long, default_value_t = 512)]
    prefill_len: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd.sub {
        Some(Sub::Engine(args)) => engine(args),
        Some(Sub::Hop(args)) => crate::bench_hop::run(args),
        None => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(crate::bench_http::run(cmd.http)),
    }
}

fn engine(args: EngineArgs) -> anyhow::Result<()> {
    let dir = args.model.dir()?;
    let max_batch = args.batch.iter().copied().max().unwrap_or(1);
    let kv_tokens = (max_batch * (args.prompt_len + args.steps + 8)).max(args.prefill_len + 16);
    crate::with_backend!(args.device, args.threads, args.compute, |backend| engine_on(backend, &args, &dir, kv_tokens))
}

fn engine_on<B: Backend>(backend: B, args: &EngineArgs, dir: &std::path::Path, kv_tokens: usize) -> anyhow::Result<()> {
    let mut m = load::load(backend, dir, kv_tokens, args.prefill_len.max(1))?;
    let vocab = m.config.vocab_size as u64;
    let mut rng = Rng::new(1);
    let mut prompt = |len: usize| -> Vec<u32> { (0..len).map(|_| (rng.next_u64() % vocab) as u32).collect() };

    // The floor is the device's: this machine's measured read bandwidth, or a modeled card's
    // data-sheet peak.
    let bandwidth = match args.device {
        load::Device::Mock(spec) => spec.memory_bandwidth,
        _ => read_bandwidth(args.threads),
    };
    let step_bytes = m.runner.stage.step_weight_bytes();
    let floor_steps_per_s = bandwidth / step_bytes as f64;
    eprintln!(
        "model {} ({}), {} threads; weights read per step {:.1} MB; read bandwidth {:.2} GB/s; floor {:.1} steps/s",
        dir.display(),
        m.runner.stage.backend().name(),
        args.threads,
        step_bytes as f64 / 1e6,
        bandwidth / 1e9,
        floor_steps_per_s
    );

    // Prefill: one long prompt in one forward call (after a warm-up).
    let long = prompt(args.prefill_len);
    m.runner.lockstep_batch(&[long.clone()], 0)?;
    let (prefill, _) = m.runner.lockstep_batch(&[long], 0)?;
    let prefill_tps = args.prefill_len as f64 / prefill.as_secs_f64();
    eprintln!("prefill {} tokens: {:.1} tokens/s", args.prefill_len, prefill_tps);

    let mut rows = Vec::new();
    for &b in &args.batch {
        let prompts: Vec<Vec<u32>> = (0..b).map(|_| prompt(args.prompt_len)).collect();
        m.runner.lockstep_batch(&prompts, 2)?;
        let (_, decode) = m.runner.lockstep_batch(&prompts, args.steps)?;
        let steps_per_s = args.steps as f64 / decode.as_secs_f64();
        let tps = steps_per_s * b as f64;
        let of_floor = steps_per_s / floor_steps_per_s;
        eprintln!(
            "decode batch {b:>3}: {tps:>8.1} tokens/s, {:>7.2} ms/step, {:>5.1}% of the bandwidth floor",
            1000.0 / steps_per_s,
            of_floor * 100.0
        );
        rows.push(json!({"batch": b, "tokens_per_s": tps, "ms_per_step": 1000.0 / steps_per_s, "fraction_of_floor": of_floor}));
    }
    if args.json {
        println!(
            "{}",
            json!({
                "model": dir.display().to_string(),
                "threads": args.threads,
                "backend": m.runner.stage.backend().name(),
                "compute": args.compute.name(),
                "read_bandwidth_bytes_per_s": bandwidth,
                "weight_bytes_per_step": step_bytes,
                "floor_steps_per_s": floor_steps_per_s,
                "prefill_tokens": args.prefill_len,
                "prefill_tokens_per_s": prefill_tps,
                "decode": rows,
            })
        );
    }
    Ok(())
}

mod bandwidth {
    //! Read bandwidth measured the way decode reads weights: every thread streams its share of a
    //! buffer larger than the caches.

    pub fn read_bandwidth(threads: usize) -> f64 {
        let len = 1usize << 27; // 128 Mi u64 = 1 GiB
        let buf: Vec<u64> = (0..len as u64).collect();
        let threads = threads.max(1);
        let mut best = 0.0f64;
        for _ in 0..3 {
            let start = std::time::Instant::now();
            let total: u64 = std::thread::scope(|s| {
                let handles: Vec<_> = buf
                    .chunks(len.div_ceil(threads))
                    .map(|chunk| {
                        s.spawn(move || {
                            let mut acc = [0u64; 8];
                            for c in chunk.chunks_exact(8) {
                                for i in 0..8 {
                                    acc[i] = acc[i].wrapping_add(c[i]);
                                }
                            }
                            acc.iter().fold(0u64, |a, b| a.wrapping_add(*b))
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap_or(0)).fold(0, u64::wrapping_add)
            });
            std::hint::black_box(total);
            best = best.max((len * 8) as f64 / start.elapsed().as_secs_f64());
        }
        best
    }
}
