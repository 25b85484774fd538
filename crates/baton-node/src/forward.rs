//! The front of a node that is not a pipeline head: every HTTP request is forwarded to a
//! pipeline head, when the cluster runs several replicas the one the routing core chooses
//! (`baton_mesh::routing`: by the prompt's prefix and load, fed by polling each head's
//! `/v1/load`), and its response (streamed or not) relayed back unchanged, so clients can use
//! any node. (The QUIC API's relay,
//! `quic_relay`, picks heads through the same [`Front`].)

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton_mesh::autoscale::{Autoscaler, ReplicaSample};
use baton_mesh::config::AutoscaleConfig;
use baton_mesh::routing::{prefix_key, HeadLoads, RoutingPolicy};
use tokio_stream::StreamExt;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

/// A pipeline head as entry nodes reach it.
#[derive(Debug, Clone)]
pub struct HeadAddr {
    pub name: String,
    pub http: SocketAddr,
    pub quic: Option<SocketAddr>,
}

/// The heads and what this node knows of their load. Heads come from cluster.toml and from
/// the gossip (a node that formed a new replica), and are keyed by name. The same polling feeds
/// the autoscaling core (`baton:desired_replicas` on this node's `/metrics`).
pub struct Front {
    heads: Mutex<Vec<HeadAddr>>,
    loads: Mutex<HeadLoads>,
    autoscaler: Mutex<Autoscaler>,
    client: reqwest::Client,
}

impl Front {
    /// Starts polling the heads' load.
    pub fn start(heads: Vec<HeadAddr>, policy: RoutingPolicy, autoscale: &AutoscaleConfig) -> Arc<Front> {
        let loads = Mutex::new(HeadLoads::new(heads.iter().map(|h| h.name.clone())).with_policy(policy));
        let autoscaler = Mutex::new(Autoscaler::new(autoscale.thresholds, autoscale.min_replicas, autoscale.max_replicas));
        let front = Arc::new(Front { loads, autoscaler, heads: Mutex::new(heads), client: reqwest::Client::new() });
        tokio::spawn(poll_loads(front.clone()));
        front
    }

    /// The HTTP client it polls the heads with (shared with the cluster view).
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    fn autoscaler(&self) -> std::sync::MutexGuard<'_, Autoscaler> {
        self.autoscaler.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The autoscaling signal and what it is computed from, in Prometheus text: the desired
    /// replica count and, per replica (by its head's name), waiting and running requests, KV
    /// usage and the window's mean queue time.
    pub fn autoscale_prometheus(&self) -> String {
        use std::fmt::Write;
        let d = self.autoscaler().decide(Instant::now());
        let mut out = String::new();
        let _ = writeln!(out, "# HELP baton:desired_replicas Replicas (pipelines) the load asks for, by the autoscaling policy (README: Deploy)\n# TYPE baton:desired_replicas gauge\nbaton:desired_replicas{{reason=\"{}\"}} {}", d.reason.as_str(), d.desired);
        let _ = writeln!(out, "# HELP baton:replicas Replicas whose head answered this node lately\n# TYPE baton:replicas gauge\nbaton:replicas {}", d.replicas);
        type Field = fn(&baton_mesh::autoscale::ReplicaView) -> Option<f64>;
        let fields: [(&str, &str, Field); 4] = [
            ("replica_requests_waiting", "Requests waiting at a replica's head", |r| Some(r.waiting as f64)),
            ("replica_requests_running", "Requests running at a replica's head", |r| Some(r.running as f64)),
            ("replica_kv_cache_usage_perc", "Fraction of a replica's KV cache blocks in use (0-1)", |r| Some(r.kv_usage)),
            ("replica_queue_time_seconds", "Mean queue time of the requests a replica started in the autoscaling window", |r| r.queue_time.map(|q| q.as_secs_f64())),
        ];
        for (name, help, value) in fields {
            let _ = writeln!(out, "# HELP baton:{name} {help}\n# TYPE baton:{name} gauge");
            for r in &d.per_replica {
                if let Some(v) = value(r) {
                    let _ = writeln!(out, "baton:{name}{{head=\"{}\"}} {v}", r.head);
                }
            }
        }
        out
    }

    fn loads(&self) -> std::sync::MutexGuard<'_, HeadLoads> {
        self.loads.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every head known now.
    pub fn heads(&self) -> Vec<HeadAddr> {
        self.heads.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A head that appeared (another replica's, or a successor, through the gossip); a known
    /// name takes the addresses the gossip gives.
    pub fn add(&self, head: HeadAddr) {
        let mut heads = self.heads.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(known) = heads.iter_mut().find(|h| h.name == head.name) {
            if known.http != head.http || known.quic != head.quic {
                eprintln!("baton: pipeline head {} is at http://{} now", head.name, head.http);
                *known = head;
            }
            return;
        }
        eprintln!("baton: pipeline head {} (http://{}) joined; requests are spread over it too", head.name, head.http);
        self.loads().add(head.name.clone());
        heads.push(head);
    }

    /// A head that left for good (drained, or gone from the gossip).
    pub fn remove(&self, name: &str) {
        let mut heads = self.heads.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = heads.iter().position(|h| h.name == name) {
            eprintln!("baton: pipeline head {name} left");
            heads.remove(i);
            self.loads().remove(name);
            self.autoscaler().remove(name);
        }
    }

    /// The least loaded head not in `tried`.
    pub fn pick(&self, tried: &[String]) -> Option<HeadAddr> {
        self.pick_for(tried, &[])
    }

    /// The head not in `tried` for a prompt with routing key `key` (the one likeliest to hold
    /// its prefix, within the balance slack; the least loaded when the key is empty).
    pub fn pick_for(&self, tried: &[String], key: &[u64]) -> Option<HeadAddr> {
        let exclude: Vec<&str> = tried.iter().map(String::as_str).collect();
        let name = self.loads().pick_for(Instant::now(), &exclude, key)?;
        self.heads().into_iter().find(|h| h.name == name)
    }

    pub fn unreachable(&self, name: &str) {
        self.loads().unreachable(name, Instant::now());
    }

    fn report(&self, name: &str, sample: ReplicaSample, kv_blocks: Option<u64>) {
        let now = Instant::now();
        let mut loads = self.loads();
        loads.report(name, sample.running + sample.waiting, now);
        if let Some(blocks) = kv_blocks {
            loads.cache_blocks(name, blocks as usize);
        }
        drop(loads);
        self.autoscaler().observe(name, now, sample);
    }

    pub fn finished(&self, name: &str) {
        self.loads().finished(name);
    }
}

/// Marks a forwarded request finished when dropped (with the relayed body, or on failure).
pub struct Outstanding(pub Arc<Front>, pub String);

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.0.finished(&self.1);
    }
}

fn unavailable(msg: String) -> Response {
    let body = serde_json::json!({"error": {"message": msg, "type": "service_unavailable", "param": null, "code": "head_unreachable"}});
    let mut r = (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
    r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    r
}

/// Marks a request already routed by an entry node or another head: it is served where it lands.
pub const FORWARDED: &str = "x-baton-forwarded";

/// Sends a request (its parts and body) to `head`, marked as forwarded.
async fn send_to(front: &Front, head: &HeadAddr, parts: &axum::http::request::Parts, bytes: &axum::body::Bytes) -> Result<reqwest::Response, reqwest::Error> {
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut out = front.client.request(parts.method.clone(), format!("http://{}{path}", head.http)).body(bytes.clone()).header(FORWARDED, "1");
    if let Some(ct) = parts.headers.get(header::CONTENT_TYPE) {
        out = out.header(header::CONTENT_TYPE, ct);
    }
    out.send().await
}

/// The head's answer, streamed back; the request counts as outstanding until its body ends.
fn relay_back(resp: reqwest::Response, outstanding: Outstanding) -> Response {
    let mut builder = Response::builder().status(resp.status().as_u16());
    for name in [header::CONTENT_TYPE, header::RETRY_AFTER, header::CACHE_CONTROL] {
        if let Some(v) = resp.headers().get(name.as_str()) {
            builder = builder.header(name, v.as_bytes());
        }
    }
    let body = resp.bytes_stream().map(move |chunk| {
        let _ = &outstanding;
        chunk
    });
    builder.body(Body::from_stream(body)).unwrap_or_else(|e| unavailable(format!("relaying the head's answer: {e}")))
}

async fn read_body(req: Request) -> Result<(axum::http::request::Parts, axum::body::Bytes), Response> {
    let (parts, body) = req.into_parts();
    match axum::body::to_bytes(body, 64 << 20).await {
        Ok(b) => Ok((parts, b)),
        Err(e) => Err((StatusCode::BAD_REQUEST, format!("cannot read the request body: {e}")).into_response()),
    }
}

async fn forward(State(front): State<Arc<Front>>, req: Request) -> Response {
    let (parts, bytes) = match read_body(req).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    relay(front, None, parts, bytes).await
}

/// How long a request whose head died waits for another (a successor loads the embedding and
/// the first layers, or another replica takes it).
const HEAD_PATIENCE: Duration = Duration::from_secs(60);

/// The head for `key` not in `tried`, waiting up to `until` for one to be reachable.
async fn next_head(front: &Front, tried: &[String], key: &[u64], until: Instant) -> Option<HeadAddr> {
    loop {
        if let Some(h) = front.pick_for(tried, key).or_else(|| front.pick_for(&[], key)) {
            return Some(h);
        }
        if Instant::now() >= until {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A prompt's routing key: the bytes of its text (a completion's `prompt`: a string, token ids
/// as little-endian u32s, or the first of a batch; a chat's messages, each as role, NUL,
/// content and a record separator), cut into chunks by [`prefix_key`].
pub fn prompt_key(body: &serde_json::Map<String, serde_json::Value>) -> Vec<u64> {
    use serde_json::Value;
    fn push_prompt(out: &mut Vec<u8>, p: &Value) {
        match p {
            Value::String(s) => out.extend_from_slice(s.as_bytes()),
            Value::Array(items) if items.iter().all(Value::is_u64) => {
                out.extend(items.iter().filter_map(Value::as_u64).flat_map(|t| (t as u32).to_le_bytes()));
            }
            Value::Array(items) => {
                if let Some(first) = items.first() {
                    push_prompt(out, first);
                }
            }
            _ => {}
        }
    }
    let mut bytes = Vec::new();
    if let Some(p) = body.get("prompt") {
        push_prompt(&mut bytes, p);
    } else if let Some(Value::Array(messages)) = body.get("messages") {
        for m in messages {
            bytes.extend_from_slice(m["role"].as_str().unwrap_or("").as_bytes());
            bytes.push(0);
            match &m["content"] {
                Value::String(s) => bytes.extend_from_slice(s.as_bytes()),
                Value::Array(parts) => {
                    for part in parts {
                        bytes.extend_from_slice(part["text"].as_str().unwrap_or("").as_bytes());
                    }
                }
                _ => {}
            }
            bytes.push(0x1e);
        }
    }
    prefix_key(&bytes)
}

/// A generation request (completions or chat completions, JSON body) and whether it streams.
fn generation_body(parts: &axum::http::request::Parts, bytes: &[u8]) -> Option<(serde_json::Map<String, serde_json::Value>, bool)> {
    if parts.method != axum::http::Method::POST || !parts.uri.path().ends_with("completions") {
        return None;
    }
    let serde_json::Value::Object(body) = serde_json::from_slice(bytes).ok()? else { return None };
    let stream = body.get("stream").and_then(serde_json::Value::as_bool).unwrap_or(false);
    Some((body, stream))
}

/// Sends a request to a head (`first`, or the least loaded) and relays the answer. A
/// generation request whose head dies before answering goes to another; a streamed one whose
/// head dies mid-stream goes on at another from the tokens already relayed (`resume_token_ids`),
/// so the client sees one stream with no token repeated or missing.
pub async fn relay(front: Arc<Front>, first: Option<HeadAddr>, parts: axum::http::request::Parts, bytes: axum::body::Bytes) -> Response {
    let generation = generation_body(&parts, &bytes);
    let key = generation.as_ref().map(|(b, _)| prompt_key(b)).unwrap_or_default();
    let mut tried: Vec<String> = Vec::new();
    let mut first = first;
    let until = Instant::now() + HEAD_PATIENCE;
    loop {
        if Instant::now() >= until {
            return unavailable(format!("no pipeline head answered within {} s (tried {})", HEAD_PATIENCE.as_secs(), tried.join(", ")));
        }
        let head = match first.take() {
            Some(h) => h,
            None => match if generation.is_some() { next_head(&front, &tried, &key, until).await } else { front.pick(&tried) } {
                Some(h) => h,
                None => return unavailable(format!("no pipeline head is reachable (tried {})", tried.join(", "))),
            },
        };
        let outstanding = Outstanding(front.clone(), head.name.clone());
        let stream = match &generation {
            Some((b, true)) => Some(crate::resume::RelayedStream::new(b.clone())),
            _ => None,
        };
        let body = stream.as_ref().map_or_else(|| bytes.clone(), |s| s.body().into());
        let resp = match send_to(&front, &head, &parts, &body).await {
            Ok(r) => r,
            // Never answered: another head may take it (a generation request, or any request
            // that was never delivered).
            Err(e) if e.is_connect() || generation.is_some() => {
                tracing::warn!(head = %head.name, error = %e, "a pipeline head is unreachable");
                front.unreachable(&head.name);
                tried.push(head.name);
                continue;
            }
            Err(e) => return unavailable(format!("the pipeline head {} ({}) failed: {e}", head.name, head.http)),
        };
        if let Some(stream) = stream.filter(|_| resp.status().is_success()) {
            return relay_stream(front, stream, parts, resp, outstanding, head.name);
        }
        match &generation {
            Some((_, false)) if resp.status().is_success() => {
                // Not streamed: the whole answer, or (the head died) the request again elsewhere.
                let status = resp.status().as_u16();
                let ct = resp.headers().get(header::CONTENT_TYPE).cloned();
                match resp.bytes().await {
                    Ok(full) => {
                        let mut r = Response::builder().status(status);
                        if let Some(ct) = ct {
                            r = r.header(header::CONTENT_TYPE, ct.as_bytes());
                        }
                        return r.body(Body::from(full)).unwrap_or_else(|e| unavailable(format!("relaying the head's answer: {e}")));
                    }
                    Err(e) => {
                        tracing::warn!(head = %head.name, error = %e, "a pipeline head failed mid-answer; sending the request again");
                        front.unreachable(&head.name);
                        tried.push(head.name);
                    }
                }
            }
            _ => return relay_back(resp, outstanding),
        }
    }
}

/// Relays a streamed generation and, if its head dies mid-stream, resumes it at another.
fn relay_stream(front: Arc<Front>, mut state: crate::resume::RelayedStream, parts: axum::http::request::Parts, resp: reqwest::Response, outstanding: Outstanding, head: String) -> Response {
    use crate::resume::SseSplitter;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<axum::body::Bytes, std::io::Error>>(64);
    tokio::spawn(async move {
        let (mut resp, mut outstanding, mut head) = (resp, outstanding, head);
        loop {
            let mut split = SseSplitter::default();
            let mut body = resp.bytes_stream();
            while let Some(chunk) = body.next().await {
                let Ok(chunk) = chunk else { break };
                for item in split.push(&chunk) {
                    // The client went away: dropping the head's response aborts it there.
                    if tx.send(Ok(state.event(item).into())).await.is_err() {
                        return;
                    }
                }
                if state.done {
                    return;
                }
            }
            drop(outstanding);
            front.unreachable(&head);
            if state.finished {
                // Every token arrived; only the end of the stream was lost.
                let _ = tx.send(Ok(axum::body::Bytes::from_static(b"data: [DONE]\n\n"))).await;
                return;
            }
            tracing::warn!(%head, tokens = state.token_ids.len(), "a pipeline head died mid-stream; resuming the request at another");
            let until = Instant::now() + HEAD_PATIENCE;
            let mut tried = vec![head.clone()];
            let next = loop {
                let Some(h) = next_head(&front, &tried, &[], until).await else { break None };
                match send_to(&front, &h, &parts, &state.body().into()).await {
                    Ok(r) if r.status().is_success() => break Some((r, h)),
                    Ok(r) if r.status().is_client_error() && r.status() != StatusCode::TOO_MANY_REQUESTS => {
                        // The head refused the continuation itself: say why, as the stream's end.
                        let why = r.text().await.unwrap_or_default();
                        let _ = tx.send(Ok(format!("data: {why}\n\ndata: [DONE]\n\n").into())).await;
                        return;
                    }
                    // Not ready yet (loading), overloaded, or gone: wait and try again.
                    Ok(_) | Err(_) => {
                        if Instant::now() >= until {
                            break None;
                        }
                        tried.push(h.name.clone());
                        if tried.len() > 8 {
                            tried.drain(..tried.len() - 1);
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            };
            let Some((r, h)) = next else {
                let err = serde_json::json!({"error": {"message": "the pipeline head died mid-stream and no other could resume the request", "type": "service_unavailable", "param": null, "code": "head_unreachable"}});
                let _ = tx.send(Ok(format!("data: {err}\n\ndata: [DONE]\n\n").into())).await;
                return;
            };
            eprintln!("baton: a request resumed at {} after {} token(s)", h.name, state.token_ids.len());
            (resp, outstanding, head) = (r, Outstanding(front.clone(), h.name.clone()), h.name);
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)))
        .unwrap_or_else(|e| unavailable(format!("relaying the head's answer: {e}")))
}

/// On a head of a cluster with several replicas: a generation request that arrives here directly
/// goes to the head the routing core chooses, which may be this one (`me`, served as usual) or
/// another (proxied, marked forwarded so it stays there, and resumed elsewhere if that head
/// dies). Other requests are this head's own.
pub async fn spread(State((front, me)): State<(Arc<Front>, String)>, req: Request, next: axum::middleware::Next) -> Response {
    if req.method() != axum::http::Method::POST || req.headers().contains_key(FORWARDED) {
        return next.run(req).await;
    }
    let (parts, bytes) = match read_body(req).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let key = generation_body(&parts, &bytes).map(|(b, _)| prompt_key(&b)).unwrap_or_default();
    let Some(head) = front.pick_for(&[], &key) else {
        return next.run(Request::from_parts(parts, Body::from(bytes))).await;
    };
    if head.name != me {
        return relay(front, Some(head), parts, bytes).await;
    }
    let outstanding = Outstanding(front.clone(), head.name.clone());
    hold_until_sent(next.run(Request::from_parts(parts, Body::from(bytes))).await, outstanding)
}

/// Keeps `outstanding` alive until the response body has been sent.
fn hold_until_sent(resp: Response, outstanding: Outstanding) -> Response {
    let (parts, body) = resp.into_parts();
    let body = body.into_data_stream().map(move |chunk| {
        let _ = &outstanding;
        chunk
    });
    Response::from_parts(parts, Body::from_stream(body))
}

/// Feeds the routing and autoscaling cores: each head's `/v1/load`, every 200 ms.
async fn poll_loads(front: Arc<Front>) {
    loop {
        for head in front.heads() {
            let got = front.client.get(format!("http://{}/v1/load", head.http)).timeout(Duration::from_secs(1)).send().await;
            let load = match got {
                Ok(r) => r.bytes().await.ok().and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok()).map(|v| {
                    let sample = ReplicaSample {
                        waiting: v["waiting"].as_u64().unwrap_or(0),
                        running: v["running"].as_u64().unwrap_or(0),
                        kv_usage: v["kv_cache_usage"].as_f64().unwrap_or(0.0),
                        queue_time_count: v["queue_time_count"].as_u64().unwrap_or(0),
                        queue_time_sum_s: v["queue_time_sum_s"].as_f64().unwrap_or(0.0),
                    };
                    (sample, v["kv_blocks"].as_u64())
                }),
                Err(_) => None,
            };
            match load {
                Some((sample, blocks)) => front.report(&head.name, sample, blocks),
                None => front.unreachable(&head.name),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Serves `listen`, forwarding everything to the pipeline heads' HTTP addresses.
/// `/metrics` is this node's own (what Prometheus scraping every node expects; the requests it
/// forwards are counted by the heads' `/metrics`); every other path is forwarded.
/// `own_routes` (the cluster view, `/dashboard`) are served here too.
pub async fn serve(listen: SocketAddr, front: Arc<Front>, metrics: baton_serve::MoreMetrics, own_routes: axum::Router, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    let heads: Vec<String> = front.heads().iter().map(|h| format!("{} (http://{})", h.name, h.http)).collect();
    eprintln!("baton: forwarding http://{listen} to the pipeline head(s) {}, by load", heads.join(", "));
    let own = axum::routing::get(move || async move { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], (metrics.0)()) });
    let app = axum::Router::new().route("/metrics", own).fallback(forward).with_state(front).merge(own_routes);
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await?;
    Ok(())
}
