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
    /// Leading blocks already offered to the prefix cache ([`BlockAllocator::commit`]).
    committed: usize,
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

/// A full block's identity in the prefix cache: a keyed 128-bit hash of its tokens and of
/// every token before it (the hash of the block before it is part of its input).
pub type BlockHash = u128;

/// Computes the hash chain of a token sequence's full blocks. The key makes the hashes
/// unpredictable to clients (a node draws one at start), so no one can craft a collision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixHasher {
    key: [u64; 2],
}

impl PrefixHasher {
    pub const fn new(key: [u64; 2]) -> Self {
        PrefixHasher { key }
    }

    /// The hash of a block holding `tokens`, after the block hashed `parent` (None: the first).
    pub fn block(&self, parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
        let parent = parent.unwrap_or(0);
        let mut lanes = [self.key[0] ^ parent as u64, self.key[1] ^ (parent >> 64) as u64];
        const MUL: [u64; 2] = [0x9e37_79b9_7f4a_7c15, 0xc2b2_ae3d_27d4_eb4f];
        for (lane, mul) in lanes.iter_mut().zip(MUL) {
            *lane = mix(*lane ^ tokens.len() as u64);
            for &t in tokens {
                *lane = (*lane ^ u64::from(t)).wrapping_mul(mul);
                *lane ^= *lane >> 29;
            }
            *lane = mix(*lane);
        }
        (u128::from(lanes[1]) << 64) | u128::from(lanes[0])
    }

    /// Extends `chain` (the hashes of the first `chain.len()` full blocks of `tokens`) over
    /// every full block `tokens` has.
    pub fn extend(&self, chain: &mut Vec<BlockHash>, tokens: &[u32], block_size: usize) {
        let block_size = block_size.max(1);
        while (chain.len() + 1) * block_size <= tokens.len() {
            let i = chain.len();
            let h = self.block(chain.last().copied(), &tokens[i * block_size..(i + 1) * block_size]);
            chain.push(h);
        }
    }
}

/// splitmix64's finaliser.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Hands out and takes back KV blocks, and (when prefix caching is on) keeps the KV of full
/// blocks after their sequences end, so a later sequence starting with the same tokens reuses
/// it. A block is referenced by every table holding it; a full block is never written again,
/// so sharing it is safe. An unreferenced cached block counts as free: it is evicted, least
/// recently released first, only when no never-cached block is left.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    block_size: usize,
    /// Free blocks holding nothing cached; the lowest id is handed out first.
    free: Vec<u32>,
    /// Tables holding each block.
    refs: Vec<u32>,
    /// The identity of each block whose KV the cache can hand out again.
    hash_of: Vec<Option<BlockHash>>,
    cached: std::collections::HashMap<BlockHash, u32>,
    /// Unreferenced cached blocks by release order (oldest first), and each one's key there.
    evictable: std::collections::BTreeMap<u64, u32>,
    evictable_at: Vec<u64>,
    clock: u64,
    caching: bool,
}

impl BlockAllocator {
    /// An allocator without prefix caching.
    pub fn new(geometry: KvGeometry) -> Self {
        BlockAllocator {
            block_size: geometry.block_size.max(1),
            free: (0..geometry.num_blocks as u32).rev().collect(),
            refs: vec![0; geometry.num_blocks],
            hash_of: vec![None; geometry.num_blocks],
            cached: Default::default(),
            evictable: Default::default(),
            evictable_at: vec![0; geometry.num_blocks],
            clock: 0,
            caching: false,
        }
    }

    /// An allocator that caches full blocks for reuse ([`BlockAllocator::commit`],
    /// [`BlockAllocator::share`]).
    pub fn with_prefix_caching(geometry: KvGeometry) -> Self {
        BlockAllocator { caching: true, ..Self::new(geometry) }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.refs.len()
    }

    /// Blocks no table holds (cached ones included: they are evicted when needed).
    pub fn free_blocks(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Blocks whose KV the cache can hand out again (held or not).
    pub fn cached_blocks(&self) -> usize {
        self.cached.len()
    }

    /// Blocks `table` would need to grow by `new_tokens`.
    pub fn blocks_needed(&self, table: &BlockTable, new_tokens: usize) -> usize {
        (table.tokens + new_tokens)
            .div_ceil(self.block_size)
            .saturating_sub(table.blocks.len())
    }

    /// Whether `table` can grow by `new_tokens` right now.
    pub fn can_append(&self, table: &BlockTable, new_tokens: usize) -> bool {
        self.blocks_needed(table, new_tokens) <= self.free_blocks()
    }

    /// A free block: a never-cached one if any, else the least recently released cached one
    /// (which leaves the cache).
    fn take_block(&mut self) -> Option<u32> {
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.evictable.pop_first()?;
                if let Some(h) = self.hash_of[b as usize].take() {
                    self.cached.remove(&h);
                }
                b
            }
        };
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// Reserves slots for `new_tokens` more tokens. On error nothing changes.
    pub fn append(&mut self, table: &mut BlockTable, new_tokens: usize) -> Result<()> {
        let needed = self.blocks_needed(table, new_tokens);
        if needed > self.free_blocks() {
            return Err(EngineError::KvCacheExhausted {
                needed,
                free: self.free_blocks(),
            });
        }
        for _ in 0..needed {
            if let Some(b) = self.take_block() {
                table.blocks.push(b);
            }
        }
        table.tokens += new_tokens;
        Ok(())
    }

    /// Returns every block of `table` and leaves it empty. A cached block stays cached; the
    /// last blocks of a sequence are released first, so they are evicted before its first ones.
    pub fn release(&mut self, table: &mut BlockTable) {
        for b in table.blocks.drain(..).rev() {
            let refs = &mut self.refs[b as usize];
            debug_assert!(*refs > 0, "block {b} released twice");
            if *refs == 0 {
                continue;
            }
            *refs -= 1;
            if *refs > 0 {
                continue;
            }
            if self.hash_of[b as usize].is_some() {
                self.clock += 1;
                self.evictable.insert(self.clock, b);
                self.evictable_at[b as usize] = self.clock;
            } else {
                self.free.push(b);
            }
        }
        table.tokens = 0;
        table.committed = 0;
    }

    /// The cached blocks holding the longest prefix of the blocks hashed `chain`.
    pub fn cached_prefix(&self, chain: &[BlockHash]) -> Vec<u32> {
        if !self.caching {
            return Vec::new();
        }
        chain.iter().map_while(|h| self.cached.get(h).copied()).collect()
    }

    /// Whether an empty table could take `blocks` (from [`BlockAllocator::cached_prefix`]) and
    /// then grow by `new_tokens`.
    pub fn can_share(&self, blocks: &[u32], new_tokens: usize) -> bool {
        let revived = blocks.iter().filter(|&&b| self.refs[b as usize] == 0).count();
        let needed = (blocks.len() * self.block_size + new_tokens).div_ceil(self.block_size) - blocks.len();
        revived + needed <= self.free_blocks()
    }

    /// Starts the empty `table` with the cached `blocks` (full, already computed): it holds
    /// their tokens and grows after them.
    pub fn share(&mut self, table: &mut BlockTable, blocks: &[u32]) {
        debug_assert!(table.blocks.is_empty(), "share into a table that holds blocks");
        for &b in blocks {
            let i = b as usize;
            if self.refs[i] == 0 {
                self.evictable.remove(&self.evictable_at[i]);
            }
            self.refs[i] += 1;
            table.blocks.push(b);
        }
        table.tokens = blocks.len() * self.block_size;
        table.committed = blocks.len();
    }

    /// Offers the leading full blocks of `table`, whose KV is now computed and hashed `chain`,
    /// to the cache. A block whose hash another block already holds stays private.
    pub fn commit(&mut self, table: &mut BlockTable, chain: &[BlockHash]) {
        if !self.caching {
            return;
        }
        let upto = chain.len().min(table.blocks.len());
        let from = table.committed.min(upto);
        for (&b, &h) in table.blocks[from..upto].iter().zip(&chain[from..upto]) {
            if self.hash_of[b as usize].is_none() && !self.cached.contains_key(&h) {
                self.cached.insert(h, b);
                self.hash_of[b as usize] = Some(h);
            }
        }
        table.committed = table.committed.max(upto);
    }

    /// Forgets every cached block no table holds (their KV is gone or no longer trusted: a
    /// new device, or a plan that moved only the blocks in use).
    pub fn forget_unreferenced(&mut self) {
        while let Some((_, b)) = self.evictable.pop_first() {
            if let Some(h) = self.hash_of[b as usize].take() {
                self.cached.remove(&h);
            }
            self.free.push(b);
        }
        self.free.sort_unstable_by(|a, b| b.cmp(a));
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

    const HASHER: PrefixHasher = PrefixHasher { key: [7, 11] };

    fn chain(tokens: &[u32], block_size: usize) -> Vec<BlockHash> {
        let mut c = Vec::new();
        HASHER.extend(&mut c, tokens, block_size);
        c
    }

    #[test]
    fn a_hash_names_a_block_and_everything_before_it() {
        let a = chain(&[1, 2, 3, 4, 5, 6, 7, 8, 9], 4);
        assert_eq!(a.len(), 2, "only full blocks are hashed");
        let b = chain(&[1, 2, 3, 4, 5, 6, 7, 8], 4);
        assert_eq!(a, b);
        // Same second block after a different first one: a different identity.
        let c = chain(&[0, 2, 3, 4, 5, 6, 7, 8], 4);
        assert_ne!(a[1], c[1]);
        // Another key, other hashes.
        let mut d = Vec::new();
        PrefixHasher::new([8, 11]).extend(&mut d, &[1, 2, 3, 4], 4);
        assert_ne!(d[0], a[0]);
    }

    #[test]
    fn a_released_full_block_is_shared_by_the_next_sequence_with_its_prefix() {
        let mut a = BlockAllocator::with_prefix_caching(KvGeometry { block_size: 4, num_blocks: 8 });
        let prompt: Vec<u32> = (0..10).collect();
        let hashes = chain(&prompt, 4);
        let mut t = BlockTable::default();
        a.append(&mut t, 10).unwrap();
        a.commit(&mut t, &hashes);
        assert_eq!(a.cached_blocks(), 2, "the two full blocks are cached, the partial third is not");
        let first = t.blocks()[..2].to_vec();
        // While the first sequence runs, a second one shares its blocks.
        let hit = a.cached_prefix(&hashes);
        assert_eq!(hit, first);
        let mut u = BlockTable::default();
        assert!(a.can_share(&hit, 3));
        a.share(&mut u, &hit);
        a.append(&mut u, 3).unwrap();
        assert_eq!(u.tokens(), 11);
        assert_eq!(&u.blocks()[..2], &first[..]);
        assert!(!u.blocks()[2..].iter().any(|b| t.blocks().contains(b)), "the partial block is never shared");
        assert_eq!(a.free_blocks(), 8 - 3 - 1);
        a.release(&mut t);
        assert_eq!(a.free_blocks(), 8 - 3, "shared blocks stay held by the second sequence");
        a.release(&mut u);
        assert_eq!(a.free_blocks(), 8, "cached blocks count as free once no one holds them");
        assert_eq!(a.cached_blocks(), 2);
        // A later sequence with the same start finds them again.
        assert_eq!(a.cached_prefix(&hashes), first);
        // A different start finds nothing.
        assert!(a.cached_prefix(&chain(&[9; 8], 4)).is_empty());
    }

    #[test]
    fn cached_blocks_are_evicted_last_and_least_recently_released_first() {
        let mut a = BlockAllocator::with_prefix_caching(KvGeometry { block_size: 2, num_blocks: 4 });
        let (p, q) = (vec![1, 2, 3, 4], vec![5, 6]);
        let (hp, hq) = (chain(&p, 2), chain(&q, 2));
        let mut t = BlockTable::default();
        a.append(&mut t, 4).unwrap();
        a.commit(&mut t, &hp);
        let mut u = BlockTable::default();
        a.append(&mut u, 2).unwrap();
        a.commit(&mut u, &hq);
        a.release(&mut t); // p's blocks: its second released first
        a.release(&mut u);
        assert_eq!(a.free_blocks(), 4);
        // One never-cached block is left: it goes first, and every cached block survives.
        let mut v = BlockTable::default();
        a.append(&mut v, 2).unwrap();
        assert_eq!(a.cached_blocks(), 3);
        // Then the least recently released: p's second block, so p keeps its first.
        a.append(&mut v, 2).unwrap();
        assert_eq!(a.cached_blocks(), 2);
        assert_eq!(a.cached_prefix(&hp).len(), 1);
        assert_eq!(a.cached_prefix(&hq).len(), 1);
    }

    #[test]
    fn a_hash_held_by_one_block_leaves_a_duplicate_private() {
        let mut a = BlockAllocator::with_prefix_caching(KvGeometry { block_size: 2, num_blocks: 4 });
        let h = chain(&[1, 2], 2);
        let (mut t, mut u) = (BlockTable::default(), BlockTable::default());
        a.append(&mut t, 2).unwrap();
        a.append(&mut u, 2).unwrap();
        a.commit(&mut t, &h);
        a.commit(&mut u, &h);
        assert_eq!(a.cached_blocks(), 1);
        let first = t.blocks().to_vec();
        a.release(&mut u);
        a.release(&mut t);
        assert_eq!(a.cached_prefix(&h), first, "the first block to commit holds the hash");
        assert_eq!(a.free_blocks(), 4);
        a.forget_unreferenced();
        assert_eq!(a.cached_blocks(), 0);
        assert!(a.cached_prefix(&h).is_empty());
        assert_eq!(a.free_blocks(), 4);
    }

    #[test]
    fn without_caching_nothing_is_kept() {
        let mut a = BlockAllocator::new(KvGeometry { block_size: 2, num_blocks: 4 });
        let h = chain(&[1, 2], 2);
        let mut t = BlockTable::default();
        a.append(&mut t, 2).unwrap();
        a.commit(&mut t, &h);
        a.release(&mut t);
        assert!(a.cached_prefix(&h).is_empty());
        assert_eq!(a.cached_blocks(), 0);
    }

    /// Sequences drawn from a few shared prefixes, sharing and releasing at random: every
    /// block's reference count is the number of tables holding it, a shared block is full and
    /// cached, no block is held and free at once, and everything is free at the end.
    #[test]
    fn random_sharing_keeps_reference_counts_exact() {
        let mut rng = Rng::new(9);
        let (bs, n) = (4usize, 48usize);
        let mut a = BlockAllocator::with_prefix_caching(KvGeometry { block_size: bs, num_blocks: n });
        let prefixes: Vec<Vec<u32>> = (0..4).map(|p| (0..12).map(|i| p * 100 + i).collect()).collect();
        let mut live: Vec<(BlockTable, Vec<u32>)> = Vec::new();
        for round in 0..5000u32 {
            if !live.is_empty() && rng.next_f32() < 0.45 {
                let i = (rng.next_u64() % live.len() as u64) as usize;
                let (mut t, _) = live.swap_remove(i);
                a.release(&mut t);
            } else {
                let mut tokens = prefixes[(rng.next_u64() % 4) as usize].clone();
                tokens.truncate(1 + (rng.next_u64() % 12) as usize);
                tokens.extend((0..rng.next_u64() % 9).map(|k| 1000 + round * 10 + k as u32));
                let hashes = chain(&tokens, bs);
                let hit: Vec<u32> = a.cached_prefix(&hashes[..(tokens.len() - 1) / bs]);
                let rest = tokens.len() - hit.len() * bs;
                if !a.can_share(&hit, rest) {
                    continue;
                }
                let mut t = BlockTable::default();
                a.share(&mut t, &hit);
                a.append(&mut t, rest).unwrap();
                a.commit(&mut t, &hashes);
                live.push((t, tokens));
            }
            let mut refs = vec![0u32; n];
            for (t, tokens) in &live {
                assert_eq!(t.tokens(), tokens.len());
                for &b in t.blocks() {
                    refs[b as usize] += 1;
                }
            }
            assert_eq!(refs, a.refs, "reference counts");
            for (b, &r) in refs.iter().enumerate() {
                assert!(r <= 1 || a.hash_of[b].is_some(), "block {b} shared but not cached");
            }
            let held = refs.iter().filter(|&&r| r > 0).count();
            assert_eq!(held + a.free_blocks(), n, "a block both held and free, or lost");
            assert_eq!(a.cached.len(), a.hash_of.iter().filter(|h| h.is_some()).count());
        }
        for (mut t, _) in live {
            a.release(&mut t);
        }
        assert_eq!(a.free_blocks(), n, "blocks leaked");
    }
}
