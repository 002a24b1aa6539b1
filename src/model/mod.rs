//! Models: what the filter runs. A model is loaded from one `.safetensors` file (weights as
//! tensors, the card as metadata) and compiled into compute layouts once, at load.
//!
//! Tensor names (PyTorch layout, out x in):
//! - `dynamics.log_q` (L), Q = softplus(log_q); `init.m0` (L); `init.log_q0` (L)
//! - gru: `dynamics.w_zh` (H x L), `dynamics.b_zh` (H), `dynamics.w_hh` (3H x H, gates r,u,n),
//!   `dynamics.b_hh` (3H), `dynamics.b_ih` (3H), `dynamics.w_out` (L x H), `dynamics.b_out` (L)
//! - mlp / node: `dynamics.w1` (H x L), `dynamics.b1` (H), `dynamics.w2` (L x H), `dynamics.b2` (L)
//! - linear: `dynamics.a` (L x L), `dynamics.b` (L)
//! - encoder: `encoder.w1` (He x N), `encoder.b1` (He), `encoder.w2` ((r+1)L x He), `encoder.b2`
//! - poisson readout: `readout.c` (N x Lr), `readout.b` (N); gaussian: `readout.c` (N x L),
//!   `readout.b` (N), `readout.log_r` (N), R = softplus(log_r)
//! - behaviour (optional): `behavior.d` (D x L), `behavior.bias` (D)

pub mod build;
pub mod card;
pub mod dynamics;
pub mod file;
pub mod observation;
pub mod xfads_names;

use crate::error::{Error, Result};
pub use card::{Card, DynamicsKind, ModelKind, ReadoutKind, UpdateKind};
pub use dynamics::Dynamics;
pub use file::{ModelFile, Tensor};
pub use observation::{softplus, softplus_inv, Behavior, Observation, Readout};
use std::path::Path;

/// A compiled XFADS-family model (any dynamics, any update).
#[derive(Clone, Debug)]
pub struct XfadsModel {
    pub card: Card,
    pub dynamics: Dynamics,
    /// Process noise variances Q (L), after softplus.
    pub q: Vec<f32>,
    /// Initial state: mean m0 and variances Q0 (L).
    pub m0: Vec<f32>,
    pub q0: Vec<f32>,
    pub observation: Observation,
    pub readout: Readout,
    pub behavior: Option<Behavior>,
}

fn positive_vector(f: &ModelFile, name: &str, l: usize, what: &str) -> Result<Vec<f32>, String> {
    let v: Vec<f32> = f.get(name, &[l], what)?.iter().map(|&x| softplus(x)).collect();
    if let Some(i) = v.iter().position(|&x| x <= 0.0) {
        return Err(format!("{name}[{i}] gives a variance of 0 (softplus underflow)"));
    }
    Ok(v)
}

impl XfadsModel {
    /// Loads a model file: latentloop's own layout, or an XFADS checkpoint's parameter names
    /// (see [`xfads_names`]).
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let f = ModelFile::read(path)?;
        Self::from_model_file(&f).map_err(|m| Error::model(path, m))
    }

    pub fn from_model_file(f: &ModelFile) -> Result<Self, String> {
        if xfads_names::looks_like_xfads(f) {
            return Self::compile(&xfads_names::convert(f)?);
        }
        match card::read_kind(f)? {
            ModelKind::Xfads => Self::compile(f),
            other => Err(format!("this is a {other} model, not an xfads one")),
        }
    }

    /// Builds the compute form of a file in latentloop's layout.
    pub fn compile(f: &ModelFile) -> Result<Self, String> {
        let c = Card::read_meta(f)?;
        let (l, n) = (c.latents, c.channels);
        let dynamics = Dynamics::from_file(f, c.dynamics, l, c.hidden, c.rmsnorm, c.substeps)?;
        let readout = Readout::from_file(f, c.readout, l, c.readout_latents, n, c.dt)?;
        let observation = Observation::from_file(f, c.update, &readout, l, n, c.rank, c.encoder_hidden)?;
        let behavior = if c.behavior_dims > 0 {
            let dd = c.behavior_dims;
            Some(Behavior {
                d: f.get("behavior.d", &[dd, l], "behaviour readout D, D x L")?.to_vec(),
                bias: f.get("behavior.bias", &[dd], "behaviour bias, D")?.to_vec(),
            })
        } else {
            None
        };
        Ok(XfadsModel {
            q: positive_vector(f, "dynamics.log_q", l, "process noise, Q = softplus(log_q), L")?,
            q0: positive_vector(f, "init.log_q0", l, "initial variance, Q0 = softplus(log_q0), L")?,
            m0: f.get("init.m0", &[l], "initial mean, L")?.to_vec(),
            card: c,
            dynamics,
            observation,
            readout,
            behavior,
        })
    }

    pub fn latents(&self) -> usize {
        self.card.latents
    }
    pub fn channels(&self) -> usize {
        self.card.channels
    }
    pub fn rank(&self) -> usize {
        self.observation.rank()
    }
}
