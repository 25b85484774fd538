//! What a head's calls to one stage cost beyond the stage's own compute, as a slowdown factor
//! the planner weighs the stage by: a stage starved between steps (a CPU quota, a node busy
//! with other work) measures its own compute as before, but every step waits on it longer.
//! Pure: call times in, a factor out.
//!
//! Per call the head knows the wall time `w` and the stage's own compute `c`; `w - c` is the
//! call's overhead: the link's transfer (about the same on every call of a plan) plus any stall.
//! The link's part is the least overhead of the last `2 × WINDOW` calls; the rest is the
//! stall. The slowdown is `(compute + stall) / compute`, both decayed means over roughly the
//! last `1 / (1 - DECAY)` calls. A constant link delay raises the floor, not the stall: moving
//! layers would not shorten it.

/// Each call's weight decays by this per call: about the last two hundred calls count.
const DECAY: f64 = 0.995;
/// The floor (the link's own overhead) is the least of this many calls, or of the previous
/// window's.
const WINDOW: u32 = 32;
/// Calls a meter needs before it says anything.
pub const MIN_CALLS: u64 = 100;

/// The head's running account of its calls to one stage.
#[derive(Debug, Clone, Default)]
pub struct CallMeter {
    calls: u64,
    /// Decayed sums: calls, the stage's compute (µs), the stall beyond the floor (µs).
    weight: f64,
    compute_us: f64,
    stall_us: f64,
    /// Decayed sum of each call's whole overhead (wall - compute: link and stall together).
    overhead_us: f64,
    window_min: Option<f64>,
    previous_min: Option<f64>,
    in_window: u32,
}

impl CallMeter {
    /// One call: `wall_us` as the head timed it, `compute_us` as the stage reported it.
    pub fn record(&mut self, wall_us: f64, compute_us: f64) {
        if !(wall_us.is_finite() && compute_us.is_finite()) || wall_us < 0.0 || compute_us < 0.0 {
            return;
        }
        let overhead = (wall_us - compute_us).max(0.0);
        self.window_min = Some(self.window_min.map_or(overhead, |m| m.min(overhead)));
        self.in_window += 1;
        let floor = match (self.window_min, self.previous_min) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b).unwrap_or(overhead),
        };
        self.calls += 1;
        self.weight = self.weight * DECAY + 1.0;
        self.compute_us = self.compute_us * DECAY + compute_us;
        self.stall_us = self.stall_us * DECAY + (overhead - floor);
        self.overhead_us = self.overhead_us * DECAY + overhead;
        if self.in_window == WINDOW {
            self.previous_min = self.window_min.take();
            self.in_window = 0;
        }
    }

    /// The recent calls' mean compute and mean overhead beyond it (transfer and any stall), in
    /// µs, from the first call on: what a dashboard shows per stage.
    pub fn means_us(&self) -> Option<(f64, f64)> {
        (self.calls > 0).then(|| (self.compute_us / self.weight, self.overhead_us / self.weight))
    }

    /// The mean stall per call (µs), once `MIN_CALLS` calls are in.
    pub fn stall_per_call_us(&self) -> Option<f64> {
        (self.calls >= MIN_CALLS).then(|| self.stall_us / self.weight)
    }

    /// `(compute + stall) / compute` over the recent calls, once `MIN_CALLS` calls are in (1:
    /// the head waits on the stage no longer than its compute and the link take).
    pub fn slowdown(&self) -> Option<f64> {
        (self.calls >= MIN_CALLS).then(|| (self.compute_us + self.stall_us) / self.compute_us.max(1.0))
    }
}

/// How the planner turns meters into weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlowConfig {
    /// A stage counts as slow when its slowdown is at least this many times the least of the
    /// plan's other remote stages (a load on the head's own machine delays every call alike)...
    pub factor: f64,
    /// ...and it stalls at least this long per call on average (µs): jitter of a healthy link
    /// must not move layers.
    pub min_stall_us: f64,
    /// A slow stage's factor is held, its excess over 1 halving every this long (µs): moved
    /// off the critical path, it stalls less, and must not be handed its layers back at once.
    pub half_life_us: u64,
}

impl Default for SlowConfig {
    fn default() -> Self {
        SlowConfig { factor: 2.0, min_stall_us: 2_000.0, half_life_us: 120_000_000 }
    }
}

/// A held slowdown factor, decayed to `now` (`held` set at `at`); 1 once within 5% of it.
pub fn decayed(held: f64, at: u64, now: u64, half_life_us: u64) -> f64 {
    let halvings = now.saturating_sub(at) as f64 / half_life_us.max(1) as f64;
    let f = 1.0 + (held - 1.0).max(0.0) * 0.5f64.powf(halvings);
    if f < 1.05 { 1.0 } else { f }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_steady_link_costs_nothing_and_a_stall_between_steps_does() {
        let mut steady = CallMeter::default();
        for _ in 0..300 {
            steady.record(1_500.0, 1_000.0); // 500 µs of link on every call
        }
        assert_eq!(steady.slowdown(), Some(1.0));
        assert_eq!(steady.stall_per_call_us(), Some(0.0));
        // What a dashboard shows of it: 1 ms of compute and 0.5 ms of transfer per call.
        let (compute, transfer) = steady.means_us().unwrap();
        assert!((compute - 1_000.0).abs() < 1e-6 && (transfer - 500.0).abs() < 1e-6, "{compute} {transfer}");
        assert_eq!(CallMeter::default().means_us(), None);

        // Every 25th call waits 475 ms more (a CPU quota spent): 19 ms per call on average
        // against 1 ms of compute.
        let mut starved = CallMeter::default();
        for i in 0..1_000 {
            starved.record(if i % 25 == 24 { 476_500.0 } else { 1_500.0 }, 1_000.0);
        }
        let f = starved.slowdown().unwrap();
        assert!((12.0..30.0).contains(&f), "{f}");
    }

    #[test]
    fn it_says_nothing_before_enough_calls_and_ignores_nonsense() {
        let mut m = CallMeter::default();
        for _ in 0..MIN_CALLS - 1 {
            m.record(2_000.0, 1_000.0);
        }
        m.record(f64::NAN, 1.0);
        m.record(-5.0, 1.0);
        assert_eq!(m.slowdown(), None);
        m.record(2_000.0, 1_000.0);
        assert_eq!(m.slowdown(), Some(1.0));
    }

    #[test]
    fn a_held_factor_halves_its_excess_every_half_life() {
        assert_eq!(decayed(9.0, 0, 0, 100), 9.0);
        assert!((decayed(9.0, 0, 100, 100) - 5.0).abs() < 1e-9);
        assert_eq!(decayed(9.0, 0, 1_000, 100), 1.0);
        assert_eq!(decayed(0.5, 0, 0, 100), 1.0);
    }
}
