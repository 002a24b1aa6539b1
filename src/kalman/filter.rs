//! The per-bin Kalman decoder: exact time-varying recursion or steady-state gain.
//!
//! Only the behaviour block (D x D) carries covariance: the constant state is known exactly,
//! so it contributes to means only (through A's last column and C's last column).
//!
//! # Exact mode without the N x N innovation solve
//!
//! The textbook gain `K = P_p C^T (C P_p C^T + Q)^-1` solves an N x N system per bin. With
//! `Q^-1` folded into `H = C_b^T Q^-1` and `G = C_b^T Q^-1 C_b` once at load, the Woodbury
//! identity turns it into state-sized algebra (the information form):
//!
//! ```text
//! P_f = (P_p^-1 + G)^-1,   K = P_f H,   b_f = b_p + P_f v,   v = H y - H c - G b_p
//! ```
//!
//! and `P_f` is evaluated as `L (I + L^T G L)^-1 L^T` with `P_p = L L^T`: two D x D
//! Cholesky factorisations, no explicit inverse, and `I + L^T G L` has eigenvalues >= 1, so
//! its f32 factorisation is well conditioned however small P_p gets. The only N-sized work
//! per bin is `H y` (D x N, skipping zero counts). Covariances do not depend on the data, so
//! `predict` does all of the D^3 work before the bin arrives; `step` is then mat-vecs.
//!
//! The lag-1 smoother needs `P_p^-1 (b_f - b_p) = v - G (b_f - b_p)` (because
//! `P_p^-1 P_f = I - G P_f`), so `b_{t-1|t} = b_{t-1} + P_{t-1} A_b^T (v - G (b_f - b_p))`
//! needs no inverse either. The per-bin surprise `KL(q_t || pred)` is
//! `(tr M^-1 - D + log det M + (b_f - b_p)^T P_p^-1 (b_f - b_p)) / 2` with `M = I + L^T G L`.
//!
//! # Steady-state mode
//!
//! `x_t = M x_{t-1} + K y_t` with `M = (I - K C) A` and the converged gain: two mat-vecs
//! (`M x_{t-1}` is data-independent and done in `predict`). The first bin uses
//! `x_0 = (I - K C) x0 + K y_0`. The lag-1 output is `x_{t-1} + J (x_t - A x_{t-1})`. KL is
//! not computed (0).
//!
//! A bin without data (`step(None)`) is a predict-only step in both modes, and then the
//! lag-1 mean is the previous filtered mean.

use super::model::KalmanModel;
use crate::data::Array2;
use crate::decoder::{validate_bin, BinError, Decoder, StepInfo};
use crate::math::chol;
use crate::math::gemm::{dot, gemm, gemv, gemv_t, MatRef};
use std::sync::Arc;

/// How each bin is decoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KalmanMode {
    /// The standard time-varying recursion (covariances propagated every bin).
    #[default]
    Exact,
    /// The converged gain: two mat-vecs per bin; equal to `Exact` after the transient.
    SteadyState,
}

pub struct KalmanFilter {
    model: Arc<KalmanModel>,
    mode: KalmanMode,
    /// D, n = D + 1, N.
    d: usize,
    n: usize,
    nc: usize,
    step: u64,
    predicted: bool,
    from_prior: bool,
    /// The last predict's covariance algebra failed: the next step resets.
    broken: bool,

    // Model, in the layouts the step wants.
    a: Vec<f32>,
    ab: Vec<f32>,
    abt: Vec<f32>,
    a_off: Vec<f32>,
    w: Vec<f32>,
    x0: Vec<f32>,
    p0: Vec<f32>,
    g: Vec<f32>,
    ht: Vec<f32>,
    hc: Vec<f32>,
    kt: Vec<f32>,
    m_ss: Vec<f32>,
    j_ss: Vec<f32>,
    /// (I - K C) x0: the steady-state first bin.
    x0_ss: Vec<f32>,
    /// The steady-state filtered covariance, D x D.
    p_ss: Vec<f32>,

    // State.
    x: Vec<f32>,
    p: Vec<f32>,
    lag1: Vec<f32>,

    // The prediction for the next bin.
    xp: Vec<f32>,
    pp: Vec<f32>,
    pf: Vec<f32>,
    lch: Vec<f32>,
    mch: Vec<f32>,
    vbase: Vec<f32>,
    pa: Vec<f32>,
    kl_const: f32,

    // Scratch.
    v: Vec<f32>,
    delta: Vec<f32>,
    gv: Vec<f32>,
    tmp: Vec<f32>,
    rinv: Vec<f32>,
}

impl KalmanFilter {
    pub fn new(model: Arc<KalmanModel>, mode: KalmanMode) -> Self {
        let p = &model.params;
        let (d, n, nc) = (p.behavior_dims, p.states(), p.channels);
        let block = |m: &[f32]| -> Vec<f32> { (0..d * d).map(|k| m[(k / d) * n + k % d]).collect() };
        let ab = block(&p.a);
        let abt: Vec<f32> = (0..d * d).map(|k| ab[(k % d) * d + k / d]).collect();
        let kt: Vec<f32> = (0..nc * n).map(|k| model.steady.k[(k % n) * nc + k / n]).collect();
        // (I - K C) x0 in f64, rounded once.
        let x0_ss: Vec<f32> = (0..n)
            .map(|i| {
                let kc_x0: f64 = (0..nc)
                    .map(|j| {
                        let cx: f64 = (0..n).map(|l| p.c[j * n + l] as f64 * p.x0[l] as f64).sum();
                        model.steady.k[i * nc + j] as f64 * cx
                    })
                    .sum();
                (p.x0[i] as f64 - kc_x0) as f32
            })
            .collect();
        let z = |len: usize| vec![0.0f32; len];
        KalmanFilter {
            mode,
            d,
            n,
            nc,
            step: 0,
            predicted: false,
            from_prior: true,
            broken: false,
            a: p.a.clone(),
            ab,
            abt,
            a_off: (0..d).map(|i| p.a[i * n + d]).collect(),
            w: block(&p.w),
            x0: p.x0.clone(),
            p0: block(&p.p0),
            g: model.info.g.clone(),
            ht: model.info.ht.clone(),
            hc: model.info.hc.clone(),
            kt,
            m_ss: model.steady.m.clone(),
            j_ss: model.steady.j.clone(),
            x0_ss,
            p_ss: block(&model.steady.p_filt),
            x: p.x0.clone(),
            p: block(&p.p0),
            lag1: p.x0.clone(),
            xp: z(n),
            pp: z(d * d),
            pf: z(d * d),
            lch: z(d * d),
            mch: z(d * d),
            vbase: z(d),
            pa: z(d * d),
            kl_const: 0.0,
            v: z(n),
            delta: z(n),
            gv: z(d),
            tmp: z(d * d),
            rinv: z(d * d),
            model,
        }
    }

    pub fn model(&self) -> &Arc<KalmanModel> {
        &self.model
    }
    pub fn mode(&self) -> KalmanMode {
        self.mode
    }
    /// Index of the next bin.
    pub fn step_index(&self) -> u64 {
        self.step
    }
    /// The filtered state `[behaviour; 1]` after the last step (x0 before the first).
    pub fn mean(&self) -> &[f32] {
        &self.x
    }
    /// The previous state smoothed with the last bin (one-step RTS).
    pub fn lag1_mean(&self) -> &[f32] {
        &self.lag1
    }
    /// The first D components of the state.
    pub fn behavior(&self) -> &[f32] {
        &self.x[..self.d]
    }
    /// The filtered covariance of the behaviour block, D x D: in Exact mode that of the last
    /// step (P0 before the first); in SteadyState mode the steady-state one, always.
    pub fn behavior_cov(&self) -> &[f32] {
        match self.mode {
            KalmanMode::Exact => &self.p,
            KalmanMode::SteadyState => &self.p_ss,
        }
    }

    /// Starts over from the prior (x0, P0) at the next bin.
    pub fn reset(&mut self) {
        self.from_prior = true;
        self.predicted = false;
        self.broken = false;
        self.x.copy_from_slice(&self.x0);
        self.lag1.copy_from_slice(&self.x0);
        self.p.copy_from_slice(&self.p0);
    }

    /// All work for the next bin that does not need its data.
    pub fn predict(&mut self) {
        if self.predicted {
            return;
        }
        match self.mode {
            KalmanMode::Exact => self.predict_exact(),
            KalmanMode::SteadyState => self.predict_steady(),
        }
        self.predicted = true;
    }

    fn predict_exact(&mut self) {
        let (d, n) = (self.d, self.n);
        if self.from_prior {
            self.xp.copy_from_slice(&self.x0);
            self.pp.copy_from_slice(&self.p0);
        } else {
            // b_p = A_b b + a; P_p = A_b P A_b^T + W; and P A_b^T for the lag-1 gain.
            gemv(&mut self.xp, &self.ab, d, d, &self.x[..d], 1.0, false);
            self.xp[..d].iter_mut().zip(&self.a_off).for_each(|(x, a)| *x += a);
            gemm(&mut self.tmp, d, MatRef::new(&self.ab, d, d), MatRef::new(&self.p, d, d), 1.0, false);
            gemm(&mut self.pp, d, MatRef::new(&self.tmp, d, d), MatRef::new(&self.abt, d, d), 1.0, false);
            gemm(&mut self.pa, d, MatRef::new(&self.p, d, d), MatRef::new(&self.abt, d, d), 1.0, false);
            for i in 0..d {
                for j in 0..=i {
                    let s = 0.5 * (self.pp[i * d + j] + self.pp[j * d + i]) + self.w[i * d + j];
                    self.pp[i * d + j] = s;
                    self.pp[j * d + i] = s;
                }
            }
        }
        self.xp[d] = 1.0;
        debug_assert_eq!(self.xp.len(), n);
        // L = chol(P_p); Mc = chol(I + L^T G L).
        self.lch.copy_from_slice(&self.pp);
        if chol::cholesky(&mut self.lch, d).is_err() {
            self.broken = true;
            return;
        }
        gemm(&mut self.tmp, d, MatRef::new(&self.g, d, d), MatRef::new(&self.lch, d, d), 1.0, false);
        gemm(&mut self.mch, d, MatRef::new(&self.lch, d, d).t(), MatRef::new(&self.tmp, d, d), 1.0, false);
        for i in 0..d {
            for j in 0..i {
                let s = 0.5 * (self.mch[i * d + j] + self.mch[j * d + i]);
                self.mch[i * d + j] = s;
                self.mch[j * d + i] = s;
            }
            self.mch[i * d + i] += 1.0;
        }
        if chol::cholesky(&mut self.mch, d).is_err() {
            self.broken = true;
            return;
        }
        // F = L R^-T row by row (R f = l_i), P_f = F F^T.
        self.tmp.copy_from_slice(&self.lch);
        for row in self.tmp.chunks_exact_mut(d) {
            chol::solve_lower(&self.mch, d, row);
        }
        for i in 0..d {
            for j in 0..=i {
                let s = dot(&self.tmp[i * d..(i + 1) * d], &self.tmp[j * d..(j + 1) * d]);
                self.pf[i * d + j] = s;
                self.pf[j * d + i] = s;
            }
        }
        // v = H y - (h_c + G b_p): the data-independent part.
        gemv(&mut self.vbase, &self.g, d, d, &self.xp[..d], 1.0, false);
        self.vbase.iter_mut().zip(&self.hc).for_each(|(v, h)| *v += h);
        chol::lower_inverse(&self.mch, d, &mut self.rinv);
        let tr_inv: f32 = self.rinv.iter().map(|x| x * x).sum(); // tr M^-1 = ||R^-1||_F^2
        self.kl_const = tr_inv - d as f32 + chol::logdet(&self.mch, d);
    }

    fn predict_steady(&mut self) {
        let n = self.n;
        if self.from_prior {
            self.v.copy_from_slice(&self.x0_ss);
            self.xp.copy_from_slice(&self.x0);
        } else {
            // v = M x (the data-independent part of the next state), xp = A x.
            gemv(&mut self.v, &self.m_ss, n, n, &self.x, 1.0, false);
            gemv(&mut self.xp, &self.a, n, n, &self.x, 1.0, false);
        }
    }

    /// Decodes one bin (`None`: no data, a predict-only step).
    pub fn step(&mut self, y: Option<&[f32]>) -> Result<StepInfo, BinError> {
        if let Some(y) = y {
            validate_bin(y, self.nc)?;
        }
        self.predict();
        let first = self.from_prior;
        let mut info = StepInfo { step: self.step, predict_only: y.is_none(), reset: false, kl: 0.0 };
        let ok = match (y, self.mode) {
            _ if self.broken => false,
            (None, KalmanMode::Exact) => {
                self.lag1.copy_from_slice(&self.x);
                self.x.copy_from_slice(&self.xp);
                self.p.copy_from_slice(&self.pp);
                true
            }
            (None, KalmanMode::SteadyState) => {
                self.lag1.copy_from_slice(&self.x);
                self.x.copy_from_slice(&self.xp);
                true
            }
            (Some(y), KalmanMode::Exact) => self.update_exact(y, first, &mut info),
            (Some(y), KalmanMode::SteadyState) => self.update_steady(y, first),
        };
        if !ok {
            info.predict_only = true;
            info.reset = true;
            self.reset();
        } else {
            self.from_prior = false;
        }
        self.step += 1;
        self.predicted = false;
        Ok(info)
    }

    /// Returns false (touching no state) if the result is not finite.
    fn update_exact(&mut self, y: &[f32], first: bool, info: &mut StepInfo) -> bool {
        let (d, nc) = (self.d, self.nc);
        // v = H y - h_c - G b_p; delta = P_f v; gv = P_p^-1 delta = v - G delta.
        gemv_t(&mut self.v, &self.ht, nc, d, y, 1.0, false);
        self.v[..d].iter_mut().zip(&self.vbase).for_each(|(v, b)| *v -= b);
        gemv(&mut self.delta, &self.pf, d, d, &self.v[..d], 1.0, false);
        self.gv.copy_from_slice(&self.v[..d]);
        gemv(&mut self.gv, &self.g, d, d, &self.delta[..d], -1.0, true);
        let quad = dot(&self.delta[..d], &self.gv);
        if !(quad.is_finite() && self.delta[..d].iter().all(|v| v.is_finite())) {
            return false;
        }
        if first {
            self.lag1.copy_from_slice(&self.x);
        } else {
            self.lag1.copy_from_slice(&self.x);
            gemv(&mut self.lag1, &self.pa, d, d, &self.gv, 1.0, true);
        }
        self.x.copy_from_slice(&self.xp);
        self.x[..d].iter_mut().zip(&self.delta).for_each(|(x, dl)| *x += dl);
        self.p.copy_from_slice(&self.pf);
        info.kl = 0.5 * (self.kl_const + quad);
        true
    }

    fn update_steady(&mut self, y: &[f32], first: bool) -> bool {
        let (n, nc) = (self.n, self.nc);
        // x_t = M x_{t-1} + K y (v holds M x_{t-1}); lag-1 = x_{t-1} + J (x_t - A x_{t-1}).
        gemv_t(&mut self.v, &self.kt, nc, n, y, 1.0, true);
        if !self.v.iter().all(|v| v.is_finite()) {
            return false;
        }
        if first {
            self.lag1.copy_from_slice(&self.x);
        } else {
            self.delta.iter_mut().zip(self.v.iter().zip(&self.xp)).for_each(|(dl, (v, xp))| *dl = v - xp);
            self.lag1.copy_from_slice(&self.x);
            gemv(&mut self.lag1, &self.j_ss, n, n, &self.delta, 1.0, true);
        }
        self.x.copy_from_slice(&self.v);
        self.x[self.d] = 1.0;
        true
    }

    /// Decodes every row of `spikes` from the current state (offline use: allocates the
    /// result) and returns the behaviour, T x D. Row t estimates behaviour bin t + lag.
    pub fn decode(&mut self, spikes: &Array2) -> Result<Array2, BinError> {
        let mut out = Array2::zeros(spikes.rows, self.d);
        for t in 0..spikes.rows {
            self.step(Some(spikes.row(t)))?;
            out.row_mut(t).copy_from_slice(self.behavior());
        }
        Ok(out)
    }
}

impl Decoder for KalmanFilter {
    fn channels(&self) -> usize {
        self.nc
    }
    fn latents(&self) -> usize {
        self.n
    }
    fn behavior_dims(&self) -> usize {
        self.d
    }
    fn predict(&mut self) {
        KalmanFilter::predict(self)
    }
    fn step(&mut self, y: Option<&[f32]>) -> Result<StepInfo, BinError> {
        KalmanFilter::step(self, y)
    }
    fn behavior(&self) -> &[f32] {
        KalmanFilter::behavior(self)
    }
    fn mean(&self) -> &[f32] {
        &self.x
    }
    fn lag1_mean(&self) -> &[f32] {
        &self.lag1
    }
    fn reset(&mut self) {
        KalmanFilter::reset(self)
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    /// From another Kalman decoder of the same state size: the state, its covariance, the
    /// lag-1 mean and the bin counter. The prediction is redone with this model.
    fn carry_state_from(&mut self, other: &dyn Decoder) -> bool {
        let Some(o) = other.as_any().downcast_ref::<KalmanFilter>() else { return false };
        if (o.d, o.n) != (self.d, self.n) {
            return false;
        }
        self.x.copy_from_slice(&o.x);
        self.p.copy_from_slice(&o.p);
        self.lag1.copy_from_slice(&o.lag1);
        (self.step, self.from_prior, self.predicted, self.broken) = (o.step, o.from_prior, false, false);
        true
    }
}
