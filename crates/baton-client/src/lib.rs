//! A Rust client for Baton's native QUIC protocol (baton-proto): connect once, then one
//! bidirectional stream per request, tokens streamed back as the server makes them. A
//! [`ResumingGeneration`] knows several nodes of a cluster and, when the one it is connected to
//! goes away mid-stream, resumes the request at another from the tokens it already holds: the
//! caller sees every token exactly once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use baton_proto::{decode, encode, read_frame, write_frame, ErrorKind as WireErrorKind, Frame, FrameError, Request};

pub use baton_proto::{ChatMessage, ErrorKind, Finish, Prompt, Request as GenerateRequest};

/// A connection that hears nothing (not even keep-alive acknowledgements) this long is lost.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a stream whose node went away keeps trying the others.
pub const RESUME_PATIENCE: Duration = Duration::from_secs(60);

/// The ALPN protocol id both sides require.
pub const ALPN: &[u8] = b"baton/1";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("stream: {0}")]
    Write(#[from] quinn::WriteError),
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// A connection to one Baton server.
pub struct Client {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
}

/// One request's stream of frames.
pub struct Generation {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    done: bool,
}

impl Client {
    /// Connects to `addr`, trusting the server certificates signed by (or equal to) `ca_der`.
    pub async fn connect(addr: SocketAddr, server_name: &str, ca_der: &[u8]) -> Result<Client, ClientError> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls::pki_types::CertificateDer::from(ca_der.to_vec()))
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| ClientError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| ClientError::Tls(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        let mut transport = quinn::TransportConfig::default();
        // A server that died is noticed within IDLE_TIMEOUT: the keep-alives go unanswered.
        transport.keep_alive_interval(Some(IDLE_TIMEOUT / 3));
        transport.max_idle_timeout(quinn::IdleTimeout::try_from(IDLE_TIMEOUT).ok());
        config.transport_config(Arc::new(transport));
        let bind: SocketAddr = if addr.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }.parse().map_err(|_| ClientError::Connect("bind address".into()))?;
        let mut endpoint = quinn::Endpoint::client(bind).map_err(|e| ClientError::Connect(e.to_string()))?;
        endpoint.set_default_client_config(config);
        let conn = endpoint
            .connect(addr, server_name)
            .map_err(|e| ClientError::Connect(e.to_string()))?
            .await?;
        Ok(Client { _endpoint: endpoint, conn })
    }

    /// Sends a request; read its frames with [`Generation::next`].
    pub async fn generate(&self, request: &Request) -> Result<Generation, ClientError> {
        let (mut send, recv) = self.conn.open_bi().await?;
        write_frame(&mut send, &encode(request)?).await?;
        let _ = send.finish();
        Ok(Generation { send, recv, done: false })
    }

    /// Sends raw bytes on a new stream (for tests of the server's frame validation).
    pub async fn send_raw(&self, bytes: &[u8]) -> Result<Generation, ClientError> {
        let (mut send, recv) = self.conn.open_bi().await?;
        send.write_all(bytes).await?;
        let _ = send.finish();
        Ok(Generation { send, recv, done: false })
    }

    pub fn close(&self) {
        self.conn.close(0u32.into(), b"bye");
    }
}

impl Generation {
    /// The next frame, or `None` after `Done` / `Error`.
    pub async fn next(&mut self) -> Result<Option<Frame>, ClientError> {
        if self.done {
            return Ok(None);
        }
        match read_frame(&mut self.recv).await? {
            None => Err(FrameError::Closed.into()),
            Some(body) => {
                let frame: Frame = decode(&body)?;
                self.done = matches!(frame, Frame::Done { .. } | Frame::Error { .. });
                Ok(Some(frame))
            }
        }
    }

    /// Cancels the request: the server stops generating and frees its KV cache.
    pub fn cancel(mut self) {
        let _ = self.recv.stop(baton_proto::RESET_CANCELLED.into());
        let _ = self.send.reset(baton_proto::RESET_CANCELLED.into());
    }
}

/// A node to connect to: the name its certificate carries, and its QUIC address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub addr: SocketAddr,
}

/// One request that survives the loss of the node it streams from: it reconnects to another
/// known node (those it was given, then those the first server named in `Started`) and sends
/// the request again with the tokens received so far as `resume_token_ids`; frames come out
/// as one stream (one `Started`, every token once, one `Done` or `Error`).
pub struct ResumingGeneration {
    nodes: Vec<Node>,
    ca_der: Vec<u8>,
    request: Request,
    at: usize,
    client: Client,
    generation: Generation,
    tokens: Vec<u32>,
    started: bool,
    /// Since when the stream has produced nothing while moving between nodes.
    trouble_since: Option<std::time::Instant>,
    /// How many times the stream moved to another node.
    pub resumes: u32,
    /// The nodes it streamed from, in order.
    pub served_by: Vec<String>,
}

impl ResumingGeneration {
    /// Sends `request` to the first of `nodes` that answers.
    pub async fn start(nodes: Vec<Node>, ca_der: &[u8], request: Request) -> Result<Self, ClientError> {
        let mut last = ClientError::Connect("no node to connect to".into());
        for (i, node) in nodes.iter().enumerate() {
            match Client::connect(node.addr, &node.name, ca_der).await {
                Ok(client) => {
                    let generation = client.generate(&request).await?;
                    return Ok(ResumingGeneration {
                        served_by: vec![node.name.clone()],
                        nodes,
                        ca_der: ca_der.to_vec(),
                        request,
                        at: i,
                        client,
                        generation,
                        tokens: Vec::new(),
                        started: false,
                        trouble_since: None,
                        resumes: 0,
                    });
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// The next frame of the request, `None` after its `Done` or `Error`.
    pub async fn next(&mut self) -> Result<Option<Frame>, ClientError> {
        loop {
            match self.generation.next().await {
                Ok(Some(Frame::Started { prompt_token_ids, nodes })) => {
                    for n in &nodes {
                        if let Ok(addr) = n.addr.parse() {
                            if !self.nodes.iter().any(|k| k.name == n.name && k.addr == addr) {
                                self.nodes.push(Node { name: n.name.clone(), addr });
                            }
                        }
                    }
                    if !self.started {
                        self.started = true;
                        return Ok(Some(Frame::Started { prompt_token_ids, nodes }));
                    }
                }
                Ok(Some(Frame::Token { id, text, logprob, top_logprobs })) => {
                    self.tokens.push(id);
                    self.trouble_since = None;
                    return Ok(Some(Frame::Token { id, text, logprob, top_logprobs }));
                }
                // While resuming, a node that cannot serve yet (a new head loading) is waited for.
                Ok(Some(Frame::Error { kind: WireErrorKind::NotReady | WireErrorKind::Overloaded, .. })) if self.resumes > 0 => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    self.resume().await?
                }
                // A node that is not ready (loading, or shutting down: a head stepping down
                // finishes what it runs but takes nothing new) is no answer while others are
                // known: the request goes to the next.
                Ok(Some(Frame::Error { kind: WireErrorKind::NotReady, message, .. })) if self.nodes.len() > 1 => {
                    tracing::info!(node = %self.nodes[self.at].name, %message, "the node cannot serve; trying the next");
                    self.resume().await?
                }
                Ok(other) => return Ok(other),
                Err(ClientError::Frame(FrameError::Malformed(m))) => return Err(ClientError::Frame(FrameError::Malformed(m))),
                Err(e) => {
                    tracing::warn!(node = %self.nodes[self.at].name, error = %e, tokens = self.tokens.len(), "the stream's node went away; resuming at another");
                    self.resume().await?
                }
            }
        }
    }

    /// Moves the request to the next node that takes it.
    async fn resume(&mut self) -> Result<(), ClientError> {
        let until = *self.trouble_since.get_or_insert_with(std::time::Instant::now) + RESUME_PATIENCE;
        let mut request = self.request.clone();
        request.resume_token_ids = self.tokens.clone();
        loop {
            self.at = (self.at + 1) % self.nodes.len();
            let node = self.nodes[self.at].clone();
            let attempt = async {
                let client = Client::connect(node.addr, &node.name, &self.ca_der).await?;
                let generation = client.generate(&request).await?;
                Ok::<_, ClientError>((client, generation))
            };
            match tokio::time::timeout(Duration::from_secs(3), attempt).await {
                Ok(Ok((client, generation))) => {
                    self.client.close();
                    (self.client, self.generation) = (client, generation);
                    self.resumes += 1;
                    self.served_by.push(node.name);
                    return Ok(());
                }
                _ if std::time::Instant::now() >= until => {
                    return Err(ClientError::Connect(format!("no node took the request back within {} s", RESUME_PATIENCE.as_secs())));
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    pub fn close(&self) {
        self.client.close();
    }
}
