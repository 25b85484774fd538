//! Choosing the next token on the last stage: greedy, temperature, top-k, top-p, min-p,
//! presence/frequency/repetition penalties, per-request seeds, stop ids and log-probabilities.
//!
//! Order of operations follows vLLM: stop ids are masked until `min_tokens`, then penalties,
//! then temperature, then min-p / top-k / top-p. Log-probabilities are those of the model's raw
//! distribution (vLLM's default), whatever the sampling settings.

use std::collections::HashMap;

use crate::rng::Rng;
use crate::EngineError;

/// How one request wants its tokens chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means off.
    pub top_k: usize,
    /// 1 means off.
    pub top_p: f32,
    /// 0 means off.
    pub min_p: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// 1 means off; applied to tokens of the prompt and the output (HF/vLLM semantics).
    pub repetition_penalty: f32,
    pub seed: Option<u64>,
    pub max_tokens: usize,
    pub min_tokens: usize,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// Return the top-n log-probabilities of each step (the chosen token's is always returned).
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            seed: None,
            max_tokens: 16,
            min_tokens: 0,
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logprobs: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy(max_tokens: usize) -> Self {
        SamplingParams {
            temperature: 0.0,
            max_tokens,
            ..Default::default()
        }
    }

    /// Checks ranges; the message names the parameter as the OpenAI API spells it.
    pub fn validate(&self) -> Result<(), String> {
        let finite = |name: &str, v: f32| if v.is_finite() { Ok(()) } else { Err(format!("{name} must be a finite number")) };
        finite("temperature", self.temperature)?;
        finite("top_p", self.top_p)?;
        finite("min_p", self.min_p)?;
        finite("presence_penalty", self.presence_penalty)?;
        finite("frequency_penalty", self.frequency_penalty)?;
        finite("repetition_penalty", self.repetition_penalty)?;
        if self.temperature < 0.0 {
            return Err("temperature must be >= 0".into());
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err("top_p must be in (0, 1]".into());
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err("min_p must be in [0, 1]".into());
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return Err("presence_penalty must be in [-2, 2]".into());
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return Err("frequency_penalty must be in [-2, 2]".into());
        }
        if self.repetition_penalty <= 0.0 {
            return Err("repetition_penalty must be > 0".into());
        }
        if self.max_tokens == 0 {
            return Err("max_tokens must be at least 1".into());
        }
        if self.min_tokens > self.max_tokens {
            return Err("min_tokens must not exceed max_tokens".into());
        }
        if self.logprobs.is_some_and(|n| n > 20) {
            return Err("top_logprobs must be at most 20".into());
        }
        Ok(())
    }
}

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence or stop token id was produced.
    Stop,
    /// `max_tokens` were produced.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// One chosen token with its log-probability and, if asked, the top alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: f32,
    pub top_logprobs: Vec<(u32, f32)>,
}

/// The sampling state of one sequence: its parameters, its generator and what it has produced.
#[derive(Debug, Clone)]
pub struct SequenceSampler {
    params: SamplingParams,
    rng: Rng,
    eos: Vec<u32>,
    /// Tokens seen in prompt or output (for the repetition penalty).
    seen: HashMap<u32, ()>,
    /// Output token counts (for presence and frequency penalties).
    counts: HashMap<u32, u32>,
    generated: usize,
}

impl SequenceSampler {
    pub fn new(params: SamplingParams, eos_token_ids: &[u32], prompt: &[u32]) -> Self {
        let rng = params.seed.map_or_else(Rng::from_entropy, Rng::new);
        let seen = if params.repetition_penalty != 1.0 {
            prompt.iter().map(|&t| (t, ())).collect()
        } else {
            HashMap::new()
        };
        SequenceSampler {
            params,
            rng,
            eos: eos_token_ids.to_vec(),
            seen,
            counts: HashMap::new(),
            generated: 0,
        }
    }

    /// The state a sampler would have after producing `generated` (a sequence continuing on
    /// a new stage after a failover): penalties see those tokens and a seeded generator is
    /// where it would be, so the next token is the one an uninterrupted run samples.
    pub fn resume(params: SamplingParams, eos_token_ids: &[u32], prompt: &[u32], generated: &[u32]) -> Self {
        let mut s = SequenceSampler::new(params, eos_token_ids, prompt);
        for &t in generated {
            if s.params.temperature != 0.0 {
                s.rng.next_f64();
            }
            s.record(t);
        }
        s
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    pub fn generated(&self) -> usize {
        self.generated
    }

    fn is_stop_token(&self, token: u32) -> bool {
        self.params.stop_token_ids.contains(&token) || (!self.params.ignore_eos && self.eos.contains(&token))
    }

    /// Chooses the next token from one row of logits and records it.
    pub fn sample(&mut self, raw: &[f32]) -> Sampled {
        let p = &self.params;
        let masks_stops = self.generated < p.min_tokens;
        let penalizes = p.repetition_penalty != 1.0 || p.presence_penalty != 0.0 || p.frequency_penalty != 0.0;
        // The row is copied only when something changes it (a 128k-entry row is 512 KB).
        let adjusted;
        let logits: &[f32] = if masks_stops || penalizes {
            let mut row = raw.to_vec();
            if masks_stops {
                for &t in p.stop_token_ids.iter().chain(if p.ignore_eos { &[][..] } else { &self.eos[..] }) {
                    if let Some(l) = row.get_mut(t as usize) {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
            if p.repetition_penalty != 1.0 {
                for &t in self.seen.keys() {
                    if let Some(l) = row.get_mut(t as usize) {
                        *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
                    }
                }
            }
            if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
                for (&t, &n) in &self.counts {
                    if let Some(l) = row.get_mut(t as usize) {
                        *l -= p.frequency_penalty * n as f32 + p.presence_penalty;
                    }
                }
            }
            adjusted = row;
            &adjusted
        } else {
            raw
        };
        let top_n = p.logprobs.unwrap_or(0);
        let token = if p.temperature == 0.0 {
            argmax(logits)
        } else {
            self.draw(logits)
        };
        let (logprob, top_logprobs) = log_probs(raw, token, top_n);
        self.record(token);
        Sampled {
            token,
            logprob,
            top_logprobs,
        }
    }

    fn record(&mut self, token: u32) {
        self.generated += 1;
        *self.counts.entry(token).or_insert(0) += 1;
        if self.params.repetition_penalty != 1.0 {
            self.seen.insert(token, ());
        }
    }

    /// Whether the sequence ends after `token` (the last one sampled).
    pub fn finish_reason(&self, token: u32) -> Option<FinishReason> {
        if self.generated >= self.params.min_tokens && self.is_stop_token(token) {
            Some(FinishReason::Stop)
        } else if self.generated >= self.params.max_tokens {
            Some(FinishReason::Length)
        } else {
            None
        }
    }

    fn draw(&mut self, logits: &[f32]) -> u32 {
        // Exactly one draw per sampled token, whatever the path, so `resume` can replay it.
        let unit = self.rng.next_f64();
        if self.params.top_k > 0 && self.params.top_k < logits.len() {
            self.draw_top_k(logits, unit)
        } else {
            self.draw_whole_vocabulary(logits, unit)
        }
    }

    /// Temperature, min-p and top-p over the whole row without sorting it: the nucleus is
    /// looked for among the tokens within a logit gap of the best, the gap widening until
    /// they hold `top_p` of the mass; they are then exactly the head of the full sorted order.
    fn draw_whole_vocabulary(&self, logits: &[f32], unit: f64) -> u32 {
        let p = &self.params;
        let temperature = p.temperature;
        let best = finite_max(logits);
        if best == f32::NEG_INFINITY {
            return argmax(logits);
        }
        let top = best / temperature;
        // Weight of a token relative to the best one (1.0), 0 where min-p or masking drops it.
        let weight = |l: f32| -> f32 {
            let w = exp_nonpositive(l / temperature - top);
            keep_or_zero(l.abs() < f32::INFINITY && w >= p.min_p, w)
        };
        let total = sum_lanes(logits, weight);
        if p.top_p >= 1.0 {
            let mut u = unit * total;
            let mut last = None;
            for (i, &l) in logits.iter().enumerate() {
                let w = weight(l) as f64;
                if w > 0.0 {
                    if u < w {
                        return i as u32;
                    }
                    u -= w;
                    last = Some(i as u32);
                }
            }
            // Rounding left `u` past the end: take the last token with mass.
            return last.unwrap_or_else(|| argmax(logits));
        }
        let target = p.top_p as f64 * total;
        let mut gap = 8.0f32;
        let nucleus = loop {
            let floor = top - gap;
            let mut head: Vec<(u32, f32, f64)> = logits
                .iter()
                .enumerate()
                .filter(|(_, &l)| l / temperature >= floor)
                .map(|(i, &l)| (i as u32, l / temperature, weight(l) as f64))
                .collect();
            let mass: f64 = head.iter().map(|c| c.2).sum();
            // Past a gap of 104 every weight left out is exp(-104) = 0 in f32.
            if mass >= target || gap > 104.0 {
                head.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                let mut cum = 0.0;
                let keep = head
                    .iter()
                    .take_while(|c| {
                        let inside = cum < target;
                        cum += c.2;
                        inside
                    })
                    .count();
                head.truncate(keep.max(1));
                break head;
            }
            gap *= 2.0;
        };
        let kept: f64 = nucleus.iter().map(|c| c.2).sum();
        let mut u = unit * kept;
        for c in &nucleus {
            if c.2 > 0.0 {
                if u < c.2 {
                    return c.0;
                }
                u -= c.2;
            }
        }
        nucleus.iter().rev().find(|c| c.2 > 0.0).map_or(nucleus[0].0, |c| c.0)
    }

    /// Top-k first: the k best are chosen (all of them with `top_k` 0), then weighted as the
    /// other filters say, over a sorted candidate list.
    fn draw_top_k(&self, logits: &[f32], unit: f64) -> u32 {
        let p = &self.params;
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l / p.temperature))
            .collect();
        if cand.is_empty() {
            return argmax(logits);
        }
        let desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.select_nth_unstable_by(p.top_k - 1, desc);
            cand.truncate(p.top_k);
        }
        let needs_order = p.top_p < 1.0;
        if needs_order {
            cand.sort_unstable_by(desc);
        }
        let max = cand.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<f64> = cand.iter().map(|c| ((c.1 - max) as f64).exp()).collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= sum);
        if p.min_p > 0.0 {
            // The most likely candidate has probability exp(0) / sum.
            let floor = p.min_p as f64 / sum;
            for q in probs.iter_mut() {
                if *q < floor {
                    *q = 0.0;
                }
            }
        }
        if needs_order {
            let mut cum = 0.0;
            let total: f64 = probs.iter().sum();
            for q in probs.iter_mut() {
                if cum >= p.top_p as f64 * total {
                    *q = 0.0;
                } else {
                    cum += *q;
                }
            }
        }
        let total: f64 = probs.iter().sum();
        let mut u = unit * total;
        for (c, q) in cand.iter().zip(&probs) {
            if *q > 0.0 {
                if u < *q {
                    return c.0;
                }
                u -= q;
            }
        }
        // Rounding left `u` past the end: take the last candidate with mass.
        cand.iter().zip(&probs).rev().find(|(_, q)| **q > 0.0).map_or(cand[0].0, |(c, _)| c.0)
    }
}

/// Accumulators kept side by side in the row loops below, so they compile to vector code.
const LANES: usize = 16;

/// The largest finite value of `xs`, NEG_INFINITY if there is none.
fn finite_max(xs: &[f32]) -> f32 {
    let finite = |x: f32| if x.abs() < f32::INFINITY { x } else { f32::NEG_INFINITY };
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            let x = finite(x);
            *a = if x > *a { x } else { *a };
        }
    }
    let mut best = f32::NEG_INFINITY;
    for x in acc.into_iter().chain(chunks.remainder().iter().map(|&x| finite(x))) {
        best = if x > best { x } else { best };
    }
    best
}

/// Σ f(x) over `xs`: `LANES` f32 partial sums over blocks of 4096, the blocks added in f64.
fn sum_lanes(xs: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut total = 0f64;
    let mut blocks = xs.chunks_exact(4096);
    for block in &mut blocks {
        let mut acc = [0f32; LANES];
        for c in block.chunks_exact(LANES) {
            for i in 0..LANES {
                acc[i] += f(c[i]);
            }
        }
        total += acc.iter().map(|&a| a as f64).sum::<f64>();
    }
    total + blocks.remainder().iter().map(|&x| f(x) as f64).sum::<f64>()
}

/// `value` where `keep`, else 0, without a branch.
#[inline(always)]
fn keep_or_zero(keep: bool, value: f32) -> f32 {
    f32::from_bits(value.to_bits() & (keep as u32).wrapping_neg())
}

/// e^x for x <= 0 (0 below -87), within 5e-6 relative (the rounding of x log2 e at the far end of
/// the range; about 2e-7 near 0): 2^(x log2 e) split into a power of two
/// and a degree-6 polynomial on [-1/2, 1/2], in plain arithmetic the compiler vectorizes.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    // 1.5 * 2^23: adding it rounds to an integer, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let t = x * std::f32::consts::LOG2_E;
    let t = if t < -126.0 { -126.0 } else { t };
    let shifted = t + ROUND;
    let f = t - (shifted - ROUND);
    let poly = 1.0 + f * (std::f32::consts::LN_2 + f * (0.240_226_5 + f * (0.055_504_11 + f * (0.009_618_129 + f * (0.001_333_355 + f * 0.000_154_035_3)))));
    // (n + 127) << 23 is 2^n; the wrapping integer arithmetic keeps the loop vectorizable.
    let n = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    let scale = f32::from_bits(n.wrapping_add(127) << 23);
    keep_or_zero(x >= -87.0, poly * scale)
}

/// Index of the largest logit (the lowest index among equals; NaN is never the largest).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = logits.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = if x > *a { x } else { *a };
        }
    }
    let mut best = f32::NEG_INFINITY;
    for &x in acc.iter().chain(chunks.remainder()) {
        best = if x > best { x } else { best };
    }
    // The first block holding the best, found a vector compare at a time, then the index in it.
    let block = logits.chunks(LANES * 4).position(|c| c.iter().fold(false, |hit, &x| hit | (x == best))).unwrap_or(0);
    let start = block * LANES * 4;
    logits.get(start..).and_then(|rest| rest.iter().position(|&l| l == best)).map_or(0, |i| start + i) as u32
}

/// The chosen token's log-probability and the `top_n` most likely tokens', from raw logits
/// (non-finite logits carry no mass).
pub fn log_probs(logits: &[f32], token: u32, top_n: usize) -> (f32, Vec<(u32, f32)>) {
    let max = finite_max(logits);
    let sum = sum_lanes(logits, |l| keep_or_zero(l.abs() < f32::INFINITY, exp_nonpositive(l - max)));
    let lse = max as f64 + sum.ln();
    let lp = |l: f32| (l as f64 - lse) as f32;
    let chosen = logits.get(token as usize).map_or(f32::NEG_INFINITY, |&l| lp(l));
    let mut top = Vec::new();
    if top_n > 0 {
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let n = top_n.min(idx.len());
        let desc = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
        idx.select_nth_unstable_by(n - 1, desc);
        idx.truncate(n);
        idx.sort_unstable_by(desc);
        top = idx.into_iter().map(|i| (i, lp(logits[i as usize]))).collect();
    }
    (chosen, top)
}

/// The sampling state of every sequence a last stage serves, by sequence id.
#[derive(Debug, Default)]
pub struct SamplerSet {
    samplers: HashMap<u64, SequenceSampler>,
}

/// One sequence's sampled token, and whether the sequence ends with it.
pub type SampledToken = (u64, Sampled, Option<FinishReason>);

impl SamplerSet {
    /// Sequences that ended: drop their state.
    pub fn release(&mut self, ids: impl IntoIterator<Item = u64>) {
        for id in ids {
            self.samplers.remove(&id);
        }
    }

    pub fn add(&mut self, id: u64, params: SamplingParams, eos_token_ids: &[u32], prompt: &[u32]) {
        self.samplers.insert(id, SequenceSampler::new(params, eos_token_ids, prompt));
    }

    /// A sequence that already produced `generated` (see [`SequenceSampler::resume`]).
    pub fn resume(&mut self, id: u64, params: SamplingParams, eos_token_ids: &[u32], prompt: &[u32], generated: &[u32]) {
        self.samplers.insert(id, SequenceSampler::resume(params, eos_token_ids, prompt, generated));
    }

    /// One token for each of `ids` (the sequences that asked for logits, in batch order), from
    /// consecutive `vocab`-wide rows of `logits`.
    pub fn sample(&mut self, ids: impl IntoIterator<Item = u64>, logits: &[f32], vocab: usize) -> crate::Result<Vec<SampledToken>> {
        let mut rows = logits.chunks_exact(vocab.max(1));
        ids.into_iter()
            .map(|id| {
                let row = rows.next().ok_or_else(|| EngineError::BadBatch("fewer logit rows than sampling sequences".into()))?;
                let sampler = self.samplers.get_mut(&id).ok_or_else(|| EngineError::BadBatch(format!("no sampling state for sequence {id}")))?;
                let s = sampler.sample(row);
                let finish = sampler.finish_reason(s.token);
                Ok((id, s, finish))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.5, -1.0, 0.0, 2.9]
    }

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams { seed: Some(3), max_tokens: 100, ..Default::default() };
        f(&mut p);
        p
    }

    fn draws(p: SamplingParams, n: usize) -> Vec<u32> {
        let mut s = SequenceSampler::new(p, &[], &[]);
        (0..n).map(|_| s.sample(&logits()).token).collect()
    }

    fn wide_row(seed: u64, n: usize) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        (0..n).map(|_| rng.next_normal() * 4.0).collect()
    }

    #[test]
    fn the_vectorized_exp_is_within_5e6_of_exp() {
        let mut worst = 0f64;
        for i in 0..=100_000 {
            let x = -87.0 * i as f32 / 100_000.0;
            let want = (x as f64).exp();
            worst = worst.max(((exp_nonpositive(x) as f64) - want).abs() / want);
        }
        assert!(worst < 5e-6, "worst relative error {worst}");
        assert_eq!(exp_nonpositive(-88.0), 0.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpositive(0.0), 1.0);
    }

    #[test]
    fn argmax_and_log_probs_match_the_plain_definitions() {
        for seed in 0..20 {
            let mut row = wide_row(seed, 5_000 + seed as usize * 37);
            row[(seed as usize * 101) % 4_000] = f32::NEG_INFINITY;
            let plain = row.iter().enumerate().fold(0, |b, (i, &l)| if l > row[b] { i } else { b });
            assert_eq!(argmax(&row) as usize, plain);
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = max + row.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln();
            let (lp, top) = log_probs(&row, plain as u32, 3);
            assert!((lp as f64 - (row[plain] as f64 - lse)).abs() < 1e-5, "{lp} vs {}", row[plain] as f64 - lse);
            assert_eq!(top[0].0 as usize, plain);
        }
        let mut ties = vec![0.0f32; 100];
        ties[40] = 2.0;
        ties[70] = 2.0;
        ties[3] = f32::NAN;
        assert_eq!(argmax(&ties), 40, "lowest index among equals, NaN ignored");
    }

    #[test]
    fn the_unsorted_nucleus_draws_what_sorting_the_whole_row_draws() {
        let settings = [(0.7, 0.9, 0.0), (1.0, 0.5, 0.0), (1.3, 0.99, 0.0), (0.8, 1.0, 0.0), (1.0, 0.95, 0.05), (0.2, 0.3, 0.0)];
        for (k, &(temperature, top_p, min_p)) in settings.iter().enumerate() {
            let row = wide_row(100 + k as u64, 20_000);
            let s = SequenceSampler::new(params(|p| {
                p.temperature = temperature;
                p.top_p = top_p;
                p.min_p = min_p;
            }), &[], &[]);
            let mut units = Rng::new(k as u64);
            for _ in 0..300 {
                let unit = units.next_f64();
                assert_eq!(s.draw_whole_vocabulary(&row, unit), s.draw_top_k(&row, unit), "T {temperature} top_p {top_p} min_p {min_p} unit {unit}");
            }
        }
    }

    #[test]
    fn greedy_and_top_k_one_take_the_argmax() {
        assert!(draws(params(|p| p.temperature = 0.0), 5).iter().all(|&t| t == 1));
        assert!(draws(params(|p| p.top_k = 1), 20).iter().all(|&t| t == 1));
        assert!(draws(params(|p| p.top_p = 0.01), 20).iter().all(|&t| t == 1));
        assert!(draws(params(|p| p.min_p = 0.99), 20).iter().all(|&t| t == 1));
    }

    #[test]
    fn seeds_reproduce_and_differ() {
        let a = draws(params(|_| {}), 50);
        assert_eq!(a, draws(params(|_| {}), 50));
        assert_ne!(a, draws(params(|p| p.seed = Some(4)), 50));
    }

    #[test]
    fn a_resumed_sampler_continues_exactly_where_the_first_one_was() {
        let p = params(|p| {
            p.presence_penalty = 0.5;
            p.repetition_penalty = 1.3;
        });
        let whole = draws(p.clone(), 40);
        let mut resumed = SequenceSampler::resume(p, &[], &[], &whole[..25]);
        assert_eq!(resumed.generated(), 25);
        let rest: Vec<u32> = (25..40).map(|_| resumed.sample(&logits()).token).collect();
        assert_eq!(rest, whole[25..]);
    }

    #[test]
    fn filters_restrict_the_support() {
        let top2 = draws(params(|p| p.top_k = 2), 200);
        assert!(top2.iter().all(|t| [1, 5].contains(t)));
        assert!(top2.contains(&1) && top2.contains(&5));
        // top_p: p(1)≈.37 p(5)≈.33 p(2)≈.22: 0.6 keeps tokens 1 and 5 only.
        let nucleus = draws(params(|p| p.top_p = 0.6), 300);
        assert!(nucleus.iter().all(|t| [1, 5].contains(t)), "{nucleus:?}");
        let minp = draws(params(|p| p.min_p = 0.5), 300);
        assert!(minp.iter().all(|t| [1, 5, 2].contains(t)));
    }

    #[test]
    fn penalties_move_the_choice() {
        let mut s = SequenceSampler::new(params(|p| {
            p.temperature = 0.0;
            p.frequency_penalty = 1.0;
        }), &[], &[]);
        let got: Vec<u32> = (0..3).map(|_| s.sample(&logits()).token).collect();
        assert_eq!(got, vec![1, 5, 2]);
        let mut s = SequenceSampler::new(params(|p| {
            p.temperature = 0.0;
            p.repetition_penalty = 2.0;
        }), &[], &[1]);
        assert_eq!(s.sample(&logits()).token, 5, "token 1 is in the prompt");
    }

    #[test]
    fn stop_ids_min_tokens_and_length() {
        let mut s = SequenceSampler::new(params(|p| {
            p.temperature = 0.0;
            p.min_tokens = 2;
            p.max_tokens = 3;
        }), &[1], &[]);
        for _ in 0..2 {
            let t = s.sample(&logits()).token;
            assert_eq!(t, 5, "eos is masked before min_tokens");
            assert_eq!(s.finish_reason(t), None);
        }
        let t = s.sample(&logits()).token;
        assert_eq!(t, 1);
        assert_eq!(s.finish_reason(t), Some(FinishReason::Stop));
        let mut s = SequenceSampler::new(params(|p| {
            p.temperature = 0.0;
            p.max_tokens = 1;
            p.ignore_eos = true;
        }), &[1], &[]);
        let t = s.sample(&logits()).token;
        assert_eq!(s.finish_reason(t), Some(FinishReason::Length));
    }

    #[test]
    fn logprobs_are_normalised_and_sorted() {
        let (lp, top) = log_probs(&logits(), 2, 3);
        let total: f64 = logits().iter().map(|&l| ((l + lp - 2.5) as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-5);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 5, 2]);
        assert!((top[2].1 - lp).abs() < 1e-6);
    }

    #[test]
    fn validation_names_the_parameter() {
        let bad = SamplingParams { top_p: 0.0, ..Default::default() };
        assert!(bad.validate().unwrap_err().contains("top_p"));
        let bad = SamplingParams { temperature: f32::NAN, ..Default::default() };
        assert!(bad.validate().unwrap_err().contains("temperature"));
    }

    #[test]
    fn a_sampler_set_samples_rows_in_order_and_names_what_is_missing() {
        let mut set = SamplerSet::default();
        set.add(7, SamplingParams::greedy(16), &[], &[1]);
        set.add(9, SamplingParams::greedy(16), &[], &[1]);
        // Greedy: row 0 peaks at token 2, row 1 at token 0.
        let logits = [0.0, 1.0, 5.0, 9.0, 1.0, 2.0];
        let out = set.sample([7, 9], &logits, 3).unwrap();
        assert_eq!(out.iter().map(|(id, s, _)| (*id, s.token)).collect::<Vec<_>>(), vec![(7, 2), (9, 0)]);
        assert!(set.sample([7, 9, 7], &logits, 3).unwrap_err().to_string().contains("fewer logit rows"));
        set.release([9]);
        assert!(set.sample([9], &logits, 3).unwrap_err().to_string().contains("sequence 9"));
    }
}
