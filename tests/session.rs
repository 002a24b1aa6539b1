//! The session recording of the real binary on loopback ZeroMQ: what it holds against what
//! the client received, `latentloop replay` against the live outputs, `kill -9`, replay
//! with another model, and a replay that must fail.

mod common;

use common::rig::*;
use latentloop::session::read::Session;
use latentloop::session::write::SessionWriter;
use latentloop::session::{Decision, RECORDS_FILE};
use latentloop::wire::bin::FLAG_STREAM_START;
use latentloop::wire::output::{FLAG_GAP, FLAG_REJECTED, FLAG_RESTART};
use serde_json::{json, Value};
use std::process::Command;
use std::time::{Duration, Instant};

fn replay(args: &[&std::ffi::OsStr]) -> (Option<i32>, String) {
    let out = Command::new(common::bin()).arg("replay").args(args).arg("--quiet").output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A zmq session with a gap, a duplicate, a NaN frame (refused, answered), a malformed one
/// (no readable header: only an event) and a publisher restart: the session holds every bin
/// as received, what was decided about it and every output exactly as the client got it,
/// and replays identically.
#[test]
fn a_session_with_faults_is_recorded_as_published_and_replays_identically() {
    let Some(rig) = Rig::new("session-faults", ModelKind::Xfads(4)) else { return };
    let mut steps = stream(0, 0..40);
    steps.extend((45..80).map(|k| bin(k, k as usize))); // 40..45 missing
    steps.push(json!({"seq": 79, "row": 79, "expect": false})); // duplicate
    steps.push(json!({"seq": 80, "row": 80, "bad": "nan"}));
    steps.push(json!({"seq": 81, "row": 81, "bad": "short", "expect": false}));
    steps.extend((81..100).map(|k| bin(k, k as usize)));
    steps.extend(stream(0, 100..140)); // the publisher restarts
    let mut ll = rig.start();
    let res = rig.drive(json!({ "steps": steps }), |_| {});
    ll.stop();
    let outs = outputs(&res);

    let s = Session::open(rig.session()).unwrap();
    assert!(s.clean(), "{}", s.status());
    assert_eq!(s.header.channels, CHANNELS);
    assert_eq!(s.header.decoder.seed, 3);
    let model = s.header.model.as_ref().expect("the model is in the header");
    assert_eq!(
        std::fs::read(s.path_of(&model.file)).unwrap(),
        std::fs::read(&rig.model).unwrap(),
        "a copy of the model"
    );
    let bins = s.all_bins().unwrap();
    let decoded: Vec<_> = bins.iter().filter(|b| b.decision() == Some(Decision::Decoded)).collect();
    assert_eq!(decoded.len(), outs.len(), "one decoded record per published output");
    for (b, o) in decoded.iter().zip(&outs) {
        let (f, a) = (&b.fields, b.arrays());
        assert_eq!((f.seq, f.out_flags, f.dropped_before as u64), (o.seq, o.flags, o.dropped), "seq {}", o.seq);
        assert_eq!((f.recv_ns, f.publish_ns), (o.recv_ns, o.publish_ns), "seq {}", o.seq);
        assert_eq!(a.behavior_out, f32s(&o.behavior).as_slice(), "seq {}", o.seq);
        assert_eq!(a.latent, f32s(&o.latent).as_slice(), "seq {}", o.seq);
        assert_eq!(a.lag1, f32s(&o.lag1).as_slice(), "seq {}", o.seq);
        assert!(f.recv_ns <= f.pop_ns && f.pop_ns <= f.step_ns && f.step_ns <= f.publish_ns, "{f:?}");
    }
    // The decisions: the duplicate was dropped by the step; the NaN frame was refused by the
    // source and answered; the restart and the gap are on their outputs.
    let by_seq = |seq: u64, nth: usize| decoded.iter().filter(|b| b.fields.seq == seq).nth(nth).copied().unwrap();
    let dup: Vec<_> = bins.iter().filter(|b| b.decision() == Some(Decision::OutOfOrder)).collect();
    assert_eq!((dup.len(), dup[0].fields.seq), (1, 79));
    assert_eq!(by_seq(80, 0).fields.kind, 2);
    assert_ne!(by_seq(80, 0).fields.out_flags & FLAG_REJECTED, 0);
    assert_eq!(by_seq(45, 0).fields.out_flags & FLAG_GAP, FLAG_GAP);
    assert_eq!(by_seq(0, 1).fields.out_flags & FLAG_RESTART, FLAG_RESTART);
    assert_eq!(by_seq(0, 1).fields.wire_flags, FLAG_STREAM_START);
    // Counts exactly as received (u16 on the wire), the dtype with them.
    let data = latentloop::data::Dataset::read_npz(&rig.data).unwrap();
    assert_eq!(by_seq(12, 0).arrays().counts, data.spikes.row(12));
    assert_eq!(by_seq(12, 0).fields.dtype, 0);
    // Events: start, the decoder and where it was applied, both refusals, the restart, stop.
    for kind in ["start", "decoder", "applied", "restart", "stop"] {
        assert!(s.events_of(kind).count() >= 1, "no {kind} event: {:?}", s.events);
    }
    let reasons: Vec<&str> = s.events_of("rejected").map(|e| e["reason"].as_str().unwrap()).collect();
    assert!(reasons.iter().any(|r| r.contains("bin seq 80 refused: channel 0 is not finite")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("message of 10 bytes refused")), "{reasons:?}");
    // The end record's counters are the run's.
    let sum = rig.summary();
    assert_eq!(s.end.as_ref().unwrap()["counters"], sum["counters"]);
    assert_eq!(sum["session"].as_str().map(std::path::PathBuf::from), Some(rig.session()));

    let err = rig.assert_replays_identically();
    assert!(err.contains("the session ended cleanly"), "{err}");
}

/// `kill -9` in mid-stream: everything up to the last complete chunk is readable, the
/// readers say it did not end cleanly, and what was recovered replays identically.
#[test]
fn after_kill_9_the_recovered_bins_replay_identically() {
    let Some(rig) = Rig::new("session-kill", ModelKind::Xfads(4)) else { return };
    let mut steps: Vec<Value> = (0..4000u64)
        .map(|k| json!({"seq": k, "row": k % 300, "wait": false, "flags": if k == 0 { FLAG_STREAM_START } else { 0 }}))
        .collect();
    steps.insert(1500, json!({"sync": "kill"}));
    let mut ll = rig.start();
    let started = Instant::now();
    let _ = rig.drive(json!({"steps": steps, "rate": 1000.0, "timeout": 5.0}), |_| {
        // 1.5 s of bins are in: at least a few chunks were written.
        ll.signal(libc::SIGKILL);
    });
    let _ = ll.interrupt();
    assert!(started.elapsed() < Duration::from_secs(60));

    let s = Session::open(rig.session()).unwrap();
    assert!(!s.clean() && s.end.is_none(), "{}", s.status());
    assert!(s.bins > 500, "only {} bins recovered", s.bins);
    let st = s.status();
    assert!(st.contains(&format!("recovered {} bins", s.bins)) && st.contains("did not end cleanly"), "{st}");
    let (code, err) = replay(&[rig.session().as_os_str()]);
    assert_eq!(code, Some(0), "{err}");
    let decoded = s.all_bins().unwrap().iter().filter(|b| b.decision() == Some(Decision::Decoded)).count();
    assert!(err.contains(&format!("{decoded} bins, all identical")), "{err}");
    assert!(err.contains("did not end cleanly"), "{err}");
}

/// Replay must be able to fail: one published value changed in the file makes it exit 1
/// naming that bin; a model file that changed is refused by its hash.
#[test]
fn a_replay_that_differs_names_the_bin_and_a_changed_model_is_refused() {
    let Some(rig) = Rig::new("session-differs", ModelKind::Kalman) else { return };
    let mut ll = rig.start();
    let _ = rig.drive(json!({ "steps": stream(0, 0..60) }), |_| {});
    ll.stop();
    rig.assert_replays_identically();

    // A copy of the session with bin 37's lag-1 mean off by one ulp.
    let src = Session::open(rig.session()).unwrap();
    let copy = rig.dir.join("tampered");
    let (mut w, _) = SessionWriter::create(&copy, &src.header).unwrap();
    for e in &src.events {
        w.event(e.clone());
    }
    for b in src.all_bins().unwrap() {
        let mut a = b.arrays();
        let mut lag1 = a.lag1.to_vec();
        if b.fields.seq == 37 {
            lag1[1] = f32::from_bits(lag1[1].to_bits() + 1);
        }
        a.lag1 = &lag1;
        w.bin(&b.fields, b.shape, &a).unwrap();
    }
    w.finish(src.end.clone().unwrap()).unwrap();
    let model = src.header.model.as_ref().unwrap().file.clone();
    std::fs::copy(src.path_of(&model), copy.join(&model)).unwrap();
    let (code, err) = replay(&[copy.as_os_str()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("bin 37 (record 37) differs first, in lag1"), "{err}");

    let mut bytes = std::fs::read(copy.join(&model)).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(copy.join(&model), bytes).unwrap();
    let (code, err) = replay(&[copy.as_os_str()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("is not the recorded") && err.contains("the model file changed"), "{err}");
    let (code, err) = replay(&[rig.dir.join("nothing-here").as_os_str()]);
    assert_eq!((code, err.contains("not a session folder")), (Some(2), true), "{err}");
    let _ = std::fs::remove_file(rig.session().join(RECORDS_FILE));
}

/// `replay --model OTHER --out OUT.npz`: what another decoder would have published on the
/// same bins, with its behaviour R^2 beside the live decoder's.
#[test]
fn replay_with_another_model_writes_its_outputs_and_behaviour_r2() {
    let Some(rig) = Rig::new("session-other", ModelKind::Kalman) else { return };
    let mut ll = rig.start();
    let steps: Vec<Value> = stream(0, 0..200)
        .into_iter()
        .map(|mut b| {
            b["behavior"] = json!(true);
            b
        })
        .collect();
    let _ = rig.drive(json!({ "steps": steps }), |_| {});
    ll.stop();
    // The other model: a Kalman decoder fitted with a lag, on the same session.
    let other = rig.dir.join("other.safetensors");
    latentloop(&["fit", "kalman", "--data", s(&rig.data), "--out", s(&other), "--ridge", "0.1"]);
    let out = rig.dir.join("other.npz");
    let run = Command::new(common::bin())
        .args(["replay", s(&rig.session()), "--model", s(&other), "--out", s(&out), "--json", "--quiet"])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let r: Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(r["stepped"], 200);
    let (r2, live) = (r["behavior_r2"].as_f64().unwrap(), r["live_behavior_r2"].as_f64().unwrap());
    assert!(r2 > 0.5 && live > 0.5, "{r}");
    // The live decoder's R^2 is the run's running R^2 over the same bins.
    let run_r2 = rig.summary()["behavior_r2"].as_f64().unwrap();
    assert!((live - run_r2).abs() < 1e-6, "replay {live}, run {run_r2}");
    let a = latentloop::data::npz::read_arrays(&out).unwrap();
    assert_eq!(a["behavior"].shape, vec![200, 2]);
    assert_eq!(a["seq"].data, (0..200).map(|k| k as f64).collect::<Vec<_>>());
}
