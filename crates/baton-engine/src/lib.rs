//! Baton's model engine: Hugging Face checkpoints, the backend boundary and its CPU backend,
//! pipeline stages over a paged KV cache, and sampling.
//!
//! Decision logic here is pure ([`kv::BlockAllocator`], [`sampling`]); devices sit behind
//! [`backend::Backend`]; a [`stage::Stage`] runs any contiguous range of layers.

pub mod backend;
pub mod checkpoint;
pub mod config;
pub mod demo;
pub mod error;
pub mod generate;
pub mod kv;
pub mod rng;
pub mod rope;
pub mod sampling;
pub mod stage;
pub mod tokenizer;
pub mod worker;

pub use backend::cpu::{Compute, CpuBackend};
pub use backend::mock::MockBackend;
pub use backend::{Backend, BatchLayout, SeqChunk};
pub use checkpoint::{Checkpoint, DType};
pub use config::{Architecture, ModelConfig};
pub use error::{EngineError, Result};
pub use generate::{Generation, LocalRunner};
pub use kv::{BlockAllocator, BlockHash, BlockTable, KvGeometry, PrefixHasher};
pub use sampling::{FinishReason, SampledToken, Sampled, SamplerSet, SamplingParams, SequenceSampler};
pub use stage::{Stage, StageInput, StageOutput};
pub use tokenizer::{Detokenizer, TextTokenizer};
pub use worker::{SequenceStart, StageWorker, StepResult};
