//! One pipeline stage's work, whoever drives it: the layer range a plan gives it, loaded on a
//! backend with its KV cache, and on the last stage the sampling state of every sequence. A
//! pipeline head's shard and every stage node's shard each run one, so loading, the forward
//! pass and sampling are written once, generic over the `Backend`.

use std::ops::Range;
use std::path::Path;

use crate::backend::{Backend, BatchLayout};
use crate::error::{EngineError, Result};
use crate::kv::KvGeometry;
use crate::sampling::{SampledToken, SamplerSet, SamplingParams};
use crate::stage::{Stage, StageInput, StageOutput};
use crate::{Checkpoint, ModelConfig};

/// A sequence the stage has not sampled for yet (or not since a plan change): how to sample
/// it, and what it produced before.
#[derive(Debug, Clone)]
pub struct SequenceStart<'a> {
    pub id: u64,
    pub params: SamplingParams,
    pub eos: &'a [u32],
    pub prompt: &'a [u32],
    pub generated: &'a [u32],
}

/// What one step gives: hidden states for the next stage, or (last stage) a token for every
/// sequence that asked.
#[derive(Debug, Clone, PartialEq)]
pub enum StepResult {
    Hidden(Vec<f32>),
    Sampled(Vec<SampledToken>),
}

/// A loaded stage and its samplers.
pub struct StageWorker<B: Backend> {
    stage: Stage<B>,
    model_dir: std::path::PathBuf,
    layers: Range<usize>,
    geometry: KvGeometry,
    samplers: SamplerSet,
}

impl<B: Backend> StageWorker<B> {
    /// Loads layers `layers` of the checkpoint in `model_dir` onto `backend`, with a KV cache
    /// of `geometry`.
    pub fn load(backend: B, model_dir: &Path, layers: Range<usize>, geometry: KvGeometry) -> Result<Self> {
        Self::load_with_progress(backend, model_dir, layers, geometry, &mut |_, _| {})
    }

    /// [`StageWorker::load`], calling `progress(done, total)` as its layers load.
    pub fn load_with_progress(backend: B, model_dir: &Path, layers: Range<usize>, geometry: KvGeometry, progress: &mut dyn FnMut(usize, usize)) -> Result<Self> {
        let config = ModelConfig::from_dir(model_dir)?;
        let ckpt = Checkpoint::for_backend(model_dir, &backend)?;
        let stage = Stage::load(backend, &config, &ckpt, layers.clone(), geometry, progress)?;
        Ok(StageWorker { stage, model_dir: model_dir.to_path_buf(), layers, geometry, samplers: SamplerSet::default() })
    }

    pub fn layers(&self) -> Range<usize> {
        self.layers.clone()
    }

    /// The time the last step spent in the transformer layers.
    pub fn last_layers_time(&self) -> std::time::Duration {
        self.stage.last_layers_time()
    }

    /// Whether this worker holds every layer of `layers` with a cache of `geometry`: a new plan
    /// giving it those (the same range, or a smaller one) need not reload it, nor move their KV.
    pub fn holds(&self, layers: &Range<usize>, geometry: KvGeometry) -> bool {
        self.geometry == geometry && !layers.is_empty() && layers.start >= self.layers.start && layers.end <= self.layers.end
    }

    /// Whether `layers` (with a cache of `geometry`) contains every layer this worker holds,
    /// and more: it can [`extend`](Self::extend) to them instead of loading them all.
    pub fn grows_to(&self, layers: &Range<usize>, geometry: KvGeometry) -> bool {
        self.geometry == geometry && layers.start <= self.layers.start && layers.end >= self.layers.end && layers.len() > self.layers.len()
    }

    /// Grows to `layers` (see [`grows_to`](Self::grows_to)), loading only the layers it lacks;
    /// the ones it had keep their weights and KV.
    pub fn extend(&mut self, layers: Range<usize>) -> Result<()> {
        let ckpt = Checkpoint::for_backend(&self.model_dir, self.stage.backend())?;
        self.stage.extend(&ckpt, layers.clone())?;
        self.layers = layers;
        Ok(())
    }

    /// Shrinks to `layers` (which it [`holds`](Self::holds)), keeping their weights and KV.
    pub fn retain(&mut self, layers: Range<usize>) -> Result<()> {
        self.stage.retain(layers.clone())?;
        self.layers = layers;
        Ok(())
    }

    /// The K/V contents of `blocks` for `layers` (absolute, within this stage): what moves to
    /// a layer's new owner when a planned change re-places it.
    pub fn export_kv(&self, layers: Range<usize>, blocks: &[u32]) -> Result<Vec<f32>> {
        self.stage.export_kv(layers, blocks)
    }

    /// Writes what [`StageWorker::export_kv`] gave (same layers and blocks) into this cache.
    pub fn import_kv(&mut self, layers: Range<usize>, blocks: &[u32], data: &[f32]) -> Result<()> {
        self.stage.import_kv(layers, blocks, data)
    }

    /// Forgets every sequence's sampling state (a new plan re-sends them all).
    pub fn reset_samplers(&mut self) {
        self.samplers = SamplerSet::default();
    }

    /// One step: drops the samplers of `released`, sets up those of `starts`, runs the layers,
    /// and on the last stage samples one token for each chunk that asked, in batch order
    /// (`ids[i]` is the sequence of chunk `i`).
    pub fn step<'a>(
        &mut self,
        layout: &BatchLayout,
        input: StageInput<'_>,
        ids: &[u64],
        released: impl IntoIterator<Item = u64>,
        starts: impl IntoIterator<Item = SequenceStart<'a>>,
    ) -> Result<StepResult> {
        self.samplers.release(released);
        for s in starts {
            self.samplers.resume(s.id, s.params, s.eos, s.prompt, s.generated);
        }
        if ids.len() != layout.chunks.len() {
            return Err(EngineError::BadBatch(format!("{} sequence ids for {} chunks", ids.len(), layout.chunks.len())));
        }
        match self.stage.forward(layout, input)? {
            StageOutput::Hidden(h) => Ok(StepResult::Hidden(h)),
            StageOutput::Logits { vocab, data, .. } => {
                let sampling = layout.chunks.iter().zip(ids).filter(|(c, _)| c.wants_logits).map(|(_, &id)| id);
                Ok(StepResult::Sampled(self.samplers.sample(sampling, &data, vocab)?))
            }
        }
    }
}
