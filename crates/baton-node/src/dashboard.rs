//! `/v1/cluster/stats` and `/dashboard` on every node that serves HTTP. The stats are the
//! cluster as this node sees it: its nodes (the gossip: state, replica, role, layers, speed,
//! busy share), each head's plan (`/v1/mesh`: epoch, last changes and why), and latency and
//! load merged from every head's `/v1/stats` (`baton_serve::cluster_stats`: HDR histograms
//! merged, per replica and for the cluster), with rates over the last seconds. The dashboard
//! is one page built into the binary (no CDN: it works air-gapped) that polls them each second.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use baton_mesh::gossip::Gossip;
use baton_serve::cluster_stats::{self, HeadStats, RateWindow};
use serde_json::{json, Value};

use crate::forward::Front;

/// The page: HTML, CSS and script in one file.
const PAGE: &str = include_str!("dashboard.html");

/// What the routes share: where the heads are, the gossip, the rate window.
pub struct ClusterView {
    front: Arc<Front>,
    gossip: Arc<Gossip>,
    rates: Mutex<RateWindow>,
    /// When `/v1/cluster/stats` was last asked for: the sampler runs while someone watches.
    asked: Mutex<Option<Instant>>,
    started: Instant,
}

impl ClusterView {
    pub fn new(front: Arc<Front>, gossip: Arc<Gossip>) -> Arc<ClusterView> {
        let view = Arc::new(ClusterView { front, gossip, rates: Mutex::default(), asked: Mutex::new(None), started: Instant::now() });
        tokio::spawn(sample_while_watched(Arc::downgrade(&view)));
        view
    }

    /// The routes, to merge into a node's HTTP app.
    pub fn routes(self: &Arc<Self>) -> axum::Router {
        axum::Router::new()
            .route("/v1/cluster/stats", axum::routing::get(stats))
            .route("/dashboard", axum::routing::get(|| async { ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], PAGE).into_response() }))
            .with_state(self.clone())
    }

    /// Every head's `/v1/stats` and `/v1/mesh`, merged, with the nodes and the rates.
    async fn sample(&self) -> Value {
        let heads = self.front.heads();
        let mut tasks = tokio::task::JoinSet::new();
        for (i, head) in heads.iter().enumerate() {
            let (client, http) = (self.front.client().clone(), head.http);
            tasks.spawn(async move {
                let get = |path: &'static str| {
                    let client = client.clone();
                    async move {
                        let r = client.get(format!("http://{http}{path}")).timeout(Duration::from_secs(2)).send().await.ok()?;
                        serde_json::from_slice::<Value>(&r.bytes().await.ok()?).ok()
                    }
                };
                (i, get("/v1/stats").await, get("/v1/mesh").await)
            });
        }
        let mut got: Vec<(usize, Option<Value>, Option<Value>)> = tasks.join_all().await;
        got.sort_by_key(|(i, _, _)| *i);
        let mut answered = Vec::new();
        let mut plans = serde_json::Map::new();
        let mut unreachable = Vec::new();
        for (i, stats, mesh) in got {
            let name = heads[i].name.clone();
            match stats {
                Some(stats) => answered.push(HeadStats { head: name.clone(), stats }),
                None => unreachable.push(json!(name.clone())),
            }
            if let Some(mesh) = mesh {
                plans.insert(name, mesh);
            }
        }
        let mut out = cluster_stats::cluster(&answered);
        let rates = self.rates.lock().unwrap_or_else(|p| p.into_inner()).observe(Instant::now(), &out["cluster"]);
        out["rates"] = rates;
        let mut nodes = self.gossip.members();
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        out["nodes"] = serde_json::to_value(&nodes).unwrap_or(Value::Null);
        out["plans"] = Value::Object(plans);
        out["unreachable_heads"] = Value::Array(unreachable);
        out["seen_from"] = json!(self.gossip.name());
        out["uptime_s"] = json!(self.started.elapsed().as_secs_f64());
        out
    }
}

async fn stats(State(view): State<Arc<ClusterView>>) -> axum::Json<Value> {
    *view.asked.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    axum::Json(view.sample().await)
}

/// Samples once a second while `/v1/cluster/stats` was asked for in the last five minutes, so
/// the rates cover the last seconds however often the page polls; idle otherwise.
async fn sample_while_watched(view: std::sync::Weak<ClusterView>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(view) = view.upgrade() else { return };
        let watched = view.asked.lock().unwrap_or_else(|p| p.into_inner()).is_some_and(|t| t.elapsed() < Duration::from_secs(300));
        if watched {
            view.sample().await;
        }
    }
}
