//! A model file of either kind, and the decoder it builds: the one place that knows every
//! [`Decoder`] implementation (the XFADS filter on the CPU or GPU, the Kalman decoder). It
//! sits above them so that none of them imports it back.

use crate::decoder::Decoder;
use crate::error::{Error, Result};
use crate::filter::{Filter, FilterOptions};
use crate::gpu::{Backend, GpuFilter};
use crate::kalman::{KalmanFilter, KalmanMode, KalmanModel};
use crate::model::{card, xfads_names, ModelFile, ModelKind, XfadsModel};
use std::path::Path;
use std::sync::Arc;

/// A loaded model of either kind.
#[derive(Clone, Debug)]
pub enum AnyModel {
    Xfads(Arc<XfadsModel>),
    Kalman(Arc<KalmanModel>),
}

/// Runtime choices for building a decoder from a model.
#[derive(Clone, Copy, Debug, Default)]
pub struct DecoderOptions {
    /// XFADS: filter samples S (default: the model card's) and the noise seed.
    pub filter: FilterOptions,
    pub kalman: KalmanMode,
    /// Where an XFADS filter runs (see [`crate::gpu::select_backend`]); Kalman decoders
    /// always run on the CPU.
    pub backend: Backend,
}

impl AnyModel {
    /// Reads a model file of any kind (latentloop's, or an XFADS checkpoint's names).
    pub fn load(path: impl AsRef<Path>) -> Result<AnyModel> {
        let path = path.as_ref();
        let f = ModelFile::read(path)?;
        Self::from_model_file(&f).map_err(|m| Error::model(path, m))
    }

    pub fn from_model_file(f: &ModelFile) -> Result<AnyModel, String> {
        if xfads_names::looks_like_xfads(f) {
            return Ok(AnyModel::Xfads(Arc::new(XfadsModel::from_model_file(f)?)));
        }
        Ok(match card::read_kind(f)? {
            ModelKind::Xfads => AnyModel::Xfads(Arc::new(XfadsModel::compile(f)?)),
            ModelKind::Kalman => AnyModel::Kalman(Arc::new(KalmanModel::from_file(f)?)),
        })
    }

    pub fn channels(&self) -> usize {
        match self {
            AnyModel::Xfads(m) => m.channels(),
            AnyModel::Kalman(m) => m.channels(),
        }
    }

    /// Length of the decoder's state mean.
    pub fn latents(&self) -> usize {
        match self {
            AnyModel::Xfads(m) => m.latents(),
            AnyModel::Kalman(m) => m.states(),
        }
    }

    pub fn behavior_dims(&self) -> usize {
        match self {
            AnyModel::Xfads(m) => m.behavior.as_ref().map_or(0, |b| b.dims()),
            AnyModel::Kalman(m) => m.behavior_dims(),
        }
    }

    /// Bins by which decoded behaviour leads the neural data (Kalman fits with a lag).
    pub fn behavior_lag(&self) -> usize {
        match self {
            AnyModel::Xfads(_) => 0,
            AnyModel::Kalman(m) => m.params.lag,
        }
    }

    /// The same model with `channels` treated as missing in the update from the next bin
    /// (see [`crate::model::Observation::masked`] and [`crate::kalman::KalmanParams::masked`]);
    /// an empty list gives the model back unmasked. Refuses channels out of range or repeated.
    pub fn masked(&self, channels: &[usize]) -> Result<AnyModel, String> {
        let n = self.channels();
        let mut seen = vec![false; n];
        for &j in channels {
            if j >= n {
                return Err(format!("channel {j} is out of range: the model reads channels 0..{n}"));
            }
            if std::mem::replace(&mut seen[j], true) {
                return Err(format!("channel {j} is listed twice"));
            }
        }
        if channels.len() == n {
            return Err(format!("all {n} channels masked: nothing would be decoded"));
        }
        Ok(match self {
            AnyModel::Xfads(m) => {
                let mut m = (**m).clone();
                m.observation = m.observation.masked(channels);
                AnyModel::Xfads(Arc::new(m))
            }
            AnyModel::Kalman(m) => AnyModel::Kalman(Arc::new(KalmanModel::new(m.params.masked(channels)?)?)),
        })
    }

    /// The bin width the model was made for, in seconds.
    pub fn dt(&self) -> f32 {
        match self {
            AnyModel::Xfads(m) => m.card.dt,
            AnyModel::Kalman(m) => m.params.dt,
        }
    }

    /// One line for logs.
    pub fn describe(&self) -> String {
        match self {
            AnyModel::Xfads(m) => format!(
                "xfads: {}, {} update (r={}), L={}, N={}, S={}, dt={} s",
                m.dynamics.describe(),
                m.card.update,
                m.rank(),
                m.latents(),
                m.channels(),
                m.card.samples,
                m.card.dt
            ),
            AnyModel::Kalman(m) => format!(
                "kalman: {} behaviour dims + constant, N={}, dt={} s, lag={}",
                m.behavior_dims(),
                m.channels(),
                m.params.dt,
                m.params.lag
            ),
        }
    }

    /// The decoder for `opts.backend`; building the CUDA filter can fail (no device, a driver
    /// too old for the NVRTC that compiled the kernels, out of memory), and then this says why.
    pub fn try_decoder(&self, opts: DecoderOptions) -> Result<Box<dyn Decoder>> {
        Ok(match (self, opts.backend) {
            (AnyModel::Xfads(m), Backend::Cuda) => Box::new(
                GpuFilter::new(m.clone(), opts.filter)
                    .map_err(|why| Error::Invalid(format!("cannot run the filter on the GPU: {why}")))?,
            ),
            (AnyModel::Xfads(m), Backend::Cpu) => Box::new(Filter::new(m.clone(), opts.filter)),
            (AnyModel::Kalman(m), _) => Box::new(KalmanFilter::new(m.clone(), opts.kalman)),
        })
    }

    /// [`AnyModel::try_decoder`] that cannot fail: if the CUDA filter cannot be built it says
    /// so on stderr and decodes on the CPU. Callers that must not fall back use `try_decoder`.
    pub fn decoder(&self, opts: DecoderOptions) -> Box<dyn Decoder> {
        self.try_decoder(opts).unwrap_or_else(|e| {
            eprintln!("warning: {e}; decoding on the CPU");
            self.try_decoder(DecoderOptions { backend: Backend::Cpu, ..opts }).expect("the CPU decoder always builds")
        })
    }
}
