//! The HTTP edge (axum): OpenAI-compatible completions and chat completions, streaming (SSE)
//! and not, models, health, Prometheus metrics and JSON stats. This is the one place where
//! [`ServeError`] classes become status codes.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router as AxumRouter};
use baton_engine::TextTokenizer;
use baton_scheduler::SeqId;
use ractor::ActorRef;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;

use crate::error::ServeError;
use crate::metrics::Metrics;
use crate::openai::{self, Endpoint};
use crate::request::{ApiRequest, Event, TokenEvent};
use crate::router::{Admitted, RouterMsg};
use crate::scheduler::SchedulerMsg;

/// What every handler shares.
pub struct AppState {
    pub router: ActorRef<RouterMsg>,
    pub scheduler: ActorRef<SchedulerMsg>,
    pub metrics: Arc<Metrics>,
    pub tokenizer: Arc<TextTokenizer>,
    pub model_name: String,
    pub max_model_len: usize,
    /// True once the shard has loaded and until shutdown begins.
    pub ready: Arc<AtomicBool>,
    /// Why the node cannot serve while `ready` is false, when there is more to say than
    /// "loading" (the mesh lacks layers).
    pub unready: Arc<std::sync::Mutex<Option<String>>>,
    pub draining: Arc<AtomicBool>,
    pub next_request: AtomicU64,
    pub created: u64,
    /// The cluster's QUIC client APIs (told to QUIC clients, which resume there).
    pub peers: Option<crate::Peers>,
    /// Appended to `/metrics` (a cluster node's own counters).
    pub more_metrics: Option<crate::MoreMetrics>,
}

pub fn routes(state: Arc<AppState>) -> AxumRouter {
    AxumRouter::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/stats", get(stats))
        .route("/v1/load", get(load))
        .with_state(state)
}

fn status_of(err: &ServeError) -> StatusCode {
    match err {
        ServeError::BadRequest { .. } | ServeError::ContextTooLong(_) => StatusCode::BAD_REQUEST,
        ServeError::ModelNotFound(_) => StatusCode::NOT_FOUND,
        ServeError::Overloaded(_) => StatusCode::TOO_MANY_REQUESTS,
        ServeError::NotReady(_) => StatusCode::SERVICE_UNAVAILABLE,
        ServeError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        ServeError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn error_response(err: &ServeError) -> Response {
    let mut resp = (status_of(err), Json(openai::error_body(err))).into_response();
    if matches!(err, ServeError::Overloaded(_) | ServeError::NotReady(_)) {
        resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

async fn completions(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    generate(s, Endpoint::Completions, body).await
}

async fn chat(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    generate(s, Endpoint::Chat, body).await
}

/// Sends Abort for a request unless it completed: a client that goes away frees its KV at once.
pub(crate) struct AbortOnDrop {
    pub id: SeqId,
    pub scheduler: ActorRef<SchedulerMsg>,
    pub done: bool,
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.scheduler.cast(SchedulerMsg::Abort(self.id));
        }
    }
}

async fn generate(s: Arc<AppState>, endpoint: Endpoint, body: Bytes) -> Response {
    if s.draining.load(Ordering::SeqCst) {
        return error_response(&ServeError::NotReady("shutting down".into()));
    }
    if !s.ready.load(Ordering::SeqCst) {
        let why = s.unready.lock().unwrap_or_else(|p| p.into_inner()).clone();
        return error_response(&ServeError::NotReady(why.unwrap_or_else(|| "the model is loading".into())));
    }
    let request = match openai::parse(endpoint, &body) {
        Ok(r) => r,
        Err(e) => return error_response(&e),
    };
    let n = s.next_request.fetch_add(1, Ordering::Relaxed);
    let prefix = if endpoint == Endpoint::Chat { "chatcmpl" } else { "cmpl" };
    let request_id = format!("{prefix}-{:x}{n:08x}", s.created);
    let span = tracing::info_span!("request", request_id = %request_id);
    admit_and_respond(s, endpoint, request, request_id).instrument(span).await
}

async fn admit_and_respond(s: Arc<AppState>, endpoint: Endpoint, request: ApiRequest, request_id: String) -> Response {
    tracing::debug!("received");
    let admitted = ractor::call!(s.router, |reply| RouterMsg::Submit {
        request: request.clone(),
        request_id: request_id.clone(),
        reply
    });
    let Admitted { id, events } = match admitted {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => return error_response(&e),
        Err(e) => return error_response(&ServeError::NotReady(format!("router unavailable: {e}"))),
    };
    let guard = AbortOnDrop { id, scheduler: s.scheduler.clone(), done: false };
    let out = Output::new(&s, endpoint, request_id, &request);
    // A resumed stream goes on where the client's ends: no second role chunk.
    let resumed = !request.resume_token_ids.is_empty();
    if request.stream {
        stream(out, events, guard, resumed)
    } else {
        collect(out, events, guard).await
    }
}

/// Builds response bodies and stream chunks for one request.
struct Output {
    endpoint: Endpoint,
    id: String,
    created: u64,
    model: String,
    logprobs: Option<usize>,
    return_token_ids: bool,
    include_usage: bool,
    tokenizer: Arc<TextTokenizer>,
    prompt_token_ids: Vec<u32>,
    text: String,
    token_ids: Vec<u32>,
    logprob_items: Vec<Value>,
    text_offset: usize,
}

impl Output {
    fn new(s: &AppState, endpoint: Endpoint, id: String, r: &ApiRequest) -> Self {
        Output {
            endpoint,
            id,
            created: unix_now(),
            model: s.model_name.clone(),
            logprobs: r.params.logprobs,
            return_token_ids: r.return_token_ids,
            include_usage: r.include_usage,
            tokenizer: s.tokenizer.clone(),
            prompt_token_ids: Vec::new(),
            text: String::new(),
            token_ids: Vec::new(),
            logprob_items: Vec::new(),
            text_offset: 0,
        }
    }

    fn token_text(&self, id: u32) -> String {
        self.tokenizer.decode(&[id]).unwrap_or_default()
    }

    /// The logprobs entry of one token in this endpoint's format.
    fn logprob_entry(&mut self, t: &TokenEvent) -> Option<Value> {
        self.logprobs?;
        let tok = self.token_text(t.token);
        let entry = match self.endpoint {
            Endpoint::Chat => {
                let top: Vec<Value> = t
                    .top_logprobs
                    .iter()
                    .map(|(id, lp)| {
                        let s = self.token_text(*id);
                        json!({"token": s, "logprob": lp, "bytes": s.as_bytes()})
                    })
                    .collect();
                json!({"token": tok, "logprob": t.logprob, "bytes": tok.as_bytes(), "top_logprobs": top})
            }
            Endpoint::Completions => {
                let top: serde_json::Map<String, Value> = t.top_logprobs.iter().map(|(id, lp)| (self.token_text(*id), json!(lp))).collect();
                let e = json!({"token": tok, "logprob": t.logprob, "top": top, "offset": self.text_offset});
                self.text_offset += t.text.len();
                e
            }
        };
        Some(entry)
    }

    fn logprobs_value(&self, items: &[Value]) -> Value {
        if self.logprobs.is_none() {
            return Value::Null;
        }
        match self.endpoint {
            Endpoint::Chat => json!({"content": items}),
            Endpoint::Completions => json!({
                "tokens": items.iter().map(|i| i["token"].clone()).collect::<Vec<_>>(),
                "token_logprobs": items.iter().map(|i| i["logprob"].clone()).collect::<Vec<_>>(),
                "top_logprobs": items.iter().map(|i| i["top"].clone()).collect::<Vec<_>>(),
                "text_offset": items.iter().map(|i| i["offset"].clone()).collect::<Vec<_>>(),
            }),
        }
    }

    /// OpenAI's usage object; `prompt_tokens_details.cached_tokens` (what aiperf and the
    /// OpenAI SDK read) when prefix caching is on.
    fn usage(prompt: usize, completion: usize, cached: Option<usize>) -> Value {
        let mut u = json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion});
        if let Some(cached) = cached {
            u["prompt_tokens_details"] = json!({"cached_tokens": cached});
        }
        u
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completions, _) => "text_completion",
        }
    }

    /// A stream chunk carrying `text` (and optionally a finish reason).
    fn chunk(&self, text: &str, token_ids: &[u32], logprobs: &[Value], finish: Option<&str>, first: bool) -> Value {
        let mut choice = match self.endpoint {
            Endpoint::Chat => {
                let delta = if first { json!({"role": "assistant", "content": text}) } else if finish.is_some() && text.is_empty() { json!({}) } else { json!({"content": text}) };
                json!({"index": 0, "delta": delta, "logprobs": if logprobs.is_empty() { Value::Null } else { self.logprobs_value(logprobs) }, "finish_reason": finish})
            }
            Endpoint::Completions => {
                json!({"index": 0, "text": text, "logprobs": if logprobs.is_empty() { Value::Null } else { self.logprobs_value(logprobs) }, "finish_reason": finish})
            }
        };
        if self.return_token_ids {
            choice["token_ids"] = json!(token_ids);
        }
        let mut v = json!({"id": self.id, "object": self.object(true), "created": self.created, "model": self.model, "choices": [choice]});
        if first && self.return_token_ids {
            v["prompt_token_ids"] = json!(self.prompt_token_ids);
        }
        v
    }

    fn full(&self, finish: &str, usage: Value) -> Value {
        let mut choice = match self.endpoint {
            Endpoint::Chat => json!({"index": 0, "message": {"role": "assistant", "content": self.text}, "logprobs": self.logprobs_value(&self.logprob_items), "finish_reason": finish}),
            Endpoint::Completions => json!({"index": 0, "text": self.text, "logprobs": self.logprobs_value(&self.logprob_items), "finish_reason": finish}),
        };
        if self.return_token_ids {
            choice["token_ids"] = json!(self.token_ids);
        }
        let mut v = json!({"id": self.id, "object": self.object(false), "created": self.created, "model": self.model, "choices": [choice], "usage": usage});
        if self.return_token_ids {
            v["prompt_token_ids"] = json!(self.prompt_token_ids);
        }
        v
    }
}

async fn collect(mut out: Output, mut events: mpsc::UnboundedReceiver<Event>, mut guard: AbortOnDrop) -> Response {
    while let Some(ev) = events.recv().await {
        match ev {
            Event::Started { prompt_token_ids } => out.prompt_token_ids = prompt_token_ids,
            Event::Token(t) => {
                if let Some(e) = out.logprob_entry(&t) {
                    out.logprob_items.push(e);
                }
                out.text.push_str(&t.text);
                out.token_ids.push(t.token);
            }
            Event::Done { finish, prompt_tokens, completion_tokens, cached_tokens, tail } => {
                guard.done = true;
                out.text.push_str(&tail);
                let body = out.full(finish.as_str(), Output::usage(prompt_tokens, completion_tokens, cached_tokens));
                return Json(body).into_response();
            }
            Event::Error(e) => {
                guard.done = true;
                return error_response(&e);
            }
        }
    }
    guard.done = true;
    error_response(&ServeError::Internal("the request ended without a result".into()))
}

fn stream(mut out: Output, mut events: mpsc::UnboundedReceiver<Event>, guard: AbortOnDrop, resumed: bool) -> Response {
    let (tx, rx) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
    tokio::spawn(async move {
        // Own the whole guard in the task (not just its field), so it lives as long as the stream.
        let mut guard = guard;
        let send = |v: Value| SseEvent::default().data(v.to_string());
        let mut first = !resumed;
        while let Some(ev) = events.recv().await {
            let msg = match ev {
                Event::Started { prompt_token_ids } => {
                    out.prompt_token_ids = prompt_token_ids;
                    continue;
                }
                Event::Token(t) => {
                    let lp: Vec<Value> = out.logprob_entry(&t).into_iter().collect();
                    let c = out.chunk(&t.text, &[t.token], &lp, None, first);
                    first = false;
                    send(c)
                }
                Event::Done { finish, prompt_tokens, completion_tokens, cached_tokens, tail } => {
                    guard.done = true;
                    let c = out.chunk(&tail, &[], &[], Some(finish.as_str()), first);
                    if tx.send(Ok(send(c))).await.is_err() {
                        return;
                    }
                    if out.include_usage {
                        let u = json!({"id": out.id, "object": out.object(true), "created": out.created, "model": out.model,
                                       "choices": [], "usage": Output::usage(prompt_tokens, completion_tokens, cached_tokens)});
                        let _ = tx.send(Ok(send(u))).await;
                    }
                    let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
                    return;
                }
                Event::Error(e) => {
                    guard.done = true;
                    let _ = tx.send(Ok(send(openai::error_body(&e)))).await;
                    let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
                    return;
                }
            };
            // A closed stream means the client went away: dropping `guard` aborts the request.
            if tx.send(Ok(msg)).await.is_err() {
                return;
            }
        }
    });
    Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::default()).into_response()
}

async fn models(State(s): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{
        "id": s.model_name, "object": "model", "created": s.created, "owned_by": "baton",
        "root": s.model_name, "max_model_len": s.max_model_len,
    }]}))
}

async fn health(State(s): State<Arc<AppState>>) -> Response {
    if s.ready.load(Ordering::SeqCst) && !s.draining.load(Ordering::SeqCst) {
        (StatusCode::OK, "ok").into_response()
    } else {
        error_response(&ServeError::NotReady("loading or shutting down".into()))
    }
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    let mut text = s.metrics.prometheus();
    if let Some(more) = &s.more_metrics {
        text.push_str(&(more.0)());
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn stats(State(s): State<Arc<AppState>>) -> Json<Value> {
    Json(s.metrics.stats())
}

/// Running and waiting requests and KV usage, for routers spreading load over replicas.
async fn load(State(s): State<Arc<AppState>>) -> Json<Value> {
    Json(s.metrics.load())
}
