//! `baton cluster`: make the cluster's certificates and check a cluster description.

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
}

pub fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Init { config } => {
            let c = ClusterConfig::from_file(&config)?;
            let dir = pki::init(&c)?;
            println!("cluster `{}`: CA and {} node certificates written to {}", c.name, c.nodes.len(), dir.display());
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
