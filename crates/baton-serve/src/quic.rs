//! The native QUIC front (quinn): one bidirectional stream per request carrying baton-proto
//! frames. A stream whose first frame is not a valid request closes the whole connection with
//! `CLOSE_MALFORMED`; the endpoint keeps serving everyone else. Errors travel as `Frame::Error`
//! with the same classes as the HTTP API.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use baton_engine::SamplingParams;
use baton_proto::{decode, encode, read_frame, write_frame, ErrorKind, Finish as WireFinish, Frame, FrameError, Prompt, Request, CLOSE_MALFORMED, PROTOCOL_VERSION};

use crate::error::ServeError;
use crate::http::{AbortOnDrop, AppState};
use crate::openai::{validate_params, validate_stop};
use crate::request::{ApiRequest, ChatMessage, Event, Finish, PromptInput};
use crate::router::{Admitted, RouterMsg};

pub const ALPN: &[u8] = b"baton/1";

/// The client API's server identity: self-signed (the certificate, DER, is what clients trust)
/// or a cluster node's certificate (clients trust the cluster CA).
#[derive(Clone)]
pub struct Identity {
    pub cert_der: Vec<u8>,
    pub key_der: Vec<u8>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").finish_non_exhaustive()
    }
}

impl Identity {
    pub fn self_signed(names: Vec<String>) -> Result<Self, String> {
        let ck = rcgen::generate_simple_self_signed(names).map_err(|e| e.to_string())?;
        Ok(Identity { cert_der: ck.cert.der().to_vec(), key_der: ck.signing_key.serialize_der() })
    }

    pub fn write_cert(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, &self.cert_der)
    }
}

pub fn endpoint(addr: SocketAddr, id: &Identity) -> Result<quinn::Endpoint, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(
            vec![rustls::pki_types::CertificateDer::from(id.cert_der.clone())],
            rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(id.key_der.clone())),
        )
        .map_err(|e| e.to_string())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| e.to_string())?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(5)));
    transport.max_concurrent_bidi_streams(1024u32.into());
    config.transport_config(Arc::new(transport));
    quinn::Endpoint::server(config, addr).map_err(|e| format!("cannot listen on {addr} (UDP): {e}"))
}

/// Accepts connections until the endpoint is closed.
pub async fn serve(endpoint: quinn::Endpoint, state: Arc<AppState>) {
    while let Some(incoming) = endpoint.accept().await {
        let state = state.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "QUIC handshake failed");
                    return;
                }
            };
            while let Ok((send, recv)) = conn.accept_bi().await {
                tokio::spawn(stream(state.clone(), conn.clone(), send, recv));
            }
        });
    }
}

/// A client's request as the serving layer takes it, or why it is refused (checked field by
/// field: version, prompt, sampling parameters).
pub fn to_api(r: Request) -> Result<ApiRequest, ServeError> {
    if r.version != PROTOCOL_VERSION {
        return Err(ServeError::bad(format!("protocol version {} is not supported (this server speaks {PROTOCOL_VERSION})", r.version), "version"));
    }
    let prompt = match r.prompt {
        Prompt::Text(t) => PromptInput::Text(t),
        Prompt::Tokens(t) => PromptInput::Tokens(t),
        Prompt::Chat(m) => {
            if m.is_empty() {
                return Err(ServeError::bad("`messages` must not be empty", "messages"));
            }
            PromptInput::Chat(m.into_iter().map(|m| ChatMessage { role: m.role, content: m.content }).collect())
        }
    };
    if r.max_tokens == Some(0) {
        return Err(ServeError::bad("`max_tokens` must be at least 1", "max_tokens"));
    }
    let params = SamplingParams {
        temperature: r.temperature,
        top_k: r.top_k as usize,
        top_p: r.top_p,
        min_p: r.min_p,
        presence_penalty: r.presence_penalty,
        frequency_penalty: r.frequency_penalty,
        repetition_penalty: r.repetition_penalty,
        seed: r.seed,
        max_tokens: r.max_tokens.unwrap_or(1) as usize,
        min_tokens: r.min_tokens as usize,
        stop_token_ids: r.stop_token_ids,
        ignore_eos: r.ignore_eos,
        logprobs: r.logprobs.map(|n| n as usize),
    };
    validate_params(&params)?;
    validate_stop(&r.stop)?;
    Ok(ApiRequest {
        model: r.model,
        prompt,
        params,
        max_tokens: r.max_tokens.map(|n| n as usize),
        stop: r.stop,
        stream: true,
        include_usage: false,
        return_token_ids: false,
        resume_token_ids: r.resume_token_ids,
    })
}

fn error_frame(e: &ServeError) -> Frame {
    let (kind, param) = match e {
        ServeError::BadRequest { param, .. } => (ErrorKind::BadRequest, param.clone()),
        ServeError::ContextTooLong(_) => (ErrorKind::ContextTooLong, None),
        ServeError::ModelNotFound(_) => (ErrorKind::ModelNotFound, Some("model".into())),
        ServeError::Overloaded(_) => (ErrorKind::Overloaded, None),
        ServeError::NotReady(_) => (ErrorKind::NotReady, None),
        ServeError::Internal(_) => (ErrorKind::Internal, None),
        ServeError::Timeout(_) => (ErrorKind::Timeout, None),
    };
    Frame::Error { kind, message: e.to_string(), param }
}

async fn send(out: &mut quinn::SendStream, frame: &Frame) -> bool {
    match encode(frame) {
        Ok(bytes) => write_frame(out, &bytes).await.is_ok(),
        Err(_) => false,
    }
}

async fn stream(state: Arc<AppState>, conn: quinn::Connection, mut out: quinn::SendStream, mut inp: quinn::RecvStream) {
    let request = match read_frame(&mut inp).await {
        Ok(Some(body)) => decode::<Request>(&body),
        Ok(None) => return,
        Err(e @ (FrameError::TooLarge(_) | FrameError::Malformed(_) | FrameError::Closed)) => Err(e),
        Err(_) => return,
    };
    let request = match request {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(peer = %conn.remote_address(), error = %e, "malformed frame; closing the connection");
            conn.close(CLOSE_MALFORMED.into(), b"malformed frame");
            return;
        }
    };
    let result = if state.draining.load(Ordering::SeqCst) {
        Err(ServeError::NotReady("shutting down".into()))
    } else if !state.ready.load(Ordering::SeqCst) {
        let why = state.unready.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Err(ServeError::NotReady(why.unwrap_or_else(|| "the model is loading".into())))
    } else {
        match to_api(request) {
            Err(e) => Err(e),
            Ok(api) => {
                let n = state.next_request.fetch_add(1, Ordering::Relaxed);
                let request_id = format!("quic-{:x}{n:08x}", state.created);
                match ractor::call!(state.router, |reply| RouterMsg::Submit { request: api, request_id, reply }) {
                    Ok(r) => r,
                    Err(e) => Err(ServeError::NotReady(format!("router unavailable: {e}"))),
                }
            }
        }
    };
    let Admitted { id, mut events } = match result {
        Ok(a) => a,
        Err(e) => {
            send(&mut out, &error_frame(&e)).await;
            let _ = out.finish();
            return;
        }
    };
    let mut guard = AbortOnDrop { id, scheduler: state.scheduler.clone(), done: false };
    while let Some(ev) = events.recv().await {
        let (frame, last) = match ev {
            Event::Started { prompt_token_ids } => {
                let nodes = state.peers.as_ref().map(|p| (p.0)()).unwrap_or_default();
                let nodes = nodes.into_iter().map(|(name, addr)| baton_proto::NodeAddr { name, addr: addr.to_string() }).collect();
                (Frame::Started { prompt_token_ids, nodes }, false)
            }
            Event::Token(t) => (Frame::Token { id: t.token, text: t.text, logprob: t.logprob, top_logprobs: t.top_logprobs }, false),
            Event::Done { finish, prompt_tokens, completion_tokens, tail, .. } => {
                let finish = match finish {
                    Finish::Stop => WireFinish::Stop,
                    Finish::Length => WireFinish::Length,
                    Finish::Abort => WireFinish::Abort,
                };
                (Frame::Done { finish, prompt_tokens: prompt_tokens as u32, completion_tokens: completion_tokens as u32, tail }, true)
            }
            Event::Error(e) => (error_frame(&e), true),
        };
        if last {
            guard.done = true;
        }
        // A failed write means the client cancelled or left: the guard aborts the request.
        if !send(&mut out, &frame).await {
            return;
        }
        if last {
            let _ = out.finish();
            return;
        }
    }
}
