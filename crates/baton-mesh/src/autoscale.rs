//! The autoscaling signal: how many replicas (pipelines) the load asks for, from what each
//! replica's head reports (`/v1/load`). Pure: samples and `now` in, a decision out; the entry
//! fronts feed it and export `baton:desired_replicas`, which an autoscaler (a Kubernetes HPA
//! through prometheus-adapter, KEDA) turns into pods.
//!
//! The policy asks for one replica more when the replicas, on average, have requests waiting
//! ([`Thresholds::waiting_per_replica`]), when requests that started in the last
//! [`Thresholds::window`] waited too long ([`Thresholds::queue_time_up`]) or when the KV caches
//! are nearly full ([`Thresholds::kv_usage_up`]); and one fewer when nothing waits, requests
//! start at once, and the KV in use would fit in one replica fewer at no more than
//! [`Thresholds::kv_usage_down`] each. One step at a time: a new replica takes its model load
//! to arrive, and the autoscaler's own stabilization window keeps it from flapping.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// What one replica's head said about its load (its `/v1/load`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ReplicaSample {
    pub waiting: u64,
    pub running: u64,
    /// Fraction of its KV cache blocks in use, 0 to 1.
    pub kv_usage: f64,
    /// Requests that have started (left the queue) since the head started, and their queue
    /// times' sum in seconds: cumulative, so a window's mean is the difference of two samples.
    pub queue_time_count: u64,
    pub queue_time_sum_s: f64,
}

/// The policy's thresholds (cluster.toml `[autoscale]` overrides them).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// Scale up when the mean number of waiting requests per replica reaches this.
    pub waiting_per_replica: f64,
    /// Scale up when the mean queue time of the requests started within the window reaches this.
    pub queue_time_up: Duration,
    /// Scale down only when that mean queue time is at most this (or nothing started).
    pub queue_time_down: Duration,
    /// Scale up when the mean KV usage over the replicas reaches this.
    pub kv_usage_up: f64,
    /// Scale down only when the KV in use would fill one replica fewer to at most this each.
    pub kv_usage_down: f64,
    /// How far back queue times count.
    pub window: Duration,
    /// A replica whose head has not answered for this long is not counted.
    pub stale_after: Duration,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            waiting_per_replica: 2.0,
            queue_time_up: Duration::from_secs(1),
            queue_time_down: Duration::from_millis(100),
            kv_usage_up: 0.9,
            kv_usage_down: 0.5,
            window: Duration::from_secs(30),
            stale_after: Duration::from_secs(5),
        }
    }
}

/// Why the desired count is what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No replica's head answers: the minimum.
    NoReplica,
    Waiting,
    QueueTime,
    KvUsage,
    /// Idle enough to give one replica back.
    Idle,
    /// Neither up nor down.
    Steady,
    /// The count is outside `[min, max]`: the nearest bound.
    Bounds,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NoReplica => "no_replica",
            Reason::Waiting => "waiting",
            Reason::QueueTime => "queue_time",
            Reason::KvUsage => "kv_usage",
            Reason::Idle => "idle",
            Reason::Steady => "steady",
            Reason::Bounds => "bounds",
        }
    }
}

/// One replica as the policy saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaView {
    pub head: String,
    pub waiting: u64,
    pub running: u64,
    pub kv_usage: f64,
    /// Mean queue time of the requests started within the window (None: none started).
    pub queue_time: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Replicas counted (heads that answered lately).
    pub replicas: usize,
    pub desired: usize,
    pub reason: Reason,
    pub per_replica: Vec<ReplicaView>,
}

/// The autoscaling core: samples per head, a decision on demand.
#[derive(Debug, Clone)]
pub struct Autoscaler {
    thresholds: Thresholds,
    min: usize,
    max: usize,
    heads: BTreeMap<String, VecDeque<(Instant, ReplicaSample)>>,
}

impl Autoscaler {
    /// `min` and `max` bound the desired count (`min` at least 1, `max` at least `min`).
    pub fn new(thresholds: Thresholds, min: usize, max: usize) -> Self {
        let min = min.max(1);
        Autoscaler { thresholds, min, max: max.max(min), heads: BTreeMap::new() }
    }

    pub fn thresholds(&self) -> &Thresholds {
        &self.thresholds
    }

    /// A head's sample at `now`.
    pub fn observe(&mut self, head: &str, now: Instant, sample: ReplicaSample) {
        let window = self.thresholds.window;
        let history = self.heads.entry(head.to_string()).or_default();
        // A head that started again counts from zero: its older samples say nothing of it now.
        if history.back().is_some_and(|(_, s)| s.queue_time_count > sample.queue_time_count) {
            history.clear();
        }
        history.push_back((now, sample));
        // Keep one sample at or before the window's start, to measure from.
        while history.len() > 2 && history.get(1).is_some_and(|(t, _)| now.saturating_duration_since(*t) >= window) {
            history.pop_front();
        }
    }

    /// A head that left (drained, gone from the gossip).
    pub fn remove(&mut self, head: &str) {
        self.heads.remove(head);
    }

    /// The desired replica count at `now`.
    pub fn decide(&self, now: Instant) -> Decision {
        let th = &self.thresholds;
        let mut per_replica = Vec::new();
        let (mut started, mut queued_s) = (0u64, 0f64);
        for (head, history) in &self.heads {
            let Some(&(at, last)) = history.back() else { continue };
            if now.saturating_duration_since(at) > th.stale_after {
                continue;
            }
            let &(_, first) = history.front().unwrap_or(&(at, last));
            let n = last.queue_time_count.saturating_sub(first.queue_time_count);
            let s = (last.queue_time_sum_s - first.queue_time_sum_s).max(0.0);
            started += n;
            queued_s += s;
            per_replica.push(ReplicaView {
                head: head.clone(),
                waiting: last.waiting,
                running: last.running,
                kv_usage: last.kv_usage.clamp(0.0, 1.0),
                queue_time: (n > 0).then(|| Duration::from_secs_f64(s / n as f64)),
            });
        }
        let replicas = per_replica.len();
        let bounded = |want: usize, reason: Reason| {
            let desired = want.clamp(self.min, self.max);
            let reason = if desired != want { Reason::Bounds } else { reason };
            Decision { replicas, desired, reason, per_replica: per_replica.clone() }
        };
        if replicas == 0 {
            return Decision { replicas, desired: self.min, reason: Reason::NoReplica, per_replica };
        }
        let n = replicas as f64;
        let waiting: u64 = per_replica.iter().map(|r| r.waiting).sum();
        let kv: f64 = per_replica.iter().map(|r| r.kv_usage).sum();
        let queue = (started > 0).then(|| Duration::from_secs_f64(queued_s / started as f64));
        let up = if waiting as f64 / n >= th.waiting_per_replica {
            Some(Reason::Waiting)
        } else if queue.is_some_and(|q| q >= th.queue_time_up) {
            Some(Reason::QueueTime)
        } else if kv / n >= th.kv_usage_up {
            Some(Reason::KvUsage)
        } else {
            None
        };
        if let Some(reason) = up {
            return bounded(replicas + 1, reason);
        }
        let idle = waiting == 0 && queue.is_none_or(|q| q <= th.queue_time_down) && replicas > 1 && kv <= th.kv_usage_down * (n - 1.0);
        if idle {
            return bounded(replicas - 1, Reason::Idle);
        }
        bounded(replicas, Reason::Steady)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(waiting: u64, running: u64, kv_usage: f64) -> ReplicaSample {
        ReplicaSample { waiting, running, kv_usage, ..ReplicaSample::default() }
    }

    #[test]
    fn waiting_requests_ask_for_one_more_replica() {
        let t0 = Instant::now();
        let mut a = Autoscaler::new(Thresholds::default(), 1, 8);
        a.observe("a", t0, sample(3, 8, 0.5));
        a.observe("b", t0, sample(0, 8, 0.5));
        // 1.5 waiting per replica: below 2.
        assert_eq!(a.decide(t0).desired, 2);
        a.observe("b", t0, sample(1, 8, 0.5));
        let d = a.decide(t0);
        assert_eq!((d.replicas, d.desired, d.reason), (2, 3, Reason::Waiting));
    }

    #[test]
    fn one_full_kv_cache_is_not_yet_a_full_mesh() {
        let t0 = Instant::now();
        let mut a = Autoscaler::new(Thresholds::default(), 1, 8);
        a.observe("a", t0, sample(0, 30, 0.95));
        a.observe("b", t0, sample(0, 30, 0.8));
        let d = a.decide(t0);
        assert_eq!((d.desired, d.reason), (2, Reason::Steady), "{d:?}");
    }

    #[test]
    fn kv_usage_threshold_is_the_mean() {
        let t0 = Instant::now();
        let mut a = Autoscaler::new(Thresholds::default(), 1, 8);
        a.observe("a", t0, sample(0, 30, 0.95));
        a.observe("b", t0, sample(0, 30, 0.9));
        let d = a.decide(t0);
        assert_eq!((d.desired, d.reason), (3, Reason::KvUsage));
    }

    #[test]
    fn queue_time_counts_only_the_window() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut a = Autoscaler::new(Thresholds::default(), 1, 8);
        let q = |count, sum| ReplicaSample { running: 4, kv_usage: 0.3, queue_time_count: count, queue_time_sum_s: sum, ..ReplicaSample::default() };
        // Ten requests that waited 3 s each, long ago ...
        a.observe("a", t0, q(0, 0.0));
        a.observe("a", t0 + s(1), q(10, 30.0));
        let d = a.decide(t0 + s(1));
        assert_eq!((d.desired, d.reason), (2, Reason::QueueTime));
        assert_eq!(d.per_replica[0].queue_time, Some(s(3)));
        // ... then forty that started at once: the window (30 s) no longer holds the slow ones.
        for i in 2..=40 {
            a.observe("a", t0 + s(i), q(10 + i, 30.0));
        }
        let d = a.decide(t0 + s(40));
        assert_eq!(d.per_replica[0].queue_time, Some(Duration::ZERO), "{d:?}");
        assert_eq!((d.desired, d.reason), (1, Reason::Steady));
    }

    #[test]
    fn a_head_that_restarted_counts_from_zero() {
        let t0 = Instant::now();
        let mut a = Autoscaler::new(Thresholds::default(), 1, 8);
        let q = |count, sum| ReplicaSample { queue_time_count: count, queue_time_sum_s: sum, ..ReplicaSample::default() };
        a.observe("a", t0, q(100, 500.0));
        a.observe("a", t0 + Duration::from_secs(1), q(2, 0.2));
        let d = a.decide(t0 + Duration::from_secs(1));
        // Nothing to measure from yet (one sample since the restart), not a negative count.
        assert_eq!(d.per_replica[0].queue_time, None);
        assert_eq!(d.desired, 1);
    }

    #[test]
    fn an_idle_mesh_gives_back_one_replica_at_a_time_down_to_the_minimum() {
        let t0 = Instant::now();
        let mut a = Autoscaler::new(Thresholds::default(), 2, 8);
        for h in ["a", "b", "c", "d"] {
            a.observe(h, t0, sample(0, 2, 0.2));
        }
        // 0.8 of KV in use would fill three replicas to 0.27 each: one fewer.
        let d = a.decide(t0);
        assert_eq!((d.replicas, d.desired, d.reason), (4, 3, Reason::Idle));
        // A waiting request holds the count.
        a.observe("a", t0, sample(1, 2, 0.2));
        assert_eq!(a.decide(t0).desired, 4);
        // Two replicas at the minimum stay two however idle.
        let mut a = Autoscaler::new(Thresholds::default(), 2, 8);
        a.observe("a", t0, sample(0, 0, 0.0));
        a.observe("b", t0, sample(0, 0, 0.0));
        let d = a.decide(t0);
        assert_eq!((d.desired, d.reason), (2, Reason::Bounds));
    }

    #[test]
    fn kv_that_would_not_fit_in_one_fewer_holds_the_count() {
        let t0 = Instant::now();
        let mut a = Autoscaler::new(Thresholds::default(), 1, 8);
        a.observe("a", t0, sample(0, 10, 0.3));
        a.observe("b", t0, sample(0, 10, 0.3));
        // 0.6 in one replica is over 0.5.
        assert_eq!(a.decide(t0).reason, Reason::Steady);
        a.observe("b", t0, sample(0, 10, 0.2));
        assert_eq!(a.decide(t0).desired, 1);
    }

    #[test]
    fn stale_heads_do_not_count_and_no_head_means_the_minimum() {
        let t0 = Instant::now();
        let mut a = Autoscaler::new(Thresholds::default(), 1, 8);
        a.observe("a", t0, sample(5, 8, 0.5));
        a.observe("b", t0 + Duration::from_secs(10), sample(0, 8, 0.5));
        let d = a.decide(t0 + Duration::from_secs(10));
        assert_eq!(d.replicas, 1, "{d:?}");
        assert_eq!(d.desired, 1);
        let d = a.decide(t0 + Duration::from_secs(60));
        assert_eq!((d.replicas, d.desired, d.reason), (0, 1, Reason::NoReplica));
        a.remove("b");
        assert!(a.decide(t0 + Duration::from_secs(10)).per_replica.is_empty());
    }

    #[test]
    fn the_maximum_caps_scaling_up() {
        let t0 = Instant::now();
        let mut a = Autoscaler::new(Thresholds::default(), 1, 2);
        a.observe("a", t0, sample(9, 8, 0.5));
        a.observe("b", t0, sample(9, 8, 0.5));
        let d = a.decide(t0);
        assert_eq!((d.desired, d.reason), (2, Reason::Bounds));
    }

    /// A seeded simulation in virtual time: replicas of fixed capacity under a load that rises
    /// and falls; the replica count follows the desired count after a model-load delay, as an
    /// autoscaler would. The count must rise until the waiting per replica is under the threshold
    /// at the peak, come back down to
    /// the minimum once the load is gone, and never leave `[min, max]`.
    #[test]
    fn a_simulated_load_wave_scales_up_and_back_down() {
        let (min, max, capacity) = (1usize, 6usize, 8u64);
        let mut state = 7u64;
        let mut rng = move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            state >> 33
        };
        let mut a = Autoscaler::new(Thresholds::default(), min, max);
        let t0 = Instant::now();
        let mut replicas = 1usize;
        let mut pending_change: Option<(Duration, usize)> = None;
        let (mut peak_replicas, mut waiting_at_peak_end) = (0, f64::MAX);
        let mut counts = vec![0u64; max + 1];
        let mut sums = vec![0f64; max + 1];
        for second in 0..900u64 {
            let now = t0 + Duration::from_secs(second);
            // Load: 4 requests in flight, rising to 40 between 100 s and 400 s, then 2.
            let base = if (100..400).contains(&second) { 40 } else if second < 100 { 4 } else { 2 };
            let load = base + rng() % 3;
            let per = load / replicas as u64;
            let extra = load % replicas as u64;
            for r in 0..replicas {
                let mine = per + u64::from((r as u64) < extra);
                let running = mine.min(capacity);
                let waiting = mine - running;
                counts[r] += running / 2;
                sums[r] += (running / 2) as f64 * if waiting > 0 { 2.0 } else { 0.01 };
                a.observe(&format!("r{r}"), now, ReplicaSample { waiting, running, kv_usage: running as f64 / capacity as f64 * 0.8, queue_time_count: counts[r], queue_time_sum_s: sums[r] });
            }
            for r in replicas..=max {
                a.remove(&format!("r{r}"));
            }
            // The autoscaler acts every 15 s; a new replica serves 60 s later (model load).
            if second % 15 == 0 && pending_change.is_none() {
                let d = a.decide(now);
                assert!((min..=max).contains(&d.desired), "{d:?}");
                if d.desired != replicas {
                    let delay = if d.desired > replicas { Duration::from_secs(60) } else { Duration::ZERO };
                    pending_change = Some((Duration::from_secs(second) + delay, d.desired));
                }
            }
            if let Some((at, to)) = pending_change {
                if Duration::from_secs(second) >= at {
                    replicas = to;
                    pending_change = None;
                }
            }
            if second == 399 {
                peak_replicas = replicas;
                waiting_at_peak_end = a.decide(now).per_replica.iter().map(|r| r.waiting).sum::<u64>() as f64 / replicas as f64;
            }
        }
        assert!(peak_replicas >= 5, "40 requests over replicas of 8 need at least 5: {peak_replicas}");
        assert!(waiting_at_peak_end < Thresholds::default().waiting_per_replica, "{waiting_at_peak_end} waiting per replica at the peak with {peak_replicas} replicas");
        assert_eq!(replicas, min, "the count did not come back down");
    }
}
