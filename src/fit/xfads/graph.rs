//! The filter step as a differentiable graph over a batch of bins: the same algebra as
//! `Filter::step` (src/filter/mod.rs), with the same Philox noise, so at the same
//! parameters and previous samples it computes what the runtime computes. Used by both
//! training modes: `local` feeds it detached samples of t-1 for many t at once; `bptt`
//! chains it through time.

use super::ops::{Cholesky, DynOp, LowerInverse};
use crate::math::philox::{Normals, Purpose};
use crate::model::dynamics::param_specs;
use crate::model::{Card, ModelFile, Tensor as FileTensor};
use candle_core::{DType, Device, Result, Tensor, Var, D};

/// The trained parameters. m0 and Q0 stay at their initial values: they only shape the
/// first bin of a session.
pub struct Params {
    pub theta: Var,
    pub log_q: Var,
    pub enc_w1: Var,
    pub enc_b1: Var,
    pub enc_w2: Var,
    pub enc_b2: Var,
    pub c: Var,
    pub b: Var,
}

impl Params {
    pub fn vars(&self) -> [&Var; 8] {
        [&self.theta, &self.log_q, &self.enc_w1, &self.enc_b1, &self.enc_w2, &self.enc_b2, &self.c, &self.b]
    }

    /// Reads the trainable tensors of a model file (latentloop layout).
    pub fn from_file(f: &ModelFile, card: &Card, dev: &Device) -> std::result::Result<Self, String> {
        let (l, n, r, he, lr) = (card.latents, card.channels, card.rank, card.encoder_hidden, card.readout_latents);
        let var = |name: &str, shape: &[usize]| -> std::result::Result<Var, String> {
            let data = f.get(name, shape, "trainable parameter")?;
            Var::from_vec(data.to_vec(), shape, dev).map_err(|e| e.to_string())
        };
        let mut theta = Vec::new();
        for (name, shape, what) in param_specs(card.dynamics, l, card.hidden) {
            theta.extend_from_slice(f.get(name, &shape, what)?);
        }
        let len = theta.len();
        Ok(Params {
            theta: Var::from_vec(theta, len, dev).map_err(|e| e.to_string())?,
            log_q: var("dynamics.log_q", &[l])?,
            enc_w1: var("encoder.w1", &[he, n])?,
            enc_b1: var("encoder.b1", &[he])?,
            enc_w2: var("encoder.w2", &[(r + 1) * l, he])?,
            enc_b2: var("encoder.b2", &[(r + 1) * l])?,
            c: var("readout.c", &[n, lr])?,
            b: var("readout.b", &[n])?,
        })
    }

    /// Writes the parameters into `base` (which holds m0, Q0 and the card).
    pub fn to_file(&self, base: &ModelFile, card: &Card) -> Result<ModelFile> {
        let mut f = base.clone();
        let flat = |v: &Var| v.as_tensor().flatten_all()?.to_vec1::<f32>();
        let theta = flat(&self.theta)?;
        let mut o = 0;
        for (name, shape, _) in param_specs(card.dynamics, card.latents, card.hidden) {
            let len: usize = shape.iter().product();
            f.insert(name, FileTensor::new(shape, theta[o..o + len].to_vec()));
            o += len;
        }
        for (name, v) in [
            ("dynamics.log_q", &self.log_q),
            ("encoder.w1", &self.enc_w1),
            ("encoder.b1", &self.enc_b1),
            ("encoder.w2", &self.enc_w2),
            ("encoder.b2", &self.enc_b2),
            ("readout.c", &self.c),
            ("readout.b", &self.b),
        ] {
            f.insert(name, FileTensor::new(v.as_tensor().dims().to_vec(), flat(v)?));
        }
        Ok(f)
    }
}

/// The normals of steps `ts` (one batch row per step), drawn exactly as the runtime draws them.
pub struct Noise {
    pub w1: Tensor,
    pub w2: Tensor,
    pub wr: Tensor,
}

impl Noise {
    pub fn draw(normals: &Normals, ts: &[u64], s: usize, l: usize, r: usize, dev: &Device) -> Result<Noise> {
        let b = ts.len();
        let (mut w1, mut w2, mut wr) = (vec![0.0; b * s * s], vec![0.0; b * s * l], vec![0.0; b * s * r]);
        for (i, &t) in ts.iter().enumerate() {
            normals.fill_rows(t, Purpose::PredictMix, &mut w1[i * s * s..(i + 1) * s * s], s);
            normals.fill_rows(t, Purpose::PredictDiag, &mut w2[i * s * l..(i + 1) * s * l], l);
            normals.fill_rows(t, Purpose::Update, &mut wr[i * s * r..(i + 1) * s * r], r);
        }
        Ok(Noise {
            w1: Tensor::from_vec(w1, (b, s, s), dev)?,
            w2: Tensor::from_vec(w2, (b, s, l), dev)?,
            wr: Tensor::from_vec(wr, (b, s, r), dev)?,
        })
    }
}

/// What one step gives, per batch row.
pub struct StepOut {
    /// Posterior draws z_t (B, S, L).
    pub z: Tensor,
    /// Filtered means m_t (B, L).
    pub mf: Tensor,
    /// KL(q_t || predictive) (B).
    pub kl: Tensor,
    /// (1/S) sum_s log p(y_t | z_s), without the log y! constant (B).
    pub ell: Tensor,
}

/// softplus, PyTorch's (beta 1), in a form that does not overflow for large inputs.
fn softplus(x: &Tensor) -> Result<Tensor> {
    // log(1 + e^x) = max(x, 0) + log(1 + e^-|x|)
    x.relu()? + x.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?
}

/// One filter step for a batch: `zprev` (B, S, L) samples of q_{t-1}, `y` (B, N) counts.
pub fn step(p: &Params, op: &DynOp, card: &Card, zprev: &Tensor, y: &Tensor, noise: &Noise) -> Result<StepOut> {
    let (b, s, l) = zprev.dims3()?;
    let (r, lr) = (card.rank, card.readout_latents);
    let dev = zprev.device();
    let f = zprev.reshape((b * s, l))?.apply_op2(p.theta.as_tensor(), op.clone())?.reshape((b, s, l))?;
    let mp = f.mean_keepdim(1)?; // (B, 1, L)
    let mt = (f.broadcast_sub(&mp)? * (1.0 / (s as f64).sqrt()))?; // M^T (B, S, L)
    let q = softplus(p.log_q.as_tensor())?;
    let sq = q.sqrt()?;
    let e = (noise.w1.matmul(&mt)? + noise.w2.broadcast_mul(&sq)?)?; // predictive draws

    let hid = y.matmul(&p.enc_w1.as_tensor().t()?)?.broadcast_add(p.enc_b1.as_tensor())?.silu()?;
    let out = hid.matmul(&p.enc_w2.as_tensor().t()?)?.broadcast_add(p.enc_b2.as_tensor())?;
    let k = out.narrow(1, 0, l)?; // (B, L)
    let kmat = out.narrow(1, l, l * r)?.reshape((b, l, r))?; // (B, L, r)

    let mtk = mt.matmul(&kmat)?; // (B, S, r)
    let ksq = kmat.broadcast_mul(&sq.reshape((1, l, 1))?)?;
    let eye = Tensor::eye(r, DType::F32, dev)?;
    let a = (mtk.t()?.matmul(&mtk)? + ksq.t()?.matmul(&ksq)?)?.broadcast_add(&eye)?; // (B, r, r)
    let ktpp = (mtk.t()?.matmul(&mt)? + kmat.broadcast_mul(&q.reshape((1, l, 1))?)?.t()?)?; // K^T P_p (B, r, L)
    let u = mt.matmul(&k.unsqueeze(2)?)?; // M^T k (B, S, 1)
    let ph = ((mt.t()?.matmul(&u)?.squeeze(2)? + mp.squeeze(1)?)? + k.broadcast_mul(&q)?)?; // P_p h
    let lch = a.apply_op1(Cholesky)?;
    let linv = lch.apply_op1(LowerInverse)?;
    let ainv = linv.t()?.matmul(&linv)?;
    let c = ainv.matmul(&kmat.t()?.matmul(&ph.unsqueeze(2)?)?)?; // (B, r, 1)
    let mf = (&ph - ktpp.t()?.matmul(&c)?.squeeze(2)?)?;
    let g = (&k - kmat.matmul(&c)?.squeeze(2)?)?;
    let v = (e.matmul(&kmat)? + &noise.wr)?;
    let z = (mf.unsqueeze(1)?.broadcast_add(&e)? - v.matmul(&ainv)?.matmul(&ktpp)?)?;

    let logdet = (lch.broadcast_mul(&eye)?.sum(D::Minus1)?.log()?.sum(1)? * 2.0)?;
    let tr = linv.sqr()?.sum((1, 2))?;
    let quad = ((&mf - mp.squeeze(1)?)? * &g)?.sum(1)?;
    let kl = (((tr + logdet)? + quad)?.affine(0.5, -0.5 * r as f64))?;

    let eta = z
        .narrow(2, 0, lr)?
        .broadcast_matmul(&p.c.as_tensor().t()?)?
        .broadcast_add(p.b.as_tensor())?
        .affine(1.0, (card.dt as f64).ln())?; // (B, S, N)
    let ell = (y.unsqueeze(1)?.broadcast_mul(&eta)? - eta.exp()?)?.sum(2)?.mean(1)?;
    Ok(StepOut { z, mf, kl, ell })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::{Filter, FilterOptions};
    use crate::model::{build, DynamicsKind, ReadoutKind, UpdateKind, XfadsModel};
    use std::sync::Arc;

    /// At the same parameters, previous samples and noise, the graph's step is the runtime
    /// filter's step: samples, filtered mean and KL agree to float rounding.
    #[test]
    fn graph_step_is_the_runtime_step() {
        for dynamics in [DynamicsKind::Node, DynamicsKind::Gru] {
            let card = Card {
                latents: 3,
                channels: 7,
                dt: 0.02,
                samples: 8,
                dynamics,
                hidden: 6,
                rmsnorm: false,
                substeps: 2,
                update: UpdateKind::Encoder,
                rank: 2,
                encoder_hidden: 5,
                readout: ReadoutKind::Poisson,
                readout_latents: 2,
                behavior_dims: 0,
            };
            let file = build::random(&card, 4, 0.1, 0.5);
            let model = Arc::new(XfadsModel::compile(&file).unwrap());
            let seed = 9;
            let mut f = Filter::new(model, FilterOptions { samples: None, seed });
            let ys: Vec<Vec<f32>> = (0..6).map(|t| (0..7).map(|j| ((t * 3 + j) % 4) as f32).collect()).collect();
            for y in &ys[..4] {
                f.step(Some(y)).unwrap();
            }
            let zprev = f.sample_matrix().to_vec();
            let t = f.step_index();
            let info = f.step(Some(&ys[4])).unwrap();

            let dev = Device::Cpu;
            let p = Params::from_file(&file, &card, &dev).unwrap();
            let op = super::super::ops::DynOp { kind: dynamics, latents: 3, hidden: 6, rmsnorm: false, substeps: 2 };
            let noise = Noise::draw(&Normals::new(seed), &[t], 8, 3, 2, &dev).unwrap();
            let zt = Tensor::from_vec(zprev, (1, 8, 3), &dev).unwrap();
            let yt = Tensor::from_vec(ys[4].clone(), (1, 7), &dev).unwrap();
            let out = step(&p, &op, &card, &zt, &yt, &noise).unwrap();
            let close = |a: &[f32], b: &[f32], what: &str| {
                for (x, y) in a.iter().zip(b) {
                    assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{dynamics} {what}: {x} vs {y}");
                }
            };
            close(&out.z.flatten_all().unwrap().to_vec1::<f32>().unwrap(), f.sample_matrix(), "samples");
            close(&out.mf.flatten_all().unwrap().to_vec1::<f32>().unwrap(), f.mean(), "filtered mean");
            close(&out.kl.to_vec1::<f32>().unwrap(), &[info.kl], "KL");
        }
    }
}
