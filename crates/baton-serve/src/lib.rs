//! Serving on one node: the router, scheduler and shard actors (ractor), the OpenAI-compatible
//! HTTP API (axum) with SSE streaming, and latency metrics from HDR histograms.
//!
//! Request path: HTTP handler -> router actor (template, tokenize, validate, admission) ->
//! scheduler actor (continuous batching core, streams, metrics) -> shard actor (forward pass and
//! sampling on its own thread) -> scheduler -> the request's event stream -> HTTP response.

pub mod cluster_stats;
pub mod error;
pub mod http;
pub mod metrics;
pub mod openai;
pub mod quic;
pub mod request;
pub mod router;
pub mod scheduler;
pub mod shard;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use baton_engine::{KvGeometry, ModelConfig, TextTokenizer};
use baton_scheduler::{Scheduler, SchedulerConfig};
use ractor::Actor;

pub use error::ServeError;

/// How to serve one model on this node.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub model_dir: PathBuf,
    /// The name clients put in `model`.
    pub model_name: String,
    pub listen: SocketAddr,
    /// This node's GPU-shard actor (stopped when serving ends, unless `keep_device`).
    pub device: baton_shard::ShardHandle,
    /// The caller stops the shard: a cluster node serves on with it after it steps down from
    /// heading a pipeline.
    pub keep_device: bool,
    /// Bytes of KV cache.
    pub kv_cache_bytes: usize,
    pub max_num_seqs: usize,
    pub max_batched_tokens: usize,
    /// Reuse the KV of prompt prefixes seen before (`--enable-prefix-caching`).
    pub prefix_caching: bool,
    /// Requests allowed to wait before new ones get 429.
    pub max_waiting: usize,
    /// Context length; default: the model's.
    pub max_model_len: Option<usize>,
    /// UDP address of the native QUIC client API (None: off).
    pub quic_listen: Option<SocketAddr>,
    /// Where to write the QUIC server's self-signed certificate (DER) for clients to trust.
    pub quic_cert_out: Option<PathBuf>,
    /// The QUIC API's certificate and key; `None` makes a self-signed one (written to
    /// `quic_cert_out` for clients to trust). Cluster nodes present their cluster certificate.
    pub quic_identity: Option<quic::Identity>,
    /// Set when this node heads a multi-node pipeline (the rest of the layers are remote).
    pub pipeline: Option<Arc<shard::PipelinePlan>>,
    /// Wraps the HTTP routes: a cluster head with replicas adds the middleware that sends
    /// requests to the least loaded head.
    pub http_layer: Option<HttpLayer>,
    /// A request unfinished this long after it arrived ends with a timeout error (504).
    pub request_timeout: Duration,
    /// Told the bound HTTP and QUIC addresses once both listen (for `listen` port 0).
    pub on_bound: Option<OnBound>,
    /// A cluster's QUIC client APIs, named as their certificates are.
    pub peers: Option<Peers>,
    /// More Prometheus text for `/metrics`: a cluster node's own counters (what its peers sent
    /// that it dropped).
    pub more_metrics: Option<MoreMetrics>,
}

/// Prometheus text appended to `/metrics` when it is scraped.
#[derive(Clone)]
pub struct MoreMetrics(pub Arc<dyn Fn() -> String + Send + Sync>);

impl std::fmt::Debug for MoreMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MoreMetrics")
    }
}

/// The cluster's QUIC client APIs now (name, address), for clients that resume streams.
#[derive(Clone)]
pub struct Peers(pub Arc<dyn Fn() -> Vec<(String, SocketAddr)> + Send + Sync>);

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Peers")
    }
}

/// Called with the addresses the server bound (HTTP, and QUIC when it is on).
#[derive(Clone)]
pub struct OnBound(pub Arc<dyn Fn(SocketAddr, Option<SocketAddr>) + Send + Sync>);

impl std::fmt::Debug for OnBound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnBound")
    }
}

/// Why the server could not start (each names what to fix).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Model(#[from] baton_engine::EngineError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("--kv-cache-mb: {0}")]
    KvCache(String),
    #[error("cannot start the {0} actor: {1}")]
    Actor(&'static str, String),
    #[error("the HTTP server failed: {0}")]
    Http(std::io::Error),
    #[error("QUIC client API: {0}")]
    Quic(String),
}

pub const BLOCK_SIZE: usize = 16;

/// A function that wraps the HTTP routes.
#[derive(Clone)]
pub struct HttpLayer(pub Arc<dyn Fn(axum::Router) -> axum::Router + Send + Sync>);

impl std::fmt::Debug for HttpLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HttpLayer")
    }
}

/// A key no client can guess, so no prompt can be crafted to collide with another's blocks.
fn random_key() -> [u64; 2] {
    use std::hash::{BuildHasher, Hasher};
    let draw = |salt: u64| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(salt);
        h.finish()
    };
    [draw(1), draw(2)]
}

/// Serves until `shutdown` resolves, then stops taking requests (503), lets running requests
/// finish, and returns.
pub async fn serve(opts: ServeOptions, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), StartError> {
    let config = ModelConfig::from_dir(&opts.model_dir)?;
    let tokenizer = Arc::new(TextTokenizer::from_dir(&opts.model_dir, &config)?);
    let max_model_len = opts.max_model_len.unwrap_or(config.max_position_embeddings).min(config.max_position_embeddings);
    let geometry = KvGeometry::for_budget(opts.kv_cache_bytes, config.num_layers, config.kv_dim(), BLOCK_SIZE);
    if geometry.num_blocks == 0 {
        return Err(StartError::KvCache("the KV cache budget holds no block".into()));
    }
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|source| StartError::Bind { addr: opts.listen, source })?;
    let bound = listener.local_addr().map_err(StartError::Http)?;
    tracing::info!(%bound, blocks = geometry.num_blocks, "listening; loading the model");
    eprintln!(
        "baton: serving `{}` on http://{bound} (KV cache: {} blocks of {BLOCK_SIZE} tokens)",
        opts.model_name, geometry.num_blocks
    );

    let metrics = Arc::new(metrics::Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    let unready = Arc::new(std::sync::Mutex::new(None));
    let draining = Arc::new(AtomicBool::new(false));
    let mut core = Scheduler::new(
        SchedulerConfig {
            max_num_seqs: opts.max_num_seqs,
            max_batched_tokens: opts.max_batched_tokens,
            max_waiting: opts.max_waiting,
            max_model_len,
        },
        geometry,
    );
    if opts.prefix_caching {
        core.enable_prefix_caching(baton_engine::PrefixHasher::new(random_key()));
    }
    let device = opts.device.clone();
    // Unnamed (ractor's names are process-wide): several nodes, heads among them, may serve in
    // one process (baton-node's in-process tests run two clusters at once).
    let (sched, sched_handle) = Actor::spawn(
        None,
        scheduler::SchedulerActor,
        scheduler::SchedulerArgs {
            core,
            shard: scheduler::ShardArgsTemplate { model_dir: opts.model_dir.clone(), device: device.clone(), fault: None, pipeline: opts.pipeline.clone() },
            tokenizer: tokenizer.clone(),
            metrics: metrics.clone(),
            ready: ready.clone(),
            unready: unready.clone(),
            request_timeout: opts.request_timeout,
        },
    )
    .await
    .map_err(|e| StartError::Actor("scheduler", e.to_string()))?;
    let (router, router_handle) = Actor::spawn(
        None,
        router::Router,
        router::RouterArgs {
            model_name: opts.model_name.clone(),
            tokenizer: tokenizer.clone(),
            max_model_len,
            vocab_size: config.vocab_size,
            scheduler: sched.clone(),
            max_pending: opts.max_waiting,
        },
    )
    .await
    .map_err(|e| StartError::Actor("router", e.to_string()))?;

    let state = Arc::new(http::AppState {
        router: router.clone(),
        scheduler: sched.clone(),
        metrics,
        tokenizer,
        model_name: opts.model_name.clone(),
        max_model_len,
        ready,
        unready,
        draining: draining.clone(),
        next_request: AtomicU64::new(0),
        created: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        peers: opts.peers.clone(),
        more_metrics: opts.more_metrics.clone(),
    });
    let quic = match opts.quic_listen {
        None => None,
        Some(addr) if opts.quic_identity.is_some() => {
            let identity = opts.quic_identity.as_ref().ok_or_else(|| StartError::Quic("no identity".into()))?;
            let ep = quic::endpoint(addr, identity).map_err(StartError::Quic)?;
            let bound = ep.local_addr().map_err(|e| StartError::Quic(e.to_string()))?;
            eprintln!("baton: QUIC client API on quic://{bound} (certificate signed by the cluster CA)");
            tokio::spawn(quic::serve(ep.clone(), state.clone()));
            Some(ep)
        }
        Some(addr) => {
            let identity = quic::Identity::self_signed(vec!["localhost".into(), addr.ip().to_string()]).map_err(StartError::Quic)?;
            let ep = quic::endpoint(addr, &identity).map_err(StartError::Quic)?;
            let bound = ep.local_addr().map_err(|e| StartError::Quic(e.to_string()))?;
            let cert_path = opts
                .quic_cert_out
                .clone()
                .unwrap_or_else(|| std::env::temp_dir().join(format!("baton-quic-{}.der", bound.port())));
            identity
                .write_cert(&cert_path)
                .map_err(|e| StartError::Quic(format!("cannot write {}: {e}", cert_path.display())))?;
            eprintln!("baton: QUIC client API on quic://{bound} (server certificate: {})", cert_path.display());
            tokio::spawn(quic::serve(ep.clone(), state.clone()));
            Some(ep)
        }
    };
    if let Some(tell) = &opts.on_bound {
        (tell.0)(bound, quic.as_ref().and_then(|ep| ep.local_addr().ok()));
    }
    let drain_sched = sched.clone();
    let graceful = async move {
        shutdown.await;
        draining.store(true, Ordering::SeqCst);
        eprintln!("baton: shutting down: finishing running requests");
        loop {
            match ractor::call!(drain_sched, scheduler::SchedulerMsg::Load) {
                Ok(0) | Err(_) => break,
                Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    };
    // Tokens are small writes: without TCP_NODELAY, Nagle's algorithm and delayed ACKs hold a
    // stream's chunks back by ~40 ms.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp: &mut tokio::net::TcpStream| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    let app = http::routes(state);
    let app = match &opts.http_layer {
        Some(layer) => (layer.0)(app),
        None => app,
    };
    let result = axum::serve(listener, app).with_graceful_shutdown(graceful).await;
    if let Some(ep) = quic {
        ep.close(0u32.into(), b"shutting down");
    }
    router.stop(None);
    sched.stop(None);
    let _ = router_handle.await;
    let _ = sched_handle.await;
    if !opts.keep_device {
        device.stop();
    }
    result.map_err(StartError::Http)
}
