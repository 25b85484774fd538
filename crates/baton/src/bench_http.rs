//! `baton bench`: a load generator for any OpenAI-compatible endpoint (Baton's or another
//! server's). Fixed concurrency or a Poisson request rate, prompt and output length
//! distributions, shared prompt prefixes, warm-up, then throughput, TTFT / inter-token /
//! end-to-end percentiles from HDR histograms (written to a file in HdrHistogram's interval-log
//! format), and the prompt tokens the server's prefix cache supplied.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use baton_engine::rng::Rng;
use hdrhistogram::serialization::interval_log::{IntervalLogWriterBuilder, Tag};
use hdrhistogram::serialization::V2Serializer;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use tokio::sync::Mutex;

#[derive(clap::Args, Clone)]
pub struct HttpArgs {
    /// Base URL of the server.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Model name to send (default: the first one /v1/models lists).
    #[arg(long)]
    model: Option<String>,
    /// Requests to time (after the warm-up).
    #[arg(long, default_value_t = 64)]
    num_requests: usize,
    /// Requests sent first and not timed, at the same concurrency.
    #[arg(long, default_value_t = 4)]
    warmup: usize,
    /// Requests in flight at once (closed loop). Ignored when --request-rate is given.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Poisson arrivals at this many requests per second (open loop).
    #[arg(long)]
    request_rate: Option<f64>,
    /// Prompt tokens per request (mean).
    #[arg(long, default_value_t = 64)]
    input_len: usize,
    /// Output tokens per request (mean).
    #[arg(long, default_value_t = 64)]
    output_len: usize,
    /// Lengths are drawn uniformly from [len * (1 - r), len * (1 + r)].
    #[arg(long, default_value_t = 0.0)]
    range_ratio: f64,
    /// Tokens every prompt starts with, before its own `--input-len` (a shared system
    /// prompt: what prefix caching saves). 0: none.
    #[arg(long, default_value_t = 0)]
    shared_prefix_len: usize,
    /// Distinct shared prefixes, one drawn at random for each request.
    #[arg(long, default_value_t = 1)]
    num_prefixes: usize,
    /// Largest prompt token id used (prompts are random token ids below it).
    #[arg(long, default_value_t = 500)]
    max_token_id: u32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write the histograms here in HdrHistogram's interval-log format.
    #[arg(long)]
    hdr_log: Option<PathBuf>,
    /// Print one JSON object with the results.
    #[arg(long)]
    json: bool,
}

/// Latencies in µs.
struct Recorded {
    ttft: Histogram<u64>,
    itl: Histogram<u64>,
    e2e: Histogram<u64>,
    output_tokens: u64,
    prompt_tokens: u64,
    /// `usage.prompt_tokens_details.cached_tokens`, summed; `None` until a server reports it.
    cached_tokens: Option<u64>,
    ok: u64,
    failed: u64,
    first_error: Option<String>,
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).context("histogram")
}

struct Spec {
    prompt: Vec<u32>,
    max_tokens: usize,
}

fn draw_len(rng: &mut Rng, mean: usize, ratio: f64) -> usize {
    let lo = (mean as f64 * (1.0 - ratio)).max(1.0);
    let hi = (mean as f64 * (1.0 + ratio)).max(lo);
    (lo + rng.next_f64() * (hi - lo)).round().max(1.0) as usize
}

/// One streamed request; returns (ttft, inter-token gaps, e2e, output tokens).
/// `concurrency` tasks, each running `work` on the next index of `0..n` once its last one ends
/// (a closed loop).
async fn closed_loop<F, Fut>(concurrency: usize, n: usize, work: F) -> anyhow::Result<()>
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency.min(n) {
        let (next, work) = (next.clone(), work.clone());
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= n {
                    return anyhow::Ok(());
                }
                work(i).await?;
            }
        });
    }
    // The first error ends the loop (the other tasks are aborted with the set).
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

/// One request's measurements.
struct Measured {
    ttft: Duration,
    gaps: Vec<Duration>,
    e2e: Duration,
    output_tokens: u64,
    prompt_tokens: u64,
    cached_tokens: Option<u64>,
}

async fn one(client: &reqwest::Client, url: &str, model: &str, spec: &Spec) -> anyhow::Result<Measured> {
    let body = json!({
        "model": model, "prompt": spec.prompt, "max_tokens": spec.max_tokens, "min_tokens": spec.max_tokens,
        "ignore_eos": true, "temperature": 0, "stream": true, "stream_options": {"include_usage": true},
    });
    let start = Instant::now();
    let mut resp = client
        .post(format!("{url}/v1/completions"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await?;
    if !resp.status().is_success() {
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        bail!("HTTP {status}: {text}");
    }
    let mut buf = String::new();
    let mut first: Option<Instant> = None;
    let mut last = start;
    let mut gaps = Vec::new();
    let mut tokens = 0u64;
    let mut usage_tokens = None;
    let (mut prompt_tokens, mut cached_tokens) = (spec.prompt.len() as u64, None);
    while let Some(chunk) = resp.chunk().await? {
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            for line in event.lines() {
                let Some(data) = line.strip_prefix("data: ") else { continue };
                if data == "[DONE]" {
                    continue;
                }
                let v: Value = serde_json::from_str(data).with_context(|| format!("bad SSE data: {data}"))?;
                if let Some(err) = v.get("error") {
                    bail!("server error: {err}");
                }
                if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                    usage_tokens = Some(n);
                }
                if let Some(n) = v["usage"]["prompt_tokens"].as_u64() {
                    prompt_tokens = n;
                }
                if let Some(n) = v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64() {
                    cached_tokens = Some(n);
                }
                let has_text = v["choices"].as_array().is_some_and(|c| !c.is_empty());
                if has_text {
                    let now = Instant::now();
                    tokens += 1;
                    match first {
                        None => first = Some(now),
                        Some(_) => gaps.push(now - last),
                    }
                    last = now;
                }
            }
        }
    }
    let first = first.context("the stream carried no token")?;
    Ok(Measured { ttft: first - start, gaps, e2e: start.elapsed(), output_tokens: usage_tokens.unwrap_or(tokens), prompt_tokens, cached_tokens })
}

pub async fn run(args: HttpArgs) -> anyhow::Result<()> {
    let client = reqwest::Client::builder().pool_max_idle_per_host(1024).build()?;
    let url = args.url.trim_end_matches('/').to_string();
    let model = match &args.model {
        Some(m) => m.clone(),
        None => {
            let v: Value = serde_json::from_str(&client.get(format!("{url}/v1/models")).send().await.with_context(|| format!("cannot reach {url}"))?.text().await?)?;
            v["data"][0]["id"].as_str().context("/v1/models lists no model")?.to_string()
        }
    };
    if args.concurrency == 0 || args.max_token_id < 2 {
        bail!("--concurrency and --max-token-id must be positive");
    }
    if args.num_prefixes == 0 {
        bail!("--num-prefixes must be positive");
    }
    let mut rng = Rng::new(args.seed);
    let token = |rng: &mut Rng| 1 + (rng.next_u64() % (args.max_token_id as u64 - 1)) as u32;
    let prefixes: Vec<Vec<u32>> = (0..args.num_prefixes).map(|_| (0..args.shared_prefix_len).map(|_| token(&mut rng)).collect()).collect();
    let total = args.warmup + args.num_requests;
    let specs: Vec<Spec> = (0..total)
        .map(|_| {
            let len = draw_len(&mut rng, args.input_len, args.range_ratio);
            let mut prompt = prefixes[(rng.next_u64() % args.num_prefixes as u64) as usize].clone();
            prompt.extend((0..len).map(|_| token(&mut rng)));
            Spec { prompt, max_tokens: draw_len(&mut rng, args.output_len, args.range_ratio) }
        })
        .collect();
    let mut warm = specs;
    let timed = warm.split_off(args.warmup);
    // The warm-up runs at the measured concurrency (a large one would take hours one at a time).
    let warm = Arc::new(warm);
    {
        let (client, url, model, warm) = (client.clone(), url.clone(), model.clone(), warm.clone());
        closed_loop(args.concurrency, warm.len(), move |i| {
            let (client, url, model, warm) = (client.clone(), url.clone(), model.clone(), warm.clone());
            async move { one(&client, &url, &model, &warm[i]).await.map(drop) }
        })
        .await
        .context("warm-up request failed")?;
    }

    let rec = Arc::new(Mutex::new(Recorded {
        ttft: histogram()?,
        itl: histogram()?,
        e2e: histogram()?,
        output_tokens: 0,
        prompt_tokens: 0,
        cached_tokens: None,
        ok: 0,
        failed: 0,
        first_error: None,
    }));
    let bar = ProgressBar::new(timed.len() as u64).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} requests {elapsed}, ~{eta} left  {msg}").map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    let specs = Arc::new(timed);
    let start = Instant::now();
    let run_one = {
        let (client, url, model, rec, bar) = (client.clone(), url.clone(), model.clone(), rec.clone(), bar.clone());
        move |spec_index: usize, specs: Arc<Vec<Spec>>| {
            let (client, url, model, rec, bar) = (client.clone(), url.clone(), model.clone(), rec.clone(), bar.clone());
            async move {
                let r = one(&client, &url, &model, &specs[spec_index]).await;
                let mut g = rec.lock().await;
                match r {
                    Ok(m) => {
                        g.ok += 1;
                        g.output_tokens += m.output_tokens;
                        g.prompt_tokens += m.prompt_tokens;
                        if let Some(c) = m.cached_tokens {
                            *g.cached_tokens.get_or_insert(0) += c;
                        }
                        g.ttft.saturating_record(m.ttft.as_micros() as u64);
                        g.e2e.saturating_record(m.e2e.as_micros() as u64);
                        for gap in m.gaps {
                            g.itl.saturating_record(gap.as_micros().max(1) as u64);
                        }
                    }
                    Err(e) => {
                        g.failed += 1;
                        g.first_error.get_or_insert(e.to_string());
                    }
                }
                // What people wait on: the throughput so far and the current median TTFT.
                let tokens_per_s = g.output_tokens as f64 / start.elapsed().as_secs_f64().max(1e-3);
                let ttft = if g.ttft.is_empty() { "-".to_string() } else { format!("{:.1} ms", g.ttft.value_at_quantile(0.5) as f64 / 1e3) };
                bar.set_message(format!("{tokens_per_s:.0} output tok/s, TTFT p50 {ttft}, {} failed", g.failed));
                drop(g);
                bar.inc(1);
            }
        }
    };
    let mut tasks = Vec::new();
    match args.request_rate {
        Some(rate) if rate > 0.0 => {
            for i in 0..specs.len() {
                tasks.push(tokio::spawn(run_one(i, specs.clone())));
                // Exponential inter-arrival times: a Poisson process.
                let gap = -(1.0 - rng.next_f64()).ln() / rate;
                tokio::time::sleep(Duration::from_secs_f64(gap)).await;
            }
        }
        Some(_) => bail!("--request-rate must be positive"),
        None => {
            let specs = specs.clone();
            closed_loop(args.concurrency, specs.len(), move |i| {
                let run = run_one(i, specs.clone());
                async move {
                    run.await;
                    Ok(())
                }
            })
            .await?;
        }
    }
    for t in tasks {
        t.await?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let g = rec.lock().await;
    if let Some(path) = &args.hdr_log {
        let mut file = std::fs::File::create(path).with_context(|| format!("--hdr-log: cannot create {}", path.display()))?;
        let mut ser = V2Serializer::new();
        let mut w = IntervalLogWriterBuilder::new()
            .with_max_value_divisor(1e6)
            .add_comment("baton bench: latencies in microseconds (max values printed in seconds)")
            .begin_log_with(&mut file, &mut ser)
            .map_err(|e| anyhow::anyhow!("writing {}: {e:?}", path.display()))?;
        for (name, h) in [("ttft", &g.ttft), ("itl", &g.itl), ("e2e", &g.e2e)] {
            let tag = Tag::new(name).context("tag")?;
            w.write_histogram(h, Duration::ZERO, Duration::from_secs_f64(elapsed), Some(tag))
                .map_err(|e| anyhow::anyhow!("writing {}: {e:?}", path.display()))?;
        }
    }
    let pct = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let summary = json!({
        "model": model, "url": url, "requests": g.ok, "failed": g.failed,
        "concurrency": if args.request_rate.is_some() { Value::Null } else { json!(args.concurrency) },
        "request_rate": args.request_rate, "input_len": args.input_len, "output_len": args.output_len,
        "shared_prefix_len": args.shared_prefix_len, "num_prefixes": args.num_prefixes,
        "prompt_tokens": g.prompt_tokens,
        "cached_prompt_tokens": g.cached_tokens,
        "computed_prompt_tokens": g.prompt_tokens - g.cached_tokens.unwrap_or(0),
        "prefix_cache_hit_rate": g.cached_tokens.map(|c| c as f64 / g.prompt_tokens.max(1) as f64),
        "duration_s": elapsed,
        "requests_per_s": g.ok as f64 / elapsed,
        "output_tokens_per_s": g.output_tokens as f64 / elapsed,
        "ttft_ms": {"p50": pct(&g.ttft, 0.5), "p90": pct(&g.ttft, 0.9), "p99": pct(&g.ttft, 0.99), "mean": g.ttft.mean() / 1000.0},
        "itl_ms": {"p50": pct(&g.itl, 0.5), "p90": pct(&g.itl, 0.9), "p99": pct(&g.itl, 0.99), "mean": g.itl.mean() / 1000.0, "max": g.itl.max() as f64 / 1000.0},
        "e2e_ms": {"p50": pct(&g.e2e, 0.5), "p90": pct(&g.e2e, 0.9), "p99": pct(&g.e2e, 0.99), "mean": g.e2e.mean() / 1000.0},
        "first_error": g.first_error,
    });
    if args.json {
        println!("{summary}");
    } else {
        println!("requests: {} ok, {} failed in {elapsed:.2} s", g.ok, g.failed);
        println!("throughput: {:.2} requests/s, {:.1} output tokens/s", g.ok as f64 / elapsed, g.output_tokens as f64 / elapsed);
        for (name, h) in [("TTFT", &g.ttft), ("ITL", &g.itl), ("E2E", &g.e2e)] {
            println!("{name:>5} ms: p50 {:>9.2}  p90 {:>9.2}  p99 {:>9.2}  mean {:>9.2}", pct(h, 0.5), pct(h, 0.9), pct(h, 0.99), h.mean() / 1000.0);
        }
        match g.cached_tokens {
            Some(c) => println!("prompt tokens: {} sent, {c} from the server's prefix cache ({:.1}%), {} computed", g.prompt_tokens, 100.0 * c as f64 / g.prompt_tokens.max(1) as f64, g.prompt_tokens - c),
            None => println!("prompt tokens: {} sent (the server reports no cached tokens)", g.prompt_tokens),
        }
        if let Some(e) = &g.first_error {
            println!("first error: {e}");
        }
    }
    if g.ok == 0 {
        bail!("every request failed");
    }
    Ok(())
}
