//! `baton client`: one request over the native QUIC protocol, tokens printed as they arrive;
//! given several nodes (`--addr` more than once, and those the server names), a stream whose
//! node goes away resumes at another and still prints as one stream.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use baton_client::{ChatMessage, Finish, GenerateRequest, Node, Prompt, ResumingGeneration};
use baton_proto::Frame;
use serde_json::json;

#[derive(clap::Args)]
pub struct Args {
    /// A server's QUIC address, `HOST:PORT` or `NAME=HOST:PORT` (NAME: the name its
    /// certificate carries, as a cluster node's does); give it more than once for a cluster.
    #[arg(long, default_value = "127.0.0.1:8081")]
    addr: Vec<String>,
    /// The certificate (DER) to trust: the one `baton serve` printed, or a cluster's CA
    /// (`ca.der` in its TLS directory).
    #[arg(long)]
    cert: PathBuf,
    /// Name the certificate was issued for (for addresses given without a NAME).
    #[arg(long, default_value = "localhost")]
    server_name: String,
    #[arg(long)]
    prompt: String,
    /// Send the prompt as a user chat message (the model's chat template applies).
    #[arg(long)]
    chat: bool,
    #[arg(long)]
    max_tokens: Option<u32>,
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON object at the end instead of streaming text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let nodes = args
        .addr
        .iter()
        .map(|a| {
            let (name, hostport) = a.split_once('=').unwrap_or((&args.server_name, a));
            let addr: SocketAddr = hostport.parse().with_context(|| format!("--addr: {a:?} is not HOST:PORT or NAME=HOST:PORT"))?;
            Ok(Node { name: name.to_string(), addr })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let cert = std::fs::read(&args.cert).with_context(|| format!("--cert: cannot read {}", args.cert.display()))?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let prompt = if args.chat {
            Prompt::Chat(vec![ChatMessage { role: "user".into(), content: args.prompt.clone() }])
        } else {
            Prompt::Text(args.prompt.clone())
        };
        let mut req = GenerateRequest::new(prompt);
        req.max_tokens = args.max_tokens;
        req.temperature = args.temperature;
        req.seed = args.seed;
        req.ignore_eos = args.ignore_eos;
        let mut generation = ResumingGeneration::start(nodes, &cert, req).await?;
        let mut resumes = 0;
        let mut out = std::io::stdout().lock();
        let (mut text, mut ids, mut prompt_ids) = (String::new(), Vec::new(), Vec::new());
        while let Some(frame) = generation.next().await? {
            match frame {
                Frame::Started { prompt_token_ids, .. } => prompt_ids = prompt_token_ids,
                Frame::Token { id, text: piece, .. } => {
                    if generation.resumes > resumes {
                        resumes = generation.resumes;
                        if !args.json {
                            eprintln!("\n[resumed at {}]", generation.served_by.last().map_or("?", String::as_str));
                        }
                    }
                    ids.push(id);
                    text.push_str(&piece);
                    if !args.json {
                        out.write_all(piece.as_bytes())?;
                        out.flush()?;
                    }
                }
                Frame::Done { finish, prompt_tokens, completion_tokens, tail } => {
                    text.push_str(&tail);
                    let finish = match finish {
                        Finish::Stop => "stop",
                        Finish::Length => "length",
                        Finish::Abort => "abort",
                    };
                    if args.json {
                        writeln!(out, "{}", json!({"prompt_token_ids": prompt_ids, "token_ids": ids, "text": text, "finish_reason": finish,
                                                     "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
                                                     "served_by": generation.served_by}))?;
                    } else {
                        writeln!(out, "{tail}")?;
                        eprintln!("finish: {finish}, prompt {prompt_tokens} tokens, generated {completion_tokens}");
                    }
                }
                Frame::Error { kind, message, param } => {
                    bail!("server error ({kind:?}{}): {message}", param.map(|p| format!(", parameter `{p}`")).unwrap_or_default())
                }
            }
        }
        generation.close();
        Ok(())
    })
}
