//! A Rust client for Baton's native QUIC protocol (baton-proto): connect once, then one
//! bidirectional stream per request, tokens streamed back as the server makes them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use baton_proto::{decode, encode, read_frame, write_frame, Frame, FrameError, Request};

pub use baton_proto::{ChatMessage, ErrorKind, Finish, Prompt, Request as GenerateRequest};

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
        transport.keep_alive_interval(Some(Duration::from_secs(5)));
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
