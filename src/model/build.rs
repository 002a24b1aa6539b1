//! Making model files in code: randomly initialised models of any card (benches, the
//! trainer's starting point) and the exact linear-Gaussian model (tests, simulator truth).

use super::card::{Card, DynamicsKind, ReadoutKind, UpdateKind};
use super::file::{ModelFile, Tensor};
use super::observation::softplus_inv;
use crate::math::philox::{Normals, Purpose};

/// Draws `rows x cols` weights ~ N(0, gain^2 / fan_in) from stream `sample`.
fn weights(g: &Normals, sample: u32, rows: usize, cols: usize, gain: f32) -> Tensor {
    let mut d = vec![0.0; rows * cols];
    g.fill(0, Purpose::Train, sample, &mut d);
    let sc = gain / (cols.max(1) as f32).sqrt();
    d.iter_mut().for_each(|v| *v *= sc);
    Tensor::matrix(rows, cols, d)
}

fn filled(n: usize, v: f32) -> Tensor {
    Tensor::vector(vec![v; n])
}

/// A model with every tensor the card asks for, weights drawn from `seed`. Q and Q0 start at
/// `q` and 1, rates at about `base_rate` counts per bin.
pub fn random(card: &Card, seed: u64, q: f32, base_rate: f32) -> ModelFile {
    let g = Normals::new(seed);
    let (l, n, h, r, he, lr) =
        (card.latents, card.channels, card.hidden, card.rank, card.encoder_hidden, card.readout_latents);
    let mut f = ModelFile::default();
    f.insert("dynamics.log_q", filled(l, softplus_inv(q)));
    f.insert("init.m0", filled(l, 0.0));
    f.insert("init.log_q0", filled(l, softplus_inv(1.0)));
    let mut next = 0u32;
    let mut w = |rows: usize, cols: usize, gain: f32| {
        next += 1;
        weights(&g, next, rows, cols, gain)
    };
    match card.dynamics {
        DynamicsKind::Linear => {
            let mut a = vec![0.0; l * l];
            (0..l).for_each(|i| a[i * l + i] = 0.95);
            f.insert("dynamics.a", Tensor::matrix(l, l, a));
            f.insert("dynamics.b", filled(l, 0.0));
        }
        DynamicsKind::Mlp | DynamicsKind::Node => {
            f.insert("dynamics.w1", w(h, l, 1.0));
            f.insert("dynamics.b1", filled(h, 0.0));
            f.insert("dynamics.w2", w(l, h, 0.3));
            f.insert("dynamics.b2", filled(l, 0.0));
        }
        DynamicsKind::Gru => {
            f.insert("dynamics.w_zh", w(h, l, 1.0));
            f.insert("dynamics.b_zh", filled(h, 0.0));
            f.insert("dynamics.w_hh", w(3 * h, h, 1.0));
            f.insert("dynamics.b_hh", filled(3 * h, 0.0));
            f.insert("dynamics.b_ih", filled(3 * h, 0.0));
            f.insert("dynamics.w_out", w(l, h, 1.0));
            f.insert("dynamics.b_out", filled(l, 0.0));
        }
    }
    if card.update == UpdateKind::Encoder {
        f.insert("encoder.w1", w(he, n, 1.0));
        f.insert("encoder.b1", filled(he, 0.0));
        f.insert("encoder.w2", w((r + 1) * l, he, 0.5));
        f.insert("encoder.b2", filled((r + 1) * l, 0.0));
    }
    match card.readout {
        ReadoutKind::Poisson => {
            f.insert("readout.c", w(n, lr, 0.5));
            f.insert("readout.b", filled(n, (base_rate / card.dt).ln()));
        }
        ReadoutKind::Gaussian => {
            f.insert("readout.c", w(n, l, 1.0));
            f.insert("readout.b", filled(n, 0.0));
            f.insert("readout.log_r", filled(n, softplus_inv(0.5)));
        }
        ReadoutKind::None => {}
    }
    if card.behavior_dims > 0 {
        f.insert("behavior.d", w(card.behavior_dims, l, 1.0));
        f.insert("behavior.bias", filled(card.behavior_dims, 0.0));
    }
    card.write_meta(&mut f);
    f
}

/// The linear-Gaussian model z_t = A z_{t-1} + a + w, y = C z + b + v, with the exact
/// `gaussian` update. Row-major A (L x L) and C (N x L).
#[allow(clippy::too_many_arguments)]
pub fn linear_gaussian(
    a: &[f32],
    bias: &[f32],
    q: &[f32],
    c: &[f32],
    b: &[f32],
    r: &[f32],
    m0: &[f32],
    q0: &[f32],
    samples: usize,
    dt: f32,
) -> ModelFile {
    let (l, n) = (q.len(), r.len());
    let card = Card {
        latents: l,
        channels: n,
        dt,
        samples,
        dynamics: DynamicsKind::Linear,
        hidden: 0,
        rmsnorm: false,
        substeps: 1,
        update: UpdateKind::Gaussian,
        rank: n,
        encoder_hidden: 0,
        readout: ReadoutKind::Gaussian,
        readout_latents: l,
        behavior_dims: 0,
    };
    let sp = |v: &[f32]| Tensor::vector(v.iter().map(|&x| softplus_inv(x)).collect());
    let mut f = ModelFile::default();
    f.insert("dynamics.a", Tensor::matrix(l, l, a.to_vec()));
    f.insert("dynamics.b", Tensor::vector(bias.to_vec()));
    f.insert("dynamics.log_q", sp(q));
    f.insert("init.m0", Tensor::vector(m0.to_vec()));
    f.insert("init.log_q0", sp(q0));
    f.insert("readout.c", Tensor::matrix(n, l, c.to_vec()));
    f.insert("readout.b", Tensor::vector(b.to_vec()));
    f.insert("readout.log_r", sp(r));
    card.write_meta(&mut f);
    f
}

/// A model size of the benchmarks and the GPU comparison tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size {
    pub name: &'static str,
    pub latents: usize,
    pub channels: usize,
    pub samples: usize,
    pub rank: usize,
    pub hidden: usize,
    pub encoder_hidden: usize,
}

pub const SMALL: Size =
    Size { name: "small", latents: 8, channels: 64, samples: 32, rank: 4, hidden: 64, encoder_hidden: 64 };
pub const STANDARD: Size =
    Size { name: "standard", latents: 32, channels: 128, samples: 64, rank: 8, hidden: 128, encoder_hidden: 128 };
pub const MC_MAZE: Size =
    Size { name: "mc_maze", latents: 40, channels: 182, samples: 24, rank: 15, hidden: 128, encoder_hidden: 256 };
pub const BIG: Size =
    Size { name: "big", latents: 256, channels: 1024, samples: 128, rank: 32, hidden: 512, encoder_hidden: 512 };
pub const SIZES: [Size; 4] = [SMALL, STANDARD, MC_MAZE, BIG];

impl Size {
    /// The card of this size with the given dynamics and update (Poisson readout over all
    /// latents unless the update is gaussian; 2 behaviour dims; 20 ms bins).
    pub fn card(&self, dynamics: DynamicsKind, update: UpdateKind) -> Card {
        let encoder = update == UpdateKind::Encoder;
        Card {
            latents: self.latents,
            channels: self.channels,
            dt: 0.02,
            samples: self.samples,
            dynamics,
            hidden: if dynamics == DynamicsKind::Linear { 0 } else { self.hidden },
            rmsnorm: false,
            substeps: 2,
            update,
            rank: if encoder { self.rank } else { self.channels },
            encoder_hidden: if encoder { self.encoder_hidden } else { 0 },
            readout: if update == UpdateKind::Gaussian { ReadoutKind::Gaussian } else { ReadoutKind::Poisson },
            readout_latents: self.latents,
            behavior_dims: 2,
        }
    }
}
