//! Models made by the reference XFADS code (tests/fixtures/xfads, catniplab/xfads d5ccf5dc),
//! converted by `python -m latentloop import-xfads` and decoded by latentloop: the first
//! bin's filtered mean equals the reference's closed form, and at S = 1000 the filtered
//! means agree with the reference's own Monte-Carlo run within both runs' spread. And each
//! thing the loader must not decode silently is refused, by name.

mod common;

use latentloop::any_model::AnyModel;
use latentloop::filter::{Filter, FilterOptions};
use latentloop::model::{ModelFile, Tensor, XfadsModel};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/xfads")
}

/// `python -m latentloop import-xfads` on a fixture; (exit status, stderr).
fn import(py: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(py)
        .args(["-m", "latentloop", "import-xfads"])
        .args(args)
        .env("PYTHONPATH", PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python"))
        .output()
        .unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The fixture `name` converted into `dir`.
fn converted(py: &Path, dir: &Path, name: &str, rmsnorm: &str) -> PathBuf {
    let out = dir.join(format!("{name}.safetensors"));
    let src = fixtures().join(name).join("state_dict.pt");
    let mut args =
        vec![src.to_str().unwrap(), "--dt", "0.02", "--likelihood", "poisson", "--out", out.to_str().unwrap()];
    if name.starts_with("gru") {
        args.extend(["--rmsnorm", rmsnorm]);
    }
    let (code, err) = import(py, &args);
    assert_eq!(code, 0, "{err}");
    out
}

fn xfads(f: &ModelFile) -> Arc<XfadsModel> {
    Arc::new(XfadsModel::from_model_file(f).unwrap_or_else(|e| panic!("{e}")))
}

/// Filtered means (T x L) of `seeds` runs at S samples.
fn filtered(model: &Arc<XfadsModel>, y: &Tensor, samples: usize, seeds: u64) -> Vec<Vec<f32>> {
    let (t, n) = (y.shape[0], y.shape[1]);
    (0..seeds)
        .map(|seed| {
            let mut f = Filter::new(model.clone(), FilterOptions { samples: Some(samples), seed: 1000 + seed });
            let mut m = Vec::new();
            for k in 0..t {
                f.step(Some(&y.data[k * n..(k + 1) * n])).unwrap();
                m.extend_from_slice(f.mean());
            }
            m
        })
        .collect()
}

fn mean_std(runs: &[Vec<f32>]) -> (Vec<f64>, Vec<f64>) {
    let k = runs.len() as f64;
    let len = runs[0].len();
    let mean: Vec<f64> = (0..len).map(|i| runs.iter().map(|r| r[i] as f64).sum::<f64>() / k).collect();
    let std = (0..len)
        .map(|i| (runs.iter().map(|r| (r[i] as f64 - mean[i]).powi(2)).sum::<f64>() / (k - 1.0)).sqrt())
        .collect();
    (mean, std)
}

#[test]
fn imported_models_agree_with_the_reference_filter() {
    let Some(py) = common::python_with(&["numpy"]) else { return };
    let dir = common::tmpdir("xfads-agree");
    const SEEDS: u64 = 32;
    for (name, rmsnorm) in [("gru", "false"), ("gru_rmsnorm", "true"), ("linear", "false"), ("diffusion", "false")] {
        let mut file = ModelFile::read(converted(&py, &dir, name, rmsnorm)).unwrap();
        if name == "linear" {
            // The reference applies RMSNorm only in its GRU: a linear model that says
            // rmsnorm = true decodes as the reference does (not normalised).
            file.set_meta("rmsnorm", "true");
        }
        let model = xfads(&file);
        let r = ModelFile::read(fixtures().join(name).join("reference.safetensors")).unwrap();
        let (y, l) = (&r.tensors["y"], model.card.latents);
        // Deterministic parts exactly: the dynamics' mean function at the reference's probe
        // points (RMSNorm included) and Q = softplus(log_Q).
        let probe = &r.tensors["probe_z"];
        let mut scr = model.dynamics.scratch(probe.shape[0]);
        let mut f_z = vec![0.0; probe.data.len()];
        model.dynamics.apply(&probe.data, &mut f_z, &mut scr);
        for (a, b) in f_z.iter().zip(&r.tensors["probe_mean_fn"].data) {
            assert!((a - b).abs() <= 2e-5 * (1.0 + b.abs()), "{name}: f(z) {a} vs reference {b}");
        }
        for (a, b) in model.q.iter().zip(&r.tensors["Q_diag"].data) {
            assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{name}: Q {a} vs reference {b}");
        }
        let runs = filtered(&model, y, 1000, SEEDS);
        // The first bin is closed form in both (prior and encoder potential, no sampling).
        for run in &runs {
            for (a, b) in run[..l].iter().zip(&r.tensors["m_f0"].data) {
                assert!((a - b).abs() <= 2e-5 * (1.0 + b.abs()), "{name}: first bin {a} vs reference {b}");
            }
        }
        let (mean, std) = mean_std(&runs);
        let (rm, rs) = (&r.tensors["m_f_S1000_mean"].data, &r.tensors["m_f_S1000_std"].data);
        // Each bin's difference in units of its standard error (both runs' spread over
        // seeds; the first bin, exact in both, is checked above): the same filter gives z ~ N(0, 1), so mean z^2 ~ 1; a systematic
        // difference as large as one run's noise would give mean z^2 ~ 6.4 (1 / (1/32 + 1/8)).
        // The reference's std is from 8 seeds, which inflates z^2 by ~7/5 on average.
        let n_ref = 8.0;
        let z: Vec<f64> = (l..mean.len())
            .map(|i| (mean[i] - rm[i] as f64) / (std[i].powi(2) / SEEDS as f64 + (rs[i] as f64).powi(2) / n_ref).sqrt())
            .collect();
        let z2 = z.iter().map(|v| v * v).sum::<f64>() / z.len() as f64;
        let zmax = z.iter().fold(0.0f64, |a, v| a.max(v.abs()));
        let diff = mean.iter().zip(rm).map(|(a, &b)| (a - b as f64).abs()).sum::<f64>() / mean.len() as f64;
        let spread = rs.iter().map(|&s| s as f64).sum::<f64>() / rs.len() as f64;
        eprintln!(
            "{name}: S=1000, {SEEDS} seeds against the reference's 8: mean |latentloop - reference| = {diff:.5}, \
             reference run-to-run std = {spread:.5}; mean z^2 = {z2:.2}, max |z| = {zmax:.2}"
        );
        assert!(z2 < 2.5 && zmax < 6.0, "{name}: the filtered means differ from the reference's beyond its noise");
        if let Some(exact) = r.tensors.get("exact_m_f") {
            // Linear and diffusion: the exact filter is the S -> infinity limit.
            let d = mean.iter().zip(&exact.data).map(|(a, &b)| (a - b as f64).abs()).fold(0.0, f64::max);
            eprintln!("{name}: max |latentloop S=1000 mean - exact filter| = {d:.4}");
            assert!(d < 0.1, "{name}: {d} from the exact filter");
        }
    }
}

/// The converted gru fixture as a ModelFile to edit.
fn gru_file(py: &Path, dir: &Path) -> ModelFile {
    ModelFile::read(converted(py, dir, "gru", "false")).unwrap()
}

fn refused(f: &ModelFile) -> String {
    match AnyModel::from_model_file(f) {
        Ok(_) => panic!("loaded, but should be refused"),
        Err(e) => e,
    }
}

#[test]
fn what_the_loader_does_not_map_is_refused_by_name() {
    let Some(py) = common::python_with(&["numpy"]) else { return };
    let dir = common::tmpdir("xfads-refuse");
    let good = gru_file(&py, &dir);
    assert!(AnyModel::from_model_file(&good).is_ok());

    let mut f = good.clone();
    f.insert("nl_filter.input_latent_fn.linear.weight", Tensor::matrix(3, 2, vec![0.0; 6]));
    let e = refused(&f);
    assert!(
        e.contains("input network (nl_filter.input_latent_fn.linear.weight)") && e.contains("external inputs"),
        "{e}"
    );

    let mut f = good.clone();
    f.insert("behavior_decoder.weight", Tensor::matrix(2, 3, vec![0.0; 6]));
    f.insert("dynamics_mod.mean_fn.layer_norm.weight", Tensor::vector(vec![1.0; 3]));
    let e = refused(&f);
    assert!(
        e.contains("tensors latentloop does not map: behavior_decoder.weight [2, 3], dynamics_mod.mean_fn.layer_norm.weight [3]"),
        "{e}"
    );

    let mut f = good.clone();
    f.set_meta("likelihood", "bernoulli");
    let e = refused(&f);
    assert!(e.contains("likelihood 'bernoulli': latentloop maps xfads's Poisson likelihood only"), "{e}");

    let mut f = good.clone();
    f.insert("likelihood_pdf.log_R", Tensor::vector(vec![0.0; 10]));
    assert!(refused(&f).contains("'likelihood_pdf.log_R' is a Gaussian's noise"));

    for key in ["likelihood", "dynamics", "dt"] {
        let mut f = good.clone();
        f.meta.remove(key);
        let e = refused(&f);
        assert!(
            e.contains(&format!("without metadata '{key}'")) && e.contains("python -m latentloop import-xfads"),
            "{e}"
        );
    }
    let mut f = good.clone();
    f.meta.remove("rmsnorm");
    assert!(refused(&f).contains("GRU dynamics without metadata 'rmsnorm'"));

    let mut f = good.clone();
    f.set_meta("dynamics", "diffusion");
    let e = refused(&f);
    assert!(e.contains("dynamics 'diffusion' (the identity, no parameters), but it has dynamics_mod.mean_fn."), "{e}");
    f.set_meta("dynamics", "linear");
    assert!(refused(&f).contains("missing tensor 'dynamics_mod.mean_fn.A.weight'"));
    f.set_meta("dynamics", "lstm");
    assert!(refused(&f).contains("dynamics 'lstm': latentloop maps gru, linear and diffusion"));

    let mut f = good.clone();
    f.insert("dynamics_mod.mean_fn.gru_cell.weight_ih", Tensor::matrix(24, 2, vec![0.0; 48]));
    assert!(refused(&f).contains("the GRU cell takes an input"));

    // Two models (a Lightning checkpoint's ssm. and best_ssm_enc.): not picked silently.
    let mut f = ModelFile { meta: good.meta.clone(), ..Default::default() };
    for p in ["ssm.", "best_ssm_enc."] {
        for (k, t) in &good.tensors {
            f.insert(&format!("{p}{k}"), t.clone());
        }
    }
    let e = refused(&f);
    assert!(
        e.contains("several xfads models in the file (prefixes 'best_ssm_enc.', 'ssm.')") && e.contains("--prefix"),
        "{e}"
    );
    // One, prefixed, with the filter's copies: loads; an edited copy is refused.
    let mut f = ModelFile { meta: good.meta.clone(), ..Default::default() };
    for (k, t) in &good.tensors {
        f.insert(&format!("ssm.{k}"), t.clone());
        if k.starts_with("dynamics_mod.") || k.starts_with("initial_c_pdf.") {
            f.insert(&format!("ssm.nl_filter.{k}"), t.clone());
        }
    }
    assert!(AnyModel::from_model_file(&f).is_ok());
    f.tensors.get_mut("ssm.nl_filter.dynamics_mod.log_Q").unwrap().data[0] += 0.5;
    assert!(refused(&f).contains("'ssm.nl_filter.dynamics_mod.log_Q' differs from 'ssm.dynamics_mod.log_Q'"));

    // The converter's own refusals reach the user as one line.
    let (code, err) = import(
        &py,
        &[
            fixtures().join("gru_input/state_dict.pt").to_str().unwrap(),
            "--dt",
            "0.02",
            "--likelihood",
            "poisson",
            "--rmsnorm",
            "false",
            "--out",
            dir.join("x.safetensors").to_str().unwrap(),
        ],
    );
    assert!(code == 2 && err.contains("has an input network"), "{err}");
    let (code, err) = import(
        &py,
        &[
            fixtures().join("lightning/monkey_reaching_style.ckpt").to_str().unwrap(),
            "--dt",
            "0.02",
            "--likelihood",
            "poisson",
            "--rmsnorm",
            "true",
            "--out",
            dir.join("x.safetensors").to_str().unwrap(),
        ],
    );
    assert!(
        code == 2 && err.contains("several models in the checkpoint: 'ssm.', 'best_ssm_enc.', 'best_ssm_prd.'"),
        "{err}"
    );
}

fn latentloop(args: &[&str]) -> (i32, String) {
    let out = Command::new(common::bin()).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// An imported model has no behaviour readout; `fit readout` gives it one. Behaviour made a
/// known linear map of the decoder's own filtered means (plus noise): the fitted readout
/// recovers the map, decodes it with R^2 near 1, and the model then publishes behaviour.
/// Fitted again on a block with another map, the old readout's score is reported and the
/// new one replaces it. Data that cannot be fitted are refused with the reason.
#[test]
fn fit_readout_gives_an_imported_model_its_behaviour() {
    use latentloop::any_model::DecoderOptions;
    use latentloop::data::{Array2, Dataset};
    use latentloop::eval::evaluate;
    use latentloop::gpu::Backend;
    use latentloop::kalman::KalmanMode;
    use latentloop::sim::{self, SimConfig, System};

    let Some(py) = common::python_with(&["numpy"]) else { return };
    let dir = common::tmpdir("xfads-readout");
    let imported = converted(&py, &dir, "gru", "false");
    let model = AnyModel::load(&imported).unwrap();
    assert_eq!(model.behavior_dims(), 0);
    let mut cfg = SimConfig::new(System::Lorenz, 10, 3, 3);
    cfg.dt = 0.02;
    let counts = sim::simulate(&cfg, 3000).unwrap();
    let opts = DecoderOptions {
        filter: FilterOptions { samples: None, seed: 0 },
        kalman: KalmanMode::Exact,
        backend: Backend::Cpu,
    };
    let (_, out) = evaluate(&model, &Dataset { behavior: None, ..counts.clone() }, opts).unwrap();
    let block = |w: [[f32; 3]; 2], c: [f32; 2], name: &str| -> PathBuf {
        let mut b = Array2::zeros(out.means.rows, 2);
        for t in 0..b.rows {
            let m = out.means.row(t);
            for (j, wj) in w.iter().enumerate() {
                let noise = 0.005 * ((t * 7 + j * 3) as f32 * 0.37).sin();
                b.row_mut(t)[j] = wj.iter().zip(m).map(|(a, z)| a * z).sum::<f32>() + c[j] + noise;
            }
        }
        let p = dir.join(name);
        Dataset { behavior: Some(b), ..counts.clone() }.write_npz(&p).unwrap();
        p
    };
    let w = [[1.5, -0.5, 0.25], [0.0, 2.0, -1.0]];
    let data = block(w, [0.3, -0.2], "calib.npz");
    let with = dir.join("with-readout.safetensors");
    let report = dir.join("readout.json");
    let (code, err) = latentloop(&[
        "fit",
        "readout",
        "--model",
        imported.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        with.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("<- chosen") && err.contains("with a 2-dimensional readout"), "{err}");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["scores"].as_array().unwrap().len(), 8);
    assert!(r["chosen"]["filtered_r2"].as_f64().unwrap() > 0.99, "{r}");
    assert!(r["chosen"]["lag1_r2"].as_f64().unwrap().is_finite(), "{r}");
    assert!(r["before_r2"].is_null());
    let fitted = ModelFile::read(&with).unwrap();
    for (j, wj) in w.iter().enumerate() {
        for (i, &a) in wj.iter().enumerate() {
            let got = fitted.tensors["behavior.d"].data[j * 3 + i];
            assert!((got - a).abs() < 0.05, "D[{j}][{i}] = {got}, made with {a}");
        }
    }
    // The model now decodes behaviour, and eval scores it.
    let m2 = AnyModel::load(&with).unwrap();
    assert_eq!(m2.behavior_dims(), 2);
    let data_set = Dataset::read_npz(&data).unwrap();
    let (rep, _) = evaluate(&m2, &data_set, opts).unwrap();
    assert!(rep.behavior_r2.unwrap() > 0.99, "{:?}", rep.behavior_r2);

    // A new calibration block with another map: the old readout is scored, then replaced.
    let data2 = block([[-1.0, 0.5, 0.0], [0.5, 0.5, 0.5]], [0.0, 1.0], "calib2.npz");
    let with2 = dir.join("refreshed.safetensors");
    let (code, err) = latentloop(&[
        "fit",
        "readout",
        "--model",
        with.to_str().unwrap(),
        "--data",
        data2.to_str().unwrap(),
        "--out",
        with2.to_str().unwrap(),
    ]);
    assert!(code == 0 && err.contains("the readout it had scored R2"), "{err}");
    let (rep, _) = evaluate(&AnyModel::load(&with2).unwrap(), &Dataset::read_npz(&data2).unwrap(), opts).unwrap();
    assert!(rep.behavior_r2.unwrap() > 0.99);

    // Refusals.
    let no_behavior = dir.join("nobehavior.npz");
    Dataset { behavior: None, ..counts.clone() }.write_npz(&no_behavior).unwrap();
    let (code, err) = latentloop(&[
        "fit",
        "readout",
        "--model",
        imported.to_str().unwrap(),
        "--data",
        no_behavior.to_str().unwrap(),
        "--out",
        dir.join("x.safetensors").to_str().unwrap(),
    ]);
    assert!(code == 2 && err.contains("no 'behavior' array"), "{err}");
    let other_dt = dir.join("dt.npz");
    Dataset { dt: 0.01, ..Dataset::read_npz(&data).unwrap() }.write_npz(&other_dt).unwrap();
    let (code, err) = latentloop(&[
        "fit",
        "readout",
        "--model",
        imported.to_str().unwrap(),
        "--data",
        other_dt.to_str().unwrap(),
        "--out",
        dir.join("x.safetensors").to_str().unwrap(),
    ]);
    assert!(code == 2 && err.contains("the data's bins are 0.01 s, the model's 0.02 s"), "{err}");
    let kalman = dir.join("kalman.safetensors");
    let (code, err) =
        latentloop(&["fit", "kalman", "--data", data.to_str().unwrap(), "--out", kalman.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let (code, err) = latentloop(&[
        "fit",
        "readout",
        "--model",
        kalman.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        dir.join("x.safetensors").to_str().unwrap(),
    ]);
    assert!(code == 2 && err.contains("a Kalman decoder's behaviour is its state"), "{err}");
    assert!(!dir.join("x.safetensors").exists(), "nothing written on a refusal");
}
