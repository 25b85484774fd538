//! One node of a cluster.toml (what `baton node` runs). The node holding layer 0 is the pipeline
//! head: it serves the HTTP and QUIC client APIs, schedules, and sends each step down the other
//! stages over the tensor plane (UCX, or QUIC streams), having agreed on it over the mutually
//! authenticated QUIC control plane, and follows the membership (gossip, its own probes) to
//! re-place stages. The other nodes serve whatever stage the head gives them. A node not in
//! cluster.toml joins through the seeds (the file's nodes) with a certificate from `baton
//! cluster add-node`; `--drain` (or SIGUSR1 at the node) makes a node leave gracefully.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use baton_engine::{KvGeometry, ModelConfig};
use baton_mesh::config::{ClusterConfig, NodeConfig};

use crate::dashboard::ClusterView;
use baton_mesh::control::{ControlNode, Revoked};
use baton_mesh::elastic::Member;
use baton_mesh::gossip::{self, Gossip, NodeInfo, ServedLayers};
use baton_mesh::membership::{MeshDriver, ProbeConfig, Roster};
use baton_mesh::stage_service::{self, StageService};
use baton_mesh::tensor_plane::{PlaneChoice, TensorPlane};
use baton_mesh::{pki, placement};
use baton_serve::shard::PipelinePlan;
use baton_serve::{serve, ServeOptions};

use crate::forward::{Front, HeadAddr};

/// What one node runs with: the cluster, which node it is, and its engine settings.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub cluster: ClusterConfig,
    /// Where cluster.toml was read from (named in messages).
    pub cluster_path: PathBuf,
    /// This node (from cluster.toml, or for a node that joins, from [`joining_node`]).
    pub me: NodeConfig,
    /// The model's directory (every node has the whole checkpoint).
    pub model_dir: PathBuf,
    /// The device this node's GPU-shard actor runs on.
    pub device: baton_shard::Device,
    /// KV cache size in MiB (pipeline head: for the whole model's block table).
    pub kv_cache_mb: usize,
    /// Pipeline head: sequences in the running batch at most (all micro-batches together).
    pub max_num_seqs: usize,
    /// Pipeline head: reuse the KV of prompt prefixes seen before.
    pub prefix_caching: bool,
    /// Pipeline head: steps in flight at once (`None`: one per stage).
    pub micro_batches: Option<usize>,
    /// Pipeline head: steps down a chain of stage-to-stage links, or relayed through the head.
    pub stage_links: baton_serve::shard::StageLinks,
    pub tensor_plane: PlaneChoice,
    pub request_timeout: Duration,
    /// Handle SIGHUP (reload revocations) and SIGUSR1 (drain): off for in-process nodes, which
    /// share one process's signals.
    pub signals: bool,
}

/// The head's KV cache, in the bytes its block table counts (f32 K and V of every layer): the
/// host budget (`--kv-cache-mb`) on the CPU; on cards, the fewest blocks any stage's card holds
/// after its layers' weights (every stage allocates the head's block count), so admission,
/// preemption and 429 behave as on those cards. A stage whose cluster.toml `devices` names no
/// modeled card is taken to have the head's.
fn kv_budget(c: &ClusterConfig, device: &baton_shard::Device, stages: &[(String, std::ops::Range<usize>)], mc: &ModelConfig, kv_cache_mb: usize) -> anyhow::Result<usize> {
    let Some(own) = device.memory_bytes() else { return Ok(kv_cache_mb << 20) };
    let card = |name: &str| {
        c.node(name)
            .and_then(|n| n.devices.first())
            .and_then(|d| d.strip_prefix("mock:"))
            .and_then(|card| baton_engine::backend::mock::parse_card(card).ok())
            .map_or(own, |spec| spec.memory_bytes)
    };
    let tightest = stages
        .iter()
        .map(|(name, layers)| (name, layers, KvGeometry::on_device(card(name), mc, layers.clone(), baton_serve::BLOCK_SIZE)))
        .min_by_key(|(_, _, g)| g.num_blocks);
    let Some((name, layers, g)) = tightest else { return Ok(kv_cache_mb << 20) };
    if g.num_blocks == 0 {
        anyhow::bail!("node {name}: the weights of layers {}..{} alone fill its card's {} GiB (add nodes, or cards with more memory)", layers.start, layers.end, card(name) >> 30);
    }
    eprintln!("baton: KV cache of {} tokens: what node {name}'s card leaves after layers {}..{}", g.num_blocks * g.block_size, layers.start, layers.end);
    Ok(g.bytes(mc.num_layers, mc.kv_dim()))
}

/// How a node that cluster.toml does not name describes itself.
#[derive(Debug, Clone)]
pub struct JoinArgs {
    pub control: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
    pub memory_gb: f64,
    pub replica: usize,
}

/// This node as cluster.toml describes it, or, for a node that joins, as `args` do.
pub fn joining_node(c: &ClusterConfig, cluster_path: &std::path::Path, name: &str, args: &JoinArgs) -> anyhow::Result<NodeConfig> {
    if let Some(n) = c.node(name) {
        return Ok(n.clone());
    }
    let control = args.control.with_context(|| {
        format!("--name: {} has no node {name:?}; a node that joins needs --control HOST:PORT (and a certificate from `baton cluster add-node {name}`)", cluster_path.display())
    })?;
    if !(args.memory_gb.is_finite() && args.memory_gb > 0.0) {
        anyhow::bail!("--memory-gb: must be a positive number");
    }
    Ok(NodeConfig {
        name: name.to_string(),
        control,
        http: args.http,
        quic: None,
        devices: vec!["cpu".into()],
        memory_bytes: (args.memory_gb * (1u64 << 30) as f64) as u64,
        layers: None,
        replica: args.replica,
    })
}

/// The revocation list, read now and again on every SIGHUP.
fn revocations(tls_dir: &std::path::Path) -> anyhow::Result<Revoked> {
    let revoked: Revoked = Arc::new(std::sync::RwLock::new(pki::revoked(tls_dir)?));
    Ok(revoked)
}

async fn reload_revocations_on_sighup(tls_dir: PathBuf, revoked: Revoked, node: Arc<ControlNode>) {
    #[cfg(unix)]
    if let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        while hup.recv().await.is_some() {
            match pki::revoked(&tls_dir) {
                Ok(set) => {
                    let names = set.len();
                    *revoked.write().unwrap_or_else(|p| p.into_inner()) = set;
                    node.revocations_changed();
                    eprintln!("baton: revocation list reloaded: {names} name(s); their open connections are closed");
                }
                Err(e) => eprintln!("baton: cannot reload the revocation list: {e}"),
            }
        }
    }
    #[cfg(not(unix))]
    let _ = (tls_dir, revoked, node);
}

/// `baton node --drain`: asks the node to leave and waits for its answer.
pub async fn drain_remote(c: &ClusterConfig, me: &NodeConfig) -> anyhow::Result<()> {
    let identity = pki::load(&c.tls_dir, &me.name).with_context(|| format!("{}'s certificate", me.name))?;
    {
        let any: SocketAddr = SocketAddr::from(([0, 0, 0, 0], 0));
        let client = ControlNode::bind(any, identity, Arc::default())?;
        let link = tokio::time::timeout(Duration::from_secs(5), client.connect(me.control, &me.name))
            .await
            .map_err(|_| anyhow::anyhow!("{} at {} did not answer", me.name, me.control))??;
        let reply = tokio::time::timeout(Duration::from_secs(5), stage_service::call(&link, &baton_mesh::stage_wire::StageRequest::Drain))
            .await
            .map_err(|_| anyhow::anyhow!("{} did not take the drain request (a pipeline head cannot drain yet)", me.name))??;
        client.close();
        match reply {
            baton_mesh::stage_wire::StageReply::Ack => {
                println!("{} is draining: it stops once its layers have moved", me.name);
                Ok(())
            }
            other => anyhow::bail!("{} answered {other:?}", me.name),
        }
    }
}

/// Runs the node until `shutdown` resolves (or, for a drained node, until the head releases
/// it).
pub async fn run(opts: NodeOptions, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let NodeOptions { cluster: c, cluster_path, me, model_dir: dir, device, kv_cache_mb, max_num_seqs, prefix_caching, micro_batches, stage_links, tensor_plane, request_timeout, signals } = opts;
    let mc = ModelConfig::from_dir(&dir)?;
    c.check_layers(&cluster_path, mc.num_layers)?;
    let plan = placement::plan(&c, mc.num_layers).with_context(|| format!("{}: placement", cluster_path.display()))?;
    // This node's pipeline (replica) and its stage in it; a joining node has none yet.
    let placed = plan.pipelines.iter().find_map(|p| p.stages.iter().position(|(n, _)| n == &me.name).map(|i| (p.stages.clone(), i)));
    let (mut stages, index) = placed.clone().unwrap_or_default();
    let mut is_head = placed.is_some() && index == 0;
    // `placement.replicas` is a minimum: a node that joins with a replica cluster.toml has no
    // node of forms that replica (its head), unless the gossip shows one already has.
    let new_replica = placed.is_none() && !c.nodes.iter().any(|n| n.replica == me.replica);
    // Every replica's head, where requests entering at a non-head node go.
    let heads: Vec<HeadAddr> = plan
        .pipelines
        .iter()
        .filter_map(|p| p.stages.first())
        .filter_map(|(n, _)| c.node(n))
        .filter_map(|n| n.http.map(|http| HeadAddr { name: n.name.clone(), http, quic: n.quic }))
        .collect();
    let layers = stages.get(index).map(|s| s.1.clone());
    let identity = pki::load(&c.tls_dir, &me.name).with_context(|| {
        format!("this node's certificate (run `baton cluster init {0}`, or `baton cluster add-node {1} --cluster {0}` for a node that joins)", cluster_path.display(), me.name)
    })?;
    let revoked = revocations(&c.tls_dir)?;
    {
        let node = Arc::new(ControlNode::bind(me.control, identity.clone(), revoked.clone())?);
        if signals {
            tokio::spawn(reload_revocations_on_sighup(c.tls_dir.clone(), revoked, node.clone()));
        }
        let plane = Arc::new(TensorPlane::start(tensor_plane, &me.name).await?);
        let initial = match &layers {
            Some(l) => format!("layers {}..{} of {} to start with", l.start, l.end, mc.num_layers),
            None => format!("joining through the seeds; layers as the head places them (of {})", mc.num_layers),
        };
        eprintln!("baton: node {} of cluster `{}`: control plane on {} (QUIC, mutual TLS), {initial} on {}; tensor plane: {}", me.name, c.name, me.control, device.describe(), plane.describe());
        let info = NodeInfo {
            name: me.name.clone(),
            generation: stage_service::generation(),
            version: 0,
            control: me.control,
            http: me.http,
            quic: me.quic,
            memory_bytes: me.memory_bytes,
            replica: me.replica as u32,
            state: gossip::NodeState::Ready,
            // Said once the role is settled (below).
            head: false,
            serving: None,
            us_per_layer_token: None,
            busy_permille: 0,
            pipeline: None,
            device: device.describe().to_string(),
        };
        let seeds: Vec<(String, SocketAddr)> = c.nodes.iter().map(|n| (n.name.clone(), n.control)).collect();
        let gossip = Gossip::start(node.clone(), info, seeds.clone());
        tokio::spawn(keep_seeds_in_view(gossip.clone(), seeds, cluster_path.clone()));
        // This node's GPU-shard actor, whichever role it has; what it serves, its speed and
        // its load go out in the gossip.
        let shard = device.spawn(dir.clone()).await?;
        let _stop_shard = StopOnDrop(shard.clone());
        let _publisher = AbortOnDrop(tokio::spawn(publish_shard(gossip.clone(), shard.clone())));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let stopped = move || {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        let layer_bytes = placement::layer_bytes(&mc).max(1);
        if new_replica {
            match head_of_replica(&gossip, me.replica as u32).await {
                Some(head) => eprintln!("baton: replica {} is headed by {head}: joining it as a stage", me.replica),
                None => {
                    let holds = (me.memory_bytes / layer_bytes) as usize;
                    if holds < mc.num_layers {
                        anyhow::bail!(
                            "--replica {}: no node serves that replica yet, and this node's memory ({:.2} GiB) holds {holds} of the model's {} layers; the first node of a new replica must hold them all (--memory-gb {:.2} or more)",
                            me.replica,
                            me.memory_bytes as f64 / (1u64 << 30) as f64,
                            mc.num_layers,
                            (layer_bytes * mc.num_layers as u64) as f64 / (1u64 << 30) as f64
                        );
                    }
                    eprintln!("baton: forming replica {}: this node heads a new pipeline with all {} layers", me.replica, mc.num_layers);
                    stages = vec![(me.name.clone(), 0..mc.num_layers)];
                    is_head = true;
                }
            }
        } else if is_head {
            // cluster.toml makes this node the head, but while it was away another may have
            // taken over (succession): then it serves that head as a stage.
            let mut found = head_of_replica(&gossip, me.replica as u32).await;
            if found.is_none() {
                found = head_its_stages_serve(&node, &c, &me).await;
            }
            if let Some(head) = found {
                eprintln!("baton: {head} heads replica {} now (it took over while this node was away): joining it as a stage", me.replica);
                is_head = false;
            }
        }
        let static_heads: Vec<String> = heads.iter().map(|h| h.name.clone()).collect();
        // The node's stage service answers its control connections for its whole life, in
        // either role (while the node heads a pipeline, pings name it and stage work is refused).
        let svc = Arc::new(StageService::new(shard.clone(), plane.clone(), node.drops().clone()));
        tokio::spawn(stage_service::serve(node.clone(), svc.clone(), Some(gossip.clone())));
        if signals {
            tokio::spawn(drain_on_sigusr1(svc.clone()));
        }
        // Requests entering at a node that is not (or not yet) a head go to a head, through
        // this front; it stays on this node's public addresses if the node becomes a head.
        let mut entry: Option<Arc<Front>> = None;
        let mut plan = baton_mesh::elastic::Plan { epoch: 1, stages };
        loop {
            if !is_head {
                if entry.is_none() && (me.http.is_some() || me.quic.is_some()) {
                    entry = Some(start_entry_front(&me, &heads, &static_heads, &c, &gossip, &identity, &node));
                }
                let mut draining = svc.draining();
                let mut released = svc.released();
                let leave = {
                    let gossip = gossip.clone();
                    async move {
                        let _ = draining.wait_for(|d| *d).await;
                        eprintln!("baton: draining: waiting for the head to move this node's layers");
                        gossip.update(|i| i.state = gossip::NodeState::Draining);
                        let _ = released.wait_for(|r| *r).await;
                        eprintln!("baton: released by the head; leaving");
                        gossip.leave();
                        // Let the leave message go out.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                };
                // Only a node with an HTTP address can head (clients reach the head's API).
                let heir = async {
                    match me.http {
                        Some(_) => crate::succession::await_head_loss(&svc, &gossip, layer_bytes, mc.num_layers).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = leave => {
                        node.close();
                        return Ok(());
                    }
                    _ = stopped() => {
                        node.close();
                        return Ok(());
                    }
                    // The head died (or was cut off) and this node held the layers after its
                    // own: it heads the pipeline now, from the plan it has taken over.
                    taken = heir => plan = taken,
                }
            }
            svc.set_heading(Some(me.name.clone()));
            let promoted = plan.epoch > 1;
            // The head: reach every other stage of the plan, agree on the tensor plane, then
            // follow the membership (stages re-placed when nodes are lost, restart or come back).
            // The stages' RMA windows hold one step's hidden states at the head's token budget.
            let max_batched_tokens = 512;
            let window_bytes = max_batched_tokens * mc.hidden_size * 4;
            let roster = pipeline_roster(&c, &me, &gossip, layer_bytes);
            let patience = if promoted { Duration::from_secs(10) } else { Duration::from_secs(120) };
            let mesh = MeshDriver::start(&me.name, node.clone(), plane.clone(), roster, mc.num_layers, plan.clone(), window_bytes, patience, ProbeConfig { rebalance_by_speed: c.rebalance, ..ProbeConfig::default() })
                .await
                .context("reaching the pipeline's stages")?;
            // The driver's own loops end with `mesh.stop()`; these, when dropped.
            tokio::spawn(mesh.clone().follow(gossip.clone(), me.replica as u32, layer_bytes));
            let mut head_tasks = vec![AbortOnDrop(tokio::spawn(publish_pipeline(gossip.clone(), mesh.clone(), plan.epoch)))];
            // Even a one-node pipeline follows the membership: nodes that join its replica take
            // layers from it.
            let pipeline = Some(Arc::new(PipelinePlan { micro_batches, mesh: mesh.clone(), stage_links }));
            let public = me.http.with_context(|| format!("{}: the head node {} needs an `http` address", cluster_path.display(), me.name))?;
            // A node that became the head keeps its entry front on its public addresses; the
            // head's own API listens on new ports of the same hosts, which the gossip tells the
            // fronts.
            let (listen, quic_listen) = match &entry {
                Some(_) => (SocketAddr::new(public.ip(), 0), me.quic.map(|q| SocketAddr::new(q.ip(), 0))),
                None => (public, me.quic),
            };
            // Requests arriving at a head directly are spread over every replica's head (this
            // one included), as they come and go; a promoted head's entry front does that
            // already.
            let spread = match &entry {
                Some(_) => None,
                None => {
                    let mut all_heads = heads.clone();
                    if !all_heads.iter().any(|h| h.name == me.name) {
                        all_heads.push(HeadAddr { name: me.name.clone(), http: listen, quic: me.quic });
                    }
                    let front = Front::start(all_heads, c.routing, &c.autoscale);
                    head_tasks.push(AbortOnDrop(tokio::spawn(follow_heads(gossip.clone(), front.clone(), static_heads.clone()))));
                    Some((front, me.name.clone()))
                }
            };
            // The autoscaling signal on `/metrics` comes from whichever front this head has.
            let scaling_front = spread.as_ref().map(|(f, _)| f).or(entry.as_ref()).cloned();
            // `/v1/cluster/stats` and `/dashboard`, from the same front.
            let cluster_routes = scaling_front.clone().map(|f| ClusterView::new(f, gossip.clone()).routes());
            // `/v1/mesh`: the membership view and the last plan changes (`baton status`).
            let view = mesh.clone();
            let http_layer = Some(baton_serve::HttpLayer(Arc::new(move |app| {
                let view = view.clone();
                let mut app = app.route("/v1/mesh", axum::routing::get(move || async move { axum::Json(view.status()) }));
                if let Some(routes) = &cluster_routes {
                    app = app.merge(routes.clone());
                }
                match &spread {
                    Some(state) => app.layer(axum::middleware::from_fn_with_state(state.clone(), crate::forward::spread)),
                    None => app,
                }
            })));
            let announce = gossip.clone();
            let on_bound = baton_serve::OnBound(Arc::new(move |http, quic| {
                announce.update(|i| {
                    i.head = true;
                    i.http = Some(http);
                    i.quic = quic;
                });
            }));
            // Every node's QUIC API (a stage's relay, a head's own), for clients resuming streams.
            let known = gossip.clone();
            let peers = baton_serve::Peers(Arc::new(move || known.members().into_iter().filter_map(|i| i.quic.map(|q| (i.name, q))).collect()));
            let model_name = dir.file_name().map_or_else(|| "model".to_string(), |n| n.to_string_lossy().into_owned());
            let opts = ServeOptions {
                model_dir: dir.clone(),
                model_name,
                listen,
                device: shard.clone(),
                keep_device: true,
                kv_cache_bytes: kv_budget(&c, &device, &plan.stages, &mc, kv_cache_mb)?,
                max_num_seqs,
                max_batched_tokens,
                prefix_caching,
                max_waiting: 1024,
                max_model_len: None,
                quic_listen,
                quic_cert_out: None,
                quic_identity: Some(baton_serve::quic::Identity { cert_der: identity.cert.to_vec(), key_der: identity.key.secret_pkcs8_der().to_vec() }),
                pipeline,
                http_layer,
                request_timeout,
                on_bound: Some(on_bound),
                peers: Some(peers),
                more_metrics: Some(node_metrics(&node, scaling_front)),
            };
            // Serving ends when the node stops, or when it meets another head of its replica
            // that outranks it (a partition healed): then it stops taking requests, lets those
            // running finish, and serves that head as a stage.
            let stepped_down = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let ended = {
                let (stop, stepped_down) = (stopped(), stepped_down.clone());
                let watch = outranked(gossip.clone(), me.replica as u32, static_heads.clone());
                async move {
                    tokio::select! {
                        _ = stop => {}
                        _ = watch => stepped_down.store(true, std::sync::atomic::Ordering::SeqCst),
                    }
                }
            };
            serve(opts, ended).await?;
            mesh.stop();
            drop(head_tasks);
            if !stepped_down.load(std::sync::atomic::Ordering::SeqCst) {
                node.close();
                return Ok(());
            }
            // (`outranked` has already said it heads no more.)
            gossip.update(|i| {
                i.http = me.http;
                i.quic = me.quic;
            });
            svc.set_heading(None);
            is_head = false;
            eprintln!("baton: stepped down: serving as a stage of the head that outranks this one");
        }
    }
}

/// This node's own counters for `/metrics`: what its peers sent that it dropped, and, from its
/// front, the autoscaling signal.
fn node_metrics(node: &Arc<ControlNode>, front: Option<Arc<Front>>) -> baton_serve::MoreMetrics {
    let node = node.clone();
    baton_serve::MoreMetrics(Arc::new(move || {
        let mut text = node.drops().prometheus();
        if let Some(front) = &front {
            text.push_str(&front.autoscale_prometheus());
        }
        text
    }))
}

/// The entry front on this node's public HTTP and QUIC addresses, following the gossip's heads,
/// never forwarding to itself (a head that stepped down is still cluster.toml's; the gossip
/// tells the front the head it serves now). Binding is retried for a few seconds: a head that
/// stepped down has just let go of them.
fn start_entry_front(me: &NodeConfig, heads: &[HeadAddr], static_heads: &[String], c: &ClusterConfig, gossip: &Arc<Gossip>, identity: &pki::NodeIdentity, node: &Arc<ControlNode>) -> Arc<Front> {
    let front = Front::start(heads.iter().filter(|h| h.name != me.name).cloned().collect(), c.routing, &c.autoscale);
    tokio::spawn(follow_heads(gossip.clone(), front.clone(), static_heads.to_vec()));
    if let Some(listen) = me.http {
        let front = front.clone();
        let metrics = node_metrics(node, Some(front.clone()));
        let routes = ClusterView::new(front.clone(), gossip.clone()).routes();
        tokio::spawn(serve_retrying("HTTP entry front", move || crate::forward::serve(listen, front.clone(), metrics.clone(), routes.clone(), std::future::pending())));
    }
    if let Some(listen) = me.quic {
        let (identity, front) = (identity.clone(), front.clone());
        tokio::spawn(serve_retrying("QUIC relay", move || {
            let (identity, front) = (identity.clone(), front.clone());
            async move { crate::quic_relay::serve(listen, front, &identity).await }
        }));
    }
    front
}

/// Runs a server, starting it again (10 tries, 500 ms apart) while it cannot bind.
async fn serve_retrying<F: std::future::Future<Output = anyhow::Result<()>>>(what: &'static str, mut serve: impl FnMut() -> F) {
    for _ in 1..10 {
        if serve().await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if let Err(e) = serve().await {
        eprintln!("baton: {what}: {e}");
    }
}

/// Publishes the pipeline this node heads (its plan's epoch, how many nodes serve it) while the
/// gossip says it is a head, whenever the plan changes.
async fn publish_pipeline(gossip: Arc<Gossip>, mesh: Arc<MeshDriver>, first_epoch: u64) {
    let mut notices = mesh.subscribe();
    let mut epoch = first_epoch;
    loop {
        let status = mesh.status();
        epoch = status.epoch.unwrap_or(epoch).max(epoch);
        let stages = status.nodes.iter().filter(|n| n.layers.is_some() && n.state == "serving").count() as u32;
        // A head that cannot serve (its stages lost) heads no pipeline worth keeping.
        let stages = if status.epoch.is_some() { stages } else { 0 };
        let now = Some(gossip::HeadedPipeline { epoch, stages });
        let mine = gossip.mine();
        if mine.head && mine.pipeline != now {
            gossip.update(|i| i.pipeline = now);
        }
        if let Ok(Err(_)) = tokio::time::timeout(Duration::from_millis(500), notices.changed()).await {
            return;
        }
    }
}

/// Resolves when another head of `replica` outranks this one (the two sides of a healed
/// partition each chose a head): twice in a row, half a second apart, so both have each
/// other's latest word. The gossip stops naming this node a head at once, so the fronts send
/// it nothing new.
async fn outranked(gossip: Arc<Gossip>, replica: u32, static_heads: Vec<String>) {
    let is_static = |n: &str| static_heads.iter().any(|h| h == n);
    let mut seen: Option<String> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mine = gossip.mine();
        let Some(my) = mine.pipeline.filter(|_| mine.head) else {
            seen = None;
            continue;
        };
        let winner = gossip.members().into_iter().find(|i| {
            i.head && i.replica == replica && i.name != mine.name && i.pipeline.is_some_and(|theirs| theirs.outranks(&i.name, &my, &mine.name, is_static))
        });
        match winner {
            Some(w) if seen.as_deref() == Some(w.name.as_str()) => {
                let theirs = w.pipeline.unwrap_or(my);
                eprintln!(
                    "baton: {} heads replica {replica} too (the cluster was split and has healed): its plan (epoch {}, {} node(s)) outranks this node's (epoch {}, {} node(s)); stepping down: finishing running requests, then serving as a stage",
                    w.name, theirs.epoch, theirs.stages, my.epoch, my.stages
                );
                gossip.update(|i| {
                    i.head = false;
                    i.pipeline = None;
                });
                return;
            }
            w => seen = w.map(|w| w.name),
        }
    }
}

/// Every node of this node's replica: cluster.toml's and those the gossip knows (nodes that
/// joined), with their control addresses; this node among them.
fn pipeline_roster(c: &ClusterConfig, me: &NodeConfig, gossip: &Gossip, layer_bytes: u64) -> Roster {
    let mut members = Vec::new();
    let mut control = std::collections::HashMap::new();
    let mut add = |name: &str, memory: u64, addr: SocketAddr| {
        if !control.contains_key(name) {
            members.push(Member { name: name.to_string(), capacity: memory as f64, max_layers: (memory / layer_bytes) as usize });
            control.insert(name.to_string(), addr);
        }
    };
    add(&me.name, me.memory_bytes, me.control);
    for n in c.nodes.iter().filter(|n| n.replica == me.replica) {
        add(&n.name, n.memory_bytes, n.control);
    }
    for i in gossip.members().into_iter().filter(|i| i.replica as usize == me.replica) {
        add(&i.name, i.memory_bytes, i.control);
    }
    Roster { members, control }
}

/// The head of `replica` the gossip knows (after waiting up to 5 s to hear from another node).
async fn head_of_replica(gossip: &Arc<Gossip>, replica: u32) -> Option<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    // Until another member is known and every live member's info has arrived.
    while (gossip.members().len() < 2 || gossip.members().len() <= gossip.alive().len()) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And a little longer for the members the first ones tell of.
    let settle = std::time::Instant::now() + Duration::from_millis(1500);
    while std::time::Instant::now() < settle.min(deadline) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let me = gossip.mine().name;
    gossip.members().into_iter().find(|i| i.head && i.replica == replica && i.name != me).map(|i| i.name)
}

/// The head another node of this replica (per cluster.toml) serves, if it is not this one: the
/// stages know theirs for sure, where the gossip may not have said it yet.
async fn head_its_stages_serve(node: &Arc<ControlNode>, c: &ClusterConfig, me: &NodeConfig) -> Option<String> {
    let mut asks = tokio::task::JoinSet::new();
    for n in c.nodes.iter().filter(|n| n.replica == me.replica && n.name != me.name) {
        let (node, name, addr) = (node.clone(), n.name.clone(), n.control);
        asks.spawn(async move { stage_service::head_of(&node, &name, addr).await });
    }
    while let Some(answer) = asks.join_next().await {
        if let Ok(Some(head)) = answer {
            if head != me.name {
                return Some(head);
            }
        }
    }
    None
}

/// Keeps an entry node's heads up to date with the gossip: a head that formed a new replica or
/// took over a dead head's pipeline is added (or its address updated); a node the gossip says
/// is alive and no head (a cluster.toml head that came back as a stage) is removed; one gone
/// from the gossip is removed unless cluster.toml names it (those stay: the routing core skips
/// them while they are unreachable).
async fn follow_heads(gossip: Arc<Gossip>, front: Arc<Front>, static_heads: Vec<String>) {
    let mut changes = gossip.subscribe();
    loop {
        let members = gossip.members();
        for info in members.iter().filter(|i| i.head) {
            if let Some(http) = info.http {
                front.add(HeadAddr { name: info.name.clone(), http, quic: info.quic });
            }
        }
        for h in front.heads() {
            let known = members.iter().find(|i| i.name == h.name);
            let gone = match known {
                Some(i) => !i.head && i.state == gossip::NodeState::Ready && i.serving.is_some(),
                None => !static_heads.contains(&h.name),
            };
            if gone {
                front.remove(&h.name);
            }
        }
        if let Ok(Err(_)) = tokio::time::timeout(Duration::from_secs(1), changes.changed()).await {
            return;
        }
    }
}

/// Stops the node's GPU shard (its weights and device thread) however `run` ends.
struct StopOnDrop(baton_shard::ShardHandle);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// Aborts a background task when the node stops.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How often a node looks at its shard for the gossip.
const PUBLISH_EVERY: Duration = Duration::from_secs(2);

/// Publishes what this node's GPU shard serves, its measured speed and its load (the share of
/// the last interval its device computed) whenever one of them changed noticeably.
async fn publish_shard(gossip: Arc<Gossip>, shard: baton_shard::ShardHandle) {
    let (mut last_busy, mut last_at) = (shard.stats().busy, std::time::Instant::now());
    loop {
        tokio::time::sleep(PUBLISH_EVERY).await;
        let stats = shard.stats();
        let now = std::time::Instant::now();
        let busy = stats.busy.saturating_sub(last_busy).as_secs_f64() / now.duration_since(last_at).as_secs_f64().max(1e-3);
        let busy_permille = (busy * 1000.0).clamp(0.0, 1000.0) as u16;
        (last_busy, last_at) = (stats.busy, now);
        let serving = shard.serving().map(|s| ServedLayers { first: s.layers.start as u32, end: s.layers.end as u32, epoch: s.epoch });
        let speed = stats.us_per_layer_token.map(|us| us as f32);
        let mine = gossip.mine();
        let speed_moved = match (speed, mine.us_per_layer_token) {
            (Some(a), Some(b)) => (a - b).abs() > 0.05 * b,
            (a, b) => a.is_some() != b.is_some(),
        };
        if mine.serving != serving || speed_moved || busy_permille.abs_diff(mine.busy_permille) >= 50 {
            gossip.update(|i| {
                i.serving = serving;
                i.us_per_layer_token = speed;
                i.busy_permille = busy_permille;
            });
        }
    }
}

/// Announces this node to every seed (cluster.toml's nodes) the gossip does not hold as a live
/// member: every 2 s while it knows no one (the seeds may start after it), every 5 s after (a
/// seed that restarted alone, whose own seeds were only itself, is found again), with the
/// seeds' host names resolved again each round.
async fn keep_seeds_in_view(gossip: Arc<Gossip>, mut seeds: Vec<(String, SocketAddr)>, cluster_path: std::path::PathBuf) {
    loop {
        let alone = gossip.members().len() <= 1;
        tokio::time::sleep(Duration::from_secs(if alone { 2 } else { 5 })).await;
        let alive = gossip.alive();
        let absent: Vec<&(String, SocketAddr)> = seeds.iter().filter(|(name, _)| name != gossip.name() && !alive.contains(name)).collect();
        if absent.is_empty() {
            continue;
        }
        for (name, control) in absent {
            gossip.announce(name, *control);
        }
        // Names resolve again for the next round: a seed whose pod came back on a new IP.
        if let Ok(c) = ClusterConfig::from_file(&cluster_path) {
            seeds = c.nodes.iter().map(|n| (n.name.clone(), n.control)).collect();
        }
    }
}

/// SIGUSR1: leave gracefully, as `baton node --drain` asks.
async fn drain_on_sigusr1(svc: Arc<StageService>) {
    #[cfg(unix)]
    if let Ok(mut usr1) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1()) {
        if usr1.recv().await.is_some() {
            svc.drain();
        }
    }
    #[cfg(not(unix))]
    let _ = svc;
}
