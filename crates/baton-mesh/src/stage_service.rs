//! A pipeline stage served to the head: agrees on the tensor plane (`Attach`, over the control
//! plane), loads the layer range the head's plan gives it (`Init`: range, epoch, KV cache
//! shape), answers liveness probes at once (`Ping`, never queued behind work), then runs each
//! step it is sent, over UCX or QUIC (the last stage also samples), and answers with hidden
//! states or sampled tokens. A step sent down the chain (`Chain`) goes on from here to the
//! next stage over a QUIC link this stage opens, and its tokens come back the same way. The
//! stage belongs to this node's GPU-shard actor (baton-shard's, the same one a pipeline head
//! drives), which runs the requests in arrival order and refuses the work of any epoch but the
//! one it was loaded for; this file only translates the wire.

use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_engine::{KvGeometry, StepResult};
use baton_shard::{Input, NewSequence, ShardHandle, StepRequest};
use baton_proto::{decode, encode, read_frame_limited, write_frame, CLOSE_MALFORMED, MAX_TENSOR_FRAME};

use crate::control::{ControlError, ControlNode, PeerLink};
use crate::stage_wire::{layout_from_wire, sampled_to_wire, sampling_from_wire, StageReply, StageRequest, WireHop, WireInput, WireNewSequence, BROKEN_ERROR, BROKEN_LOST, BROKEN_REFUSED};
use crate::tensor_plane::{StageLink, TensorPlane};

/// One node's stage, loaded on the head's `Init` with the layer range and epoch of the head's
/// plan (any range: every node has the whole checkpoint), re-loaded when a new plan moves it.
pub struct StageService {
    plane: Arc<TensorPlane>,
    #[cfg(feature = "ucx")]
    ucx: Arc<crate::tensor_plane::ucx::StageUcx>,
    shard: ShardHandle,
    /// Set when the node asked to leave; `released` when the head let it go.
    draining: tokio::sync::watch::Sender<bool>,
    released: tokio::sync::watch::Sender<bool>,
    /// The pipeline head this stage serves, and when it last heard from it.
    head: std::sync::Mutex<Option<(String, Instant)>>,
    /// This node's count of what peers sent that it dropped.
    drops: Arc<crate::control::Drops>,
    /// Set (to this node's name) while the node heads a pipeline itself: pings are answered
    /// naming it as its own head, and stage work is refused.
    heading: std::sync::Mutex<Option<String>>,
    /// The control plane (set when serving starts), through which the next stage of a chain
    /// is reached, and the links to those stages.
    node: std::sync::OnceLock<Arc<ControlNode>>,
    next: std::sync::Mutex<std::collections::HashMap<String, StageLink>>,
    /// Steps that came down a chain.
    chained: std::sync::atomic::AtomicU64,
}

/// How long a stage stays with a silent head (its probes come every 100 ms) before another
/// head's `Init` may take it over: a stage never serves two heads at once.
pub const HEAD_LEASE: Duration = Duration::from_secs(1);

/// This process's generation: its start time in ns since the Unix epoch, so a node started
/// again on the same machine answers with a larger one.
pub fn generation() -> u64 {
    static GENERATION: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *GENERATION.get_or_init(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64))
}

impl StageService {
    /// Serves `shard` (this node's GPU-shard actor) over `plane`.
    pub fn new(shard: ShardHandle, plane: Arc<TensorPlane>, drops: Arc<crate::control::Drops>) -> Self {
        StageService {
            plane,
            #[cfg(feature = "ucx")]
            ucx: Arc::default(),
            shard,
            draining: tokio::sync::watch::channel(false).0,
            released: tokio::sync::watch::channel(false).0,
            head: std::sync::Mutex::new(None),
            drops,
            heading: std::sync::Mutex::new(None),
            node: std::sync::OnceLock::new(),
            next: std::sync::Mutex::new(std::collections::HashMap::new()),
            chained: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The node heads a pipeline (`Some(its name)`) or serves as a stage again (`None`, with no
    /// head until one sends its `Init`).
    pub fn set_heading(&self, me: Option<String>) {
        *self.heading.lock().unwrap_or_else(|p| p.into_inner()) = me;
        *self.lease() = None;
    }

    fn heading(&self) -> Option<String> {
        self.heading.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn lease(&self) -> std::sync::MutexGuard<'_, Option<(String, Instant)>> {
        self.head.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A message from `peer` over the control plane: the head's keep its lease.
    fn heard_from(&self, peer: &str) {
        if let Some((head, last)) = self.lease().as_mut() {
            if head == peer {
                *last = Instant::now();
            }
        }
    }

    /// `head`'s `Init`: taken if it is this stage's head, or the stage has none, or its head
    /// has been silent for [`HEAD_LEASE`].
    fn take_lease(&self, head: &str) -> Result<(), String> {
        let mut lease = self.lease();
        match lease.as_ref() {
            Some((current, last)) if current != head && last.elapsed() < HEAD_LEASE => {
                Err(format!("this stage serves the pipeline head {current}, which is alive"))
            }
            _ => {
                if let Some((current, last)) = lease.as_ref().filter(|(c, _)| c != head) {
                    eprintln!("baton: the pipeline head {head} takes this stage over from {current} (silent for {:.1} s)", last.elapsed().as_secs_f64());
                }
                *lease = Some((head.to_string(), Instant::now()));
                Ok(())
            }
        }
    }

    /// The answer to work the shard did not do: refused (work of another plan epoch, counted;
    /// a stage not loaded yet), or failed by its engine.
    fn refused(&self, e: baton_shard::ShardError) -> StageReply {
        match e {
            baton_shard::ShardError::WrongEpoch { .. } => {
                tracing::warn!(error = %e, "dropping stage work of another plan epoch");
                self.drops.count(crate::control::DropKind::StaleEpoch);
                StageReply::Refused(e.to_string())
            }
            baton_shard::ShardError::NotLoaded => StageReply::Refused(e.to_string()),
            _ => StageReply::Error(e.to_string()),
        }
    }

    /// The head this stage serves and how long it has been silent.
    pub fn head(&self) -> Option<(String, Duration)> {
        self.lease().as_ref().map(|(h, last)| (h.clone(), last.elapsed()))
    }

    /// This node's GPU shard.
    pub fn shard(&self) -> &ShardHandle {
        &self.shard
    }

    /// Starts leaving: pongs say so, and the head moves this node's layers away.
    pub fn drain(&self) {
        self.draining.send_replace(true);
    }

    /// Becomes true when the node asked to leave.
    pub fn draining(&self) -> tokio::sync::watch::Receiver<bool> {
        self.draining.subscribe()
    }

    /// Becomes true when the head no longer needs this draining node.
    pub fn released(&self) -> tokio::sync::watch::Receiver<bool> {
        self.released.subscribe()
    }

    /// Steps that came over UCX, and those of them whose hidden states came by RMA.
    fn ucx_counts(&self) -> (u64, u64) {
        #[cfg(feature = "ucx")]
        {
            use std::sync::atomic::Ordering::Relaxed;
            (self.ucx.steps.load(Relaxed), self.ucx.window_steps.load(Relaxed))
        }
        #[cfg(not(feature = "ucx"))]
        (0, 0)
    }

    /// `Attach`: the stage's UCX address and window when both ends have UCX, none otherwise.
    async fn attach(&self, head: &str, tensor_address: Option<Vec<u8>>, window_bytes: u64) -> StageReply {
        #[cfg(feature = "ucx")]
        if let (Some(u), Some(addr)) = (self.plane.ucx(), tensor_address) {
            return match self.ucx.attach(u, head, addr, window_bytes).await {
                Ok(window) => StageReply::Attached { tensor_address: self.plane.address(), window },
                Err(e) => StageReply::Error(format!("attaching the tensor plane: {e}")),
            };
        }
        #[cfg(not(feature = "ucx"))]
        let _ = (head, tensor_address, window_bytes);
        StageReply::Attached { tensor_address: None, window: None }
    }

    /// The answer to a ping: never waits for a running step. It names the head whose lease is
    /// fresh (none once the head has been silent past [`HEAD_LEASE`]), or this node while it
    /// heads a pipeline itself.
    fn pong(&self, nonce: u64) -> StageReply {
        let busy_us = self.shard.stats().busy.as_micros() as u64;
        // Loading its layers from the checkpoint: how far, in MiB of weights (0 of 0 when not).
        let mib = |b: usize| (b >> 20).min(u32::MAX as usize) as u32;
        let (loading_mib_done, loading_mib_total) = self.shard.loading().map_or((0, 0), |(d, t)| (mib(d), mib(t).max(1)));
        if let Some(me) = self.heading() {
            return StageReply::Pong {
                nonce,
                generation: generation(),
                first_layer: 0,
                end_layer: 0,
                epoch: 0,
                loaded: false,
                draining: false,
                tensor_plane: String::new(),
                ucx_steps: 0,
                window_steps: 0,
                chained_steps: 0,
                busy_us,
                head: me,
                loading_mib_done,
                loading_mib_total,
            };
        }
        let serving = self.shard.serving();
        let (ucx_steps, window_steps) = self.ucx_counts();
        let (layers, epoch) = serving.as_ref().map_or((0..0, 0), |s| (s.layers.clone(), s.epoch));
        StageReply::Pong {
            nonce,
            generation: generation(),
            first_layer: layers.start as u32,
            end_layer: layers.end as u32,
            epoch,
            loaded: serving.is_some(),
            draining: *self.draining.borrow(),
            tensor_plane: self.plane.describe().to_string(),
            ucx_steps,
            window_steps,
            chained_steps: self.chained.load(std::sync::atomic::Ordering::Relaxed),
            busy_us,
            head: self.head().filter(|(_, silent)| *silent < HEAD_LEASE).map(|(h, _)| h).unwrap_or_default(),
            loading_mib_done,
            loading_mib_total,
        }
    }

    /// `Drain` and `Release`: answered at once, never queued behind a step.
    fn leave(&self, req: &StageRequest) -> StageReply {
        match req {
            StageRequest::Drain => {
                tracing::info!("asked to drain: leaving once the head has moved this node's layers");
                self.drain();
                StageReply::Ack
            }
            StageRequest::Release if *self.draining.borrow() => {
                self.released.send_replace(true);
                StageReply::Ack
            }
            StageRequest::Release => StageReply::Error("this node is not draining".into()),
            _ => StageReply::Error("not a leave request".into()),
        }
    }

    /// A request for the stage itself, through the shard (in the order they come), over the
    /// control plane or UCX. While this node heads a pipeline its shard is the head's own, so
    /// stage work is refused whichever way it comes (another head's old UCX endpoint).
    async fn handle(&self, req: StageRequest) -> StageReply {
        if let Some(me) = self.heading().filter(|_| !matches!(req, StageRequest::Ping { .. } | StageRequest::Query { .. })) {
            return StageReply::Refused(format!("{me} is a pipeline head, not a stage"));
        }
        match req {
            StageRequest::Ping { nonce } | StageRequest::Query { nonce } => self.pong(nonce),
            StageRequest::Drain | StageRequest::Release => self.leave(&req),
            StageRequest::Attach { .. } => StageReply::Error("Attach is handled by the serving loop".into()),
            StageRequest::Init { block_size, num_blocks, first_layer, end_layer, epoch, head } => {
                if let Err(e) = self.take_lease(&head) {
                    return StageReply::Refused(e);
                }
                let geometry = KvGeometry { block_size: block_size as usize, num_blocks: num_blocks as usize };
                // Layers it holds already (the cache shape unchanged) stay, with their KV: a
                // planned change moves only the KV of layers that change hands, and after a
                // loss the head recomputes every sequence, overwriting what it reads.
                match self.shard.load(first_layer as usize..end_layer as usize, geometry, epoch).await {
                    Ok(l) => {
                        tracing::info!(epoch, first = first_layer, end = end_layer, reused = l.kept, extended = l.extended, "stage initialised");
                        StageReply::Ready { first_layer, end_layer, epoch, kept: l.kept }
                    }
                    Err(e) => self.refused(e),
                }
            }
            StageRequest::ExportKv { epoch, first_layer, end_layer, blocks } => {
                match self.shard.export_kv(epoch, first_layer as usize..end_layer as usize, blocks).await {
                    Ok(data) => StageReply::Kv { data },
                    Err(e) => self.refused(e),
                }
            }
            StageRequest::ImportKv { epoch, first_layer, end_layer, blocks, data } => {
                match self.shard.import_kv(epoch, first_layer as usize..end_layer as usize, blocks, data).await {
                    Ok(()) => StageReply::Ack,
                    Err(e) => self.refused(e),
                }
            }
            StageRequest::Chain { head, route, epoch, chunks, input, new_sequences, released, ids } => self.chain(head, route, epoch, chunks, input, new_sequences, released, ids).await,
            StageRequest::Step { epoch, chunks, input, new_sequences, released, ids } => {
                let input = match input {
                    WireInput::Tokens(t) => Input::Tokens(t),
                    WireInput::Hidden(h) => Input::Hidden(h),
                    WireInput::Window { .. } => return StageReply::Error("window input reached the stage unresolved".into()),
                };
                let starts = new_sequences.into_iter().map(new_sequence).collect();
                let step = StepRequest { epoch, layout: layout_from_wire(&chunks), input, ids, released, starts };
                match self.shard.step(step).await {
                    Err(e) => self.refused(e),
                    Ok(done) => {
                        let compute_us = done.compute.as_micros() as u64;
                        match done.result {
                            StepResult::Hidden(hidden) => StageReply::Hidden { hidden, compute_us },
                            StepResult::Sampled(out) => StageReply::Sampled { tokens: out.iter().map(|(id, s, finish)| sampled_to_wire(*id, s, *finish)).collect(), compute_us },
                        }
                    }
                }
            }
        }
    }
}

impl StageService {
    /// A step of the chain: run here, then on down `route`; the tokens (or what broke) come
    /// back up. Only the head's steps are taken (its lease); the last stage samples.
    #[allow(clippy::too_many_arguments)]
    async fn chain(&self, head: String, route: Vec<WireHop>, epoch: u64, chunks: Vec<crate::stage_wire::WireChunk>, input: WireInput, new_sequences: Vec<WireNewSequence>, released: Vec<u64>, ids: Vec<u64>) -> StageReply {
        if self.head().is_none_or(|(h, _)| h != head) {
            return StageReply::Refused(format!("a chained step of {head}, which is not this stage's head"));
        }
        self.chained.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // The device's time in steps when this one came: what it ran beyond this step's own
        // compute before answering is time this step spent queued behind other micro-batches.
        let busy_at_arrival = self.shard.stats().busy;
        let behind = |compute_us: u64| (self.shard.stats().busy.saturating_sub(busy_at_arrival).as_micros() as u64).saturating_sub(compute_us);
        let Some((next, rest)) = route.split_first() else {
            // The last stage: sample, and start the tokens' way back.
            return match Box::pin(self.handle(StageRequest::Step { epoch, chunks, input, new_sequences, released, ids })).await {
                StageReply::Sampled { tokens, compute_us } => StageReply::Chained { tokens, hops: vec![(compute_us, 0, behind(compute_us))] },
                StageReply::Hidden { .. } => StageReply::Error("a chain ended at a stage that does not end the model".into()),
                other => other,
            };
        };
        let step = StageRequest::Step { epoch, chunks: chunks.clone(), input, new_sequences: Vec::new(), released: Vec::new(), ids: ids.clone() };
        let (hidden, compute_us) = match Box::pin(self.handle(step)).await {
            StageReply::Hidden { hidden, compute_us } => (hidden, compute_us),
            StageReply::Sampled { .. } => return StageReply::Error("this stage ends the model, but the chain goes on".into()),
            other => return other,
        };
        let behind_us = behind(compute_us);
        let broken = |kind: u8, detail: String| StageReply::Broken { stage: next.name.clone(), kind, detail };
        let link = match self.next_link(next).await {
            Ok(l) => l,
            Err(e) => return broken(BROKEN_LOST, e),
        };
        let req = StageRequest::Chain { head, route: rest.to_vec(), epoch, chunks, input: WireInput::Hidden(hidden), new_sequences, released, ids };
        let called = Instant::now();
        let reply = link.call(req).await;
        let downstream_us = called.elapsed().as_micros() as u64;
        match reply {
            Ok(StageReply::Chained { tokens, mut hops }) => {
                hops.insert(0, (compute_us, downstream_us, behind_us));
                StageReply::Chained { tokens, hops }
            }
            Ok(b @ StageReply::Broken { .. }) => b,
            Ok(StageReply::Error(e)) => broken(BROKEN_ERROR, e),
            Ok(StageReply::Refused(e)) => broken(BROKEN_REFUSED, e),
            Ok(other) => broken(BROKEN_ERROR, format!("answered a chained step with {other:?}")),
            Err(e) => {
                self.next.lock().unwrap_or_else(|p| p.into_inner()).remove(&next.name);
                broken(BROKEN_LOST, e.to_string())
            }
        }
    }

    /// The link to the next stage of a chain: the open one, or a new one (within a second).
    async fn next_link(&self, hop: &WireHop) -> Result<StageLink, String> {
        if let Some(l) = self.next.lock().unwrap_or_else(|p| p.into_inner()).get(&hop.name).filter(|l| !l.is_closed()) {
            return Ok(l.clone());
        }
        let node = self.node.get().ok_or("this stage is not serving yet")?;
        let addr: std::net::SocketAddr = hop.control.parse().map_err(|_| format!("{:?} is not a control address", hop.control))?;
        let peer = tokio::time::timeout(Duration::from_secs(1), node.connect(addr, &hop.name))
            .await
            .map_err(|_| format!("{} did not answer within a second", hop.name))?
            .map_err(|e| e.to_string())?;
        let link = StageLink::quic(peer);
        self.next.lock().unwrap_or_else(|p| p.into_inner()).insert(hop.name.clone(), link.clone());
        Ok(link)
    }
}

fn new_sequence(s: WireNewSequence) -> NewSequence {
    NewSequence { id: s.id, params: sampling_from_wire(&s.params), prompt: s.prompt, eos: s.eos, generated: s.generated }
}

/// Serves the stage to whichever cluster peer connects (the pipeline head), over the control
/// plane and, when it is on, UCX, and the gossip on the same connections; for the node's whole
/// life, whatever its role (while it heads a pipeline, pings name it and stage work is refused).
pub async fn serve(node: Arc<ControlNode>, svc: Arc<StageService>, gossip: Option<Arc<crate::gossip::Gossip>>) {
    let _ = svc.node.set(node.clone());
    #[cfg(feature = "ucx")]
    if let Some(requests) = svc.plane.ucx().and_then(|u| u.take_requests()) {
        let stage = svc.clone();
        tokio::spawn(crate::tensor_plane::ucx::serve_requests(requests, svc.ucx.clone(), move |req| {
            let stage = stage.clone();
            async move { stage.handle(req).await }
        }));
    }
    while let Some(link) = node.accept().await {
        let Ok(link) = link else { continue };
        if let Some(g) = &gossip {
            tokio::spawn(crate::gossip::serve_connection(g.clone(), link.clone()));
        }
        let (svc, node) = (svc.clone(), node.clone());
        tokio::spawn(async move {
            while let Some((mut send, mut recv)) = node.accept_bi(&link).await {
                let req = match read_frame_limited(&mut recv, MAX_TENSOR_FRAME).await {
                    Ok(Some(body)) => decode::<StageRequest>(&body),
                    Ok(None) => continue,
                    Err(e) => Err(e),
                };
                let req = match req {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(peer = %link.peer, error = %e, "malformed stage frame; closing the connection");
                        node.drops().count_if(crate::control::DropKind::of_frame(&e));
                        link.connection.close(CLOSE_MALFORMED.into(), b"malformed frame");
                        break;
                    }
                };
                if !matches!(req, StageRequest::Query { .. }) {
                    svc.heard_from(&link.peer);
                }
                // Each stream in its own task: a chained step waits for the stages after this
                // one, and the next step (another micro-batch) must not wait behind it. Pings and
                // leave requests are answered at once by `handle`, never queued behind a step; it
                // refuses stage work while this node heads a pipeline.
                let (svc, peer) = (svc.clone(), link.peer.clone());
                tokio::spawn(async move {
                    let reply = match req {
                        StageRequest::Attach { tensor_address, window_bytes } if svc.heading().is_none() => svc.attach(&peer, tensor_address, window_bytes).await,
                        req => svc.handle(req).await,
                    };
                    match encode(&reply) {
                        Ok(bytes) => {
                            let _ = write_frame(&mut send, &bytes).await;
                            let _ = send.finish();
                        }
                        Err(e) => tracing::error!(error = %e, "cannot encode a stage reply"),
                    }
                });
            }
        });
    }
}

/// The pipeline head the stage node `name` serves (`None`: it serves none, or did not answer
/// within a second).
pub async fn head_of(node: &ControlNode, name: &str, addr: std::net::SocketAddr) -> Option<String> {
    let ask = async {
        let link = node.connect(addr, name).await.ok()?;
        let head = match call(&link, &StageRequest::Query { nonce: 0 }).await.ok()? {
            StageReply::Pong { head, .. } if !head.is_empty() => Some(head),
            _ => None,
        };
        link.connection.close(0u32.into(), b"asked");
        head
    };
    tokio::time::timeout(Duration::from_secs(1), ask).await.ok().flatten()
}

/// One request to a remote stage, one reply, over the control plane's QUIC streams.
pub async fn call(link: &PeerLink, req: &StageRequest) -> Result<StageReply, ControlError> {
    let (mut send, mut recv) = link.connection.open_bi().await?;
    write_frame(&mut send, &encode(req)?).await?;
    let _ = send.finish();
    match read_frame_limited(&mut recv, MAX_TENSOR_FRAME).await? {
        Some(body) => Ok(decode::<StageReply>(&body)?),
        None => Err(baton_proto::FrameError::Closed.into()),
    }
}
