//! The Kalman decoder's model: parameters, the file layout, and the quantities derived once
//! at load (steady state, the information-form terms of the exact recursion).

use crate::model::card::{read_kind, ModelKind, FORMAT, FORMAT_VERSION};
use crate::model::{ModelFile, Tensor};
use nalgebra::DMatrix;

/// The linear-Gaussian model over the state `x = [behaviour (D); 1]` (n = D + 1 entries):
///
/// ```text
/// x_t = A x_{t-1} + w_t,  w_t ~ N(0, W)        x_0 ~ N(x0, P0)
/// y_t = C x_t + v_t,      v_t ~ N(0, Q)
/// ```
///
/// Matrices are row-major f32, as stored in the file. The constant component is exact: A's
/// last row is `[0, ..., 0, 1]`, W's and P0's last row and column are zero, `x0[D] = 1`, so
/// C's last column is the baseline of each channel.
#[derive(Clone, Debug, PartialEq)]
pub struct KalmanParams {
    /// D, the behaviour dims.
    pub behavior_dims: usize,
    /// N, the channels.
    pub channels: usize,
    /// Bin width in seconds.
    pub dt: f32,
    /// Bins by which the neural data lead the behaviour: the state after neural bin t is the
    /// behaviour at bin t + lag (the fit paired them so). Score outputs against behaviour
    /// shifted by `lag`.
    pub lag: usize,
    /// A, n x n.
    pub a: Vec<f32>,
    /// W, n x n.
    pub w: Vec<f32>,
    /// C, N x n.
    pub c: Vec<f32>,
    /// Q, N x N.
    pub q: Vec<f32>,
    /// x0, n.
    pub x0: Vec<f32>,
    /// P0, n x n.
    pub p0: Vec<f32>,
}

/// The steady-state filter and lag-1 smoother, all n x n or n x N, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct SteadyState {
    /// Kalman gain K, n x N (last row zero).
    pub k: Vec<f32>,
    /// M = (I - K C) A, n x n (last row `[0, ..., 0, 1]`).
    pub m: Vec<f32>,
    /// Lag-1 smoother gain J = P_f A^T P_pred^-1 on the behaviour block, n x n (last row and
    /// column zero: the constant is known exactly).
    pub j: Vec<f32>,
    /// Filtered covariance P_f, n x n.
    pub p_filt: Vec<f32>,
    /// Predicted covariance P_pred = A P_f A^T + W, n x n.
    pub p_pred: Vec<f32>,
}

/// Convergence of the offline Riccati iteration.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SteadyOptions {
    /// Stop when `max |P_pred(k+1) - P_pred(k)| <= tol * max |P_pred(k+1)|`. The iteration
    /// runs in f64, so 1e-10 leaves the gain exact to far below f32 resolution.
    pub tol: f64,
    /// Give up (an error) after this many iterations.
    pub max_iter: usize,
}

impl Default for SteadyOptions {
    fn default() -> Self {
        SteadyOptions { tol: 1e-10, max_iter: 100_000 }
    }
}

/// What the exact recursion needs from Q^-1, computed once (f32, see `filter`):
/// `H = C_b^T Q^-1` (stored transposed, N x D), `G = C_b^T Q^-1 C_b` (D x D) and
/// `h_c = C_b^T Q^-1 c` (D), with C = [C_b, c].
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct InfoForm {
    pub ht: Vec<f32>,
    pub g: Vec<f32>,
    pub hc: Vec<f32>,
}

/// A Kalman decoder ready to run: the parameters and what is derived from them.
#[derive(Clone, Debug, PartialEq)]
pub struct KalmanModel {
    pub params: KalmanParams,
    pub steady: SteadyState,
    pub(crate) info: InfoForm,
}

/// Tensor names in the model file.
pub const TENSORS: [&str; 6] = ["kalman.a", "kalman.w", "kalman.c", "kalman.q", "kalman.x0", "kalman.p0"];
/// The stored steady state (optional in a file: computed at load when all are absent).
pub const STEADY_TENSORS: [&str; 5] = ["kalman.k_ss", "kalman.m_ss", "kalman.j_ss", "kalman.p_ss", "kalman.p_ss_pred"];

pub(crate) fn dm(v: &[f32], rows: usize, cols: usize) -> DMatrix<f64> {
    DMatrix::from_fn(rows, cols, |i, j| v[i * cols + j] as f64)
}

pub(crate) fn rows_f32(m: &DMatrix<f64>) -> Vec<f32> {
    (0..m.nrows() * m.ncols()).map(|k| m[(k / m.ncols(), k % m.ncols())] as f32).collect()
}

fn symmetrise(m: &mut DMatrix<f64>) {
    let t = m.transpose();
    *m += t;
    *m *= 0.5;
}

/// P_f = (P_p^-1 + G)^-1, evaluated as L (I + L^T G L)^-1 L^T with P_p = L L^T: neither P_p
/// nor the result is inverted, and I + L^T G L has eigenvalues >= 1.
fn info_update(pp: &DMatrix<f64>, g: &DMatrix<f64>) -> Option<DMatrix<f64>> {
    let d = pp.nrows();
    let l = pp.clone().cholesky()?.unpack();
    let m = DMatrix::identity(d, d) + l.transpose() * g * &l;
    let x = m.cholesky()?.solve(&l.transpose());
    let mut pf = &l * x;
    symmetrise(&mut pf);
    Some(pf)
}

impl KalmanParams {
    /// The same decoder with `channels` treated as missing: their rows of C are 0 and their
    /// rows and columns of Q are those of an independent unit noise, so that C^T Q^-1 has
    /// zero columns for them and C^T Q^-1 C is the sum over the other channels alone: exactly
    /// the decoder with those rows dropped, still reading N channels.
    pub fn masked(&self, channels: &[usize]) -> Result<KalmanParams, String> {
        let (nc, n) = (self.channels, self.states());
        let mut p = self.clone();
        for &j in channels {
            if j >= nc {
                return Err(format!("channel {j} is out of range (the decoder reads {nc})"));
            }
            p.c[j * n..(j + 1) * n].fill(0.0);
            for k in 0..nc {
                p.q[j * nc + k] = 0.0;
                p.q[k * nc + j] = 0.0;
            }
            p.q[j * nc + j] = 1.0;
        }
        Ok(p)
    }

    /// n = D + 1.
    pub fn states(&self) -> usize {
        self.behavior_dims + 1
    }

    /// Checks sizes, the exact constant component, symmetry and positive definiteness,
    /// naming the tensor at fault.
    pub fn validate(&self) -> Result<(), String> {
        let (d, nc) = (self.behavior_dims, self.channels);
        let n = d + 1;
        if d == 0 || nc == 0 {
            return Err(format!("behavior_dims ({d}) and channels ({nc}) must be positive"));
        }
        if !(self.dt.is_finite() && self.dt > 0.0) {
            return Err(format!("dt must be a positive number of seconds, got {}", self.dt));
        }
        for (name, v, len) in [
            ("kalman.a", &self.a, n * n),
            ("kalman.w", &self.w, n * n),
            ("kalman.c", &self.c, nc * n),
            ("kalman.q", &self.q, nc * nc),
            ("kalman.x0", &self.x0, n),
            ("kalman.p0", &self.p0, n * n),
        ] {
            if v.len() != len {
                return Err(format!("tensor '{name}' has {} values, expected {len}", v.len()));
            }
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return Err(format!("tensor '{name}' has a non-finite value at flat index {i}"));
            }
        }
        if (0..n).any(|j| self.a[d * n + j] != if j == d { 1.0 } else { 0.0 }) {
            return Err("tensor 'kalman.a': the last row (the constant state) must be [0, ..., 0, 1]".into());
        }
        for (name, m) in [("kalman.w", &self.w), ("kalman.p0", &self.p0)] {
            if (0..n).any(|j| m[d * n + j] != 0.0 || m[j * n + d] != 0.0) {
                return Err(format!("tensor '{name}': the last row and column (the constant state) must be zero"));
            }
        }
        if self.x0[d] != 1.0 {
            return Err(format!(
                "tensor 'kalman.x0': the last entry (the constant state) must be 1, got {}",
                self.x0[d]
            ));
        }
        for (name, m, size, block) in
            [("kalman.w", &self.w, n, d), ("kalman.p0", &self.p0, n, d), ("kalman.q", &self.q, nc, nc)]
        {
            for i in 0..block {
                for j in 0..i {
                    let (a, b) = (m[i * size + j] as f64, m[j * size + i] as f64);
                    let scale = (m[i * size + i] as f64 * m[j * size + j] as f64).abs().sqrt();
                    if (a - b).abs() > 1e-5 * scale + 1e-30 {
                        return Err(format!("tensor '{name}' is not symmetric at [{i}, {j}] ({a} vs {b})"));
                    }
                }
            }
            let sub = DMatrix::from_fn(block, block, |i, j| m[i * size + j] as f64);
            if sub.cholesky().is_none() {
                let what = if name == "kalman.q" { "" } else { " on the behaviour dims" };
                return Err(format!("tensor '{name}' is not positive definite{what}"));
            }
        }
        Ok(())
    }

    fn blocks(&self) -> Blocks {
        let (d, n, nc) = (self.behavior_dims, self.states(), self.channels);
        let a = dm(&self.a, n, n);
        let c = dm(&self.c, nc, n);
        let mut w = dm(&self.w, n, n).view((0, 0), (d, d)).into_owned();
        let mut p0 = dm(&self.p0, n, n).view((0, 0), (d, d)).into_owned();
        let mut q = dm(&self.q, nc, nc);
        symmetrise(&mut w);
        symmetrise(&mut p0);
        symmetrise(&mut q);
        let cb = c.view((0, 0), (nc, d)).into_owned();
        let cc = c.column(d).into_owned();
        // validate() has checked Q > 0.
        let qinv_cb = q.cholesky().expect("Q is positive definite").solve(&cb);
        let g = {
            let mut g = cb.transpose() * &qinv_cb;
            symmetrise(&mut g);
            g
        };
        let hc = qinv_cb.transpose() * &cc;
        Blocks { ab: a.view((0, 0), (d, d)).into_owned(), a, c, w, p0, g, ht: qinv_cb, hc }
    }

    /// Iterates the Riccati recursion from P0 (the first bin's prior) to its fixed point and
    /// returns the steady state with the number of iterations. Errors if it has not
    /// converged after `opts.max_iter` iterations (an unstable, unobservable model) or the
    /// algebra broke down.
    pub fn steady_state(&self, opts: &SteadyOptions) -> Result<(SteadyState, usize), String> {
        self.validate()?;
        let b = self.blocks();
        let (d, n, nc) = (self.behavior_dims, self.states(), self.channels);
        let broke = || "the Riccati recursion lost positive definiteness (badly scaled W or Q?)".to_string();
        let mut pp = b.p0.clone();
        let mut change = f64::INFINITY;
        let mut iterations = 0;
        while iterations < opts.max_iter {
            iterations += 1;
            let pf = info_update(&pp, &b.g).ok_or_else(broke)?;
            let mut next = &b.ab * pf * b.ab.transpose() + &b.w;
            symmetrise(&mut next);
            let scale = next.amax();
            change = (&next - &pp).amax() / if scale > 0.0 { scale } else { 1.0 };
            if !change.is_finite() {
                return Err(broke());
            }
            pp = next;
            if change <= opts.tol {
                break;
            }
        }
        if change > opts.tol {
            return Err(format!(
                "the steady-state Riccati recursion did not converge in {} iterations (last relative change \
                 {change:.2e}, tolerance {:.1e}); is A unstable on dims the channels do not observe?",
                opts.max_iter, opts.tol
            ));
        }
        let pf = info_update(&pp, &b.g).ok_or_else(broke)?;
        // K_b = P_f C_b^T Q^-1; J_b = P_f A_b^T P_pred^-1.
        let kb = &pf * b.ht.transpose();
        let jb = pp.clone().cholesky().ok_or_else(broke)?.solve(&(&b.ab * &pf)).transpose();
        let mut k = DMatrix::<f64>::zeros(n, nc);
        k.view_mut((0, 0), (d, nc)).copy_from(&kb);
        let mut m = (DMatrix::<f64>::identity(n, n) - &k * &b.c) * &b.a;
        m.row_mut(d).fill(0.0);
        m[(d, d)] = 1.0;
        let embed = |blk: &DMatrix<f64>| {
            let mut full = DMatrix::<f64>::zeros(n, n);
            full.view_mut((0, 0), (d, d)).copy_from(blk);
            rows_f32(&full)
        };
        let steady =
            SteadyState { k: rows_f32(&k), m: rows_f32(&m), j: embed(&jb), p_filt: embed(&pf), p_pred: embed(&pp) };
        Ok((steady, iterations))
    }
}

/// f64 blocks of the parameters (b = behaviour block).
struct Blocks {
    a: DMatrix<f64>,
    ab: DMatrix<f64>,
    c: DMatrix<f64>,
    w: DMatrix<f64>,
    p0: DMatrix<f64>,
    g: DMatrix<f64>,
    /// Q^-1 C_b, N x D.
    ht: DMatrix<f64>,
    hc: nalgebra::DVector<f64>,
}

impl KalmanModel {
    /// Validates the parameters and computes the steady state (default tolerance).
    pub fn new(params: KalmanParams) -> Result<Self, String> {
        Self::with_steady_options(params, &SteadyOptions::default())
    }

    pub fn with_steady_options(params: KalmanParams, opts: &SteadyOptions) -> Result<Self, String> {
        let (steady, _) = params.steady_state(opts)?;
        Self::with_steady(params, steady)
    }

    /// Uses a steady state computed elsewhere (e.g. read from a file) after checking its
    /// shapes and its exact constant component.
    pub fn with_steady(params: KalmanParams, steady: SteadyState) -> Result<Self, String> {
        params.validate()?;
        let (d, n, nc) = (params.behavior_dims, params.states(), params.channels);
        for (name, v, len) in [
            ("kalman.k_ss", &steady.k, n * nc),
            ("kalman.m_ss", &steady.m, n * n),
            ("kalman.j_ss", &steady.j, n * n),
            ("kalman.p_ss", &steady.p_filt, n * n),
            ("kalman.p_ss_pred", &steady.p_pred, n * n),
        ] {
            if v.len() != len {
                return Err(format!("tensor '{name}' has {} values, expected {len}", v.len()));
            }
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return Err(format!("tensor '{name}' has a non-finite value at flat index {i}"));
            }
        }
        if steady.k[d * nc..].iter().any(|&v| v != 0.0) {
            return Err("tensor 'kalman.k_ss': the last row (the constant state) must be zero".into());
        }
        if (0..n).any(|j| steady.m[d * n + j] != if j == d { 1.0 } else { 0.0 }) {
            return Err("tensor 'kalman.m_ss': the last row (the constant state) must be [0, ..., 0, 1]".into());
        }
        if (0..n).any(|j| steady.j[d * n + j] != 0.0 || steady.j[j * n + d] != 0.0) {
            return Err("tensor 'kalman.j_ss': the last row and column (the constant state) must be zero".into());
        }
        let b = params.blocks();
        let info = InfoForm { ht: rows_f32(&b.ht), g: rows_f32(&b.g), hc: b.hc.iter().map(|&v| v as f32).collect() };
        Ok(KalmanModel { params, steady, info })
    }

    pub fn behavior_dims(&self) -> usize {
        self.params.behavior_dims
    }
    pub fn channels(&self) -> usize {
        self.params.channels
    }
    /// n = D + 1 (the behaviour and the constant).
    pub fn states(&self) -> usize {
        self.params.states()
    }

    /// The model file: tensors `kalman.*` and the card (format, format_version, kind, channels,
    /// behavior_dims, states, dt, lag).
    pub fn to_file(&self) -> ModelFile {
        let p = &self.params;
        let (n, nc) = (p.states(), p.channels);
        let mut f = ModelFile::default();
        f.set_meta("format", FORMAT);
        f.set_meta("format_version", FORMAT_VERSION);
        f.set_meta("kind", ModelKind::Kalman);
        f.set_meta("channels", nc);
        f.set_meta("behavior_dims", p.behavior_dims);
        f.set_meta("states", n);
        f.set_meta("dt", p.dt);
        f.set_meta("lag", p.lag);
        f.insert("kalman.a", Tensor::matrix(n, n, p.a.clone()));
        f.insert("kalman.w", Tensor::matrix(n, n, p.w.clone()));
        f.insert("kalman.c", Tensor::matrix(nc, n, p.c.clone()));
        f.insert("kalman.q", Tensor::matrix(nc, nc, p.q.clone()));
        f.insert("kalman.x0", Tensor::vector(p.x0.clone()));
        f.insert("kalman.p0", Tensor::matrix(n, n, p.p0.clone()));
        let s = &self.steady;
        f.insert("kalman.k_ss", Tensor::matrix(n, nc, s.k.clone()));
        f.insert("kalman.m_ss", Tensor::matrix(n, n, s.m.clone()));
        f.insert("kalman.j_ss", Tensor::matrix(n, n, s.j.clone()));
        f.insert("kalman.p_ss", Tensor::matrix(n, n, s.p_filt.clone()));
        f.insert("kalman.p_ss_pred", Tensor::matrix(n, n, s.p_pred.clone()));
        f
    }

    /// Reads a model file written by [`to_file`](Self::to_file) (or by any tool following
    /// its layout). The steady-state tensors are optional as a group: when all are absent
    /// they are computed here (default [`SteadyOptions`]).
    pub fn from_file(f: &ModelFile) -> Result<Self, String> {
        match read_kind(f)? {
            ModelKind::Kalman => {}
            other => return Err(format!("this is a {other} model, not a kalman one")),
        }
        let nc: usize = f.meta_req("channels")?;
        let d: usize = f.meta_req("behavior_dims")?;
        let dt: f32 = f.meta_req("dt")?;
        let lag: usize = f.meta_opt("lag")?.unwrap_or(0);
        if d == 0 || nc == 0 {
            return Err(format!("behavior_dims ({d}) and channels ({nc}) must be positive"));
        }
        let n = d + 1;
        if let Some(s) = f.meta_opt::<usize>("states")? {
            if s != n {
                return Err(format!("metadata 'states' = {s} but behavior_dims + 1 = {n}"));
            }
        }
        let sq = |name: &str, what: &str| f.get(name, &[n, n], what).map(<[f32]>::to_vec);
        let params = KalmanParams {
            behavior_dims: d,
            channels: nc,
            dt,
            lag,
            a: sq("kalman.a", "state transition A, n x n with n = behavior_dims + 1")?,
            w: sq("kalman.w", "process noise covariance W, n x n")?,
            c: f.get("kalman.c", &[nc, n], "observation matrix C, channels x n")?.to_vec(),
            q: f.get("kalman.q", &[nc, nc], "observation noise covariance Q, channels x channels")?.to_vec(),
            x0: f.get("kalman.x0", &[n], "initial state mean, n")?.to_vec(),
            p0: sq("kalman.p0", "initial state covariance P0, n x n")?,
        };
        let present: Vec<&str> = STEADY_TENSORS.iter().copied().filter(|t| f.has(t)).collect();
        if present.is_empty() {
            return Self::new(params);
        }
        if let Some(missing) = STEADY_TENSORS.iter().find(|t| !f.has(t)) {
            return Err(format!(
                "missing tensor '{missing}' (the steady-state tensors {} come all together or not at all)",
                STEADY_TENSORS.join(", ")
            ));
        }
        let steady = SteadyState {
            k: f.get("kalman.k_ss", &[n, nc], "steady-state gain K, n x channels")?.to_vec(),
            m: sq("kalman.m_ss", "steady-state transition (I - K C) A, n x n")?,
            j: sq("kalman.j_ss", "steady-state lag-1 smoother gain J, n x n")?,
            p_filt: sq("kalman.p_ss", "steady-state filtered covariance, n x n")?,
            p_pred: sq("kalman.p_ss_pred", "steady-state predicted covariance, n x n")?,
        };
        Self::with_steady(params, steady)
    }
}
