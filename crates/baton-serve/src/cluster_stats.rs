//! The cluster's latency and load from its pipeline heads' `/v1/stats`: each histogram merged
//! as HDR data (every head's serialized histogram decoded and added: a true merge, never an
//! average of percentiles), counters and queue gauges summed, KV usage averaged; per replica
//! (each head is one) and for the whole cluster. Pure: JSON in, JSON out.

use base64::Engine;
use hdrhistogram::serialization::{Deserializer, Serializer, V2DeflateSerializer};
use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};

/// Percentiles of the latency-by-percentile chart (HdrHistogram's "percentile distribution"),
/// out to p99.99.
const DISTRIBUTION: &[f64] = &[0.0, 0.1, 0.25, 0.5, 0.75, 0.8, 0.9, 0.95, 0.97, 0.99, 0.995, 0.999, 0.9995, 0.9999];

/// The JSON of one histogram as `/v1/stats` and `/v1/cluster/stats` give it: count, mean, max,
/// percentiles, the distribution's points (`[percentile, value]`), the unit scale and the
/// histogram itself (HdrHistogram V2 deflate, base64).
pub fn histogram_json(h: &Histogram<u64>, scale: f64) -> Value {
    let q = |p: f64| h.value_at_quantile(p) as f64 / scale;
    let mut bytes = Vec::new();
    let encoded = V2DeflateSerializer::new().serialize(h, &mut bytes).map(|_| base64::engine::general_purpose::STANDARD.encode(&bytes)).ok();
    let distribution: Vec<Value> = if h.is_empty() { Vec::new() } else { DISTRIBUTION.iter().map(|&p| json!([p * 100.0, q(p)])).collect() };
    json!({
        "count": h.len(),
        "mean": if h.is_empty() { 0.0 } else { h.mean() / scale },
        "max": h.max() as f64 / scale,
        "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p99_9": q(0.999), "p99_99": q(0.9999),
        "distribution": distribution,
        "unit_scale": scale,
        "hdr_v2_deflate_base64": encoded,
    })
}

/// Decodes a histogram as [`histogram_json`] wrote it.
pub fn decode_histogram(v: &Value) -> Result<Histogram<u64>, String> {
    let b64 = v["hdr_v2_deflate_base64"].as_str().ok_or("no hdr_v2_deflate_base64")?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64).map_err(|e| format!("base64: {e}"))?;
    Deserializer::new().deserialize(&mut bytes.as_slice()).map_err(|e| format!("HDR histogram: {e:?}"))
}

/// One head's `/v1/stats`, under its name.
pub struct HeadStats {
    pub head: String,
    pub stats: Value,
}

const SUMMED: &[&str] = &["running", "waiting", "preemptions", "prompt_tokens_total", "generation_tokens_total", "request_failures", "requests_migrated", "requests_recomputed"];

/// Several heads' stats as one: histograms merged, counters summed (by key for the keyed ones:
/// requests by finish reason, plan changes by reason), KV usage averaged over the heads.
/// Histograms a head did not send, or sent undecodable, are left out of the merge and named in
/// `errors`.
pub fn merge(heads: &[&HeadStats]) -> Value {
    let mut out = Map::new();
    let mut errors = Vec::new();
    for key in SUMMED {
        out.insert(key.to_string(), json!(heads.iter().map(|h| h.stats[*key].as_u64().unwrap_or(0)).sum::<u64>()));
    }
    let kv: Vec<f64> = heads.iter().filter_map(|h| h.stats["kv_cache_usage"].as_f64()).collect();
    out.insert("kv_cache_usage".into(), json!(if kv.is_empty() { 0.0 } else { kv.iter().sum::<f64>() / kv.len() as f64 }));
    for keyed in ["requests", "plan_changes"] {
        let mut sums = Map::new();
        for h in heads {
            for (k, v) in h.stats[keyed].as_object().into_iter().flatten() {
                let n = sums.get(k).and_then(Value::as_u64).unwrap_or(0) + v.as_u64().unwrap_or(0);
                sums.insert(k.clone(), json!(n));
            }
        }
        out.insert(keyed.into(), Value::Object(sums));
    }
    // Every histogram name any head sent, merged across the heads that sent it.
    let mut names: Vec<&String> = heads.iter().flat_map(|h| h.stats["histograms"].as_object().into_iter().flat_map(|m| m.keys())).collect();
    names.sort();
    names.dedup();
    let mut hists = Map::new();
    for name in names {
        let mut merged: Option<(Histogram<u64>, f64)> = None;
        for h in heads {
            let v = &h.stats["histograms"][name.as_str()];
            if v.is_null() {
                continue;
            }
            let scale = v["unit_scale"].as_f64().unwrap_or(1.0);
            let one = match decode_histogram(v) {
                Ok(one) => one,
                Err(e) => {
                    errors.push(json!(format!("{}: {name}: {e}", h.head)));
                    continue;
                }
            };
            match &mut merged {
                None => merged = Some((one, scale)),
                Some((m, s)) if *s == scale => {
                    if let Err(e) = m.add(&one) {
                        errors.push(json!(format!("{}: {name}: {e:?}", h.head)));
                    }
                }
                Some(_) => errors.push(json!(format!("{}: {name}: unit scale {scale} differs from the other heads'", h.head))),
            }
        }
        if let Some((m, scale)) = merged {
            hists.insert(name.clone(), histogram_json(&m, scale));
        }
    }
    out.insert("histograms".into(), Value::Object(hists));
    out.insert("errors".into(), Value::Array(errors));
    Value::Object(out)
}

/// `/v1/cluster/stats`: each replica's stats (its head's, re-summarized) and the cluster's.
pub fn cluster(heads: &[HeadStats]) -> Value {
    let replicas: Vec<Value> = heads
        .iter()
        .map(|h| {
            let mut one = merge(&[h]);
            one["head"] = json!(h.head);
            one
        })
        .collect();
    let all: Vec<&HeadStats> = heads.iter().collect();
    json!({"replicas": replicas, "cluster": merge(&all)})
}

/// Per-second rates of the cluster's counters over the last [`RateWindow::SPAN`]: from samples
/// of the merged totals taken as they come (a dashboard polling, a sampler).
#[derive(Debug, Default)]
pub struct RateWindow {
    samples: std::collections::VecDeque<(std::time::Instant, [f64; 4])>,
}

impl RateWindow {
    pub const SPAN: std::time::Duration = std::time::Duration::from_secs(10);
    /// Rates need samples at least this far apart.
    pub const MIN_SPAN: std::time::Duration = std::time::Duration::from_millis(500);

    /// Generated tokens, prompt tokens, finished requests and failed requests, from `merge`'s
    /// output.
    fn totals(c: &Value) -> [f64; 4] {
        let requests: u64 = c["requests"].as_object().into_iter().flatten().filter_map(|(_, v)| v.as_u64()).sum();
        [c["generation_tokens_total"].as_f64().unwrap_or(0.0), c["prompt_tokens_total"].as_f64().unwrap_or(0.0), requests as f64, c["request_failures"].as_f64().unwrap_or(0.0)]
    }

    /// Records the cluster's totals at `now` and returns the rates over the window
    /// (`output_tokens_per_s`, `prompt_tokens_per_s`, `requests_per_s`, `failures_per_s`), or
    /// nulls until two samples are [`RateWindow::MIN_SPAN`] apart. A total that went down (a
    /// head restarted, or left) starts the window again.
    pub fn observe(&mut self, now: std::time::Instant, cluster: &Value) -> Value {
        let totals = Self::totals(cluster);
        if self.samples.back().is_some_and(|(_, t)| t.iter().zip(&totals).any(|(a, b)| b < a)) {
            self.samples.clear();
        }
        self.samples.push_back((now, totals));
        while self.samples.len() > 2 && self.samples.get(1).is_some_and(|(t, _)| now.saturating_duration_since(*t) >= Self::SPAN) {
            self.samples.pop_front();
        }
        let (t0, first) = self.samples.front().copied().unwrap_or((now, totals));
        let dt = now.saturating_duration_since(t0);
        let rate = |i: usize| if dt >= Self::MIN_SPAN { json!((totals[i] - first[i]) / dt.as_secs_f64()) } else { Value::Null };
        json!({"output_tokens_per_s": rate(0), "prompt_tokens_per_s": rate(1), "requests_per_s": rate(2), "failures_per_s": rate(3), "over_s": dt.as_secs_f64()})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(name: &str, samples: &[u64], running: u64, kv: f64) -> HeadStats {
        let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).unwrap();
        for &s in samples {
            h.record(s).unwrap();
        }
        HeadStats {
            head: name.into(),
            stats: json!({
                "running": running, "waiting": 1, "kv_cache_usage": kv, "generation_tokens_total": 10,
                "requests": {"stop": 2, "length": 1}, "plan_changes": {"node_lost": 1},
                "histograms": {"time_to_first_token_seconds": histogram_json(&h, 1e6)},
            }),
        }
    }

    #[test]
    fn the_merge_is_the_histogram_of_all_samples() {
        // Head a: 1000 fast requests; head b: 10 slow ones. Averaging their p99s (1 ms and
        // 900 ms) would say 450 ms; the merged p99 is what all 1010 samples say.
        let fast: Vec<u64> = (0..1000).map(|i| 1_000 + i % 7).collect();
        let slow: Vec<u64> = (0..10).map(|i| 900_000 + i * 1_000).collect();
        let (a, b) = (head("a", &fast, 3, 0.2), head("b", &slow, 5, 0.6));
        let got = cluster(&[a, b]);
        let mut by_hand = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).unwrap();
        for &s in fast.iter().chain(&slow) {
            by_hand.record(s).unwrap();
        }
        let ttft = &got["cluster"]["histograms"]["time_to_first_token_seconds"];
        assert_eq!(ttft["count"], 1010);
        for (key, p) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99_9", 0.999)] {
            let want = by_hand.value_at_quantile(p) as f64 / 1e6;
            assert_eq!(ttft[key].as_f64(), Some(want), "{key}");
        }
        // p99 of 1010 samples: the 1000th, a fast one; p99.9: a slow one.
        assert!(ttft["p99"].as_f64().unwrap() < 0.002 && ttft["p99_9"].as_f64().unwrap() > 0.8, "{ttft}");
        // The merged histogram itself decodes to the same counts.
        let back = decode_histogram(ttft).unwrap();
        assert_eq!(back.len(), 1010);
        assert_eq!(back.value_at_quantile(0.999), by_hand.value_at_quantile(0.999));
        // The distribution runs to p99.99, values never decreasing.
        let points = ttft["distribution"].as_array().unwrap();
        assert_eq!(points.last().unwrap()[0].as_f64(), Some(99.99));
        assert!(points.windows(2).all(|w| w[0][1].as_f64() <= w[1][1].as_f64()), "{points:?}");
        // Counters summed, KV usage averaged, keyed counters summed by key.
        let c = &got["cluster"];
        assert_eq!((c["running"].as_u64(), c["waiting"].as_u64(), c["generation_tokens_total"].as_u64()), (Some(8), Some(2), Some(20)));
        assert!((c["kv_cache_usage"].as_f64().unwrap() - 0.4).abs() < 1e-12);
        assert_eq!(c["requests"], json!({"stop": 4, "length": 2}));
        assert_eq!(c["plan_changes"]["node_lost"], 2);
        // Each replica is its head's own.
        assert_eq!(got["replicas"][0]["head"], "a");
        assert_eq!(got["replicas"][1]["histograms"]["time_to_first_token_seconds"]["count"], 10);
        assert_eq!(c["errors"], json!([]));
    }

    #[test]
    fn a_garbled_histogram_is_left_out_and_named() {
        let a = head("a", &[1_000, 2_000], 1, 0.1);
        let mut b = head("b", &[5_000], 1, 0.1);
        b.stats["histograms"]["time_to_first_token_seconds"]["hdr_v2_deflate_base64"] = json!("bm90IGEgaGlzdG9ncmFt");
        let got = cluster(&[a, b]);
        assert_eq!(got["cluster"]["histograms"]["time_to_first_token_seconds"]["count"], 2);
        let errors = got["cluster"]["errors"].as_array().unwrap();
        assert!(errors.len() == 1 && errors[0].as_str().unwrap().starts_with("b: time_to_first_token_seconds"), "{errors:?}");
    }

    #[test]
    fn rates_come_from_samples_at_least_half_a_second_apart() {
        let t0 = std::time::Instant::now();
        let ms = std::time::Duration::from_millis;
        let at = |tokens: u64, requests: u64| json!({"generation_tokens_total": tokens, "prompt_tokens_total": 2 * tokens, "requests": {"stop": requests}, "request_failures": 0});
        let mut w = RateWindow::default();
        assert!(w.observe(t0, &at(100, 1))["output_tokens_per_s"].is_null());
        assert!(w.observe(t0 + ms(200), &at(120, 1))["output_tokens_per_s"].is_null(), "200 ms is too short a window");
        let r = w.observe(t0 + ms(2000), &at(300, 5));
        assert_eq!(r["output_tokens_per_s"].as_f64(), Some(100.0));
        assert_eq!(r["prompt_tokens_per_s"].as_f64(), Some(200.0));
        assert_eq!(r["requests_per_s"].as_f64(), Some(2.0));
        // Old samples leave the 10 s window.
        let r = w.observe(t0 + ms(20_000), &at(300, 5));
        assert_eq!(r["output_tokens_per_s"].as_f64(), Some(0.0), "{r}");
        // A head that restarted (totals down) starts again.
        assert!(w.observe(t0 + ms(21_000), &at(10, 0))["output_tokens_per_s"].is_null());
    }

    #[test]
    fn no_heads_is_an_empty_cluster() {
        let got = cluster(&[]);
        assert_eq!(got["replicas"], json!([]));
        assert_eq!(got["cluster"]["running"], 0);
        assert_eq!(got["cluster"]["histograms"], json!({}));
    }
}
