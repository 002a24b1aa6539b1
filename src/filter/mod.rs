//! The causal filter step: this is where a bin is decoded (ALGORITHM.md sections 4 and 5).
//!
//! Layout: samples are rows. `z` (S x L) holds the samples of q_{t-1}; `mt` (S x L) is M^T,
//! the centred predictive factor; `K` (L x r) is the update's factor.
//!
//! The update is computed in an equivalent form that never needs the S x S system
//! A_p = I + M^T Q^-1 M of the predictive precision (derivation in docs/ARCHITECTURE.md):
//! - P_p h = P_p (h_p + k) = m_p + P_p k, because h_p = P_p^-1 m_p;
//! - m_f = P_p h - P_p K c with c = A^-1 K^T P_p h, A = I_r + K^T P_p K;
//! - P_p^-1 (m_f - m_p) = k - K c, which is all the lag-1 gain G = N_z M^T P_p^-1 needs;
//! - KL(q_t || pred) = (tr A^-1 - r + log det A + (m_f - m_p)^T (k - K c)) / 2.
//!
//! This removes O(L S^2 + S^3) per bin and a Cholesky that can be ill-conditioned when Q is
//! small, while every quantity stays exact (tests compare with dense algebra).
//!
//! Hot-path rules: `predict` and `update` allocate nothing, lock nothing and make no system
//! call; all buffers are sized in `new`.

use crate::decoder::{validate_bin, BinError, Decoder, StepInfo};
use crate::math::chol;
use crate::math::gemm::{gemm, gemv, gemv_t, MatRef};
use crate::math::philox::{Normals, Purpose};
use crate::model::{dynamics, observation, XfadsModel};
use std::sync::Arc;

/// Runtime choices that are not part of the model.
#[derive(Clone, Copy, Debug, Default)]
pub struct FilterOptions {
    /// Number of samples S; `None` takes the model card's.
    pub samples: Option<usize>,
    /// Seed of the filter's noise (Philox key).
    pub seed: u64,
}

pub struct Filter {
    model: Arc<XfadsModel>,
    s: usize,
    l: usize,
    r: usize,
    noise: Normals,
    step: u64,
    predicted: bool,
    /// Start (again) from the prior at the next predict.
    from_prior: bool,

    z: Vec<f32>,
    m: Vec<f32>,
    f: Vec<f32>,
    mt: Vec<f32>,
    mp: Vec<f32>,
    e: Vec<f32>,
    w1: Vec<f32>,
    sqrt_q: Vec<f32>,
    sqrt_q0: Vec<f32>,

    kk: Vec<f32>,
    mtk: Vec<f32>,
    ksq: Vec<f32>,
    a: Vec<f32>,
    ktpp: Vec<f32>,
    u_s: Vec<f32>,
    ph: Vec<f32>,
    c: Vec<f32>,
    g: Vec<f32>,
    mf: Vec<f32>,
    zbar: Vec<f32>,
    v: Vec<f32>,
    lag1: Vec<f32>,
    behavior: Vec<f32>,
    rhs: Vec<f32>,
    linv: Vec<f32>,
    ainv: Vec<f32>,
    xs: Vec<f32>,

    dyn_scr: dynamics::Scratch,
    obs_scr: observation::Scratch,
}

impl Filter {
    pub fn new(model: Arc<XfadsModel>, opts: FilterOptions) -> Self {
        let s = opts.samples.unwrap_or(model.card.samples).max(2);
        let (l, r) = (model.latents(), model.rank());
        let dd = model.behavior.as_ref().map_or(0, |b| b.dims());
        let v = |len: usize| vec![0.0f32; len];
        Filter {
            s,
            l,
            r,
            noise: Normals::new(opts.seed),
            step: 0,
            predicted: false,
            from_prior: true,
            z: v(s * l),
            m: model.m0.clone(),
            f: v(s * l),
            mt: v(s * l),
            mp: v(l),
            e: v(s * l),
            w1: v(s * s),
            sqrt_q: model.q.iter().map(|q| q.sqrt()).collect(),
            sqrt_q0: model.q0.iter().map(|q| q.sqrt()).collect(),
            kk: v((r + 1) * l),
            mtk: v(s * r),
            ksq: v(l * r),
            a: v(r * r),
            ktpp: v(r * l),
            u_s: v(s),
            ph: v(l),
            c: v(r),
            g: v(l),
            mf: v(l),
            zbar: v(l),
            v: v(s * r),
            lag1: model.m0.clone(),
            behavior: v(dd),
            rhs: v(r),
            linv: v(r * r),
            ainv: v(r * r),
            xs: v(s * r),
            dyn_scr: model.dynamics.scratch(s),
            obs_scr: model.observation.scratch(),
            model,
        }
    }

    pub fn model(&self) -> &Arc<XfadsModel> {
        &self.model
    }
    pub fn samples(&self) -> usize {
        self.s
    }
    /// Index of the next bin.
    pub fn step_index(&self) -> u64 {
        self.step
    }
    /// m_t after the last update (m0 before the first).
    pub fn mean(&self) -> &[f32] {
        &self.m
    }
    /// m_{t-1|t}: the previous state's mean given this bin too.
    pub fn lag1_mean(&self) -> &[f32] {
        &self.lag1
    }
    /// Samples of q_t (S x L, rows are samples).
    pub fn sample_matrix(&self) -> &[f32] {
        &self.z
    }
    /// The predicted mean m_p of the last predict.
    pub fn predicted_mean(&self) -> &[f32] {
        &self.mp
    }
    /// The centred predictive draws e_s (S x L) of the pending prediction: after `predict`
    /// and before `step`, m_p + e_s are draws of the one-step-ahead predictive (for honest
    /// predictive rates, which have not seen the bin).
    pub fn predictive_draws(&self) -> Option<&[f32]> {
        self.predicted.then_some(&self.e[..])
    }

    /// D m_t + d (empty if the model has no behaviour readout).
    pub fn behavior(&self) -> &[f32] {
        &self.behavior
    }

    /// Starts over from the prior at the next bin (e.g. after a source restart).
    pub fn reset(&mut self) {
        self.from_prior = true;
        self.predicted = false;
        self.m.copy_from_slice(&self.model.m0);
        self.lag1.copy_from_slice(&self.model.m0);
    }

    /// The prediction for the next bin. It does not depend on the bin's data, so a real-time
    /// loop runs it right after publishing, off the critical path; `update` calls it if needed.
    /// It also draws the update's noise w_s, which does not depend on the bin either.
    pub fn predict(&mut self) {
        if self.predicted {
            return;
        }
        let (s, l, t) = (self.s, self.l, self.step);
        let model = &*self.model;
        self.noise.fill_rows(t, Purpose::Update, &mut self.v, self.r);
        // e_s = M w1_s + sqrt(Q) w2_s; at the start M = 0 and Q is Q0.
        self.noise.fill_rows(t, Purpose::PredictDiag, &mut self.e, l);
        if self.from_prior {
            self.mp.copy_from_slice(&model.m0);
            self.mt.fill(0.0);
            for row in self.e.chunks_exact_mut(l) {
                row.iter_mut().zip(&self.sqrt_q0).for_each(|(x, q)| *x *= q);
            }
        } else {
            model.dynamics.apply(&self.z, &mut self.f, &mut self.dyn_scr);
            self.mp.fill(0.0);
            for row in self.f.chunks_exact(l) {
                self.mp.iter_mut().zip(row).for_each(|(m, x)| *m += x);
            }
            let inv_s = 1.0 / s as f32;
            self.mp.iter_mut().for_each(|m| *m *= inv_s);
            let scale = inv_s.sqrt();
            for (mrow, frow) in self.mt.chunks_exact_mut(l).zip(self.f.chunks_exact(l)) {
                for ((m, x), mu) in mrow.iter_mut().zip(frow).zip(&self.mp) {
                    *m = (x - mu) * scale;
                }
            }
            for row in self.e.chunks_exact_mut(l) {
                row.iter_mut().zip(&self.sqrt_q).for_each(|(x, q)| *x *= q);
            }
            self.noise.fill_rows(t, Purpose::PredictMix, &mut self.w1, s);
            gemm(&mut self.e, l, MatRef::new(&self.w1, s, s), MatRef::new(&self.mt, s, l), 1.0, true);
        }
        self.predicted = true;
    }

    /// Decodes one bin (`None`: no data, a predict-only step).
    pub fn step(&mut self, y: Option<&[f32]>) -> Result<StepInfo, BinError> {
        if let Some(y) = y {
            validate_bin(y, self.model.channels())?;
        }
        self.predict();
        let t = self.step;
        let first = self.from_prior;
        let mut info = StepInfo { step: t, predict_only: y.is_none(), reset: false, kl: 0.0 };
        let ok = match y {
            Some(y) => self.update(y, first),
            None => false,
        };
        if !ok {
            // A failed update, or a prediction that is no longer finite (the dynamics carried
            // an extreme state out of range): start over from the prior, flagged.
            if y.is_some() || !crate::math::all_finite(&self.mp) {
                info.predict_only = true;
                info.reset = true;
            }
            // No information: q_t is the predictive, and m_{t-1|t} = m_{t-1}.
            self.lag1.copy_from_slice(&self.m);
            self.m.copy_from_slice(&self.mp);
            for row in self.e.chunks_exact_mut(self.l) {
                row.iter_mut().zip(&self.mp).for_each(|(x, m)| *x += m);
            }
            std::mem::swap(&mut self.z, &mut self.e);
        } else {
            info.kl = self.kl_value();
        }
        if info.reset {
            self.reset();
        } else {
            self.from_prior = false;
        }
        if let Some(b) = &self.model.behavior {
            b.apply(&self.m, &mut self.behavior);
        }
        self.step += 1;
        self.predicted = false;
        Ok(info)
    }

    /// The low-rank update with a valid bin. Returns false if the algebra broke down
    /// (then nothing of the state has been changed).
    fn update(&mut self, y: &[f32], first: bool) -> bool {
        let (s, l, r) = (self.s, self.l, self.r);
        let model = &*self.model;
        let sqrt_q = if first { &self.sqrt_q0 } else { &self.sqrt_q };
        model.observation.potential(y, &self.mp, &mut self.kk, &mut self.obs_scr);
        if !crate::math::all_finite(&self.kk) {
            return false;
        }
        let (k, kmat) = self.kk.split_at(l);
        let kmat = &kmat[..l * r];
        let kref = MatRef::new(kmat, l, r);
        let mt = MatRef::new(&self.mt, s, l);

        // K^T M (as M^T K, S x r) and K^T sqrt(Q).
        gemm(&mut self.mtk, r, mt, kref, 1.0, false);
        for ((out, row), q) in self.ksq.chunks_exact_mut(r).zip(kmat.chunks_exact(r)).zip(sqrt_q) {
            out.iter_mut().zip(row).for_each(|(o, x)| *o = x * q);
        }
        // A = I + (K^T M)(K^T M)^T + (K^T sqrt Q)(K^T sqrt Q)^T.
        let mtk = MatRef::new(&self.mtk, s, r);
        let ksq = MatRef::new(&self.ksq, l, r);
        gemm(&mut self.a, r, mtk.t(), mtk, 1.0, false);
        gemm(&mut self.a, r, ksq.t(), ksq, 1.0, true);
        for a in 0..r {
            self.a[a * r + a] += 1.0;
        }
        // K^T P_p = (K^T M) M^T + K^T Q (r x L).
        gemm(&mut self.ktpp, l, mtk.t(), mt, 1.0, false);
        for i in 0..l {
            let qi = sqrt_q[i] * sqrt_q[i];
            for a in 0..r {
                self.ktpp[a * l + i] += kmat[i * r + a] * qi;
            }
        }
        // P_p h = m_p + M (M^T k) + Q k.
        gemv(&mut self.u_s, &self.mt, s, l, k, 1.0, false);
        gemv_t(&mut self.ph, &self.mt, s, l, &self.u_s, 1.0, false);
        for (((p, m), q), ki) in self.ph.iter_mut().zip(&self.mp).zip(sqrt_q).zip(k) {
            *p += m + q * q * ki;
        }
        // A^-1 once (r^3): then c = A^-1 K^T P_p h and the S draws below are products.
        if chol::cholesky(&mut self.a, r).is_err() {
            return false;
        }
        chol::lower_inverse(&self.a, r, &mut self.linv);
        chol::inverse_from_lower_inverse(&self.linv, r, &mut self.ainv);
        gemv_t(&mut self.rhs, kmat, l, r, &self.ph, 1.0, false);
        gemv(&mut self.c, &self.ainv, r, r, &self.rhs, 1.0, false);
        // m_f = P_p h - (K^T P_p)^T c;  g = P_p^-1 (m_f - m_p) = k - K c.
        self.mf.copy_from_slice(&self.ph);
        gemv_t(&mut self.mf, &self.ktpp, r, l, &self.c, -1.0, true);
        self.g.copy_from_slice(k);
        gemv(&mut self.g, kmat, l, r, &self.c, -1.0, true);

        // Lag-1: m_{t-1|t} = m_{t-1} + N_z M^T g, N_z = (Z - mean Z)^T / sqrt(S).
        if first {
            self.lag1.copy_from_slice(&self.m);
        } else {
            gemv(&mut self.u_s, &self.mt, s, l, &self.g, 1.0, false);
            let sum_v: f32 = self.u_s.iter().sum();
            self.zbar.fill(0.0);
            for row in self.z.chunks_exact(l) {
                self.zbar.iter_mut().zip(row).for_each(|(m, x)| *m += x);
            }
            let inv_s = 1.0 / s as f32;
            gemv_t(&mut self.lag1, &self.z, s, l, &self.u_s, 1.0, false);
            let scale = inv_s.sqrt();
            for ((out, zb), m) in self.lag1.iter_mut().zip(&self.zbar).zip(&self.m) {
                *out = m + (*out - zb * inv_s * sum_v) * scale;
            }
        }

        // An update whose mean or lag-1 mean is not finite (finite but extreme inputs, a state
        // run far out) broke down too: the state is not committed. Checked before the draws,
        // which overwrite e (the failure path needs it).
        if !(crate::math::all_finite(&self.mf) && crate::math::all_finite(&self.lag1)) {
            return false;
        }

        // Exact posterior draws: z_s = m_f + e_s - P_p K A^-1 (K^T e_s + w_s), w_s drawn in
        // `predict`.
        gemm(&mut self.v, r, MatRef::new(&self.e, s, l), kref, 1.0, true);
        gemm(&mut self.xs, r, MatRef::new(&self.v, s, r), MatRef::new(&self.ainv, r, r), 1.0, false);
        gemm(&mut self.e, l, MatRef::new(&self.xs, s, r), MatRef::new(&self.ktpp, r, l), -1.0, true);
        for row in self.e.chunks_exact_mut(l) {
            row.iter_mut().zip(&self.mf).for_each(|(x, m)| *x += m);
        }
        std::mem::swap(&mut self.z, &mut self.e);
        self.m.copy_from_slice(&self.mf);
        true
    }

    /// KL(q_t || predictive) from the last update's A (factored), L^-1 and g.
    fn kl_value(&self) -> f32 {
        let r = self.r;
        let tr: f32 = self.linv.iter().map(|x| x * x).sum(); // tr A^-1 = ||L^-1||_F^2
        let ld = chol::logdet(&self.a, r);
        let quad: f32 = self.m.iter().zip(&self.mp).zip(&self.g).map(|((mf, mp), g)| (mf - mp) * g).sum();
        0.5 * (tr - r as f32 + ld + quad)
    }
}

impl Decoder for Filter {
    fn channels(&self) -> usize {
        self.model.channels()
    }
    fn latents(&self) -> usize {
        self.l
    }
    fn behavior_dims(&self) -> usize {
        self.behavior.len()
    }
    fn predict(&mut self) {
        Filter::predict(self)
    }
    fn step(&mut self, y: Option<&[f32]>) -> Result<StepInfo, BinError> {
        Filter::step(self, y)
    }
    fn behavior(&self) -> &[f32] {
        &self.behavior
    }
    fn mean(&self) -> &[f32] {
        &self.m
    }
    fn lag1_mean(&self) -> &[f32] {
        &self.lag1
    }
    fn reset(&mut self) {
        Filter::reset(self)
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    /// From another filter with the same L and S: its samples of q_{t-1}, means and bin
    /// counter (so the noise stream goes on where it was). The prediction is redone with this
    /// filter's dynamics.
    fn carry_state_from(&mut self, other: &dyn Decoder) -> bool {
        let Some(o) = other.as_any().downcast_ref::<Filter>() else { return false };
        if (o.l, o.s) != (self.l, self.s) {
            return false;
        }
        self.z.copy_from_slice(&o.z);
        self.m.copy_from_slice(&o.m);
        self.lag1.copy_from_slice(&o.lag1);
        (self.step, self.from_prior, self.predicted) = (o.step, o.from_prior, false);
        if let Some(b) = &self.model.behavior {
            b.apply(&self.m, &mut self.behavior);
        }
        true
    }
}
