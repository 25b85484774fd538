//! The scheduler actor: a thin shell around `baton_scheduler::Scheduler`. It owns the request
//! streams, detokenizes, applies stop strings, records metrics, hands each step to the shard
//! and supervises it: if the shard fails, every request it held gets an error and a new shard
//! starts.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use baton_engine::{Detokenizer, TextTokenizer};
use baton_scheduler::{AdmitError, Scheduler, SeqId, Step};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio::sync::mpsc::UnboundedSender;

use crate::error::ServeError;
use crate::metrics::{self, Metrics};
use crate::request::{Event, Finish, GenerateRequest, TokenEvent};
use crate::shard::{InjectedFault, Migration, MigrationSlot, NewSequence, Shard, ShardArgs, ShardFailure, ShardLoaded, ShardMsg, ShardWork, StepOutput};

pub enum SchedulerMsg {
    Submit {
        request: GenerateRequest,
        events: UnboundedSender<Event>,
        reply: RpcReplyPort<Result<SeqId, ServeError>>,
    },
    Abort(SeqId),
    /// The shard `id` loaded what it runs.
    ShardReady(ractor::ActorId, ShardLoaded),
    StepDone(StepOutput),
    /// The mesh decided something (a new plan, or none possible): run what it says now.
    PlanChanged,
    /// Once a second: end requests past their deadline.
    Tick,
    /// Replies with (running + waiting) requests.
    Load(RpcReplyPort<usize>),
    /// Start a new shard after a failure (sent to itself after a backoff).
    RestartShard,
    /// The nodes a planned change takes in have loaded their layers (or could not).
    Prepared(u64, Result<Vec<String>, String>),
}

/// The delay before restarting a shard after `failures` failures in a row without it becoming
/// ready: 100 ms doubling to 10 s, so a shard that cannot load (a pipeline stage that is gone)
/// is retried without spinning.
pub fn restart_backoff(failures: u32) -> std::time::Duration {
    std::time::Duration::from_millis(100u64.saturating_mul(1 << (failures.clamp(1, 8) - 1)).min(10_000))
}

pub struct SchedulerArgs {
    pub core: Scheduler,
    pub shard: ShardArgsTemplate,
    pub tokenizer: Arc<TextTokenizer>,
    pub metrics: Arc<Metrics>,
    pub ready: Arc<AtomicBool>,
    /// Why the node cannot serve, while `ready` is false for a reason clients should read.
    pub unready: Arc<std::sync::Mutex<Option<String>>>,
    /// A request still unfinished this long after it arrived ends with a timeout error.
    pub request_timeout: std::time::Duration,
}

/// Shard arguments without the scheduler's own address (filled in at start).
#[derive(Clone)]
pub struct ShardArgsTemplate {
    pub model_dir: std::path::PathBuf,
    /// This node's GPU-shard actor: every driver runs its steps there.
    pub device: baton_shard::ShardHandle,
    /// Tests only: make the first shard fail on purpose (restarted shards run clean).
    pub fault: Option<InjectedFault>,
    /// Set when this node heads a multi-node pipeline.
    pub pipeline: Option<std::sync::Arc<crate::shard::PipelinePlan>>,
}

struct Live {
    events: UnboundedSender<Event>,
    detok: Detokenizer,
    stop: Vec<String>,
    /// Text produced so far (kept only when stop strings must be matched).
    text: String,
    prompt: Vec<u32>,
    params: baton_engine::SamplingParams,
    generated: usize,
    arrived: Instant,
    /// Prompt tokens the prefix cache supplied when the request was first admitted.
    cached_tokens: Option<usize>,
    started: Option<Instant>,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
}

pub struct State {
    core: Scheduler,
    live: HashMap<SeqId, Live>,
    next_id: SeqId,
    shard: Option<ActorRef<ShardMsg>>,
    shard_ready: bool,
    /// The plan epoch the shard runs (pipeline heads), and its stages.
    shard_epoch: Option<u64>,
    shard_plan: Vec<(String, std::ops::Range<usize>)>,
    /// A planned change (join, drain) waiting for the steps in flight to finish, after which
    /// the KV moves to the new plan's stages instead of being recomputed.
    switching: Option<u64>,
    /// A planned change whose new nodes are loading while the running plan serves.
    preparing: Option<(u64, tokio::task::AbortHandle)>,
    migration: MigrationSlot,
    /// A plan change waiting for its shard to be ready: its epoch and when it was decided.
    replanning: Option<(u64, Instant)>,
    /// The last plan epoch whose change was counted.
    counted_epoch: u64,
    unready: Arc<std::sync::Mutex<Option<String>>>,
    request_timeout: std::time::Duration,
    shard_args: ShardArgsTemplate,
    /// Sequences whose sampling state the shard holds.
    on_shard: HashSet<SeqId>,
    released: Vec<SeqId>,
    /// Steps sent to the shard and not completed, oldest first (a pipeline keeps one per stage).
    in_flight: std::collections::VecDeque<(u64, Step, Instant)>,
    max_in_flight: usize,
    next_step: u64,
    tokenizer: Arc<TextTokenizer>,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    epoch: Instant,
    /// Shard failures since it was last ready.
    failures: u32,
}

pub struct SchedulerActor;

impl State {
    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    fn publish_load(&self) {
        self.metrics
            .set_load(self.core.num_running(), self.core.num_waiting(), self.core.kv_usage(), self.core.preemptions());
        if self.core.prefix_caching() {
            let (queries, hits) = self.core.prefix_cache_counts();
            self.metrics.set_prefix_cache(queries, hits, self.core.cached_blocks(), self.core.total_blocks());
        }
    }

    /// Ends a request: final event, metrics, and the core forgets it.
    fn finish(&mut self, id: SeqId, finish: Finish, tail: String) {
        self.core.abort(id);
        if self.on_shard.remove(&id) {
            self.released.push(id);
        }
        let Some(live) = self.live.remove(&id) else { return };
        let now = Instant::now();
        let _ = live.events.send(Event::Done {
            finish,
            prompt_tokens: live.prompt.len(),
            completion_tokens: live.generated,
            cached_tokens: self.core.prefix_caching().then_some(live.cached_tokens.unwrap_or(0)),
            tail,
        });
        self.metrics.finished(finish.as_str(), live.prompt.len(), live.generated);
        self.metrics.record(metrics::E2E, (now - live.arrived).as_micros() as u64);
        if let (Some(first), Some(last)) = (live.first_token, live.last_token) {
            self.metrics.record(metrics::DECODE, (last - first).as_micros() as u64);
        }
    }

    /// Sends every running sequence back to the queue to continue on the next shard (a stage
    /// was lost or the plan changed): nothing a client saw is lost or repeated.
    fn requeue_started(&mut self) {
        let moved = self.core.requeue_all();
        self.on_shard.clear();
        self.released.clear();
        self.in_flight.clear();
        if !moved.is_empty() {
            eprintln!("baton: re-queued {} running request(s) for the next plan (their KV is recomputed)", moved.len());
            self.metrics.migrated(moved.len(), true);
        }
        self.publish_load();
    }

    /// Ends every request older than the request timeout with an error.
    fn expire(&mut self) {
        let now = Instant::now();
        let late: Vec<SeqId> = self.live.iter().filter(|(_, l)| now.duration_since(l.arrived) > self.request_timeout).map(|(id, _)| *id).collect();
        for id in late {
            self.core.abort(id);
            if self.on_shard.remove(&id) {
                self.released.push(id);
            }
            if let Some(live) = self.live.remove(&id) {
                let why = format!("the request did not finish within {} s (--request-timeout)", self.request_timeout.as_secs());
                let _ = live.events.send(Event::Error(ServeError::Timeout(why)));
                self.metrics.failed();
            }
        }
    }

    fn set_unready(&self, why: Option<String>) {
        *self.unready.lock().unwrap_or_else(|p| p.into_inner()) = why;
    }

    /// Fails every request that has KV on the shard (after the shard died).
    fn fail_started(&mut self, why: &str) {
        let started: Vec<SeqId> = self.live.iter().filter(|(_, l)| l.started.is_some()).map(|(id, _)| *id).collect();
        for id in started {
            self.core.abort(id);
            if let Some(live) = self.live.remove(&id) {
                let _ = live.events.send(Event::Error(ServeError::Internal(why.to_string())));
                self.metrics.failed();
            }
        }
        self.on_shard.clear();
        self.released.clear();
        self.in_flight.clear();
    }

    /// Starts steps while the shard has room (one per pipeline stage) and there is work; none
    /// while a planned change waits for the pipeline to empty.
    fn kick(&mut self) {
        if self.switching.is_some() {
            return;
        }
        while self.in_flight.len() < self.max_in_flight {
            if !self.kick_one() {
                break;
            }
        }
    }

    /// Starts one step; false when none could start.
    fn kick_one(&mut self) -> bool {
        let (Some(shard), true) = (&self.shard, self.shard_ready) else {
            return false;
        };
        let t0 = Instant::now();
        let now_us = self.now_us();
        let Some(step) = self.core.schedule(now_us) else {
            self.publish_load();
            return false;
        };
        for &(id, n) in &step.cached {
            if let Some(live) = self.live.get_mut(&id) {
                live.cached_tokens.get_or_insert(n);
            }
        }
        let mut new_sequences = Vec::new();
        for s in &step.scheduled {
            if let Some(live) = self.live.get_mut(&s.id) {
                if live.started.is_none() {
                    live.started = Some(t0);
                    self.metrics.record(metrics::QUEUE, (t0 - live.arrived).as_micros() as u64);
                }
                if self.on_shard.insert(s.id) {
                    new_sequences.push(NewSequence {
                        id: s.id,
                        params: live.params.clone(),
                        prompt: live.prompt.clone(),
                        eos: self.tokenizer.eos_token_ids.clone(),
                        generated: self.core.generated(s.id).map(<[u32]>::to_vec).unwrap_or_default(),
                    });
                }
            }
        }
        self.metrics.record(metrics::SCHEDULE, t0.elapsed().as_micros() as u64);
        self.metrics.record(metrics::BATCH_SEQS, step.scheduled.len() as u64);
        self.metrics.record(metrics::BATCH_TOKENS, step.num_tokens() as u64);
        let number = self.next_step;
        self.next_step += 1;
        let work = ShardWork {
            number,
            step: step.clone(),
            new_sequences,
            released: std::mem::take(&mut self.released),
        };
        let sent = shard.cast(ShardMsg::Run(Box::new(work))).is_ok();
        if sent {
            self.in_flight.push_back((number, step, Instant::now()));
        }
        self.publish_load();
        sent
    }

    fn step_done(&mut self, out: StepOutput) {
        let Some(&(front, _, _)) = self.in_flight.front() else { return };
        if out.number < front {
            // A step of a shard that was replaced; its sequences were re-queued.
            return;
        }
        let Some((number, step, started)) = self.in_flight.pop_front() else { return };
        if number != out.number {
            tracing::error!(expected = number, got = out.number, "steps completed out of order; failing the shard's requests");
            self.fail_started("the engine shard completed steps out of order");
            return;
        }
        self.metrics.record(metrics::ITERATION, started.elapsed().as_micros() as u64);
        self.metrics.record(metrics::FORWARD, out.forward_time.as_micros() as u64);
        if let Some(t) = out.transfer_time {
            self.metrics.record(metrics::TRANSFER, t.as_micros() as u64);
        }
        let now = Instant::now();
        let mut sampled = Vec::with_capacity(out.sampled.len());
        let mut ended: Vec<(SeqId, Finish, String)> = Vec::new();
        for s in out.sampled {
            sampled.push((s.id, s.sampled.token));
            let Some(live) = self.live.get_mut(&s.id) else { continue };
            live.generated += 1;
            match live.last_token {
                None => {
                    self.metrics.record(metrics::TTFT, (now - live.arrived).as_micros() as u64);
                    if let Some(st) = live.started {
                        self.metrics.record(metrics::PREFILL, (now - st).as_micros() as u64);
                    }
                    live.first_token = Some(now);
                }
                Some(prev) => self.metrics.record(metrics::ITL, (now - prev).as_micros() as u64),
            }
            live.last_token = Some(now);
            let mut piece = live.detok.push(&self.tokenizer, s.sampled.token).unwrap_or_default();
            let mut finish = s.finish.map(Finish::from);
            if !live.stop.is_empty() {
                let before = live.text.len();
                live.text.push_str(&piece);
                let from = before.saturating_sub(live.stop.iter().map(String::len).max().unwrap_or(0));
                if let Some(cut) = live.stop.iter().filter_map(|st| live.text.get(from..).and_then(|t| t.find(st.as_str())).map(|i| from + i)).min() {
                    piece = live.text.get(before.min(cut)..cut).unwrap_or_default().to_string();
                    live.text.truncate(cut);
                    finish = Some(Finish::Stop);
                }
            }
            let sent = live.events.send(Event::Token(TokenEvent {
                token: s.sampled.token,
                text: piece,
                logprob: s.sampled.logprob,
                top_logprobs: s.sampled.top_logprobs,
            }));
            if sent.is_err() {
                ended.push((s.id, Finish::Abort, String::new()));
            } else if let Some(f) = finish {
                let cut_at_stop = f == Finish::Stop && s.finish.is_none();
                let tail = if cut_at_stop { String::new() } else { live.detok.flush(&self.tokenizer).unwrap_or_default() };
                ended.push((s.id, f, tail));
            }
        }
        let finished: Vec<SeqId> = ended.iter().map(|e| e.0).collect();
        self.core.complete(&step, &sampled, &finished);
        for (id, f, tail) in ended {
            self.finish(id, f, tail);
        }
    }
}

impl State {
    /// Forgets a planned change under way: the early loading of its nodes (cancelled), the
    /// wait for the pipeline to empty, and the KV move left for the next driver.
    fn drop_pending_change(&mut self) {
        self.switching = None;
        self.cancel_preload();
        self.migration.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Cancels the early loading of a planned change's new nodes, if one is running.
    fn cancel_preload(&mut self) {
        if let Some((_, task)) = self.preparing.take() {
            task.abort();
        }
    }

    /// Stops the shard (its steps in flight are dropped), re-queues what it was running and
    /// starts a shard for the mesh's current plan at once.
    async fn replace_shard(&mut self, myself: &ActorRef<SchedulerMsg>) -> Result<(), ActorProcessingErr> {
        if let Some(old) = self.shard.take() {
            old.stop(Some("the plan changed".into()));
        }
        self.shard_ready = false;
        self.shard_epoch = None;
        self.drop_pending_change();
        self.requeue_started();
        self.start_shard(myself).await;
        Ok(())
    }

    /// Starts a shard; if the actor cannot even be spawned, tries again after a backoff
    /// rather than failing the scheduler (and with it every client stream).
    async fn start_shard(&mut self, myself: &ActorRef<SchedulerMsg>) {
        // A new driver has only the KV of the blocks in use (moved by a planned change, or
        // none): cached blocks no sequence holds are gone.
        self.core.forget_cached();
        match spawn_shard(myself, &self.shard_args, self.core.geometry(), &self.migration).await {
            Ok(shard) => self.shard = Some(shard),
            Err(e) => {
                self.failures += 1;
                let delay = restart_backoff(self.failures);
                tracing::error!(error = %e, delay_ms = delay.as_millis() as u64, "cannot start a shard; trying again");
                self.shard = None;
                myself.send_after(delay, || SchedulerMsg::RestartShard);
            }
        }
    }

    /// A planned change, once nothing is in flight: stops the driver, leaves the KV blocks of
    /// the running sequences for the next one (which moves the KV of every re-placed layer to
    /// its new owner; the GPU shard keeps the head's) and starts it. The running sequences
    /// keep their place; only their samplers are set up again.
    async fn migrate(&mut self, myself: &ActorRef<SchedulerMsg>) -> Result<(), ActorProcessingErr> {
        let (Some(from_epoch), Some(to_epoch)) = (self.shard_epoch, self.switching) else {
            return self.replace_shard(myself).await;
        };
        let Some(shard) = self.shard.take() else {
            return self.replace_shard(myself).await;
        };
        // Nothing is in flight: every step the driver ran has been answered.
        shard.stop(Some("the plan changed".into()));
        let blocks = self.core.blocks_in_use();
        *self.migration.lock().unwrap_or_else(|p| p.into_inner()) = Some(Migration { from: self.shard_plan.clone(), from_epoch, to_epoch, blocks });
        self.switching = None;
        self.shard_ready = false;
        self.shard_epoch = None;
        // Every sequence's sampler is set up again on the new last stage, from what it produced.
        self.on_shard.clear();
        self.released.clear();
        self.in_flight.clear();
        self.start_shard(myself).await;
        Ok(())
    }
}

fn admit_error(e: AdmitError) -> ServeError {
    match e {
        AdmitError::QueueFull(_) => ServeError::Overloaded(e.to_string()),
        AdmitError::EmptyPrompt => ServeError::bad(e.to_string(), "prompt"),
        AdmitError::TooLong { .. } | AdmitError::NeverFits { .. } => ServeError::ContextTooLong(e.to_string()),
        AdmitError::NothingLeft { .. } => ServeError::bad(e.to_string(), "resume_token_ids"),
        AdmitError::DuplicateId(_) => ServeError::Internal(e.to_string()),
    }
}

async fn spawn_shard(myself: &ActorRef<SchedulerMsg>, args: &ShardArgsTemplate, geometry: baton_engine::KvGeometry, migration: &MigrationSlot) -> Result<ActorRef<ShardMsg>, ActorProcessingErr> {
    let shard_args = ShardArgs {
        migration: migration.clone(),
        stopped: Arc::default(),
        model_dir: args.model_dir.clone(),
        device: args.device.clone(),
        runtime: tokio::runtime::Handle::current(),
        geometry,
        scheduler: myself.clone(),
        fault: args.fault.clone(),
        pipeline: args.pipeline.clone(),
    };
    let (shard, _) = Actor::spawn_linked(None, Shard, shard_args, myself.get_cell()).await?;
    Ok(shard)
}

impl Actor for SchedulerActor {
    type Msg = SchedulerMsg;
    type State = State;
    type Arguments = SchedulerArgs;

    async fn pre_start(&self, myself: ActorRef<SchedulerMsg>, args: SchedulerArgs) -> Result<State, ActorProcessingErr> {
        let shard = spawn_shard(&myself, &args.shard, args.core.geometry(), &MigrationSlot::default()).await?;
        if let Some(p) = &args.shard.pipeline {
            let mut notices = p.mesh.subscribe();
            let me = myself.clone();
            tokio::spawn(async move {
                while notices.changed().await.is_ok() {
                    if me.cast(SchedulerMsg::PlanChanged).is_err() {
                        break;
                    }
                }
            });
        }
        {
            let me = myself.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
                loop {
                    every.tick().await;
                    if me.cast(SchedulerMsg::Tick).is_err() {
                        break;
                    }
                }
            });
        }
        Ok(State {
            core: args.core,
            live: HashMap::new(),
            next_id: 1,
            shard: Some(shard),
            shard_ready: false,
            shard_epoch: None,
            shard_plan: Vec::new(),
            switching: None,
            preparing: None,
            migration: MigrationSlot::default(),
            replanning: None,
            counted_epoch: 1,
            unready: args.unready,
            request_timeout: args.request_timeout,
            shard_args: args.shard,
            on_shard: HashSet::new(),
            released: Vec::new(),
            in_flight: std::collections::VecDeque::new(),
            max_in_flight: 1,
            next_step: 0,
            tokenizer: args.tokenizer,
            metrics: args.metrics,
            ready: args.ready,
            epoch: Instant::now(),
            failures: 0,
        })
    }

    async fn handle(&self, myself: ActorRef<SchedulerMsg>, msg: SchedulerMsg, state: &mut State) -> Result<(), ActorProcessingErr> {
        match msg {
            SchedulerMsg::Submit { request, events, reply } => {
                let id = state.next_id;
                state.next_id += 1;
                let now_us = state.now_us();
                let resumed = request.resumed.len();
                let result = state
                    .core
                    .add_resumed(id, request.prompt.clone(), request.resumed.clone(), request.params.max_tokens, now_us)
                    .map_err(admit_error);
                if result.is_ok() {
                    let _ = events.send(Event::Started { prompt_token_ids: request.prompt.clone() });
                    let now = Instant::now();
                    let mut live = Live {
                        events,
                        detok: Detokenizer::default(),
                        stop: request.stop,
                        text: String::new(),
                        prompt: request.prompt,
                        params: request.params,
                        generated: resumed,
                        arrived: now,
                        cached_tokens: None,
                        started: None,
                        // A resumed request's first token came from another head: no TTFT here.
                        first_token: (resumed > 0).then_some(now),
                        last_token: (resumed > 0).then_some(now),
                    };
                    // The detokenizer and the stop-string matcher resume where the client's
                    // text ends: replaying the produced tokens gives the state they had there.
                    for &t in &request.resumed {
                        let piece = live.detok.push(&state.tokenizer, t).unwrap_or_default();
                        if !live.stop.is_empty() {
                            live.text.push_str(&piece);
                        }
                    }
                    state.live.insert(id, live);
                    tracing::debug!(request_id = %request.request_id, seq = id, "admitted");
                }
                let _ = reply.send(result.map(|_| id));
                state.kick();
            }
            SchedulerMsg::Abort(id) => {
                if state.live.contains_key(&id) {
                    state.finish(id, Finish::Abort, String::new());
                    state.publish_load();
                }
            }
            SchedulerMsg::ShardReady(id, loaded) => {
                if state.shard.as_ref().map(|s| s.get_id()) != Some(id) {
                    return Ok(());
                }
                state.shard_ready = true;
                state.shard_epoch = loaded.epoch;
                state.shard_plan = loaded.plan.clone();
                if loaded.migrated {
                    eprintln!("baton: plan epoch {}: moved the KV of {} running request(s) with their layers (nothing recomputed)", loaded.epoch.unwrap_or(0), state.core.num_running());
                    state.metrics.migrated(state.core.num_running(), false);
                }
                state.failures = 0;
                let micro_batches = state.shard_args.pipeline.as_ref().and_then(|p| p.micro_batches);
                state.max_in_flight = if loaded.stages > 1 { micro_batches.unwrap_or(loaded.stages).clamp(1, loaded.stages) } else { 1 };
                // Each micro-batch takes its share of the sequences, so the steps in flight are equal.
                state.core.set_micro_batches(state.max_in_flight);
                state.set_unready(None);
                state.ready.store(true, Ordering::SeqCst);
                if let Some((epoch, decided)) = state.replanning {
                    if loaded.epoch >= Some(epoch) {
                        state.metrics.record(metrics::PLAN_CHANGE, decided.elapsed().as_micros() as u64);
                        state.replanning = None;
                    }
                }
                tracing::info!(epoch = ?loaded.epoch, stages = loaded.stages, "shard ready");
                let current = state.shard_args.pipeline.as_ref().and_then(|p| p.mesh.epoch());
                if state.shard_args.pipeline.is_some() && current != loaded.epoch {
                    // The plan moved on while this shard loaded.
                    state.replace_shard(&myself).await?;
                }
                state.kick();
            }
            SchedulerMsg::PlanChanged => {
                let Some(mesh) = state.shard_args.pipeline.as_ref().map(|p| p.mesh.clone()) else { return Ok(()) };
                let epoch = mesh.epoch();
                if let Some(e) = epoch.filter(|&e| e > state.counted_epoch) {
                    state.counted_epoch = e;
                    if let Some((change, decided)) = mesh.change(e) {
                        state.metrics.plan_changed(change.reason.as_str());
                        if let Some(d) = change.detection_us {
                            state.metrics.record(metrics::FAILURE_DETECTION, d);
                        }
                        if state.replanning.is_none() {
                            state.replanning = Some((e, decided));
                        } else if let Some(r) = state.replanning.as_mut() {
                            r.0 = e;
                        }
                    }
                }
                if state.shard_ready && epoch.is_some() && epoch == state.shard_epoch {
                    return Ok(());
                }
                // A join or a drain, every stage of the running plan alive: move the KV once the
                // steps in flight are done. Anything else recomputes. Every change since the
                // plan the shard runs must be one of those (a restart in between lost KV).
                let planned_change = |e: u64| {
                    mesh.change(e).is_some_and(|(c, _)| {
                        c.reason.is_planned()
                    })
                };
                let planned = match (state.shard_epoch, epoch) {
                    (Some(from), Some(to)) if to > from => (from + 1..=to).all(planned_change),
                    _ => false,
                };
                // A shard still loading: it is checked against the plan when it is ready, and a
                // join or a drain can wait for that; a loss cannot.
                if state.shard.is_some() && !state.shard_ready && epoch.is_some_and(planned_change) {
                    return Ok(());
                }
                if let (true, true, false, Some(e)) = (planned, state.shard_ready, state.shard_plan.is_empty(), epoch) {
                    if state.switching == Some(e) || state.preparing.as_ref().is_some_and(|p| p.0 == e) {
                        return Ok(());
                    }
                    // Add before drop: the nodes it takes in load first, while this plan serves.
                    state.cancel_preload();
                    let (running, geometry, me) = (state.shard_plan.clone(), state.core.geometry(), myself.clone());
                    let task = tokio::spawn(async move {
                        let loaded = crate::shard::preload(&mesh, e, &running, geometry).await;
                        let _ = me.cast(SchedulerMsg::Prepared(e, loaded));
                    });
                    state.preparing = Some((e, task.abort_handle()));
                    return Ok(());
                }
                state.replace_shard(&myself).await?;
            }
            SchedulerMsg::Tick => {
                state.expire();
                state.publish_load();
            }
            SchedulerMsg::StepDone(out) => {
                state.step_done(out);
                if state.switching.is_some() && state.in_flight.is_empty() {
                    state.migrate(&myself).await?;
                }
                state.kick();
            }
            SchedulerMsg::Load(reply) => {
                let _ = reply.send(state.core.num_running() + state.core.num_waiting());
            }
            SchedulerMsg::Prepared(e, loaded) => {
                if state.preparing.as_ref().is_none_or(|p| p.0 != e) {
                    return Ok(());
                }
                state.preparing = None;
                match loaded {
                    Ok(nodes) if !nodes.is_empty() => eprintln!("baton: plan epoch {e}: {} loaded their layers while the running plan served", nodes.join(", ")),
                    Ok(_) => {}
                    Err(why) => tracing::warn!(epoch = e, %why, "the new plan's nodes did not load ahead; switching anyway"),
                }
                // Stop starting steps; once those in flight are done, move to the new plan
                // (unless it has moved on: its own PlanChanged is on the way).
                let current = state.shard_args.pipeline.as_ref().and_then(|p| p.mesh.epoch());
                if state.shard_ready && current == Some(e) {
                    state.switching = Some(e);
                    if state.in_flight.is_empty() {
                        state.migrate(&myself).await?;
                    }
                }
            }
            SchedulerMsg::RestartShard => {
                if state.shard.is_none() {
                    state.shard_ready = false;
                    state.start_shard(&myself).await;
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(&self, myself: ActorRef<SchedulerMsg>, evt: SupervisionEvent, state: &mut State) -> Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorFailed(cell, err) => {
                if state.shard.as_ref().map(|s| s.get_id()) != Some(cell.get_id()) {
                    // A shard already replaced (its sequences were re-queued then).
                    return Ok(());
                }
                state.shard_ready = false;
                state.drop_pending_change();
                match err.downcast_ref::<ShardFailure>() {
                    Some(ShardFailure::Stage { stage, detail }) => {
                        tracing::warn!(%stage, %detail, "a pipeline stage failed; the running requests continue on the next plan");
                        state.requeue_started();
                    }
                    Some(ShardFailure::Unservable(why)) => {
                        tracing::warn!(%why, "the mesh cannot serve; requests wait for capacity");
                        state.requeue_started();
                        state.set_unready(Some(why.clone()));
                        state.ready.store(false, Ordering::SeqCst);
                    }
                    _ => {
                        tracing::error!(error = %err, "shard failed; failing its requests and restarting it");
                        state.ready.store(false, Ordering::SeqCst);
                        state.fail_started(&format!("the engine shard failed: {err}"));
                    }
                }
                state.shard_args.fault = None;
                state.shard = None;
                state.failures += 1;
                let delay = restart_backoff(state.failures);
                tracing::info!(delay_ms = delay.as_millis() as u64, "restarting the shard");
                myself.send_after(delay, || SchedulerMsg::RestartShard);
                state.publish_load();
            }
            SupervisionEvent::ActorTerminated(cell, ..) => {
                if state.shard.as_ref().map(|s| s.get_id()) == Some(cell.get_id()) {
                    state.shard = None;
                    state.shard_ready = false;
                }
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::restart_backoff;
    use std::time::Duration;

    #[test]
    fn restarts_back_off_from_100_ms_to_10_s() {
        let ms: Vec<u128> = (1..=9).map(|n| restart_backoff(n).as_millis()).collect();
        assert_eq!(ms, vec![100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000]);
        assert!(restart_backoff(u32::MAX) <= Duration::from_secs(10));
    }
}
