//! Tests of the elastic mesh's pure core: `split_capped`, `describe_move` and `MeshCore`'s decisions one at a time
//! (repair of a lost stage, restarts, rejoin with backoff and hysteresis, unservable spells), then seeded
//! simulations in virtual time (µs) of 3 to 100 nodes with crashes, restarts, flapping and slow nodes and
//! data-plane failures, which check after every tick: a well-formed plan, rising epochs, no false detection, a
//! bound on detection, re-initialisation after a restart, bounded churn of a flapping node, no churn once quiet.

use super::*;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};

/// The core's tick and the shell's probe period in these tests (µs).
const TICK: u64 = 50_000;
const PROBE: u64 = 100_000;

// ---------------------------------------------------------------------------------------------
// Helpers of the unit tests.

fn member(name: &str, capacity: f64, max_layers: usize) -> Member {
    Member { name: name.to_string(), capacity, max_layers }
}

fn stages(s: &[(&str, Range<usize>)]) -> Vec<(String, Range<usize>)> {
    s.iter().map(|(n, r)| (n.to_string(), r.clone())).collect()
}

/// A core headed by the first of `roster` (name, capacity, max_layers), started at 0 under `initial`.
fn core_of(roster: &[(&str, f64, usize)], num_layers: usize, initial: &[(&str, Range<usize>)], config: CoreConfig) -> MeshCore {
    let head = roster[0].0;
    let members = roster.iter().map(|&(n, c, m)| member(n, c, m)).collect();
    MeshCore::new(head, members, num_layers, Plan { epoch: 1, stages: stages(initial) }, config, 0)
}

/// Head "a", then "b" and "c": equal capacity, 10 of 30 layers each.
fn trio(max_layers: usize, config: CoreConfig) -> MeshCore {
    core_of(&[("a", 1.0, max_layers), ("b", 1.0, max_layers), ("c", 1.0, max_layers)], 30, &[("a", 0..10), ("b", 10..20), ("c", 20..30)], config)
}

/// Ticks the core at every multiple of `TICK` in (`from`, `to`]; at every multiple of `PROBE` the nodes
/// `answers(t)` lists (name, generation) answer a probe first. The head is never probed. Returns each action
/// with the time of its tick.
fn drive(core: &mut MeshCore, from: u64, to: u64, mut answers: impl FnMut(u64) -> Vec<(&'static str, u64)>) -> Vec<(u64, Action)> {
    let mut out = Vec::new();
    let mut t = (from / TICK + 1) * TICK;
    while t <= to {
        if t % PROBE == 0 {
            for (name, generation) in answers(t) {
                core.probe_ok(name, generation, t);
            }
        }
        out.extend(core.tick(t).into_iter().map(|a| (t, a)));
        t += TICK;
    }
    out
}

/// The one action of `acts`, which must be an Adopt.
fn one_change(acts: Vec<(u64, Action)>) -> (u64, PlanChange) {
    assert_eq!(acts.len(), 1, "expected exactly one action, got {acts:?}");
    match acts.into_iter().next() {
        Some((t, Action::Adopt(change))) => (t, change),
        other => panic!("expected an Adopt, got {other:?}"),
    }
}

fn view_of(core: &MeshCore, name: &str) -> (String, NodeState, Option<u64>, Option<Range<usize>>) {
    core.view().into_iter().find(|v| v.0 == name).unwrap_or_else(|| panic!("{name} is not in the view"))
}

/// splitmix64: a small seeded generator, so that a seed always draws the same run.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi` (`hi > lo`).
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True `percent` times in a hundred.
    fn chance(&mut self, percent: u64) -> bool {
        self.range(0, 100) < percent
    }
}

// ---------------------------------------------------------------------------------------------
// split_capped and describe_move.

#[test]
fn split_capped_is_proportional() {
    assert_eq!(split_capped(30, &[(1.0, 30), (1.0, 30), (1.0, 30)]), Some(vec![10, 10, 10]));
    assert_eq!(split_capped(30, &[(2.0, 30), (1.0, 30), (1.0, 30)]), Some(vec![15, 8, 7]));
    assert_eq!(split_capped(7, &[(3.0, 7)]), Some(vec![7]));
    assert_eq!(split_capped(0, &[(1.0, 3)]), Some(vec![0]));
}

#[test]
fn split_capped_respects_the_maxima() {
    // 10 each would give the first 10; it holds 5, the others share the remaining 25.
    assert_eq!(split_capped(30, &[(1.0, 5), (1.0, 30), (1.0, 30)]), Some(vec![5, 13, 12]));
    assert_eq!(split_capped(20, &[(10.0, 3), (1.0, 20), (1.0, 20)]), Some(vec![3, 9, 8]));
    // Exactly enough room: every node full.
    assert_eq!(split_capped(30, &[(5.0, 10), (1.0, 10), (1.0, 10)]), Some(vec![10, 10, 10]));
    // A node that holds nothing takes nothing.
    assert_eq!(split_capped(4, &[(1.0, 4), (1.0, 0), (1.0, 4)]), Some(vec![2, 0, 2]));
}

#[test]
fn split_capped_is_none_when_the_maxima_are_too_small() {
    assert_eq!(split_capped(30, &[(1.0, 10), (1.0, 10), (1.0, 9)]), None);
    assert_eq!(split_capped(3, &[(1.0, 0), (1.0, 0)]), None);
    assert_eq!(split_capped(1, &[]), None);
}

#[test]
fn split_capped_with_fewer_layers_than_nodes() {
    // The first nodes take one each, whatever their capacity, the rest none.
    assert_eq!(split_capped(2, &[(1.0, 5), (1.0, 5), (1.0, 5)]), Some(vec![1, 1, 0]));
    assert_eq!(split_capped(1, &[(1.0, 5), (9.0, 5)]), Some(vec![1, 0]));
    assert_eq!(split_capped(2, &[(1.0, 0), (1.0, 5), (1.0, 5), (1.0, 5)]), Some(vec![0, 1, 1, 0]));
}

#[test]
fn split_capped_random_shapes() {
    let mut rng = Rng::new(0x5eed);
    for case in 0..5000 {
        let n = rng.range(1, 9) as usize;
        let layers = rng.range(0, 120) as usize;
        let nodes: Vec<(f64, usize)> = (0..n).map(|_| (rng.range(1, 17) as f64 / 4.0, rng.range(0, 40) as usize)).collect();
        let room: usize = nodes.iter().map(|x| x.1).sum();
        let Some(counts) = split_capped(layers, &nodes) else {
            assert!(room < layers, "case {case}: {layers} layers fit in {nodes:?} (room {room}), yet no split");
            continue;
        };
        assert!(room >= layers, "case {case}: {layers} layers split over {nodes:?} with room for {room}");
        assert_eq!(counts.len(), n, "case {case}: {nodes:?} -> {counts:?}");
        assert_eq!(counts.iter().sum::<usize>(), layers, "case {case}: {nodes:?} -> {counts:?}");
        for (&c, &(_, max)) in counts.iter().zip(&nodes) {
            assert!(c <= max, "case {case}: {layers} layers over {nodes:?} -> {counts:?}: {c} > {max}");
        }
        // No maximum in the way: the plain proportional split.
        if layers >= n && nodes.iter().all(|&(_, max)| max >= layers) {
            let caps: Vec<f64> = nodes.iter().map(|x| x.0).collect();
            let plain: Vec<usize> = crate::placement::split_layers(layers, &caps).expect("a plain split").iter().map(|r| r.len()).collect();
            assert_eq!(counts, plain, "case {case}: {layers} layers over {nodes:?}");
        }
    }
}

#[test]
fn describe_move_names_what_moved() {
    let three = stages(&[("a", 0..10), ("b", 10..20), ("c", 20..30)]);
    let repaired = stages(&[("a", 0..15), ("c", 15..30)]);
    let rejoined = stages(&[("a", 0..10), ("c", 10..20), ("b", 20..30)]);
    assert_eq!(describe_move(&three, &repaired), "a 0..10 -> 0..15, c 20..30 -> 15..30, b 10..20 -> gone");
    assert_eq!(describe_move(&repaired, &rejoined), "a 0..15 -> 0..10, c 15..30 -> 10..20, b new 20..30");
    assert_eq!(describe_move(&three, &three), "a 0..10, b 10..20, c 20..30");
    assert_eq!(describe_move(&[], &three), "a new 0..10, b new 10..20, c new 20..30");
}

// ---------------------------------------------------------------------------------------------
// MeshCore, one decision at a time (default config: dead after 800 ms, rejoin after 1 s, 0.75).

#[test]
fn lost_middle_stage_is_split_between_its_neighbours() {
    let mut core = trio(30, CoreConfig::default());
    // "c" answers every probe, "b" never does: silent for more than 800 ms at the 850 ms tick.
    let (t, change) = one_change(drive(&mut core, 0, 2_000_000, |_| vec![("c", 1)]));
    assert_eq!(t, 850_000);
    assert_eq!(change.reason, ChangeReason::NodeLost);
    assert_eq!(change.nodes, ["b"]);
    assert_eq!(change.epoch, 2);
    assert_eq!(change.at_us, 850_000);
    // From its last sign of life (the start, 0) to the decision.
    assert_eq!(change.detection_us, Some(850_000));
    // The gap of 10 goes 5/5 to the two neighbours of equal capacity; nothing else moves.
    assert_eq!(change.stages, stages(&[("a", 0..15), ("c", 15..30)]));
    assert_eq!(change.moved, "a 0..10 -> 0..15, c 20..30 -> 15..30, b 10..20 -> gone");
    let plan = core.plan().expect("a plan");
    assert_eq!(plan.epoch, 2);
    assert_eq!(plan.stages, change.stages);
    assert_eq!(plan.range_of("b"), None);
    assert_eq!(core.unserved(), None);
    assert_eq!(core.history().cloned().collect::<Vec<_>>(), vec![change.clone()]);
    let b = view_of(&core, "b");
    assert_eq!((b.1, b.3), (NodeState::Down, None));
}

#[test]
fn lost_gap_goes_to_the_neighbours_in_proportion_to_capacity() {
    let mut core = core_of(&[("a", 1.0, 30), ("b", 1.0, 30), ("c", 4.0, 30)], 30, &[("a", 0..10), ("b", 10..20), ("c", 20..30)], CoreConfig::default());
    let (_, change) = one_change(drive(&mut core, 0, 1_000_000, |_| vec![("c", 1)]));
    // 10 × 1/5 = 2 to the left, 8 to the right.
    assert_eq!(change.stages, stages(&[("a", 0..12), ("c", 12..30)]));
}

#[test]
fn two_neighbours_lost_together() {
    let mut core = core_of(
        &[("a", 1.0, 40), ("b", 1.0, 40), ("c", 1.0, 40), ("d", 1.0, 40)],
        40,
        &[("a", 0..10), ("b", 10..20), ("c", 20..30), ("d", 30..40)],
        CoreConfig::default(),
    );
    let (t, change) = one_change(drive(&mut core, 0, 1_000_000, |_| vec![("d", 1)]));
    assert_eq!(t, 850_000);
    assert_eq!(change.reason, ChangeReason::NodeLost);
    assert_eq!(change.nodes, ["b", "c"]);
    assert_eq!(change.detection_us, Some(850_000));
    assert_eq!(change.stages, stages(&[("a", 0..20), ("d", 20..40)]));
}

#[test]
fn lost_last_stage_goes_to_the_previous_survivor() {
    let mut core = trio(30, CoreConfig::default());
    let (t, change) = one_change(drive(&mut core, 0, 1_000_000, |_| vec![("b", 1)]));
    assert_eq!(t, 850_000);
    assert_eq!(change.nodes, ["c"]);
    assert_eq!(change.stages, stages(&[("a", 0..10), ("b", 10..30)]));
}

#[test]
fn neighbour_without_room_means_a_rebalance_over_the_survivors() {
    let mut core = core_of(
        &[("a", 1.0, 12), ("b", 1.0, 20), ("c", 1.0, 12), ("d", 1.0, 20)],
        40,
        &[("a", 0..10), ("b", 10..20), ("c", 20..30), ("d", 30..40)],
        CoreConfig::default(),
    );
    // The repair would give a 0..15 and c 15..30, over their 12: a fresh split of the three instead.
    let (_, change) = one_change(drive(&mut core, 0, 1_000_000, |_| vec![("c", 1), ("d", 1)]));
    assert_eq!(change.reason, ChangeReason::NodeLost);
    assert_eq!(change.nodes, ["b"]);
    assert_eq!(change.stages, stages(&[("a", 0..12), ("c", 12..24), ("d", 24..40)]));
}

#[test]
fn the_head_is_never_lost() {
    let mut core = trio(30, CoreConfig::default());
    core.stage_failed("a", 30_000);
    // `drive` never probes the head: silent for 5 s, still the head of the same plan.
    let acts = drive(&mut core, 0, 5_000_000, |_| vec![("b", 1), ("c", 1)]);
    assert!(acts.is_empty(), "{acts:?}");
    assert_eq!(core.plan().map(|p| p.epoch), Some(1));
}

#[test]
fn stage_failure_is_a_loss_at_the_next_tick() {
    let mut core = trio(30, CoreConfig::default());
    let bc = |_: u64| vec![("b", 1u64), ("c", 1u64)];
    assert!(drive(&mut core, 0, 100_000, bc).is_empty());
    // b answers every probe, but its link broke.
    core.stage_failed("b", 120_000);
    let (t, change) = one_change(drive(&mut core, 100_000, 1_000_000, bc));
    assert_eq!(t, 150_000);
    assert_eq!(change.reason, ChangeReason::NodeLost);
    assert_eq!(change.nodes, ["b"]);
    assert_eq!(change.detection_us, Some(50_000));
    assert_eq!(change.stages, stages(&[("a", 0..15), ("c", 15..30)]));
}

/// A stage whose engine fails a step now and then stays; one that fails `errors_to_fail` steps
/// within the window is lost (while it answers every probe) and taken back only after the
/// rejoin wait.
#[test]
fn a_stage_whose_engine_keeps_failing_is_lost_and_a_rare_error_is_not() {
    let mut core = trio(30, CoreConfig::default());
    let bc = |_: u64| vec![("b", 1u64), ("c", 1u64)];
    assert!(drive(&mut core, 0, 100_000, bc).is_empty());
    // Errors further apart than the window: never three within it.
    let window = CoreConfig::default().error_window_us;
    let mut t = 100_000;
    for _ in 0..5 {
        core.stage_errored("b", t);
        assert!(drive(&mut core, t, t + window / 2 + PROBE, bc).is_empty(), "t={t}");
        t += window / 2 + PROBE;
    }
    // Three in a row: lost at the next tick, though it answers.
    for k in 0..3 {
        core.stage_errored("b", t + k * 10_000);
    }
    let (at, change) = one_change(drive(&mut core, t + 20_000, t + 1_000_000, bc));
    assert_eq!(at, (t + 20_000) / TICK * TICK + TICK);
    assert_eq!(change.reason, ChangeReason::NodeLost);
    assert_eq!(change.nodes, ["b"]);
    assert_eq!(change.stages, stages(&[("a", 0..15), ("c", 15..30)]));
    // It is taken back after answering for the rejoin wait (doubled by its loss), not before.
    let wait = core.config().rejoin_after_us * 2;
    let (back, change) = one_change(drive(&mut core, t + 1_000_000, t + 1_000_000 + 2 * wait, bc));
    assert_eq!(change.reason, ChangeReason::NodeJoined);
    assert!(back >= t + 1_000_000 + wait / 2, "taken back at {back}");
    // The head's own errors are its own shard's, never a loss of a stage.
    core.stage_errored("a", back);
    core.stage_errored("a", back);
    core.stage_errored("a", back);
    assert!(drive(&mut core, back, back + 1_000_000, bc).is_empty());
}

/// Lifeguard's local health: a head whose own ticks stall (busy, or paused) accuses no stage
/// for the silence it caused itself; its health worsens and slowly recovers on timely ticks;
/// a stage that really died while the head was slow is still found, later.
#[test]
fn a_starved_detector_accuses_no_one_and_recovers() {
    let config = CoreConfig::default();
    let mut core = trio(30, config);
    let bc = |_: u64| vec![("b", 1u64), ("c", 1u64)];
    assert!(drive(&mut core, 0, 1_000_000, bc).is_empty());
    assert_eq!(core.local_health(), 0);
    // The head stalls 2 s: no tick runs and no answer is read; then it runs again.
    assert!(core.tick(3_000_000).is_empty(), "a stalled head accused its stages");
    assert!(core.local_health() >= 1);
    assert!(drive(&mut core, 3_000_000, 4_000_000, bc).is_empty());
    // Ticks late by two periods, for a while: slower, and no accusation either.
    let mut t = 4_000_000;
    for _ in 0..20 {
        t += 3 * TICK;
        core.probe_ok("b", 1, t);
        core.probe_ok("c", 1, t);
        assert!(core.tick(t).is_empty(), "t={t}");
    }
    let sick = core.local_health();
    assert_eq!(sick, MAX_LOCAL_HEALTH);
    // Timely ticks earn the health back: one step per second at 50 ms.
    assert!(drive(&mut core, t, t + 2_000_000, bc).is_empty());
    assert!(core.local_health() < sick);
    let t = t + 2_000_000;
    // c dies while the head is still unwell: lost, within the stretched threshold.
    let health = core.local_health() as u64;
    let (at, change) = one_change(drive(&mut core, t, t + 20_000_000, |_| vec![("b", 1u64)]));
    assert_eq!(change.nodes, ["c"]);
    assert!(at > t + config.dead_after_us, "lost at {at}: the stretch did not apply");
    assert!(at <= t + config.dead_after_us * (1 + health) + TICK, "lost at {at}, health {health}");
}

#[test]
fn failed_probes_of_a_node_of_the_plan_are_not_a_loss_while_it_answers() {
    let mut core = trio(30, CoreConfig::default());
    let mut t = 0;
    while t < 3_000_000 {
        let acts = drive(&mut core, t, t + PROBE, |_| vec![("b", 1), ("c", 1)]);
        assert!(acts.is_empty(), "t={t}: {acts:?}");
        t += PROBE;
        core.probe_failed("c", t);
    }
    assert_eq!(core.plan().map(|p| p.epoch), Some(1));
    assert!(matches!(view_of(&core, "c").1, NodeState::Up { .. }));
}

#[test]
fn restarted_node_means_the_same_stages_under_a_new_epoch() {
    for call_initialised in [true, false] {
        let mut core = trio(30, CoreConfig::default());
        assert!(drive(&mut core, 0, 200_000, |_| vec![("b", 7), ("c", 3)]).is_empty());
        if call_initialised {
            core.initialised(1);
        }
        // b's process restarted: generation 8.
        let (t, change) = one_change(drive(&mut core, 200_000, 300_000, |_| vec![("b", 8), ("c", 3)]));
        let at = format!("initialised called: {call_initialised}");
        assert_eq!(t, 300_000, "{at}");
        assert_eq!(change.reason, ChangeReason::NodeRestarted, "{at}");
        assert_eq!(change.nodes, ["b"], "{at}");
        assert_eq!(change.epoch, 2, "{at}");
        assert_eq!(change.detection_us, None, "{at}");
        assert_eq!(change.stages, stages(&[("a", 0..10), ("b", 10..20), ("c", 20..30)]), "{at}");
        assert_eq!(change.moved, "a 0..10, b 10..20, c 20..30", "{at}");
        core.initialised(2);
        // The new process keeps answering: nothing more to do.
        let acts = drive(&mut core, 300_000, 3_000_000, |_| vec![("b", 8), ("c", 3)]);
        assert!(acts.is_empty(), "{at}: {acts:?}");
        assert_eq!(view_of(&core, "b").2, Some(8), "{at}");
    }
}

#[test]
fn lost_node_rejoins_after_answering_for_the_backoff() {
    let config = CoreConfig::default();
    let mut core = trio(30, config);
    let (t, lost) = one_change(drive(&mut core, 0, 900_000, |_| vec![("c", 1)]));
    assert_eq!((t, lost.reason), (850_000, ChangeReason::NodeLost));
    // b answers every probe from 1 s on. Its one loss doubles the wait: 2 × rejoin_after_us.
    let wait = config.rejoin_after_us << 1;
    let acts = drive(&mut core, 900_000, 1_000_000 + wait + 2_000_000, |t| if t >= 1_000_000 { vec![("b", 2), ("c", 1)] } else { vec![("c", 1)] });
    let (t, change) = one_change(acts);
    assert_eq!(t, 1_000_000 + wait);
    assert_eq!(change.reason, ChangeReason::NodeJoined);
    assert_eq!(change.nodes, ["b"]);
    assert_eq!(change.epoch, 3);
    // 10 layers each: 10 <= 0.75 × 15. The joiner takes its place in roster order.
    assert_eq!(change.stages, stages(&[("a", 0..10), ("b", 10..20), ("c", 20..30)]));
    assert_eq!(change.moved, "a 0..15 -> 0..10, b new 10..20, c 15..30 -> 20..30");
}

#[test]
fn failed_probe_outside_the_plan_restarts_the_wait() {
    let mut core = trio(30, CoreConfig::default());
    let (_, lost) = one_change(drive(&mut core, 0, 900_000, |_| vec![("c", 1)]));
    assert_eq!(lost.nodes, ["b"]);
    let bc = |_: u64| vec![("b", 1u64), ("c", 1u64)];
    // Up from 1 s: would rejoin at 3 s ...
    assert!(drive(&mut core, 900_000, 2_400_000, bc).is_empty());
    // ... but one probe fails at 2.45 s: up again from its answer at 2.5 s, 2 s more.
    core.probe_failed("b", 2_450_000);
    let (t, change) = one_change(drive(&mut core, 2_400_000, 6_000_000, bc));
    assert_eq!(t, 4_500_000);
    assert_eq!(change.reason, ChangeReason::NodeJoined);
    assert_eq!(change.nodes, ["b"]);
}

#[test]
fn rejoin_wait_doubles_with_each_loss_up_to_64_times() {
    let config = CoreConfig { history: 5, ..CoreConfig::default() };
    let mut core = trio(30, config);
    let bc = |_: u64| vec![("b", 1u64), ("c", 1u64)];
    let mut t = 0;
    for k in 1..=8u32 {
        core.stage_failed("b", t);
        let (at, lost) = one_change(drive(&mut core, t, t + TICK, bc));
        assert_eq!((at, lost.reason), (t + TICK, ChangeReason::NodeLost), "loss {k}");
        // Up again from its next answer.
        let since = t + PROBE;
        let wait = config.rejoin_after_us << k.min(6);
        let (at, joined) = one_change(drive(&mut core, t + TICK, since + wait + 500_000, bc));
        assert_eq!((at, joined.reason), (since + wait, ChangeReason::NodeJoined), "rejoin after loss {k}");
        t = since + wait + 500_000;
    }
    // 16 changes (epochs 2..=17), the last 5 kept.
    assert_eq!(core.history().count(), 5);
    assert_eq!(core.history().last().map(|c| c.epoch), Some(17));
}

#[test]
fn rejoin_needs_an_improvement_of_the_slowest_stage() {
    let config = CoreConfig::default();
    let roster = [("a", 1.0, 4), ("b", 1.0, 4), ("c", 1.0, 4)];
    let initial = [("a", 0..2), ("b", 2..3), ("c", 3..4)];
    assert_eq!(crate::placement::split_layers(4, &[1.0; 3]).expect("a split"), vec![0..2, 2..3, 3..4]);

    // c lost: a 0..2, b 2..4, the slowest stage 2 layers. With c back it would be 2, 1, 1: still 2, not
    // <= 0.75 × 2, so c stays out however long it answers.
    let mut core = core_of(&roster, 4, &initial, config);
    let (_, lost) = one_change(drive(&mut core, 0, 900_000, |_| vec![("b", 1)]));
    assert_eq!(lost.stages, stages(&[("a", 0..2), ("b", 2..4)]));
    let acts = drive(&mut core, 900_000, 20_000_000, |_| vec![("b", 1), ("c", 1)]);
    assert!(acts.is_empty(), "{acts:?}");
    assert_eq!(core.plan().map(|p| p.epoch), Some(2));
    let c = view_of(&core, "c");
    assert!(matches!(c.1, NodeState::Up { .. }), "{c:?}");
    assert_eq!(c.3, None);

    // b lost instead: a 0..3, c 3..4, the slowest 3 layers; with b back 2 <= 0.75 × 3: taken in.
    let mut core = core_of(&roster, 4, &initial, config);
    let (_, lost) = one_change(drive(&mut core, 0, 900_000, |_| vec![("c", 1)]));
    assert_eq!(lost.stages, stages(&[("a", 0..3), ("c", 3..4)]));
    let (t, joined) = one_change(drive(&mut core, 900_000, 5_000_000, |_| vec![("b", 1), ("c", 1)]));
    assert_eq!(t, 1_000_000 + (config.rejoin_after_us << 1));
    assert_eq!(joined.reason, ChangeReason::NodeJoined);
    assert_eq!(joined.stages, stages(&[("a", 0..2), ("b", 2..3), ("c", 3..4)]));
}

#[test]
fn unservable_until_capacity_returns() {
    let config = CoreConfig::default();
    // Each node holds at most 12 of the 30 layers: two cannot hold the model.
    let mut core = trio(12, config);
    let acts = drive(&mut core, 0, 950_000, |_| vec![("c", 1)]);
    assert_eq!(acts, vec![(850_000, Action::Unservable { missing: 24..30, lost: vec!["b".to_string()] })]);
    assert!(core.plan().is_none());
    assert_eq!(core.unserved(), Some(24..30));
    // b answers again from 1 s on: the three hold the model again.
    let acts = drive(&mut core, 950_000, 5_000_000, |t| if t >= 1_000_000 { vec![("b", 2), ("c", 1)] } else { vec![("c", 1)] });
    let (t, change) = one_change(acts);
    // b waits out its backoff (one loss: twice rejoin_after) like any returning node.
    assert_eq!(t, 1_000_000 + (config.rejoin_after_us << 1), "back at {t}");
    assert_eq!(change.reason, ChangeReason::CapacityReturned);
    assert_eq!(change.nodes, ["b"], "the change names the node that came back");
    assert!(change.epoch > 1, "{change:?}");
    assert_eq!(change.stages, stages(&[("a", 0..10), ("b", 10..20), ("c", 20..30)]));
    assert_eq!(core.plan().map(|p| (p.epoch, p.stages.clone())), Some((change.epoch, change.stages.clone())));
    assert_eq!(core.unserved(), None);
}

#[test]
fn a_draining_node_is_replaced_while_it_answers_and_never_taken_back() {
    let config = CoreConfig::default();
    let mut core = trio(30, config);
    core.drain("b");
    core.drain("a"); // the head cannot drain itself here: ignored
    let acts = drive(&mut core, 0, 100_000, |_| vec![("b", 1), ("c", 1)]);
    let (_, change) = one_change(acts);
    assert_eq!(change.reason, ChangeReason::NodeDrained);
    assert_eq!(change.nodes, ["b"]);
    assert_eq!(change.stages, stages(&[("a", 0..15), ("c", 15..30)]));
    assert_eq!(core.drained(), ["b"]);
    // It keeps answering, but it is leaving: no join, however long it answers.
    assert!(drive(&mut core, 100_000, 20_000_000, |_| vec![("b", 1), ("c", 1)]).is_empty());
}

#[test]
fn a_released_node_is_forgotten_but_nodes_of_the_plan_and_the_head_are_not() {
    let mut core = trio(30, CoreConfig::default());
    assert!(!core.remove("a"), "the head");
    assert!(!core.remove("b"), "a node of the plan");
    core.drain("c");
    let (_, change) = one_change(drive(&mut core, 0, 1_000_000, |_| vec![("b", 1), ("c", 1)]));
    assert_eq!(change.reason, ChangeReason::NodeDrained);
    assert_eq!(core.drained(), vec!["c".to_string()]);
    assert!(core.remove("c"));
    assert!(core.view().iter().all(|v| v.0 != "c"));
    assert!(core.drained().is_empty());
    assert!(!core.remove("c"));
    // Nothing more happens without it.
    assert!(drive(&mut core, 1_000_000, 60_000_000, |_| vec![("b", 1)]).is_empty());
}

#[test]
fn a_drain_that_the_others_cannot_absorb_keeps_the_node() {
    let mut core = trio(12, CoreConfig::default());
    core.drain("c");
    assert!(drive(&mut core, 0, 2_000_000, |_| vec![("b", 1), ("c", 1)]).is_empty(), "a and b hold 24 of 30 layers");
    assert!(core.drained().is_empty());
}

#[test]
fn a_member_added_later_joins_once_it_has_answered_long_enough() {
    let config = CoreConfig::default();
    let mut core = core_of(&[("a", 1.0, 40), ("b", 1.0, 40), ("c", 1.0, 40)], 12, &[("a", 0..4), ("b", 4..8), ("c", 8..12)], config);
    core.add_member(member("d", 1.0, 40));
    core.add_member(member("a", 9.0, 1)); // known names are left as they are
    let acts = drive(&mut core, 0, 5_000_000, |t| if t >= 1_000_000 { vec![("b", 1), ("c", 1), ("d", 1)] } else { vec![("b", 1), ("c", 1)] });
    let (t, change) = one_change(acts);
    // 3 layers each: 3 <= 0.75 × 4.
    assert_eq!(t, 1_000_000 + config.rejoin_after_us);
    assert_eq!(change.reason, ChangeReason::NodeJoined);
    assert_eq!(change.stages, stages(&[("a", 0..3), ("b", 3..6), ("c", 6..9), ("d", 9..12)]));
}

#[test]
fn a_node_measured_slower_gets_fewer_layers_once_it_has_stayed_slower() {
    let config = CoreConfig::default();
    let mut core = trio(30, config);
    let all = |_| vec![("b", 1), ("c", 1)];
    // c takes 3 µs per layer per token, a and b 1: 13/13/4 makes the slowest stage 13 µs against c's
    // 30 (<= 0.75×). Not before the plan is `rebalance_every_us` old, nor before it has held for
    // `rebalance_after_us`.
    for (n, us) in [("a", 1.0), ("b", 1.0), ("c", 3.0)] {
        core.measured(n, us);
    }
    let acts = drive(&mut core, 0, 20_000_000, all);
    assert!(acts.is_empty(), "{acts:?}");
    let (t, change) = one_change(drive(&mut core, 20_000_000, 40_000_000, all));
    assert_eq!(t, config.rebalance_every_us);
    assert_eq!(change.reason, ChangeReason::Rebalanced);
    assert_eq!(change.stages, stages(&[("a", 0..13), ("b", 13..26), ("c", 26..30)]));
    // Once balanced, the same speeds change nothing more.
    let acts = drive(&mut core, 40_000_000, 200_000_000, all);
    assert!(acts.is_empty(), "{acts:?}");
    assert_eq!(core.us_per_layer_token("c"), Some(3.0));
}

#[test]
fn with_rebalancing_off_a_slower_node_keeps_its_layers_but_a_loss_is_still_repaired() {
    let config = CoreConfig { rebalance_by_speed: false, ..CoreConfig::default() };
    let mut core = trio(30, config);
    for (n, us) in [("a", 1.0), ("b", 1.0), ("c", 3.0)] {
        core.measured(n, us);
    }
    // What moves layers with rebalancing on (the test above) moves nothing here.
    let acts = drive(&mut core, 0, 200_000_000, |_| vec![("b", 1), ("c", 1)]);
    assert!(acts.is_empty(), "{acts:?}");
    // A lost stage is still re-placed.
    let (_, change) = one_change(drive(&mut core, 200_000_000, 205_000_000, |_| vec![("b", 1)]));
    assert_eq!(change.reason, ChangeReason::NodeLost);
}

#[test]
fn a_speed_difference_under_the_threshold_or_not_held_changes_nothing() {
    let config = CoreConfig::default();
    let all = |_| vec![("b", 1), ("c", 1)];
    // c 1.3× slower: 11/11/8 would make the slowest 11 against 13, not <= 0.75×.
    let mut core = trio(30, config);
    for (n, us) in [("a", 1.0), ("b", 1.0), ("c", 1.3)] {
        core.measured(n, us);
    }
    assert!(drive(&mut core, 0, 120_000_000, all).is_empty());

    // c 3× slower, but only for 5 s at a time: the wait starts again whenever it is not.
    let mut core = trio(30, config);
    core.measured("a", 1.0);
    core.measured("b", 1.0);
    let mut t = 0;
    while t < 120_000_000 {
        core.measured("c", if (t / 5_000_000) % 2 == 0 { 3.0 } else { 1.0 });
        let acts = drive(&mut core, t, t + 1_000_000, all);
        assert!(acts.is_empty(), "at {t}: {acts:?}");
        t += 1_000_000;
    }
    // Nothing is split by speed while a node of the plan is unmeasured.
    let mut core = trio(30, config);
    core.measured("a", 1.0);
    core.measured("b", 5.0);
    core.measured("x", f64::NAN); // unknown names and nonsense are ignored
    core.measured("c", -1.0);
    assert!(drive(&mut core, 0, 120_000_000, all).is_empty());
    assert_eq!(core.us_per_layer_token("c"), None);
}

#[test]
fn measured_speeds_weigh_the_repair_of_a_lost_stage() {
    let config = CoreConfig::default();
    let mut core = trio(30, config);
    // b, in the middle, dies: its 10 layers go to a and c in proportion to speed (a 4× faster
    // than c): 8 to a, 2 to c. (b, unmeasured, is down by then: every live node is measured.)
    core.measured("a", 1.0);
    core.measured("c", 4.0);
    let (_, lost) = one_change(drive(&mut core, 0, 900_000, |_| vec![("c", 1)]));
    assert_eq!(lost.reason, ChangeReason::NodeLost);
    assert_eq!(lost.stages, stages(&[("a", 0..18), ("c", 18..30)]));
}

/// Measurements with noise (each within ±`noise` of the node's true speed, drawn afresh every second):
/// equal nodes are never re-split, and one truly 3× slower is re-split once and then left alone.
#[test]
fn noisy_measurements_make_no_churn() {
    let config = CoreConfig::default();
    for seed in 0..20 {
        for (slow, noise) in [(1.0, 0.2), (3.0, 0.2)] {
            let mut rng = Rng::new(seed);
            let mut core = core_of(
                &[("a", 1.0, 30), ("b", 1.0, 30), ("c", 1.0, 30), ("d", 1.0, 30)],
                32,
                &[("a", 0..8), ("b", 8..16), ("c", 16..24), ("d", 24..32)],
                config,
            );
            let mut changes = Vec::new();
            let mut t = 0;
            while t < 600_000_000 {
                for (n, truth) in [("a", 1.0), ("b", 1.0), ("c", 1.0), ("d", slow)] {
                    let jitter = 1.0 + noise * (2.0 * rng.unit() - 1.0);
                    core.measured(n, truth * jitter);
                }
                changes.extend(drive(&mut core, t, t + 1_000_000, |_| vec![("b", 1), ("c", 1), ("d", 1)]));
                t += 1_000_000;
            }
            let expected = if slow > 1.0 { 1 } else { 0 };
            assert_eq!(changes.len(), expected, "seed {seed}, slow {slow}: {changes:?}");
            if let Some((_, Action::Adopt(c))) = changes.first() {
                assert_eq!(c.reason, ChangeReason::Rebalanced);
                let d = c.stages.iter().find(|(n, _)| n == "d").map(|(_, r)| r.len());
                assert!(d.is_some_and(|l| l <= 4), "seed {seed}: {c:?}");
            }
        }
    }
}

/// Runs the trio's steps for (`from`, `to`], a second at a time: 100 step calls a second to b
/// and to c, each `call(node, call number)` (wall, compute) µs, then that second's ticks and
/// probes. Returns the plan changes.
fn run_calls(core: &mut MeshCore, from: u64, to: u64, calls: &mut u64, mut call: impl FnMut(&str, u64) -> (f64, f64)) -> Vec<(u64, Action)> {
    let mut out = Vec::new();
    let mut t = from;
    while t < to {
        for _ in 0..100 {
            for n in ["b", "c"] {
                let (wall, compute) = call(n, *calls);
                core.stage_timed(n, wall, compute);
            }
            *calls += 1;
        }
        out.extend(drive(core, t, t + 1_000_000, |_| vec![("b", 1), ("c", 1)]));
        t += 1_000_000;
    }
    out
}

/// The same self-reported speed everywhere, but every 25th call to c waits 475 ms longer (a CPU
/// quota spent between steps): c is weighed slower, its layers move off it once the split has
/// been better for long enough, it keeps few while it stays starved, and gets (nearly) its
/// share back minutes after it recovers.
#[test]
fn a_stage_starved_between_steps_loses_layers_and_gets_them_back_once_it_recovers() {
    let config = CoreConfig::default();
    for seed in 0..5 {
        let mut rng = Rng::new(seed);
        let mut core = trio(30, config);
        for n in ["a", "b", "c"] {
            core.measured(n, 1.0);
        }
        let mut calls = 0;
        let link = |rng: &mut Rng| 300.0 + 200.0 * rng.unit();
        let (t, moved) = one_change(run_calls(&mut core, 0, 60_000_000, &mut calls, |n, i| {
            let stall = if n == "c" && i % 25 == 24 { 475_000.0 } else { 0.0 };
            (1_000.0 + link(&mut rng) + stall, 1_000.0)
        }));
        assert_eq!(moved.reason, ChangeReason::Rebalanced, "seed {seed}");
        assert_eq!(t, config.rebalance_every_us, "seed {seed}: the plan is that old before any rebalance");
        let c = moved.stages.iter().find(|(n, _)| n == "c").map(|(_, r)| r.len()).unwrap();
        assert!(c <= 3, "seed {seed}: {moved:?}");
        assert!(core.slowdown("c") >= config.slow.factor && core.slowdown("b") == 1.0, "seed {seed}: {} {}", core.slowdown("c"), core.slowdown("b"));

        // Still starved (its stalls as long, with fewer layers): nothing moves back.
        let acts = run_calls(&mut core, 60_000_000, 660_000_000, &mut calls, |n, i| {
            let stall = if n == "c" && i % 25 == 24 { 475_000.0 } else { 0.0 };
            (1_000.0 + link(&mut rng) + stall, 1_000.0)
        });
        assert!(acts.is_empty(), "seed {seed}: {acts:?}");

        // Recovered: the held factor decays (half-life two minutes) and c is handed its share.
        let acts = run_calls(&mut core, 660_000_000, 2_000_000_000, &mut calls, |_, _| (1_000.0 + link(&mut rng), 1_000.0));
        let (back_at, back) = one_change(acts);
        assert_eq!(back.reason, ChangeReason::Rebalanced);
        // Its share, within the hysteresis: once the split is 0.75 of the slowest stage's cost.
        let c = back.stages.iter().find(|(n, _)| n == "c").map(|(_, r)| r.len()).unwrap();
        assert!(c >= 8, "seed {seed}: {back:?}");
        assert!(back_at - 660_000_000 <= 6 * config.slow.half_life_us, "seed {seed}: back after {} s", (back_at - 660_000_000) / 1_000_000);
        assert_eq!(core.slowdown("c"), 1.0);
    }
}

/// Jitter on healthy links moves no layers: calls whose overhead varies by up to 3 ms (under
/// the stall a call must average), and a head whose own load delays every call alike by 0-20 ms
/// (each stage as slow as the other).
#[test]
fn link_jitter_and_a_busy_head_move_no_layers() {
    let config = CoreConfig::default();
    for seed in 0..10 {
        for head_load in [false, true] {
            let mut rng = Rng::new(seed);
            let mut core = trio(30, config);
            for n in ["a", "b", "c"] {
                core.measured(n, 1.0);
            }
            let mut calls = 0;
            let acts = run_calls(&mut core, 0, 600_000_000, &mut calls, |_, _| {
                let jitter = if head_load { 20_000.0 * rng.unit() } else { 3_000.0 * rng.unit() + if rng.chance(1) { 20_000.0 } else { 0.0 } };
                (1_300.0 + jitter, 1_000.0)
            });
            assert!(acts.is_empty(), "seed {seed}, head load {head_load}: {acts:?}");
            assert_eq!((core.slowdown("b"), core.slowdown("c")), (1.0, 1.0));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Seeded simulations in virtual time.

/// A probe the node does not answer fails after this long (µs).
const PROBE_TIMEOUT: u64 = 500_000;
/// Probe answer delays (µs, `lo..hi`): fast nodes, and slow ones (under dead_after minus the probe period).
const FAST: (u64, u64) = (1_000, 5_001);
const SLOW: (u64, u64) = (50_000, 300_001);
/// Crashes and restarts happen before this; afterwards the mesh is quiet.
const EVENTS_END: u64 = 60_000_000;
/// A flapping node's up and down spells (µs, `lo..hi`).
const FLAP_UP: (u64, u64) = (1_000_000, 2_000_000);
const FLAP_DOWN: (u64, u64) = (1_000_000, 2_000_000);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Tick,
    /// The shell probes the node.
    Probe(usize),
    /// The node's answer to the probe sent at `sent`, from its process `generation`.
    Answer {
        node: usize,
        generation: u64,
        sent: u64,
    },
    ProbeTimeout(usize),
    /// kill -9.
    Crash(usize),
    /// A new process, a new generation.
    Restart(usize),
    /// The data plane noticed the node's link break.
    StageFailed(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Steady,
    Crasher,
    Flapper,
}

/// What is true of one node, whatever the core believes.
#[derive(Debug)]
struct Truth {
    role: Role,
    max_layers: usize,
    /// Probe answers take `delay.0..delay.1` µs.
    delay: (u64, u64),
    alive: bool,
    generation: u64,
    /// While down: when it crashed.
    crashed_at: Option<u64>,
    ever_crashed: bool,
    /// The latest generation whose answer reached the core.
    heard: Option<u64>,
    /// The generation the shell initialised this node's stage on (at the last plan it was in).
    initialised: Option<u64>,
    /// Times it came into the plan, and times it was lost.
    entries: u32,
    losses: u32,
}

#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    crashes: u32,
    lost: u32,
    restarted: u32,
    joined: u32,
    returned: u32,
    unservable: u32,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.crashes += o.crashes;
        self.lost += o.lost;
        self.restarted += o.restarted;
        self.joined += o.joined;
        self.returned += o.returned;
        self.unservable += o.unservable;
    }
}

/// One mesh in virtual time: node 0 is the head (never probed, never crashed); the shell probes every other node
/// every `PROBE` and ticks the core every `TICK`.
struct Sim {
    seed: u64,
    n: usize,
    num_layers: usize,
    /// Nodes hold 1 to 2 times their initial share (else every node holds the whole model).
    constrained: bool,
    config: CoreConfig,
    /// From here on no plan change may happen: every node that will rejoin has waited out even the longest backoff.
    settle_at: u64,
    end_at: u64,
    rng: Rng,
    core: MeshCore,
    names: Vec<String>,
    index: HashMap<String, usize>,
    truth: Vec<Truth>,
    queue: BinaryHeap<Reverse<(u64, u64, Event)>>,
    seq: u64,
    now: u64,
    last_epoch: u64,
    stats: Stats,
}

impl Sim {
    fn new(seed: u64, n: usize) -> Sim {
        assert!(n >= 3, "a simulation needs 3 nodes or more");
        let mut rng = Rng::new(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ n as u64);
        let num_layers = (n * 3).max(32);
        let constrained = seed % 4 == 3;
        let config = CoreConfig::default();
        let names: Vec<String> = (0..n).map(|i| format!("n{i}")).collect();
        let capacity: Vec<f64> = (0..n).map(|_| rng.range(1, 5) as f64).collect();
        let initial = crate::placement::split_layers(num_layers, &capacity).expect("the initial split");
        let mut truth = Vec::with_capacity(n);
        for (i, range) in initial.iter().enumerate() {
            let len = range.len();
            let max_layers = if constrained { len + rng.range(0, len as u64 + 1) as usize } else { num_layers };
            let role = match i {
                // The head, and one slow node that never crashes (the false-detection witness).
                0 | 1 => Role::Steady,
                2 if n > 3 => Role::Flapper,
                2 if seed % 2 == 0 => Role::Flapper,
                2 => Role::Crasher,
                _ => match rng.range(0, 100) {
                    0..=14 => Role::Flapper,
                    15..=49 => Role::Crasher,
                    _ => Role::Steady,
                },
            };
            let slow = i == 1 || (i > 1 && rng.chance(25));
            truth.push(Truth {
                role,
                max_layers,
                delay: if slow { SLOW } else { FAST },
                alive: true,
                generation: 1,
                crashed_at: None,
                ever_crashed: false,
                heard: None,
                initialised: Some(1),
                entries: 0,
                losses: 0,
            });
        }
        let roster: Vec<Member> =
            names.iter().zip(&capacity).zip(&truth).map(|((name, &capacity), t)| Member { name: name.clone(), capacity, max_layers: t.max_layers }).collect();
        let plan: Vec<(String, Range<usize>)> = names.iter().cloned().zip(initial).collect();
        let core = MeshCore::new(&names[0], roster, num_layers, Plan { epoch: 1, stages: plan }, config, 0);
        let index = names.iter().enumerate().map(|(i, name)| (name.clone(), i)).collect();
        let settle_at = EVENTS_END + (config.rejoin_after_us << 6) + 5_000_000;
        let mut sim = Sim {
            seed,
            n,
            num_layers,
            constrained,
            config,
            settle_at,
            end_at: settle_at + 5_000_000,
            rng,
            core,
            names,
            index,
            truth,
            queue: BinaryHeap::new(),
            seq: 0,
            now: 0,
            last_epoch: 1,
            stats: Stats::default(),
        };
        // The shell set up the initial plan on every node's first process.
        sim.core.initialised(1);
        sim.push(TICK, Event::Tick);
        for i in 1..n {
            let phase = sim.rng.range(0, PROBE);
            sim.push(phase, Event::Probe(i));
            let role = sim.truth[i].role;
            match role {
                Role::Steady => {}
                Role::Crasher => sim.schedule_crasher(i),
                Role::Flapper => sim.schedule_flapper(i),
            }
        }
        sim
    }

    fn push(&mut self, at: u64, event: Event) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq, event)));
    }

    /// A crash, and sometimes the data plane noticing it soon after.
    fn crash_at(&mut self, i: usize, t: u64) {
        self.push(t, Event::Crash(i));
        if self.rng.chance(40) {
            let after = self.rng.range(0, 300_000);
            self.push(t + after, Event::StageFailed(i));
        }
    }

    /// One to three crashes; each followed by a restart soon (before the mesh notices), later, much later, or
    /// (the last one, sometimes) never.
    fn schedule_crasher(&mut self, i: usize) {
        let mut t = self.rng.range(1_000_000, 30_000_000);
        for _ in 0..self.rng.range(1, 4) {
            if t >= EVENTS_END - 5_000_000 {
                break;
            }
            self.crash_at(i, t);
            if self.rng.chance(20) {
                return;
            }
            let down = match self.rng.range(0, 3) {
                0 => self.rng.range(100_000, 700_000),
                1 => self.rng.range(1_000_000, 10_000_000),
                _ => self.rng.range(10_000_000, 30_000_000),
            };
            let back = (t + down).min(EVENTS_END);
            self.push(back, Event::Restart(i));
            t = back + self.rng.range(2_000_000, 20_000_000);
        }
    }

    /// Down and up every 1 to 2 s until the events end; up at the end.
    fn schedule_flapper(&mut self, i: usize) {
        let mut t = self.rng.range(1_000_000, 10_000_000);
        while t < EVENTS_END {
            self.crash_at(i, t);
            let back = (t + self.rng.range(FLAP_DOWN.0, FLAP_DOWN.1)).min(EVENTS_END);
            self.push(back, Event::Restart(i));
            t = back + self.rng.range(FLAP_UP.0, FLAP_UP.1);
        }
    }

    fn ctx(&self) -> String {
        format!("seed {}, {} nodes{}, t={}µs", self.seed, self.n, if self.constrained { " (constrained)" } else { "" }, self.now)
    }

    fn idx(&self, name: &str) -> usize {
        match self.index.get(name) {
            Some(&i) => i,
            None => panic!("{}: {name} is not in the roster", self.ctx()),
        }
    }

    fn in_plan(&self) -> Vec<bool> {
        let mut v = vec![false; self.n];
        if let Some(p) = self.core.plan() {
            for (name, _) in &p.stages {
                v[self.idx(name)] = true;
            }
        }
        v
    }

    fn run(mut self) -> Stats {
        while let Some(Reverse((t, _, event))) = self.queue.pop() {
            if t > self.end_at {
                break;
            }
            self.now = t;
            match event {
                Event::Tick => {
                    self.tick();
                    self.push(t + TICK, Event::Tick);
                }
                Event::Probe(i) => {
                    self.push(t + PROBE, Event::Probe(i));
                    if self.truth[i].alive {
                        let (lo, hi) = self.truth[i].delay;
                        let delay = self.rng.range(lo, hi);
                        let generation = self.truth[i].generation;
                        self.push(t + delay, Event::Answer { node: i, generation, sent: t });
                    } else {
                        self.push(t + PROBE_TIMEOUT, Event::ProbeTimeout(i));
                    }
                }
                Event::Answer { node, generation, sent } => {
                    let tr = &mut self.truth[node];
                    if tr.alive && tr.generation == generation {
                        tr.heard = Some(generation);
                        self.core.probe_ok(&self.names[node], generation, t);
                    } else {
                        // The process that was asked is gone: no answer, the probe times out.
                        self.push(sent + PROBE_TIMEOUT, Event::ProbeTimeout(node));
                    }
                }
                Event::ProbeTimeout(i) => self.core.probe_failed(&self.names[i], t),
                Event::Crash(i) => {
                    let tr = &mut self.truth[i];
                    assert!(tr.alive, "seed {}: the schedule crashes n{i} twice", self.seed);
                    tr.alive = false;
                    tr.crashed_at = Some(t);
                    tr.ever_crashed = true;
                    self.stats.crashes += 1;
                }
                Event::Restart(i) => {
                    let tr = &mut self.truth[i];
                    assert!(!tr.alive, "seed {}: the schedule restarts n{i} while it runs", self.seed);
                    tr.alive = true;
                    tr.generation += 1;
                    tr.crashed_at = None;
                }
                Event::StageFailed(i) => {
                    if !self.truth[i].alive {
                        self.core.stage_failed(&self.names[i], t);
                    }
                }
            }
        }
        self.finish();
        self.stats
    }

    fn tick(&mut self) {
        let now = self.now;
        let before = self.in_plan();
        // Nodes of the plan running a process the core has heard from but no stage was initialised on.
        let unresolved: Vec<usize> = (0..self.n)
            .filter(|&i| {
                let tr = &self.truth[i];
                before[i] && tr.alive && tr.heard == Some(tr.generation) && tr.initialised != Some(tr.generation)
            })
            .collect();
        let mut prev = self.core.plan().map(|p| p.stages.clone());
        for action in self.core.tick(now) {
            self.apply(action, &mut prev);
        }
        let at = self.ctx();
        assert_eq!(prev, self.core.plan().map(|p| p.stages.clone()), "{at}: the plan is not the last one adopted");
        self.check_plan();
        let Some(plan) = self.core.plan() else { return };
        // Detection bound: a crashed node's last answer predates its crash, so it is out by the first tick after
        // dead_after.
        for (name, _) in &plan.stages {
            if let Some(crashed) = self.truth[self.idx(name)].crashed_at {
                assert!(now - crashed <= self.config.dead_after_us + TICK, "{at}: {name} crashed at {crashed}µs and is still in the plan");
            }
        }
        // A restart the core has heard of is acted on at the next tick: the node's stage is set up again.
        let after = self.in_plan();
        for i in unresolved {
            let tr = &self.truth[i];
            if after[i] {
                assert_eq!(
                    tr.initialised,
                    Some(tr.generation),
                    "{at}: n{i} answers as generation {} (the core heard it) and still serves a stage set up on {:?}",
                    tr.generation,
                    tr.initialised
                );
            }
        }
    }

    /// Checks one action against the plan before it (`prev`), and carries it out as the shell would.
    fn apply(&mut self, action: Action, prev: &mut Option<Vec<(String, Range<usize>)>>) {
        let at = self.ctx();
        assert!(self.now < self.settle_at, "{at}: {action:?} in a mesh quiet since {EVENTS_END}µs");
        let before: Vec<String> = prev.iter().flatten().map(|(n, _)| n.clone()).collect();
        match action {
            Action::Adopt(change) => {
                assert!(change.epoch > self.last_epoch, "{at}: epoch {} after epoch {}", change.epoch, self.last_epoch);
                self.last_epoch = change.epoch;
                assert_eq!(change.at_us, self.now, "{at}: {change:?}");
                assert_eq!(self.core.history().last(), Some(&change), "{at}: the history's last change");
                let after: Vec<&str> = change.stages.iter().map(|(n, _)| n.as_str()).collect();
                match change.reason {
                    ChangeReason::NodeLost => {
                        self.stats.lost += 1;
                        assert!(prev.is_some(), "{at}: a loss without a plan: {change:?}");
                        for name in &change.nodes {
                            self.check_lost(name, &before);
                            assert!(!after.contains(&name.as_str()), "{at}: lost {name} is still in {:?}", change.stages);
                        }
                        let bound = self.config.dead_after_us + TICK;
                        assert!(change.detection_us.is_some_and(|d| d <= bound), "{at}: detection {:?} of {:?}", change.detection_us, change.nodes);
                    }
                    ChangeReason::NodeRestarted => {
                        self.stats.restarted += 1;
                        assert_eq!(*prev, Some(change.stages.clone()), "{at}: a restart moves no stage");
                    }
                    ChangeReason::NodeJoined => {
                        self.stats.joined += 1;
                        for name in &change.nodes {
                            assert!(!before.contains(name), "{at}: {name} joined, but it was in {before:?}");
                        }
                    }
                    ChangeReason::CapacityReturned => {
                        self.stats.returned += 1;
                        assert!(prev.is_none(), "{at}: capacity returned while there was a plan: {change:?}");
                    }
                    ChangeReason::NodeDrained => panic!("{at}: nothing drains in the simulation: {change:?}"),
                    ChangeReason::Rebalanced => panic!("{at}: no speeds are measured in the simulation: {change:?}"),
                }
                for (name, _) in &change.stages {
                    let i = self.idx(name);
                    let tr = &mut self.truth[i];
                    if !before.contains(name) {
                        tr.entries += 1;
                    }
                    // The shell sets every stage of the new plan up on the process running there now.
                    tr.initialised = tr.alive.then_some(tr.generation);
                }
                self.core.initialised(change.epoch);
                *prev = Some(change.stages);
            }
            Action::Unservable { missing, lost } => {
                self.stats.unservable += 1;
                assert!(self.constrained, "{at}: unservable ({missing:?}, lost {lost:?}) though the head holds every layer");
                assert!(prev.is_some(), "{at}: unservable twice in a row");
                assert_eq!(missing.end, self.num_layers, "{at}: missing {missing:?}");
                assert_eq!(self.core.unserved(), Some(missing.clone()), "{at}");
                for name in &lost {
                    self.check_lost(name, &before);
                }
                *prev = None;
            }
        }
    }

    /// No false detection: a node declared lost has crashed at some point, and was in the plan.
    fn check_lost(&mut self, name: &str, before: &[String]) {
        let at = self.ctx();
        let i = self.idx(name);
        let tr = &self.truth[i];
        assert!(tr.ever_crashed, "{at}: {name} answered every probe (delay {:?}µs) and was declared lost", tr.delay);
        assert!(before.iter().any(|b| b == name), "{at}: {name} lost, but it was not in {before:?}");
        self.truth[i].losses += 1;
    }

    fn check_plan(&self) {
        let at = self.ctx();
        let Some(plan) = self.core.plan() else {
            assert!(self.core.unserved().is_some(), "{at}: neither a plan nor unserved layers");
            return;
        };
        assert_eq!(self.core.unserved(), None, "{at}: a plan and unserved layers");
        assert_eq!(plan.epoch, self.last_epoch, "{at}: the plan's epoch");
        let s = &plan.stages;
        assert!(!s.is_empty(), "{at}: an empty plan");
        assert_eq!(s[0].0, self.names[0], "{at}: the head is not first in {s:?}");
        assert_eq!(s[0].1.start, 0, "{at}: {s:?}");
        assert_eq!(s.last().map(|x| x.1.end), Some(self.num_layers), "{at}: {s:?} does not end at {}", self.num_layers);
        for w in s.windows(2) {
            assert_eq!(w[0].1.end, w[1].1.start, "{at}: a gap or an overlap in {s:?}");
        }
        let mut seen = HashSet::new();
        for (name, r) in s {
            assert!(!r.is_empty(), "{at}: {name} has no layers in {s:?}");
            assert!(seen.insert(name.as_str()), "{at}: {name} twice in {s:?}");
            let max = self.truth[self.idx(name)].max_layers;
            assert!(r.len() <= max, "{at}: {name} holds {r:?}, more than its {max} layers");
        }
    }

    /// The mesh has been quiet since `EVENTS_END`.
    fn finish(&self) {
        let at = self.ctx();
        if let Some(plan) = self.core.plan() {
            for (name, _) in &plan.stages {
                assert!(self.truth[self.idx(name)].alive, "{at}: {name} is down and still in the final plan {:?}", plan.stages);
            }
        }
        let room: usize = self.truth.iter().filter(|t| t.alive).map(|t| t.max_layers).sum();
        if room >= self.num_layers {
            assert!(self.core.plan().is_some(), "{at}: the live nodes hold {room} of {} layers, yet there is no plan", self.num_layers);
        }
        if !self.constrained {
            // Never unservable: a node leaves the plan only when lost and comes back only by joining, after
            // answering for rejoin_after << losses.min(6). While flapping, a node answers for at most
            // FLAP_UP + a probe period + a timeout in a row, so it can come back only for the losses whose wait
            // fits in that; plus once more when it stops flapping.
            let longest_up = FLAP_UP.1 + PROBE + PROBE_TIMEOUT;
            let mut bound = 1u32;
            let mut k = 1u32;
            while k < 64 && (self.config.rejoin_after_us << k.min(6)) <= longest_up {
                bound += 1;
                k += 1;
            }
            for (i, tr) in self.truth.iter().enumerate().filter(|(_, t)| t.role == Role::Flapper) {
                assert!(tr.entries <= bound, "{at}: flapping n{i} came into the plan {} times (at most {bound})", tr.entries);
                assert!(tr.losses <= bound + 1, "{at}: flapping n{i} was lost {} times (at most {})", tr.losses, bound + 1);
            }
        }
    }
}

fn simulate(n: usize, seeds: impl IntoIterator<Item = u64>) -> Stats {
    let mut total = Stats::default();
    for seed in seeds {
        total.add(&Sim::new(seed, n).run());
    }
    eprintln!("{n} nodes: {total:?}");
    assert!(total.lost > 0, "{n} nodes: no node was ever lost: {total:?}");
    total
}

#[test]
fn simulated_mesh_of_3() {
    simulate(3, 0..20);
}

#[test]
fn simulated_mesh_of_10() {
    simulate(10, 0..20);
}

#[test]
fn simulated_mesh_of_30() {
    let total = simulate(30, 0..8);
    assert!(total.restarted > 0, "30 nodes: no restart was ever seen: {total:?}");
}

#[test]
fn simulated_mesh_of_100() {
    // The core's tick is O(n²) once restarted nodes wait outside the plan: two seeds, one constrained.
    let total = simulate(100, [0, 3]);
    assert!(total.restarted > 0, "100 nodes: no restart was ever seen: {total:?}");
}

// ---------------------------------------------------------------------------------------------
// Succession: the plan a dead head's neighbour starts with.

#[test]
fn the_dead_heads_neighbour_takes_its_layers_and_no_other_stage_moves() {
    let members = vec![member("b", 1.0, 30), member("c", 1.0, 30)];
    let survivors = stages(&[("c", 20..30), ("b", 10..20)]);
    let plan = succession("b", 7, &survivors, &members, 30).unwrap();
    assert_eq!(plan, Plan { epoch: 8, stages: stages(&[("b", 0..20), ("c", 20..30)]) });
    // Only the survivor with the lowest layers succeeds.
    assert_eq!(succession("c", 7, &survivors, &members, 30), None);
    // A node that already holds layer 0 is a head, not a successor.
    assert_eq!(succession("b", 7, &stages(&[("b", 0..30)]), &members, 30), None);
}

#[test]
fn a_successor_too_small_for_the_dead_heads_layers_splits_them_over_the_chain() {
    let members = vec![member("b", 1.0, 15), member("c", 1.0, 30), member("d", 1.0, 30)];
    let plan = succession("b", 1, &stages(&[("b", 10..20), ("c", 20..25), ("d", 25..30)]), &members, 30).unwrap();
    assert_eq!(plan.epoch, 2);
    assert_eq!(plan.stages.first().map(|(n, r)| (n.as_str(), r.start)), Some(("b", 0)));
    let mut at = 0;
    for (n, r) in &plan.stages {
        assert_eq!(r.start, at, "contiguous");
        assert!(r.len() <= members.iter().find(|m| &m.name == n).unwrap().max_layers, "{n} within its memory");
        at = r.end;
    }
    assert_eq!(at, 30);
    // A gap in what the successor knows (a stage it has no news of): the chain it has must
    // hold the whole model, or there is no plan.
    let gap = stages(&[("b", 10..20), ("d", 25..30)]);
    assert_eq!(succession("b", 1, &gap, &[member("b", 1.0, 15), member("d", 1.0, 10)], 30), None);
    let alone = succession("b", 1, &gap, &[member("b", 1.0, 30), member("d", 1.0, 10)], 30).unwrap();
    assert_eq!(alone.stages, stages(&[("b", 0..30)]));
}
