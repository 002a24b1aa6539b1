// The update half of the filter step (ALGORITHM.md sections 3-5; src/filter/mod.rs `update`):
// the bin's Gaussian potential (k, K) from the encoder, the exact Gaussian readout or the
// Poisson-Laplace point-process update, then the low-rank update in the form that never
// builds the S x S system A_p:
//   P_p h = m_p + M (M^T k) + Q k
//   A     = I_r + (K^T M)(K^T M)^T + (K^T sqrt Q)(K^T sqrt Q)^T,  A = L L^T,  A^-1 = L^-T L^-1
//   c     = A^-1 K^T P_p h,  m_f = P_p h - (K^T P_p)^T c,  g = k - K c
//   lag-1 m_{t-1|t} = m_{t-1} + (Z^T v - zbar sum(v)) / sqrt(S),  v = M^T g
//   z_s   = m_f + e_s - (K^T P_p)^T A^-1 (K^T e_s + w_s)
//   KL    = (tr A^-1 - r + log det A + (m_f - m_p)^T g) / 2,  tr A^-1 = ||L^-1||_F^2
// Every sum runs in the CPU's order (sequential FMA chains for products, math::gemm::dot's
// eight partial sums for matrix-vector products) so both backends agree to rounding.
//
// kk, per decoder: [k (L) | K (L x R, row-major)]. A bin without data (LL_HAS_DATA clear)
// makes these kernels return at once; ll_update_core then writes the predict-only result.
#include "common.cuh"
#include "fastmath.cuh"

// Encoder layer 1: hid = silu(b1 + y W1^T), W1^T stored N x He; silent channels skipped
// (y_i = 0 adds nothing, as in gemv_t). Grid (ceil(He / 128), B), block 128.
extern "C" __global__ void ll_enc_hidden(const unsigned int* __restrict__ ctrl, const float* __restrict__ y, int N,
                                         const float* __restrict__ w1t, const float* __restrict__ b1, long long sW,
                                         float* __restrict__ hid, int He) {
    const int b = blockIdx.y;
    if (!ll_has_data(ctrl, b)) return;
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= He) return;
    const float* yb = y + (size_t)b * N;
    const float* w = w1t + b * sW;
    const float h = ll_chain_skip0(b1[b * sW + j], 1.0f, yb, w + j, He, N);
    hid[(size_t)b * He + j] = ll_silu(h);
}

// Encoder layer 2: kk = b2 + hid W2^T, W2^T stored He x (R+1)L. Grid (ceil(KW / 128), B).
extern "C" __global__ void ll_enc_out(const unsigned int* __restrict__ ctrl, const float* __restrict__ hid, int He,
                                      const float* __restrict__ w2t, const float* __restrict__ b2, long long sW,
                                      float* __restrict__ kk, int KW) {
    const int b = blockIdx.y;
    if (!ll_has_data(ctrl, b)) return;
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= KW) return;
    const float* hb = hid + (size_t)b * He;
    const float* w = w2t + b * sW;
    kk[(size_t)b * KW + j] = ll_chain_skip0(b2[b * sW + j], 1.0f, hb, w + j, KW, He);
}

// Exact linear-Gaussian potential: k = C^T R^-1 (y - b) (C: N x L), K = C^T R^-1/2 (a
// constant L x N, copied). Grid (ceil(max(L, L N) / 256), B), block 256.
extern "C" __global__ void ll_pot_gaussian(const unsigned int* __restrict__ ctrl, const float* __restrict__ y,
                                           int N, const float* __restrict__ c, const float* __restrict__ bo,
                                           const float* __restrict__ rinv, const float* __restrict__ kfix,
                                           long long sW, float* __restrict__ kk, int L) {
    const int b = blockIdx.y;
    if (!ll_has_data(ctrl, b)) return;
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    const size_t w = b * sW;
    float* kb = kk + (size_t)b * (N + 1) * L;
    if (t < L) {
        const float* yb = y + (size_t)b * N;
        float acc = 0.0f;
#pragma unroll 8
        for (int j = 0; j < N; ++j) {
            // Branch-free, so that the unrolled loads run ahead of the chain.
            const float wj = (yb[j] - bo[w + j]) * rinv[w + j];
            const float cj = c[w + (size_t)j * L + t];
            acc = wj != 0.0f ? fmaf(wj, cj, acc) : acc;
        }
        kb[t] = acc;
    }
    if (t < L * N) kb[L + t] = kfix[w + t];
}

// Poisson-Laplace potential at m_p, part 1, one thread per channel j:
//   eta_j = C_j m_p[:Lr], lam = dt exp(eta_j + b_j) (ll_exp, bit for bit the CPU's fast::exp), K[i][j] = C^T[i][j] sqrt(lam) (rows >= Lr: 0),
//   v_j = (y_j - lam) + lam eta_j.   Grid (ceil(N / 128), B).
extern "C" __global__ void ll_pot_pl_a(const unsigned int* __restrict__ ctrl, const float* __restrict__ y, int N,
                                       const float* __restrict__ c, const float* __restrict__ ct,
                                       const float* __restrict__ bo, long long sW, const float* __restrict__ mp,
                                       float* __restrict__ kk, float* __restrict__ vp, int L, int Lr, float dt) {
    const int b = blockIdx.y;
    if (!ll_has_data(ctrl, b)) return;
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= N) return;
    const size_t w = b * sW;
    const float eta = ll_dot(c + w + (size_t)j * Lr, 1, mp + (size_t)b * L, 1, Lr) * 1.0f;
    const float lam = dt * ll_exp(eta + bo[w + j]);
    const float sq = sqrtf(lam);
    float* K = kk + (size_t)b * (N + 1) * L + L;
    for (int i = 0; i < Lr; ++i) K[(size_t)i * N + j] = ct[w + (size_t)i * N + j] * sq;
    for (int i = Lr; i < L; ++i) K[(size_t)i * N + j] = 0.0f;
    vp[(size_t)b * N + j] = (y[(size_t)b * N + j] - lam) + lam * eta;
}

// Poisson-Laplace part 2: k = C^T v on the first Lr latents, 0 beyond. Grid (ceil(L / 128), B).
extern "C" __global__ void ll_pot_pl_b(const unsigned int* __restrict__ ctrl, int N, const float* __restrict__ c,
                                       long long sW, const float* __restrict__ vp, float* __restrict__ kk, int L,
                                       int Lr) {
    const int b = blockIdx.y;
    if (!ll_has_data(ctrl, b)) return;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= L) return;
    const float acc = i < Lr ? ll_chain_skip0(0.0f, 1.0f, vp + (size_t)b * N, c + b * sW + i, Lr, N) : 0.0f;
    kk[(size_t)b * (N + 1) * L + i] = acc;
}

// Per-decoder scratch of the update (floats), the same layout as src/gpu/batch.rs.
struct ll_upd {
    float *mtk, *ksq, *ktpp, *us, *ph, *rhs, *c, *g, *mf, *A, *Li, *Ai, *u2;
};
__device__ __forceinline__ ll_upd ll_upd_at(float* u, int S, int L, int R) {
    ll_upd p;
    p.mtk = u;               // S x R   M^T K
    p.ksq = p.mtk + S * R;   // L x R   sqrt(Q) K
    p.ktpp = p.ksq + L * R;  // R x L   K^T P_p
    p.us = p.ktpp + R * L;   // S       M^T k
    p.ph = p.us + S;         // L       P_p h
    p.rhs = p.ph + L;        // R       K^T P_p h
    p.c = p.rhs + R;         // R
    p.g = p.c + R;           // L
    p.mf = p.g + L;          // L
    p.A = p.mf + L;          // R x R   A, then its factor L in the lower triangle
    p.Li = p.A + R * R;      // R x R   L^-1
    p.Ai = p.Li + R * R;     // R x R   A^-1
    p.u2 = p.Ai + R * R;     // S       M^T g
    return p;
}

// The update's matrix products, one output per thread over many blocks (in ll_update_core's
// single block they were most of the step at the big size), in two kernels with one
// argument list. What both read of decoder b:
struct ll_upd_in {
    const float *k, *K, *mtb, *mpb, *sq;
    ll_upd u;
};
__device__ __forceinline__ ll_upd_in ll_upd_in_at(int b, const unsigned int* ctrl, const float* kk, const float* mt,
                                                  const float* mp, const float* sqrt_q, const float* sqrt_q0,
                                                  long long sW, float* scratch, long long sU, int S, int L, int R) {
    ll_upd_in in;
    in.k = kk + (size_t)b * (R + 1) * L;
    in.K = in.k + L;
    in.mtb = mt + (size_t)b * S * L;
    in.mpb = mp + (size_t)b * L;
    in.sq = (ll_from_prior(ctrl, b) ? sqrt_q0 : sqrt_q) + b * sW;
    in.u = ll_upd_at(scratch + b * sU, S, L, R);
    return in;
}
#define LL_UPD_ARGS                                                                                        \
    const unsigned int *__restrict__ ctrl, const float *__restrict__ kk, const float *__restrict__ mt,     \
        const float *__restrict__ mp, const float *__restrict__ sqrt_q, const float *__restrict__ sqrt_q0, \
        long long sW, float *__restrict__ scratch, long long sU, int S, int L, int R
#define LL_UPD_IN(b) ll_upd_in_at(b, ctrl, kk, mt, mp, sqrt_q, sqrt_q0, sW, scratch, sU, S, L, R)

// Part 1, grid (ceil((S R + L R + S) / 128), B): M^T K (S x R), sqrt(Q) K (L x R), M^T k (S).
extern "C" __global__ void ll_update_products(LL_UPD_ARGS) {
    const int b = blockIdx.y;
    if (!ll_has_data(ctrl, b)) return;
    const ll_upd_in in = LL_UPD_IN(b);
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t < S * R) {
        const int s = t / R, a = t % R;
        float acc = 0.0f;
#pragma unroll 8
        for (int i = 0; i < L; ++i) acc = fmaf(in.mtb[(size_t)s * L + i], in.K[(size_t)i * R + a], acc);
        in.u.mtk[t] = acc;
        return;
    }
    t -= S * R;
    if (t < L * R) {
        in.u.ksq[t] = in.K[t] * in.sq[t / R];
        return;
    }
    t -= L * R;
    if (t < S) in.u.us[t] = ll_dot(in.mtb + (size_t)t * L, 1, in.k, 1, L) * 1.0f;
}

// Part 2, grid (ceil((R R + R L + L) / 128), B): A = I + (K^T M)(K^T M)^T + (K^T sqrt Q)(K^T
// sqrt Q)^T (R x R), K^T P_p = (K^T M) M^T + K^T Q (R x L), P_p h = M (M^T k) + (m_p + Q k).
extern "C" __global__ void ll_update_gram(LL_UPD_ARGS) {
    const int b = blockIdx.y;
    if (!ll_has_data(ctrl, b)) return;
    const ll_upd_in in = LL_UPD_IN(b);
    const ll_upd& u = in.u;
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t < R * R) {
        const int a = t / R, c2 = t % R;
        float acc1 = 0.0f, acc2 = 0.0f;
#pragma unroll 8
        for (int s = 0; s < S; ++s) acc1 = fmaf(u.mtk[s * R + a], u.mtk[s * R + c2], acc1);
#pragma unroll 8
        for (int i = 0; i < L; ++i) acc2 = fmaf(u.ksq[i * R + a], u.ksq[i * R + c2], acc2);
        float v = acc2 + acc1;
        if (a == c2) v = v + 1.0f;
        u.A[t] = v;
        return;
    }
    t -= R * R;
    if (t < R * L) {
        const int a = t / L, i = t % L;
        float acc = 0.0f;
#pragma unroll 8
        for (int s = 0; s < S; ++s) acc = fmaf(u.mtk[s * R + a], in.mtb[(size_t)s * L + i], acc);
        const float qi = in.sq[i] * in.sq[i];
        u.ktpp[t] = acc + in.K[(size_t)i * R + a] * qi;
        return;
    }
    t -= R * L;
    if (t < L) {
        const float acc = ll_chain_skip0(0.0f, 1.0f, u.us, in.mtb + t, L, S);
        u.ph[t] = acc + (in.mpb[t] + in.sq[t] * in.sq[t] * in.k[t]);
    }
}

// The rest of the update, one block per decoder (grid B, block 512): A's Cholesky factor
// and inverse, c, m_f, g, the lag-1
// mean, the KL, the new mean and the behaviour readout; writes the decoder's output row
//   out[b] = [status, kl, 0, 0, mean (L), lag-1 mean (L), behaviour (DD)]
// with status 1 = updated, 0 = predict-only (no data), 2 = reset (the potential was not
// finite or A not positive definite: the state restarts from the prior, as Filter::reset).
extern "C" __global__ void __launch_bounds__(512)
    ll_update_core(const unsigned int* __restrict__ ctrl, const float* __restrict__ kk,
                   const float* __restrict__ mt, const float* __restrict__ z, const float* __restrict__ mp,
                   float* __restrict__ m, const float* __restrict__ m0, const float* __restrict__ dmat,
                   const float* __restrict__ dbias, long long sW, float* __restrict__ scratch, long long sU,
                   float* __restrict__ out, int outw, int* __restrict__ okflag, int S, int L, int R, int DD,
                   float inv_s, float sqrt_inv_s) {
    const int b = blockIdx.x, tid = threadIdx.x, nt = blockDim.x;
    const bool has_data = ll_has_data(ctrl, b);
    const bool first = ll_from_prior(ctrl, b);
    const size_t w = b * sW;
    const float* k = kk + (size_t)b * (R + 1) * L;
    const float* K = k + L;
    const float* mtb = mt + (size_t)b * S * L;
    const float* zb = z + (size_t)b * S * L;
    const float* mpb = mp + (size_t)b * L;
    float* mb = m + (size_t)b * L;
    const float* m0b = m0 + w;
    const float* mold = first ? m0b : mb;  // Filter::reset leaves m = m0
    const ll_upd u = ll_upd_at(scratch + b * sU, S, L, R);
    float* ob = out + (size_t)b * outw;
    float* o_mean = ob + 4;
    float* o_lag = o_mean + L;
    float* o_beh = o_lag + L;

    // s_bad: some entry of the potential is not finite. Set with atomicOr and read only
    // after the barrier (a plain store would race with another thread's read of the flag).
    // s_out: the new mean or lag-1 mean is not finite (an update that broke down late);
    // s_mp: the prediction is not finite (both as Filter::step).
    __shared__ int s_ok, s_bad, s_out, s_mp;
    __shared__ float s_sum;
    if (tid == 0) {
        s_ok = 1;
        s_bad = 0;
        s_out = 0;
        s_mp = 0;
    }
    __syncthreads();
    if (has_data) {
        for (int t = tid; t < (R + 1) * L; t += nt)
            if (!isfinite(k[t])) atomicOr(&s_bad, 1);
    }
    for (int i = tid; i < L; i += nt)
        if (!isfinite(mpb[i])) atomicOr(&s_mp, 1);
    __syncthreads();
    bool ok = has_data && s_bad == 0;
    if (ok) {
        // Cholesky A = L L^T in place, column by column (each entry by chol::cholesky's formula).
        for (int j = 0; j < R; ++j) {
            if (tid == 0) {
                const float s = u.A[j * R + j] - ll_dot(u.A + j * R, 1, u.A + j * R, 1, j);
                if (!isfinite(s) || s <= 0.0f) {
                    s_ok = 0;
                } else {
                    u.A[j * R + j] = sqrtf(s);
                }
            }
            __syncthreads();
            if (!s_ok) break;
            const float ljj = u.A[j * R + j];
            for (int i = j + 1 + tid; i < R; i += nt) {
                const float s = u.A[i * R + j] - ll_dot(u.A + i * R, 1, u.A + j * R, 1, j);
                u.A[i * R + j] = s / ljj;
            }
            __syncthreads();
        }
        __syncthreads();
        ok = s_ok != 0;
    }
    if (ok) {
        // L^-1, one column per thread (chol::lower_inverse).
        for (int j = tid; j < R; j += nt) {
            for (int i = 0; i < j; ++i) u.Li[i * R + j] = 0.0f;
            u.Li[j * R + j] = 1.0f / u.A[j * R + j];
            for (int i = j + 1; i < R; ++i) {
                float s = 0.0f;
#pragma unroll 8
                for (int x = j; x < i; ++x) s = fmaf(u.A[i * R + x], u.Li[x * R + j], s);
                u.Li[i * R + j] = -s / u.A[i * R + i];
            }
        }
        __syncthreads();
        // A^-1 = L^-T L^-1; K^T P_p h.
        for (int t = tid; t < R * R; t += nt) {
            const int i = t / R, j = t % R;
            float acc = 0.0f;
#pragma unroll 8
            for (int p = 0; p < R; ++p) acc = fmaf(u.Li[p * R + i], u.Li[p * R + j], acc);
            u.Ai[t] = acc;
        }
        for (int a = tid; a < R; a += nt) u.rhs[a] = ll_chain_skip0(0.0f, 1.0f, u.ph, K + a, R, L);
        __syncthreads();
        for (int a = tid; a < R; a += nt) u.c[a] = ll_dot(u.Ai + a * R, 1, u.rhs, 1, R) * 1.0f;
        __syncthreads();
        // m_f = P_p h - (K^T P_p)^T c;  g = k - K c.
        for (int i = tid; i < L; i += nt) {
            u.mf[i] = ll_chain_skip0(u.ph[i], -1.0f, u.c, u.ktpp + i, L, R);
            u.g[i] = k[i] + ll_dot(K + (size_t)i * R, 1, u.c, 1, R) * -1.0f;
        }
        __syncthreads();
        // Lag-1: m_{t-1|t} = m_{t-1} + N_z M^T g.
        if (first) {
            for (int i = tid; i < L; i += nt) o_lag[i] = mold[i];
        } else {
            for (int s = tid; s < S; s += nt) u.u2[s] = ll_dot(mtb + (size_t)s * L, 1, u.g, 1, L) * 1.0f;
            __syncthreads();
            if (tid == 0) s_sum = ll_sum_seq(u.u2, S, false);
            __syncthreads();
            const float sum_v = s_sum;
            for (int i = tid; i < L; i += nt) {
                float zbar = 0.0f, la = 0.0f;
#pragma unroll 8
                for (int s = 0; s < S; ++s) {
                    const float zv = zb[(size_t)s * L + i];
                    zbar = zbar + zv;
                    const float x = u.u2[s];
                    la = x != 0.0f ? fmaf(x, zv, la) : la;
                }
                const float nzv = (la - zbar * inv_s * sum_v) * sqrt_inv_s;
                o_lag[i] = mold[i] + nzv;
            }
        }
        __syncthreads();
        for (int i = tid; i < L; i += nt)
            if (!isfinite(u.mf[i]) || !isfinite(o_lag[i])) atomicOr(&s_out, 1);
        __syncthreads();
        ok = s_out == 0;
    }
    if (ok) {
        if (tid == 0) {
            const float tr = ll_sum_seq(u.Li, R * R, true);
            float ld = 0.0f;
            for (int i = 0; i < R; ++i) ld = ld + logf(u.A[i * R + i]);
            ld = ld * 2.0f;
            float quad = 0.0f;
#pragma unroll 8
            for (int i = 0; i < L; ++i) quad = quad + (u.mf[i] - mpb[i]) * u.g[i];
            ob[0] = 1.0f;
            ob[1] = 0.5f * (tr - (float)R + ld + quad);
        }
        __syncthreads();  // every read of the old mean is done
        for (int i = tid; i < L; i += nt) mb[i] = u.mf[i];
    } else {
        // No information: q_t is the predictive (m = m_p, lag-1 = m_{t-1}); a failed update,
        // or a prediction that is not finite, restarts from the prior (m = lag-1 = m0).
        const bool reset = has_data || s_mp != 0;
        for (int i = tid; i < L; i += nt) {
            const float lag = reset ? m0b[i] : mold[i];
            const float mn = reset ? m0b[i] : mpb[i];
            o_lag[i] = lag;
            mb[i] = mn;
        }
        if (tid == 0) {
            ob[0] = reset ? 2.0f : 0.0f;
            ob[1] = 0.0f;
        }
    }
    if (tid == 0) {
        ob[2] = 0.0f;
        ob[3] = 0.0f;
        okflag[b] = ok ? 1 : 0;
    }
    __syncthreads();
    for (int i = tid; i < L; i += nt) o_mean[i] = mb[i];
    for (int j = tid; j < DD; j += nt) o_beh[j] = ll_dot(dmat + w + (size_t)j * L, 1, mb, 1, L) * 1.0f + dbias[w + j];
}

// The new samples, one block per sample (grid (S, B), block 128, 2R floats of dynamic
// shared memory): z_s = m_f + e_s - (K^T P_p)^T A^-1 (K^T e_s + w_s) after an update,
// z_s = m_p + e_s (the predictive draws) otherwise.
extern "C" __global__ void __launch_bounds__(128)
    ll_update_draws(const unsigned int* __restrict__ ctrl, const float* __restrict__ kk, const float* __restrict__ e,
                    const float* __restrict__ wr, const float* __restrict__ mp, const float* __restrict__ scratch,
                    long long sU, const int* __restrict__ okflag, float* __restrict__ z, int S, int L, int R) {
    LL_DYN_SMEM(float, ll_sh);
    const int b = blockIdx.y, s = blockIdx.x, tid = threadIdx.x, nt = blockDim.x;
    const float* eb = e + ((size_t)b * S + s) * L;
    float* zs = z + ((size_t)b * S + s) * L;
    const float* mpb = mp + (size_t)b * L;
    (void)ctrl;
    if (!okflag[b]) {
        for (int i = tid; i < L; i += nt) zs[i] = eb[i] + mpb[i];
        return;
    }
    const float* K = kk + (size_t)b * (R + 1) * L + L;
    const float* ws = wr + ((size_t)b * S + s) * R;
    const ll_upd u = ll_upd_at((float*)(scratch + b * sU), S, L, R);
    float* v = ll_sh;
    float* xs = ll_sh + R;
    for (int a = tid; a < R; a += nt) {
        float acc = 0.0f;
#pragma unroll 8
        for (int i = 0; i < L; ++i) acc = fmaf(eb[i], K[(size_t)i * R + a], acc);
        v[a] = acc + ws[a];
    }
    __syncthreads();
    for (int c2 = tid; c2 < R; c2 += nt) {
        float acc = 0.0f;
#pragma unroll 8
        for (int a = 0; a < R; ++a) acc = fmaf(v[a], u.Ai[a * R + c2], acc);
        xs[c2] = acc;
    }
    __syncthreads();
    for (int i = tid; i < L; i += nt) {
        float acc = 0.0f;
#pragma unroll 8
        for (int a = 0; a < R; ++a) acc = fmaf(xs[a], u.ktpp[a * L + i], acc);
        zs[i] = (acc * -1.0f + eb[i]) + u.mf[i];
    }
}
