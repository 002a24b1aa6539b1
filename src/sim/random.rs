//! The simulator's random streams, all Philox counters (see `math::philox` for the layout).
//!
//! Every draw is a pure function of (key, step, sample, index), so a rig is reproducible bin
//! by bin without carrying generator state, and a bin's spikes do not depend on how many
//! uniforms an earlier bin's Poisson draws happened to consume.
//!
//! Stream map (purpose is always `Purpose::Sim`):
//! - key = system `seed`, step = [`SETUP_STEP`]: samples [`SAMPLE_READOUT`],
//!   [`SAMPLE_BEHAVIOR_MAP`], [`SAMPLE_REFERENCE_START`];
//! - key = `trial_seed`, step = [`SETUP_STEP`]: samples [`SAMPLE_TRIAL_INDEX`],
//!   [`SAMPLE_TRIAL_START`] (distinct from the system's samples, so `seed == trial_seed`
//!   shares no draw);
//! - key = `trial_seed`, step = bin t: sample n < N for neuron n's Poisson draw,
//!   [`SAMPLE_BEHAVIOR_NOISE`], [`SAMPLE_PROCESS_NOISE`].

use crate::math::philox::{philox4x32_10, Purpose};

/// A step no bin reaches (bins would need 2^56 of them), reserved for setup draws. The
/// step's high 32 bits go into the counter's top 24 bits, hence 0xFF_FFFF.
pub const SETUP_STEP: u64 = 0xFF_FFFF << 32;
pub const SAMPLE_READOUT: u32 = 0;
pub const SAMPLE_BEHAVIOR_MAP: u32 = 1;
pub const SAMPLE_REFERENCE_START: u32 = 2;
pub const SAMPLE_TRIAL_INDEX: u32 = 3;
pub const SAMPLE_TRIAL_START: u32 = 4;
pub const SAMPLE_BEHAVIOR_NOISE: u32 = u32::MAX;
pub const SAMPLE_PROCESS_NOISE: u32 = u32::MAX - 1;
/// Neuron indices are Poisson stream samples, so they must stay below the named samples.
pub const MAX_NEURONS: usize = 1 << 24;

/// Uniforms from the Philox stream (key, step, `Purpose::Sim`, sample), four u32 per block.
#[derive(Clone, Debug)]
pub struct Uniforms {
    key: [u32; 2],
    ctr: [u32; 4],
    buf: [u32; 4],
    used: usize,
}

impl Uniforms {
    pub fn new(seed: u64, step: u64, sample: u32) -> Self {
        let c3 = Purpose::Sim as u32 | (((step >> 32) as u32) << 8);
        Uniforms { key: [seed as u32, (seed >> 32) as u32], ctr: [0, sample, step as u32, c3], buf: [0; 4], used: 4 }
    }

    #[inline]
    pub fn next_u32(&mut self) -> u32 {
        if self.used == 4 {
            self.buf = philox4x32_10(self.ctr, self.key);
            self.ctr[0] = self.ctr[0].wrapping_add(1);
            self.used = 0;
        }
        self.used += 1;
        self.buf[self.used - 1]
    }

    /// Uniform on the open interval (0, 1) with 53 random bits (never 0, so logs are safe;
    /// never 1, so inversion terminates).
    #[inline]
    pub fn next_f64(&mut self) -> f64 {
        let hi = (self.next_u32() >> 5) as u64;
        let lo = (self.next_u32() >> 6) as u64;
        (((hi << 26) | lo) as f64 + 0.5) * (1.0 / 9_007_199_254_740_992.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniforms_are_open_unit_and_flat() {
        let mut u = Uniforms::new(11, 3, 7);
        let n = 200_000;
        let mut hist = [0usize; 10];
        let mut sum = 0.0;
        for _ in 0..n {
            let x = u.next_f64();
            assert!(x > 0.0 && x < 1.0);
            sum += x;
            hist[(x * 10.0) as usize] += 1;
        }
        // s.e. of the mean: sqrt(1/12 / n) = 6.5e-4; of a decile's count: sqrt(n 0.09) = 134.
        assert!((sum / n as f64 - 0.5).abs() < 4e-3);
        for h in hist {
            assert!((h as f64 - n as f64 / 10.0).abs() < 700.0, "{hist:?}");
        }
    }

    #[test]
    fn streams_differ_by_step_and_sample() {
        let first = |step, sample| Uniforms::new(5, step, sample).next_u32();
        assert_ne!(first(0, 0), first(1, 0));
        assert_ne!(first(0, 0), first(0, 1));
        assert_ne!(first(SETUP_STEP, 0), first(0, 0));
        assert_eq!(first(4, 2), first(4, 2));
    }
}
