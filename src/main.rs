//! The `latentloop` command line. Every failure a user can cause (bad paths, malformed
//! files, mismatched channel counts, bad configs) prints one clear line and exits with 2.

use clap::{Args, Parser, Subcommand, ValueEnum};
use latentloop::any_model::{AnyModel, DecoderOptions};
use latentloop::config::RigConfig;
use latentloop::data::Dataset;
use latentloop::error::{Error, Result};
use latentloop::eval::evaluate;
use latentloop::filter::FilterOptions;
use latentloop::fit::kalman::{fit_dataset, KalmanFitOptions};
use latentloop::fit::readout::{fit_readout, ReadoutOptions};
use latentloop::fit::xfads::{train, GradMode, TrainOptions};
use latentloop::gpu::{select_backend, Backend};
use latentloop::kalman::KalmanMode;
use latentloop::model::{build, Card, DynamicsKind, ModelFile, Readout, ReadoutKind, UpdateKind};
use latentloop::pipeline::jitter::{self, JitterOptions};
use latentloop::pipeline::{self, RunOptions};
use latentloop::sim::{self, SimConfig, System};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "latentloop",
    version,
    about = "Real-time closed-loop neural decoder: bins neural data, runs a latent-dynamics filter once per bin, publishes decoded behaviour over ZeroMQ",
    long_about = "latentloop decodes neural population activity in real time. It receives binned spike counts \
(its own ZeroMQ bin schema, the Open Ephys GUI's ZMQ Interface, or a built-in simulated rig), runs a causal \
latent-dynamics filter (XFADS-style, forward only, with a lag-1 smoothed estimate of the previous state) or the \
classic Kalman-filter BCI decoder once per bin, and publishes decoded behaviour, the latent state and timestamps \
on a ZeroMQ PUB socket, with per-stage latency histograms.\n\nQuick start:\n  latentloop run rig-configs/sim-lorenz.toml --seconds 30"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the real-time pipeline described by a rig config (rig-configs/*.toml).
    Run(RunArgs),
    /// Simulate a session from a synthetic rig and write it as .npz.
    Simulate(SimulateArgs),
    /// Fit a decoder to a recorded or simulated session.
    #[command(subcommand)]
    Fit(FitCommand),
    /// Decode a session bin by bin, causally, and print accuracy metrics as JSON.
    Eval(EvalArgs),
    /// Write a randomly initialised XFADS model of a given size: to measure what latency a
    /// model of that size gets on a rig before any training.
    RandomModel(RandomModelArgs),
    /// Measure a core's scheduling noise floor: the latency tail no decoder on it can beat.
    ///
    /// A thread spins on the core reading the clock; every gap of 2 us or more between two
    /// reads is a stall (hypervisor steal, interrupts, kernel threads, other tasks). From
    /// the stalls it replays an ideal decoder that needs --work-us of CPU for a bin arriving
    /// every --bin-ms, and reports that decoder's latency percentiles: a floor under `run`'s
    /// receive-to-publish on this core. Run it on the rig before a session, with the core
    /// and priority the decoder gets (the config's decode_core and realtime_priority).
    /// Prints a JSON report on stdout and a one-line summary on stderr.
    Jitter(JitterArgs),
    /// Decode a recorded session again and check that every published bin comes out identical.
    ///
    /// Replays the session's recorded inputs through the same per-bin step as `run`, with
    /// the recorded models (stored in the session folder, checked by SHA-256), seeds and
    /// decisions (gaps, skipped and stale bins, restarts, refused bins, model swaps), as
    /// fast as the filter goes. Prints "N bins, all identical" and exits 0, or names the
    /// first bin that differs and the largest difference and exits 1. With --model, decodes
    /// the same session with another model instead (what it would have published; behaviour
    /// R^2 against the behaviour the bins carried) and writes it with --out.
    Replay(ReplayArgs),
    /// Print a model file's card.
    Info {
        /// The model file (.safetensors).
        #[arg(long)]
        model: PathBuf,
    },
}

#[derive(Args)]
struct RunArgs {
    /// The rig config (TOML).
    config: PathBuf,
    /// Stop after this many seconds of decoding (default: until Ctrl-C).
    #[arg(long)]
    seconds: Option<f64>,
    /// No live status line or final table (reports are still written).
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct ReplayArgs {
    /// The session folder (`<reports>/session` of a run, or `[record] dir`).
    session: PathBuf,
    /// Decode with this model instead of the recorded ones (same channel count).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Write the replayed outputs (seq, flags, kl, behavior, latents, lag1) to this .npz.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Where XFADS filters run: cpu or cuda (both give the bits the session recorded).
    #[arg(long, value_enum, default_value_t = BackendArg::Cpu)]
    backend: BackendArg,
    /// Print the report as JSON on stdout too.
    #[arg(long)]
    json: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct JitterArgs {
    /// How long to watch the core.
    #[arg(long, default_value_t = 20.0)]
    seconds: f64,
    /// The core to watch (default: wherever the scheduler puts the thread).
    #[arg(long)]
    core: Option<usize>,
    /// Spin under SCHED_FIFO at this priority (1-99; needs root or CAP_SYS_NICE).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..=99))]
    realtime_priority: Option<i32>,
    /// Bin width of the ideal decoder, in ms.
    #[arg(long, default_value_t = 1.0)]
    bin_ms: f64,
    /// CPU time the ideal decoder needs per bin, in us (latentloop's receive-to-publish
    /// median at the standard model size is about 50 us).
    #[arg(long, default_value_t = 50.0)]
    work_us: f64,
}

#[derive(Args)]
struct SimulateArgs {
    /// lorenz, arneodo, rossler or linear.
    #[arg(long)]
    system: System,
    /// Number of simulated neurons (channels).
    #[arg(long)]
    neurons: usize,
    /// Number of bins.
    #[arg(long)]
    bins: usize,
    /// Fixes the system: its readout, z-scoring and behaviour map.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Fixes the trajectory's start and the spikes (default: --seed). Another trial seed on
    /// the same --seed gives a held-out session of the same system.
    #[arg(long)]
    trial_seed: Option<u64>,
    /// Behaviour dimensions (a fixed random map of the latent plus small noise).
    #[arg(long, default_value_t = 2)]
    behavior_dims: usize,
    /// Bin width in seconds written to the file.
    #[arg(long, default_value_t = 0.02)]
    dt: f32,
    /// Output .npz (spikes, behavior, latents, rates, dt).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct RandomModelArgs {
    #[arg(long, default_value = "mlp")]
    dynamics: DynamicsKind,
    /// L.
    #[arg(long, default_value_t = 32)]
    latents: usize,
    /// N.
    #[arg(long, default_value_t = 128)]
    channels: usize,
    /// S.
    #[arg(long, default_value_t = 64)]
    samples: usize,
    /// Encoder rank r.
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// Hidden width of the dynamics.
    #[arg(long, default_value_t = 128)]
    hidden: usize,
    /// Hidden width of the encoder.
    #[arg(long, default_value_t = 128)]
    encoder_hidden: usize,
    #[arg(long, default_value_t = 2)]
    behavior_dims: usize,
    /// Bin width in seconds.
    #[arg(long, default_value_t = 0.001)]
    dt: f32,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long)]
    out: PathBuf,
}

#[derive(Subcommand)]
enum FitCommand {
    /// The Kalman-filter decoder (Wu et al. 2006) by least squares.
    Kalman(FitKalmanArgs),
    /// The nonlinear latent-dynamics model (XFADS, causal ELBO), then its behaviour readout.
    Xfads(FitXfadsArgs),
    /// The behaviour readout of an XFADS model: for one that has none (an imported xfads
    /// checkpoint), or afresh on a new calibration block. Ridge regression from the
    /// decoder's causal filtered means, the ridge chosen on the held-out tail.
    Readout(FitReadoutArgs),
}

#[derive(Args)]
struct FitReadoutArgs {
    /// The model (any XFADS model file, e.g. from `python -m latentloop import-xfads`).
    #[arg(long)]
    model: PathBuf,
    /// Calibration block (.npz: spikes, behavior, dt), binned as the model was trained.
    #[arg(long)]
    data: PathBuf,
    /// Output: the same model with the new readout (the input is left as it is).
    #[arg(long)]
    out: PathBuf,
    /// The last fraction of the bins, held out to choose the ridge (then all are fitted).
    #[arg(long, default_value_t = 0.2)]
    valid_fraction: f64,
    /// A fixed relative ridge instead of choosing among 1e-9 .. 1.
    #[arg(long)]
    ridge: Option<f64>,
    /// Filter samples S (default: the model card's).
    #[arg(long)]
    samples: Option<usize>,
    /// Seed of the filter's noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write the scores (every ridge, filtered and lag-1) as JSON.
    #[arg(long)]
    report: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum GradArg {
    /// Forward-only: detached samples of the previous bin, losses parallel in time.
    Local,
    /// Back-propagation through time within segments of --bptt-len bins.
    Bptt,
}

#[derive(Args)]
struct FitXfadsArgs {
    /// Training session (.npz: spikes, optional behavior, dt). The last --valid-fraction of
    /// the bins is held out for early stopping.
    #[arg(long)]
    data: PathBuf,
    /// Output model file (.safetensors), usable by eval and run unchanged.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value = "node")]
    dynamics: DynamicsKind,
    /// L.
    #[arg(long, default_value_t = 3)]
    latents: usize,
    /// S, samples of the filter (training and the written model's default).
    #[arg(long, default_value_t = 16)]
    samples: usize,
    /// r, rank of the encoder's update (default: min(L, 8)).
    #[arg(long)]
    rank: Option<usize>,
    /// Hidden width of the dynamics network.
    #[arg(long, default_value_t = 64)]
    hidden: usize,
    /// Hidden width of the encoder.
    #[arg(long, default_value_t = 64)]
    encoder_hidden: usize,
    /// RK4 substeps per bin (node).
    #[arg(long, default_value_t = 2)]
    substeps: usize,
    /// Weightless RMSNorm on f(z).
    #[arg(long)]
    rmsnorm: bool,
    /// Maximum epochs (training stops earlier when held-out bits/spike stop improving).
    #[arg(long, default_value_t = 200)]
    epochs: usize,
    /// Epochs without improvement before stopping.
    #[arg(long, default_value_t = 15)]
    patience: usize,
    /// Bins per minibatch.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    #[arg(long, value_enum, default_value_t = GradArg::Local)]
    grad: GradArg,
    /// Segment length for --grad bptt.
    #[arg(long, default_value_t = 16)]
    bptt_len: usize,
    /// Seed of the initial weights and of the filter noise (the written model decodes with
    /// this seed exactly as it was trained).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value_t = 0.15)]
    valid_fraction: f64,
    /// Stop after this many seconds of training.
    #[arg(long)]
    max_seconds: Option<f64>,
    /// Also write the training report (history, held-out metrics, timing) as JSON.
    #[arg(long)]
    report: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct FitKalmanArgs {
    /// Training session (.npz with spikes and behavior).
    #[arg(long)]
    data: PathBuf,
    /// Output model file (.safetensors).
    #[arg(long)]
    out: PathBuf,
    /// Relative ridge of both regressions.
    #[arg(long, default_value_t = 1e-6)]
    ridge: f64,
    /// Bins by which neural data lead behaviour.
    #[arg(long, default_value_t = 0)]
    lag: usize,
}

#[derive(Clone, Copy, ValueEnum)]
enum KalmanModeArg {
    Exact,
    Steady,
}

#[derive(Args)]
struct EvalArgs {
    /// The model file.
    #[arg(long)]
    model: PathBuf,
    /// The session (.npz).
    #[arg(long)]
    data: PathBuf,
    /// Filter samples S (XFADS; default: the model card's).
    #[arg(long)]
    samples: Option<usize>,
    /// Seed of the filter's noise (XFADS).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Kalman decoding: the full recursion or the steady-state gain.
    #[arg(long, value_enum, default_value_t = KalmanModeArg::Exact)]
    kalman_mode: KalmanModeArg,
    /// Also write the per-bin outputs (behavior, latents, lag1, rates) to this .npz.
    #[arg(long)]
    outputs: Option<PathBuf>,
    /// Where the XFADS filter runs: cpu, cuda (an error if CUDA is not usable here) or auto
    /// (CUDA when available). Kalman models always run on the CPU. A Poisson-readout XFADS
    /// model is scored from the CPU filter's posterior draws (rates, bits/spike), so eval
    /// runs it on the CPU whatever the backend; `run` uses the backend for every model.
    #[arg(long, value_enum, default_value_t = BackendArg::Cpu)]
    backend: BackendArg,
}

#[derive(Clone, Copy, ValueEnum)]
enum BackendArg {
    Cpu,
    Cuda,
    Auto,
}

impl BackendArg {
    fn name(self) -> &'static str {
        match self {
            BackendArg::Cpu => "cpu",
            BackendArg::Cuda => "cuda",
            BackendArg::Auto => "auto",
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// Exit 0, or the code a command chose (replay: 1 when a bin differs).
fn dispatch(cmd: Command) -> Result<ExitCode> {
    if let Command::Replay(a) = cmd {
        return replay(a);
    }
    dispatch_rest(cmd).map(|()| ExitCode::SUCCESS)
}

fn replay(a: ReplayArgs) -> Result<ExitCode> {
    let backend = select_backend(a.backend.name()).map_err(Error::Invalid)?;
    let opts =
        latentloop::replay::ReplayOptions { model: a.model.clone(), out: a.out.clone(), backend, quiet: a.quiet };
    let r = latentloop::replay::replay(&a.session, &opts)?;
    eprintln!("{}: {}", a.session.display(), r.status);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r).expect("report serialises"));
    }
    match &a.model {
        None => eprintln!("{} ({:.0} bins/s)", r.line(), r.bins_per_second),
        Some(m) => {
            let r2 = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.4}"));
            eprintln!(
                "{} bins decoded by {} ({:.0} bins/s): behaviour R2 {} (the live decoders: {})",
                r.stepped,
                m.display(),
                r.bins_per_second,
                r2(r.behavior_r2),
                r2(r.live_behavior_r2)
            );
        }
    }
    if let Some(out) = &a.out {
        eprintln!("wrote {}", out.display());
    }
    Ok(if r.identical() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn dispatch_rest(cmd: Command) -> Result<()> {
    match cmd {
        Command::Run(a) => {
            let cfg = RigConfig::load(&a.config)?;
            let summary = pipeline::run(&cfg, &RunOptions { seconds: a.seconds, quiet: a.quiet })?;
            if !a.quiet {
                eprintln!("reports written to {}", summary.reports);
            }
            // The session path is printed even with --quiet: it is where the data went.
            if let Some(s) = &summary.session {
                eprintln!("session recorded in {s} ({} bins)", summary.session_records.unwrap_or(0));
            }
            Ok(())
        }
        Command::Simulate(a) => {
            let mut cfg = SimConfig::new(a.system, a.neurons, a.seed, a.trial_seed.unwrap_or(a.seed));
            cfg.behavior_dims = a.behavior_dims;
            cfg.dt = a.dt;
            let data = sim::simulate(&cfg, a.bins).map_err(Error::Invalid)?;
            data.write_npz(&a.out)?;
            eprintln!("wrote {} bins x {} neurons of {} to {}", a.bins, a.neurons, a.system, a.out.display());
            Ok(())
        }
        Command::Fit(FitCommand::Kalman(a)) => {
            let data = Dataset::read_npz(&a.data)?;
            let opts = KalmanFitOptions { ridge: a.ridge, lag: a.lag, ..Default::default() };
            let model = fit_dataset(&data, &opts).map_err(|m| Error::data(&a.data, m))?;
            model.to_file().write(&a.out)?;
            eprintln!("wrote {} ({})", a.out.display(), AnyModel::Kalman(model.into()).describe());
            Ok(())
        }
        Command::Fit(FitCommand::Xfads(a)) => {
            let data = Dataset::read_npz(&a.data)?;
            let opts = TrainOptions {
                dynamics: a.dynamics,
                latents: a.latents,
                samples: a.samples,
                rank: a.rank.unwrap_or(a.latents.min(8)),
                hidden: a.hidden,
                encoder_hidden: a.encoder_hidden,
                substeps: a.substeps,
                rmsnorm: a.rmsnorm,
                readout_latents: None,
                epochs: a.epochs,
                batch: a.batch,
                bptt_len: a.bptt_len,
                lr: a.lr,
                grad: match a.grad {
                    GradArg::Local => GradMode::Local,
                    GradArg::Bptt => GradMode::Bptt,
                },
                seed: a.seed,
                valid_fraction: a.valid_fraction,
                patience: a.patience,
                max_seconds: a.max_seconds,
                ridge: 1e-3,
                quiet: a.quiet,
            };
            let trained = train(&data, &opts)?;
            trained.file.write(&a.out)?;
            let json = serde_json::to_string_pretty(&trained.report).expect("report serialises");
            if let Some(p) = &a.report {
                std::fs::write(p, &json).map_err(|e| Error::io(p, e))?;
            }
            let r = &trained.report;
            eprintln!(
                "wrote {} after {} epochs (best {}) in {:.0} s ({:.2} s/epoch); held-out: bits/spike {:?}, behaviour R2 {:?}",
                a.out.display(),
                r.epochs_run,
                r.best_epoch,
                r.seconds,
                r.seconds_per_epoch,
                r.valid.bits_per_spike,
                r.valid.behavior_r2
            );
            Ok(())
        }
        Command::Fit(FitCommand::Readout(a)) => {
            let file = ModelFile::read(&a.model)?;
            let data = Dataset::read_npz(&a.data)?;
            let opts = ReadoutOptions {
                valid_fraction: a.valid_fraction,
                ridge: a.ridge,
                decode: DecoderOptions {
                    filter: FilterOptions { samples: a.samples, seed: a.seed },
                    kalman: KalmanMode::Exact,
                    backend: Backend::Cpu,
                },
            };
            let (out, report) = fit_readout(&file, &data, &opts)?;
            eprintln!(
                "held out the last {} of {} bins; R2 of behaviour (filtered m_t -> b_t | lag-1 m_(t-1|t) -> b_(t-1)):",
                report.valid_bins,
                report.train_bins + report.valid_bins
            );
            for s in &report.scores {
                let mark = if s.ridge == report.chosen.ridge { "  <- chosen" } else { "" };
                eprintln!("  ridge {:>7.0e}: {:.4} | {:.4}{mark}", s.ridge, s.filtered_r2, s.lag1_r2);
            }
            if let Some(r) = report.before_r2 {
                eprintln!("the readout it had scored R2 {r:.4} on this data (replaced)");
            }
            out.write(&a.out)?;
            if let Some(p) = &a.report {
                let json = serde_json::to_string_pretty(&report).expect("report serialises");
                std::fs::write(p, json).map_err(|e| Error::io(p, e))?;
            }
            eprintln!(
                "wrote {} with a {}-dimensional readout of the filtered means (held-out R2 {:.4}; `run` publishes it)",
                a.out.display(),
                report.behavior_dims,
                report.chosen.filtered_r2
            );
            Ok(())
        }
        Command::Eval(a) => {
            let model = AnyModel::load(&a.model)?;
            let data = Dataset::read_npz(&a.data)?;
            let backend = match &model {
                AnyModel::Xfads(_) => select_backend(a.backend.name()).map_err(Error::Invalid)?,
                AnyModel::Kalman(_) => Backend::Cpu,
            };
            let opts = DecoderOptions {
                filter: FilterOptions { samples: a.samples, seed: a.seed },
                kalman: match a.kalman_mode {
                    KalmanModeArg::Exact => KalmanMode::Exact,
                    KalmanModeArg::Steady => KalmanMode::SteadyState,
                },
                backend,
            };
            if let (AnyModel::Xfads(m), Backend::Cuda) = (&model, backend) {
                if matches!(m.readout, Readout::Poisson { .. }) {
                    eprintln!(
                        "note: a Poisson-readout model is scored from the CPU filter's posterior draws; eval decodes it on the CPU"
                    );
                } else {
                    // Build it once here so that a CUDA failure is an error, not a fallback.
                    drop(model.try_decoder(opts)?);
                }
            }
            let (report, outputs) = evaluate(&model, &data, opts)?;
            if let Some(p) = &a.outputs {
                outputs.write_npz(p)?;
            }
            println!("{}", serde_json::to_string_pretty(&report).expect("report serialises"));
            Ok(())
        }
        Command::RandomModel(a) => {
            let card = Card {
                latents: a.latents,
                channels: a.channels,
                dt: a.dt,
                samples: a.samples,
                dynamics: a.dynamics,
                hidden: a.hidden,
                rmsnorm: false,
                substeps: 2,
                update: UpdateKind::Encoder,
                rank: a.rank,
                encoder_hidden: a.encoder_hidden,
                readout: ReadoutKind::Poisson,
                readout_latents: a.latents,
                behavior_dims: a.behavior_dims,
            };
            card.validate().map_err(Error::Invalid)?;
            build::random(&card, a.seed, 0.05, 0.3).write(&a.out)?;
            eprintln!("wrote {}", a.out.display());
            Ok(())
        }
        Command::Jitter(a) => {
            let opts = JitterOptions::new(a.seconds, a.core, a.realtime_priority, a.bin_ms, a.work_us)
                .map_err(Error::Invalid)?;
            eprintln!("watching {} for {} s ...", a.core.map_or("a core".into(), |c| format!("core {c}")), a.seconds);
            let report = jitter::measure(&opts).map_err(Error::Invalid)?;
            println!("{}", serde_json::to_string_pretty(&report).expect("report serialises"));
            eprintln!("{}", report.line());
            Ok(())
        }
        Command::Replay(_) => unreachable!("dispatched above"),
        Command::Info { model } => {
            let f = latentloop::model::ModelFile::read(&model)?;
            let m = AnyModel::from_model_file(&f).map_err(|msg| Error::model(&model, msg))?;
            println!("{}", m.describe());
            for (k, v) in &f.meta {
                println!("  {k} = {v}");
            }
            for (k, t) in &f.tensors {
                println!("  tensor {k} {:?}", t.shape);
            }
            Ok(())
        }
    }
}
