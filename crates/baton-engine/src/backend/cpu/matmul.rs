//! CPU matrix products `x · wᵀ` with weights in their stored dtype and f32 accumulation.
//!
//! Few rows (decode) run hand-written tiles (AVX-512 or AVX2, chosen at run time, see `isa`;
//! one token row always AVX2 where it runs, being faster there) that widen stored weights in
//! registers and read each weight byte once for the whole batch;
//! many rows (prefill) widen a panel of weight rows to f32 and hand it to the `gemm` crate.
//! With `Compute::Bf16`, products with bf16 weights round the activations to bf16 once and
//! run AVX512_BF16 tiles from two token rows on. All paths split the output columns across the
//! thread pool, so every output element is computed by one thread in a fixed order: results do
//! not depend on the number of threads.

use std::cell::RefCell;

use super::isa::{Compute, Isa, Kernels};
use super::pool::WorkerPool;
use crate::checkpoint::DType;

/// A weight matrix `[rows, cols]` as the CPU kernels read it.
#[derive(Clone, Copy)]
pub struct WeightRef<'a> {
    pub dtype: DType,
    pub bytes: &'a [u8],
    pub rows: usize,
    pub cols: usize,
}

impl WeightRef<'_> {
    fn row_bytes(&self) -> usize {
        self.cols * self.dtype.size()
    }
}

/// From this many token rows on, the gemm path wins over the row-streaming kernel.
pub const GEMM_MIN_ROWS: usize = 24;
/// Weight rows widened per gemm panel.
const PANEL: usize = 64;

/// A raw output pointer shared by tasks that write disjoint columns.
#[derive(Clone, Copy)]
pub(super) struct OutPtr(pub(super) *mut f32);
// SAFETY: every task writes a disjoint set of output columns (see `matmul`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer `offset` values in (a method, so closures capture the whole `OutPtr`).
    pub(super) fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// How one product is computed.
#[derive(Clone, Copy, PartialEq)]
enum Path {
    Stream,
    Gemm,
    Bf16,
}

thread_local! {
    /// Each thread's panel of widened weights for the gemm path, kept between products.
    static PANEL_SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `out[m, n] = x[m, k] · w[n, k]ᵀ` on `pool`'s threads.
pub fn matmul(pool: &WorkerPool, x: &[f32], m: usize, w: WeightRef<'_>, out: &mut [f32], kernels: Kernels) {
    matmul_many(pool, x, m, &mut [(w, out)], kernels);
}

/// Several products of the same input (q/k/v, gate/up) in one parallel pass, so the threads
/// meet once instead of once per weight.
pub fn matmul_many(pool: &WorkerPool, x: &[f32], m: usize, jobs: &mut [(WeightRef<'_>, &mut [f32])], kernels: Kernels) {
    let mut outs = Vec::with_capacity(jobs.len());
    let mut weights = Vec::with_capacity(jobs.len());
    let mut paths = Vec::with_capacity(jobs.len());
    for (w, out) in jobs.iter_mut() {
        let (n, k) = (w.rows, w.cols);
        assert_eq!(x.len(), m * k, "matmul: x has {} values, expected {m}x{k}", x.len());
        assert_eq!(out.len(), m * n, "matmul: out has {} values, expected {m}x{n}", out.len());
        assert_eq!(w.bytes.len(), n * w.row_bytes(), "matmul: weight bytes do not match its shape");
        outs.push(OutPtr(out.as_mut_ptr()));
        weights.push(*w);
        paths.push(if m == 1 {
            // One token row is memory-bound: exact arithmetic costs nothing, and the AVX2
            // tiles stream weights faster than the AVX-512 ones on Zen 4 (BENCHMARKS.md).
            Path::Stream
        } else if kernels.compute == Compute::Bf16 && kernels.isa == Isa::Avx512 && w.dtype == DType::BF16 {
            Path::Bf16
        } else if m >= GEMM_MIN_ROWS && kernels.isa != Isa::Scalar {
            Path::Gemm
        } else {
            Path::Stream
        });
    }
    let k = weights.first().map_or(0, |w| w.cols);
    let mut xb = Vec::new();
    if paths.contains(&Path::Bf16) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Kernels::for_machine` gives `Compute::Bf16` only where AVX512_BF16 runs.
        unsafe {
            super::avx512::round_to_bf16(x, m, k, &mut xb)
        };
    }
    let threads = pool.threads();
    let streamed: usize = weights.iter().zip(&paths).filter(|(_, p)| **p != Path::Gemm).map(|(w, _)| w.rows).sum();
    // Enough chunks to balance, each a multiple of 4 rows (the tiles' height).
    let chunk = streamed.div_ceil(threads * 8).next_multiple_of(4).max(16);
    let mut tasks = Vec::with_capacity(jobs.len() * 8 * threads);
    for (j, w) in weights.iter().enumerate() {
        let step = if paths[j] == Path::Gemm { PANEL } else { chunk };
        let mut r0 = 0;
        while r0 < w.rows {
            tasks.push((j, r0, (r0 + step).min(w.rows)));
            r0 += step;
        }
    }
    let isa = kernels.isa;
    let stream_isa = if m == 1 { isa.min(Isa::Avx2) } else { isa };
    pool.for_each(tasks.len(), &|t| {
        let (j, r0, r1) = tasks[t];
        // SAFETY: each task writes only columns r0..r1 of output j; tasks do not overlap; the
        // kernel family runs on this CPU (`Isa::chosen`).
        unsafe {
            match paths[j] {
                Path::Gemm => PANEL_SCRATCH.with_borrow_mut(|scratch| gemm_panel(x, m, weights[j], r0, r1, scratch, outs[j], isa)),
                Path::Stream => stream_rows(stream_isa, x, m, weights[j], r0, r1, outs[j]),
                #[cfg(target_arch = "x86_64")]
                Path::Bf16 => super::avx512::stream_rows_bf16(&xb, m, weights[j], r0, r1, outs[j].0),
                #[cfg(not(target_arch = "x86_64"))]
                Path::Bf16 => unreachable!("bf16 compute is only chosen on x86-64"),
            }
        }
    });
}

/// Widens weight rows r0..r1 to f32 and multiplies with gemm.
#[allow(clippy::too_many_arguments)] // one panel: input, weight range, scratch, output, family
unsafe fn gemm_panel(x: &[f32], m: usize, w: WeightRef<'_>, r0: usize, r1: usize, scratch: &mut Vec<f32>, out: OutPtr, isa: Isa) {
    let k = w.cols;
    let n = w.rows;
    let rows = r1 - r0;
    let bytes = &w.bytes[r0 * w.row_bytes()..r1 * w.row_bytes()];
    let panel: &[f32] = if w.dtype == DType::F32 && (bytes.as_ptr() as usize) % 4 == 0 {
        // SAFETY: aligned, and the length is a whole number of f32 values.
        unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<f32>(), rows * k) }
    } else {
        scratch.resize(rows * k, 0.0);
        widen_with(isa, w.dtype, bytes, scratch);
        scratch
    };
    // dst(i, j) = out[i * n + r0 + j]; lhs(i, l) = x[i * k + l]; rhs(l, j) = panel[j * k + l].
    // SAFETY: pointers and strides describe the buffers above; columns r0..r1 are ours alone.
    unsafe {
        gemm::gemm(
            m,
            rows,
            k,
            out.0.add(r0),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            panel.as_ptr(),
            k as isize,
            1,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Widens stored values to f32 with `isa`'s kernels, which must run on this CPU (every family
/// is exact: the results are the same).
pub fn widen_with(isa: Isa, dtype: DType, bytes: &[u8], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: the caller's `isa` runs on this CPU.
        Isa::Avx512 => return unsafe { super::avx512::widen(dtype, bytes, out) },
        Isa::Avx2 => return unsafe { avx2::widen(dtype, bytes, out) },
        Isa::Scalar => {}
    }
    let _ = isa;
    widen_scalar(dtype, bytes, out)
}

fn widen_scalar(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        DType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
        }
        DType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
    }
}

/// Computes columns r0..r1 of `out`, streaming each weight row once for all `m` token rows.
unsafe fn stream_rows(isa: Isa, x: &[f32], m: usize, w: WeightRef<'_>, r0: usize, r1: usize, out: OutPtr) {
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: the caller's `isa` runs on this CPU; bounds as the caller's.
        Isa::Avx512 => return unsafe { super::avx512::stream_rows(x, m, w, r0, r1, out.0) },
        Isa::Avx2 => return unsafe { avx2::stream_rows(x, m, w, r0, r1, out.0) },
        Isa::Scalar => {}
    }
    let _ = isa;
    // SAFETY: as the caller's.
    unsafe { stream_rows_scalar(x, m, w, r0, r1, out.0) }
}

/// Portable reference for the SIMD kernel.
unsafe fn stream_rows_scalar(x: &[f32], m: usize, w: WeightRef<'_>, r0: usize, r1: usize, out: *mut f32) {
    let k = w.cols;
    let n = w.rows;
    let mut row = vec![0.0f32; k];
    for r in r0..r1 {
        widen_scalar(w.dtype, &w.bytes[r * w.row_bytes()..(r + 1) * w.row_bytes()], &mut row);
        for t in 0..m {
            let xs = &x[t * k..(t + 1) * k];
            let dot: f32 = xs.iter().zip(&row).map(|(a, b)| a * b).sum();
            // SAFETY: t < m and r < n, inside `out`.
            unsafe { *out.add(t * n + r) = dot };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! AVX2 + FMA + F16C tiles: 4 weight rows × up to 2 token rows per pass over k.
    use std::arch::x86_64::*;

    use super::WeightRef;
    use crate::checkpoint::DType;

    /// Loads 8 stored values starting at element `i` of a row and widens them to f32.
    trait Load8 {
        const SIZE: usize;
        unsafe fn load8(row: *const u8, i: usize) -> __m256;
        fn scalar(row: &[u8], i: usize) -> f32;
    }
    struct F32;
    struct Bf16;
    struct F16;
    impl Load8 for F32 {
        const SIZE: usize = 4;
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn load8(row: *const u8, i: usize) -> __m256 {
            unsafe { _mm256_loadu_ps(row.add(i * 4).cast()) }
        }
        fn scalar(row: &[u8], i: usize) -> f32 {
            f32::from_le_bytes([row[4 * i], row[4 * i + 1], row[4 * i + 2], row[4 * i + 3]])
        }
    }
    impl Load8 for Bf16 {
        const SIZE: usize = 2;
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn load8(row: *const u8, i: usize) -> __m256 {
            unsafe {
                let h = _mm_loadu_si128(row.add(i * 2).cast());
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
            }
        }
        fn scalar(row: &[u8], i: usize) -> f32 {
            f32::from_bits((u16::from_le_bytes([row[2 * i], row[2 * i + 1]]) as u32) << 16)
        }
    }
    impl Load8 for F16 {
        const SIZE: usize = 2;
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn load8(row: *const u8, i: usize) -> __m256 {
            unsafe { _mm256_cvtph_ps(_mm_loadu_si128(row.add(i * 2).cast())) }
        }
        fn scalar(row: &[u8], i: usize) -> f32 {
            half::f16::from_bits(u16::from_le_bytes([row[2 * i], row[2 * i + 1]])).to_f32()
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps::<1>(v);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<0x55>(s, s));
        _mm_cvtss_f32(s)
    }

    /// Dot products of weight rows `rows` with token rows `toks` (R x C tile).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile<L: Load8, const R: usize, const C: usize>(
        w: &WeightRef<'_>,
        rows: [usize; R],
        x: &[f32],
        toks: [usize; C],
    ) -> [[f32; C]; R] {
        let k = w.cols;
        let row_bytes = k * L::SIZE;
        let wp: [*const u8; R] = std::array::from_fn(|i| unsafe { w.bytes.as_ptr().add(rows[i] * row_bytes) });
        let xp: [*const f32; C] = std::array::from_fn(|j| unsafe { x.as_ptr().add(toks[j] * k) });
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let k8 = k - k % 8;
        // The next tile's rows follow these; fetch them while this tile computes, spread evenly
        // over the k loop (the hardware prefetcher alone leaves DRAM bandwidth unused here).
        let next = wp[R - 1].wrapping_add(row_bytes);
        let per_iter = R * 8 * L::SIZE;
        let mut i = 0;
        while i < k8 {
            let ahead = next.wrapping_add(i / 8 * per_iter);
            let mut line = 0;
            while line < per_iter {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line).cast());
                line += 64;
            }
            let xv: [__m256; C] = std::array::from_fn(|j| unsafe { _mm256_loadu_ps(xp[j].add(i)) });
            for r in 0..R {
                let wv = unsafe { L::load8(wp[r], i) };
                for j in 0..C {
                    acc[r][j] = _mm256_fmadd_ps(wv, xv[j], acc[r][j]);
                }
            }
            i += 8;
        }
        let mut res = [[0.0f32; C]; R];
        for r in 0..R {
            let row = &w.bytes[rows[r] * row_bytes..(rows[r] + 1) * row_bytes];
            for j in 0..C {
                let mut s = hsum(acc[r][j]);
                for t in k8..k {
                    s += L::scalar(row, t) * x[toks[j] * k + t];
                }
                res[r][j] = s;
            }
        }
        res
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run<L: Load8>(x: &[f32], m: usize, w: WeightRef<'_>, r0: usize, r1: usize, out: *mut f32) {
        let n = w.rows;
        let store = |r: usize, t: usize, v: f32| unsafe { *out.add(t * n + r) = v };
        let mut r = r0;
        while r + 4 <= r1 {
            let rows = [r, r + 1, r + 2, r + 3];
            let mut t = 0;
            // Six tokens against two rows: 12 accumulators, one widening per six FMAs.
            while t + 6 <= m {
                let toks = [t, t + 1, t + 2, t + 3, t + 4, t + 5];
                for pair in [[r, r + 1], [r + 2, r + 3]] {
                    let res = unsafe { tile::<L, 2, 6>(&w, pair, x, toks) };
                    for (i, rr) in pair.iter().enumerate() {
                        for (j, tt) in toks.iter().enumerate() {
                            store(*rr, *tt, res[i][j]);
                        }
                    }
                }
                t += 6;
            }
            while t + 2 <= m {
                let res = unsafe { tile::<L, 4, 2>(&w, rows, x, [t, t + 1]) };
                for (i, rr) in rows.iter().enumerate() {
                    store(*rr, t, res[i][0]);
                    store(*rr, t + 1, res[i][1]);
                }
                t += 2;
            }
            if t < m {
                let res = unsafe { tile::<L, 4, 1>(&w, rows, x, [t]) };
                for (i, rr) in rows.iter().enumerate() {
                    store(*rr, t, res[i][0]);
                }
            }
            r += 4;
        }
        while r < r1 {
            for t in 0..m {
                let res = unsafe { tile::<L, 1, 1>(&w, [r], x, [t]) };
                store(r, t, res[0][0]);
            }
            r += 1;
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn widen_as<L: Load8>(bytes: &[u8], out: &mut [f32]) {
        let n = out.len().min(bytes.len() / L::SIZE);
        let n8 = n - n % 8;
        let mut i = 0;
        while i < n8 {
            // SAFETY: i + 8 <= n values are inside both slices.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(i), L::load8(bytes.as_ptr(), i)) };
            i += 8;
        }
        for j in n8..n {
            out[j] = L::scalar(bytes, j);
        }
    }

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    pub unsafe fn widen(dtype: DType, bytes: &[u8], out: &mut [f32]) {
        unsafe {
            match dtype {
                DType::F32 => widen_as::<F32>(bytes, out),
                DType::BF16 => widen_as::<Bf16>(bytes, out),
                DType::F16 => widen_as::<F16>(bytes, out),
            }
        }
    }

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `out` must hold `m * w.rows` values, and no
    /// other thread may write columns r0..r1.
    pub unsafe fn stream_rows(x: &[f32], m: usize, w: WeightRef<'_>, r0: usize, r1: usize, out: *mut f32) {
        unsafe {
            match w.dtype {
                DType::F32 => run::<F32>(x, m, w, r0, r1, out),
                DType::BF16 => run::<Bf16>(x, m, w, r0, r1, out),
                DType::F16 => run::<F16>(x, m, w, r0, r1, out),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng_values(n: usize, seed: u64) -> Vec<f32> {
        let mut r = crate::rng::Rng::new(seed);
        (0..n).map(|_| r.next_f32() * 2.0 - 1.0).collect()
    }

    fn encode(dtype: DType, v: &[f32]) -> Vec<u8> {
        match dtype {
            DType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            DType::BF16 => v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect(),
            DType::F16 => v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect(),
        }
    }

    const SHAPES: [(usize, usize, usize); 11] = [
        (1, 37, 20),
        (3, 64, 576),
        (2, 5, 8),
        (13, 36, 40),
        (7, 10, 24),
        (30, 130, 72),
        (24, 64, 64),
        (1, 9, 33),
        (6, 7, 31),
        (100, 21, 95),
        (5, 300, 1),
    ];

    fn exact(isa: Isa) -> Kernels {
        Kernels { isa, compute: Compute::Exact }
    }

    /// Every kernel family this CPU runs (tiles with odd tails, gemm panels), every dtype,
    /// against a plain f64 reference; the scalar tiles against it as well.
    #[test]
    fn every_kernel_family_matches_the_reference() {
        let pool = WorkerPool::new(2).unwrap();
        let families = Isa::all_supported();
        assert!(families.contains(&Isa::Scalar));
        for isa in families {
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                for (m, n, k) in SHAPES {
                    let x = rng_values(m * k, 1);
                    let wv = rng_values(n * k, 2);
                    let bytes = encode(dtype, &wv);
                    let mut wide = vec![0.0; n * k];
                    widen_with(isa, dtype, &bytes, &mut wide);
                    let mut wide_scalar = vec![0.0; n * k];
                    widen_scalar(dtype, &bytes, &mut wide_scalar);
                    assert_eq!(wide, wide_scalar, "{isa:?} widening of {dtype:?}");
                    let w = WeightRef { dtype, bytes: &bytes, rows: n, cols: k };
                    let mut out = vec![0.0; m * n];
                    matmul(&pool, &x, m, w, &mut out, exact(isa));
                    let mut scalar = vec![0.0; m * n];
                    unsafe { stream_rows_scalar(&x, m, w, 0, n, scalar.as_mut_ptr()) };
                    for t in 0..m {
                        for r in 0..n {
                            let want: f64 = (0..k).map(|i| x[t * k + i] as f64 * wide[r * k + i] as f64).sum();
                            let got = out[t * n + r] as f64;
                            let tol = 1e-4 * (k as f64).sqrt();
                            assert!((got - want).abs() < tol, "{isa:?} {dtype:?} {m}x{n}x{k} [{t},{r}]: {got} vs {want}");
                            assert!((scalar[t * n + r] as f64 - want).abs() < tol);
                        }
                    }
                }
            }
        }
    }

    /// Results do not depend on the number of threads (each output has one owner and order).
    #[test]
    fn thread_count_does_not_change_results() {
        for isa in Isa::all_supported() {
            let (m, n, k) = (5, 203, 130);
            let x = rng_values(m * k, 3);
            let bytes = encode(DType::BF16, &rng_values(n * k, 4));
            let w = WeightRef { dtype: DType::BF16, bytes: &bytes, rows: n, cols: k };
            let run = |threads: usize| {
                let pool = WorkerPool::new(threads).unwrap();
                let mut out = vec![0.0; m * n];
                matmul(&pool, &x, m, w, &mut out, exact(isa));
                out
            };
            assert_eq!(run(1), run(3), "{isa:?}");
        }
    }

    /// `Compute::Bf16`: activations rounded to bf16 (nearest even) times bf16 weights, summed in
    /// f32, from two token rows on and at odd k; one token row and other dtypes stay exact.
    #[test]
    fn bf16_compute_matches_rounded_reference() {
        if !crate::backend::cpu::isa::has_avx512_bf16() {
            eprintln!("skipped: this CPU has no AVX512_BF16 ({})", crate::backend::cpu::isa::cpu_features());
            return;
        }
        let kernels = Kernels { isa: Isa::Avx512, compute: Compute::Bf16 };
        let pool = WorkerPool::new(2).unwrap();
        for (m, n, k) in SHAPES.into_iter().chain([(64, 40, 1536), (200, 12, 64)]) {
            let x = rng_values(m * k, 5);
            let wv = rng_values(n * k, 6);
            let bytes = encode(DType::BF16, &wv);
            let w = WeightRef { dtype: DType::BF16, bytes: &bytes, rows: n, cols: k };
            let mut out = vec![0.0; m * n];
            matmul(&pool, &x, m, w, &mut out, kernels);
            let mut max_vs_exact = 0.0f64;
            for t in 0..m {
                for r in 0..n {
                    let wr = |i: usize| half::bf16::from_f32(wv[r * k + i]).to_f32() as f64;
                    let xr = |i: usize| if m > 1 { half::bf16::from_f32(x[t * k + i]).to_f32() } else { x[t * k + i] };
                    let want: f64 = (0..k).map(|i| xr(i) as f64 * wr(i)).sum();
                    let exact: f64 = (0..k).map(|i| x[t * k + i] as f64 * wr(i)).sum();
                    let got = out[t * n + r] as f64;
                    assert!((got - want).abs() < 1e-4 * (k as f64).sqrt(), "bf16 {m}x{n}x{k} [{t},{r}]: {got} vs {want}");
                    max_vs_exact = max_vs_exact.max((got - exact).abs());
                }
            }
            // Rounding the activations is a real change (this test would catch an exact path).
            if k >= 64 && m > 1 {
                assert!(max_vs_exact > 1e-6, "{m}x{n}x{k}: bf16 compute gave exact results");
            }
            // f32 weights under Compute::Bf16 stay exact.
            let fbytes = encode(DType::F32, &wv);
            let fw = WeightRef { dtype: DType::F32, bytes: &fbytes, rows: n, cols: k };
            let mut a = vec![0.0; m * n];
            let mut b = vec![0.0; m * n];
            matmul(&pool, &x, m, fw, &mut a, kernels);
            matmul(&pool, &x, m, fw, &mut b, exact(Isa::Avx512));
            assert_eq!(a, b);
        }
    }
}
