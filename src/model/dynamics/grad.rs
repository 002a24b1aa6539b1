//! Reverse mode through the dynamics, for training. It recomputes the forward pass of
//! `Dynamics::apply` with the same kernels (so the trainer differentiates exactly what the
//! runtime filter runs), keeps the intermediates, and returns the gradients in the order and
//! layout of `param_specs` (file layout, out x in). Allocates: training only.

use super::{transpose, Dynamics, Net, RMS_EPS};
use crate::math::fast;
use crate::math::gemm::{gemm, MatRef};
use crate::model::card::DynamicsKind;

/// C (m x n) (+)= A B with row-major A (m x k) or its transpose, and row-major B (k x n).
fn mm(c: &mut [f32], a: MatRef, b: MatRef, acc: bool) {
    let n = b.cols;
    gemm(c, n, a, b, 1.0, acc);
}

fn m<'a>(d: &'a [f32], r: usize, c: usize) -> MatRef<'a> {
    MatRef::new(d, r, c)
}

/// out[j] += sum over rows of x[., j].
fn colsum(x: &[f32], cols: usize, out: &mut [f32]) {
    for row in x.chunks_exact(cols) {
        out.iter_mut().zip(row).for_each(|(o, v)| *o += v);
    }
}

/// The MLP field g(x) = tanh(x W1^T + b1) W2^T + b2 with its hidden activations kept.
struct Field<'a> {
    l: usize,
    h: usize,
    w1t: &'a [f32],
    b1: &'a [f32],
    w2t: &'a [f32],
    b2: &'a [f32],
    /// File-layout W1 (H x L) and W2 (L x H) for the backward products.
    w1: Vec<f32>,
    w2: Vec<f32>,
}

impl Field<'_> {
    /// out = g(x); returns the hidden activations tanh(x W1^T + b1).
    fn forward(&self, x: &[f32], rows: usize, out: &mut [f32]) -> Vec<f32> {
        let (l, h) = (self.l, self.h);
        let mut hid = vec![0.0; rows * h];
        gemm(&mut hid, h, m(x, rows, l), m(self.w1t, l, h), 1.0, false);
        fast::tanh_bias_rows(&mut hid, self.b1);
        gemm(out, l, m(&hid, rows, h), m(self.w2t, h, l), 1.0, false);
        super::add_row(out, self.b2);
        hid
    }

    /// Given dg = dl/dg(x): accumulates dW1, db1, dW2, db2 into `grads` (specs order) and
    /// returns dl/dx.
    fn backward(&self, x: &[f32], hid: &[f32], dg: &[f32], rows: usize, grads: &mut [Vec<f32>]) -> Vec<f32> {
        let (l, h) = (self.l, self.h);
        mm(&mut grads[2], m(dg, rows, l).t(), m(hid, rows, h), true);
        colsum(dg, l, &mut grads[3]);
        let mut dpre = vec![0.0; rows * h];
        mm(&mut dpre, m(dg, rows, l), m(&self.w2, l, h), false);
        for (d, hv) in dpre.iter_mut().zip(hid) {
            *d *= 1.0 - hv * hv;
        }
        mm(&mut grads[0], m(&dpre, rows, h).t(), m(x, rows, l), true);
        colsum(&dpre, h, &mut grads[1]);
        let mut dx = vec![0.0; rows * l];
        mm(&mut dx, m(&dpre, rows, h), m(&self.w1, h, l), false);
        dx
    }
}

impl Dynamics {
    /// Reverse mode through [`Dynamics::apply`] on `rows` rows of `z`: given
    /// `df` = dl/df(z), returns dl/dz and dl/dtheta (one vector per `param_specs` entry).
    pub fn backward(&self, z: &[f32], df: &[f32], rows: usize) -> (Vec<f32>, Vec<Vec<f32>>) {
        let (l, h) = (self.latents, self.hidden);
        let mut grads: Vec<Vec<f32>> =
            super::param_specs(self.kind, l, h).iter().map(|(_, s, _)| vec![0.0; s.iter().product()]).collect();
        let z = &z[..rows * l];
        let mut df = df[..rows * l].to_vec();
        if self.rmsnorm {
            // y = x / rms(x): dx = (dy - y mean(dy y)) / rms, with x the un-normed output.
            let x = self.core_output(z, rows);
            for (xr, dr) in x.chunks_exact(l).zip(df.chunks_exact_mut(l)) {
                let rms = (xr.iter().map(|v| v * v).sum::<f32>() / l as f32 + RMS_EPS).sqrt();
                let dot: f32 = xr.iter().zip(dr.iter()).map(|(a, b)| a * b).sum::<f32>() / rms;
                let mean_dy_y = dot / l as f32;
                for (d, xv) in dr.iter_mut().zip(xr) {
                    *d = (*d - xv / rms * mean_dy_y) / rms;
                }
            }
        }
        let dz = match &self.net {
            Net::Linear { at, .. } => {
                // f = z A^T + a: dA = df^T z, da = sum df, dz = df A.
                mm(&mut grads[0], m(&df, rows, l).t(), m(z, rows, l), true);
                colsum(&df, l, &mut grads[1]);
                let a = transpose(at, l, l);
                let mut dz = vec![0.0; rows * l];
                mm(&mut dz, m(&df, rows, l), m(&a, l, l), false);
                dz
            }
            Net::Mlp { w1t, b1, w2t, b2 } => {
                let field = Field { l, h, w1t, b1, w2t, b2, w1: transpose(w1t, l, h), w2: transpose(w2t, h, l) };
                if self.kind == DynamicsKind::Mlp {
                    // f = z + g(z).
                    let mut g = vec![0.0; rows * l];
                    let hid = field.forward(z, rows, &mut g);
                    let mut dz = field.backward(z, &hid, &df, rows, &mut grads);
                    dz.iter_mut().zip(&df).for_each(|(a, b)| *a += b);
                    dz
                } else {
                    self.rk4_backward(&field, z, &df, rows, &mut grads)
                }
            }
            Net::Gru { wzh_t, bzh, whh_t, b_r, b_u, b_in, b_hn, wout_t, .. } => {
                let mut hin = vec![0.0; rows * h];
                gemm(&mut hin, h, m(z, rows, l), m(wzh_t, l, h), 1.0, false);
                super::add_row(&mut hin, bzh);
                let mut g = vec![0.0; rows * 3 * h];
                gemm(&mut g, 3 * h, m(&hin, rows, h), m(whh_t, h, 3 * h), 1.0, false);
                let (mut r, mut u, mut n, mut hn) =
                    (vec![0.0; rows * h], vec![0.0; rows * h], vec![0.0; rows * h], vec![0.0; rows * h]);
                for i in 0..rows {
                    let gr = &g[i * 3 * h..(i + 1) * 3 * h];
                    for j in 0..h {
                        let k = i * h + j;
                        r[k] = fast::sigmoid(b_r[j] + gr[j]);
                        u[k] = fast::sigmoid(b_u[j] + gr[h + j]);
                        n[k] = fast::tanh(r[k].mul_add(gr[2 * h + j] + b_hn[j], b_in[j]));
                        hn[k] = u[k].mul_add(hin[k] - n[k], n[k]);
                    }
                }
                // Specs order: w_zh, b_zh, w_hh, b_hh, b_ih, w_out, b_out.
                mm(&mut grads[5], m(&df, rows, l).t(), m(&hn, rows, h), true);
                colsum(&df, l, &mut grads[6]);
                let wout = transpose(wout_t, h, l);
                let mut dhn = vec![0.0; rows * h];
                mm(&mut dhn, m(&df, rows, l), m(&wout, l, h), false);
                let mut dg = vec![0.0; rows * 3 * h];
                let mut dhin = vec![0.0; rows * h];
                for i in 0..rows {
                    let gr = &g[i * 3 * h..(i + 1) * 3 * h];
                    let dgr = &mut dg[i * 3 * h..(i + 1) * 3 * h];
                    for j in 0..h {
                        let k = i * h + j;
                        let d = dhn[k];
                        dhin[k] = d * u[k];
                        let dn_pre = d * (1.0 - u[k]) * (1.0 - n[k] * n[k]);
                        let du_pre = d * (hin[k] - n[k]) * u[k] * (1.0 - u[k]);
                        let gn = gr[2 * h + j] + b_hn[j];
                        let dr_pre = dn_pre * gn * r[k] * (1.0 - r[k]);
                        dgr[j] = dr_pre;
                        dgr[h + j] = du_pre;
                        dgr[2 * h + j] = dn_pre * r[k];
                        // r and u biases enter as b_ih + b_hh; n's input bias outside r.
                        grads[3][j] += dr_pre;
                        grads[4][j] += dr_pre;
                        grads[3][h + j] += du_pre;
                        grads[4][h + j] += du_pre;
                        grads[3][2 * h + j] += dn_pre * r[k];
                        grads[4][2 * h + j] += dn_pre;
                    }
                }
                mm(&mut grads[2], m(&dg, rows, 3 * h).t(), m(&hin, rows, h), true);
                let whh = transpose(whh_t, h, 3 * h);
                mm(&mut dhin, m(&dg, rows, 3 * h), m(&whh, 3 * h, h), true);
                mm(&mut grads[0], m(&dhin, rows, h).t(), m(z, rows, l), true);
                colsum(&dhin, h, &mut grads[1]);
                let wzh = transpose(wzh_t, l, h);
                let mut dz = vec![0.0; rows * l];
                mm(&mut dz, m(&dhin, rows, h), m(&wzh, h, l), false);
                dz
            }
        };
        (dz, grads)
    }

    /// f(z) before the RMSNorm.
    fn core_output(&self, z: &[f32], rows: usize) -> Vec<f32> {
        let plain = Dynamics { rmsnorm: false, ..self.clone() };
        let mut out = vec![0.0; rows * self.latents];
        let mut scr = plain.scratch(rows);
        plain.apply(z, &mut out, &mut scr);
        out
    }

    /// RK4 with the stage inputs and hidden activations kept, then the reverse sweep.
    fn rk4_backward(&self, field: &Field, z: &[f32], df: &[f32], rows: usize, grads: &mut [Vec<f32>]) -> Vec<f32> {
        let l = self.latents;
        let dt = 1.0 / self.substeps as f32;
        let n = rows * l;
        // Per substep: the 4 stage inputs and their hidden activations.
        type Stages = [Vec<f32>; 4];
        let mut tape: Vec<(Stages, Stages)> = Vec::with_capacity(self.substeps);
        let mut x = z.to_vec();
        for _ in 0..self.substeps {
            let mut xs: [Vec<f32>; 4] = Default::default();
            let mut hs: [Vec<f32>; 4] = Default::default();
            let mut k = vec![0.0; n];
            let mut acc = vec![0.0; n];
            xs[0] = x.clone();
            hs[0] = field.forward(&x, rows, &mut acc);
            // The same operation order as Dynamics::rk4, stage by stage.
            let mut tmp: Vec<f32> = (0..n).map(|i| (0.5 * dt).mul_add(acc[i], x[i])).collect();
            for (stage, c) in [(1usize, 0.5 * dt), (2, dt)] {
                xs[stage] = tmp.clone();
                hs[stage] = field.forward(&tmp, rows, &mut k);
                for i in 0..n {
                    acc[i] = 2.0f32.mul_add(k[i], acc[i]);
                    tmp[i] = c.mul_add(k[i], x[i]);
                }
            }
            xs[3] = tmp.clone();
            hs[3] = field.forward(&tmp, rows, &mut k);
            for i in 0..n {
                x[i] = (dt / 6.0).mul_add(acc[i] + k[i], x[i]);
            }
            tape.push((xs, hs));
        }
        let mut dx = df.to_vec();
        for (xs, hs) in tape.iter().rev() {
            let mut dprev = dx.clone();
            let mut dk: [Vec<f32>; 4] = [
                dx.iter().map(|v| v * dt / 6.0).collect(),
                dx.iter().map(|v| v * dt / 3.0).collect(),
                dx.iter().map(|v| v * dt / 3.0).collect(),
                dx.iter().map(|v| v * dt / 6.0).collect(),
            ];
            // Stage s's input is x + c_s k_{s-1}: its gradient flows to x and to k_{s-1}.
            for (s, c) in [(3usize, dt), (2, 0.5 * dt), (1, 0.5 * dt)] {
                let d_in = field.backward(&xs[s], &hs[s], &dk[s], rows, grads);
                for i in 0..n {
                    dprev[i] += d_in[i];
                    dk[s - 1][i] += c * d_in[i];
                }
            }
            let d_in = field.backward(&xs[0], &hs[0], &dk[0], rows, grads);
            dprev.iter_mut().zip(&d_in).for_each(|(a, b)| *a += b);
            dx = dprev;
        }
        dx
    }
}

#[cfg(test)]
mod tests {
    use crate::model::card::{Card, DynamicsKind, ReadoutKind, UpdateKind};
    use crate::model::dynamics::{param_specs, Dynamics};
    use crate::model::{build, ModelFile};

    fn dynamics_of(f: &ModelFile, kind: DynamicsKind, rmsnorm: bool) -> Dynamics {
        Dynamics::from_file(f, kind, 3, 5, rmsnorm, 2).unwrap()
    }

    /// Central differences of l(theta, z) = sum(w * f(z)) in f64-scaled steps against the
    /// analytic gradients, for every kind, with and without RMSNorm.
    #[test]
    fn gradients_match_finite_differences() {
        for kind in DynamicsKind::ALL.iter().copied() {
            for rmsnorm in [false, true] {
                let card = Card {
                    latents: 3,
                    channels: 4,
                    dt: 0.02,
                    samples: 4,
                    dynamics: kind,
                    hidden: 5,
                    rmsnorm,
                    substeps: 2,
                    update: UpdateKind::Encoder,
                    rank: 1,
                    encoder_hidden: 2,
                    readout: ReadoutKind::None,
                    readout_latents: 3,
                    behavior_dims: 0,
                };
                let mut file = build::random(&card, 11, 0.1, 0.5);
                // Non-zero biases so their gradients are exercised.
                for (name, _, _) in param_specs(kind, 3, 5) {
                    let t = file.tensors.get_mut(name).unwrap();
                    for (i, v) in t.data.iter_mut().enumerate() {
                        *v += 0.05 * ((i % 7) as f32 - 3.0);
                    }
                }
                let rows = 4;
                let z: Vec<f32> = (0..rows * 3).map(|i| ((i * 5 % 11) as f32 - 5.0) / 4.0).collect();
                let w: Vec<f32> = (0..rows * 3).map(|i| ((i * 3 % 7) as f32 - 3.0) / 3.0).collect();
                let loss = |f: &ModelFile, z: &[f32]| -> f64 {
                    let d = dynamics_of(f, kind, rmsnorm);
                    let mut out = vec![0.0; rows * 3];
                    d.apply(z, &mut out, &mut d.scratch(rows));
                    out.iter().zip(&w).map(|(a, b)| *a as f64 * *b as f64).sum()
                };
                let d = dynamics_of(&file, kind, rmsnorm);
                let (dz, grads) = d.backward(&z, &w, rows);
                let eps = 1e-2f32;
                let check = |got: f32, plus: f64, minus: f64, what: &str| {
                    let fd = (plus - minus) / (2.0 * eps as f64);
                    assert!(
                        (got as f64 - fd).abs() <= 2e-3 * (1.0 + fd.abs()),
                        "{kind} rms={rmsnorm} {what}: {got} vs {fd}"
                    );
                };
                for i in 0..z.len() {
                    let (mut zp, mut zm) = (z.clone(), z.clone());
                    zp[i] += eps;
                    zm[i] -= eps;
                    check(dz[i], loss(&file, &zp), loss(&file, &zm), &format!("dz[{i}]"));
                }
                for (pi, (name, _, _)) in param_specs(kind, 3, 5).iter().enumerate() {
                    let len = file.tensors[*name].data.len();
                    for j in (0..len).step_by(3) {
                        let (mut fp, mut fm) = (file.clone(), file.clone());
                        fp.tensors.get_mut(*name).unwrap().data[j] += eps;
                        fm.tensors.get_mut(*name).unwrap().data[j] -= eps;
                        check(grads[pi][j], loss(&fp, &z), loss(&fm, &z), &format!("{name}[{j}]"));
                    }
                }
            }
        }
    }
}
