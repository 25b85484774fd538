//! The engine's typed errors: every failure names the file and field (or tensor) it came from.

use std::path::PathBuf;

/// Errors raised while loading a checkpoint or running a stage.
///
/// Loading errors leave nothing half-built: the caller gets no engine. Forward errors
/// (`BadBatch`, `KvCacheExhausted`) are raised before any KV slot is written, so the cache is
/// unchanged.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: field `{field}`: {message}")]
    Field {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error("{path}: unsupported architecture {found:?} (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)")]
    UnsupportedArchitecture { path: PathBuf, found: String },
    #[error("{path}: tensor `{name}` is missing")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{path}: tensor `{name}` has dtype {found}, supported: F32, F16, BF16")]
    UnsupportedDtype {
        path: PathBuf,
        name: String,
        found: String,
    },
    #[error("{path}: not a valid safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("{path}: tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("invalid layer range {start}..{end} for a model with {num_layers} layers")]
    LayerRange {
        start: usize,
        end: usize,
        num_layers: usize,
    },
    #[error("invalid batch: {0}")]
    BadBatch(String),
    #[error("KV cache exhausted: {needed} more blocks needed, {free} free")]
    KvCacheExhausted { needed: usize, free: usize },
    #[error("backend unavailable: {0}")]
    BackendUnavailable(String),
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

impl EngineError {
    pub(crate) fn field(path: impl Into<PathBuf>, field: impl Into<String>, message: impl Into<String>) -> Self {
        EngineError::Field {
            path: path.into(),
            field: field.into(),
            message: message.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        EngineError::Io {
            path: path.into(),
            source,
        }
    }
}
