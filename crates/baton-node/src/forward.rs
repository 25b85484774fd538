//! The front of a node that is not a pipeline head: every HTTP request is forwarded to a
//! pipeline head, the least loaded one when the cluster runs several replicas (the routing core,
//! `baton_mesh::routing`, fed by polling each head's `/v1/load`), and its response (streamed or
//! not) relayed back unchanged, so clients can use any node. (The QUIC API's relay,
//! `quic_relay`, picks heads through the same [`Front`].)

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton_mesh::routing::HeadLoads;
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

/// The heads and what this node knows of their load.
pub struct Front {
    pub heads: Vec<HeadAddr>,
    bases: Vec<String>,
    loads: Mutex<HeadLoads>,
    client: reqwest::Client,
}

impl Front {
    /// Starts polling the heads' load.
    pub fn start(heads: Vec<HeadAddr>) -> Arc<Front> {
        let bases = heads.iter().map(|h| format!("http://{}", h.http)).collect();
        let loads = Mutex::new(HeadLoads::new(heads.iter().map(|h| h.name.clone())));
        let front = Arc::new(Front { loads, heads, bases, client: reqwest::Client::new() });
        tokio::spawn(poll_loads(front.clone()));
        front
    }

    fn loads(&self) -> std::sync::MutexGuard<'_, HeadLoads> {
        self.loads.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The least loaded head not in `tried` (indices into `heads`); the routing core keys heads
    /// by name, this shell by position in its address list.
    pub fn pick(&self, tried: &[usize]) -> Option<usize> {
        let exclude: Vec<&str> = tried.iter().filter_map(|&i| self.heads.get(i)).map(|h| h.name.as_str()).collect();
        let name = self.loads().pick(Instant::now(), &exclude)?;
        self.heads.iter().position(|h| h.name == name)
    }

    pub fn unreachable(&self, i: usize) {
        if let Some(h) = self.heads.get(i) {
            self.loads().unreachable(&h.name, Instant::now());
        }
    }

    fn report(&self, i: usize, load: u64) {
        if let Some(h) = self.heads.get(i) {
            self.loads().report(&h.name, load, Instant::now());
        }
    }

    pub fn finished(&self, i: usize) {
        if let Some(h) = self.heads.get(i) {
            self.loads().finished(&h.name);
        }
    }
}

/// Marks a forwarded request finished when dropped (with the relayed body, or on failure).
pub struct Outstanding(pub Arc<Front>, pub usize);

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.0.finished(self.1);
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

/// Sends a request (its parts and body) to head `i`, marked as forwarded.
async fn send_to(front: &Front, i: usize, parts: &axum::http::request::Parts, bytes: &axum::body::Bytes) -> Result<reqwest::Response, reqwest::Error> {
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut out = front.client.request(parts.method.clone(), format!("{}{path}", front.bases[i])).body(bytes.clone()).header(FORWARDED, "1");
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
    let mut tried = Vec::new();
    loop {
        let Some(i) = front.pick(&tried) else {
            return unavailable(format!("no pipeline head is reachable (tried {})", tried.iter().map(|&i| front.bases[i].as_str()).collect::<Vec<_>>().join(", ")));
        };
        let outstanding = Outstanding(front.clone(), i);
        match send_to(&front, i, &parts, &bytes).await {
            Ok(r) => return relay_back(r, outstanding),
            // Never delivered: another head may take it.
            Err(e) if e.is_connect() => {
                tracing::warn!(head = %front.bases[i], error = %e, "a pipeline head is unreachable");
                front.unreachable(i);
                tried.push(i);
            }
            Err(e) => return unavailable(format!("the pipeline head ({}) failed: {e}", front.bases[i])),
        }
    }
}

/// On a head of a cluster with several replicas: a generation request that arrives here directly
/// goes to the least loaded head, which may be this one (`me`, served as usual) or another
/// (proxied, marked forwarded so it stays there). Other requests are this head's own.
pub async fn spread(State((front, me)): State<(Arc<Front>, usize)>, req: Request, next: axum::middleware::Next) -> Response {
    if req.method() != axum::http::Method::POST || req.headers().contains_key(FORWARDED) {
        return next.run(req).await;
    }
    let Some(i) = front.pick(&[]) else {
        return next.run(req).await;
    };
    let outstanding = Outstanding(front.clone(), i);
    if i != me {
        let (parts, bytes) = match read_body(req).await {
            Ok(r) => r,
            Err(resp) => return resp,
        };
        match send_to(&front, i, &parts, &bytes).await {
            Ok(r) => return relay_back(r, outstanding),
            Err(e) => {
                tracing::warn!(head = %front.bases[i], error = %e, "another head is unreachable; serving here");
                front.unreachable(i);
                drop(outstanding);
                let outstanding = Outstanding(front.clone(), me);
                let resp = next.run(Request::from_parts(parts, Body::from(bytes))).await;
                return hold_until_sent(resp, outstanding);
            }
        }
    }
    hold_until_sent(next.run(req).await, outstanding)
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

/// Feeds the routing core: each head's running + waiting requests (`/v1/load`), every 200 ms.
async fn poll_loads(front: Arc<Front>) {
    loop {
        for (i, base) in front.bases.iter().enumerate() {
            let got = front.client.get(format!("{base}/v1/load")).timeout(Duration::from_secs(1)).send().await;
            let load = match got {
                Ok(r) => r.bytes().await.ok().and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok()).map(|v| {
                    v["running"].as_u64().unwrap_or(0) + v["waiting"].as_u64().unwrap_or(0)
                }),
                Err(_) => None,
            };
            match load {
                Some(l) => front.report(i, l),
                None => front.unreachable(i),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Serves `listen`, forwarding everything to the pipeline heads' HTTP addresses.
pub async fn serve(listen: SocketAddr, front: Arc<Front>, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    eprintln!("baton: forwarding http://{listen} to the pipeline head(s) {}, by load", front.bases.join(", "));
    let app = axum::Router::new().fallback(forward).with_state(front);
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await?;
    Ok(())
}
