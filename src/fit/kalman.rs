//! Least-squares fit of the Kalman decoder (Wu et al. 2006; ALGORITHM.md section 7).
//!
//! With the state `x_t = [b_t; 1]` (b = behaviour, D dims):
//!
//! - `A = X2 X1^T (X1 X1^T)^-1` over consecutive bins within a trial (X1 = states at t - 1,
//!   X2 = at t): a regression of b_t on b_{t-1} with an intercept, the intercept being A's
//!   last column; A's last row is `[0, ..., 0, 1]`. W = the residual covariance (behaviour
//!   block; the constant's row and column are zero).
//! - `C = Y X^T (X X^T)^-1`: a regression of the counts on b with an intercept (C's last
//!   column, the baseline). Q = the residual covariance, N x N.
//! - x0, P0: the mean and covariance of the behaviour over the training bins (the constant:
//!   1 and 0).
//!
//! Regularisation, all small by default and all relative to the data's own scale:
//! - `ridge` on both regressions ([`lstsq_relative`]): keeps them solvable when a behaviour
//!   dim is constant or dims are collinear;
//! - `w_floor` adds `w_floor * var(b_i)` to W's (and P0's) diagonal on the behaviour dims.
//!   W can be exactly singular (a dim that is a deterministic function of the others, e.g.
//!   position integrating velocity, or constant in training), and the decoder needs the
//!   predicted behaviour covariance positive definite: the information-form update factors
//!   it, and the smoother gain J = P_f A^T P_pred^-1 inverts it. The constant state gets no
//!   floor: it is known exactly, and noise there would turn the channel baselines into
//!   random walks that the filter re-estimates from the data;
//! - `q_floor` adds `q_floor * var(y_j)` to Q's diagonal (a silent channel, with variance
//!   0, uses the mean channel variance), so Q is invertible when a channel never fired.

use super::linreg::{lstsq_relative, Pick};
use crate::data::{Array2, Dataset};
use crate::kalman::{KalmanModel, KalmanParams, SteadyOptions};

/// Fitting choices.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KalmanFitOptions {
    /// Relative ridge of both regressions (see [`lstsq_relative`]).
    pub ridge: f64,
    /// Bins by which the neural data lead the behaviour: neural bin t is paired with
    /// behaviour bin t + lag, so the decoder's state after bin t estimates behaviour t + lag.
    pub lag: usize,
    /// Floor on W's and P0's behaviour diagonal, as a fraction of each dim's variance.
    pub w_floor: f64,
    /// Floor on Q's diagonal, as a fraction of each channel's variance.
    pub q_floor: f64,
    /// Convergence of the steady-state Riccati iteration.
    pub steady: SteadyOptions,
}

impl Default for KalmanFitOptions {
    fn default() -> Self {
        KalmanFitOptions { ridge: 1e-6, lag: 0, w_floor: 1e-6, q_floor: 1e-6, steady: SteadyOptions::default() }
    }
}

/// Column means and (population) variances.
fn moments(a: &Array2) -> (Vec<f64>, Vec<f64>) {
    let (t, c) = (a.rows, a.cols);
    let mut mean = vec![0.0; c];
    for i in 0..t {
        mean.iter_mut().zip(a.row(i)).for_each(|(m, &v)| *m += v as f64);
    }
    mean.iter_mut().for_each(|m| *m /= t.max(1) as f64);
    let mut var = vec![0.0; c];
    for i in 0..t {
        var.iter_mut().zip(a.row(i).iter().zip(&mean)).for_each(|(s, (&v, m))| *s += (v as f64 - m).powi(2));
    }
    var.iter_mut().for_each(|s| *s /= t.max(1) as f64);
    (mean, var)
}

/// Each variance, or (when 0) the mean of the positive ones, or 1.
fn floor_scales(var: &[f64]) -> Vec<f64> {
    let pos: Vec<f64> = var.iter().copied().filter(|&v| v > 0.0).collect();
    let fallback = if pos.is_empty() { 1.0 } else { pos.iter().sum::<f64>() / pos.len() as f64 };
    var.iter().map(|&v| if v > 0.0 { v } else { fallback }).collect()
}

/// Fits the decoder to binned `spikes` (T x N) and `behavior` (T x D). `trial_starts`
/// (first bin of each trial) keeps pairs of bins from straddling a trial boundary.
pub fn fit(
    spikes: &Array2,
    behavior: &Array2,
    trial_starts: Option<&[usize]>,
    dt: f32,
    opts: &KalmanFitOptions,
) -> Result<KalmanModel, String> {
    let (t, nc, d) = (spikes.rows, spikes.cols, behavior.cols);
    if behavior.rows != t {
        return Err(format!("spikes have {t} bins but behaviour has {}", behavior.rows));
    }
    if d == 0 || nc == 0 {
        return Err(format!("need at least one behaviour dim and one channel (got {d} and {nc})"));
    }
    for (what, v) in [("w_floor", opts.w_floor), ("q_floor", opts.q_floor)] {
        if !(v.is_finite() && v >= 0.0) {
            return Err(format!("{what} must be a finite number >= 0, got {v}"));
        }
    }
    // Trial index of each bin.
    let mut trial = vec![0usize; t];
    if let Some(starts) = trial_starts {
        let mut s = starts.to_vec();
        s.sort_unstable();
        if let Some(&bad) = s.iter().find(|&&s| s >= t) {
            return Err(format!("trial start {bad} is beyond the {t} bins"));
        }
        let mut k = 0;
        for (i, tr) in trial.iter_mut().enumerate() {
            while k < s.len() && s[k] <= i {
                k += 1;
            }
            *tr = k;
        }
    }
    let (prev, next): (Vec<usize>, Vec<usize>) =
        (1..t).filter(|&i| trial[i] == trial[i - 1]).map(|i| (i - 1, i)).unzip();
    let lag = opts.lag;
    let (obs_y, obs_x): (Vec<usize>, Vec<usize>) =
        (0..t.saturating_sub(lag)).filter(|&i| trial[i] == trial[i + lag]).map(|i| (i, i + lag)).unzip();
    if prev.is_empty() || obs_y.is_empty() {
        return Err(format!(
            "too few bins to fit: {} consecutive pairs within trials, {} (neural, behaviour) pairs at lag {lag}",
            prev.len(),
            obs_y.len()
        ));
    }

    let dyn_fit = lstsq_relative(
        &Pick { inner: behavior, rows: &prev },
        &Pick { inner: behavior, rows: &next },
        opts.ridge,
        true,
    )
    .map_err(|e| format!("fitting A (behaviour on previous behaviour): {e}"))?;
    let wres = dyn_fit.residual_cov(&Pick { inner: behavior, rows: &prev }, &Pick { inner: behavior, rows: &next });
    let obs_fit = lstsq_relative(
        &Pick { inner: behavior, rows: &obs_x },
        &Pick { inner: spikes, rows: &obs_y },
        opts.ridge,
        true,
    )
    .map_err(|e| format!("fitting C (counts on behaviour): {e}"))?;
    let qres = obs_fit.residual_cov(&Pick { inner: behavior, rows: &obs_x }, &Pick { inner: spikes, rows: &obs_y });

    let (bmean, bvar) = moments(behavior);
    let (_, yvar) = moments(spikes);
    let (bscale, yscale) = (floor_scales(&bvar), floor_scales(&yvar));
    let n = d + 1;
    let mut a = vec![0.0f32; n * n];
    let mut w = vec![0.0f32; n * n];
    let mut p0 = vec![0.0f32; n * n];
    let mut c = vec![0.0f32; nc * n];
    let mut q = vec![0.0f32; nc * nc];
    for i in 0..d {
        for j in 0..d {
            a[i * n + j] = dyn_fit.weight(i, j) as f32;
            let floor = if i == j { opts.w_floor * bscale[i] } else { 0.0 };
            w[i * n + j] = (wres[i * d + j] + floor) as f32;
        }
        a[i * n + d] = dyn_fit.bias[i] as f32;
    }
    a[d * n + d] = 1.0;
    // P0: the behaviour's covariance over the training bins.
    let mut bcov = vec![0.0f64; d * d];
    for r in 0..t {
        let row = behavior.row(r);
        for i in 0..d {
            for j in 0..d {
                bcov[i * d + j] += (row[i] as f64 - bmean[i]) * (row[j] as f64 - bmean[j]);
            }
        }
    }
    bcov.iter_mut().for_each(|v| *v /= t as f64);
    for i in 0..d {
        for j in 0..d {
            let floor = if i == j { opts.w_floor * bscale[i] } else { 0.0 };
            p0[i * n + j] = (bcov[i * d + j] + floor) as f32;
        }
    }
    for i in 0..nc {
        for j in 0..d {
            c[i * n + j] = obs_fit.weight(i, j) as f32;
        }
        c[i * n + d] = obs_fit.bias[i] as f32;
        for j in 0..nc {
            let floor = if i == j { opts.q_floor * yscale[i] } else { 0.0 };
            q[i * nc + j] = (qres[i * nc + j] + floor) as f32;
        }
    }
    let mut x0: Vec<f32> = bmean.iter().map(|&m| m as f32).collect();
    x0.push(1.0);
    let params = KalmanParams { behavior_dims: d, channels: nc, dt, lag, a, w, c, q, x0, p0 };
    KalmanModel::with_steady_options(params, &opts.steady)
}

/// [`fit`] on a session: its spikes, behaviour (required), trial starts and dt.
pub fn fit_dataset(data: &Dataset, opts: &KalmanFitOptions) -> Result<KalmanModel, String> {
    let behavior = data.behavior.as_ref().ok_or("the data set has no behaviour to fit a Kalman decoder to")?;
    fit(&data.spikes, behavior, data.trial_starts.as_deref(), data.dt, opts)
}
