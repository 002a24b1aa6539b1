//! Properties over generated inputs (proptest), in the ordinary suite:
//! - every parser of outside bytes (src/fuzzing.rs) returns on any bytes, and on the seed
//!   corpora's files cut, flipped and spliced, never panicking;
//! - a valid bin or output message encoded then decoded is itself;
//! - the filters fed valid counts (all-zero, saturated, extreme but finite, random) keep a
//!   finite state, flag a reset where the update's algebra breaks down, and recover.

use latentloop::any_model::{AnyModel, DecoderOptions};
use latentloop::filter::FilterOptions;
use latentloop::fit::kalman::{fit_dataset, KalmanFitOptions};
use latentloop::fuzzing::TARGETS;
use latentloop::gpu::Backend;
use latentloop::kalman::KalmanMode;
use latentloop::model::{build, Card, DynamicsKind, ReadoutKind, UpdateKind};
use latentloop::sim::{self, SimConfig, System};
use latentloop::wire::{bin, output};
use proptest::prelude::*;
use proptest::test_runner::RngSeed;
use std::path::PathBuf;
use std::sync::Arc;

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds").join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, rng_seed: RngSeed::Fixed(1), ..ProptestConfig::default() })]

    #[test]
    fn every_parser_returns_on_any_bytes(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        for (_, parse) in TARGETS {
            parse(&data);
        }
    }

    /// Valid inputs damaged the ways transport and disks damage them: cut short, bytes
    /// overwritten, a run of bytes repeated.
    #[test]
    fn every_parser_returns_on_damaged_valid_inputs(
        pick in any::<usize>(),
        cut in any::<prop::sample::Index>(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        splice in any::<prop::sample::Index>(),
        splice_len in 0usize..64,
    ) {
        for (name, parse) in TARGETS {
            let seeds = corpus(name);
            let mut d = seeds[pick % seeds.len()].clone();
            for (at, v) in &flips {
                if !d.is_empty() {
                    let i = at.index(d.len());
                    d[i] = *v;
                }
            }
            if !d.is_empty() {
                let s = splice.index(d.len());
                let run: Vec<u8> = d[s..(s + splice_len).min(d.len())].to_vec();
                d.splice(s..s, run);
            }
            parse(&d);
            let c = cut.index(d.len() + 1);
            parse(&d[..c]);
        }
    }

    #[test]
    fn a_bin_encoded_then_decoded_is_itself(
        seq in any::<u64>(), source_ts in any::<u64>(), flags in any::<u16>(), dtype in 0u8..3,
        counts in proptest::collection::vec(0u16..=1000, 1..300),
        behavior in proptest::collection::vec(-1e6f32..1e6, 0..8),
    ) {
        let dtype = [bin::Dtype::U16, bin::Dtype::U32, bin::Dtype::F32][dtype as usize];
        let counts: Vec<f32> = counts.iter().map(|&c| c as f32).collect();
        let h = bin::BinHeader { dtype, channels: counts.len(), flags, behavior_dims: behavior.len(), seq, source_ts };
        let mut msg = Vec::new();
        bin::encode(&h, &counts, &behavior, &mut msg);
        let (mut c2, mut b2) = (vec![0.0; counts.len()], vec![0.0; behavior.len()]);
        let h2 = bin::decode(&msg, &mut c2, &mut b2, 1000.0).unwrap();
        prop_assert_eq!(h2, h);
        prop_assert_eq!(c2, counts);
        prop_assert_eq!(b2, behavior);
    }

    #[test]
    fn an_output_encoded_then_decoded_is_itself(
        flags in any::<u16>(), dropped_before in any::<u32>(), seq in any::<u64>(), source_ts in any::<u64>(),
        recv_ns in any::<u64>(), publish_ns in any::<u64>(), kl in -1e9f32..1e9,
        behavior in proptest::collection::vec(-1e6f32..1e6, 0..8),
        latent in proptest::collection::vec(-1e6f32..1e6, 1..64),
    ) {
        let lag1: Vec<f32> = latent.iter().map(|v| v * 0.5).collect();
        let h = output::OutputHeader { flags, dropped_before, seq, source_ts, recv_ns, publish_ns, kl };
        let mut msg = vec![0u8; output::len(behavior.len(), latent.len())];
        output::encode(&h, &behavior, &latent, &lag1, &mut msg);
        let o = output::decode(&msg).unwrap();
        prop_assert_eq!(o.header, h);
        prop_assert_eq!((o.behavior, o.latent, o.lag1), (behavior, latent, lag1));
    }
}

/// What a bin of the filter property holds.
#[derive(Clone, Debug)]
enum Bin {
    Zeros,
    Saturated(f32),
    Random(Vec<u16>),
    OneHuge(usize, f32),
    Missing,
}

fn bin_strategy(n: usize) -> impl Strategy<Value = Bin> {
    prop_oneof![
        Just(Bin::Zeros),
        prop_oneof![Just(1000.0f32), Just(65535.0), Just(1e6), Just(3e38)].prop_map(Bin::Saturated),
        proptest::collection::vec(0u16..20, n).prop_map(Bin::Random),
        (0..n, prop_oneof![Just(1e4f32), Just(1e12), Just(f32::MAX)]).prop_map(|(c, v)| Bin::OneHuge(c, v)),
        Just(Bin::Missing),
    ]
}

fn decoders() -> &'static [(&'static str, AnyModel)] {
    static MODELS: std::sync::OnceLock<Vec<(&'static str, AnyModel)>> = std::sync::OnceLock::new();
    MODELS.get_or_init(models)
}

fn models() -> Vec<(&'static str, AnyModel)> {
    let mut v = Vec::new();
    for (name, dynamics, update, rmsnorm) in [
        ("xfads mlp, encoder update", DynamicsKind::Mlp, UpdateKind::Encoder, false),
        ("xfads gru + rmsnorm, encoder update", DynamicsKind::Gru, UpdateKind::Encoder, true),
        ("xfads node, Poisson-Laplace update", DynamicsKind::Node, UpdateKind::PoissonLaplace, false),
    ] {
        let c = Card {
            latents: 3,
            channels: 6,
            dt: 0.02,
            samples: 8,
            dynamics,
            hidden: 8,
            rmsnorm,
            substeps: 2,
            update,
            rank: if update == UpdateKind::PoissonLaplace { 6 } else { 2 },
            encoder_hidden: 8,
            readout: ReadoutKind::Poisson,
            readout_latents: 3,
            behavior_dims: 2,
        };
        v.push((name, AnyModel::from_model_file(&build::random(&c, 3, 0.2, 0.5)).unwrap()));
    }
    let mut cfg = SimConfig::new(System::Lorenz, 6, 1, 1);
    cfg.dt = 0.02;
    let data = sim::simulate(&cfg, 600).unwrap();
    let k = fit_dataset(&data, &KalmanFitOptions::default()).unwrap();
    v.push(("kalman", AnyModel::Kalman(Arc::new(k))));
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, rng_seed: RngSeed::Fixed(2), ..ProptestConfig::default() })]

    #[test]
    fn filters_keep_a_finite_state_on_any_valid_counts(bins in proptest::collection::vec(bin_strategy(6), 1..60)) {
        for (name, model) in decoders().iter() {
            let opts = DecoderOptions { filter: FilterOptions { samples: None, seed: 1 }, kalman: KalmanMode::Exact, backend: Backend::Cpu };
            let mut d = model.decoder(opts);
            let mut after_reset = None;
            for (t, b) in bins.iter().enumerate() {
                let y: Option<Vec<f32>> = match b {
                    Bin::Zeros => Some(vec![0.0; 6]),
                    Bin::Saturated(v) => Some(vec![*v; 6]),
                    Bin::Random(c) => Some(c.iter().map(|&x| x as f32).collect()),
                    Bin::OneHuge(c, v) => Some((0..6).map(|i| if i == *c { *v } else { 1.0 }).collect()),
                    Bin::Missing => None,
                };
                let info = d.step(y.as_deref()).map_err(|e| TestCaseError::fail(format!("{name}: bin {t}: {e}")))?;
                let finite = d.mean().iter().chain(d.lag1_mean()).chain(d.behavior()).all(|v| v.is_finite());
                prop_assert!(finite, "{}: bin {} ({:?}) left a non-finite state: {:?}", name, t, b, d.mean());
                if info.reset {
                    prop_assert!(info.predict_only, "{}: a reset bin is predict-only", name);
                    after_reset = Some(t);
                }
            }
            // Recovery: ordinary bins after the run decode. A state run far out (an extreme
            // bin, or a random model's dynamics carrying it away) may still break down in the
            // first of them, and is then reset to the prior; from there the filter decodes.
            let mut last_reset = None;
            for i in 0..20 {
                if d.step(Some(&[1.0; 6])).unwrap().reset {
                    last_reset = Some(i);
                }
            }
            prop_assert!(last_reset.is_none_or(|i| i < 15), "{}: still resetting on ordinary bins ({:?}; last in the run {:?})", name, last_reset, after_reset);
        }
    }
}
