//! Which pipeline head a request entering at a non-head node goes to, when the cluster runs
//! several replicas: by load, what each head last reported (requests running and waiting) plus
//! what this node has sent it since; ties go round-robin; a head that could not be reached is
//! skipped for a while. Pure: reports and `now` in, a choice out.
//!
//! Cache-aware ([`RoutingPolicy::CacheAware`], the default): each head's prefix cache is
//! guessed from what this node sent it (as SGLang's router does, not from the heads' block
//! events as Dynamo's does: an entry node needs no tokenizer and no event stream, and each
//! entry node's guess is its own). A prompt is cut into 64-byte chunks (about one 16-token KV
//! block of text, or 16 token ids) named by a hash chain; a head "holds" the leading chunks it
//! was sent last. Among the heads whose load is within a slack of the least loaded one
//! ([`BALANCE_ABS`], [`BALANCE_REL`]), the one holding the longest prefix wins; when none holds
//! any, the least loaded. The slack bounds the imbalance: a popular prefix spills over to a
//! second head, which then holds it too.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// A report older than this no longer says anything about the head's load.
pub const REPORT_TTL: Duration = Duration::from_secs(2);
/// How long an unreachable head is passed over.
pub const BACKOFF: Duration = Duration::from_secs(1);

/// Bytes of prompt per routing chunk.
pub const CHUNK_BYTES: usize = 64;
/// Chunks remembered per head until it reports its cache's size; the least recently sent are
/// forgotten first.
pub const REMEMBERED_CHUNKS: usize = 1 << 16;
/// A head whose load exceeds the least loaded head's by less than this many requests...
pub const BALANCE_ABS: u64 = 1;
/// ...or than this fraction of it, may take a request for the prefix it holds. (At one
/// request in flight only an idle head qualifies: the prefix's head never gets busier than
/// another by two, so a second head takes its share and then holds the prefix too.)
pub const BALANCE_REL: f64 = 0.5;

/// How an entry node chooses among heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RoutingPolicy {
    /// The head most likely to hold the prompt's prefix in its cache, balanced against load.
    #[default]
    CacheAware,
    /// The least loaded head.
    LeastLoaded,
}

/// A prompt's routing key: the hash chain of its full [`CHUNK_BYTES`] chunks (FNV-1a over
/// each chunk and the hash before it).
pub fn prefix_key(prompt: &[u8]) -> Vec<u64> {
    let mut key = Vec::with_capacity(prompt.len() / CHUNK_BYTES);
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for chunk in prompt.chunks_exact(CHUNK_BYTES) {
        for &b in chunk {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        key.push(h);
    }
    key
}

/// What one head was sent: chunk hashes, each with when it was last sent.
#[derive(Debug, Clone, Default)]
struct SentPrefixes {
    last_sent: HashMap<u64, u64>,
    by_age: BTreeMap<u64, u64>,
    /// Chunks the head's cache holds at most (its KV blocks, one chunk to a block); what was
    /// sent longer ago is taken to be evicted there (its cache is an LRU too).
    capacity: Option<usize>,
}

impl SentPrefixes {
    /// How many leading chunks of `key` this head was sent.
    fn matched(&self, key: &[u64]) -> usize {
        key.iter().take_while(|h| self.last_sent.contains_key(h)).count()
    }

    fn record(&mut self, key: &[u64], clock: &mut u64) {
        for &h in key {
            *clock += 1;
            if let Some(old) = self.last_sent.insert(h, *clock) {
                self.by_age.remove(&old);
            }
            self.by_age.insert(*clock, h);
        }
        while self.last_sent.len() > self.capacity.unwrap_or(REMEMBERED_CHUNKS).min(REMEMBERED_CHUNKS) {
            let Some((_, h)) = self.by_age.pop_first() else { break };
            self.last_sent.remove(&h);
        }
    }

    fn clear(&mut self) {
        self.last_sent.clear();
        self.by_age.clear();
    }
}

#[derive(Debug, Clone, Default)]
struct Head {
    reported: Option<(u64, Instant)>,
    /// Requests this node forwarded that have not finished.
    in_flight: u64,
    /// Forwarded since the last report (already counted in the head's next report).
    since_report: u64,
    down_until: Option<Instant>,
    sent: SentPrefixes,
}

/// The load view of every head, from one entry node's side, keyed by the head's name (heads
/// can come and go: `add`, `remove`), and (cache-aware) the prefixes each was sent.
#[derive(Debug, Clone, Default)]
pub struct HeadLoads {
    heads: Vec<(String, Head)>,
    next: usize,
    policy: RoutingPolicy,
    clock: u64,
}

impl HeadLoads {
    pub fn new<S: Into<String>>(names: impl IntoIterator<Item = S>) -> Self {
        let mut l = HeadLoads::default();
        for n in names {
            l.add(n);
        }
        l
    }

    pub fn with_policy(mut self, policy: RoutingPolicy) -> Self {
        self.policy = policy;
        self
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

    /// Head `name` caches at most `blocks` KV blocks (what its prefix cache can hold).
    pub fn cache_blocks(&mut self, name: &str, blocks: usize) {
        if let Some(h) = self.get_mut(name) {
            h.sent.capacity = Some(blocks.max(1));
        }
    }

    /// Head `name` could not be reached: pass it over for [`BACKOFF`]. What it was sent is
    /// forgotten (a head that comes back may have restarted with an empty cache).
    pub fn unreachable(&mut self, name: &str, now: Instant) {
        if let Some(h) = self.get_mut(name) {
            h.down_until = Some(now + BACKOFF);
            h.reported = None;
            h.sent.clear();
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

    /// The head to send the next request to, by load alone; see [`HeadLoads::pick_for`].
    pub fn pick(&mut self, now: Instant, exclude: &[&str]) -> Option<String> {
        self.pick_for(now, exclude, &[])
    }

    /// The head to send a request whose prompt has routing key `key` ([`prefix_key`]; empty
    /// when unknown) to, skipping `exclude` (heads already tried for this request); `None`
    /// when every head is down or excluded. Records the request, and its key, as sent there.
    pub fn pick_for(&mut self, now: Instant, exclude: &[&str], key: &[u64]) -> Option<String> {
        let n = self.heads.len();
        // Up heads in round-robin order from `next`, with their loads.
        let up: Vec<(usize, u64)> = (0..n)
            .map(|k| (self.next + k) % n)
            .filter(|&i| {
                let (name, h) = &self.heads[i];
                !exclude.contains(&name.as_str()) && !h.down_until.is_some_and(|t| now < t)
            })
            .map(|i| (i, Self::load(&self.heads[i].1, now)))
            .collect();
        let least = up.iter().copied().reduce(|best, c| if c.1 < best.1 { c } else { best })?;
        let mut choice = least.0;
        if self.policy == RoutingPolicy::CacheAware && !key.is_empty() {
            let slack = (BALANCE_ABS as f64).max(least.1 as f64 * BALANCE_REL);
            let mut best: Option<(usize, u64, usize)> = None; // (matched, load, head)
            for &(i, load) in up.iter().filter(|c| (c.1 as f64) < least.1 as f64 + slack) {
                let matched = self.heads[i].1.sent.matched(key);
                if best.is_none_or(|(m, l, _)| matched > m || matched == m && load < l) {
                    best = Some((matched, load, i));
                }
            }
            if let Some((_, _, i)) = best.filter(|b| b.0 > 0) {
                choice = i;
            }
        }
        self.next = (choice + 1) % n;
        let (name, h) = &mut self.heads[choice];
        h.in_flight += 1;
        h.since_report += 1;
        if self.policy == RoutingPolicy::CacheAware {
            h.sent.record(key, &mut self.clock);
        }
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

    /// Token ids as a prompt's bytes (16 ids to a chunk, one KV block).
    fn ids_key(ids: &[u32]) -> Vec<u64> {
        let bytes: Vec<u8> = ids.iter().flat_map(|t| t.to_le_bytes()).collect();
        prefix_key(&bytes)
    }

    #[test]
    fn a_key_names_a_chunk_and_everything_before_it() {
        let a = prefix_key(&[1u8; 200]);
        assert_eq!(a.len(), 3, "full chunks only");
        let mut other = vec![1u8; 200];
        other[0] = 2;
        let b = prefix_key(&other);
        assert!(a.iter().zip(&b).all(|(x, y)| x != y), "a different first byte changes every chunk's name");
        assert_eq!(prefix_key(&[1u8; 63]), Vec::<u64>::new());
    }

    #[test]
    fn a_prefix_goes_back_to_the_head_that_was_sent_it() {
        let now = t0();
        let mut l = heads(3);
        let chat: Vec<u32> = (0..64).collect();
        let other: Vec<u32> = (1000..1064).collect();
        let first = l.pick_for(now, &[], &ids_key(&chat)).unwrap();
        l.finished(&first);
        let second = l.pick_for(now, &[], &ids_key(&other)).unwrap();
        assert_ne!(first, second, "an unknown prefix goes to the least loaded head");
        l.finished(&second);
        // The conversation goes on: its longer prompt goes where its beginning went.
        let mut longer = chat.clone();
        longer.extend(500..540);
        for _ in 0..3 {
            let h = l.pick_for(now, &[], &ids_key(&longer)).unwrap();
            assert_eq!(h, first);
            l.finished(&h);
        }
        // Load-only routing ignores it.
        let mut plain = heads(3).with_policy(RoutingPolicy::LeastLoaded);
        let picks: Vec<String> = (0..3).map(|_| plain.pick_for(now, &[], &ids_key(&chat)).unwrap()).collect();
        assert_eq!(picks, vec!["head-0", "head-1", "head-2"]);
        // A head that could not be reached is assumed to have lost its cache.
        l.unreachable(&first, now);
        let later = now + BACKOFF;
        let h = l.pick_for(later, &[], &ids_key(&other)).unwrap();
        assert_eq!(h, second);
    }

    #[test]
    fn a_popular_prefix_spills_over_when_its_head_is_busy() {
        let now = t0();
        let mut l = heads(2);
        let key = ids_key(&(0..64).collect::<Vec<u32>>());
        // Nothing finishes: head 0, holding the prefix, is one busier than the idle head 1 at
        // the second request, which spills over; both hold it then, and take turns by load.
        let picks: Vec<usize> = (0..20).map(|_| index(l.pick_for(now, &[], &key)).unwrap()).collect();
        assert_eq!(&picks[..2], &[0, 1], "{picks:?}");
        assert_eq!(picks.iter().filter(|&&i| i == 0).count(), 10, "{picks:?}");
        // Busier heads: within half the least load, the head holding the prefix takes it.
        let mut l = heads(2);
        let other = ids_key(&(100..164).collect::<Vec<u32>>());
        assert_eq!(index(l.pick_for(now, &[], &key)), Some(0));
        assert_eq!(index(l.pick_for(now, &[], &other)), Some(1));
        l.report(&name(0), 10, now);
        l.report(&name(1), 8, now);
        assert_eq!(index(l.pick_for(now, &[], &key)), Some(0), "10 is below 8 + 4");
        l.report(&name(0), 12, now);
        assert_eq!(index(l.pick_for(now, &[], &key)), Some(1), "12 is not");
    }

    /// The benchmark's workload in virtual time: 8 system prompts of 1,024 tokens, each request
    /// one of them plus 64 unique tokens, 16 requests in flight, heads whose prefix caches hold
    /// 5 system prompts each (an LRU over blocks, as the head's allocator is). Cache-aware
    /// routing over two heads keeps the hit rate within 5 points of one head with every
    /// request (here: above it, the two caches hold different prompts) and neither head takes
    /// more than 60% of the requests; load-only routing makes both caches thrash.
    #[test]
    fn cache_aware_routing_keeps_the_hit_rate_and_the_balance() {
        let (one, _) = simulate_shared_prefix(1, RoutingPolicy::CacheAware, 1, 0);
        let (aware, aware_share) = simulate_shared_prefix(2, RoutingPolicy::CacheAware, 1, 0);
        let (load, _) = simulate_shared_prefix(2, RoutingPolicy::LeastLoaded, 1, 0);
        eprintln!("one {one:.3} aware {aware:.3} share {aware_share:.3} load {load:.3}");
        assert!(aware >= one - 0.05, "cache-aware {aware:.3} vs one head {one:.3}");
        assert!(aware_share <= 0.60, "one head took {aware_share:.3} of the requests");
        assert!(aware > load + 0.2, "cache-aware {aware:.3} vs load-only {load:.3}");
        for seed in 2..5 {
            let (aware, share) = simulate_shared_prefix(2, RoutingPolicy::CacheAware, seed, 0);
            assert!(aware >= one - 0.05 && share <= 0.60, "seed {seed}: hit rate {aware:.3}, share {share:.3}");
        }
        // One system prompt in 70% of the requests: it must spill over to both heads.
        let (one, _) = simulate_shared_prefix(1, RoutingPolicy::CacheAware, 5, 70);
        let (aware, share) = simulate_shared_prefix(2, RoutingPolicy::CacheAware, 5, 70);
        eprintln!("hot: one {one:.3} aware {aware:.3} share {share:.3}");
        assert!(aware >= one - 0.05 && share <= 0.60, "a hot prefix: hit rate {aware:.3} (one head {one:.3}), share {share:.3}");
        // And a single system prompt for every request (the benchmark's).
        let (one, _) = simulate_shared_prefix(1, RoutingPolicy::CacheAware, 6, 100);
        let (aware, share) = simulate_shared_prefix(2, RoutingPolicy::CacheAware, 6, 100);
        eprintln!("single: one {one:.3} aware {aware:.3} share {share:.3}");
        assert!(aware >= one - 0.05 && share <= 0.60, "one prefix: hit rate {aware:.3} (one head {one:.3}), share {share:.3}");
        // Few requests in flight: the prefix's head never gets much busier than the other, yet
        // the other must take its share (with a slack as wide as the load, it took none).
        for in_flight in [2, 4, 8] {
            let (one, _) = simulate_shared_prefix_at(in_flight, 1, RoutingPolicy::CacheAware, 7, 100);
            let (aware, share) = simulate_shared_prefix_at(in_flight, 2, RoutingPolicy::CacheAware, 7, 100);
            assert!(aware >= one - 0.05 && share <= 0.60, "{in_flight} in flight: hit rate {aware:.3} (one head {one:.3}), share {share:.3}");
        }
    }

    /// Returns the prompt-token hit rate and the largest share of requests one head took.
    fn simulate_shared_prefix(n_heads: usize, policy: RoutingPolicy, seed: u64, hot: u64) -> (f64, f64) {
        simulate_shared_prefix_at(16, n_heads, policy, seed, hot)
    }

    fn simulate_shared_prefix_at(in_flight: usize, n_heads: usize, policy: RoutingPolicy, seed: u64, hot: u64) -> (f64, f64) {
        const BLOCK: usize = 16;
        let capacity = 5 * (1024 + 64 + 64) / BLOCK; // blocks per head
        let start = t0();
        let mut loads = heads(n_heads).with_policy(policy);
        for h in 0..n_heads {
            loads.cache_blocks(&name(h), capacity);
        }
        // Per head: block hash -> last use, and the reverse (an LRU).
        let mut caches: Vec<(HashMap<u64, u64>, BTreeMap<u64, u64>)> = vec![Default::default(); n_heads];
        let mut running: Vec<(usize, u64)> = Vec::new(); // (head, finishes at ms)
        let mut served = vec![0u64; n_heads];
        let (mut prompt_tokens, mut hit_tokens, mut clock) = (0u64, 0u64, 0u64);
        let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut next = |m: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % m
        };
        let mut ms = 0u64;
        for request in 0..4000u32 {
            // Closed loop: with every slot taken, the clock moves to the next request's end.
            if running.len() >= in_flight {
                ms = ms.max(running.iter().map(|r| r.1).min().unwrap_or(ms));
                running.retain(|&(h, end)| {
                    let done = end <= ms;
                    if done {
                        loads.finished(&name(h));
                    }
                    !done
                });
            }
            let now = start + Duration::from_millis(ms);
            // The heads' reports are fresh (a front polls every 200 ms; requests take seconds).
            {
                for h in 0..n_heads {
                    loads.report(&name(h), running.iter().filter(|r| r.0 == h).count() as u64, now);
                }
            }
            // `hot` percent of the requests use system prompt 0, the rest any of the 8.
            let system = if next(100) < hot { 0 } else { next(8) as u32 };
            let mut ids: Vec<u32> = (0..1024).map(|i| system * 100_000 + i).collect();
            ids.extend((0..64).map(|k| 1_000_000 + request * 64 + k));
            let key = ids_key(&ids);
            let h = index(loads.pick_for(now, &[], &key)).unwrap();
            served[h] += 1;
            // The head's cache: the leading blocks it holds are hits (never the last token's).
            let (by_hash, by_age) = &mut caches[h];
            let usable = (ids.len() - 1) / BLOCK;
            let hit = key[..usable].iter().take_while(|k| by_hash.contains_key(k)).count();
            prompt_tokens += ids.len() as u64;
            hit_tokens += (hit * BLOCK) as u64;
            for &k in &key {
                clock += 1;
                if let Some(old) = by_hash.insert(k, clock) {
                    by_age.remove(&old);
                }
                by_age.insert(clock, k);
            }
            while by_hash.len() > capacity {
                let (_, k) = by_age.pop_first().unwrap();
                by_hash.remove(&k);
            }
            // Service time: the computed prompt tokens and 64 decode steps.
            let computed = (ids.len() - hit * BLOCK) as u64;
            running.push((h, ms + 200 + computed / 4 + next(100)));
        }
        let share = *served.iter().max().unwrap() as f64 / served.iter().sum::<u64>() as f64;
        (hit_tokens as f64 / prompt_tokens as f64, share)
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
