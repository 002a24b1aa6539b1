// Shared by every latentloop kernel: the per-decoder control words, and the tiled small GEMM.
//
// Batch: every kernel serves B independent decoders. Decoder b's state lives at
// `buffer + b * stride`; weights at `weights + b * wstride` (wstride 0: one shared model).
// Control words, 4 per decoder, written by the host into the bin's pinned buffer:
//   [step low 32 bits, step high 32 bits, flags, unused], flags: LL_HAS_DATA | LL_FROM_PRIOR.
#pragma once

// Dynamic shared memory. The CPU emulation of the kernels (kernels/emu/, used by
// tests/gpu_emulated.rs on machines without a GPU) hands out its own block-wide buffer.
#ifdef LL_EMU
#define LL_DYN_SMEM(T, name) T* name = (T*)emu_dyn_smem()
#else
#define LL_DYN_SMEM(T, name) extern __shared__ T name[]
#endif

#define LL_HAS_DATA 1u
#define LL_FROM_PRIOR 2u

__device__ __forceinline__ unsigned int ll_flags(const unsigned int* ctrl, int b) { return ctrl[4 * b + 2]; }
__device__ __forceinline__ bool ll_from_prior(const unsigned int* ctrl, int b) {
    return (ll_flags(ctrl, b) & LL_FROM_PRIOR) != 0u;
}
__device__ __forceinline__ bool ll_has_data(const unsigned int* ctrl, int b) {
    return (ll_flags(ctrl, b) & LL_HAS_DATA) != 0u;
}

#define LL_TILE 32
#define LL_TROWS 8

// One 32 x 32 tile of C = A W (A: M x K, row stride lda; W: K x N, row stride ldw), blocks of
// 32 x 8 threads, tile (blockIdx.y, blockIdx.x). Each output is one thread's sequential FMA
// chain over k = 0 .. K-1 starting from +0, the order of math::gemm's register tiles, so the
// product is the CPU's to the bit. `epi(i, j, acc)` stores the result. Every thread of the
// block must call this (it synchronises).
template <class Epi>
__device__ __forceinline__ void ll_gemm_tile(const float* __restrict__ A, int lda, const float* __restrict__ W,
                                             int ldw, int M, int N, int K, Epi epi) {
    __shared__ float As[LL_TILE][LL_TILE + 1];
    __shared__ float Ws[LL_TILE][LL_TILE + 1];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int row0 = blockIdx.y * LL_TILE, col0 = blockIdx.x * LL_TILE;
    float acc[LL_TILE / LL_TROWS];
#pragma unroll
    for (int q = 0; q < LL_TILE / LL_TROWS; ++q) acc[q] = 0.0f;
    // The next tile is loaded into registers while this one is multiplied (the FMA chains
    // are the same; the wait for memory overlaps the arithmetic).
    float an[LL_TILE / LL_TROWS], wn[LL_TILE / LL_TROWS];
    auto fetch = [&](int k0) {
#pragma unroll
        for (int q = 0; q < LL_TILE / LL_TROWS; ++q) {
            const int r = ty + LL_TROWS * q;
            an[q] = (row0 + r < M && k0 + tx < K) ? A[(size_t)(row0 + r) * lda + k0 + tx] : 0.0f;
            wn[q] = (k0 + r < K && col0 + tx < N) ? W[(size_t)(k0 + r) * ldw + col0 + tx] : 0.0f;
        }
    };
    fetch(0);
    for (int k0 = 0; k0 < K; k0 += LL_TILE) {
#pragma unroll
        for (int q = 0; q < LL_TILE / LL_TROWS; ++q) {
            As[ty + LL_TROWS * q][tx] = an[q];
            Ws[ty + LL_TROWS * q][tx] = wn[q];
        }
        __syncthreads();
        if (k0 + LL_TILE < K) fetch(k0 + LL_TILE);
        const int kn = min(LL_TILE, K - k0);
        for (int kk = 0; kk < kn; ++kk) {
            const float w = Ws[kk][tx];
#pragma unroll
            for (int q = 0; q < LL_TILE / LL_TROWS; ++q) acc[q] = fmaf(As[ty + LL_TROWS * q][kk], w, acc[q]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int q = 0; q < LL_TILE / LL_TROWS; ++q) {
        const int i = row0 + ty + LL_TROWS * q, j = col0 + tx;
        if (i < M && j < N) epi(i, j, acc[q]);
    }
}
