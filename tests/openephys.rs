//! The Open Ephys source against examples/python/fake_openephys.py, a fake GUI publishing
//! the ZMQ Interface plugin's messages: the source alone (exact counts per bin in both
//! modes), the real binary (bins, sequence numbers, sample-number timestamps, lost messages
//! in the summary), and the per-message path without allocations.

mod common;

use latentloop::pipeline::source::openephys::{
    data_message, spike_message, ttl_message, Binner, Frames, Mode, OpenEphysSource, Settings,
};
use latentloop::pipeline::source::{BinSlot, Counters, Next, RejectLog, Source};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "common/alloc_count.rs"]
mod alloc_count;

// ---- helpers ----

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn settings(mode: Mode, channels: usize, bin_ms: f64) -> Settings {
    Settings {
        channels,
        bin_ms,
        mode,
        stream: Some("example_data".into()),
        threshold: 4.5,
        noise_seconds: 0.5,
        refractory_ms: 1.0,
        electrodes: Vec::new(),
    }
}

fn fake(py: &Path, args: &[String]) -> Child {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/python/fake_openephys.py");
    Command::new(py).arg(script).args(args).stdout(Stdio::null()).spawn().expect("python runs")
}

fn wait_ok(mut child: Child, what: &str, limit: Duration) {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{what} failed: {status}");
            return;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Truth {
    first_sample: i64,
    samples: i64,
    spikes: Vec<(usize, i64)>,
}

fn truth(path: &Path) -> Truth {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    Truth {
        first_sample: v["first_sample"].as_i64().unwrap(),
        samples: v["samples"].as_i64().unwrap(),
        spikes: v["spikes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p[0].as_u64().unwrap() as usize, p[1].as_i64().unwrap()))
            .collect(),
    }
}

#[derive(Debug)]
struct Got {
    seq: u64,
    ts: u64,
    counts: Vec<f32>,
}

/// Reads bins from a source on its own thread until `done` is set and it goes quiet.
fn collect(mut src: OpenEphysSource, done: Arc<AtomicBool>) -> std::thread::JoinHandle<(Vec<Got>, OpenEphysSource)> {
    std::thread::spawn(move || {
        let mut slot = BinSlot::new(src.channels(), 0);
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match src.next(&mut slot, Duration::from_millis(50)) {
                Next::Bin => out.push(Got { seq: slot.seq, ts: slot.source_ts, counts: slot.counts.to_vec() }),
                _ if done.load(Ordering::Relaxed) || Instant::now() > deadline => break,
                _ => {}
            }
        }
        (out, src)
    })
}

/// Spikes per channel in `[from, from + spb)`.
fn expected(t: &Truth, channels: usize, from: i64, spb: i64) -> Vec<f32> {
    let mut c = vec![0.0; channels];
    for &(ch, s) in &t.spikes {
        if s >= from && s < from + spb {
            c[ch] += 1.0;
        }
    }
    c
}

// ---- tests ----

/// One fake GUI, two sources on it (continuous and spikes mode): every bin's counts equal
/// the spikes the fake injected in it, and bins are consecutive by sample number.
#[test]
fn source_counts_equal_the_injected_spikes() {
    let Some(py) = common::python_with(&["numpy", "zmq"]) else { return };
    let dir = common::tmpdir("openephys-source");
    let truth_path = dir.join("truth.json");
    let endpoint = format!("tcp://127.0.0.1:{}", free_port());
    let (n, bin_ms) = (4, 10.0);

    let ctx = zmq::Context::new();
    let counters = [Arc::new(Counters::default()), Arc::new(Counters::default())];
    let (tx, rx) = crossbeam_channel::bounded(64);
    let log = RejectLog::new(tx);
    let cont = OpenEphysSource::connect(
        &ctx,
        &endpoint,
        settings(Mode::Continuous, n, bin_ms),
        counters[0].clone(),
        log.clone(),
    )
    .unwrap()
    .quiet();
    let mut sp = settings(Mode::Spikes, n, bin_ms);
    sp.electrodes = (1..=n).map(|c| format!("Electrode {c}")).collect();
    let spikes = OpenEphysSource::connect(&ctx, &endpoint, sp, counters[1].clone(), log).unwrap().quiet();
    let done = Arc::new(AtomicBool::new(false));
    let threads = [collect(cont, done.clone()), collect(spikes, done.clone())];

    // 10 kHz, blocks of 250 samples (25 ms: 2.5 bins, so bins straddle blocks), 3 s at four
    // times real time; spikes after the 0.5 s warm-up; spike events sent up to 30 samples
    // after their sample (a detector's delay); a TTL event every 0.1 s.
    let args: Vec<String> = [
        "--endpoint",
        &endpoint,
        "--channels",
        "4",
        "--sample-rate",
        "10000",
        "--block",
        "250",
        "--duration",
        "3",
        "--first-sample",
        "123456",
        "--speed",
        "4",
        "--spike-rate",
        "40",
        "--spikes-after",
        "0.6",
        "--spike-events",
        "--spike-delay",
        "30",
        "--ttl-every",
        "0.1",
        "--wait-subscribers",
        "2",
        "--wait",
        "10",
        "--truth",
        truth_path.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    wait_ok(fake(&py, &args), "fake_openephys.py", Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    done.store(true, Ordering::Relaxed);
    let [a, b] = threads;
    let (cont_bins, cont) = a.join().unwrap();
    let (spike_bins, spikes) = b.join().unwrap();
    while let Ok(m) = rx.try_recv() {
        eprintln!("{m}");
    }
    let t = truth(&truth_path);
    assert!(t.spikes.len() > 200, "the fake injected {} spikes", t.spikes.len());
    let spb = 100;
    for c in &counters {
        assert_eq!(Counters::get(&c.rejected), 0);
        assert_eq!(Counters::get(&c.lost_messages), 0);
    }

    // Continuous: the warm-up is 5000 samples = 20 blocks, so bins start at the 21st block
    // and run to the end of the data: (30000 - 5000) / 100 bins.
    let origin = t.first_sample + 5000;
    assert_eq!(cont.binner().origin(), Some(origin));
    assert_eq!(cont_bins.len() as i64, (t.samples - 5000) / spb, "continuous bins");
    let mut total = 0.0;
    for (k, g) in cont_bins.iter().enumerate() {
        assert_eq!(g.seq, k as u64);
        assert_eq!(g.ts as i64, origin + k as i64 * spb);
        assert_eq!(g.counts, expected(&t, n, g.ts as i64, spb), "continuous bin {k}");
        total += g.counts.iter().sum::<f32>();
    }
    assert_eq!(total as usize, t.spikes.len(), "every injected spike counted once");
    assert_eq!(cont.binner().stats().binning.forced_bins, 0);

    // Spikes: bins from the first block; the last one waits for a bin of time after it.
    assert_eq!(spikes.binner().origin(), Some(t.first_sample));
    assert_eq!(spike_bins.len() as i64, t.samples / spb - 1, "spike bins");
    let mut total = 0.0;
    for (k, g) in spike_bins.iter().enumerate() {
        assert_eq!(g.seq, k as u64);
        assert_eq!(g.ts as i64, t.first_sample + k as i64 * spb);
        assert_eq!(g.counts, expected(&t, n, g.ts as i64, spb), "spike bin {k}");
        total += g.counts.iter().sum::<f32>();
    }
    let last_end = t.first_sample + spike_bins.len() as i64 * spb;
    assert_eq!(total as usize, t.spikes.iter().filter(|s| s.1 < last_end).count());
    assert_eq!(spikes.binner().stats().binning.late, 0);
    assert!(spikes.binner().stats().ttl_messages >= 29);
}

/// The real binary: `latentloop run` on the fake GUI with a random model decodes every bin
/// (sequence numbers consecutive, source timestamps the first sample of each bin) and
/// reports the messages the fake did not send as lost.
#[test]
fn run_decodes_a_fake_gui_and_reports_lost_messages() {
    let Some(py) = common::python_with(&["numpy", "zmq"]) else { return };
    let dir = common::tmpdir("openephys-run");
    let model = dir.join("model.safetensors");
    let st = Command::new(common::bin())
        .args(["random-model", "--channels", "4", "--dt", "0.01", "--latents", "4", "--samples", "8"])
        .args(["--hidden", "16", "--encoder-hidden", "16", "--rank", "2", "--out"])
        .arg(&model)
        .status()
        .unwrap();
    assert!(st.success());
    let (gui, out) = (format!("tcp://127.0.0.1:{}", free_port()), format!("tcp://127.0.0.1:{}", free_port()));
    let config = dir.join("rig.toml");
    std::fs::write(
        &config,
        format!(
            "[source]\nkind = \"openephys\"\nbin_ms = 10.0\nchannels = 4\n\n[source.openephys]\nendpoint = \"{gui}\"\n\
             mode = \"continuous\"\nnoise_seconds = 0.5\n\n[model]\npath = \"model.safetensors\"\n\n\
             [output]\nendpoint = \"{out}\"\n\n[reports]\ndir = \"reports\"\n"
        ),
    )
    .unwrap();

    // The output, read here.
    let ctx = zmq::Context::new();
    let sub = ctx.socket(zmq::SUB).unwrap();
    sub.set_subscribe(b"").unwrap();
    sub.set_rcvtimeo(100).unwrap();
    sub.connect(&out).unwrap();
    let run = Command::new(common::bin())
        .arg("run")
        .arg(&config)
        .args(["--quiet", "--seconds", "60"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let run_pid = run.id() as libc::pid_t;

    // 10 kHz, one 100-sample block per 10 ms bin, in real time, from sample 5000: 0.5 s of
    // warm-up, then 200 bins starting at sample 10000. Messages 700 and 901 are not sent.
    let args: Vec<String> = [
        "--endpoint",
        &gui,
        "--channels",
        "4",
        "--sample-rate",
        "10000",
        "--block",
        "100",
        "--duration",
        "2.5",
        "--first-sample",
        "5000",
        "--speed",
        "1",
        "--spike-rate",
        "30",
        "--ttl-every",
        "0.25",
        "--drop",
        "700,901",
        "--wait-subscribers",
        "1",
        "--wait",
        "10",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut outputs = Vec::new();
    let fake = fake(&py, &args);
    let reader = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut got = Vec::new();
        while Instant::now() < deadline {
            if let Ok(m) = sub.recv_bytes(0) {
                let o = latentloop::wire::output::decode(&m).expect("a valid output message");
                let last = o.header.seq == 199;
                got.push(o.header);
                if last {
                    break;
                }
            }
        }
        got
    });
    wait_ok(fake, "fake_openephys.py", Duration::from_secs(30));
    outputs.extend(reader.join().unwrap());
    // SAFETY: kill(2) on the child we spawned.
    unsafe { libc::kill(run_pid, libc::SIGINT) };
    let o = run.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "latentloop run failed:\n{stderr}");

    assert!(!outputs.is_empty(), "no output arrived\n{stderr}");
    assert_eq!(outputs[0].seq, 0, "the first bin is bin 0");
    assert_eq!(outputs.last().unwrap().seq, 199, "200 bins\n{stderr}");
    let mut prev: Option<u64> = None;
    for h in &outputs {
        assert_eq!(h.source_ts, 10_000 + 100 * h.seq, "source_ts is the bin's first sample");
        if let Some(p) = prev {
            // Bins completed by the same block are not stale: every one is decoded.
            assert_eq!(h.seq, p + 1, "{h:?} after {p}");
            assert_eq!(h.dropped_before, 0, "{h:?}");
        }
        prev = Some(h.seq);
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reports/summary.json")).unwrap()).unwrap();
    let c = &summary["counters"];
    assert_eq!(c["lost_messages"], 2, "{summary}");
    assert_eq!(c["acquired"], 200, "{summary}");
    assert_eq!(c["rejected"], 0, "{summary}");
    assert_eq!((c["skipped"].as_u64(), c["decoded"].as_u64()), (Some(0), Some(200)), "{summary}");
    assert_eq!(summary["source"], "openephys");
    assert!(stderr.contains("2 messages lost"), "the end-of-run line names the loss:\n{stderr}");
}

/// After the warm-up, handling a message and taking its bins allocates nothing: data with
/// crossings, lost messages, TTL events, ignored channels, spike events.
#[test]
fn the_per_message_path_allocates_nothing() {
    let (tx, _rx) = crossbeam_channel::bounded(64);
    let log = RejectLog::new(tx);
    for mode in [Mode::Continuous, Mode::Spikes] {
        let mut set = settings(mode, 3, 5.0);
        set.noise_seconds = 0.05;
        set.stream = None;
        let mut b = Binner::new(set, Arc::new(Counters::default()), log.clone());
        let mut slot = BinSlot::new(3, 2);
        let mut num = 0u64;
        let mut msgs = Vec::new();
        // 1 kHz, blocks of 16 samples: a warm-up of 50, then data with crossings; a channel
        // beyond the three, a TTL event and a spike event per block, and a lost message.
        for k in 0..40i64 {
            let s = 16 * k;
            for c in 0..4 {
                let x: Vec<f32> = (0..16).map(|i| if (i + c) % 7 == 0 && k > 5 { -9.0 } else { 0.3 }).collect();
                num += 1;
                msgs.push(data_message(num, "example_data", c as usize, s, 1000.0, &x));
            }
            num += 1;
            msgs.push(ttl_message(num, "example_data", s + 3, 2, k % 2 == 0));
            num += 1;
            msgs.push(spike_message(num, "example_data", &format!("Electrode {}", k % 3 + 1), s + 5, 4, 40));
            if k == 25 {
                num += 1;
            }
        }
        let mut bins = 0;
        let mut handle = |b: &mut Binner, m: &Vec<Vec<u8>>| {
            b.handle(&Frames::from_parts(m), 1);
            while b.pop(&mut slot) {
                bins += 1;
            }
        };
        // Warm-up (and the one-time warnings) first.
        for m in &msgs[..6 * 12] {
            handle(&mut b, m);
        }
        let ((), n) = alloc_count::counted(|| {
            for m in &msgs[6 * 12..] {
                handle(&mut b, m);
            }
        });
        assert!(bins > 50, "{mode:?}: {bins} bins");
        assert_eq!(b.stats().lost_messages, 1);
        assert_eq!(n, 0, "{mode:?}: {n} allocations after the warm-up");
        if mode == Mode::Continuous {
            assert!(b.noise_sd(0).is_some());
        }
    }
}
