//! Synthetic rigs (ALGORITHM.md section 9): a latent system observed through Poisson neurons,
//! with a behaviour that is a noisy linear map of the latent.
//!
//! Per bin: the latent x advances one bin; the standardised latent l = (x - mu) / sd uses the
//! system's reference statistics; rates r = exp(l W~) expected counts per bin, where
//! W~ = W / s (per neuron) z-scores each neuron's drive l W; spikes ~ Poisson(r); behaviour
//! b = B l + 0.05 e.
//!
//! Two seeds, two roles:
//! - `seed` fixes the SYSTEM: the readout W ~ U(-0.5, 0.5) (L_true x N), the reference
//!   statistics (mean and covariance of x over a long reference trajectory after a burn-in,
//!   hence the latent standardisation and each neuron's drive scale), and the behaviour map
//!   B (D x L_true, entries N(0, 1 / L_true)). Sessions that share `seed` share all of these,
//!   so a decoder fitted on one can be tested on another.
//! - `trial_seed` fixes the TRIAL: where the trajectory starts, and every Poisson and
//!   behaviour-noise draw (and the linear system's process noise).
//!
//! The drive's z-scoring comes from the reference covariance rather than from each neuron's
//! drive over the reference run: mean(l W) = 0 and var(l W)_n = w_n' C w_n with C the
//! correlation of l, the same numbers without an N-wide pass over 100,000 bins. The linear
//! system uses its exact stationary moments (mean 0, covariance I) instead of estimates.

mod poisson;
mod random;
mod systems;

pub use poisson::{ln_factorial, poisson};
pub use random::{Uniforms, MAX_NEURONS};
pub use systems::{State, System, LINEAR_BLOCKS, SUBSTEPS};

use crate::data::{Array2, Dataset};
use crate::math::philox::{Normals, Purpose};
use random::*;

pub const DEFAULT_BEHAVIOR_DIMS: usize = 2;
pub const DEFAULT_DT: f32 = 0.02;
/// Behaviour noise standard deviation (behaviour is otherwise a linear map of the latent).
pub const BEHAVIOR_NOISE_SD: f32 = 0.05;
/// Reference trajectory: burn-in, then the bins its statistics come from. 100,000 bins is
/// 1,500 Lorenz time units (hundreds of lobe switches), so the moments are stable to ~1%.
pub const REFERENCE_BURN_IN: usize = 2_000;
pub const REFERENCE_BINS: usize = 100_000;
/// A trial starts at a random reference state, perturbed, then burns in this many bins, so
/// it is back on the attractor and has forgotten the perturbation's direction.
pub const TRIAL_BURN_IN: usize = 1_000;
/// Standard deviation of the start perturbation, in system units.
const START_JITTER: f64 = 0.1;
const MAX_BEHAVIOR_DIMS: usize = 1 << 16;

#[derive(Clone, Debug, PartialEq)]
pub struct SimConfig {
    pub system: System,
    pub neurons: usize,
    pub seed: u64,
    pub trial_seed: u64,
    pub behavior_dims: usize,
    /// Bin width in seconds (recorded in the dataset; the systems' time per bin is fixed).
    pub dt: f32,
    /// How the neurons' tuning changes during the session (none by default).
    pub drift: Drift,
}

/// A rig that changes under the decoder, so that recalibration can be measured: the neural
/// tuning turns slowly, or changes at once at `step_at_seconds` (the tuning turns by
/// `step_rotate_degrees`, the first `step_dead_channels` go silent, the first
/// `step_swap_channels` pairs of channels j and j + k swap). Behaviour (the intended
/// movement) is unaffected: only what the neurons say about it changes.
///
/// Turning the tuning rotates the standardised latent the rates are read from, in the
/// plane of its first two dimensions, by `drift_degrees_per_minute` of session time plus the
/// step's angle once it happened.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Drift {
    pub drift_degrees_per_minute: f64,
    pub step_at_seconds: Option<f64>,
    pub step_rotate_degrees: f64,
    pub step_dead_channels: usize,
    pub step_swap_channels: usize,
}

impl Drift {
    pub fn is_none(&self) -> bool {
        self.drift_degrees_per_minute == 0.0 && self.step_at_seconds.is_none()
    }
}

impl SimConfig {
    /// A config with the default behaviour dims and bin width.
    pub fn new(system: System, neurons: usize, seed: u64, trial_seed: u64) -> Self {
        SimConfig {
            system,
            neurons,
            seed,
            trial_seed,
            behavior_dims: DEFAULT_BEHAVIOR_DIMS,
            dt: DEFAULT_DT,
            drift: Drift::default(),
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.neurons == 0 {
            return Err("a rig needs at least 1 neuron".into());
        }
        if self.neurons > MAX_NEURONS {
            return Err(format!("{} neurons is more than the simulator supports ({MAX_NEURONS})", self.neurons));
        }
        if self.behavior_dims > MAX_BEHAVIOR_DIMS {
            return Err(format!("{} behaviour dims is more than {MAX_BEHAVIOR_DIMS}", self.behavior_dims));
        }
        if !(self.dt.is_finite() && self.dt > 0.0) {
            return Err(format!("bin width dt must be a positive number of seconds, got {}", self.dt));
        }
        let d = &self.drift;
        if !d.drift_degrees_per_minute.is_finite() || !d.step_rotate_degrees.is_finite() {
            return Err("drift angles must be finite".into());
        }
        if d.step_at_seconds.is_some_and(|t| !(t.is_finite() && t >= 0.0)) {
            return Err("step_at_seconds must be a time >= 0".into());
        }
        if d.step_dead_channels > self.neurons || 2 * d.step_swap_channels > self.neurons {
            return Err(format!(
                "a step of {} dead and {} swapped pairs needs more than {} channels",
                d.step_dead_channels, d.step_swap_channels, self.neurons
            ));
        }
        Ok(())
    }
}

/// A streaming synthetic rig: one call to [`SimRig::next_bin`] per bin.
#[derive(Clone, Debug)]
pub struct SimRig {
    cfg: SimConfig,
    dims: usize,
    /// Readout W, L_true x N row-major, U(-0.5, 0.5).
    readout: Vec<f32>,
    /// W with each column divided by its drive's reference s.d.: rates = exp(l W~).
    scaled_readout: Vec<f32>,
    /// Behaviour map B, D x L_true row-major.
    behavior_map: Vec<f32>,
    mean: State,
    sd: State,
    state: State,
    bin: u64,
    /// Scratch for the behaviour noise (the only per-bin buffer whose size is not fixed).
    noise: Vec<f32>,
}

/// Reference moments of the raw latent.
struct Reference {
    mean: State,
    cov: [[f64; 4]; 4],
}

impl SimRig {
    pub fn new(cfg: &SimConfig) -> Result<SimRig, String> {
        cfg.validate()?;
        let (system, n, d) = (cfg.system, cfg.neurons, cfg.behavior_dims);
        let l = system.latent_dims();

        let mut u = Uniforms::new(cfg.seed, SETUP_STEP, SAMPLE_READOUT);
        let readout: Vec<f32> = (0..l * n).map(|_| (u.next_f64() - 0.5) as f32).collect();
        let mut behavior_map = vec![0.0f32; d * l];
        Normals::new(cfg.seed).fill(SETUP_STEP, Purpose::Sim, SAMPLE_BEHAVIOR_MAP, &mut behavior_map);
        let scale = (1.0 / l as f32).sqrt();
        behavior_map.iter_mut().for_each(|b| *b *= scale);

        // Where the trial starts: a uniformly chosen reference state (so, on the attractor).
        let draw = Uniforms::new(cfg.trial_seed, SETUP_STEP, SAMPLE_TRIAL_INDEX).next_u32() as u64;
        let start_index = ((draw * REFERENCE_BINS as u64) >> 32) as usize;
        let (reference, mut state) = reference(system, cfg.seed, start_index);

        let mut sd = [1.0; 4];
        for (i, s) in sd.iter_mut().enumerate().take(l) {
            // A zero variance cannot happen on these attractors; the guard keeps a degenerate
            // system from dividing by zero.
            *s = reference.cov[i][i].sqrt().max(1e-12);
        }
        let mut scaled_readout = readout.clone();
        for j in 0..n {
            // var(l w_j) = w_j' C w_j, C the correlation matrix of the standardised latent.
            let mut var = 0.0f64;
            for a in 0..l {
                for b in 0..l {
                    let c = reference.cov[a][b] / (sd[a] * sd[b]);
                    var += readout[a * n + j] as f64 * c * readout[b * n + j] as f64;
                }
            }
            let s = var.sqrt().max(1e-12);
            for a in 0..l {
                scaled_readout[a * n + j] = (readout[a * n + j] as f64 / s) as f32;
            }
        }

        if system == System::Linear {
            // Exact stationary draw: N(0, I).
            let mut e = [0.0f32; 4];
            Normals::new(cfg.trial_seed).fill(SETUP_STEP, Purpose::Sim, SAMPLE_TRIAL_START, &mut e);
            state = e.map(|v| v as f64);
        } else {
            jitter(&mut state, cfg.trial_seed, SAMPLE_TRIAL_START);
            for _ in 0..TRIAL_BURN_IN {
                systems::flow_bin(system, &mut state);
            }
        }

        Ok(SimRig {
            cfg: cfg.clone(),
            dims: l,
            readout,
            scaled_readout,
            behavior_map,
            mean: reference.mean,
            sd,
            state,
            bin: 0,
            noise: vec![0.0; d],
        })
    }

    pub fn config(&self) -> &SimConfig {
        &self.cfg
    }
    pub fn channels(&self) -> usize {
        self.cfg.neurons
    }
    pub fn latent_dims(&self) -> usize {
        self.dims
    }
    pub fn behavior_dims(&self) -> usize {
        self.cfg.behavior_dims
    }
    /// Bins emitted so far.
    pub fn bins_done(&self) -> u64 {
        self.bin
    }
    /// The readout W (L_true x N, row-major), a function of `seed` only.
    pub fn readout(&self) -> &[f32] {
        &self.readout
    }
    /// The behaviour map B (D x L_true, row-major), a function of `seed` only.
    pub fn behavior_map(&self) -> &[f32] {
        &self.behavior_map
    }
    /// Reference mean and s.d. of the raw latent, per dimension (`seed` only).
    pub fn latent_standardisation(&self) -> (&[f64], &[f64]) {
        (&self.mean[..self.dims], &self.sd[..self.dims])
    }

    /// True rates (expected counts per bin) for a standardised latent: exactly what
    /// `next_bin` writes, so `rates` in a dataset are this function of its `latents`.
    pub fn rates_from_latents(&self, latent: &[f32], rates: &mut [f32]) {
        assert_eq!(latent.len(), self.dims, "latent length");
        assert_eq!(rates.len(), self.cfg.neurons, "rates length");
        let n = self.cfg.neurons;
        rates.fill(0.0);
        for (a, &la) in latent.iter().enumerate() {
            for (r, &w) in rates.iter_mut().zip(&self.scaled_readout[a * n..(a + 1) * n]) {
                *r = la.mul_add(w, *r);
            }
        }
        for r in rates.iter_mut() {
            *r = r.exp();
        }
    }

    /// Advances one bin and writes its spike counts (N), true rates (N, expected counts per
    /// bin), standardised true latent (L_true) and behaviour (D). Allocates nothing.
    ///
    /// # Panics
    /// If a slice has the wrong length (a caller bug, not bad data).
    pub fn next_bin(&mut self, spikes: &mut [f32], rates: &mut [f32], latents: &mut [f32], behavior: &mut [f32]) {
        assert_eq!(spikes.len(), self.cfg.neurons, "spikes length");
        assert_eq!(rates.len(), self.cfg.neurons, "rates length");
        assert_eq!(latents.len(), self.dims, "latents length");
        assert_eq!(behavior.len(), self.cfg.behavior_dims, "behaviour length");
        let t = self.bin;
        match self.cfg.system {
            System::Linear => {
                let mut e = [0.0f32; 4];
                Normals::new(self.cfg.trial_seed).fill(t, Purpose::Sim, SAMPLE_PROCESS_NOISE, &mut e);
                systems::linear_bin(&mut self.state, &e);
            }
            system => systems::flow_bin(system, &mut self.state),
        }
        for (i, l) in latents.iter_mut().enumerate() {
            *l = ((self.state[i] - self.mean[i]) / self.sd[i]) as f32;
        }
        self.apply_drift(latents, rates);
        for (j, (s, &r)) in spikes.iter_mut().zip(rates.iter()).enumerate() {
            let mut u = Uniforms::new(self.cfg.trial_seed, t, j as u32);
            *s = poisson(r as f64, &mut || u.next_f64()) as f32;
        }
        if !behavior.is_empty() {
            Normals::new(self.cfg.trial_seed).fill(t, Purpose::Sim, SAMPLE_BEHAVIOR_NOISE, &mut self.noise);
            for (k, (b, &e)) in behavior.iter_mut().zip(&self.noise).enumerate() {
                let row = &self.behavior_map[k * self.dims..(k + 1) * self.dims];
                *b = row.iter().zip(latents.iter()).fold(BEHAVIOR_NOISE_SD * e, |acc, (&m, &l)| m.mul_add(l, acc));
            }
        }
        self.bin += 1;
    }

    /// The rates of this bin under the configured drift (see [`Drift`]).
    fn apply_drift(&self, latents: &[f32], rates: &mut [f32]) {
        let d = &self.cfg.drift;
        if d.is_none() {
            self.rates_from_latents(latents, rates);
            return;
        }
        let t = self.bin as f64 * self.cfg.dt as f64;
        // The step's bin, rounded (0.02 s as f32 times 50 bins is just under 1 s).
        let stepped = d.step_at_seconds.is_some_and(|s| self.bin >= (s / self.cfg.dt as f64).round() as u64);
        let degrees = d.drift_degrees_per_minute * t / 60.0 + if stepped { d.step_rotate_degrees } else { 0.0 };
        let mut seen = [0.0f32; 4];
        let l = latents.len();
        seen[..l].copy_from_slice(latents);
        if degrees != 0.0 && l >= 2 {
            let (s, c) = degrees.to_radians().sin_cos();
            let (a, b) = (latents[0] as f64, latents[1] as f64);
            seen[0] = (c * a - s * b) as f32;
            seen[1] = (s * a + c * b) as f32;
        }
        self.rates_from_latents(&seen[..l], rates);
        if stepped {
            let k = d.step_swap_channels;
            for j in 0..k {
                rates.swap(j, j + k);
            }
            rates[..d.step_dead_channels].fill(0.0);
        }
    }

    /// The next `bins` bins as a dataset (spikes, behaviour unless D = 0, latents, rates, dt).
    pub fn collect(&mut self, bins: usize) -> Dataset {
        let (n, l, d) = (self.channels(), self.latent_dims(), self.behavior_dims());
        let mut spikes = Array2::zeros(bins, n);
        let mut rates = Array2::zeros(bins, n);
        let mut latents = Array2::zeros(bins, l);
        let mut behavior = Array2::zeros(bins, d);
        for t in 0..bins {
            self.next_bin(spikes.row_mut(t), rates.row_mut(t), latents.row_mut(t), behavior.row_mut(t));
        }
        Dataset {
            spikes,
            behavior: (d > 0).then_some(behavior),
            dt: self.cfg.dt,
            latents: Some(latents),
            rates: Some(rates),
            trial_starts: None,
        }
    }
}

/// The reference moments of `system` under `seed`, and the reference state at bin
/// `start_index` (where a trial starts).
fn reference(system: System, seed: u64, start_index: usize) -> (Reference, State) {
    if system == System::Linear {
        let mut cov = [[0.0; 4]; 4];
        (0..4).for_each(|i| cov[i][i] = 1.0);
        return (Reference { mean: [0.0; 4], cov }, [0.0; 4]);
    }
    let mut x = system.canonical_start();
    jitter(&mut x, seed, SAMPLE_REFERENCE_START);
    for _ in 0..REFERENCE_BURN_IN {
        systems::flow_bin(system, &mut x);
    }
    // Raw moments in f64: over 100,000 bins the cancellation in E[x x'] - mu mu' costs about
    // one digit (Lorenz z: mean 23.5, s.d. 8.6), leaving ~14.
    let mut sum = [0.0f64; 3];
    let mut outer = [[0.0f64; 3]; 3];
    let mut start = x;
    for k in 0..REFERENCE_BINS {
        systems::flow_bin(system, &mut x);
        if k == start_index {
            start = x;
        }
        for i in 0..3 {
            sum[i] += x[i];
            for j in 0..3 {
                outer[i][j] += x[i] * x[j];
            }
        }
    }
    // Lorenz and Arneodo switch sides irregularly (Arneodo dwells long enough that a
    // 100,000-bin mean of x is off by ~0.15 s.d.). Averaging with the mirror trajectory
    // makes the moments those of the symmetric invariant measure, exactly zero where
    // symmetry says so, which also keeps the statistics independent of which side the
    // reference run happened to favour.
    let signs = system.mirror();
    let sym = |i: usize, j: usize| signs.map_or(1.0, |s| 0.5 * (1.0 + s[i] * s[j]));
    let m = REFERENCE_BINS as f64;
    let mut mean = [0.0; 4];
    let mut cov = [[0.0; 4]; 4];
    for i in 0..3 {
        mean[i] = signs.map_or(1.0, |s| 0.5 * (1.0 + s[i])) * sum[i] / m;
    }
    for i in 0..3 {
        for j in 0..3 {
            cov[i][j] = sym(i, j) * outer[i][j] / m - mean[i] * mean[j];
        }
    }
    (Reference { mean, cov }, start)
}

/// Moves a flow's state by N(0, START_JITTER^2) per coordinate, from the setup stream
/// (key, sample).
fn jitter(x: &mut State, key: u64, sample: u32) {
    let mut e = [0.0f32; 3];
    Normals::new(key).fill(SETUP_STEP, Purpose::Sim, sample, &mut e);
    for (xi, ei) in x.iter_mut().zip(e) {
        *xi += START_JITTER * ei as f64;
    }
}

/// `bins` bins of a fresh rig, or why the config is invalid.
pub fn simulate(cfg: &SimConfig, bins: usize) -> Result<Dataset, String> {
    Ok(SimRig::new(cfg)?.collect(bins))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation_names_the_problem() {
        let ok = SimConfig::new(System::Lorenz, 5, 1, 2);
        assert!(SimRig::new(&ok).is_ok());
        let e = SimRig::new(&SimConfig { neurons: 0, ..ok.clone() }).unwrap_err();
        assert!(e.contains("at least 1 neuron"), "{e}");
        let e = SimRig::new(&SimConfig { dt: 0.0, ..ok.clone() }).unwrap_err();
        assert!(e.contains("dt"), "{e}");
        let e = SimRig::new(&SimConfig { dt: f32::NAN, ..ok.clone() }).unwrap_err();
        assert!(e.contains("dt"), "{e}");
        assert!(simulate(&SimConfig { neurons: MAX_NEURONS + 1, ..ok }, 1).is_err());
    }

    /// Many trial starts on the flows whose basins are not the whole space (Arneodo, Rossler
    /// diverge from some initial points): every start must stay on the attractor.
    #[test]
    fn trial_starts_stay_bounded() {
        for system in [System::Lorenz, System::Arneodo, System::Rossler] {
            let (reference, _) = reference(system, 3, 0);
            for trial in 0..100u64 {
                let index = (Uniforms::new(trial, SETUP_STEP, SAMPLE_TRIAL_INDEX).next_u32() as usize) % 1000;
                let mut x = reference_state(system, index);
                jitter(&mut x, trial, SAMPLE_TRIAL_START);
                for _ in 0..TRIAL_BURN_IN + 2_000 {
                    systems::flow_bin(system, &mut x);
                }
                // Rossler's z spends most time near 0 with brief excursions ~8 s.d. out; a start
                // outside the basin would be at infinity (or NaN, which fails too).
                for (i, xi) in x.iter().enumerate().take(3) {
                    let z = (xi - reference.mean[i]) / reference.cov[i][i].sqrt();
                    assert!(z.abs() < 15.0, "{system} trial {trial}: dim {i} at {z} s.d.");
                }
            }
        }
    }

    /// The reference state at `index` for seed 3, without the full 100,000-bin pass.
    fn reference_state(system: System, index: usize) -> State {
        let mut x = system.canonical_start();
        jitter(&mut x, 3, SAMPLE_REFERENCE_START);
        for _ in 0..REFERENCE_BURN_IN + index + 1 {
            systems::flow_bin(system, &mut x);
        }
        x
    }

    #[test]
    fn linear_system_is_stationary_with_unit_variance() {
        let mut rig = SimRig::new(&SimConfig::new(System::Linear, 3, 9, 10)).unwrap();
        let t = 200_000;
        let (mut s1, mut s2) = ([0.0f64; 4], [0.0f64; 4]);
        let (mut sp, mut r, mut l, mut b) = (vec![0.0; 3], vec![0.0; 3], vec![0.0; 4], vec![0.0; 2]);
        for _ in 0..t {
            rig.next_bin(&mut sp, &mut r, &mut l, &mut b);
            for i in 0..4 {
                s1[i] += l[i] as f64;
                s2[i] += (l[i] as f64).powi(2);
            }
        }
        // Autocorrelated samples: the slow block (rho 0.98) has an integrated
        // autocorrelation time (1 + rho^2 cos)/(1 - ...) of at most (1+rho)/(1-rho) = 99 bins,
        // so the effective sample size is >= 2,000: s.e. of the mean <= 0.022, of the
        // variance <= 0.032.
        for i in 0..4 {
            let mean = s1[i] / t as f64;
            let var = s2[i] / t as f64 - mean * mean;
            assert!(mean.abs() < 0.1, "dim {i}: mean {mean}");
            assert!((var - 1.0).abs() < 0.15, "dim {i}: variance {var}");
        }
    }
}
