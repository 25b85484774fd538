// Attention over the paged KV cache for a ragged batch: each token (a decode token, or one of a
// prefill chunk's tokens) attends causally to its sequence's positions lo..=pos, where K/V of
// position j live in slot block_table[j / block_size] * block_size + j % block_size. GQA: query
// head h reads KV head h / (heads / kv_heads). One block per (token, head); thread d owns output
// dimension d (head_dim <= blockDim.x <= 1024); positions are walked in tiles with an online
// softmax, so any context length works.
#include "common.cuh"

#define TILE 256

extern "C" __global__ void paged_attention(
    const float* q, const float* k_cache, const float* v_cache,
    const int* block_tables, int max_blocks, const int* chunk_of, const int* positions,
    float* out, int heads, int kv_heads, int head_dim, int block_size, int window, float scale) {
    __shared__ float qs[1024];
    __shared__ float p[TILE];
    __shared__ float scratch[32];
    int t = blockIdx.x, h = blockIdx.y, d = threadIdx.x;
    int kv_dim = kv_heads * head_dim;
    int g = h / (heads / kv_heads);
    const float* qh = q + ((long)t * heads + h) * head_dim;
    for (int i = threadIdx.x; i < head_dim; i += blockDim.x) qs[i] = qh[i];
    __syncthreads();
    const int* table = block_tables + (long)chunk_of[t] * max_blocks;
    int pos = positions[t];
    int lo = window > 0 ? max(0, pos + 1 - window) : 0;
    float m = -BATON_INF, l = 0.0f, acc = 0.0f;
    for (int t0 = lo; t0 <= pos; t0 += TILE) {
        int n = min(TILE, pos + 1 - t0);
        // Scores of this tile, one position per thread (strided).
        float tile_max = -BATON_INF;
        for (int j = threadIdx.x; j < n; j += blockDim.x) {
            int jp = t0 + j;
            long slot = (long)table[jp / block_size] * block_size + jp % block_size;
            const float* kr = k_cache + slot * kv_dim + (long)g * head_dim;
            float s = 0.0f;
            for (int i = 0; i < head_dim; i++) s += qs[i] * kr[i];
            s *= scale;
            p[j] = s;
            tile_max = fmaxf(tile_max, s);
        }
        tile_max = block_max(tile_max, scratch);
        float m_new = fmaxf(m, tile_max);
        float correction = expf(m - m_new);
        float tile_sum = 0.0f;
        for (int j = threadIdx.x; j < n; j += blockDim.x) { float e = expf(p[j] - m_new); p[j] = e; tile_sum += e; }
        tile_sum = block_sum(tile_sum, scratch);
        l = l * correction + tile_sum;
        if (d < head_dim) {
            float a = acc * correction;
            for (int j = 0; j < n; j++) {
                int jp = t0 + j;
                long slot = (long)table[jp / block_size] * block_size + jp % block_size;
                a += p[j] * v_cache[slot * kv_dim + (long)g * head_dim + d];
            }
            acc = a;
        }
        m = m_new;
        __syncthreads();
    }
    if (d < head_dim) out[((long)t * heads + h) * head_dim + d] = acc / l;
}
