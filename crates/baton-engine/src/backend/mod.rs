//! The backend boundary: the handful of operations a pipeline stage needs from a device.
//!
//! A stage (crate::stage) is written once against [`Backend`]; the CPU backend implements it here
//! and the CUDA backend implements the same trait with its own buffers and kernels. Activations
//! are f32 on every backend; weights stay in their stored dtype (f32, f16, bf16) and are widened
//! inside the kernels, accumulating in f32.

pub mod cpu;
pub mod mock;

use crate::checkpoint::TensorBytes;
use crate::error::{EngineError, Result};
use crate::rope::Rope;

/// One sequence's share of a ragged batch: `len` new tokens at positions
/// `start_pos..start_pos + len`, whose KV lives in the blocks of `block_table`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqChunk {
    pub start_pos: usize,
    pub len: usize,
    /// Physical KV block ids, in logical order; must cover `start_pos + len` tokens.
    pub block_table: Vec<u32>,
    /// Whether the last stage should produce logits for this chunk's last token.
    pub wants_logits: bool,
}

/// The shape of one forward call: many sequences, each a prefill chunk or a single decode token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchLayout {
    pub chunks: Vec<SeqChunk>,
}

impl BatchLayout {
    pub fn num_tokens(&self) -> usize {
        self.chunks.iter().map(|c| c.len).sum()
    }

    /// Rows (token indices in the batch) whose logits are wanted, in chunk order.
    pub fn logit_rows(&self) -> Vec<usize> {
        let mut rows = Vec::new();
        let mut offset = 0;
        for c in &self.chunks {
            offset += c.len;
            if c.wants_logits {
                rows.push(offset - 1);
            }
        }
        rows
    }

    /// Checks the layout against the cache geometry before anything is written.
    pub fn validate(&self, block_size: usize, num_blocks: usize, max_positions: usize) -> Result<()> {
        if self.chunks.is_empty() {
            return Err(EngineError::BadBatch("empty batch".into()));
        }
        for (i, c) in self.chunks.iter().enumerate() {
            if c.len == 0 {
                return Err(EngineError::BadBatch(format!("chunk {i} has no tokens")));
            }
            let end = c.start_pos + c.len;
            if end > max_positions {
                return Err(EngineError::BadBatch(format!(
                    "chunk {i} reaches position {end}, beyond the model's {max_positions}"
                )));
            }
            if c.block_table.len() * block_size < end {
                return Err(EngineError::BadBatch(format!(
                    "chunk {i} needs {} blocks for {end} tokens, has {}",
                    end.div_ceil(block_size),
                    c.block_table.len()
                )));
            }
            if let Some(b) = c.block_table.iter().find(|&&b| b as usize >= num_blocks) {
                return Err(EngineError::BadBatch(format!("chunk {i} names block {b}, cache has {num_blocks}")));
            }
        }
        Ok(())
    }
}

/// Geometry of one layer's attention, as the kernels see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub sliding_window: Option<usize>,
}

/// One product of a [`Backend::matmul_many`] call.
pub struct MatmulJob<'a, B: Backend + ?Sized> {
    pub weight: &'a B::Weight,
    pub bias: Option<&'a B::Weight>,
    pub out: &'a mut B::Buffer,
}

/// What a pipeline stage needs from a device. All buffers are f32; weights keep their dtype.
pub trait Backend: Send + Sync + 'static {
    /// A weight matrix `[rows, cols]` or vector, resident on the device.
    type Weight: Send + Sync;
    /// A buffer of f32 activations on the device.
    type Buffer: Send + Sync;
    /// One layer's paged K and V memory.
    type KvCache: Send + Sync;
    /// One step's batch layout, prepared for the device (positions, KV slots, rotary tables).
    type Batch: Send + Sync;

    fn name(&self) -> String;

    /// Runs one whole forward step in the backend's execution context (the CPU backend's thread
    /// pool, so the step's many parallel kernels do not each pay a cross-thread hand-off).
    fn run_step<R: Send>(&self, step: impl FnOnce() -> R + Send) -> R {
        step()
    }

    /// Waits until the work launched so far has run (a backend that launches asynchronously,
    /// such as CUDA); the CPU backend runs synchronously. The stage calls it before it stops
    /// the clock on its layers, so the measured speed the planner weighs is the device's.
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    /// Whether it needs the weights' bytes (a mock device models only their size).
    fn reads_weights(&self) -> bool {
        true
    }

    /// The device memory weights and KV share, where the device has a fixed amount (a GPU);
    /// `None` on the host.
    fn memory_bytes(&self) -> Option<u64> {
        None
    }

    fn weight(&self, tensor: &TensorBytes) -> Result<Self::Weight>;
    fn zeros(&self, len: usize) -> Result<Self::Buffer>;
    fn upload(&self, data: &[f32]) -> Result<Self::Buffer>;
    fn download(&self, buf: &Self::Buffer) -> Result<Vec<f32>>;
    fn kv_cache(&self, num_blocks: usize, block_size: usize, kv_dim: usize) -> Result<Self::KvCache>;
    fn prepare_batch(&self, layout: &BatchLayout, rope: &Rope, attn: AttnShape) -> Result<Self::Batch>;

    /// `out[i] = table[tokens[i]]`, widened to f32.
    fn embed(&self, table: &Self::Weight, tokens: &[u32], out: &mut Self::Buffer) -> Result<()>;
    /// `out[rows, n] = x[rows, k] · wᵀ (+ bias)`, where `w` is `[n, k]`.
    fn matmul(&self, x: &Self::Buffer, rows: usize, w: &Self::Weight, bias: Option<&Self::Weight>, out: &mut Self::Buffer) -> Result<()>;
    /// Several products of the same input; backends may run them as one parallel pass.
    fn matmul_many(&self, x: &Self::Buffer, rows: usize, jobs: &mut [MatmulJob<'_, Self>]) -> Result<()> {
        for job in jobs.iter_mut() {
            self.matmul(x, rows, job.weight, job.bias, job.out)?;
        }
        Ok(())
    }
    /// Row-wise RMS normalisation scaled by `weight`.
    fn rms_norm(&self, x: &Self::Buffer, weight: &Self::Weight, eps: f32, out: &mut Self::Buffer) -> Result<()>;
    /// `x += y`.
    fn add(&self, x: &mut Self::Buffer, y: &Self::Buffer) -> Result<()>;
    /// `out = silu(gate) * up`.
    fn silu_mul(&self, gate: &Self::Buffer, up: &Self::Buffer, out: &mut Self::Buffer) -> Result<()>;
    /// Rotates `x` (`[tokens, heads * head_dim]`) in place by each token's position.
    fn rope(&self, batch: &Self::Batch, x: &mut Self::Buffer, heads: usize, head_dim: usize) -> Result<()>;
    /// Stores each token's K and V at its slot in the paged cache.
    fn write_kv(&self, batch: &Self::Batch, cache: &mut Self::KvCache, k: &Self::Buffer, v: &Self::Buffer) -> Result<()>;
    /// Causal attention of each token's queries over its sequence's cached keys and values.
    fn attention(&self, batch: &Self::Batch, cache: &Self::KvCache, q: &Self::Buffer, out: &mut Self::Buffer) -> Result<()>;
    /// `out[i] = x[rows[i]]` for rows of `width` values.
    fn gather_rows(&self, x: &Self::Buffer, width: usize, rows: &[usize], out: &mut Self::Buffer) -> Result<()>;
    /// The K then the V contents of `blocks` (each `block_size` tokens of `kv_dim` values), in
    /// that order: what a planned plan change moves to a layer's new owner.
    fn read_kv_blocks(&self, cache: &Self::KvCache, blocks: &[u32], block_size: usize) -> Result<Vec<f32>>;
    /// The inverse of [`Backend::read_kv_blocks`]: writes `data` into `blocks`.
    fn write_kv_blocks(&self, cache: &mut Self::KvCache, blocks: &[u32], block_size: usize, data: &[f32]) -> Result<()>;
}

/// The value ranges of `blocks` in a paged cache of `len` values (`block` values each), or an
/// error naming the first block outside it.
pub fn kv_block_ranges(blocks: &[u32], block: usize, len: usize) -> Result<Vec<std::ops::Range<usize>>> {
    blocks
        .iter()
        .map(|&b| {
            let start = b as usize * block;
            (start + block <= len)
                .then_some(start..start + block)
                .ok_or_else(|| crate::EngineError::BadBatch(format!("KV block {b} is outside the cache ({} blocks)", len / block.max(1))))
        })
        .collect()
}
