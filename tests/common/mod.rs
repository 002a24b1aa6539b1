//! Shared by the integration tests: finding a Python peer (numpy, pyzmq) and the binary.
#![allow(dead_code)]

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
