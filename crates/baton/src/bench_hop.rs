//! `baton bench hop`: one activation hop between two endpoints of this process, over each
//! tensor-plane transport: QUIC with mutual TLS on loopback (the control plane's streams), and,
//! when UCX is built in, UCX active messages over shared memory and over TCP, and an RMA put
//! (+ flush) into a registered window over shared memory; beside a plain memcpy of the same bytes.
//! Message rows report one-way latency (half the echo round trip); the put row reports put plus
//! flush, i.e. until the peer is known to hold the data; the put8 row streams eight puts and one
//! flush and reports the time per put (bandwidth).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_mesh::control::ControlNode;
use baton_mesh::pki;
use baton_proto::{decode, encode, read_frame_limited, write_frame, MAX_TENSOR_FRAME};
use hdrhistogram::Histogram;
use serde_json::json;

#[derive(clap::Args)]
pub struct HopArgs {
    /// Hidden sizes, comma-separated.
    #[arg(long, default_value = "576,4096", value_delimiter = ',')]
    hidden: Vec<usize>,
    /// Tokens per hop, comma-separated.
    #[arg(long, default_value = "1,32", value_delimiter = ',')]
    tokens: Vec<usize>,
    /// Round trips per size and transport.
    #[arg(long, default_value_t = 2000)]
    iterations: usize,
    #[arg(long)]
    json: bool,
}

fn pct(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// Times `iterations` runs of `once` after `warmup` untimed ones; `once` returns the duration to
/// record (it times itself, so set-up outside the hop is not counted).
async fn measure(iterations: usize, warmup: usize, mut once: impl AsyncFnMut() -> anyhow::Result<Duration>) -> anyhow::Result<Histogram<u64>> {
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    for i in 0..iterations + warmup {
        let d = once().await?;
        if i >= warmup {
            h.saturating_record(d.as_nanos().max(1) as u64);
        }
    }
    Ok(h)
}

/// Two UCX workers under one UCX_TLS, B echoing every active message back to A.
#[cfg(feature = "ucx")]
struct UcxPair {
    tls: &'static str,
    a: baton_ucx::Worker,
    b: baton_ucx::Worker,
}

#[cfg(feature = "ucx")]
fn ucx_pairs() -> anyhow::Result<Vec<UcxPair>> {
    // UCX reads UCX_TLS when a worker starts: start both pairs before any other thread exists.
    let saved = std::env::var("UCX_TLS").ok();
    let mut pairs = Vec::new();
    for tls in ["shm", "tcp"] {
        std::env::set_var("UCX_TLS", tls);
        pairs.push(UcxPair { tls, a: baton_ucx::Worker::start("hop-a")?, b: baton_ucx::Worker::start("hop-b")? });
    }
    match saved {
        Some(v) => std::env::set_var("UCX_TLS", v),
        None => std::env::remove_var("UCX_TLS"),
    }
    Ok(pairs)
}

#[cfg(feature = "ucx")]
struct UcxLink {
    tls: &'static str,
    ep: baton_ucx::Endpoint,
    inbox: baton_ucx::AmReceiver,
    window: baton_ucx::RemoteRegion,
    _region: baton_ucx::Region,
}

#[cfg(feature = "ucx")]
async fn ucx_link(pair: &UcxPair, window_bytes: usize) -> anyhow::Result<UcxLink> {
    let mut requests = pair.b.listen(1, usize::MAX).await?;
    let inbox = pair.a.listen(2, usize::MAX).await?;
    let back = pair.b.connect(pair.a.address().to_vec(), "hop-a").await?;
    tokio::spawn(async move {
        while let Some(m) = requests.recv().await {
            if back.send(2, m.header, m.data).await.is_err() {
                return;
            }
        }
    });
    let ep = pair.a.connect(pair.b.address().to_vec(), "hop-b").await?;
    let region = pair.b.register(window_bytes).await?;
    let window = ep.window(&region.descriptor()).await?;
    Ok(UcxLink { tls: pair.tls, ep, inbox, window, _region: region })
}

pub fn run(args: HopArgs) -> anyhow::Result<()> {
    #[cfg(feature = "ucx")]
    let pairs = ucx_pairs()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let local: std::net::IpAddr = [127, 0, 0, 1].into();
        let ids = pki::generate("hop", &[("node-a".into(), local), ("node-b".into(), local)])?.nodes;
        let any: SocketAddr = "127.0.0.1:0".parse()?;
        let b = Arc::new(ControlNode::bind(any, ids[1].clone(), Arc::default())?);
        let b_addr = b.local_addr()?;
        // node-b echoes every frame back.
        let server = b.clone();
        tokio::spawn(async move {
            while let Some(Ok(link)) = server.accept().await {
                tokio::spawn(async move {
                    while let Ok((mut send, mut recv)) = link.connection.accept_bi().await {
                        if let Ok(Some(body)) = read_frame_limited(&mut recv, MAX_TENSOR_FRAME).await {
                            let mut framed = (body.len() as u32).to_le_bytes().to_vec();
                            framed.extend_from_slice(&body);
                            let _ = write_frame(&mut send, &framed).await;
                            let _ = send.finish();
                        }
                    }
                });
            }
        });
        let a = ControlNode::bind(any, ids[0].clone(), Arc::default())?;
        let link = a.connect(b_addr, "node-b").await?;
        #[cfg(feature = "ucx")]
        let mut ucx_links = Vec::new();
        #[cfg(feature = "ucx")]
        for pair in &pairs {
            let max_bytes = args.hidden.iter().max().unwrap_or(&0) * args.tokens.iter().max().unwrap_or(&0) * 4;
            ucx_links.push(ucx_link(pair, max_bytes.max(1)).await?);
        }
        let mut rows = Vec::new();
        for &hidden in &args.hidden {
            for &tokens in &args.tokens {
                let values: Vec<f32> = (0..hidden * tokens).map(|i| i as f32).collect();
                let bytes = values.len() * 4;
                let mut results: Vec<(String, Histogram<u64>)> = Vec::new();

                let frame = encode(&values)?;
                let quic = measure(args.iterations, 50, async || {
                    let t = Instant::now();
                    let (mut send, mut recv) = link.connection.open_bi().await?;
                    write_frame(&mut send, &frame).await?;
                    let _ = send.finish();
                    let body = read_frame_limited(&mut recv, MAX_TENSOR_FRAME).await?.ok_or_else(|| anyhow::anyhow!("echo closed"))?;
                    let back: Vec<f32> = decode(&body)?;
                    let one_way = t.elapsed() / 2;
                    anyhow::ensure!(back.len() == values.len(), "echo lost data");
                    Ok(one_way)
                })
                .await?;
                results.push(("quic".into(), quic));

                #[cfg(feature = "ucx")]
                for l in &mut ucx_links {
                    let raw: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
                    let am = measure(args.iterations, 50, async || {
                        let payload = raw.clone();
                        let t = Instant::now();
                        l.ep.send(1, Vec::new(), payload).await?;
                        let back = l.inbox.recv().await.ok_or_else(|| anyhow::anyhow!("UCX echo stopped"))?;
                        let one_way = t.elapsed() / 2;
                        anyhow::ensure!(back.data.len() == bytes, "UCX echo lost data");
                        Ok(one_way)
                    })
                    .await?;
                    results.push((format!("ucx-{}-am", l.tls), am));
                    if l.tls == "shm" {
                        let put = measure(args.iterations, 50, async || {
                            let t = Instant::now();
                            l.ep.put_slice(&raw, &l.window, 0).await?;
                            l.ep.flush().await?;
                            Ok(t.elapsed())
                        })
                        .await?;
                        results.push((format!("ucx-{}-put", l.tls), put));
                        // Streaming: 8 puts back to back, one flush; per put.
                        let stream = measure(args.iterations / 8, 10, async || {
                            let t = Instant::now();
                            for _ in 0..8 {
                                l.ep.put_slice(&raw, &l.window, 0).await?;
                            }
                            l.ep.flush().await?;
                            Ok(t.elapsed() / 8)
                        })
                        .await?;
                        results.push((format!("ucx-{}-put8", l.tls), stream));
                    }
                }

                let mut dst = vec![0f32; values.len()];
                let mem = measure(args.iterations, 50, async || {
                    let t = Instant::now();
                    dst.copy_from_slice(&values);
                    std::hint::black_box(&dst);
                    Ok(t.elapsed())
                })
                .await?;
                results.push(("memcpy".into(), mem));

                let gbps = |h: &Histogram<u64>| bytes as f64 / (h.value_at_quantile(0.5) as f64 / 1e9) / 1e9;
                let mut row = json!({"hidden": hidden, "tokens": tokens, "bytes": bytes});
                for (name, h) in &results {
                    row[name] = json!({"p50_us": pct(h, 0.5), "p99_us": pct(h, 0.99), "gb_per_s_p50": gbps(h)});
                    if !args.json {
                        println!(
                            "hidden {hidden:>5} x {tokens:>3} tokens ({bytes:>8} B) {name:<13} p50 {:>8.1} us  p99 {:>8.1} us  {:>7.2} GB/s",
                            pct(h, 0.5),
                            pct(h, 0.99),
                            gbps(h)
                        );
                    }
                }
                rows.push(row);
            }
        }
        if args.json {
            println!("{}", json!({"rows": rows}));
        }
        a.close();
        b.close();
        tokio::time::sleep(Duration::from_millis(10)).await;
        Ok(())
    })
}
