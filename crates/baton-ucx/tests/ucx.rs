//! The UCX wrapper between two workers of one process, over each transport CI has (TCP and
//! shared memory, chosen with UCX_TLS as operators would): active messages small (eager) and
//! large (rendezvous), oversized messages refused, RMA puts into a registered window, and
//! futures dropped mid-flight.

use std::time::Duration;

use baton_ucx::{UcxError, Worker};

const ID: u16 = 7;

/// Tests take turns: one of them changes UCX_TLS, which UCX reads (getenv) when a worker starts.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn turn() -> tokio::sync::MutexGuard<'static, ()> {
    TURN.lock().await
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), f).await.unwrap_or_else(|_| panic!("{what}: timed out"))
}

async fn exercise(tls: &str) -> Result<(), UcxError> {
    let a = Worker::start("a")?;
    let b = Worker::start("b")?;
    let mut inbox = b.listen(ID, 8 << 20).await?;
    let mut small = b.listen(ID + 1, 1024).await?;
    let ep = a.connect(b.address().to_vec(), "b").await?;

    // Eager and rendezvous sizes, each with its header intact and in order.
    for (i, len) in [0usize, 64, 8 << 10, 4 << 20].into_iter().enumerate() {
        let data = pattern(len, i as u8);
        within("send", ep.send(ID, vec![i as u8; 16], data.clone())).await?;
        let m = within("receive", inbox.recv()).await.expect("inbox open");
        assert_eq!(m.header, vec![i as u8; 16], "{tls}: header of message {i}");
        assert_eq!(m.data.len(), len, "{tls}: length of message {i}");
        assert!(m.data == data, "{tls}: payload of message {i} differs");
    }

    // Payloads over a listener's limit are refused unread, eager or rendezvous, header kept.
    for len in [4096usize, 1 << 20] {
        within("oversized send", ep.send(ID + 1, b"big".to_vec(), vec![1; len])).await?;
        let m = within("oversized receive", small.recv()).await.expect("inbox open");
        assert_eq!((m.header.as_slice(), m.data.len(), m.oversized), (b"big".as_slice(), 0, Some(len)), "{tls}");
    }

    // A send whose future is dropped at once still delivers its (owned) buffer intact.
    let big = pattern(2 << 20, 9);
    drop(ep.send(ID, b"dropped".to_vec(), big.clone()));
    {
        let fut = ep.send(ID, b"abandoned".to_vec(), big.clone());
        tokio::pin!(fut);
        let _ = tokio::time::timeout(Duration::from_micros(1), &mut fut).await;
    }
    within("send after drops", ep.send(ID, b"after".to_vec(), vec![1, 2, 3])).await?;
    let mut seen = Vec::new();
    while seen.last().map(|h: &Vec<u8>| h.as_slice()) != Some(b"after".as_slice()) {
        let m = within("receive after drops", inbox.recv()).await.expect("inbox open");
        if m.header == b"abandoned" {
            assert!(m.data == big, "{tls}: an abandoned send arrived corrupted");
        }
        seen.push(m.header);
    }

    // RMA: a registered window, written remotely, flushed, then read.
    let window = b.register(1 << 20).await?;
    let remote = ep.window(&window.descriptor()).await?;
    let payload = pattern(512 << 10, 3);
    within("put", ep.put(payload.clone(), &remote, 4096)).await?;
    within("flush", ep.flush()).await?;
    let back = window.read(4096, payload.len()).await?;
    assert!(back == payload, "{tls}: the window does not hold what was put");
    assert!(matches!(ep.put(vec![0; 16], &remote, (1 << 20) - 8).await, Err(UcxError::Invalid(_))), "{tls}: an overrun put was accepted");

    // From a borrowed buffer: over shared memory the window is mapped here and the put is a
    // memcpy; over TCP it goes through UCX.
    match tls {
        "shm" => assert!(remote.is_mapped(), "shm: the peer's window is not mapped into this process"),
        "tcp" => assert!(!remote.is_mapped(), "tcp: a window cannot be mapped across TCP"),
        _ => {}
    }
    let second = pattern(300 << 10, 5);
    within("put_slice", ep.put_slice(&second, &remote, 100)).await?;
    within("flush", ep.flush()).await?;
    assert!(window.read(100, second.len()).await? == second, "{tls}: put_slice did not land");
    assert!(matches!(ep.put_slice(&second, &remote, 1 << 20).await, Err(UcxError::Invalid(_))), "{tls}: an overrun put_slice was accepted");
    assert!(matches!(window.read(1 << 20, 1).await, Err(UcxError::Invalid(_))));
    drop(remote);
    drop(ep);
    drop(a);
    drop(b);
    Ok(())
}

/// One test walks the transports in turn: UCX reads UCX_TLS when a worker starts, and the
/// variable is process-wide.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_messages_and_rma_over_tcp_and_shared_memory() {
    let _turn = turn().await;
    for tls in ["tcp", "shm", ""] {
        if tls.is_empty() {
            std::env::remove_var("UCX_TLS");
        } else {
            std::env::set_var("UCX_TLS", tls);
        }
        exercise(tls).await.unwrap_or_else(|e| panic!("UCX_TLS={tls}: {e}"));
    }
}

#[tokio::test]
async fn bad_inputs_are_errors() {
    let _turn = turn().await;
    let w = Worker::start("lonely").expect("worker");
    assert!(matches!(w.connect(Vec::new(), "nobody").await, Err(UcxError::Invalid(_))));
    assert!(matches!(w.register(0).await, Err(UcxError::Invalid(_))));
}

/// Handles that outlive their worker fail with `WorkerGone`: no call reaches a destroyed worker
/// and no put writes into a window its shutdown unmapped.
#[tokio::test]
async fn handles_outliving_their_worker_fail_cleanly() {
    let _turn = turn().await;
    let a = Worker::start("a").expect("worker");
    let b = Worker::start("b").expect("worker");
    let window = b.register(4096).await.expect("window");
    let ep = a.connect(b.address().to_vec(), "b").await.expect("endpoint");
    let remote = ep.window(&window.descriptor()).await.expect("remote window");
    ep.put_slice(&[7; 64], &remote, 0).await.expect("put while alive");
    drop(a);
    assert!(matches!(ep.put_slice(&[1; 64], &remote, 0).await, Err(UcxError::WorkerGone)));
    assert!(matches!(ep.put(vec![1; 64], &remote, 0).await, Err(UcxError::WorkerGone)));
    assert!(matches!(ep.send(ID, Vec::new(), vec![1]).await, Err(UcxError::WorkerGone)));
    assert!(matches!(ep.flush().await, Err(UcxError::WorkerGone)));
    drop((remote, ep));
    assert_eq!(window.read(0, 64).await.expect("read"), vec![7; 64], "b's window lost what a put before the drop wrote");
}
