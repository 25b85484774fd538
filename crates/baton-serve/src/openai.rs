//! The OpenAI wire format: request bodies parsed (with errors that name the parameter) into
//! [`ApiRequest`], and response bodies and stream chunks built from engine events. Includes the
//! vLLM extensions benchmark tools use: `ignore_eos`, `min_tokens`, `top_k`, `min_p`,
//! `repetition_penalty`, `stop_token_ids`, `return_token_ids`; and Baton's `resume_token_ids`
//! (continue a generation another head began: what an entry node sends after a head died).

use serde_json::{json, Map, Value};

use baton_engine::SamplingParams;

use crate::error::ServeError;
use crate::request::{ApiRequest, ChatMessage, PromptInput};

/// Which endpoint a body was sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
}

struct Body<'a>(&'a Map<String, Value>);

impl Body<'_> {
    fn get(&self, k: &str) -> Option<&Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }

    fn f32(&self, k: &str) -> Result<Option<f32>, ServeError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v.as_f64().map(|x| Some(x as f32)).ok_or_else(|| ServeError::bad(format!("`{k}` must be a number"), k)),
        }
    }

    fn int(&self, k: &str) -> Result<Option<i64>, ServeError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v.as_i64().map(Some).ok_or_else(|| ServeError::bad(format!("`{k}` must be an integer"), k)),
        }
    }

    fn count(&self, k: &str) -> Result<Option<usize>, ServeError> {
        match self.int(k)? {
            None => Ok(None),
            Some(n) if n >= 0 => Ok(Some(n as usize)),
            Some(n) => Err(ServeError::bad(format!("`{k}` must be >= 0, got {n}"), k)),
        }
    }

    fn bool(&self, k: &str) -> Result<Option<bool>, ServeError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| ServeError::bad(format!("`{k}` must be true or false"), k)),
        }
    }

    fn token_ids(&self, k: &str) -> Result<Option<Vec<u32>>, ServeError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok()))
                .collect::<Option<Vec<u32>>>()
                .map(Some)
                .ok_or_else(|| ServeError::bad(format!("`{k}` must be a list of token ids"), k)),
            Some(_) => Err(ServeError::bad(format!("`{k}` must be a list of token ids"), k)),
        }
    }
}

/// Parses a request body sent to `endpoint`.
pub fn parse(endpoint: Endpoint, bytes: &[u8]) -> Result<ApiRequest, ServeError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| ServeError::BadRequest {
        message: format!("the body is not valid JSON: {e}"),
        param: None,
    })?;
    let obj = value.as_object().ok_or_else(|| ServeError::BadRequest {
        message: "the body must be a JSON object".into(),
        param: None,
    })?;
    let b = Body(obj);

    let model = match b.get("model") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(ServeError::bad("`model` must be a string", "model")),
    };
    let prompt = match endpoint {
        Endpoint::Completions => match b.get("prompt") {
            Some(Value::String(s)) => PromptInput::Text(s.clone()),
            Some(Value::Array(items)) if items.len() == 1 && items[0].is_string() => {
                PromptInput::Text(items[0].as_str().unwrap_or_default().to_string())
            }
            Some(Value::Array(items)) if items.iter().all(Value::is_u64) => PromptInput::Tokens(
                b.token_ids("prompt")?.unwrap_or_default(),
            ),
            Some(Value::Array(items)) if items.len() == 1 && items[0].is_array() => {
                let ids = items[0]
                    .as_array()
                    .and_then(|a| a.iter().map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok())).collect::<Option<Vec<u32>>>())
                    .ok_or_else(|| ServeError::bad("`prompt` must be a string or a list of token ids", "prompt"))?;
                PromptInput::Tokens(ids)
            }
            Some(Value::Array(_)) => {
                return Err(ServeError::bad("`prompt` must be one string or one list of token ids (batches are not supported)", "prompt"))
            }
            Some(_) => return Err(ServeError::bad("`prompt` must be a string or a list of token ids", "prompt")),
            None => return Err(ServeError::bad("`prompt` is required", "prompt")),
        },
        Endpoint::Chat => PromptInput::Chat(parse_messages(b.get("messages"))?),
    };

    let n = b.count("n")?.unwrap_or(1);
    if n != 1 {
        return Err(ServeError::bad("only `n` = 1 is supported", "n"));
    }
    if b.bool("echo")?.unwrap_or(false) {
        return Err(ServeError::bad("`echo` is not supported", "echo"));
    }
    let max_tokens = match (b.count("max_completion_tokens")?, b.count("max_tokens")?) {
        (Some(n), _) | (None, Some(n)) => Some(n),
        (None, None) => None,
    };
    if max_tokens == Some(0) {
        return Err(ServeError::bad("`max_tokens` must be at least 1", "max_tokens"));
    }
    let top_k = match b.int("top_k")? {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => return Err(ServeError::bad(format!("`top_k` must be -1 (off) or positive, got {k}"), "top_k")),
    };
    let logprobs = match endpoint {
        Endpoint::Completions => match b.get("logprobs") {
            None => None,
            Some(Value::Bool(false)) => None,
            Some(v) => Some(v.as_u64().ok_or_else(|| ServeError::bad("`logprobs` must be an integer", "logprobs"))? as usize),
        },
        Endpoint::Chat => {
            let top = b.count("top_logprobs")?;
            match b.bool("logprobs")? {
                Some(true) => Some(top.unwrap_or(0)),
                _ if top.is_some_and(|t| t > 0) => {
                    return Err(ServeError::bad("`top_logprobs` requires `logprobs: true`", "top_logprobs"))
                }
                _ => None,
            }
        }
    };
    let stop = match b.get("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ServeError::bad("`stop` must be a string or a list of strings", "stop"))?,
        Some(_) => return Err(ServeError::bad("`stop` must be a string or a list of strings", "stop")),
    };
    let include_usage = match b.get("stream_options") {
        None => false,
        Some(Value::Object(o)) => Body(o).bool("include_usage")?.unwrap_or(false),
        Some(_) => return Err(ServeError::bad("`stream_options` must be an object", "stream_options")),
    };

    let seed = match b.int("seed")? {
        None => None,
        Some(s) => Some(s as u64),
    };
    let params = SamplingParams {
        temperature: b.f32("temperature")?.unwrap_or(1.0),
        top_k,
        top_p: b.f32("top_p")?.unwrap_or(1.0),
        min_p: b.f32("min_p")?.unwrap_or(0.0),
        presence_penalty: b.f32("presence_penalty")?.unwrap_or(0.0),
        frequency_penalty: b.f32("frequency_penalty")?.unwrap_or(0.0),
        repetition_penalty: b.f32("repetition_penalty")?.unwrap_or(1.0),
        seed,
        // Replaced by the router once the prompt length (and so the default) is known.
        max_tokens: max_tokens.unwrap_or(1),
        min_tokens: b.count("min_tokens")?.unwrap_or(0),
        stop_token_ids: b.token_ids("stop_token_ids")?.unwrap_or_default(),
        ignore_eos: b.bool("ignore_eos")?.unwrap_or(false),
        logprobs,
    };
    validate_params(&params)?;
    validate_stop(&stop)?;
    Ok(ApiRequest {
        model,
        prompt,
        params,
        max_tokens,
        stop,
        stream: b.bool("stream")?.unwrap_or(false),
        include_usage,
        return_token_ids: b.bool("return_token_ids")?.unwrap_or(false),
        resume_token_ids: b.token_ids("resume_token_ids")?.unwrap_or_default(),
    })
}

/// Range checks shared by every front; the error names the parameter.
pub fn validate_params(params: &SamplingParams) -> Result<(), ServeError> {
    params.validate().map_err(|message| {
        let param = ["temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens", "top_logprobs", "max_tokens"]
            .into_iter()
            .find(|p| message.starts_with(p))
            .map(str::to_string);
        ServeError::BadRequest { message, param }
    })
}

pub fn validate_stop(stop: &[String]) -> Result<(), ServeError> {
    if stop.len() > 4 || stop.iter().any(String::is_empty) {
        return Err(ServeError::bad("`stop` takes up to 4 non-empty strings", "stop"));
    }
    Ok(())
}

fn parse_messages(v: Option<&Value>) -> Result<Vec<ChatMessage>, ServeError> {
    let bad = |m: &str| ServeError::bad(m, "messages");
    let items = v.and_then(Value::as_array).ok_or_else(|| bad("`messages` is required: a list of {role, content}"))?;
    if items.is_empty() {
        return Err(bad("`messages` must not be empty"));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(&format!("messages[{i}].role must be a string")))?;
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                            (Some("text"), Some(t)) => text.push_str(t),
                            _ => return Err(bad(&format!("messages[{i}].content: only text parts are supported"))),
                        }
                    }
                    text
                }
                Some(_) => return Err(bad(&format!("messages[{i}].content must be a string or a list of text parts"))),
            };
            Ok(ChatMessage {
                role: role.to_string(),
                content,
            })
        })
        .collect()
}

/// The OpenAI error object.
pub fn error_body(err: &ServeError) -> Value {
    let (kind, param, code) = match err {
        ServeError::BadRequest { param, .. } => ("invalid_request_error", param.clone(), Value::Null),
        ServeError::ContextTooLong(_) => ("invalid_request_error", Some("messages".into()), json!("context_length_exceeded")),
        ServeError::ModelNotFound(_) => ("invalid_request_error", Some("model".into()), json!("model_not_found")),
        ServeError::Overloaded(_) => ("rate_limit_error", None, json!("overloaded")),
        ServeError::NotReady(_) => ("service_unavailable", None, json!("not_ready")),
        ServeError::Timeout(_) => ("timeout", None, json!("request_timeout")),
        ServeError::Internal(_) => ("internal_error", None, Value::Null),
    };
    json!({"error": {"message": err.to_string(), "type": kind, "param": param, "code": code}})
}
