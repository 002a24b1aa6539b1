//! The test rig of the binary's end-to-end tests (pipeline_zmq.rs, session.rs, control.rs):
//! a model, a simulated session, loopback endpoints, a config, and a Python driver (pyzmq
//! with the package's wire codec, python/latentloop/wire.py) that plays a plan of bins and
//! records every output.
#![allow(dead_code)]

use super::{bin as binary, python_with, tmpdir};
use latentloop::wire::bin::FLAG_STREAM_START;
use latentloop::wire::output::FLAG_GAP;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Channels of every test rig (the models and the simulated sessions).
pub const CHANNELS: usize = 8;
/// Rows of the simulated session.
pub const SESSION_BINS: usize = 300;

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

pub const DRIVER: &str = r##"
"""Test driver: plays a plan of bins to latentloop and records every output.
argv: python_package_dir plan.json result.json"""
import json
import sys
import threading
import time

import numpy as np
import zmq
import zmq.utils.monitor

sys.path.insert(0, sys.argv[1])
from latentloop import wire as w  # noqa: E402

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
pub fn latentloop(args: &[&str]) -> Output {
    let out = Command::new(binary()).args(args).output().expect("latentloop runs");
    assert!(
        out.status.success(),
        "latentloop {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A small untrained XFADS model (S=16, r=2, hidden widths 16) written to `out`.
pub fn small_random_model(out: &Path, latents: usize, channels: usize, extra: &[&str]) {
    let (l, n) = (latents.to_string(), channels.to_string());
    let mut args = vec!["random-model", "--latents", &l, "--channels", &n, "--samples", "16", "--rank", "2"];
    args.extend(["--hidden", "16", "--encoder-hidden", "16", "--out", s(out)]);
    args.extend(extra);
    latentloop(&args);
}

/// An endpoint nobody else uses: a unix socket in `dir`, or a free tcp port when the path
/// is too long for a unix socket address (108 bytes).
pub fn endpoint(dir: &Path, name: &str) -> String {
    let p = dir.join(format!("{name}.ipc"));
    if s(&p).len() <= 100 {
        format!("ipc://{}", s(&p))
    } else {
        free_tcp()
    }
}

pub fn free_tcp() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    format!("tcp://127.0.0.1:{}", l.local_addr().unwrap().port())
}

/// The Python package's folder (the driver imports `latentloop.wire` from it).
pub fn python_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python")
}

pub fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/python")
}

#[derive(Clone, Copy)]
pub enum ModelKind {
    /// A random XFADS model with this many latents.
    Xfads(usize),
    /// A Kalman decoder fitted on the session (deterministic: no sampling).
    Kalman,
}

/// What a test's rig config sets beyond the model and endpoints.
#[derive(Default)]
pub struct Cfg<'a> {
    pub bin_ms: f64,
    /// Lines added to the [output] table.
    pub output: &'a str,
    /// Lines added to the [reports] table.
    pub reports: &'a str,
    /// Tables of their own.
    pub extra: &'a str,
}

impl Cfg<'_> {
    pub fn bins(bin_ms: f64) -> Self {
        Cfg { bin_ms, ..Default::default() }
    }
}

/// One test's rig: a model, a simulated session, endpoints, a config.
pub struct Rig {
    pub dir: PathBuf,
    pub py: PathBuf,
    pub model: PathBuf,
    pub data: PathBuf,
    pub in_ep: String,
    pub out_ep: String,
    pub config: PathBuf,
}

impl Rig {
    /// `None` (skipped, with the reason printed) when there is no Python with numpy and pyzmq.
    pub fn new(name: &str, kind: ModelKind) -> Option<Rig> {
        let py = python_with(&["numpy", "zmq"])?;
        let dir = tmpdir(&format!("pz-{name}"));
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
            "0.001",
            "--seed",
            "1",
            "--out",
            s(&data),
        ]);
        match kind {
            ModelKind::Xfads(latents) => {
                small_random_model(&model, latents, CHANNELS, &["--dt", "0.001"]);
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
    pub fn write_config(&self, c: Cfg) {
        let text = format!(
            "[source]\nkind = \"zmq\"\nbin_ms = {:?}\nchannels = {CHANNELS}\n\n[source.zmq]\nendpoint = \"{}\"\n\n\
             [model]\npath = \"model.safetensors\"\nsamples = 16\nseed = 3\n\n\
             [output]\nendpoint = \"{}\"\n{}\n\n[reports]\ndir = \"reports\"\n{}\n\n{}\n",
            c.bin_ms, self.in_ep, self.out_ep, c.output, c.reports, c.extra
        );
        std::fs::write(&self.config, text).unwrap();
    }

    pub fn reports(&self) -> PathBuf {
        self.dir.join("reports")
    }

    /// Starts `latentloop run` on the config (stderr kept in a file).
    pub fn start(&self) -> Running {
        let _ = std::fs::remove_dir_all(self.reports());
        let stderr = self.dir.join("latentloop.stderr");
        let child = Command::new(binary())
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
    pub fn drive(&self, plan: Value, mut on_sync: impl FnMut(&str)) -> Value {
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
                .args([s(&driver), s(&python_dir()), s(&plan_path), s(&result_path)])
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

    /// The session the run recorded.
    pub fn session(&self) -> PathBuf {
        self.reports().join("session")
    }

    /// `latentloop replay` of the recorded session: exit 0 and "N bins, all identical",
    /// N = the bins the run decoded; returns replay's stderr.
    pub fn assert_replays_identically(&self) -> String {
        let out = Command::new(binary()).arg("replay").arg(self.session()).arg("--quiet").output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(0), "replay of {}:\n{err}", self.session().display());
        let decoded = counter(&self.summary(), "decoded");
        assert!(err.contains(&format!("{decoded} bins, all identical")), "replay said:\n{err}");
        err
    }

    pub fn summary(&self) -> Value {
        let p = self.reports().join("summary.json");
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
    }
}

/// Kills a child that is still running when dropped (a failed assertion).
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

pub struct Running {
    pub child: Child,
    pub stderr: PathBuf,
}

impl Running {
    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill({sig}) failed");
    }

    /// Ctrl-C, then waits for the exit (20 s at most); returns the status and stderr.
    pub fn interrupt(&mut self) -> (ExitStatus, String) {
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
    pub fn stop(&mut self) -> String {
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
pub struct Out {
    pub seq: u64,
    pub flags: u16,
    pub dropped: u64,
    pub recv_ns: u64,
    pub publish_ns: u64,
    pub client_ns: u64,
    pub behavior: Vec<f64>,
    pub latent: Vec<f64>,
    pub lag1: Vec<f64>,
}

pub fn outputs(result: &Value) -> Vec<Out> {
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

pub fn seqs(outs: &[Out]) -> Vec<u64> {
    outs.iter().map(|o| o.seq).collect()
}

pub fn counter(summary: &Value, name: &str) -> u64 {
    summary["counters"][name].as_u64().unwrap_or_else(|| panic!("no counter {name} in {summary}"))
}

/// A good bin: row `row` of the session as sequence number `seq`.
pub fn bin(seq: u64, row: usize) -> Value {
    json!({"seq": seq, "row": row})
}

/// Bins `rows` of the session numbered from `first_seq`, the first with the stream-start flag.
pub fn stream(first_seq: u64, rows: std::ops::Range<usize>) -> Vec<Value> {
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
pub fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// Asserts |a - b| <= tol * max(1, |b|) elementwise.
pub fn assert_close(a: &[f64], b: &[f64], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol * y.abs().max(1.0), "{what}[{i}]: {x} vs {y}");
    }
}

/// Checks that the outputs account for every bin from their first to their last sequence
/// number: each output answers one bin and reports the ones before it that were dropped.
pub fn assert_accounted(outs: &[Out], what: &str) {
    for w in outs.windows(2) {
        assert!(w[1].seq > w[0].seq, "{what}: outputs out of order: {} then {}", w[0].seq, w[1].seq);
        assert_eq!(w[1].seq - w[0].seq - 1, w[1].dropped, "{what}: seq {} reports {} dropped", w[1].seq, w[1].dropped);
        assert_eq!(w[1].flags & FLAG_GAP != 0, w[1].dropped > 0, "{what}: GAP flag of seq {}", w[1].seq);
    }
}
