//! B decoders stepping together: the host side of the step (control words, bins in, outputs
//! out) over an executor that owns the device buffers and runs the planned launches. See
//! the module docs of [`crate::gpu`] and docs/GPU.md.

use super::cuda_exec::CudaExec;
use super::exec::{Exec, Profile};
use super::plan::{Buffers, Dims, Plan, CTRL};
use super::weights::{self, Packed};
use super::OUT_HEADER;
use crate::decoder::{validate_bin, BinError, StepInfo};
use crate::model::XfadsModel;
use cudarc::driver::sys::CUdeviceptr;
use std::sync::Arc;

/// Control flags of a decoder's row (kernels/common.cuh).
const HAS_DATA: u32 = 1;
const FROM_PRIOR: u32 = 2;

fn bytes_of<T: Copy>(v: &[T]) -> &[u8] {
    // SAFETY: plain-old-data slices (f32, u32) viewed as bytes.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
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

    pub(super) fn build(
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
        let d = Dims::of(&model, models.len(), samples);
        let packs: Vec<Packed> = if shared {
            vec![weights::pack(&model)?]
        } else {
            models.iter().map(|m| weights::pack(m)).collect::<Result<_, _>>()?
        };
        let s_w = if shared { 0i64 } else { packs[0].data.len() as i64 };
        let blob: Vec<f32> = packs.iter().flat_map(|p| p.data.iter().copied()).collect();
        let buf = Buffers::alloc(&mut *exec, &d, &model, blob.len())?;

        // Weights, seeds, initial means: uploaded once.
        let (b, l) = (d.b, d.l);
        let keys: Vec<u32> = seeds.iter().flat_map(|&sd| [sd as u32, (sd >> 32) as u32]).collect();
        let m0all: Vec<f32> = models.iter().flat_map(|mm| mm.m0.iter().copied()).collect();
        exec.upload(buf.wts, bytes_of(&blob))?;
        exec.upload(buf.dkeys, bytes_of(&keys))?;
        exec.upload(buf.mdev, bytes_of(&m0all))?;
        let (in_len, out_len) = (b * CTRL + b * d.n, b * d.outw());
        let (in_ptr, out_ptr) = exec.host_buffers(in_len, out_len)?;
        // SAFETY: the executor made both buffers with exactly these lengths, and nothing else
        // refers to them yet.
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

        // H2D bins, the kernels, D2H outputs: one graph replayed every bin.
        let ops = Plan::new(&model, &d, &packs[0], buf, s_w).launches();
        exec.prepare(ops, buf.din, buf.dout)?;

        Ok(GpuBatch {
            d,
            seeds: seeds.to_vec(),
            steps: vec![0; b],
            from_prior: vec![true; b],
            exec,
            z_ptr: buf.z,
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
