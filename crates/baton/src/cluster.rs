//! `baton cluster`: make the cluster's certificates (`init`, `add-node`), revoke a node's
//! (`revoke`), check a cluster description, and print a Prometheus configuration for it.

use std::path::PathBuf;

use anyhow::Context;
use baton_mesh::config::ClusterConfig;
use baton_mesh::{pki, placement};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Make a cluster CA and one certificate per node, in the file's [tls] dir.
    Init {
        #[arg(default_value = "cluster.toml")]
        config: PathBuf,
    },
    /// Validate cluster.toml and print which node serves which layers.
    Check {
        #[arg(default_value = "cluster.toml")]
        config: PathBuf,
    },
    /// Sign a certificate for a new node (not in cluster.toml) with the cluster CA; the node
    /// then joins a running mesh with `baton node --name NAME --control HOST:PORT`.
    AddNode {
        /// The new node's name (a DNS name, e.g. node-d).
        name: String,
        #[arg(long, default_value = "cluster.toml")]
        cluster: PathBuf,
        /// The IP address its control plane listens on (put in its certificate).
        #[arg(long, default_value = "127.0.0.1")]
        ip: std::net::IpAddr,
    },
    /// Print a Prometheus configuration (prometheus.yml) scraping every node's /metrics.
    Prometheus {
        #[arg(default_value = "cluster.toml")]
        config: PathBuf,
        /// Seconds between scrapes.
        #[arg(long, default_value_t = 5)]
        scrape_interval: u32,
    },
    /// Revoke a node for good: its name goes on the TLS directory's revocation list, which
    /// nodes read at start and on SIGHUP (`pkill -HUP -f 'baton node'`).
    Revoke {
        name: String,
        #[arg(long, default_value = "cluster.toml")]
        cluster: PathBuf,
    },
}

pub fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Init { config } => {
            let c = ClusterConfig::from_file(&config)?;
            let dir = pki::init(&c)?;
            println!("cluster `{}`: CA and {} node certificates written to {}", c.name, c.nodes.len(), dir.display());
        }
        Command::AddNode { name, cluster, ip } => {
            let c = ClusterConfig::from_file(&cluster)?;
            if c.node(&name).is_some() {
                anyhow::bail!("{}: {name} is already a node of this cluster (its certificate comes from `baton cluster init`)", cluster.display());
            }
            pki::add_node(&c.tls_dir, &c.name, &name, ip)?;
            println!("cluster `{}`: certificate for {name} written to {}", c.name, c.tls_dir.display());
            println!("start it with: baton node --cluster {} --name {name} --control {ip}:PORT [--memory-gb N]", cluster.display());
        }
        Command::Prometheus { config, scrape_interval } => {
            if scrape_interval == 0 {
                anyhow::bail!("--scrape-interval must be at least 1 second");
            }
            print!("{}", ClusterConfig::from_file(&config)?.prometheus_config(scrape_interval));
        }
        Command::Revoke { name, cluster } => {
            let c = ClusterConfig::from_file(&cluster)?;
            let path = pki::revoke(&c.tls_dir, &name)?;
            println!("{name} revoked in {}; nodes refuse it from their next start or SIGHUP", path.display());
        }
        Command::Check { config } => {
            let c = ClusterConfig::from_file(&config)?;
            let layers = crate::load::ClusterModel::of(&c, &config)?.num_layers()?;
            c.check_layers(&config, layers)?;
            let plan = placement::plan(&c, layers).with_context(|| format!("{}: placement", config.display()))?;
            println!("cluster `{}`: {} nodes, model {} ({layers} layers)", c.name, c.nodes.len(), c.model);
            for (r, p) in plan.pipelines.iter().enumerate() {
                println!("pipeline {r}:");
                for (node, range) in &p.stages {
                    let n = c.node(node).map(|n| n.control.to_string()).unwrap_or_default();
                    println!("  {node:<12} {n:<22} layers {}..{}", range.start, range.end);
                }
            }
        }
    }
    Ok(())
}
