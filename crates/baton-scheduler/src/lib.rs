//! Continuous batching over a paged KV cache as a pure state machine: requests and step results
//! in, batches out; no I/O, no clock (times are passed in), no threads. The scheduler actor and
//! the pipeline head are thin shells around [`Scheduler`].
//!
//! Policy (vLLM V1's): first come, first served. Every step first gives each running sequence
//! what it needs (one decode token, or its next prefill chunk) under a token budget, then admits
//! waiting sequences while the budget, the sequence cap and the KV blocks allow. When blocks run
//! out for a running sequence, the most recently admitted one is preempted: its blocks are freed
//! and it goes back to the front of the queue, to be recomputed from its prompt and the tokens it
//! already produced (nothing it sent is lost or resent).
//!
//! A pipeline of N stages keeps several steps (micro-batches) in flight. With
//! [`Scheduler::set_micro_batches`] each step takes at most its share of the sequences there are
//! (running and waiting, up to the sequence cap, divided by the micro-batch count), so the steps
//! in flight are of equal size and keep every stage equally busy; without it the first step
//! would take every sequence and leave the others empty.
//!
//! With prefix caching ([`Scheduler::enable_prefix_caching`]) a sequence admitted from the
//! queue first takes the cached blocks holding the longest prefix of its tokens (full blocks
//! only, and never its last token, which must be computed to sample) and computes only the
//! rest; each full block is offered to the cache once the step that computed it completes.
//! The head chooses block ids for every stage, so a cached block's KV is valid on all of them.

use std::collections::{HashMap, HashSet, VecDeque};

use baton_engine::{BatchLayout, BlockAllocator, BlockHash, BlockTable, KvGeometry, PrefixHasher, SeqChunk};

pub type SeqId = u64;

/// Limits of one scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Sequences running at once.
    pub max_num_seqs: usize,
    /// Tokens (prefill and decode together) per step.
    pub max_batched_tokens: usize,
    /// Sequences allowed to wait; beyond it new requests are refused (HTTP 429).
    pub max_waiting: usize,
    /// The model's context length: prompt plus output may not exceed it.
    pub max_model_len: usize,
}

/// Why a request was not accepted. The scheduler is unchanged in every case.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmitError {
    #[error("the request queue is full ({0} waiting)")]
    QueueFull(usize),
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("prompt ({prompt} tokens) plus max_tokens ({max_tokens}) exceeds the context length of {max_model_len}")]
    TooLong {
        prompt: usize,
        max_tokens: usize,
        max_model_len: usize,
    },
    #[error("the request needs {needed} KV blocks, the cache has {total}")]
    NeverFits { needed: usize, total: usize },
    #[error("the request already produced {produced} of its {max_tokens} tokens")]
    NothingLeft { produced: usize, max_tokens: usize },
    #[error("sequence id {0} is already in use")]
    DuplicateId(SeqId),
}

#[derive(Debug)]
struct Sequence {
    /// Prompt followed by every token produced so far.
    tokens: Vec<u32>,
    prompt_len: usize,
    max_tokens: usize,
    /// Tokens whose K/V are in the cache.
    computed: usize,
    table: BlockTable,
    /// The hash chain of `tokens`' full blocks, as far as it was needed (prefix caching).
    hashes: Vec<BlockHash>,
    arrived_us: u64,
    first_scheduled_us: Option<u64>,
}

impl Sequence {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}

/// One sequence's share of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scheduled {
    pub id: SeqId,
    /// Token ids to feed (a prefill chunk, or the last sampled token).
    pub tokens: Vec<u32>,
    /// Whether this chunk ends at the sequence's last token, so a token is sampled after it.
    pub samples: bool,
}

/// What to run next.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub scheduled: Vec<Scheduled>,
    /// The batch to hand the first stage (same order as `scheduled`).
    pub layout: BatchLayout,
    /// Sequences sent back to the queue this step (their KV was freed).
    pub preempted: Vec<SeqId>,
    /// Sequences scheduled for the first time, with how long they waited (µs).
    pub started: Vec<(SeqId, u64)>,
    /// Sequences admitted from the queue this step with the tokens the prefix cache supplied
    /// (0 on a miss; only when prefix caching is on).
    pub cached: Vec<(SeqId, usize)>,
}

impl Step {
    pub fn num_tokens(&self) -> usize {
        self.layout.num_tokens()
    }

    /// All token ids of the step, in batch order.
    pub fn tokens(&self) -> Vec<u32> {
        self.scheduled.iter().flat_map(|s| s.tokens.iter().copied()).collect()
    }
}

/// The continuous-batching state machine.
#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    allocator: BlockAllocator,
    seqs: HashMap<SeqId, Sequence>,
    waiting: VecDeque<SeqId>,
    /// In admission order: preemption takes from the back.
    running: Vec<SeqId>,
    /// Sequences in a step that has not completed yet (pipelines keep several steps in flight);
    /// they are neither scheduled again nor preempted until it completes.
    in_flight: HashSet<SeqId>,
    preemptions: u64,
    /// Steps a pipeline keeps in flight; each takes at most 1/`micro_batches` of the sequences.
    micro_batches: usize,
    /// Set when prefix caching is on.
    hasher: Option<PrefixHasher>,
    /// Tokens looked up in the prefix cache, and those it supplied.
    prefix_queries: u64,
    prefix_hits: u64,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig, geometry: KvGeometry) -> Self {
        Scheduler {
            config,
            allocator: BlockAllocator::new(geometry),
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            in_flight: HashSet::new(),
            preemptions: 0,
            micro_batches: 1,
            hasher: None,
            prefix_queries: 0,
            prefix_hits: 0,
        }
    }

    /// Turns automatic prefix caching on, with `hasher` naming blocks. Call before any request
    /// is added (the block allocator starts afresh).
    pub fn enable_prefix_caching(&mut self, hasher: PrefixHasher) {
        debug_assert!(self.seqs.is_empty(), "prefix caching turned on with requests queued");
        self.allocator = BlockAllocator::with_prefix_caching(self.geometry());
        self.hasher = Some(hasher);
    }

    pub fn prefix_caching(&self) -> bool {
        self.hasher.is_some()
    }

    /// Prompt tokens looked up in the prefix cache, and those it supplied (vLLM's
    /// `prefix_cache_queries` and `prefix_cache_hits`).
    pub fn prefix_cache_counts(&self) -> (u64, u64) {
        (self.prefix_queries, self.prefix_hits)
    }

    /// Blocks whose KV the prefix cache can hand out again.
    pub fn cached_blocks(&self) -> usize {
        self.allocator.cached_blocks()
    }

    /// Forgets every cached block no sequence holds: the caller's KV for them is gone (a new
    /// device) or was not carried over (a planned change moves the blocks in use only).
    pub fn forget_cached(&mut self) {
        self.allocator.forget_unreferenced();
    }

    /// How many steps the caller keeps in flight (a pipeline's micro-batches; 1, the default,
    /// for one stage). Each step then takes at most ceil(sequences / `n`) sequences, sequences
    /// being those running and waiting, up to `max_num_seqs`.
    pub fn set_micro_batches(&mut self, n: usize) {
        self.micro_batches = n.max(1);
    }

    /// The most sequences one step may take now.
    fn step_share(&self) -> usize {
        if self.micro_batches == 1 {
            return usize::MAX;
        }
        let pool = (self.running.len() + self.waiting.len()).min(self.config.max_num_seqs);
        pool.div_ceil(self.micro_batches).max(1)
    }

    pub fn config(&self) -> SchedulerConfig {
        self.config
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Fraction of KV blocks in use.
    pub fn kv_usage(&self) -> f64 {
        let total = self.allocator.num_blocks();
        if total == 0 {
            0.0
        } else {
            (total - self.allocator.free_blocks()) as f64 / total as f64
        }
    }

    pub fn free_blocks(&self) -> usize {
        self.allocator.free_blocks()
    }

    pub fn total_blocks(&self) -> usize {
        self.allocator.num_blocks()
    }

    /// The KV cache shape this scheduler hands out blocks of.
    pub fn geometry(&self) -> KvGeometry {
        KvGeometry {
            block_size: self.allocator.block_size(),
            num_blocks: self.allocator.num_blocks(),
        }
    }

    pub fn preemptions(&self) -> u64 {
        self.preemptions
    }

    /// Queues a request.
    pub fn add(&mut self, id: SeqId, prompt: Vec<u32>, max_tokens: usize, now_us: u64) -> Result<(), AdmitError> {
        self.add_resumed(id, prompt, Vec::new(), max_tokens, now_us)
    }

    /// Queues a request that another pipeline head started: `produced` are the tokens it
    /// already generated (and the client already has), computed again with the prompt before
    /// generation goes on; `max_tokens` counts them.
    pub fn add_resumed(&mut self, id: SeqId, prompt: Vec<u32>, produced: Vec<u32>, max_tokens: usize, now_us: u64) -> Result<(), AdmitError> {
        if produced.len() >= max_tokens && !produced.is_empty() {
            return Err(AdmitError::NothingLeft { produced: produced.len(), max_tokens });
        }
        if self.seqs.contains_key(&id) {
            return Err(AdmitError::DuplicateId(id));
        }
        if prompt.is_empty() {
            return Err(AdmitError::EmptyPrompt);
        }
        if prompt.len() + max_tokens > self.config.max_model_len {
            return Err(AdmitError::TooLong {
                prompt: prompt.len(),
                max_tokens,
                max_model_len: self.config.max_model_len,
            });
        }
        // The last sampled token never needs a KV slot.
        let needed = (prompt.len() + max_tokens - 1).div_ceil(self.allocator.block_size());
        if needed > self.allocator.num_blocks() {
            return Err(AdmitError::NeverFits {
                needed,
                total: self.allocator.num_blocks(),
            });
        }
        if self.waiting.len() >= self.config.max_waiting {
            return Err(AdmitError::QueueFull(self.waiting.len()));
        }
        let prompt_len = prompt.len();
        let mut tokens = prompt;
        tokens.extend(produced);
        self.seqs.insert(
            id,
            Sequence {
                prompt_len,
                tokens,
                max_tokens,
                computed: 0,
                table: BlockTable::default(),
                hashes: Vec::new(),
                arrived_us: now_us,
                first_scheduled_us: None,
            },
        );
        self.waiting.push_back(id);
        Ok(())
    }

    /// Removes a request wherever it is and frees its blocks. Returns whether it existed.
    pub fn abort(&mut self, id: SeqId) -> bool {
        let Some(mut seq) = self.seqs.remove(&id) else {
            return false;
        };
        self.allocator.release(&mut seq.table);
        self.waiting.retain(|&w| w != id);
        self.running.retain(|&r| r != id);
        self.in_flight.remove(&id);
        true
    }

    /// Sends every running sequence back to the front of the queue (oldest first) with its KV
    /// freed, to be recomputed from its prompt and the tokens it produced: what a pipeline does
    /// when a stage is lost or the plan changes (the stages' caches are gone or re-laid). Steps
    /// in flight are forgotten; their results must not be completed. Returns the sequences moved.
    pub fn requeue_all(&mut self) -> Vec<SeqId> {
        let moved = std::mem::take(&mut self.running);
        for id in moved.iter().rev() {
            if let Some(seq) = self.seqs.get_mut(id) {
                self.allocator.release(&mut seq.table);
                seq.computed = 0;
            }
            self.waiting.push_front(*id);
        }
        self.in_flight.clear();
        self.allocator.forget_unreferenced();
        moved
    }

    /// The KV blocks of every running sequence, each once (what a planned plan change moves).
    pub fn blocks_in_use(&self) -> Vec<u32> {
        let mut blocks: Vec<u32> = self.running.iter().filter_map(|id| self.seqs.get(id)).flat_map(|s| s.table.blocks().iter().copied()).collect();
        blocks.sort_unstable();
        blocks.dedup();
        blocks
    }

    /// The tokens `id` produced so far.
    pub fn generated(&self, id: SeqId) -> Option<&[u32]> {
        self.seqs.get(&id).map(|s| &s.tokens[s.prompt_len..])
    }

    fn preempt_last(&mut self, preempted: &mut Vec<SeqId>) -> Option<SeqId> {
        let at = self.running.iter().rposition(|id| !self.in_flight.contains(id))?;
        let victim = self.running.remove(at);
        if let Some(seq) = self.seqs.get_mut(&victim) {
            self.allocator.release(&mut seq.table);
            seq.computed = 0;
        }
        self.waiting.push_front(victim);
        preempted.push(victim);
        self.preemptions += 1;
        Some(victim)
    }

    /// Chooses the next batch; `None` when nothing can run.
    pub fn schedule(&mut self, now_us: u64) -> Option<Step> {
        let mut budget = self.config.max_batched_tokens;
        let share = self.step_share();
        let mut picked: Vec<(SeqId, usize)> = Vec::new();
        let mut preempted = Vec::new();
        let mut cached = Vec::new();

        // Running sequences first, oldest first (those in flight are skipped, so consecutive
        // micro-batches take consecutive shares).
        let mut i = 0;
        while i < self.running.len() && budget > 0 && picked.len() < share {
            let id = self.running[i];
            let Some(seq) = self.seqs.get(&id) else {
                self.running.remove(i);
                continue;
            };
            let len = (seq.tokens.len() - seq.computed).min(budget);
            if len == 0 || self.in_flight.contains(&id) {
                i += 1;
                continue;
            }
            loop {
                let seq = &self.seqs[&id];
                if self.allocator.can_append(&seq.table, len) {
                    break;
                }
                // Free the youngest running sequence (possibly this one).
                match self.preempt_last(&mut preempted) {
                    Some(v) if v != id => {}
                    _ => break,
                }
            }
            if !self.running.contains(&id) {
                break;
            }
            if let Some(seq) = self.seqs.get_mut(&id) {
                if self.allocator.append(&mut seq.table, len).is_err() {
                    // Every other sequence is in flight: wait for them to complete.
                    break;
                }
                picked.push((id, len));
                budget -= len;
            }
            i += 1;
        }

        // Then admit waiting sequences in order, while everything fits.
        while budget > 0 && picked.len() < share && self.running.len() < self.config.max_num_seqs && preempted.is_empty() {
            let Some(&id) = self.waiting.front() else { break };
            let Some(seq) = self.seqs.get_mut(&id) else {
                self.waiting.pop_front();
                continue;
            };
            // A queued sequence holds no blocks (it is new, or was preempted or re-queued).
            let block_size = self.allocator.block_size();
            let hit = match &self.hasher {
                Some(hasher) if seq.table.blocks().is_empty() => {
                    hasher.extend(&mut seq.hashes, &seq.tokens, block_size);
                    // Never the last token: it is computed again, to sample after it.
                    let usable = ((seq.tokens.len() - 1) / block_size).min(seq.hashes.len());
                    self.allocator.cached_prefix(&seq.hashes[..usable])
                }
                _ => Vec::new(),
            };
            let reused = hit.len() * block_size;
            let len = (seq.tokens.len() - reused).min(budget);
            if !self.allocator.can_share(&hit, len) {
                break;
            }
            self.allocator.share(&mut seq.table, &hit);
            seq.computed = reused;
            if self.allocator.append(&mut seq.table, len).is_err() {
                self.allocator.release(&mut seq.table);
                seq.computed = 0;
                break;
            }
            if self.hasher.is_some() {
                self.prefix_queries += seq.tokens.len() as u64;
                self.prefix_hits += reused as u64;
                cached.push((id, reused));
            }
            self.waiting.pop_front();
            self.running.push(id);
            picked.push((id, len));
            budget -= len;
        }

        if picked.is_empty() {
            return None;
        }
        let mut step = Step {
            scheduled: Vec::with_capacity(picked.len()),
            layout: BatchLayout { chunks: Vec::with_capacity(picked.len()) },
            preempted,
            started: Vec::new(),
            cached,
        };
        for (id, len) in picked {
            let Some(seq) = self.seqs.get_mut(&id) else { continue };
            self.in_flight.insert(id);
            if seq.first_scheduled_us.is_none() {
                seq.first_scheduled_us = Some(now_us);
                step.started.push((id, now_us.saturating_sub(seq.arrived_us)));
            }
            let samples = seq.computed + len == seq.tokens.len();
            step.layout.chunks.push(SeqChunk {
                start_pos: seq.computed,
                len,
                block_table: seq.table.blocks().to_vec(),
                wants_logits: samples,
            });
            step.scheduled.push(Scheduled {
                id,
                tokens: seq.tokens[seq.computed..seq.computed + len].to_vec(),
                samples,
            });
        }
        Some(step)
    }

    /// Records a finished step: every scheduled chunk is now in the cache, and `sampled` holds
    /// the token chosen for each sequence that sampled (in any order). Sequences in `finished`
    /// (stopped by a stop token, or aborted during the step) are removed and their blocks freed;
    /// a sequence reaching its `max_tokens` is removed too. Returns the removed ids.
    pub fn complete(&mut self, step: &Step, sampled: &[(SeqId, u32)], finished: &[SeqId]) -> Vec<SeqId> {
        for s in &step.scheduled {
            self.in_flight.remove(&s.id);
            if let Some(seq) = self.seqs.get_mut(&s.id) {
                seq.computed = (seq.computed + s.tokens.len()).min(seq.tokens.len());
                if let Some(hasher) = &self.hasher {
                    // The full blocks computed so far may serve later sequences.
                    let block_size = self.allocator.block_size();
                    hasher.extend(&mut seq.hashes, &seq.tokens[..seq.computed], block_size);
                    let full = (seq.computed / block_size).min(seq.hashes.len());
                    self.allocator.commit(&mut seq.table, &seq.hashes[..full]);
                }
            }
        }
        for &(id, token) in sampled {
            if let Some(seq) = self.seqs.get_mut(&id) {
                seq.tokens.push(token);
            }
        }
        let mut removed = Vec::new();
        let done: Vec<SeqId> = self
            .running
            .iter()
            .copied()
            .filter(|id| finished.contains(id) || self.seqs.get(id).is_some_and(|s| s.generated() >= s.max_tokens))
            .collect();
        for id in done.into_iter().chain(finished.iter().copied()) {
            if self.abort(id) {
                removed.push(id);
            }
        }
        removed
    }
}

#[cfg(test)]
mod tests;
