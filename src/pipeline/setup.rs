//! Set-up of a run, before any thread starts: the model, the source, the output socket,
//! the session folder, the decoder. Every refusal here names the config line or the file.

use super::record::{self, RecordTap, Recorder, Recording, SourceEvent};
use super::source::{self, Counters, RejectLog, Source};
use crate::any_model::{AnyModel, DecoderOptions};
use crate::config::{RigConfig, SourceKind};
use crate::decoder::Decoder;
use crate::error::{Error, Result};
use crate::filter::FilterOptions;
use crate::gpu::{select_backend, Backend};
use crate::session::write::{now_utc, SessionWriter};
use crate::session::{DecoderRef, Header, ModelRef, FORMAT_NAME, VERSION};
use crate::sim::{SimConfig, System};
use std::sync::Arc;

/// A model file of the config: the model and the file's bytes (stored in the session).
pub type Loaded = (AnyModel, Vec<u8>);

/// The model file of the config (None: calibrate first), checked against the channels,
/// the bin width and the behaviour the source says it sends. Returns the warnings a run
/// with an explicit override must carry into its reports.
pub fn load_model(cfg: &RigConfig) -> Result<(Option<Loaded>, Vec<String>)> {
    let channels = *cfg.source.channels.get_ref();
    let Some(p) = cfg.model_path() else { return Ok((None, Vec::new())) };
    let bytes = std::fs::read(&p).map_err(|e| Error::io(&p, e))?;
    let m = AnyModel::load(&p)?;
    if m.channels() != channels {
        let span = cfg.source.channels.span();
        return Err(
            cfg.error_at(span, format!("channels = {channels} but the model {} expects {}", p.display(), m.channels()))
        );
    }
    let mut warnings = Vec::new();
    if let Some((bin_ms, model_ms)) = bin_width_mismatch(cfg, &m) {
        let what = format!(
            "bin_ms = {bin_ms} but the model {} was made for {model_ms} ms bins: its dynamics and rates are per bin, so at another width it decodes wrongly",
            p.display()
        );
        if !cfg.model.allow_bin_width_mismatch {
            return Err(cfg.error_at(
                cfg.source.bin_ms.span(),
                format!(
                    "{what}; bin at {model_ms} ms, or set [model] allow_bin_width_mismatch = true to run it anyway"
                ),
            ));
        }
        warnings.push(format!("{what} ([model] allow_bin_width_mismatch = true)"));
    }
    if let Some(z) = &cfg.source.zmq {
        let d = *z.behavior_dims.get_ref();
        if d != 0 && d != m.behavior_dims() {
            return Err(cfg.error_at(
                z.behavior_dims.span(),
                format!(
                    "behavior_dims = {d} but the model {} decodes {} behaviour dims: bins with {d} values would all be refused",
                    p.display(),
                    m.behavior_dims()
                ),
            ));
        }
    }
    Ok((Some((m, bytes)), warnings))
}

/// The run's bin width and the model's, in ms, where they differ (a model decodes wrongly
/// at another width: its dynamics and rates are per bin).
pub fn bin_width_mismatch(cfg: &RigConfig, m: &AnyModel) -> Option<(f64, f64)> {
    // The card's dt is an f32: in ms as an f32 it prints as written (20, not 20.0000003).
    let (bin_ms, model_ms) = (*cfg.source.bin_ms.get_ref(), (m.dt() * 1e3) as f64);
    ((bin_ms - model_ms).abs() > 1e-6 * bin_ms.max(model_ms)).then_some((bin_ms, model_ms))
}

/// Behaviour values per bin: the model's, or (calibrating) the source table's.
pub fn behavior_dims(cfg: &RigConfig, model: Option<&AnyModel>) -> Result<usize> {
    let d = match (model, cfg.source.kind) {
        (Some(m), _) => m.behavior_dims(),
        (None, SourceKind::Sim) => cfg.source.sim.as_ref().map_or(0, |s| s.behavior_dims),
        (None, _) => cfg.source.zmq.as_ref().map_or(0, |z| *z.behavior_dims.get_ref()),
    };
    if model.is_none() && d == 0 {
        return Err(Error::Config {
            path: cfg.path.clone(),
            msg: "calibration needs behaviour: set behavior_dims in the source table".into(),
        });
    }
    Ok(d)
}

pub fn build_source(
    cfg: &RigConfig,
    ctx: &zmq::Context,
    behavior_dims: usize,
    counters: &Arc<Counters>,
    log: &RejectLog,
) -> Result<Box<dyn Source>> {
    let channels = *cfg.source.channels.get_ref();
    let bad = |m: String| Error::Config { path: cfg.path.clone(), msg: m };
    match cfg.source.kind {
        SourceKind::Sim => {
            let s = cfg.source.sim.as_ref().expect("validated");
            let system: System = s.system.get_ref().parse().map_err(|e| cfg.error_at(s.system.span(), e))?;
            let mut sc = SimConfig::new(system, channels, s.seed, s.trial_seed.unwrap_or(s.seed));
            sc.behavior_dims = s.behavior_dims;
            sc.dt = cfg.bin_seconds() as f32;
            sc.drift = s.drift();
            if behavior_dims != 0 && behavior_dims != s.behavior_dims {
                return Err(bad(format!(
                    "[source.sim] behavior_dims = {} but the model decodes {behavior_dims}",
                    s.behavior_dims
                )));
            }
            Ok(Box::new(source::sim::SimSource::new(&sc, cfg.bin_seconds()).map_err(bad)?))
        }
        SourceKind::Zmq => {
            let z = cfg.source.zmq.as_ref().expect("validated");
            let d = if behavior_dims > 0 { behavior_dims } else { *z.behavior_dims.get_ref() };
            let s = source::zmq_bins::ZmqBinSource::connect(
                ctx,
                &z.endpoint,
                channels,
                d,
                z.max_count,
                counters.clone(),
                log.clone(),
            )
            .map_err(bad)?;
            Ok(Box::new(s))
        }
        SourceKind::Lsl => {
            let l = cfg.source.lsl.as_ref().expect("validated");
            let api = source::lsl::ffi::find(&source::lsl::ffi::search_dirs(&cfg.path)).map_err(bad)?;
            let s = source::lsl::LslSource::open(
                &api,
                l,
                channels,
                *cfg.source.bin_ms.get_ref(),
                counters.clone(),
                log.clone(),
            )
            .map_err(|e| bad(format!("[source.lsl]: {e}")))?;
            eprintln!("lsl: {} via {} (liblsl {}), shape {:?}", s.description(), api.path, api.version(), s.shape());
            Ok(Box::new(s))
        }
        SourceKind::Openephys => {
            let o = cfg.source.openephys.as_ref().expect("validated");
            let set = source::openephys::Settings::new(o, channels, *cfg.source.bin_ms.get_ref()).map_err(bad)?;
            let s = source::openephys::OpenEphysSource::connect(ctx, &o.endpoint, set, counters.clone(), log.clone())
                .map_err(bad)?;
            Ok(Box::new(s))
        }
    }
}

/// The output PUB socket, bound.
pub fn output_socket(cfg: &RigConfig, ctx: &zmq::Context) -> Result<zmq::Socket> {
    let zerr = |e: zmq::Error| Error::Invalid(e.to_string());
    let out = ctx.socket(zmq::PUB).map_err(zerr)?;
    out.set_sndhwm(cfg.output.sndhwm).map_err(zerr)?;
    out.set_linger(0).map_err(zerr)?;
    out.bind(&cfg.output.endpoint).map_err(|e| Error::Config {
        path: cfg.path.clone(),
        msg: format!("cannot bind output {}: {e}", cfg.output.endpoint),
    })?;
    Ok(out)
}

/// The decoder options of the config.
pub fn decoder_options(cfg: &RigConfig, model: &AnyModel) -> Result<DecoderOptions> {
    // [model] backend: where an XFADS filter runs (Kalman decoders always run on the CPU).
    let backend = match model {
        AnyModel::Xfads(_) => select_backend(&cfg.model.backend)
            .map_err(|msg| Error::Config { path: cfg.path.clone(), msg: format!("[model] backend: {msg}") })?,
        AnyModel::Kalman(_) => Backend::Cpu,
    };
    Ok(DecoderOptions {
        filter: FilterOptions { samples: cfg.model.samples, seed: cfg.model.seed },
        backend,
        ..Default::default()
    })
}

/// The decoder: "cuda" must be honoured or the run fails; "auto" falls back to the CPU
/// with a warning.
pub fn build_decoder(cfg: &RigConfig, model: &AnyModel, opts: DecoderOptions) -> Result<Box<dyn Decoder>> {
    if cfg.model.backend == "auto" {
        Ok(model.decoder(opts))
    } else {
        model.try_decoder(opts)
    }
}

/// How the session's decoders are built (for the header and for replay).
pub fn decoder_ref(cfg: &RigConfig, backend: Backend) -> DecoderRef {
    DecoderRef {
        seed: cfg.model.seed,
        samples: cfg.model.samples,
        kalman_mode: "exact".into(),
        backend: backend.to_string(),
        max_predict_gap: cfg.pipeline.max_predict_gap,
    }
}

/// The session header of this run.
pub fn header(cfg: &RigConfig, behavior_dims: usize, model: Option<ModelRef>, decoder: DecoderRef) -> Header {
    let r = &cfg.record;
    let subject = r.subject.as_ref().and_then(|t| serde_json::to_value(t).ok());
    let mut description =
        r.description.clone().unwrap_or_else(|| format!("latentloop closed-loop session ({})", cfg.path.display()));
    if description.trim().is_empty() {
        description = "latentloop closed-loop session".into();
    }
    let mut meta = serde_json::Map::new();
    for (k, v) in [("experimenter", &r.experimenter), ("institution", &r.institution), ("session_id", &r.session_id)] {
        if let Some(v) = v {
            meta.insert(k.into(), v.clone().into());
        }
    }
    Header {
        format: FORMAT_NAME.into(),
        version: VERSION,
        latentloop_version: env!("CARGO_PKG_VERSION").into(),
        git_commit: crate::session::git_commit().into(),
        created: now_utc(),
        created_monotonic_ns: super::clock::monotonic_ns(),
        clock:
            "*_ns: host CLOCK_MONOTONIC in ns (Linux; Python's time.monotonic_ns()); source_ts: as the source sent it"
                .into(),
        config_path: cfg.path.display().to_string(),
        config_text: cfg.text().to_string(),
        source: format!("{:?}", cfg.source.kind).to_lowercase(),
        bin_ms: *cfg.source.bin_ms.get_ref(),
        channels: *cfg.source.channels.get_ref(),
        behavior_dims,
        model,
        decoder,
        description,
        subject,
        metadata: meta.into(),
    }
}

/// A model stored in the session folder as change `k`; the `decoder` event that names it.
pub fn store_model(dir: &std::path::Path, k: usize, bytes: &[u8], model: &AnyModel, origin: &str) -> Result<ModelRef> {
    let name = crate::session::model_file_name(k);
    let path = dir.join(&name);
    std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
    Ok(ModelRef {
        file: name,
        sha256: crate::session::sha256_hex(bytes),
        describe: model.describe(),
        origin: origin.into(),
    })
}

/// The event that defines change `k` as a decoder built from `m`.
pub fn decoder_event(k: u64, m: &ModelRef, carry: bool) -> serde_json::Value {
    serde_json::json!({"kind": "decoder", "change": k, "file": m.file, "sha256": m.sha256,
        "describe": m.describe, "origin": m.origin, "carry_state": carry})
}

/// The recorder of a run, when recording is on: the session folder created (an older one
/// moved aside), the thread's state, the taps for the decode and acquisition threads.
pub struct Session {
    pub recorder: Recorder,
    pub recording: Recording,
    pub decode_tap: RecordTap,
    pub acquire_tap: RecordTap,
}

pub fn open_session(
    cfg: &RigConfig,
    header: &Header,
    max_latents: usize,
    source_events: crossbeam_channel::Receiver<SourceEvent>,
) -> Result<Option<Session>> {
    let Some(dir) = cfg.session_dir() else { return Ok(None) };
    let (writer, note) = SessionWriter::create(&dir, header)?;
    if let Some(n) = note {
        eprintln!("note: {n}");
    }
    let floats = header.channels + 2 * header.behavior_dims + 2 * max_latents;
    let (recorder, mut taps, recording) =
        record::recorder(writer, &[(cfg.record.ring_capacity, floats), (64, floats)], source_events);
    let acquire_tap = taps.pop().expect("two taps");
    let decode_tap = taps.pop().expect("two taps");
    Ok(Some(Session { recorder, recording, decode_tap, acquire_tap }))
}

/// The source's log, with every refusal, warning and marker also going to the session.
pub fn source_log(
    tx: crossbeam_channel::Sender<source::LogLine>,
    session: Option<crossbeam_channel::Sender<SourceEvent>>,
) -> RejectLog {
    let log = RejectLog::new(tx);
    match session {
        Some(s) => log.recording(s),
        None => log,
    }
}
