//! Shared by the integration tests: finding a Python peer (numpy, pyzmq) and the binary.
#![allow(dead_code)]

pub mod rig;

use std::path::PathBuf;
use std::process::Command;

/// A Python interpreter that can import every module in `modules`, or `None` with the
/// reason printed. Looks at `LATENTLOOP_PYTHON`, then `.venv/bin/python`, then `python3`.
/// With `LATENTLOOP_REQUIRE_PYTHON=1` (set by .ci/run) a missing peer is a failure, so CI
/// can never pass by skipping.
pub fn python_with(modules: &[&str]) -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut candidates = Vec::new();
    if let Ok(p) = std::env::var("LATENTLOOP_PYTHON") {
        candidates.push(PathBuf::from(p));
    }
    candidates.push(root.join(".venv/bin/python"));
    candidates.push(PathBuf::from("python3"));
    let probe = format!("import {}", modules.join(", "));
    for c in &candidates {
        if Command::new(c).args(["-c", &probe]).output().map(|o| o.status.success()).unwrap_or(false) {
            return Some(c.clone());
        }
    }
    let msg = format!(
        "no Python with {} found (tried {:?}); create it with: python3 -m venv .venv && .venv/bin/pip install -r tests/requirements.txt",
        modules.join(", "),
        candidates
    );
    if std::env::var("LATENTLOOP_REQUIRE_PYTHON").as_deref() == Ok("1") {
        panic!("{msg}");
    }
    eprintln!("SKIPPED: {msg}");
    None
}

/// Runs a Python snippet, panicking with its stderr if it fails; returns stdout.
pub fn run_python(py: &PathBuf, code: &str, args: &[&str]) -> String {
    let out = Command::new(py).arg("-c").arg(code).args(args).output().expect("python runs");
    assert!(out.status.success(), "python failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The built `latentloop` binary (cargo builds it for integration tests).
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_latentloop"))
}

/// A fresh temporary directory under target/ (kept for inspection after a failure).
pub fn tmpdir(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

use latentloop::math::philox::{Normals, Purpose};
use latentloop::model::build::{self, Size};
use latentloop::model::{DynamicsKind, UpdateKind, XfadsModel};
use std::sync::Arc;

/// A model of `size` for comparing backends: the given dynamics and update, and Lr < L for
/// the point-process update so the rows of K beyond Lr are exercised.
pub fn comparison_model(size: &Size, dynamics: DynamicsKind, update: UpdateKind, rmsnorm: bool) -> Arc<XfadsModel> {
    let mut card = size.card(dynamics, update);
    card.rmsnorm = rmsnorm;
    if update == UpdateKind::PoissonLaplace {
        card.readout_latents = size.latents.div_ceil(2);
    }
    card.validate().unwrap();
    Arc::new(XfadsModel::compile(&build::random(&card, 11, 0.05, 0.02)).unwrap())
}

/// Bins for comparing backends: sparse counts (about 0.3 per channel, a few 2s and 3s) or
/// Gaussian values; every `missing_every`-th bin has no data, and bin 20 is finite but
/// absurd (the potential overflows, the update is refused and the filter restarts from
/// its prior, on every backend).
pub fn comparison_bins(n: usize, count: usize, gaussian: bool, missing_every: usize) -> Vec<Option<Vec<f32>>> {
    let g = Normals::new(5);
    (0..count)
        .map(|t| {
            if t % missing_every == missing_every - 1 {
                return None;
            }
            if t == 20 {
                return Some(vec![3e38; n]);
            }
            let mut v = vec![0.0f32; n];
            g.fill(t as u64, Purpose::Sim, 0, &mut v);
            if !gaussian {
                v.iter_mut().for_each(|x| {
                    *x = [0.0, 1.0, 2.0, 3.0][(*x > 0.5) as usize + (*x > 1.1) as usize + (*x > 1.6) as usize]
                });
            }
            Some(v)
        })
        .collect()
}
