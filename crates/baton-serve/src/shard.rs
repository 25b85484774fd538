//! The pipeline driver: runs the scheduler's steps through this node's GPU-shard actor
//! (baton-shard's, the same one every stage node runs: the whole model, or on a pipeline head
//! the first layers of the mesh's current plan) and, on a pipeline head, on down the remote
//! stages, several steps in flight at once; the last stage samples. It lives for one plan: a
//! failure makes it fail with a typed `ShardFailure`, and its supervisor (the scheduler actor)
//! re-queues the running sequences when a stage was lost, errors them when the engine failed,
//! and starts a driver for the next plan. The GPU shard outlives drivers, so a plan that
//! leaves the head its layers reloads nothing.

use std::path::PathBuf;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use baton_engine::{FinishReason, KvGeometry, ModelConfig, Sampled, StepResult};
use baton_shard::{panic_message, Input, ShardError, ShardHandle, StepRequest};
use baton_scheduler::{SeqId, Step};
use baton_mesh::membership::{ActivePlan, MeshDriver, MeshError};
use baton_mesh::stage_wire::{layout_to_wire, sampled_from_wire, sampling_to_wire, StageReply, StageRequest, WireHop, WireInput, WireNewSequence, BROKEN_ERROR, BROKEN_LOST};
use baton_mesh::tensor_plane::StageLink;
use ractor::{Actor, ActorProcessingErr, ActorRef};

pub use baton_shard::NewSequence;

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
    pub stage_links: StageLinks,
}

/// How a pipeline head's steps reach its remote stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StageLinks {
    /// Down the chain: each stage sends the step on to the next over its own QUIC link, and
    /// only the sampled tokens come back (when the head's links are QUIC and there are two
    /// remote stages or more; UCX links relay).
    #[default]
    Chain,
    /// Through the head: each stage's hidden states come back to the head, which sends them
    /// to the next stage.
    Relay,
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardLoaded {
    /// The plan's epoch (pipeline heads).
    pub epoch: Option<u64>,
    /// Stages of the pipeline, this one included.
    pub stages: usize,
    /// The plan's stages (the head first), on a pipeline head.
    pub plan: Vec<(String, std::ops::Range<usize>)>,
    /// Running sequences went on with their KV moved (a planned change), not recomputed.
    pub migrated: bool,
}

/// What a planned plan change (a join or a drain: every stage of the old plan still alive)
/// carries to the next driver, so no running sequence is recomputed: the plan the stages run
/// now and the KV blocks of every running sequence.
#[derive(Debug, Clone)]
pub struct Migration {
    pub from: Vec<(String, std::ops::Range<usize>)>,
    pub from_epoch: u64,
    /// The plan it moves to; if the mesh has moved on since, the driver recomputes instead.
    pub to_epoch: u64,
    pub blocks: Vec<u32>,
}

/// Where the scheduler leaves a migration for the shard it starts next.
pub type MigrationSlot = Arc<std::sync::Mutex<Option<Migration>>>;

/// What a shard needs to start.
#[derive(Clone)]
pub struct ShardArgs {
    pub model_dir: PathBuf,
    /// This node's GPU-shard actor.
    pub device: ShardHandle,
    pub geometry: KvGeometry,
    pub scheduler: ActorRef<SchedulerMsg>,
    pub fault: Option<InjectedFault>,
    pub pipeline: Option<Arc<PipelinePlan>>,
    pub migration: MigrationSlot,
    /// Set when the shard is stopped: a loading thread makes no further call to the stages
    /// (a newer shard may be initialising them).
    pub stopped: Arc<std::sync::atomic::AtomicBool>,
    /// The async runtime the GPU shard and the links live on (the driver's thread blocks on it).
    pub runtime: tokio::runtime::Handle,
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
    /// From the driver's thread.
    Loaded(Result<ShardLoaded, ShardFailure>),
    Finished(Result<StepOutput, ShardFailure>),
}

pub struct Shard;

pub struct ShardState {
    stopped: Arc<std::sync::atomic::AtomicBool>,
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
        let stopped = args.stopped.clone();
        std::thread::Builder::new()
            .name("baton-shard".into())
            .spawn(move || worker(args, rx, me))?;
        Ok(ShardState { stopped, work: tx, scheduler })
    }

    async fn post_stop(&self, _myself: ActorRef<ShardMsg>, state: &mut ShardState) -> Result<(), ActorProcessingErr> {
        state.stopped.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
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
                // post_stop does not run for a failed actor: its thread must stop here.
                state.stopped.store(true, std::sync::atomic::Ordering::SeqCst);
                return Err(Box::new(e));
            }
            ShardMsg::Finished(Ok(out)) => {
                state.scheduler.cast(SchedulerMsg::StepDone(out))?;
            }
            ShardMsg::Finished(Err(e)) => {
                tracing::warn!(error = %e, "shard step failed; restarting the shard");
                // No queued step of this driver may reach the GPU shard the next one loads.
                state.stopped.store(true, std::sync::atomic::Ordering::SeqCst);
                return Err(Box::new(e));
            }
        }
        Ok(())
    }
}

/// This node's own device failed, or (a stage loaded for another epoch, or not at all) a
/// newer driver has it: only the first fails the running requests; the others re-queue them.
fn device_failure(e: ShardError) -> ShardFailure {
    match e {
        ShardError::WrongEpoch { .. } | ShardError::NotLoaded => ShardFailure::Stage { stage: "this node".into(), detail: e.to_string() },
        e => ShardFailure::Engine(e.to_string()),
    }
}

/// Loads this driver's stage on the GPU shard: the whole model, or on a pipeline head the
/// layers the mesh's current plan gives it, after initialising every remote stage with its
/// range and the epoch. With a migration (a planned change) the KV of every layer whose owner
/// reloads is moved from its old owner first, so the running sequences go on where they were;
/// any failure on that path is a `Stage` failure, which makes the scheduler recompute them
/// instead. Returns the plan (pipeline heads) and whether the KV was moved.
fn load(args: &ShardArgs) -> Result<(Option<ActivePlan>, bool), ShardFailure> {
    let rt = &args.runtime;
    let config = ModelConfig::from_dir(&args.model_dir).map_err(|e| ShardFailure::Engine(e.to_string()))?;
    let migration = args.migration.lock().unwrap_or_else(|p| p.into_inner()).take();
    let Some(p) = &args.pipeline else {
        rt.block_on(args.device.load(0..config.num_layers, args.geometry, 0)).map_err(device_failure)?;
        return Ok((None, false));
    };
    let active = rt.block_on(p.mesh.active())?;
    let head = 0..active.local_end;
    let Some(m) = migration else {
        init_remotes(p, args, &active)?;
        check_stopped(args)?;
        rt.block_on(args.device.load(head, args.geometry, active.epoch)).map_err(device_failure)?;
        return Ok((Some(active), false));
    };
    let moving = |detail: String| ShardFailure::Stage { stage: "-".into(), detail: format!("moving the KV: {detail}") };
    if active.epoch != m.to_epoch {
        return Err(moving(format!("the plan moved on to epoch {} (the move was for {})", active.epoch, m.to_epoch)));
    }
    let started = Instant::now();
    let keeps_head = rt.block_on(args.device.holds(head.clone(), args.geometry));
    let per_block = 2 * args.geometry.block_size * config.kv_dim() * 4;
    let (moved, keeping) = export_moving_kv(p, args, &m, &active, keeps_head, per_block)?;
    let exported = started.elapsed();
    let kept = init_remotes(p, args, &active)?;
    // A stage that was to keep its KV must have: a restarted process loads afresh.
    if let Some(lost) = keeping.iter().find(|n| !kept.contains(n)) {
        return Err(ShardFailure::Stage { stage: lost.clone(), detail: "it was to keep its KV but loaded afresh".into() });
    }
    let initialised = started.elapsed();
    check_stopped(args)?;
    let loaded = rt.block_on(args.device.load(head, args.geometry, active.epoch)).map_err(device_failure)?;
    if keeps_head && !loaded.kept {
        return Err(moving("the head's own layers were loaded afresh".into()));
    }
    let messages = moved.len();
    let mb = moved.iter().map(|m| m.3.len() * 4).sum::<usize>() as f64 / 1e6;
    let import = Instant::now();
    import_moved_kv(args, &active, moved)?;
    eprintln!(
        "baton: plan epoch {}: KV moved ({mb:.1} MB in {messages} message(s)) read in {} ms; stages initialised in {} ms; KV written in {} ms",
        active.epoch,
        exported.as_millis(),
        (initialised - exported).as_millis(),
        import.elapsed().as_millis()
    );
    Ok((Some(active), true))
}

/// The `Init` that gives a stage `range` under plan `epoch`, with the head's KV cache shape.
fn init_request(head: &str, geometry: KvGeometry, range: &std::ops::Range<usize>, epoch: u64) -> StageRequest {
    StageRequest::Init {
        head: head.to_string(),
        block_size: geometry.block_size as u32,
        num_blocks: geometry.num_blocks as u32,
        first_layer: range.start as u32,
        end_layer: range.end as u32,
        epoch,
    }
}

/// Add before drop: before a planned change is carried out, the nodes the new plan (`epoch`)
/// takes in that the running plan (`running`) does not use load their layers, while the
/// running plan goes on serving; the switch then finds them ready (their `Init` keeps what
/// they loaded). Returns the nodes that loaded.
pub async fn preload(mesh: &MeshDriver, epoch: u64, running: &[(String, std::ops::Range<usize>)], geometry: KvGeometry) -> Result<Vec<String>, String> {
    let active = mesh.active().await.map_err(|e| e.to_string())?;
    if active.epoch != epoch {
        return Err(format!("the plan moved on to epoch {}", active.epoch));
    }
    // A JoinSet: when the caller's task is aborted (the plan moved on) the calls go with it.
    let mut calls = tokio::task::JoinSet::new();
    for (link, range) in active.remotes.iter().filter(|(link, _)| !running.iter().any(|(n, _)| n == link.peer())) {
        let init = init_request(mesh.name(), geometry, range, epoch);
        let (link, range) = (link.clone(), range.clone());
        calls.spawn(async move { (link.peer().to_string(), range, link.call(init).await) });
    }
    let mut loaded = Vec::new();
    while let Some(call) = calls.join_next().await {
        let (peer, range, answer) = call.map_err(|e| e.to_string())?;
        match answer {
            Ok(StageReply::Ready { first_layer, end_layer, epoch: e, .. }) if first_layer as usize == range.start && end_layer as usize == range.end && e == epoch => loaded.push(peer),
            other => return Err(format!("{peer} answered the early Init with {other:?}")),
        }
    }
    Ok(loaded)
}

/// A replaced shard's loading thread stops before its next call to a stage.
fn check_stopped(args: &ShardArgs) -> Result<(), ShardFailure> {
    if args.stopped.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(ShardFailure::Stage { stage: "-".into(), detail: "the shard was replaced while loading".into() });
    }
    Ok(())
}

/// At most this many bytes of KV per ExportKv/ImportKv message (well under MAX_TENSOR_FRAME).
const KV_MESSAGE_BYTES: usize = 64 << 20;

/// Some layers' KV, for some blocks, on their way to a new owner: (owner, layers, blocks, data).
type KvMove = (String, std::ops::Range<usize>, Vec<u32>, Vec<f32>);

/// Reads, from the stages of the old plan (before any is re-initialised), the KV of every layer
/// whose new owner will load it afresh, in messages of at most [`KV_MESSAGE_BYTES`]; the head's
/// old worker answers for its own layers. Also returns the remote stages expected to keep their
/// KV in place (given layers they hold).
fn export_moving_kv(p: &PipelinePlan, args: &ShardArgs, m: &Migration, active: &ActivePlan, keeps_head: bool, per_block: usize) -> Result<(Vec<KvMove>, Vec<String>), ShardFailure> {
    let me = p.mesh.name().to_string();
    let failed = |stage: &str, detail: String| ShardFailure::Stage { stage: stage.to_string(), detail };
    let old_range = |n: &str| m.from.iter().find(|(o, _)| o == n).map(|(_, r)| r.clone());
    let new: Vec<(String, std::ops::Range<usize>)> =
        std::iter::once((me.clone(), 0..active.local_end)).chain(active.remotes.iter().map(|(l, r)| (l.peer().to_string(), r.clone()))).collect();
    let mut out = Vec::new();
    let mut keeping = Vec::new();
    for (dest, range) in &new {
        // A stage given layers it has (the same range, or fewer) keeps them with their KV (its
        // Init retains them, and says so).
        let keeps = if *dest == me { keeps_head } else { old_range(dest).is_some_and(|o| range.start >= o.start && range.end <= o.end) };
        if keeps {
            if *dest != me {
                keeping.push(dest.clone());
            }
            continue;
        }
        // One run of layers per old owner, its blocks in chunks that keep each message small.
        let mut layer = range.start;
        while layer < range.end {
            let Some((src, held)) = m.from.iter().find(|(_, r)| r.contains(&layer)).cloned() else {
                return Err(failed(dest, format!("no stage of the old plan held layer {layer}")));
            };
            let run = layer..held.end.min(range.end);
            let chunk = (KV_MESSAGE_BYTES / (per_block * run.len()).max(1)).max(1);
            for blocks in m.blocks.chunks(chunk) {
                check_stopped(args)?;
                let data = if src == me {
                    args.runtime.block_on(args.device.export_kv(m.from_epoch, run.clone(), blocks.to_vec())).map_err(|e| failed(&src, e.to_string()))?
                } else {
                    let link = args.runtime.block_on(p.mesh.link(&src))?;
                    let req = StageRequest::ExportKv { epoch: m.from_epoch, first_layer: run.start as u32, end_layer: run.end as u32, blocks: blocks.to_vec() };
                    match args.runtime.block_on(link.call(req)) {
                        Ok(StageReply::Kv { data }) => data,
                        other => return Err(failed(&src, format!("exporting the KV of layers {}..{}: {other:?}", run.start, run.end))),
                    }
                };
                out.push((dest.clone(), run.clone(), blocks.to_vec(), data));
            }
            layer = run.end;
        }
    }
    Ok((out, keeping))
}

/// Writes the moved KV at the new owners (the head's own GPU shard, or remote stages).
fn import_moved_kv(args: &ShardArgs, active: &ActivePlan, moved: Vec<KvMove>) -> Result<(), ShardFailure> {
    for (dest, layers, blocks, data) in moved {
        check_stopped(args)?;
        match active.remotes.iter().find(|(l, _)| l.peer() == dest) {
            None => args
                .runtime
                .block_on(args.device.import_kv(active.epoch, layers, blocks, data))
                .map_err(|e| ShardFailure::Stage { stage: dest, detail: format!("importing the KV: {e}") })?,
            Some((link, _)) => {
                let req = StageRequest::ImportKv { epoch: active.epoch, first_layer: layers.start as u32, end_layer: layers.end as u32, blocks, data };
                match args.runtime.block_on(link.call(req)) {
                    Ok(StageReply::Ack) => {}
                    other => return Err(ShardFailure::Stage { stage: dest, detail: format!("importing the KV of layers {}..{}: {other:?}", layers.start, layers.end) }),
                }
            }
        }
    }
    Ok(())
}

/// Initialises every remote stage of `active` with its range and the epoch (all at once),
/// checks what each answers, and returns the stages that kept their layers in place.
fn init_remotes(p: &PipelinePlan, args: &ShardArgs, active: &ActivePlan) -> Result<Vec<String>, ShardFailure> {
    check_stopped(args)?;
    let calls: Vec<_> = active
        .remotes
        .iter()
        .map(|(link, range)| {
            let init = init_request(p.mesh.name(), args.geometry, range, active.epoch);
            let link = link.clone();
            args.runtime.spawn(async move { link.call(init).await })
        })
        .collect();
    let mut kept_in_place = Vec::new();
    for ((link, range), call) in active.remotes.iter().zip(calls) {
        let answer = args.runtime.block_on(call).map_err(|e| ShardFailure::Stage { stage: link.peer().to_string(), detail: e.to_string() })?;
        match answer {
            Ok(StageReply::Ready { first_layer, end_layer, epoch, kept })
                if first_layer as usize == range.start && end_layer as usize == range.end && epoch == active.epoch =>
            {
                if kept {
                    kept_in_place.push(link.peer().to_string());
                }
            }
            Ok(StageReply::Error(e)) => {
                // Its engine could not load the range: lost if that keeps happening.
                p.mesh.report_error(link.peer(), active.epoch);
                return Err(ShardFailure::Stage { stage: link.peer().to_string(), detail: e });
            }
            Ok(StageReply::Refused(e)) => return Err(ShardFailure::Stage { stage: link.peer().to_string(), detail: e }),
            Ok(other) => return Err(ShardFailure::Stage { stage: link.peer().to_string(), detail: format!("answered Init with {other:?}") }),
            Err(e) => {
                p.mesh.report_lost(link.peer(), active.epoch);
                return Err(ShardFailure::Stage { stage: link.peer().to_string(), detail: e.to_string() });
            }
        }
    }
    p.mesh.initialised(active.epoch);
    Ok(kept_in_place)
}

/// The driver's thread: loads the stage, then runs steps until the actor goes away.
fn worker(args: ShardArgs, rx: mpsc::Receiver<Box<ShardWork>>, me: ActorRef<ShardMsg>) {
    let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| load(&args)))
        .map_err(|p| ShardFailure::Engine(panic_message(p)))
        .and_then(|r| r);
    let (active, migrated) = match loaded {
        Ok(s) => s,
        Err(e) => {
            let _ = me.cast(ShardMsg::Loaded(Err(e)));
            return;
        }
    };
    let epoch = active.as_ref().map_or(0, |a| a.epoch);
    let plan = active.as_ref().map_or_else(Vec::new, |a| {
        let head = args.pipeline.as_ref().map_or_else(String::new, |p| p.mesh.name().to_string());
        std::iter::once((head, 0..a.local_end)).chain(a.remotes.iter().map(|(l, r)| (l.peer().to_string(), r.clone()))).collect()
    });
    let info = ShardLoaded { epoch: active.as_ref().map(|a| a.epoch), stages: 1 + active.as_ref().map_or(0, |a| a.remotes.len()), plan, migrated };
    let chain = match (&args.pipeline, active) {
        (Some(p), Some(active)) if !active.remotes.is_empty() => Some(start_chain(p, &args.runtime, active, me.clone())),
        _ => None,
    };
    let _ = me.cast(ShardMsg::Loaded(Ok(info)));
    let mut steps = 0;
    while let Ok(work) = rx.recv() {
        // A replaced driver sends nothing more to the GPU shard or the stages.
        if args.stopped.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        steps += 1;
        let fault = args.fault.as_ref().is_some_and(|f| f.trigger.exists());
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if fault {
                panic!("injected fault at step {steps}");
            }
            match &chain {
                None => run_step(&args, epoch, *work).map(Some),
                // The remote stages answer later, through the chain.
                Some(chain) => run_head_stage(&args, epoch, chain, *work).map(|()| None),
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

/// The step's own layers on this node's GPU shard (sampling too when they end the model).
/// The step's layout moves to the shard (the scheduler keeps its own copy of the step).
fn device_step(args: &ShardArgs, epoch: u64, work: &mut ShardWork, sample: bool) -> Result<baton_shard::StepDone, ShardFailure> {
    let (input, ids) = (Input::Tokens(work.step.tokens()), work.step.scheduled.iter().map(|s| s.id).collect());
    let req = StepRequest {
        epoch,
        layout: baton_engine::BatchLayout { chunks: std::mem::take(&mut work.step.layout.chunks) },
        input,
        ids,
        released: if sample { std::mem::take(&mut work.released) } else { Vec::new() },
        starts: if sample { std::mem::take(&mut work.new_sequences) } else { Vec::new() },
    };
    args.runtime.block_on(args.device.step(req)).map_err(device_failure)
}

fn run_step(args: &ShardArgs, epoch: u64, mut work: ShardWork) -> Result<StepOutput, ShardFailure> {
    let start = Instant::now();
    let StepResult::Sampled(sampled) = device_step(args, epoch, &mut work, true)?.result else {
        return Err(ShardFailure::Engine("the stage did not produce logits".into()));
    };
    let sampled = sampled.into_iter().map(|(id, sampled, finish)| SampledOut { id, sampled, finish }).collect();
    Ok(StepOutput { number: work.number, sampled, forward_time: start.elapsed(), transfer_time: None })
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

fn start_chain(plan: &PipelinePlan, runtime: &tokio::runtime::Handle, active: ActivePlan, me: ActorRef<ShardMsg>) -> Chain {
    if plan.stage_links == StageLinks::Chain && active.remotes.len() > 1 && active.remotes.iter().all(|(l, _)| l.transport() == "quic") {
        let route: Option<Vec<WireHop>> = active.remotes[1..]
            .iter()
            .map(|(l, _)| Some(WireHop { name: l.peer().to_string(), control: plan.mesh.control_addr(l.peer())?.to_string() }))
            .collect();
        if let Some(route) = route {
            return start_direct_chain(plan, runtime, active, route, me);
        }
    }
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
        let worker = runtime.spawn(async move {
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
                let wall = called.elapsed();
                item.remote_wall += wall;
                if let Ok(StageReply::Hidden { compute_us, .. } | StageReply::Sampled { compute_us, .. }) = &reply {
                    mesh.report_timing(&stage, epoch, wall, Duration::from_micros(*compute_us));
                }
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
                    Ok(StageReply::Error(e)) => {
                        // Its engine failed the step: lost if that keeps happening.
                        mesh.report_error(&stage, epoch);
                        Err(failed(e))
                    }
                    Ok(StageReply::Refused(e)) => Err(failed(e)),
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

/// The remote stages as a chain of stage-to-stage links: the head sends each step to the first
/// stage with the route of the others, several steps in flight at once, and hands the results
/// to the driver in the order the steps were sent.
fn start_direct_chain(plan: &PipelinePlan, runtime: &tokio::runtime::Handle, active: ActivePlan, route: Vec<WireHop>, me: ActorRef<ShardMsg>) -> Chain {
    type Outcome = Result<StepOutput, ShardFailure>;
    let epoch = active.epoch;
    let stages: Arc<Vec<String>> = Arc::new(active.remotes.iter().map(|(l, _)| l.peer().to_string()).collect());
    let first = active.remotes[0].0.clone();
    let mesh = plan.mesh.clone();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<ChainItem>();
    let (order_tx, mut order_rx) = tokio::sync::mpsc::unbounded_channel::<tokio::sync::oneshot::Receiver<Outcome>>();
    let dispatcher = runtime.spawn(async move {
        // Dropped with the task (the shard replaced): the steps in flight go with it.
        let mut calls = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                item = rx.recv() => {
                    let Some(item) = item else { break };
                    let (done, wait) = tokio::sync::oneshot::channel();
                    if order_tx.send(wait).is_err() {
                        break;
                    }
                    let (first, mesh, route, stages) = (first.clone(), mesh.clone(), route.clone(), stages.clone());
                    calls.spawn(async move {
                        let _ = done.send(chain_step(&first, &mesh, epoch, route, &stages, item).await);
                    });
                }
                Some(_) = calls.join_next(), if !calls.is_empty() => {}
            }
        }
        while calls.join_next().await.is_some() {}
    });
    let collector = runtime.spawn(async move {
        while let Some(wait) = order_rx.recv().await {
            let outcome = wait.await.unwrap_or_else(|_| Err(ShardFailure::Stage { stage: "the chain".into(), detail: "a chained step was dropped".into() }));
            let failed = outcome.is_err();
            if me.cast(ShardMsg::Finished(outcome)).is_err() || failed {
                return;
            }
        }
    });
    Chain { first: tx, workers: vec![dispatcher.abort_handle(), collector.abort_handle()] }
}

/// One step down the chain: sent to the first remote stage with the route of the others. What
/// comes back is the last stage's tokens and each stage's timing (fed to the planner's
/// slowdown estimate), or the stage where the chain broke (reported to the mesh).
async fn chain_step(first: &StageLink, mesh: &MeshDriver, epoch: u64, route: Vec<WireHop>, stages: &[String], item: ChainItem) -> Result<StepOutput, ShardFailure> {
    let req = StageRequest::Chain {
        head: mesh.name().to_string(),
        route,
        epoch,
        chunks: item.chunks,
        input: WireInput::Hidden(item.hidden),
        new_sequences: item.new_sequences,
        released: item.released,
        ids: item.ids,
    };
    let called = Instant::now();
    let reply = first.call(req).await;
    let wall = called.elapsed();
    let failed = |stage: &str, detail: String| ShardFailure::Stage { stage: stage.to_string(), detail };
    let s1 = &stages[0];
    match reply {
        Ok(StageReply::Chained { tokens, hops }) if hops.len() == stages.len() => {
            // Stage i's call, as its caller saw it, less its own call to the next and the time
            // the step queued there behind other micro-batches (the device busy meanwhile).
            let (mut upstream, mut compute) = (wall.as_micros() as u64, 0);
            for (stage, &(c, downstream, behind)) in stages.iter().zip(&hops) {
                mesh.report_timing(stage, epoch, Duration::from_micros(upstream.saturating_sub(downstream).saturating_sub(behind)), Duration::from_micros(c));
                (upstream, compute) = (downstream, compute + c);
            }
            Ok(StepOutput {
                number: item.number,
                transfer_time: Some(wall.saturating_sub(Duration::from_micros(compute))),
                sampled: tokens
                    .into_iter()
                    .map(|w| {
                        let (id, sampled, finish) = sampled_from_wire(w);
                        SampledOut { id, sampled, finish }
                    })
                    .collect(),
                forward_time: item.started.elapsed(),
            })
        }
        Ok(StageReply::Chained { hops, .. }) => Err(failed(s1, format!("the chain answered for {} stages, not {}", hops.len(), stages.len()))),
        Ok(StageReply::Broken { stage, kind, detail }) => {
            match kind {
                BROKEN_LOST => mesh.report_lost(&stage, epoch),
                BROKEN_ERROR => mesh.report_error(&stage, epoch),
                _ => {}
            }
            Err(failed(&stage, detail))
        }
        Ok(StageReply::Error(e)) => {
            mesh.report_error(s1, epoch);
            Err(failed(s1, e))
        }
        Ok(StageReply::Refused(e)) => Err(failed(s1, e)),
        Ok(other) => Err(failed(s1, format!("answered out of turn: {other:?}"))),
        Err(e) => {
            mesh.report_lost(s1, epoch);
            Err(failed(s1, e.to_string()))
        }
    }
}

/// The head's share of a pipeline step: its layers here, then the step goes down the chain.
fn run_head_stage(args: &ShardArgs, epoch: u64, chain: &Chain, mut work: ShardWork) -> Result<(), ShardFailure> {
    let started = Instant::now();
    let chunks = layout_to_wire(&work.step.layout);
    // The head samples nothing here: the last stage holds the samplers.
    let StepResult::Hidden(hidden) = device_step(args, epoch, &mut work, false)?.result else {
        return Err(ShardFailure::Engine("the head stage unexpectedly ends the model".into()));
    };
    let item = ChainItem {
        number: work.number,
        chunks,
        ids: work.step.scheduled.iter().map(|s| s.id).collect(),
        hidden,
        new_sequences: work
            .new_sequences
            .into_iter()
            .map(|s| WireNewSequence { id: s.id, params: sampling_to_wire(&s.params), prompt: s.prompt, eos: s.eos, generated: s.generated })
            .collect(),
        released: work.released,
        started,
        remote_wall: Duration::ZERO,
        remote_compute: Duration::ZERO,
    };
    chain.first.send(item).map_err(|_| ShardFailure::Stage { stage: "the chain".into(), detail: "the pipeline's stage links are gone".into() })
}
