//! Attention of one query head over its sequence's paged K/V, walked block by block, compiled
//! twice: for AVX2+FMA (chosen at run time) and for the baseline target.

/// One query head's work: where its query is, which KV head it reads and which positions.
pub struct HeadTask<'a> {
    pub q: &'a [f32],
    pub k_cache: &'a [f32],
    pub v_cache: &'a [f32],
    pub block_table: &'a [u32],
    /// Offset of this KV head inside a token's `kv_dim` values.
    pub kv_offset: usize,
    pub kv_dim: usize,
    pub block_size: usize,
    /// Attend to positions `lo..=pos`.
    pub lo: usize,
    pub pos: usize,
    pub scale: f32,
}

/// Dot product with eight independent partial sums, so the compiler vectorizes it.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Calls `f(slot, position)` for every position of the task, block by block (no division per
/// position).
#[inline(always)]
fn for_each_slot(t: &HeadTask<'_>, mut f: impl FnMut(usize)) {
    let bs = t.block_size;
    for b in t.lo / bs..=t.pos / bs {
        let first = (b * bs).max(t.lo);
        let last = (b * bs + bs - 1).min(t.pos);
        let base = t.block_table[b] as usize * bs;
        for p in first..=last {
            f(base + p - b * bs);
        }
    }
}

#[inline(always)]
fn attend_generic(t: &HeadTask<'_>, scores: &mut Vec<f32>, out: &mut [f32]) {
    let hd = out.len();
    scores.clear();
    let mut max = f32::NEG_INFINITY;
    for_each_slot(t, |slot| {
        let base = slot * t.kv_dim + t.kv_offset;
        let s = dot(t.q, &t.k_cache[base..base + hd]) * t.scale;
        max = max.max(s);
        scores.push(s);
    });
    let mut sum = 0.0;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    let inv = 1.0 / sum;
    out.fill(0.0);
    let mut i = 0;
    for_each_slot(t, |slot| {
        let base = slot * t.kv_dim + t.kv_offset;
        let p = scores[i] * inv;
        i += 1;
        for (o, v) in out.iter_mut().zip(&t.v_cache[base..base + hd]) {
            *o += p * v;
        }
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn attend_avx2(t: &HeadTask<'_>, scores: &mut Vec<f32>, out: &mut [f32]) {
    attend_generic(t, scores, out)
}

/// Writes softmax(q·Kᵀ·scale)·V for one head into `out` (`head_dim` values).
pub fn attend(t: &HeadTask<'_>, scores: &mut Vec<f32>, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features the function was compiled for.
            return unsafe { attend_avx2(t, scores, out) };
        }
    }
    attend_generic(t, scores, out)
}
