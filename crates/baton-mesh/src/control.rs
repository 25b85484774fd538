//! The control plane between nodes: QUIC (quinn) with mutual TLS from the cluster CA. A node
//! accepts any peer whose certificate the cluster CA signed and whose name is not on the
//! cluster's revocation list (both checked in the handshake); the peer's identity is the DNS
//! name in its certificate (nodes join with a certificate from `baton cluster add-node`). Messages
//! are versioned rkyv frames (baton-proto's codec), validated on receipt; a malformed frame
//! closes that connection and the node keeps serving. Keep-alives keep idle links up.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_proto::{decode, encode, read_frame, write_frame, FrameError, CLOSE_MALFORMED};
use rustls::pki_types::CertificateDer;

use crate::pki::NodeIdentity;

pub const CONTROL_ALPN: &[u8] = b"baton-control/1";
pub const CONTROL_VERSION: u16 = 1;
/// Close code: the peer's certificate names no node (no DNS name), or a revoked one.
pub const CLOSE_UNKNOWN_PEER: u32 = 0x43_01;

/// Node names whose certificates are refused (the TLS directory's `revoked` file), shared by
/// a node's verifier and re-read on SIGHUP.
pub type Revoked = Arc<std::sync::RwLock<std::collections::HashSet<String>>>;

/// The node name a certificate was issued for: its first DNS subject name.
pub fn cert_name(cert: &CertificateDer<'_>) -> Option<String> {
    let ee = webpki::EndEntityCert::try_from(cert).ok()?;
    let name = ee.valid_dns_names().next().map(str::to_string);
    name
}

fn is_revoked(revoked: &Revoked, name: &str) -> bool {
    revoked.read().unwrap_or_else(|p| p.into_inner()).contains(name)
}

/// The cluster CA's client verifier, refusing revoked names in the handshake.
#[derive(Debug)]
struct ClusterClientVerifier {
    inner: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    revoked: Revoked,
}

impl rustls::server::danger::ClientCertVerifier for ClusterClientVerifier {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        match cert_name(end_entity) {
            Some(name) if !is_revoked(&self.revoked, &name) => Ok(verified),
            Some(name) => Err(rustls::Error::General(format!("the certificate of {name} is revoked"))),
            None => Err(rustls::Error::General("the certificate names no node".into())),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Node-to-node control messages (grows with membership and placement).
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum ControlMessage {
    Ping { version: u16, nonce: u64 },
    Pong { version: u16, nonce: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("cannot bind the control endpoint on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("connecting to {peer}: {message}")]
    Connect { peer: String, message: String },
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("stream: {0}")]
    Write(#[from] quinn::WriteError),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("peer refused: {0}")]
    Refused(String),
    #[error("unexpected reply: {0}")]
    Protocol(String),
    #[cfg(feature = "ucx")]
    #[error("tensor plane: {0}")]
    Ucx(#[from] baton_ucx::UcxError),
}

fn roots(identity: &NodeIdentity) -> Result<rustls::RootCertStore, ControlError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(identity.ca.clone()).map_err(|e| ControlError::Tls(e.to_string()))?;
    Ok(roots)
}

/// Keep-alives every 2 s and a 10 s idle timeout: idle links stay up, and a peer that died
/// (a stage whose process is gone) fails its link within 10 s even when nothing else notices.
fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(2)));
    t.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(10_000))));
    Arc::new(t)
}

/// A node's control endpoint: accepts peers and connects to them.
pub struct ControlNode {
    endpoint: quinn::Endpoint,
    identity: NodeIdentity,
    revoked: Revoked,
    /// Bumped when the revocation list was reloaded: the loops serving connections check
    /// their peer again ([`ControlNode::until_revoked`]).
    revocations: tokio::sync::watch::Sender<u64>,
    drops: Arc<Drops>,
}

/// Why something a peer sent was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropKind {
    /// A gossip packet that does not decode (or that SWIM rejects).
    MalformedGossip,
    /// A gossip packet over the size limit.
    OversizedGossip,
    /// A gossip packet whose sender is not the connection's certificate.
    ForgedGossip,
    /// A node's info of an older generation than one already known (a replay).
    ReplayedGeneration,
    /// A control or stage frame that does not decode (the connection is closed).
    MalformedControl,
    /// A control or stage frame over the size limit (the connection is closed).
    OversizedControl,
    /// Stage work (a step, KV) of a plan epoch the stage does not serve.
    StaleEpoch,
}

impl DropKind {
    pub const ALL: [DropKind; 7] = [
        DropKind::MalformedGossip,
        DropKind::OversizedGossip,
        DropKind::ForgedGossip,
        DropKind::ReplayedGeneration,
        DropKind::MalformedControl,
        DropKind::OversizedControl,
        DropKind::StaleEpoch,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropKind::MalformedGossip => "malformed_gossip",
            DropKind::OversizedGossip => "oversized_gossip",
            DropKind::ForgedGossip => "forged_gossip",
            DropKind::ReplayedGeneration => "replayed_generation",
            DropKind::MalformedControl => "malformed_control",
            DropKind::OversizedControl => "oversized_control",
            DropKind::StaleEpoch => "stale_epoch",
        }
    }

    /// A control frame that could not be read: oversized or malformed (a lost connection is
    /// no bad input).
    pub fn of_frame(e: &baton_proto::FrameError) -> Option<DropKind> {
        match e {
            baton_proto::FrameError::TooLarge(_) => Some(DropKind::OversizedControl),
            baton_proto::FrameError::Malformed(_) => Some(DropKind::MalformedControl),
            baton_proto::FrameError::Io(_) | baton_proto::FrameError::Closed => None,
        }
    }
}

/// What this node dropped of what its peers sent, by kind (each drop also has its log line).
#[derive(Debug, Default)]
pub struct Drops([std::sync::atomic::AtomicU64; DropKind::ALL.len()]);

impl Drops {
    pub fn count_if(&self, kind: Option<DropKind>) {
        if let Some(k) = kind {
            self.count(k);
        }
    }

    pub fn count(&self, kind: DropKind) {
        self.0[kind as usize].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn get(&self, kind: DropKind) -> u64 {
        self.0[kind as usize].load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Every kind with its count.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        DropKind::ALL.iter().map(|&k| (k.as_str(), self.get(k))).collect()
    }

    /// The counts in Prometheus text format (`baton:peer_messages_dropped_total{kind=...}`), for
    /// the node's `/metrics`.
    pub fn prometheus(&self) -> String {
        let mut out = String::from(
            "# HELP baton:peer_messages_dropped_total Messages from peers this node dropped (gossip, control, stage work), by why\n# TYPE baton:peer_messages_dropped_total counter\n",
        );
        for (kind, n) in self.snapshot() {
            out.push_str(&format!("baton:peer_messages_dropped_total{{kind=\"{kind}\"}} {n}\n"));
        }
        out
    }
}

/// A mutually authenticated link to a named peer.
#[derive(Clone)]
pub struct PeerLink {
    pub peer: String,
    pub connection: quinn::Connection,
}

impl ControlNode {
    /// Binds the control endpoint; peers named in `revoked` are refused (now and whenever
    /// the set changes).
    pub fn bind(addr: SocketAddr, identity: NodeIdentity, revoked: Revoked) -> Result<Self, ControlError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let inner = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&identity)?), provider.clone())
            .build()
            .map_err(|e| ControlError::Tls(e.to_string()))?;
        let verifier = Arc::new(ClusterClientVerifier { inner, revoked: revoked.clone() });
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| ControlError::Tls(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![identity.cert.clone()], identity.private_key())
            .map_err(|e| ControlError::Tls(e.to_string()))?;
        server.alpn_protocols = vec![CONTROL_ALPN.to_vec()];
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| ControlError::Tls(e.to_string()))?
            .with_root_certificates(roots(&identity)?)
            .with_client_auth_cert(vec![identity.cert.clone()], identity.private_key())
            .map_err(|e| ControlError::Tls(e.to_string()))?;
        client.alpn_protocols = vec![CONTROL_ALPN.to_vec()];

        let quic_server = quinn::crypto::rustls::QuicServerConfig::try_from(server).map_err(|e| ControlError::Tls(e.to_string()))?;
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(quic_server));
        server_config.transport_config(transport());
        let quic_client = quinn::crypto::rustls::QuicClientConfig::try_from(client).map_err(|e| ControlError::Tls(e.to_string()))?;
        let mut client_config = quinn::ClientConfig::new(Arc::new(quic_client));
        client_config.transport_config(transport());
        let mut endpoint = quinn::Endpoint::server(server_config, addr).map_err(|source| ControlError::Bind { addr, source })?;
        endpoint.set_default_client_config(client_config);
        Ok(ControlNode { endpoint, identity, revoked, revocations: tokio::sync::watch::channel(0).0, drops: Arc::default() })
    }

    /// What this node dropped of what its peers sent.
    pub fn drops(&self) -> &Arc<Drops> {
        &self.drops
    }

    /// Whether the revocation list names `peer`.
    pub fn is_revoked(&self, peer: &str) -> bool {
        is_revoked(&self.revoked, peer)
    }

    /// The revocation list was reloaded: every connection a peer it now names still has open
    /// is closed by the loop serving it, and no new one is made or accepted.
    pub fn revocations_changed(&self) {
        self.revocations.send_modify(|n| *n += 1);
    }

    /// Resolves, closing the connection, once `link`'s peer is revoked: the loops that serve a
    /// connection select on it, so a revocation ends what the peer still had open.
    pub async fn until_revoked(&self, link: &PeerLink) {
        let mut changes = self.revocations.subscribe();
        loop {
            if self.is_revoked(&link.peer) {
                tracing::warn!(peer = %link.peer, "closing the connection of a revoked node");
                link.connection.close(CLOSE_UNKNOWN_PEER.into(), b"revoked");
                return;
            }
            if changes.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// The next bidirectional stream `link`'s peer opens; `None` once the connection is closed
    /// or its peer revoked.
    pub async fn accept_bi(&self, link: &PeerLink) -> Option<(quinn::SendStream, quinn::RecvStream)> {
        tokio::select! {
            s = link.connection.accept_bi() => s.ok(),
            () = self.until_revoked(link) => None,
        }
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    pub fn name(&self) -> &str {
        &self.identity.name
    }

    /// Connects to node `peer` at `addr`; the peer's certificate must be the cluster's, name
    /// `peer`, and not be revoked.
    pub async fn connect(&self, addr: SocketAddr, peer: &str) -> Result<PeerLink, ControlError> {
        if is_revoked(&self.revoked, peer) {
            return Err(ControlError::Refused(format!("{peer}'s certificate is revoked")));
        }
        let connecting = self
            .endpoint
            .connect(addr, peer)
            .map_err(|e| ControlError::Connect { peer: peer.to_string(), message: e.to_string() })?;
        let connection = connecting.await?;
        Ok(PeerLink { peer: peer.to_string(), connection })
    }

    /// Accepts the next authenticated peer (named by its certificate). A peer whose name was
    /// revoked after its handshake is closed with `CLOSE_UNKNOWN_PEER` here, before any message
    /// is read.
    pub async fn accept(&self) -> Option<Result<PeerLink, ControlError>> {
        let incoming = self.endpoint.accept().await?;
        let connection = match incoming.await {
            Ok(c) => c,
            Err(e) => return Some(Err(e.into())),
        };
        let cert = connection
            .peer_identity()
            .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
            .and_then(|certs| certs.first().cloned());
        match cert.and_then(|c| cert_name(&c)) {
            Some(peer) if !is_revoked(&self.revoked, &peer) => Some(Ok(PeerLink { peer, connection })),
            _ => {
                tracing::warn!(remote = %connection.remote_address(), "refusing a peer whose certificate names no node or is revoked");
                connection.close(CLOSE_UNKNOWN_PEER.into(), b"unknown or revoked node");
                Some(Err(ControlError::Refused("certificate names no node or is revoked".into())))
            }
        }
    }

    /// Serves peers until the endpoint closes: answers pings. A malformed frame closes that
    /// peer's connection; others are unaffected.
    pub async fn serve(self: Arc<Self>) {
        while let Some(link) = self.accept().await {
            let Ok(link) = link else { continue };
            let node = self.clone();
            tokio::spawn(async move {
                while let Some((mut send, mut recv)) = node.accept_bi(&link).await {
                    let conn = link.connection.clone();
                    let peer = link.peer.clone();
                    let drops = node.drops.clone();
                    tokio::spawn(async move {
                        let msg = match read_frame(&mut recv).await {
                            Ok(Some(body)) => decode::<ControlMessage>(&body),
                            Ok(None) => return,
                            Err(e) => Err(e),
                        };
                        match msg {
                            Ok(ControlMessage::Ping { nonce, .. }) => {
                                if let Ok(bytes) = encode(&ControlMessage::Pong { version: CONTROL_VERSION, nonce }) {
                                    let _ = write_frame(&mut send, &bytes).await;
                                    let _ = send.finish();
                                }
                            }
                            Ok(other) => tracing::debug!(%peer, ?other, "ignoring an unexpected control message"),
                            Err(e) => {
                                tracing::warn!(%peer, error = %e, "malformed control frame; closing the connection");
                                drops.count_if(DropKind::of_frame(&e));
                                conn.close(CLOSE_MALFORMED.into(), b"malformed frame");
                            }
                        }
                    });
                }
            });
        }
    }

    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"bye");
    }
}

impl PeerLink {
    /// One ping round trip.
    pub async fn ping(&self, nonce: u64) -> Result<Duration, ControlError> {
        let start = Instant::now();
        let (mut send, mut recv) = self.connection.open_bi().await?;
        write_frame(&mut send, &encode(&ControlMessage::Ping { version: CONTROL_VERSION, nonce })?).await?;
        let _ = send.finish();
        match read_frame(&mut recv).await? {
            Some(body) => match decode::<ControlMessage>(&body)? {
                ControlMessage::Pong { nonce: n, .. } if n == nonce => Ok(start.elapsed()),
                other => Err(ControlError::Protocol(format!("{other:?}"))),
            },
            None => Err(FrameError::Closed.into()),
        }
    }

    /// Sends raw bytes on a new stream (for tests of frame validation).
    pub async fn send_raw(&self, bytes: &[u8]) -> Result<quinn::RecvStream, ControlError> {
        let (mut send, recv) = self.connection.open_bi().await?;
        send.write_all(bytes).await?;
        let _ = send.finish();
        Ok(recv)
    }
}
