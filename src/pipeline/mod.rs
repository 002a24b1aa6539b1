//! `latentloop run`: the real-time pipeline.
//!
//! Threads:
//! - acquisition ([`acquire`]): source -> bins -> SPSC ring (never blocks on the decoder);
//! - decode ([`decode`]): ring -> filter step -> ZeroMQ PUB, one timing record per bin;
//! - main (this module): calibration (when the config names no model), then statistics:
//!   histograms, the live status line, snapshots, and the reports at the end.
//!
//! Bins travel in preallocated slots through one SPSC ring and come back through another;
//! timing records travel through a third. Control is a stop flag (set by Ctrl-C / SIGTERM or
//! by `--seconds`) and a crossbeam channel carrying rejected-message reasons.

pub mod acquire;
pub mod clock;
pub mod decode;
pub mod hot_path;
pub mod jitter;
pub mod source;
pub mod stats;
pub mod step;

use crate::any_model::{AnyModel, DecoderOptions};
use crate::config::{RigConfig, SourceKind};
use crate::data::{Array2, Dataset};
use crate::error::{Error, Result};
use crate::filter::FilterOptions;
use crate::fit::kalman::{fit_dataset, KalmanFitOptions};
use crate::gpu::{select_backend, Backend};
use crate::sim::{SimConfig, System};
use ringbuf::traits::{Consumer, Producer, Split};
use ringbuf::HeapRb;
use serde::Serialize;
use source::{BinSlot, Counters, LogLine, RejectLog, SlotKind, Source};
use stats::{StageSummary, Stats, TimingRecord};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

pub struct RunOptions {
    /// Stop after this many seconds of decoding (default: until Ctrl-C).
    pub seconds: Option<f64>,
    /// No live status line.
    pub quiet: bool,
}

#[derive(Serialize, Debug)]
pub struct CounterSummary {
    pub acquired: u64,
    pub decoded: u64,
    pub predict_only: u64,
    pub rejected: u64,
    pub missing: u64,
    pub skipped: u64,
    pub out_of_order: u64,
    pub restarts: u64,
    pub resets: u64,
    pub dropped_ring_full: u64,
    pub lost_messages: u64,
    pub output_dropped: u64,
    pub stats_dropped: u64,
}

impl CounterSummary {
    fn read(c: &Counters) -> Self {
        let g = Counters::get;
        CounterSummary {
            acquired: g(&c.acquired),
            decoded: g(&c.decoded),
            predict_only: g(&c.predict_only),
            rejected: g(&c.rejected),
            missing: g(&c.missing),
            skipped: g(&c.skipped),
            out_of_order: g(&c.out_of_order),
            restarts: g(&c.restarts),
            resets: g(&c.resets),
            dropped_ring_full: g(&c.dropped_ring_full),
            lost_messages: g(&c.lost_messages),
            output_dropped: g(&c.output_dropped),
            stats_dropped: g(&c.stats_dropped),
        }
    }
}

/// Written to `<reports>/summary.json` and returned.
#[derive(Serialize, Debug)]
pub struct RunSummary {
    pub config: String,
    pub model: String,
    pub source: String,
    pub output: String,
    pub bin_ms: f64,
    pub decode_seconds: f64,
    pub counters: CounterSummary,
    /// Bins whose receive-to-publish latency exceeded one bin width.
    pub deadline_misses: u64,
    /// Running behaviour R^2 against the ground truth the bins carried (sim source).
    pub behavior_r2: Option<f64>,
    pub stages: Vec<StageSummary>,
    pub reports: String,
}

fn build_source(
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
            let d = if behavior_dims > 0 { behavior_dims } else { z.behavior_dims };
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
        SourceKind::Openephys => {
            let o = cfg.source.openephys.as_ref().expect("validated");
            let set = source::openephys::Settings::new(o, channels, *cfg.source.bin_ms.get_ref()).map_err(bad)?;
            let s = source::openephys::OpenEphysSource::connect(ctx, &o.endpoint, set, counters.clone(), log.clone())
                .map_err(bad)?;
            Ok(Box::new(s))
        }
    }
}

/// Pops `bins` calibration bins from the ring (returning the slots) and fits the Kalman
/// decoder on them. Returns the model and the calibration data.
fn calibrate(
    cfg: &RigConfig,
    ring: &mut ringbuf::HeapCons<BinSlot>,
    free: &mut ringbuf::HeapProd<BinSlot>,
    behavior_dims: usize,
    stop: &AtomicBool,
    quiet: bool,
) -> Result<(AnyModel, Dataset)> {
    let channels = *cfg.source.channels.get_ref();
    let bins = (*cfg.calibration.seconds.get_ref() / cfg.bin_seconds()).round() as usize;
    let bar = progress(bins as u64, quiet, "calibrating {bar:30} {pos}/{len} bins ({eta} left)");
    let (mut spikes, mut behavior) = (Vec::with_capacity(bins * channels), Vec::with_capacity(bins * behavior_dims));
    let mut without = 0usize;
    while spikes.len() < bins * channels {
        if stop.load(Ordering::Relaxed) {
            return Err(Error::Invalid("stopped during calibration; no decoder was fitted".into()));
        }
        let Some(slot) = ring.try_pop() else {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        };
        if slot.kind == SlotKind::Data {
            if slot.has_behavior {
                spikes.extend_from_slice(&slot.counts);
                behavior.extend_from_slice(&slot.behavior);
                bar.inc(1);
            } else {
                without += 1;
            }
        }
        let _ = free.try_push(slot);
        if without > bins {
            return Err(Error::Invalid(format!(
                "calibration needs bins that carry behaviour ({behavior_dims} values each); {without} arrived without"
            )));
        }
    }
    bar.finish_and_clear();
    let data = Dataset {
        spikes: Array2::new(bins, channels, spikes),
        behavior: Some(Array2::new(bins, behavior_dims, behavior)),
        dt: cfg.bin_seconds() as f32,
        ..Default::default()
    };
    let opts = KalmanFitOptions { ridge: cfg.calibration.ridge, ..Default::default() };
    let model = fit_dataset(&data, &opts).map_err(Error::Invalid)?;
    Ok((AnyModel::Kalman(Arc::new(model)), data))
}

fn progress(len: u64, quiet: bool, template: &str) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(template).unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

pub fn run(cfg: &RigConfig, opts: &RunOptions) -> Result<RunSummary> {
    let channels = *cfg.source.channels.get_ref();
    let model = match cfg.model_path() {
        Some(p) => {
            let m = AnyModel::load(&p)?;
            if m.channels() != channels {
                let span = cfg.source.channels.span();
                return Err(cfg.error_at(
                    span,
                    format!("channels = {channels} but the model {} expects {}", p.display(), m.channels()),
                ));
            }
            Some(m)
        }
        None => None,
    };
    let behavior_dims = match (&model, cfg.source.kind) {
        (Some(m), _) => m.behavior_dims(),
        (None, SourceKind::Sim) => cfg.source.sim.as_ref().map_or(0, |s| s.behavior_dims),
        (None, _) => cfg.source.zmq.as_ref().map_or(0, |z| z.behavior_dims),
    };
    if model.is_none() && behavior_dims == 0 {
        return Err(Error::Config {
            path: cfg.path.clone(),
            msg: "calibration needs behaviour: set behavior_dims in the source table".into(),
        });
    }

    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).map_err(|e| Error::Invalid(format!("signal handler: {e}")))?;
    }
    let counters = Arc::new(Counters::default());
    let (log_tx, log_rx) = crossbeam_channel::bounded::<LogLine>(64);
    let log = RejectLog::new(log_tx);
    let ctx = zmq::Context::new();
    let source = build_source(cfg, &ctx, behavior_dims, &counters, &log)?;
    if source.channels() != channels {
        return Err(
            cfg.error_at(cfg.source.channels.span(), format!("the source delivers {} channels", source.channels()))
        );
    }

    let out = ctx.socket(zmq::PUB).map_err(|e| Error::Invalid(e.to_string()))?;
    out.set_sndhwm(cfg.output.sndhwm).map_err(|e| Error::Invalid(e.to_string()))?;
    out.set_linger(0).map_err(|e| Error::Invalid(e.to_string()))?;
    out.bind(&cfg.output.endpoint).map_err(|e| Error::Config {
        path: cfg.path.clone(),
        msg: format!("cannot bind output {}: {e}", cfg.output.endpoint),
    })?;

    let cap = cfg.pipeline.ring_capacity;
    let (ring_prod, mut ring_cons) = HeapRb::<BinSlot>::new(cap).split();
    let (mut free_prod, free_cons) = HeapRb::<BinSlot>::new(cap).split();
    for _ in 0..cap {
        let _ = free_prod.try_push(BinSlot::new(channels, behavior_dims));
    }
    let (stats_prod, mut stats_cons) = HeapRb::<TimingRecord>::new(1 << 14).split();
    let consumer: Arc<OnceLock<std::thread::Thread>> = Arc::new(OnceLock::new());

    let acq = acquire::Acquire {
        source,
        ring: ring_prod,
        free: free_cons,
        spare: BinSlot::new(channels, behavior_dims),
        counters: counters.clone(),
        stop: stop.clone(),
        consumer: consumer.clone(),
        core: cfg.pipeline.acquire_core,
    };
    let acq_thread = std::thread::Builder::new()
        .name("ll-acquire".into())
        .spawn(move || acq.run())
        .map_err(|e| Error::Invalid(format!("cannot start the acquisition thread: {e}")))?;

    let reports = cfg.resolve(&cfg.reports.dir);
    let model = match model {
        Some(m) => m,
        None => {
            let calibrated = calibrate(cfg, &mut ring_cons, &mut free_prod, behavior_dims, &stop, opts.quiet);
            let (m, data) = match calibrated {
                Ok(x) => x,
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    let _ = acq_thread.join();
                    return Err(e);
                }
            };
            std::fs::create_dir_all(&reports).map_err(|e| Error::io(&reports, e))?;
            if let AnyModel::Kalman(k) = &m {
                k.to_file().write(reports.join("calibration-kalman.safetensors"))?;
            }
            data.write_npz(reports.join("calibration.npz"))?;
            if !opts.quiet {
                eprintln!("calibrated on {} bins: {}", data.bins(), m.describe());
            }
            m
        }
    };

    // [model] backend: where an XFADS filter runs (Kalman decoders always run on the CPU).
    // "cuda" must be honoured or the run fails; "auto" falls back to the CPU with a warning.
    let built = (|| -> Result<_> {
        let backend = match &model {
            AnyModel::Xfads(_) => select_backend(&cfg.model.backend)
                .map_err(|msg| Error::Config { path: cfg.path.clone(), msg: format!("[model] backend: {msg}") })?,
            AnyModel::Kalman(_) => Backend::Cpu,
        };
        let dec_opts = DecoderOptions {
            filter: FilterOptions { samples: cfg.model.samples, seed: cfg.model.seed },
            backend,
            ..Default::default()
        };
        let decoder =
            if cfg.model.backend == "auto" { model.decoder(dec_opts) } else { model.try_decoder(dec_opts)? };
        Ok((backend, decoder))
    })();
    let (backend, decoder) = match built {
        Ok(x) => x,
        Err(e) => {
            stop.store(true, Ordering::Relaxed);
            let _ = acq_thread.join();
            return Err(e);
        }
    };
    if !opts.quiet && matches!(model, AnyModel::Xfads(_)) {
        eprintln!("decoding on the {backend}");
    }
    let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
    let dec = decode::Decode {
        decoder,
        ring: ring_cons,
        free: free_prod,
        out,
        stats: stats_prod,
        counters: counters.clone(),
        stop: stop.clone(),
        spin: Duration::from_micros(cfg.pipeline.spin_us),
        bin_ns: (cfg.bin_seconds() * 1e9) as u64,
        stale_ns: (cfg.pipeline.stale_ms.unwrap_or(2.0 * cfg.bin_seconds() * 1e3) * 1e6) as u64,
        step: step::Step::new(cfg.pipeline.max_predict_gap),
        core: cfg.pipeline.decode_core,
        realtime: cfg.pipeline.realtime_priority,
        ready: ready_tx,
    };
    let dec_thread = std::thread::Builder::new()
        .name("ll-decode".into())
        .spawn(move || dec.run())
        .map_err(|e| Error::Invalid(format!("cannot start the decode thread: {e}")))?;
    let _ = consumer.set(dec_thread.thread().clone());
    if let Ok(Err(e)) = ready_rx.recv() {
        stop.store(true, Ordering::Relaxed);
        let _ = dec_thread.join();
        let _ = acq_thread.join();
        return Err(Error::Config { path: cfg.path.clone(), msg: e });
    }

    // Statistics until stopped.
    let bin_ns = (cfg.bin_seconds() * 1e9) as u64;
    let mut st = Stats::new(bin_ns);
    let started = Instant::now();
    let status = progress(0, opts.quiet, "{spinner} {msg}");
    let (mut last_status, mut last_snapshot) = (Instant::now(), Instant::now());
    std::fs::create_dir_all(&reports).map_err(|e| Error::io(&reports, e))?;
    let snap_path = reports.join("snapshots.jsonl");
    let mut snapshots = String::new();
    let deadline = opts.seconds.map(Duration::from_secs_f64);
    loop {
        while let Some(r) = stats_cons.try_pop() {
            st.record(&r);
        }
        while let Ok(line) = log_rx.try_recv() {
            status.suspend(|| eprintln!("{line}"));
        }
        if stop.load(Ordering::Relaxed) || deadline.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
        if last_status.elapsed() >= Duration::from_millis(250) {
            last_status = Instant::now();
            let (p50, p99) = st.e2e_us();
            let r2 = st.r2.value().map_or("-".into(), |v| format!("{v:.3}"));
            let g = |c| Counters::get(c);
            status.set_message(format!(
                "bins {} | dropped {} | missing {} | predict-only {} | rejected {} | latency p50 {p50:.0} us p99 {p99:.0} us | behaviour R2 {r2}",
                g(&counters.decoded),
                g(&counters.dropped_ring_full) + g(&counters.skipped),
                g(&counters.missing),
                g(&counters.predict_only),
                g(&counters.rejected),
            ));
            status.tick();
        }
        if last_snapshot.elapsed().as_secs_f64() >= cfg.reports.snapshot_seconds {
            last_snapshot = Instant::now();
            let snap = serde_json::json!({
                "t_seconds": started.elapsed().as_secs_f64(),
                "counters": CounterSummary::read(&counters),
                "behavior_r2": st.r2.value(),
                "interval": st.take_interval(),
            });
            snapshots.push_str(&snap.to_string());
            snapshots.push('\n');
            let _ = std::fs::write(&snap_path, &snapshots);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    stop.store(true, Ordering::Relaxed);
    status.finish_and_clear();
    let decode_seconds = started.elapsed().as_secs_f64();
    dec_thread.thread().unpark();
    let _ = dec_thread.join();
    let _ = acq_thread.join();
    while let Some(r) = stats_cons.try_pop() {
        st.record(&r);
    }

    st.write_reports(&reports).map_err(|e| Error::io(&reports, e))?;
    let summary = RunSummary {
        config: cfg.path.display().to_string(),
        model: model.describe(),
        source: format!("{:?}", cfg.source.kind).to_lowercase(),
        output: cfg.output.endpoint.clone(),
        bin_ms: *cfg.source.bin_ms.get_ref(),
        decode_seconds,
        counters: CounterSummary::read(&counters),
        deadline_misses: st.deadline_misses,
        behavior_r2: st.r2.value(),
        stages: st.summary(),
        reports: reports.display().to_string(),
    };
    let json = serde_json::to_string_pretty(&summary).expect("summary serialises");
    std::fs::write(reports.join("summary.json"), json).map_err(|e| Error::io(&reports, e))?;
    if !opts.quiet {
        eprintln!("{}", st.table());
    }
    Ok(summary)
}
