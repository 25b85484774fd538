//! A pipeline stage: layers [start, end) of a model on one backend, with their paged KV memory.
//! The first stage also embeds tokens; the last also applies the final norm and the LM head.
//! The whole model is the stage [0, n).

use std::ops::Range;

use crate::backend::{AttnShape, Backend, BatchLayout, MatmulJob};
use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::kv::KvGeometry;
use crate::rope::Rope;

/// What flows into a stage: token ids into the first, hidden states into the others.
#[derive(Debug, Clone, Copy)]
pub enum StageInput<'a> {
    Tokens(&'a [u32]),
    /// `[tokens, hidden_size]` row-major f32, as the previous stage produced it.
    Hidden(&'a [f32]),
}

/// What a stage produces: hidden states for the next stage, or logits from the last.
#[derive(Debug, Clone, PartialEq)]
pub enum StageOutput {
    Hidden(Vec<f32>),
    /// `[rows, vocab]`, one row per chunk that asked for logits, in batch order.
    Logits { rows: usize, vocab: usize, data: Vec<f32> },
}

struct Layer<B: Backend> {
    input_norm: B::Weight,
    q: B::Weight,
    k: B::Weight,
    v: B::Weight,
    q_bias: Option<B::Weight>,
    k_bias: Option<B::Weight>,
    v_bias: Option<B::Weight>,
    o: B::Weight,
    o_bias: Option<B::Weight>,
    post_norm: B::Weight,
    gate: B::Weight,
    up: B::Weight,
    down: B::Weight,
    gate_bias: Option<B::Weight>,
    up_bias: Option<B::Weight>,
    down_bias: Option<B::Weight>,
}

/// Progress of a load, in bytes of weights made resident.
pub type LoadProgress<'a> = &'a mut dyn FnMut(usize, usize);

/// Layers `range` of a model, ready to run ragged batches.
pub struct Stage<B: Backend> {
    backend: B,
    config: ModelConfig,
    range: Range<usize>,
    rope: Rope,
    kv_geometry: KvGeometry,
    embed: Option<B::Weight>,
    layers: Vec<Layer<B>>,
    kv: Vec<B::KvCache>,
    final_norm: Option<B::Weight>,
    lm_head: Option<B::Weight>,
    /// Weight bytes one forward step reads (an untied embedding is only gathered, not read).
    step_weight_bytes: usize,
    /// How long the last forward call spent in its transformer layers (ns), without the
    /// embedding, the LM head and the transfers: what the planner compares between nodes.
    layers_ns: std::sync::atomic::AtomicU64,
}

/// Collects the tensors a stage needs, checking each shape against the config.
struct Loader<'a, B: Backend> {
    ckpt: &'a Checkpoint,
    backend: &'a B,
    done: usize,
    total: usize,
    progress: LoadProgress<'a>,
}

impl<B: Backend> Loader<'_, B> {
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<B::Weight> {
        let t = self.ckpt.tensor(name, shape)?;
        if !t.has_data() && self.backend.reads_weights() {
            return Err(EngineError::BackendUnavailable(format!(
                "{} needs the weights (tensor `{name}`), and this model has only its config: run it on a mock device (--device mock:h100)",
                self.backend.name()
            )));
        }
        let w = self.backend.weight(&t)?;
        touch(t.bytes());
        self.done += t.nbytes();
        (self.progress)(self.done, self.total);
        Ok(w)
    }

    /// The transformer layers `range`.
    fn layers(&mut self, config: &ModelConfig, range: Range<usize>) -> Result<Vec<Layer<B>>> {
        let (h, i) = (config.hidden_size, config.intermediate_size);
        let (qd, kvd) = (config.q_dim(), config.kv_dim());
        let ld = self;
        let mut layers = Vec::with_capacity(range.len());
        for l in range.clone() {
            let p = format!("model.layers.{l}");
            let c = config;
            layers.push(Layer {
                input_norm: ld.get(&format!("{p}.input_layernorm.weight"), &[h])?,
                q: ld.get(&format!("{p}.self_attn.q_proj.weight"), &[qd, h])?,
                k: ld.get(&format!("{p}.self_attn.k_proj.weight"), &[kvd, h])?,
                v: ld.get(&format!("{p}.self_attn.v_proj.weight"), &[kvd, h])?,
                q_bias: ld.opt(c.qkv_bias, &format!("{p}.self_attn.q_proj.bias"), &[qd])?,
                k_bias: ld.opt(c.qkv_bias, &format!("{p}.self_attn.k_proj.bias"), &[kvd])?,
                v_bias: ld.opt(c.qkv_bias, &format!("{p}.self_attn.v_proj.bias"), &[kvd])?,
                o: ld.get(&format!("{p}.self_attn.o_proj.weight"), &[h, qd])?,
                o_bias: ld.opt(c.o_bias, &format!("{p}.self_attn.o_proj.bias"), &[h])?,
                post_norm: ld.get(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                gate: ld.get(&format!("{p}.mlp.gate_proj.weight"), &[i, h])?,
                up: ld.get(&format!("{p}.mlp.up_proj.weight"), &[i, h])?,
                down: ld.get(&format!("{p}.mlp.down_proj.weight"), &[h, i])?,
                gate_bias: ld.opt(c.mlp_bias, &format!("{p}.mlp.gate_proj.bias"), &[i])?,
                up_bias: ld.opt(c.mlp_bias, &format!("{p}.mlp.up_proj.bias"), &[i])?,
                down_bias: ld.opt(c.mlp_bias, &format!("{p}.mlp.down_proj.bias"), &[h])?,
            });
        }
        Ok(layers)
    }

    /// What the last stage adds after the layers: the final norm and (untied) the LM head.
    fn tail(&mut self, config: &ModelConfig) -> Result<(B::Weight, Option<B::Weight>)> {
        let (h, v) = (config.hidden_size, config.vocab_size);
        let norm = self.get("model.norm.weight", &[h])?;
        let head = if config.tie_word_embeddings { None } else { Some(self.get("lm_head.weight", &[v, h])?) };
        Ok((norm, head))
    }

    fn opt(&mut self, present: bool, name: &str, shape: &[usize]) -> Result<Option<B::Weight>> {
        if present {
            self.get(name, shape).map(Some)
        } else {
            Ok(None)
        }
    }
}

/// Reads one byte per page so the weights are resident before the first request.
fn touch(bytes: &[u8]) {
    let mut acc = 0u8;
    for b in bytes.iter().step_by(4096) {
        acc = acc.wrapping_add(*b);
    }
    std::hint::black_box(acc);
}

impl<B: Backend> Stage<B> {
    /// Loads layers `range` of the checkpoint onto `backend`, with a KV cache of `kv` geometry.
    pub fn load(
        backend: B,
        config: &ModelConfig,
        ckpt: &Checkpoint,
        range: Range<usize>,
        kv: KvGeometry,
        progress: LoadProgress<'_>,
    ) -> Result<Self> {
        let n = config.num_layers;
        if range.start >= range.end || range.end > n {
            return Err(EngineError::LayerRange {
                start: range.start,
                end: range.end,
                num_layers: n,
            });
        }
        let (h, v) = (config.hidden_size, config.vocab_size);
        let kvd = config.kv_dim();
        let first = range.start == 0;
        let last = range.end == n;
        let total = config.stage_param_count(range.start, range.end) * 2;
        let mut ld = Loader {
            ckpt,
            backend: &backend,
            done: 0,
            total,
            progress,
        };

        let embed = if first || (last && config.tie_word_embeddings) {
            Some(ld.get("model.embed_tokens.weight", &[v, h])?)
        } else {
            None
        };
        let gathered_only = if last && config.tie_word_embeddings { 0 } else { ld.done };
        let layers = ld.layers(config, range.clone())?;
        let (final_norm, lm_head) = match last {
            true => ld.tail(config).map(|(norm, head)| (Some(norm), head))?,
            false => (None, None),
        };
        let kv_caches = (0..range.len())
            .map(|_| backend.kv_cache(kv.num_blocks, kv.block_size, kvd))
            .collect::<Result<Vec<_>>>()?;
        let step_weight_bytes = ld.done - gathered_only;
        Ok(Stage {
            step_weight_bytes,
            layers_ns: std::sync::atomic::AtomicU64::new(0),
            rope: Rope::new(config),
            config: config.clone(),
            range,
            kv_geometry: kv,
            embed,
            layers,
            kv: kv_caches,
            final_norm,
            lm_head,
            backend,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The time the last forward call spent in the transformer layers (the backend synchronized
    /// before the clock stops, so an asynchronous device is timed to its kernels' end).
    pub fn last_layers_time(&self) -> std::time::Duration {
        std::time::Duration::from_nanos(self.layers_ns.load(std::sync::atomic::Ordering::Relaxed))
    }

    pub fn layers(&self) -> Range<usize> {
        self.range.clone()
    }

    pub fn is_first(&self) -> bool {
        self.range.start == 0
    }

    pub fn is_last(&self) -> bool {
        self.range.end == self.config.num_layers
    }

    /// Keeps only layers `keep` (a sub-range of this stage's), with their weights and KV cache
    /// as they are: a plan change that shrinks a stage need not reload it or move its KV.
    pub fn retain(&mut self, keep: Range<usize>) -> Result<()> {
        if keep.is_empty() || keep.start < self.range.start || keep.end > self.range.end {
            return Err(EngineError::LayerRange { start: keep.start, end: keep.end, num_layers: self.config.num_layers });
        }
        let (lo, hi) = (keep.start - self.range.start, keep.end - self.range.start);
        let old_len = self.range.len();
        self.layers.truncate(hi);
        self.layers.drain(..lo);
        self.kv.truncate(hi);
        self.kv.drain(..lo);
        let (first, last) = (keep.start == 0, keep.end == self.config.num_layers);
        if !(first || (last && self.config.tie_word_embeddings)) {
            self.embed = None;
        }
        if !last {
            self.final_norm = None;
            self.lm_head = None;
        }
        // Layers dominate what a step reads; scale the estimate with them.
        self.step_weight_bytes = self.step_weight_bytes * keep.len() / old_len.max(1);
        self.range = keep;
        Ok(())
    }

    /// Grows to `to` (which holds every layer it has): loads only the layers it lacks (and the
    /// embedding or the LM head if `to` now starts or ends the model) from `ckpt`, with empty KV
    /// for them; the layers it had keep their weights and KV. A survivor taking over a lost
    /// neighbour's range so reads only that range, not its own again.
    pub fn extend(&mut self, ckpt: &Checkpoint, to: Range<usize>) -> Result<()> {
        let n = self.config.num_layers;
        if to.start > self.range.start || to.end < self.range.end || to.end > n {
            return Err(EngineError::LayerRange { start: to.start, end: to.end, num_layers: n });
        }
        let config = self.config.clone();
        let (h, v, kvd) = (config.hidden_size, config.vocab_size, config.kv_dim());
        let (first, last) = (to.start == 0, to.end == n);
        let mut ld = Loader { ckpt, backend: &self.backend, done: 0, total: 0, progress: &mut |_, _| {} };
        let before = ld.layers(&config, to.start..self.range.start)?;
        let after = ld.layers(&config, self.range.end..to.end)?;
        let embed = match &self.embed {
            None if first || (last && config.tie_word_embeddings) => Some(ld.get("model.embed_tokens.weight", &[v, h])?),
            _ => None,
        };
        let gathered = if first && !(last && config.tie_word_embeddings) && embed.is_some() { v * h * 2 } else { 0 };
        let tail = if last && self.final_norm.is_none() { Some(ld.tail(&config)?) } else { None };
        let g = self.kv_geometry;
        let kv_before = (0..before.len()).map(|_| self.backend.kv_cache(g.num_blocks, g.block_size, kvd)).collect::<Result<Vec<_>>>()?;
        let kv_after = (0..after.len()).map(|_| self.backend.kv_cache(g.num_blocks, g.block_size, kvd)).collect::<Result<Vec<_>>>()?;
        let read = ld.done.saturating_sub(gathered);
        if embed.is_some() {
            self.embed = embed;
        }
        if let Some((norm, head)) = tail {
            self.final_norm = Some(norm);
            self.lm_head = head;
        }
        self.layers.splice(0..0, before);
        self.layers.extend(after);
        self.kv.splice(0..0, kv_before);
        self.kv.extend(kv_after);
        self.step_weight_bytes += read;
        self.range = to;
        Ok(())
    }

    /// The K/V contents of `blocks` for layers `layers` (absolute layer numbers, within this
    /// stage), layer after layer.
    pub fn export_kv(&self, layers: Range<usize>, blocks: &[u32]) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        for l in self.local_layers(&layers)? {
            out.extend(self.backend.read_kv_blocks(&self.kv[l], blocks, self.kv_geometry.block_size)?);
        }
        Ok(out)
    }

    /// Writes what [`Stage::export_kv`] produced (for the same layers and blocks) into this
    /// stage's cache.
    pub fn import_kv(&mut self, layers: Range<usize>, blocks: &[u32], data: &[f32]) -> Result<()> {
        let local = self.local_layers(&layers)?;
        let per_layer = data.len() / local.len().max(1);
        if per_layer * local.len() != data.len() {
            return Err(EngineError::BadBatch(format!("{} KV values do not split over {} layers", data.len(), local.len())));
        }
        for (i, l) in local.enumerate() {
            self.backend.write_kv_blocks(&mut self.kv[l], blocks, self.kv_geometry.block_size, &data[i * per_layer..(i + 1) * per_layer])?;
        }
        Ok(())
    }

    /// Indices into this stage's layers of the absolute range `layers`.
    fn local_layers(&self, layers: &Range<usize>) -> Result<Range<usize>> {
        if layers.start < self.range.start || layers.end > self.range.end || layers.is_empty() {
            return Err(EngineError::LayerRange { start: layers.start, end: layers.end, num_layers: self.range.end });
        }
        Ok(layers.start - self.range.start..layers.end - self.range.start)
    }

    pub fn kv_geometry(&self) -> KvGeometry {
        self.kv_geometry
    }

    /// Weight bytes read by one forward step: the memory-bandwidth floor's numerator.
    pub fn step_weight_bytes(&self) -> usize {
        self.step_weight_bytes
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    fn attn_shape(&self) -> AttnShape {
        AttnShape {
            num_heads: self.config.num_heads,
            num_kv_heads: self.config.num_kv_heads,
            head_dim: self.config.head_dim,
            block_size: self.kv_geometry.block_size,
            sliding_window: self.config.sliding_window,
        }
    }

    /// Runs one ragged batch through the stage's layers. Each chunk's new K/V are written into
    /// its blocks; the caller (the scheduler) owns which blocks those are.
    pub fn forward(&mut self, layout: &BatchLayout, input: StageInput<'_>) -> Result<StageOutput> {
        // The KV memory is the only state a step mutates: take it out so the step can borrow
        // the rest of the stage shared while it runs in the backend's execution context.
        let mut kv = std::mem::take(&mut self.kv);
        let result = self.backend.run_step(|| self.forward_in(&mut kv, layout, input));
        self.kv = kv;
        result
    }

    fn forward_in(&self, kv: &mut [B::KvCache], layout: &BatchLayout, input: StageInput<'_>) -> Result<StageOutput> {
        let c = &self.config;
        let g = self.kv_geometry;
        layout.validate(g.block_size, g.num_blocks, c.max_position_embeddings)?;
        let t = layout.num_tokens();
        let (h, qd, kvd, im) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let be = &self.backend;
        let batch = be.prepare_batch(layout, &self.rope, self.attn_shape())?;

        let mut x = match (input, &self.embed, self.range.start == 0) {
            (StageInput::Tokens(tokens), Some(embed), true) => {
                if tokens.len() != t {
                    return Err(EngineError::BadBatch(format!("{} tokens for a batch of {t}", tokens.len())));
                }
                let mut x = be.zeros(t * h)?;
                be.embed(embed, tokens, &mut x)?;
                x
            }
            (StageInput::Hidden(hidden), _, false) => {
                if hidden.len() != t * h {
                    return Err(EngineError::BadBatch(format!(
                        "{} hidden values for {t} tokens of width {h}",
                        hidden.len()
                    )));
                }
                be.upload(hidden)?
            }
            (StageInput::Tokens(_), _, _) => {
                return Err(EngineError::BadBatch("token ids sent to a stage that does not start at layer 0".into()))
            }
            (StageInput::Hidden(_), _, _) => {
                return Err(EngineError::BadBatch("hidden states sent to the first stage".into()))
            }
        };

        let mut normed = be.zeros(t * h)?;
        let mut q = be.zeros(t * qd)?;
        let mut k = be.zeros(t * kvd)?;
        let mut v = be.zeros(t * kvd)?;
        let mut attn = be.zeros(t * qd)?;
        let mut proj = be.zeros(t * h)?;
        let mut gate = be.zeros(t * im)?;
        let mut up = be.zeros(t * im)?;
        let mut act = be.zeros(t * im)?;
        let layers_started = std::time::Instant::now();
        for (layer, cache) in self.layers.iter().zip(kv.iter_mut()) {
            be.rms_norm(&x, &layer.input_norm, c.rms_norm_eps, &mut normed)?;
            be.matmul_many(
                &normed,
                t,
                &mut [
                    MatmulJob { weight: &layer.q, bias: layer.q_bias.as_ref(), out: &mut q },
                    MatmulJob { weight: &layer.k, bias: layer.k_bias.as_ref(), out: &mut k },
                    MatmulJob { weight: &layer.v, bias: layer.v_bias.as_ref(), out: &mut v },
                ],
            )?;
            be.rope(&batch, &mut q, c.num_heads, c.head_dim)?;
            be.rope(&batch, &mut k, c.num_kv_heads, c.head_dim)?;
            be.write_kv(&batch, cache, &k, &v)?;
            be.attention(&batch, cache, &q, &mut attn)?;
            be.matmul(&attn, t, &layer.o, layer.o_bias.as_ref(), &mut proj)?;
            be.add(&mut x, &proj)?;

            be.rms_norm(&x, &layer.post_norm, c.rms_norm_eps, &mut normed)?;
            be.matmul_many(
                &normed,
                t,
                &mut [
                    MatmulJob { weight: &layer.gate, bias: layer.gate_bias.as_ref(), out: &mut gate },
                    MatmulJob { weight: &layer.up, bias: layer.up_bias.as_ref(), out: &mut up },
                ],
            )?;
            be.silu_mul(&gate, &up, &mut act)?;
            be.matmul(&act, t, &layer.down, layer.down_bias.as_ref(), &mut proj)?;
            be.add(&mut x, &proj)?;
        }
        be.synchronize()?;
        self.layers_ns.store(layers_started.elapsed().as_nanos() as u64, std::sync::atomic::Ordering::Relaxed);

        let (Some(norm), true) = (&self.final_norm, self.is_last()) else {
            return Ok(StageOutput::Hidden(be.download(&x)?));
        };
        let rows = layout.logit_rows();
        let vocab = c.vocab_size;
        if rows.is_empty() {
            return Ok(StageOutput::Logits { rows: 0, vocab, data: Vec::new() });
        }
        let mut last = be.zeros(rows.len() * h)?;
        be.gather_rows(&x, h, &rows, &mut last)?;
        let mut last_normed = be.zeros(rows.len() * h)?;
        be.rms_norm(&last, norm, c.rms_norm_eps, &mut last_normed)?;
        let head = match (&self.lm_head, &self.embed) {
            (Some(head), _) | (None, Some(head)) => head,
            (None, None) => return Err(EngineError::BadBatch("last stage has no LM head".into())),
        };
        let mut logits = be.zeros(rows.len() * vocab)?;
        be.matmul(&last_normed, rows.len(), head, None, &mut logits)?;
        Ok(StageOutput::Logits {
            rows: rows.len(),
            vocab,
            data: be.download(&logits)?,
        })
    }
}
