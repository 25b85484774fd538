//! `baton`: the one binary. Subcommands generate demo models, run generation, serve the
//! OpenAI-compatible API and benchmark; the mesh joins as it lands.

mod bench;
mod bench_http;
mod bench_hop;
mod client;
mod cluster;
mod gen_model;
mod generate;
mod load;
mod node;
mod serve;
mod status;
mod top;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "baton", version, about = "Baton: a serving mesh for large language models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a seeded random-weight model in the Hugging Face layout.
    GenModel(gen_model::Args),
    /// Generate a continuation of a prompt and report prefill and decode speed.
    Generate(generate::Args),
    /// Serve a model over the OpenAI-compatible HTTP API (default: the demo model on 127.0.0.1:8080).
    Serve(serve::Args),
    /// Send one request over the native QUIC protocol and stream the tokens.
    Client(client::Args),
    /// Run one node of a cluster described by cluster.toml (the node with layer 0 is the head).
    Node(node::Args),
    /// Show a cluster's nodes, their layer ranges, their links and the head's load.
    Status(status::Args),
    /// A live view of a running cluster in the terminal (any node's /v1/cluster/stats); q quits.
    Top(top::Args),
    /// Cluster tools: `init` (certificates), `check` (validate cluster.toml, show placement),
    /// `prometheus` (a prometheus.yml scraping every node).
    #[command(subcommand)]
    Cluster(cluster::Command),
    /// Load-test an OpenAI-compatible server (`baton bench engine`: the engine alone).
    Bench(bench::Command),
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BATON_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::GenModel(args) => gen_model::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Client(args) => client::run(args),
        Command::Cluster(cmd) => cluster::run(cmd),
        Command::Node(args) => node::run(args),
        Command::Status(args) => status::run(args),
        Command::Top(args) => top::run(args),
        Command::Bench(cmd) => bench::run(cmd),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
