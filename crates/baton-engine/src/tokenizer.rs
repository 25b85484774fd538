//! Text in and out: `tokenizer.json` through the `tokenizers` crate, the chat template and the
//! end-of-sequence ids from `tokenizer_config.json`, `chat_template.jinja` and
//! `generation_config.json`, and incremental detokenization for streaming.

use std::path::Path;

use serde_json::Value;

use crate::config::{read_json, Fields, ModelConfig};
use crate::error::{EngineError, Result};

/// A model's tokenizer and the text-level settings that ship beside it.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    /// Jinja source of the chat template, if the model has one.
    pub chat_template: Option<String>,
    /// Every id that ends generation (generation_config, config and the tokenizer's eos token).
    pub eos_token_ids: Vec<u32>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab", &self.inner.get_vocab_size(true))
            .field("eos_token_ids", &self.eos_token_ids)
            .finish()
    }
}

/// A special token written either as a string or as `{"content": "..."}`.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl TextTokenizer {
    pub fn from_dir(dir: &Path, config: &ModelConfig) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| EngineError::Tokenizer {
            path: path.clone(),
            message: e.to_string(),
        })?;

        let mut chat_template = None;
        let mut bos_token = None;
        let mut eos_token = None;
        let tc_path = dir.join("tokenizer_config.json");
        if tc_path.exists() {
            let tc = read_json(&tc_path)?;
            let f = Fields::new(&tc_path, &tc)?;
            chat_template = match f.obj.get("chat_template") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
                    .map(str::to_string),
                Some(_) => {
                    return Err(EngineError::field(&tc_path, "chat_template", "expected a string or a list of named templates"))
                }
            };
            bos_token = token_text(f.obj.get("bos_token"));
            eos_token = token_text(f.obj.get("eos_token"));
        }
        let jinja = dir.join("chat_template.jinja");
        if chat_template.is_none() && jinja.exists() {
            chat_template = Some(std::fs::read_to_string(&jinja).map_err(|e| EngineError::io(&jinja, e))?);
        }

        let mut eos_token_ids = Vec::new();
        let gc_path = dir.join("generation_config.json");
        if gc_path.exists() {
            let gc = read_json(&gc_path)?;
            eos_token_ids.extend(Fields::new(&gc_path, &gc)?.token_ids("eos_token_id")?);
        }
        eos_token_ids.extend(&config.eos_token_ids);
        if let Some(id) = eos_token.as_deref().and_then(|t| inner.token_to_id(t)) {
            eos_token_ids.push(id);
        }
        let mut seen = Vec::new();
        eos_token_ids.retain(|id| {
            let new = !seen.contains(id);
            seen.push(*id);
            new
        });
        Ok(TextTokenizer {
            inner,
            chat_template,
            eos_token_ids,
            bos_token,
            eos_token,
        })
    }

    /// Token ids of `text`, with the tokenizer's own special tokens (e.g. BOS) added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, true)
    }

    /// Token ids of already-templated text: the template wrote any BOS itself.
    pub fn encode_templated(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, false)
    }

    fn encode_with(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        self.inner
            .encode(text, add_special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| EngineError::Tokenizer {
                path: "tokenizer.json".into(),
                message: e.to_string(),
            })
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| EngineError::Tokenizer {
            path: "tokenizer.json".into(),
            message: e.to_string(),
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
}

/// Turns a growing list of ids into text pieces, never splitting a UTF-8 character or a
/// multi-token grapheme (the prefix/read offsets scheme of TGI and vLLM).
#[derive(Debug, Clone, Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl Detokenizer {
    /// Adds one id and returns the text it completes (possibly empty).
    pub fn push(&mut self, tok: &TextTokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let before = tok.decode(&self.ids[self.prefix..self.read])?;
        let after = tok.decode(&self.ids[self.prefix..])?;
        if after.len() > before.len() && !after.ends_with('\u{FFFD}') && after.is_char_boundary(before.len()) {
            let piece = after[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(piece)
        } else {
            Ok(String::new())
        }
    }

    /// Text still held back (an incomplete character at the very end).
    pub fn flush(&mut self, tok: &TextTokenizer) -> Result<String> {
        let before = tok.decode(&self.ids[self.prefix..self.read])?;
        let after = tok.decode(&self.ids[self.prefix..])?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok(after.get(before.len()..).unwrap_or_default().to_string())
    }
}
