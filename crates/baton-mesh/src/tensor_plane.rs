//! The tensor plane between a pipeline head and its stages. With UCX built in (the default
//! `ucx` feature) and on at both ends, a step's request and reply travel as UCX active messages
//! (header: the request id; body: the same validated rkyv frame QUIC would carry), and hidden
//! states above [`RMA_THRESHOLD`] are put by RMA into a window the stage registered once. Worker
//! addresses and the window are exchanged over the mutually authenticated QUIC control plane
//! (`Attach`). Otherwise steps go over the control plane's QUIC streams.

use crate::control::{ControlError, PeerLink};
use crate::stage_service;
use crate::stage_wire::{StageReply, StageRequest};

/// Active message ids.
pub const AM_STAGE_REQUEST: u16 = 1;
pub const AM_STAGE_REPLY: u16 = 2;

/// Hidden states at least this large go by RMA put into the stage's window; smaller ones ride in
/// the active message (UCX's eager path is faster there than put + flush + message).
pub const RMA_THRESHOLD: usize = 64 << 10;

/// The longest a stage may take to answer one request before the call fails (and with it the
/// head's shard, which errors its requests and restarts): a reply lost on the tensor plane
/// while the control link stays up must not stall the pipeline for ever.
pub const STAGE_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// Which transport carries tensors, as the operator chose it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlaneChoice {
    Ucx,
    Quic,
}

impl PlaneChoice {
    /// UCX when it is built in, QUIC otherwise.
    pub fn default_for_build() -> PlaneChoice {
        if cfg!(feature = "ucx") {
            PlaneChoice::Ucx
        } else {
            PlaneChoice::Quic
        }
    }
}

/// This node's end of the tensor plane.
pub struct TensorPlane {
    #[cfg(feature = "ucx")]
    ucx: Option<ucx::UcxPlane>,
    description: String,
}

impl TensorPlane {
    /// Starts the chosen plane. Asking for UCX in a build without it is an error, not a silent
    /// switch to QUIC.
    pub async fn start(choice: PlaneChoice, name: &str) -> Result<TensorPlane, ControlError> {
        match choice {
            PlaneChoice::Quic => {
                let why = if cfg!(feature = "ucx") { "chosen with --tensor-plane quic" } else { "UCX is not built in" };
                Ok(TensorPlane {
                    #[cfg(feature = "ucx")]
                    ucx: None,
                    description: format!("QUIC streams on the control plane ({why})"),
                })
            }
            #[cfg(feature = "ucx")]
            PlaneChoice::Ucx => {
                let plane = ucx::UcxPlane::start(name).await?;
                let description = format!("UCX {} (transports: {})", baton_ucx::version(), baton_ucx::transports());
                Ok(TensorPlane { ucx: Some(plane), description })
            }
            #[cfg(not(feature = "ucx"))]
            PlaneChoice::Ucx => {
                let _ = name;
                Err(ControlError::Protocol("this build has no UCX (cargo feature `ucx`); use --tensor-plane quic".into()))
            }
        }
    }

    /// What carries tensors, for start-up messages and `baton status`.
    pub fn describe(&self) -> &str {
        &self.description
    }

    /// This node's UCX worker address, when UCX is on.
    pub fn address(&self) -> Option<Vec<u8>> {
        #[cfg(feature = "ucx")]
        if let Some(u) = &self.ucx {
            return Some(u.worker.address().to_vec());
        }
        None
    }

    #[cfg(feature = "ucx")]
    pub(crate) fn ucx(&self) -> Option<&ucx::UcxPlane> {
        self.ucx.as_ref()
    }
}

/// The head's link to one stage: the control link, and UCX when both ends have it.
#[derive(Clone)]
pub struct StageLink {
    pub control: PeerLink,
    #[cfg(feature = "ucx")]
    ucx: Option<std::sync::Arc<ucx::UcxLink>>,
}

impl StageLink {
    /// Agrees on the tensor plane with the stage at the other end of `control`.
    pub async fn attach(control: PeerLink, plane: &TensorPlane, window_bytes: usize) -> Result<StageLink, ControlError> {
        let req = StageRequest::Attach { tensor_address: plane.address(), window_bytes: window_bytes as u64 };
        let reply = stage_service::call(&control, &req).await?;
        let StageReply::Attached { tensor_address, window } = reply else {
            return Err(ControlError::Protocol(format!("stage {} answered Attach with {reply:?}", control.peer)));
        };
        #[cfg(feature = "ucx")]
        if let (Some(u), Some(addr)) = (plane.ucx(), tensor_address) {
            let link = u.link(&control.peer, addr, window).await?;
            return Ok(StageLink { control, ucx: Some(std::sync::Arc::new(link)) });
        }
        #[cfg(not(feature = "ucx"))]
        let _ = (tensor_address, window);
        Ok(StageLink {
            control,
            #[cfg(feature = "ucx")]
            ucx: None,
        })
    }

    /// A link over the control plane's QUIC streams only (a stage's link to the next stage of
    /// a chain).
    pub fn quic(control: PeerLink) -> StageLink {
        StageLink {
            control,
            #[cfg(feature = "ucx")]
            ucx: None,
        }
    }

    pub fn peer(&self) -> &str {
        &self.control.peer
    }

    /// Whether the control link is gone (the stage died or closed it).
    pub fn is_closed(&self) -> bool {
        self.control.connection.close_reason().is_some()
    }

    /// "ucx" or "quic".
    pub fn transport(&self) -> &'static str {
        #[cfg(feature = "ucx")]
        if self.ucx.is_some() {
            return "ucx";
        }
        "quic"
    }

    /// One request to the stage, one reply, over whichever plane the link uses. A stage whose
    /// control connection closes fails the call at once (shared-memory UCX cannot notice); no
    /// call outlives [`STAGE_CALL_TIMEOUT`].
    pub async fn call(&self, req: StageRequest) -> Result<StageReply, ControlError> {
        let call = async {
            #[cfg(feature = "ucx")]
            if let Some(u) = &self.ucx {
                return tokio::select! {
                    r = u.call(req) => r,
                    e = self.control.connection.closed() => Err(e.into()),
                };
            }
            stage_service::call(&self.control, &req).await
        };
        tokio::time::timeout(STAGE_CALL_TIMEOUT, call)
            .await
            .unwrap_or_else(|_| Err(ControlError::Protocol(format!("stage {} did not answer within {} s", self.peer(), STAGE_CALL_TIMEOUT.as_secs()))))
    }
}

#[cfg(feature = "ucx")]
pub(crate) mod ucx {
    //! The UCX half: request ids, the head's reply dispatcher, the stage's request loop.

    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    use baton_proto::{decode, encode, frame_body, FrameError, MAX_TENSOR_FRAME};
    use baton_ucx::{AmReceiver, Endpoint, Region, RemoteRegion, WindowDescriptor, Worker};
    use tokio::sync::oneshot;

    use super::{AM_STAGE_REPLY, AM_STAGE_REQUEST, RMA_THRESHOLD};
    use crate::control::ControlError;
    use crate::stage_wire::{StageReply, StageRequest, WireInput, WireWindow};

    type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Vec<u8>>>>>;

    pub(crate) struct UcxPlane {
        pub(crate) worker: Worker,
        pending: Pending,
        /// Request ids, unique across this node's links (one dispatcher routes every reply).
        next: Arc<AtomicU64>,
        /// The stage side's request inbox, taken by the stage service.
        requests: Mutex<Option<AmReceiver>>,
    }

    impl UcxPlane {
        pub(crate) async fn start(name: &str) -> Result<UcxPlane, ControlError> {
            let worker = Worker::start(name)?;
            let pending: Pending = Arc::default();
            let replies = worker.listen(AM_STAGE_REPLY, MAX_TENSOR_FRAME).await?;
            let requests = worker.listen(AM_STAGE_REQUEST, MAX_TENSOR_FRAME).await?;
            tokio::spawn(dispatch_replies(replies, pending.clone()));
            Ok(UcxPlane { worker, pending, next: Arc::new(AtomicU64::new(1)), requests: Mutex::new(Some(requests)) })
        }

        pub(crate) async fn link(&self, peer: &str, address: Vec<u8>, window: Option<WireWindow>) -> Result<UcxLink, ControlError> {
            let ep = self.worker.connect(address, peer).await?;
            let window = match window {
                Some(w) => Some(ep.window(&WindowDescriptor { base: w.base, len: w.len, rkey: w.rkey }).await?),
                None => None,
            };
            Ok(UcxLink {
                ep,
                window,
                pending: self.pending.clone(),
                next: self.next.clone(),
                turn: tokio::sync::Mutex::new(()),
                window_busy: std::sync::atomic::AtomicBool::new(false),
            })
        }

        pub(crate) fn take_requests(&self) -> Option<AmReceiver> {
            self.requests.lock().unwrap_or_else(|p| p.into_inner()).take()
        }
    }

    /// Routes each reply to the call waiting for its id; a reply nobody waits for is dropped.
    async fn dispatch_replies(mut replies: AmReceiver, pending: Pending) {
        while let Some(m) = replies.recv().await {
            let Ok(id) = <[u8; 8]>::try_from(m.header.as_slice()).map(u64::from_le_bytes) else {
                tracing::warn!(len = m.header.len(), "dropping a UCX stage reply with a malformed header");
                continue;
            };
            let waiter = pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            match waiter {
                Some(w) => {
                    let _ = w.send(m.data);
                }
                None => tracing::warn!(id, "dropping a UCX stage reply nobody waits for"),
            }
        }
        // The worker is gone: fail every waiting call now rather than at its timeout.
        pending.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    pub(crate) struct UcxLink {
        ep: Endpoint,
        window: Option<RemoteRegion>,
        pending: Pending,
        next: Arc<AtomicU64>,
        /// One call at a time: the window holds one step's hidden states.
        turn: tokio::sync::Mutex<()>,
        /// Set while a call that used the window has not had its reply. A call that ended
        /// early (dropped, timed out) leaves it set, and later calls send hidden states inline
        /// until one gets its reply: the stage serves requests in order, so that reply proves
        /// it has read the window.
        window_busy: std::sync::atomic::AtomicBool,
    }

    /// Removes a call's waiter if the call ends early (dropped or failed).
    struct Waiting<'a>(&'a Pending, u64);

    impl Drop for Waiting<'_> {
        fn drop(&mut self) {
            self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.1);
        }
    }

    impl UcxLink {
        /// One call at a time per link (`turn`), so the window holds at most one step's hidden
        /// states, and never ones the stage has yet to read (`window_busy`).
        pub(crate) async fn call(&self, mut req: StageRequest) -> Result<StageReply, ControlError> {
            let _turn = self.turn.lock().await;
            let window_was_busy = self.window_busy.load(Ordering::Acquire);
            if let (StageRequest::Step { input, .. }, Some(window), false) = (&mut req, &self.window, window_was_busy) {
                if let WireInput::Hidden(h) = input {
                    let bytes = h.len() * 4;
                    if bytes >= RMA_THRESHOLD && bytes <= window.len() {
                        self.window_busy.store(true, Ordering::Release);
                        put_hidden(&self.ep, window, h).await?;
                        if !window.is_mapped() {
                            self.ep.flush().await?;
                        }
                        *input = WireInput::Window { len: bytes as u64 };
                    }
                }
            }
            let id = self.next.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = oneshot::channel();
            self.pending.lock().unwrap_or_else(|p| p.into_inner()).insert(id, tx);
            let _waiting = Waiting(&self.pending, id);
            self.ep.send(AM_STAGE_REQUEST, id.to_le_bytes().to_vec(), encode(&req)?).await?;
            let body = rx.await.map_err(|_| ControlError::Protocol("the UCX reply dispatcher stopped".into()))?;
            // Answered: the stage has read whatever was in its window.
            self.window_busy.store(false, Ordering::Release);
            Ok(decode::<StageReply>(frame_body(&body)?)?)
        }
    }

    /// Puts hidden states, as little-endian f32 bytes, at the start of the stage's window.
    async fn put_hidden(ep: &Endpoint, window: &RemoteRegion, hidden: &[f32]) -> Result<(), baton_ucx::UcxError> {
        if cfg!(target_endian = "little") {
            // SAFETY: f32 has no padding and u8 no alignment: any f32 slice is a valid byte
            // slice of four times its length, and on a little-endian host these are the wire bytes.
            let bytes = unsafe { std::slice::from_raw_parts(hidden.as_ptr() as *const u8, hidden.len() * 4) };
            ep.put_slice(bytes, window, 0).await
        } else {
            ep.put(hidden.iter().flat_map(|x| x.to_le_bytes()).collect(), window, 0).await
        }
    }

    /// The attached head: where replies go, and the window it puts hidden states into.
    struct Head {
        ep: Endpoint,
        window: Option<Region>,
    }

    /// The stage's side of UCX.
    #[derive(Default)]
    pub(crate) struct StageUcx {
        head: Mutex<Option<Arc<Head>>>,
        pub(crate) steps: AtomicU64,
        pub(crate) window_steps: AtomicU64,
    }

    impl StageUcx {
        /// `Attach` from the head: connect back to it and register a window for its puts.
        pub(crate) async fn attach(&self, plane: &UcxPlane, head: &str, address: Vec<u8>, window_bytes: u64) -> Result<Option<WireWindow>, ControlError> {
            let ep = plane.worker.connect(address, head).await?;
            let region = if window_bytes > 0 { Some(plane.worker.register(window_bytes as usize).await?) } else { None };
            let wire = region.as_ref().map(|r| {
                let d = r.descriptor();
                WireWindow { base: d.base, len: d.len, rkey: d.rkey }
            });
            *self.head.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(Head { ep, window: region }));
            Ok(wire)
        }

        fn head(&self) -> Option<Arc<Head>> {
            self.head.lock().unwrap_or_else(|p| p.into_inner()).clone()
        }

        /// Turns a `Window` input back into hidden states read from the window.
        async fn resolve(&self, head: &Head, req: &mut StageRequest) -> Result<(), String> {
            let StageRequest::Step { input, .. } = req else { return Ok(()) };
            self.steps.fetch_add(1, Ordering::Relaxed);
            let WireInput::Window { len } = *input else { return Ok(()) };
            self.window_steps.fetch_add(1, Ordering::Relaxed);
            let Some(window) = &head.window else {
                return Err("the step refers to an RMA window this stage never registered".into());
            };
            let bytes = window.read(0, len as usize).await.map_err(|e| e.to_string())?;
            if !bytes.len().is_multiple_of(4) {
                return Err(format!("{} window bytes are not f32 hidden states", bytes.len()));
            }
            *input = WireInput::Hidden(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect());
            Ok(())
        }
    }

    /// Serves steps arriving as active messages, one at a time, in order; answers each on the
    /// attached head's endpoint. A message that does not parse is answered with an error (when
    /// its id can be read) and dropped; the stage keeps serving.
    pub(crate) async fn serve_requests<F: std::future::Future<Output = StageReply>>(
        mut requests: AmReceiver,
        stage: Arc<StageUcx>,
        handle: impl Fn(StageRequest) -> F,
    ) {
        while let Some(m) = requests.recv().await {
            let Ok(id) = <[u8; 8]>::try_from(m.header.as_slice()) else {
                tracing::warn!(len = m.header.len(), "dropping a UCX stage request with a malformed header");
                continue;
            };
            let Some(head) = stage.head() else {
                tracing::warn!("dropping a UCX stage request: no head has attached");
                continue;
            };
            let request = match m.oversized {
                Some(len) => Err(FrameError::TooLarge(len)),
                None => frame_body(&m.data).and_then(decode::<StageRequest>),
            };
            let reply = match request {
                Err(e) => {
                    tracing::warn!(error = %e, "malformed UCX stage request");
                    StageReply::Refused(format!("malformed request: {e}"))
                }
                Ok(StageRequest::Attach { .. }) => StageReply::Refused("Attach goes over the control plane".into()),
                Ok(mut req) => match stage.resolve(&head, &mut req).await {
                    Err(e) => StageReply::Refused(e),
                    Ok(()) => handle(req).await,
                },
            };
            match encode(&reply) {
                // In its own task: a send to a head that died (over shared memory, which cannot
                // notice) must not stop this loop from serving the next head.
                Ok(bytes) => {
                    let ep = head.ep.clone();
                    tokio::spawn(async move {
                        match tokio::time::timeout(super::STAGE_CALL_TIMEOUT, ep.send(AM_STAGE_REPLY, id.to_vec(), bytes)).await {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => tracing::warn!(error = %e, "cannot answer the head over UCX"),
                            Err(_) => tracing::warn!("gave up answering the head over UCX"),
                        }
                    });
                }
                Err(e) => tracing::error!(error = %e, "cannot encode a stage reply"),
            }
        }
    }
}
