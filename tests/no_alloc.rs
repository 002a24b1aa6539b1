//! Nothing allocates on the per-bin path: a counting global allocator (tests/common/alloc_count.rs)
//! watches the filter steps of every dynamics and update kind, the per-bin step with the
//! Kalman decoder and the filter, the output encoding, and the live threads of a real run.

use latentloop::decoder::Decoder;
use latentloop::filter::{Filter, FilterOptions};
use latentloop::model::{build, Card, DynamicsKind, ReadoutKind, UpdateKind, XfadsModel};
use std::path::PathBuf;
use std::sync::Arc;

#[path = "common/alloc_count.rs"]
mod alloc_count;

#[test]
fn filter_steps_allocate_nothing() {
    let mut cases = Vec::new();
    for dynamics in DynamicsKind::ALL {
        for (update, readout) in [
            (UpdateKind::Encoder, ReadoutKind::Poisson),
            (UpdateKind::PoissonLaplace, ReadoutKind::Poisson),
            (UpdateKind::Gaussian, ReadoutKind::Gaussian),
        ] {
            let n = 12;
            let card = Card {
                latents: 5,
                channels: n,
                dt: 0.02,
                samples: 10,
                dynamics: *dynamics,
                hidden: 16,
                rmsnorm: true,
                substeps: 2,
                update,
                rank: if update == UpdateKind::Encoder { 3 } else { n },
                encoder_hidden: 8,
                readout,
                readout_latents: 4,
                behavior_dims: 2,
            };
            cases.push(Arc::new(XfadsModel::compile(&build::random(&card, 1, 0.1, 0.3)).unwrap()));
        }
    }
    let bins: Vec<Vec<f32>> = (0..20).map(|t| (0..12).map(|j| ((t + j) % 3) as f32).collect()).collect();
    let bad = vec![f32::NAN; 12];
    for model in cases {
        let mut f = Filter::new(model.clone(), FilterOptions { samples: None, seed: 1 });
        let before = alloc_count::on_this_thread();
        for (t, y) in bins.iter().enumerate() {
            match t % 7 {
                3 => assert!(f.step(None).unwrap().predict_only),
                5 => assert!(f.step(Some(&bad)).is_err()),
                _ => {
                    Decoder::predict(&mut f);
                    f.step(Some(y)).unwrap();
                }
            }
        }
        let n = alloc_count::on_this_thread() - before;
        assert_eq!(n, 0, "{} / {}: {n} allocations in 20 steps", model.card.dynamics, model.card.update);
    }
}

/// The per-bin step (sequence checks, gaps predicted through, restarts, rejected and refused
/// bins) with the Kalman decoder and the XFADS filter, and the output encoding, allocate
/// nothing after the first bin.
#[test]
fn the_step_and_the_output_encoding_allocate_nothing() {
    use latentloop::kalman::{KalmanFilter, KalmanMode};
    use latentloop::pipeline::source::{BinSlot, Counters, SlotKind};
    use latentloop::pipeline::step::{Outcome, Step};
    use latentloop::wire::output;

    alloc_count::assert_counter_counts();
    let n = 12;
    let kalman = latentloop::fit::kalman::fit_dataset(&kalman_session(n), &Default::default()).unwrap();
    let xfads = Arc::new(XfadsModel::compile(&build::random(&card(n), 1, 0.1, 0.3)).unwrap());
    let decoders: Vec<Box<dyn Decoder>> = vec![
        Box::new(KalmanFilter::new(Arc::new(kalman.clone()), KalmanMode::Exact)),
        Box::new(KalmanFilter::new(Arc::new(kalman), KalmanMode::SteadyState)),
        Box::new(Filter::new(xfads, FilterOptions { samples: None, seed: 1 })),
    ];
    for mut dec in decoders {
        let mut step = Step::new(5);
        let counters = Counters::default();
        let mut slot = BinSlot::new(n, 0);
        let mut msg = vec![0u8; output::len(dec.behavior_dims(), dec.latents())];
        let mut seq = 0u64;
        let mut run = |dec: &mut dyn Decoder, t: usize| {
            // Every few bins something else: a gap (predicted through), a long gap (reset), a
            // duplicate, a restart, a rejected bin, a bin without data, a NaN bin.
            seq += match t % 11 {
                3 => 3,
                7 => 20,
                _ => 1,
            };
            slot.seq = if t % 13 == 5 { seq - 1 } else { seq };
            slot.restart = t % 17 == 9;
            slot.kind = match t % 5 {
                2 => SlotKind::Rejected,
                4 => SlotKind::NoData,
                _ => SlotKind::Data,
            };
            slot.counts.iter_mut().enumerate().for_each(|(j, c)| *c = ((t + j) % 3) as f32);
            if t % 19 == 8 {
                slot.counts[1] = f32::NAN;
            }
            dec.predict();
            if let Outcome::Decoded(h) = step.apply(dec, &slot, 0, &counters) {
                output::encode(&h, dec.behavior(), dec.mean(), dec.lag1_mean(), &mut msg);
                output::set_publish_ns(&mut msg, t as u64);
            }
        };
        run(&mut *dec, 0);
        let ((), allocs) = alloc_count::counted(|| (1..300).for_each(|t| run(&mut *dec, t)));
        assert_eq!(allocs, 0, "{allocs} allocations in 299 bins");
        let c = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        assert!(c(&counters.missing) > 0 && c(&counters.restarts) > 0 && c(&counters.out_of_order) > 0);
    }
}

fn card(n: usize) -> Card {
    Card {
        latents: 5,
        channels: n,
        dt: 0.001,
        samples: 10,
        dynamics: DynamicsKind::Mlp,
        hidden: 16,
        rmsnorm: false,
        substeps: 2,
        update: UpdateKind::Encoder,
        rank: 3,
        encoder_hidden: 8,
        readout: ReadoutKind::Poisson,
        readout_latents: 5,
        behavior_dims: 2,
    }
}

fn kalman_session(n: usize) -> latentloop::data::Dataset {
    let mut c = latentloop::sim::SimConfig::new(latentloop::sim::System::Lorenz, n, 1, 1);
    c.dt = 0.001;
    latentloop::sim::simulate(&c, 2000).unwrap()
}

/// The live per-bin path of a real run (`pipeline::run` in this process, a zmq source fed
/// over ipc by a publisher thread, the XFADS filter and then the Kalman decoder): after the
/// first bin, the decode thread's loop (wait, catch-up, step, encode, send, timing record)
/// and the acquisition thread's receive and hand-off make no heap allocation. The bins
/// include a gap, a restart, a NaN bin and a malformed one.
#[test]
fn a_live_run_allocates_nothing_on_its_per_bin_path() {
    use latentloop::config::RigConfig;
    use latentloop::pipeline::{self, hot_path, RunOptions};
    use latentloop::wire::bin::{self, BinHeader, Dtype, FLAG_STREAM_START};

    let n = 12;
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("no-alloc-live");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    build::random(&card(n), 1, 0.1, 0.3).write(dir.join("xfads.safetensors")).unwrap();
    latentloop::fit::kalman::fit_dataset(&kalman_session(n), &Default::default())
        .unwrap()
        .to_file()
        .write(dir.join("kalman.safetensors"))
        .unwrap();

    for model in ["xfads", "kalman"] {
        let (bins, out) = (dir.join(format!("{model}-bins.ipc")), dir.join(format!("{model}-out.ipc")));
        let text = format!(
            "[source]\nkind = \"zmq\"\nbin_ms = 1.0\nchannels = {n}\n[source.zmq]\nendpoint = \"ipc://{}\"\n\
             [model]\npath = \"{model}.safetensors\"\n[output]\nendpoint = \"ipc://{}\"\n[reports]\ndir = \"reports-{model}\"\n",
            bins.display(),
            out.display()
        );
        let path = dir.join(format!("{model}.toml"));
        std::fs::write(&path, &text).unwrap();
        let cfg = RigConfig::load(&path).unwrap();

        let ctx = zmq::Context::new();
        let publisher = ctx.socket(zmq::PUB).unwrap();
        publisher.bind(&format!("ipc://{}", bins.display())).unwrap();
        let sender = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300)); // the run subscribes
            let mut msg = Vec::new();
            for k in 0..1500u64 {
                let seq = match k {
                    0..=699 => k,
                    700..=999 => k + 5, // a gap of 5
                    _ => k - 1000,      // a restart
                };
                let flags = if k == 0 || k == 1000 { FLAG_STREAM_START } else { 0 };
                let mut counts: Vec<f32> = (0..n).map(|j| ((k as usize + j) % 4) as f32).collect();
                if k % 97 == 50 {
                    counts[3] = f32::NAN;
                }
                let h = BinHeader { dtype: Dtype::F32, channels: n, flags, behavior_dims: 0, seq, source_ts: k };
                bin::encode(&h, &counts, &[], &mut msg);
                if k % 101 == 60 {
                    msg.truncate(msg.len() - 2);
                }
                publisher.send(&msg[..], 0).unwrap();
                std::thread::sleep(std::time::Duration::from_micros(900));
            }
        });
        let before = alloc_count::in_live_path();
        let summary = pipeline::run(&cfg, &RunOptions { seconds: Some(2.4), quiet: true }).unwrap();
        sender.join().unwrap();
        let live = alloc_count::in_live_path() - before;
        let c = &summary.counters;
        eprintln!(
            "{model}: decoded {}, rejected {}, restarts {}, missing {}",
            c.decoded, c.rejected, c.restarts, c.missing
        );
        assert!(c.decoded > 1000 && c.rejected > 0 && c.restarts == 1 && c.missing >= 5, "{c:?}");
        assert_eq!(live, 0, "{model}: {live} allocations on the live per-bin path");
    }
    // The mark is what the counter reads: an allocation inside it is seen.
    let before = alloc_count::in_live_path();
    hot_path::set(true);
    std::hint::black_box(vec![0u8; 16]);
    hot_path::set(false);
    assert!(alloc_count::in_live_path() > before, "allocations inside the mark are counted");
}
