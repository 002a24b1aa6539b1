//! The filter against exact dense references (f64, nalgebra).

use latentloop::filter::{Filter, FilterOptions};
use latentloop::math::philox::{Normals, Purpose};
use latentloop::model::{build, XfadsModel};
use nalgebra::{DMatrix, DVector};
use std::sync::Arc;

/// A stable 4-D rotation-and-decay system observed through 6 noisy channels.
struct Lgs {
    a: DMatrix<f64>,
    bias: DVector<f64>,
    c: DMatrix<f64>,
    b: DVector<f64>,
    model: Arc<XfadsModel>,
}

fn system(samples: usize) -> Lgs {
    let (l, n) = (4usize, 6usize);
    let (cs, sn) = (0.3f64.cos() * 0.97, 0.3f64.sin() * 0.97);
    let a =
        DMatrix::from_row_slice(l, l, &[cs, -sn, 0.0, 0.0, sn, cs, 0.0, 0.0, 0.0, 0.0, 0.9, 0.2, 0.0, 0.0, 0.0, 0.8]);
    let bias = DVector::from_row_slice(&[0.1, 0.0, -0.05, 0.02]);
    let c = DMatrix::from_fn(n, l, |i, j| (((i * 5 + j * 3) % 7) as f64 - 3.0) / 3.0);
    let b = DVector::from_fn(n, |i, _| 0.1 * i as f64);
    let f32v = |m: &DMatrix<f64>| -> Vec<f32> {
        (0..m.nrows()).flat_map(|i| (0..m.ncols()).map(move |j| (i, j))).map(|(i, j)| m[(i, j)] as f32).collect()
    };
    let file = build::linear_gaussian(
        &f32v(&a),
        &bias.iter().map(|&x| x as f32).collect::<Vec<_>>(),
        &[0.05, 0.08, 0.03, 0.06],
        &f32v(&c),
        &b.iter().map(|&x| x as f32).collect::<Vec<_>>(),
        &[0.5, 0.4, 0.6, 0.3, 0.5, 0.7],
        &[0.5, -0.5, 0.0, 0.2],
        &[1.0, 0.8, 1.2, 0.5],
        samples,
        0.02,
    );
    Lgs { a, bias, c, b, model: Arc::new(XfadsModel::compile(&file).unwrap()) }
}

fn dvec(v: &[f32]) -> DVector<f64> {
    DVector::from_iterator(v.len(), v.iter().map(|&x| x as f64))
}
fn diag(v: &[f32]) -> DMatrix<f64> {
    DMatrix::from_diagonal(&dvec(v))
}

/// Observations simulated from the model itself.
fn simulate(sys: &Lgs, bins: usize, seed: u64) -> Vec<Vec<f32>> {
    let m = &sys.model;
    let (l, n) = (m.latents(), m.channels());
    let g = Normals::new(seed);
    let mut w = vec![0.0f32; l + n];
    let r: Vec<f64> = match &m.readout {
        latentloop::model::Readout::Gaussian { r, .. } => r.iter().map(|&x| x as f64).collect(),
        _ => unreachable!(),
    };
    let mut z = dvec(&m.m0);
    (0..bins)
        .map(|t| {
            g.fill(t as u64, Purpose::Sim, 0, &mut w);
            if t > 0 {
                z = &sys.a * &z + &sys.bias;
            }
            let q = if t == 0 { &m.q0 } else { &m.q };
            for i in 0..l {
                z[i] += (q[i] as f64).sqrt() * w[i] as f64;
            }
            let y = &sys.c * &z + &sys.b;
            (0..n).map(|j| (y[j] + r[j].sqrt() * w[l + j] as f64) as f32).collect()
        })
        .collect()
}

struct KfStep {
    mean: DVector<f64>,
    cov: DMatrix<f64>,
    lag1: DVector<f64>,
}

/// The exact Kalman filter and one-step RTS smoother. Step 0 conditions the prior (m0, Q0).
fn kalman(sys: &Lgs, ys: &[Vec<f32>]) -> Vec<KfStep> {
    let m = &sys.model;
    let r = match &m.readout {
        latentloop::model::Readout::Gaussian { r, .. } => diag(r),
        _ => unreachable!(),
    };
    let (mut mu, mut p) = (dvec(&m.m0), diag(&m.q0));
    let mut out = Vec::new();
    for (t, y) in ys.iter().enumerate() {
        let (mp, pp) = if t == 0 {
            (mu.clone(), p.clone())
        } else {
            (&sys.a * &mu + &sys.bias, &sys.a * &p * sys.a.transpose() + diag(&m.q))
        };
        let s = &sys.c * &pp * sys.c.transpose() + &r;
        let gain = &pp * sys.c.transpose() * s.clone().try_inverse().unwrap();
        let mf = &mp + &gain * (dvec(y) - &sys.c * &mp - &sys.b);
        let pf = &pp - &gain * &sys.c * &pp;
        let lag1 = if t == 0 {
            mu.clone()
        } else {
            &mu + &p * sys.a.transpose() * pp.clone().try_inverse().unwrap() * (&mf - &mp)
        };
        mu = mf;
        p = pf;
        out.push(KfStep { mean: mu.clone(), cov: p.clone(), lag1 });
    }
    out
}

/// With S = 4096 samples the sample-based predictive covariance has relative error about
/// sqrt(2/S) = 2.2% and the predicted mean an error of about 1/sqrt(S) = 1.6% of a posterior
/// standard deviation per bin; the filter damps both. So the errors, in units of the exact
/// posterior standard deviation, should have an RMS of a few percent; a wrong formula (a
/// missing P_p, S-1 for S, a bias term dropped) gives errors of order one.
#[test]
fn filter_matches_dense_kalman_filter_and_rts_smoother_over_300_bins() {
    let sys = system(4096);
    let ys = simulate(&sys, 300, 11);
    let kf = kalman(&sys, &ys);
    let mut f = Filter::new(sys.model.clone(), FilterOptions { samples: None, seed: 3 });
    let (mut sq, mut sq_lag, mut worst, mut worst_lag, mut count) = (0.0f64, 0.0f64, 0.0f64, 0.0f64, 0usize);
    for (t, y) in ys.iter().enumerate() {
        f.step(Some(y)).unwrap();
        let want = &kf[t];
        for i in 0..4 {
            let sd = want.cov[(i, i)].sqrt();
            let e = (f.mean()[i] as f64 - want.mean[i]) / sd;
            sq += e * e;
            worst = worst.max(e.abs());
            if t > 0 {
                let prev_sd = kf[t - 1].cov[(i, i)].sqrt();
                let el = (f.lag1_mean()[i] as f64 - want.lag1[i]) / prev_sd;
                sq_lag += el * el;
                worst_lag = worst_lag.max(el.abs());
            }
        }
        count += 1;
    }
    let rms = (sq / (4 * count) as f64).sqrt();
    let rms_lag = (sq_lag / (4 * (count - 1)) as f64).sqrt();
    eprintln!("filtered: rms {rms:.4} max {worst:.4} sd; lag-1: rms {rms_lag:.4} max {worst_lag:.4} sd");
    assert!(rms < 0.05 && worst < 0.2, "filtered mean off the Kalman filter: rms {rms}, max {worst} sd");
    assert!(rms_lag < 0.05 && worst_lag < 0.2, "lag-1 mean off the RTS smoother: rms {rms_lag}, max {worst_lag} sd");
}

/// Everything the update computes, by dense f64 algebra, from the previous samples.
struct Dense {
    mf: DVector<f64>,
    pf: DMatrix<f64>,
    lag1: DVector<f64>,
    kl: f64,
}

fn dense_step(model: &XfadsModel, zprev: &[f32], mprev: &[f32], y: &[f32], s: usize) -> Dense {
    let l = model.latents();
    let mut fz = vec![0.0f32; s * l];
    let mut scr = model.dynamics.scratch(s);
    model.dynamics.apply(zprev, &mut fz, &mut scr);
    let fm = DMatrix::from_row_slice(s, l, &fz.iter().map(|&x| x as f64).collect::<Vec<_>>());
    let zm = DMatrix::from_row_slice(s, l, &zprev.iter().map(|&x| x as f64).collect::<Vec<_>>());
    let mp = fm.row_mean().transpose();
    let zbar = zm.row_mean().transpose();
    let sq = (s as f64).sqrt();
    let m = DMatrix::from_fn(l, s, |i, j| (fm[(j, i)] - mp[i]) / sq);
    let nz = DMatrix::from_fn(l, s, |i, j| (zm[(j, i)] - zbar[i]) / sq);
    let pp = &m * m.transpose() + diag(&model.q);
    let r = model.rank();
    let mut kk = vec![0.0f32; (r + 1) * l];
    let mut oscr = model.observation.scratch();
    let mp32: Vec<f32> = mp.iter().map(|&x| x as f32).collect();
    model.observation.potential(y, &mp32, &mut kk, &mut oscr);
    let k = dvec(&kk[..l]);
    let kmat = DMatrix::from_row_slice(l, r, &kk[l..].iter().map(|&x| x as f64).collect::<Vec<_>>());
    let ppi = pp.clone().try_inverse().unwrap();
    let pf = (&ppi + &kmat * kmat.transpose()).try_inverse().unwrap();
    let mf = &pf * (&ppi * &mp + &k);
    let lag1 = dvec(mprev) + &nz * m.transpose() * &ppi * (&mf - &mp);
    let d = &mf - &mp;
    let kl = 0.5
        * ((&ppi * &pf).trace() - l as f64 + (d.transpose() * &ppi * &d)[(0, 0)] + pp.determinant().ln()
            - pf.determinant().ln());
    Dense { mf, pf, lag1, kl }
}

fn close(what: &str, got: &[f32], want: &DVector<f64>, tol: f64) {
    let scale = want.amax().max(1.0);
    for i in 0..got.len() {
        assert!((got[i] as f64 - want[i]).abs() <= tol * scale, "{what}[{i}]: {} vs {}", got[i], want[i]);
    }
}

/// The low-rank forms (P_p h = m_p + P_p k, m_f via A = I + K^T P_p K, P_p^-1 (m_f - m_p) =
/// k - K c, the r x r KL) equal the dense formulas with P_p = M M^T + Q formed and inverted,
/// for every update kind. Deterministic given the previous samples, so the tolerance is f32
/// rounding (1e-3 relative on these well-conditioned 3- to 5-dimensional problems).
#[test]
fn low_rank_update_equals_dense_algebra_for_every_update_kind() {
    use latentloop::model::{Card, DynamicsKind, ReadoutKind, UpdateKind};
    let sys = system(7);
    let ys = simulate(&sys, 12, 5);
    let mut models = vec![("gaussian + linear", sys.model.clone(), ys.clone())];
    for (update, readout, dynamics) in [
        (UpdateKind::PoissonLaplace, ReadoutKind::Poisson, DynamicsKind::Mlp),
        (UpdateKind::Encoder, ReadoutKind::Poisson, DynamicsKind::Gru),
        (UpdateKind::Encoder, ReadoutKind::None, DynamicsKind::Node),
    ] {
        let n = 6;
        let card = Card {
            latents: 3,
            channels: n,
            dt: 0.02,
            samples: 9,
            dynamics,
            hidden: 8,
            rmsnorm: dynamics == DynamicsKind::Gru,
            substeps: 2,
            update,
            rank: if update == UpdateKind::Encoder { 2 } else { n },
            encoder_hidden: 5,
            readout,
            readout_latents: 2,
            behavior_dims: 0,
        };
        let file = build::random(&card, 9, 0.1, 0.5);
        let model = Arc::new(XfadsModel::compile(&file).unwrap());
        let counts: Vec<Vec<f32>> = (0..12).map(|t| (0..n).map(|j| ((t * 7 + j * 3) % 4) as f32).collect()).collect();
        models.push((update.as_str(), model, counts));
    }
    for (label, model, ys) in models {
        let mut f = Filter::new(model.clone(), FilterOptions { samples: None, seed: 1 });
        let s = f.samples();
        for (t, y) in ys.iter().enumerate() {
            let (zprev, mprev) = (f.sample_matrix().to_vec(), f.mean().to_vec());
            let info = f.step(Some(y)).unwrap();
            if t < 2 {
                continue; // the prior step has M = 0: covered by the Kalman test
            }
            let d = dense_step(&model, &zprev, &mprev, y, s);
            close(&format!("{label} m_f (t={t})"), f.mean(), &d.mf, 1e-3);
            close(&format!("{label} lag-1 (t={t})"), f.lag1_mean(), &d.lag1, 1e-3);
            assert!(
                (info.kl as f64 - d.kl).abs() <= 1e-3 * d.kl.abs().max(1.0),
                "{label} KL (t={t}): {} vs {}",
                info.kl,
                d.kl
            );
            assert!(d.pf.trace() > 0.0);
        }
    }
}

/// The posterior draws z_s = m_f + e_s - P_p K A^-1 (K^T e_s + w_s) are exact draws of
/// N(m_f, P_f): with S = 8192 the sample covariance, in correlation units, has standard
/// error <= sqrt(2/S) = 0.016, and the sample mean 1/sqrt(S) = 0.011 sd; bounds are 5x.
#[test]
fn posterior_draws_have_mean_m_f_and_covariance_p_f() {
    let s = 8192;
    let sys = system(s);
    let ys = simulate(&sys, 6, 2);
    let mut f = Filter::new(sys.model.clone(), FilterOptions { samples: None, seed: 4 });
    for y in &ys[..5] {
        f.step(Some(y)).unwrap();
    }
    let (zprev, mprev) = (f.sample_matrix().to_vec(), f.mean().to_vec());
    f.step(Some(&ys[5])).unwrap();
    let d = dense_step(&sys.model, &zprev, &mprev, &ys[5], s);
    let l = 4;
    let z = DMatrix::from_row_slice(s, l, &f.sample_matrix().iter().map(|&x| x as f64).collect::<Vec<_>>());
    let mean = z.row_mean().transpose();
    let centred = DMatrix::from_fn(s, l, |i, j| z[(i, j)] - mean[j]);
    let cov = centred.transpose() * &centred / s as f64;
    for i in 0..l {
        let sd = d.pf[(i, i)].sqrt();
        assert!(((mean[i] - d.mf[i]) / sd).abs() < 5.0 / (s as f64).sqrt(), "sample mean {i}");
        for j in 0..l {
            let e = (cov[(i, j)] - d.pf[(i, j)]) / (d.pf[(i, i)] * d.pf[(j, j)]).sqrt();
            assert!(e.abs() < 5.0 * (2.0 / s as f64).sqrt(), "cov[{i},{j}]: {} vs {}", cov[(i, j)], d.pf[(i, j)]);
        }
    }
}
