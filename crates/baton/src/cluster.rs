//! `baton cluster`: make the cluster's certificates and check a cluster description.

use std::path::PathBuf;

use anyhow::Context;
use baton_engine::{demo, ModelConfig};
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

/// Layers of the model the cluster serves (a demo preset or a model directory).
fn num_layers(c: &ClusterConfig, config_path: &std::path::Path) -> anyhow::Result<usize> {
    if let Some(name) = c.model.strip_prefix("demo:") {
        return demo::preset(name)
            .map(|p| p.num_layers)
            .with_context(|| format!("{}: `model.path`: unknown demo preset {name:?}", config_path.display()));
    }
    let dir = config_path.parent().unwrap_or(std::path::Path::new(".")).join(&c.model);
    Ok(ModelConfig::from_dir(&dir)?.num_layers)
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
            let layers = num_layers(&c, &config)?;
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
