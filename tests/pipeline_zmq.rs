//! The real `latentloop run` binary on loopback ZeroMQ, fed and read by Python (pyzmq with
//! the package's python/latentloop/wire.py): what comes out for good bins, gaps, duplicates,
//! restarts, bad messages, stuck subscribers, a decoder that falls behind, Ctrl-C and bad
//! configs.
//!
//! Every test has its own directory, model and endpoints (ipc:// under the test's tmpdir,
//! or free tcp ports when that path is too long for a unix socket), so tests run
//! concurrently. ZeroMQ's slow joiner is handled, not slept away: the Python driver binds an
//! XPUB socket and sends nothing before latentloop's subscription has arrived on it, and its
//! own SUB sockets have completed their handshake with latentloop's PUB. Bins that must be
//! decoded one at a time are sent in lockstep (the next bin after the previous output), so
//! a loaded machine slows the tests down but cannot change what they see. No assertion is on
//! absolute latency.

mod common;

use common::rig::*;
use latentloop::data::npz::read_arrays;
use latentloop::wire::bin::{FLAG_NO_DATA, FLAG_STREAM_START};
use latentloop::wire::output::{FLAG_GAP, FLAG_PREDICT_ONLY, FLAG_REJECTED, FLAG_RESET, FLAG_RESTART};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------
// (a) Good bins

/// Every bin is answered exactly once, in order, with clear flags, and the decoded values
/// are those of `latentloop eval` on the same bins, bit for bit (same model, samples and
/// seed: the filter's noise is a deterministic function of the seed and the bin index, and
/// both drive the same per-bin step, src/pipeline/step.rs).
#[test]
fn every_bin_is_answered_once_and_decoded_like_eval() {
    let Some(rig) = Rig::new("eval", ModelKind::Xfads(4)) else { return };
    // Lockstep bins on a loaded machine: generous staleness, so none is skipped.
    rig.write_config(Cfg { bin_ms: 1.0, extra: "[pipeline]\nstale_ms = 10", ..Default::default() });
    let eval_path = rig.dir.join("eval.npz");
    let report = latentloop(&[
        "eval",
        "--model",
        s(&rig.model),
        "--data",
        s(&rig.data),
        "--outputs",
        s(&eval_path),
        "--seed",
        "3",
        "--samples",
        "16",
    ]);
    let report: Value = serde_json::from_slice(&report.stdout).unwrap();

    let mut ll = rig.start();
    let steps: Vec<Value> = stream(0, 0..SESSION_BINS)
        .into_iter()
        .map(|mut b| {
            b["behavior"] = json!(true);
            b
        })
        .collect();
    let res = rig.drive(json!({ "steps": steps }), |_| {});
    ll.stop();

    let outs = outputs(&res);
    assert_eq!(seqs(&outs), (0..SESSION_BINS as u64).collect::<Vec<_>>());
    for o in &outs {
        assert_eq!((o.flags, o.dropped), (0, 0), "seq {}", o.seq);
    }
    let eval = read_arrays(&eval_path).unwrap();
    let row = |name: &str, t: usize| {
        let a = &eval[name];
        let c = a.shape[1];
        a.data[t * c..(t + 1) * c].to_vec()
    };
    for (t, o) in outs.iter().enumerate() {
        assert_eq!(f32s(&o.behavior), f32s(&row("behavior", t)), "behaviour of bin {t}");
        assert_eq!(f32s(&o.latent), f32s(&row("latents", t)), "latent of bin {t}");
        assert_eq!(f32s(&o.lag1), f32s(&row("lag1", t)), "lag-1 mean of bin {t}");
    }
    // One clock: sent (stamped just before the send) <= received <= published <= received back.
    let sent = res["sent"].as_array().unwrap();
    for (o, snt) in outs.iter().zip(sent) {
        let sent_ns = snt[1].as_u64().unwrap();
        assert!(
            sent_ns <= o.recv_ns && o.recv_ns <= o.publish_ns && o.publish_ns <= o.client_ns,
            "seq {}: sent {sent_ns}, recv {}, publish {}, client {}",
            o.seq,
            o.recv_ns,
            o.publish_ns,
            o.client_ns
        );
    }
    let sum = rig.summary();
    for (name, want) in [("acquired", SESSION_BINS as u64), ("decoded", SESSION_BINS as u64)] {
        assert_eq!(counter(&sum, name), want, "{name}");
    }
    for name in ["rejected", "skipped", "missing", "out_of_order", "restarts", "resets", "predict_only"] {
        assert_eq!(counter(&sum, name), 0, "{name}");
    }
    // The bins carried behaviour: the running R^2 is eval's.
    let (run_r2, eval_r2) = (sum["behavior_r2"].as_f64().unwrap(), report["behavior_r2"].as_f64().unwrap());
    assert!((run_r2 - eval_r2).abs() < 1e-4, "behaviour R^2: run {run_r2}, eval {eval_r2}");
}

// ---------------------------------------------------------------------------------------
// (b) Gaps

/// A gap: the next output carries GAP and the number of missing bins, and the decoder
/// predicted through them: what follows is exactly what bins without data would have given.
/// A gap longer than max_predict_gap resets the decoder instead.
#[test]
fn a_gap_is_predicted_through_like_bins_without_data() {
    let (Some(gap), Some(nodata)) = (Rig::new("gap", ModelKind::Xfads(4)), Rig::new("gap-nodata", ModelKind::Xfads(4)))
    else {
        return;
    };
    for rig in [&gap, &nodata] {
        rig.write_config(Cfg {
            bin_ms: 1.0,
            extra: "[pipeline]\nmax_predict_gap = 50\nstale_ms = 10",
            ..Default::default()
        });
    }

    // 20..25 missing; then 40..101 missing (61 > 50).
    let mut steps = stream(0, 0..20);
    steps.extend((25..40).map(|k| bin(k, k as usize)));
    steps.extend((101..110).map(|k| bin(k, k as usize - 60)));
    let mut ll = gap.start();
    let with_gap = outputs(&gap.drive(json!({ "steps": steps }), |_| {}));
    ll.stop();
    let sum = gap.summary();

    // The same bins with 20..25 sent as "no data".
    let mut steps = stream(0, 0..20);
    steps.extend((20..25).map(|k| json!({"seq": k, "row": k, "flags": FLAG_NO_DATA})));
    steps.extend((25..40).map(|k| bin(k, k as usize)));
    let mut ll = nodata.start();
    let without_data = outputs(&nodata.drive(json!({ "steps": steps }), |_| {}));
    ll.stop();
    let sum_nodata = nodata.summary();

    let want: Vec<u64> = (0..20).chain(25..40).chain(101..110).collect();
    assert_eq!(seqs(&with_gap), want);
    for o in &with_gap {
        let expected = match o.seq {
            25 => (FLAG_GAP, 5),
            101 => (FLAG_GAP | FLAG_RESET, 61),
            _ => (0, 0),
        };
        assert_eq!((o.flags, o.dropped), expected, "seq {}", o.seq);
    }
    assert_eq!(seqs(&without_data), (0..40).collect::<Vec<_>>());
    for o in &without_data {
        let expected = if (20..25).contains(&o.seq) { FLAG_PREDICT_ONLY } else { 0 };
        assert_eq!((o.flags, o.dropped), (expected, 0), "no-data run, seq {}", o.seq);
    }
    for (a, b) in with_gap[..35].iter().zip(without_data.iter().filter(|o| !(20..25).contains(&o.seq))) {
        assert_eq!(a.seq, b.seq);
        assert_close(&a.latent, &b.latent, 1e-6, &format!("latent after the gap, seq {}", a.seq));
        assert_close(&a.lag1, &b.lag1, 1e-6, &format!("lag-1 mean after the gap, seq {}", a.seq));
        assert_close(&a.behavior, &b.behavior, 1e-6, &format!("behaviour after the gap, seq {}", a.seq));
    }
    for (name, want) in [("missing", 66), ("skipped", 0), ("resets", 1), ("decoded", 44), ("predict_only", 0)] {
        assert_eq!(counter(&sum, name), want, "{name}");
    }
    assert_eq!((counter(&sum_nodata, "predict_only"), counter(&sum_nodata, "missing")), (5, 0));
    // Both sessions replay bit for bit: the gap and the long gap's reset included.
    gap.assert_replays_identically();
    nodata.assert_replays_identically();
}

// ---------------------------------------------------------------------------------------
// (c) Duplicates and late bins

/// Duplicates and late bins are dropped without an output and counted; a jump back of 64
/// is still "late" (more than 64 is a restart, see the next test).
#[test]
fn duplicates_and_late_bins_are_dropped_and_counted() {
    let Some(rig) = Rig::new("dup", ModelKind::Xfads(4)) else { return };
    let late = |seq: u64| json!({"seq": seq, "row": seq, "expect": false});
    let mut steps = stream(0, 0..10);
    steps.push(late(9)); // duplicate
    steps.extend([bin(10, 10), bin(11, 11)]);
    steps.push(late(8));
    steps.push(bin(12, 12));
    steps.push(late(5));
    steps.extend((13..100).map(|k| bin(k, k as usize)));
    steps.push(late(35)); // 64 back from 99
    steps.extend([bin(100, 100), bin(101, 101)]);
    let mut ll = rig.start();
    let outs = outputs(&rig.drive(json!({ "steps": steps }), |_| {}));
    ll.stop();

    assert_eq!(seqs(&outs), (0..=101).collect::<Vec<_>>(), "each sequence number answered once, in order");
    for o in &outs {
        assert_eq!((o.flags, o.dropped), (0, 0), "seq {}", o.seq);
    }
    let sum = rig.summary();
    for (name, want) in [("out_of_order", 4), ("acquired", 106), ("decoded", 102), ("restarts", 0), ("missing", 0)] {
        assert_eq!(counter(&sum, name), want, "{name}");
    }
    rig.assert_replays_identically();
}

// ---------------------------------------------------------------------------------------
// (d) Restarts

/// A restarted publisher (stream-start flag, or a jump back of more than 64) resets the
/// decoder: RESTART|RESET on the first output, and (a Kalman decoder being deterministic)
/// the same bins then decode exactly as they did the first time.
#[test]
fn a_publisher_restart_resets_the_decoder() {
    let Some(rig) = Rig::new("restart", ModelKind::Kalman) else { return };
    let mut steps = stream(0, 0..100);
    steps.extend(stream(0, 0..80)); // stream-start flag on seq 0
    steps.extend((0..10).map(|k| bin(14 + k, k as usize))); // 79 -> 14: 65 back, no flag
    let mut ll = rig.start();
    let outs = outputs(&rig.drive(json!({ "steps": steps }), |_| {}));
    ll.stop();

    let want: Vec<u64> = (0..100).chain(0..80).chain(14..24).collect();
    assert_eq!(seqs(&outs), want);
    for (i, o) in outs.iter().enumerate() {
        let flags = if i == 100 || i == 180 { FLAG_RESTART | FLAG_RESET } else { 0 };
        assert_eq!((o.flags, o.dropped), (flags, 0), "output {i} (seq {})", o.seq);
    }
    for (again, first) in outs[100..180].iter().chain(&outs[180..]).zip(outs[..80].iter().chain(&outs[..10])) {
        let what = format!("seq {} after the restart vs seq {}", again.seq, first.seq);
        assert_close(&again.behavior, &first.behavior, 1e-6, &what);
        assert_close(&again.latent, &first.latent, 1e-6, &what);
        assert_close(&again.lag1, &first.lag1, 1e-6, &what);
    }
    let sum = rig.summary();
    for (name, want) in [("restarts", 2), ("resets", 2), ("out_of_order", 0), ("decoded", 190)] {
        assert_eq!(counter(&sum, name), want, "{name}");
    }
    rig.assert_replays_identically();
}

// ---------------------------------------------------------------------------------------
// (e) Bad messages

/// Malformed, truncated, wrong-sized, NaN and absurd messages are counted; those whose
/// header could be read are answered with REJECTED|PREDICT_ONLY; the first are logged with
/// their reason; decoding goes on with the next good bin.
#[test]
fn bad_messages_are_refused_answered_and_logged() {
    let Some(rig) = Rig::new("reject", ModelKind::Xfads(4)) else { return };
    let bad = |seq: u64, kind: &str| json!({"seq": seq, "row": seq, "bad": kind});
    let unreadable = |kind: &str| json!({"seq": 19, "row": 19, "bad": kind, "expect": false});
    let answered =
        ["channels:9", "nan", "truncate", "absurd", "negative", "frames", "behavior_count", "behavior_nan", "oversize"];
    let mut steps = stream(0, 0..10);
    steps.extend(answered.iter().enumerate().map(|(i, k)| bad(10 + i as u64, k)));
    steps.extend(["short", "empty", "magic", "version", "dtype"].map(unreadable));
    steps.extend((19..22).map(|k| bin(k, k as usize)));
    steps.extend((0..30).map(|_| unreadable("short"))); // more than are logged
    steps.extend((22..30).map(|k| bin(k, k as usize)));
    let mut ll = rig.start();
    let outs = outputs(&rig.drive(json!({ "steps": steps, "no_answer_pause": 0.005 }), |_| {}));
    let stderr = ll.stop();

    assert_eq!(seqs(&outs), (0..30).collect::<Vec<_>>());
    for o in &outs {
        let flags = if (10..19).contains(&o.seq) { FLAG_REJECTED | FLAG_PREDICT_ONLY } else { 0 };
        assert_eq!((o.flags, o.dropped), (flags, 0), "seq {}", o.seq);
        assert!(o.behavior.iter().chain(&o.latent).all(|v| v.is_finite()), "seq {}: {o:?}", o.seq);
    }
    let sum = rig.summary();
    let refused = answered.len() as u64 + 5 + 30;
    for (name, want) in
        [("rejected", refused), ("predict_only", 9), ("decoded", 30), ("out_of_order", 0), ("resets", 0)]
    {
        assert_eq!(counter(&sum, name), want, "{name}");
    }
    let reasons = [
        "bin seq 10 refused: bin has 9 channels, the decoder expects 8",
        "bin seq 11 refused: channel 0 is not finite",
        "bin seq 12 refused: payload is 45 bytes, header implies 48",
        "bin seq 13 refused: channel 1 has an absurd value 1000000",
        "bin seq 14 refused: channel 2 has an absurd value -1",
        "bin seq 15 refused: 1 extra frames",
        "bin seq 16 refused: bin carries 3 behaviour values, the decoder expects 2",
        "bin seq 17 refused: channel 8 is not finite",
        "bin seq 18 refused: bin has 1000 channels, the decoder expects 8",
        "message of 10 bytes refused: message of 10 bytes is shorter than the 32-byte header",
        "message of 0 bytes refused",
        "bad magic",
        "schema version 9 is not supported",
        "unknown dtype code 7",
    ];
    for r in reasons {
        assert!(stderr.contains(r), "stderr lacks {r:?}:\n{stderr}");
    }
    let logged = stderr.lines().filter(|l| l.starts_with("rejected: ")).count() as u64;
    assert!(logged >= reasons.len() as u64 && logged < refused, "{logged} of {refused} rejections logged:\n{stderr}");
    rig.assert_replays_identically();
}

// ---------------------------------------------------------------------------------------
// (f) Slow subscribers

/// A subscriber that never reads (rcvhwm 1) fills its queues and is then dropped by the PUB
/// socket: the decoder keeps decoding at the bin rate and the other subscriber keeps
/// receiving.
#[test]
fn a_stuck_subscriber_never_blocks_the_decoder() {
    // 64 latents: ~580-byte outputs, so the stuck subscriber's socket buffers fill up.
    let Some(rig) = Rig::new("stuck", ModelKind::Xfads(64)) else { return };
    rig.write_config(Cfg { bin_ms: 1.0, output: "sndhwm = 16", ..Default::default() });
    const N: u64 = 2500;
    let mut steps: Vec<Value> =
        (0..N).map(|k| json!({"seq": k, "wait": false, "flags": if k == 0 { FLAG_STREAM_START } else { 0 }})).collect();
    steps.push(json!({"seq": N})); // waits for its output
    let mut ll = rig.start();
    let res = rig.drive(json!({"steps": steps, "rate": 1000.0, "stuck_subscribers": 1}), |_| {});
    ll.stop();

    let sum = rig.summary();
    let (acquired, decoded) = (counter(&sum, "acquired"), counter(&sum, "decoded"));
    let (skipped, missing) = (counter(&sum, "skipped"), counter(&sum, "missing"));
    let stuck = res["stuck_received"][0].as_u64().unwrap();
    let outs = outputs(&res);
    let receive_to_publish = sum["stages"].as_array().unwrap().iter().find(|s| s["stage"] == "receive_to_publish");
    let e2e = receive_to_publish.unwrap();
    eprintln!(
        "stuck subscriber: acquired {acquired}, decoded {decoded}, skipped {skipped}, missing {missing}, \
         reader got {}, stuck one {stuck}; receive->publish p50 {} us p99 {} us",
        outs.len(),
        e2e["p50_us"],
        e2e["p99_us"]
    );
    assert_eq!(acquired, N + 1);
    assert_eq!(decoded + skipped + missing, N + 1, "every bin decoded or reported dropped");
    assert!(decoded >= N / 4, "the decoder kept up with the bins: {decoded} of {}", N + 1);
    assert_eq!(e2e["count"].as_u64().unwrap(), decoded, "every decoded bin timed");
    assert_eq!(outs.last().unwrap().seq, N);
    assert!(outs.len() as u64 >= decoded / 2, "the reading subscriber got {} of {decoded}", outs.len());
    // Evidence that its queues did fill (~1.4 MB of outputs against default socket buffers),
    // so the PUB socket had to drop for it.
    assert!(stuck < decoded, "the stuck subscriber got all {stuck} outputs: its queues never filled");
}

// ---------------------------------------------------------------------------------------
// (g) Ctrl-C, with nobody subscribed

/// Bins from examples/python/send_bins.py, no subscriber at all: latentloop decodes them
/// (or reports them dropped); Ctrl-C in mid-stream exits 0 with every report written.
#[test]
fn sigint_exits_cleanly_and_writes_the_reports() {
    let Some(rig) = Rig::new("sigint", ModelKind::Xfads(4)) else { return };
    rig.write_config(Cfg { bin_ms: 1.0, reports: "snapshot_seconds = 0.2", ..Default::default() });
    let mut ll = rig.start();
    let times = rig.dir.join("sends.csv");
    let sender = Guard(
        Command::new(&rig.py)
            .arg(examples_dir().join("send_bins.py"))
            .args(["--random", "8", "--rate", "1000", "--bins", "20000", "--endpoint", &rig.in_ep, "--times"])
            .arg(&times)
            .stderr(std::fs::File::create(rig.dir.join("send_bins.stderr")).unwrap())
            .spawn()
            .unwrap(),
    );
    // Mid-stream: once the snapshots show bins being decoded.
    let snapshots = rig.reports().join("snapshots.jsonl");
    let start = Instant::now();
    loop {
        let decoded = std::fs::read_to_string(&snapshots)
            .ok()
            .and_then(|t| t.lines().last().and_then(|l| serde_json::from_str::<Value>(l).ok()))
            .map_or(0, |v| v["counters"]["decoded"].as_u64().unwrap_or(0));
        if decoded >= 300 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "no bins decoded (snapshots: {decoded})");
        std::thread::sleep(Duration::from_millis(50));
    }
    let started = Instant::now();
    let (status, stderr) = ll.interrupt();
    assert_eq!(status.code(), Some(0), "exit status {status}:\n{stderr}");
    eprintln!("latentloop exited {:?} after SIGINT", started.elapsed());
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(sender.0.id() as libc::pid_t, libc::SIGINT) };
    let mut sender = sender;
    assert!(sender.0.wait().unwrap().success());

    let sum = rig.summary();
    let (acquired, decoded) = (counter(&sum, "acquired"), counter(&sum, "decoded"));
    let accounted = decoded + counter(&sum, "skipped") + counter(&sum, "missing");
    assert!(decoded >= 300, "decoded {decoded}");
    // Every bin acquired was decoded or reported dropped, but for those still in the ring
    // (64 slots) when Ctrl-C came.
    assert!(accounted <= acquired && acquired - accounted <= 64, "{accounted} of {acquired} bins accounted for");
    let stages = sum["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 6);
    for st in stages {
        let name = st["stage"].as_str().unwrap();
        let hgrm = std::fs::read_to_string(rig.reports().join(format!("latency-{name}.hgrm"))).unwrap();
        assert!(hgrm.contains("Percentile") && hgrm.contains("Total count"), "latency-{name}.hgrm:\n{hgrm}");
        assert_eq!(st["count"].as_u64().unwrap(), decoded, "stage {name}");
    }
    let svg = std::fs::read_to_string(rig.reports().join("latency.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("<polyline") && svg.trim_end().ends_with("</svg>"));
    let snaps = std::fs::read_to_string(&snapshots).unwrap();
    assert!(snaps.lines().all(|l| serde_json::from_str::<Value>(l).is_ok()));
    // send_bins.py's record: one row per bin, sequence numbers from 0, deadlines 1 ms apart.
    let times = std::fs::read_to_string(&times).unwrap();
    let rows: Vec<Vec<u64>> =
        times.lines().skip(1).map(|l| l.split(',').map(|x| x.parse().unwrap()).collect()).collect();
    assert!(rows.len() as u64 >= acquired, "{} sends recorded, {acquired} bins acquired", rows.len());
    for (k, r) in rows.iter().enumerate() {
        assert_eq!(r[0], k as u64);
        assert_eq!(r[1] - rows[0][1], k as u64 * 1_000_000, "deadline of bin {k}");
    }
}

// ---------------------------------------------------------------------------------------
// (h) Config errors

/// Config errors exit with code 2 and name the line and the reason, before any socket is
/// bound or connected: the test holds the output port (a bind would fail differently) and
/// listens on the bins port (nobody may connect).
#[test]
fn config_errors_exit_2_naming_the_line_before_any_socket() {
    let dir = common::tmpdir("pz-config");
    let model = dir.join("model.safetensors");
    small_random_model(&model, 4, 8, &[]);
    let held_out = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let bins = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    bins.set_nonblocking(true).unwrap();
    let good = format!(
        "[source]\nkind = \"zmq\"\nbin_ms = 1.0\nchannels = 8\n\n[source.zmq]\nendpoint = \"tcp://127.0.0.1:{}\"\n\n\
         [model]\npath = \"model.safetensors\"\n\n[output]\nendpoint = \"tcp://127.0.0.1:{}\"\n\n[reports]\ndir = \"reports\"\n",
        bins.local_addr().unwrap().port(),
        held_out.local_addr().unwrap().port()
    );
    let run = |name: &str, text: &str| {
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        let out = Command::new(common::bin()).args(["run", s(&path), "--seconds", "3", "--quiet"]).output().unwrap();
        (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let cases = [
        (
            "unknown-key",
            good.replace("channels = 8\n", "channels = 8\ncolour = \"red\"\n"),
            vec!["line 5", "unknown field `colour`"],
        ),
        (
            "missing-model",
            good.replace("model.safetensors", "nope.safetensors"),
            vec!["line 10", "nope.safetensors does not exist"],
        ),
        (
            "zero-bin",
            good.replace("bin_ms = 1.0", "bin_ms = 0"),
            vec!["line 3 (`bin_ms = 0`)", "outside 0.1..=1000 ms"],
        ),
        (
            "channels",
            good.replace("channels = 8", "channels = 9"),
            vec!["line 4 (`channels = 9`)", "but the model", "expects 8"],
        ),
        (
            "bin-width",
            good.replace("bin_ms = 1.0", "bin_ms = 20.0"),
            vec!["line 3 (`bin_ms = 20.0`)", "was made for 1 ms bins", "allow_bin_width_mismatch"],
        ),
        (
            "behavior-dims",
            good.replace("[source.zmq]\n", "[source.zmq]\nbehavior_dims = 3\n"),
            vec!["line 7 (`behavior_dims = 3`)", "decodes 2 behaviour dims"],
        ),
        ("sndhwm", good.replace("[output]\n", "[output]\nsndhwm = 0\n"), vec!["[output] sndhwm = 0"]),
        ("samples", good.replace("[model]\n", "[model]\nsamples = 1\n"), vec!["[model] samples = 1"]),
        ("stale", format!("{good}[pipeline]\nstale_ms = -1\n"), vec!["[pipeline] stale_ms = -1"]),
        (
            "max-count",
            good.replace("[source.zmq]\n", "[source.zmq]\nmax_count = 1e9\n"),
            vec!["max_count = 1000000000"],
        ),
        (
            "remote-control",
            format!("{good}[control]\nendpoint = \"tcp://0.0.0.0:5999\"\n"),
            vec!["is not on this machine", "allow_remote"],
        ),
    ];
    for (name, text, wanted) in &cases {
        let (status, stderr) = run(name, text);
        assert_eq!(status.code(), Some(2), "{name}: {status}\n{stderr}");
        assert!(stderr.starts_with("error: config "), "{name}: {stderr}");
        for w in wanted {
            assert!(stderr.contains(w), "{name}: stderr lacks {w:?}:\n{stderr}");
        }
        assert!(!stderr.contains("cannot bind"), "{name}: got as far as binding:\n{stderr}");
        assert!(!dir.join("reports").exists(), "{name}: wrote reports");
    }
    std::thread::sleep(Duration::from_millis(100));
    match bins.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("a bad config connected to the bins endpoint: {other:?}"),
    }
    // The probe works: the good config gets as far as the (held) output port, and fails there.
    let (status, stderr) = run("good", &good);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("cannot bind output"), "{stderr}");
    // The explicit override of the bin width passes the check (and says so).
    let overridden = good
        .replace("bin_ms = 1.0", "bin_ms = 20.0")
        .replace("[model]\n", "[model]\nallow_bin_width_mismatch = true\n");
    let (status, stderr) = run("override", &overridden);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("warning: bin_ms = 20 but the model") && stderr.contains("cannot bind output"), "{stderr}");
}

// ---------------------------------------------------------------------------------------
// Falling behind

/// A decoder that falls behind (here: latentloop stopped with SIGSTOP while a burst of
/// bins arrives) decodes the newest bin and reports the skipped ones (GAP, dropped_before):
/// every bin is accounted for. A restart inside the skipped backlog is not lost.
#[test]
fn falling_behind_decodes_the_newest_and_accounts_for_every_bin() {
    let Some(rig) = Rig::new("behind", ModelKind::Xfads(4)) else { return };
    let burst = |steps: Vec<Value>| -> Vec<Value> {
        steps
            .into_iter()
            .map(|mut b| {
                b["wait"] = json!(false);
                b
            })
            .collect()
    };
    let mut steps = stream(0, 0..30);
    steps.push(json!({"sync": "stop"}));
    steps.extend(burst(stream(0, 30..70))); // the publisher restarts: seq 0..40 with the flag on 0
    steps.push(json!({"sleep": 0.2}));
    steps.push(json!({"sync": "cont"}));
    steps.extend((40..50).map(|k| bin(k, 30 + k as usize)));
    steps.push(json!({"sync": "stop"}));
    steps.extend(burst((50..90).map(|k| bin(k, 30 + k as usize)).collect()));
    steps.push(json!({"sleep": 0.2}));
    steps.push(json!({"sync": "cont"}));
    steps.extend((90..100).map(|k| bin(k, 30 + k as usize)));
    let mut ll = rig.start();
    let res = rig.drive(json!({"steps": steps, "rate": 100000.0}), |what| match what {
        "stop" => ll.signal(libc::SIGSTOP),
        "cont" => ll.signal(libc::SIGCONT),
        other => panic!("sync {other}"),
    });
    ll.stop();

    let outs = outputs(&res);
    assert_eq!(seqs(&outs[..30]), (0..30).collect::<Vec<_>>());
    let after = &outs[30..];
    assert_eq!(after[0].flags & (FLAG_RESTART | FLAG_RESET), FLAG_RESTART | FLAG_RESET, "{:?}", after[0]);
    assert_eq!(after[0].dropped, after[0].seq, "the restart's output reports the new stream's bins before it");
    assert_eq!(after[0].flags & FLAG_GAP != 0, after[0].dropped > 0);
    assert_accounted(after, "after the restart");
    assert_eq!(after.last().unwrap().seq, 99);
    assert!(after[1..].iter().all(|o| o.flags & !FLAG_GAP == 0), "{after:?}");
    let reported: u64 = after.iter().map(|o| o.dropped).sum();
    let sum = rig.summary();
    eprintln!("falling behind: {} outputs for 100 bins after the restart", after.len());
    for (name, want) in [
        ("acquired", 130),
        ("restarts", 1),
        ("resets", 1),
        ("out_of_order", 0),
        ("missing", 0),
        ("skipped", reported),
        ("decoded", outs.len() as u64),
    ] {
        assert_eq!(counter(&sum, name), want, "{name}");
    }
    // The skipped and stale bins of the catch-up replay as they were decided live.
    rig.assert_replays_identically();
}

// ---------------------------------------------------------------------------------------
// The other example scripts

/// examples/python/latency_probe.py and receive_outputs.py against the binary: the probe's
/// report adds up, the clock is one clock, and the receiver saves what was published.
#[test]
fn example_probe_and_receiver_work_against_the_binary() {
    let Some(rig) = Rig::new("probe", ModelKind::Xfads(4)) else { return };
    rig.write_config(Cfg { bin_ms: 1.0, extra: "[pipeline]\nstale_ms = 10", ..Default::default() });
    let mut ll = rig.start();
    let saved = rig.dir.join("received.npz");
    let mut receiver = Guard(
        Command::new(&rig.py)
            .arg(examples_dir().join("receive_outputs.py"))
            .args(["--endpoint", &rig.out_ep, "--ready", "--idle", "1.0", "--seconds", "60", "--quiet", "--save"])
            .arg(&saved)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(rig.dir.join("receive_outputs.stderr")).unwrap())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(receiver.0.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    let report = rig.dir.join("probe.json");
    let probe = Command::new(&rig.py)
        .arg(examples_dir().join("latency_probe.py"))
        .args(["--channels", "8", "--in-endpoint", &rig.in_ep, "--out-endpoint", &rig.out_ep])
        .args(["--rate", "500", "--seconds", "1", "--warmup", "0.2", "--json"])
        .arg(&report)
        .output()
        .unwrap();
    assert!(probe.status.success(), "latency_probe.py:\n{}", String::from_utf8_lossy(&probe.stderr));
    assert!(receiver.0.wait().unwrap().success());
    ll.stop();

    let p: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    eprintln!("latency_probe.py: {p}");
    let n = |k: &str| p[k].as_u64().unwrap_or_else(|| panic!("{k} in {p}"));
    assert_eq!(n("sent"), 500);
    assert_eq!(n("received") + n("lost"), 500);
    assert_eq!(n("lost_unexplained"), 0, "every lost bin was reported by latentloop");
    assert_eq!(n("clock_violations"), 0, "send <= recv_ns <= publish_ns <= receive, on one clock");
    let lat = &p["latency"];
    let e2e = &lat["end_to_end"];
    let q = |k: &str| e2e[k].as_f64().unwrap();
    assert!(
        0.0 < q("p50_us") && q("p50_us") <= q("p99_us") && q("p99_us") <= q("p999_us") && q("p999_us") <= q("max_us")
    );
    for part in ["zmq_in", "latentloop", "zmq_out"] {
        assert_eq!(lat[part]["count"], e2e["count"], "{part}");
    }

    let a = read_arrays(&saved).unwrap();
    let col = |k: &str| a[k].data.clone();
    let (seq, dropped) = (col("seq"), col("dropped_before"));
    assert_eq!(seq.len() as u64, n("received"), "the receiver saved every output");
    let total: f64 = seq.len() as f64 + dropped.iter().sum::<f64>();
    assert_eq!(total, seq.last().unwrap() + 1.0, "outputs and dropped_before account for every bin");
    let (recv, publish, client) = (col("recv_ns"), col("publish_ns"), col("client_ns"));
    for i in 0..seq.len() {
        assert!(recv[i] <= publish[i] && publish[i] <= client[i], "row {i}");
    }
    assert_eq!((a["behavior"].shape.clone(), a["latent"].shape.clone()), (vec![seq.len(), 2], vec![seq.len(), 4]));
    assert_eq!(a["lag1"].shape, vec![seq.len(), 4]);
    assert_eq!(counter(&rig.summary(), "decoded"), n("received"));
}
