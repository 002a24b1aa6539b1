// The predict half of the filter step (ALGORITHM.md section 4; src/filter/mod.rs `predict`):
// the step's noise, the dynamics f on all S samples, the predicted mean m_p, the centred
// factor M^T / sqrt(S), and the centred predictive draws e_s = M w1_s + sqrt(Q) * w2_s.
//
// Grids carry the batch in their last used dimension (b = blockIdx.z for the GEMM kernels,
// blockIdx.y for the others). A decoder starting from the prior (LL_FROM_PRIOR) skips the
// dynamics: m_p = m0, M = 0 and e_s = sqrt(Q0) * w2_s, as on the CPU.
#include "common.cuh"
#include "fastmath.cuh"
#include "philox.cuh"

// The step's normals: w1 (S x S, PredictMix), w2 (S x L, PredictDiag), w_r (S x R, Update);
// row s of each is stream sample s. One thread makes one Philox block (4 normals).
extern "C" __global__ void ll_noise(const unsigned int* __restrict__ ctrl, const unsigned int* __restrict__ keys,
                                    float* __restrict__ w1, float* __restrict__ w2, float* __restrict__ wr, int S,
                                    int L, int R) {
    const int b = blockIdx.y;
    const unsigned int step_lo = ctrl[4 * b], step_hi = ctrl[4 * b + 1];
    const unsigned int k0 = keys[2 * b], k1 = keys[2 * b + 1];
    const int g1 = (S + 3) / 4, g2 = (L + 3) / 4, g3 = (R + 3) / 4;
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    float* out;
    int cols, groups;
    unsigned int purpose;
    if (idx < S * g1) {
        if (ll_from_prior(ctrl, b)) return;  // the prior's draws need no mixing weights
        out = w1 + (size_t)b * S * S;
        cols = S;
        groups = g1;
        purpose = LL_PURPOSE_PREDICT_MIX;
    } else if ((idx -= S * g1) < S * g2) {
        out = w2 + (size_t)b * S * L;
        cols = L;
        groups = g2;
        purpose = LL_PURPOSE_PREDICT_DIAG;
    } else if ((idx -= S * g2) < S * g3) {
        if (!ll_has_data(ctrl, b)) return;  // no update, no update noise
        out = wr + (size_t)b * S * R;
        cols = R;
        groups = g3;
        purpose = LL_PURPOSE_UPDATE;
    } else {
        return;
    }
    const int row = idx / groups, blk = idx % groups;
    float n[4];
    ll_normals4((unsigned int)blk, (unsigned int)row, step_lo, step_hi, purpose, k0, k1, n);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const int col = 4 * blk + q;
        if (col < cols) out[(size_t)row * cols + col] = n[q];
    }
}

#define LL_EPI_PLAIN 0     // C = acc
#define LL_EPI_BIAS 1      // C = acc + bias[j]
#define LL_EPI_TANH 2      // C = tanh(acc + bias[j])
#define LL_EPI_RESIDUAL 3  // C = (acc + cin[i][j]) + bias[j]   (mlp: z + W2 h + b2)

// C (M x N) = epilogue(A (M x K) W (K x N)), row-major and dense, for every decoder not
// starting from the prior. Grid (ceil(N/32), ceil(M/32), B), block (32, 8).
// sA, sC: per-decoder strides of A and of C / cin; sW: of the weights and bias (0: shared).
extern "C" __global__ void __launch_bounds__(256)
    ll_gemm_epi(const unsigned int* __restrict__ ctrl, const float* __restrict__ A, long long sA,
                const float* __restrict__ W, const float* __restrict__ bias, long long sW,
                const float* __restrict__ cin, float* __restrict__ C, long long sC, int M, int N, int K, int mode) {
    const int b = blockIdx.z;
    if (ll_from_prior(ctrl, b)) return;
    const float* Ab = A + b * sA;
    const float* Wb = W + b * sW;
    const float* bb = bias + b * sW;  // unused (and possibly dangling) in PLAIN mode
    const float* cb = cin + b * sC;   // only read in RESIDUAL mode
    float* Cb = C + b * sC;
    ll_gemm_tile(Ab, K, Wb, N, M, N, K, [&](int i, int j, float acc) {
        float v = acc;
        if (mode == LL_EPI_BIAS) {
            v = v + bb[j];
        } else if (mode == LL_EPI_TANH) {
            v = ll_tanh(v + bb[j]);
        } else if (mode == LL_EPI_RESIDUAL) {
            v = v + cb[(size_t)i * N + j];
            v = v + bb[j];
        }
        Cb[(size_t)i * N + j] = v;
    });
}

// One RK4 stage of the NODE flow (Dynamics::rk4): kc = hid W2 + b2 (S x L), then
//   stage 0 (k1): acc = kc;                 tmp = x0 + (dt/2) kc
//   stage 1 (k2): acc = acc + 2 kc;         tmp = x0 + (dt/2) kc
//   stage 2 (k3): acc = acc + 2 kc;         tmp = x0 + dt kc
//   stage 3 (k4): F = x0 + (dt/6)(acc + kc)
// with x0 the substep's start (z for the first substep, else F), every update one fmaf.
// Grid (ceil(L/32), ceil(S/32), B), block (32, 8). All S x L buffers have stride sSL.
extern "C" __global__ void __launch_bounds__(256)
    ll_rk4_stage(const unsigned int* __restrict__ ctrl, const float* __restrict__ hid, long long sH,
                 const float* __restrict__ W2, const float* __restrict__ b2, long long sW, const float* x0,
                 float* F, float* __restrict__ tmp, float* __restrict__ accb, long long sSL, int S, int L, int H,
                 int stage, float half_dt, float dt, float dt6) {
    const int b = blockIdx.z;
    if (ll_from_prior(ctrl, b)) return;
    const float* hb = hid + b * sH;
    const float* Wb = W2 + b * sW;
    const float* bb = b2 + b * sW;
    const float* xb = x0 + b * sSL;
    float* Fb = F + b * sSL;
    float* tb = tmp + b * sSL;
    float* ab = accb + b * sSL;
    ll_gemm_tile(hb, H, Wb, L, S, L, H, [&](int i, int j, float acc) {
        const size_t o = (size_t)i * L + j;
        const float kc = acc + bb[j];
        if (stage == 0) {
            ab[o] = kc;
            tb[o] = fmaf(half_dt, kc, xb[o]);
        } else if (stage == 1) {
            ab[o] = fmaf(2.0f, kc, ab[o]);
            tb[o] = fmaf(half_dt, kc, xb[o]);
        } else if (stage == 2) {
            ab[o] = fmaf(2.0f, kc, ab[o]);
            tb[o] = fmaf(dt, kc, xb[o]);
        } else {
            Fb[o] = fmaf(dt6, ab[o] + kc, xb[o]);
        }
    });
}

// The GRU cell with no input (gate order r, u, n; r and u biases pre-summed):
//   r = sig(b_r + g_r), u = sig(b_u + g_u), n = tanh(b_in + r (g_n + b_hn)), h' = n + u (h - n)
// gates = h W_hh^T (S x 3H). Grid (ceil(S H / 256), B), block 256.
extern "C" __global__ void ll_gru_cell(const unsigned int* __restrict__ ctrl, const float* __restrict__ h,
                                       const float* __restrict__ gates, float* __restrict__ hnew, long long sH,
                                       long long sG, const float* __restrict__ b_r, const float* __restrict__ b_u,
                                       const float* __restrict__ b_in, const float* __restrict__ b_hn, long long sW,
                                       int S, int H) {
    const int b = blockIdx.y;
    if (ll_from_prior(ctrl, b)) return;
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= S * H) return;
    const int s = idx / H, i = idx % H;
    const float* g = gates + b * sG + (size_t)s * 3 * H;
    const size_t w = b * sW;
    const float r = ll_sigmoid(b_r[w + i] + g[i]);
    const float u = ll_sigmoid(b_u[w + i] + g[H + i]);
    const float n = ll_tanh(fmaf(r, g[2 * H + i] + b_hn[w + i], b_in[w + i]));
    const size_t o = b * sH + (size_t)s * H + i;
    hnew[o] = fmaf(u, h[o] - n, n);
}

// Weightless RMSNorm of each row of F: x / sqrt(mean(x^2) + 1e-5), sums in row order.
// Grid (ceil(S / 128), B), block 128.
extern "C" __global__ void ll_rmsnorm(const unsigned int* __restrict__ ctrl, float* __restrict__ F, long long sSL,
                                      int S, int L) {
    const int b = blockIdx.y;
    if (ll_from_prior(ctrl, b)) return;
    const int s = blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= S) return;
    float* row = F + b * sSL + (size_t)s * L;
    float ms = 0.0f;
#pragma unroll 8
    for (int i = 0; i < L; ++i) ms = ms + row[i] * row[i];
    ms = ms / (float)L;
    const float inv = 1.0f / sqrtf(ms + 1e-5f);
    for (int i = 0; i < L; ++i) row[i] = row[i] * inv;
}

// m_p = column mean of F (rows summed in order, then times 1/S) and M^T = (F - m_p) / sqrt(S);
// from the prior m_p = m0 and M = 0. Grid (ceil(L / 128), B), block 128.
extern "C" __global__ void ll_moments(const unsigned int* __restrict__ ctrl, const float* __restrict__ F,
                                      float* __restrict__ mt, float* __restrict__ mp, const float* __restrict__ m0,
                                      long long sW, long long sSL, int S, int L, float inv_s, float scale) {
    const int b = blockIdx.y;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= L) return;
    const float* Fb = F + b * sSL;
    float* mtb = mt + b * sSL;
    if (ll_from_prior(ctrl, b)) {
        mp[(size_t)b * L + i] = m0[b * sW + i];
        for (int s = 0; s < S; ++s) mtb[(size_t)s * L + i] = 0.0f;
        return;
    }
    float acc = 0.0f;
#pragma unroll 8
    for (int s = 0; s < S; ++s) acc = acc + Fb[(size_t)s * L + i];
    const float m = acc * inv_s;
    mp[(size_t)b * L + i] = m;
    for (int s = 0; s < S; ++s) mtb[(size_t)s * L + i] = (Fb[(size_t)s * L + i] - m) * scale;
}

// e = w1 M^T + w2 * sqrt(Q) (S x L), or w2 * sqrt(Q0) from the prior.
// Grid (ceil(L/32), ceil(S/32), B), block (32, 8).
extern "C" __global__ void __launch_bounds__(256)
    ll_pred_draws(const unsigned int* __restrict__ ctrl, const float* __restrict__ w1, const float* __restrict__ mt,
                  const float* __restrict__ w2, float* __restrict__ e, const float* __restrict__ sqrt_q,
                  const float* __restrict__ sqrt_q0, long long sW, int S, int L) {
    const int b = blockIdx.z;
    const size_t sSL = (size_t)S * L;
    const float* w2b = w2 + b * sSL;
    float* eb = e + b * sSL;
    if (ll_from_prior(ctrl, b)) {
        const float* q0 = sqrt_q0 + b * sW;
        for (int r = threadIdx.y; r < LL_TILE; r += LL_TROWS) {
            const int i = blockIdx.y * LL_TILE + r, j = blockIdx.x * LL_TILE + threadIdx.x;
            if (i < S && j < L) eb[(size_t)i * L + j] = w2b[(size_t)i * L + j] * q0[j];
        }
        return;
    }
    const float* q = sqrt_q + b * sW;
    ll_gemm_tile(w1 + (size_t)b * S * S, S, mt + b * sSL, L, S, L, S, [&](int i, int j, float acc) {
        const size_t o = (size_t)i * L + j;
        eb[o] = acc + w2b[o] * q[j];
    });
}
