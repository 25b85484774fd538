//! Safetensors weights, single-file or sharded, memory-mapped and handed out in their stored dtype.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::Dtype as StDtype;

use crate::config::read_json;
use crate::error::{EngineError, Result};

/// Storage types the engine computes with; everything else is refused at load time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
        }
    }
}

/// One memory-mapped safetensors file.
struct Shard {
    path: PathBuf,
    map: Mmap,
}

/// Where one tensor lives.
#[derive(Clone)]
struct Entry {
    shard: usize,
    dtype: DType,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// A tensor's bytes as stored, borrowed from the mapping that keeps them alive (none for the
/// shapes of a config-only checkpoint).
#[derive(Clone)]
pub struct TensorBytes {
    shards: Arc<Vec<Shard>>,
    shard: usize,
    start: usize,
    end: usize,
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorBytes {
    /// The stored bytes (empty for a config-only checkpoint's tensor).
    pub fn bytes(&self) -> &[u8] {
        match self.shards.get(self.shard) {
            Some(s) => &s.map[self.start..self.end],
            None => &[],
        }
    }

    /// The tensor's size as stored (whether or not its bytes are here).
    pub fn nbytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }

    /// Whether its bytes are here (not a config-only checkpoint's shape).
    pub fn has_data(&self) -> bool {
        !self.shards.is_empty()
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The tensor converted to f32 (for small tensors: norms, biases).
    pub fn to_f32(&self) -> Vec<f32> {
        let b = self.bytes();
        match self.dtype {
            DType::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            DType::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            DType::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
        }
    }
}

/// All tensors of a checkpoint directory, by name; or, config-only, every tensor a stage asks
/// for in the shape it asks, with no bytes (for a device that models time, not values).
pub struct Checkpoint {
    shards: Arc<Vec<Shard>>,
    entries: HashMap<String, Entry>,
    config_only: Option<DType>,
}

impl Checkpoint {
    /// A checkpoint of shapes alone, of `dtype`: what `--device mock:GPU` loads, so a model
    /// directory needs only config.json and the tokenizer.
    pub fn config_only(dtype: DType) -> Self {
        Checkpoint { shards: Arc::new(Vec::new()), entries: HashMap::new(), config_only: Some(dtype) }
    }

    /// The checkpoint `backend` runs from `dir`: the weights, or only their shapes for a
    /// backend that reads none (a mock device; `dir` may hold no weights then).
    pub fn for_backend<B: crate::Backend>(dir: &Path, backend: &B) -> Result<Self> {
        if backend.reads_weights() {
            Checkpoint::open(dir)
        } else {
            Ok(Checkpoint::config_only(DType::BF16))
        }
    }

    /// Whether this holds only shapes.
    pub fn is_config_only(&self) -> bool {
        self.config_only.is_some()
    }

    /// Opens `model.safetensors`, or every shard listed in `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let value = read_json(&index)?;
            let map = value
                .get("weight_map")
                .and_then(|v| v.as_object())
                .ok_or_else(|| EngineError::field(&index, "weight_map", "is required (tensor name -> file)"))?;
            let mut files: Vec<PathBuf> = Vec::new();
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    EngineError::field(&index, format!("weight_map.{name}"), "expected a file name")
                })?;
                if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                    return Err(EngineError::field(&index, format!("weight_map.{name}"), "file must be in the model directory"));
                }
                let p = dir.join(file);
                if !files.contains(&p) {
                    files.push(p);
                }
            }
            files.sort();
            files
        } else {
            vec![dir.join("model.safetensors")]
        };

        let mut shards = Vec::with_capacity(files.len());
        let mut entries = HashMap::new();
        for (i, path) in files.into_iter().enumerate() {
            let file = std::fs::File::open(&path).map_err(|e| EngineError::io(&path, e))?;
            // SAFETY: the mapping is read-only; a checkpoint rewritten while mapped is outside
            // what we support (as in every mmap-based loader).
            let map = unsafe { Mmap::map(&file) }.map_err(|e| EngineError::io(&path, e))?;
            let (header_len, meta) = safetensors::SafeTensors::read_metadata(&map[..]).map_err(|e| EngineError::Safetensors {
                path: path.clone(),
                message: e.to_string(),
            })?;
            let data_start = 8 + header_len;
            for (name, info) in meta.tensors() {
                let dtype = match info.dtype {
                    StDtype::F32 => DType::F32,
                    StDtype::F16 => DType::F16,
                    StDtype::BF16 => DType::BF16,
                    other => {
                        return Err(EngineError::UnsupportedDtype {
                            path: path.clone(),
                            name,
                            found: format!("{other:?}"),
                        })
                    }
                };
                let (s, e) = info.data_offsets;
                entries.insert(
                    name,
                    Entry {
                        shard: i,
                        dtype,
                        shape: info.shape.clone(),
                        start: data_start + s,
                        end: data_start + e,
                    },
                );
            }
            shards.push(Shard { path, map });
        }
        Ok(Checkpoint {
            shards: Arc::new(shards),
            entries,
            config_only: None,
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The file a tensor is in (or the directory's main file), for error messages.
    pub fn file_of(&self, name: &str) -> PathBuf {
        let shard = self.entries.get(name).map_or(0, |e| e.shard);
        self.shards.get(shard).map(|s| s.path.clone()).unwrap_or_default()
    }

    /// A tensor whose shape must be exactly `shape`.
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<TensorBytes> {
        if let Some(dtype) = self.config_only {
            return Ok(TensorBytes { shards: self.shards.clone(), shard: 0, start: 0, end: 0, name: name.to_string(), dtype, shape: shape.to_vec() });
        }
        let entry = self.entries.get(name).ok_or_else(|| EngineError::MissingTensor {
            path: self.file_of(name),
            name: name.to_string(),
        })?;
        if entry.shape != shape {
            return Err(EngineError::ShapeMismatch {
                path: self.shards[entry.shard].path.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                found: entry.shape.clone(),
            });
        }
        Ok(TensorBytes {
            shards: self.shards.clone(),
            shard: entry.shard,
            start: entry.start,
            end: entry.end,
            name: name.to_string(),
            dtype: entry.dtype,
            shape: entry.shape.clone(),
        })
    }

    /// Total bytes of all tensors (what a progress bar counts).
    pub fn total_bytes(&self) -> usize {
        self.entries.values().map(|e| e.end - e.start).sum()
    }
}
