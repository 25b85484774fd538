//! The elastic mesh's shell on a pipeline head: probes every node of its pipeline over the
//! mutually authenticated control plane, feeds what it sees (answers, silences, broken data-plane
//! links) to the pure core (`elastic::MeshCore`), carries out its decisions, and hands the head's
//! shard the plan to run, with a connected and attached link to every remote stage.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::control::{ControlError, ControlNode, PeerLink};
use crate::elastic::{Action, ChangeReason, CoreConfig, MeshCore, Member, NodeState, Plan, PlanChange};
use crate::stage_service;
use crate::stage_wire::{StageReply, StageRequest};
use crate::tensor_plane::{StageLink, TensorPlane};

/// How often each node is probed, and how long a probe may take.
#[derive(Debug, Clone, Copy)]
pub struct ProbeConfig {
    pub interval: Duration,
    pub timeout: Duration,
    /// How often the core decides.
    pub tick: Duration,
    /// Layers move by measured speed as well as on joins, leaves and failures.
    pub rebalance_by_speed: bool,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig { interval: Duration::from_millis(100), timeout: Duration::from_millis(500), tick: Duration::from_millis(50), rebalance_by_speed: true }
    }
}

/// Why the head cannot run a plan now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MeshError {
    /// The live nodes cannot hold the whole model.
    #[error("no live node can hold layers {}..{} (lost: {})", missing.start, missing.end, lost.join(", "))]
    Unservable { missing: Range<usize>, lost: Vec<String> },
    /// A stage of the plan could not be reached; it is reported lost and the plan will change.
    #[error("stage {stage}: {detail}")]
    PeerLost { stage: String, detail: String },
}

/// The plan a head's shard runs: its own layers `0..local_end` and the remote stages in order.
pub struct ActivePlan {
    pub epoch: u64,
    pub local_end: usize,
    pub remotes: Vec<(StageLink, Range<usize>)>,
}

/// Where every node of the pipeline is reached, and what the planner may put on it.
#[derive(Debug, Clone)]
pub struct Roster {
    pub members: Vec<Member>,
    pub control: HashMap<String, SocketAddr>,
}

/// `baton status` / `/v1/mesh`: the view and the last plan changes.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MeshStatus {
    pub epoch: Option<u64>,
    pub unserved: Option<[usize; 2]>,
    pub nodes: Vec<NodeStatus>,
    pub changes: Vec<ChangeStatus>,
    /// What the head dropped of what its peers sent, by kind.
    pub dropped: std::collections::BTreeMap<&'static str, u64>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeStatus {
    pub name: String,
    pub state: &'static str,
    pub generation: Option<u64>,
    pub layers: Option<[usize; 2]>,
    /// Its measured speed (µs per layer per token), as the planner weighs it.
    pub us_per_layer_token: Option<f64>,
    /// What the head's waiting on it beyond its compute divides that speed by (1: not slow).
    pub slowdown: f64,
    /// The head's probes' round trip to it, smoothed (None: the head itself, or not yet).
    pub link_ms: Option<f64>,
    /// The tensor plane it says it runs (None: the head itself, or not yet).
    pub tensor_plane: Option<String>,
    /// The head's recent calls to it: mean compute and mean transfer (with any stall) per
    /// call, in ms (None: the head itself, or no call yet).
    pub call_compute_ms: Option<f64>,
    pub call_transfer_ms: Option<f64>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ChangeStatus {
    pub epoch: u64,
    pub reason: &'static str,
    pub nodes: Vec<String>,
    /// Seconds since the head started.
    pub at_s: f64,
    pub detection_ms: Option<f64>,
    pub moved: String,
}

/// A head's membership driver (see the module doc).
pub struct MeshDriver {
    me: String,
    node: Arc<ControlNode>,
    plane: Arc<TensorPlane>,
    control: Mutex<HashMap<String, SocketAddr>>,
    probe: ProbeConfig,
    /// Where its tasks run (some calls come from the shard's own thread).
    runtime: tokio::runtime::Handle,
    window_bytes: usize,
    started: Instant,
    core: Mutex<MeshCore>,
    /// Attached links to stages, by node; a node lost or restarted loses its link here (a link
    /// to a dead process can look open for a while).
    links: Mutex<HashMap<String, StageLink>>,
    /// Bumped on every decision (a new plan, or none possible).
    notices: watch::Sender<u64>,
    /// When each plan was decided (for the time to serve again).
    decided: Mutex<HashMap<u64, Instant>>,
    /// Released drained nodes (name, generation): the gossip's last word on them is not a
    /// new member. The same name with a new generation (started again) is.
    departed: Mutex<std::collections::HashSet<(String, u64)>>,
    /// Set by [`MeshDriver::stop`]: its probes, ticks and gossip follower end.
    stopped: std::sync::atomic::AtomicBool,
    /// Each stage's link as the probes see it: round-trip time (smoothed) and tensor plane.
    link_views: Mutex<HashMap<String, LinkView>>,
}

/// A stage's link, as the head's probes measure it.
#[derive(Debug, Clone, Default)]
struct LinkView {
    rtt_ms: Option<f64>,
    tensor_plane: String,
}

impl MeshDriver {
    /// Reaches every stage of `initial` (waiting up to `patience` for each, as nodes start in
    /// any order), then starts probing. `me` heads the pipeline (its range starts at layer 0).
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        me: &str,
        node: Arc<ControlNode>,
        plane: Arc<TensorPlane>,
        roster: Roster,
        num_layers: usize,
        initial: Plan,
        window_bytes: usize,
        patience: Duration,
        probe: ProbeConfig,
    ) -> Result<Arc<MeshDriver>, ControlError> {
        let mut links = HashMap::new();
        for (name, _) in initial.stages.iter().filter(|(n, _)| n != me) {
            let addr = *roster.control.get(name).ok_or_else(|| ControlError::Protocol(format!("the plan names an unknown node {name}")))?;
            let link = connect_stage(&node, &plane, name, addr, window_bytes, patience).await?;
            eprintln!("baton: stage {name}: activations over {}", link.transport());
            links.insert(name.clone(), link);
        }
        let config = CoreConfig { dead_after_us: (probe.interval * 7).as_micros() as u64, tick_us: probe.tick.as_micros() as u64, rebalance_by_speed: probe.rebalance_by_speed, ..CoreConfig::default() };
        let started = Instant::now();
        let core = MeshCore::new(me, roster.members.clone(), num_layers, initial, config, 0);
        let (notices, _) = watch::channel(0);
        let driver = Arc::new(MeshDriver {
            me: me.to_string(),
            node,
            plane,
            control: Mutex::new(roster.control),
            probe,
            runtime: tokio::runtime::Handle::current(),
            window_bytes,
            started,
            core: Mutex::new(core),
            links: Mutex::new(links),
            notices,
            decided: Mutex::new(HashMap::new()),
            departed: Mutex::default(),
            stopped: std::sync::atomic::AtomicBool::new(false),
            link_views: Mutex::default(),
        });
        for m in roster.members.iter().filter(|m| m.name != me) {
            let Some(addr) = driver.control_addr(&m.name) else { continue };
            tokio::spawn(Arc::clone(&driver).probe_loop(m.name.clone(), addr, probe));
        }
        tokio::spawn(Arc::clone(&driver).tick_loop(probe.tick));
        Ok(driver)
    }

    /// Stops probing and deciding (the node steps down from heading): its stages' leases lapse
    /// within [`stage_service::HEAD_LEASE`], so another head may take them.
    pub fn stop(&self) {
        self.stopped.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn is_stopped(&self) -> bool {
        self.stopped.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn control_addr(&self, name: &str) -> Option<SocketAddr> {
        self.control.lock().unwrap_or_else(|p| p.into_inner()).get(name).copied()
    }

    /// A node that joined after the start (the gossip brought it): probed from now on, taken
    /// into the plan by the core's rules.
    pub fn add_member(self: &Arc<Self>, member: Member, control: SocketAddr) {
        let name = member.name.clone();
        {
            let mut addrs = self.control.lock().unwrap_or_else(|p| p.into_inner());
            if addrs.contains_key(&name) || name == self.me {
                return;
            }
            addrs.insert(name.clone(), control);
        }
        tracing::info!(node = %name, %control, "a new node joined the gossip; probing it");
        eprintln!("baton: node {name} joined the mesh (control plane {control})");
        self.core().add_member(member);
        self.runtime.spawn(Arc::clone(self).probe_loop(name, control, self.probe));
    }

    /// Follows the gossip: new members of this pipeline's replica are added (then probed
    /// directly over mTLS, which decides everything else about them).
    pub async fn follow(self: Arc<Self>, gossip: Arc<crate::gossip::Gossip>, replica: u32, layer_bytes: u64) {
        let mut changes = gossip.subscribe();
        while !self.is_stopped() {
            for info in gossip.members() {
                if info.replica != replica || self.departed.lock().unwrap_or_else(|p| p.into_inner()).contains(&(info.name.clone(), info.generation)) {
                    continue;
                }
                // Speeds weigh the next split (the head's own too).
                if let Some(us) = info.us_per_layer_token {
                    self.core().measured(&info.name, f64::from(us));
                }
                if info.name == self.me {
                    continue;
                }
                // Draining is taken from the node's own (authenticated) pongs, not from gossip,
                // which any member could forge for another.
                let member = Member { name: info.name.clone(), capacity: info.memory_bytes as f64, max_layers: (info.memory_bytes / layer_bytes.max(1)) as usize };
                self.add_member(member, info.control);
            }
            // On every gossip change, and once a second besides.
            if let Ok(Err(_)) = tokio::time::timeout(Duration::from_secs(1), changes.changed()).await {
                return;
            }
        }
    }

    fn now_us(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }

    fn core(&self) -> std::sync::MutexGuard<'_, MeshCore> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes whenever the core decides something (a new plan, or no plan possible).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.notices.subscribe()
    }

    /// The current plan's epoch (`None` while the mesh cannot serve).
    pub fn epoch(&self) -> Option<u64> {
        self.core().plan().map(|p| p.epoch)
    }

    /// The change that produced `epoch`, and when it was decided.
    pub fn change(&self, epoch: u64) -> Option<(PlanChange, Instant)> {
        let change = self.core().history().find(|c| c.epoch == epoch).cloned()?;
        let at = self.decided.lock().unwrap_or_else(|p| p.into_inner()).get(&epoch).copied()?;
        Some((change, at))
    }

    /// The plan to run now, every remote stage connected and attached. A stage that cannot be
    /// reached is reported lost (so the next plan goes around it).
    pub async fn active(&self) -> Result<ActivePlan, MeshError> {
        let plan = {
            let core = self.core();
            match core.plan() {
                Some(p) => p.clone(),
                None => {
                    let missing = core.unserved().unwrap_or(0..0);
                    let lost = core.view().into_iter().filter(|n| n.1 == NodeState::Down).map(|n| n.0).collect();
                    return Err(MeshError::Unservable { missing, lost });
                }
            }
        };
        let local_end = plan.range_of(&self.me).map_or(0, |r| r.end);
        let mut remotes = Vec::new();
        for (name, range) in plan.stages.iter().filter(|(n, _)| *n != self.me) {
            match self.link(name).await {
                Ok(l) => remotes.push((l, range.clone())),
                Err(e) => {
                    self.report_lost(name, plan.epoch);
                    return Err(e);
                }
            }
        }
        Ok(ActivePlan { epoch: plan.epoch, local_end, remotes })
    }

    fn links(&self) -> std::sync::MutexGuard<'_, HashMap<String, StageLink>> {
        self.links.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// This head's name.
    pub fn name(&self) -> &str {
        &self.me
    }

    /// An attached link to stage `name`: the one in use, or a new one (connected and attached
    /// within a second).
    pub async fn link(&self, name: &str) -> Result<StageLink, MeshError> {
        if let Some(l) = self.links().get(name).filter(|l| !l.is_closed()).cloned() {
            return Ok(l);
        }
        let Some(addr) = self.control_addr(name) else {
            return Err(MeshError::PeerLost { stage: name.to_string(), detail: "no control address".into() });
        };
        match connect_stage(&self.node, &self.plane, name, addr, self.window_bytes, Duration::from_secs(1)).await {
            Ok(l) => {
                tracing::info!(stage = %name, transport = l.transport(), "connected a stage link");
                self.links().insert(name.to_string(), l.clone());
                Ok(l)
            }
            Err(e) => Err(MeshError::PeerLost { stage: name.to_string(), detail: e.to_string() }),
        }
    }

    /// The data plane lost `stage` while running `epoch`: decided at once (no waiting for the
    /// probes), unless the plan has moved on already.
    pub fn report_lost(&self, stage: &str, epoch: u64) {
        self.report(epoch, |core, now| core.stage_failed(stage, now));
    }

    /// The stage `stage` of `epoch` answered a step or its `Init` with an engine error: lost
    /// once that keeps happening (`MeshCore::stage_errored`).
    pub fn report_error(&self, stage: &str, epoch: u64) {
        self.report(epoch, |core, now| core.stage_errored(stage, now));
    }

    /// The head's step call to stage `stage` of `epoch` took `wall`, of which the stage
    /// computed `compute`: what the planner weighs a stage starved between steps by.
    pub fn report_timing(&self, stage: &str, epoch: u64, wall: Duration, compute: Duration) {
        let mut core = self.core();
        if core.plan().is_some_and(|p| p.epoch == epoch) {
            core.stage_timed(stage, wall.as_secs_f64() * 1e6, compute.as_secs_f64() * 1e6);
        }
    }

    /// What the data plane saw of a stage of `epoch` (ignored once the plan moved on), decided
    /// at once.
    fn report(&self, epoch: u64, saw: impl FnOnce(&mut MeshCore, u64)) {
        let now = self.now_us();
        let actions = {
            let mut core = self.core();
            if core.plan().is_none_or(|p| p.epoch != epoch) {
                return;
            }
            saw(&mut core, now);
            core.tick(now)
        };
        self.apply(actions);
    }

    /// Every stage of `epoch` answered its `Init`: draining nodes it no longer uses may stop.
    pub fn initialised(self: &Arc<Self>, epoch: u64) {
        let drained = {
            let mut core = self.core();
            core.initialised(epoch);
            core.drained()
        };
        for name in drained {
            self.links().remove(&name);
            let Some(addr) = self.control_addr(&name) else { continue };
            let (node, driver) = (self.node.clone(), self.clone());
            self.runtime.spawn(async move {
                let released = async {
                    let link = node.connect(addr, &name).await?;
                    stage_service::call(&link, &StageRequest::Release).await
                };
                match tokio::time::timeout(Duration::from_secs(2), released).await {
                    Ok(Ok(StageReply::Ack)) => {
                        eprintln!("baton: released drained node {name}");
                        driver.forget(&name);
                    }
                    other => tracing::debug!(node = %name, ?other, "releasing a drained node"),
                }
            });
        }
    }

    /// A released node: no longer probed, shown or taken back (until it starts again).
    fn forget(&self, name: &str) {
        let generation = self.core().view().into_iter().find(|n| n.0 == name).and_then(|n| n.2);
        if !self.core().remove(name) {
            return;
        }
        if let Some(g) = generation {
            self.departed.lock().unwrap_or_else(|p| p.into_inner()).insert((name.to_string(), g));
        }
        self.control.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
        self.links().remove(name);
    }

    fn apply(&self, actions: Vec<Action>) {
        if actions.is_empty() {
            return;
        }
        for a in actions {
            match a {
                Action::Adopt(c) => {
                    if matches!(c.reason, ChangeReason::NodeLost | ChangeReason::NodeRestarted) {
                        let mut links = self.links();
                        for n in &c.nodes {
                            links.remove(n);
                        }
                    }
                    self.decided.lock().unwrap_or_else(|p| p.into_inner()).insert(c.epoch, Instant::now());
                    let detection = c.detection_us.map(|d| format!(" (silent for {} ms)", d / 1000)).unwrap_or_default();
                    tracing::info!(epoch = c.epoch, reason = c.reason.as_str(), nodes = ?c.nodes, "plan change: {}", c.moved);
                    let who = if c.nodes.is_empty() {
                        let core = self.core();
                        let slow: Vec<String> = c.stages.iter().filter(|(n, _)| core.slowdown(n) > 1.0).map(|(n, _)| format!("{n} waited on {:.1}x its compute", core.slowdown(n))).collect();
                        if slow.is_empty() { "by measured speed".to_string() } else { format!("by measured speed; {}", slow.join(", ")) }
                    } else {
                        c.nodes.join(", ")
                    };
                    eprintln!("baton: plan epoch {} ({}: {who}{detection}): {}", c.epoch, c.reason.as_str(), c.moved);
                }
                Action::Unservable { missing, lost } => {
                    let mut links = self.links();
                    for n in &lost {
                        links.remove(n);
                    }
                    drop(links);
                    tracing::warn!(lost = ?lost, "the live nodes cannot hold layers {}..{}", missing.start, missing.end);
                    eprintln!("baton: cannot serve: no live node holds layers {}..{} (lost: {})", missing.start, missing.end, lost.join(", "));
                }
            }
        }
        self.notices.send_modify(|n| *n += 1);
    }

    async fn tick_loop(self: Arc<Self>, every: Duration) {
        let mut t = tokio::time::interval(every);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !self.is_stopped() {
            t.tick().await;
            let now = self.now_us();
            let actions = self.core().tick(now);
            self.apply(actions);
        }
    }

    async fn probe_loop(self: Arc<Self>, name: String, addr: SocketAddr, probe: ProbeConfig) {
        let mut link: Option<PeerLink> = None;
        let mut nonce = 0u64;
        loop {
            // A forgotten node (released after a drain) is probed no more, nor any once stopped.
            if self.is_stopped() || !self.control.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&name) {
                return;
            }
            let started = Instant::now();
            nonce += 1;
            let reconnect = link.as_ref().is_none_or(|l| l.connection.close_reason().is_some());
            let answer = tokio::time::timeout(probe.timeout, ping(&self.node, &self.me, &mut link, &name, addr, nonce)).await;
            let now = self.now_us();
            match answer {
                Ok(Ok((generation, draining, tensor_plane))) => {
                    // The ping's round trip (not one that also connected), smoothed 1/8 per probe.
                    let rtt = started.elapsed().as_secs_f64() * 1e3;
                    let mut views = self.link_views.lock().unwrap_or_else(|p| p.into_inner());
                    let v = views.entry(name.clone()).or_default();
                    if !reconnect {
                        v.rtt_ms = Some(v.rtt_ms.map_or(rtt, |old| old + (rtt - old) / 8.0));
                    }
                    v.tensor_plane = tensor_plane;
                    drop(views);
                    let mut core = self.core();
                    core.probe_ok(&name, generation, now);
                    if draining {
                        core.drain(&name);
                    }
                }
                _ => {
                    // A new process on the same address needs a new connection.
                    link = None;
                    self.core().probe_failed(&name, now);
                }
            }
            tokio::time::sleep_until((started + probe.interval).into()).await;
        }
    }

    /// The view for `baton status` and `/v1/mesh`.
    pub fn status(&self) -> MeshStatus {
        let core = self.core();
        MeshStatus {
            dropped: self.node.drops().snapshot().into_iter().collect(),
            epoch: core.plan().map(|p| p.epoch),
            unserved: core.unserved().map(|r| [r.start, r.end]),
            nodes: core
                .view()
                .into_iter()
                .map(|(name, state, generation, layers)| {
                    let link = self.link_views.lock().unwrap_or_else(|p| p.into_inner()).get(&name).cloned().unwrap_or_default();
                    NodeStatus {
                    state: match state {
                        NodeState::Up { .. } if layers.is_some() => "serving",
                        NodeState::Up { .. } => "spare",
                        NodeState::Down => "down",
                    },
                    us_per_layer_token: core.us_per_layer_token(&name),
                    slowdown: core.slowdown(&name),
                    link_ms: link.rtt_ms,
                    call_compute_ms: core.call_means_us(&name).map(|(c, _)| c / 1e3),
                    call_transfer_ms: core.call_means_us(&name).map(|(_, t)| t / 1e3),
                    tensor_plane: (!link.tensor_plane.is_empty()).then_some(link.tensor_plane),
                    name,
                    generation,
                    layers: layers.map(|r| [r.start, r.end]),
                }})
                .collect(),
            changes: core
                .history()
                .map(|c| ChangeStatus {
                    epoch: c.epoch,
                    reason: c.reason.as_str(),
                    nodes: c.nodes.clone(),
                    at_s: c.at_us as f64 / 1e6,
                    detection_ms: c.detection_us.map(|d| d as f64 / 1e3),
                    moved: c.moved.clone(),
                })
                .collect(),
        }
    }
}

/// One probe by head `me`: (re)connects if needed, pings, returns the node's generation,
/// whether it is draining, and its tensor plane. A node that serves another live head, or heads a pipeline itself, is
/// no stage of `me`'s (a probe failure) until that head's lease on it lapses.
async fn ping(node: &ControlNode, me: &str, link: &mut Option<PeerLink>, name: &str, addr: SocketAddr, nonce: u64) -> Result<(u64, bool, String), ControlError> {
    if node.is_revoked(name) {
        // A revoked node's open link is dropped, and no new one is made.
        *link = None;
        return Err(ControlError::Refused(format!("{name}'s certificate is revoked")));
    }
    let l = match link {
        Some(l) if l.connection.close_reason().is_none() => l.clone(),
        _ => {
            let l = node.connect(addr, name).await?;
            *link = Some(l.clone());
            l
        }
    };
    match stage_service::call(&l, &StageRequest::Ping { nonce }).await? {
        // Another pipeline's head (a node that took over while this one was away or cut off)
        // is no stage, nor a stage another head holds.
        StageReply::Pong { head, .. } if head == name => Err(ControlError::Protocol(format!("{name} heads a pipeline itself"))),
        StageReply::Pong { head, .. } if !head.is_empty() && head != me => Err(ControlError::Protocol(format!("{name} serves the pipeline head {head}"))),
        StageReply::Pong { nonce: n, generation, draining, tensor_plane, .. } if n == nonce => Ok((generation, draining, tensor_plane)),
        other => Err(ControlError::Protocol(format!("{name} answered a ping with {other:?}"))),
    }
}

/// Connects to stage `name` (retrying until `patience` runs out) and agrees on the tensor plane.
pub async fn connect_stage(node: &ControlNode, plane: &TensorPlane, name: &str, addr: SocketAddr, window_bytes: usize, patience: Duration) -> Result<StageLink, ControlError> {
    let deadline = Instant::now() + patience;
    let link = loop {
        match tokio::time::timeout(Duration::from_secs(1), node.connect(addr, name)).await {
            Ok(Ok(l)) => break l,
            Ok(Err(e)) if Instant::now() >= deadline => return Err(e),
            Err(_) if Instant::now() >= deadline => {
                return Err(ControlError::Connect { peer: name.to_string(), message: format!("no answer from {addr}") });
            }
            _ => {
                tracing::debug!(peer = %name, "waiting for a stage");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    StageLink::attach(link, plane, window_bytes).await
}
