//! The QUIC client API at a node that is not a pipeline head: each request stream is relayed,
//! bytes unchanged, to a pipeline head's QUIC API (the least loaded, through the same [`Front`]
//! as HTTP). The node presents its cluster certificate, so clients trust the cluster CA
//! (`ca.der` in the cluster's TLS directory) and name the node they connect to. Each client
//! connection gets its own upstream connections: a client that sends garbage loses its
//! connection (the head closes the upstream with `CLOSE_MALFORMED`, and the relay passes that
//! on) without touching anyone else's.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use baton_mesh::pki::NodeIdentity;
use baton_proto::RESET_CANCELLED;
use baton_serve::quic::{self, Identity};
use tokio::sync::Mutex;

use crate::forward::{Front, Outstanding};

/// Serves the QUIC API on `listen`, relaying to the heads of `front`.
pub async fn serve(listen: SocketAddr, front: Arc<Front>, node: &NodeIdentity) -> anyhow::Result<()> {
    let identity = Identity { cert_der: node.cert.to_vec(), key_der: node.key.secret_pkcs8_der().to_vec() };
    let endpoint = quic::endpoint(listen, &identity).map_err(|e| anyhow::anyhow!(e))?;
    let upstream = upstream_endpoint(node)?;
    eprintln!(
        "baton: relaying quic://{listen} to the pipeline head(s) by load (clients trust the cluster CA and name {:?})",
        node.name
    );
    while let Some(incoming) = endpoint.accept().await {
        let (front, upstream) = (front.clone(), upstream.clone());
        tokio::spawn(async move {
            let Ok(client) = incoming.await else { return };
            relay_connection(client, front, upstream).await;
        });
    }
    Ok(())
}

/// A client endpoint that trusts the cluster CA, for connections to the heads' QUIC API.
fn upstream_endpoint(node: &NodeIdentity) -> anyhow::Result<quinn::Endpoint> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(node.ca.clone())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![quic::ALPN.to_vec()];
    let mut config = quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(tls)?));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(5)));
    config.transport_config(Arc::new(transport));
    let mut ep = quinn::Endpoint::client("0.0.0.0:0".parse()?)?;
    ep.set_default_client_config(config);
    Ok(ep)
}

async fn relay_connection(client: quinn::Connection, front: Arc<Front>, upstream: quinn::Endpoint) {
    // This client's connections to each head, opened on first use.
    let links: Arc<Mutex<HashMap<String, quinn::Connection>>> = Arc::default();
    while let Ok((send, recv)) = client.accept_bi().await {
        let (client, front, upstream, links) = (client.clone(), front.clone(), upstream.clone(), links.clone());
        tokio::spawn(async move {
            if let Err(e) = relay_stream(&client, &front, &upstream, &links, send, recv).await {
                tracing::debug!(error = %e, "QUIC relay stream ended");
            }
        });
    }
    for (_, c) in links.lock().await.drain() {
        c.close(0u32.into(), b"client gone");
    }
}

/// Heads without a QUIC address cannot take relayed streams.
fn without_quic(front: &Front) -> Vec<String> {
    front.heads().into_iter().filter(|h| h.quic.is_none()).map(|h| h.name).collect()
}

async fn relay_stream(
    client: &quinn::Connection,
    front: &Arc<Front>,
    upstream: &quinn::Endpoint,
    links: &Mutex<HashMap<String, quinn::Connection>>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> anyhow::Result<()> {
    let mut tried = without_quic(front);
    let (head, up_send, up_recv, _outstanding) = loop {
        let Some(head) = front.pick(&tried) else {
            let _ = send.reset(RESET_CANCELLED.into());
            anyhow::bail!("no pipeline head with a QUIC API is reachable");
        };
        let outstanding = Outstanding(front.clone(), head.name.clone());
        match open(upstream, links, &head).await {
            Ok((conn, s, r)) => break (conn, s, r, outstanding),
            Err(e) => {
                tracing::warn!(head = %head.name, error = %e, "cannot reach a head's QUIC API");
                front.unreachable(&head.name);
                tried.push(head.name);
            }
        }
    };
    let (mut up_send, mut up_recv) = (up_send, up_recv);
    let to_head = pipe(&mut recv, &mut up_send);
    let to_client = pipe(&mut up_recv, &mut send);
    tokio::join!(to_head, to_client);
    // A head that closed this client's upstream connection (garbage) closes the client too.
    if let Some(quinn::ConnectionError::ApplicationClosed(c)) = head.close_reason() {
        client.close(c.error_code, &c.reason);
    }
    Ok(())
}

/// Copies one direction of a relayed stream to its end; an error on either side resets the
/// other (a cancelled request stays cancelled).
async fn pipe(from: &mut quinn::RecvStream, to: &mut quinn::SendStream) {
    match tokio::io::copy(from, to).await {
        Ok(_) => {
            let _ = to.finish();
        }
        Err(_) => {
            let _ = to.reset(RESET_CANCELLED.into());
        }
    }
}

/// A stream to `head` on this client's connection to it (opened now if needed).
async fn open(
    upstream: &quinn::Endpoint,
    links: &Mutex<HashMap<String, quinn::Connection>>,
    head: &crate::forward::HeadAddr,
) -> anyhow::Result<(quinn::Connection, quinn::SendStream, quinn::RecvStream)> {
    let addr = head.quic.ok_or_else(|| anyhow::anyhow!("head {} has no QUIC API", head.name))?;
    let conn = {
        let mut links = links.lock().await;
        match links.get(&head.name).filter(|c| c.close_reason().is_none()) {
            Some(c) => c.clone(),
            None => {
                let c = tokio::time::timeout(Duration::from_secs(5), upstream.connect(addr, &head.name)?).await??;
                links.insert(head.name.clone(), c.clone());
                c
            }
        }
    };
    let (s, r) = conn.open_bi().await?;
    Ok((conn, s, r))
}
