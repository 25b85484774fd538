//! `baton node`: runs one node of a cluster.toml. The node holding layer 0 is the pipeline
//! head: it serves the HTTP and QUIC client APIs, schedules, and sends each step down the other
//! stages over the tensor plane (UCX, or QUIC streams), having agreed on it over the mutually
//! authenticated QUIC control plane. The other nodes serve their stage.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use baton_engine::ModelConfig;
use baton_mesh::config::ClusterConfig;
use baton_mesh::control::ControlNode;
use baton_mesh::elastic::Member;
use baton_mesh::membership::{MeshDriver, ProbeConfig, Roster};
use baton_mesh::stage_service::{self, StageService};
use baton_mesh::tensor_plane::{PlaneChoice, TensorPlane};
use baton_mesh::{pki, placement};
use baton_serve::shard::PipelinePlan;
use baton_serve::{serve, ServeOptions};

use crate::forward::{Front, HeadAddr};
use crate::load;

#[derive(clap::Args)]
pub struct Args {
    /// The cluster description.
    #[arg(long, default_value = "cluster.toml")]
    cluster: PathBuf,
    /// This node's name in cluster.toml.
    #[arg(long)]
    name: String,
    /// CPU threads for this node's stage (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// KV cache size in MiB (pipeline head: for the whole model's block table).
    #[arg(long, default_value_t = 1024)]
    kv_cache_mb: usize,
    /// Pipeline head: steps (micro-batches) in flight at once; default one per stage. 1 runs the
    /// stages one after another with bigger batches (better when they share the same cores).
    #[arg(long)]
    micro_batches: Option<usize>,
    /// What carries activations between stages: `ucx` (the default when built in; transports
    /// from UCX_TLS) or `quic` (the control plane's streams). Head and stages must agree.
    #[arg(long, value_parser = parse_plane)]
    tensor_plane: Option<PlaneChoice>,
    /// Pipeline head: seconds a request may take before it ends with a timeout error (504).
    #[arg(long, default_value_t = 600)]
    request_timeout: u64,
}

fn parse_plane(s: &str) -> Result<PlaneChoice, String> {
    match s {
        "ucx" => Ok(PlaneChoice::Ucx),
        "quic" => Ok(PlaneChoice::Quic),
        other => Err(format!("{other:?} is not a tensor plane (ucx, quic)")),
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let c = ClusterConfig::from_file(&args.cluster)?;
    let me = c.node(&args.name).with_context(|| format!("--name: {}: no node named {:?}", args.cluster.display(), args.name))?.clone();
    let dir = load::ClusterModel::of(&c, &args.cluster)?.dir()?;
    let mc = ModelConfig::from_dir(&dir)?;
    c.check_layers(&args.cluster, mc.num_layers)?;
    let plan = placement::plan(&c, mc.num_layers).with_context(|| format!("{}: placement", args.cluster.display()))?;
    // This node's pipeline (replica) and its stage in it.
    let (stages, index) = plan
        .pipelines
        .iter()
        .find_map(|p| p.stages.iter().position(|(n, _)| n == &me.name).map(|i| (p.stages.clone(), i)))
        .context("this node has no stage in the placement")?;
    // Every replica's head, where requests entering at a non-head node go.
    let heads: Vec<HeadAddr> = plan
        .pipelines
        .iter()
        .filter_map(|p| p.stages.first())
        .filter_map(|(n, _)| c.node(n))
        .filter_map(|n| n.http.map(|http| HeadAddr { name: n.name.clone(), http, quic: n.quic }))
        .collect();
    let layers = stages[index].1.clone();
    let identity = pki::load(&c.tls_dir, &me.name)
        .with_context(|| format!("this node's certificate (run `baton cluster init {}` first)", args.cluster.display()))?;
    let roster: Vec<String> = c.nodes.iter().map(|n| n.name.clone()).collect();
    let threads = args.threads.unwrap_or_else(load::default_threads);

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().thread_name("baton-io").build()?;
    runtime.block_on(async move {
        let node = Arc::new(ControlNode::bind(me.control, identity.clone(), roster)?);
        let plane = Arc::new(TensorPlane::start(args.tensor_plane.unwrap_or_else(PlaneChoice::default_for_build), &me.name).await?);
        eprintln!(
            "baton: node {} of cluster `{}`: control plane on {} (QUIC, mutual TLS), layers {}..{} of {}; tensor plane: {}",
            me.name,
            c.name,
            me.control,
            layers.start,
            layers.end,
            mc.num_layers,
            plane.describe()
        );
        if index > 0 {
            let svc = Arc::new(StageService::new(dir, threads, plane.clone()));
            // Requests entering here (HTTP or QUIC) go to a head.
            if !heads.is_empty() && (me.http.is_some() || me.quic.is_some()) {
                let front = Front::start(heads);
                if let Some(listen) = me.http {
                    let front = front.clone();
                    tokio::spawn(async move {
                        if let Err(e) = crate::forward::serve(listen, front, std::future::pending()).await {
                            eprintln!("baton: {e}");
                        }
                    });
                }
                if let Some(listen) = me.quic {
                    let identity = identity.clone();
                    tokio::spawn(async move {
                        if let Err(e) = crate::quic_relay::serve(listen, front, &identity).await {
                            eprintln!("baton: QUIC relay: {e}");
                        }
                    });
                }
            }
            tokio::select! {
                _ = stage_service::serve(node.clone(), svc) => {},
                _ = crate::serve::shutdown_signal() => node.close(),
            }
            return Ok(());
        }
        // The head: reach every other stage of the initial plan, agree on the tensor plane, then
        // follow the membership (stages re-placed when nodes are lost, restart or come back).
        // The stages' RMA windows hold one step's hidden states at the head's token budget.
        let max_batched_tokens = 512;
        let window_bytes = max_batched_tokens * mc.hidden_size * 4;
        let layer_bytes = placement::layer_bytes(&mc).max(1);
        let pipeline_nodes: Vec<_> = c.nodes.iter().filter(|n| n.replica == me.replica).collect();
        let roster = Roster {
            members: pipeline_nodes
                .iter()
                .map(|n| Member { name: n.name.clone(), capacity: n.memory_bytes as f64, max_layers: (n.memory_bytes / layer_bytes) as usize })
                .collect(),
            control: pipeline_nodes.iter().map(|n| (n.name.clone(), n.control)).collect(),
        };
        let mesh = MeshDriver::start(&me.name, node.clone(), plane.clone(), roster, mc.num_layers, stages.clone(), window_bytes, Duration::from_secs(120), ProbeConfig::default())
            .await
            .context("reaching the pipeline's stages")?;
        let pipeline = (stages.len() > 1).then(|| {
            Arc::new(PipelinePlan { micro_batches: args.micro_batches, mesh: mesh.clone(), runtime: tokio::runtime::Handle::current() })
        });
        let listen = me.http.with_context(|| format!("{}: the head node {} needs an `http` address", args.cluster.display(), me.name))?;
        // With several replicas, requests arriving here directly are spread over the heads too.
        let spread = match heads.iter().position(|h| h.name == me.name) {
            Some(me_index) if heads.len() > 1 => Some((Front::start(heads.clone()), me_index)),
            _ => None,
        };
        // `/v1/mesh`: the membership view and the last plan changes (`baton status`).
        let view = mesh.clone();
        let http_layer = Some(baton_serve::HttpLayer(Arc::new(move |app| {
            let view = view.clone();
            let app = app.route("/v1/mesh", axum::routing::get(move || async move { axum::Json(view.status()) }));
            match &spread {
                Some(state) => app.layer(axum::middleware::from_fn_with_state(state.clone(), crate::forward::spread)),
                None => app,
            }
        })));
        let model_name = dir.file_name().map_or_else(|| "model".to_string(), |n| n.to_string_lossy().into_owned());
        let opts = ServeOptions {
            model_dir: dir,
            model_name,
            listen,
            threads,
            kv_cache_bytes: args.kv_cache_mb << 20,
            max_num_seqs: 64,
            max_batched_tokens,
            max_waiting: 1024,
            max_model_len: None,
            quic_listen: me.quic,
            quic_cert_out: None,
            quic_identity: Some(baton_serve::quic::Identity { cert_der: identity.cert.to_vec(), key_der: identity.key.secret_pkcs8_der().to_vec() }),
            pipeline,
            http_layer,
            request_timeout: Duration::from_secs(args.request_timeout),
        };
        serve(opts, crate::serve::shutdown_signal()).await?;
        node.close();
        Ok(())
    })
}
