//! What an entry node keeps of a streamed request it forwarded, so that when the head serving it
//! dies the stream goes on at another head (request migration): the token ids of every chunk
//! relayed so far, the stream's id and creation time (kept across heads, so the client sees one
//! stream), and the request to send again with those tokens as `resume_token_ids`. Pure: bytes
//! in, bytes out; the relay in `forward.rs` does the I/O.

use serde_json::{Map, Value};

/// Splits a server-sent-events byte stream into events (a blank line ends one).
#[derive(Debug, Default)]
pub struct SseSplitter {
    buf: Vec<u8>,
}

/// One event of the stream.
#[derive(Debug, Clone, PartialEq)]
pub enum SseItem {
    /// The `data:` payload (lines joined by `\n`).
    Data(String),
    /// An event without data (a keep-alive comment): passed on as it came.
    Other(Vec<u8>),
}

impl SseSplitter {
    /// The events `bytes` completes.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<SseItem> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some((end, sep)) = find_blank_line(&self.buf) {
            let raw: Vec<u8> = self.buf.drain(..end + sep).collect();
            let text = String::from_utf8_lossy(&raw[..end]);
            let data: Vec<&str> = text
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            if data.is_empty() {
                out.push(SseItem::Other(raw));
            } else {
                out.push(SseItem::Data(data.join("\n")));
            }
        }
        out
    }
}

/// Where the first blank line ends an event: (end of the event, length of the separator).
fn find_blank_line(b: &[u8]) -> Option<(usize, usize)> {
    (0..b.len()).find_map(|i| {
        if b[i..].starts_with(b"\n\n") {
            Some((i, 2))
        } else if b[i..].starts_with(b"\r\n\r\n") {
            Some((i, 4))
        } else {
            None
        }
    })
}

/// A streamed request as its entry node relays it.
#[derive(Debug)]
pub struct RelayedStream {
    /// The client's request body.
    request: Map<String, Value>,
    /// Whether the client asked for token ids itself (else they are taken out of the chunks).
    client_wants_ids: bool,
    /// Every token id relayed so far, in order.
    pub token_ids: Vec<u32>,
    id: Option<Value>,
    created: Option<Value>,
    /// A chunk with a finish reason was relayed: the generation is over.
    pub finished: bool,
    /// `[DONE]` (or an error event, the head's last word) was relayed.
    pub done: bool,
}

impl RelayedStream {
    /// `request`: the client's body (a streamed completion or chat completion).
    pub fn new(request: Map<String, Value>) -> Self {
        let client_wants_ids = request.get("return_token_ids").and_then(Value::as_bool).unwrap_or(false);
        RelayedStream { request, client_wants_ids, token_ids: Vec::new(), id: None, created: None, finished: false, done: false }
    }

    /// The body to send a head: the client's, asking for token ids, with the tokens relayed
    /// so far as `resume_token_ids` once there are any.
    pub fn body(&self) -> Vec<u8> {
        let mut b = self.request.clone();
        b.insert("return_token_ids".into(), Value::Bool(true));
        if !self.token_ids.is_empty() {
            b.insert("resume_token_ids".into(), Value::from(self.token_ids.clone()));
        }
        serde_json::to_vec(&Value::Object(b)).unwrap_or_default()
    }

    /// One event from the head, as the bytes to send the client: its tokens are noted, the
    /// stream's id and creation time made those of the first head, and token ids the client
    /// did not ask for taken out.
    pub fn event(&mut self, item: SseItem) -> Vec<u8> {
        let data = match item {
            SseItem::Other(raw) => return raw,
            SseItem::Data(d) => d,
        };
        if data.trim() == "[DONE]" {
            self.done = true;
            return b"data: [DONE]\n\n".to_vec();
        }
        let Ok(Value::Object(mut chunk)) = serde_json::from_str::<Value>(&data) else {
            return format!("data: {data}\n\n").into_bytes();
        };
        if chunk.contains_key("error") {
            // The head's own answer (the request failed there): final.
            self.done = true;
            return format!("data: {}\n\n", Value::Object(chunk)).into_bytes();
        }
        for (key, kept) in [("id", &mut self.id), ("created", &mut self.created)] {
            match kept {
                Some(v) => {
                    chunk.insert(key.into(), v.clone());
                }
                None => *kept = chunk.get(key).cloned(),
            }
        }
        if let Some(Value::Array(choices)) = chunk.get_mut("choices") {
            for choice in choices.iter_mut().filter_map(Value::as_object_mut) {
                if let Some(Value::Array(ids)) = choice.get("token_ids") {
                    self.token_ids.extend(ids.iter().filter_map(Value::as_u64).map(|t| t as u32));
                }
                if choice.get("finish_reason").is_some_and(|f| !f.is_null()) {
                    self.finished = true;
                }
                if !self.client_wants_ids {
                    choice.remove("token_ids");
                }
            }
        }
        if !self.client_wants_ids {
            chunk.remove("prompt_token_ids");
        }
        format!("data: {}\n\n", Value::Object(chunk)).into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn request(extra: Value) -> Map<String, Value> {
        let mut m = json!({"model": "m", "prompt": "hi", "stream": true, "max_tokens": 8}).as_object().unwrap().clone();
        if let Value::Object(e) = extra {
            m.extend(e);
        }
        m
    }

    fn chunk(id: &str, created: u64, tokens: &[u32], finish: Option<&str>) -> SseItem {
        SseItem::Data(json!({"id": id, "created": created, "choices": [{"index": 0, "text": "x", "token_ids": tokens, "finish_reason": finish}]}).to_string())
    }

    fn sent(b: Vec<u8>) -> Value {
        let s = String::from_utf8(b).unwrap();
        serde_json::from_str(s.strip_prefix("data: ").unwrap().trim()).unwrap()
    }

    #[test]
    fn the_splitter_finds_events_across_reads_and_both_line_ends() {
        let mut s = SseSplitter::default();
        assert!(s.push(b"data: {\"a\"").is_empty());
        assert_eq!(s.push(b":1}\n\ndata: [DONE]\r\n\r\n: keep\n\n"), vec![
            SseItem::Data("{\"a\":1}".into()),
            SseItem::Data("[DONE]".into()),
            SseItem::Other(b": keep\n\n".to_vec()),
        ]);
    }

    #[test]
    fn tokens_are_noted_and_the_second_heads_chunks_look_like_the_firsts() {
        let mut r = RelayedStream::new(request(json!({})));
        let first = sent(r.event(chunk("cmpl-a", 10, &[5, 6], None)));
        assert!(first["choices"][0].get("token_ids").is_none(), "ids the client did not ask for are taken out");
        let body: Value = serde_json::from_slice(&r.body()).unwrap();
        assert_eq!(body["resume_token_ids"], json!([5, 6]));
        assert_eq!(body["return_token_ids"], json!(true));
        assert_eq!(body["prompt"], json!("hi"));
        // The new head's chunk carries its own id and time: the client sees the first ones.
        let next = sent(r.event(chunk("cmpl-b", 99, &[7], Some("length"))));
        assert_eq!((next["id"].clone(), next["created"].clone()), (json!("cmpl-a"), json!(10)));
        assert_eq!(r.token_ids, vec![5, 6, 7]);
        assert!(r.finished && !r.done);
        assert_eq!(r.event(SseItem::Data("[DONE]".into())), b"data: [DONE]\n\n".to_vec());
        assert!(r.done);
    }

    #[test]
    fn a_client_that_asked_for_ids_keeps_them_and_an_error_event_is_final() {
        let mut r = RelayedStream::new(request(json!({"return_token_ids": true})));
        let first = sent(r.event(chunk("c", 1, &[3], None)));
        assert_eq!(first["choices"][0]["token_ids"], json!([3]));
        let err = sent(r.event(SseItem::Data(json!({"error": {"message": "boom"}}).to_string())));
        assert_eq!(err["error"]["message"], json!("boom"));
        assert!(r.done);
    }
}
