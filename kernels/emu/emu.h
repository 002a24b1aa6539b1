// CPU emulation of the CUDA subset latentloop's kernels use, so that tests on machines
// without a GPU run the real kernel sources (kernels/*.cu) and compare them with the CPU
// filter bit for bit. Each CUDA thread of a block is a cooperative fiber (ucontext);
// __syncthreads() switches back to the scheduler, which resumes every live thread of the
// block in turn (forward or reverse order): the barrier semantics, without OS threads.
// Blocks run one after another, so `__shared__` is simply `static`. Included before the
// kernel program; see emu.cpp and tests/gpu_emulated.rs.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#define LL_EMU 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static

struct dim3 {
    unsigned x, y, z;
};
extern dim3 emu_block_idx, emu_block_dim, emu_grid_dim;
dim3& emu_thread_idx();
void emu_syncthreads();
float* emu_dyn_smem();

#define threadIdx (emu_thread_idx())
#define blockIdx emu_block_idx
#define blockDim emu_block_dim
#define gridDim emu_grid_dim
#define __syncthreads() emu_syncthreads()

static inline unsigned int __umulhi(unsigned int a, unsigned int b) {
    return (unsigned int)(((unsigned long long)a * (unsigned long long)b) >> 32);
}
static inline float __uint_as_float(unsigned int u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
static inline unsigned int __float_as_uint(float f) {
    unsigned int u;
    std::memcpy(&u, &f, 4);
    return u;
}
static inline int min(int a, int b) { return a < b ? a : b; }
// Fibers switch only at barriers, so a plain read-modify-write is atomic here.
static inline int atomicOr(int* p, int v) {
    const int old = *p;
    *p = old | v;
    return old;
}
using std::isfinite;
using std::isnan;
