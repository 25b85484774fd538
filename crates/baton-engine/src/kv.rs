//! The paged KV cache's bookkeeping: fixed-size blocks, a block table per sequence, and an
//! allocator that knows exactly how many more tokens fit. Pure logic: no memory is touched here;
//! the backend owns the K/V storage and the scheduler owns the allocator.

use crate::error::{EngineError, Result};

/// The size of a stage's paged cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvGeometry {
    pub block_size: usize,
    pub num_blocks: usize,
}

/// The share of a card's memory weights and KV may take.
pub const DEVICE_MEMORY_UTILIZATION: f64 = 0.9;
/// The most KV blocks a card's geometry has (a small model on a large card would otherwise
/// get hundreds of millions of token slots).
pub const MAX_DEVICE_BLOCKS: usize = 1 << 20;

impl KvGeometry {
    /// As many blocks as fit in `budget_bytes` for `layers` layers of f32 K and V.
    pub fn for_budget(budget_bytes: usize, layers: usize, kv_dim: usize, block_size: usize) -> Self {
        let per_block = (layers * 2 * block_size * kv_dim * 4).max(1);
        KvGeometry {
            block_size,
            num_blocks: budget_bytes / per_block,
        }
    }

    /// What a card's memory (`memory_bytes`) holds for layers `layers` of `config` once their
    /// weights (bf16) are in: 90% of it (vLLM's default `gpu_memory_utilization`) less the
    /// weights, as bf16 K and V; at most `MAX_DEVICE_BLOCKS` blocks. 0 blocks when the weights
    /// alone fill it.
    pub fn on_device(memory_bytes: u64, config: &crate::ModelConfig, layers: std::ops::Range<usize>, block_size: usize) -> Self {
        let weights = config.stage_param_count(layers.start, layers.end) as u64 * 2;
        let usable = (memory_bytes as f64 * DEVICE_MEMORY_UTILIZATION) as u64;
        let per_block = (layers.len() * 2 * block_size * config.kv_dim() * 2).max(1) as u64;
        let num_blocks = (usable.saturating_sub(weights) / per_block).min(MAX_DEVICE_BLOCKS as u64) as usize;
        KvGeometry { block_size, num_blocks }
    }

    pub fn bytes(&self, layers: usize, kv_dim: usize) -> usize {
        layers * 2 * self.num_blocks * self.block_size * kv_dim * 4
    }
}

/// The physical blocks holding one sequence's KV, in logical order, and how many tokens they hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockTable {
    blocks: Vec<u32>,
    tokens: usize,
}

impl BlockTable {
    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }

    /// Tokens whose slots are reserved.
    pub fn tokens(&self) -> usize {
        self.tokens
    }
}

/// Hands out and takes back KV blocks.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    block_size: usize,
    /// Free block ids; the lowest id is handed out first.
    free: Vec<u32>,
    in_use: Vec<bool>,
}

impl BlockAllocator {
    pub fn new(geometry: KvGeometry) -> Self {
        BlockAllocator {
            block_size: geometry.block_size.max(1),
            free: (0..geometry.num_blocks as u32).rev().collect(),
            in_use: vec![false; geometry.num_blocks],
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.in_use.len()
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Blocks `table` would need to grow by `new_tokens`.
    pub fn blocks_needed(&self, table: &BlockTable, new_tokens: usize) -> usize {
        (table.tokens + new_tokens)
            .div_ceil(self.block_size)
            .saturating_sub(table.blocks.len())
    }

    /// Whether `table` can grow by `new_tokens` right now.
    pub fn can_append(&self, table: &BlockTable, new_tokens: usize) -> bool {
        self.blocks_needed(table, new_tokens) <= self.free.len()
    }

    /// Reserves slots for `new_tokens` more tokens. On error nothing changes.
    pub fn append(&mut self, table: &mut BlockTable, new_tokens: usize) -> Result<()> {
        let needed = self.blocks_needed(table, new_tokens);
        if needed > self.free.len() {
            return Err(EngineError::KvCacheExhausted {
                needed,
                free: self.free.len(),
            });
        }
        for _ in 0..needed {
            if let Some(b) = self.free.pop() {
                self.in_use[b as usize] = true;
                table.blocks.push(b);
            }
        }
        table.tokens += new_tokens;
        Ok(())
    }

    /// Returns every block of `table` and leaves it empty.
    pub fn release(&mut self, table: &mut BlockTable) {
        for b in table.blocks.drain(..).rev() {
            let slot = &mut self.in_use[b as usize];
            debug_assert!(*slot, "block {b} released twice");
            if std::mem::replace(slot, false) {
                self.free.push(b);
            }
        }
        table.tokens = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn exact_token_accounting() {
        let mut a = BlockAllocator::new(KvGeometry { block_size: 4, num_blocks: 3 });
        let mut t = BlockTable::default();
        a.append(&mut t, 5).unwrap();
        assert_eq!(t.blocks().len(), 2);
        assert!(a.can_append(&t, 7)); // 12 tokens = 3 blocks
        assert!(!a.can_append(&t, 8));
        let before = (t.clone(), a.free_blocks());
        assert!(matches!(a.append(&mut t, 8), Err(EngineError::KvCacheExhausted { needed: 2, free: 1 })));
        assert_eq!((t.clone(), a.free_blocks()), before, "a failed append changes nothing");
        a.append(&mut t, 7).unwrap();
        assert_eq!(a.free_blocks(), 0);
        a.release(&mut t);
        assert_eq!(a.free_blocks(), 3);
        assert_eq!(t.tokens(), 0);
    }

    /// Random appends and releases over many sequences: no block is held twice, none leaks.
    #[test]
    fn random_workload_never_leaks_or_double_books() {
        let mut rng = Rng::new(42);
        let geometry = KvGeometry { block_size: 16, num_blocks: 64 };
        let mut a = BlockAllocator::new(geometry);
        let mut tables: Vec<BlockTable> = vec![BlockTable::default(); 10];
        for _ in 0..5000 {
            let i = (rng.next_u64() % 10) as usize;
            if rng.next_f32() < 0.1 {
                a.release(&mut tables[i]);
            } else {
                let n = 1 + (rng.next_u64() % 40) as usize;
                let fits = a.can_append(&tables[i], n);
                assert_eq!(a.append(&mut tables[i], n).is_ok(), fits);
            }
            let mut seen = vec![false; 64];
            for t in &tables {
                assert!(t.blocks().len() * 16 >= t.tokens());
                assert!(t.blocks().len() * 16 < t.tokens() + 16 || t.tokens() == 0 && t.blocks().is_empty());
                for &b in t.blocks() {
                    assert!(!std::mem::replace(&mut seen[b as usize], true), "block {b} held twice");
                }
            }
            let held: usize = tables.iter().map(|t| t.blocks().len()).sum();
            assert_eq!(held + a.free_blocks(), 64);
        }
        for t in &mut tables {
            a.release(t);
        }
        assert_eq!(a.free_blocks(), 64);
    }
}
