//! Every metric on small examples computed by hand (the arithmetic is in the comments), plus
//! the properties the definitions promise.

use latentloop::data::Array2;
use latentloop::math::philox::philox4x32_10;
use latentloop::metrics::{behavior_r2, bits_per_spike, rate_r2, state_r2, RATE_FLOOR};

fn close(got: f64, want: f64, tol: f64) {
    assert!((got - want).abs() <= tol, "{got} vs {want}");
}

/// Two bins, two neurons. Spikes: neuron 0 [0, 2], neuron 1 [1, 1]; 4 spikes in all.
/// Null rates (per-neuron means): 1 and 1.
/// NLL without the lnGamma terms (they cancel), r - n ln r per entry:
///   null:  n0: (1 - 0) + (1 - 2 ln 1) = 2;         n1: 1 + 1 = 2;          total 4
///   model rates n0 [0.5, 2], n1 [1, 1]:
///          n0: (0.5 - 0) + (2 - 2 ln 2) = 2.5 - 2 ln 2;   n1: 2;   total 4.5 - 2 ln 2
/// bits/spike = (4 - 4.5 + 2 ln 2) / (4 ln 2) = 1/2 - 1/(8 ln 2) = 0.5 - 0.1803369 = 0.3196631
#[test]
fn bits_per_spike_hand_example() {
    let spikes = Array2::new(2, 2, vec![0., 1., 2., 1.]);
    let model = Array2::new(2, 2, vec![0.5, 1., 2., 1.]);
    let want = 0.5 - 1.0 / (8.0 * std::f64::consts::LN_2);
    close(bits_per_spike(&model, &spikes), want, 1e-12);
    close(want, 0.3196631, 1e-7);
}

/// The saturated ("perfect") model predicts each count exactly. One neuron, counts [0, 4]:
///   null rate 2:      (2 - 0) + (2 - 4 ln 2)          = 4 - 4 ln 2
///   model [0 -> 1e-9 floor, 4]: (1e-9 - 0) + (4 - 4 ln 4) = 4 - 8 ln 2 + 1e-9
///   bits/spike = (4 ln 2 - 1e-9) / (4 ln 2) = 1 - 1e-9 / (4 ln 2) = 1 - 3.6e-10
/// and the null model scores exactly 0.
#[test]
fn perfect_rate_model_versus_null() {
    let spikes = Array2::new(2, 1, vec![0., 4.]);
    let perfect = Array2::new(2, 1, vec![0., 4.]);
    close(bits_per_spike(&perfect, &spikes), 1.0 - RATE_FLOOR / (4.0 * std::f64::consts::LN_2), 1e-12);
    let null = Array2::new(2, 1, vec![2., 2.]);
    assert_eq!(bits_per_spike(&null, &spikes), 0.0);
}

/// Knuth's Poisson sampler on Philox uniforms.
fn poisson(rate: f64, ctr: u32) -> f32 {
    let limit = (-rate).exp();
    let (mut k, mut p, mut i) = (0u32, 1.0f64, 0u32);
    loop {
        let x = philox4x32_10([i, ctr, 77, 0], [5, 6]);
        for u in x {
            p *= ((u >> 8) as f64 + 0.5) / 16_777_216.0;
            if p <= limit {
                return k as f32;
            }
            k += 1;
        }
        i += 1;
    }
}

/// On Poisson data, the true rates beat the null (> 0 bits/spike) and beat a miscalibrated
/// copy. Expected value for these rates (log-rates evenly spread on [-1, 1]):
/// sum r ln(r / rbar) / (sum r ln 2) = 0.2227 bits/spike; its standard error with ~23,000
/// spikes is about sqrt(sum r ln^2(r / rbar)) / (23,000 ln 2) = 0.006, so +-0.03 is 5 s.e.
#[test]
fn true_rates_of_poisson_data_beat_null_and_wrong_rates() {
    let (t, n) = (4000, 5);
    let mut rates = Array2::zeros(t, n);
    let mut spikes = Array2::zeros(t, n);
    for i in 0..t {
        for j in 0..n {
            let r = (((i * 7 + j * 13) % 101) as f64 / 50.0 - 1.0).exp();
            rates.data[i * n + j] = r as f32;
            spikes.data[i * n + j] = poisson(r, (i * n + j) as u32);
        }
    }
    let good = bits_per_spike(&rates, &spikes);
    let wrong = Array2::new(t, n, rates.data.iter().map(|r| r * 1.5).collect());
    let bad = bits_per_spike(&wrong, &spikes);
    eprintln!("true rates: {good:.4} bits/spike, x1.5 rates: {bad:.4}");
    assert!((good - 0.2227).abs() < 0.03, "true rates: {good} bits/spike");
    assert!(bad < good, "miscalibrated {bad} vs true {good}");
}

/// NaN spike counts are masked (left out of the sums and the null mean), as NLB does.
/// Same as the hand example above with a third, masked bin: the result is unchanged.
#[test]
fn bits_per_spike_masks_nan_counts() {
    let spikes = Array2::new(3, 2, vec![0., 1., 2., 1., f32::NAN, f32::NAN]);
    let model = Array2::new(3, 2, vec![0.5, 1., 2., 1., 9., 9.]);
    close(bits_per_spike(&model, &spikes), 0.5 - 1.0 / (8.0 * std::f64::consts::LN_2), 1e-12);
}

/// Three columns over three bins:
///   col 0: truth [1, 2, 3], pred [1, 2, 4]: mean 2, SST = 1 + 0 + 1 = 2, SSE = 1 -> R^2 = 0.5
///   col 1: truth [0, 0, 3], pred [1, 1, 1]: mean 1, SST = 1 + 1 + 4 = 6, SSE = 1 + 1 + 4 = 6
///          -> R^2 = 0
///   col 2: truth [2, 2, 2] (constant): left out
/// rate R^2 = mean(0.5, 0) = 0.25; behaviour R^2 (pooled) = 1 - (1 + 6) / (2 + 6) = 0.125.
#[test]
fn r2_hand_example_uniform_versus_variance_weighted() {
    let truth = Array2::new(3, 3, vec![1., 0., 2., 2., 0., 2., 3., 3., 2.]);
    let pred = Array2::new(3, 3, vec![1., 1., 5., 2., 1., -1., 4., 1., 0.]);
    close(rate_r2(&pred, &truth), 0.25, 1e-12);
    close(behavior_r2(&pred, &truth), 0.125, 1e-12);
    // Perfect predictions: 1; predicting the mean: 0.
    close(rate_r2(&truth, &truth), 1.0, 0.0);
    let mean = Array2::new(3, 3, vec![2., 1., 2., 2., 1., 2., 2., 1., 2.]);
    close(behavior_r2(&mean, &truth), 0.0, 1e-12);
}

#[test]
fn r2_of_only_constant_columns_is_nan() {
    let truth = Array2::new(2, 2, vec![1., 5., 1., 5.]);
    let pred = Array2::new(2, 2, vec![0., 0., 0., 0.]);
    assert!(rate_r2(&pred, &truth).is_nan());
    assert!(behavior_r2(&pred, &truth).is_nan());
    let empty = Array2::new(0, 2, vec![]);
    assert!(rate_r2(&empty, &empty).is_nan());
}

#[test]
#[should_panic(expected = "shapes differ")]
fn r2_of_different_shapes_panics() {
    rate_r2(&Array2::zeros(2, 2), &Array2::zeros(2, 3));
}

/// True latent z = [0, 1, 2, 3] (one dim). Inferred:
///   dim 0 = 2 z + 1 = [1, 3, 5, 7]: the affine map is exact -> R^2 = 1
///   dim 1 = [1, -1, -1, 1]: centred z = [-1.5, -0.5, 0.5, 1.5] is orthogonal to it
///          (-1.5 + 0.5 - 0.5 + 1.5 = 0), so the fitted slope is 0 and the map predicts the
///          mean 0: SSE = SST = 4 -> R^2 = 0 (a spurious dim, penalised)
/// state R^2 = (1 + 0) / 2 = 0.5 (up to the 1e-9 relative ridge, ~1e-9).
#[test]
fn state_r2_hand_example_penalises_a_spurious_dim() {
    let z = Array2::new(4, 1, vec![0., 1., 2., 3.]);
    let inferred = Array2::new(4, 2, vec![1., 1., 3., -1., 5., -1., 7., 1.]);
    close(state_r2(&z, &inferred), 0.5, 1e-8);
    // A constant inferred dim is left out: (1) / 1.
    let with_const = Array2::new(4, 2, vec![1., 9., 3., 9., 5., 9., 7., 9.]);
    close(state_r2(&with_const.rows_range(0, 4), &with_const), 1.0, 1e-8);
    close(state_r2(&z, &with_const), 1.0, 1e-8);
}

/// An affinely transformed copy (any invertible mixing, any offset, even more inferred dims
/// than true ones) has state R^2 = 1; a constant or duplicated true latent changes nothing.
#[test]
fn state_r2_of_an_affine_copy_is_one() {
    let t = 200;
    let mut z = Array2::zeros(t, 4);
    let mut inferred = Array2::zeros(t, 3);
    for i in 0..t {
        let s = i as f32 * 0.1;
        let (a, b, c) = (s.sin() * 3.0, (1.7 * s).cos(), (0.3 * s).sin() * 0.01);
        // Column 3 duplicates column 0: collinear true latents.
        z.row_mut(i).copy_from_slice(&[a, b, c, a]);
        inferred.row_mut(i).copy_from_slice(&[2.0 * a - b + 5.0, 0.5 * b + 30.0 * c, a + b + c - 1.0]);
    }
    close(state_r2(&z, &inferred), 1.0, 1e-6);
    // Only a non-affine function of the truth: R^2 < 1.
    let sq = Array2::new(t, 1, z.data.chunks(4).map(|r| r[0] * r[0]).collect());
    let r2 = state_r2(&z, &sq);
    eprintln!("state R^2 of a squared latent: {r2}");
    assert!(r2 < 0.1);
}
