//! Custom autodiff operations for training, in candle:
//! - [`DynOp`]: the dynamics f on many rows. Forward is the runtime's own
//!   `Dynamics::apply`; backward is `Dynamics::backward`. Fused because as a chain of candle
//!   ops the same work is allocation-bound (~0.4 s for one RK4 step on 32k rows).
//! - [`Cholesky`] and [`LowerInverse`]: batched r x r, which candle lacks, with their
//!   backward passes (Murray 2016 for the Cholesky). Both are tested against finite
//!   differences below.

use crate::math::chol;
use crate::model::dynamics::{param_specs, Dynamics};
use crate::model::DynamicsKind;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

fn contiguous<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let v = match s {
        CpuStorage::F32(v) => v,
        _ => bail!("latentloop training runs in f32"),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => bail!("custom op needs a contiguous input"),
    }
}

fn vec_of(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

/// Splits `rows` rows into two halves run on two threads (the machine's two cores).
fn halves<T: Send>(rows: usize, f: impl Fn(usize, usize) -> T + Sync) -> Vec<T> {
    if rows < 64 {
        return vec![f(0, rows)];
    }
    let mid = rows / 2;
    std::thread::scope(|s| {
        let h = s.spawn(|| f(mid, rows));
        let first = f(0, mid);
        vec![first, h.join().expect("dynamics worker")]
    })
}

/// The dynamics as a candle op on (rows x L) with the flat parameter vector `theta`
/// (the tensors of `param_specs`, concatenated in order).
#[derive(Clone, Debug)]
pub struct DynOp {
    pub kind: DynamicsKind,
    pub latents: usize,
    pub hidden: usize,
    pub rmsnorm: bool,
    pub substeps: usize,
}

impl DynOp {
    pub fn param_len(&self) -> usize {
        param_specs(self.kind, self.latents, self.hidden).iter().map(|(_, s, _)| s.iter().product::<usize>()).sum()
    }

    /// Compiles `theta` into the runtime's dynamics.
    pub fn dynamics(&self, theta: &[f32]) -> std::result::Result<Dynamics, String> {
        let specs = param_specs(self.kind, self.latents, self.hidden);
        let mut offsets = Vec::with_capacity(specs.len());
        let mut o = 0;
        for (_, s, _) in &specs {
            let n: usize = s.iter().product();
            offsets.push((o, n));
            o += n;
        }
        if o != theta.len() {
            return Err(format!("dynamics parameters: {} values, expected {o}", theta.len()));
        }
        Dynamics::from_params(self.kind, self.latents, self.hidden, self.rmsnorm, self.substeps, |name, _, _| {
            let i = specs.iter().position(|(n, _, _)| *n == name).expect("a spec name");
            Ok(&theta[offsets[i].0..offsets[i].0 + offsets[i].1])
        })
    }
}

impl CustomOp2 for DynOp {
    fn name(&self) -> &'static str {
        "latentloop_dynamics"
    }

    fn cpu_fwd(&self, zs: &CpuStorage, zl: &Layout, ts: &CpuStorage, tl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (z, theta) = (contiguous(zs, zl)?, contiguous(ts, tl)?);
        let l = self.latents;
        let rows = z.len() / l;
        let d = self.dynamics(theta).map_err(candle_core::Error::msg)?;
        let parts = halves(rows, |a, b| {
            let mut out = vec![0.0; (b - a) * l];
            d.apply(&z[a * l..b * l], &mut out, &mut d.scratch(b - a));
            out
        });
        Ok((CpuStorage::F32(parts.concat()), zl.shape().clone()))
    }

    fn bwd(
        &self,
        z: &Tensor,
        theta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let l = self.latents;
        let (zv, tv, gv) = (vec_of(z)?, vec_of(theta)?, vec_of(grad)?);
        let rows = zv.len() / l;
        let d = self.dynamics(&tv).map_err(candle_core::Error::msg)?;
        let parts = halves(rows, |a, b| d.backward(&zv[a * l..b * l], &gv[a * l..b * l], b - a));
        let mut dz = Vec::with_capacity(rows * l);
        let mut dtheta = vec![0.0f32; tv.len()];
        for (dzp, grads) in parts {
            dz.extend_from_slice(&dzp);
            for (d, g) in dtheta.iter_mut().zip(grads.iter().flatten()) {
                *d += g;
            }
        }
        Ok((
            Some(Tensor::from_vec(dz, z.shape(), z.device())?),
            Some(Tensor::from_vec(dtheta, theta.shape(), theta.device())?),
        ))
    }
}

/// (B, r, r) -> (B, r, r): dims of a batch of square matrices.
fn batch_dims(shape: &Shape) -> Result<(usize, usize)> {
    match shape.dims() {
        [b, r, c] if r == c => Ok((*b, *r)),
        d => bail!("expected (batch, r, r), got {d:?}"),
    }
}

/// Batched Cholesky of symmetric positive-definite (B, r, r) matrices (reads the lower
/// triangle); the gradient returned is the symmetric one, right for inputs built
/// symmetrically.
pub struct Cholesky;

impl CustomOp1 for Cholesky {
    fn name(&self) -> &'static str {
        "latentloop_batched_cholesky"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let a = contiguous(s, l)?;
        let (b, r) = batch_dims(l.shape())?;
        let mut out = a.to_vec();
        for (i, m) in out.chunks_exact_mut(r * r).enumerate() {
            if let Err(e) = chol::cholesky(m, r) {
                bail!("matrix {i} of {b} is not positive definite (row {}, pivot {})", e.row, e.pivot);
            }
        }
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // With P = Phi(L^T Gbar) (lower part, halved diagonal), S = L^-T P L^-1, the
        // gradient for symmetric perturbations is (S + S^T) / 2.
        let (b, r) = batch_dims(arg.shape())?;
        let (lv, gv) = (vec_of(res)?, vec_of(grad)?);
        let mut out = vec![0.0f32; b * r * r];
        let mut linv = vec![0.0; r * r];
        for k in 0..b {
            let (lm, gm) = (&lv[k * r * r..(k + 1) * r * r], &gv[k * r * r..(k + 1) * r * r]);
            let mut p = vec![0.0f32; r * r];
            for i in 0..r {
                for j in 0..=i {
                    let mut s = 0.0;
                    for q in 0..r {
                        s += lm[q * r + i] * gm[q * r + j];
                    }
                    p[i * r + j] = if i == j { 0.5 * s } else { s };
                }
            }
            chol::lower_inverse(lm, r, &mut linv);
            // S = L^-T P L^-1
            let mut t = vec![0.0f32; r * r];
            for i in 0..r {
                for j in 0..r {
                    t[i * r + j] = (0..r).map(|q| p[i * r + q] * linv[q * r + j]).sum();
                }
            }
            let o = &mut out[k * r * r..(k + 1) * r * r];
            for i in 0..r {
                for j in 0..r {
                    o[i * r + j] = (0..r).map(|q| linv[q * r + i] * t[q * r + j]).sum();
                }
            }
            for i in 0..r {
                for j in 0..i {
                    let s = 0.5 * (o[i * r + j] + o[j * r + i]);
                    o[i * r + j] = s;
                    o[j * r + i] = s;
                }
            }
        }
        Ok(Some(Tensor::from_vec(out, arg.shape(), arg.device())?))
    }
}

/// Batched inverse of lower-triangular (B, r, r) matrices.
pub struct LowerInverse;

impl CustomOp1 for LowerInverse {
    fn name(&self) -> &'static str {
        "latentloop_batched_lower_inverse"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let a = contiguous(s, l)?;
        let (b, r) = batch_dims(l.shape())?;
        let mut out = vec![0.0f32; b * r * r];
        for (m, o) in a.chunks_exact(r * r).zip(out.chunks_exact_mut(r * r)) {
            chol::lower_inverse(m, r, o);
        }
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // Y = L^-1: dY = -Y dL Y, so Lbar = -tril(Y^T Ybar Y^T).
        let y = res;
        let yt = y.transpose(1, 2)?;
        let full = yt.matmul(&grad.contiguous()?)?.matmul(&yt)?.neg()?;
        let (_, r) = batch_dims(arg.shape())?;
        let mask = Tensor::tril2(r, candle_core::DType::F32, arg.device())?;
        Ok(Some(full.broadcast_mul(&mask)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn fd_check(f: &dyn Fn(&Tensor) -> Result<Tensor>, x0: Vec<f32>, shape: &[usize], symmetric: bool, tol: f64) {
        let dev = Device::Cpu;
        let x = Var::from_vec(x0.clone(), shape, &dev).unwrap();
        let loss = f(x.as_tensor()).unwrap();
        let g = vec_of(loss.backward().unwrap().get(&x).unwrap()).unwrap();
        let eval = |v: &[f32]| -> f64 {
            f(&Tensor::from_vec(v.to_vec(), shape, &dev).unwrap()).unwrap().to_scalar::<f32>().unwrap() as f64
        };
        let r = shape[2];
        let eps = 1e-3f32;
        for idx in 0..x0.len() {
            let (i, j) = ((idx % (r * r)) / r, idx % r);
            if symmetric && j > i {
                continue;
            }
            let mut p = x0.clone();
            let mut m = x0.clone();
            p[idx] += eps;
            m[idx] -= eps;
            let mut want = (eval(&p) - eval(&m)) / (2.0 * eps as f64);
            let mut got = g[idx] as f64;
            if symmetric && i != j {
                // Perturb both halves of a symmetric pair: the gradient is their sum.
                let mirror = idx - (i * r + j) + (j * r + i);
                p[mirror] += eps;
                m[mirror] -= eps;
                want = (eval(&p) - eval(&m)) / (2.0 * eps as f64);
                got += g[mirror] as f64;
            }
            assert!(
                (got - want).abs() <= tol * (1.0 + want.abs()),
                "index {idx}: analytic {got} vs finite difference {want}"
            );
        }
    }

    fn spd_batch(b: usize, r: usize) -> Vec<f32> {
        let mut v = vec![0.0f32; b * r * r];
        for k in 0..b {
            for i in 0..r {
                for j in 0..r {
                    let x: f32 = (0..r)
                        .map(|q| (((k + i * 3 + q * 5) % 7) as f32 - 3.0) * (((k + j * 3 + q * 5) % 7) as f32 - 3.0))
                        .sum();
                    v[k * r * r + i * r + j] = x / 9.0 + if i == j { 1.5 } else { 0.0 };
                }
            }
        }
        v
    }

    #[test]
    fn cholesky_gradient_matches_finite_differences() {
        let w: Vec<f32> = (0..2 * 16).map(|i| ((i * 7 % 5) as f32 - 2.0) / 2.0).collect();
        let wt = Tensor::from_vec(w, (2, 4, 4), &Device::Cpu).unwrap();
        let f = |a: &Tensor| (a.apply_op1(Cholesky)? * &wt)?.sum_all();
        fd_check(&f, spd_batch(2, 4), &[2, 4, 4], true, 2e-2);
    }

    #[test]
    fn lower_inverse_and_logdet_gradients_match_finite_differences() {
        // l = sum(W * L^-1) + sum log diag(L) over Cholesky factors: the trainer's use.
        let w: Vec<f32> = (0..2 * 9).map(|i| ((i * 5 % 7) as f32 - 3.0) / 3.0).collect();
        let wt = Tensor::from_vec(w, (2, 3, 3), &Device::Cpu).unwrap();
        let eye = Tensor::eye(3, candle_core::DType::F32, &Device::Cpu).unwrap();
        let f = |a: &Tensor| {
            let l = a.apply_op1(Cholesky)?;
            let y = l.apply_op1(LowerInverse)?;
            let logdiag = l.broadcast_mul(&eye)?.sum(2)?.log()?.sum_all()?;
            (y * &wt)?.sum_all()? + logdiag
        };
        fd_check(&f, spd_batch(2, 3), &[2, 3, 3], true, 2e-2);
    }

    #[test]
    fn dynamics_op_is_the_runtime_dynamics_and_its_gradient_is_backward() {
        let op = DynOp { kind: DynamicsKind::Node, latents: 3, hidden: 8, rmsnorm: false, substeps: 2 };
        let theta: Vec<f32> = (0..op.param_len()).map(|i| ((i * 7 % 13) as f32 - 6.0) / 20.0).collect();
        let rows = 130; // both halves of the two-thread split
        let z: Vec<f32> = (0..rows * 3).map(|i| ((i * 3 % 11) as f32 - 5.0) / 5.0).collect();
        let dev = Device::Cpu;
        let zt = Var::from_vec(z.clone(), (rows, 3), &dev).unwrap();
        let tt = Var::from_vec(theta.clone(), op.param_len(), &dev).unwrap();
        let out = zt.as_tensor().apply_op2(tt.as_tensor(), op.clone()).unwrap();
        let d = op.dynamics(&theta).unwrap();
        let mut want = vec![0.0; rows * 3];
        d.apply(&z, &mut want, &mut d.scratch(rows));
        assert_eq!(vec_of(&out).unwrap(), want);
        let grads = out.sum_all().unwrap().backward().unwrap();
        let (dz, dth) = d.backward(&z, &vec![1.0; rows * 3], rows);
        let got_dz = vec_of(grads.get(&zt).unwrap()).unwrap();
        assert!(got_dz.iter().zip(&dz).all(|(a, b)| (a - b).abs() < 1e-5));
        let got_th = vec_of(grads.get(&tt).unwrap()).unwrap();
        let flat: Vec<f32> = dth.concat();
        assert!(got_th.iter().zip(&flat).all(|(a, b)| (a - b).abs() < 1e-3 * (1.0 + b.abs())));
    }
}
