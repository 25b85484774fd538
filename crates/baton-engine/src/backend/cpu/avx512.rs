//! AVX-512 kernels: exact tiles that widen 16 stored weights per load (masked tails, no scalar
//! loop), and AVX512_BF16 tiles (`vdpbf16ps`, 32 weights per instruction) for `--compute bf16`.
//!
//! Both compute dot products of 4 weight rows with up to 6 token rows per pass over k (24
//! accumulators of the 32 registers), reduce four rows at once and store them side by side.
//! Many token rows are taken in blocks that stay in L2 while a chunk of weight rows is reread.
//! One token row does not come here (see `matmul`): on Zen 4 the AVX2 tiles read weights
//! faster there (measured in BENCHMARKS.md), and a single row gains nothing from bf16 arithmetic.

use std::arch::x86_64::*;

use super::matmul::WeightRef;
use crate::checkpoint::DType;

/// Token rows per tile.
const TOKS: usize = 6;
/// Token rows per block: their bf16 activations (about 300 KB at k = 1536) stay in L2.
const TOKEN_BLOCK: usize = 96;

/// Loads 16 stored values from element `i` of a row, widened to f32.
trait Load16 {
    const SIZE: usize;
    unsafe fn load(row: *const u8, i: usize) -> __m512;
    /// The same, only the first `n` (< 16) values; the rest are zero and are not read.
    unsafe fn load_part(row: *const u8, i: usize, n: usize) -> __m512;
}
struct F32;
struct Bf16;
struct F16;

fn mask16(n: usize) -> __mmask16 {
    ((1u32 << n) - 1) as __mmask16
}

impl Load16 for F32 {
    const SIZE: usize = 4;
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
    unsafe fn load(row: *const u8, i: usize) -> __m512 {
        unsafe { _mm512_loadu_ps(row.add(i * 4).cast()) }
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
    unsafe fn load_part(row: *const u8, i: usize, n: usize) -> __m512 {
        unsafe { _mm512_maskz_loadu_ps(mask16(n), row.add(i * 4).cast()) }
    }
}
impl Load16 for Bf16 {
    const SIZE: usize = 2;
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
    unsafe fn load(row: *const u8, i: usize) -> __m512 {
        unsafe { _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(row.add(i * 2).cast())))) }
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
    unsafe fn load_part(row: *const u8, i: usize, n: usize) -> __m512 {
        unsafe {
            let h = _mm256_maskz_loadu_epi16(mask16(n), row.add(i * 2).cast());
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        }
    }
}
impl Load16 for F16 {
    const SIZE: usize = 2;
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
    unsafe fn load(row: *const u8, i: usize) -> __m512 {
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(row.add(i * 2).cast())) }
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
    unsafe fn load_part(row: *const u8, i: usize, n: usize) -> __m512 {
        unsafe { _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask16(n), row.add(i * 2).cast())) }
    }
}

/// The 8-lane sum of a vector's two halves.
#[inline]
#[target_feature(enable = "avx512f,avx512dq")]
fn fold(v: __m512) -> __m256 {
    _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps::<1>(v))
}

/// `acc + a · b` over bf16 pairs.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
fn dp(acc: __m512, a: __m512i, b: __m512i) -> __m512 {
    // SAFETY: __m512i and __m512bh are both 64 bytes of lanes.
    unsafe { _mm512_dpbf16_ps(acc, std::mem::transmute::<__m512i, __m512bh>(a), std::mem::transmute::<__m512i, __m512bh>(b)) }
}

/// The sums of four vectors, in order, in one 128-bit register.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")]
fn reduce4(a: __m512, b: __m512, c: __m512, d: __m512) -> __m128 {
    let ab = _mm256_hadd_ps(fold(a), fold(b));
    let cd = _mm256_hadd_ps(fold(c), fold(d));
    let abcd = _mm256_hadd_ps(ab, cd);
    _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps::<1>(abcd))
}

/// Prefetches, spread over the k loop, the rows that follow a tile's (the next tile's).
#[inline]
#[target_feature(enable = "avx512f")]
fn prefetch_next(next: *const u8, step: usize, per_step: usize) {
    let ahead = next.wrapping_add(step * per_step);
    let mut line = 0;
    while line < per_step {
        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line).cast());
        line += 64;
    }
}

/// Accumulators of weight rows `rows` against token rows `toks` (exact: widened weights).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
unsafe fn tile_exact<L: Load16, const R: usize, const C: usize>(
    w: &WeightRef<'_>,
    rows: [usize; R],
    x: &[f32],
    toks: [usize; C],
    prefetch: bool,
) -> [[__m512; C]; R] {
    let k = w.cols;
    let row_bytes = k * L::SIZE;
    let wp: [*const u8; R] = std::array::from_fn(|i| w.bytes.as_ptr().wrapping_add(rows[i] * row_bytes));
    let xp: [*const u8; C] = std::array::from_fn(|j| x.as_ptr().wrapping_add(toks[j] * k).cast::<u8>());
    let mut acc = [[_mm512_setzero_ps(); C]; R];
    let k16 = k - k % 16;
    let next = wp[R - 1].wrapping_add(row_bytes);
    let mut i = 0;
    while i < k16 {
        if prefetch {
            prefetch_next(next, i / 16, R * 16 * L::SIZE);
        }
        let xv: [__m512; C] = std::array::from_fn(|j| unsafe { F32::load(xp[j], i) });
        for r in 0..R {
            let wv = unsafe { L::load(wp[r], i) };
            for j in 0..C {
                acc[r][j] = _mm512_fmadd_ps(wv, xv[j], acc[r][j]);
            }
        }
        i += 16;
    }
    if k16 < k {
        let n = k - k16;
        let xv: [__m512; C] = std::array::from_fn(|j| unsafe { F32::load_part(xp[j], k16, n) });
        for r in 0..R {
            let wv = unsafe { L::load_part(wp[r], k16, n) };
            for j in 0..C {
                acc[r][j] = _mm512_fmadd_ps(wv, xv[j], acc[r][j]);
            }
        }
    }
    acc
}

/// Stores a tile's sums: `out[t * n + r]`, four rows at once where the tile has four.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")]
unsafe fn store<const R: usize, const C: usize>(acc: &[[__m512; C]; R], r: usize, toks: [usize; C], n: usize, out: *mut f32) {
    for (j, &t) in toks.iter().enumerate() {
        // SAFETY (all stores): the caller owns columns r..r + R of rows `toks` of `out`.
        if R == 4 {
            let s = reduce4(acc[0][j], acc[1][j], acc[2][j], acc[3][j]);
            unsafe { _mm_storeu_ps(out.add(t * n + r), s) };
        } else {
            for (i, a) in acc.iter().enumerate() {
                unsafe { *out.add(t * n + r + i) = _mm512_reduce_add_ps(a[j]) };
            }
        }
    }
}

/// Columns r0..r1 of `out` for all `m` token rows, taken in L2-sized blocks of tokens.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")]
unsafe fn for_tiles(m: usize, r0: usize, r1: usize, mut tile: impl FnMut(usize, usize, usize, usize, bool)) {
    // tile(row, rows (4 or 1), first token, tokens (1..=TOKS), prefetch).
    let mut tb = 0;
    while tb < m {
        let te = (tb + TOKEN_BLOCK).min(m);
        let mut r = r0;
        while r < r1 {
            let rows = if r + 4 <= r1 { 4 } else { 1 };
            let mut t = tb;
            let mut first = true;
            while t < te {
                let c = (te - t).min(TOKS);
                tile(r, rows, t, c, first);
                first = false;
                t += c;
            }
            r += rows;
        }
        tb = te;
    }
}

macro_rules! dispatch_tile {
    ($f:ident [$($g:ty),*], $w:expr, $x:expr, $r:expr, $rows:expr, $t:expr, $c:expr, $pf:expr, $n:expr, $out:expr) => {{
        macro_rules! go {
            ($R:literal, $C:literal) => {{
                let rows: [usize; $R] = std::array::from_fn(|i| $r + i);
                let toks: [usize; $C] = std::array::from_fn(|j| $t + j);
                // Called inside the caller's `unsafe` block, under its safety contract.
                let acc = $f::<$($g,)* $R, $C>($w, rows, $x, toks, $pf);
                store::<$R, $C>(&acc, $r, toks, $n, $out);
            }};
        }
        match ($c, $rows) {
            (6, 4) => go!(4, 6),
            (5, 4) => go!(4, 5),
            (4, 4) => go!(4, 4),
            (3, 4) => go!(4, 3),
            (2, 4) => go!(4, 2),
            (1, 4) => go!(4, 1),
            (6, _) => go!(1, 6),
            (5, _) => go!(1, 5),
            (4, _) => go!(1, 4),
            (3, _) => go!(1, 3),
            (2, _) => go!(1, 2),
            _ => go!(1, 1),
        }
    }};
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")]
unsafe fn run_exact<L: Load16>(x: &[f32], m: usize, w: WeightRef<'_>, r0: usize, r1: usize, out: *mut f32) {
    let n = w.rows;
    unsafe { for_tiles(m, r0, r1, |r, rows, t, c, pf| dispatch_tile!(tile_exact[L], &w, x, r, rows, t, c, pf, n, out)) }
}

/// # Safety
/// The CPU must run `Isa::Avx512`; `out` holds `m * w.rows` values and no other thread writes
/// its columns r0..r1.
pub unsafe fn stream_rows(x: &[f32], m: usize, w: WeightRef<'_>, r0: usize, r1: usize, out: *mut f32) {
    unsafe {
        match w.dtype {
            DType::F32 => run_exact::<F32>(x, m, w, r0, r1, out),
            DType::BF16 => run_exact::<Bf16>(x, m, w, r0, r1, out),
            DType::F16 => run_exact::<F16>(x, m, w, r0, r1, out),
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
unsafe fn widen_as<L: Load16>(bytes: &[u8], out: &mut [f32]) {
    let n = out.len().min(bytes.len() / L::SIZE);
    let mut i = 0;
    while i < n {
        let c = (n - i).min(16);
        // SAFETY: values i..i + c are inside both slices; masked lanes are not touched.
        unsafe {
            if c == 16 {
                _mm512_storeu_ps(out.as_mut_ptr().add(i), L::load(bytes.as_ptr(), i));
            } else {
                _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), mask16(c), L::load_part(bytes.as_ptr(), i, c));
            }
        }
        i += 16;
    }
}

/// # Safety
/// The CPU must run `Isa::Avx512`.
pub unsafe fn widen(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    unsafe {
        match dtype {
            DType::F32 => widen_as::<F32>(bytes, out),
            DType::BF16 => widen_as::<Bf16>(bytes, out),
            DType::F16 => widen_as::<F16>(bytes, out),
        }
    }
}

/// Rounds `m` rows of `k` activations to bf16 (nearest even), each row padded with zeros to
/// `padded_k(k)` values, into `out`.
///
/// # Safety
/// The CPU must have AVX512_BF16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub unsafe fn round_to_bf16(x: &[f32], m: usize, k: usize, out: &mut Vec<u16>) {
    let kp = padded_k(k);
    out.clear();
    out.resize(m * kp, 0);
    for t in 0..m {
        let src = x[t * k..(t + 1) * k].as_ptr();
        let mut i = 0;
        while i < k {
            let lo_n = (k - i).min(16);
            let hi_n = (k - i).saturating_sub(16).min(16);
            // SAFETY: masked loads read only values i..i + lo_n + hi_n of the row; the store
            // writes 32 values at i < kp, inside the padded row.
            unsafe {
                let lo = _mm512_maskz_loadu_ps(mask16(lo_n), src.add(i));
                let hi = if hi_n > 0 { _mm512_maskz_loadu_ps(mask16(hi_n), src.add(i + 16)) } else { _mm512_setzero_ps() };
                let b: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_storeu_si512(out.as_mut_ptr().add(t * kp + i).cast(), b);
            }
            i += 32;
        }
    }
}

/// The row length of bf16 activations: k rounded up to 32 values (one `vdpbf16ps`).
pub fn padded_k(k: usize) -> usize {
    k.next_multiple_of(32)
}

/// Accumulators of bf16 weight rows against bf16 token rows (`xb`, rows of `padded_k(k)`).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn tile_bf16<const R: usize, const C: usize>(
    w: &WeightRef<'_>,
    rows: [usize; R],
    xb: &[u16],
    toks: [usize; C],
    prefetch: bool,
) -> [[__m512; C]; R] {
    let k = w.cols;
    let kp = padded_k(k);
    let row_bytes = k * 2;
    let wp: [*const u8; R] = std::array::from_fn(|i| w.bytes.as_ptr().wrapping_add(rows[i] * row_bytes));
    let xp: [*const u16; C] = std::array::from_fn(|j| xb.as_ptr().wrapping_add(toks[j] * kp));
    let mut acc = [[_mm512_setzero_ps(); C]; R];
    let k32 = k - k % 32;
    let next = wp[R - 1].wrapping_add(row_bytes);
    let mut i = 0;
    while i < k32 {
        if prefetch {
            prefetch_next(next, i / 32, R * 64);
        }
        let xv: [__m512i; C] = std::array::from_fn(|j| unsafe { _mm512_loadu_si512(xp[j].add(i).cast()) });
        for r in 0..R {
            let wv = unsafe { _mm512_loadu_si512(wp[r].add(i * 2).cast()) };
            for j in 0..C {
                acc[r][j] = dp(acc[r][j], wv, xv[j]);
            }
        }
        i += 32;
    }
    if k32 < k {
        // The padded activations are zero past k; the weights are loaded only up to k.
        let mask = ((1u64 << (k - k32)) - 1) as __mmask32;
        let xv: [__m512i; C] = std::array::from_fn(|j| unsafe { _mm512_loadu_si512(xp[j].add(k32).cast()) });
        for r in 0..R {
            let wv = unsafe { _mm512_maskz_loadu_epi16(mask, wp[r].add(k32 * 2).cast()) };
            for j in 0..C {
                acc[r][j] = dp(acc[r][j], wv, xv[j]);
            }
        }
    }
    acc
}

/// Columns r0..r1 of `out`: bf16 weights `w` against the rounded activations `xb` of `m` rows.
///
/// # Safety
/// The CPU must have AVX512_BF16; `w` is bf16; `xb` holds `m * padded_k(w.cols)` values; `out`
/// holds `m * w.rows` values and no other thread writes its columns r0..r1.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,f16c,fma")]
pub unsafe fn stream_rows_bf16(xb: &[u16], m: usize, w: WeightRef<'_>, r0: usize, r1: usize, out: *mut f32) {
    debug_assert_eq!(w.dtype, DType::BF16);
    debug_assert_eq!(xb.len(), m * padded_k(w.cols));
    let n = w.rows;
    unsafe { for_tiles(m, r0, r1, |r, rows, t, c, pf| dispatch_tile!(tile_bf16[], &w, xb, r, rows, t, c, pf, n, out)) }
}
