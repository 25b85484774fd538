// Sampling helpers on the last stage: temperature scaling, argmax, log-softmax (for logprobs),
// and top-k / top-p / min-p filtering by threshold bisection (no sort). One block per row.
#include "common.cuh"

// logits[r, :] /= temperature[r] (rows with temperature 0 are left for argmax). grid: rows.
extern "C" __global__ void apply_temperature(float* logits, const float* temperature, int vocab) {
    float tmp = temperature[blockIdx.x];
    if (tmp <= 0.0f) return;
    float* row = logits + (long)blockIdx.x * vocab;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) row[i] /= tmp;
}

// out[r] = index of the largest logit (the lowest index among equals). grid: rows; block: 256.
extern "C" __global__ void argmax_rows(const float* logits, int* out, int vocab) {
    __shared__ float best_v[256];
    __shared__ int best_i[256];
    const float* row = logits + (long)blockIdx.x * vocab;
    float bv = -BATON_INF; int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float v = row[i];
        if (v > bv || (v == bv && i < bi)) { bv = v; bi = i; }
    }
    best_v[threadIdx.x] = bv; best_i[threadIdx.x] = bi;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            float v = best_v[threadIdx.x + s]; int i = best_i[threadIdx.x + s];
            if (v > best_v[threadIdx.x] || (v == best_v[threadIdx.x] && i < best_i[threadIdx.x])) { best_v[threadIdx.x] = v; best_i[threadIdx.x] = i; }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = best_i[0];
}

// out[r, :] = logits[r, :] - logsumexp(logits[r, :]). grid: rows; block: 256.
extern "C" __global__ void log_softmax_rows(const float* logits, float* out, int vocab) {
    __shared__ float scratch[32];
    const float* row = logits + (long)blockIdx.x * vocab;
    float mx = -BATON_INF;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) mx = fmaxf(mx, row[i]);
    mx = block_max(mx, scratch);
    float s = 0.0f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) s += expf(row[i] - mx);
    float lse = mx + logf(block_sum(s, scratch));
    float* o = out + (long)blockIdx.x * vocab;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) o[i] = row[i] - lse;
}

// Keeps, per row, the logits that survive top-k (k > 0), top-p (p < 1) and min-p (> 0); the rest
// become -inf. The cut is a logit threshold found by bisection on counts and probability mass,
// so no sort is needed; ties at the threshold are all kept. grid: rows; block: 256.
extern "C" __global__ void filter_top_k_top_p(float* logits, const int* top_k, const float* top_p, const float* min_p, int vocab) {
    __shared__ float scratch[32];
    float* row = logits + (long)blockIdx.x * vocab;
    int k = top_k[blockIdx.x];
    float pp = top_p[blockIdx.x], mp = min_p[blockIdx.x];
    float mx = -BATON_INF, mn = BATON_INF;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) { float v = row[i]; mx = fmaxf(mx, v); if (v > -BATON_INF) mn = fminf(mn, v); }
    mx = block_max(mx, scratch);
    mn = -block_max(-mn, scratch);
    float z = 0.0f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) z += expf(row[i] - mx);
    z = block_sum(z, scratch);
    float thr = mn;
    if (mp > 0.0f) thr = fmaxf(thr, mx + logf(mp));
    // top-k: the smallest threshold leaving at most k logits (the upper end of the bisection).
    if (k > 0) {
        float lo = mn, hi = mx;
        for (int it = 0; it < 40; it++) {
            float mid = 0.5f * (lo + hi), cnt = 0.0f;
            for (int i = threadIdx.x; i < vocab; i += blockDim.x) if (row[i] >= mid) cnt += 1.0f;
            if (block_sum(cnt, scratch) > (float)k) lo = mid; else hi = mid;
        }
        thr = fmaxf(thr, hi);
    }
    // top-p: the largest threshold whose kept logits still hold mass >= p (the lower end).
    if (pp < 1.0f) {
        float lo = mn, hi = mx;
        for (int it = 0; it < 40; it++) {
            float mid = 0.5f * (lo + hi), mass = 0.0f;
            for (int i = threadIdx.x; i < vocab; i += blockDim.x) if (row[i] >= mid) mass += expf(row[i] - mx);
            if (block_sum(mass, scratch) / z >= pp) lo = mid; else hi = mid;
        }
        thr = fmaxf(thr, lo);
    }
    // Never drop the most likely token.
    thr = fminf(thr, mx);
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) if (row[i] < thr) row[i] = -BATON_INF;
}
