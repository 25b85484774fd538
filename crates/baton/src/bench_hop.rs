//! `baton bench hop`: one activation hop between two nodes' control planes (QUIC with mutual
//! TLS on loopback, the transport pipeline stages use while UCX is not built in), against a
//! plain memcpy of the same bytes. Reports one-way latency (half the echo round trip)
//! percentiles and bandwidth.

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
    /// Round trips per size.
    #[arg(long, default_value_t = 2000)]
    iterations: usize,
    #[arg(long)]
    json: bool,
}

fn pct(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

pub fn run(args: HopArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let local: std::net::IpAddr = [127, 0, 0, 1].into();
        let ids = pki::generate("hop", &[("node-a".into(), local), ("node-b".into(), local)])?.nodes;
        let roster = vec!["node-a".to_string(), "node-b".to_string()];
        let any: SocketAddr = "127.0.0.1:0".parse()?;
        let b = Arc::new(ControlNode::bind(any, ids[1].clone(), roster.clone())?);
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
        let a = ControlNode::bind(any, ids[0].clone(), roster)?;
        let link = a.connect(b_addr, "node-b").await?;
        let mut rows = Vec::new();
        for &hidden in &args.hidden {
            for &tokens in &args.tokens {
                let values: Vec<f32> = (0..hidden * tokens).map(|i| i as f32).collect();
                let bytes = values.len() * 4;
                let frame = encode(&values)?;
                let mut quic = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
                let mut mem = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
                let mut dst = vec![0f32; values.len()];
                for i in 0..args.iterations + 50 {
                    let t = Instant::now();
                    let (mut send, mut recv) = link.connection.open_bi().await?;
                    write_frame(&mut send, &frame).await?;
                    let _ = send.finish();
                    let body = read_frame_limited(&mut recv, MAX_TENSOR_FRAME).await?.ok_or_else(|| anyhow::anyhow!("echo closed"))?;
                    let back: Vec<f32> = decode(&body)?;
                    let one_way = t.elapsed() / 2;
                    anyhow::ensure!(back.len() == values.len(), "echo lost data");
                    let t = Instant::now();
                    dst.copy_from_slice(&values);
                    std::hint::black_box(&dst);
                    let copy = t.elapsed();
                    if i >= 50 {
                        quic.saturating_record(one_way.as_nanos().max(1) as u64);
                        mem.saturating_record(copy.as_nanos().max(1) as u64);
                    }
                }
                let gbps = |h: &Histogram<u64>| bytes as f64 / (h.value_at_quantile(0.5) as f64 / 1e9) / 1e9;
                rows.push(json!({
                    "hidden": hidden, "tokens": tokens, "bytes": bytes,
                    "quic_us": {"p50": pct(&quic, 0.5), "p99": pct(&quic, 0.99)}, "quic_gb_per_s_p50": gbps(&quic),
                    "memcpy_us": {"p50": pct(&mem, 0.5), "p99": pct(&mem, 0.99)}, "memcpy_gb_per_s_p50": gbps(&mem),
                }));
                if !args.json {
                    println!(
                        "hidden {hidden:>5} x {tokens:>3} tokens ({:>8} B): QUIC p50 {:>8.1} us p99 {:>8.1} us ({:>6.2} GB/s) | memcpy p50 {:>7.2} us ({:>6.1} GB/s)",
                        bytes, pct(&quic, 0.5), pct(&quic, 0.99), gbps(&quic), pct(&mem, 0.5), gbps(&mem)
                    );
                }
            }
        }
        if args.json {
            println!("{}", json!({"transport": "quic (mTLS, loopback)", "rows": rows}));
        }
        a.close();
        b.close();
        tokio::time::sleep(Duration::from_millis(10)).await;
        Ok(())
    })
}
