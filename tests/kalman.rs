//! The Kalman decoder: the least-squares fit against a simulated linear system, both decoding
//! modes against a dense f64 Kalman filter + one-step RTS smoother, the model file, and the
//! allocation-free per-bin path.

use latentloop::any_model::{AnyModel, DecoderOptions};
use latentloop::data::{Array2, Dataset};
use latentloop::decoder::{BinError, Decoder};
use latentloop::eval::evaluate;
use latentloop::fit::kalman::{fit, fit_dataset, KalmanFitOptions};
use latentloop::kalman::{KalmanFilter, KalmanMode, KalmanModel, KalmanParams, SteadyOptions};
use latentloop::math::philox::{Normals, Purpose};
use latentloop::model::{ModelFile, Tensor};
use nalgebra::{DMatrix, DVector};
use std::sync::Arc;

#[path = "common/alloc_count.rs"]
mod alloc_count;

// ---- the simulated system ----

/// x_t = A_b x_{t-1} + a + w (D = 2, a damped rotation); y_t = C_b x_{t+lag} + c + v (N = 6),
/// W and Q full (correlated noise).
struct Truth {
    ab: DMatrix<f64>,
    a: DVector<f64>,
    w: DMatrix<f64>,
    cb: DMatrix<f64>,
    c: DVector<f64>,
    q: DMatrix<f64>,
}

const D: usize = 2;
const N: usize = 6;

fn truth() -> Truth {
    let (cs, sn) = (0.95 * 0.2f64.cos(), 0.95 * 0.2f64.sin());
    let mut q = DMatrix::from_diagonal(&DVector::from_row_slice(&[0.3, 0.2, 0.5, 0.4, 0.25, 0.35]));
    q[(0, 1)] = 0.05;
    q[(1, 0)] = 0.05;
    q[(2, 4)] = -0.08;
    q[(4, 2)] = -0.08;
    Truth {
        ab: DMatrix::from_row_slice(D, D, &[cs, -sn, sn, cs]),
        a: DVector::from_row_slice(&[0.05, -0.02]),
        w: DMatrix::from_row_slice(D, D, &[0.02, 0.005, 0.005, 0.01]),
        cb: DMatrix::from_row_slice(N, D, &[1.0, 0.0, 0.5, -1.2, -0.8, 0.3, 2.0, 1.0, 0.0, 0.7, -0.4, -1.5]),
        c: DVector::from_row_slice(&[1.0, 0.5, 2.0, 0.8, 1.5, 0.3]),
        q,
    }
}

/// T bins of (spikes-like observations, behaviour). Noise from Philox normals, fixed seed.
fn simulate(tr: &Truth, t: usize, lag: usize, seed: u64) -> (Array2, Array2) {
    let g = Normals::new(seed);
    let lw = tr.w.clone().cholesky().unwrap().l();
    let lq = tr.q.clone().cholesky().unwrap().l();
    let mut z = vec![0.0f32; D + N];
    let mut x = DVector::<f64>::zeros(D);
    let mut xs = Vec::with_capacity(t + lag);
    // Burn-in of 200 bins so the process starts stationary.
    for k in 0..t + lag + 200 {
        g.fill(k as u64, Purpose::Sim, 0, &mut z);
        let e = DVector::from_iterator(D, z[..D].iter().map(|&v| v as f64));
        x = &tr.ab * &x + &tr.a + &lw * e;
        if k >= 200 {
            xs.push(x.clone());
        }
    }
    let mut y = Vec::with_capacity(t * N);
    for k in 0..t {
        g.fill(k as u64, Purpose::Sim, 1, &mut z);
        let e = DVector::from_iterator(N, z[D..].iter().map(|&v| v as f64));
        let yk = &tr.cb * &xs[k + lag] + &tr.c + &lq * e;
        y.extend(yk.iter().map(|&v| v as f32));
    }
    let b: Vec<f32> = xs[..t].iter().flat_map(|x| x.iter().map(|&v| v as f32)).collect::<Vec<_>>();
    (Array2::new(t, N, y), Array2::new(t, D, b))
}

fn f32v(m: &DMatrix<f64>) -> Vec<f32> {
    (0..m.nrows() * m.ncols()).map(|k| m[(k / m.ncols(), k % m.ncols())] as f32).collect()
}

/// The true model as KalmanParams (state [x; 1]).
fn true_params(tr: &Truth) -> KalmanParams {
    let n = D + 1;
    let mut a = DMatrix::<f64>::zeros(n, n);
    a.view_mut((0, 0), (D, D)).copy_from(&tr.ab);
    a.view_mut((0, D), (D, 1)).copy_from(&tr.a);
    a[(D, D)] = 1.0;
    let mut w = DMatrix::<f64>::zeros(n, n);
    w.view_mut((0, 0), (D, D)).copy_from(&tr.w);
    let mut c = DMatrix::<f64>::zeros(N, n);
    c.view_mut((0, 0), (N, D)).copy_from(&tr.cb);
    c.view_mut((0, D), (N, 1)).copy_from(&tr.c);
    let mut p0 = DMatrix::<f64>::zeros(n, n);
    p0.view_mut((0, 0), (D, D)).copy_from(&(DMatrix::identity(D, D) * 0.5));
    KalmanParams {
        behavior_dims: D,
        channels: N,
        dt: 0.02,
        lag: 0,
        a: f32v(&a),
        w: f32v(&w),
        c: f32v(&c),
        q: f32v(&tr.q),
        x0: vec![0.3, -0.2, 1.0],
        p0: f32v(&p0),
    }
}

fn dm(v: &[f32], r: usize, c: usize) -> DMatrix<f64> {
    DMatrix::from_fn(r, c, |i, j| v[i * c + j] as f64)
}

/// Centred Gram matrix of the rows `idx` of `a` and the column means.
fn gram(a: &Array2, idx: &[usize]) -> (DMatrix<f64>, DVector<f64>) {
    let k = a.cols;
    let mut mean = DVector::<f64>::zeros(k);
    for &i in idx {
        mean += DVector::from_iterator(k, a.row(i).iter().map(|&v| v as f64));
    }
    mean /= idx.len() as f64;
    let mut g = DMatrix::<f64>::zeros(k, k);
    for &i in idx {
        let v = DVector::from_iterator(k, a.row(i).iter().map(|&v| v as f64)) - &mean;
        g += &v * v.transpose();
    }
    (g, mean)
}

/// Asserts that each entry of `est` = [W | b] (outputs x (p + 1)) is within 5 standard
/// errors of `tru`: s.e.(W_oj) = sqrt(noise_oo [G^-1]_jj) and s.e.(b_o) =
/// sqrt(noise_oo (1/T + m^T G^-1 m)), with G the centred Gram matrix and m the means of the
/// regressor rows `idx` of `x`. Returns the largest error in standard errors.
fn within_se(
    what: &str,
    est: &DMatrix<f64>,
    tru: &DMatrix<f64>,
    noise: &DMatrix<f64>,
    x: &Array2,
    idx: &[usize],
) -> f64 {
    let (g, mx) = gram(x, idx);
    let ginv = g.try_inverse().unwrap();
    let p = x.cols;
    let mut worst = 0.0f64;
    for o in 0..tru.nrows() {
        for j in 0..=p {
            let v = if j < p { ginv[(j, j)] } else { 1.0 / idx.len() as f64 + (mx.transpose() * &ginv * &mx)[(0, 0)] };
            let se = (noise[(o, o)] * v).sqrt();
            let z = (est[(o, j)] - tru[(o, j)]).abs() / se;
            assert!(z <= 5.0, "{what}[{o},{j}]: {} vs {} ({z:.1} s.e. of {se:.1e})", est[(o, j)], tru[(o, j)]);
            worst = worst.max(z);
        }
    }
    worst
}

/// A sample covariance of n Gaussian vectors has s.e. sqrt((S_ii S_jj + S_ij^2) / n) per entry.
fn cov_within_se(what: &str, est: &DMatrix<f64>, tru: &DMatrix<f64>, rows: usize) {
    for i in 0..tru.nrows() {
        for j in 0..tru.ncols() {
            let se = ((tru[(i, i)] * tru[(j, j)] + tru[(i, j)].powi(2)) / rows as f64).sqrt();
            let err = (est[(i, j)] - tru[(i, j)]).abs();
            assert!(err <= 5.0 * se, "{what}[{i},{j}]: {} vs {} ({:.1} s.e.)", est[(i, j)], tru[(i, j)], err / se);
        }
    }
}

// ---- (a) the fit ----

/// T = 20,000 bins. The coefficients are compared within 5 standard errors computed from the
/// sample itself (s.e.(A_ij) = sqrt(W_ii [(X1c X1c^T)^-1]_jj) ~ 3e-3 here, s.e.(C_ij) =
/// sqrt(Q_ii [(Xc Xc^T)^-1]_jj) ~ 1e-2), the covariances within 5 s.e. of a sample
/// covariance (relative s.e. about sqrt(2/T) = 1%). The default ridge and floors (1e-6 of
/// the data's scale) move nothing by more than ~1e-6.
#[test]
fn fit_recovers_a_c_w_q_of_a_simulated_linear_system() {
    let tr = truth();
    let t = 20_000;
    let (y, b) = simulate(&tr, t, 0, 7);
    let model = fit(&y, &b, None, 0.02, &KalmanFitOptions::default()).unwrap();
    let p = &model.params;
    let n = D + 1;
    let a = dm(&p.a, n, n);
    let c = dm(&p.c, N, n);
    let (prev, all): (Vec<usize>, Vec<usize>) = ((0..t - 1).collect(), (0..t).collect());
    let mut ta = DMatrix::<f64>::zeros(D, n);
    ta.view_mut((0, 0), (D, D)).copy_from(&tr.ab);
    ta.set_column(D, &tr.a);
    let mut tc = DMatrix::<f64>::zeros(N, n);
    tc.view_mut((0, 0), (N, D)).copy_from(&tr.cb);
    tc.set_column(D, &tr.c);
    let za = within_se("A", &a.rows(0, D).into_owned(), &ta, &tr.w, &b, &prev);
    let zc = within_se("C", &c, &tc, &tr.q, &b, &all);
    eprintln!("largest errors: A {za:.2} s.e., C {zc:.2} s.e.");
    cov_within_se("W", &dm(&p.w, n, n).view((0, 0), (D, D)).into_owned(), &tr.w, t - 1);
    cov_within_se("Q", &dm(&p.q, N, N), &tr.q, t);
    // The constant is exact.
    assert_eq!(&p.a[D * n..], &[0.0, 0.0, 1.0]);
    assert!(p.w[D * n..].iter().all(|&v| v == 0.0) && (0..n).all(|i| p.w[i * n + D] == 0.0));
    assert_eq!(p.x0[D], 1.0);
    // x0, P0: the behaviour's mean and covariance (stationary mean (I - A_b)^-1 a).
    let stat = (DMatrix::identity(D, D) - &tr.ab).try_inverse().unwrap() * &tr.a;
    for i in 0..D {
        assert!((p.x0[i] as f64 - stat[i]).abs() < 0.05, "x0[{i}] = {} vs {}", p.x0[i], stat[i]);
    }
    // Fitted on one rotation of noise, the decoder tracks the behaviour: R^2 well above 0.
    let mut f = KalmanFilter::new(Arc::new(model), KalmanMode::Exact);
    let dec = f.decode(&y).unwrap();
    let r2 = latentloop::metrics::behavior_r2(&dec, &b);
    assert!(r2 > 0.5, "behaviour R^2 {r2}");
}

/// Neural data that lead the behaviour by 3 bins are fitted at lag 3 (C recovered, lag kept
/// in the model), not at lag 0.
#[test]
fn fit_with_a_lag_pairs_neural_bin_t_with_behaviour_t_plus_lag() {
    let tr = truth();
    let t = 8_000;
    let (y, b) = simulate(&tr, t, 3, 21);
    let opts = KalmanFitOptions { lag: 3, ..Default::default() };
    let model = fit(&y, &b, None, 0.02, &opts).unwrap();
    assert_eq!(model.params.lag, 3);
    let n = D + 1;
    let c = dm(&model.params.c, N, n);
    let worst = (0..N).flat_map(|i| (0..D).map(move |j| (i, j))).map(|(i, j)| (c[(i, j)] - tr.cb[(i, j)]).abs());
    let worst = worst.fold(0.0f64, f64::max);
    // s.e. ~ sqrt(0.5 / (8000 * 0.08)) = 0.03.
    assert!(worst < 0.15, "C off by {worst} at lag 3");
    let lag0 = fit(&y, &b, None, 0.02, &KalmanFitOptions::default()).unwrap();
    let c0 = dm(&lag0.params.c, N, n);
    let worst0 = (0..N).flat_map(|i| (0..D).map(move |j| (i, j))).map(|(i, j)| (c0[(i, j)] - tr.cb[(i, j)]).abs());
    assert!(worst0.fold(0.0f64, f64::max) > 0.3, "lag 0 should not fit lagged data");
}

/// Two trials, the second starting far away (x = [50, 50], then decaying under the same
/// dynamics): the boundary pair must not enter the A fit.
#[test]
fn fit_skips_pairs_across_trial_boundaries() {
    let tr = truth();
    let t = 4_000;
    let (mut y, mut b) = simulate(&tr, t, 0, 3);
    let half = t / 2;
    // Adding a homogeneous solution h_k = A_b^k h_0 (and C_b h_k to y) keeps the trial a
    // trajectory of the same linear system.
    let mut h = DVector::from_row_slice(&[50.0, 50.0]);
    for i in half..t {
        b.row_mut(i).iter_mut().zip(h.iter()).for_each(|(v, h)| *v += *h as f32);
        let ch = &tr.cb * &h;
        y.row_mut(i).iter_mut().zip(ch.iter()).for_each(|(v, h)| *v += *h as f32);
        h = &tr.ab * h;
    }
    let data = Dataset {
        spikes: y.clone(),
        behavior: Some(b.clone()),
        dt: 0.02,
        trial_starts: Some(vec![0, half]),
        ..Default::default()
    };
    let with = fit_dataset(&data, &KalmanFitOptions::default()).unwrap();
    let without = fit(&y, &b, None, 0.02, &KalmanFitOptions::default()).unwrap();
    let n = D + 1;
    // One residual of ~50 in 4000 bins inflates W by ~50^2/4000 = 0.6 >> 0.02.
    assert!((with.params.w[0] - 0.02).abs() < 0.005, "W with trials {}", with.params.w[0]);
    assert!(without.params.w[0] > 0.2, "W without trials {}", without.params.w[0]);
    assert!(with.params.w[n + 1] < 0.02);
    // Decoding starts each trial from the prior: evaluating the session equals evaluating
    // its two trials one after the other.
    let model = AnyModel::Kalman(Arc::new(with));
    let (_, whole) = evaluate(&model, &data, DecoderOptions::default()).unwrap();
    for (a, b) in [(0, half), (half, t)] {
        let (_, part) = evaluate(&model, &data.slice(a, b), DecoderOptions::default()).unwrap();
        assert_eq!(part.means, whole.means.rows_range(a, b), "trial {a}..{b}");
        assert_eq!(part.behavior, whole.behavior.rows_range(a, b), "trial {a}..{b}");
    }
    let (_, joined) =
        evaluate(&model, &Dataset { trial_starts: None, ..data.clone() }, DecoderOptions::default()).unwrap();
    assert_ne!(joined.means.rows_range(half, t), whole.means.rows_range(half, t));
    let e = fit_dataset(&Dataset { behavior: None, ..data }, &KalmanFitOptions::default()).unwrap_err();
    assert!(e.contains("no behaviour"), "{e}");
}

#[test]
fn fit_errors_are_clear() {
    let y = Array2::new(3, 1, vec![1., 2., 3.]);
    let b = Array2::new(2, 1, vec![1., 2.]);
    assert!(fit(&y, &b, None, 0.02, &KalmanFitOptions::default()).unwrap_err().contains("3 bins but behaviour has 2"));
    let b1 = Array2::new(1, 1, vec![1.]);
    let y1 = Array2::new(1, 1, vec![1.]);
    assert!(fit(&y1, &b1, None, 0.02, &KalmanFitOptions::default()).unwrap_err().contains("too few bins"));
    let b3 = Array2::new(3, 1, vec![1., 5., 2.]);
    assert!(fit(&y, &b3, Some(&[0, 7]), 0.02, &KalmanFitOptions::default()).unwrap_err().contains("trial start 7"));
    let mut yn = y.clone();
    yn.data[1] = f32::NAN;
    let e = fit(&yn, &b3, None, 0.02, &KalmanFitOptions::default()).unwrap_err();
    assert!(e.contains("fitting C") && e.contains("not finite"), "{e}");
}

// ---- (b) decoding against the dense reference ----

struct RefStep {
    x: DVector<f64>,
    p: DMatrix<f64>,
    lag1: DVector<f64>,
    kl: f64,
}

/// The textbook filter on the full state (N x N innovation covariance, explicit inverse),
/// f64. The lag-1 mean is computed by conditioning on y_t directly, independently of the
/// RTS formula: x_{t-1|t} = x_{t-1} + Cov(x_{t-1}, y_t) S^-1 (y_t - C x_p) with
/// Cov(x_{t-1}, y_t) = P_{t-1} A^T C^T. KL(q_t || pred) over the behaviour block.
fn reference(p: &KalmanParams, ys: &[Option<Vec<f32>>]) -> Vec<RefStep> {
    let (n, nc) = (p.states(), p.channels);
    let (a, w, c, q) = (dm(&p.a, n, n), dm(&p.w, n, n), dm(&p.c, nc, n), dm(&p.q, nc, nc));
    let mut x = DVector::from_iterator(n, p.x0.iter().map(|&v| v as f64));
    let mut pm = dm(&p.p0, n, n);
    let mut out = Vec::new();
    for (t, y) in ys.iter().enumerate() {
        let (xp, pp) = if t == 0 { (x.clone(), pm.clone()) } else { (&a * &x, &a * &pm * a.transpose() + &w) };
        let step = match y {
            None => RefStep { x: xp.clone(), p: pp.clone(), lag1: x.clone(), kl: 0.0 },
            Some(y) => {
                let s = &c * &pp * c.transpose() + &q;
                let sinv = s.try_inverse().unwrap();
                let innov = DVector::from_iterator(nc, y.iter().map(|&v| v as f64)) - &c * &xp;
                let k = &pp * c.transpose() * &sinv;
                let xf = &xp + &k * &innov;
                let pf = &pp - &k * &c * &pp;
                let lag1 = if t == 0 { x.clone() } else { &x + &pm * a.transpose() * c.transpose() * &sinv * &innov };
                let d = n - 1;
                let ppb = pp.view((0, 0), (d, d)).into_owned();
                let pfb = pf.view((0, 0), (d, d)).into_owned();
                let ppi = ppb.clone().try_inverse().unwrap();
                let delta = (&xf - &xp).rows(0, d).into_owned();
                let kl = 0.5
                    * ((&ppi * &pfb).trace() - d as f64
                        + (delta.transpose() * &ppi * &delta)[(0, 0)]
                        + ppb.determinant().ln()
                        - pfb.determinant().ln());
                RefStep { x: xf, p: pf, lag1, kl }
            }
        };
        x = step.x.clone();
        pm = step.p.clone();
        out.push(step);
    }
    out
}

fn bins(y: &Array2, gaps: impl Fn(usize) -> bool) -> Vec<Option<Vec<f32>>> {
    (0..y.rows).map(|t| if gaps(t) { None } else { Some(y.row(t).to_vec()) }).collect()
}

/// Exact mode (f32, information form) equals the dense f64 filter and the conditioning form
/// of the lag-1 smoother over 400 bins with gaps, within 5e-6 of the values' scale (f32
/// rounding is ~1e-7 relative per operation on this 2 x 2 well-conditioned algebra, and the
/// error does not accumulate because the filter forgets at rate |eig(M)| < 1; observed
/// ~2e-7). A wrong gain, smoother or prior step gives errors of order 1e-2 or more. Also
/// the covariance and the KL.
#[test]
fn exact_mode_equals_dense_kalman_filter_and_one_step_smoother() {
    let tr = truth();
    let params = true_params(&tr);
    let model = Arc::new(KalmanModel::new(params.clone()).unwrap());
    let (y, _) = simulate(&tr, 400, 0, 5);
    let ys = bins(&y, |t| t % 37 == 5 || t == 200 || t == 201);
    let want = reference(&params, &ys);
    let mut f = KalmanFilter::new(model, KalmanMode::Exact);
    let (mut worst, mut worst_lag, mut worst_kl) = (0.0f64, 0.0f64, 0.0f64);
    for (t, y) in ys.iter().enumerate() {
        let info = f.step(y.as_deref()).unwrap();
        assert_eq!(info.predict_only, y.is_none());
        assert!(!info.reset);
        assert_eq!(info.step, t as u64);
        let w = &want[t];
        let scale = w.x.amax().max(1.0);
        for i in 0..D + 1 {
            worst = worst.max((f.mean()[i] as f64 - w.x[i]).abs() / scale);
            worst_lag = worst_lag.max((f.lag1_mean()[i] as f64 - w.lag1[i]).abs() / scale);
        }
        for i in 0..D {
            for j in 0..D {
                let e = (f.behavior_cov()[i * D + j] as f64 - w.p[(i, j)]).abs() / w.p[(i, i)];
                assert!(e < 2e-5, "P[{i},{j}] at t={t}: {} vs {}", f.behavior_cov()[i * D + j], w.p[(i, j)]);
            }
        }
        worst_kl = worst_kl.max((info.kl as f64 - w.kl).abs() / w.kl.abs().max(1.0));
        assert_eq!(f.mean()[D], 1.0);
        assert_eq!(f.behavior(), &f.mean()[..D]);
    }
    eprintln!("exact vs dense f64: mean {worst:.2e}, lag-1 {worst_lag:.2e}, KL {worst_kl:.2e} (relative)");
    assert!(worst < 5e-6, "filtered mean off by {worst}");
    assert!(worst_lag < 5e-6, "lag-1 mean off by {worst_lag}");
    assert!(worst_kl < 2e-5, "KL off by {worst_kl}");
}

/// The steady state is the Riccati fixed point (checked with the textbook N x N form), the
/// exact filter's covariance converges to it, and the steady-state decoder converges to the
/// exact one: the gains differ by a factor decaying geometrically (here ~0.5 per bin), so
/// after 100 bins the outputs agree to f32 rounding.
#[test]
fn steady_state_is_the_riccati_fixed_point_and_converges_to_exact() {
    let tr = truth();
    let params = true_params(&tr);
    let model = Arc::new(KalmanModel::new(params.clone()).unwrap());
    let (n, nc) = (D + 1, N);
    let s = &model.steady;
    let (a, w, c, q) = (dm(&params.a, n, n), dm(&params.w, n, n), dm(&params.c, nc, n), dm(&params.q, nc, nc));
    let pp = dm(&s.p_pred, n, n);
    let sinv = (&c * &pp * c.transpose() + &q).try_inverse().unwrap();
    let k = &pp * c.transpose() * &sinv;
    let pf = &pp - &k * &c * &pp;
    let pp_next = &a * &pf * a.transpose() + &w;
    assert!((&pp_next - &pp).amax() < 1e-6 * pp.amax(), "P_pred is not a fixed point");
    assert!((&pf - dm(&s.p_filt, n, n)).amax() < 1e-6 * pf.amax());
    assert!((&k - dm(&s.k, n, nc)).amax() < 1e-6 * k.amax().max(1e-3));
    let m = (DMatrix::identity(n, n) - &k * &c) * &a;
    assert!((&m - dm(&s.m, n, n)).amax() < 1e-6);
    // J = P_f A^T P_pred^+ on the behaviour block.
    let jb = pf.view((0, 0), (D, D))
        * a.view((0, 0), (D, D)).transpose()
        * pp.view((0, 0), (D, D)).into_owned().try_inverse().unwrap();
    assert!((&jb - dm(&s.j, n, n).view((0, 0), (D, D))).amax() < 1e-6);
    assert_eq!(&s.k[D * nc..], &[0.0; N]);
    assert_eq!(&s.m[D * n..], &[0.0, 0.0, 1.0]);

    let (y, _) = simulate(&tr, 600, 0, 9);
    let ys = bins(&y, |t| t == 300);
    let mut exact = KalmanFilter::new(model.clone(), KalmanMode::Exact);
    let mut steady = KalmanFilter::new(model.clone(), KalmanMode::SteadyState);
    let sd: Vec<f64> = (0..D).map(|i| (s.p_filt[i * n + i] as f64).sqrt()).collect();
    let mut first = 0.0f64;
    for (t, y) in ys.iter().enumerate() {
        let (ie, is) = (exact.step(y.as_deref()).unwrap(), steady.step(y.as_deref()).unwrap());
        assert_eq!((ie.predict_only, is.predict_only), (y.is_none(), y.is_none()));
        assert_eq!(steady.mean()[D], 1.0);
        let err = (0..D).map(|i| (exact.mean()[i] - steady.mean()[i]).abs() as f64 / sd[i]).fold(0.0, f64::max);
        let err_lag =
            (0..D).map(|i| (exact.lag1_mean()[i] - steady.lag1_mean()[i]).abs() as f64 / sd[i]).fold(0.0, f64::max);
        if t == 0 {
            first = err;
        }
        // After the predict-only bin at 300 the exact filter's covariance grows, so the modes
        // differ again for a while: only bins clear of both transients are compared tightly.
        if (100..300).contains(&t) || t >= 400 {
            assert!(err < 1e-4 && err_lag < 1e-4, "t={t}: steady state off exact by {err:.2e} / {err_lag:.2e} sd");
        }
    }
    assert!(first > 1e-3, "the transient should be visible at t = 0 (prior P0 differs): {first}");
    for i in 0..D * D {
        let (e, sref) = (exact.behavior_cov()[i], s.p_filt[(i / D) * n + i % D]);
        assert!((e - sref).abs() < 1e-5 * s.p_filt[0].abs(), "exact P did not converge to the steady state");
        assert_eq!(steady.behavior_cov()[i], sref);
    }
}

/// The Decoder trait's contract: sizes, refused bins leave the state untouched, reset, and
/// no heap allocation in predict or step in either mode.
#[test]
fn decoder_contract_and_no_allocation_per_bin() {
    let tr = truth();
    let model = Arc::new(KalmanModel::new(true_params(&tr)).unwrap());
    let (y, _) = simulate(&tr, 300, 0, 13);
    for mode in [KalmanMode::Exact, KalmanMode::SteadyState] {
        let mut dec: Box<dyn Decoder> = Box::new(KalmanFilter::new(model.clone(), mode));
        assert_eq!((dec.channels(), dec.latents(), dec.behavior_dims()), (N, D + 1, D));
        assert_eq!(dec.mean(), &[0.3, -0.2, 1.0]);
        for t in 0..50 {
            dec.step(Some(y.row(t))).unwrap();
        }
        let before = (dec.mean().to_vec(), dec.lag1_mean().to_vec());
        assert_eq!(dec.step(Some(&[1.0; 5])).unwrap_err(), BinError::WrongLength { got: 5, want: N });
        let mut bad = y.row(50).to_vec();
        bad[4] = f32::INFINITY;
        assert!(matches!(dec.step(Some(&bad)).unwrap_err(), BinError::NonFinite { channel: 4, .. }));
        assert_eq!((dec.mean().to_vec(), dec.lag1_mean().to_vec()), before);

        alloc_count::assert_counter_counts();
        let start = alloc_count::on_this_thread();
        for t in 50..300 {
            if t % 3 == 0 {
                dec.predict();
            }
            let info = if t % 50 == 7 { dec.step(None) } else { dec.step(Some(y.row(t))) }.unwrap();
            assert!(!info.reset);
            std::hint::black_box(dec.behavior());
        }
        dec.reset();
        dec.step(Some(y.row(0))).unwrap();
        let used = alloc_count::on_this_thread() - start;
        assert_eq!(used, 0, "{mode:?}: {used} heap allocations in 251 bins");

        // A bin that overflows the update resets to the prior instead of publishing inf.
        let info = dec.step(Some(&[f32::MAX; N])).unwrap();
        assert!(dec.mean().iter().all(|v| v.is_finite()), "{mode:?}: {:?}", dec.mean());
        // (Exact: H y overflows here; the steady gain is small enough to stay finite.)
        assert_eq!(info.reset, mode == KalmanMode::Exact);
        if info.reset {
            assert!(info.predict_only);
            assert_eq!(dec.mean(), &[0.3, -0.2, 1.0]);
        }
        dec.reset();
        dec.step(Some(y.row(0))).unwrap();

        // After reset, decoding restarts exactly as from new.
        let mut fresh = KalmanFilter::new(model.clone(), mode);
        fresh.step(Some(y.row(0))).unwrap();
        assert_eq!(dec.mean(), fresh.mean());
        assert_eq!(dec.lag1_mean(), &[0.3, -0.2, 1.0]);
    }
}

// ---- (c) the model file ----

#[test]
fn model_file_round_trips_and_errors_name_the_problem() {
    let tr = truth();
    let (y, b) = simulate(&tr, 3_000, 0, 17);
    let model = fit(&y, &b, None, 0.02, &KalmanFitOptions { lag: 2, ..Default::default() }).unwrap();
    let file = model.to_file();
    assert_eq!(file.meta["kind"], "kalman");
    assert_eq!(file.meta["lag"], "2");
    let back = KalmanModel::from_file(&ModelFile::from_bytes(&file.to_bytes()).unwrap()).unwrap();
    assert_eq!(back, model);
    // Without the steady-state tensors they are recomputed, identically.
    let mut bare = file.clone();
    for name in latentloop::kalman::STEADY_TENSORS {
        bare.tensors.remove(name);
    }
    assert_eq!(KalmanModel::from_file(&bare).unwrap(), model);

    let err = |f: &ModelFile| KalmanModel::from_file(f).unwrap_err();
    let mut g = file.clone();
    g.tensors.remove("kalman.q");
    let e = err(&g);
    assert!(e.contains("missing tensor 'kalman.q'"), "{e}");
    let mut g = file.clone();
    g.insert("kalman.c", Tensor::matrix(3, N, vec![0.0; 3 * N]));
    let e = err(&g);
    assert!(e.contains("tensor 'kalman.c' has shape [3, 6], expected [6, 3]"), "{e}");
    let mut g = file.clone();
    g.set_meta("kind", "xfads");
    assert!(err(&g).contains("this is a xfads model, not a kalman one"));
    let mut g = file.clone();
    g.set_meta("kind", "hmm");
    let e = err(&g);
    assert!(e.contains("metadata 'kind' = 'hmm'") && e.contains("expected one of: xfads, kalman"), "{e}");
    let mut g = file.clone();
    g.meta.remove("format");
    assert!(err(&g).contains("no latentloop model card"));
    let mut g = file.clone();
    g.meta.remove("behavior_dims");
    assert!(err(&g).contains("'behavior_dims' is missing"));
    let mut g = file.clone();
    g.tensors.remove("kalman.j_ss");
    let e = err(&g);
    assert!(e.contains("missing tensor 'kalman.j_ss'") && e.contains("all together"), "{e}");
    let mut g = file.clone();
    g.tensors.get_mut("kalman.a").unwrap().data[D * (D + 1)] = 0.1;
    assert!(err(&g).contains("tensor 'kalman.a': the last row"));
    let mut g = file.clone();
    g.tensors.get_mut("kalman.q").unwrap().data.fill(0.0);
    assert!(err(&g).contains("tensor 'kalman.q' is not positive definite"));
    let mut g = file.clone();
    g.tensors.get_mut("kalman.k_ss").unwrap().data[D * N] = 1.0;
    assert!(err(&g).contains("tensor 'kalman.k_ss'"));
}

#[test]
fn riccati_that_does_not_converge_is_an_error() {
    // x_0 grows by 1.1 per bin and no channel sees it.
    let mut p = true_params(&truth());
    let n = D + 1;
    p.a[0] = 1.1;
    p.a[1] = 0.0;
    p.a[n] = 0.0;
    for i in 0..N {
        p.c[i * n] = 0.0;
    }
    let e = KalmanModel::with_steady_options(p, &SteadyOptions { tol: 1e-10, max_iter: 200 }).unwrap_err();
    assert!(e.contains("did not converge in 200 iterations"), "{e}");
}

/// A mask drops the channels' rows exactly: the masked decoder (N channels read, two of them
/// masked) decodes like the decoder built without those channels on the data without them,
/// in both modes, whatever the masked channels carry.
#[test]
fn a_masked_decoder_equals_the_decoder_without_those_channels() {
    let tr = truth();
    let params = true_params(&tr);
    let (y, _) = simulate(&tr, 300, 0, 21);
    let drop = [1usize, 4];
    let keep: Vec<usize> = (0..N).filter(|j| !drop.contains(j)).collect();
    let n = params.states();
    let mut reduced = params.clone();
    reduced.channels = keep.len();
    reduced.c = keep.iter().flat_map(|&j| params.c[j * n..(j + 1) * n].to_vec()).collect();
    reduced.q =
        keep.iter().flat_map(|&i| keep.iter().map(move |&j| (i, j))).map(|(i, j)| params.q[i * N + j]).collect();
    let masked = KalmanModel::new(params.masked(&drop).unwrap()).unwrap();
    let reduced = KalmanModel::new(reduced).unwrap();
    for mode in [KalmanMode::Exact, KalmanMode::SteadyState] {
        let mut a = KalmanFilter::new(Arc::new(masked.clone()), mode);
        let mut b = KalmanFilter::new(Arc::new(reduced.clone()), mode);
        for t in 0..300 {
            let mut full = y.row(t).to_vec();
            // Whatever the dropped channels say must not matter.
            full[1] = 1e3 * (t % 7) as f32;
            full[4] = -5.0;
            let part: Vec<f32> = keep.iter().map(|&j| y.row(t)[j]).collect();
            a.step(Some(&full)).unwrap();
            b.step(Some(&part)).unwrap();
            for (x, z) in a.mean().iter().chain(a.lag1_mean()).zip(b.mean().iter().chain(b.lag1_mean())) {
                assert!((x - z).abs() <= 1e-4 * z.abs().max(1.0), "{mode:?} bin {t}: {:?} vs {:?}", a.mean(), b.mean());
            }
        }
    }
    assert!(params.masked(&[N]).unwrap_err().contains("out of range"));
}
