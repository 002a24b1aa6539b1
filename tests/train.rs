//! Training writes exactly what the runtime runs.

mod common;

use latentloop::data::npz::read_arrays;
use latentloop::fit::xfads::{train, GradMode, TrainOptions};
use latentloop::model::DynamicsKind;
use latentloop::sim::{simulate, SimConfig, System};
use std::process::Command;

/// A short training run (either gradient mode), the model written to disk, then
/// `latentloop eval` (the CLI, the runtime filter) on the validation block: its filtered
/// means are the trainer's own held-out means, to float tolerance (in fact identical: the
/// same filter, seed and noise).
/// A model small enough to train for two epochs in a test.
fn tiny() -> TrainOptions {
    TrainOptions {
        latents: 3,
        samples: 8,
        rank: 2,
        hidden: 16,
        encoder_hidden: 16,
        epochs: 2,
        batch: 64,
        quiet: true,
        ..TrainOptions::default()
    }
}

#[test]
fn eval_of_the_written_model_reproduces_the_trainers_held_out_means() {
    let dir = common::tmpdir("train_roundtrip");
    let mut cfg = SimConfig::new(System::Lorenz, 12, 5, 6);
    cfg.behavior_dims = 2;
    let data = simulate(&cfg, 1500).unwrap();
    for (grad, dynamics) in [(GradMode::Local, DynamicsKind::Node), (GradMode::Bptt, DynamicsKind::Gru)] {
        let opts = TrainOptions { dynamics, bptt_len: 8, grad, seed: 77, valid_fraction: 0.2, ..tiny() };
        let trained = train(&data, &opts).unwrap();
        assert_eq!(trained.report.epochs_run, 2);
        assert!(trained.report.valid.behavior_r2.is_some() && trained.report.valid.bits_per_spike.is_some());
        let model = dir.join(format!("{grad:?}.safetensors"));
        trained.file.write(&model).unwrap();
        let n_train = trained.report.train_bins;
        let valid = data.slice(n_train, data.bins());
        let valid_path = dir.join("valid.npz");
        valid.write_npz(&valid_path).unwrap();
        let outputs = dir.join("out.npz");
        let out = Command::new(common::bin())
            .args(["eval", "--model"])
            .arg(&model)
            .arg("--data")
            .arg(&valid_path)
            .args(["--seed", "77", "--outputs"])
            .arg(&outputs)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let got = &read_arrays(&outputs).unwrap()["latents"];
        let want = &trained.valid_outputs.means;
        assert_eq!(got.shape, vec![want.rows, want.cols]);
        for (g, w) in got.data.iter().zip(&want.data) {
            assert!((*g as f32 - w).abs() <= 1e-5 * (1.0 + w.abs()), "{grad:?}: eval {g} vs trainer {w}");
        }
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let r2 = report["behavior_r2"].as_f64().unwrap();
        assert!((r2 - trained.report.valid.behavior_r2.unwrap()).abs() < 1e-9, "behaviour R^2 {r2}");
    }
}

/// Too little data, or options that cannot work, are refused with a reason.
#[test]
fn training_refuses_what_cannot_work() {
    let mut cfg = SimConfig::new(System::Linear, 5, 1, 1);
    cfg.behavior_dims = 1;
    let small = simulate(&cfg, 300).unwrap();
    let e = train(&small, &TrainOptions { quiet: true, ..TrainOptions::default() }).err().unwrap().to_string();
    assert!(e.contains("too few"), "{e}");
    let data = simulate(&cfg, 3000).unwrap();
    let e = train(&data, &TrainOptions { valid_fraction: 0.9, quiet: true, ..TrainOptions::default() })
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("valid fraction"), "{e}");
}

/// The seed makes a run repeatable: the same data, options and seed write the same model.
#[test]
fn the_same_seed_trains_the_same_model() {
    let mut cfg = SimConfig::new(System::Rossler, 8, 2, 3);
    cfg.behavior_dims = 1;
    let data = simulate(&cfg, 1200).unwrap();
    let opts = TrainOptions { seed: 5, ..tiny() };
    let a = train(&data, &opts).unwrap().file;
    let b = train(&data, &opts).unwrap().file;
    assert_eq!(a, b);
    let c = train(&data, &TrainOptions { seed: 6, ..opts }).unwrap().file;
    assert_ne!(a, c);
}
