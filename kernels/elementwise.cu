// Embedding gather, RMSNorm (fused with the residual add), RoPE (frequencies precomputed on the
// host, llama3/linear scaling included), SiLU-and-multiply, KV-cache writes, dtype conversion.
#include "common.cuh"

// out[t, :] = table[ids[t], :] widened to f32. grid: tokens; block: any.
#define EMBED(NAME, T, LOAD)                                                                          \
extern "C" __global__ void NAME(const T* table, const unsigned int* ids, float* out, int hidden, int vocab) { \
    unsigned int id = ids[blockIdx.x];                                                                \
    float* o = out + (long)blockIdx.x * hidden;                                                       \
    if (id >= (unsigned int)vocab) { for (int i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = 0.0f; return; } \
    const T* row = table + (long)id * hidden;                                                         \
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = LOAD(row[i]);                       \
}
EMBED(embed_f32, float, )
EMBED(embed_bf16, bf16_bits, bf16_to_f32)
EMBED(embed_f16, f16_bits, f16_to_f32)

// out = x / rms(x) * w per row. grid: rows; block: 256.
extern "C" __global__ void rms_norm(const float* x, const float* w, float* out, int hidden, float eps) {
    __shared__ float scratch[32];
    const float* r = x + (long)blockIdx.x * hidden;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) ss += r[i] * r[i];
    float inv = rsqrtf(block_sum(ss, scratch) / hidden + eps);
    float* o = out + (long)blockIdx.x * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = w[i] * (r[i] * inv);
}

// residual += add; out = rms_norm(residual) * w. grid: rows; block: 256.
extern "C" __global__ void add_rms_norm(float* residual, const float* add, const float* w, float* out, int hidden, float eps) {
    __shared__ float scratch[32];
    float* r = residual + (long)blockIdx.x * hidden;
    const float* a = add + (long)blockIdx.x * hidden;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) { float v = r[i] + a[i]; r[i] = v; ss += v * v; }
    float inv = rsqrtf(block_sum(ss, scratch) / hidden + eps);
    float* o = out + (long)blockIdx.x * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = w[i] * (r[i] * inv);
}

// Rotates pairs (i, i + d/2) of every head by positions[t] * inv_freq[i] (HF's rotate_half).
// grid: (tokens, heads); block: head_dim / 2.
extern "C" __global__ void rope(float* x, const int* positions, const float* inv_freq, int heads, int head_dim) {
    int half = head_dim / 2, i = threadIdx.x;
    if (i >= half) return;
    float* h = x + ((long)blockIdx.x * heads + blockIdx.y) * head_dim;
    float angle = (float)positions[blockIdx.x] * inv_freq[i];
    float c = cosf(angle), s = sinf(angle);
    float x1 = h[i], x2 = h[i + half];
    h[i] = x1 * c - x2 * s;
    h[i + half] = x2 * c + x1 * s;
}

// out = silu(gate) * up. 1-D grid over n.
extern "C" __global__ void silu_mul(const float* gate, const float* up, float* out, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) { float g = gate[i]; out[i] = g / (1.0f + expf(-g)) * up[i]; }
}

// Writes token t's K and V rows into slot slots[t] of the paged cache ([slots, kv_dim] each).
// grid: tokens; block: any.
extern "C" __global__ void kv_write(const float* k, const float* v, float* k_cache, float* v_cache, const int* slots, int kv_dim) {
    long dst = (long)slots[blockIdx.x] * kv_dim, src = (long)blockIdx.x * kv_dim;
    for (int i = threadIdx.x; i < kv_dim; i += blockDim.x) { k_cache[dst + i] = k[src + i]; v_cache[dst + i] = v[src + i]; }
}

// f32 -> bf16 (activations for cuBLAS bf16 products). 1-D grid over n.
extern "C" __global__ void f32_to_bf16_kernel(const float* in, bf16_bits* out, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = f32_to_bf16(in[i]);
}

// bf16 / f16 -> f32 (bias vectors, norm weights at load). 1-D grid over n.
extern "C" __global__ void bf16_to_f32_kernel(const bf16_bits* in, float* out, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = bf16_to_f32(in[i]);
}
extern "C" __global__ void f16_to_f32_kernel(const f16_bits* in, float* out, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = f16_to_f32(in[i]);
}

// out[r, :] += bias. grid: rows; block: any.
extern "C" __global__ void add_bias(float* out, const float* bias, int n) {
    float* o = out + (long)blockIdx.x * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) o[i] += bias[i];
}

// f32 -> f16 (activations for cuBLAS f16 products). 1-D grid over n.
extern "C" __global__ void f32_to_f16_kernel(const float* in, f16_bits* out, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) { f16_bits h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(in[i])); out[i] = h; }
}

// x += y. 1-D grid over n.
extern "C" __global__ void add_inplace(float* x, const float* y, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}

// out[i, :] = x[rows[i], :]. grid: len(rows); block: any.
extern "C" __global__ void gather_rows(const float* x, const int* rows, float* out, int width) {
    const float* src = x + (long)rows[blockIdx.x] * width;
    float* dst = out + (long)blockIdx.x * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) dst[i] = src[i];
}
