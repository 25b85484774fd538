//! The GPU-shard actor: owns one backend and one pipeline stage (the whole model, or on a
//! pipeline head the first layers of the mesh's current plan), runs forward passes on its own
//! OS thread so the async runtime never blocks, and samples on the last stage. A failure makes
//! the actor fail with a typed `ShardFailure`; its supervisor (the scheduler actor) re-queues
//! the running sequences when a stage was lost, errors them when the engine failed, and starts
//! a new shard.

use std::path::PathBuf;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use baton_engine::{
    Checkpoint, CpuBackend, FinishReason, KvGeometry, ModelConfig, Sampled, SamplerSet, SamplingParams, Stage, StageInput,
    StageOutput,
};
use baton_scheduler::{SeqId, Step};
use baton_mesh::membership::{ActivePlan, MeshDriver, MeshError};
use baton_mesh::stage_wire::{layout_to_wire, sampled_from_wire, sampling_to_wire, StageReply, StageRequest, WireInput, WireNewSequence};
use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::scheduler::SchedulerMsg;

/// A deliberate failure for supervision tests: the worker panics at its next step once this
/// file exists (the test decides when, so the failure hits the requests it means to).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectedFault {
    pub trigger: PathBuf,
}

/// The rest of a pipeline when this shard is its head: every (re)starting shard asks the mesh
/// for the plan to run (`MeshDriver::active`), runs layers `0..local_end` itself and sends each
/// step's hidden states down the remote stages in order; the last one samples.
pub struct PipelinePlan {
    /// Steps (micro-batches) in flight at once; `None`: one per stage (every stage can work).
    /// Fewer makes bigger batches, better when the stages share the same cores.
    pub micro_batches: Option<usize>,
    pub mesh: Arc<MeshDriver>,
    /// The async runtime the links live on (the shard's thread blocks on it).
    pub runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for PipelinePlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipelinePlan").field("epoch", &self.mesh.epoch()).finish()
    }
}

/// Why a shard stopped. The scheduler re-queues the running sequences when the mesh is at
/// fault (they continue on the next plan) and fails them when the engine is.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ShardFailure {
    /// A remote stage was lost or refused the step: the plan changes, nothing is lost.
    #[error("stage {stage}: {detail}")]
    Stage { stage: String, detail: String },
    /// The live nodes cannot hold the model.
    #[error("{0}")]
    Unservable(String),
    /// This shard's own engine failed (load error, engine error, panic).
    #[error("{0}")]
    Engine(String),
}

impl From<MeshError> for ShardFailure {
    fn from(e: MeshError) -> Self {
        match e {
            MeshError::Unservable { .. } => ShardFailure::Unservable(e.to_string()),
            MeshError::PeerLost { stage, detail } => ShardFailure::Stage { stage, detail },
        }
    }
}

/// What a shard that finished loading runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardLoaded {
    /// The plan's epoch (pipeline heads).
    pub epoch: Option<u64>,
    /// Stages of the pipeline, this one included.
    pub stages: usize,
}

/// What a shard needs to start.
#[derive(Clone)]
pub struct ShardArgs {
    pub model_dir: PathBuf,
    pub threads: usize,
    pub geometry: KvGeometry,
    pub scheduler: ActorRef<SchedulerMsg>,
    pub fault: Option<InjectedFault>,
    pub pipeline: Option<Arc<PipelinePlan>>,
}

/// A sequence the shard has not seen yet: how to sample it.
#[derive(Debug, Clone)]
pub struct NewSequence {
    pub id: SeqId,
    pub params: SamplingParams,
    pub prompt: Vec<u32>,
    pub eos: Vec<u32>,
    /// Tokens it produced before (a sequence re-queued after a plan change).
    pub generated: Vec<u32>,
}

/// One step's work.
#[derive(Debug, Clone)]
pub struct ShardWork {
    /// Steps are numbered in the order they are sent; results come back in the same order.
    pub number: u64,
    pub step: Step,
    pub new_sequences: Vec<NewSequence>,
    /// Sequences that ended: drop their sampling state.
    pub released: Vec<SeqId>,
}

/// One sampled token of a step.
#[derive(Debug, Clone)]
pub struct SampledOut {
    pub id: SeqId,
    pub sampled: Sampled,
    pub finish: Option<FinishReason>,
}

#[derive(Debug, Clone)]
pub struct StepOutput {
    pub number: u64,
    pub sampled: Vec<SampledOut>,
    pub forward_time: Duration,
    /// On a pipeline head: the time this step's remote stage calls took beyond the stages' own
    /// compute (tensor-plane transfers, decoding, hand-offs).
    pub transfer_time: Option<Duration>,
}

pub enum ShardMsg {
    Run(Box<ShardWork>),
    /// From the worker thread.
    Loaded(Result<ShardLoaded, ShardFailure>),
    Finished(Result<StepOutput, ShardFailure>),
}

pub struct Shard;

pub struct ShardState {
    work: mpsc::Sender<Box<ShardWork>>,
    scheduler: ActorRef<SchedulerMsg>,
}

impl Actor for Shard {
    type Msg = ShardMsg;
    type State = ShardState;
    type Arguments = ShardArgs;

    async fn pre_start(&self, myself: ActorRef<ShardMsg>, args: ShardArgs) -> Result<ShardState, ActorProcessingErr> {
        let (tx, rx) = mpsc::channel::<Box<ShardWork>>();
        let me = myself.clone();
        let scheduler = args.scheduler.clone();
        std::thread::Builder::new()
            .name("baton-shard".into())
            .spawn(move || worker(args, rx, me))?;
        Ok(ShardState { work: tx, scheduler })
    }

    async fn handle(&self, myself: ActorRef<ShardMsg>, msg: ShardMsg, state: &mut ShardState) -> Result<(), ActorProcessingErr> {
        match msg {
            ShardMsg::Run(work) => {
                if state.work.send(work).is_err() {
                    return Err("the shard's worker thread is gone".into());
                }
            }
            ShardMsg::Loaded(Ok(loaded)) => {
                state.scheduler.cast(SchedulerMsg::ShardReady(myself.get_id(), loaded))?;
            }
            ShardMsg::Loaded(Err(e)) => {
                tracing::warn!(error = %e, "shard failed to load its stage");
                return Err(Box::new(e));
            }
            ShardMsg::Finished(Ok(out)) => {
                state.scheduler.cast(SchedulerMsg::StepDone(out))?;
            }
            ShardMsg::Finished(Err(e)) => {
                tracing::warn!(error = %e, "shard step failed; restarting the shard");
                return Err(Box::new(e));
            }
        }
        Ok(())
    }
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

/// Loads this shard's stage: the whole model, or on a pipeline head the layers the mesh's
/// current plan gives it, after initialising every remote stage with its range and the epoch.
fn load(args: &ShardArgs) -> Result<(Stage<CpuBackend>, Option<ActivePlan>), ShardFailure> {
    let engine = |e: baton_engine::EngineError| ShardFailure::Engine(e.to_string());
    let config = ModelConfig::from_dir(&args.model_dir).map_err(engine)?;
    let active = match &args.pipeline {
        Some(p) => Some(p.runtime.block_on(p.mesh.active())?),
        None => None,
    };
    if let (Some(p), Some(active)) = (&args.pipeline, &active) {
        for (link, range) in &active.remotes {
            let init = StageRequest::Init {
                block_size: args.geometry.block_size as u32,
                num_blocks: args.geometry.num_blocks as u32,
                first_layer: range.start as u32,
                end_layer: range.end as u32,
                epoch: active.epoch,
            };
            let lost = |detail: String| {
                p.mesh.report_lost(link.peer(), active.epoch);
                ShardFailure::Stage { stage: link.peer().to_string(), detail }
            };
            match p.runtime.block_on(link.call(init)) {
                Ok(StageReply::Ready { first_layer, end_layer, epoch })
                    if first_layer as usize == range.start && end_layer as usize == range.end && epoch == active.epoch => {}
                Ok(StageReply::Error(e)) => return Err(ShardFailure::Stage { stage: link.peer().to_string(), detail: e }),
                Ok(other) => return Err(ShardFailure::Stage { stage: link.peer().to_string(), detail: format!("answered Init with {other:?}") }),
                Err(e) => return Err(lost(e.to_string())),
            }
        }
        p.mesh.initialised(active.epoch);
    }
    let ckpt = Checkpoint::open(&args.model_dir).map_err(engine)?;
    let backend = CpuBackend::new(args.threads).map_err(engine)?;
    let end = active.as_ref().map_or(config.num_layers, |a| a.local_end);
    let stage = Stage::load(backend, &config, &ckpt, 0..end, args.geometry, &mut |_, _| {}).map_err(engine)?;
    Ok((stage, active))
}

/// The shard's thread: loads the stage, then runs steps until the actor goes away.
fn worker(args: ShardArgs, rx: mpsc::Receiver<Box<ShardWork>>, me: ActorRef<ShardMsg>) {
    let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| load(&args)))
        .map_err(|p| ShardFailure::Engine(panic_message(p)))
        .and_then(|r| r);
    let (mut stage, active) = match loaded {
        Ok(s) => s,
        Err(e) => {
            let _ = me.cast(ShardMsg::Loaded(Err(e)));
            return;
        }
    };
    let info = ShardLoaded { epoch: active.as_ref().map(|a| a.epoch), stages: 1 + active.as_ref().map_or(0, |a| a.remotes.len()) };
    let mut samplers = SamplerSet::default();
    let chain = match (&args.pipeline, active) {
        (Some(p), Some(active)) if !active.remotes.is_empty() => Some(start_chain(p, active, me.clone())),
        _ => None,
    };
    let _ = me.cast(ShardMsg::Loaded(Ok(info)));
    let mut steps = 0;
    while let Ok(work) = rx.recv() {
        steps += 1;
        let fault = args.fault.as_ref().is_some_and(|f| f.trigger.exists());
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if fault {
                panic!("injected fault at step {steps}");
            }
            match &chain {
                None => run_step(&mut stage, &mut samplers, &work).map(Some),
                // The remote stages answer later, through the chain.
                Some(chain) => run_head_stage(&mut stage, chain, &work).map(|()| None),
            }
        }))
        .map_err(|p| ShardFailure::Engine(panic_message(p)))
        .and_then(|r| r);
        let (failed, message) = match result {
            Ok(None) => continue,
            Ok(Some(out)) => (false, ShardMsg::Finished(Ok(out))),
            Err(e) => (true, ShardMsg::Finished(Err(e))),
        };
        if me.cast(message).is_err() || failed {
            return;
        }
    }
}

fn run_step(stage: &mut Stage<CpuBackend>, samplers: &mut SamplerSet, work: &ShardWork) -> Result<StepOutput, ShardFailure> {
    let engine = |e: baton_engine::EngineError| ShardFailure::Engine(e.to_string());
    samplers.release(work.released.iter().copied());
    for s in &work.new_sequences {
        samplers.resume(s.id, s.params.clone(), &s.eos, &s.prompt, &s.generated);
    }
    let start = Instant::now();
    let tokens = work.step.tokens();
    let out = stage.forward(&work.step.layout, StageInput::Tokens(&tokens)).map_err(engine)?;
    let forward_time = start.elapsed();
    let StageOutput::Logits { vocab, data, .. } = out else {
        return Err(ShardFailure::Engine("the stage did not produce logits".into()));
    };
    let sampling = work.step.scheduled.iter().filter(|s| s.samples).map(|s| s.id);
    let sampled = samplers
        .sample(sampling, &data, vocab)
        .map_err(engine)?
        .into_iter()
        .map(|(id, sampled, finish)| SampledOut { id, sampled, finish })
        .collect();
    Ok(StepOutput { number: work.number, sampled, forward_time, transfer_time: None })
}

/// One step on its way down the pipeline.
struct ChainItem {
    number: u64,
    chunks: Vec<baton_mesh::stage_wire::WireChunk>,
    ids: Vec<u64>,
    hidden: Vec<f32>,
    new_sequences: Vec<WireNewSequence>,
    released: Vec<u64>,
    started: Instant,
    /// Wall time of the remote calls so far, and the stages' own compute within it.
    remote_wall: Duration,
    remote_compute: Duration,
}

/// The remote stages as a chain of in-order workers, one per link, so each stage can work on a
/// different step (micro-batch) at the same time.
struct Chain {
    first: tokio::sync::mpsc::UnboundedSender<ChainItem>,
    workers: Vec<tokio::task::AbortHandle>,
}

/// A shard that stops (fails or is replaced) stops its link workers too: steps queued for the
/// old shard must not reach the stages after the new shard has re-initialised them.
impl Drop for Chain {
    fn drop(&mut self) {
        for w in &self.workers {
            w.abort();
        }
    }
}

fn start_chain(plan: &PipelinePlan, active: ActivePlan, me: ActorRef<ShardMsg>) -> Chain {
    let n = active.remotes.len();
    let epoch = active.epoch;
    let mut next: Option<tokio::sync::mpsc::UnboundedSender<ChainItem>> = None;
    let mut workers = Vec::with_capacity(n);
    for (i, (link, _)) in active.remotes.into_iter().enumerate().rev() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<ChainItem>();
        let last = i + 1 == n;
        let forward_to = next.take();
        let me = me.clone();
        let mesh = plan.mesh.clone();
        let worker = plan.runtime.spawn(async move {
            let stage = link.peer().to_string();
            let failed = |detail: String| ShardFailure::Stage { stage: stage.clone(), detail };
            while let Some(mut item) = rx.recv().await {
                let req = StageRequest::Step {
                    epoch,
                    chunks: item.chunks.clone(),
                    input: WireInput::Hidden(std::mem::take(&mut item.hidden)),
                    new_sequences: if last { std::mem::take(&mut item.new_sequences) } else { Vec::new() },
                    released: if last { std::mem::take(&mut item.released) } else { Vec::new() },
                    ids: item.ids.clone(),
                };
                let called = Instant::now();
                let reply = link.call(req).await;
                item.remote_wall += called.elapsed();
                let outcome = match reply {
                    Ok(StageReply::Hidden { hidden, compute_us }) if !last => match &forward_to {
                        Some(next) => {
                            item.remote_compute += Duration::from_micros(compute_us);
                            item.hidden = hidden;
                            if next.send(item).is_err() {
                                return;
                            }
                            continue;
                        }
                        None => Err(failed("the pipeline chain is broken".to_string())),
                    },
                    Ok(StageReply::Sampled { tokens, compute_us }) if last => Ok(StepOutput {
                        number: item.number,
                        transfer_time: Some(item.remote_wall.saturating_sub(item.remote_compute + Duration::from_micros(compute_us))),
                        sampled: tokens
                            .into_iter()
                            .map(|w| {
                                let (id, sampled, finish) = sampled_from_wire(w);
                                SampledOut { id, sampled, finish }
                            })
                            .collect(),
                        forward_time: item.started.elapsed(),
                    }),
                    Ok(StageReply::Error(e)) => Err(failed(e)),
                    Ok(other) => Err(failed(format!("answered out of turn: {other:?}"))),
                    Err(e) => {
                        // The link itself broke: the stage is lost, decided now.
                        mesh.report_lost(&stage, epoch);
                        Err(failed(e.to_string()))
                    }
                };
                let failed = outcome.is_err();
                if me.cast(ShardMsg::Finished(outcome)).is_err() || failed {
                    return;
                }
            }
        });
        workers.push(worker.abort_handle());
        next = Some(tx);
    }
    let (fallback, _) = tokio::sync::mpsc::unbounded_channel();
    Chain { first: next.unwrap_or(fallback), workers }
}

/// The head's share of a pipeline step: its layers here, then the step goes down the chain.
fn run_head_stage(stage: &mut Stage<CpuBackend>, chain: &Chain, work: &ShardWork) -> Result<(), ShardFailure> {
    let started = Instant::now();
    let tokens = work.step.tokens();
    let hidden = match stage.forward(&work.step.layout, StageInput::Tokens(&tokens)).map_err(|e| ShardFailure::Engine(e.to_string()))? {
        StageOutput::Hidden(h) => h,
        StageOutput::Logits { .. } => return Err(ShardFailure::Engine("the head stage unexpectedly ends the model".into())),
    };
    let item = ChainItem {
        number: work.number,
        chunks: layout_to_wire(&work.step.layout),
        ids: work.step.scheduled.iter().map(|s| s.id).collect(),
        hidden,
        new_sequences: work
            .new_sequences
            .iter()
            .map(|s| WireNewSequence {
                id: s.id,
                params: sampling_to_wire(&s.params),
                prompt: s.prompt.clone(),
                eos: s.eos.clone(),
                generated: s.generated.clone(),
            })
            .collect(),
        released: work.released.clone(),
        started,
        remote_wall: Duration::ZERO,
        remote_compute: Duration::ZERO,
    };
    chain.first.send(item).map_err(|_| ShardFailure::Stage { stage: "the chain".into(), detail: "the pipeline's stage links are gone".into() })
}
