//! Latency and load metrics from HDR histograms: Prometheus text for `/metrics` (vLLM's names
//! with a `baton:` prefix) and JSON percentiles plus the serialized histograms for `/v1/stats`.

use std::collections::BTreeMap;
use std::sync::Mutex;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// A histogram's name, help text, unit scale (values are recorded as integers: µs for times,
/// counts for sizes) and the bucket bounds Prometheus sees (in the exported unit).
struct Spec {
    name: &'static str,
    help: &'static str,
    /// Divide recorded values by this to get the exported unit (1e6: µs -> seconds).
    scale: f64,
    buckets: &'static [f64],
}

const TIME_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
const TOKEN_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0];

/// The histograms, by index.
pub const TTFT: usize = 0;
pub const ITL: usize = 1;
pub const E2E: usize = 2;
pub const QUEUE: usize = 3;
pub const PREFILL: usize = 4;
pub const DECODE: usize = 5;
pub const PROMPT_TOKENS: usize = 6;
pub const GENERATION_TOKENS: usize = 7;
pub const ITERATION: usize = 8;
pub const BATCH_SEQS: usize = 9;
pub const BATCH_TOKENS: usize = 10;
pub const SCHEDULE: usize = 11;
pub const FORWARD: usize = 12;
pub const TRANSFER: usize = 13;
pub const FAILURE_DETECTION: usize = 14;
pub const PLAN_CHANGE: usize = 15;

const SPECS: [Spec; 16] = [
    Spec { name: "time_to_first_token_seconds", help: "Time to first token", scale: 1e6, buckets: TIME_BUCKETS },
    Spec { name: "inter_token_latency_seconds", help: "Time between consecutive tokens of a request", scale: 1e6, buckets: TIME_BUCKETS },
    Spec { name: "e2e_request_latency_seconds", help: "End-to-end request latency", scale: 1e6, buckets: TIME_BUCKETS },
    Spec { name: "request_queue_time_seconds", help: "Time a request waited before its first step", scale: 1e6, buckets: TIME_BUCKETS },
    Spec { name: "request_prefill_time_seconds", help: "Time from the first step to the first token", scale: 1e6, buckets: TIME_BUCKETS },
    Spec { name: "request_decode_time_seconds", help: "Time from the first token to the last", scale: 1e6, buckets: TIME_BUCKETS },
    Spec { name: "request_prompt_tokens", help: "Prompt tokens per request", scale: 1.0, buckets: TOKEN_BUCKETS },
    Spec { name: "request_generation_tokens", help: "Generated tokens per request", scale: 1.0, buckets: TOKEN_BUCKETS },
    Spec { name: "iteration_time_seconds", help: "Time of one engine step (forward and sampling)", scale: 1e6, buckets: TIME_BUCKETS },
    Spec { name: "iteration_sequences", help: "Sequences per engine step", scale: 1.0, buckets: BATCH_BUCKETS },
    Spec { name: "iteration_tokens", help: "Tokens per engine step", scale: 1.0, buckets: BATCH_BUCKETS },
    Spec { name: "scheduler_time_seconds", help: "Time the scheduler itself spent choosing a step", scale: 1e6, buckets: TIME_BUCKETS },
    Spec { name: "forward_time_seconds", help: "Time of one step's forward pass and sampling on the shard (the whole pipeline for a head)", scale: 1e6, buckets: TIME_BUCKETS },
    Spec { name: "pipeline_transfer_time_seconds", help: "Per step on a pipeline head: remote stage calls beyond the stages' own compute (tensor-plane transfers and hand-offs)", scale: 1e6, buckets: TIME_BUCKETS },
    Spec { name: "failure_detection_seconds", help: "Pipeline head: time from a lost node's last answer to the decision that it is lost", scale: 1e6, buckets: TIME_BUCKETS },
    Spec { name: "plan_change_seconds", help: "Pipeline head: time from a plan change's decision to serving again under it (stages re-initialised)", scale: 1e6, buckets: TIME_BUCKETS },
];

/// The sum of a histogram's recorded values, in the exported unit.
fn recorded_sum(h: &Histogram<u64>, scale: f64) -> f64 {
    h.iter_recorded().map(|v| v.value_iterated_to() as f64 * v.count_at_value() as f64).sum::<f64>() / scale
}

#[derive(Default)]
struct Gauges {
    running: usize,
    waiting: usize,
    kv_usage: f64,
    preemptions: u64,
}

struct Inner {
    hists: Vec<Histogram<u64>>,
    prompt_tokens_total: u64,
    generation_tokens_total: u64,
    success: BTreeMap<&'static str, u64>,
    errors: u64,
    gauges: Gauges,
    plan_changes: BTreeMap<&'static str, u64>,
    migrated: u64,
    recomputed: u64,
    /// Prefix caching's prompt tokens looked up and supplied, and the blocks cached now;
    /// `None` while it is off.
    prefix: Option<PrefixCache>,
}

#[derive(Debug, Clone, Copy)]
struct PrefixCache {
    queries: u64,
    hits: u64,
    cached_blocks: usize,
    total_blocks: usize,
}

impl PrefixCache {
    fn hit_rate(&self) -> f64 {
        if self.queries == 0 {
            0.0
        } else {
            self.hits as f64 / self.queries as f64
        }
    }
}

/// Shared by the scheduler (writer) and the HTTP edge (reader).
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let hists = SPECS.iter().map(|_| new_histogram()).collect();
        Metrics {
            inner: Mutex::new(Inner {
                hists,
                prompt_tokens_total: 0,
                generation_tokens_total: 0,
                success: BTreeMap::new(),
                errors: 0,
                gauges: Gauges::default(),
                plan_changes: BTreeMap::new(),
                migrated: 0,
                recomputed: 0,
                prefix: None,
            }),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// Records `value` (µs for times, a count for sizes) into histogram `which`.
    pub fn record(&self, which: usize, value: u64) {
        self.with(|m| {
            if let Some(h) = m.hists.get_mut(which) {
                h.saturating_record(value.max(1));
            }
        });
    }

    pub fn finished(&self, reason: &'static str, prompt_tokens: usize, generation_tokens: usize) {
        self.with(|m| {
            *m.success.entry(reason).or_insert(0) += 1;
            m.prompt_tokens_total += prompt_tokens as u64;
            m.generation_tokens_total += generation_tokens as u64;
        });
        self.record(PROMPT_TOKENS, prompt_tokens as u64);
        self.record(GENERATION_TOKENS, generation_tokens as u64);
    }

    /// The mesh changed its plan (`reason`: node_lost, node_restarted, node_joined, ...).
    pub fn plan_changed(&self, reason: &'static str) {
        self.with(|m| *m.plan_changes.entry(reason).or_insert(0) += 1);
    }

    /// `n` running requests went on under a new plan; `recomputed`: their KV had to be
    /// recomputed (a stage was lost), else it moved with the layers (a planned change).
    pub fn migrated(&self, n: usize, recomputed: bool) {
        self.with(|m| {
            m.migrated += n as u64;
            if recomputed {
                m.recomputed += n as u64;
            }
        });
    }

    pub fn failed(&self) {
        self.with(|m| m.errors += 1);
    }

    pub fn set_load(&self, running: usize, waiting: usize, kv_usage: f64, preemptions: u64) {
        self.with(|m| m.gauges = Gauges { running, waiting, kv_usage, preemptions });
    }

    /// Prefix caching's counts: prompt tokens looked up, those the cache supplied, and the
    /// blocks it holds now, of all the KV blocks there are.
    pub fn set_prefix_cache(&self, queries: u64, hits: u64, cached_blocks: usize, total_blocks: usize) {
        self.with(|m| m.prefix = Some(PrefixCache { queries, hits, cached_blocks, total_blocks }));
    }

    /// Prometheus text exposition format.
    pub fn prometheus(&self) -> String {
        use std::fmt::Write;
        self.with(|m| {
            let mut out = String::new();
            let g = &m.gauges;
            for (name, help, kind, value) in [
                ("num_requests_running", "Requests in the running batch", "gauge", g.running as f64),
                ("num_requests_waiting", "Requests waiting to be scheduled", "gauge", g.waiting as f64),
                ("kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1)", "gauge", g.kv_usage),
                ("num_preemptions_total", "Sequences preempted for lack of KV blocks", "counter", g.preemptions as f64),
                ("prompt_tokens_total", "Prompt tokens processed", "counter", m.prompt_tokens_total as f64),
                ("generation_tokens_total", "Tokens generated", "counter", m.generation_tokens_total as f64),
                ("request_failure_total", "Requests that ended in an engine error", "counter", m.errors as f64),
            ] {
                let _ = writeln!(out, "# HELP baton:{name} {help}\n# TYPE baton:{name} {kind}\nbaton:{name} {value}");
            }
            let _ = writeln!(out, "# HELP baton:request_success_total Requests finished, by finish reason\n# TYPE baton:request_success_total counter");
            for reason in ["stop", "length", "abort"] {
                let n = m.success.get(reason).copied().unwrap_or(0);
                let _ = writeln!(out, "baton:request_success_total{{finished_reason=\"{reason}\"}} {n}");
            }
            if let Some(p) = m.prefix {
                let _ = writeln!(out, "# HELP baton:prefix_cache_queries_total Prompt tokens looked up in the prefix cache\n# TYPE baton:prefix_cache_queries_total counter\nbaton:prefix_cache_queries_total {}", p.queries);
                let _ = writeln!(out, "# HELP baton:prefix_cache_hits_total Prompt tokens the prefix cache supplied\n# TYPE baton:prefix_cache_hits_total counter\nbaton:prefix_cache_hits_total {}", p.hits);
            }
            let _ = writeln!(out, "# HELP baton:requests_migrated_total Running requests that went on under a new plan (a stage lost, joined or drained)\n# TYPE baton:requests_migrated_total counter\nbaton:requests_migrated_total {}", m.migrated);
            let _ = writeln!(out, "# HELP baton:requests_recomputed_total Of those, requests whose KV was recomputed (a stage lost) rather than moved\n# TYPE baton:requests_recomputed_total counter\nbaton:requests_recomputed_total {}", m.recomputed);
            let _ = writeln!(out, "# HELP baton:plan_changes_total Pipeline plan changes, by reason\n# TYPE baton:plan_changes_total counter");
            for reason in ["node_lost", "node_restarted", "node_joined", "capacity_returned"] {
                let n = m.plan_changes.get(reason).copied().unwrap_or(0);
                let _ = writeln!(out, "baton:plan_changes_total{{reason=\"{reason}\"}} {n}");
            }
            for (spec, h) in SPECS.iter().zip(&m.hists) {
                let name = spec.name;
                let _ = writeln!(out, "# HELP baton:{name} {}\n# TYPE baton:{name} histogram", spec.help);
                for &le in spec.buckets {
                    let bound = (le * spec.scale) as u64;
                    let count: u64 = h.iter_recorded().filter(|v| v.value_iterated_to() <= bound).map(|v| v.count_at_value()).sum();
                    let _ = writeln!(out, "baton:{name}_bucket{{le=\"{le}\"}} {count}");
                }
                let _ = writeln!(out, "baton:{name}_bucket{{le=\"+Inf\"}} {}", h.len());
                let sum = recorded_sum(h, spec.scale);
                let _ = writeln!(out, "baton:{name}_sum {sum}\nbaton:{name}_count {}", h.len());
            }
            out
        })
    }

    /// Percentiles of every histogram, and each histogram serialized (HdrHistogram V2 deflate,
    /// base64) for dashboards that merge them.
    /// Just the load gauges: what routers poll (cheap, unlike `stats`).
    pub fn load(&self) -> Value {
        self.with(|m| {
            // Queue times so far (count and sum): an autoscaler's window mean is two samples' difference.
            let q = &m.hists[QUEUE];
            let queued_s = recorded_sum(q, SPECS[QUEUE].scale);
            let mut v = json!({
                "running": m.gauges.running, "waiting": m.gauges.waiting, "kv_cache_usage": m.gauges.kv_usage,
                "queue_time_count": q.len(), "queue_time_sum_s": queued_s,
            });
            // What a cache-aware router sizes its guess of this head's prefix cache by.
            if let Some(p) = m.prefix {
                v["kv_blocks"] = json!(p.total_blocks);
            }
            v
        })
    }

    pub fn stats(&self) -> Value {
        self.with(|m| {
            let mut hists = serde_json::Map::new();
            for (spec, h) in SPECS.iter().zip(&m.hists) {
                hists.insert(spec.name.to_string(), crate::cluster_stats::histogram_json(h, spec.scale));
            }
            json!({
                "running": m.gauges.running,
                "waiting": m.gauges.waiting,
                "kv_cache_usage": m.gauges.kv_usage,
                "preemptions": m.gauges.preemptions,
                "prompt_tokens_total": m.prompt_tokens_total,
                "generation_tokens_total": m.generation_tokens_total,
                "requests": m.success,
                "request_failures": m.errors,
                "requests_migrated": m.migrated,
                "requests_recomputed": m.recomputed,
                "plan_changes": m.plan_changes,
                "prefix_cache": m.prefix.map(|p| json!({
                    "queried_tokens": p.queries,
                    "hit_tokens": p.hits,
                    "hit_rate": p.hit_rate(),
                    "cached_blocks": p.cached_blocks,
                })),
                "histograms": hists,
            })
        })
    }
}

/// 1 µs to 1 hour at 3 significant digits.
#[allow(clippy::expect_used)]
fn new_histogram() -> Histogram<u64> {
    // Constant bounds that satisfy the crate's rules (low >= 1, high >= 2 * low, sigfig <= 5).
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid constant histogram bounds")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_and_stats_report_what_was_recorded() {
        let m = Metrics::new();
        for v in [1_000u64, 2_000, 3_000, 100_000] {
            m.record(TTFT, v);
        }
        m.finished("stop", 10, 5);
        m.set_load(2, 3, 0.5, 1);
        let text = m.prometheus();
        assert!(text.contains("baton:time_to_first_token_seconds_bucket{le=\"0.0025\"} 2"), "{text}");
        assert!(text.contains("baton:time_to_first_token_seconds_count 4"));
        assert!(text.contains("baton:num_requests_waiting 3"));
        assert!(text.contains("baton:request_success_total{finished_reason=\"stop\"} 1"));
        assert!(text.contains("baton:generation_tokens_total 5"));
        assert!(!text.contains("prefix_cache"), "prefix caching is off: no counters");
        assert_eq!(m.load()["queue_time_count"], 0);
        m.record(QUEUE, 500_000);
        m.record(QUEUE, 1_500_000);
        assert_eq!(m.load()["queue_time_count"], 2);
        let queued = m.load()["queue_time_sum_s"].as_f64().unwrap();
        assert!((queued - 2.0).abs() < 0.01, "{queued}");
        m.set_prefix_cache(200, 150, 9, 100);
        assert_eq!(m.load()["kv_blocks"], 100);
        let text = m.prometheus();
        assert!(text.contains("baton:prefix_cache_queries_total 200\n") && text.contains("baton:prefix_cache_hits_total 150\n"), "{text}");
        assert_eq!(m.stats()["prefix_cache"]["hit_rate"].as_f64(), Some(0.75));
        let s = m.stats();
        let p50 = s["histograms"]["time_to_first_token_seconds"]["p50"].as_f64().unwrap();
        assert!((p50 - 0.002).abs() < 1e-4, "{p50}");
        assert!(s["histograms"]["time_to_first_token_seconds"]["hdr_v2_deflate_base64"].as_str().unwrap().len() > 10);
    }
}
