//! The soak script as CI runs it (scripts/soak.sh 25): 25 s at 1 kHz with the standard
//! model and recording, checked as the hour is: every bin answered or its loss reported,
//! none answered twice, RSS flat after warm-up, the session replayed identically.

mod common;

use std::process::Command;

#[test]
fn a_short_soak_passes_the_hours_checks() {
    let Some(py) = common::python_with(&["numpy", "zmq"]) else { return };
    let dir = common::tmpdir("soak");
    let out = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/soak.sh"))
        .arg("25")
        .env("LATENTLOOP_BIN", common::bin())
        .env("LATENTLOOP_PYTHON", &py)
        .env("SOAK_DIR", &dir)
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert!(text.contains("bins sent / answered | 25000 /") && text.contains("all identical"), "{text}");
}
