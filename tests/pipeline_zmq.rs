//! The real `latentloop run` binary on loopback ZeroMQ, fed and read by Python (pyzmq with
//! examples/python/latentloop_wire.py): what comes out for good bins, gaps, duplicates,
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

use latentloop::data::npz::read_arrays;
use latentloop::wire::bin::{FLAG_NO_DATA, FLAG_STREAM_START};
use latentloop::wire::output::{FLAG_GAP, FLAG_PREDICT_ONLY, FLAG_REJECTED, FLAG_RESET, FLAG_RESTART};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Channels of every test rig (the models and the simulated sessions).
const CHANNELS: usize = 8;
/// Rows of the simulated session.
const SESSION_BINS: usize = 300;

// ---------------------------------------------------------------------------------------
// The Python driver: plays a plan of bins and records every output.
//
// Plan (JSON): `in`, `out` (endpoints), `channels`, `npz` (the session), `steps`, and
// optionally `rate` (most bins per second, default 1000), `lockstep` (default true: wait
// for each bin's output before the next), `stuck_subscribers` (SUBs that never read),
// `no_answer_pause` (s after a bin that gets no output), `timeout` (s), `drain` (s).
// Steps:
// - `{"seq": s, "row": r | "counts": [...], "flags": f, "behavior": true | [...],
//   "dtype": "u16" | "u32" | "f32", "bad": kind, "expect": bool, "wait": bool}`: one bin
//   (random counts without row or counts); `bad` spoils it (see `frames`); `expect` false
//   for a bin that gets no output; `wait` false to send on without waiting for it;
// - `{"sync": name}`: prints `sync NAME` and waits for `go` on stdin;
// - `{"sleep": seconds}`.
// Result (JSON): `outputs` (decoded, with `client_ns`), `sent` ([seq, ns] stamped just
// before each send), `stuck_received` (what each stuck subscriber could read at the end),
// `errors` (empty on success).

const DRIVER: &str = r##"
"""Test driver: plays a plan of bins to latentloop and records every output.
argv: examples_dir plan.json result.json"""
import json
import sys
import threading
import time

import numpy as np
import zmq
import zmq.utils.monitor

sys.path.insert(0, sys.argv[1])
import latentloop_wire as w  # noqa: E402

plan = json.load(open(sys.argv[2]))
result = {"outputs": [], "sent": [], "errors": [], "stuck_received": []}
ctx = zmq.Context()
xpub = ctx.socket(zmq.XPUB)
xpub.setsockopt(zmq.SNDHWM, 1000000)
xpub.setsockopt(zmq.LINGER, 2000)
xpub.bind(plan["in"])


def sub_socket(rcvhwm, rcvbuf=None):
    s = ctx.socket(zmq.SUB)
    s.setsockopt(zmq.RCVHWM, rcvhwm)
    if rcvbuf:
        s.setsockopt(zmq.RCVBUF, rcvbuf)
    s.setsockopt(zmq.SUBSCRIBE, b"")
    s.setsockopt(zmq.LINGER, 0)
    mon = s.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    s.connect(plan["out"])
    return s, mon


sub, mon = sub_socket(1000000)
stuck = [sub_socket(1, 2048) for _ in range(plan.get("stuck_subscribers", 0))]
timeout = plan.get("timeout", 20.0)


def fail(msg):
    result["errors"].append(msg)
    json.dump(result, open(sys.argv[3], "w"))
    sys.exit(0)


# Slow joiner: send nothing before latentloop's SUB has subscribed to our XPUB and every SUB
# of ours has completed its handshake with latentloop's PUB.
poller = zmq.Poller()
poller.register(xpub, zmq.POLLIN)
pending = {id(m): m for m in [mon] + [m for _, m in stuck]}
for m in pending.values():
    poller.register(m, zmq.POLLIN)
subscribed = False
t_end = time.monotonic() + timeout
while not subscribed or pending:
    if time.monotonic() > t_end:
        fail(f"not connected within {timeout} s: subscribed={subscribed}, handshakes left={len(pending)}")
    for s, _ in poller.poll(100):
        if s is xpub:
            subscribed |= xpub.recv()[:1] == b"\x01"
        elif zmq.utils.monitor.recv_monitor_message(s)["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            pending.pop(id(s), None)
for s, m in [(sub, mon)] + stuck:
    s.disable_monitor()
    m.close(0)
time.sleep(0.3)  # our subscriptions reach latentloop's PUB

outputs = result["outputs"]
cond = threading.Condition()
receiving = True


def receiver():
    while receiving:
        if not sub.poll(20):
            continue
        while True:
            try:
                msg = sub.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            client = time.monotonic_ns()
            o = w.decode_output(msg)
            o = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in o.items()}
            o["client_ns"] = client
            with cond:
                outputs.append(o)
                cond.notify_all()


rx = threading.Thread(target=receiver, daemon=True)
rx.start()

data = np.load(plan["npz"]) if plan.get("npz") else None
rng = np.random.default_rng(plan.get("seed", 0))
channels = plan["channels"]
period = 1.0 / plan.get("rate", 1000.0)
lockstep = plan.get("lockstep", True)


def good_counts(step):
    if "row" in step:
        return data["spikes"][step["row"]]
    if "counts" in step:
        return np.asarray(step["counts"])
    return rng.poisson(1.0, channels)


def frames(step):
    seq, flags, dt = step.get("seq", 0), step.get("flags", 0), step.get("dtype", "u16")
    beh = step.get("behavior")
    if beh is True:
        beh = data["behavior"][step["row"]]
    counts = good_counts(step)
    bad = step.get("bad")
    enc = lambda c=counts, **kw: w.encode_bin(seq, c, source_ts=seq + 1000, flags=flags,  # noqa: E731
                                              **{"behavior": beh, "dtype": dt, **kw})
    if bad is None:
        return [enc()]
    if bad.startswith("channels:"):
        return [enc(rng.poisson(1.0, int(bad.split(":")[1])))]
    if bad == "oversize":
        return [enc(np.ones(1000), dtype="u32")]
    if bad == "truncate":
        return [enc()[:-3]]
    if bad == "nan":
        c = counts.astype(np.float32)
        c[0] = np.nan
        return [enc(c, dtype="f32")]
    if bad == "absurd":
        c = counts.astype(np.int64)
        c[1] = 1000000
        return [enc(c, dtype="u32")]
    if bad == "negative":
        c = counts.astype(np.float32)
        c[2] = -1.0
        return [enc(c, dtype="f32")]
    if bad == "frames":
        return [enc(), b"second frame"]
    if bad == "behavior_count":
        return [enc(behavior=[1.0, 2.0, 3.0])]
    if bad == "behavior_nan":
        return [enc(behavior=[np.nan, 0.0])]
    # No readable header: refused without an answer.
    m = bytearray(enc())
    if bad == "short":
        return [bytes(m[:10])]
    if bad == "empty":
        return [b""]
    if bad == "magic":
        m[0:4] = b"XXXX"
    elif bad == "version":
        m[4:6] = (9).to_bytes(2, "little")
    elif bad == "dtype":
        m[6:8] = (7).to_bytes(2, "little")
    else:
        fail(f"unknown bad kind {bad}")
    return [bytes(m)]


last_send = 0.0
for step in plan["steps"]:
    if "sync" in step:
        print("sync " + step["sync"], flush=True)
        if sys.stdin.readline().strip() != "go":
            fail("sync: no go")
        continue
    if "sleep" in step:
        time.sleep(step["sleep"])
        continue
    msg = frames(step)
    expect = step.get("expect", True)
    wait = step.get("wait", lockstep and expect)
    while (left := last_send + period - time.monotonic()) > 0:
        time.sleep(left)
    with cond:
        before = len(outputs)
    last_send = time.monotonic()
    result["sent"].append([step.get("seq"), time.monotonic_ns()])
    xpub.send_multipart(msg)
    if wait:
        seq = step["seq"]
        with cond:
            ok = cond.wait_for(lambda: any(o["seq"] == seq for o in outputs[before:]), timeout)
        if not ok:
            fail(f"no output for seq {seq} within {timeout} s ({len(outputs)} outputs so far)")
    elif not expect:
        time.sleep(plan.get("no_answer_pause", 0.02))

# Outputs still under way, and anything unexpected after them.
quiet = plan.get("drain", 0.3)
while True:
    with cond:
        n = len(outputs)
    time.sleep(quiet)
    with cond:
        if len(outputs) == n:
            break
receiving = False
rx.join()
for s, _ in stuck:
    n = 0
    while s.poll(300):
        s.recv()
        n += 1
    result["stuck_received"].append(n)
json.dump(result, open(sys.argv[3], "w"))
"##;

// ---------------------------------------------------------------------------------------
// Helpers

/// Runs `latentloop ARGS`, asserting success.
fn latentloop(args: &[&str]) -> Output {
    let out = Command::new(common::bin()).args(args).output().expect("latentloop runs");
    assert!(
        out.status.success(),
        "latentloop {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A small untrained XFADS model (S=16, r=2, hidden widths 16) written to `out`.
fn small_random_model(out: &Path, latents: usize, channels: usize, extra: &[&str]) {
    let (l, n) = (latents.to_string(), channels.to_string());
    let mut args = vec!["random-model", "--latents", &l, "--channels", &n, "--samples", "16", "--rank", "2"];
    args.extend(["--hidden", "16", "--encoder-hidden", "16", "--out", s(out)]);
    args.extend(extra);
    latentloop(&args);
}

/// An endpoint nobody else uses: a unix socket in `dir`, or a free tcp port when the path
/// is too long for a unix socket address (108 bytes).
fn endpoint(dir: &Path, name: &str) -> String {
    let p = dir.join(format!("{name}.ipc"));
    if s(&p).len() <= 100 {
        format!("ipc://{}", s(&p))
    } else {
        free_tcp()
    }
}

fn free_tcp() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    format!("tcp://127.0.0.1:{}", l.local_addr().unwrap().port())
}

fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/python")
}

#[derive(Clone, Copy)]
enum ModelKind {
    /// A random XFADS model with this many latents.
    Xfads(usize),
    /// A Kalman decoder fitted on the session (deterministic: no sampling).
    Kalman,
}

/// What a test's rig config sets beyond the model and endpoints.
#[derive(Default)]
struct Cfg<'a> {
    bin_ms: f64,
    /// Lines added to the [output] table.
    output: &'a str,
    /// Lines added to the [reports] table.
    reports: &'a str,
    /// Tables of their own.
    extra: &'a str,
}

impl Cfg<'_> {
    fn bins(bin_ms: f64) -> Self {
        Cfg { bin_ms, ..Default::default() }
    }
}

/// One test's rig: a model, a simulated session, endpoints, a config.
struct Rig {
    dir: PathBuf,
    py: PathBuf,
    model: PathBuf,
    data: PathBuf,
    in_ep: String,
    out_ep: String,
    config: PathBuf,
}

impl Rig {
    /// `None` (skipped, with the reason printed) when there is no Python with numpy and pyzmq.
    fn new(name: &str, kind: ModelKind) -> Option<Rig> {
        let py = common::python_with(&["numpy", "zmq"])?;
        let dir = common::tmpdir(&format!("pz-{name}"));
        let data = dir.join("session.npz");
        let model = dir.join("model.safetensors");
        let bins = SESSION_BINS.to_string();
        let ch = CHANNELS.to_string();
        latentloop(&[
            "simulate",
            "--system",
            "lorenz",
            "--neurons",
            &ch,
            "--bins",
            &bins,
            "--dt",
            "0.005",
            "--seed",
            "1",
            "--out",
            s(&data),
        ]);
        match kind {
            ModelKind::Xfads(latents) => {
                small_random_model(&model, latents, CHANNELS, &["--dt", "0.005"]);
            }
            ModelKind::Kalman => {
                latentloop(&["fit", "kalman", "--data", s(&data), "--out", s(&model)]);
            }
        }
        let rig = Rig {
            in_ep: endpoint(&dir, "bins"),
            out_ep: endpoint(&dir, "out"),
            config: dir.join("rig.toml"),
            dir,
            py,
            model,
            data,
        };
        rig.write_config(Cfg::bins(1.0));
        Some(rig)
    }

    /// Writes the rig config (see [`Cfg`]).
    fn write_config(&self, c: Cfg) {
        let text = format!(
            "[source]\nkind = \"zmq\"\nbin_ms = {:?}\nchannels = {CHANNELS}\n\n[source.zmq]\nendpoint = \"{}\"\n\n\
             [model]\npath = \"model.safetensors\"\nsamples = 16\nseed = 3\n\n\
             [output]\nendpoint = \"{}\"\n{}\n\n[reports]\ndir = \"reports\"\n{}\n\n{}\n",
            c.bin_ms, self.in_ep, self.out_ep, c.output, c.reports, c.extra
        );
        std::fs::write(&self.config, text).unwrap();
    }

    fn reports(&self) -> PathBuf {
        self.dir.join("reports")
    }

    /// Starts `latentloop run` on the config (stderr kept in a file).
    fn start(&self) -> Running {
        let _ = std::fs::remove_dir_all(self.reports());
        let stderr = self.dir.join("latentloop.stderr");
        let child = Command::new(common::bin())
            .args(["run", s(&self.config), "--quiet"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("latentloop starts");
        Running { child, stderr }
    }

    /// Plays `plan` (steps, see DRIVER) with the driver and returns its result; `on_sync`
    /// is called at each `{"sync": name}` step, before the driver goes on.
    fn drive(&self, plan: Value, mut on_sync: impl FnMut(&str)) -> Value {
        let mut plan = plan;
        let p = plan.as_object_mut().unwrap();
        p.insert("in".into(), json!(self.in_ep));
        p.insert("out".into(), json!(self.out_ep));
        p.insert("channels".into(), json!(CHANNELS));
        p.insert("npz".into(), json!(s(&self.data)));
        let (plan_path, result_path, driver) =
            (self.dir.join("plan.json"), self.dir.join("result.json"), self.dir.join("driver.py"));
        std::fs::write(&plan_path, plan.to_string()).unwrap();
        std::fs::write(&driver, DRIVER).unwrap();
        let _ = std::fs::remove_file(&result_path);
        let stderr = self.dir.join("driver.stderr");
        let mut child = Guard(
            Command::new(&self.py)
                .args([s(&driver), s(&examples_dir()), s(&plan_path), s(&result_path)])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(std::fs::File::create(&stderr).unwrap())
                .spawn()
                .expect("python runs"),
        );
        let mut stdin: ChildStdin = child.0.stdin.take().unwrap();
        let stdout = child.0.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        loop {
            match rx.recv_timeout(Duration::from_secs(120)) {
                Ok(line) => {
                    if let Some(name) = line.strip_prefix("sync ") {
                        on_sync(name);
                        writeln!(stdin, "go").unwrap();
                        stdin.flush().unwrap();
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => panic!("the driver hangs"),
            }
        }
        let status = child.0.wait().unwrap();
        let err = std::fs::read_to_string(&stderr).unwrap_or_default();
        assert!(status.success(), "driver failed ({status}):\n{err}");
        let result: Value = serde_json::from_str(&std::fs::read_to_string(&result_path).unwrap())
            .unwrap_or_else(|e| panic!("driver result: {e}\n{err}"));
        let errors = result["errors"].as_array().unwrap();
        assert!(errors.is_empty(), "driver: {errors:?}\n{err}");
        result
    }

    fn summary(&self) -> Value {
        let p = self.reports().join("summary.json");
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
    }
}

/// Kills a child that is still running when dropped (a failed assertion).
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

struct Running {
    child: Child,
    stderr: PathBuf,
}

impl Running {
    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill({sig}) failed");
    }

    /// Ctrl-C, then waits for the exit (20 s at most); returns the status and stderr.
    fn interrupt(&mut self) -> (ExitStatus, String) {
        if let Ok(None) = self.child.try_wait() {
            self.signal(libc::SIGINT);
        }
        let start = Instant::now();
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            assert!(start.elapsed() < Duration::from_secs(20), "latentloop did not exit on SIGINT");
            std::thread::sleep(Duration::from_millis(20));
        };
        (status, std::fs::read_to_string(&self.stderr).unwrap_or_default())
    }

    /// Ctrl-C, and asserts a clean exit (code 0).
    fn stop(&mut self) -> String {
        let (status, stderr) = self.interrupt();
        assert_eq!(status.code(), Some(0), "latentloop exited with {status}:\n{stderr}");
        stderr
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One decoded output as the driver recorded it.
#[derive(Debug, Clone)]
struct Out {
    seq: u64,
    flags: u16,
    dropped: u64,
    recv_ns: u64,
    publish_ns: u64,
    client_ns: u64,
    behavior: Vec<f64>,
    latent: Vec<f64>,
    lag1: Vec<f64>,
}

fn outputs(result: &Value) -> Vec<Out> {
    let vec = |v: &Value| v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect::<Vec<_>>();
    result["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| Out {
            seq: o["seq"].as_u64().unwrap(),
            flags: o["flags"].as_u64().unwrap() as u16,
            dropped: o["dropped_before"].as_u64().unwrap(),
            recv_ns: o["recv_ns"].as_u64().unwrap(),
            publish_ns: o["publish_ns"].as_u64().unwrap(),
            client_ns: o["client_ns"].as_u64().unwrap(),
            behavior: vec(&o["behavior"]),
            latent: vec(&o["latent"]),
            lag1: vec(&o["lag1"]),
        })
        .collect()
}

fn seqs(outs: &[Out]) -> Vec<u64> {
    outs.iter().map(|o| o.seq).collect()
}

fn counter(summary: &Value, name: &str) -> u64 {
    summary["counters"][name].as_u64().unwrap_or_else(|| panic!("no counter {name} in {summary}"))
}

/// A good bin: row `row` of the session as sequence number `seq`.
fn bin(seq: u64, row: usize) -> Value {
    json!({"seq": seq, "row": row})
}

/// Bins `rows` of the session numbered from `first_seq`, the first with the stream-start flag.
fn stream(first_seq: u64, rows: std::ops::Range<usize>) -> Vec<Value> {
    rows.enumerate()
        .map(|(k, row)| {
            let mut b = bin(first_seq + k as u64, row);
            if k == 0 {
                b["flags"] = json!(FLAG_STREAM_START);
            }
            b
        })
        .collect()
}

/// The f32 values the wire carried (JSON's decimal digits parse to within an f64 ulp of them).
fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// Asserts |a - b| <= tol * max(1, |b|) elementwise.
fn assert_close(a: &[f64], b: &[f64], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol * y.abs().max(1.0), "{what}[{i}]: {x} vs {y}");
    }
}

/// Checks that the outputs account for every bin from their first to their last sequence
/// number: each output answers one bin and reports the ones before it that were dropped.
fn assert_accounted(outs: &[Out], what: &str) {
    for w in outs.windows(2) {
        assert!(w[1].seq > w[0].seq, "{what}: outputs out of order: {} then {}", w[0].seq, w[1].seq);
        assert_eq!(w[1].seq - w[0].seq - 1, w[1].dropped, "{what}: seq {} reports {} dropped", w[1].seq, w[1].dropped);
        assert_eq!(w[1].flags & FLAG_GAP != 0, w[1].dropped > 0, "{what}: GAP flag of seq {}", w[1].seq);
    }
}

// ---------------------------------------------------------------------------------------
// (a) Good bins

/// Every bin is answered exactly once, in order, with clear flags, and the decoded values
/// are those of `latentloop eval` on the same bins, bit for bit (same model, samples and
/// seed: the filter's noise is a deterministic function of the seed and the bin index, and
/// both drive the same per-bin step, src/pipeline/step.rs).
#[test]
fn every_bin_is_answered_once_and_decoded_like_eval() {
    let Some(rig) = Rig::new("eval", ModelKind::Xfads(4)) else { return };
    rig.write_config(Cfg::bins(5.0));
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
        rig.write_config(Cfg { bin_ms: 5.0, extra: "[pipeline]\nmax_predict_gap = 50", ..Default::default() });
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
}

// ---------------------------------------------------------------------------------------
// The other example scripts

/// examples/python/latency_probe.py and receive_outputs.py against the binary: the probe's
/// report adds up, the clock is one clock, and the receiver saves what was published.
#[test]
fn example_probe_and_receiver_work_against_the_binary() {
    let Some(rig) = Rig::new("probe", ModelKind::Xfads(4)) else { return };
    rig.write_config(Cfg::bins(2.0));
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
