//! `latentloop run`: the real-time pipeline.
//!
//! Threads:
//! - acquisition ([`acquire`]): source -> bins -> SPSC ring (never blocks on the decoder);
//! - decode ([`decode`]): ring -> the per-bin step ([`step`]) -> ZeroMQ PUB, one timing
//!   record per bin to the main thread and one session record to the recorder;
//! - recorder ([`record`]): the session folder on disk ([`crate::session`]);
//! - main (this module): set-up ([`setup`]), calibration when the config names no model
//!   ([`calibrate`]), then statistics: histograms, the live status line, snapshots, and the
//!   reports at the end. [`threads::Threads`] stops and joins the others on every path.
//!
//! Bins travel in preallocated slots through one SPSC ring and come back through another;
//! timing records and session records travel through rings of their own. Control is a stop
//! flag (set by Ctrl-C / SIGTERM or by `--seconds`) and a channel carrying the sources'
//! refusals and warnings to the terminal.

pub mod acquire;
pub mod calibrate;
pub mod changes;
pub mod clock;
pub mod control;
pub mod decode;
pub mod hot_path;
pub mod jitter;
pub mod record;
pub mod setup;
pub mod shadow;
pub mod source;
pub mod stats;
pub mod step;
pub mod threads;
pub mod wait;

use crate::config::RigConfig;
use crate::error::{Error, Result};
use ringbuf::traits::{Consumer, Producer, Split};
use ringbuf::HeapRb;
use serde::Serialize;
use source::{BinSlot, Counters, LogLine};
use stats::{StageSummary, Stats, TimingRecord};
use std::io::Write as _;
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
    /// Session records lost because the recorder's ring was full (a stalled disk).
    pub records_lost: u64,
}

impl CounterSummary {
    fn read(c: &Counters, records_lost: u64) -> Self {
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
            records_lost,
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
    /// The session folder (None: recording was off).
    pub session: Option<String>,
    /// Bin records written to it.
    pub session_records: Option<u64>,
    /// The control socket's endpoint (None: control was off).
    pub control: Option<String>,
    /// What the run was told to do against its own checks (explicit overrides).
    pub warnings: Vec<String>,
    /// Where the source says a bin ended -> sent (LSL: its timestamps on the host clock).
    pub source_to_publish: Option<StageSummary>,
    /// The shadow decoders (`[[decoder]]`), each with its counters, latency and session.
    pub shadows: Vec<shadow::ShadowSummary>,
}

pub fn run(cfg: &RigConfig, opts: &RunOptions) -> Result<RunSummary> {
    // Set-up: everything that can be refused is refused before any thread starts.
    let channels = *cfg.source.channels.get_ref();
    let (loaded, warnings) = setup::load_model(cfg)?;
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    let behavior_dims = setup::behavior_dims(cfg, loaded.as_ref().map(|(m, _)| m))?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).map_err(|e| Error::Invalid(format!("signal handler: {e}")))?;
    }
    let counters = Arc::new(Counters::default());
    let (log_tx, log_rx) = crossbeam_channel::bounded::<LogLine>(64);
    let dec_opts = match &loaded {
        Some((m, _)) => Some(setup::decoder_options(cfg, m)?),
        None => None,
    };
    let backend = dec_opts.map_or(crate::gpu::Backend::Cpu, |o| o.backend);
    let mut header = setup::header(cfg, behavior_dims, None, setup::decoder_ref(cfg, backend));
    // The sources' refusals, warnings and markers for the session (whose folder is made
    // only once nothing more can be refused).
    let (events_tx, events_rx) = crossbeam_channel::bounded(4096);
    let log = setup::source_log(log_tx, cfg.session_dir().map(|_| events_tx));
    let ctx = zmq::Context::new();
    let source = setup::build_source(cfg, &ctx, behavior_dims, &counters, &log)?;
    if source.channels() != channels {
        return Err(
            cfg.error_at(cfg.source.channels.span(), format!("the source delivers {} channels", source.channels()))
        );
    }
    let out = setup::output_socket(cfg, &ctx)?;
    let prepared_shadows = shadow::prepare(cfg, &ctx, behavior_dims)?;
    let reports = cfg.resolve(&cfg.reports.dir);
    let control_sock = match cfg.control.enabled {
        true => {
            std::fs::create_dir_all(&reports).map_err(|e| Error::io(&reports, e))?;
            let ep = cfg
                .control
                .endpoint
                .as_ref()
                .map_or_else(|| control::default_endpoint(&reports), |e| e.get_ref().clone());
            let (sock, bound) = control::bind(&ctx, &ep)?;
            let file = reports.join("control.endpoint");
            std::fs::write(&file, format!("{bound}\n")).map_err(|e| Error::io(&file, e))?;
            if !opts.quiet {
                eprintln!("control socket: {bound}");
            }
            Some((sock, bound))
        }
        false => None,
    };
    let mut session = {
        let max_latents = cfg.record.max_latents.max(loaded.as_ref().map_or(0, |(m, _)| m.latents()));
        setup::open_session(cfg, &header, max_latents, events_rx)?
    };
    if session.is_none() && !opts.quiet {
        eprintln!("note: [record] enabled = false: this session is not recorded");
    }

    // Start: the recorder, then acquisition (calibration reads its bins), then decoding.
    let mut threads = threads::Threads::new(stop.clone());
    let mut decode_tap = None;
    let mut acquire_tap = None;
    let recording = match session.take() {
        Some(s) => {
            let rec = s.recorder;
            threads.start_recorder(s.recording.tx.clone(), move || rec.run())?;
            (decode_tap, acquire_tap) = (Some(s.decode_tap), Some(s.acquire_tap));
            let _ = s.recording.tx.send(record::ToRecorder::Event(serde_json::json!({
                "kind": "start", "t_ns": clock::monotonic_ns(), "wall": crate::session::write::now_utc(), "warnings": warnings,
            })));
            Some(s.recording)
        }
        None => None,
    };
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
        record: acquire_tap,
        stop: stop.clone(),
        consumer: consumer.clone(),
        core: cfg.pipeline.acquire_core,
    };
    threads.start_acquire(move || drop(acq.run()))?;

    let rec_tx = recording.as_ref().map(|r| r.tx.clone());
    let mut train_xfads = None;
    let (model, bytes, origin) = match loaded {
        Some((m, b)) => (m, b, cfg.model_path().map_or(String::new(), |p| p.display().to_string())),
        None => {
            let (m, data) = calibrate::calibrate(
                cfg,
                &mut ring_cons,
                &mut free_prod,
                behavior_dims,
                &stop,
                rec_tx.as_ref(),
                opts.quiet,
            )?;
            std::fs::create_dir_all(&reports).map_err(|e| Error::io(&reports, e))?;
            let file = match &m {
                crate::any_model::AnyModel::Kalman(k) => k.to_file(),
                crate::any_model::AnyModel::Xfads(_) => unreachable!("calibration fits the Kalman decoder"),
            };
            file.write(reports.join("calibration-kalman.safetensors"))?;
            data.write_npz(reports.join("calibration.npz"))?;
            if !opts.quiet {
                eprintln!("calibrated on {} bins: {}", data.bins(), m.describe());
            }
            if cfg.calibration.model.get_ref() == "xfads" {
                let x = &cfg.calibration.xfads;
                let o = crate::fit::xfads::TrainOptions {
                    dynamics: x.dynamics.parse().map_err(Error::Invalid)?,
                    latents: x.latents,
                    rank: x.latents.min(8),
                    epochs: x.epochs,
                    max_seconds: Some(x.max_seconds),
                    seed: cfg.model.seed,
                    quiet: true,
                    ..Default::default()
                };
                if !opts.quiet {
                    eprintln!(
                        "training the XFADS model on the block in the background; the Kalman decoder decodes meanwhile"
                    );
                }
                train_xfads = Some((data.clone(), o));
            }
            (m, file.to_bytes(), "calibration".to_string())
        }
    };
    let dec_opts = match dec_opts {
        Some(o) => o,
        None => setup::decoder_options(cfg, &model)?,
    };
    let decoder = setup::build_decoder(cfg, &model, dec_opts)?;
    let mut model_ref = None;
    if let Some(r) = &recording {
        if decoder.latents() > decode_tap.as_ref().map_or(0, |t| t.max_latents(channels, behavior_dims)) {
            return Err(Error::Config {
                path: cfg.path.clone(),
                msg: format!(
                    "[record] max_latents = {} is below the model's {} latents",
                    cfg.record.max_latents,
                    decoder.latents()
                ),
            });
        }
        let m = setup::store_model(&r.dir, 0, &bytes, &model, &origin)?;
        // The same header with the model in it (its clock anchor unchanged).
        header.model = Some(m.clone());
        header.decoder = setup::decoder_ref(cfg, dec_opts.backend);
        let _ = r.tx.send(record::ToRecorder::Header(Box::new(header.clone())));
        let _ = r.tx.send(record::ToRecorder::Event(setup::decoder_event(0, &m, false)));
        model_ref = Some(m);
    }
    if !opts.quiet && matches!(model, crate::any_model::AnyModel::Xfads(_)) {
        eprintln!("decoding on the {}", dec_opts.backend);
    }
    // The control thread, with its ends of the change hand-off and of the decoded-bin feed.
    let live = Arc::new(std::sync::Mutex::new(control::LiveStatus::default()));
    let (mut changes, mut feed) = (None, None);
    let control_endpoint = control_sock.as_ref().map(|(_, b)| b.clone());
    if let Some((sock, bound)) = control_sock {
        let (outbox, inbox) = changes::channel();
        let max_latents = cfg.record.max_latents.max(decoder.latents());
        let floats = channels + 2 * behavior_dims + 2 * max_latents;
        let history_bins = ((cfg.control.history_seconds / cfg.bin_seconds()) as usize).min(600_000);
        let (tap, end) =
            record::tap(history_bins.clamp(64, 8192), floats, Arc::new(std::sync::atomic::AtomicU64::new(0)));
        let file = crate::model::ModelFile::from_bytes(&bytes).map_err(Error::Invalid)?;
        let setup = control::ControlSetup {
            endpoint: bound,
            outbox,
            feed: Some(end),
            counters: counters.clone(),
            live: live.clone(),
            stop: stop.clone(),
            record: recording.as_ref().map(|r| r.tx.clone()),
            session_dir: recording.as_ref().map(|r| r.dir.clone()),
            current: control::Current {
                describe: model.describe(),
                sha256: crate::session::sha256_hex(&bytes),
                origin: origin.clone(),
                model_ref: model_ref.clone(),
                model: model.clone(),
                file,
            },
            // Models loaded later run where the config says an XFADS filter runs.
            dec_opts: match &model {
                crate::any_model::AnyModel::Xfads(_) => dec_opts,
                crate::any_model::AnyModel::Kalman(_) => crate::any_model::DecoderOptions {
                    backend: crate::gpu::select_backend(&cfg.model.backend).unwrap_or(crate::gpu::Backend::Cpu),
                    ..dec_opts
                },
            },
            channels,
            behavior_dims,
            bin_seconds: cfg.bin_seconds(),
            max_latents,
            history_bins,
            calibration_ridge: cfg.calibration.ridge,
            train_xfads: train_xfads.take(),
            quiet: opts.quiet,
        };
        let ctl = control::Control::new(sock, setup);
        threads.start_control(move || ctl.run())?;
        (changes, feed) = (Some(inbox), Some(tap));
    }
    let bin_ns = (cfg.bin_seconds() * 1e9) as u64;
    // The shadow decoders: their thread, their sessions, the decode thread's feed to them.
    let mut shadow_sessions = Vec::new();
    let shadow_tap = if prepared_shadows.is_empty() {
        None
    } else {
        let max_latents = cfg.record.max_latents.max(decoder.latents());
        let floats = channels + 2 * behavior_dims + 2 * max_latents;
        let lost = Arc::new(std::sync::atomic::AtomicU64::new(0));
        // A second of bins: a shadow that falls further behind loses bins (counted, GAP).
        let (tap, feed) = record::tap(((1.0 / cfg.bin_seconds()) as usize).clamp(64, 8192), floats, lost.clone());
        let mut shadows = Vec::new();
        for p in prepared_shadows {
            let tap = match &recording {
                Some(r) => {
                    let (t, rec) = shadow::open_session(cfg, &r.dir, &p, behavior_dims, &mut threads)?;
                    shadow_sessions.push(rec);
                    Some(t)
                }
                None => None,
            };
            shadows.push(shadow::Shadow::new(p, bin_ns, cfg.pipeline.max_predict_gap, tap));
        }
        let shadow_stop = Arc::new(AtomicBool::new(false));
        let t = shadow::ShadowThread {
            feed,
            lost,
            shadows,
            stop: shadow_stop.clone(),
            slot: BinSlot::new(channels, behavior_dims),
            bin_ns,
        };
        threads.start_shadows(shadow_stop, move || t.run())?;
        Some(tap)
    };
    let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
    let dec = decode::Decode {
        decoder,
        ring: ring_cons,
        free: free_prod,
        out,
        stats: stats_prod,
        record: decode_tap,
        changes,
        feed,
        shadow: shadow_tap,
        counters: counters.clone(),
        stop: stop.clone(),
        waiter: wait::Waiter::new(Duration::from_micros(cfg.pipeline.spin_us), bin_ns),
        bin_ns,
        stale_ns: (cfg.pipeline.stale_ms.unwrap_or(2.0 * cfg.bin_seconds() * 1e3) * 1e6) as u64,
        step: step::Step::new(cfg.pipeline.max_predict_gap),
        core: cfg.pipeline.decode_core,
        realtime: cfg.pipeline.realtime_priority,
        ready: ready_tx,
    };
    let decode_thread = threads.start_decode(move || dec.run())?;
    let _ = consumer.set(decode_thread);
    if let Ok(Err(e)) = ready_rx.recv() {
        return Err(Error::Config { path: cfg.path.clone(), msg: e });
    }

    // Statistics until stopped.
    let mut st = Stats::new(bin_ns);
    let started = Instant::now();
    let status = crate::progress::bar(0, opts.quiet, "{spinner} {msg}");
    let (mut last_status, mut last_snapshot) = (Instant::now(), Instant::now());
    std::fs::create_dir_all(&reports).map_err(|e| Error::io(&reports, e))?;
    // Appended line by line: an hour's run holds none of them in memory.
    let mut snapshots = std::fs::File::create(reports.join("snapshots.jsonl")).ok();
    let deadline = opts.seconds.map(Duration::from_secs_f64);
    loop {
        while let Some(r) = stats_cons.try_pop() {
            st.record(&r);
        }
        while let Ok(line) = log_rx.try_recv() {
            status.suspend(|| eprintln!("{line}"));
        }
        let timed_out = deadline.is_some_and(|d| started.elapsed() >= d);
        if stop.load(Ordering::Relaxed) || timed_out {
            if let Some(r) = &recording {
                let why = if timed_out { "--seconds elapsed" } else { "signal (Ctrl-C or SIGTERM)" };
                let _ = r.tx.send(record::ToRecorder::Event(
                    serde_json::json!({"kind": "stop", "t_ns": clock::monotonic_ns(), "reason": why}),
                ));
            }
            break;
        }
        if last_status.elapsed() >= Duration::from_millis(250) {
            last_status = Instant::now();
            if let Ok(mut l) = live.lock() {
                let stages = st.summary();
                l.receive_to_publish = stages.into_iter().find(|x| x.stage == "receive_to_publish");
                l.behavior_r2 = st.r2.value();
                l.decode_seconds = started.elapsed().as_secs_f64();
            }
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
                "counters": CounterSummary::read(&counters, recording.as_ref().map_or(0, |r| r.lost.load(Ordering::Relaxed))),
                "behavior_r2": st.r2.value(),
                "interval": st.take_interval(),
            });
            if let Some(f) = snapshots.as_mut() {
                let _ = writeln!(f, "{snap}");
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    status.finish_and_clear();
    let decode_seconds = started.elapsed().as_secs_f64();
    drop(threads.stop_realtime());
    while let Some(r) = stats_cons.try_pop() {
        st.record(&r);
    }
    let lost = recording.as_ref().map_or(0, |r| r.lost.load(Ordering::Relaxed));
    let counter_summary = CounterSummary::read(&counters, lost);
    let shadows = threads.shadows_finished();
    let shadow_reports: Vec<_> = shadows.iter().map(|f| reports.join("shadows").join(&f.name)).collect();
    let mut shadow_summaries: Vec<_> = shadows
        .iter()
        .zip(&shadow_reports)
        .enumerate()
        .map(|(k, (f, dir))| f.summary(dir, shadow_sessions.get(k).map(|r| r.dir.display().to_string()), None))
        .collect();
    let shadow_written = threads.finish_shadow_recordings(|k| {
        serde_json::json!({
            "kind": "end",
            "t_ns": clock::monotonic_ns(),
            "decode_seconds": decode_seconds,
            "shadow": &shadow_summaries[k],
        })
    });
    for (k, w) in shadow_written.into_iter().enumerate() {
        match w {
            Ok(w) => shadow_summaries[k].session_records = Some(w.records),
            Err(e) => eprintln!("error: shadow '{}': {e}", shadow_summaries[k].name),
        }
    }
    for (f, dir) in shadows.iter().zip(&shadow_reports) {
        f.stats.write_reports(dir).map_err(|e| Error::io(dir, e))?;
    }
    let written = threads.finish_recording(serde_json::json!({
        "kind": "end",
        "t_ns": clock::monotonic_ns(),
        "decode_seconds": decode_seconds,
        "counters": &counter_summary,
    }));
    let session_records = match written {
        Some(Ok(w)) => Some(w.records),
        Some(Err(e)) => {
            eprintln!("error: {e}");
            None
        }
        None => None,
    };

    st.write_reports(&reports).map_err(|e| Error::io(&reports, e))?;
    let summary = RunSummary {
        config: cfg.path.display().to_string(),
        model: model.describe(),
        source: format!("{:?}", cfg.source.kind).to_lowercase(),
        output: cfg.output.endpoint.clone(),
        bin_ms: *cfg.source.bin_ms.get_ref(),
        decode_seconds,
        counters: counter_summary,
        deadline_misses: st.deadline_misses,
        behavior_r2: st.r2.value(),
        stages: st.summary(),
        reports: reports.display().to_string(),
        session: recording.as_ref().map(|r| r.dir.display().to_string()),
        session_records,
        control: control_endpoint,
        warnings,
        source_to_publish: (!st.source_to_publish.is_empty()).then(|| {
            StageSummary::of("source_to_publish", "the source's end of the bin -> sent", &st.source_to_publish)
        }),
        shadows: shadow_summaries,
    };
    let json = serde_json::to_string_pretty(&summary).expect("summary serialises");
    std::fs::write(reports.join("summary.json"), json).map_err(|e| Error::io(&reports, e))?;
    if !opts.quiet {
        eprintln!("{}", st.table());
        for s in &summary.shadows {
            eprintln!("{}", shadow::line(s));
        }
    }
    Ok(summary)
}
