//! `latentloop jitter`, the real binary: its report, and clear refusals of bad options.

mod common;

use std::process::Command;

fn latentloop(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(common::bin()).args(args).output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

#[test]
fn reports_the_floor_of_a_core_as_json() {
    let (code, out, err) =
        latentloop(&["jitter", "--seconds", "0.3", "--core", "0", "--bin-ms", "2", "--work-us", "40"]);
    assert_eq!(code, 0, "{err}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["core"], 0);
    let seconds = r["seconds"].as_f64().unwrap();
    assert!((0.3..1.0).contains(&seconds), "{seconds}");
    // One ideal bin per 2 ms watched, none faster than its 40 us of work.
    let ideal = &r["ideal_decoder"];
    assert_eq!(ideal["count"].as_u64().unwrap(), (seconds * 1e9).round() as u64 / 2_000_000);
    assert!(ideal["p50_us"].as_f64().unwrap() >= 39.99, "{ideal}");
    assert!(ideal["max_us"].as_f64().unwrap() >= ideal["p999_us"].as_f64().unwrap());
    let stolen = r["stolen_fraction"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&stolen), "{stolen}");
    assert_eq!(r["stall"]["count"], r["stalls"]);
    assert!(err.contains("an ideal decoder needing 40 us per 2 ms bin"), "{err}");
}

#[test]
fn bad_options_are_refused_with_the_reason() {
    for (args, reason) in [
        (&["--bin-ms", "0"][..], "--bin-ms must be positive"),
        (&["--bin-ms", "1", "--work-us", "1500"][..], "shorter than a bin (1000 us)"),
        (&["--work-us=-5"][..], "--work-us must be >= 0"),
        (&["--seconds", "0"][..], "--seconds must be in (0, 3600]"),
        (&["--core", "1023", "--seconds", "0.1"][..], "cannot pin to core 1023"),
        (&["--realtime-priority", "0"][..], "0 is not in 1..=99"),
    ] {
        let mut all = vec!["jitter"];
        all.extend_from_slice(args);
        let (code, _, err) = latentloop(&all);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(reason), "{args:?}: {err}");
    }
}
