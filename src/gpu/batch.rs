//! B decoders stepping together: device buffers, the per-bin CUDA Graph, the host side of
//! the step. See the module docs of [`crate::gpu`] and docs/GPU.md.

use super::kernels;
use super::weights::{self, Packed};
use crate::decoder::{validate_bin, BinError, StepInfo};
use crate::model::{DynamicsKind, Observation, XfadsModel};
use cudarc::driver::sys::{self, CUdeviceptr};
use cudarc::driver::{
    result, CudaContext, CudaEvent, CudaFunction, CudaGraph, CudaSlice, CudaStream, DevicePtr, DriverError,
    LaunchConfig, PinnedHostSlice, PushKernelArg,
};
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

/// Floats before the mean in each decoder's output row: [status, kl, 0, 0].
pub const OUT_HEADER: usize = 4;

/// Control words per decoder in the input buffer: [step lo, step hi, flags, 0].
const CTRL: usize = 4;
const HAS_DATA: u32 = 1;
const FROM_PRIOR: u32 = 2;

/// The process-wide context and the loaded kernels (compiled once, on first use).
struct Runtime {
    ctx: Arc<CudaContext>,
    functions: HashMap<&'static str, CudaFunction>,
}

fn pick_arch(cc: (i32, i32)) -> String {
    let want = cc.0 * 10 + cc.1;
    // The newest architecture this NVRTC knows that is not newer than the device (PTX for
    // an older architecture is JIT-compiled by the driver for the newer one).
    let supported: Vec<i32> = std::panic::catch_unwind(|| {
        let mut n = 0i32;
        // SAFETY: out-parameters sized by the first call.
        unsafe {
            if cudarc::nvrtc::sys::nvrtcGetNumSupportedArchs(&mut n) != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
                return Vec::new();
            }
            let mut v = vec![0i32; n.max(0) as usize];
            if cudarc::nvrtc::sys::nvrtcGetSupportedArchs(v.as_mut_ptr())
                != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS
            {
                return Vec::new();
            }
            v
        }
    })
    .unwrap_or_default();
    let arch = supported.iter().copied().filter(|&a| a <= want).max().unwrap_or(want);
    format!("sm_{arch}")
}

fn init_runtime() -> Result<Runtime, String> {
    let info = super::availability()?;
    let ctx = std::panic::catch_unwind(|| CudaContext::new(0))
        .map_err(|_| "creating the CUDA context panicked".to_string())?
        .map_err(|e| format!("cannot create a CUDA context on device 0: {e:?}"))?;
    // Every buffer of a decoder is used on that decoder's stream only, and kernels get raw
    // device pointers, so cudarc's cross-stream event tracking is not needed (and events
    // recorded outside a capture must not be waited on inside one).
    // SAFETY: see above; no CudaSlice is shared between streams.
    unsafe { ctx.disable_event_tracking() };
    let arch = pick_arch(info.compute_capability);
    let compiled = kernels::compile(&kernels::program(), "latentloop_kernels.cu", &arch)?;
    let module = ctx.load_module(cudarc::nvrtc::Ptx::from_src(compiled.ptx)).map_err(|e| {
        format!(
            "the driver ({}) cannot load the PTX of NVRTC {}.{} for {arch}: {e:?}{}",
            info.driver_version,
            info.nvrtc_version.0,
            info.nvrtc_version.1,
            if e.0 == sys::CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION {
                "; the driver is older than this NVRTC: install an NVRTC wheel no newer than the driver's CUDA version"
            } else {
                ""
            }
        )
    })?;
    let mut functions = HashMap::new();
    for &name in kernels::KERNELS {
        let f = module.load_function(name).map_err(|e| format!("kernel {name} missing from the module: {e:?}"))?;
        functions.insert(name, f);
    }
    Ok(Runtime { ctx, functions })
}

fn runtime() -> Result<&'static Runtime, String> {
    static RT: OnceLock<Result<Runtime, String>> = OnceLock::new();
    RT.get_or_init(init_runtime).as_ref().map_err(Clone::clone)
}

/// A kernel argument.
#[derive(Clone, Copy)]
pub(super) enum A {
    P(CUdeviceptr),
    I(i32),
    L(i64),
    F(f32),
}

fn dim(n: usize, per: usize) -> u32 {
    n.div_ceil(per).max(1) as u32
}

/// Sizes of one decoder.
#[derive(Clone, Copy, Debug)]
struct Dims {
    b: usize,
    s: usize,
    l: usize,
    r: usize,
    n: usize,
    h: usize,
    kw: usize,
    dd: usize,
}

impl Dims {
    /// Floats of the update's scratch per decoder (ll_upd_at in kernels/update.cu).
    fn scratch(&self) -> usize {
        let (s, l, r) = (self.s, self.l, self.r);
        s * r + l * r + r * l + s + l + r + r + l + l + 3 * r * r + s
    }
    fn outw(&self) -> usize {
        OUT_HEADER + 2 * self.l + self.dd
    }
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
    /// Where a step's time goes (see [`GpuBatch::profile`]).
    fn profile(&mut self, _reps: usize) -> Result<Profile, String> {
        Err("profiling needs a GPU".into())
    }
}

/// Where one step's time goes, from [`GpuBatch::profile`]; medians in microseconds.
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

fn bytes_of<T: Copy>(v: &[T]) -> &[u8] {
    // SAFETY: plain-old-data slices (f32, u32) viewed as bytes.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

fn derr(what: &str) -> impl Fn(DriverError) -> String + '_ {
    move |e| format!("{what}: {e:?}")
}

/// The GPU: buffers on one stream, the step captured once into a CUDA Graph.
struct CudaExec {
    rt: &'static Runtime,
    stream: Arc<CudaStream>,
    graph: Option<CudaGraph>,
    bufs: Vec<CudaSlice<f32>>,
    input: Option<PinnedHostSlice<u32>>,
    output: Option<PinnedHostSlice<f32>>,
    in_ptr: *mut u32,
    out_ptr: *mut f32,
    in_len: usize,
    out_len: usize,
    /// The step as planned (kept for [`Exec::profile`]).
    ops: Vec<Launch>,
    din: CUdeviceptr,
    dout: CUdeviceptr,
}

impl CudaExec {
    fn new() -> Result<CudaExec, String> {
        let rt = runtime()?;
        let stream = rt.ctx.new_stream().map_err(derr("cannot create a CUDA stream"))?;
        Ok(CudaExec {
            rt,
            stream,
            graph: None,
            bufs: Vec::new(),
            input: None,
            output: None,
            in_ptr: std::ptr::null_mut(),
            out_ptr: std::ptr::null_mut(),
            in_len: 0,
            out_len: 0,
            ops: Vec::new(),
            din: 0,
            dout: 0,
        })
    }
}

impl CudaExec {
    /// Enqueues the step on the stream: H2D of the input words, the launches, D2H of the
    /// outputs. With `marks` (ops.len() + 3 events) records marks[0] first and marks[j + 1]
    /// after item j of [H2D, ops.., D2H]: the profile's view of the same step.
    fn enqueue(&self, ops: &[Launch], din: CUdeviceptr, dout: CUdeviceptr, marks: &[CudaEvent]) -> Result<(), String> {
        let stream = &self.stream;
        let mark = |j: usize| marks.get(j).map_or(Ok(()), |e| e.record(stream).map_err(derr("record an event")));
        mark(0)?;
        // SAFETY: the pinned buffers outlive every use of the stream (both are owned here),
        // and every device pointer was allocated with the length the kernels index.
        unsafe {
            let src = std::slice::from_raw_parts(self.in_ptr as *const u32, self.in_len);
            result::memcpy_htod_async(din, src, stream.cu_stream()).map_err(derr("H2D copy"))?;
        }
        mark(1)?;
        for (j, (name, grid, block, smem, args)) in ops.iter().enumerate() {
            let func = self.rt.functions.get(name).ok_or_else(|| format!("kernel {name} not loaded"))?;
            let mut lb = stream.launch_builder(func);
            for a in args {
                match a {
                    A::P(p) => lb.arg(p),
                    A::I(i) => lb.arg(i),
                    A::L(v) => lb.arg(v),
                    A::F(x) => lb.arg(x),
                };
            }
            let cfg = LaunchConfig { grid_dim: *grid, block_dim: *block, shared_mem_bytes: *smem };
            // SAFETY: the argument lists match the kernels' signatures in kernels/*.cu.
            unsafe { lb.launch(cfg) }.map_err(|e| format!("launch of {name}: {e:?}"))?;
            mark(j + 2)?;
        }
        unsafe {
            let dst = std::slice::from_raw_parts_mut(self.out_ptr, self.out_len);
            result::memcpy_dtoh_async(dst, dout, stream.cu_stream()).map_err(derr("D2H copy"))?;
        }
        mark(ops.len() + 2)
    }

    /// `ops` between the two copies, captured into one instantiated, uploaded graph.
    fn capture(&self, ops: &[Launch], din: CUdeviceptr, dout: CUdeviceptr) -> Result<CudaGraph, String> {
        let stream = &self.stream;
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(derr("begin graph capture"))?;
        let recorded = self.enqueue(ops, din, dout, &[]).map_err(|e| format!("graph capture: {e}"));
        let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        recorded?;
        let graph = graph.map_err(derr("instantiate the step graph"))?.ok_or("graph capture recorded nothing")?;
        graph.upload().map_err(derr("upload the step graph"))?;
        stream.synchronize().map_err(derr("synchronise after set-up"))?;
        Ok(graph)
    }
}

impl Exec for CudaExec {
    fn alloc(&mut self, floats: usize) -> Result<CUdeviceptr, String> {
        let sl = self.stream.alloc_zeros::<f32>(floats.max(1)).map_err(derr("device allocation"))?;
        let (p, _) = sl.device_ptr(&self.stream);
        self.bufs.push(sl);
        Ok(p)
    }
    fn upload(&mut self, dst: CUdeviceptr, bytes: &[u8]) -> Result<(), String> {
        // On our stream, after the allocation's zeroing (a synchronous copy would run on the
        // legacy stream, which a non-blocking stream does not order against), then wait.
        self.rt.ctx.bind_to_thread().map_err(derr("bind the CUDA context"))?;
        // SAFETY: `dst` is one of our allocations, at least this long (the plan sized it);
        // `bytes` outlives the copy because we synchronise before returning.
        unsafe { result::memcpy_htod_async(dst, bytes, self.stream.cu_stream()) }.map_err(derr("upload"))?;
        self.stream.synchronize().map_err(derr("synchronise after an upload"))
    }
    fn host_buffers(&mut self, in_len: usize, out_len: usize) -> Result<(*mut u32, *mut f32), String> {
        // The bins: write-combined (the CPU only writes them); the outputs: cached (it reads them).
        // SAFETY: the contents are set by the caller before any use.
        let mut input = unsafe { self.rt.ctx.alloc_pinned::<u32>(in_len.max(1)) }.map_err(derr("pinned allocation"))?;
        let mut output = unsafe { self.rt.ctx.alloc_pinned_with_flags::<f32>(out_len.max(1), 0) }
            .map_err(derr("pinned allocation"))?;
        self.in_ptr = input.as_mut_ptr().map_err(derr("pinned buffer"))?;
        self.out_ptr = output.as_mut_ptr().map_err(derr("pinned buffer"))?;
        (self.input, self.output, self.in_len, self.out_len) = (Some(input), Some(output), in_len, out_len);
        Ok((self.in_ptr, self.out_ptr))
    }
    fn prepare(&mut self, ops: Vec<Launch>, din: CUdeviceptr, dout: CUdeviceptr) -> Result<(), String> {
        let graph = self.capture(&ops, din, dout)?;
        self.graph = Some(graph);
        (self.ops, self.din, self.dout) = (ops, din, dout);
        Ok(())
    }
    fn run(&mut self) -> Result<(), String> {
        let g = self.graph.as_ref().ok_or("no step graph")?;
        g.launch().and_then(|_| self.stream.synchronize()).map_err(|e| format!("graph launch: {e:?}"))
    }
    fn download(&mut self, src: CUdeviceptr, dst: &mut [f32]) -> Result<(), String> {
        self.rt.ctx.bind_to_thread().map_err(derr("bind the CUDA context"))?;
        // SAFETY: `src` points into one of our allocations with at least dst.len() floats.
        unsafe { result::memcpy_dtoh_async(dst, src, self.stream.cu_stream()) }.map_err(derr("download"))?;
        self.stream.synchronize().map_err(derr("synchronise"))
    }
    fn profile(&mut self, reps: usize) -> Result<Profile, String> {
        let reps = reps.max(1);
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let host = |f: &mut dyn FnMut() -> Result<(), String>| -> Result<f64, String> {
            let mut t = Vec::with_capacity(reps);
            for i in 0..reps + 20 {
                let s = std::time::Instant::now();
                f()?;
                if i >= 20 {
                    t.push(s.elapsed().as_secs_f64() * 1e6);
                }
            }
            Ok(median(&mut t))
        };
        let copies = self.capture(&[], self.din, self.dout)?;
        let stream = self.stream.clone();
        let copies_graph =
            host(&mut || copies.launch().and_then(|_| stream.synchronize()).map_err(derr("copies-only graph")))?;
        let (ops, din, dout) = (std::mem::take(&mut self.ops), self.din, self.dout);
        let res = (|| {
            let enqueued = host(&mut || {
                self.enqueue(&ops, din, dout, &[])?;
                self.stream.synchronize().map_err(derr("synchronise"))
            })?;
            let marks = (0..ops.len() + 3)
                .map(|_| self.rt.ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT)))
                .collect::<Result<Vec<_>, _>>()
                .map_err(derr("create an event"))?;
            let mut per: Vec<Vec<f64>> = vec![Vec::with_capacity(reps); ops.len() + 2];
            for _ in 0..reps {
                self.enqueue(&ops, din, dout, &marks)?;
                self.stream.synchronize().map_err(derr("synchronise"))?;
                for (j, v) in per.iter_mut().enumerate() {
                    v.push(1e3 * marks[j].elapsed_ms(&marks[j + 1]).map_err(derr("event time"))? as f64);
                }
            }
            let names = std::iter::once("H2D").chain(ops.iter().map(|o| o.0)).chain(std::iter::once("D2H"));
            let items = names.zip(per.iter_mut()).map(|(n, v)| (n, median(v))).collect();
            Ok(Profile { items, copies_graph, enqueued })
        })();
        self.ops = ops;
        res
    }
}

impl Drop for CudaExec {
    fn drop(&mut self) {
        // Nothing in flight, then the graph before the buffers it points into.
        let _ = self.stream.synchronize();
        self.graph = None;
    }
}

/// B XFADS filters on one GPU, stepped together by one graph launch per bin.
pub struct GpuBatch {
    model: Arc<XfadsModel>,
    d: Dims,
    seeds: Vec<u64>,
    steps: Vec<u64>,
    from_prior: Vec<bool>,
    exec: Box<dyn Exec>,
    z_ptr: CUdeviceptr,
    in_ptr: *mut u32,
    out_ptr: *mut f32,
    m0: Vec<f32>,
    last_error: Option<String>,
}

// SAFETY: the raw pointers point into host buffers the executor owns; the graph, the stream
// and the executor are only used through `&mut self`, so never from two threads at once.
unsafe impl Send for GpuBatch {}

impl GpuBatch {
    /// B = `seeds.len()` decoders of one model, decoder b drawing its noise from seed b.
    pub fn new(model: Arc<XfadsModel>, samples: Option<usize>, seeds: &[u64]) -> Result<GpuBatch, String> {
        let models = vec![model; seeds.len()];
        Self::build(Box::new(CudaExec::new()?), &models, true, samples, seeds)
    }

    /// The same batch with the kernels compiled as C++ and run on the CPU (a cooperative
    /// thread-per-fiber emulation of blocks, `kernels/emu/`), built by tests/gpu_emulated.rs:
    /// checks the kernels' arithmetic and indexing on machines without a GPU. `reverse` runs
    /// each block's threads in reverse order between barriers, which exposes a missing
    /// `__syncthreads`. Slow; for tests only.
    #[doc(hidden)]
    pub fn emulated(
        lib: &std::path::Path,
        model: Arc<XfadsModel>,
        samples: Option<usize>,
        seeds: &[u64],
        reverse: bool,
    ) -> Result<GpuBatch, String> {
        let models = vec![model; seeds.len()];
        Self::build(Box::new(super::emu::Emulator::open(lib, reverse)?), &models, true, samples, seeds)
    }

    /// One decoder per model; the models must have the same card (shapes).
    pub fn with_models(models: &[Arc<XfadsModel>], samples: Option<usize>, seeds: &[u64]) -> Result<GpuBatch, String> {
        if models.len() != seeds.len() {
            return Err(format!("{} models but {} seeds", models.len(), seeds.len()));
        }
        if let Some(m) = models.iter().find(|m| m.card != models[0].card) {
            return Err(format!("models of one batch must share a card: {:?} vs {:?}", m.card, models[0].card));
        }
        Self::build(Box::new(CudaExec::new()?), models, false, samples, seeds)
    }

    fn build(
        mut exec: Box<dyn Exec>,
        models: &[Arc<XfadsModel>],
        shared: bool,
        samples: Option<usize>,
        seeds: &[u64],
    ) -> Result<GpuBatch, String> {
        if models.is_empty() {
            return Err("a batch needs at least one decoder".into());
        }
        let model = models[0].clone();
        let m = &*model;
        let (l, n) = (m.latents(), m.channels());
        let r = m.rank();
        let (he, lr) = match &m.observation {
            Observation::Encoder { he, .. } => (*he, l),
            Observation::PoissonLaplace { lr, .. } => (0, *lr),
            Observation::Gaussian { .. } => (0, l),
        };
        let d = Dims {
            b: models.len(),
            s: samples.unwrap_or(m.card.samples).max(2),
            l,
            r,
            n,
            h: m.dynamics.hidden,
            kw: (r + 1) * l,
            dd: m.behavior.as_ref().map_or(0, |b| b.dims()),
        };
        let packs: Vec<Packed> = if shared {
            vec![weights::pack(m)?]
        } else {
            models.iter().map(|m| weights::pack(m)).collect::<Result<_, _>>()?
        };
        let wlen = packs[0].data.len();
        let s_w = if shared { 0i64 } else { wlen as i64 };
        let blob: Vec<f32> = packs.iter().flat_map(|p| p.data.iter().copied()).collect();
        let pack = &packs[0];

        let mut alloc = |len: usize| exec.alloc(len);
        let (b, s, h) = (d.b, d.s, d.h.max(1));
        let sl = s * l;
        // The input (control words, then the bins) and the output rows, device side.
        let din = alloc(b * CTRL + b * n)?;
        let dkeys = alloc(2 * b)?;
        let dout = alloc(b * d.outw())?;
        let wts = alloc(blob.len())?;
        let (z, f, mt, e, w2) = (alloc(b * sl)?, alloc(b * sl)?, alloc(b * sl)?, alloc(b * sl)?, alloc(b * sl)?);
        let w1 = alloc(b * s * s)?;
        let wr = alloc(b * s * r)?;
        let (mp, mdev) = (alloc(b * l)?, alloc(b * l)?);
        let hid = alloc(b * s * h)?;
        let gru = m.dynamics.kind == DynamicsKind::Gru;
        let node = m.dynamics.kind == DynamicsKind::Node;
        let gates = alloc(if gru { b * s * 3 * h } else { 1 })?;
        let hnew = alloc(if gru { b * s * h } else { 1 })?;
        let tmp = alloc(if node { b * sl } else { 1 })?;
        let accb = alloc(if node { b * sl } else { 1 })?;
        let kk = alloc(b * d.kw)?;
        let ehid = alloc(b * he.max(1))?;
        let vp = alloc(b * n)?;
        let scratch = alloc(b * d.scratch())?;
        let okflag = alloc(b)?;

        // Weights, seeds, initial means: uploaded once.
        let keys: Vec<u32> = seeds.iter().flat_map(|&sd| [sd as u32, (sd >> 32) as u32]).collect();
        let mut m0all = Vec::with_capacity(b * l);
        for mm in models {
            m0all.extend_from_slice(&mm.m0);
        }
        exec.upload(wts, bytes_of(&blob))?;
        exec.upload(dkeys, bytes_of(&keys))?;
        exec.upload(mdev, bytes_of(&m0all))?;
        let (in_len, out_len) = (b * CTRL + b * n, b * d.outw());
        let (in_ptr, out_ptr) = exec.host_buffers(in_len, out_len)?;
        // SAFETY: the executor made both buffers with exactly these lengths.
        unsafe {
            std::slice::from_raw_parts_mut(in_ptr, in_len).fill(0);
            let o = std::slice::from_raw_parts_mut(out_ptr, out_len);
            o.fill(0.0);
            for (bi, mm) in models.iter().enumerate() {
                let row = &mut o[bi * d.outw()..(bi + 1) * d.outw()];
                row[OUT_HEADER..OUT_HEADER + l].copy_from_slice(&mm.m0);
                row[OUT_HEADER + l..OUT_HEADER + 2 * l].copy_from_slice(&mm.m0);
            }
        }

        let wp = |name: &str| wts + 4 * pack.off(name) as u64;
        let s_sl = sl as i64;
        let s_sh = (s * h) as i64;
        let inv_s = 1.0f32 / s as f32;
        let scale = inv_s.sqrt();
        let ctrl = din;
        let y = din + 4 * (b * CTRL) as u64;
        let dummy = wp("none");

        // The step as a list of kernel launches.
        let mut ops: Vec<Launch> = Vec::new();
        let tile = (32u32, 8u32, 1u32);
        let gemm = |ops: &mut Vec<Launch>,
                    a: CUdeviceptr,
                    s_a: i64,
                    w: CUdeviceptr,
                    bias: CUdeviceptr,
                    cin: CUdeviceptr,
                    c: CUdeviceptr,
                    s_c: i64,
                    (mm, nn, kk_): (usize, usize, usize),
                    mode: i32| {
            ops.push((
                "ll_gemm_epi",
                (dim(nn, 32), dim(mm, 32), b as u32),
                tile,
                0,
                vec![
                    A::P(ctrl),
                    A::P(a),
                    A::L(s_a),
                    A::P(w),
                    A::P(bias),
                    A::L(s_w),
                    A::P(cin),
                    A::P(c),
                    A::L(s_c),
                    A::I(mm as i32),
                    A::I(nn as i32),
                    A::I(kk_ as i32),
                    A::I(mode),
                ],
            ));
        };
        let (g1, g2, g3) = (s.div_ceil(4), l.div_ceil(4), r.div_ceil(4));
        ops.push((
            "ll_noise",
            (dim(s * (g1 + g2 + g3), 128), b as u32, 1),
            (128, 1, 1),
            0,
            vec![A::P(ctrl), A::P(dkeys), A::P(w1), A::P(w2), A::P(wr), A::I(s as i32), A::I(l as i32), A::I(r as i32)],
        ));
        let hh = d.h;
        match m.dynamics.kind {
            DynamicsKind::Linear => gemm(&mut ops, z, s_sl, wp("dyn.at"), wp("dyn.a"), dummy, f, s_sl, (s, l, l), 1),
            DynamicsKind::Mlp => {
                gemm(&mut ops, z, s_sl, wp("dyn.w1t"), wp("dyn.b1"), dummy, hid, s_sh, (s, hh, l), 2);
                gemm(&mut ops, hid, s_sh, wp("dyn.w2t"), wp("dyn.b2"), z, f, s_sl, (s, l, hh), 3);
            }
            DynamicsKind::Node => {
                let sub = m.dynamics.substeps.max(1);
                let dt = 1.0f32 / sub as f32;
                let (half, dt6) = (0.5f32 * dt, dt / 6.0f32);
                for k in 0..sub {
                    let x0 = if k == 0 { z } else { f };
                    for stage in 0..4 {
                        let input = if stage == 0 { x0 } else { tmp };
                        gemm(&mut ops, input, s_sl, wp("dyn.w1t"), wp("dyn.b1"), dummy, hid, s_sh, (s, hh, l), 2);
                        ops.push((
                            "ll_rk4_stage",
                            (dim(l, 32), dim(s, 32), b as u32),
                            tile,
                            0,
                            vec![
                                A::P(ctrl),
                                A::P(hid),
                                A::L(s_sh),
                                A::P(wp("dyn.w2t")),
                                A::P(wp("dyn.b2")),
                                A::L(s_w),
                                A::P(x0),
                                A::P(f),
                                A::P(tmp),
                                A::P(accb),
                                A::L(s_sl),
                                A::I(s as i32),
                                A::I(l as i32),
                                A::I(hh as i32),
                                A::I(stage),
                                A::F(half),
                                A::F(dt),
                                A::F(dt6),
                            ],
                        ));
                    }
                }
            }
            DynamicsKind::Gru => {
                gemm(&mut ops, z, s_sl, wp("dyn.wzh_t"), wp("dyn.bzh"), dummy, hid, s_sh, (s, hh, l), 1);
                gemm(&mut ops, hid, s_sh, wp("dyn.whh_t"), dummy, dummy, gates, 3 * s_sh, (s, 3 * hh, hh), 0);
                ops.push((
                    "ll_gru_cell",
                    (dim(s * hh, 256), b as u32, 1),
                    (256, 1, 1),
                    0,
                    vec![
                        A::P(ctrl),
                        A::P(hid),
                        A::P(gates),
                        A::P(hnew),
                        A::L(s_sh),
                        A::L(3 * s_sh),
                        A::P(wp("dyn.b_r")),
                        A::P(wp("dyn.b_u")),
                        A::P(wp("dyn.b_in")),
                        A::P(wp("dyn.b_hn")),
                        A::L(s_w),
                        A::I(s as i32),
                        A::I(hh as i32),
                    ],
                ));
                gemm(&mut ops, hnew, s_sh, wp("dyn.wout_t"), wp("dyn.bout"), dummy, f, s_sl, (s, l, hh), 1);
            }
        }
        if m.dynamics.rmsnorm {
            ops.push((
                "ll_rmsnorm",
                (dim(s, 128), b as u32, 1),
                (128, 1, 1),
                0,
                vec![A::P(ctrl), A::P(f), A::L(s_sl), A::I(s as i32), A::I(l as i32)],
            ));
        }
        ops.push((
            "ll_moments",
            (dim(l, 128), b as u32, 1),
            (128, 1, 1),
            0,
            vec![
                A::P(ctrl),
                A::P(f),
                A::P(mt),
                A::P(mp),
                A::P(wp("m0")),
                A::L(s_w),
                A::L(s_sl),
                A::I(s as i32),
                A::I(l as i32),
                A::F(inv_s),
                A::F(scale),
            ],
        ));
        ops.push((
            "ll_pred_draws",
            (dim(l, 32), dim(s, 32), b as u32),
            tile,
            0,
            vec![
                A::P(ctrl),
                A::P(w1),
                A::P(mt),
                A::P(w2),
                A::P(e),
                A::P(wp("sqrt_q")),
                A::P(wp("sqrt_q0")),
                A::L(s_w),
                A::I(s as i32),
                A::I(l as i32),
            ],
        ));
        match &m.observation {
            Observation::Encoder { .. } => {
                ops.push((
                    "ll_enc_hidden",
                    (dim(he, 128), b as u32, 1),
                    (128, 1, 1),
                    0,
                    vec![
                        A::P(ctrl),
                        A::P(y),
                        A::I(n as i32),
                        A::P(wp("enc.w1t")),
                        A::P(wp("enc.b1")),
                        A::L(s_w),
                        A::P(ehid),
                        A::I(he as i32),
                    ],
                ));
                ops.push((
                    "ll_enc_out",
                    (dim(d.kw, 128), b as u32, 1),
                    (128, 1, 1),
                    0,
                    vec![
                        A::P(ctrl),
                        A::P(ehid),
                        A::I(he as i32),
                        A::P(wp("enc.w2t")),
                        A::P(wp("enc.b2")),
                        A::L(s_w),
                        A::P(kk),
                        A::I(d.kw as i32),
                    ],
                ));
            }
            Observation::Gaussian { .. } => ops.push((
                "ll_pot_gaussian",
                (dim(l * n, 256), b as u32, 1),
                (256, 1, 1),
                0,
                vec![
                    A::P(ctrl),
                    A::P(y),
                    A::I(n as i32),
                    A::P(wp("obs.c")),
                    A::P(wp("obs.b")),
                    A::P(wp("obs.rinv")),
                    A::P(wp("obs.kfix")),
                    A::L(s_w),
                    A::P(kk),
                    A::I(l as i32),
                ],
            )),
            Observation::PoissonLaplace { dt, .. } => {
                ops.push((
                    "ll_pot_pl_a",
                    (dim(n, 128), b as u32, 1),
                    (128, 1, 1),
                    0,
                    vec![
                        A::P(ctrl),
                        A::P(y),
                        A::I(n as i32),
                        A::P(wp("obs.c")),
                        A::P(wp("obs.ct")),
                        A::P(wp("obs.b")),
                        A::L(s_w),
                        A::P(mp),
                        A::P(kk),
                        A::P(vp),
                        A::I(l as i32),
                        A::I(lr as i32),
                        A::F(*dt),
                    ],
                ));
                ops.push((
                    "ll_pot_pl_b",
                    (dim(l, 128), b as u32, 1),
                    (128, 1, 1),
                    0,
                    vec![
                        A::P(ctrl),
                        A::I(n as i32),
                        A::P(wp("obs.c")),
                        A::L(s_w),
                        A::P(vp),
                        A::P(kk),
                        A::I(l as i32),
                        A::I(lr as i32),
                    ],
                ));
            }
        }
        // The update's products, two kernels with one argument list.
        let upd_args = vec![
            A::P(ctrl),
            A::P(kk),
            A::P(mt),
            A::P(mp),
            A::P(wp("sqrt_q")),
            A::P(wp("sqrt_q0")),
            A::L(s_w),
            A::P(scratch),
            A::L(d.scratch() as i64),
            A::I(s as i32),
            A::I(l as i32),
            A::I(r as i32),
        ];
        for (name, outputs) in [("ll_update_products", s * r + l * r + s), ("ll_update_gram", r * r + r * l + l)] {
            ops.push((name, (dim(outputs, 128), b as u32, 1), (128, 1, 1), 0, upd_args.clone()));
        }
        ops.push((
            "ll_update_core",
            (b as u32, 1, 1),
            (512, 1, 1),
            0,
            vec![
                A::P(ctrl),
                A::P(kk),
                A::P(mt),
                A::P(z),
                A::P(mp),
                A::P(mdev),
                A::P(wp("m0")),
                A::P(wp("beh.d")),
                A::P(wp("beh.bias")),
                A::L(s_w),
                A::P(scratch),
                A::L(d.scratch() as i64),
                A::P(dout),
                A::I(d.outw() as i32),
                A::P(okflag),
                A::I(s as i32),
                A::I(l as i32),
                A::I(r as i32),
                A::I(d.dd as i32),
                A::F(inv_s),
                A::F(scale),
            ],
        ));
        ops.push((
            "ll_update_draws",
            (s as u32, b as u32, 1),
            (128, 1, 1),
            (2 * r * 4) as u32,
            vec![
                A::P(ctrl),
                A::P(kk),
                A::P(e),
                A::P(wr),
                A::P(mp),
                A::P(scratch),
                A::L(d.scratch() as i64),
                A::P(okflag),
                A::P(z),
                A::I(s as i32),
                A::I(l as i32),
                A::I(r as i32),
            ],
        ));

        // H2D bins, the kernels, D2H outputs: one graph replayed every bin.
        exec.prepare(ops, din, dout)?;

        Ok(GpuBatch {
            d,
            seeds: seeds.to_vec(),
            steps: vec![0; b],
            from_prior: vec![true; b],
            exec,
            z_ptr: z,
            in_ptr,
            out_ptr,
            m0: m0all,
            last_error: None,
            model,
        })
    }

    pub fn model(&self) -> &Arc<XfadsModel> {
        &self.model
    }
    /// B.
    pub fn len(&self) -> usize {
        self.d.b
    }
    pub fn is_empty(&self) -> bool {
        self.d.b == 0
    }
    pub fn samples(&self) -> usize {
        self.d.s
    }
    pub fn latents(&self) -> usize {
        self.d.l
    }
    pub fn channels(&self) -> usize {
        self.d.n
    }
    pub fn behavior_dims(&self) -> usize {
        self.d.dd
    }
    pub fn seed(&self, b: usize) -> u64 {
        self.seeds[b]
    }
    /// Index of decoder b's next bin.
    pub fn step_index(&self, b: usize) -> u64 {
        self.steps[b]
    }
    /// The driver's words for the last failed step, if one failed.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    fn row(&self, b: usize) -> &[f32] {
        assert!(b < self.d.b, "decoder {b} of a batch of {}", self.d.b);
        let w = self.d.outw();
        // SAFETY: the output buffer holds B rows of `w` floats; the device writes it only
        // inside `step`, which synchronises before returning.
        unsafe { std::slice::from_raw_parts(self.out_ptr.add(b * w), w) }
    }
    /// m_t of decoder b after its last step (m0 before the first).
    pub fn mean(&self, b: usize) -> &[f32] {
        &self.row(b)[OUT_HEADER..OUT_HEADER + self.d.l]
    }
    /// m_{t-1|t} of decoder b.
    pub fn lag1_mean(&self, b: usize) -> &[f32] {
        &self.row(b)[OUT_HEADER + self.d.l..OUT_HEADER + 2 * self.d.l]
    }
    /// D m_t + d of decoder b (empty without a behaviour readout).
    pub fn behavior(&self, b: usize) -> &[f32] {
        &self.row(b)[OUT_HEADER + 2 * self.d.l..]
    }

    /// Starts decoder b over from the prior at its next bin.
    pub fn reset(&mut self, b: usize) {
        self.from_prior[b] = true;
        let (w, l) = (self.d.outw(), self.d.l);
        // SAFETY: as in `row`; nothing runs on the device between steps.
        let row = unsafe { std::slice::from_raw_parts_mut(self.out_ptr.add(b * w), w) };
        row[OUT_HEADER..OUT_HEADER + l].copy_from_slice(&self.m0[b * l..(b + 1) * l]);
        row[OUT_HEADER + l..OUT_HEADER + 2 * l].copy_from_slice(&self.m0[b * l..(b + 1) * l]);
    }

    /// Decodes one bin for every decoder (`None`: no data for that one, a predict-only step)
    /// with one graph launch. `infos` gets each decoder's StepInfo. A refused bin refuses the
    /// whole call and leaves every state untouched: the error names the decoder.
    /// Allocates nothing.
    pub fn step(&mut self, ys: &[Option<&[f32]>], infos: &mut [StepInfo]) -> Result<(), (usize, BinError)> {
        let (b, n) = (self.d.b, self.d.n);
        assert!(ys.len() == b && infos.len() == b, "one bin and one info slot per decoder");
        for (i, y) in ys.iter().enumerate() {
            if let Some(y) = y {
                validate_bin(y, n).map_err(|e| (i, e))?;
            }
        }
        // SAFETY: the input buffer holds B control rows and B bins; the device reads it only
        // during the graph, which has finished (the previous step synchronised).
        let input = unsafe { std::slice::from_raw_parts_mut(self.in_ptr, b * CTRL + b * n) };
        let (ctrl, bins) = input.split_at_mut(b * CTRL);
        for (i, y) in ys.iter().enumerate() {
            let t = self.steps[i];
            let flags = if y.is_some() { HAS_DATA } else { 0 } | if self.from_prior[i] { FROM_PRIOR } else { 0 };
            ctrl[i * CTRL..(i + 1) * CTRL].copy_from_slice(&[t as u32, (t >> 32) as u32, flags, 0]);
            if let Some(y) = y {
                for (dst, v) in bins[i * n..(i + 1) * n].iter_mut().zip(y.iter()) {
                    *dst = v.to_bits();
                }
            }
        }
        if let Err(e) = self.exec.run() {
            self.last_error = Some(e);
            return Err((0, BinError::Device("the step's CUDA graph failed (see GpuBatch::last_error)")));
        }
        let w = self.d.outw();
        for (i, y) in ys.iter().enumerate() {
            // SAFETY: as in `row`.
            let (status, kl) = unsafe { (*self.out_ptr.add(i * w), *self.out_ptr.add(i * w + 1)) };
            let mut info = StepInfo { step: self.steps[i], predict_only: y.is_none(), reset: false, kl: 0.0 };
            if status == 1.0 {
                info.kl = kl;
            } else if status == 2.0 {
                info.predict_only = true;
                info.reset = true;
            }
            self.from_prior[i] = info.reset;
            self.steps[i] += 1;
            infos[i] = info;
        }
        Ok(())
    }

    /// The samples of q_t of decoder b (S x L, rows are samples), copied from the device.
    /// For tests and inspection: allocates and synchronises; not for the per-bin path.
    pub fn sample_matrix(&mut self, b: usize) -> Result<Vec<f32>, String> {
        let sl = self.d.s * self.d.l;
        let mut out = vec![0.0f32; sl];
        self.exec.download(self.z_ptr + (4 * b * sl) as u64, &mut out)?;
        Ok(out)
    }

    /// Where a step's time goes: each kernel's GPU time (events around it, the step
    /// enqueued launch by launch), the copies, and the host time of a graph holding only the
    /// copies (the launch floor), medians over `reps` runs. For benches: it replays the last
    /// step's inputs (bins and control words) `reps` times, so step with data at least twice
    /// first (the first step starts from the prior), and this batch's state is garbage
    /// afterwards: profile a batch made for it.
    pub fn profile(&mut self, reps: usize) -> Result<Profile, String> {
        self.exec.profile(reps)
    }

    /// Sizes of the pinned transfers per bin, in bytes (input, output), for docs and benches.
    pub fn transfer_bytes(&self) -> (usize, usize) {
        (4 * (self.d.b * CTRL + self.d.b * self.d.n), 4 * self.d.b * self.d.outw())
    }
}
