//! The executor trait: where the planned step of a [`super::GpuBatch`] runs. The CUDA
//! executor ([`super::cuda_exec`]) and the CPU emulation of the kernels ([`super::emu`])
//! implement it; neither is known here.

use cudarc::driver::sys::CUdeviceptr;

/// A kernel argument.
#[derive(Clone, Copy)]
pub(super) enum A {
    P(CUdeviceptr),
    I(i32),
    L(i64),
    F(f32),
}

/// A kernel launch of the planned step: (name, grid, block, dynamic shared bytes, args).
pub(super) type Launch = (&'static str, (u32, u32, u32), (u32, u32, u32), u32, Vec<A>);

/// Where the planned step runs: the GPU through cudarc (a CUDA Graph), or, for tests on
/// machines without one, the kernels compiled as C++ for the CPU (see `super::emu`).
pub(super) trait Exec {
    /// A zeroed device buffer of `floats` 4-byte words.
    fn alloc(&mut self, floats: usize) -> Result<CUdeviceptr, String>;
    fn upload(&mut self, dst: CUdeviceptr, bytes: &[u8]) -> Result<(), String>;
    /// The host buffers of the bins (`in_len` words) and the outputs (`out_len` floats).
    fn host_buffers(&mut self, in_len: usize, out_len: usize) -> Result<(*mut u32, *mut f32), String>;
    /// Fixes the step: H2D of the input words to `din`, the launches, D2H of the outputs from `dout`.
    fn prepare(&mut self, ops: Vec<Launch>, din: CUdeviceptr, dout: CUdeviceptr) -> Result<(), String>;
    /// One step, finished when this returns.
    fn run(&mut self) -> Result<(), String>;
    fn download(&mut self, src: CUdeviceptr, dst: &mut [f32]) -> Result<(), String>;
    /// Where a step's time goes (see [`super::GpuBatch::profile`]).
    fn profile(&mut self, _reps: usize) -> Result<Profile, String> {
        Err("profiling needs a GPU".into())
    }
}

/// Where one step's time goes, from [`super::GpuBatch::profile`]; medians in microseconds.
#[derive(Clone, Debug)]
pub struct Profile {
    /// GPU time of each item of the step enqueued launch by launch ("H2D", the kernels in
    /// order, "D2H"), between events recorded around it.
    pub items: Vec<(&'static str, f64)>,
    /// Host time of launching and waiting for a graph that holds only the two copies: the
    /// floor under the step's graph launch.
    pub copies_graph: f64,
    /// Host time of the step enqueued launch by launch (no graph) and waited for.
    pub enqueued: f64,
}
