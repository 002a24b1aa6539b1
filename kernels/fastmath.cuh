// Branch-free f32 elementary functions, the same polynomials in the same order as
// src/math/fast.rs, with every fused multiply-add written out as fmaf. The kernels are
// compiled with --fmad=false so that no other product is contracted: a CPU and a GPU step
// then agree to the last bit wherever both use these functions. Coefficients are given as
// their f32 bit patterns (printed from the Rust constants), so no decimal parsing differs.
#pragma once

__device__ __forceinline__ float ll_clampf(float x, float lo, float hi) {
    // Rust's f32::clamp: NaN passes through (fminf/fmaxf would drop it).
    if (x < lo) x = lo;
    if (x > hi) x = hi;
    return x;
}

// tanh(x) = x P(x^2) / Q(x^2) on |x| <= 9 (fast::TANH_P, fast::TANH_Q).
__device__ __forceinline__ float ll_tanh(float x) {
    x = ll_clampf(x, -9.0f, 9.0f);
    const float t = x * x;
    float p = __uint_as_float(0xa9b7b4adu);  // P6 -8.158175e-14
    p = fmaf(p, t, __uint_as_float(0x2e61c780u));  // P5 5.133627e-11
    p = fmaf(p, t, __uint_as_float(0xb2aad5e7u));  // P4 -1.9887876e-8
    p = fmaf(p, t, __uint_as_float(0x37399827u));  // P3 1.1062285e-5
    p = fmaf(p, t, __uint_as_float(0x3b4aceb9u));  // P2 3.094597e-3
    p = fmaf(p, t, __uint_as_float(0x3e05e494u));  // P1 1.3075477e-1
    p = fmaf(p, t, 1.0f);                          // P0
    float q = __uint_as_float(0x3984cb61u);        // Q3 2.532853e-4
    q = fmaf(q, t, __uint_as_float(0x3cc85ae1u));  // Q2 2.4457397e-2
    q = fmaf(q, t, __uint_as_float(0x3eed9cf4u));  // Q1 4.6408808e-1
    q = fmaf(q, t, 1.0f);                          // Q0
    return ll_clampf((x * p) / q, -1.0f, 1.0f);
}

// sigmoid(x) = (1 + tanh(x/2)) / 2.
__device__ __forceinline__ float ll_sigmoid(float x) { return fmaf(0.5f, ll_tanh(0.5f * x), 0.5f); }

__device__ __forceinline__ float ll_silu(float x) { return x * ll_sigmoid(x); }

// e^x as fast::exp: x = n ln2 + r, Taylor to r^7, times 2^n as two normal powers of two.
__device__ __forceinline__ float ll_exp(float x) {
    x = ll_clampf(x, -104.0f, 89.0f);
    const float nf = floorf(x * __uint_as_float(0x3fb8aa3bu) + 0.5f);  // LOG2_E
    float r = fmaf(-nf, __uint_as_float(0x3f317200u), x);             // LN2_HI
    r = fmaf(-nf, __uint_as_float(0x35bfbe8eu), r);                   // LN2_LO
    float p = __uint_as_float(0x39500d01u);                           // 1/5040
    p = fmaf(p, r, __uint_as_float(0x3ab60b61u));                     // 1/720
    p = fmaf(p, r, __uint_as_float(0x3c088889u));                     // 1/120
    p = fmaf(p, r, __uint_as_float(0x3d2aaaabu));                     // 1/24
    p = fmaf(p, r, __uint_as_float(0x3e2aaaabu));                     // 1/6
    p = fmaf(p, r, 0.5f);
    p = fmaf(p, r, 1.0f);
    p = fmaf(p, r, 1.0f);
    const int n = (int)nf;
    const int n1 = n >> 1, n2 = n - (n >> 1);
    return (p * __uint_as_float((unsigned int)(n1 + 127) << 23)) * __uint_as_float((unsigned int)(n2 + 127) << 23);
}

// ln u for a positive normal f32: 2 atanh((m-1)/(m+1)) to s^9 plus e ln 2.
__device__ __forceinline__ float ll_ln(float u) {
    const unsigned int bits = __float_as_uint(u);
    int e = (int)((bits >> 23) & 0xffu) - 127;
    float m = __uint_as_float((bits & 0x007fffffu) | 0x3f800000u);
    const bool big = m > __uint_as_float(0x3fb504f3u);  // SQRT_2
    m = big ? m * 0.5f : m;
    e += big ? 1 : 0;
    const float s = (m - 1.0f) / (m + 1.0f);
    const float s2 = s * s;
    float p = 1.0f / 9.0f;
    p = fmaf(p, s2, 1.0f / 7.0f);
    p = fmaf(p, s2, 1.0f / 5.0f);
    p = fmaf(p, s2, 1.0f / 3.0f);
    p = fmaf(p, s2, 1.0f);
    return fmaf((float)e, __uint_as_float(0x3f317218u), 2.0f * s * p);  // LN_2
}

// (cos 2 pi u, sin 2 pi u) for u in [0, 1): quadrant from u (kept a float), Taylor on [-pi/4, pi/4].
__device__ __forceinline__ void ll_sincos_2pi(float u, float* cos_out, float* sin_out) {
    const float qf = floorf(4.0f * u + 0.5f);
    const float x = (u - 0.25f * qf) * __uint_as_float(0x40c90fdbu);  // TAU
    const float x2 = x * x;
    float s = 1.0f / 362880.0f;
    s = fmaf(s, x2, -1.0f / 5040.0f);
    s = fmaf(s, x2, 1.0f / 120.0f);
    s = fmaf(s, x2, -1.0f / 6.0f);
    s = fmaf(s * x2, x, x);
    float c = -1.0f / 3628800.0f;
    c = fmaf(c, x2, 1.0f / 40320.0f);
    c = fmaf(c, x2, -1.0f / 720.0f);
    c = fmaf(c, x2, 1.0f / 24.0f);
    c = fmaf(c, x2, -0.5f);
    c = fmaf(c, x2, 1.0f);
    const float q = qf - 4.0f * floorf(0.25f * qf);
    const bool swap = q == 1.0f || q == 3.0f;
    const float cs = swap ? s : c;
    const float sn = swap ? c : s;
    const bool cos_neg = q == 1.0f || q == 2.0f;
    const bool sin_neg = q >= 2.0f;
    *cos_out = cos_neg ? -cs : cs;
    *sin_out = sin_neg ? -sn : sn;
}

// math::gemm::dot: sequential FMAs below 16 terms, else eight partial sums combined as
// ((a0+a4)+(a1+a5))+((a2+a6)+(a3+a7)) and the tail added sequentially. Strided operands.
__device__ __forceinline__ float ll_dot(const float* a, int sa, const float* b, int sb, int n) {
    if (n < 16) {
        float s = 0.0f;
        for (int i = 0; i < n; ++i) s = fmaf(a[i * sa], b[i * sb], s);
        return s;
    }
    float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    const int nc = n - n % 8;
    for (int i = 0; i < nc; i += 8) {
#pragma unroll
        for (int l = 0; l < 8; ++l) acc[l] = fmaf(a[(i + l) * sa], b[(i + l) * sb], acc[l]);
    }
    float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (int i = nc; i < n; ++i) s = fmaf(a[i * sa], b[i * sb], s);
    return s;
}

// acc + sum of xs x[i] w[i sw] over i = 0 .. n-1 in order, skipping x[i] = 0 (math::gemm's
// gemv_t skips zero inputs): one sequential FMA chain, as on the CPU. The loads are issued
// eight at a time ahead of the chain, so a long chain waits on memory once per eight terms
// instead of once per term (the chain's order and rounding are unchanged). xs = 1 or -1.
__device__ __forceinline__ float ll_chain_skip0(float acc, float xs, const float* x, const float* w, size_t sw,
                                                int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        float xv[8], wv[8];
#pragma unroll
        for (int l = 0; l < 8; ++l) {
            xv[l] = xs * x[i + l];
            wv[l] = w[(size_t)(i + l) * sw];
        }
#pragma unroll
        for (int l = 0; l < 8; ++l) acc = xv[l] != 0.0f ? fmaf(xv[l], wv[l], acc) : acc;
    }
    for (; i < n; ++i) {
        const float xv = xs * x[i];
        if (xv != 0.0f) acc = fmaf(xv, w[(size_t)i * sw], acc);
    }
    return acc;
}

// Sequential sums in order (one thread), their loads issued eight at a time:
// sum of p[i] (sq false) or of p[i] * p[i] (sq true), i = 0 .. n-1, from +0.
__device__ __forceinline__ float ll_sum_seq(const float* p, int n, bool sq) {
    float acc = 0.0f;
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        float v[8];
#pragma unroll
        for (int l = 0; l < 8; ++l) v[l] = p[i + l];
#pragma unroll
        for (int l = 0; l < 8; ++l) acc = acc + (sq ? v[l] * v[l] : v[l]);
    }
    for (; i < n; ++i) acc = acc + (sq ? p[i] * p[i] : p[i]);
    return acc;
}
