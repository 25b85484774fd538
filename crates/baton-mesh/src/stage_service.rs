//! A pipeline stage served to the head: agrees on the tensor plane (`Attach`, over the control
//! plane), loads its layer range when the head says how large the KV cache is, then runs each
//! step it is sent, over UCX or QUIC (the last stage also samples), and answers with hidden
//! states or sampled tokens. The stage belongs to this node's GPU-shard actor (`StageShard`),
//! which runs the requests one at a time in arrival order, each on a blocking thread.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use baton_engine::{Checkpoint, CpuBackend, KvGeometry, ModelConfig, SamplerSet, Stage, StageInput, StageOutput};
use baton_proto::{decode, encode, read_frame_limited, write_frame, CLOSE_MALFORMED, MAX_TENSOR_FRAME};

use crate::control::{ControlError, ControlNode, PeerLink};
use crate::stage_wire::{layout_from_wire, sampled_to_wire, sampling_from_wire, StageReply, StageRequest, WireInput};
use crate::tensor_plane::TensorPlane;

/// One node's stage, loaded on the head's `Init`.
pub struct StageService {
    pub model_dir: PathBuf,
    pub layers: Range<usize>,
    pub threads: usize,
    plane: Arc<TensorPlane>,
    #[cfg(feature = "ucx")]
    ucx: Arc<crate::tensor_plane::ucx::StageUcx>,
    state: Mutex<Option<Loaded>>,
}

struct Loaded {
    stage: Stage<CpuBackend>,
    samplers: SamplerSet,
}

impl StageService {
    pub fn new(model_dir: PathBuf, layers: Range<usize>, threads: usize, plane: Arc<TensorPlane>) -> Self {
        StageService {
            model_dir,
            layers,
            threads,
            plane,
            #[cfg(feature = "ucx")]
            ucx: Arc::default(),
            state: Mutex::new(None),
        }
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

    fn handle(&self, req: StageRequest) -> StageReply {
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match req {
            StageRequest::Ping { nonce } => {
                let (ucx_steps, window_steps) = self.ucx_counts();
                StageReply::Pong {
                    nonce,
                    first_layer: self.layers.start as u32,
                    end_layer: self.layers.end as u32,
                    loaded: guard.is_some(),
                    tensor_plane: self.plane.describe().to_string(),
                    ucx_steps,
                    window_steps,
                }
            }
            StageRequest::Attach { .. } => StageReply::Error("Attach is handled by the serving loop".into()),
            StageRequest::Init { block_size, num_blocks } => {
                let geometry = KvGeometry { block_size: block_size as usize, num_blocks: num_blocks as usize };
                let loaded = (|| -> Result<Loaded, String> {
                    let config = ModelConfig::from_dir(&self.model_dir).map_err(|e| e.to_string())?;
                    let ckpt = Checkpoint::open(&self.model_dir).map_err(|e| e.to_string())?;
                    let backend = CpuBackend::new(self.threads).map_err(|e| e.to_string())?;
                    let stage = Stage::load(backend, &config, &ckpt, self.layers.clone(), geometry, &mut |_, _| {}).map_err(|e| e.to_string())?;
                    Ok(Loaded { stage, samplers: SamplerSet::default() })
                })();
                match loaded {
                    Ok(l) => {
                        *guard = Some(l);
                        StageReply::Ready { first_layer: self.layers.start as u32, end_layer: self.layers.end as u32 }
                    }
                    Err(e) => StageReply::Error(e),
                }
            }
            StageRequest::Step { chunks, input, new_sequences, released, ids } => {
                let Some(l) = guard.as_mut() else {
                    return StageReply::Error("the stage was not initialised".into());
                };
                l.samplers.release(released);
                for s in new_sequences {
                    l.samplers.add(s.id, sampling_from_wire(&s.params), &s.eos, &s.prompt);
                }
                let layout = layout_from_wire(&chunks);
                let input = match &input {
                    WireInput::Tokens(t) => StageInput::Tokens(t),
                    WireInput::Hidden(h) => StageInput::Hidden(h),
                    WireInput::Window { .. } => return StageReply::Error("window input reached the stage unresolved".into()),
                };
                let started = std::time::Instant::now();
                let compute_us = || started.elapsed().as_micros() as u64;
                match l.stage.forward(&layout, input) {
                    Err(e) => StageReply::Error(e.to_string()),
                    Ok(StageOutput::Hidden(hidden)) => StageReply::Hidden { hidden, compute_us: compute_us() },
                    Ok(StageOutput::Logits { vocab, data, .. }) => {
                        let sampling = chunks.iter().zip(&ids).filter(|(c, _)| c.wants_logits).map(|(_, &id)| id);
                        match l.samplers.sample(sampling, &data, vocab) {
                            Ok(out) => StageReply::Sampled {
                                tokens: out.iter().map(|(id, s, finish)| sampled_to_wire(*id, s, *finish)).collect(),
                                compute_us: compute_us(),
                            },
                            Err(e) => StageReply::Error(e.to_string()),
                        }
                    }
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
        let out = tokio::task::spawn_blocking(move || s.handle(req)).await.unwrap_or_else(|e| StageReply::Error(format!("stage worker: {e}")));
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
pub async fn serve(node: Arc<ControlNode>, svc: Arc<StageService>) {
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
        tokio::spawn(crate::tensor_plane::ucx::serve_requests(requests, svc.ucx.clone(), move |req| {
            let shard = shard.clone();
            async move { run(&shard, req).await }
        }));
    }
    while let Some(link) = node.accept().await {
        let Ok(link) = link else { continue };
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
