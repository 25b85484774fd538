//! The HTTP front of a node that is not a pipeline head: every request is forwarded to the head
//! and its response (streamed or not) relayed back unchanged, so clients can use any node.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

struct Head {
    base: String,
    client: reqwest::Client,
}

fn unavailable(msg: String) -> Response {
    let body = serde_json::json!({"error": {"message": msg, "type": "service_unavailable", "param": null, "code": "head_unreachable"}});
    let mut r = (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
    r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    r
}

async fn forward(State(head): State<Arc<Head>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, 64 << 20).await {
        Ok(b) => b,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("cannot read the request body: {e}")).into_response(),
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut out = head.client.request(parts.method, format!("{}{path}", head.base)).body(bytes);
    if let Some(ct) = parts.headers.get(header::CONTENT_TYPE) {
        out = out.header(header::CONTENT_TYPE, ct);
    }
    let resp = match out.send().await {
        Ok(r) => r,
        Err(e) => return unavailable(format!("the pipeline head ({}) is unreachable: {e}", head.base)),
    };
    let mut builder = Response::builder().status(resp.status().as_u16());
    for name in [header::CONTENT_TYPE, header::RETRY_AFTER, header::CACHE_CONTROL] {
        if let Some(v) = resp.headers().get(name.as_str()) {
            builder = builder.header(name, v.as_bytes());
        }
    }
    builder
        .body(Body::from_stream(resp.bytes_stream()))
        .unwrap_or_else(|e| unavailable(format!("relaying the head's answer: {e}")))
}

/// Serves `listen`, forwarding everything to the head's HTTP address.
pub async fn serve(listen: SocketAddr, head: SocketAddr, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    eprintln!("baton: forwarding http://{listen} to the pipeline head at http://{head}");
    let state = Arc::new(Head { base: format!("http://{head}"), client: reqwest::Client::new() });
    let app = axum::Router::new().fallback(forward).with_state(state);
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await?;
    Ok(())
}
