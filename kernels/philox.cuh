// Counter-based normal draws, bit for bit the same as src/math/philox.rs (the layout is part
// of the model contract; change both or neither):
//
//   counter = [index / 4, sample, step as u32, purpose | (step >> 32) << 8]
//   key     = [seed as u32, seed >> 32]
//   u       = ((x >> 8) + 0.5) * 2^-24
//   n0 = r(u0) cos 2 pi u1, n1 = r(u0) sin 2 pi u1, n2 = r(u2) cos 2 pi u3, n3 = r(u2) sin 2 pi u3,
//   r(u) = sqrt(-2 ln u), with ln and sincos from fastmath.cuh.
#pragma once
#include "fastmath.cuh"

#define LL_PURPOSE_PREDICT_MIX 0u
#define LL_PURPOSE_PREDICT_DIAG 1u
#define LL_PURPOSE_UPDATE 2u

struct ll_u4 {
    unsigned int x, y, z, w;
};

// Philox4x32-10 (Salmon et al., SC'11).
__device__ __forceinline__ ll_u4 ll_philox4x32_10(ll_u4 c, unsigned int k0, unsigned int k1) {
    const unsigned int M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
    const unsigned int W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k0 += W0;
            k1 += W1;
        }
        const unsigned int hi0 = __umulhi(M0, c.x), lo0 = M0 * c.x;
        const unsigned int hi1 = __umulhi(M1, c.z), lo1 = M1 * c.z;
        ll_u4 n;
        n.x = hi1 ^ c.y ^ k0;
        n.y = lo1;
        n.z = hi0 ^ c.w ^ k1;
        n.w = lo0;
        c = n;
    }
    return c;
}

__device__ __forceinline__ float ll_uniform(unsigned int x) {
    return ((float)(x >> 8) + 0.5f) * (1.0f / 16777216.0f);
}

// Normals 4*block .. 4*block+3 of the stream (step, purpose, sample) under key (k0, k1).
__device__ __forceinline__ void ll_normals4(unsigned int block, unsigned int sample, unsigned int step_lo,
                                            unsigned int step_hi, unsigned int purpose, unsigned int k0,
                                            unsigned int k1, float out[4]) {
    ll_u4 c;
    c.x = block;
    c.y = sample;
    c.z = step_lo;
    c.w = purpose | (step_hi << 8);
    const ll_u4 x = ll_philox4x32_10(c, k0, k1);
    const float r0 = sqrtf(-2.0f * ll_ln(ll_uniform(x.x)));
    const float r2 = sqrtf(-2.0f * ll_ln(ll_uniform(x.z)));
    float c1, s1, c3, s3;
    ll_sincos_2pi(ll_uniform(x.y), &c1, &s1);
    ll_sincos_2pi(ll_uniform(x.w), &c3, &s3);
    out[0] = r0 * c1;
    out[1] = r0 * s1;
    out[2] = r2 * c3;
    out[3] = r2 * s3;
}
