//! Running whole requests on a full-model stage in this process: chunked prefill, then decode,
//! one sequence or a lock-step batch. Used by `baton generate`, the engine benchmark and tests;
//! the serving scheduler drives stages itself.

use std::time::{Duration, Instant};

use crate::backend::{Backend, BatchLayout, SeqChunk};
use crate::error::{EngineError, Result};
use crate::kv::{BlockAllocator, BlockTable};
use crate::sampling::{FinishReason, Sampled, SamplingParams, SequenceSampler};
use crate::stage::{Stage, StageInput, StageOutput};

/// The result of one request.
#[derive(Debug, Clone)]
pub struct Generation {
    pub prompt_token_ids: Vec<u32>,
    pub token_ids: Vec<u32>,
    pub sampled: Vec<Sampled>,
    pub finish_reason: FinishReason,
    /// From the start of prefill to the first sampled token.
    pub prefill_time: Duration,
    /// From the first sampled token to the last.
    pub decode_time: Duration,
}

impl Generation {
    pub fn prefill_tokens_per_s(&self) -> f64 {
        self.prompt_token_ids.len() as f64 / self.prefill_time.as_secs_f64().max(1e-9)
    }

    /// Tokens after the first, over the time they took.
    pub fn decode_tokens_per_s(&self) -> f64 {
        let n = self.token_ids.len().saturating_sub(1);
        if n == 0 {
            0.0
        } else {
            n as f64 / self.decode_time.as_secs_f64().max(1e-9)
        }
    }
}

/// Runs a stage that holds the whole model, with its own KV allocator.
pub struct LocalRunner<B: Backend> {
    pub stage: Stage<B>,
    pub allocator: BlockAllocator,
    /// Prompt tokens per prefill forward call.
    pub prefill_chunk: usize,
}

fn logits_of(out: StageOutput) -> Result<(usize, Vec<f32>)> {
    match out {
        StageOutput::Logits { vocab, data, .. } => Ok((vocab, data)),
        StageOutput::Hidden(_) => Err(EngineError::BadBatch("the stage does not end the model".into())),
    }
}

impl<B: Backend> LocalRunner<B> {
    pub fn new(stage: Stage<B>, prefill_chunk: usize) -> Result<Self> {
        if !stage.is_first() || !stage.is_last() {
            return Err(EngineError::BadBatch("a local runner needs a stage holding the whole model".into()));
        }
        let allocator = BlockAllocator::new(stage.kv_geometry());
        Ok(LocalRunner {
            stage,
            allocator,
            prefill_chunk: prefill_chunk.max(1),
        })
    }

    /// Generates for one prompt, calling `on_token` as each token is chosen. The sequence's KV
    /// blocks are returned to the allocator whatever happens.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        params: SamplingParams,
        eos_token_ids: &[u32],
        on_token: &mut dyn FnMut(&Sampled),
    ) -> Result<Generation> {
        let mut table = BlockTable::default();
        let result = self.generate_in(&mut table, prompt, params, eos_token_ids, on_token);
        self.allocator.release(&mut table);
        result
    }

    fn check_prompt(&self, prompt: &[u32], params: &SamplingParams) -> Result<()> {
        params.validate().map_err(EngineError::BadBatch)?;
        if prompt.is_empty() {
            return Err(EngineError::BadBatch("the prompt is empty".into()));
        }
        let max = self.stage.config().max_position_embeddings;
        if prompt.len() + params.max_tokens > max {
            return Err(EngineError::BadBatch(format!(
                "prompt ({} tokens) plus max_tokens ({}) exceeds the context of {max}",
                prompt.len(),
                params.max_tokens
            )));
        }
        Ok(())
    }

    fn generate_in(
        &mut self,
        table: &mut BlockTable,
        prompt: &[u32],
        params: SamplingParams,
        eos: &[u32],
        on_token: &mut dyn FnMut(&Sampled),
    ) -> Result<Generation> {
        self.check_prompt(prompt, &params)?;
        let mut sampler = SequenceSampler::new(params, eos, prompt);
        let start = Instant::now();
        let mut logits = Vec::new();
        let mut pos = 0;
        while pos < prompt.len() {
            let len = self.prefill_chunk.min(prompt.len() - pos);
            self.allocator.append(table, len)?;
            let layout = BatchLayout {
                chunks: vec![SeqChunk {
                    start_pos: pos,
                    len,
                    block_table: table.blocks().to_vec(),
                    wants_logits: pos + len == prompt.len(),
                }],
            };
            let out = self.stage.forward(&layout, StageInput::Tokens(&prompt[pos..pos + len]))?;
            logits = logits_of(out)?.1;
            pos += len;
        }
        let mut sampled = vec![sampler.sample(&logits)];
        on_token(&sampled[0]);
        let prefill_time = start.elapsed();
        let decode_start = Instant::now();
        let mut finish = sampler.finish_reason(sampled[0].token);
        while finish.is_none() {
            let last = sampled.last().map_or(0, |s| s.token);
            self.allocator.append(table, 1)?;
            let layout = BatchLayout {
                chunks: vec![SeqChunk {
                    start_pos: pos,
                    len: 1,
                    block_table: table.blocks().to_vec(),
                    wants_logits: true,
                }],
            };
            let (_, logits) = logits_of(self.stage.forward(&layout, StageInput::Tokens(&[last]))?)?;
            pos += 1;
            let s = sampler.sample(&logits);
            on_token(&s);
            finish = sampler.finish_reason(s.token);
            sampled.push(s);
        }
        Ok(Generation {
            prompt_token_ids: prompt.to_vec(),
            token_ids: sampled.iter().map(|s| s.token).collect(),
            sampled,
            finish_reason: finish.unwrap_or(FinishReason::Length),
            prefill_time,
            decode_time: decode_start.elapsed(),
        })
    }

    /// Prefills `prompts` one by one, then decodes all of them together in one batch per step
    /// for `steps` steps, ignoring end-of-sequence (a throughput measurement). Returns the time
    /// of the prefill phase and of the decode phase.
    pub fn lockstep_batch(&mut self, prompts: &[Vec<u32>], steps: usize) -> Result<(Duration, Duration)> {
        let mut tables = vec![BlockTable::default(); prompts.len()];
        let result = self.lockstep_in(&mut tables, prompts, steps);
        for t in &mut tables {
            self.allocator.release(t);
        }
        result
    }

    fn lockstep_in(&mut self, tables: &mut [BlockTable], prompts: &[Vec<u32>], steps: usize) -> Result<(Duration, Duration)> {
        let params = SamplingParams::greedy(steps + 1);
        let mut last = Vec::with_capacity(prompts.len());
        let start = Instant::now();
        for (prompt, table) in prompts.iter().zip(tables.iter_mut()) {
            self.check_prompt(prompt, &params)?;
            self.allocator.append(table, prompt.len())?;
            let layout = BatchLayout {
                chunks: vec![SeqChunk {
                    start_pos: 0,
                    len: prompt.len(),
                    block_table: table.blocks().to_vec(),
                    wants_logits: true,
                }],
            };
            let (_, logits) = logits_of(self.stage.forward(&layout, StageInput::Tokens(prompt))?)?;
            last.push(crate::sampling::argmax(&logits));
        }
        let prefill = start.elapsed();
        let start = Instant::now();
        for step in 0..steps {
            let mut chunks = Vec::with_capacity(prompts.len());
            for (prompt, table) in prompts.iter().zip(tables.iter_mut()) {
                self.allocator.append(table, 1)?;
                chunks.push(SeqChunk {
                    start_pos: prompt.len() + step,
                    len: 1,
                    block_table: table.blocks().to_vec(),
                    wants_logits: true,
                });
            }
            let (vocab, logits) = logits_of(self.stage.forward(&BatchLayout { chunks }, StageInput::Tokens(&last))?)?;
            for (i, row) in logits.chunks_exact(vocab).enumerate() {
                last[i] = crate::sampling::argmax(row);
            }
        }
        Ok((prefill, start.elapsed()))
    }
}
