//! `latentloop replay SESSION`: decodes a recorded session again, offline and as fast as
//! the filter goes, and compares every output with what was published live.
//!
//! Replay drives the same per-bin step as the decode thread ([`crate::pipeline::step`]) with
//! the recorded inputs and the recorded decisions: the bins the step saw (decoded, or
//! dropped by it as out of order), in their order, each with the number of bins the live
//! decoder passed over to reach it and the restart flag it was given; the decoders (and, with
//! the control socket, every change) applied before the record they were applied before,
//! built from the model files stored in the session with the recorded seed and options.
//! Counter-based noise makes the filter a pure function of all that, so every published bin
//! must come out with the same bits. Anything else is a bug, and replay names the first bin
//! that differs.
//!
//! With `--model OTHER` the same session is decoded by another model (the decisions are the
//! live ones), and `--out` writes what it would have published: the way a lab compares
//! decoders on real closed-loop data.

use crate::any_model::{AnyModel, DecoderOptions};
use crate::data::npz::{write_arrays, Dtype, NpyArray};
use crate::data::Array2;
use crate::decoder::Decoder;
use crate::error::{Error, Result};
use crate::filter::FilterOptions;
use crate::gpu::Backend;
use crate::kalman::KalmanMode;
use crate::pipeline::source::{BinSlot, Counters};
use crate::pipeline::step::{Outcome, Step};
use crate::session::read::{BinRecord, Session};
use crate::session::{Decision, BIT_HAS_BEHAVIOR};
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub struct ReplayOptions {
    /// Decode with this model instead of the recorded ones.
    pub model: Option<PathBuf>,
    /// Write the replayed outputs here (.npz).
    pub out: Option<PathBuf>,
    /// Where XFADS filters run (the recorded backend gives the same bits as the CPU).
    pub backend: Backend,
    pub quiet: bool,
}

/// The first output that differs from the live one.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Difference {
    pub record: u64,
    pub seq: u64,
    /// What differs: "flags", "dropped_before", "kl", "behavior", "latent", "lag1", "outcome".
    pub what: String,
    pub live: String,
    pub replayed: String,
}

#[derive(Serialize, Debug, Clone)]
pub struct ReplayReport {
    pub session: String,
    /// What the reader said about the session (clean end, recovered bins, damage).
    pub status: String,
    /// Bin records read.
    pub records: u64,
    /// Records the step saw, replayed.
    pub stepped: u64,
    /// Of those, outputs compared with the live ones (none with --model).
    pub compared: u64,
    pub first_difference: Option<Difference>,
    /// The largest |live - replayed| over every compared value.
    pub largest_difference: f64,
    pub bins_per_second: f64,
    /// Behaviour R^2 of the replayed outputs against the behaviour the bins carried.
    pub behavior_r2: Option<f64>,
    /// ...and of the live outputs, on the same bins.
    pub live_behavior_r2: Option<f64>,
}

impl ReplayReport {
    pub fn identical(&self) -> bool {
        self.first_difference.is_none()
    }

    /// The line replay prints.
    pub fn line(&self) -> String {
        match &self.first_difference {
            None if self.compared > 0 => format!("{} bins, all identical", self.compared),
            None => format!("{} bins replayed", self.stepped),
            Some(d) => format!(
                "bin {} (record {}) differs first, in {}: live {} replayed {}; largest difference {:e}",
                d.seq, d.record, d.what, d.live, d.replayed, self.largest_difference
            ),
        }
    }
}

/// A change applied at a record.
enum Change {
    /// A decoder from a stored model file, masked, carrying the state over where it can.
    Decoder {
        file: String,
        sha256: String,
        carry: bool,
        mask: Vec<usize>,
    },
    Reset,
    Pause(bool),
    /// An event mark: nothing to do.
    Mark,
}

/// The replayed outputs (for --out).
#[derive(Default)]
struct Outputs {
    seq: Vec<f64>,
    flags: Vec<f64>,
    kl: Vec<f64>,
    behavior: Vec<f32>,
    latent: Vec<f32>,
    lag1: Vec<f32>,
    /// Rows that carried behaviour.
    truth_rows: Vec<BehaviorRow>,
}

/// A decoded bin that carried behaviour: what the replay and the live decoder made of it.
struct BehaviorRow {
    replayed: Vec<f32>,
    /// Empty where the live run published nothing for the bin.
    live: Vec<f32>,
    truth: Vec<f32>,
}

pub fn replay(dir: &Path, opts: &ReplayOptions) -> Result<ReplayReport> {
    let session = Session::open(dir)?;
    let h = &session.header;
    let other = match &opts.model {
        Some(p) => {
            let m = AnyModel::load(p)?;
            if m.channels() != h.channels {
                return Err(Error::Mismatch(format!(
                    "{} reads {} channels, the session has {}",
                    p.display(),
                    m.channels(),
                    h.channels
                )));
            }
            Some(m)
        }
        None => None,
    };
    let dec_opts = DecoderOptions {
        filter: FilterOptions { samples: h.decoder.samples, seed: h.decoder.seed },
        kalman: if h.decoder.kalman_mode == "steady" { KalmanMode::SteadyState } else { KalmanMode::Exact },
        backend: opts.backend,
    };

    // The changes, by id, and where each was applied.
    let mut changes: HashMap<u64, Change> = HashMap::new();
    for e in session.events_of("decoder") {
        let (Some(id), Some(file), Some(sha)) = (e["change"].as_u64(), e["file"].as_str(), e["sha256"].as_str()) else {
            return Err(Error::data(dir, format!("a decoder event without change, file or sha256: {e}")));
        };
        let mask = e["mask"]
            .as_array()
            .map_or(Vec::new(), |a| a.iter().filter_map(|v| v.as_u64()).map(|v| v as usize).collect());
        changes.insert(
            id,
            Change::Decoder { file: file.into(), sha256: sha.into(), carry: e["carry_state"] == true, mask },
        );
    }
    for e in session.events_of("change") {
        let Some(id) = e["change"].as_u64() else { continue };
        let c = match e["cmd"].as_str() {
            Some("reset") => Change::Reset,
            Some("pause") => Change::Pause(true),
            Some("resume") => Change::Pause(false),
            _ => Change::Mark,
        };
        changes.insert(id, c);
    }
    let mut applied: Vec<(u64, u64)> =
        session.events_of("applied").filter_map(|e| Some((e["record"].as_u64()?, e["change"].as_u64()?))).collect();
    applied.sort_by_key(|a| a.0); // stable: changes at one record keep their order
    let mut applied = applied.into_iter().peekable();

    let mut loaded: HashMap<String, AnyModel> = HashMap::new();
    let mut load = |file: &str, sha256: &str| -> Result<AnyModel> {
        if let Some(m) = &other {
            return Ok(m.clone());
        }
        if let Some(m) = loaded.get(file) {
            return Ok(m.clone());
        }
        let path = session.path_of(file);
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let sha = crate::session::sha256_hex(&bytes);
        if sha != sha256 {
            return Err(Error::data(
                &path,
                format!("SHA-256 {sha} is not the recorded {sha256}: the model file changed"),
            ));
        }
        let f = crate::model::ModelFile::from_bytes(&bytes).map_err(|m| Error::model(&path, m))?;
        let m = AnyModel::from_model_file(&f).map_err(|m| Error::model(&path, m))?;
        loaded.insert(file.to_string(), m.clone());
        Ok(m)
    };

    let bar = crate::progress::bar(session.bins, opts.quiet, "replaying {bar:30} {pos}/{len} bins ({eta} left)");
    let mut decoder: Option<Box<dyn Decoder>> = None;
    let mut step = Step::new(h.decoder.max_predict_gap);
    let counters = Counters::default();
    let mut slot = BinSlot::new(h.channels, h.behavior_dims);
    let mut report = ReplayReport {
        session: dir.display().to_string(),
        status: session.status(),
        records: 0,
        stepped: 0,
        compared: 0,
        first_difference: None,
        largest_difference: 0.0,
        bins_per_second: 0.0,
        behavior_r2: None,
        live_behavior_r2: None,
    };
    let mut outs = Outputs::default();
    let mut step_secs = 0.0f64;
    for chunk in session.bin_chunks() {
        for rec in chunk? {
            report.records += 1;
            bar.inc(1);
            let index = rec.fields.index;
            while let Some(&(at, id)) = applied.peek() {
                if at > index {
                    break;
                }
                applied.next();
                let c = changes
                    .get(&id)
                    .ok_or_else(|| Error::data(dir, format!("change {id} was applied but never defined")))?;
                match c {
                    Change::Decoder { file, sha256, carry, mask } => {
                        let model = load(file, sha256)?.masked(mask).map_err(|m| Error::data(dir, m))?;
                        let mut fresh = model.try_decoder(dec_opts)?;
                        // As the decode thread does (pipeline/decode.rs, apply_changes): a swap
                        // that cannot carry the state over starts from the prior, RESET.
                        if let Some(old) = &decoder {
                            if !(*carry && fresh.carry_state_from(&**old)) {
                                step.request_reset();
                            }
                        }
                        decoder = Some(fresh);
                    }
                    Change::Reset => step.request_reset(),
                    Change::Pause(on) => step.set_paused(*on),
                    Change::Mark => {}
                }
            }
            let Some(decision) = rec.decision() else { continue };
            if !decision.stepped() {
                continue;
            }
            let dec = decoder.as_mut().ok_or_else(|| {
                Error::data(dir, format!("record {index} was decoded before any decoder was applied"))
            })?;
            let a = rec.arrays();
            slot.refill(&rec.fields, a.counts, a.behavior_in);
            let start = Instant::now();
            let outcome = step.apply(&mut **dec, &slot, rec.fields.skipped, &counters);
            step_secs += start.elapsed().as_secs_f64();
            report.stepped += 1;
            if other.is_none() {
                compare(&rec, decision, &outcome, &**dec, &mut report);
            }
            if let Outcome::Decoded(hd) = outcome {
                outs.seq.push(hd.seq as f64);
                outs.flags.push(hd.flags as f64);
                outs.kl.push(hd.kl as f64);
                outs.behavior.extend_from_slice(dec.behavior());
                outs.latent.extend_from_slice(dec.mean());
                outs.lag1.extend_from_slice(dec.lag1_mean());
                let a = rec.arrays();
                if rec.fields.bits & BIT_HAS_BEHAVIOR != 0 && !dec.behavior().is_empty() {
                    let live = if decision == Decision::Decoded { a.behavior_out.to_vec() } else { Vec::new() };
                    outs.truth_rows.push(BehaviorRow {
                        replayed: dec.behavior().to_vec(),
                        live,
                        truth: a.behavior_in.to_vec(),
                    });
                }
            }
        }
    }
    bar.finish_and_clear();
    report.bins_per_second = report.stepped as f64 / step_secs.max(1e-12);
    (report.behavior_r2, report.live_behavior_r2) = r2s(&outs.truth_rows);
    if let Some(path) = &opts.out {
        write_outputs(path, &outs, decoder.as_deref())?;
    }
    Ok(report)
}

fn compare(rec: &BinRecord, decision: Decision, outcome: &Outcome, dec: &dyn Decoder, report: &mut ReplayReport) {
    let f = &rec.fields;
    let mut differ = |what: &str, live: String, replayed: String| {
        if report.first_difference.is_none() {
            report.first_difference =
                Some(Difference { record: f.index, seq: f.seq, what: what.into(), live, replayed });
        }
    };
    let h = match (decision, outcome) {
        (Decision::OutOfOrder, Outcome::OutOfOrder) => return,
        (Decision::Decoded, Outcome::Decoded(h)) => h,
        (d, o) => {
            let o = match o {
                Outcome::Decoded(_) => "decoded",
                Outcome::OutOfOrder => "out_of_order",
            };
            return differ("outcome", format!("{d:?}").to_lowercase(), o.into());
        }
    };
    report.compared += 1;
    if h.flags != f.out_flags {
        differ("flags", f.out_flags.to_string(), h.flags.to_string());
    }
    if h.dropped_before != f.dropped_before {
        differ("dropped_before", f.dropped_before.to_string(), h.dropped_before.to_string());
    }
    let a = rec.arrays();
    for (what, live, now) in [
        ("kl", &[f.kl][..], &[h.kl][..]),
        ("behavior", a.behavior_out, dec.behavior()),
        ("latent", a.latent, dec.mean()),
        ("lag1", a.lag1, dec.lag1_mean()),
    ] {
        if live.len() != now.len() {
            differ(what, format!("{} values", live.len()), format!("{} values", now.len()));
            continue;
        }
        let mut first = None;
        for (i, (x, y)) in live.iter().zip(now).enumerate() {
            if x.to_bits() != y.to_bits() {
                let d = (*x as f64 - *y as f64).abs();
                report.largest_difference = report.largest_difference.max(if d.is_nan() { f64::INFINITY } else { d });
                first.get_or_insert(i);
            }
        }
        if let Some(i) = first {
            differ(what, format!("[{i}] = {:?}", live[i]), format!("[{i}] = {:?}", now[i]));
        }
    }
}

/// R^2 of the replayed and of the live behaviour against the bins' own behaviour.
fn r2s(rows: &[BehaviorRow]) -> (Option<f64>, Option<f64>) {
    let Some(d) = rows.first().map(|r| r.replayed.len()) else { return (None, None) };
    let rows: Vec<&BehaviorRow> = rows.iter().filter(|r| r.truth.len() == d).collect();
    if rows.len() < 2 {
        return (None, None);
    }
    let mat = |pick: fn(&BehaviorRow) -> &[f32]| {
        Array2::new(rows.len(), d, rows.iter().flat_map(|r| pick(r).iter().copied()).collect())
    };
    let truth = mat(|r| &r.truth);
    let replayed = crate::metrics::behavior_r2(&mat(|r| &r.replayed), &truth);
    let live = rows.iter().all(|r| r.live.len() == d).then(|| crate::metrics::behavior_r2(&mat(|r| &r.live), &truth));
    let finite = |v: f64| v.is_finite().then_some(v);
    (finite(replayed), live.and_then(finite))
}

fn write_outputs(path: &Path, o: &Outputs, dec: Option<&dyn Decoder>) -> Result<()> {
    let t = o.seq.len();
    let (d, l) = dec.map_or((0, 0), |d| (d.behavior_dims(), d.latents()));
    let f32s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    let arrays = [
        ("seq", NpyArray::new(vec![t], Dtype::U8, o.seq.clone())),
        ("flags", NpyArray::new(vec![t], Dtype::U2, o.flags.clone())),
        ("kl", NpyArray::new(vec![t], Dtype::F4, o.kl.clone())),
        ("behavior", NpyArray::new(vec![t, d], Dtype::F4, f32s(&o.behavior))),
        ("latents", NpyArray::new(vec![t, l], Dtype::F4, f32s(&o.latent))),
        ("lag1", NpyArray::new(vec![t, l], Dtype::F4, f32s(&o.lag1))),
    ];
    let refs: Vec<(&str, &NpyArray)> = arrays.iter().map(|(n, a)| (*n, a)).collect();
    write_arrays(path, &refs)
}
