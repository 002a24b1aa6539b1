//! How fast each recalibration mode recovers the decoding of a rig whose tuning changed:
//! the recovery table of README "Recalibration while decoding".
//!
//!     cargo run --release --example drift_recovery [-- --rotate DEG --dead N --swap N --minutes M]
//!
//! The simulated Lorenz rig of rig-configs/sim-lorenz.toml (50 neurons, 20 ms bins, the
//! system the shipped XFADS model was trained on) runs for `--minutes` (default 5); one
//! minute in, it changes at once (see sim::Drift). Without options two scenarios run: 20 of
//! the 50 channels die, and the tuning turns by 60 degrees; with options, that one.
//! Each decoder runs through every bin with the per-bin step of `run`, and from the change
//! on, the adaptation the control socket's `adapt` would start: the same code
//! (pipeline::control::adapt) fed the same history, its updates swapped in with the state
//! carried over as the decode thread does. No threads and no clock: the table is
//! deterministic. Behaviour R^2 (variance-weighted, against the simulator's intended
//! behaviour) per 10 s window.

use latentloop::any_model::{AnyModel, DecoderOptions};
use latentloop::data::Array2;
use latentloop::decoder::Decoder;
use latentloop::filter::FilterOptions;
use latentloop::fit::kalman::{fit_dataset, KalmanFitOptions};
use latentloop::metrics::behavior_r2;
use latentloop::model::ModelFile;
use latentloop::pipeline::control::adapt::{updated_file, AdaptConfig, Adaptation};
use latentloop::pipeline::control::history::{Entry, History};
use latentloop::pipeline::control::Current;
use latentloop::pipeline::source::{BinSlot, Counters};
use latentloop::pipeline::step::{Outcome, Step};
use latentloop::sim::{Drift, SimConfig, SimRig, System};

const BIN_S: f64 = 0.02;
const N: usize = 50;
const WINDOW_S: f64 = 10.0;
const CHANGE_S: f64 = 60.0;

fn arg(name: &str, default: f64) -> f64 {
    let a: Vec<String> = std::env::args().collect();
    a.iter().position(|x| x == name).and_then(|i| a.get(i + 1)?.parse().ok()).unwrap_or(default)
}

fn current(file: ModelFile) -> Current {
    let model = AnyModel::from_model_file(&file).expect("a model");
    Current { describe: model.describe(), sha256: String::new(), origin: String::new(), model_ref: None, model, file }
}

/// Decodes the session bin by bin; adaptation `mode` from the change on. R^2 per window.
fn run(start: ModelFile, mode: Option<&str>, session: &(Array2, Array2), opts: DecoderOptions) -> Vec<f64> {
    let (spikes, behavior) = session;
    let mut cur = current(start);
    let mut dec: Box<dyn Decoder> = cur.model.try_decoder(opts).expect("a decoder");
    let mut step = Step::new(50);
    let counters = Counters::default();
    let mut slot = BinSlot::new(N, 0);
    let mut history = History::new(60_000, N, behavior.cols);
    let mut adaptation: Option<Adaptation> = None;
    let change = (CHANGE_S / BIN_S) as usize;
    let mut decoded = Array2::zeros(spikes.rows, behavior.cols);
    for t in 0..spikes.rows {
        if t == change {
            if let Some(m) = mode {
                let cfg = AdaptConfig {
                    mode: m.into(),
                    batch_seconds: None,
                    half_life_seconds: Some(arg("--half-life", 30.0)),
                    intention: None,
                    hold_radius: None,
                    ridge: None,
                };
                adaptation = Some(Adaptation::start(cfg, &cur, BIN_S, &history).expect("adaptation starts"));
            }
        }
        slot.seq = t as u64;
        slot.counts.copy_from_slice(spikes.row(t));
        let Outcome::Decoded(_) = step.apply(&mut *dec, &slot, 0, &counters) else { unreachable!() };
        decoded.row_mut(t).copy_from_slice(dec.behavior());
        history.push_entry(Entry {
            index: 0,
            seq: t as u64,
            counts: spikes.row(t).to_vec(),
            behavior: Some(behavior.row(t).to_vec()),
            decoded: dec.behavior().to_vec(),
            latent: dec.mean().to_vec(),
            flags: 0,
        });
        if let Some(a) = adaptation.as_mut() {
            if let Some(u) = a.due(&history, &[]).expect("adaptation works") {
                // As the control thread does: a new file, its decoder, the state carried over.
                let file = updated_file(&cur, u).expect("an updated model");
                cur = current(file);
                let mut fresh = cur.model.try_decoder(opts).expect("a decoder");
                if !fresh.carry_state_from(&*dec) {
                    step.request_reset();
                }
                dec = fresh;
            }
        }
    }
    let w = (WINDOW_S / BIN_S) as usize;
    (0..spikes.rows / w)
        .map(|k| behavior_r2(&decoded.rows_range(k * w, (k + 1) * w), &behavior.rows_range(k * w, (k + 1) * w)))
        .collect()
}

fn main() {
    let given = ["--rotate", "--dead", "--swap"].iter().any(|o| std::env::args().any(|a| a == *o));
    let scenarios = if given {
        vec![("the given change", arg("--rotate", 0.0), arg("--dead", 0.0) as usize, arg("--swap", 0.0) as usize)]
    } else {
        vec![("20 of 50 channels die", 0.0, 20, 0), ("the tuning turns by 60 degrees", 60.0, 0, 0)]
    };
    for (k, (name, rotate, dead, swap)) in scenarios.into_iter().enumerate() {
        let drift = Drift {
            drift_degrees_per_minute: 0.0,
            step_at_seconds: Some(CHANGE_S),
            step_rotate_degrees: rotate,
            step_dead_channels: dead,
            step_swap_channels: swap,
        };
        scenario(name, drift, k == 0);
    }
}

fn scenario(name: &str, drift: Drift, windows: bool) {
    let minutes = arg("--minutes", 5.0);
    let mut train = SimConfig::new(System::Lorenz, N, 1, 1);
    train.dt = BIN_S as f32;
    let train = latentloop::sim::simulate(&train, 30_000).expect("training data");
    let kalman = fit_dataset(&train, &KalmanFitOptions::default()).expect("a Kalman fit").to_file();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let xfads = ModelFile::read(root.join("rig-configs/models/lorenz-node.safetensors")).expect("the shipped model");

    let mut sc = SimConfig::new(System::Lorenz, N, 1, 7);
    sc.dt = BIN_S as f32;
    sc.drift = drift.clone();
    let mut rig = SimRig::new(&sc).expect("a rig");
    let data = rig.collect((minutes * 60.0 / BIN_S) as usize);
    let session = (data.spikes, data.behavior.expect("behaviour"));
    let opts = DecoderOptions { filter: FilterOptions { samples: None, seed: 1 }, ..Default::default() };

    let runs: Vec<(&str, Vec<f64>)> = vec![
        ("kalman, none", run(kalman.clone(), None, &session, opts)),
        ("kalman, smoothbatch", run(kalman.clone(), Some("smoothbatch"), &session, opts)),
        ("kalman, rml", run(kalman, Some("rml"), &session, opts)),
        ("xfads, none", run(xfads.clone(), None, &session, opts)),
        ("xfads, readout", run(xfads, Some("readout"), &session, opts)),
    ];
    println!("\n## {name} at {CHANGE_S} s; adaptation from the change on\n");
    if windows {
        print!("| window (s) |");
        for (name, _) in &runs {
            print!(" {name} |");
        }
        println!("\n|---|{}", "---|".repeat(runs.len()));
        for k in 0..runs[0].1.len() {
            print!("| {:.0}-{:.0} |", k as f64 * WINDOW_S, (k + 1) as f64 * WINDOW_S);
            for (_, r2) in &runs {
                print!(" {:.3} |", r2[k]);
            }
            println!();
        }
        println!();
    }
    let pre = (CHANGE_S / WINDOW_S) as usize;
    println!("| decoder, mode | R^2 before (mean) | R^2 after, first window | recovered to 90% of before, s after the change |");
    println!("|---|---|---|---|");
    for (name, r2) in &runs {
        let before = r2[..pre].iter().sum::<f64>() / pre as f64;
        let when = r2[pre..].iter().position(|&v| v >= 0.9 * before).map(|k| (k + 1) as f64 * WINDOW_S);
        println!(
            "| {name} | {before:.3} | {:.3} | {} |",
            r2[pre],
            when.map_or("not within the session".into(), |s| format!("{s:.0}"))
        );
    }
}
