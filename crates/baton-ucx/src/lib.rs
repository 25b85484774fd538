//! The tensor plane's transport: a safe async wrapper over UCX (the `ucx-rs` bindings, a
//! vendored static UCX). One [`Worker`] is one UCX context and worker, owned by one progress
//! thread that sleeps on the worker's event fd; every UCX call happens on that thread, so the
//! worker runs in UCX's lock-free single-thread mode. Async callers talk to it through a command
//! queue (waking it with `ucp_worker_signal`, the one call UCX allows from any thread) and get
//! their results through oneshot channels.
//!
//! Buffers are owned: a send takes its header and payload by value and keeps them until UCX
//! reports completion, whether or not the caller still waits (a dropped future cannot free
//! memory UCX is reading). Received active messages are copied (eager) or received into a fresh
//! buffer (rendezvous) and handed over whole. RMA windows are registered once with
//! `ucp_mem_map` and described to peers by address, length and packed rkey.
//!
//! Transports are UCX's choice, steered by the usual environment (`UCX_TLS=tcp`, `UCX_TLS=shm`,
//! ...), which passes through untouched.

mod progress;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, RwLock};
use std::thread::JoinHandle;

use tokio::sync::{mpsc as tmpsc, oneshot};
use ucx_rs::sys;

use progress::{Command, WorkerPtr};

/// A UCX failure, with the operation that failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UcxError {
    #[error("UCX {op}: {message}")]
    Status { op: &'static str, status: i32, message: &'static str },
    #[error("the UCX worker has stopped")]
    WorkerGone,
    #[error("UCX endpoint to {0} failed: the peer is unreachable or closed the connection")]
    PeerFailed(String),
    #[error("UCX {0}")]
    Invalid(String),
}

impl UcxError {
    fn status(op: &'static str, status: sys::ucs_status_t) -> Self {
        UcxError::Status { op, status: status.into(), message: ucx_rs::status_string(status) }
    }
}

/// A received active message: its header and payload, both owned. A payload over the
/// listener's limit is not received: `data` is empty and `oversized` gives its length.
#[derive(Debug)]
pub struct AmMessage {
    pub header: Vec<u8>,
    pub data: Vec<u8>,
    pub oversized: Option<usize>,
}

pub type AmReceiver = tmpsc::UnboundedReceiver<AmMessage>;

struct Shared {
    worker: WorkerPtr,
    commands: mpsc::Sender<Command>,
    /// False once the worker is shutting down. Held (read) across send-and-signal, so the
    /// progress thread, which destroys the worker only after `Shutdown` (sent under the write
    /// lock), never races a signal.
    alive: Arc<RwLock<bool>>,
    next_id: AtomicU64,
}

impl Shared {
    fn submit(&self, cmd: Command) -> Result<(), UcxError> {
        let alive = self.alive.read().unwrap_or_else(|p| p.into_inner());
        if !*alive {
            return Err(UcxError::WorkerGone);
        }
        self.commands.send(cmd).map_err(|_| UcxError::WorkerGone)?;
        // SAFETY: the worker is destroyed only after the progress thread receives `Shutdown`,
        // which is sent after `alive` is cleared under the write lock, so it is alive while we
        // hold the read lock; ucp_worker_signal is documented safe from any thread.
        unsafe { sys::ucp_worker_signal(self.worker.0) };
        Ok(())
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<Result<T, UcxError>>) -> Command) -> Result<T, UcxError> {
        let (tx, rx) = oneshot::channel();
        self.submit(make(tx))?;
        rx.await.map_err(|_| UcxError::WorkerGone)?
    }

    fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// One UCX context and worker with its progress thread. Dropping it stops the thread, closes
/// every endpoint and releases UCX.
pub struct Worker {
    shared: Arc<Shared>,
    address: Vec<u8>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").field("address_len", &self.address.len()).finish()
    }
}

impl Worker {
    /// Creates the context and worker on a new progress thread named `name`.
    pub fn start(name: &str) -> Result<Worker, UcxError> {
        let (commands, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let alive = Arc::new(RwLock::new(true));
        let gate = alive.clone();
        let thread = std::thread::Builder::new()
            .name(format!("ucx-{name}"))
            .spawn(move || progress::run(rx, ready_tx, gate))
            .map_err(|e| UcxError::Invalid(format!("cannot start the progress thread: {e}")))?;
        let (worker, address) = match ready_rx.recv() {
            Ok(Ok(started)) => started,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(UcxError::WorkerGone);
            }
        };
        let shared = Arc::new(Shared { worker, commands, alive, next_id: AtomicU64::new(1) });
        Ok(Worker { shared, address, thread: Some(thread) })
    }

    /// This worker's address: what a peer needs to [`Worker::connect`] to it (exchanged over the
    /// control plane).
    pub fn address(&self) -> &[u8] {
        &self.address
    }

    /// An endpoint to the worker at `address`; `peer` names it in errors and logs.
    pub async fn connect(&self, address: Vec<u8>, peer: &str) -> Result<Endpoint, UcxError> {
        let id = self.shared.id();
        let peer = peer.to_string();
        let p = peer.clone();
        self.shared.call(|reply| Command::Connect { id, address, peer: p, reply }).await?;
        Ok(Endpoint { inner: Arc::new(EpInner { id, peer, shared: self.shared.clone() }) })
    }

    /// Receives every active message sent to `am_id` on this worker (one receiver per id; a
    /// second call replaces the first). Payloads over `max_len` bytes are refused unread (the
    /// message arrives with `oversized` set), so a peer cannot make this node allocate at will.
    pub async fn listen(&self, am_id: u16, max_len: usize) -> Result<AmReceiver, UcxError> {
        let (tx, rx) = tmpsc::unbounded_channel();
        self.shared.call(|reply| Command::Listen { am_id, max_len, tx, reply }).await?;
        Ok(rx)
    }

    /// Registers a window of `len` bytes that peers may write into with [`Endpoint::put`].
    pub async fn register(&self, len: usize) -> Result<Region, UcxError> {
        if len == 0 {
            return Err(UcxError::Invalid("cannot register an empty window".into()));
        }
        let id = self.shared.id();
        let (base, rkey) = self.shared.call(|reply| Command::Register { id, len, reply }).await?;
        Ok(Region { id, base, len, rkey, shared: self.shared.clone() })
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        {
            let mut alive = self.shared.alive.write().unwrap_or_else(|p| p.into_inner());
            if *alive {
                *alive = false;
                if self.shared.commands.send(Command::Shutdown).is_ok() {
                    // SAFETY: the thread takes the write lock (waits for us) before it destroys
                    // the worker.
                    unsafe { sys::ucp_worker_signal(self.shared.worker.0) };
                }
            }
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct EpInner {
    id: u64,
    peer: String,
    shared: Arc<Shared>,
}

impl Drop for EpInner {
    fn drop(&mut self) {
        let _ = self.shared.submit(Command::CloseEndpoint { id: self.id });
    }
}

/// A connection to a peer worker. Clones share it; the last one closes it.
#[derive(Clone)]
pub struct Endpoint {
    inner: Arc<EpInner>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint").field("peer", &self.inner.peer).finish()
    }
}

impl Endpoint {
    pub fn peer(&self) -> &str {
        &self.inner.peer
    }

    /// Sends an active message to handler `am_id` of the peer; resolves once UCX is done with
    /// the buffers (which it keeps until then, even if this future is dropped).
    pub async fn send(&self, am_id: u16, header: Vec<u8>, data: Vec<u8>) -> Result<(), UcxError> {
        let ep = self.inner.id;
        self.inner.shared.call(|reply| Command::SendAm { ep, am_id, header, data, reply }).await
    }

    /// Writes `data` into the peer's window at `offset`. Completion means the local buffer is
    /// free again; [`Endpoint::flush`] makes the write visible at the peer.
    pub async fn put(&self, data: Vec<u8>, window: &RemoteRegion, offset: usize) -> Result<(), UcxError> {
        self.check_put(data.len(), window, offset)?;
        let ep = self.inner.id;
        let (rkey, remote_addr) = (window.id, window.base + offset as u64);
        self.inner.shared.call(|reply| Command::Put { ep, rkey, remote_addr, data, reply }).await
    }

    /// [`Endpoint::put`] from a borrowed buffer. When the peer's window is mapped into this
    /// process (shared memory) this is one memcpy on the caller's thread, complete on return;
    /// otherwise the bytes are copied once and put through UCX.
    pub async fn put_slice(&self, data: &[u8], window: &RemoteRegion, offset: usize) -> Result<(), UcxError> {
        self.check_put(data.len(), window, offset)?;
        if let Some(local) = window.mapped {
            // The mapping lives until the rkey is destroyed: when `window` is dropped (not while
            // it is borrowed here) or when the worker shuts down, which starts only after `alive`
            // is cleared under the write lock, so holding the read lock across the copy keeps
            // the mapping in place.
            let alive = self.inner.shared.alive.read().unwrap_or_else(|p| p.into_inner());
            if !*alive {
                return Err(UcxError::WorkerGone);
            }
            // SAFETY: the range lies inside the peer's window (checked) and the window is mapped
            // (above). What the peer reads is ordered by the caller's protocol (a message after
            // the put).
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), (local as *mut u8).add(offset), data.len()) };
            drop(alive);
            return Ok(());
        }
        self.put(data.to_vec(), window, offset).await
    }

    fn check_put(&self, len: usize, window: &RemoteRegion, offset: usize) -> Result<(), UcxError> {
        if window.ep != self.inner.id {
            return Err(UcxError::Invalid("the window was unpacked on another endpoint".into()));
        }
        if offset.checked_add(len).is_none_or(|end| end > window.len) {
            return Err(UcxError::Invalid(format!("a put of {len} bytes at offset {offset} overruns the peer's {}-byte window", window.len)));
        }
        Ok(())
    }

    /// Completes every operation issued on this endpoint at the peer.
    pub async fn flush(&self) -> Result<(), UcxError> {
        let ep = self.inner.id;
        self.inner.shared.call(|reply| Command::Flush { ep, reply }).await
    }

    /// Unpacks a peer's window description for puts over this endpoint.
    pub async fn window(&self, desc: &WindowDescriptor) -> Result<RemoteRegion, UcxError> {
        let id = self.inner.shared.id();
        let ep = self.inner.id;
        let (packed, base) = (desc.rkey.clone(), desc.base);
        let mapped = self.inner.shared.call(|reply| Command::UnpackRkey { id, ep, packed, base, reply }).await?;
        Ok(RemoteRegion { id, ep, base: desc.base, len: desc.len as usize, mapped, shared: self.inner.shared.clone(), _ep: self.inner.clone() })
    }
}

/// What a peer needs to write into a [`Region`]: sent over the control plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowDescriptor {
    pub base: u64,
    pub len: u64,
    pub rkey: Vec<u8>,
}

/// A registered window of this worker's memory that peers write into.
pub struct Region {
    id: u64,
    base: u64,
    len: usize,
    rkey: Vec<u8>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region").field("len", &self.len).finish()
    }
}

impl Region {
    pub fn descriptor(&self) -> WindowDescriptor {
        WindowDescriptor { base: self.base, len: self.len as u64, rkey: self.rkey.clone() }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies `len` bytes at `offset` out of the window (on the progress thread, which owns the
    /// memory). What a peer wrote is complete once it has flushed and said so: the caller's
    /// protocol.
    pub async fn read(&self, offset: usize, len: usize) -> Result<Vec<u8>, UcxError> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(UcxError::Invalid(format!("a read of {len} bytes at offset {offset} overruns the {}-byte window", self.len)));
        }
        let id = self.id;
        self.shared.call(|reply| Command::Read { id, offset, len, reply }).await
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        let _ = self.shared.submit(Command::Unregister { id: self.id });
    }
}

/// A peer's window, unpacked on one endpoint.
pub struct RemoteRegion {
    id: u64,
    ep: u64,
    base: u64,
    len: usize,
    /// Where the window is mapped into this process (shared memory), if it is.
    mapped: Option<usize>,
    shared: Arc<Shared>,
    /// The rkey must be destroyed before its endpoint closes.
    _ep: Arc<EpInner>,
}

impl std::fmt::Debug for RemoteRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteRegion").field("len", &self.len).finish()
    }
}

impl RemoteRegion {
    /// Whether puts into this window are plain memcpys (it is mapped into this process).
    pub fn is_mapped(&self) -> bool {
        self.mapped.is_some()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for RemoteRegion {
    fn drop(&mut self) {
        let _ = self.shared.submit(Command::DestroyRkey { id: self.id });
    }
}

/// The transports UCX was asked to use (`UCX_TLS`), for start-up messages.
pub fn transports() -> String {
    std::env::var("UCX_TLS").unwrap_or_else(|_| "UCX's choice (UCX_TLS unset)".into())
}

/// The UCX library version linked in.
pub fn version() -> &'static str {
    ucx_rs::VENDORED_UCX_VERSION
}
