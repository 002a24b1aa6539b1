//! Model files: what is refused (and how it is explained), and XFADS checkpoints.

mod common;

use latentloop::any_model::AnyModel;
use latentloop::filter::{Filter, FilterOptions};
use latentloop::model::{build, Card, DynamicsKind, ModelFile, ReadoutKind, Tensor, UpdateKind, XfadsModel};
use std::process::Command;
use std::sync::Arc;

fn card() -> Card {
    Card {
        latents: 4,
        channels: 6,
        dt: 0.02,
        samples: 16,
        dynamics: DynamicsKind::Gru,
        hidden: 8,
        rmsnorm: true,
        substeps: 1,
        update: UpdateKind::Encoder,
        rank: 2,
        encoder_hidden: 5,
        readout: ReadoutKind::Poisson,
        readout_latents: 3,
        behavior_dims: 0,
    }
}

fn load_err(f: &ModelFile, name: &str) -> String {
    let dir = common::tmpdir("model_files");
    let p = dir.join(name);
    std::fs::write(&p, f.to_bytes()).unwrap();
    AnyModel::load(&p).unwrap_err().to_string()
}

#[test]
fn bad_model_files_are_refused_with_the_problem_named() {
    let good = build::random(&card(), 3, 0.1, 0.5);
    let dir = common::tmpdir("model_files_truncated");
    let p = dir.join("truncated.safetensors");
    let bytes = good.to_bytes();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = AnyModel::load(&p).unwrap_err().to_string();
    assert!(e.contains("truncated") && e.contains("truncated.safetensors"), "{e}");

    let mut f = good.clone();
    f.tensors.get_mut("dynamics.w_hh").unwrap().shape = vec![8, 24];
    let e = load_err(&f, "shape.safetensors");
    assert!(e.contains("'dynamics.w_hh' has shape [8, 24], expected [24, 8]"), "{e}");

    let mut f = good.clone();
    f.tensors.remove("encoder.b2");
    let e = load_err(&f, "missing.safetensors");
    assert!(e.contains("missing tensor 'encoder.b2'"), "{e}");

    let mut f = good.clone();
    f.tensors.get_mut("readout.c").unwrap().data[5] = f32::NAN;
    let e = load_err(&f, "nan.safetensors");
    assert!(e.contains("'readout.c'") && e.contains("non-finite"), "{e}");

    let mut f = good.clone();
    f.set_meta("format_version", 99);
    let e = load_err(&f, "version.safetensors");
    assert!(e.contains("format version 99 is not supported"), "{e}");

    let mut f = good.clone();
    f.set_meta("dynamics", "lstm");
    let e = load_err(&f, "kind.safetensors");
    assert!(e.contains("unknown DynamicsKind 'lstm'"), "{e}");

    let mut f = good;
    f.meta.remove("format");
    let e = load_err(&f, "nocard.safetensors");
    assert!(e.contains("no latentloop model card"), "{e}");
}

/// A file written under catniplab/xfads's parameter names (with the Lightning `ssm.`
/// prefix and the duplicated `nl_filter.` copies) loads into the same model as the
/// latentloop-named file with the same weights, and decodes identically.
#[test]
fn xfads_checkpoint_names_load_into_the_same_model() {
    let c = card();
    let ours = build::random(&c, 5, 0.1, 0.5);
    let t = |n: &str| ours.tensors[n].clone();
    let mut x = ModelFile::default();
    let h = c.hidden;
    for prefix in ["ssm.", "ssm.nl_filter."] {
        x.insert(&format!("{prefix}dynamics_mod.log_Q"), t("dynamics.log_q"));
        x.insert(&format!("{prefix}dynamics_mod.mean_fn.gru_cell.weight_ih"), Tensor::new(vec![3 * h, 0], vec![]));
        x.insert(&format!("{prefix}dynamics_mod.mean_fn.gru_cell.weight_hh"), t("dynamics.w_hh"));
        x.insert(&format!("{prefix}dynamics_mod.mean_fn.gru_cell.bias_ih"), t("dynamics.b_ih"));
        x.insert(&format!("{prefix}dynamics_mod.mean_fn.gru_cell.bias_hh"), t("dynamics.b_hh"));
        x.insert(&format!("{prefix}dynamics_mod.mean_fn.h_to_z.weight"), t("dynamics.w_out"));
        x.insert(&format!("{prefix}dynamics_mod.mean_fn.h_to_z.bias"), t("dynamics.b_out"));
        x.insert(&format!("{prefix}dynamics_mod.mean_fn.z_to_h.weight"), t("dynamics.w_zh"));
        x.insert(&format!("{prefix}dynamics_mod.mean_fn.z_to_h.bias"), t("dynamics.b_zh"));
        x.insert(&format!("{prefix}initial_c_pdf.m_0"), t("init.m0"));
        x.insert(&format!("{prefix}initial_c_pdf.log_Q_0"), t("init.log_q0"));
    }
    x.insert("ssm.local_encoder.mlp.0.weight", t("encoder.w1"));
    x.insert("ssm.local_encoder.mlp.0.bias", t("encoder.b1"));
    x.insert("ssm.local_encoder.mlp.3.weight", t("encoder.w2"));
    x.insert("ssm.local_encoder.mlp.3.bias", t("encoder.b2"));
    x.insert("ssm.likelihood_pdf.readout_fn.1.weight", t("readout.c"));
    x.insert("ssm.likelihood_pdf.readout_fn.1.bias", t("readout.b"));
    x.insert("ssm.backward_encoder.projection.bias", Tensor::vector(vec![0.0; 12]));
    // Without the metadata the weights cannot give, refused with how to make it.
    let e = load_err(&x, "xfads-nometa.safetensors");
    assert!(e.contains("without metadata 'likelihood'") && e.contains("import-xfads"), "{e}");
    x.set_meta("likelihood", "poisson");
    x.set_meta("dynamics", "gru");
    x.set_meta("dt", "0.02");
    let e = load_err(&x, "xfads-norms.safetensors");
    assert!(e.contains("'rmsnorm'"), "{e}");
    x.set_meta("rmsnorm", "true");
    x.set_meta("samples", "16");

    let dir = common::tmpdir("xfads_names");
    let p = dir.join("xfads.safetensors");
    x.write(&p).unwrap();
    let from_xfads = match AnyModel::load(&p).unwrap() {
        AnyModel::Xfads(m) => m,
        _ => panic!("not an xfads model"),
    };
    let from_ours = Arc::new(XfadsModel::compile(&ours).unwrap());
    assert_eq!(from_xfads.card, from_ours.card);
    let (mut a, mut b) =
        (Filter::new(from_xfads, FilterOptions::default()), Filter::new(from_ours, FilterOptions::default()));
    for i in 0..30 {
        let y: Vec<f32> = (0..6).map(|j| ((i + j) % 3) as f32).collect();
        a.step(Some(&y)).unwrap();
        b.step(Some(&y)).unwrap();
    }
    assert_eq!(a.mean(), b.mean());
    assert_eq!(a.lag1_mean(), b.lag1_mean());
}

fn latentloop(args: &[&str]) -> (i32, String) {
    let out = Command::new(common::bin()).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The CLI: bad paths, malformed files and mismatched channel counts print one line and
/// exit with 2.
#[test]
fn cli_errors_exit_2_with_a_clear_line() {
    let dir = common::tmpdir("cli_errors");
    let d = |n: &str| dir.join(n).to_string_lossy().into_owned();
    let (code, err) = latentloop(&["eval", "--model", &d("nope.safetensors"), "--data", &d("nope.npz")]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("nope.safetensors") && err.contains("No such file"), "{err}");

    let (code, err) =
        latentloop(&["simulate", "--system", "lorenz", "--neurons", "6", "--bins", "300", "--out", &d("s.npz")]);
    assert_eq!(code, 0, "{err}");
    std::fs::write(d("garbage.safetensors"), b"not a model at all").unwrap();
    let (code, err) = latentloop(&["eval", "--model", &d("garbage.safetensors"), "--data", &d("s.npz")]);
    assert_eq!(code, 2);
    assert!(err.contains("garbage.safetensors") && err.contains("not a readable safetensors"), "{err}");

    std::fs::write(d("garbage.npz"), b"PK\x03\x04 broken").unwrap();
    build::random(&card(), 1, 0.1, 0.5).write(d("m6.safetensors")).unwrap();
    let (code, err) = latentloop(&["eval", "--model", &d("m6.safetensors"), "--data", &d("garbage.npz")]);
    assert_eq!(code, 2);
    assert!(err.contains("garbage.npz"), "{err}");

    let (code, err) =
        latentloop(&["simulate", "--system", "lorenz", "--neurons", "7", "--bins", "300", "--out", &d("s7.npz")]);
    assert_eq!(code, 0, "{err}");
    let (code, err) = latentloop(&["eval", "--model", &d("m6.safetensors"), "--data", &d("s7.npz")]);
    assert_eq!(code, 2);
    assert!(err.contains("reads 6 channels, the data has 7"), "{err}");

    let (code, err) =
        latentloop(&["simulate", "--system", "lorentz", "--neurons", "7", "--bins", "3", "--out", &d("x.npz")]);
    assert_eq!(code, 2);
    assert!(err.contains("lorentz"), "{err}");
}

/// `fit kalman` then `eval` on held-out data of the same system decodes behaviour well.
#[test]
fn fit_kalman_then_eval_on_held_out_data() {
    let dir = common::tmpdir("fit_eval");
    let d = |n: &str| dir.join(n).to_string_lossy().into_owned();
    for (name, trial) in [("train.npz", "1"), ("test.npz", "2")] {
        let (code, err) = latentloop(&[
            "simulate",
            "--system",
            "lorenz",
            "--neurons",
            "30",
            "--bins",
            "4000",
            "--seed",
            "3",
            "--trial-seed",
            trial,
            "--out",
            &d(name),
        ]);
        assert_eq!(code, 0, "{err}");
    }
    let (code, err) = latentloop(&["fit", "kalman", "--data", &d("train.npz"), "--out", &d("kf.safetensors")]);
    assert_eq!(code, 0, "{err}");
    let out = Command::new(common::bin())
        .args(["eval", "--model", &d("kf.safetensors"), "--data", &d("test.npz"), "--outputs", &d("out.npz")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let r2 = report["behavior_r2"].as_f64().unwrap();
    // The behaviour is a linear map of the latent plus noise (sd 0.05): a Kalman decoder on
    // 30 neurons recovers most of it (measured 0.93 here); 0.8 fails a broken fit.
    assert!(r2 > 0.8, "behaviour R^2 {r2}");
    assert_eq!(report["bins"].as_u64(), Some(4000));
    let arrays = latentloop::data::npz::read_arrays(d("out.npz")).unwrap();
    assert_eq!(arrays["behavior"].shape, vec![4000, 2]);
}
