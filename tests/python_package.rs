//! The Python package's own tests (python/tests, pytest) against this build of the binary:
//! the wire codec, the session reader on real and damaged sessions, the NWB export read back
//! by pynwb and checked by nwbinspector, nwb-to-npz, the control client, the CLI. Skipped,
//! saying why, without a Python that has pytest, pynwb and nwbinspector (a failure under
//! LATENTLOOP_REQUIRE_PYTHON=1, as in CI).

mod common;

use std::process::Command;

#[test]
fn the_python_package_tests_pass() {
    let Some(py) = common::python_with(&["numpy", "zmq", "pynwb", "nwbinspector", "pytest"]) else { return };
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(&py)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(root.join("python/tests"))
        .env("LATENTLOOP_BIN", common::bin())
        .current_dir(&root)
        .output()
        .expect("python runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{text}");
    assert!(out.status.success(), "pytest failed:\n{text}");
    assert!(text.contains(" passed"), "{text}");
}
