//! Which pipeline head a request entering at a non-head node goes to, when the cluster runs
//! several replicas: the least loaded head, by what each last reported (requests running and
//! waiting) plus what this node has sent it since; ties go round-robin; a head that could not be
//! reached is skipped for a while. Pure: reports and `now` in, a choice out.

use std::time::{Duration, Instant};

/// A report older than this no longer says anything about the head's load.
pub const REPORT_TTL: Duration = Duration::from_secs(2);
/// How long an unreachable head is passed over.
pub const BACKOFF: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Default)]
struct Head {
    reported: Option<(u64, Instant)>,
    /// Requests this node forwarded that have not finished.
    in_flight: u64,
    /// Forwarded since the last report (already counted in the head's next report).
    since_report: u64,
    down_until: Option<Instant>,
}

/// The load view of every head, from one entry node's side, keyed by the head's name (heads
/// can come and go: `add`, `remove`).
#[derive(Debug, Clone, Default)]
pub struct HeadLoads {
    heads: Vec<(String, Head)>,
    next: usize,
}

impl HeadLoads {
    pub fn new<S: Into<String>>(names: impl IntoIterator<Item = S>) -> Self {
        let mut l = HeadLoads::default();
        for n in names {
            l.add(n);
        }
        l
    }

    /// A head this node may send requests to (known names are left as they are).
    pub fn add(&mut self, name: impl Into<String>) {
        let name = name.into();
        if !self.heads.iter().any(|(n, _)| *n == name) {
            self.heads.push((name, Head::default()));
        }
    }

    /// A head that is gone: no request goes there any more.
    pub fn remove(&mut self, name: &str) {
        self.heads.retain(|(n, _)| n != name);
        self.next = self.next.min(self.heads.len().saturating_sub(1));
    }

    pub fn len(&self) -> usize {
        self.heads.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heads.is_empty()
    }

    fn get_mut(&mut self, name: &str) -> Option<&mut Head> {
        self.heads.iter_mut().find(|(n, _)| n == name).map(|(_, h)| h)
    }

    /// Head `name` reported `load` requests running or waiting. A head that answers is up.
    pub fn report(&mut self, name: &str, load: u64, now: Instant) {
        if let Some(h) = self.get_mut(name) {
            h.reported = Some((load, now));
            h.since_report = 0;
            h.down_until = None;
        }
    }

    /// Head `name` could not be reached: pass it over for [`BACKOFF`].
    pub fn unreachable(&mut self, name: &str, now: Instant) {
        if let Some(h) = self.get_mut(name) {
            h.down_until = Some(now + BACKOFF);
            h.reported = None;
        }
    }

    fn load(h: &Head, now: Instant) -> u64 {
        let reported = match h.reported {
            Some((load, at)) if now.saturating_duration_since(at) <= REPORT_TTL => load + h.since_report,
            // Unknown: only what this node itself has outstanding there.
            _ => h.in_flight,
        };
        reported.max(h.in_flight)
    }

    /// The head to send the next request to, skipping `exclude` (heads already tried for this
    /// request); `None` when every head is down or excluded. Records the request as sent.
    pub fn pick(&mut self, now: Instant, exclude: &[&str]) -> Option<String> {
        let n = self.heads.len();
        let mut best: Option<(u64, usize)> = None;
        for k in 0..n {
            let i = (self.next + k) % n;
            let (name, h) = &self.heads[i];
            if exclude.contains(&name.as_str()) || h.down_until.is_some_and(|t| now < t) {
                continue;
            }
            let load = Self::load(h, now);
            if best.is_none_or(|(b, _)| load < b) {
                best = Some((load, i));
            }
        }
        let (_, i) = best?;
        self.next = (i + 1) % n;
        let (name, h) = &mut self.heads[i];
        h.in_flight += 1;
        h.since_report += 1;
        Some(name.clone())
    }

    /// A request sent to head `name` finished (answered, failed or abandoned).
    pub fn finished(&mut self, name: &str) {
        if let Some(h) = self.get_mut(name) {
            h.in_flight = h.in_flight.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> Instant {
        Instant::now()
    }

    fn heads(n: usize) -> HeadLoads {
        HeadLoads::new((0..n).map(name))
    }

    fn name(i: usize) -> String {
        format!("head-{i}")
    }

    fn index(picked: Option<String>) -> Option<usize> {
        picked.and_then(|n| n.strip_prefix("head-").and_then(|i| i.parse().ok()))
    }

    #[test]
    fn equal_heads_take_turns() {
        let now = t0();
        let mut l = heads(3);
        let picks: Vec<usize> = (0..6)
            .map(|_| {
                let i = index(l.pick(now, &[])).unwrap_or(99);
                l.finished(&name(i));
                i
            })
            .collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn outstanding_requests_spread_evenly() {
        let now = t0();
        let mut l = heads(2);
        let mut counts = [0; 2];
        for _ in 0..10 {
            counts[index(l.pick(now, &[])).unwrap_or(0)] += 1;
        }
        assert_eq!(counts, [5, 5]);
    }

    #[test]
    fn a_loaded_head_is_avoided_until_it_drains() {
        let now = t0();
        let mut l = heads(2);
        l.report(&name(0), 40, now);
        l.report(&name(1), 2, now);
        let picks: Vec<usize> = (0..10).map(|_| index(l.pick(now, &[])).unwrap_or(99)).collect();
        assert!(picks.iter().all(|&i| i == 1), "{picks:?}");
        // Head 1 is now at 12 (2 reported + 10 sent): head 0 draining to 5 takes the next ones.
        l.report(&name(0), 5, now);
        assert_eq!(index(l.pick(now, &[])), Some(0));
    }

    #[test]
    fn stale_reports_are_forgotten() {
        let now = t0();
        let mut l = heads(2);
        l.report(&name(0), 100, now);
        let later = now + REPORT_TTL + Duration::from_millis(1);
        assert_eq!(index(l.pick(later, &[])), Some(0));
    }

    #[test]
    fn unreachable_heads_are_skipped_then_retried() {
        let now = t0();
        let mut l = heads(2);
        l.unreachable(&name(0), now);
        assert_eq!(index(l.pick(now, &[])), Some(1));
        assert_eq!(index(l.pick(now, &[])), Some(1));
        assert_eq!(l.pick(now, &["head-1"]), None, "the only other head is down");
        let later = now + BACKOFF;
        assert_eq!(index(l.pick(later, &[])), Some(0));
    }

    #[test]
    fn heads_come_and_go_by_name() {
        let now = t0();
        let mut l = heads(2);
        l.remove("head-0");
        assert_eq!(l.pick(now, &[]).as_deref(), Some("head-1"));
        assert_eq!(l.pick(now, &[]).as_deref(), Some("head-1"));
        l.add("head-9");
        l.add("head-9");
        assert_eq!(l.len(), 2);
        // head-1 has 2 outstanding, the newcomer none: it takes the next one.
        assert_eq!(l.pick(now, &[]).as_deref(), Some("head-9"));
        l.remove("head-1");
        l.remove("head-9");
        assert!(l.is_empty());
        assert_eq!(l.pick(now, &[]), None);
    }

    #[test]
    fn a_simulated_mesh_of_heads_under_load_stays_balanced() {
        // 4 heads, 3 entry nodes each with its own view, requests arriving and finishing over
        // virtual time; reports every 100 ms. No head ends up with more than twice the mean.
        let start = t0();
        let mut views: Vec<HeadLoads> = (0..3).map(|_| heads(4)).collect();
        let mut running: Vec<(usize, usize, u64)> = Vec::new(); // (view, head, finishes at ms)
        let mut served = [0u64; 4];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for ms in 0..5_000u64 {
            let now = start + Duration::from_millis(ms);
            running.retain(|&(v, h, end)| {
                if end <= ms {
                    views[v].finished(&name(h));
                    false
                } else {
                    true
                }
            });
            if ms % 100 == 0 {
                for h in 0..4 {
                    let load = running.iter().filter(|r| r.1 == h).count() as u64;
                    for v in &mut views {
                        v.report(&name(h), load, now);
                    }
                }
            }
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            if seed.is_multiple_of(3) {
                let v = (seed >> 8) as usize % 3;
                let h = index(views[v].pick(now, &[])).unwrap_or(0);
                served[h] += 1;
                running.push((v, h, ms + 50 + (seed >> 20) % 400));
            }
        }
        let mean = served.iter().sum::<u64>() as f64 / 4.0;
        assert!(served.iter().all(|&s| (s as f64) < 2.0 * mean && (s as f64) > 0.5 * mean), "{served:?}");
    }
}
