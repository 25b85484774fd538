//! Deterministic simulations of the scheduler: seeded arrivals and lengths, a virtual clock, a
//! fake model that "samples" seeded tokens, and invariants checked after every step.

use baton_engine::rng::Rng;
use baton_engine::KvGeometry;

use super::*;

fn config() -> SchedulerConfig {
    SchedulerConfig {
        max_num_seqs: 8,
        max_batched_tokens: 64,
        max_waiting: 1000,
        max_model_len: 512,
    }
}

/// Runs steps until every request finishes; checks invariants after each step.
fn simulate(mut sched: Scheduler, requests: Vec<(SeqId, Vec<u32>, usize)>, eos_every: u64, seed: u64) -> (HashMap<SeqId, Vec<u32>>, u64) {
    let mut rng = Rng::new(seed);
    let mut outputs: HashMap<SeqId, Vec<u32>> = HashMap::new();
    let mut pending: VecDeque<_> = requests.iter().cloned().collect();
    let max_tokens: HashMap<SeqId, usize> = requests.iter().map(|r| (r.0, r.2)).collect();
    let mut now = 0u64;
    let mut steps = 0;
    while !pending.is_empty() || sched.has_work() {
        // A few arrivals per step.
        for _ in 0..(rng.next_u64() % 3) {
            if let Some((id, prompt, max)) = pending.pop_front() {
                sched.add(id, prompt, max, now).unwrap();
            }
        }
        now += 1000;
        let Some(step) = sched.schedule(now) else {
            assert!(!pending.is_empty() || !sched.has_work(), "work left but nothing scheduled");
            continue;
        };
        steps += 1;
        assert!(steps < 100_000, "no progress");
        assert!(step.num_tokens() <= sched.config().max_batched_tokens);
        assert!(sched.num_running() <= sched.config().max_num_seqs);
        step.layout.validate(16, sched.total_blocks(), 512).unwrap();
        let ids: Vec<SeqId> = step.scheduled.iter().map(|s| s.id).collect();
        let unique: HashSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len(), "a sequence twice in one step");
        let mut sampled = Vec::new();
        let mut finished = Vec::new();
        for s in step.scheduled.iter().filter(|s| s.samples) {
            let token = (rng.next_u64() % 1000) as u32;
            let out = outputs.entry(s.id).or_default();
            out.push(token);
            sampled.push((s.id, token));
            if eos_every > 0 && rng.next_u64() % eos_every == 0 {
                finished.push(s.id);
            }
            assert!(out.len() <= max_tokens[&s.id], "sequence {} overran max_tokens", s.id);
        }
        sched.complete(&step, &sampled, &finished);
    }
    assert_eq!(sched.free_blocks(), sched.total_blocks(), "blocks leaked");
    (outputs, sched.preemptions())
}

fn requests(n: u64, seed: u64) -> Vec<(SeqId, Vec<u32>, usize)> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|id| {
            let len = 1 + (rng.next_u64() % 150) as usize;
            let max = 1 + (rng.next_u64() % 60) as usize;
            (id, (0..len).map(|i| (i * 7 % 1000) as u32).collect(), max)
        })
        .collect()
}

#[test]
fn every_request_finishes_with_exactly_its_tokens() {
    let reqs = requests(200, 1);
    let sched = Scheduler::new(config(), KvGeometry { block_size: 16, num_blocks: 400 });
    let (outputs, preemptions) = simulate(sched, reqs.clone(), 0, 2);
    for (id, _, max) in &reqs {
        assert_eq!(outputs[id].len(), *max, "request {id}");
    }
    assert_eq!(preemptions, 0, "a roomy cache should not preempt");
}

#[test]
fn a_tight_cache_preempts_and_still_finishes_everything() {
    let reqs = requests(150, 3);
    // 40 blocks of 16 = 640 slots for up to 8 sequences of up to ~210 tokens.
    let sched = Scheduler::new(config(), KvGeometry { block_size: 16, num_blocks: 40 });
    let (outputs, preemptions) = simulate(sched, reqs.clone(), 0, 4);
    for (id, _, max) in &reqs {
        assert_eq!(outputs[id].len(), *max, "request {id}");
    }
    assert!(preemptions > 0, "the tight cache never preempted");
}

#[test]
fn stop_tokens_end_sequences_early_and_free_them() {
    let reqs = requests(100, 5);
    let sched = Scheduler::new(config(), KvGeometry { block_size: 16, num_blocks: 60 });
    let (outputs, _) = simulate(sched, reqs.clone(), 10, 6);
    assert!(reqs.iter().any(|(id, _, max)| outputs[id].len() < *max));
}

#[test]
fn chunked_prefill_mixes_with_decodes_under_the_budget() {
    let mut s = Scheduler::new(config(), KvGeometry { block_size: 16, num_blocks: 100 });
    s.add(1, vec![1; 10], 5, 0).unwrap();
    let step = s.schedule(1).unwrap();
    assert_eq!(step.scheduled[0].tokens.len(), 10);
    assert!(step.scheduled[0].samples);
    s.complete(&step, &[(1, 42)], &[]);
    s.add(2, vec![2; 200], 5, 2).unwrap();
    let step = s.schedule(3).unwrap();
    // Sequence 1 decodes its sampled token; sequence 2 prefills 63 of 200 prompt tokens.
    assert_eq!(step.scheduled[0].tokens, vec![42]);
    assert_eq!(step.scheduled[1].tokens.len(), 63);
    assert!(!step.scheduled[1].samples);
    assert_eq!(step.layout.chunks[1].start_pos, 0);
    assert_eq!(step.started, vec![(2, 1)]);
    s.complete(&step, &[(1, 43)], &[]);
    let step = s.schedule(4).unwrap();
    assert_eq!(step.layout.chunks[1].start_pos, 63);
}

#[test]
fn fcfs_admission_and_limits() {
    let mut s = Scheduler::new(SchedulerConfig { max_waiting: 2, ..config() }, KvGeometry { block_size: 16, num_blocks: 8 });
    assert_eq!(s.add(1, vec![], 4, 0), Err(AdmitError::EmptyPrompt));
    assert!(matches!(s.add(1, vec![1; 500], 100, 0), Err(AdmitError::TooLong { .. })));
    assert!(matches!(s.add(1, vec![1; 200], 100, 0), Err(AdmitError::NeverFits { needed: 19, total: 8 })));
    s.add(1, vec![1; 5], 4, 0).unwrap();
    assert_eq!(s.add(1, vec![1; 5], 4, 0), Err(AdmitError::DuplicateId(1)));
    s.add(2, vec![1; 5], 4, 0).unwrap();
    assert_eq!(s.add(3, vec![1; 5], 4, 0), Err(AdmitError::QueueFull(2)));
    let step = s.schedule(0).unwrap();
    assert_eq!(step.scheduled.iter().map(|x| x.id).collect::<Vec<_>>(), vec![1, 2]);
}

#[test]
fn abort_frees_blocks_wherever_the_sequence_is() {
    let mut s = Scheduler::new(config(), KvGeometry { block_size: 16, num_blocks: 20 });
    s.add(1, vec![1; 40], 10, 0).unwrap();
    s.add(2, vec![1; 40], 10, 0).unwrap();
    let step = s.schedule(0).unwrap();
    assert!(s.free_blocks() < 20);
    assert!(s.abort(1));
    assert!(!s.abort(1));
    s.complete(&step, &[(2, 5)], &[]);
    assert!(s.abort(2));
    assert_eq!(s.free_blocks(), 20);
    assert!(!s.has_work());
}

#[test]
fn in_flight_sequences_are_not_rescheduled_until_complete() {
    let mut s = Scheduler::new(config(), KvGeometry { block_size: 16, num_blocks: 20 });
    s.add(1, vec![1; 4], 10, 0).unwrap();
    let first = s.schedule(0).unwrap();
    s.add(2, vec![1; 4], 10, 0).unwrap();
    let second = s.schedule(0).unwrap();
    assert_eq!(second.scheduled.iter().map(|x| x.id).collect::<Vec<_>>(), vec![2]);
    assert!(s.schedule(0).is_none(), "both sequences are in flight");
    s.complete(&first, &[(1, 9)], &[]);
    let third = s.schedule(0).unwrap();
    assert_eq!(third.scheduled[0].tokens, vec![9]);
    s.complete(&second, &[(2, 8)], &[]);
    s.complete(&third, &[(1, 7)], &[]);
}

/// A pipeline of `m` stages: up to `m` steps in flight, completed oldest first. Returns every
/// request's tokens and the sizes (sequences) of the steps taken.
fn simulate_pipeline(mut sched: Scheduler, m: usize, requests: Vec<(SeqId, Vec<u32>, usize)>, seed: u64) -> (HashMap<SeqId, Vec<u32>>, Vec<usize>) {
    sched.set_micro_batches(m);
    let mut rng = Rng::new(seed);
    let mut outputs: HashMap<SeqId, Vec<u32>> = HashMap::new();
    let mut pending: VecDeque<_> = requests.iter().cloned().collect();
    let mut flight: VecDeque<Step> = VecDeque::new();
    let mut sizes = Vec::new();
    let mut now = 0u64;
    while !pending.is_empty() || sched.has_work() || !flight.is_empty() {
        for _ in 0..(rng.next_u64() % 4) {
            if let Some((id, prompt, max)) = pending.pop_front() {
                sched.add(id, prompt, max, now).unwrap();
            }
        }
        now += 1000;
        assert!(now < 1_000_000_000, "no progress");
        let pool = (sched.num_running() + sched.num_waiting()).min(sched.config().max_num_seqs);
        if flight.len() < m {
            if let Some(step) = sched.schedule(now) {
                assert!(step.scheduled.len() <= pool.div_ceil(m).max(1), "a step of {} from a pool of {pool} in {m} micro-batches", step.scheduled.len());
                for s in &step.scheduled {
                    assert!(!flight.iter().any(|f| f.scheduled.iter().any(|x| x.id == s.id)), "sequence {} in two micro-batches at once", s.id);
                }
                sizes.push(step.scheduled.len());
                flight.push_back(step);
                continue;
            }
        }
        let Some(step) = flight.pop_front() else { continue };
        let sampled: Vec<(SeqId, u32)> = step.scheduled.iter().filter(|s| s.samples).map(|s| (s.id, (rng.next_u64() % 1000) as u32)).collect();
        for &(id, t) in &sampled {
            outputs.entry(id).or_default().push(t);
        }
        sched.complete(&step, &sampled, &[]);
    }
    assert_eq!(sched.free_blocks(), sched.total_blocks(), "blocks leaked");
    (outputs, sizes)
}

#[test]
fn micro_batches_split_the_sequences_evenly_and_never_share_one() {
    // 24 equal requests arriving together, four stages: once all are decoding, every step
    // carries a quarter of them.
    let config = SchedulerConfig { max_num_seqs: 24, max_batched_tokens: 512, ..config() };
    let reqs: Vec<_> = (0..24).map(|i| (i, vec![1; 8], 40)).collect();
    let mut sched = Scheduler::new(config, KvGeometry { block_size: 16, num_blocks: 200 });
    sched.set_micro_batches(4);
    for (id, prompt, max) in &reqs {
        sched.add(*id, prompt.clone(), *max, 0).unwrap();
    }
    let steps: Vec<Step> = (0..4).map(|_| sched.schedule(0).expect("a micro-batch")).collect();
    assert!(sched.schedule(0).is_none(), "four micro-batches hold every sequence");
    assert!(steps.iter().all(|s| s.scheduled.len() == 6), "{:?}", steps.iter().map(|s| s.scheduled.len()).collect::<Vec<_>>());
    let (outputs, sizes) = simulate_pipeline(Scheduler::new(config, KvGeometry { block_size: 16, num_blocks: 200 }), 4, reqs.clone(), 3);
    assert!(outputs.values().all(|o| o.len() == 40) && outputs.len() == 24);
    // Arrivals trickle in (up to 3 a step) and the last sequences drain, so only the middle
    // of the run is steady; most steps there carry exactly six.
    let six = sizes.iter().filter(|&&n| n == 6).count();
    assert!(six * 10 >= sizes.len() * 7, "steps of six: {six} of {}: {sizes:?}", sizes.len());
}

#[test]
fn pipelined_runs_finish_every_request_with_exactly_its_tokens() {
    for (seed, m) in [(1, 2), (2, 3), (3, 4), (4, 8), (5, 1)] {
        let reqs = requests(60, seed);
        let sched = Scheduler::new(config(), KvGeometry { block_size: 16, num_blocks: 40 });
        let (outputs, _) = simulate_pipeline(sched, m, reqs.clone(), seed);
        for (id, _, max) in &reqs {
            assert_eq!(outputs.get(id).map_or(0, Vec::len), *max, "request {id} with {m} micro-batches");
        }
    }
}

/// A pipeline loses a stage every few steps: every running sequence is re-queued and its
/// in-flight step dropped; every request still ends with exactly its tokens, prompt and
/// produced tokens are recomputed from the start, and no block leaks.
#[test]
fn requeue_all_loses_nothing_and_recomputes_from_the_start() {
    let reqs = requests(120, 11);
    let mut sched = Scheduler::new(config(), KvGeometry { block_size: 16, num_blocks: 120 });
    let mut rng = Rng::new(12);
    let mut outputs: HashMap<SeqId, Vec<u32>> = HashMap::new();
    let mut pending: VecDeque<_> = reqs.iter().cloned().collect();
    let mut requeues = 0;
    let mut steps = 0;
    while !pending.is_empty() || sched.has_work() {
        if let Some((id, prompt, max)) = pending.pop_front() {
            sched.add(id, prompt, max, 0).unwrap();
        }
        let Some(step) = sched.schedule(0) else { continue };
        steps += 1;
        assert!(steps < 100_000, "no progress");
        if rng.next_u64() % 7 == 0 {
            // The stage died with this step in flight: its results never arrive.
            let moved = sched.requeue_all();
            requeues += 1;
            assert_eq!(sched.num_running(), 0);
            for id in moved {
                let produced = sched.generated(id).unwrap().to_vec();
                assert_eq!(produced, outputs.get(&id).cloned().unwrap_or_default(), "sequence {id} forgot tokens");
            }
            // Recompute: the next step restarts each moved sequence at position 0.
            if let Some(next) = sched.schedule(0) {
                assert!(next.layout.chunks.iter().all(|c| c.start_pos == 0), "a re-queued sequence kept stale KV");
                sched.requeue_all();
            }
            continue;
        }
        let mut sampled = Vec::new();
        for s in step.scheduled.iter().filter(|s| s.samples) {
            let token = (rng.next_u64() % 1000) as u32;
            outputs.entry(s.id).or_default().push(token);
            sampled.push((s.id, token));
        }
        sched.complete(&step, &sampled, &[]);
    }
    assert!(requeues > 10);
    for (id, _, max) in &reqs {
        assert_eq!(outputs[id].len(), *max, "request {id}");
    }
    assert_eq!(sched.free_blocks(), sched.total_blocks(), "blocks leaked");
}

#[test]
fn a_resumed_request_recomputes_what_it_produced_and_goes_on_from_there() {
    let mut sched = Scheduler::new(config(), KvGeometry { block_size: 16, num_blocks: 64 });
    let prompt: Vec<u32> = (1..=20).collect();
    sched.add_resumed(7, prompt.clone(), vec![100, 101, 102], 5, 0).unwrap();
    assert_eq!(sched.generated(7).unwrap(), &[100, 101, 102]);
    // The prompt and the produced tokens are one prefill; the token sampled after it is the 4th.
    let step = sched.schedule(0).unwrap();
    let fed: Vec<u32> = step.scheduled[0].tokens.clone();
    assert_eq!(fed, prompt.iter().copied().chain([100, 101, 102]).collect::<Vec<_>>());
    assert!(step.scheduled[0].samples);
    sched.complete(&step, &[(7, 103)], &[]);
    let step = sched.schedule(0).unwrap();
    assert_eq!(step.scheduled[0].tokens, vec![103]);
    // The budget counts the produced tokens: the 5th token is the last.
    let done = sched.complete(&step, &[(7, 104)], &[]);
    assert_eq!(done, vec![7]);
    assert_eq!(sched.free_blocks(), sched.total_blocks());
    // Nothing left to produce, and a budget the produced tokens already fill, are refused.
    assert!(matches!(sched.add_resumed(8, prompt.clone(), vec![1, 2], 2, 0), Err(AdmitError::NothingLeft { .. })));
    assert!(sched.add_resumed(9, prompt, vec![], 2, 0).is_ok());
}

const HASHER: PrefixHasher = PrefixHasher::new([0x5eed, 0xcafe]);

/// What a fake model writes into the paged cache: each slot holds the token and position whose
/// K/V it is. A chunk reading a slot that holds anything else has been given stale KV.
struct FakeKv {
    slots: Vec<Option<(u32, usize)>>,
    block_size: usize,
}

impl FakeKv {
    fn new(geometry: KvGeometry) -> Self {
        FakeKv { slots: vec![None; geometry.num_blocks * geometry.block_size], block_size: geometry.block_size }
    }

    /// Runs one step: checks that each chunk's earlier positions hold its own tokens, writes
    /// the chunk, and never writes into a block another running sequence holds.
    fn run(&mut self, sched: &Scheduler, step: &Step) {
        for (s, chunk) in step.scheduled.iter().zip(&step.layout.chunks) {
            let seq = &sched.seqs[&s.id];
            for p in 0..chunk.start_pos {
                let slot = chunk.block_table[p / self.block_size] as usize * self.block_size + p % self.block_size;
                assert_eq!(self.slots[slot], Some((seq.tokens[p], p)), "sequence {} reads stale KV at position {p}", s.id);
            }
            for (k, &t) in s.tokens.iter().enumerate() {
                let p = chunk.start_pos + k;
                let block = chunk.block_table[p / self.block_size];
                for (other, o) in &sched.seqs {
                    assert!(*other == s.id || !o.table.blocks().contains(&block), "sequence {} writes block {block}, which {other} holds", s.id);
                }
                self.slots[block as usize * self.block_size + p % self.block_size] = Some((t, p));
            }
        }
    }
}

/// The token a fake model samples: a function of every token before it, so outputs do not
/// depend on what was cached.
fn fake_sample(tokens: &[u32]) -> u32 {
    let mut c = Vec::new();
    let padded: Vec<u32> = tokens.to_vec();
    HASHER.extend(&mut c, &padded, padded.len().max(1));
    (c[0] % 1000) as u32
}

/// Requests that start with one of `n_prefixes` shared beginnings of `prefix_len` tokens.
fn shared_prefix_requests(n: u64, n_prefixes: u64, prefix_len: usize, seed: u64) -> Vec<(SeqId, Vec<u32>, usize)> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|id| {
            let p = rng.next_u64() % n_prefixes;
            let mut prompt: Vec<u32> = (0..prefix_len).map(|i| (p * 1000 + i as u64) as u32 % 5000).collect();
            prompt.extend((0..1 + rng.next_u64() % 40).map(|k| 5000 + (id * 64 + k) as u32));
            (id, prompt, 1 + (rng.next_u64() % 30) as usize)
        })
        .collect()
}

/// Runs a pipeline of `m` micro-batches over a fake KV store; returns each request's tokens,
/// and the prompt tokens computed.
fn simulate_cached(sched: Scheduler, m: usize, requests: &[(SeqId, Vec<u32>, usize)], seed: u64) -> (HashMap<SeqId, Vec<u32>>, u64) {
    simulate_cached_failing(sched, m, requests, seed, 0)
}

/// As [`simulate_cached`], and every `fail_every`-th step (0: never) a stage is lost with the
/// steps in flight: everything running is re-queued and the fake KV store wiped.
fn simulate_cached_failing(mut sched: Scheduler, m: usize, requests: &[(SeqId, Vec<u32>, usize)], seed: u64, fail_every: u64) -> (HashMap<SeqId, Vec<u32>>, u64) {
    sched.set_micro_batches(m);
    let mut kv = FakeKv::new(sched.geometry());
    let mut rng = Rng::new(seed);
    let mut outputs: HashMap<SeqId, Vec<u32>> = HashMap::new();
    let mut pending: VecDeque<_> = requests.iter().cloned().collect();
    let mut flight: VecDeque<Step> = VecDeque::new();
    let mut computed = 0u64;
    let mut failures = 0u32;
    let mut rounds = 0u64;
    while !pending.is_empty() || sched.has_work() || !flight.is_empty() {
        rounds += 1;
        assert!(rounds < 1_000_000, "no progress");
        for _ in 0..(rng.next_u64() % 3) {
            if let Some((id, prompt, max)) = pending.pop_front() {
                sched.add(id, prompt, max, 0).unwrap();
            }
        }
        if flight.len() < m {
            if let Some(step) = sched.schedule(0) {
                kv.run(&sched, &step);
                computed += step.num_tokens() as u64;
                flight.push_back(step);
                continue;
            }
        }
        if fail_every > 0 && rounds.is_multiple_of(fail_every) && !flight.is_empty() {
            flight.clear();
            sched.requeue_all();
            assert_eq!(sched.cached_blocks(), 0, "a lost stage's KV was still offered");
            kv = FakeKv::new(sched.geometry());
            failures += 1;
            continue;
        }
        let Some(step) = flight.pop_front() else { continue };
        let sampled: Vec<(SeqId, u32)> = step
            .scheduled
            .iter()
            .filter(|s| s.samples)
            .map(|s| {
                let seq = &sched.seqs[&s.id];
                (s.id, fake_sample(&seq.tokens))
            })
            .collect();
        for &(id, t) in &sampled {
            outputs.entry(id).or_default().push(t);
        }
        sched.complete(&step, &sampled, &[]);
    }
    assert!(fail_every == 0 || failures > 2, "only {failures} failovers");
    assert_eq!(sched.free_blocks(), sched.total_blocks(), "blocks leaked (cached blocks count as free)");
    assert_eq!(sched.kv_usage(), 0.0);
    (outputs, computed)
}

/// Shared prefixes through pipelines of 1 to 4 micro-batches, with a cache roomy and tight
/// (preempting, evicting): with caching every sequence reads only KV of its own tokens, shared
/// blocks are never written, the outputs equal those without caching, and fewer tokens are
/// computed.
#[test]
fn prefix_caching_changes_no_output_and_computes_less() {
    for (seed, m, blocks) in [(1, 1, 200), (2, 2, 200), (3, 4, 200), (4, 1, 30), (5, 3, 30)] {
        let reqs = shared_prefix_requests(120, 3, 50, seed);
        let geometry = KvGeometry { block_size: 8, num_blocks: blocks };
        let (plain, plain_computed) = simulate_cached(Scheduler::new(config(), geometry), m, &reqs, seed);
        let mut sched = Scheduler::new(config(), geometry);
        sched.enable_prefix_caching(HASHER);
        let (cached, cached_computed) = simulate_cached(sched, m, &reqs, seed);
        assert_eq!(plain, cached, "seed {seed}, {m} micro-batches, {blocks} blocks");
        for (id, _, max) in &reqs {
            assert_eq!(cached[id].len(), *max, "request {id}");
        }
        assert!(cached_computed * 10 < plain_computed * 7, "seed {seed}: caching computed {cached_computed} of {plain_computed} tokens");
    }
}

/// Failover re-queues under caching: the cache is forgotten with the stages' KV, every
/// re-queued sequence is recomputed (reading nothing stale), caching resumes after, and the
/// outputs equal an uninterrupted run's.
#[test]
fn prefix_caching_survives_failover_requeues() {
    for (seed, m) in [(7, 1), (8, 3)] {
        let reqs = shared_prefix_requests(80, 2, 40, seed);
        let geometry = KvGeometry { block_size: 8, num_blocks: 120 };
        let (want, _) = simulate_cached(Scheduler::new(config(), geometry), m, &reqs, seed);
        let mut sched = Scheduler::new(config(), geometry);
        sched.enable_prefix_caching(HASHER);
        let (got, _) = simulate_cached_failing(sched, m, &reqs, seed, 37);
        assert_eq!(got, want, "seed {seed}, {m} micro-batches");
    }
}

#[test]
fn a_repeated_prompt_reuses_every_full_block_but_its_last_token() {
    let mut s = Scheduler::new(config(), KvGeometry { block_size: 16, num_blocks: 64 });
    s.enable_prefix_caching(HASHER);
    let prompt: Vec<u32> = (0..48).collect();
    s.add(1, prompt.clone(), 2, 0).unwrap();
    let step = s.schedule(0).unwrap();
    assert_eq!(step.cached, vec![(1, 0)]);
    s.complete(&step, &[(1, 7)], &[]);
    let step = s.schedule(0).unwrap();
    s.complete(&step, &[(1, 8)], &[]);
    assert!(!s.has_work());
    assert_eq!(s.cached_blocks(), 3);
    assert_eq!(s.kv_usage(), 0.0, "cached blocks count as free");
    // The same 48 tokens: two blocks come from the cache; the third holds the last token,
    // which is computed again to sample after it.
    s.add(2, prompt.clone(), 2, 0).unwrap();
    let step = s.schedule(0).unwrap();
    assert_eq!(step.cached, vec![(2, 32)]);
    assert_eq!(step.layout.chunks[0].start_pos, 32);
    assert_eq!(step.scheduled[0].tokens, (32..48).collect::<Vec<u32>>());
    s.complete(&step, &[(2, 7)], &[]);
    // One token more than a block boundary: all three blocks come from the cache.
    let mut longer = prompt.clone();
    longer.push(7);
    s.add(3, longer, 2, 0).unwrap();
    let step = s.schedule(0).unwrap();
    let hits: Vec<_> = step.cached.clone();
    assert_eq!(hits, vec![(3, 48)], "{:?}", step.scheduled);
    assert_eq!(s.prefix_cache_counts(), (48 + 48 + 49, 32 + 48));
    // A failover forgets every block not in use.
    s.requeue_all();
    assert_eq!(s.cached_blocks(), 0);
}
