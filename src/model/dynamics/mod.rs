//! The latent dynamics f, evaluated on all S samples at once (ALGORITHM.md section 2).
//!
//! Weights are stored in files in PyTorch's (out x in) layout and kept here transposed
//! (in x out), so that samples-as-rows times weights is a plain row-major product, and also
//! packed into the GEMM's column panels (`math::gemm::Weights`), which the products read.

mod grad;

use super::card::DynamicsKind;
use super::file::ModelFile;
use super::observation::transpose;
use crate::math::fast;
use crate::math::gemm::{gemm_weights, MatRef, Weights};

/// Weightless RMSNorm epsilon (XFADS).
pub(crate) const RMS_EPS: f32 = 1e-5;

#[derive(Clone, Debug)]
enum Net {
    /// f(z) = A z + a.
    Linear { at: Weights, a: Vec<f32> },
    /// g(z) = W2 tanh(W1 z + b1) + b2; mlp: f = z + g(z); node: f = RK4 flow of g.
    Mlp { w1t: Weights, b1: Vec<f32>, w2t: Weights, b2: Vec<f32> },
    /// XFADS GRU cell with no input; the r and u biases are pre-summed (b_i + b_h).
    Gru {
        wzh_t: Weights,
        bzh: Vec<f32>,
        whh_t: Weights,
        b_r: Vec<f32>,
        b_u: Vec<f32>,
        b_in: Vec<f32>,
        b_hn: Vec<f32>,
        wout_t: Weights,
        bout: Vec<f32>,
    },
}

#[derive(Clone, Debug)]
pub struct Dynamics {
    pub kind: DynamicsKind,
    pub latents: usize,
    pub hidden: usize,
    pub rmsnorm: bool,
    pub substeps: usize,
    net: Net,
}

/// The tensors of each dynamics kind, in a fixed order: (name, shape, meaning). The file
/// loader, the trainer's parameter vector and the gradients all use this order.
pub fn param_specs(kind: DynamicsKind, l: usize, h: usize) -> Vec<(&'static str, Vec<usize>, &'static str)> {
    match kind {
        DynamicsKind::Linear => vec![("dynamics.a", vec![l, l], "A, L x L"), ("dynamics.b", vec![l], "a, L")],
        DynamicsKind::Mlp | DynamicsKind::Node => vec![
            ("dynamics.w1", vec![h, l], "W1, H x L"),
            ("dynamics.b1", vec![h], "b1, H"),
            ("dynamics.w2", vec![l, h], "W2, L x H"),
            ("dynamics.b2", vec![l], "b2, L"),
        ],
        DynamicsKind::Gru => vec![
            ("dynamics.w_zh", vec![h, l], "W_zh, H x L"),
            ("dynamics.b_zh", vec![h], "b_zh, H"),
            ("dynamics.w_hh", vec![3 * h, h], "W_hh [r,u,n], 3H x H"),
            ("dynamics.b_hh", vec![3 * h], "GRU hidden biases [r,u,n], 3H"),
            ("dynamics.b_ih", vec![3 * h], "GRU input biases [r,u,n], 3H"),
            ("dynamics.w_out", vec![l, h], "W_out, L x H"),
            ("dynamics.b_out", vec![l], "b_out, L"),
        ],
    }
}

/// Preallocated buffers for `apply` at a fixed number of samples.
#[derive(Clone, Debug)]
pub struct Scratch {
    samples: usize,
    hid: Vec<f32>,
    gates: Vec<f32>,
    tmp: Vec<f32>,
    kc: Vec<f32>,
    acc: Vec<f32>,
}

/// Adds `b` to every row of the row-major `rows x b.len()` matrix `x`.
pub fn add_row(x: &mut [f32], b: &[f32]) {
    for row in x.chunks_exact_mut(b.len()) {
        for (v, bi) in row.iter_mut().zip(b) {
            *v += bi;
        }
    }
}

impl Dynamics {
    /// Compiles the `dynamics.*` tensors of `f`.
    pub fn from_file(
        f: &ModelFile,
        kind: DynamicsKind,
        l: usize,
        h: usize,
        rmsnorm: bool,
        substeps: usize,
    ) -> Result<Self, String> {
        Self::from_params(kind, l, h, rmsnorm, substeps, |n, shape, what| f.get(n, shape, what))
    }

    /// Compiles the tensors of [`param_specs`] from any source (a file, or the trainer's
    /// parameter vector).
    pub fn from_params<'a>(
        kind: DynamicsKind,
        l: usize,
        h: usize,
        rmsnorm: bool,
        substeps: usize,
        get: impl Fn(&str, &[usize], &str) -> Result<&'a [f32], String>,
    ) -> Result<Self, String> {
        let specs = param_specs(kind, l, h);
        let p = |i: usize| -> Result<&'a [f32], String> { get(specs[i].0, &specs[i].1, specs[i].2) };
        let net = match kind {
            DynamicsKind::Linear => Net::Linear { at: Weights::new(transpose(p(0)?, l, l), l, l), a: p(1)?.to_vec() },
            DynamicsKind::Mlp | DynamicsKind::Node => Net::Mlp {
                w1t: Weights::new(transpose(p(0)?, h, l), l, h),
                b1: p(1)?.to_vec(),
                w2t: Weights::new(transpose(p(2)?, l, h), h, l),
                b2: p(3)?.to_vec(),
            },
            DynamicsKind::Gru => {
                let (b_ih, b_hh) = (p(4)?, p(3)?);
                let sum = |g: usize| (0..h).map(|i| b_ih[g * h + i] + b_hh[g * h + i]).collect();
                Net::Gru {
                    wzh_t: Weights::new(transpose(p(0)?, h, l), l, h),
                    bzh: p(1)?.to_vec(),
                    whh_t: Weights::new(transpose(p(2)?, 3 * h, h), h, 3 * h),
                    b_r: sum(0),
                    b_u: sum(1),
                    b_in: b_ih[2 * h..].to_vec(),
                    b_hn: b_hh[2 * h..].to_vec(),
                    wout_t: Weights::new(transpose(p(5)?, l, h), h, l),
                    bout: p(6)?.to_vec(),
                }
            }
        };
        Ok(Dynamics { kind, latents: l, hidden: h, rmsnorm, substeps: substeps.max(1), net })
    }

    pub fn scratch(&self, samples: usize) -> Scratch {
        let (s, l, h) = (samples, self.latents, self.hidden);
        let node = self.kind == DynamicsKind::Node;
        Scratch {
            samples,
            hid: vec![0.0; s * h],
            gates: vec![0.0; if self.kind == DynamicsKind::Gru { s * 3 * h } else { 0 }],
            tmp: vec![0.0; if node { s * l } else { 0 }],
            kc: vec![0.0; if node { s * l } else { 0 }],
            acc: vec![0.0; if node { s * l } else { 0 }],
        }
    }

    /// out = f(z) row-wise, z and out `S x L` with S = the scratch's sample count.
    pub fn apply(&self, z: &[f32], out: &mut [f32], scr: &mut Scratch) {
        let (s, l, h) = (scr.samples, self.latents, self.hidden);
        let (z, out) = (&z[..s * l], &mut out[..s * l]);
        match &self.net {
            Net::Linear { at, a } => {
                gemm_weights(out, l, MatRef::new(z, s, l), at, 1.0, false);
                add_row(out, a);
            }
            Net::Mlp { w1t, b1, w2t, b2 } => {
                if self.kind == DynamicsKind::Mlp {
                    mlp_field(z, out, true, s, l, h, w1t, b1, w2t, b2, &mut scr.hid);
                } else {
                    self.rk4(z, out, scr, w1t, b1, w2t, b2);
                }
            }
            Net::Gru { wzh_t, bzh, whh_t, b_r, b_u, b_in, b_hn, wout_t, bout } => {
                let hin = &mut scr.hid;
                gemm_weights(hin, h, MatRef::new(z, s, l), wzh_t, 1.0, false);
                add_row(hin, bzh);
                let g = &mut scr.gates;
                gemm_weights(g, 3 * h, MatRef::new(hin, s, h), whh_t, 1.0, false);
                gru_gates(hin, g, b_r, b_u, b_in, b_hn);
                gemm_weights(out, l, MatRef::new(hin, s, h), wout_t, 1.0, false);
                add_row(out, bout);
            }
        }
        if self.rmsnorm {
            for row in out.chunks_exact_mut(l) {
                let ms = row.iter().map(|v| v * v).sum::<f32>() / l as f32;
                let inv = 1.0 / (ms + RMS_EPS).sqrt();
                row.iter_mut().for_each(|v| *v *= inv);
            }
        }
    }

    /// Fixed-step RK4 of dz/dt = g(z) over one bin (time unit: one bin) in `substeps` steps.
    #[allow(clippy::too_many_arguments)]
    fn rk4(&self, z: &[f32], out: &mut [f32], scr: &mut Scratch, w1t: &Weights, b1: &[f32], w2t: &Weights, b2: &[f32]) {
        let (s, l, h) = (scr.samples, self.latents, self.hidden);
        let dt = 1.0 / self.substeps as f32;
        out.copy_from_slice(z);
        let Scratch { hid, tmp, kc, acc, .. } = scr;
        for _ in 0..self.substeps {
            mlp_field(out, acc, false, s, l, h, w1t, b1, w2t, b2, hid); // k1
            for i in 0..s * l {
                tmp[i] = (0.5 * dt).mul_add(acc[i], out[i]);
            }
            // k2 then k3; acc collects k1 + 2 k2 + 2 k3, tmp the next stage's point.
            for c in [0.5 * dt, dt] {
                mlp_field(tmp, kc, false, s, l, h, w1t, b1, w2t, b2, hid);
                for i in 0..s * l {
                    acc[i] = 2.0f32.mul_add(kc[i], acc[i]);
                    tmp[i] = c.mul_add(kc[i], out[i]);
                }
            }
            mlp_field(tmp, kc, false, s, l, h, w1t, b1, w2t, b2, hid); // k4
            for i in 0..s * l {
                out[i] = (dt / 6.0).mul_add(acc[i] + kc[i], out[i]);
            }
        }
    }

    /// The compiled weights in compute layout (transposed to in x out; the GRU's r and u
    /// biases summed), by their field names: what the GPU backend uploads.
    pub fn compiled_tensors(&self) -> Vec<(&'static str, &[f32])> {
        match &self.net {
            Net::Linear { at, a } => vec![("at", at), ("a", a)],
            Net::Mlp { w1t, b1, w2t, b2 } => vec![("w1t", w1t), ("b1", b1), ("w2t", w2t), ("b2", b2)],
            Net::Gru { wzh_t, bzh, whh_t, b_r, b_u, b_in, b_hn, wout_t, bout } => vec![
                ("wzh_t", wzh_t),
                ("bzh", bzh),
                ("whh_t", whh_t),
                ("b_r", b_r),
                ("b_u", b_u),
                ("b_in", b_in),
                ("b_hn", b_hn),
                ("wout_t", wout_t),
                ("bout", bout),
            ],
        }
    }

    /// One line for logs and bench labels.
    pub fn describe(&self) -> String {
        let rms = if self.rmsnorm { " + RMSNorm" } else { "" };
        match self.kind {
            DynamicsKind::Node => format!("node L={} H={} RK4 x{}{rms}", self.latents, self.hidden, self.substeps),
            k => format!("{k} L={} H={}{rms}", self.latents, self.hidden),
        }
    }
}

crate::math::avx512_twin! {
    /// The GRU cell given h and G = h W_hh^T (rows of 3H): h' = (1 - u) n + u h, in place.
    fn gru_gates(h: &mut [f32], g: &[f32], b_r: &[f32], b_u: &[f32], b_in: &[f32], b_hn: &[f32]) {
        let hw = b_r.len();
        for (hrow, grow) in h.chunks_exact_mut(hw).zip(g.chunks_exact(3 * hw)) {
            let (gr, rest) = grow.split_at(hw);
            let (gu, gn) = rest.split_at(hw);
            for i in 0..hw {
                let r = fast::sigmoid(b_r[i] + gr[i]);
                let u = fast::sigmoid(b_u[i] + gu[i]);
                let n = fast::tanh(r.mul_add(gn[i] + b_hn[i], b_in[i]));
                hrow[i] = u.mul_add(hrow[i] - n, n);
            }
        }
    }
}

/// out = g(z) = W2 tanh(W1 z + b1) + b2 for all S rows, or z + g(z) when `residual` (added
/// in the pass that adds b2, rather than copied in first: (z + W2 t) + b2 either way).
#[allow(clippy::too_many_arguments)]
fn mlp_field(
    z: &[f32],
    out: &mut [f32],
    residual: bool,
    s: usize,
    l: usize,
    h: usize,
    w1t: &Weights,
    b1: &[f32],
    w2t: &Weights,
    b2: &[f32],
    hid: &mut [f32],
) {
    gemm_weights(hid, h, MatRef::new(z, s, l), w1t, 1.0, false);
    fast::tanh_bias_rows(hid, b1);
    gemm_weights(out, l, MatRef::new(hid, s, h), w2t, 1.0, false);
    if residual {
        for (orow, zrow) in out.chunks_exact_mut(l).zip(z.chunks_exact(l)) {
            for ((o, zi), bi) in orow.iter_mut().zip(zrow).zip(b2) {
                *o = (*zi + *o) + bi;
            }
        }
    } else {
        add_row(out, b2);
    }
}
