//! The control plane over real QUIC on loopback: cluster peers ping each other; a peer whose
//! certificate another CA signed is refused in the handshake; a node that joined later (a name
//! cluster.toml never listed) is accepted on its CA-signed certificate; a revoked name is
//! refused in the handshake; garbage closes only that connection.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use baton_mesh::control::ControlNode;
use baton_mesh::pki::{generate, NodeIdentity};

const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn loopback() -> SocketAddr {
    SocketAddr::new(LOCAL, 0)
}

/// Nothing revoked.
fn roster() -> baton_mesh::control::Revoked {
    Arc::default()
}

fn identities() -> Vec<NodeIdentity> {
    let nodes: Vec<(String, IpAddr)> = ["node-a", "node-b", "node-c", "node-z"].iter().map(|n| (n.to_string(), LOCAL)).collect();
    generate("test", &nodes).unwrap().nodes
}

/// Waits for the connection to be closed by the peer and returns the application close code.
async fn close_code(conn: &quinn::Connection) -> Option<u64> {
    match tokio::time::timeout(Duration::from_secs(10), conn.closed()).await.expect("the connection stayed open") {
        quinn::ConnectionError::ApplicationClosed(ac) => Some(ac.error_code.into_inner()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_peers_talk_and_strangers_are_refused() {
    let ids = identities();
    let revoked = roster();
    let a = Arc::new(ControlNode::bind(loopback(), ids[0].clone(), revoked.clone()).unwrap());
    let a_addr = a.local_addr().unwrap();
    tokio::spawn(a.clone().serve());

    // node-b -> node-a: authenticated both ways, pings answered.
    let b = ControlNode::bind(loopback(), ids[1].clone(), roster()).unwrap();
    let link = b.connect(a_addr, "node-a").await.unwrap();
    for nonce in 0..5 {
        link.ping(nonce).await.unwrap();
    }
    // Asking for the wrong name fails: node-a's certificate is not node-c's.
    assert!(b.connect(a_addr, "node-c").await.is_err());

    // A certificate signed by another CA (but trusting ours) is refused in the handshake.
    let foreign = generate("other", &[("node-b".into(), LOCAL)]).unwrap().nodes.remove(0);
    let impostor = NodeIdentity { ca: ids[0].ca.clone(), ..foreign };
    let bad = ControlNode::bind(loopback(), impostor, roster()).unwrap();
    let refused = match bad.connect(a_addr, "node-a").await {
        Err(e) => e.to_string(),
        Ok(link) => link.ping(1).await.expect_err("a foreign certificate was accepted").to_string(),
    };
    assert!(!refused.is_empty());

    // node-z, which no roster names, joins on its CA-signed certificate...
    let z = ControlNode::bind(loopback(), ids[3].clone(), roster()).unwrap();
    let zl = z.connect(a_addr, "node-a").await.unwrap();
    zl.ping(2).await.unwrap();
    // ...until it is revoked: its next handshake is refused, and node-a will not dial it.
    revoked.write().unwrap().insert("node-z".into());
    let refused = match z.connect(a_addr, "node-a").await {
        Err(e) => e.to_string(),
        Ok(link) => link.ping(6).await.expect_err("a revoked certificate was accepted").to_string(),
    };
    assert!(!refused.is_empty());
    assert!(a.connect(z.local_addr().unwrap(), "node-z").await.is_err(), "node-a dialled a revoked node");
    // The connection it opened before the revocation, idle, is closed once node-a is told the
    // list changed (what a node does on SIGHUP after reloading it); node-b's is not.
    assert!(zl.connection.close_reason().is_none());
    a.revocations_changed();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while zl.connection.close_reason().is_none() {
        assert!(std::time::Instant::now() < deadline, "the revoked node's connection is still open");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(zl.ping(8).await.is_err());
    link.ping(9).await.unwrap();


    // Garbage on a stream closes that connection...
    let c = ControlNode::bind(loopback(), ids[2].clone(), roster()).unwrap();
    let cl = c.connect(a_addr, "node-a").await.unwrap();
    let mut recv = cl.send_raw(&[12, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 1, 2, 3, 4, 5, 6, 7]).await.unwrap();
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(10), recv.read(&mut buf)).await.expect("no answer to garbage");
    assert!(!matches!(r, Ok(Some(n)) if n > 0), "garbage was answered");
    assert_eq!(close_code(&cl.connection).await, Some(baton_proto::CLOSE_MALFORMED as u64));
    assert!(cl.ping(3).await.is_err());
    // ...and node-a keeps serving everyone else, including a new connection from node-c.
    link.ping(4).await.unwrap();
    let cl2 = c.connect(a_addr, "node-a").await.unwrap();
    cl2.ping(5).await.unwrap();
    // The garbage was counted (a frame that does not decode), and nothing else was.
    assert_eq!(a.drops().get(baton_mesh::control::DropKind::MalformedControl), 1);
    assert_eq!(a.drops().snapshot().iter().map(|(_, n)| n).sum::<u64>(), 1, "{:?}", a.drops().snapshot());
    // An oversized frame (a length over the limit) closes the connection too, counted as such.
    let cl3 = c.connect(a_addr, "node-a").await.unwrap();
    let _ = cl3.send_raw(&u32::MAX.to_le_bytes()).await.unwrap();
    assert_eq!(close_code(&cl3.connection).await, Some(baton_proto::CLOSE_MALFORMED as u64));
    assert_eq!(a.drops().get(baton_mesh::control::DropKind::OversizedControl), 1);
    cl2.ping(7).await.unwrap();
}
