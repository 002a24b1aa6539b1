//! Shadow decoders (`[[decoder]]` in the config): more models decoding the bins the driving
//! decoder decoded, for comparing decoders on live data. The driving decoder (`[model]`) is
//! the one the task uses; a shadow never delays it.
//!
//! - The decode thread, after it has published a bin, copies the bin into a preallocated
//!   slot of the shadow feed (a [`RecordTap`], as for the recorder): no wait, no allocation.
//!   A full feed (the shadows fell a second behind) costs the shadows that bin: counted,
//!   and their step sees the gap and predicts through it (GAP), as for any missing bin.
//! - The shadow thread (below the real-time threads, at nice 5) takes each bin and runs
//!   every shadow through its own per-bin step ([`Step`]: its own sequence state, its own
//!   counters), publishes on the shadow's own socket, times it into the shadow's own
//!   histograms ([`SHADOW_STAGES`]) and, when the run records, hands the bin with the
//!   shadow's outputs to the shadow's recorder: a session of its own under
//!   `<session>/shadows/<name>`, which `latentloop replay` checks bit for bit.
//! - Control commands steer the driving decoder only (a shadow is the comparison: it keeps
//!   its model, its mask and its state).
//!
//! The shadow thread polls the feed (a quarter bin, at most 250 us, between looks) rather
//! than being woken: waking it would be a system call on the decode thread.

use super::record::{RecordTap, TapEnd};
use super::source::{BinSlot, Counters};
use super::stats::{Stats, TimingRecord, MAX_BEHAVIOR, SHADOW_STAGES};
use super::step::{Outcome, Step};
use crate::any_model::AnyModel;
use crate::config::{RigConfig, ShadowConfig};
use crate::decoder::Decoder;
use crate::error::{Error, Result};
use crate::filter::FilterOptions;
use crate::session::{Decision, DecoderRef};
use crate::wire::output;
use serde::Serialize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::clock::monotonic_ns;
use super::record::Published;

/// A shadow decoder built and checked before any thread starts.
pub struct Prepared {
    pub name: String,
    pub decoder: Box<dyn Decoder>,
    pub out: zmq::Socket,
    pub endpoint: String,
    pub model: AnyModel,
    /// The model file's bytes (stored in the shadow's session).
    pub bytes: Vec<u8>,
    pub origin: String,
    /// How its decoder was built (the shadow session's header, for replay).
    pub decoder_ref: DecoderRef,
}

/// Loads, checks and builds every `[[decoder]]` of the config: the same channels, bin width
/// and behaviour dims as the bins carry (a shadow is compared on the same task), its own
/// output socket bound.
pub fn prepare(cfg: &RigConfig, ctx: &zmq::Context, behavior_dims: usize) -> Result<Vec<Prepared>> {
    cfg.decoders.iter().map(|d| prepare_one(cfg, ctx, behavior_dims, d)).collect()
}

fn prepare_one(cfg: &RigConfig, ctx: &zmq::Context, behavior_dims: usize, d: &ShadowConfig) -> Result<Prepared> {
    let name = d.name.get_ref().clone();
    let path = cfg.resolve(d.model.get_ref());
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    let model = AnyModel::load(&path)?;
    let at = |msg: String| cfg.error_at(d.model.span(), format!("[[decoder]] '{name}': {msg}"));
    let channels = *cfg.source.channels.get_ref();
    if model.channels() != channels {
        return Err(at(format!(
            "the model {} reads {} channels, the bins have {channels}",
            path.display(),
            model.channels()
        )));
    }
    if let Some((bin_ms, model_ms)) = super::setup::bin_width_mismatch(cfg, &model) {
        return Err(at(format!(
            "the model {} was made for {model_ms} ms bins, the run bins at {bin_ms} ms (a shadow has no override)",
            path.display()
        )));
    }
    if model.behavior_dims() != behavior_dims {
        return Err(at(format!(
            "the model {} decodes {} behaviour dims, the driving decoder {behavior_dims}: a shadow is compared on the same task",
            path.display(),
            model.behavior_dims()
        )));
    }
    let backend = match &model {
        AnyModel::Xfads(_) => crate::gpu::select_backend(&d.backend).map_err(|m| at(format!("backend: {m}")))?,
        AnyModel::Kalman(_) => crate::gpu::Backend::Cpu,
    };
    let seed = d.seed.unwrap_or(cfg.model.seed);
    let opts = crate::any_model::DecoderOptions {
        filter: FilterOptions { samples: d.samples, seed },
        backend,
        ..Default::default()
    };
    let decoder = if d.backend == "auto" { model.decoder(opts) } else { model.try_decoder(opts)? };
    let zerr = |e: zmq::Error| at(format!("output socket: {e}"));
    let out = ctx.socket(zmq::PUB).map_err(zerr)?;
    out.set_sndhwm(cfg.output.sndhwm).map_err(zerr)?;
    out.set_linger(0).map_err(zerr)?;
    let endpoint = d.output.get_ref().clone();
    out.bind(&endpoint)
        .map_err(|e| cfg.error_at(d.output.span(), format!("[[decoder]] '{name}': cannot bind {endpoint}: {e}")))?;
    let decoder_ref = DecoderRef {
        seed,
        samples: d.samples,
        kalman_mode: "exact".into(),
        backend: backend.to_string(),
        max_predict_gap: cfg.pipeline.max_predict_gap,
    };
    Ok(Prepared { name, decoder, out, endpoint, model, bytes, origin: path.display().to_string(), decoder_ref })
}

/// One shadow on the shadow thread.
pub struct Shadow {
    pub name: String,
    pub endpoint: String,
    pub model: String,
    decoder: Box<dyn Decoder>,
    step: Step,
    out: zmq::Socket,
    msg: Box<[u8]>,
    stats: Stats,
    counters: Counters,
    /// The shadow's session (None: not recording).
    record: Option<RecordTap>,
    output_dropped: u64,
}

impl Shadow {
    pub fn new(p: Prepared, bin_ns: u64, max_predict_gap: u64, record: Option<RecordTap>) -> Self {
        let msg = vec![0u8; output::len(p.decoder.behavior_dims(), p.decoder.latents())].into_boxed_slice();
        Shadow {
            name: p.name,
            endpoint: p.endpoint,
            model: p.model.describe(),
            decoder: p.decoder,
            step: Step::new(max_predict_gap),
            out: p.out,
            msg,
            stats: Stats::with_stages(bin_ns, &SHADOW_STAGES),
            counters: Counters::default(),
            record,
            output_dropped: 0,
        }
    }

    /// Decodes one bin the driving decoder decoded (`driver_publish_ns`: when it published),
    /// publishes, times and records it, then predicts the next bin.
    fn bin(&mut self, slot: &BinSlot, skipped: u64, driver_publish_ns: u64) {
        let pop_ns = monotonic_ns();
        let header = match self.step.apply(&mut *self.decoder, slot, skipped, &self.counters) {
            Outcome::Decoded(h) => h,
            Outcome::OutOfOrder => {
                // The driver's step already dropped what is out of order; a bin that the
                // shadow's own sequence state refuses is still recorded with its decision.
                if let Some(r) = self.record.as_mut() {
                    r.bin(slot, Decision::OutOfOrder, skipped, pop_ns, None);
                }
                return;
            }
        };
        let step_ns = monotonic_ns();
        let dec = &*self.decoder;
        output::encode(&header, dec.behavior(), dec.mean(), dec.lag1_mean(), &mut self.msg);
        let publish_ns = monotonic_ns();
        output::set_publish_ns(&mut self.msg, publish_ns);
        let dropped = self.out.send(&self.msg[..], zmq::DONTWAIT).is_err();
        self.output_dropped += dropped as u64;
        let sent_ns = monotonic_ns();
        let header = output::OutputHeader { publish_ns, ..header };
        if let Some(r) = self.record.as_mut() {
            r.bin(slot, Decision::Decoded, skipped, pop_ns, Some(&Published::of(&header, dec, step_ns, dropped)));
        }
        let t = monotonic_ns();
        self.decoder.predict();
        let rec = TimingRecord {
            seq: slot.seq,
            flags: header.flags,
            recv_ns: slot.recv_ns,
            push_ns: driver_publish_ns.max(slot.recv_ns),
            pop_ns,
            step_ns,
            sent_ns,
            predict_ns: monotonic_ns() - t,
            source_ns: slot.source_ns,
            dims: 0,
            has_truth: false,
            behavior: [0.0; MAX_BEHAVIOR],
            truth: [0.0; MAX_BEHAVIOR],
        }
        .with_behavior(self.decoder.behavior(), slot);
        self.stats.record(&rec);
    }
}

/// The shadow thread.
pub struct ShadowThread {
    pub feed: TapEnd,
    /// Bins the feed had no room for (the shadows were a second behind).
    pub lost: Arc<AtomicU64>,
    pub shadows: Vec<Shadow>,
    /// Set once the decode thread has stopped: the thread then drains the feed and ends.
    pub stop: Arc<AtomicBool>,
    pub slot: BinSlot,
    pub bin_ns: u64,
}

/// What one shadow did, for the summary and its reports.
pub struct Finished {
    pub name: String,
    pub endpoint: String,
    pub model: String,
    pub stats: Stats,
    pub counters: Counters,
    pub output_dropped: u64,
    /// Bins the feed lost (the same for every shadow).
    pub feed_lost: u64,
}

impl ShadowThread {
    pub fn run(mut self) -> Vec<Finished> {
        // Below the real-time threads (and above the recorder, at 10).
        // SAFETY: setpriority on the calling thread (tid 0 = this thread on Linux).
        unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 5) };
        // Polls that wake when asked (the default 50 us slack is a fifth of a poll).
        let _ = super::clock::tighten_timer_slack();
        let poll = Duration::from_nanos((self.bin_ns / 4).clamp(20_000, 250_000));
        for s in &mut self.shadows {
            // Each shadow's session starts with its decoder, change 0, before the first bin.
            if let Some(r) = s.record.as_mut() {
                r.applied(0);
            }
            s.decoder.predict();
        }
        loop {
            let stopping = self.stop.load(Ordering::Acquire);
            let (slot, shadows) = (&mut self.slot, &mut self.shadows);
            let n = self.feed.drain(|r| {
                let a = r.arrays();
                slot.refill(&r.fields, a.counts, a.behavior_in);
                for s in shadows.iter_mut() {
                    s.bin(slot, r.fields.skipped, r.fields.publish_ns);
                }
            });
            if n == 0 {
                if stopping {
                    break;
                }
                std::thread::sleep(poll);
            }
        }
        let feed_lost = self.lost.load(Ordering::Relaxed);
        self.shadows
            .into_iter()
            .map(|s| Finished {
                name: s.name,
                endpoint: s.endpoint,
                model: s.model,
                stats: s.stats,
                counters: s.counters,
                output_dropped: s.output_dropped,
                feed_lost,
            })
            .collect()
    }
}

/// A shadow in summary.json.
#[derive(Serialize, Debug)]
pub struct ShadowSummary {
    pub name: String,
    pub model: String,
    pub output: String,
    /// Bins it decoded (published).
    pub decoded: u64,
    pub predict_only: u64,
    /// Bins it predicted through: missing at the source, skipped by the driver, or lost
    /// from the shadow feed.
    pub missing: u64,
    pub skipped: u64,
    pub restarts: u64,
    pub resets: u64,
    pub output_dropped: u64,
    pub feed_lost: u64,
    pub behavior_r2: Option<f64>,
    pub deadline_misses: u64,
    pub stages: Vec<super::stats::StageSummary>,
    /// Its reports (histograms) and its session.
    pub reports: String,
    pub session: Option<String>,
    pub session_records: Option<u64>,
}

impl Finished {
    pub fn summary(&self, reports: &std::path::Path, session: Option<String>, records: Option<u64>) -> ShadowSummary {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let c = &self.counters;
        ShadowSummary {
            name: self.name.clone(),
            model: self.model.clone(),
            output: self.endpoint.clone(),
            decoded: g(&c.decoded),
            predict_only: g(&c.predict_only),
            missing: g(&c.missing),
            skipped: g(&c.skipped),
            restarts: g(&c.restarts),
            resets: g(&c.resets),
            output_dropped: self.output_dropped,
            feed_lost: self.feed_lost,
            behavior_r2: self.stats.r2.value(),
            deadline_misses: self.stats.deadline_misses,
            stages: self.stats.summary(),
            reports: reports.display().to_string(),
            session,
            session_records: records,
        }
    }
}

/// A shadow's session, under `<session>/shadows/<name>`: a session of its own (its header
/// holds its model and seed, its bins what it decoded and published), so that `latentloop
/// replay` and the Python reader take it as they take any session. Starts its recorder.
pub fn open_session(
    cfg: &RigConfig,
    session_dir: &std::path::Path,
    p: &Prepared,
    behavior_dims: usize,
    threads: &mut super::threads::Threads,
) -> Result<(RecordTap, super::record::Recording)> {
    let dir = session_dir.join("shadows").join(&p.name);
    let mut header = super::setup::header(cfg, behavior_dims, None, p.decoder_ref.clone());
    header.description = format!("shadow decoder '{}' of: {}", p.name, header.description);
    let (writer, _) = crate::session::write::SessionWriter::create(&dir, &header)?;
    let m = super::setup::store_model(&dir, 0, &p.bytes, &p.model, &p.origin)?;
    header.model = Some(m.clone());
    let floats = header.channels + 2 * behavior_dims + 2 * p.decoder.latents();
    let (recorder, mut taps, recording) =
        super::record::recorder(writer, &[(cfg.record.ring_capacity, floats)], crossbeam_channel::never());
    use super::record::ToRecorder;
    let _ = recording.tx.send(ToRecorder::Header(Box::new(header)));
    let _ = recording.tx.send(ToRecorder::Event(super::setup::decoder_event(0, &m, false)));
    let _ = recording.tx.send(ToRecorder::Event(serde_json::json!({
        "kind": "start", "t_ns": monotonic_ns(), "wall": crate::session::write::now_utc(),
        "shadow_of": session_dir.display().to_string(),
    })));
    threads.start_shadow_recorder(recording.tx.clone(), move || recorder.run())?;
    Ok((taps.pop().expect("one tap"), recording))
}

/// The line `run` prints for a shadow at the end.
pub fn line(s: &ShadowSummary) -> String {
    let e2e = s.stages.iter().find(|x| x.stage == "receive_to_publish");
    let (p50, p99) = e2e.map_or((0.0, 0.0), |x| (x.p50_us, x.p99_us));
    let r2 = s.behavior_r2.map_or("-".into(), |v| format!("{v:.3}"));
    format!(
        "shadow '{}' ({}): {} bins decoded, {} lost from its feed, receive -> its publish p50 {p50:.1} us p99 {p99:.1} us, behaviour R2 {r2}",
        s.name, s.model, s.decoded, s.feed_lost
    )
}
