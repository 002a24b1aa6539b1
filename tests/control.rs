//! The control socket of the real binary on loopback: a model swapped mid-run at 1 kHz
//! without a missed or repeated bin (outputs before = eval of model A, after = eval of model
//! B), channels masked (= eval of the zero-filled data), bad requests answered with a
//! reason while decoding goes on untouched, stop, and the session of all of it replaying
//! identically.

mod common;

use common::rig::*;
use latentloop::data::npz::read_arrays;
use latentloop::data::Dataset;
use latentloop::wire::output::{FLAG_PAUSED, FLAG_RESET};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

/// A REQ client on the run's control socket (its endpoint from `<reports>/control.endpoint`).
struct Client(zmq::Socket);

impl Client {
    fn connect(rig: &Rig) -> Client {
        let file = rig.reports().join("control.endpoint");
        let start = Instant::now();
        let ep = loop {
            if let Ok(t) = std::fs::read_to_string(&file) {
                if t.ends_with('\n') {
                    break t.trim().to_string();
                }
            }
            assert!(start.elapsed() < Duration::from_secs(20), "no {}", file.display());
            std::thread::sleep(Duration::from_millis(20));
        };
        let s = zmq::Context::new().socket(zmq::REQ).unwrap();
        s.set_rcvtimeo(15_000).unwrap();
        s.set_linger(0).unwrap();
        s.connect(&ep).unwrap();
        Client(s)
    }
    fn raw(&self, msg: &[u8]) -> Value {
        self.0.send(msg, 0).unwrap();
        serde_json::from_slice(&self.0.recv_bytes(0).expect("a reply")).unwrap()
    }
    fn ask(&self, req: Value) -> Value {
        self.raw(req.to_string().as_bytes())
    }
    fn ok(&self, req: Value) -> Value {
        let r = self.ask(req.clone());
        assert_eq!(r["ok"], true, "{req} -> {r}");
        r
    }
}

/// eval of `model` on `data` (seed 3, 16 samples as the rig config): its per-bin outputs.
fn eval(
    rig: &Rig,
    model: &Path,
    data: &Path,
    name: &str,
) -> std::collections::BTreeMap<String, latentloop::data::npz::NpyArray> {
    let out = rig.dir.join(format!("{name}.npz"));
    latentloop(&[
        "eval",
        "--model",
        s(model),
        "--data",
        s(data),
        "--outputs",
        s(&out),
        "--seed",
        "3",
        "--samples",
        "16",
    ]);
    read_arrays(&out).unwrap()
}

fn row(a: &latentloop::data::npz::NpyArray, t: usize) -> Vec<f32> {
    let c = a.shape[1];
    a.data[t * c..(t + 1) * c].iter().map(|&v| v as f32).collect()
}

/// The session's bins `from..to` as a data set of their own.
fn slice(rig: &Rig, from: usize, to: usize, name: &str) -> std::path::PathBuf {
    let d = Dataset::read_npz(&rig.data).unwrap().slice(from, to);
    let p = rig.dir.join(format!("{name}.npz"));
    d.write_npz(&p).unwrap();
    p
}

#[test]
fn a_model_swapped_mid_run_misses_no_bin_and_decodes_like_eval_of_each_model() {
    let Some(rig) = Rig::new("control-swap", ModelKind::Xfads(4)) else { return };
    let model_b = rig.dir.join("b.safetensors");
    small_random_model(&model_b, 4, CHANNELS, &["--dt", "0.001", "--seed", "9"]);
    let mut steps = stream(0, 0..150);
    steps.push(json!({"sync": "swap"}));
    steps.extend((150..300).map(|k| bin(k, k as usize)));
    let mut ll = rig.start();
    let ctl = Client::connect(&rig);
    let mut reply = Value::Null;
    let res = rig.drive(json!({"steps": steps, "rate": 1000.0}), |_| {
        reply = ctl.ok(json!({"cmd": "load_model", "path": s(&model_b), "carry_state": false}));
    });
    ll.stop();
    assert_eq!((reply["state"].as_str(), reply["after_seq"].as_u64()), (Some("reset"), Some(149)), "{reply}");
    let outs = outputs(&res);
    assert_eq!(seqs(&outs), (0..300).collect::<Vec<_>>(), "every bin answered once");
    let a = eval(&rig, &rig.model, &rig.data, "eval-a");
    let b = eval(&rig, &model_b, &slice(&rig, 150, 300, "after"), "eval-b");
    for (t, o) in outs.iter().enumerate() {
        let (e, k) = if t < 150 { (&a, t) } else { (&b, t - 150) };
        assert_eq!(f32s(&o.latent), row(&e["latents"], k), "latent of bin {t}");
        assert_eq!(f32s(&o.behavior), row(&e["behavior"], k), "behaviour of bin {t}");
        assert_eq!(o.flags, if t == 150 { FLAG_RESET } else { 0 }, "flags of bin {t}");
    }
    let sum = rig.summary();
    assert_eq!((counter(&sum, "missing"), counter(&sum, "skipped")), (0, 0));
    rig.assert_replays_identically();
}

#[test]
fn masked_channels_are_decoded_as_missing_and_bad_requests_change_nothing() {
    let Some(rig) = Rig::new("control-mask", ModelKind::Xfads(4)) else { return };
    let mut steps = stream(0, 0..100);
    steps.push(json!({"sync": "bad"}));
    steps.extend((100..140).map(|k| bin(k, k as usize)));
    steps.push(json!({"sync": "mask"}));
    steps.extend((140..220).map(|k| bin(k, k as usize)));
    steps.push(json!({"sync": "pause"}));
    steps.extend((220..240).map(|k| bin(k, k as usize)));
    steps.push(json!({"sync": "stop"}));
    let mut ll = rig.start();
    let ctl = Client::connect(&rig);
    let res = rig.drive(json!({ "steps": steps }), |what| match what {
        "bad" => {
            let bad = [
                (&b"{not json"[..], "the request is not JSON"),
                (br#"{"cmd": "frobnicate"}"#, "unknown variant `frobnicate`"),
                (br#"{"cmd": "mask", "channels": "all"}"#, "invalid type: string \"all\""),
                (br#"{"cmd": "mask", "channels": [8]}"#, "channel 8 is out of range"),
                (br#"{"cmd": "mask", "channels": [1, 1]}"#, "channel 1 is listed twice"),
                (
                    br#"{"cmd": "load_model", "path": "/no/such/model.safetensors"}"#,
                    "cannot read /no/such/model.safetensors",
                ),
                (br#"{"cmd": "load_model"}"#, "missing field `path`"),
                (
                    br#"{"cmd": "calibrate", "seconds": 1}"#,
                    "calibration needs at least 100 bins that carried behaviour",
                ),
                (br#"{"cmd": "adapt", "mode": "rml"}"#, "does not apply to an XFADS model"),
                (br#"[1, 2]"#, "not an array"),
            ];
            for (req, why) in bad {
                let r = ctl.raw(req);
                assert_eq!(r["ok"], false, "{}", String::from_utf8_lossy(req));
                assert!(r["error"].as_str().unwrap().contains(why), "{} -> {r}", String::from_utf8_lossy(req));
            }
            let st = ctl.ok(json!({"cmd": "status"}));
            assert_eq!(st["bins"]["decoded"], 100, "{st}");
            assert_eq!(st["model_swaps"], 0);
        }
        "mask" => {
            let r = ctl.ok(json!({"cmd": "mask", "channels": [1, 5]}));
            assert_eq!((r["state"].as_str(), r["after_seq"].as_u64()), (Some("carried"), Some(139)), "{r}");
        }
        "pause" => {
            ctl.ok(json!({"cmd": "pause"}));
        }
        "stop" => {
            let r = ctl.ok(json!({"cmd": "stop"}));
            assert_eq!(r["stopping"], true);
        }
        other => panic!("{other}"),
    });
    let (status, stderr) = ll.interrupt();
    assert_eq!(status.code(), Some(0), "{stderr}");
    let outs = outputs(&res);
    assert_eq!(seqs(&outs), (0..240).collect::<Vec<_>>());
    // The masked channels read as 0 from bin 140 on: the encoder's zero-fill.
    let mut data = Dataset::read_npz(&rig.data).unwrap();
    for t in 140..data.bins() {
        for j in [1, 5] {
            data.spikes.row_mut(t)[j] = 0.0;
        }
    }
    let zero_filled = rig.dir.join("zero-filled.npz");
    data.write_npz(&zero_filled).unwrap();
    let e = eval(&rig, &rig.model, &zero_filled, "eval-masked");
    for (t, o) in outs.iter().enumerate() {
        assert_eq!(f32s(&o.latent), row(&e["latents"], t), "latent of bin {t}");
        assert_eq!(o.flags, if t >= 220 { FLAG_PAUSED } else { 0 }, "flags of bin {t}");
    }
    let sum = rig.summary();
    assert_eq!(counter(&sum, "decoded"), 240);
    rig.assert_replays_identically();
    // Every request and its reply is in the session.
    let s = latentloop::session::read::Session::open(rig.session()).unwrap();
    let control: Vec<&Value> = s.events_of("control").collect();
    assert_eq!(control.len(), 10 + 1 + 3, "{control:?}");
    assert!(control.iter().any(|e| e["reply"]["error"].as_str().is_some_and(|m| m.contains("frobnicate"))));
}
