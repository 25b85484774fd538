//! `baton node`: the command-line face of `baton_node`: parses the flags, resolves the
//! cluster's model, and runs the node until SIGINT/SIGTERM (or until it is drained).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use baton_mesh::config::ClusterConfig;
use baton_mesh::tensor_plane::PlaneChoice;
use baton_node::node::{JoinArgs, NodeOptions};

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
    /// Arithmetic of the CPU matrix products: `exact` (f32, the parity tests' contract) or
    /// `bf16` (bf16 activations and AVX512_BF16 dot products for bf16 weights; see README).
    #[arg(long, default_value = "exact")]
    compute: baton_engine::Compute,
    /// Where this node's stage runs.
    /// `cpu`, `cuda`, or a modeled GPU: `mock:h100`, `mock:a100`, `mock:l40s`, optionally with
    /// `:NGiB` of memory (default: the node's `devices` in cluster.toml, else cpu).
    #[arg(long)]
    device: Option<load::Device>,
    /// KV cache size in MiB (pipeline head: for the whole model's block table).
    #[arg(long, default_value_t = 1024)]
    kv_cache_mb: usize,
    /// Pipeline head: sequences in the running batch at most (all micro-batches together).
    #[arg(long, default_value_t = 64)]
    max_num_seqs: usize,
    /// Pipeline head: reuse the KV cache of prompt prefixes seen before (on by default).
    #[arg(long, overrides_with = "no_enable_prefix_caching")]
    enable_prefix_caching: bool,
    /// Pipeline head: compute every prompt from its first token.
    #[arg(long)]
    no_enable_prefix_caching: bool,
    /// Pipeline head: steps (micro-batches) in flight at once; default one per stage. 1 runs the
    /// stages one after another with bigger batches (better when they share the same cores).
    #[arg(long)]
    micro_batches: Option<usize>,
    /// Pipeline head: `chain` sends each step from stage to stage (the last returns only the
    /// sampled tokens) when the tensor plane is QUIC; `relay` brings every stage's hidden
    /// states back through the head. UCX links always relay.
    #[arg(long, value_parser = parse_stage_links, default_value = "chain")]
    stage_links: baton_serve::shard::StageLinks,
    /// What carries activations between stages: `ucx` (the default when built in; transports
    /// from UCX_TLS) or `quic` (the control plane's streams). Head and stages must agree.
    #[arg(long, value_parser = parse_plane)]
    tensor_plane: Option<PlaneChoice>,
    /// Pipeline head: seconds a request may take before it ends with a timeout error (504).
    #[arg(long, default_value_t = 600)]
    request_timeout: u64,
    /// A node not in cluster.toml (it joins through the file's nodes): its control-plane
    /// address (UDP), which the other nodes reach it at.
    #[arg(long)]
    control: Option<SocketAddr>,
    /// A node not in cluster.toml: where it takes HTTP requests (forwarded to a head).
    #[arg(long)]
    http: Option<SocketAddr>,
    /// A node not in cluster.toml: its memory budget for layers, in GiB.
    #[arg(long, default_value_t = 1.0)]
    memory_gb: f64,
    /// A node not in cluster.toml: the pipeline (replica) it joins.
    #[arg(long, default_value_t = 0)]
    replica: usize,
    /// Ask the running node `--name` to leave gracefully (the head moves its layers first,
    /// then lets it stop), and exit.
    #[arg(long)]
    drain: bool,
    /// Seconds to keep trying host names in cluster.toml that do not resolve yet (a
    /// StatefulSet's pod names resolve only once their pods exist).
    #[arg(long, default_value_t = 120)]
    resolve_timeout: u64,
}

/// cluster.toml, trying again while a host name in it does not resolve, up to `patience`.
fn load_resolving(path: &std::path::Path, patience: Duration) -> anyhow::Result<ClusterConfig> {
    let deadline = std::time::Instant::now() + patience;
    let mut said = false;
    loop {
        match ClusterConfig::from_file(path) {
            Err(e @ baton_mesh::config::ConfigError::Unresolved { .. }) if std::time::Instant::now() < deadline => {
                if !said {
                    eprintln!("baton: {e}; trying again for up to {} s", patience.as_secs());
                    said = true;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            other => return Ok(other?),
        }
    }
}

fn parse_stage_links(s: &str) -> Result<baton_serve::shard::StageLinks, String> {
    match s {
        "chain" => Ok(baton_serve::shard::StageLinks::Chain),
        "relay" => Ok(baton_serve::shard::StageLinks::Relay),
        other => Err(format!("{other:?} is not a way to link stages (chain, relay)")),
    }
}

fn parse_plane(s: &str) -> Result<PlaneChoice, String> {
    match s {
        "ucx" => Ok(PlaneChoice::Ucx),
        "quic" => Ok(PlaneChoice::Quic),
        other => Err(format!("{other:?} is not a tensor plane (ucx, quic)")),
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.max_num_seqs == 0 {
        anyhow::bail!("--max-num-seqs must be positive");
    }
    let c = load_resolving(&args.cluster, Duration::from_secs(args.resolve_timeout))?;
    let join = JoinArgs { control: args.control, http: args.http, memory_gb: args.memory_gb, replica: args.replica };
    let me = baton_node::node::joining_node(&c, &args.cluster, &args.name, &join)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().thread_name("baton-io").build()?;
    if args.drain {
        return runtime.block_on(baton_node::node::drain_remote(&c, &me));
    }
    let model_dir = load::ClusterModel::of(&c, &args.cluster)?.dir()?;
    let device = load::shard_device(load::node_device(args.device, &me, &args.cluster)?, args.threads.unwrap_or_else(load::default_threads), args.compute)?;
    let opts = NodeOptions {
        cluster: c,
        cluster_path: args.cluster.clone(),
        me,
        model_dir,
        device,
        kv_cache_mb: args.kv_cache_mb,
        max_num_seqs: args.max_num_seqs,
        prefix_caching: !args.no_enable_prefix_caching,
        micro_batches: args.micro_batches,
        stage_links: args.stage_links,
        tensor_plane: args.tensor_plane.unwrap_or_else(PlaneChoice::default_for_build),
        request_timeout: Duration::from_secs(args.request_timeout),
        signals: true,
    };
    runtime.block_on(baton_node::node::run(opts, crate::serve::shutdown_signal()))
}
