//! The elastic mesh's decisions, pure: probe answers, probe failures and data-plane failures
//! come in with `now` (µs of virtual or real time); plan changes come out. No I/O, no clock, no
//! tokio: `membership.rs` is the shell that probes the nodes, feeds this core and carries out
//! what it decides.
//!
//! Rules:
//! - A node of the plan that has not answered a probe for `dead_after_us` (or whose data-plane
//!   link broke) is lost; the survivors next to its layer range take the range over (the gap is
//!   split between the two neighbours in proportion to their weight), so no other stage moves.
//! - A node of the plan that answers with a new generation (its process restarted) lost its
//!   KV cache and layers: the plan is re-issued under a new epoch, every stage re-initialised.
//! - A node outside the plan that has answered every probe for `rejoin_after_us` (doubled after
//!   each loss of that node, so a flapping node is taken back less and less often) is taken in
//!   when the rebalanced plan's slowest stage is at most `improvement` times the current one's
//!   (Petals' hysteresis).
//! - A node of the plan that asks to leave (drain) is re-placed the way a lost one is, while it
//!   still serves; it is never taken back, and `drained` says when it may stop.
//! - Nodes that join after the start (`add_member`, from the gossip) wait like returning ones.
//! - A node's weight is its measured speed (1 / µs per layer per token, which every node
//!   publishes) once every live node's is known, else its memory; memory caps every share. A split
//!   of the same nodes by speed is taken when it makes the slowest stage faster by the same
//!   threshold, has done so for `rebalance_after_us` and the last change is
//!   `rebalance_every_us` old (noise in the measurements makes no churn).
//! - A stage the head waits on longer than its own compute and its link take (starved between
//!   steps: `slowdown.rs` measures the head's calls to it) is weighed slower by that factor,
//!   once it is `SlowConfig::factor` times the other stages' and stalls `min_stall_us` a call;
//!   the factor is held and decays slowly, so the split by speed moves layers off it and does
//!   not hand them straight back.
//! - When the live nodes cannot hold every layer, there is no plan (`unserved` says which
//!   layers lack a home) until capacity returns.
//! - The head (this node) is never lost in its own view; a dead head is the next issue's work.

use std::collections::VecDeque;
use std::ops::Range;

mod slowdown;

pub use slowdown::SlowConfig;
use slowdown::CallMeter;

/// A node the planner may place layers on.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub name: String,
    /// Relative size (memory): layers are split in proportion to it until speeds are measured.
    pub capacity: f64,
    /// The most layers the node's memory holds.
    pub max_layers: usize,
}

/// One pipeline's stages in order, under an epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub epoch: u64,
    pub stages: Vec<(String, Range<usize>)>,
}

impl Plan {
    pub fn range_of(&self, name: &str) -> Option<Range<usize>> {
        self.stages.iter().find(|(n, _)| n == name).map(|(_, r)| r.clone())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ChangeReason {
    /// A node of the plan stopped answering or its link broke.
    NodeLost,
    /// A node of the plan came back as a new process.
    NodeRestarted,
    /// A node outside the plan was taken in.
    NodeJoined,
    /// Capacity came back after the live nodes could not hold the model.
    CapacityReturned,
    /// A node of the plan asked to leave: its layers moved while it still served.
    NodeDrained,
    /// The nodes' measured speeds call for another split of the same nodes.
    Rebalanced,
}

impl ChangeReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeReason::NodeLost => "node_lost",
            ChangeReason::NodeRestarted => "node_restarted",
            ChangeReason::NodeJoined => "node_joined",
            ChangeReason::CapacityReturned => "capacity_returned",
            ChangeReason::NodeDrained => "node_drained",
            ChangeReason::Rebalanced => "rebalanced",
        }
    }

    /// A change with every stage of the old plan alive: the running sequences' KV can move
    /// with their layers instead of being recomputed.
    pub fn is_planned(self) -> bool {
        matches!(self, ChangeReason::NodeJoined | ChangeReason::NodeDrained | ChangeReason::Rebalanced)
    }
}

/// A plan change, as logged and shown by `baton status`.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanChange {
    pub epoch: u64,
    pub reason: ChangeReason,
    /// The nodes that caused it.
    pub nodes: Vec<String>,
    pub at_us: u64,
    /// For a loss: time from the node's last answer to the decision.
    pub detection_us: Option<u64>,
    /// Human-readable: what moved.
    pub moved: String,
    pub stages: Vec<(String, Range<usize>)>,
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Serve under this plan from now on (re-initialise its stages, re-queue what was running).
    Adopt(PlanChange),
    /// The live nodes cannot hold these layers: answer 503 until capacity returns.
    Unservable { missing: Range<usize>, lost: Vec<String> },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CoreConfig {
    pub dead_after_us: u64,
    pub rejoin_after_us: u64,
    /// A join is taken when the new slowest stage costs at most this fraction of the old.
    pub improvement: f64,
    /// How many plan changes `history` keeps.
    pub history: usize,
    /// A split by measured speed is taken once it has been better (by `improvement`) for this
    /// long without a break, and no sooner than `rebalance_every_us` after the last change.
    pub rebalance_after_us: u64,
    pub rebalance_every_us: u64,
    /// Whether splits by measured speed are taken at all (cluster.toml `placement.rebalance`).
    pub rebalance_by_speed: bool,
    /// The shell's tick period: a tick that comes much later than this says the detector
    /// itself was starved (a busy or paused head), not that its stages went silent.
    pub tick_us: u64,
    /// A stage whose engine failed this many steps within `error_window_us` (its process
    /// answering all along) is lost, as a silent one is.
    pub errors_to_fail: u32,
    pub error_window_us: u64,
    /// When the head's calls to a stage make it a slow one.
    pub slow: SlowConfig,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            dead_after_us: 800_000,
            rejoin_after_us: 1_000_000,
            improvement: 0.75,
            history: 16,
            rebalance_after_us: 10_000_000,
            rebalance_every_us: 30_000_000,
            rebalance_by_speed: true,
            tick_us: 50_000,
            errors_to_fail: 3,
            error_window_us: 30_000_000,
            slow: SlowConfig::default(),
        }
    }
}

/// What the core knows of one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    /// Answering; `since`: first answer of the current run of answers.
    Up { since: u64 },
    /// Not answering (or never answered).
    Down,
}

#[derive(Debug, Clone)]
struct Node {
    member: Member,
    state: NodeState,
    last_ok: Option<u64>,
    generation: Option<u64>,
    /// The generation the current plan initialised this node at.
    planned_generation: Option<u64>,
    losses: u32,
    /// A data-plane failure reported since the last tick.
    failed: bool,
    /// The node asked to leave: it is moved out of the plan and never taken back.
    draining: bool,
    /// Its measured time per layer per token (µs), as it last published it.
    us_per_layer_token: Option<f64>,
    /// When its engine failed a step lately (within the error window).
    errors: Vec<u64>,
    /// The head's calls to it under the current plan.
    calls: CallMeter,
    /// Its held slowdown factor (1: not slow), as of `slowdown_at`.
    slowdown: f64,
    slowdown_at: u64,
}

/// The membership view and the plan of one pipeline, headed by `head`.
#[derive(Debug)]
pub struct MeshCore {
    head: String,
    num_layers: usize,
    config: CoreConfig,
    nodes: Vec<Node>,
    plan: Option<Plan>,
    next_epoch: u64,
    unserved: Option<Range<usize>>,
    /// The nodes lost since the mesh last had a plan.
    unserved_lost: Vec<String>,
    history: VecDeque<PlanChange>,
    /// When the last plan change was decided.
    changed_at: u64,
    /// Since when a split by measured speed has been better than the plan's (by the threshold).
    better_since: Option<u64>,
    /// When the last tick ran.
    last_tick: Option<u64>,
    /// The detector's own health (Lifeguard's local health multiplier): 0 while its ticks come
    /// on time, up to `MAX_LOCAL_HEALTH` while they come late; silence must last
    /// `dead_after_us * (1 + local_health)` to be a loss.
    local_health: u32,
    /// Ticks on time in a row (every `HEALTH_RECOVERY` of them lowers `local_health` by one).
    timely_ticks: u32,
}

/// The most `dead_after_us` is stretched by a starved detector: nine times.
pub const MAX_LOCAL_HEALTH: u32 = 8;
/// Ticks on time, in a row, that earn back one step of local health (a second at 50 ms).
const HEALTH_RECOVERY: u32 = 20;

impl MeshCore {
    /// `roster`: every node of the pipeline, the head among them; `initial`: the plan the mesh
    /// starts with (epoch 1 at a cold start; above the dead head's after a succession), every
    /// node of which is taken to be up at `now`.
    pub fn new(head: &str, roster: Vec<Member>, num_layers: usize, initial: Plan, config: CoreConfig, now: u64) -> Self {
        let nodes = roster
            .into_iter()
            .map(|member| {
                let planned = member.name == head || initial.stages.iter().any(|(n, _)| *n == member.name);
                Node {
                    member,
                    state: if planned { NodeState::Up { since: now } } else { NodeState::Down },
                    last_ok: planned.then_some(now),
                    generation: None,
                    planned_generation: None,
                    losses: 0,
                    failed: false,
                    draining: false,
                    us_per_layer_token: None,
                    errors: Vec::new(),
                    calls: CallMeter::default(),
                    slowdown: 1.0,
                    slowdown_at: 0,
                }
            })
            .collect();
        MeshCore {
            head: head.to_string(),
            num_layers,
            config,
            nodes,
            next_epoch: initial.epoch + 1,
            plan: Some(initial),
            unserved: None,
            unserved_lost: Vec::new(),
            history: VecDeque::new(),
            changed_at: now,
            better_since: None,
            last_tick: None,
            local_health: 0,
            timely_ticks: 0,
        }
    }

    pub fn plan(&self) -> Option<&Plan> {
        self.plan.as_ref()
    }

    /// The layers no live node can hold, while the mesh cannot serve.
    pub fn unserved(&self) -> Option<Range<usize>> {
        self.unserved.clone()
    }

    pub fn history(&self) -> impl Iterator<Item = &PlanChange> {
        self.history.iter()
    }

    pub fn config(&self) -> CoreConfig {
        self.config
    }

    /// Every node: name, state, generation, layers in the plan.
    pub fn view(&self) -> Vec<(String, NodeState, Option<u64>, Option<Range<usize>>)> {
        self.nodes
            .iter()
            .map(|n| (n.member.name.clone(), n.state, n.generation, self.plan.as_ref().and_then(|p| p.range_of(&n.member.name))))
            .collect()
    }

    fn node_mut(&mut self, name: &str) -> Option<&mut Node> {
        self.nodes.iter_mut().find(|n| n.member.name == name)
    }

    fn in_plan(&self, name: &str) -> bool {
        self.plan.as_ref().is_some_and(|p| p.range_of(name).is_some())
    }

    /// A node that joined after the start (through the gossip): it is taken in once it has
    /// answered probes long enough, as any returning node. Known names are left as they are.
    pub fn add_member(&mut self, member: Member) {
        if self.nodes.iter().any(|n| n.member.name == member.name) {
            return;
        }
        self.nodes.push(Node {
            member,
            state: NodeState::Down,
            last_ok: None,
            generation: None,
            planned_generation: None,
            losses: 0,
            failed: false,
            draining: false,
            us_per_layer_token: None,
            errors: Vec::new(),
            calls: CallMeter::default(),
            slowdown: 1.0,
            slowdown_at: 0,
        });
    }

    /// `name` measured `us_per_layer_token` µs per layer per token in its transformer layers
    /// (every stage of the pipeline runs the same steps, so these compare the nodes). Once
    /// every live node is measured, layers are split by speed instead of by memory; memory
    /// still caps each node's share.
    pub fn measured(&mut self, name: &str, us_per_layer_token: f64) {
        if let Some(n) = self.node_mut(name).filter(|_| us_per_layer_token.is_finite() && us_per_layer_token > 0.0) {
            n.us_per_layer_token = Some(us_per_layer_token);
        }
    }

    /// The head's call to stage `name` took `wall_us`, of which the stage computed
    /// `compute_us` (see `slowdown.rs`).
    pub fn stage_timed(&mut self, name: &str, wall_us: f64, compute_us: f64) {
        if name == self.head {
            return;
        }
        if let Some(n) = self.node_mut(name) {
            n.calls.record(wall_us, compute_us);
        }
    }

    /// The head's recent calls to stage `name`: mean compute and mean time beyond it per call
    /// (µs), once it has called it.
    pub fn call_means_us(&self, name: &str) -> Option<(f64, f64)> {
        self.nodes.iter().find(|n| n.member.name == name)?.calls.means_us()
    }

    /// The factor `name`'s speed is divided by because the head waits on it (1: not slow).
    pub fn slowdown(&self, name: &str) -> f64 {
        self.nodes.iter().find(|n| n.member.name == name).map_or(1.0, |n| n.slowdown)
    }

    /// Brings every node's held slowdown to `now` and raises it where the head's calls to a
    /// stage of the plan make that stage `factor` times slower than the least slow other one.
    fn weigh_calls(&mut self, now: u64) {
        let slow = self.config.slow;
        let head = self.head.clone();
        let planned: Vec<String> = self.plan.as_ref().map(|p| p.stages.iter().map(|(n, _)| n.clone()).filter(|n| *n != head).collect()).unwrap_or_default();
        let measured: Vec<(String, f64, f64)> = self
            .nodes
            .iter()
            .filter(|n| planned.contains(&n.member.name))
            .filter_map(|n| Some((n.member.name.clone(), n.calls.slowdown()?, n.calls.stall_per_call_us()?)))
            .collect();
        for n in &mut self.nodes {
            n.slowdown = slowdown::decayed(n.slowdown, n.slowdown_at, now, slow.half_life_us);
            n.slowdown_at = now;
            let Some((_, f, stall)) = measured.iter().find(|(name, _, _)| *name == n.member.name) else { continue };
            let reference = measured.iter().filter(|(name, _, _)| *name != n.member.name).map(|(_, f, _)| *f).fold(f64::INFINITY, f64::min);
            let relative = f / if reference.is_finite() { reference.max(1.0) } else { 1.0 };
            if relative >= slow.factor && *stall >= slow.min_stall_us && relative > n.slowdown {
                n.slowdown = relative;
            }
        }
    }

    /// What `name` last reported of its speed.
    pub fn us_per_layer_token(&self, name: &str) -> Option<f64> {
        self.nodes.iter().find(|n| n.member.name == name)?.us_per_layer_token
    }

    /// The weight `name`'s share of the layers is proportional to: its speed (layers per µs
    /// per token) once every live node has measured one (a node just joining has not: until
    /// it has, memory decides, rather than a guess), its memory-based capacity otherwise.
    fn weight(&self, name: &str) -> Option<f64> {
        let node = self.nodes.iter().find(|n| n.member.name == name)?;
        let live = |n: &&Node| n.member.name == self.head || matches!(n.state, NodeState::Up { .. });
        let by_speed = self.nodes.iter().filter(live).all(|n| n.us_per_layer_token.is_some());
        match node.us_per_layer_token {
            Some(us) if by_speed => Some(1.0 / (us * node.slowdown)),
            _ => Some(node.member.capacity.max(f64::MIN_POSITIVE)),
        }
    }

    /// `name` asked to leave: its layers move at the next tick (while it still serves them).
    pub fn drain(&mut self, name: &str) {
        let head = self.head.clone();
        if let Some(n) = self.node_mut(name).filter(|n| n.member.name != head) {
            n.draining = true;
        }
    }

    /// Forgets `name` (a drained node that was released): it is no longer probed or shown. The
    /// head and nodes of the plan are kept; returns whether it was forgotten.
    pub fn remove(&mut self, name: &str) -> bool {
        if name == self.head || self.in_plan(name) {
            return false;
        }
        let before = self.nodes.len();
        self.nodes.retain(|n| n.member.name != name);
        self.nodes.len() != before
    }

    /// Draining nodes the plan no longer uses: they may stop.
    pub fn drained(&self) -> Vec<String> {
        self.nodes.iter().filter(|n| n.draining && !self.in_plan(&n.member.name)).map(|n| n.member.name.clone()).collect()
    }

    /// `name` answered a probe; `generation` identifies its process.
    pub fn probe_ok(&mut self, name: &str, generation: u64, now: u64) {
        let in_plan = self.in_plan(name);
        let Some(n) = self.node_mut(name) else { return };
        n.last_ok = Some(now);
        if n.state == NodeState::Down {
            n.state = NodeState::Up { since: now };
        }
        if n.generation.is_none() && in_plan && n.planned_generation.is_none() {
            // First answer of a node the initial plan holds: this is the process it runs on.
            n.planned_generation = Some(generation);
        }
        n.generation = Some(generation);
    }

    /// A probe of `name` failed (no answer in time, connection refused).
    pub fn probe_failed(&mut self, name: &str, _now: u64) {
        let in_plan = self.in_plan(name);
        let Some(n) = self.node_mut(name) else { return };
        // A node outside the plan must answer without a break to be taken in.
        if !in_plan {
            n.state = NodeState::Down;
        }
    }

    /// The data plane lost `name` (its link broke mid-call): lost at the next tick.
    pub fn stage_failed(&mut self, name: &str, _now: u64) {
        let head = self.head.clone();
        if name == head {
            return;
        }
        if let Some(n) = self.node_mut(name) {
            n.failed = true;
        }
    }

    /// `name`'s engine failed a step or a load (it answered with an error: its process lives):
    /// after `errors_to_fail` of them within `error_window_us` it is lost at the next tick, as
    /// a silent node is, and taken back only after the rejoin wait (which doubles each time).
    pub fn stage_errored(&mut self, name: &str, now: u64) {
        if name == self.head {
            return;
        }
        let (limit, window) = (self.config.errors_to_fail.max(1) as usize, self.config.error_window_us);
        if let Some(n) = self.node_mut(name) {
            n.errors.retain(|&t| now.saturating_sub(t) < window);
            n.errors.push(now);
            if n.errors.len() >= limit {
                n.failed = true;
                n.errors.clear();
            }
        }
    }

    /// The detector's own health now (0: its ticks come on time; see [`MAX_LOCAL_HEALTH`]).
    pub fn local_health(&self) -> u32 {
        self.local_health
    }

    /// Lifeguard's local health, from when this tick came: a tick late by more than a tick
    /// period means the detector was starved (its probes' answers could not be read either),
    /// so every node is credited the time it lost, and the health worsens by one (by two past
    /// the loss threshold); ticks on time earn it back slowly.
    fn account_for_own_lateness(&mut self, now: u64) {
        let Some(last) = self.last_tick.replace(now) else { return };
        let late = now.saturating_sub(last).saturating_sub(self.config.tick_us);
        if late > self.config.tick_us {
            for n in &mut self.nodes {
                if let Some(t) = n.last_ok.as_mut() {
                    *t = t.saturating_add(late).min(now);
                }
            }
            let step = if late > self.config.dead_after_us { 2 } else { 1 };
            self.local_health = (self.local_health + step).min(MAX_LOCAL_HEALTH);
            self.timely_ticks = 0;
        } else if self.local_health > 0 {
            self.timely_ticks += 1;
            if self.timely_ticks >= HEALTH_RECOVERY {
                self.local_health -= 1;
                self.timely_ticks = 0;
            }
        }
    }

    /// The plan the shell just initialised every stage of: remembers each node's generation.
    pub fn initialised(&mut self, epoch: u64) {
        if self.plan.as_ref().is_none_or(|p| p.epoch != epoch) {
            return;
        }
        for n in &mut self.nodes {
            n.planned_generation = n.generation.or(n.planned_generation);
        }
    }

    fn rejoin_after(&self, n: &Node) -> u64 {
        self.config.rejoin_after_us.saturating_mul(1 << n.losses.min(6))
    }

    /// Decides: returns what changed since the last tick.
    pub fn tick(&mut self, now: u64) -> Vec<Action> {
        self.account_for_own_lateness(now);
        self.weigh_calls(now);
        let head = self.head.clone();
        let dead_after = self.config.dead_after_us.saturating_mul(1 + self.local_health as u64);
        // 1. Losses among the plan's nodes.
        let mut lost: Vec<(String, Option<u64>)> = Vec::new();
        let mut restarted: Vec<String> = Vec::new();
        let planned: Vec<String> = self.plan.as_ref().map(|p| p.stages.iter().map(|(n, _)| n.clone()).collect()).unwrap_or_default();
        for n in &mut self.nodes {
            let name = &n.member.name;
            if *name == head {
                n.failed = false;
                continue;
            }
            let silent = n.last_ok.is_none_or(|t| now.saturating_sub(t) > dead_after);
            if n.failed || silent {
                if n.state != NodeState::Down || n.failed {
                    if planned.contains(name) {
                        lost.push((name.clone(), n.last_ok.map(|t| now.saturating_sub(t))));
                        n.losses += 1;
                    }
                    n.state = NodeState::Down;
                }
                n.failed = false;
                if silent {
                    n.last_ok = None;
                }
                n.planned_generation = None;
                continue;
            }
            if planned.contains(name) && n.planned_generation.is_some() && n.generation != n.planned_generation {
                restarted.push(name.clone());
            }
        }
        let mut actions = Vec::new();
        if !lost.is_empty() {
            let names: Vec<String> = lost.iter().map(|(n, _)| n.clone()).collect();
            let detection = lost.iter().filter_map(|(_, d)| *d).max();
            let next = self.replace(&names);
            match next {
                Some(stages) => actions.push(self.adopt(stages, ChangeReason::NodeLost, names, detection, now)),
                None => actions.push(self.unservable(names)),
            }
            return actions;
        }
        if !restarted.is_empty() {
            if let Some(p) = &self.plan {
                let stages = p.stages.clone();
                actions.push(self.adopt(stages, ChangeReason::NodeRestarted, restarted, None, now));
            }
            return actions;
        }
        // A draining node of the plan: the same re-placement as a loss, but while it still
        // serves (add before drop); if the others cannot hold its layers it stays.
        let leaving: Vec<String> = self.nodes.iter().filter(|n| n.draining && planned.contains(&n.member.name)).map(|n| n.member.name.clone()).collect();
        if !leaving.is_empty() {
            let next = self.replace(&leaving);
            if let Some(stages) = next {
                actions.push(self.adopt(stages, ChangeReason::NodeDrained, leaving, None, now));
                return actions;
            }
        }
        // 2. Capacity back after an unservable spell, or a node to take in.
        let candidates: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| !planned.contains(&n.member.name) && !n.draining)
            .filter(|n| matches!(n.state, NodeState::Up { since } if now.saturating_sub(since) >= self.rejoin_after(n)))
            .map(|n| n.member.name.clone())
            .collect();
        if self.plan.is_none() {
            if let Some(stages) = self.rebalance(&candidates) {
                // Name the nodes that came back, not the survivors that never left.
                let back: Vec<String> = self.unserved_lost.iter().filter(|n| candidates.contains(n)).cloned().collect();
                actions.push(self.adopt(stages, ChangeReason::CapacityReturned, back, None, now));
            }
            return actions;
        }
        if !candidates.is_empty() {
            let current = self.plan.as_ref().map(|p| self.slowest(&p.stages)).unwrap_or(f64::INFINITY);
            if let Some(stages) = self.rebalance(&candidates) {
                if self.slowest(&stages) <= self.config.improvement * current {
                    actions.push(self.adopt(stages, ChangeReason::NodeJoined, candidates, None, now));
                    return actions;
                }
            }
        }
        // 3. The same nodes split by their measured speeds (and how long the head waits on
        // each), when that is better by the threshold for long enough.
        if let Some(stages) = self.speed_split(now) {
            actions.push(self.adopt(stages, ChangeReason::Rebalanced, Vec::new(), None, now));
        }
        actions
    }

    /// A split of the plan's nodes by measured speed, once it has made the slowest stage
    /// faster by the threshold for `rebalance_after_us` and the last change is
    /// `rebalance_every_us` old; `None` otherwise (and the wait starts again whenever it is
    /// not better).
    fn speed_split(&mut self, now: u64) -> Option<Vec<(String, Range<usize>)>> {
        if !self.config.rebalance_by_speed {
            return None;
        }
        let plan = self.plan.as_ref()?;
        let all_measured = plan.stages.iter().all(|(n, _)| self.nodes.iter().any(|m| m.member.name == *n && m.us_per_layer_token.is_some()));
        let better = all_measured
            .then(|| self.rebalance(&[]))
            .flatten()
            .filter(|s| *s != plan.stages && self.slowest(s) <= self.config.improvement * self.slowest(&plan.stages));
        let Some(stages) = better else {
            self.better_since = None;
            return None;
        };
        let since = *self.better_since.get_or_insert(now);
        let held = now.saturating_sub(since) >= self.config.rebalance_after_us;
        let settled = now.saturating_sub(self.changed_at) >= self.config.rebalance_every_us;
        (held && settled).then_some(stages)
    }

    /// A plan without `gone`: the neighbours take their ranges; else a fresh split over the
    /// rest of the plan; else one that also takes in the live nodes waiting outside the plan
    /// (better than a 503). `None` when none of these holds the model.
    fn replace(&self, gone: &[String]) -> Option<Vec<(String, Range<usize>)>> {
        let plan = self.plan.as_ref()?;
        let waiting: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| !n.draining && plan.range_of(&n.member.name).is_none() && matches!(n.state, NodeState::Up { .. }))
            .map(|n| n.member.name.clone())
            .collect();
        self.repair(&plan.stages, gone).or_else(|| self.rebalance_without(&[], gone)).or_else(|| self.rebalance_without(&waiting, gone))
    }

    fn member(&self, name: &str) -> Option<&Member> {
        self.nodes.iter().find(|n| n.member.name == name).map(|n| &n.member)
    }

    /// The cost of the slowest stage: layers over weight.
    fn slowest(&self, stages: &[(String, Range<usize>)]) -> f64 {
        stages.iter().map(|(n, r)| r.len() as f64 / self.weight(n).unwrap_or(f64::MIN_POSITIVE)).fold(0.0, f64::max)
    }

    /// The survivors next to each lost range take it over (split between the two neighbours in
    /// proportion to their weight; the last survivor takes a gap at the end); `None` when a
    /// neighbour cannot hold its share.
    fn repair(&self, stages: &[(String, Range<usize>)], lost: &[String]) -> Option<Vec<(String, Range<usize>)>> {
        let mut alive: Vec<(String, Range<usize>)> = stages.iter().filter(|(n, _)| !lost.contains(n)).cloned().collect();
        if alive.first().is_none_or(|(_, r)| r.start != 0) {
            return None;
        }
        for i in 0..alive.len() {
            let next_start = alive.get(i + 1).map_or(self.num_layers, |(_, r)| r.start);
            let gap = next_start.checked_sub(alive[i].1.end)?;
            if gap == 0 {
                continue;
            }
            if i + 1 == alive.len() {
                alive[i].1.end = self.num_layers;
                continue;
            }
            let (a, b) = (self.weight(&alive[i].0)?, self.weight(&alive[i + 1].0)?);
            let to_left = ((gap as f64) * a / (a + b)).round() as usize;
            alive[i].1.end += to_left.min(gap);
            alive[i + 1].1.start = alive[i].1.end;
        }
        for (name, r) in &alive {
            if r.is_empty() || r.len() > self.member(name)?.max_layers {
                return None;
            }
        }
        Some(alive)
    }

    /// A fresh plan over the head, the live nodes of the current plan and `extra`, in roster
    /// order after the head, split in proportion to
    /// their weight within each node's memory; `None` when they cannot hold the model.
    fn rebalance(&self, extra: &[String]) -> Option<Vec<(String, Range<usize>)>> {
        self.rebalance_without(extra, &[])
    }

    /// [`Self::rebalance`] leaving out `without`.
    fn rebalance_without(&self, extra: &[String], without: &[String]) -> Option<Vec<(String, Range<usize>)>> {
        let mut names: Vec<String> = vec![self.head.clone()];
        for n in &self.nodes {
            let name = &n.member.name;
            let planned = self.plan.as_ref().is_some_and(|p| p.range_of(name).is_some());
            let wanted = extra.contains(name) || (planned && self.is_up(name));
            if *name != self.head && wanted && !without.contains(name) {
                names.push(name.clone());
            }
        }
        let members: Vec<&Member> = names.iter().filter_map(|n| self.member(n)).collect();
        let weights: Vec<(f64, usize)> = members.iter().map(|m| (self.weight(&m.name).unwrap_or(f64::MIN_POSITIVE), m.max_layers)).collect();
        let counts = split_capped(self.num_layers, &weights)?;
        let mut start = 0;
        Some(
            members
                .iter()
                .zip(counts)
                .filter(|(_, c)| *c > 0)
                .map(|(m, c)| {
                    let r = start..start + c;
                    start += c;
                    (m.name.clone(), r)
                })
                .collect(),
        )
    }

    fn is_up(&self, name: &str) -> bool {
        self.nodes.iter().any(|n| n.member.name == name && matches!(n.state, NodeState::Up { .. }))
    }

    fn adopt(&mut self, stages: Vec<(String, Range<usize>)>, reason: ChangeReason, nodes: Vec<String>, detection_us: Option<u64>, now: u64) -> Action {
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        let moved = describe_move(self.plan.as_ref().map_or(&[][..], |p| &p.stages[..]), &stages);
        self.changed_at = now;
        self.better_since = None;
        self.plan = Some(Plan { epoch, stages: stages.clone() });
        self.unserved = None;
        self.unserved_lost.clear();
        for n in &mut self.nodes {
            // Each node's process as of this plan; a later generation is a restart. The
            // head's calls under the old plan say nothing of the new one's stages.
            n.planned_generation = n.generation;
            n.calls = CallMeter::default();
        }
        let change = PlanChange { epoch, reason, nodes, at_us: now, detection_us, moved, stages };
        self.history.push_back(change.clone());
        while self.history.len() > self.config.history {
            self.history.pop_front();
        }
        Action::Adopt(change)
    }

    fn unservable(&mut self, lost: Vec<String>) -> Action {
        // What the head and every live node could hold, against the model.
        let capacity: usize = self
            .nodes
            .iter()
            .filter(|n| n.member.name == self.head || (matches!(n.state, NodeState::Up { .. }) && !lost.contains(&n.member.name)))
            .map(|n| n.member.max_layers)
            .sum();
        let missing = capacity.min(self.num_layers)..self.num_layers;
        self.plan = None;
        self.unserved = Some(missing.clone());
        for n in &lost {
            if !self.unserved_lost.contains(n) {
                self.unserved_lost.push(n.clone());
            }
        }
        Action::Unservable { missing, lost }
    }
}

/// `num_layers` split in proportion to capacity (in order), no node above its maximum; with
/// fewer layers than nodes the first nodes take one each and the rest none. `None` when the
/// maxima add up to less than the model.
pub fn split_capped(num_layers: usize, nodes: &[(f64, usize)]) -> Option<Vec<usize>> {
    if nodes.is_empty() || nodes.iter().map(|n| n.1).sum::<usize>() < num_layers {
        return None;
    }
    let cap = |i: usize| nodes[i].0.max(f64::MIN_POSITIVE);
    let mut counts = vec![0usize; nodes.len()];
    let mut open: Vec<usize> = (0..nodes.len()).filter(|&i| nodes[i].1 > 0).collect();
    loop {
        let left = num_layers - counts.iter().sum::<usize>();
        if left == 0 || open.is_empty() {
            return (left == 0).then_some(counts);
        }
        open.truncate(left);
        let total: f64 = open.iter().map(|&i| cap(i)).sum();
        let over: Vec<usize> = open.iter().copied().filter(|&i| left as f64 * cap(i) / total > nodes[i].1 as f64).collect();
        if over.is_empty() {
            let caps: Vec<f64> = open.iter().map(|&i| cap(i)).collect();
            let split = crate::placement::split_layers(left, &caps).ok()?;
            for (k, &i) in open.iter().enumerate() {
                counts[i] = split[k].len();
            }
            // Rounding may put one layer over a maximum: move it to a node with room.
            while let Some(i) = open.iter().copied().find(|&i| counts[i] > nodes[i].1) {
                let j = (0..nodes.len()).find(|&j| counts[j] < nodes[j].1)?;
                counts[i] -= 1;
                counts[j] += 1;
            }
            return Some(counts);
        }
        for &i in &over {
            counts[i] = nodes[i].1;
        }
        open.retain(|i| !over.contains(i));
    }
}

/// A pipeline head died: the plan its successor starts with. `stages` are the surviving stages
/// of the dead head's plan (epoch `epoch`) as far as `me` knows them, `me` among them. The
/// successor is the survivor holding the lowest layers (the dead head's neighbour): `None` for
/// any other node. It takes the dead head's layers on top of its own, so no other stage moves;
/// if its memory cannot hold them, the contiguous chain of survivors from it is split again by
/// capacity. The new plan's epoch is above the dead head's, so every stage refuses what the
/// old head might still send.
pub fn succession(me: &str, epoch: u64, stages: &[(String, Range<usize>)], members: &[Member], num_layers: usize) -> Option<Plan> {
    let mut sorted: Vec<&(String, Range<usize>)> = stages.iter().collect();
    sorted.sort_by_key(|(n, r)| (r.start, n.clone()));
    let (first, mine) = sorted.first()?;
    if first != me || mine.start == 0 {
        return None;
    }
    // The survivors that follow on without a gap.
    let mut chain: Vec<(String, Range<usize>)> = Vec::new();
    for (n, r) in sorted {
        match chain.last() {
            None => chain.push((n.clone(), r.clone())),
            Some((_, prev)) if prev.end == r.start => chain.push((n.clone(), r.clone())),
            Some(_) => break,
        }
    }
    let member = |n: &str| members.iter().find(|m| m.name == n);
    let my_max = member(me)?.max_layers;
    let reaches_end = chain.last().is_some_and(|(_, r)| r.end == num_layers);
    let stages = if reaches_end && my_max >= mine.end {
        let mut out = chain;
        out[0].1 = 0..mine.end;
        out
    } else {
        let known: Vec<&Member> = chain.iter().filter_map(|(n, _)| member(n)).collect();
        let counts = split_capped(num_layers, &known.iter().map(|m| (m.capacity, m.max_layers)).collect::<Vec<_>>())?;
        let mut at = 0;
        let mut out = Vec::new();
        for (m, c) in known.iter().zip(counts) {
            if c > 0 {
                out.push((m.name.clone(), at..at + c));
                at += c;
            }
        }
        if out.first().map(|(n, _)| n.as_str()) != Some(me) {
            return None;
        }
        out
    };
    Some(Plan { epoch: epoch + 1, stages })
}

/// "node-a 0..10 -> 0..15, node-c 20..30 -> 15..30, node-b 10..20 -> gone": the new plan's
/// stages in order, then the nodes it dropped.
pub fn describe_move(old: &[(String, Range<usize>)], new: &[(String, Range<usize>)]) -> String {
    let mut parts = Vec::new();
    for (n, r) in new {
        match old.iter().find(|(o, _)| o == n) {
            Some((_, was)) if was == r => parts.push(format!("{n} {}..{}", r.start, r.end)),
            Some((_, was)) => parts.push(format!("{n} {}..{} -> {}..{}", was.start, was.end, r.start, r.end)),
            None => parts.push(format!("{n} new {}..{}", r.start, r.end)),
        }
    }
    for (o, was) in old {
        if !new.iter().any(|(n, _)| n == o) {
            parts.push(format!("{o} {}..{} -> gone", was.start, was.end));
        }
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests;
