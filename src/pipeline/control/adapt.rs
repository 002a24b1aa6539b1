//! Closed-loop decoder adaptation: new decoder parameters from the bins just decoded, on
//! the control thread, swapped in between bins with the state carried over.
//!
//! - Kalman, `smoothbatch` (Orsborn et al. 2012): every batch of `batch_seconds`, C and Q
//!   are fitted on the batch alone and blended into the current ones,
//!   C <- (1 - rho) C_batch + rho C, Q likewise, rho = 0.5^(batch / half_life).
//! - Kalman, `rml` (recursive maximum likelihood, Dangi et al. 2014): decayed sufficient
//!   statistics R = sum x x^T, S = sum y x^T, T = sum y y^T, ESS = sum 1, each multiplied by
//!   rho before a batch is added; C = S R^-1 (ridge on R), Q = (T - S C^T) / ESS. They start
//!   from the history before the adaptation began (one half-life of it).
//! - XFADS, `readout`: the behaviour readout refitted by recursive least squares with a
//!   forgetting factor lambda = 0.5^(bin / half_life) on the filtered means (features
//!   [m_t; 1]); the dynamics and the encoder stay. Updates are swapped in every batch.
//!
//! What the decoder should have output ("intended behaviour"): the behaviour the bins
//! carried (`intention = "behavior"`: the task's intended kinematics, or the simulator's
//! truth), or `"refit"`: ReFIT's intention estimation (Gilja et al. 2012), the decoded
//! velocity turned toward the target given by the last `event` with a `target` (and
//! optionally `cursor`) payload, zero within `hold_radius` of it. The cursor is integrated
//! from the decoded velocity. The adaptation never looks at bins without a target then.
//!
//! All the algebra is f64, off the real-time path. Kalman models fitted with a lag are not
//! adapted (the batch would pair the wrong bins).

use super::history::{Entry, History};
use super::Current;
use crate::any_model::AnyModel;
use crate::kalman::{KalmanModel, KalmanParams};
use crate::model::{ModelFile, Tensor};
use nalgebra::{DMatrix, DVector};
use serde::Deserialize;
use serde_json::{json, Value};

/// The `adapt` request.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdaptConfig {
    /// smoothbatch | rml (Kalman), readout (XFADS), off.
    pub mode: String,
    /// Seconds of bins per update (default 10 for smoothbatch, 1 for rml, 5 for readout).
    #[serde(default)]
    pub batch_seconds: Option<f64>,
    /// Seconds after which old data weighs half (default 60).
    #[serde(default)]
    pub half_life_seconds: Option<f64>,
    /// What the decoder should have output: "behavior" (default) or "refit".
    #[serde(default)]
    pub intention: Option<String>,
    /// ReFIT: within this distance of the target the intended velocity is 0.
    #[serde(default)]
    pub hold_radius: Option<f64>,
    /// Ridge on the regressions (relative to the features' scale; default 1e-3).
    #[serde(default)]
    pub ridge: Option<f64>,
}

impl AdaptConfig {
    pub fn is_off(&self) -> bool {
        self.mode == "off"
    }
    pub fn validate(&self) -> Result<(), String> {
        if !["smoothbatch", "rml", "readout", "off"].contains(&self.mode.as_str()) {
            return Err(format!("adapt mode '{}': expected smoothbatch, rml, readout or off", self.mode));
        }
        for (name, v) in [("batch_seconds", self.batch_seconds), ("half_life_seconds", self.half_life_seconds)] {
            if let Some(x) = v {
                if !(x.is_finite() && x > 0.0) {
                    return Err(format!("{name} must be a positive number, not {x}"));
                }
            }
        }
        if let Some(i) = &self.intention {
            if i != "behavior" && i != "refit" {
                return Err(format!("intention '{i}': expected behavior or refit"));
            }
        }
        match self.ridge {
            Some(r) if !(r.is_finite() && r >= 0.0) => Err(format!("ridge must be >= 0, not {r}")),
            _ => Ok(()),
        }
    }
}

/// A target given by an `event` payload, from the bin after `after_seq` on.
#[derive(Clone, Debug)]
pub struct Target {
    pub after_seq: Option<u64>,
    pub target: Vec<f32>,
    pub cursor: Option<Vec<f32>>,
}

/// What an adaptation step produces.
pub enum Update {
    /// A new model file (Kalman: C and Q).
    File(ModelFile),
    /// A new behaviour readout for the current XFADS model: D (D x L) and its bias.
    Readout { d: Vec<f32>, bias: Vec<f32> },
}

enum State {
    Smooth { params: KalmanParams },
    Rml { params: KalmanParams, r: DMatrix<f64>, s: DMatrix<f64>, t: DMatrix<f64>, ess: f64 },
    Readout { w: DMatrix<f64>, p: DMatrix<f64>, lambda: f64 },
}

pub struct Adaptation {
    cfg: AdaptConfig,
    state: State,
    batch_bins: usize,
    /// rho per batch (Kalman).
    rho: f64,
    /// The next history entry to learn from.
    cursor: u64,
    /// Bins learnt from since the last update, and in all.
    pending: usize,
    learnt: u64,
    updates: u64,
    ridge: f64,
    /// ReFIT's cursor position (integrated decoded velocity) and the bin width.
    refit_cursor: Vec<f64>,
    dt: f64,
    /// Entries of the pending batch: (intended, counts or features).
    batch: Vec<(Vec<f64>, Vec<f64>)>,
}

impl Adaptation {
    pub fn start(
        cfg: AdaptConfig,
        current: &Current,
        bin_seconds: f64,
        history: &History,
    ) -> Result<Adaptation, String> {
        let half_life = cfg.half_life_seconds.unwrap_or(60.0);
        // Defaults: SmoothBatch's batches of 10 s, RML's of 1 s (clda practice), and a readout
        // swapped in every 5 s (each swap stores a model file in the session).
        let batch_s = cfg.batch_seconds.unwrap_or(match cfg.mode.as_str() {
            "smoothbatch" => 10.0,
            "readout" => 5.0,
            _ => 1.0,
        });
        let batch_bins = ((batch_s / bin_seconds).round() as usize).max(1);
        let rho = 0.5f64.powf(batch_s / half_life);
        let ridge = cfg.ridge.unwrap_or(1e-3);
        let state = match (cfg.mode.as_str(), &current.model) {
            ("smoothbatch" | "rml", AnyModel::Kalman(k)) => {
                if k.params.lag > 0 {
                    return Err(format!(
                        "the Kalman decoder was fitted with lag {}; adaptation pairs bins without one",
                        k.params.lag
                    ));
                }
                let params = k.params.clone();
                if cfg.mode == "smoothbatch" {
                    State::Smooth { params }
                } else {
                    let (n, nc) = (params.states(), params.channels);
                    State::Rml {
                        params,
                        r: DMatrix::zeros(n, n),
                        s: DMatrix::zeros(nc, n),
                        t: DMatrix::zeros(nc, nc),
                        ess: 0.0,
                    }
                }
            }
            ("readout", AnyModel::Xfads(m)) => {
                let Some(b) = &m.behavior else { return Err("the model has no behaviour readout to refit".into()) };
                let (dd, l) = (b.dims(), m.latents());
                let mut w = DMatrix::zeros(dd, l + 1);
                for i in 0..dd {
                    for j in 0..l {
                        w[(i, j)] = b.d[i * l + j] as f64;
                    }
                    w[(i, l)] = b.bias[i] as f64;
                }
                let lambda = 0.5f64.powf(bin_seconds / half_life);
                State::Readout { w, p: DMatrix::identity(l + 1, l + 1), lambda }
            }
            (mode, m) => {
                let kind = if matches!(m, AnyModel::Kalman(_)) { "a Kalman decoder" } else { "an XFADS model" };
                let fits = if matches!(m, AnyModel::Kalman(_)) { "smoothbatch or rml" } else { "readout" };
                return Err(format!("adapt mode '{mode}' does not apply to {kind} (use {fits})"));
            }
        };
        let mut a = Adaptation {
            cfg,
            state,
            batch_bins,
            rho,
            cursor: history.seen(),
            pending: 0,
            learnt: 0,
            updates: 0,
            ridge,
            refit_cursor: Vec::new(),
            dt: bin_seconds,
            batch: Vec::new(),
        };
        // RML starts from the recent past: one half-life of history, decayed as it would
        // have been.
        if let State::Rml { .. } = a.state {
            let bins = (half_life / bin_seconds) as u64;
            let from = history.seen().saturating_sub(bins);
            let rows: Vec<(Vec<f64>, Vec<f64>)> =
                history.since(from).filter_map(|e| Some((intended_behavior(e)?, to_f64(&e.counts)))).collect();
            let per_bin = 0.5f64.powf(bin_seconds / half_life);
            let k = rows.len();
            for (i, (x, y)) in rows.into_iter().enumerate() {
                a.add_rml(&x, &y, per_bin.powi((k - 1 - i) as i32));
            }
        }
        Ok(a)
    }

    pub fn mode_name(&self) -> &str {
        &self.cfg.mode
    }

    /// The adaptation's state for `status` and replies.
    pub fn state(&self) -> Value {
        json!({
            "mode": self.cfg.mode,
            "batch_bins": self.batch_bins,
            "half_life_seconds": self.cfg.half_life_seconds.unwrap_or(60.0),
            "intention": self.cfg.intention.clone().unwrap_or_else(|| "behavior".into()),
            "bins_learnt": self.learnt,
            "updates": self.updates,
        })
    }

    /// Learns from the history's new bins; an update when a batch is complete.
    pub fn due(&mut self, history: &History, targets: &[Target]) -> Result<Option<Update>, String> {
        let new: Vec<Entry> = history.since(self.cursor).cloned().collect();
        self.cursor = history.seen();
        for e in &new {
            let Some(x) = self.intended(e, targets) else { continue };
            self.learnt += 1;
            match &mut self.state {
                State::Readout { w, p, lambda } => {
                    let mut phi = to_f64(&e.latent);
                    phi.push(1.0);
                    if phi.len() == w.ncols() {
                        rls(w, p, *lambda, &DVector::from_vec(phi), &DVector::from_vec(x));
                        self.pending += 1;
                    }
                }
                _ => {
                    self.batch.push((x, to_f64(&e.counts)));
                    self.pending += 1;
                }
            }
        }
        if self.pending < self.batch_bins {
            return Ok(None);
        }
        self.pending = 0;
        self.updates += 1;
        let batch = std::mem::take(&mut self.batch);
        match &mut self.state {
            State::Readout { w, .. } => {
                let (dd, l1) = (w.nrows(), w.ncols());
                let mut d = Vec::with_capacity(dd * (l1 - 1));
                for i in 0..dd {
                    for j in 0..l1 - 1 {
                        d.push(w[(i, j)] as f32);
                    }
                }
                let bias = (0..dd).map(|i| w[(i, l1 - 1)] as f32).collect();
                Ok(Some(Update::Readout { d, bias }))
            }
            State::Smooth { params } => {
                let (c_hat, q_hat) = fit_cq(&batch, params.states(), params.channels, self.ridge)?;
                let rho = self.rho as f32;
                params.c.iter_mut().zip(&c_hat).for_each(|(c, h)| *c = (1.0 - rho) * *h as f32 + rho * *c);
                params.q.iter_mut().zip(&q_hat).for_each(|(q, h)| *q = (1.0 - rho) * *h as f32 + rho * *q);
                Ok(Some(Update::File(kalman_file(params)?)))
            }
            State::Rml { .. } => {
                let rho = self.rho;
                if let State::Rml { r, s, t, ess, .. } = &mut self.state {
                    *r *= rho;
                    *s *= rho;
                    *t *= rho;
                    *ess *= rho;
                }
                for (x, y) in &batch {
                    self.add_rml(x, y, 1.0);
                }
                let State::Rml { params, r, s, t, ess } = &mut self.state else { unreachable!() };
                let (c, q) = rml_cq(r, s, t, *ess, self.ridge)?;
                params.c = c;
                params.q = q;
                Ok(Some(Update::File(kalman_file(params)?)))
            }
        }
    }

    fn add_rml(&mut self, x: &[f64], y: &[f64], weight: f64) {
        let State::Rml { r, s, t, ess, .. } = &mut self.state else { return };
        let xv = DVector::from_column_slice(x);
        let yv = DVector::from_column_slice(y);
        *r += weight * &xv * xv.transpose();
        *s += weight * &yv * xv.transpose();
        *t += weight * &yv * yv.transpose();
        *ess += weight;
    }

    /// The Kalman state [behaviour; 1] the bin should have had, or the readout's target.
    fn intended(&mut self, e: &Entry, targets: &[Target]) -> Option<Vec<f64>> {
        let b = if self.cfg.intention.as_deref() == Some("refit") {
            self.refit(e, targets)?
        } else {
            e.behavior.as_ref().map(|b| to_f64(b))?
        };
        Some(match self.state {
            State::Readout { .. } => b,
            _ => {
                let mut x = b;
                x.push(1.0);
                x
            }
        })
    }

    /// ReFIT's intended velocity for this bin (see the module doc).
    fn refit(&mut self, e: &Entry, targets: &[Target]) -> Option<Vec<f64>> {
        let t = targets.iter().rev().find(|t| t.after_seq.is_none_or(|s| e.seq > s))?;
        if self.refit_cursor.len() != e.decoded.len() {
            self.refit_cursor = vec![0.0; e.decoded.len()];
        }
        if let Some(c) = &t.cursor {
            if t.after_seq.is_some_and(|s| e.seq == s + 1) {
                self.refit_cursor = to_f64(c);
            }
        }
        let v = to_f64(&e.decoded);
        let intended =
            intended_velocity(&v, &self.refit_cursor, &to_f64(&t.target), self.cfg.hold_radius.unwrap_or(0.0));
        for (c, vi) in self.refit_cursor.iter_mut().zip(&v) {
            *c += vi * self.dt;
        }
        Some(intended)
    }
}

/// ReFIT's innovation 1: the decoded velocity's speed, pointed from the cursor at the
/// target; zero within `hold_radius` of it (holding still is the intention there).
pub fn intended_velocity(decoded: &[f64], cursor: &[f64], target: &[f64], hold_radius: f64) -> Vec<f64> {
    let k = decoded.len().min(cursor.len()).min(target.len());
    let to: Vec<f64> = (0..k).map(|i| target[i] - cursor[i]).collect();
    let dist = to.iter().map(|x| x * x).sum::<f64>().sqrt();
    let speed = decoded.iter().map(|x| x * x).sum::<f64>().sqrt();
    let mut out = vec![0.0; decoded.len()];
    if dist > hold_radius && dist > 0.0 {
        for i in 0..k {
            out[i] = speed * to[i] / dist;
        }
    }
    out
}

fn intended_behavior(e: &Entry) -> Option<Vec<f64>> {
    let mut x = to_f64(e.behavior.as_ref()?);
    x.push(1.0);
    Some(x)
}

fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// One RLS step with forgetting: W (D x p) toward y on features phi (p).
fn rls(w: &mut DMatrix<f64>, p: &mut DMatrix<f64>, lambda: f64, phi: &DVector<f64>, y: &DVector<f64>) {
    let pphi = &*p * phi;
    let denom = lambda + phi.dot(&pphi);
    let k = &pphi / denom;
    let err = y - &*w * phi;
    *w += &err * k.transpose();
    *p = (&*p - &k * pphi.transpose()) / lambda;
    // Keep P symmetric against rounding.
    let sym = (&*p + p.transpose()) * 0.5;
    *p = sym;
}

/// C and Q of a batch: C = Y X^T (X X^T + ridge)^-1, Q = residual covariance (floored).
fn fit_cq(batch: &[(Vec<f64>, Vec<f64>)], n: usize, nc: usize, ridge: f64) -> Result<(Vec<f64>, Vec<f64>), String> {
    if batch.len() < n + 1 {
        return Err(format!("a batch of {} bins is too short to fit {n} states", batch.len()));
    }
    let x = DMatrix::from_fn(n, batch.len(), |i, k| batch[k].0[i]);
    let y = DMatrix::from_fn(nc, batch.len(), |j, k| batch[k].1[j]);
    let xxt = &x * x.transpose();
    let c = solve_right(&(&y * x.transpose()), &xxt, ridge)?;
    let res = &y - &c * &x;
    let mut q = (&res * res.transpose()) / batch.len() as f64;
    floor_q(&mut q);
    Ok((row_major(&c), row_major(&q)))
}

/// C = S (R + ridge)^-1 and Q = (T - S C^T) / ESS (floored).
fn rml_cq(
    r: &DMatrix<f64>,
    s: &DMatrix<f64>,
    t: &DMatrix<f64>,
    ess: f64,
    ridge: f64,
) -> Result<(Vec<f32>, Vec<f32>), String> {
    if ess < r.nrows() as f64 + 1.0 {
        return Err(format!("{ess:.0} bins of statistics cannot fit {} states", r.nrows()));
    }
    let c = solve_right(s, r, ridge)?;
    let mut q = (t - s * c.transpose()) / ess;
    floor_q(&mut q);
    let f = |m: &DMatrix<f64>| row_major(m).into_iter().map(|v| v as f32).collect();
    Ok((f(&c), f(&q)))
}

/// A B^-1 for symmetric B with a relative ridge on its diagonal.
fn solve_right(a: &DMatrix<f64>, b: &DMatrix<f64>, ridge: f64) -> Result<DMatrix<f64>, String> {
    let scale = (b.trace() / b.nrows() as f64).max(1e-12);
    let reg = b + DMatrix::identity(b.nrows(), b.ncols()) * (ridge * scale);
    let chol = reg.cholesky().ok_or("the batch's states are degenerate (no variance to fit on)")?;
    Ok(chol.solve(&a.transpose()).transpose())
}

/// Q symmetric, its diagonal at least 1e-3 of the mean diagonal (a channel silent in the
/// batch keeps a finite precision).
fn floor_q(q: &mut DMatrix<f64>) {
    let sym = (&*q + q.transpose()) * 0.5;
    *q = sym;
    let mean = (q.trace() / q.nrows() as f64).max(1e-9);
    for j in 0..q.nrows() {
        q[(j, j)] = q[(j, j)].max(1e-3 * mean);
    }
}

fn row_major(m: &DMatrix<f64>) -> Vec<f64> {
    (0..m.nrows()).flat_map(|i| (0..m.ncols()).map(move |j| m[(i, j)])).collect()
}

fn kalman_file(params: &KalmanParams) -> Result<ModelFile, String> {
    let p = KalmanParams { c: params.c.clone(), q: params.q.clone(), ..params.clone() };
    Ok(KalmanModel::new(p)?.to_file())
}

/// The model file an update makes of `current`.
pub fn updated_file(current: &Current, update: Update) -> Result<ModelFile, String> {
    match update {
        Update::File(f) => Ok(f),
        Update::Readout { d, bias } => with_readout(current, &d, &bias),
    }
}

/// The file of `current` with its behaviour readout replaced (for `readout` updates).
pub fn with_readout(current: &Current, d: &[f32], bias: &[f32]) -> Result<ModelFile, String> {
    let mut f = current.file.clone();
    let dd = bias.len();
    if dd == 0 || !d.len().is_multiple_of(dd) {
        return Err("a readout update of the wrong shape".into());
    }
    f.insert("behavior.d", Tensor::matrix(dd, d.len() / dd, d.to_vec()));
    f.insert("behavior.bias", Tensor::vector(bias.to_vec()));
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refit_points_the_decoded_speed_at_the_target_and_holds_on_it() {
        let v = intended_velocity(&[3.0, 4.0], &[0.0, 0.0], &[0.0, 10.0], 1.0);
        assert!((v[0] - 0.0).abs() < 1e-12 && (v[1] - 5.0).abs() < 1e-12, "{v:?}");
        let v = intended_velocity(&[-1.0, 0.0], &[1.0, 1.0], &[4.0, 5.0], 1.0);
        assert!((v[0] - 0.6).abs() < 1e-12 && (v[1] - 0.8).abs() < 1e-12, "{v:?}");
        assert_eq!(intended_velocity(&[3.0, 4.0], &[0.0, 9.5], &[0.0, 10.0], 1.0), vec![0.0, 0.0]);
    }

    #[test]
    fn rls_converges_to_the_least_squares_fit() {
        // y = 2 x0 - x1 + 0.5, noiseless: RLS without forgetting finds it from any start.
        let mut w = DMatrix::zeros(1, 3);
        let mut p = DMatrix::identity(3, 3) * 1e3;
        for k in 0..200 {
            let (x0, x1) = ((k as f64 * 0.37).sin(), (k as f64 * 0.11).cos());
            let phi = DVector::from_vec(vec![x0, x1, 1.0]);
            rls(&mut w, &mut p, 1.0, &phi, &DVector::from_vec(vec![2.0 * x0 - x1 + 0.5]));
        }
        // (P0 = 1e3 I is a weak ridge prior toward 0: within 1e-4.)
        for (got, want) in w.iter().zip([2.0, -1.0, 0.5]) {
            assert!((got - want).abs() < 1e-4, "{w}");
        }
    }

    #[test]
    fn the_batch_fit_recovers_c_and_q() {
        // y = C x + noise with known C; Q from the residuals.
        let c_true = [[1.5, -0.5, 2.0], [0.0, 1.0, -1.0]];
        let g = crate::math::philox::Normals::new(3);
        let mut batch = Vec::new();
        for k in 0..4000u64 {
            let mut e = [0.0f32; 4];
            g.fill(k, crate::math::philox::Purpose::Sim, 0, &mut e);
            let x = vec![e[0] as f64, e[1] as f64, 1.0];
            let y = (0..2).map(|j| (0..3).map(|i| c_true[j][i] * x[i]).sum::<f64>() + 0.1 * e[2 + j] as f64).collect();
            batch.push((x, y));
        }
        let (c, q) = fit_cq(&batch, 3, 2, 1e-9).unwrap();
        for j in 0..2 {
            for i in 0..3 {
                assert!((c[j * 3 + i] - c_true[j][i]).abs() < 0.01, "C {c:?}");
            }
            assert!((q[j * 2 + j] - 0.01).abs() < 0.002, "Q {q:?}");
        }
    }
}
