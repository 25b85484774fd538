//! `config.json` of a Hugging Face checkpoint, read into the one shape every supported family shares.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{EngineError, Result};

/// Which Hugging Face class wrote the checkpoint. All three are the same decoder with small
/// differences: Qwen2 has q/k/v biases, Mistral may use a sliding attention window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
}

impl Architecture {
    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
        }
    }
}

/// How rotary position frequencies are adjusted for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (HF `linear`).
    Linear { factor: f32 },
    /// Llama 3.1's wavelength-dependent scaling (HF `llama3`).
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
}

/// The shape and numerics of a decoder-only model, independent of which family wrote it.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    /// Biases on the q/k/v projections (always on for Qwen2, `attention_bias` for Llama).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama `attention_bias`).
    pub o_bias: bool,
    /// Biases on the MLP projections (Llama `mlp_bias`).
    pub mlp_bias: bool,
    /// Attend only to the last `sliding_window` positions (Mistral; Qwen2 with `use_sliding_window`).
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// `torch_dtype` / `dtype` as written; informational, weights keep their stored dtype.
    pub torch_dtype: Option<String>,
}

/// Typed reads of a JSON object, each error naming the file and the field.
pub(crate) struct Fields<'a> {
    pub path: &'a Path,
    pub obj: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    pub fn new(path: &'a Path, value: &'a Value) -> Result<Self> {
        let obj = value
            .as_object()
            .ok_or_else(|| EngineError::field(path, "<root>", "expected a JSON object"))?;
        Ok(Fields { path, obj })
    }

    fn err(&self, field: &str, message: impl Into<String>) -> EngineError {
        EngineError::field(self.path, field, message)
    }

    fn present(&self, field: &str) -> Option<&'a Value> {
        self.obj.get(field).filter(|v| !v.is_null())
    }

    pub fn usize(&self, field: &str) -> Result<usize> {
        self.opt_usize(field)?
            .ok_or_else(|| self.err(field, "is required"))
    }

    pub fn opt_usize(&self, field: &str) -> Result<Option<usize>> {
        match self.present(field) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.err(field, format!("expected a non-negative integer, found {v}"))),
        }
    }

    pub fn opt_f32(&self, field: &str) -> Result<Option<f32>> {
        match self.present(field) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(|n| Some(n as f32))
                .ok_or_else(|| self.err(field, format!("expected a number, found {v}"))),
        }
    }

    pub fn opt_bool(&self, field: &str) -> Result<Option<bool>> {
        match self.present(field) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(field, format!("expected true or false, found {v}"))),
        }
    }

    pub fn opt_str(&self, field: &str) -> Result<Option<&'a str>> {
        match self.present(field) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.err(field, format!("expected a string, found {v}"))),
        }
    }

    /// A token id given as one integer or a list of integers (HF allows both for `eos_token_id`).
    pub fn token_ids(&self, field: &str) -> Result<Vec<u32>> {
        let bad = || self.err(field, "expected a token id or a list of token ids");
        match self.present(field) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(bad))
                .collect(),
            Some(v) => Ok(vec![v.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(bad)?]),
        }
    }
}

pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| EngineError::Json {
        path: path.to_path_buf(),
        source,
    })
}

impl ModelConfig {
    /// Reads `config.json` from a model directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let value = read_json(&path)?;
        Self::from_json(&path, &value)
    }

    /// Parses a `config.json` value; `path` is only used to name the file in errors.
    pub fn from_json(path: &Path, value: &Value) -> Result<Self> {
        let f = Fields::new(path, value)?;
        let archs = f
            .obj
            .get("architectures")
            .and_then(Value::as_array)
            .ok_or_else(|| EngineError::field(path, "architectures", "is required (a list with one class name)"))?;
        let arch_name = archs
            .first()
            .and_then(Value::as_str)
            .ok_or_else(|| EngineError::field(path, "architectures", "expected a list of class names"))?;
        let architecture = match arch_name {
            "LlamaForCausalLM" => Architecture::Llama,
            "MistralForCausalLM" => Architecture::Mistral,
            "Qwen2ForCausalLM" => Architecture::Qwen2,
            other => {
                return Err(EngineError::UnsupportedArchitecture {
                    path: path.to_path_buf(),
                    found: other.to_string(),
                })
            }
        };

        let hidden_size = f.usize("hidden_size")?;
        let num_heads = f.usize("num_attention_heads")?;
        let num_kv_heads = f.opt_usize("num_key_value_heads")?.unwrap_or(num_heads);
        let num_layers = f.usize("num_hidden_layers")?;
        let intermediate_size = f.usize("intermediate_size")?;
        let vocab_size = f.usize("vocab_size")?;
        for (field, v) in [
            ("hidden_size", hidden_size),
            ("num_attention_heads", num_heads),
            ("num_key_value_heads", num_kv_heads),
            ("num_hidden_layers", num_layers),
            ("intermediate_size", intermediate_size),
            ("vocab_size", vocab_size),
        ] {
            if v == 0 {
                return Err(f.err(field, "must be positive"));
            }
        }
        if num_heads % num_kv_heads != 0 {
            return Err(f.err(
                "num_key_value_heads",
                format!("{num_kv_heads} does not divide num_attention_heads {num_heads}"),
            ));
        }
        let head_dim = match f.opt_usize("head_dim")? {
            Some(d) => d,
            None => {
                if hidden_size % num_heads != 0 {
                    return Err(f.err("head_dim", "absent, and hidden_size is not a multiple of num_attention_heads"));
                }
                hidden_size / num_heads
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(f.err("head_dim", format!("{head_dim} must be a positive even number")));
        }

        // Transformers 5 writes `rope_parameters` (with `rope_theta` inside) instead of
        // `rope_scaling` and a top-level `rope_theta`; checkpoints in the wild have either.
        let rope_parameters = f.obj.get("rope_parameters").filter(|v| v.is_object());
        let rope_theta = match (f.opt_f32("rope_theta")?, rope_parameters) {
            (Some(theta), _) => theta,
            (None, Some(params)) => Fields::new(path, params)?
                .opt_f32("rope_theta")
                .map_err(|_| EngineError::field(path, "rope_parameters.rope_theta", "expected a number"))?
                .unwrap_or(10_000.0),
            (None, None) => 10_000.0,
        };
        let max_position_embeddings = f.opt_usize("max_position_embeddings")?.unwrap_or(2048);
        let rope_scaling = match f.obj.get("rope_scaling").filter(|v| !v.is_null()) {
            Some(v) => parse_rope_scaling(path, Some(v), "rope_scaling")?,
            None => parse_rope_scaling(path, rope_parameters, "rope_parameters")?,
        };

        let qkv_bias = match architecture {
            Architecture::Qwen2 => true,
            _ => f.opt_bool("attention_bias")?.unwrap_or(false),
        };
        let o_bias = match architecture {
            Architecture::Llama => f.opt_bool("attention_bias")?.unwrap_or(false),
            _ => false,
        };
        let mlp_bias = match architecture {
            Architecture::Llama => f.opt_bool("mlp_bias")?.unwrap_or(false),
            _ => false,
        };
        let sliding_window = match architecture {
            Architecture::Mistral => f.opt_usize("sliding_window")?,
            Architecture::Qwen2 => {
                if f.opt_bool("use_sliding_window")?.unwrap_or(false) {
                    // Qwen2 applies the window only to layers from `max_window_layers` on.
                    if f.opt_usize("max_window_layers")?.is_some_and(|m| m < num_layers) {
                        return Err(f.err(
                            "use_sliding_window",
                            "sliding window on only some layers (max_window_layers) is not supported",
                        ));
                    }
                    f.opt_usize("sliding_window")?
                } else {
                    None
                }
            }
            Architecture::Llama => None,
        };
        if sliding_window == Some(0) {
            return Err(f.err("sliding_window", "must be positive"));
        }

        Ok(ModelConfig {
            architecture,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            max_position_embeddings,
            rms_norm_eps: f.opt_f32("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias,
            sliding_window,
            bos_token_id: f.token_ids("bos_token_id")?.first().copied(),
            eos_token_ids: f.token_ids("eos_token_id")?,
            torch_dtype: f.opt_str("torch_dtype")?.or(f.opt_str("dtype")?).map(str::to_string),
        })
    }

    /// Number of query heads per KV head.
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Parameters in the layers [start, end), plus the embedding and head where the stage has them.
    pub fn stage_param_count(&self, start: usize, end: usize) -> usize {
        let h = self.hidden_size;
        let per_layer = h * (self.q_dim() + 2 * self.kv_dim())
            + self.q_dim() * h
            + 3 * h * self.intermediate_size
            + 2 * h;
        let mut n = per_layer * (end - start);
        if start == 0 {
            n += self.vocab_size * h;
        }
        if end == self.num_layers {
            n += h;
            if !self.tie_word_embeddings || start != 0 {
                n += self.vocab_size * h;
            }
        }
        n
    }
}

fn parse_rope_scaling(path: &Path, value: Option<&Value>, key: &str) -> Result<RopeScaling> {
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Ok(RopeScaling::None);
    };
    let owned_path: PathBuf = path.to_path_buf();
    let f = Fields::new(&owned_path, value).map_err(|_| EngineError::field(path, key, "expected an object or null"))?;
    let kind = f
        .opt_str("rope_type")?
        .or(f.opt_str("type")?)
        .ok_or_else(|| EngineError::field(path, format!("{key}.rope_type"), "is required"))?;
    let factor = || {
        f.opt_f32("factor")?
            .filter(|x| *x > 0.0)
            .ok_or_else(|| EngineError::field(path, format!("{key}.factor"), "is required and must be positive"))
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear { factor: factor()? }),
        "llama3" => {
            let need = |name: &str| {
                f.opt_f32(name)?
                    .ok_or_else(|| EngineError::field(path, format!("{key}.{name}"), "is required for llama3 scaling"))
            };
            let low_freq_factor = need("low_freq_factor")?;
            let high_freq_factor = need("high_freq_factor")?;
            if high_freq_factor <= low_freq_factor {
                return Err(EngineError::field(
                    path,
                    format!("{key}.high_freq_factor"),
                    "must be greater than low_freq_factor",
                ));
            }
            let original = f
                .opt_usize("original_max_position_embeddings")?
                .ok_or_else(|| {
                    EngineError::field(path, format!("{key}.original_max_position_embeddings"), "is required for llama3 scaling")
                })?;
            Ok(RopeScaling::Llama3 {
                factor: factor()?,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: original,
            })
        }
        other => Err(EngineError::field(
            path,
            format!("{key}.rope_type"),
            format!("{other:?} is not supported (supported: default, linear, llama3)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<ModelConfig> {
        ModelConfig::from_json(Path::new("config.json"), &v)
    }

    fn base() -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
            "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 256
        })
    }

    #[test]
    fn defaults_and_derived_head_dim() {
        let c = parse(base()).unwrap();
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.group_size(), 2);
        assert_eq!(c.rope_scaling, RopeScaling::None);
        assert!(!c.qkv_bias);
    }

    #[test]
    fn errors_name_the_field() {
        let mut v = base();
        v["architectures"] = json!(["GPT2LMHeadModel"]);
        let e = parse(v).unwrap_err().to_string();
        assert!(e.contains("config.json") && e.contains("GPT2LMHeadModel"), "{e}");

        let mut v = base();
        v["num_key_value_heads"] = json!(3);
        let e = parse(v).unwrap_err().to_string();
        assert!(e.contains("`num_key_value_heads`"), "{e}");

        let mut v = base();
        v["hidden_size"] = json!("big");
        let e = parse(v).unwrap_err().to_string();
        assert!(e.contains("`hidden_size`") && e.contains("integer"), "{e}");

        let mut v = base();
        v["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0});
        let e = parse(v).unwrap_err().to_string();
        assert!(e.contains("rope_scaling.rope_type"), "{e}");

        let mut v = base();
        v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0});
        let e = parse(v).unwrap_err().to_string();
        assert!(e.contains("rope_scaling.low_freq_factor"), "{e}");
    }

    #[test]
    fn transformers_5_rope_parameters_are_read() {
        let mut v = base();
        v["rope_parameters"] = json!({"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0});
        let c = parse(v).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 2.0 });
        let mut v = base();
        v["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 1e6});
        let c = parse(v).unwrap();
        assert_eq!((c.rope_theta, c.rope_scaling), (1e6, RopeScaling::None));
    }

    #[test]
    fn qwen2_has_biases_and_eos_lists_parse() {
        let mut v = base();
        v["architectures"] = json!(["Qwen2ForCausalLM"]);
        v["eos_token_id"] = json!([5, 7]);
        v["head_dim"] = json!(32);
        let c = parse(v).unwrap();
        assert!(c.qkv_bias && !c.o_bias);
        assert_eq!(c.eos_token_ids, vec![5, 7]);
        assert_eq!(c.head_dim, 32);
    }
}
