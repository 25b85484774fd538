//! A pipeline stage served to the head: agrees on the tensor plane (`Attach`, over the control
//! plane), loads the layer range the head's plan gives it (`Init`: range, epoch, KV cache
//! shape), answers liveness probes at once (`Ping`, never queued behind work), then runs each
//! step it is sent, over UCX or QUIC (the last stage also samples), and answers with hidden
//! states or sampled tokens. The stage belongs to this node's GPU-shard actor (`StageShard`),
//! which runs the requests one at a time in arrival order, each on a blocking thread.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use baton_engine::{CpuBackend, KvGeometry, SamplingParams, SequenceStart, StageInput, StageWorker, StepResult};
use baton_proto::{decode, encode, read_frame_limited, write_frame, CLOSE_MALFORMED, MAX_TENSOR_FRAME};

use crate::control::{ControlError, ControlNode, PeerLink};
use crate::stage_wire::{layout_from_wire, sampled_to_wire, sampling_from_wire, StageReply, StageRequest, WireInput, WireNewSequence};
use crate::tensor_plane::TensorPlane;

/// One node's stage, loaded on the head's `Init` with the layer range and epoch of the head's
/// plan (any range: every node has the whole checkpoint), re-loaded when a new plan moves it.
pub struct StageService {
    pub model_dir: PathBuf,
    pub threads: usize,
    plane: Arc<TensorPlane>,
    #[cfg(feature = "ucx")]
    ucx: Arc<crate::tensor_plane::ucx::StageUcx>,
    state: Mutex<Option<Loaded>>,
    /// What the stage serves, readable while a step holds `state` (pings never wait on work).
    serving: Mutex<Serving>,
    /// Set when the node asked to leave; `released` when the head let it go.
    draining: tokio::sync::watch::Sender<bool>,
    released: tokio::sync::watch::Sender<bool>,
}

#[derive(Debug, Clone, Default)]
struct Serving {
    layers: Option<Range<usize>>,
    epoch: u64,
}

struct Loaded {
    worker: StageWorker<CpuBackend>,
    epoch: u64,
}

/// This process's generation: its start time in ns since the Unix epoch, so a node started
/// again on the same machine answers with a larger one.
pub fn generation() -> u64 {
    static GENERATION: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *GENERATION.get_or_init(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64))
}

impl StageService {
    pub fn new(model_dir: PathBuf, threads: usize, plane: Arc<TensorPlane>) -> Self {
        StageService {
            model_dir,
            threads,
            plane,
            #[cfg(feature = "ucx")]
            ucx: Arc::default(),
            state: Mutex::new(None),
            serving: Mutex::new(Serving::default()),
            draining: tokio::sync::watch::channel(false).0,
            released: tokio::sync::watch::channel(false).0,
        }
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

    /// The answer to a ping: never waits for a running step.
    fn pong(&self, nonce: u64) -> StageReply {
        let serving = self.serving.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let (ucx_steps, window_steps) = self.ucx_counts();
        let layers = serving.layers.clone().unwrap_or(0..0);
        StageReply::Pong {
            nonce,
            generation: generation(),
            first_layer: layers.start as u32,
            end_layer: layers.end as u32,
            epoch: serving.epoch,
            loaded: serving.layers.is_some(),
            draining: *self.draining.borrow(),
            tensor_plane: self.plane.describe().to_string(),
            ucx_steps,
            window_steps,
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

    fn handle(&self, req: StageRequest) -> StageReply {
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match req {
            StageRequest::Ping { nonce } => self.pong(nonce),
            StageRequest::Drain | StageRequest::Release => self.leave(&req),
            StageRequest::Attach { .. } => StageReply::Error("Attach is handled by the serving loop".into()),
            StageRequest::Init { block_size, num_blocks, first_layer, end_layer, epoch } => {
                let geometry = KvGeometry { block_size: block_size as usize, num_blocks: num_blocks as usize };
                let layers = first_layer as usize..end_layer as usize;
                // Layers it holds already (the cache shape unchanged) stay, with their KV: a
                // planned change moves only the KV of layers that change hands, and after a
                // loss the head recomputes every sequence, overwriting what it reads.
                let reuse = guard.as_ref().is_some_and(|l| l.worker.holds(&layers, geometry));
                if let (true, Some(l)) = (reuse, guard.as_mut()) {
                    // The same layers, or fewer: kept in place with their KV.
                    if let Err(e) = l.worker.retain(layers.clone()) {
                        return StageReply::Error(e.to_string());
                    }
                    l.epoch = epoch;
                    l.worker.reset_samplers();
                } else {
                    // Free the old stage before the new one allocates.
                    *guard = None;
                    let loaded = CpuBackend::new(self.threads).and_then(|b| StageWorker::load(b, &self.model_dir, layers.clone(), geometry));
                    match loaded {
                        Ok(worker) => *guard = Some(Loaded { worker, epoch }),
                        Err(e) => {
                            *self.serving.lock().unwrap_or_else(|p| p.into_inner()) = Serving::default();
                            return StageReply::Error(e.to_string());
                        }
                    }
                }
                *self.serving.lock().unwrap_or_else(|p| p.into_inner()) = Serving { layers: Some(layers.clone()), epoch };
                tracing::info!(epoch, first = layers.start, end = layers.end, reused = reuse, "stage initialised");
                StageReply::Ready { first_layer, end_layer, epoch, kept: reuse }
            }
            StageRequest::ExportKv { epoch, first_layer, end_layer, blocks } => match guard.as_ref() {
                Some(l) if l.epoch == epoch => match l.worker.export_kv(first_layer as usize..end_layer as usize, &blocks) {
                    Ok(data) => StageReply::Kv { data },
                    Err(e) => StageReply::Error(e.to_string()),
                },
                _ => StageReply::Error(format!("no KV of plan epoch {epoch} here")),
            },
            StageRequest::ImportKv { epoch, first_layer, end_layer, blocks, data } => match guard.as_mut() {
                Some(l) if l.epoch == epoch => match l.worker.import_kv(first_layer as usize..end_layer as usize, &blocks, &data) {
                    Ok(()) => StageReply::Ack,
                    Err(e) => StageReply::Error(e.to_string()),
                },
                _ => StageReply::Error(format!("the stage is not initialised for plan epoch {epoch}")),
            },
            StageRequest::Step { epoch, chunks, input, new_sequences, released, ids } => {
                let Some(l) = guard.as_mut() else {
                    return StageReply::Error("the stage was not initialised".into());
                };
                if l.epoch != epoch {
                    return StageReply::Error(format!("a step of plan epoch {epoch} reached a stage initialised for epoch {}", l.epoch));
                }
                let layout = layout_from_wire(&chunks);
                let input = match &input {
                    WireInput::Tokens(t) => StageInput::Tokens(t),
                    WireInput::Hidden(h) => StageInput::Hidden(h),
                    WireInput::Window { .. } => return StageReply::Error("window input reached the stage unresolved".into()),
                };
                let starts: Vec<(SamplingParams, &WireNewSequence)> = new_sequences.iter().map(|s| (sampling_from_wire(&s.params), s)).collect();
                let starts = starts.into_iter().map(|(params, s)| SequenceStart { id: s.id, params, eos: &s.eos, prompt: &s.prompt, generated: &s.generated });
                let started = std::time::Instant::now();
                match l.worker.step(&layout, input, &ids, released, starts) {
                    Err(e) => StageReply::Error(e.to_string()),
                    Ok(StepResult::Hidden(hidden)) => StageReply::Hidden { hidden, compute_us: started.elapsed().as_micros() as u64 },
                    Ok(StepResult::Sampled(out)) => StageReply::Sampled {
                        tokens: out.iter().map(|(id, s, finish)| sampled_to_wire(*id, s, *finish)).collect(),
                        compute_us: started.elapsed().as_micros() as u64,
                    },
                }
            }
        }
    }
}

/// A non-head node's GPU-shard actor: owns the stage (through its service) and runs each
/// request on a blocking thread, one at a time, in the order they arrive.
pub struct StageShard;

pub enum StageShardMsg {
    Run(StageRequest, ractor::RpcReplyPort<StageReply>),
}

impl ractor::Actor for StageShard {
    type Msg = StageShardMsg;
    type State = Arc<StageService>;
    type Arguments = Arc<StageService>;

    async fn pre_start(&self, _myself: ractor::ActorRef<StageShardMsg>, svc: Arc<StageService>) -> Result<Arc<StageService>, ractor::ActorProcessingErr> {
        Ok(svc)
    }

    async fn handle(&self, _myself: ractor::ActorRef<StageShardMsg>, msg: StageShardMsg, svc: &mut Arc<StageService>) -> Result<(), ractor::ActorProcessingErr> {
        let StageShardMsg::Run(req, reply) = msg;
        let s = svc.clone();
        let out = match tokio::task::spawn_blocking(move || s.handle(req)).await {
            Ok(out) => out,
            Err(e) => {
                // A panic mid-step leaves the stage's KV half taken: drop it, so the head's
                // next Init loads afresh (and says so) rather than reusing a broken stage.
                *svc.state.lock().unwrap_or_else(|p| p.into_inner()) = None;
                *svc.serving.lock().unwrap_or_else(|p| p.into_inner()) = Serving::default();
                StageReply::Error(format!("stage worker: {e}"))
            }
        };
        let _ = reply.send(out);
        Ok(())
    }
}

/// One request through the shard actor.
async fn run(shard: &ractor::ActorRef<StageShardMsg>, req: StageRequest) -> StageReply {
    match ractor::call!(shard, StageShardMsg::Run, req) {
        Ok(reply) => reply,
        Err(e) => StageReply::Error(format!("the stage's shard actor: {e}")),
    }
}

/// Serves the stage to whichever cluster peer connects (the pipeline head), over the control
/// plane and, when it is on, UCX.
pub async fn serve(node: Arc<ControlNode>, svc: Arc<StageService>, gossip: Option<Arc<crate::gossip::Gossip>>) {
    let shard = match ractor::Actor::spawn(Some(format!("stage-shard-{}", node.name())), StageShard, svc.clone()).await {
        Ok((shard, _)) => shard,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the stage's shard actor");
            return;
        }
    };
    #[cfg(feature = "ucx")]
    if let Some(requests) = svc.plane.ucx().and_then(|u| u.take_requests()) {
        let shard = shard.clone();
        let pinger = svc.clone();
        tokio::spawn(crate::tensor_plane::ucx::serve_requests(requests, svc.ucx.clone(), move |req| {
            let (shard, pinger) = (shard.clone(), pinger.clone());
            async move {
                match req {
                    StageRequest::Ping { nonce } => pinger.pong(nonce),
                    StageRequest::Drain | StageRequest::Release => pinger.leave(&req),
                    req => run(&shard, req).await,
                }
            }
        }));
    }
    while let Some(link) = node.accept().await {
        let Ok(link) = link else { continue };
        if let Some(g) = &gossip {
            tokio::spawn(crate::gossip::serve_connection(g.clone(), link.clone()));
        }
        let (svc, shard) = (svc.clone(), shard.clone());
        tokio::spawn(async move {
            while let Ok((mut send, mut recv)) = link.connection.accept_bi().await {
                let req = match read_frame_limited(&mut recv, MAX_TENSOR_FRAME).await {
                    Ok(Some(body)) => decode::<StageRequest>(&body),
                    Ok(None) => continue,
                    Err(e) => Err(e),
                };
                let req = match req {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(peer = %link.peer, error = %e, "malformed stage frame; closing the connection");
                        link.connection.close(CLOSE_MALFORMED.into(), b"malformed frame");
                        break;
                    }
                };
                let reply = match req {
                    StageRequest::Attach { tensor_address, window_bytes } => svc.attach(&link.peer, tensor_address, window_bytes).await,
                    // Liveness probes and leave requests are answered here, never queued behind a step.
                    StageRequest::Ping { nonce } => svc.pong(nonce),
                    StageRequest::Drain | StageRequest::Release => svc.leave(&req),
                    req => run(&shard, req).await,
                };
                match encode(&reply) {
                    Ok(bytes) => {
                        let _ = write_frame(&mut send, &bytes).await;
                        let _ = send.finish();
                    }
                    Err(e) => tracing::error!(error = %e, "cannot encode a stage reply"),
                }
            }
        });
    }
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
