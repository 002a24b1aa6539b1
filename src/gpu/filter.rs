//! One XFADS filter on the GPU behind the [`Decoder`] trait: a [`GpuBatch`] of one.

use super::batch::GpuBatch;
use crate::decoder::{BinError, Decoder, StepInfo};
use crate::filter::FilterOptions;
use crate::model::XfadsModel;
use std::sync::Arc;

pub struct GpuFilter {
    batch: GpuBatch,
    info: [StepInfo; 1],
}

impl GpuFilter {
    /// Compiles the kernels (once per process), uploads the model and captures the step
    /// graph. Fails with a reason (never panics) where CUDA is not usable.
    pub fn new(model: Arc<XfadsModel>, opts: FilterOptions) -> Result<GpuFilter, String> {
        let batch = GpuBatch::new(model, opts.samples, &[opts.seed])?;
        Ok(GpuFilter { batch, info: [StepInfo { step: 0, predict_only: true, reset: false, kl: 0.0 }] })
    }

    /// The filter run by the CPU emulation of the kernels ([`GpuBatch::emulated`]; tests).
    #[doc(hidden)]
    pub fn emulated(
        lib: &std::path::Path,
        model: Arc<XfadsModel>,
        opts: FilterOptions,
        reverse: bool,
    ) -> Result<GpuFilter, String> {
        let batch = GpuBatch::emulated(lib, model, opts.samples, &[opts.seed], reverse)?;
        Ok(GpuFilter { batch, info: [StepInfo { step: 0, predict_only: true, reset: false, kl: 0.0 }] })
    }

    pub fn batch(&self) -> &GpuBatch {
        &self.batch
    }
    pub fn samples(&self) -> usize {
        self.batch.samples()
    }
    pub fn step_index(&self) -> u64 {
        self.batch.step_index(0)
    }
    /// Samples of q_t (S x L), copied from the device (allocates; tests and inspection).
    pub fn sample_matrix(&mut self) -> Result<Vec<f32>, String> {
        self.batch.sample_matrix(0)
    }
}

impl Decoder for GpuFilter {
    fn channels(&self) -> usize {
        self.batch.channels()
    }
    fn latents(&self) -> usize {
        self.batch.latents()
    }
    fn behavior_dims(&self) -> usize {
        self.batch.behavior_dims()
    }
    /// The prediction runs inside the step's graph (one launch per bin), so nothing here.
    fn predict(&mut self) {}
    fn step(&mut self, y: Option<&[f32]>) -> Result<StepInfo, BinError> {
        self.batch.step(&[y], &mut self.info).map_err(|(_, e)| e)?;
        Ok(self.info[0])
    }
    fn behavior(&self) -> &[f32] {
        self.batch.behavior(0)
    }
    fn mean(&self) -> &[f32] {
        self.batch.mean(0)
    }
    fn lag1_mean(&self) -> &[f32] {
        self.batch.lag1_mean(0)
    }
    fn reset(&mut self) {
        self.batch.reset(0)
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
