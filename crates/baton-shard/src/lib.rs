//! The GPU-shard actor: owns one device (a `Backend`) and the pipeline stage on it, and does
//! what its driver asks (load a layer range for a plan epoch, run a step, move KV) one request
//! at a time, in arrival order, on its own OS thread so no async runtime ever blocks on the
//! device. A pipeline head's scheduler and every stage node each drive one. The actor is
//! generic over the backend and its messages are not, so nothing above it is: the composition
//! root picks the device ([`Device::cpu`], or any `Backend` through [`Device::new`]).

use std::future::Future;
use std::ops::Range;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use baton_engine::{Backend, BatchLayout, Compute, CpuBackend, EngineError, KvGeometry, SamplingParams, SequenceStart, StageInput, StageWorker, StepResult};
use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

/// Why the shard could not do what it was asked.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ShardError {
    #[error("the stage is not loaded")]
    NotLoaded,
    /// A stage serves one plan epoch at a time and refuses the work of any other.
    #[error("a request of plan epoch {got} reached a stage loaded for epoch {serving}")]
    WrongEpoch { got: u64, serving: u64 },
    #[error("{0}")]
    Engine(String),
    /// The worker panicked; the stage was dropped (its KV may be half written), so the next
    /// load starts afresh.
    #[error("the stage's worker panicked: {0}")]
    Panicked(String),
    #[error("the GPU-shard actor is gone: {0}")]
    Gone(String),
}

impl From<EngineError> for ShardError {
    fn from(e: EngineError) -> Self {
        ShardError::Engine(e.to_string())
    }
}

/// What the shard serves now: readable at any time, never waiting for a running step (a
/// stage's liveness answers read it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Serving {
    pub layers: Range<usize>,
    pub epoch: u64,
}

/// What the shard measured of its device, readable at any time.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ShardStats {
    /// Time per layer per token in the transformer layers (µs), weighted over roughly the
    /// last hundred steps; `None` before the first step. Every stage of a pipeline runs the
    /// same steps, so the head compares its stages by it.
    pub us_per_layer_token: Option<f64>,
    /// Device time spent in steps since the shard started.
    pub busy: Duration,
    pub steps: u64,
}

/// Running sums behind [`ShardStats`]: each step's weight decays by this factor per step.
const SPEED_DECAY: f64 = 0.99;

#[derive(Debug, Default)]
struct Meter {
    layer_us: f64,
    layer_tokens: f64,
    stats: ShardStats,
}

impl Meter {
    fn record(&mut self, layers_time: Duration, layer_tokens: usize, compute: Duration) {
        self.stats.steps += 1;
        self.stats.busy += compute;
        if layer_tokens == 0 {
            return;
        }
        self.layer_us = self.layer_us * SPEED_DECAY + layers_time.as_secs_f64() * 1e6;
        self.layer_tokens = self.layer_tokens * SPEED_DECAY + layer_tokens as f64;
        self.stats.us_per_layer_token = Some(self.layer_us / self.layer_tokens);
    }
}

/// The outcome of a load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    pub layers: Range<usize>,
    pub epoch: u64,
    /// The shard held these layers (with the same KV shape) already and kept them, their KV
    /// included, instead of loading again.
    pub kept: bool,
    /// The shard held some of these layers and loaded only the others (the ones it had keep
    /// their weights and KV).
    pub extended: bool,
}

/// A sequence the stage has not sampled for yet (or not since a plan change).
#[derive(Debug, Clone)]
pub struct NewSequence {
    pub id: u64,
    pub params: SamplingParams,
    pub prompt: Vec<u32>,
    pub eos: Vec<u32>,
    /// Tokens it produced before (a sequence re-queued or moved by a plan change).
    pub generated: Vec<u32>,
}

/// A step's input: token ids on the first stage, hidden states `[tokens, hidden]` elsewhere.
#[derive(Debug, Clone)]
pub enum Input {
    Tokens(Vec<u32>),
    Hidden(Vec<f32>),
}

/// One step for the stage.
#[derive(Debug, Clone)]
pub struct StepRequest {
    pub epoch: u64,
    pub layout: BatchLayout,
    pub input: Input,
    /// The sequence of each chunk, in batch order.
    pub ids: Vec<u64>,
    /// Sequences that ended: their sampling state is dropped.
    pub released: Vec<u64>,
    /// Sequences to sample for from now on (the last stage).
    pub starts: Vec<NewSequence>,
}

/// What a step gave, and how long the device took.
#[derive(Debug, Clone, PartialEq)]
pub struct StepDone {
    pub result: StepResult,
    pub compute: Duration,
}

pub enum ShardMsg {
    /// Serve `layers` for plan `epoch` with a KV cache of `geometry`: layers it holds already
    /// are kept in place with their KV (a plan that gives a stage fewer layers reloads
    /// nothing, one that gives it more loads only those); otherwise the old stage is freed and
    /// the range loaded. Every sampler is
    /// forgotten (a new plan re-sends the sequences).
    Load { layers: Range<usize>, geometry: KvGeometry, epoch: u64, reply: RpcReplyPort<Result<Loaded, ShardError>> },
    Step(Box<StepRequest>, RpcReplyPort<Result<StepDone, ShardError>>),
    /// The K/V of `blocks` for `layers` (absolute layer numbers within the stage).
    ExportKv { epoch: u64, layers: Range<usize>, blocks: Vec<u32>, reply: RpcReplyPort<Result<Vec<f32>, ShardError>> },
    /// Writes what `ExportKv` gave (same layers and blocks).
    ImportKv { epoch: u64, layers: Range<usize>, blocks: Vec<u32>, data: Vec<f32>, reply: RpcReplyPort<Result<(), ShardError>> },
    /// Whether a load of `layers` with `geometry` would keep what the shard holds.
    Holds { layers: Range<usize>, geometry: KvGeometry, reply: RpcReplyPort<bool> },
}

type MakeBackend<B> = Arc<dyn Fn() -> Result<B, EngineError> + Send + Sync>;
type Spawn = dyn Fn(PathBuf) -> Pin<Box<dyn Future<Output = Result<ShardHandle, ShardError>> + Send>> + Send + Sync;

/// The device a node's shard runs on: how to make its backend, and how to say what it is.
#[derive(Clone)]
pub struct Device {
    describe: String,
    spawn: Arc<Spawn>,
    /// The card's memory where it bounds the KV cache (a modeled GPU); `None` on the host.
    memory_bytes: Option<u64>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe)
    }
}

impl Device {
    /// A device whose backend `make` creates (called on the shard's thread at each fresh load).
    pub fn new<B: Backend>(describe: impl Into<String>, make: impl Fn() -> Result<B, EngineError> + Send + Sync + 'static) -> Self {
        let make: MakeBackend<B> = Arc::new(make);
        Device {
            describe: describe.into(),
            spawn: Arc::new(move |model_dir| {
                let make = make.clone();
                Box::pin(async move { GpuShard::<B>::spawn(model_dir, make).await })
            }),
            memory_bytes: None,
        }
    }

    /// This device with `bytes` of memory that its weights and KV cache share (a card), so a
    /// node sizes its KV cache by what the card leaves rather than by a host budget.
    pub fn with_memory(mut self, bytes: u64) -> Self {
        self.memory_bytes = Some(bytes);
        self
    }

    /// The card's memory, where it bounds the KV cache.
    pub fn memory_bytes(&self) -> Option<u64> {
        self.memory_bytes
    }

    /// The CPU backend on `threads` threads, exact arithmetic.
    pub fn cpu(threads: usize) -> Self {
        Device::cpu_with(threads, Compute::Exact)
    }

    /// The CPU backend on `threads` threads with `compute` arithmetic.
    pub fn cpu_with(threads: usize, compute: Compute) -> Self {
        Device::new(baton_engine::backend::cpu::describe(threads, compute), move || CpuBackend::with_compute(threads, compute))
    }

    pub fn describe(&self) -> &str {
        &self.describe
    }

    /// Starts a shard on this device for the checkpoint in `model_dir` (it loads nothing
    /// until asked). Shards are unnamed actors: several nodes may run in one process.
    pub async fn spawn(&self, model_dir: PathBuf) -> Result<ShardHandle, ShardError> {
        (self.spawn)(model_dir).await
    }
}

/// The GPU-shard actor on backend `B`.
pub struct GpuShard<B: Backend> {
    make: MakeBackend<B>,
    model_dir: PathBuf,
    serving: Arc<Mutex<Option<Serving>>>,
    meter: Arc<Mutex<Meter>>,
    loading: Loading,
}

/// While a stage loads from its checkpoint: (done, total) in the loader's units.
type Loading = Arc<Mutex<Option<(usize, usize)>>>;

impl<B: Backend> GpuShard<B> {
    async fn spawn(model_dir: PathBuf, make: MakeBackend<B>) -> Result<ShardHandle, ShardError> {
        let serving = Arc::new(Mutex::new(None));
        let meter = Arc::new(Mutex::new(Meter::default()));
        let loading = Loading::default();
        let shard = GpuShard { make, model_dir, serving: serving.clone(), meter: meter.clone(), loading: loading.clone() };
        let (actor, _) = Actor::spawn(None, shard, ()).await.map_err(|e| ShardError::Gone(e.to_string()))?;
        Ok(ShardHandle { actor, serving, meter, loading })
    }
}

impl<B: Backend> Actor for GpuShard<B> {
    type Msg = ShardMsg;
    type State = mpsc::Sender<ShardMsg>;
    type Arguments = ();

    async fn pre_start(&self, _myself: ActorRef<ShardMsg>, _: ()) -> Result<mpsc::Sender<ShardMsg>, ActorProcessingErr> {
        let (tx, rx) = mpsc::channel();
        let mut thread = DeviceThread::<B> {
            make: self.make.clone(),
            model_dir: self.model_dir.clone(),
            serving: self.serving.clone(),
            meter: self.meter.clone(),
            loading: self.loading.clone(),
            stage: None,
        };
        std::thread::Builder::new().name("baton-gpu-shard".into()).spawn(move || {
            while let Ok(msg) = rx.recv() {
                thread.run(msg);
            }
        })?;
        Ok(tx)
    }

    async fn handle(&self, _myself: ActorRef<ShardMsg>, msg: ShardMsg, work: &mut mpsc::Sender<ShardMsg>) -> Result<(), ActorProcessingErr> {
        // The thread runs requests in the order they arrive; replies go straight to the caller.
        work.send(msg).map_err(|_| "the GPU shard's device thread is gone")?;
        Ok(())
    }
}

/// The shard's own thread: the only place its stage is touched.
struct DeviceThread<B: Backend> {
    make: MakeBackend<B>,
    model_dir: PathBuf,
    serving: Arc<Mutex<Option<Serving>>>,
    meter: Arc<Mutex<Meter>>,
    loading: Loading,
    stage: Option<(StageWorker<B>, u64)>,
}

/// What a caught panic said.
pub fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

impl<B: Backend> DeviceThread<B> {
    fn publish(&self) {
        *self.serving.lock().unwrap_or_else(|p| p.into_inner()) = self.stage.as_ref().map(|(w, epoch)| Serving { layers: w.layers(), epoch: *epoch });
    }

    /// Runs `f`; a panic drops the stage (its KV may be half written) and becomes an error.
    fn guarded<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T, ShardError>) -> Result<T, ShardError> {
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self)));
        let out = out.unwrap_or_else(|p| {
            self.stage = None;
            Err(ShardError::Panicked(panic_message(p)))
        });
        self.publish();
        out
    }

    fn at_epoch(&mut self, epoch: u64) -> Result<&mut StageWorker<B>, ShardError> {
        match &mut self.stage {
            None => Err(ShardError::NotLoaded),
            Some((w, serving)) if *serving == epoch => Ok(w),
            Some((_, serving)) => Err(ShardError::WrongEpoch { got: epoch, serving: *serving }),
        }
    }

    fn run(&mut self, msg: ShardMsg) {
        match msg {
            ShardMsg::Load { layers, geometry, epoch, reply } => {
                let _ = reply.send(self.guarded(|t| t.load(layers, geometry, epoch)));
            }
            ShardMsg::Step(req, reply) => {
                let _ = reply.send(self.guarded(|t| t.step(*req)));
            }
            ShardMsg::ExportKv { epoch, layers, blocks, reply } => {
                let _ = reply.send(self.guarded(|t| Ok(t.at_epoch(epoch)?.export_kv(layers, &blocks)?)));
            }
            ShardMsg::ImportKv { epoch, layers, blocks, data, reply } => {
                let _ = reply.send(self.guarded(|t| Ok(t.at_epoch(epoch)?.import_kv(layers, &blocks, &data)?)));
            }
            ShardMsg::Holds { layers, geometry, reply } => {
                let _ = reply.send(self.stage.as_ref().is_some_and(|(w, _)| w.holds(&layers, geometry)));
            }
        }
    }

    fn load(&mut self, layers: Range<usize>, geometry: KvGeometry, epoch: u64) -> Result<Loaded, ShardError> {
        if let Some((w, serving)) = self.stage.as_mut().filter(|(w, _)| w.holds(&layers, geometry)) {
            w.retain(layers.clone())?;
            w.reset_samplers();
            *serving = epoch;
            return Ok(Loaded { layers, epoch, kept: true, extended: false });
        }
        if let Some((w, serving)) = self.stage.as_mut().filter(|(w, _)| w.grows_to(&layers, geometry)) {
            w.extend(layers.clone())?;
            w.reset_samplers();
            *serving = epoch;
            return Ok(Loaded { layers, epoch, kept: false, extended: true });
        }
        // Free the old stage before the new one allocates.
        self.stage = None;
        self.publish();
        let backend = (self.make)()?;
        let loading = self.loading.clone();
        let mut progress = |done: usize, total: usize| *loading.lock().unwrap_or_else(|p| p.into_inner()) = Some((done, total));
        let worker = StageWorker::load_with_progress(backend, &self.model_dir, layers.clone(), geometry, &mut progress);
        *self.loading.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.stage = Some((worker?, epoch));
        Ok(Loaded { layers, epoch, kept: false, extended: false })
    }

    fn step(&mut self, req: StepRequest) -> Result<StepDone, ShardError> {
        let started = Instant::now();
        let worker = self.at_epoch(req.epoch)?;
        let input = match &req.input {
            Input::Tokens(t) => StageInput::Tokens(t),
            Input::Hidden(h) => StageInput::Hidden(h),
        };
        let starts = req.starts.iter().map(|s| SequenceStart { id: s.id, params: s.params.clone(), eos: &s.eos, prompt: &s.prompt, generated: &s.generated });
        let result = worker.step(&req.layout, input, &req.ids, req.released.iter().copied(), starts)?;
        let compute = started.elapsed();
        let (layer_tokens, layers_time) = (worker.layers().len() * req.layout.num_tokens(), worker.last_layers_time());
        self.meter.lock().unwrap_or_else(|p| p.into_inner()).record(layers_time, layer_tokens, compute);
        Ok(StepDone { result, compute })
    }
}

/// A driver's handle on a shard: requests in, replies out, in order.
#[derive(Clone)]
pub struct ShardHandle {
    actor: ActorRef<ShardMsg>,
    serving: Arc<Mutex<Option<Serving>>>,
    meter: Arc<Mutex<Meter>>,
    loading: Loading,
}

impl std::fmt::Debug for ShardHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardHandle").field("serving", &self.serving()).finish()
    }
}

fn answer<T>(r: Result<CallResult<Result<T, ShardError>>, ractor::MessagingErr<ShardMsg>>) -> Result<T, ShardError> {
    match r {
        Ok(CallResult::Success(r)) => r,
        Ok(CallResult::Timeout) => Err(ShardError::Gone("no answer".into())),
        Ok(CallResult::SenderError) => Err(ShardError::Gone("the device thread dropped the request".into())),
        Err(e) => Err(ShardError::Gone(e.to_string())),
    }
}

impl ShardHandle {
    /// What it serves now (`None`: nothing loaded); never waits for work.
    pub fn serving(&self) -> Option<Serving> {
        self.serving.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// While it loads a stage from the checkpoint: (done, total) so far; never waits for work.
    pub fn loading(&self) -> Option<(usize, usize)> {
        *self.loading.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What it measured of its device; never waits for work.
    pub fn stats(&self) -> ShardStats {
        self.meter.lock().unwrap_or_else(|p| p.into_inner()).stats
    }

    pub async fn load(&self, layers: Range<usize>, geometry: KvGeometry, epoch: u64) -> Result<Loaded, ShardError> {
        answer(self.actor.call(|reply| ShardMsg::Load { layers, geometry, epoch, reply }, None).await)
    }

    pub async fn step(&self, req: StepRequest) -> Result<StepDone, ShardError> {
        answer(self.actor.call(|reply| ShardMsg::Step(Box::new(req), reply), None).await)
    }

    pub async fn export_kv(&self, epoch: u64, layers: Range<usize>, blocks: Vec<u32>) -> Result<Vec<f32>, ShardError> {
        answer(self.actor.call(|reply| ShardMsg::ExportKv { epoch, layers, blocks, reply }, None).await)
    }

    pub async fn import_kv(&self, epoch: u64, layers: Range<usize>, blocks: Vec<u32>, data: Vec<f32>) -> Result<(), ShardError> {
        answer(self.actor.call(|reply| ShardMsg::ImportKv { epoch, layers, blocks, data, reply }, None).await)
    }

    pub async fn holds(&self, layers: Range<usize>, geometry: KvGeometry) -> bool {
        matches!(self.actor.call(|reply| ShardMsg::Holds { layers, geometry, reply }, None).await, Ok(CallResult::Success(true)))
    }

    /// Stops the actor (its device thread ends once the requests already sent are done).
    pub fn stop(&self) {
        self.actor.stop(None);
    }
}

#[cfg(test)]
mod tests;
