//! The CPU backend: f32 activations in `Vec`s, weights read in place from the memory map, a
//! private worker pool (`pool`) so a stage uses exactly the threads it was given.

pub mod attention;
#[cfg(target_arch = "x86_64")]
mod avx512;
pub mod isa;
pub mod matmul;
pub mod pool;

use super::{AttnShape, Backend, BatchLayout, MatmulJob};
use crate::checkpoint::TensorBytes;
use crate::error::{EngineError, Result};
use crate::rope::Rope;
pub use isa::{Compute, Isa, Kernels};
use matmul::WeightRef;
use pool::WorkerPool;

/// What a CPU backend on `threads` threads with `compute` arithmetic calls itself.
pub fn describe(threads: usize, compute: Compute) -> String {
    match compute {
        Compute::Exact => format!("cpu ({threads} threads)"),
        Compute::Bf16 => format!("cpu ({threads} threads, bf16 compute)"),
    }
}

thread_local! {
    /// Each thread's attention scores, kept between steps.
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs stage operations on `threads` CPU threads.
pub struct CpuBackend {
    pool: WorkerPool,
    threads: usize,
    kernels: Kernels,
}

impl CpuBackend {
    /// Exact arithmetic on the best kernels this CPU runs.
    pub fn new(threads: usize) -> Result<Self> {
        CpuBackend::with_compute(threads, Compute::Exact)
    }

    /// `compute` arithmetic; `Compute::Bf16` fails where the CPU lacks AVX512_BF16.
    pub fn with_compute(threads: usize, compute: Compute) -> Result<Self> {
        let kernels = Kernels::for_machine(compute)?;
        let threads = threads.max(1);
        let pool = WorkerPool::new(threads).map_err(|e| EngineError::BackendUnavailable(format!("cannot start CPU threads: {e}")))?;
        Ok(CpuBackend { pool, threads, kernels })
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    pub fn kernels(&self) -> Kernels {
        self.kernels
    }
}

/// A weight as stored: either borrowed from the checkpoint's mapping or (vectors) widened to f32.
pub enum CpuWeight {
    Mapped { tensor: TensorBytes, rows: usize, cols: usize },
    F32 { data: Vec<f32> },
}

impl CpuWeight {
    fn matrix(&self) -> Result<WeightRef<'_>> {
        match self {
            CpuWeight::Mapped { tensor, rows, cols } => Ok(WeightRef {
                dtype: tensor.dtype,
                bytes: tensor.bytes(),
                rows: *rows,
                cols: *cols,
            }),
            CpuWeight::F32 { .. } => Err(EngineError::BadBatch("a vector weight was used as a matrix".into())),
        }
    }

    fn vector(&self) -> Result<&[f32]> {
        match self {
            CpuWeight::F32 { data } => Ok(data),
            CpuWeight::Mapped { .. } => Err(EngineError::BadBatch("a matrix weight was used as a vector".into())),
        }
    }
}

/// One layer's paged K and V: `[num_blocks * block_size, kv_dim]` each.
pub struct CpuKvCache {
    k: Vec<f32>,
    v: Vec<f32>,
    kv_dim: usize,
}

/// Per-token positions, KV slots and rotary tables of one step.
pub struct CpuBatch {
    shape: AttnShape,
    /// For each token: its position and the index of its chunk.
    positions: Vec<usize>,
    chunk_of: Vec<usize>,
    slots: Vec<usize>,
    block_tables: Vec<Vec<u32>>,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

fn check_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(EngineError::BadBatch(format!("{what}: buffer holds {got} values, expected {want}")))
    }
}

impl Backend for CpuBackend {
    type Weight = CpuWeight;
    type Buffer = Vec<f32>;
    type KvCache = CpuKvCache;
    type Batch = CpuBatch;

    fn name(&self) -> String {
        describe(self.threads, self.kernels.compute)
    }

    fn weight(&self, tensor: &TensorBytes) -> Result<CpuWeight> {
        match tensor.shape.as_slice() {
            [rows, cols] => Ok(CpuWeight::Mapped {
                tensor: tensor.clone(),
                rows: *rows,
                cols: *cols,
            }),
            _ => Ok(CpuWeight::F32 { data: tensor.to_f32() }),
        }
    }

    fn zeros(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; len])
    }

    fn upload(&self, data: &[f32]) -> Result<Vec<f32>> {
        Ok(data.to_vec())
    }

    fn download(&self, buf: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(buf.clone())
    }

    fn kv_cache(&self, num_blocks: usize, block_size: usize, kv_dim: usize) -> Result<CpuKvCache> {
        let len = num_blocks
            .checked_mul(block_size)
            .and_then(|n| n.checked_mul(kv_dim))
            .ok_or_else(|| EngineError::BackendUnavailable("KV cache size overflows".into()))?;
        Ok(CpuKvCache {
            k: vec![0.0; len],
            v: vec![0.0; len],
            kv_dim,
        })
    }

    fn prepare_batch(&self, layout: &BatchLayout, rope: &Rope, shape: AttnShape) -> Result<CpuBatch> {
        let t = layout.num_tokens();
        let mut b = CpuBatch {
            shape,
            positions: Vec::with_capacity(t),
            chunk_of: Vec::with_capacity(t),
            slots: Vec::with_capacity(t),
            block_tables: Vec::with_capacity(layout.chunks.len()),
            cos: Vec::with_capacity(t * rope.inv_freq.len()),
            sin: Vec::with_capacity(t * rope.inv_freq.len()),
        };
        let bs = shape.block_size;
        for (ci, c) in layout.chunks.iter().enumerate() {
            for pos in c.start_pos..c.start_pos + c.len {
                b.positions.push(pos);
                b.chunk_of.push(ci);
                b.slots.push(c.block_table[pos / bs] as usize * bs + pos % bs);
                rope.push_position(pos, &mut b.cos, &mut b.sin);
            }
            b.block_tables.push(c.block_table.clone());
        }
        Ok(b)
    }

    fn embed(&self, table: &CpuWeight, tokens: &[u32], out: &mut Vec<f32>) -> Result<()> {
        let w = table.matrix()?;
        check_len("embed", out.len(), tokens.len() * w.cols)?;
        let rb = w.cols * w.dtype.size();
        for (i, &tok) in tokens.iter().enumerate() {
            let tok = tok as usize;
            if tok >= w.rows {
                return Err(EngineError::BadBatch(format!("token id {tok} is outside the vocabulary of {}", w.rows)));
            }
            matmul::widen_with(self.kernels.isa, w.dtype, &w.bytes[tok * rb..(tok + 1) * rb], &mut out[i * w.cols..(i + 1) * w.cols]);
        }
        Ok(())
    }

    fn matmul(&self, x: &Vec<f32>, rows: usize, w: &CpuWeight, bias: Option<&CpuWeight>, out: &mut Vec<f32>) -> Result<()> {
        let w = w.matrix()?;
        check_len("matmul input", x.len(), rows * w.cols)?;
        check_len("matmul output", out.len(), rows * w.rows)?;
        matmul::matmul(&self.pool, x, rows, w, out, self.kernels);
        if let Some(b) = bias {
            let b = b.vector()?;
            check_len("bias", b.len(), w.rows)?;
            for row in out.chunks_exact_mut(w.rows) {
                row.iter_mut().zip(b).for_each(|(o, b)| *o += b);
            }
        }
        Ok(())
    }

    fn matmul_many(&self, x: &Vec<f32>, rows: usize, jobs: &mut [MatmulJob<'_, Self>]) -> Result<()> {
        let mut work = Vec::with_capacity(jobs.len());
        for job in jobs.iter_mut() {
            let w = job.weight.matrix()?;
            check_len("matmul input", x.len(), rows * w.cols)?;
            check_len("matmul output", job.out.len(), rows * w.rows)?;
            work.push((w, job.out.as_mut_slice()));
        }
        matmul::matmul_many(&self.pool, x, rows, &mut work, self.kernels);
        for job in jobs.iter_mut() {
            if let Some(b) = job.bias {
                let b = b.vector()?;
                let n = job.out.len() / rows.max(1);
                check_len("bias", b.len(), n)?;
                for row in job.out.chunks_exact_mut(n) {
                    row.iter_mut().zip(b).for_each(|(o, b)| *o += b);
                }
            }
        }
        Ok(())
    }

    fn rms_norm(&self, x: &Vec<f32>, weight: &CpuWeight, eps: f32, out: &mut Vec<f32>) -> Result<()> {
        let w = weight.vector()?;
        let h = w.len();
        check_len("rms_norm", x.len() % h, 0)?;
        check_len("rms_norm output", out.len(), x.len())?;
        for (xr, or) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
            let ms = attention::dot(xr, xr) / h as f32;
            let inv = 1.0 / (ms + eps).sqrt();
            for ((o, xv), wv) in or.iter_mut().zip(xr).zip(w) {
                *o = wv * (xv * inv);
            }
        }
        Ok(())
    }

    fn add(&self, x: &mut Vec<f32>, y: &Vec<f32>) -> Result<()> {
        check_len("add", x.len(), y.len())?;
        x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
        Ok(())
    }

    fn silu_mul(&self, gate: &Vec<f32>, up: &Vec<f32>, out: &mut Vec<f32>) -> Result<()> {
        check_len("silu_mul", gate.len(), up.len())?;
        check_len("silu_mul output", out.len(), up.len())?;
        for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
            *o = g / (1.0 + (-g).exp()) * u;
        }
        Ok(())
    }

    fn rope(&self, batch: &CpuBatch, x: &mut Vec<f32>, heads: usize, head_dim: usize) -> Result<()> {
        let half = head_dim / 2;
        check_len("rope", x.len(), batch.positions.len() * heads * head_dim)?;
        for (t, row) in x.chunks_exact_mut(heads * head_dim).enumerate() {
            let cos = &batch.cos[t * half..(t + 1) * half];
            let sin = &batch.sin[t * half..(t + 1) * half];
            for head in row.chunks_exact_mut(head_dim) {
                let (a, b) = head.split_at_mut(half);
                for i in 0..half {
                    let (x1, x2) = (a[i], b[i]);
                    a[i] = x1 * cos[i] - x2 * sin[i];
                    b[i] = x2 * cos[i] + x1 * sin[i];
                }
            }
        }
        Ok(())
    }

    fn write_kv(&self, batch: &CpuBatch, cache: &mut CpuKvCache, k: &Vec<f32>, v: &Vec<f32>) -> Result<()> {
        let d = cache.kv_dim;
        check_len("write_kv k", k.len(), batch.slots.len() * d)?;
        check_len("write_kv v", v.len(), batch.slots.len() * d)?;
        for (t, &slot) in batch.slots.iter().enumerate() {
            cache.k[slot * d..(slot + 1) * d].copy_from_slice(&k[t * d..(t + 1) * d]);
            cache.v[slot * d..(slot + 1) * d].copy_from_slice(&v[t * d..(t + 1) * d]);
        }
        Ok(())
    }

    fn read_kv_blocks(&self, cache: &CpuKvCache, blocks: &[u32], block_size: usize) -> Result<Vec<f32>> {
        let ranges = super::kv_block_ranges(blocks, block_size * cache.kv_dim, cache.k.len())?;
        let mut out = Vec::with_capacity(2 * ranges.iter().map(|r| r.len()).sum::<usize>());
        for half in [&cache.k, &cache.v] {
            for r in &ranges {
                out.extend_from_slice(&half[r.clone()]);
            }
        }
        Ok(out)
    }

    fn write_kv_blocks(&self, cache: &mut CpuKvCache, blocks: &[u32], block_size: usize, data: &[f32]) -> Result<()> {
        let ranges = super::kv_block_ranges(blocks, block_size * cache.kv_dim, cache.k.len())?;
        let per_half: usize = ranges.iter().map(|r| r.len()).sum();
        check_len("write_kv_blocks", data.len(), 2 * per_half)?;
        let (k_data, v_data) = data.split_at(per_half);
        for (half, src) in [(&mut cache.k, k_data), (&mut cache.v, v_data)] {
            let mut at = 0;
            for r in &ranges {
                half[r.clone()].copy_from_slice(&src[at..at + r.len()]);
                at += r.len();
            }
        }
        Ok(())
    }

    fn attention(&self, batch: &CpuBatch, cache: &CpuKvCache, q: &Vec<f32>, out: &mut Vec<f32>) -> Result<()> {
        let s = batch.shape;
        let hd = s.head_dim;
        let group = s.num_heads / s.num_kv_heads;
        check_len("attention q", q.len(), batch.positions.len() * s.num_heads * hd)?;
        check_len("attention out", out.len(), q.len())?;
        let scale = 1.0 / (hd as f32).sqrt();
        let heads = out.len() / hd;
        let out_ptr = matmul::OutPtr(out.as_mut_ptr());
        // Enough tasks to balance; each a run of whole (token, head) rows of `out`.
        let per_task = heads.div_ceil(self.threads * 8).max(1);
        self.pool.for_each(heads.div_ceil(per_task), &|task| {
            SCORES.with_borrow_mut(|scores| {
                for i in task * per_task..((task + 1) * per_task).min(heads) {
                    let t = i / s.num_heads;
                    let h = i % s.num_heads;
                    let pos = batch.positions[t];
                    let head = attention::HeadTask {
                        q: &q[i * hd..(i + 1) * hd],
                        k_cache: &cache.k,
                        v_cache: &cache.v,
                        block_table: &batch.block_tables[batch.chunk_of[t]],
                        kv_offset: (h / group) * hd,
                        kv_dim: cache.kv_dim,
                        block_size: s.block_size,
                        lo: s.sliding_window.map_or(0, |w| (pos + 1).saturating_sub(w)),
                        pos,
                        scale,
                    };
                    // SAFETY: row i of `out` belongs to this task alone.
                    let o = unsafe { std::slice::from_raw_parts_mut(out_ptr.at(i * hd), hd) };
                    attention::attend(&head, scores, o);
                }
            })
        });
        Ok(())
    }

    fn gather_rows(&self, x: &Vec<f32>, width: usize, rows: &[usize], out: &mut Vec<f32>) -> Result<()> {
        check_len("gather_rows output", out.len(), rows.len() * width)?;
        for (i, &r) in rows.iter().enumerate() {
            if (r + 1) * width > x.len() {
                return Err(EngineError::BadBatch(format!("row {r} is outside the buffer")));
            }
            out[i * width..(i + 1) * width].copy_from_slice(&x[r * width..(r + 1) * width]);
        }
        Ok(())
    }
}
