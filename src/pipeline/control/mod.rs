//! The control thread: a ZeroMQ REP socket taking one JSON request at a time
//! (docs/CONTROL.md). It validates and prepares every change here, off the real-time path
//! (a model loaded, checked and built into a decoder; a masked model; a refit), hands it to
//! the decode thread through [`super::changes`], waits until it was applied between two
//! bins, and answers. A request that is malformed, unknown or badly typed gets
//! `"ok": false` and the reason; the decoder is untouched. Every request and reply goes into
//! the session (a `control` event), or to the run's log when not recording.
//!
//! It also keeps the recent bins ([`history::History`], fed by the decode thread through a
//! record ring) for `calibrate` and runs the continuous adaptation ([`adapt`]) that `adapt`
//! starts.

pub mod adapt;
pub mod history;
mod requests;

use super::changes::{Change, Outbox, What};
use super::record::{TapEnd, ToRecorder};
use super::source::Counters;
use super::stats::StageSummary;
use crate::any_model::{AnyModel, DecoderOptions};
use crate::error::{Error, Result};
use crate::session::ModelRef;
use crate::wire::output;
use adapt::Adaptation;
use history::History;
use requests::Request;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the main thread publishes for `status` (latency so far, running R^2).
#[derive(Clone, Debug, Default)]
pub struct LiveStatus {
    pub receive_to_publish: Option<StageSummary>,
    pub behavior_r2: Option<f64>,
    pub decode_seconds: f64,
}

/// The model being decoded with, as the session knows it.
#[derive(Clone)]
pub struct Current {
    /// Unmasked.
    pub model: AnyModel,
    /// Its file (adaptation edits it: a refitted readout, new Kalman parameters).
    pub file: crate::model::ModelFile,
    pub model_ref: Option<ModelRef>,
    pub describe: String,
    pub sha256: String,
    pub origin: String,
}

/// Everything the control thread needs.
pub struct ControlSetup {
    pub endpoint: String,
    pub outbox: Outbox,
    pub feed: Option<TapEnd>,
    pub counters: Arc<Counters>,
    pub live: Arc<Mutex<LiveStatus>>,
    pub stop: Arc<AtomicBool>,
    pub record: Option<crossbeam_channel::Sender<ToRecorder>>,
    pub session_dir: Option<PathBuf>,
    pub current: Current,
    pub dec_opts: DecoderOptions,
    pub channels: usize,
    pub behavior_dims: usize,
    pub bin_seconds: f64,
    /// The largest state a session record holds.
    pub max_latents: usize,
    pub history_bins: usize,
    pub calibration_ridge: f64,
    /// Calibrate-then-run XFADS: the block and the training options; the model trained in
    /// the background is swapped in when it is ready.
    pub train_xfads: Option<(crate::data::Dataset, crate::fit::xfads::TrainOptions)>,
    pub quiet: bool,
}

/// A model training in the background.
struct Training {
    started: std::time::Instant,
    handle: std::thread::JoinHandle<Result<crate::fit::xfads::Trained>>,
}

pub struct Control {
    sock: zmq::Socket,
    s: ControlSetup,
    history: History,
    next_change: u64,
    next_model_file: usize,
    mask: Vec<usize>,
    adaptation: Option<Adaptation>,
    /// Targets given by `event` payloads (ReFIT).
    targets: Vec<adapt::Target>,
    last_calibration: Option<Value>,
    swaps: u64,
    training: Option<Training>,
}

/// How long a change may take to be applied before the reply says it was not.
const APPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// The bound control socket (before any thread starts, so a bad endpoint is a set-up error).
pub fn bind(ctx: &zmq::Context, endpoint: &str) -> Result<(zmq::Socket, String)> {
    let zerr = |e: zmq::Error| Error::Invalid(format!("control socket {endpoint}: {e}"));
    let sock = ctx.socket(zmq::REP).map_err(zerr)?;
    sock.set_linger(0).map_err(zerr)?;
    sock.bind(endpoint).map_err(zerr)?;
    let bound = sock.get_last_endpoint().ok().and_then(|e| e.ok()).unwrap_or_else(|| endpoint.to_string());
    Ok((sock, bound))
}

/// The default endpoint: a unix socket in the reports folder, or a free loopback tcp port
/// where that path is too long for a unix socket address.
pub fn default_endpoint(reports: &std::path::Path) -> String {
    let p = reports.join("control.sock");
    let abs = std::path::absolute(&p).unwrap_or(p);
    if abs.as_os_str().len() <= 100 {
        format!("ipc://{}", abs.display())
    } else {
        "tcp://127.0.0.1:*".into()
    }
}

impl Control {
    pub fn new(sock: zmq::Socket, s: ControlSetup) -> Self {
        let history = History::new(s.history_bins, s.channels, s.behavior_dims);
        Control {
            sock,
            history,
            next_change: 1,
            next_model_file: 1,
            mask: Vec::new(),
            adaptation: None,
            targets: Vec::new(),
            last_calibration: None,
            swaps: 0,
            training: None,
            s,
        }
    }

    /// Serves requests until the run stops.
    pub fn run(mut self) {
        if let Some((data, opts)) = self.s.train_xfads.take() {
            self.start_training(data, opts);
        }
        while !self.s.stop.load(Ordering::Relaxed) {
            self.take_feed();
            self.finish_training();
            self.adapt_step();
            match self.sock.poll(zmq::POLLIN, 20) {
                Ok(n) if n > 0 => {}
                _ => continue,
            }
            let Ok(msg) = self.sock.recv_bytes(0) else { continue };
            let t_ns = super::clock::monotonic_ns();
            let (request, reply) = self.handle(&msg);
            let _ = self.sock.send(reply.to_string().as_bytes(), 0);
            self.log(json!({"kind": "control", "t_ns": t_ns, "request": request, "reply": reply}));
        }
    }

    /// Trains the XFADS model on its own thread, at a lower priority than the run's threads
    /// (nice 10), so the decoder keeps its core as far as the scheduler allows.
    fn start_training(&mut self, data: crate::data::Dataset, opts: crate::fit::xfads::TrainOptions) {
        self.log(json!({"kind": "training", "t_ns": super::clock::monotonic_ns(), "bins": data.bins(),
            "dynamics": opts.dynamics.as_str(), "latents": opts.latents, "epochs": opts.epochs}));
        let handle = std::thread::Builder::new().name("ll-train".into()).spawn(move || {
            // SAFETY: setpriority on the calling thread (tid 0 = this thread on Linux).
            unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) };
            crate::fit::xfads::train(&data, &opts)
        });
        match handle {
            Ok(handle) => self.training = Some(Training { started: std::time::Instant::now(), handle }),
            Err(e) => self.log(json!({"kind": "training_failed", "error": e.to_string()})),
        }
    }

    /// Swaps the trained model in once training has ended (the switch is an event).
    fn finish_training(&mut self) {
        if !self.training.as_ref().is_some_and(|t| t.handle.is_finished()) {
            return;
        }
        let t = self.training.take().expect("checked");
        let secs = t.started.elapsed().as_secs_f64();
        let result = t
            .handle
            .join()
            .map_err(|_| "the training thread panicked".to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        let outcome = result.and_then(|trained| {
            let bytes = trained.file.to_bytes();
            let report = serde_json::to_value(&trained.report).unwrap_or(Value::Null);
            self.replace_model(trained.file, bytes, "calibration (xfads)", false).map(|r| (r, report))
        });
        match outcome {
            Ok((reply, report)) => {
                if !self.s.quiet {
                    eprintln!(
                        "calibration: the trained XFADS model decodes from the bin after seq {}",
                        reply["after_seq"]
                    );
                }
                self.log(json!({"kind": "switch", "t_ns": super::clock::monotonic_ns(), "training_seconds": secs,
                    "swap": reply, "held_out": report["valid"]}));
            }
            Err(e) => {
                eprintln!("warning: calibration: the XFADS model was not swapped in: {e}; the Kalman decoder goes on");
                self.log(json!({"kind": "training_failed", "t_ns": super::clock::monotonic_ns(), "error": e}));
            }
        }
    }

    /// Learns from the new bins; swaps in an update when a batch is complete. A failure
    /// stops the adaptation (the decoder keeps the last good parameters) and is logged.
    fn adapt_step(&mut self) {
        let Some(a) = self.adaptation.as_mut() else { return };
        let current = &self.s.current;
        let update =
            a.due(&self.history, &self.targets).and_then(|u| u.map(|u| adapt::updated_file(current, u)).transpose());
        let what = format!("adapt {}", a.mode_name());
        let result = match update {
            Ok(Some(file)) => {
                let bytes = file.to_bytes();
                self.replace_model(file, bytes, &what, true).map(|_| ())
            }
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            let state = self.adaptation.take().map(|a| a.state());
            self.log(
                json!({"kind": "adaptation_stopped", "t_ns": super::clock::monotonic_ns(), "error": e, "state": state}),
            );
        }
    }

    /// Into the session, or the run's log.
    fn log(&self, event: Value) {
        match &self.s.record {
            Some(tx) => {
                let _ = tx.send(ToRecorder::Event(event));
            }
            None if !self.s.quiet => eprintln!("control: {event}"),
            None => {}
        }
    }

    fn take_feed(&mut self) {
        if let Some(feed) = self.s.feed.as_mut() {
            let h = &mut self.history;
            feed.drain(|r| h.push(r));
        }
    }

    /// The request as logged (the text when it is not JSON) and the reply.
    fn handle(&mut self, msg: &[u8]) -> (Value, Value) {
        let logged =
            serde_json::from_slice(msg).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(msg).into_owned()));
        let reply = match parse_request(msg) {
            Ok(req) => match self.execute(req) {
                Ok(mut r) => {
                    r["ok"] = true.into();
                    r
                }
                Err(e) => json!({"ok": false, "error": e}),
            },
            Err(e) => json!({"ok": false, "error": e}),
        };
        (logged, reply)
    }

    fn execute(&mut self, req: Request) -> std::result::Result<Value, String> {
        match req {
            Request::Status => Ok(self.status()),
            Request::Pause => self.flag(What::Pause(true), "pause"),
            Request::Resume => self.flag(What::Pause(false), "resume"),
            Request::Reset => self.flag(What::Reset, "reset"),
            Request::Event { label, payload } => {
                let id = self.new_change(json!({"cmd": "event", "label": label, "payload": payload}));
                let a = self.send(Change { id, what: What::Mark })?;
                // A target for ReFIT-style intention estimation.
                let nums = |k: &str| -> Option<Vec<f32>> {
                    payload.as_ref()?.get(k)?.as_array()?.iter().map(|v| v.as_f64().map(|x| x as f32)).collect()
                };
                if let Some(target) = nums("target") {
                    self.targets.push(adapt::Target { after_seq: a.after_seq, target, cursor: nums("cursor") });
                }
                Ok(json!({"change": id, "after_seq": a.after_seq}))
            }
            Request::Stop => {
                self.s.stop.store(true, Ordering::Relaxed);
                Ok(json!({"stopping": true}))
            }
            Request::LoadModel { path, carry_state } => self.load_model(&path, carry_state),
            Request::Mask { channels } => {
                let masked = self.s.current.model.masked(&channels)?;
                let previous = std::mem::replace(&mut self.mask, channels.clone());
                let cur = self.s.current.clone();
                let r = self.swap_in(masked, true, &format!("mask {channels:?}"), cur.model_ref.as_ref());
                if r.is_err() {
                    self.mask = previous;
                }
                let mut r = r?;
                r["masked"] = json!(self.mask);
                Ok(r)
            }
            Request::Calibrate { seconds, ridge } => self.calibrate(seconds, ridge),
            Request::Adapt(cfg) => {
                if cfg.is_off() {
                    let was = self.adaptation.take().map(|a| a.state());
                    return Ok(json!({"adaptation": "off", "was": was}));
                }
                let a = Adaptation::start(cfg, &self.s.current, self.s.bin_seconds, &self.history)?;
                let state = a.state();
                self.adaptation = Some(a);
                Ok(json!({"adaptation": state}))
            }
        }
    }

    fn new_change(&mut self, definition: Value) -> u64 {
        let id = self.next_change;
        self.next_change += 1;
        let mut e = definition;
        e["kind"] = "change".into();
        e["change"] = id.into();
        if let Some(tx) = &self.s.record {
            let _ = tx.send(ToRecorder::Event(e));
        }
        id
    }

    fn send(&mut self, c: Change) -> std::result::Result<super::changes::Applied, String> {
        let id = c.id;
        self.s.outbox.send(c).map_err(|_| "too many changes in flight; try again".to_string())?;
        self.s.outbox.wait_applied(id, APPLY_TIMEOUT).ok_or_else(|| {
            format!("change {id} was not applied within {} s (is the decoder running?)", APPLY_TIMEOUT.as_secs())
        })
    }

    fn flag(&mut self, what: What, cmd: &str) -> std::result::Result<Value, String> {
        let id = self.new_change(json!({ "cmd": cmd }));
        let a = self.send(Change { id, what })?;
        Ok(json!({"change": id, "after_seq": a.after_seq}))
    }

    /// Checks a model against the run, builds its decoder (masked as now), stores it in the
    /// session, and swaps it in at a bin boundary.
    fn load_model(&mut self, path: &str, carry: bool) -> std::result::Result<Value, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?;
        let file = crate::model::ModelFile::from_bytes(&bytes).map_err(|e| format!("{path}: {e}"))?;
        self.replace_model(file, bytes, path, carry)
    }

    /// Stores a model file in the session folder (None when not recording).
    fn store(&mut self, bytes: &[u8], model: &AnyModel, origin: &str) -> std::result::Result<Option<ModelRef>, String> {
        let Some(dir) = &self.s.session_dir else { return Ok(None) };
        let m =
            super::setup::store_model(dir, self.next_model_file, bytes, model, origin).map_err(|e| e.to_string())?;
        self.next_model_file += 1;
        Ok(Some(m))
    }

    /// Makes `file` the current (unmasked) model and swaps in its decoder, masked as now;
    /// the previous model stays current if the swap is refused.
    fn replace_model(
        &mut self,
        file: crate::model::ModelFile,
        bytes: Vec<u8>,
        origin: &str,
        carry: bool,
    ) -> std::result::Result<Value, String> {
        let model = AnyModel::from_model_file(&file).map_err(|e| format!("{origin}: {e}"))?;
        check_fits(&model, self.s.channels, self.s.behavior_dims, self.s.bin_seconds)?;
        let model_ref = self.store(&bytes, &model, origin)?;
        let masked = model.masked(&self.mask)?;
        let next = Current {
            describe: model.describe(),
            sha256: crate::session::sha256_hex(&bytes),
            origin: origin.into(),
            model,
            file,
            model_ref: model_ref.clone(),
        };
        let prev = std::mem::replace(&mut self.s.current, next);
        let r = self.swap_in(masked, carry, origin, model_ref.as_ref());
        if r.is_err() {
            self.s.current = prev;
        }
        r
    }

    /// Refits the Kalman decoder on the last `seconds` of received bins with their behaviour.
    fn calibrate(&mut self, seconds: Option<f64>, ridge: Option<f64>) -> std::result::Result<Value, String> {
        self.take_feed();
        let seconds = seconds.unwrap_or(30.0);
        let bins = (seconds / self.s.bin_seconds).round() as usize;
        let data = self.history.dataset(bins, self.s.bin_seconds as f32)?;
        let opts = crate::fit::kalman::KalmanFitOptions {
            ridge: ridge.unwrap_or(self.s.calibration_ridge),
            ..Default::default()
        };
        let fitted = crate::fit::kalman::fit_dataset(&data, &opts)?;
        let file = fitted.to_file();
        let bytes = file.to_bytes();
        let mut r = self.replace_model(file, bytes, "calibrate", true)?;
        let cal = json!({"bins": data.bins(), "seconds": data.bins() as f64 * self.s.bin_seconds, "ridge": opts.ridge});
        self.last_calibration = Some(cal.clone());
        r["calibration"] = cal;
        Ok(r)
    }

    /// Builds `model`'s decoder and swaps it in; the session gets a `decoder` event
    /// (`file` names the unmasked model file, `mask` the channels).
    fn swap_in(
        &mut self,
        model: AnyModel,
        carry: bool,
        why: &str,
        file: Option<&ModelRef>,
    ) -> std::result::Result<Value, String> {
        if model.latents() > self.s.max_latents {
            return Err(format!(
                "the model has {} latents; the session records hold at most {} ([record] max_latents)",
                model.latents(),
                self.s.max_latents
            ));
        }
        let decoder = model.try_decoder(self.s.dec_opts).map_err(|e| e.to_string())?;
        let msg = vec![0u8; output::len(decoder.behavior_dims(), decoder.latents())].into_boxed_slice();
        let id = self.next_change;
        self.next_change += 1;
        if let (Some(tx), Some(m)) = (&self.s.record, file) {
            let mut e = super::setup::decoder_event(id, m, carry);
            e["mask"] = json!(self.mask);
            e["why"] = why.into();
            let _ = tx.send(ToRecorder::Event(e));
        }
        let describe = model.describe();
        let a = self.send(Change { id, what: What::Decoder { decoder, msg, carry } })?;
        drop(a.replaced); // the old decoder is freed here, not on the decode thread
        self.swaps += 1;
        Ok(json!({
            "change": id,
            "after_seq": a.after_seq,
            "state": if a.carried { "carried" } else { "reset" },
            "model": describe,
        }))
    }

    fn status(&self) -> Value {
        let c = &self.s.counters;
        let g = |a: &std::sync::atomic::AtomicU64| Counters::get(a);
        let live = self.s.live.lock().map(|l| l.clone()).unwrap_or_default();
        let cur = &self.s.current;
        json!({
            "bins": {
                "decoded": g(&c.decoded),
                "dropped": g(&c.dropped_ring_full) + g(&c.skipped),
                "missing": g(&c.missing),
                "predict_only": g(&c.predict_only),
                "rejected": g(&c.rejected),
                "out_of_order": g(&c.out_of_order),
                "restarts": g(&c.restarts),
            },
            "model": {"describe": cur.describe, "sha256": cur.sha256, "origin": cur.origin,
                      "file": cur.model_ref.as_ref().map(|m| m.file.clone())},
            "masked": self.mask,
            "latency_us": live.receive_to_publish.map(|s| json!({"p50": s.p50_us, "p99": s.p99_us, "p999": s.p999_us, "max": s.max_us})),
            "behavior_r2": live.behavior_r2,
            "decode_seconds": live.decode_seconds,
            "model_swaps": self.swaps,
            "calibration": self.last_calibration,
            "adaptation": self.adaptation.as_ref().map(|a| a.state()),
            "training": self.training.as_ref().map(|t| json!({"seconds": t.started.elapsed().as_secs_f64()})),
            "history_bins": self.history.len(),
        })
    }
}

/// Whether a model can replace the running one: same channels, bin width, behaviour dims.
pub fn check_fits(
    model: &AnyModel,
    channels: usize,
    behavior_dims: usize,
    bin_seconds: f64,
) -> std::result::Result<(), String> {
    if model.channels() != channels {
        return Err(format!("the model reads {} channels, the run has {channels}", model.channels()));
    }
    let model_ms = (model.dt() * 1e3) as f64;
    let bin_ms = bin_seconds * 1e3;
    if (model_ms - bin_ms).abs() > 1e-6 * bin_ms.max(model_ms) {
        return Err(format!("the model was made for {model_ms} ms bins, the run bins at {bin_ms} ms"));
    }
    if behavior_dims > 0 && model.behavior_dims() != behavior_dims {
        return Err(format!("the model decodes {} behaviour dims, the run {behavior_dims}", model.behavior_dims()));
    }
    Ok(())
}

/// A request's bytes as the control thread reads them: JSON, then one request (fuzzed:
/// src/fuzzing.rs).
pub(crate) fn parse_request(msg: &[u8]) -> std::result::Result<Request, String> {
    let v: Value = serde_json::from_slice(msg).map_err(|e| format!("the request is not JSON: {e}"))?;
    Request::parse(&v)
}
