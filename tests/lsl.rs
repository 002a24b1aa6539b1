//! The Lab Streaming Layer source against a real peer: pylsl outlets (counts, continuous
//! voltage with planted spikes, markers) on this machine only (LSLAPICFG: machine-scope
//! discovery, loopback, no IPv6), the real binary as the inlet. Checked against the
//! session it records: every sample answered once and decoded like `eval`, gaps and NaN
//! flagged, the crossings found equal to the planted spikes, markers as events. Skipped,
//! saying why, without a Python that has pylsl (a failure under LATENTLOOP_REQUIRE_PYTHON=1).

mod common;

use common::rig::{latentloop, s, small_random_model};
use latentloop::session::read::{BinRecord, Session};
use latentloop::session::Decision;
use latentloop::wire::output::{FLAG_GAP, FLAG_REJECTED};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const OUTLET: &str = r##"
"""Test outlets: argv: plan.json. Waits for a consumer, pushes, exits."""
import json, sys, time
import numpy as np
import pylsl

plan = json.load(open(sys.argv[1]))
fmt = {"float32": pylsl.cf_float32}[plan.get("format", "float32")]
info = pylsl.StreamInfo(plan["name"], plan["type"], plan["channels"], plan["rate"], fmt, plan["name"] + "-sid")
out = pylsl.StreamOutlet(info, chunk_size=plan.get("chunk", 0))
mout = None
if plan.get("markers"):
    mout = pylsl.StreamOutlet(pylsl.StreamInfo(plan["markers"], "Markers", 1, 0, pylsl.cf_string, plan["markers"] + "-sid"))
print("ready", flush=True)
if not out.wait_for_consumers(30) or (mout is not None and not mout.wait_for_consumers(30)):
    sys.exit("no consumer")
time.sleep(0.5)
data = np.load(plan["data"])
rate, chunk = plan["rate"], plan.get("chunk", 1)
t0 = pylsl.local_clock() + 0.05
k = 0
skip = plan.get("skip", {})  # sample index -> samples of the timeline to leave out
shift = 0
markers = {int(i): m for i, m in plan.get("marker_at", {}).items()}
late = {int(i): m for i, m in plan.get("late", {}).items()}
restart_at = plan.get("restart_at")  # the outlet goes away here and comes back (same source_id)
while k < len(data):
    if k == restart_at:
        time.sleep(0.3)  # what was pushed is sent (an outlet destroyed at once drops it)
        del out
        time.sleep(plan["down_s"])
        out = pylsl.StreamOutlet(info, chunk_size=plan.get("chunk", 0))
        if not out.wait_for_consumers(30):
            sys.exit("no consumer after the restart")
        time.sleep(0.2)
        # Stamps go on from where the clock is: the samples of the outage are missing.
        extra = int(np.ceil((pylsl.local_clock() + 0.05 - t0) * rate)) - (k + shift)
        shift += extra
        json.dump({"missing": extra}, open(plan["report"], "w"))
    n = min(chunk, len(data) - k)
    for i in range(k, k + n):
        shift += skip.get(str(i), 0)
    # late: {start: n}: samples start..start+n stamped as sample start+n (a push-stamping
    # outlet that stalled for n sample periods, then caught up).
    stamps = [t0 + (next((s + m for s, m in late.items() if s <= i < s + m), i) + shift) / rate for i in range(k, k + n)]
    while pylsl.local_clock() < stamps[-1]:
        time.sleep(0.0002)
    block = data[k:k + n].astype(np.float32)
    if n == 1:
        out.push_sample(block[0], stamps[0])
    else:
        out.push_chunk(block, stamps)
    for i in range(k, k + n):
        if i in markers and mout is not None:
            mout.push_sample([markers[i]], stamps[i - k])
    k += n
time.sleep(0.5)
print("done", flush=True)
"##;

/// A Python with pylsl, the liblsl of its wheel, and a machine-local LSL config in `dir`.
fn lsl_env(dir: &Path) -> Option<(PathBuf, PathBuf, PathBuf)> {
    let py = common::python_with(&["numpy", "pylsl", "zmq"])?;
    let lib = common::run_python(
        &py,
        "import os, pylsl; print(os.path.join(os.path.dirname(pylsl.__file__), 'lib', 'liblsl.so'))",
        &[],
    );
    let cfg = dir.join("lsl_api.cfg");
    std::fs::write(
        &cfg,
        "[ports]\nIPv6 = disable\n[multicast]\nResolveScope = machine\nMachineAddresses = {127.0.0.1}\n[lab]\nKnownPeers = {127.0.0.1}\n[log]\nlevel = -2\n",
    )
    .unwrap();
    Some((py, PathBuf::from(lib.trim()), cfg))
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Runs the outlet with `plan` and latentloop with `config` until the outlet is done and
/// `decoded` bins are decoded (asked over the control socket), then stops the run.
fn play(dir: &Path, env: &(PathBuf, PathBuf, PathBuf), plan: Value, config: &Path, decoded: u64) -> Value {
    let plan_path = dir.join("plan.json");
    std::fs::write(&plan_path, plan.to_string()).unwrap();
    let outlet_py = dir.join("outlet.py");
    std::fs::write(&outlet_py, OUTLET).unwrap();
    play_outlet(dir, env, &[s(&outlet_py), s(&plan_path)], config, decoded)
}

/// [`play`] with the outlet given as the Python script and its arguments.
fn play_outlet(dir: &Path, env: &(PathBuf, PathBuf, PathBuf), outlet: &[&str], config: &Path, decoded: u64) -> Value {
    let (py, lib, cfg) = env;
    let outlet = Kill(
        Command::new(py)
            .args(outlet)
            .env("LSLAPICFG", cfg)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join("outlet.stderr")).unwrap())
            .spawn()
            .unwrap(),
    );
    let run = Kill(
        Command::new(common::bin())
            .args(["run", s(config), "--quiet"])
            .env("LSLAPICFG", cfg)
            .env("LSL_LIB", lib)
            .stderr(std::fs::File::create(dir.join("latentloop.stderr")).unwrap())
            .spawn()
            .unwrap(),
    );
    let mut outlet = outlet;
    let status = outlet.0.wait().unwrap();
    let err = std::fs::read_to_string(dir.join("outlet.stderr")).unwrap_or_default();
    let ll_err = || std::fs::read_to_string(dir.join("latentloop.stderr")).unwrap_or_default();
    assert!(status.success(), "outlet: {err}\nlatentloop:\n{}", ll_err());
    // The run has everything once it has decoded every bin; then stop it cleanly.
    let ep_file = dir.join("reports/control.endpoint");
    let ep = std::fs::read_to_string(&ep_file).unwrap_or_else(|e| panic!("{e}: {}", ll_err()));
    let sock = zmq::Context::new().socket(zmq::REQ).unwrap();
    sock.set_rcvtimeo(10_000).unwrap();
    sock.connect(ep.trim()).unwrap();
    let ask = |req: Value| -> Value {
        sock.send(req.to_string().as_bytes(), 0).unwrap();
        serde_json::from_slice(&sock.recv_bytes(0).unwrap()).unwrap()
    };
    let start = Instant::now();
    loop {
        let st = ask(json!({"cmd": "status"}));
        if st["bins"]["decoded"].as_u64().unwrap() >= decoded {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "only {st} of {decoded} bins:\n{}", ll_err());
        std::thread::sleep(Duration::from_millis(50));
    }
    ask(json!({"cmd": "stop"}));
    let mut run = run;
    let status = run.0.wait().unwrap();
    assert!(status.success(), "latentloop: {}", ll_err());
    serde_json::from_str(&std::fs::read_to_string(dir.join("reports/summary.json")).unwrap()).unwrap()
}

fn config(dir: &Path, bin_ms: f64, channels: usize, lsl: &str) -> PathBuf {
    let p = dir.join("rig.toml");
    let out = dir.join("out.sock");
    std::fs::write(
        &p,
        format!(
            "[source]\nkind = \"lsl\"\nbin_ms = {bin_ms:?}\nchannels = {channels}\n[source.lsl]\n{lsl}\n\
             [model]\npath = \"model.safetensors\"\nsamples = 16\nseed = 3\n[output]\nendpoint = \"ipc://{}\"\n\
             [reports]\ndir = \"reports\"\n[pipeline]\nstale_ms = 50\n",
            out.display()
        ),
    )
    .unwrap();
    p
}

fn decoded(bins: &[BinRecord]) -> Vec<&BinRecord> {
    bins.iter().filter(|b| b.decision() == Some(Decision::Decoded)).collect()
}

/// Counts, one sample per 1 ms bin, with explicit timestamps: every sample answered once,
/// each output equal to `eval` of the same counts, bit for bit; the source's timestamps
/// give a source -> publish latency.
#[test]
fn lsl_counts_are_decoded_like_eval() {
    let dir = common::tmpdir("lsl-counts");
    let Some(env) = lsl_env(&dir) else { return };
    let data = dir.join("session.npz");
    latentloop(&[
        "simulate",
        "--system",
        "lorenz",
        "--neurons",
        "8",
        "--bins",
        "400",
        "--dt",
        "0.001",
        "--out",
        s(&data),
    ]);
    small_random_model(&dir.join("model.safetensors"), 4, 8, &["--dt", "0.001"]);
    let cfg = config(&dir, 1.0, 8, "name = \"ll-counts\"");
    let spikes_only = dir.join("spikes.npy");
    common::run_python(
        &env.0,
        "import numpy as np, sys; np.save(sys.argv[2], np.load(sys.argv[1])['spikes'])",
        &[s(&data), s(&spikes_only)],
    );
    let plan = json!({"name": "ll-counts", "type": "Counts", "channels": 8, "rate": 1000.0, "data": s(&spikes_only), "chunk": 4});
    let sum = play(&dir, &env, plan, &cfg, 400);
    let session = Session::open(dir.join("reports/session")).unwrap();
    let bins = session.all_bins().unwrap();
    let outs = decoded(&bins);
    assert_eq!(outs.iter().map(|b| b.fields.seq).collect::<Vec<_>>(), (0..400).collect::<Vec<_>>());
    let eval_out = dir.join("eval.npz");
    latentloop(&[
        "eval",
        "--model",
        s(&dir.join("model.safetensors")),
        "--data",
        s(&data),
        "--outputs",
        s(&eval_out),
        "--seed",
        "3",
        "--samples",
        "16",
    ]);
    let e = latentloop::data::npz::read_arrays(&eval_out).unwrap();
    let row = |t: usize| -> Vec<f32> { e["latents"].data[t * 4..(t + 1) * 4].iter().map(|&v| v as f32).collect() };
    for (t, b) in outs.iter().enumerate() {
        assert_eq!(b.fields.out_flags, 0, "bin {t}");
        assert_eq!(b.arrays().latent, row(t).as_slice(), "latent of bin {t}");
    }
    let src = &sum["source_to_publish"];
    assert_eq!(src["count"], 400, "{sum}");
    eprintln!("lsl counts: source -> publish p50 {} us, p99 {} us", src["p50_us"], src["p99_us"]);
    assert!(session.events_of("marker").count() == 0);
}

/// A gap in the timestamps, a stall of the outlet, a NaN sample and markers: the gap is
/// reported (GAP with the samples missing), the stall is not, the NaN bin refused and answered, each marker an event in the
/// session; the session replays identically.
#[test]
fn lsl_gaps_nan_and_markers_are_handled() {
    let dir = common::tmpdir("lsl-faults");
    let Some(env) = lsl_env(&dir) else { return };
    small_random_model(&dir.join("model.safetensors"), 4, 8, &["--dt", "0.001"]);
    let cfg = config(&dir, 1.0, 8, "name = \"ll-faults\"\nmarkers = \"ll-marks\"");
    let npy = dir.join("counts.npy");
    common::run_python(
        &env.0,
        "import numpy as np, sys; x = np.random.default_rng(1).poisson(1.0, (300, 8)).astype(np.float32); x[120, 3] = np.nan; np.save(sys.argv[1], x)",
        &[s(&npy)],
    );
    let plan = json!({"name": "ll-faults", "type": "Counts", "channels": 8, "rate": 1000.0, "data": s(&npy),
        "skip": {"200": 80}, "late": {"100": 30}, "markers": "ll-marks", "marker_at": {"50": "trial 1 start", "250": "trial 2 start"}});
    let sum = play(&dir, &env, plan, &cfg, 300);
    let session = Session::open(dir.join("reports/session")).unwrap();
    assert!(session.clean(), "{}", session.status());
    let bins = session.all_bins().unwrap();
    let outs = decoded(&bins);
    assert_eq!(outs.len(), 300, "every sample answered once");
    let at = |seq: u64| outs.iter().find(|b| b.fields.seq == seq).unwrap_or_else(|| panic!("no seq {seq}"));
    assert_eq!(at(120).fields.out_flags & FLAG_REJECTED, FLAG_REJECTED);
    assert_eq!(at(120).fields.kind, 2);
    // Sample 200 came 80 sample periods late (over the 50 ms tolerance): seq 280, 80
    // missing before it.
    // Samples 100..129 stamped 30 ms late at once (a stall of the outlet, under the
    // tolerance): no gap, nothing counted missing.
    assert!((100..=130).all(|s| at(s).fields.out_flags & FLAG_GAP == 0));
    let g = at(280);
    assert_eq!((g.fields.out_flags & FLAG_GAP, g.fields.dropped_before), (FLAG_GAP, 80));
    assert_eq!(outs.last().unwrap().fields.seq, 379);
    assert_eq!(sum["counters"]["missing"], 80, "{sum}");
    assert_eq!(sum["counters"]["rejected"], 1, "{sum}");
    let labels: Vec<&str> = session.events_of("marker").map(|e| e["label"].as_str().unwrap()).collect();
    assert_eq!(labels, ["trial 1 start", "trial 2 start"]);
    assert!(session.events_of("rejected").any(|e| e["reason"].as_str().unwrap().contains("channel 3 is not finite")));
    let out =
        Command::new(common::bin()).args(["replay", s(&dir.join("reports/session")), "--quiet"]).output().unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stderr).contains("300 bins, all identical"));
}

/// The outlet goes away for a second and comes back with the same source_id: liblsl's
/// inlet recovers, the run goes on, and the outage is one gap of exactly the samples the
/// outlet's clock skipped; nothing is decoded twice.
#[test]
fn lsl_a_stream_that_goes_away_and_comes_back_is_a_gap() {
    let dir = common::tmpdir("lsl-restart");
    let Some(env) = lsl_env(&dir) else { return };
    small_random_model(&dir.join("model.safetensors"), 4, 8, &["--dt", "0.001"]);
    let cfg = config(&dir, 1.0, 8, "source_id = \"ll-restart-sid\"");
    let npy = dir.join("counts.npy");
    common::run_python(
        &env.0,
        "import numpy as np, sys; np.save(sys.argv[1], np.random.default_rng(4).poisson(1.0, (400, 8)).astype(np.float32))",
        &[s(&npy)],
    );
    let report = dir.join("restart.json");
    let plan = json!({"name": "ll-restart", "type": "Counts", "channels": 8, "rate": 1000.0, "data": s(&npy),
        "restart_at": 200, "down_s": 1.5, "report": s(&report)});
    let sum = play(&dir, &env, plan, &cfg, 400);
    let missing: u64 =
        serde_json::from_str::<Value>(&std::fs::read_to_string(&report).unwrap()).unwrap()["missing"].as_u64().unwrap();
    assert!(missing > 1000, "the outage was 1.5 s: {missing} samples");
    let session = Session::open(dir.join("reports/session")).unwrap();
    assert!(session.clean(), "{}", session.status());
    let bins = session.all_bins().unwrap();
    let outs = decoded(&bins);
    assert_eq!(outs.len(), 400, "every sample answered once");
    let seqs: Vec<u64> = outs.iter().map(|b| b.fields.seq).collect();
    let want: Vec<u64> = (0..200).chain(200 + missing..400 + missing).collect();
    assert_eq!(seqs, want);
    let back = outs[200];
    assert_eq!((back.fields.out_flags & FLAG_GAP, back.fields.dropped_before), (FLAG_GAP, missing as u32));
    assert_eq!(sum["counters"]["missing"], missing, "{sum}");
    let ll_err = std::fs::read_to_string(dir.join("latentloop.stderr")).unwrap();
    assert!(ll_err.contains("lsl: 400 samples; 1 gaps in the timestamps"), "{ll_err}");
}

/// Continuous voltage at 30 kHz in chunks, spikes planted after the warm-up: the crossings
/// counted per 10 ms bin are exactly the planted ones.
#[test]
fn lsl_continuous_crossings_equal_the_planted_spikes() {
    let dir = common::tmpdir("lsl-continuous");
    let Some(env) = lsl_env(&dir) else { return };
    small_random_model(&dir.join("model.safetensors"), 4, 4, &["--dt", "0.01"]);
    let cfg = config(
        &dir,
        10.0,
        4,
        "name = \"ll-volts\"\nshape = \"continuous\"\nnoise_seconds = 0.5\nthreshold = 4.0\nrefractory_ms = 1.0",
    );
    // 2 s at 30 kHz: +-0.5 alternating noise (sd 0.5 / 0.6745), spikes of -10 from 0.6 s.
    let npy = dir.join("volts.npy");
    let spikes = dir.join("spikes.json");
    common::run_python(
        &env.0,
        r#"
import json, sys, numpy as np
n, c = 60000, 4
x = np.where(np.arange(n) % 2 == 0, 0.5, -0.5).astype(np.float32)[:, None].repeat(c, 1)
rng = np.random.default_rng(2)
planted = []
for ch in range(c):
    t = 18000
    while True:
        t += int(rng.integers(200, 900))
        if t >= n - 100:
            break
        x[t, ch] = -10.0
        planted.append([ch, int(t)])
np.save(sys.argv[1], x)
json.dump(planted, open(sys.argv[2], "w"))
"#,
        &[s(&npy), s(&spikes)],
    );
    let plan =
        json!({"name": "ll-volts", "type": "EEG", "channels": 4, "rate": 30000.0, "data": s(&npy), "chunk": 300});
    // 2 s, less the 0.5 s warm-up and the last partial bin: at least 140 bins of 10 ms.
    let _ = play(&dir, &env, plan, &cfg, 140);
    let session = Session::open(dir.join("reports/session")).unwrap();
    let bins = session.all_bins().unwrap();
    let outs = decoded(&bins);
    let planted: Vec<(usize, i64)> =
        serde_json::from_str::<Vec<(usize, i64)>>(&std::fs::read_to_string(&spikes).unwrap()).unwrap();
    // A bin's source_ts is its first sample number (counted from the stream's first sample).
    let mut checked = 0;
    for b in &outs {
        let first = b.fields.source_ts as i64;
        for c in 0..4 {
            let want = planted.iter().filter(|&&(ch, t)| ch == c && t >= first && t < first + 300).count();
            assert_eq!(b.arrays().counts[c] as usize, want, "channel {c}, bin starting at sample {first}");
            checked += want;
        }
    }
    assert!(checked > 100, "only {checked} planted spikes fell in decoded bins");
}

/// examples/python/lsl_outlet.py, as the README runs it: a simulated session's counts and
/// markers; every bin decoded once with exactly the session's counts, a marker every 0.5 s.
#[test]
fn lsl_the_example_outlet_plays_a_session() {
    let dir = common::tmpdir("lsl-example");
    let Some(env) = lsl_env(&dir) else { return };
    small_random_model(&dir.join("model.safetensors"), 4, 8, &["--dt", "0.02"]);
    let npz = dir.join("play.npz");
    let out = Command::new(common::bin())
        .args(["simulate", "--system", "lorenz", "--neurons", "8", "--bins", "100", "--seed", "1", "--out", s(&npz)])
        .output()
        .unwrap();
    assert!(out.status.success());
    let cfg = config(&dir, 20.0, 8, "name = \"ll-example\"\nmarkers = \"ll-example-markers\"");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/python/lsl_outlet.py");
    let args =
        [s(&script), s(&npz), "--name", "ll-example", "--markers", "ll-example-markers", "--marker-every", "0.5"];
    play_outlet(&dir, &env, &args, &cfg, 100);
    let session = Session::open(dir.join("reports/session")).unwrap();
    let bins = session.all_bins().unwrap();
    let outs = decoded(&bins);
    assert_eq!(outs.len(), 100);
    let spikes = latentloop::data::Dataset::read_npz(&npz).unwrap().spikes;
    for (k, b) in outs.iter().enumerate() {
        assert_eq!(b.fields.seq, k as u64);
        assert_eq!(b.arrays().counts, spikes.row(k), "bin {k}");
    }
    let labels: Vec<&str> = session.events_of("marker").map(|e| e["label"].as_str().unwrap()).collect();
    assert_eq!(labels, ["trial 1 start", "trial 2 start", "trial 3 start", "trial 4 start"]);
}

/// No such stream: refused before start, naming what was looked for and what was found.
#[test]
fn lsl_a_missing_stream_is_refused_with_the_streams_found() {
    let dir = common::tmpdir("lsl-missing");
    let Some(env) = lsl_env(&dir) else { return };
    small_random_model(&dir.join("model.safetensors"), 4, 8, &["--dt", "0.001"]);
    let cfg = config(&dir, 1.0, 8, "name = \"nobody\"\nresolve_timeout_s = 1.0");
    let out = Command::new(common::bin())
        .args(["run", s(&cfg), "--quiet"])
        .env("LSLAPICFG", &env.2)
        .env("LSL_LIB", &env.1)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("no LSL stream with name = 'nobody' within 1 s; streams found:"), "{err}");
    assert!(!dir.join("reports/session").exists(), "a refused run records nothing");
    // A stream with the wrong number of channels: refused, saying both.
    let plan_path = dir.join("narrow.json");
    let npy = dir.join("narrow.npy");
    common::run_python(
        &env.0,
        "import numpy as np, sys; np.save(sys.argv[1], np.zeros((10, 4), np.float32))",
        &[s(&npy)],
    );
    std::fs::write(
        &plan_path,
        json!({"name": "ll-narrow", "type": "Counts", "channels": 4, "rate": 1000.0, "data": s(&npy)}).to_string(),
    )
    .unwrap();
    let outlet_py = dir.join("outlet.py");
    std::fs::write(&outlet_py, OUTLET).unwrap();
    let mut outlet = Kill(
        Command::new(&env.0)
            .arg(&outlet_py)
            .arg(&plan_path)
            .env("LSLAPICFG", &env.2)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut ready = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(outlet.0.stdout.as_mut().unwrap()), &mut ready).unwrap();
    std::fs::write(&cfg, std::fs::read_to_string(&cfg).unwrap().replace("name = \"nobody\"", "name = \"ll-narrow\""))
        .unwrap();
    let out = Command::new(common::bin())
        .args(["run", s(&cfg), "--quiet"])
        .env("LSLAPICFG", &env.2)
        .env("LSL_LIB", &env.1)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(2) && err.contains("has 4 channels, but channels = 8"), "{err}");
    drop(outlet);
    // Without liblsl: refused with how to get it.
    let out = Command::new(common::bin())
        .args(["run", s(&cfg), "--quiet"])
        .env("LSL_LIB", dir.join("no-such-liblsl.so"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(2) && err.contains("cannot be loaded"), "{err}");
}
