//! The CUDA executor: the planned step's buffers on one stream, captured once into a CUDA
//! Graph that is replayed every bin (H2D of the bins from pinned memory, every kernel, D2H of
//! the outputs into pinned memory).

use super::exec::{Exec, Launch, Profile, A};
use super::runtime::{runtime, Runtime};
use cudarc::driver::sys::{self, CUdeviceptr};
use cudarc::driver::{
    result, CudaEvent, CudaGraph, CudaSlice, CudaStream, DevicePtr, DriverError, LaunchConfig, PinnedHostSlice,
    PushKernelArg,
};
use std::sync::Arc;

fn derr(what: &str) -> impl Fn(DriverError) -> String + '_ {
    move |e| format!("{what}: {e:?}")
}

/// The GPU: buffers on one stream, the step captured once into a CUDA Graph.
pub(super) struct CudaExec {
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
    pub(super) fn new() -> Result<CudaExec, String> {
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
        // SAFETY: as for the H2D copy: the pinned output buffer (out_len floats, owned here)
        // outlives the stream's use of it, and `dout` holds out_len floats.
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
        // SAFETY: as above.
        // SAFETY: as above.
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
