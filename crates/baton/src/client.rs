//! `baton client`: one request over the native QUIC protocol, tokens printed as they arrive.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use baton_client::{ChatMessage, Client, Finish, GenerateRequest, Prompt};
use baton_proto::Frame;
use serde_json::json;

#[derive(clap::Args)]
pub struct Args {
    /// The server's QUIC address.
    #[arg(long, default_value = "127.0.0.1:8081")]
    addr: String,
    /// The server certificate (DER) to trust, as `baton serve` printed it.
    #[arg(long)]
    cert: PathBuf,
    /// Name the certificate was issued for.
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
    let addr: SocketAddr = args.addr.parse().with_context(|| format!("--addr: {:?} is not HOST:PORT", args.addr))?;
    let cert = std::fs::read(&args.cert).with_context(|| format!("--cert: cannot read {}", args.cert.display()))?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let client = Client::connect(addr, &args.server_name, &cert).await?;
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
        let mut generation = client.generate(&req).await?;
        let mut out = std::io::stdout().lock();
        let (mut text, mut ids, mut prompt_ids) = (String::new(), Vec::new(), Vec::new());
        while let Some(frame) = generation.next().await? {
            match frame {
                Frame::Started { prompt_token_ids } => prompt_ids = prompt_token_ids,
                Frame::Token { id, text: piece, .. } => {
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
                                                     "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}}))?;
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
        client.close();
        Ok(())
    })
}
