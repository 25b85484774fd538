//! A modeled GPU (`--device mock:h100`, `mock:a100`, `mock:l40s`). It does no arithmetic and
//! holds no weight or KV memory. Each forward step takes the time a roofline model gives for
//! that card, and the step sleeps through it without burning CPU. Its outputs are
//! deterministic functions of the token ids and their positions, the same however the layers
//! are split into stages. So token-for-token tests and benchmarks of the mesh at scale run
//! on two cores.
//!
//! **Time.** Every kernel costs `max(bytes / (bandwidth × MEMORY_EFFICIENCY), flops / (rate
//! × COMPUTE_EFFICIENCY)) + KERNEL_LAUNCH` (fifteen kernels a layer). Weights count at their
//! stored size, activations and KV as bf16. Attention reads each chunk's whole context
//! once, as a flash-attention kernel does. The time adds up from the first kernel after a
//! synchronisation. `synchronize` (and any download) then sleeps until that much time has
//! passed since that kernel.
//!
//! **Values.** Each row of an activation carries a 64-bit tag in place of numbers. Every op
//! mixes its inputs' tags with the weight's (a hash of the tensor's name) or the position
//! (rope). The paged KV keeps one running hash per slot: the previous position's, mixed with
//! this token's K and V. So a token's output depends on its whole prefix, and lost or
//! misplaced KV shows as different tokens. Hidden states travel as rows of `width` floats:
//! the tag in four 16-bit pieces, then the width, then zeros, at the real size, so the
//! transfers between stages move what a real card's would. Logits are a floor of -30 with
//! four peaks at ids drawn from the tag, so greedy decoding takes the first.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{AttnShape, Backend, BatchLayout};
use crate::checkpoint::TensorBytes;
use crate::error::{EngineError, Result};
use crate::rope::Rope;

/// A card's data-sheet figures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GpuSpec {
    pub name: &'static str,
    /// Peak memory bandwidth (bytes/s).
    pub memory_bandwidth: f64,
    /// Peak dense bf16 tensor-core rate (FLOP/s, without sparsity).
    pub bf16_flops: f64,
    /// Device memory (bytes).
    pub memory_bytes: u64,
}

const GIB: u64 = 1 << 30;

/// The cards `--device mock:NAME` models, from NVIDIA's data sheets: H100 SXM5 80 GB (3.35
/// TB/s HBM3, 989 TFLOPS dense BF16), A100 SXM4 80 GB (2,039 GB/s HBM2e, 312 TFLOPS),
/// L40S (864 GB/s GDDR6, 362 TFLOPS dense BF16, 48 GB).
pub const GPUS: &[GpuSpec] = &[
    GpuSpec { name: "h100", memory_bandwidth: 3.35e12, bf16_flops: 989e12, memory_bytes: 80 * GIB },
    GpuSpec { name: "a100", memory_bandwidth: 2.039e12, bf16_flops: 312e12, memory_bytes: 80 * GIB },
    GpuSpec { name: "l40s", memory_bandwidth: 0.864e12, bf16_flops: 362e12, memory_bytes: 48 * GIB },
];

/// The share of the peak bandwidth that tuned decode kernels reach.
pub const MEMORY_EFFICIENCY: f64 = 0.85;
/// The share of the peak tensor rate that tuned matrix products reach.
pub const COMPUTE_EFFICIENCY: f64 = 0.6;
/// Per kernel launch (s): fifteen a layer, 15 µs.
pub const KERNEL_LAUNCH: f64 = 1e-6;
/// Bytes per activation or KV value on the modeled card (bf16).
const ACT: f64 = 2.0;

/// The card named `name` (`h100`, ...).
pub fn gpu(name: &str) -> Option<&'static GpuSpec> {
    GPUS.iter().find(|g| g.name == name)
}

/// A card as `--device` names it after `mock:`: `h100`, or `h100:192GiB` for that card with
/// another memory size (a baseline that holds a model no one card holds).
pub fn parse_card(card: &str) -> std::result::Result<GpuSpec, String> {
    let (name, memory) = card.split_once(':').map_or((card, None), |(n, m)| (n, Some(m)));
    let mut spec = *gpu(name).ok_or_else(|| {
        let names: Vec<String> = GPUS.iter().map(|g| format!("mock:{}", g.name)).collect();
        format!("unknown mock device \"mock:{card}\" (known: {}, each optionally with :NGiB of memory)", names.join(", "))
    })?;
    if let Some(m) = memory {
        let gib: u64 = m.strip_suffix("GiB").and_then(|n| n.parse().ok()).filter(|&n| n > 0).ok_or_else(|| format!("mock:{card}: the memory size must be a whole number of GiB, like {name}:192GiB"))?;
        spec.memory_bytes = gib.checked_mul(GIB).ok_or_else(|| format!("mock:{card}: the memory size is too large"))?;
    }
    Ok(spec)
}

impl GpuSpec {
    /// How `--device` names this card: `mock:h100`, with `:NGiB` when its memory is not the
    /// data sheet's.
    pub fn device_name(&self) -> String {
        match gpu(self.name) {
            Some(g) if g.memory_bytes == self.memory_bytes => format!("mock:{}", self.name),
            _ => format!("mock:{}:{}GiB", self.name, self.memory_bytes >> 30),
        }
    }
}

/// The time one kernel takes on `spec` (s).
pub fn kernel_time(spec: &GpuSpec, bytes: f64, flops: f64) -> f64 {
    (bytes / (spec.memory_bandwidth * MEMORY_EFFICIENCY)).max(flops / (spec.bf16_flops * COMPUTE_EFFICIENCY)) + KERNEL_LAUNCH
}

/// The modeled time since the last synchronisation.
#[derive(Debug, Default)]
struct Ledger {
    since: Option<Instant>,
    seconds: f64,
    /// Every kernel's time since the backend was made.
    total: f64,
}

/// A modeled card (see the module doc).
pub struct MockBackend {
    spec: GpuSpec,
    ledger: Mutex<Ledger>,
}

impl MockBackend {
    pub fn new(spec: GpuSpec) -> Self {
        MockBackend { spec, ledger: Mutex::new(Ledger::default()) }
    }

    /// `mock:h100` and the like; the error names the cards there are.
    pub fn named(device: &str) -> Result<Self> {
        parse_card(device.strip_prefix("mock:").unwrap_or(device)).map(MockBackend::new).map_err(EngineError::BackendUnavailable)
    }

    pub fn spec(&self) -> &GpuSpec {
        &self.spec
    }

    /// The modeled time of every kernel so far (what the steps waited out, launches included).
    pub fn modeled(&self) -> Duration {
        Duration::from_secs_f64(self.ledger().total)
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One kernel reading and writing `bytes` and doing `flops`.
    fn charge(&self, bytes: f64, flops: f64) {
        let t = kernel_time(&self.spec, bytes, flops);
        let mut l = self.ledger();
        l.since.get_or_insert_with(Instant::now);
        l.seconds += t;
        l.total += t;
    }

    /// Sleeps until the kernels charged since the last call would have run.
    fn wait(&self) {
        let (since, seconds) = {
            let mut l = self.ledger();
            let out = (l.since.take(), l.seconds);
            l.seconds = 0.0;
            out
        };
        if let Some(since) = since {
            let done = since + Duration::from_secs_f64(seconds);
            let now = Instant::now();
            if done > now {
                std::thread::sleep(done - now);
            }
        }
    }
}

/// A weight: its shape and bytes, and a tag from its name (the same on every stage).
pub struct MockWeight {
    id: u64,
    rows: usize,
    cols: usize,
    bytes: usize,
    /// The embedding or the LM head: a product with it gives logits.
    vocab: bool,
}

/// An activation: its length and one tag per row.
#[derive(Debug, Clone, Default)]
pub struct MockBuffer {
    len: usize,
    tags: Vec<u64>,
    logits: bool,
}

/// One layer's paged KV: the running hash of each written slot, by block.
pub struct MockKv {
    num_blocks: usize,
    block_size: usize,
    kv_dim: usize,
    blocks: HashMap<u32, Vec<Option<u64>>>,
}

impl MockKv {
    fn get(&self, (block, offset): (u32, usize)) -> Option<u64> {
        self.blocks.get(&block).and_then(|b| b[offset])
    }

    fn set(&mut self, (block, offset): (u32, usize), value: Option<u64>) {
        let bs = self.block_size;
        self.blocks.entry(block).or_insert_with(|| vec![None; bs])[offset] = value;
    }
}

/// A step's layout: each token's position and KV slot (block, offset).
pub struct MockBatch {
    positions: Vec<usize>,
    slots: Vec<(u32, usize)>,
    /// The slot of each token's previous position (`None` at position 0).
    prev: Vec<Option<(u32, usize)>>,
    /// Each chunk's context after the step (its KV read once by attention), and its new tokens.
    chunks: Vec<(usize, usize)>,
    shape: AttnShape,
}

impl MockBatch {
    fn slot_of(&self, layout_table: &[u32], pos: usize) -> (u32, usize) {
        let bs = self.shape.block_size;
        (layout_table[pos / bs], pos % bs)
    }
}

/// splitmix64 over two words: how tags combine.
fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.rotate_left(23) ^ 0x9E37_79B9_7F4A_7C15;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a of a tensor's name.
fn name_tag(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

fn check(what: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(EngineError::BadBatch(format!("{what}: {got} values where {want} belong")))
    }
}

/// A tag as four floats holding 16 bits each (exact in f32).
fn put_tag(out: &mut [f32], tag: u64) {
    for (i, v) in out.iter_mut().take(4).enumerate() {
        *v = ((tag >> (16 * i)) & 0xffff) as f32;
    }
}

fn get_tag(row: &[f32]) -> Option<u64> {
    let mut tag = 0u64;
    for (i, &v) in row.iter().take(4).enumerate() {
        if !(0.0..65536.0).contains(&v) || v.fract() != 0.0 {
            return None;
        }
        tag |= (v as u64) << (16 * i);
    }
    Some(tag)
}

/// Values of a logits row: a floor and four peaks at ids drawn from the tag.
const LOGIT_FLOOR: f32 = -30.0;
const PEAKS: [f32; 4] = [10.0, 8.5, 7.5, 7.0];

impl Backend for MockBackend {
    type Weight = MockWeight;
    type Buffer = MockBuffer;
    type KvCache = MockKv;
    type Batch = MockBatch;

    fn name(&self) -> String {
        self.spec.device_name()
    }

    fn synchronize(&self) -> Result<()> {
        self.wait();
        Ok(())
    }

    fn reads_weights(&self) -> bool {
        false
    }

    fn memory_bytes(&self) -> Option<u64> {
        Some(self.spec.memory_bytes)
    }

    fn weight(&self, tensor: &TensorBytes) -> Result<MockWeight> {
        let (rows, cols) = match tensor.shape[..] {
            [r, c] => (r, c),
            [n] => (1, n),
            _ => return Err(EngineError::BadBatch(format!("{}: a mock weight is a matrix or a vector, not {:?}", tensor.name, tensor.shape))),
        };
        let vocab = tensor.name == "lm_head.weight" || tensor.name == "model.embed_tokens.weight";
        Ok(MockWeight { id: name_tag(&tensor.name), rows, cols, bytes: tensor.nbytes(), vocab })
    }

    fn zeros(&self, len: usize) -> Result<MockBuffer> {
        Ok(MockBuffer { len, tags: Vec::new(), logits: false })
    }

    fn upload(&self, data: &[f32]) -> Result<MockBuffer> {
        let bad = || EngineError::BadBatch("hidden states that no mock device produced (a pipeline's stages must all be mock devices, or none)".into());
        if data.is_empty() {
            return Ok(MockBuffer::default());
        }
        let width = data.get(4).copied().filter(|w| *w >= 5.0 && w.fract() == 0.0).ok_or_else(bad)? as usize;
        if !data.len().is_multiple_of(width) {
            return Err(bad());
        }
        let tags = data.chunks_exact(width).map(|row| if row[4] as usize == width { get_tag(row) } else { None }).collect::<Option<Vec<u64>>>().ok_or_else(bad)?;
        self.charge(data.len() as f64 * ACT, 0.0);
        Ok(MockBuffer { len: data.len(), tags, logits: false })
    }

    fn download(&self, buf: &MockBuffer) -> Result<Vec<f32>> {
        self.wait();
        let rows = buf.tags.len();
        if rows == 0 {
            return Ok(vec![0.0; buf.len]);
        }
        let width = buf.len / rows;
        check("download", rows * width, buf.len)?;
        let mut out = vec![if buf.logits { LOGIT_FLOOR } else { 0.0 }; buf.len];
        for (row, &tag) in out.chunks_exact_mut(width).zip(&buf.tags) {
            if buf.logits {
                let mut t = tag;
                for p in PEAKS {
                    t = mix(t, 1);
                    row[(t % width as u64) as usize] = p;
                }
            } else {
                if width < 5 {
                    return Err(EngineError::BadBatch(format!("a mock device's hidden rows need 5 values at least, these have {width}")));
                }
                put_tag(row, tag);
                row[4] = width as f32;
            }
        }
        Ok(out)
    }

    fn kv_cache(&self, num_blocks: usize, block_size: usize, kv_dim: usize) -> Result<MockKv> {
        if kv_dim < 5 {
            return Err(EngineError::BadBatch(format!("a mock device's KV needs 5 values a token at least, not {kv_dim}")));
        }
        Ok(MockKv { num_blocks, block_size, kv_dim, blocks: HashMap::new() })
    }

    fn prepare_batch(&self, layout: &BatchLayout, _rope: &Rope, shape: AttnShape) -> Result<MockBatch> {
        let mut b = MockBatch { positions: Vec::new(), slots: Vec::new(), prev: Vec::new(), chunks: Vec::new(), shape };
        for c in &layout.chunks {
            for pos in c.start_pos..c.start_pos + c.len {
                b.positions.push(pos);
                b.slots.push(b.slot_of(&c.block_table, pos));
                b.prev.push(pos.checked_sub(1).map(|p| b.slot_of(&c.block_table, p)));
            }
            b.chunks.push((c.start_pos + c.len, c.len));
        }
        Ok(b)
    }

    fn embed(&self, table: &MockWeight, tokens: &[u32], out: &mut MockBuffer) -> Result<()> {
        check("embed", out.len, tokens.len() * table.cols)?;
        if let Some(t) = tokens.iter().find(|&&t| t as usize >= table.rows) {
            return Err(EngineError::BadBatch(format!("token id {t} is outside the vocabulary ({})", table.rows)));
        }
        out.tags = tokens.iter().map(|&t| mix(t as u64, table.id)).collect();
        out.logits = false;
        self.charge(out.len as f64 * ACT * 2.0, 0.0);
        Ok(())
    }

    fn matmul(&self, x: &MockBuffer, rows: usize, w: &MockWeight, bias: Option<&MockWeight>, out: &mut MockBuffer) -> Result<()> {
        check("matmul input", x.len, rows * w.cols)?;
        check("matmul output", out.len, rows * w.rows)?;
        check("matmul rows", x.tags.len(), rows)?;
        let b = bias.map_or(0, |b| b.id);
        out.tags = x.tags.iter().map(|&t| mix(mix(t, w.id), b)).collect();
        out.logits = w.vocab;
        let bytes = w.bytes as f64 + (rows * (w.cols + w.rows)) as f64 * ACT;
        self.charge(bytes, 2.0 * (rows * w.rows * w.cols) as f64);
        Ok(())
    }

    fn rms_norm(&self, x: &MockBuffer, weight: &MockWeight, _eps: f32, out: &mut MockBuffer) -> Result<()> {
        check("rms_norm", out.len, x.len)?;
        out.tags = x.tags.iter().map(|&t| mix(t, weight.id)).collect();
        out.logits = false;
        self.charge(2.0 * x.len as f64 * ACT, 0.0);
        Ok(())
    }

    fn add(&self, x: &mut MockBuffer, y: &MockBuffer) -> Result<()> {
        check("add", y.len, x.len)?;
        check("add rows", y.tags.len(), x.tags.len())?;
        for (a, &b) in x.tags.iter_mut().zip(&y.tags) {
            *a = mix(*a, b);
        }
        self.charge(3.0 * x.len as f64 * ACT, 0.0);
        Ok(())
    }

    fn silu_mul(&self, gate: &MockBuffer, up: &MockBuffer, out: &mut MockBuffer) -> Result<()> {
        check("silu_mul", up.len, gate.len)?;
        check("silu_mul", out.len, gate.len)?;
        out.tags = gate.tags.iter().zip(&up.tags).map(|(&g, &u)| mix(g, u)).collect();
        out.logits = false;
        self.charge(3.0 * gate.len as f64 * ACT, 0.0);
        Ok(())
    }

    fn rope(&self, batch: &MockBatch, x: &mut MockBuffer, heads: usize, head_dim: usize) -> Result<()> {
        check("rope", x.len, batch.positions.len() * heads * head_dim)?;
        check("rope rows", x.tags.len(), batch.positions.len())?;
        for (t, &p) in x.tags.iter_mut().zip(&batch.positions) {
            *t = mix(*t, p as u64);
        }
        self.charge(2.0 * x.len as f64 * ACT, 0.0);
        Ok(())
    }

    fn write_kv(&self, batch: &MockBatch, cache: &mut MockKv, k: &MockBuffer, v: &MockBuffer) -> Result<()> {
        let t = batch.positions.len();
        check("write_kv", k.tags.len(), t)?;
        check("write_kv", v.tags.len(), t)?;
        check("write_kv", k.len, t * cache.kv_dim)?;
        // Tokens in batch order: a chunk's positions ascend, so each finds its predecessor's
        // hash written (by this step or an earlier one).
        for i in 0..t {
            let prev = match batch.prev[i] {
                None => Some(0),
                Some(slot) => cache.get(slot),
            };
            // A missing predecessor (KV lost) hashes differently: wrong tokens, as on a card.
            let running = mix(prev.unwrap_or(u64::MAX), mix(k.tags[i], v.tags[i]));
            cache.set(batch.slots[i], Some(running));
        }
        self.charge(2.0 * k.len as f64 * ACT * 2.0, 0.0);
        Ok(())
    }

    fn attention(&self, batch: &MockBatch, cache: &MockKv, q: &MockBuffer, out: &mut MockBuffer) -> Result<()> {
        check("attention", out.len, q.len)?;
        check("attention rows", q.tags.len(), batch.positions.len())?;
        out.tags = q.tags.iter().zip(&batch.slots).map(|(&t, &s)| mix(t, cache.get(s).unwrap_or(u64::MAX))).collect();
        out.logits = false;
        let s = batch.shape;
        let kv_dim = (s.num_kv_heads * s.head_dim) as f64;
        let q_dim = (s.num_heads * s.head_dim) as f64;
        let mut bytes = q.len as f64 * ACT * 2.0;
        let mut flops = 0.0;
        for &(ctx, len) in &batch.chunks {
            bytes += ctx as f64 * kv_dim * 2.0 * ACT;
            // Each new token attends to the context up to itself: QK and PV.
            let attended: f64 = (ctx - len + 1..=ctx).map(|c| c as f64).sum();
            flops += 4.0 * q_dim * attended;
        }
        self.charge(bytes, flops);
        Ok(())
    }

    fn gather_rows(&self, x: &MockBuffer, width: usize, rows: &[usize], out: &mut MockBuffer) -> Result<()> {
        check("gather_rows", out.len, rows.len() * width)?;
        out.tags = rows.iter().map(|&r| x.tags.get(r).copied().ok_or_else(|| EngineError::BadBatch(format!("row {r} of {}", x.tags.len())))).collect::<Result<_>>()?;
        out.logits = x.logits;
        self.charge(out.len as f64 * ACT * 2.0, 0.0);
        Ok(())
    }

    fn read_kv_blocks(&self, cache: &MockKv, blocks: &[u32], block_size: usize) -> Result<Vec<f32>> {
        check("read_kv_blocks block size", block_size, cache.block_size)?;
        let d = cache.kv_dim;
        // K then V, each block after block; the hash sits in the K half, with a 1 after it
        // where a slot was written.
        let half = blocks.len() * block_size * d;
        let mut out = vec![0.0f32; 2 * half];
        for (bi, &b) in blocks.iter().enumerate() {
            if b as usize >= cache.num_blocks {
                return Err(EngineError::BadBatch(format!("KV block {b} is outside the cache ({} blocks)", cache.num_blocks)));
            }
            for off in 0..block_size {
                if let Some(h) = cache.get((b, off)) {
                    let at = (bi * block_size + off) * d;
                    put_tag(&mut out[at..at + 4], h);
                    out[at + 4] = 1.0;
                }
            }
        }
        Ok(out)
    }

    fn write_kv_blocks(&self, cache: &mut MockKv, blocks: &[u32], block_size: usize, data: &[f32]) -> Result<()> {
        check("write_kv_blocks block size", block_size, cache.block_size)?;
        let d = cache.kv_dim;
        check("write_kv_blocks", data.len(), 2 * blocks.len() * block_size * d)?;
        for (bi, &b) in blocks.iter().enumerate() {
            if b as usize >= cache.num_blocks {
                return Err(EngineError::BadBatch(format!("KV block {b} is outside the cache ({} blocks)", cache.num_blocks)));
            }
            for off in 0..block_size {
                let at = (bi * block_size + off) * d;
                let value = if data[at + 4] == 1.0 { get_tag(&data[at..at + 4]) } else { None };
                cache.set((b, off), value);
            }
        }
        Ok(())
    }
}
