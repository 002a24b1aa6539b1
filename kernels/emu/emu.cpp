// The fiber scheduler and the kernel registry of the CPU emulation (see emu.h). Built as a
// shared library by tests/gpu_emulated.rs together with the generated files
//   program.cu    the kernel program (src/gpu/kernels.rs `program()`), and
//   registry.inc  one EMU_KERNEL(name) line per kernel,
// and driven through `emu_launch` by src/gpu/emu.rs. Compile with -ffp-contract=off so that,
// like NVRTC with --fmad=false, the only fused multiply-adds are the explicit fmaf calls.
#include "emu.h"

#include "program.cu"

#include <ucontext.h>

#include <cstdio>
#include <utility>
#include <vector>

dim3 emu_block_idx, emu_block_dim, emu_grid_dim;

namespace {

struct Fiber {
    ucontext_t ctx;
    dim3 tid;
    bool done;
    bool at_barrier;
    std::vector<char> stack;
};

std::vector<Fiber> fibers;
ucontext_t scheduler;
int current = 0;
void (*current_kernel)(void**) = nullptr;
void** current_args = nullptr;
std::vector<float> dyn_smem;

template <class... A, std::size_t... I>
void call_impl(void (*f)(A...), void** args, std::index_sequence<I...>) {
    f(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(args[I])...);
}
template <class... A>
void call(void (*f)(A...), void** args) {
    call_impl(f, args, std::index_sequence_for<A...>{});
}

struct Entry {
    const char* name;
    void (*run)(void**);
};

#define EMU_KERNEL(k) {#k, [](void** a) { call(k, a); }},
const Entry registry[] = {
#include "registry.inc"
};

void fiber_main() {
    current_kernel(current_args);
    fibers[current].done = true;
}

}  // namespace

dim3& emu_thread_idx() { return fibers[current].tid; }
float* emu_dyn_smem() { return dyn_smem.data(); }
void emu_syncthreads() {
    fibers[current].at_barrier = true;
    swapcontext(&fibers[current].ctx, &scheduler);
}

// Runs a kernel over its whole grid. Returns 0, -1 for an unknown kernel, -2 when the
// threads of a block disagreed about a barrier (some exited while others waited).
extern "C" int emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                          unsigned bz, unsigned smem, void** args, int reverse) {
    const Entry* e = nullptr;
    for (const Entry& r : registry)
        if (std::strcmp(r.name, name) == 0) e = &r;
    if (!e) return -1;
    const unsigned nt = bx * by * bz;
    if (fibers.size() < nt) fibers.resize(nt);
    for (unsigned t = 0; t < nt; ++t)
        if (fibers[t].stack.empty()) fibers[t].stack.resize(1 << 16);
    current_kernel = e->run;
    current_args = args;
    emu_grid_dim = {gx, gy, gz};
    emu_block_dim = {bx, by, bz};
    for (unsigned z = 0; z < gz; ++z)
        for (unsigned y = 0; y < gy; ++y)
            for (unsigned x = 0; x < gx; ++x) {
                emu_block_idx = {x, y, z};
                // Uninitialised shared memory reads as NaN, so using it shows.
                dyn_smem.assign(smem / 4 + 1, std::nanf(""));
                for (unsigned t = 0; t < nt; ++t) {
                    Fiber& f = fibers[t];
                    f.done = false;
                    f.tid = {t % bx, (t / bx) % by, t / (bx * by)};
                    getcontext(&f.ctx);
                    f.ctx.uc_stack.ss_sp = f.stack.data();
                    f.ctx.uc_stack.ss_size = f.stack.size();
                    f.ctx.uc_link = &scheduler;
                    makecontext(&f.ctx, fiber_main, 0);
                }
                for (;;) {
                    unsigned waiting = 0, finished_now = 0;
                    for (unsigned k = 0; k < nt; ++k) {
                        const unsigned t = reverse ? nt - 1 - k : k;
                        if (fibers[t].done) continue;
                        current = (int)t;
                        fibers[t].at_barrier = false;
                        swapcontext(&scheduler, &fibers[t].ctx);
                        if (fibers[t].done)
                            ++finished_now;
                        else
                            ++waiting;
                    }
                    if (waiting == 0) break;
                    if (finished_now != 0) {
                        std::fprintf(stderr, "emu: %s block (%u,%u,%u): %u threads exited while %u wait at a barrier\n",
                                     name, x, y, z, finished_now, waiting);
                        return -2;
                    }
                }
            }
    return 0;
}
