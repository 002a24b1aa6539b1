//! Accuracy measures (ALGORITHM.md section 8). Inputs are T x columns arrays (rows are time
//! bins, as in [`crate::data`]); sums run in f64.
//!
//! Degenerate inputs, the same rule everywhere: a column whose true values are all equal has
//! no variance to explain, so it is left out of R^2 averages (sklearn's `r2_score` does the
//! same for `variance_weighted`); when every column is left out the result is NaN. Arrays
//! whose shapes differ are a programming error and panic. A NaN in a prediction or a target
//! gives NaN (except in `bits_per_spike`, where a NaN spike count masks its entry, as NLB
//! does).

use crate::data::Array2;
use crate::fit::linreg::lstsq_relative;

/// Rates at or below this are raised to it before taking a log: NLB's floor for zero rates
/// (nlb_tools `neg_log_likelihood` replaces 0 by 1e-9). Here it also guards negative
/// rates, which a linear rate model can produce, instead of returning NaN.
pub const RATE_FLOOR: f64 = 1e-9;

fn same_shape(a: &Array2, b: &Array2, what: &str) {
    assert!(
        a.rows == b.rows && a.cols == b.cols,
        "{what}: shapes differ ({} x {} vs {} x {})",
        a.rows,
        a.cols,
        b.rows,
        b.cols
    );
}

/// Poisson NLL without the `lnGamma(n+1)` term: `r - n ln r`, with r floored at
/// [`RATE_FLOOR`] (a NaN rate stays NaN).
fn nll_term(r: f64, n: f64) -> f64 {
    let r = if r.is_nan() || r > RATE_FLOOR { r } else { RATE_FLOOR };
    r - n * r.ln()
}

/// Bits per spike (NLB): `(NLL(null) - NLL(model)) / (total spikes * ln 2)` with
/// `NLL(r, n) = sum(r - n ln r + lnGamma(n+1))` and the null model predicting each neuron's
/// mean count over the bins. `pred_rates` are expected counts per bin (not Hz).
///
/// - The `lnGamma(n+1)` terms are the same in both NLLs and cancel, so they are not computed.
/// - Rates `<= RATE_FLOOR` (zero or negative) are raised to [`RATE_FLOOR`]; a neuron with no
///   spikes has a null rate of 0, floored the same way (as NLB does).
/// - An entry whose spike count is NaN is left out of every sum and of the null mean (NLB's
///   mask for held-out or missing data).
/// - No spikes at all, or a NaN rate where the count is not masked: NaN.
///
/// A perfect model of Poisson data scores > 0; the null model itself scores exactly 0.
pub fn bits_per_spike(pred_rates: &Array2, spikes: &Array2) -> f64 {
    same_shape(pred_rates, spikes, "bits_per_spike");
    let (t, n) = (spikes.rows, spikes.cols);
    let mut null = vec![0.0f64; n];
    let mut count = vec![0usize; n];
    for i in 0..t {
        for (j, &s) in spikes.row(i).iter().enumerate() {
            if !s.is_nan() {
                null[j] += s as f64;
                count[j] += 1;
            }
        }
    }
    let total: f64 = null.iter().sum();
    null.iter_mut().zip(&count).for_each(|(m, &c)| *m /= c.max(1) as f64);
    let (mut nll_model, mut nll_null) = (0.0f64, 0.0f64);
    for i in 0..t {
        for (j, (&r, &s)) in pred_rates.row(i).iter().zip(spikes.row(i)).enumerate() {
            if s.is_nan() {
                continue;
            }
            nll_model += nll_term(r as f64, s as f64);
            nll_null += nll_term(null[j], s as f64);
        }
    }
    (nll_null - nll_model) / (total * std::f64::consts::LN_2)
}

/// Per column: (SSE, SST), or None for a constant truth column.
fn column_sums(pred: &Array2, truth: &Array2) -> Vec<Option<(f64, f64)>> {
    let (t, c) = (truth.rows, truth.cols);
    (0..c)
        .map(|j| {
            let col = || (0..t).map(|i| truth.data[i * c + j]);
            let first = truth.data.get(j).copied();
            if col().all(|v| Some(v) == first) && first.is_some_and(|v| !v.is_nan()) {
                return None;
            }
            let mean = col().map(|v| v as f64).sum::<f64>() / t as f64;
            let (mut sse, mut sst) = (0.0, 0.0);
            for i in 0..t {
                let (y, p) = (truth.data[i * c + j] as f64, pred.data[i * c + j] as f64);
                sse += (y - p) * (y - p);
                sst += (y - mean) * (y - mean);
            }
            Some((sse, sst))
        })
        .collect()
}

fn mean_r2(sums: &[Option<(f64, f64)>]) -> f64 {
    let r2: Vec<f64> = sums.iter().flatten().map(|(sse, sst)| 1.0 - sse / sst).collect();
    if r2.is_empty() {
        f64::NAN
    } else {
        r2.iter().sum::<f64>() / r2.len() as f64
    }
}

/// Rate R^2: `1 - SSE/SST` per neuron (column), then the mean over neurons; constant true
/// columns are left out (NaN if all are, or if there are no rows).
pub fn rate_r2(pred: &Array2, truth: &Array2) -> f64 {
    same_shape(pred, truth, "rate_r2");
    mean_r2(&column_sums(pred, truth))
}

/// Behaviour R^2, variance-weighted over output dims (FALCON; sklearn
/// `r2_score(truth, pred, multioutput="variance_weighted")`):
/// `1 - sum_dims SSE / sum_dims SST`, over the dims whose truth is not constant (NaN if none).
pub fn behavior_r2(pred: &Array2, truth: &Array2) -> f64 {
    same_shape(pred, truth, "behavior_r2");
    let (sse, sst) = column_sums(pred, truth).iter().flatten().fold((0.0, 0.0), |(a, b), (e, s)| (a + e, b + s));
    if sst > 0.0 {
        1.0 - sse / sst
    } else {
        f64::NAN
    }
}

/// Relative ridge of the state R^2 map: small enough to change no digit that matters, and
/// it makes constant or duplicated true latents harmless (the minimum-norm solution).
pub const STATE_R2_RIDGE: f64 = 1e-9;

/// State R^2 (Sedler et al.): the affine least-squares map FROM the true latents TO the
/// inferred ones, `inferred ≈ W true + b`, fitted and scored on these bins; `1 - SSE/SST`
/// per inferred dim, averaged over the inferred dims. An inferred dim that the true latents
/// do not explain scores about 0 and pulls the mean down (spurious dims are penalised); a
/// constant inferred dim is left out (NaN if all are). The map uses a relative ridge of
/// [`STATE_R2_RIDGE`] (see [`lstsq_relative`]), so it never fails on degenerate latents;
/// a non-finite value in either input, or no rows, gives NaN.
///
/// # Panics
/// If the row counts differ.
pub fn state_r2(true_latents: &Array2, inferred: &Array2) -> f64 {
    assert_eq!(
        true_latents.rows, inferred.rows,
        "state_r2: true latents have {} rows, inferred {}",
        true_latents.rows, inferred.rows
    );
    match lstsq_relative(true_latents, inferred, STATE_R2_RIDGE, true) {
        Ok(map) => mean_r2(&column_sums(&map.predict_array(true_latents), inferred)),
        // Only non-finite values or no rows: with a positive ridge the fit cannot fail.
        Err(_) => f64::NAN,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_model_scores_zero_and_floors_apply() {
        // Neuron 0 counts [1, 3] (mean 2), neuron 1 silent: predicting the null gives 0 bits.
        let spikes = Array2::new(2, 2, vec![1., 0., 3., 0.]);
        let null = Array2::new(2, 2, vec![2., 0., 2., 0.]);
        assert_eq!(bits_per_spike(&null, &spikes), 0.0);
        // A negative rate for the silent neuron is floored: r - 0 ln r = 1e-9, as the null.
        let neg = Array2::new(2, 2, vec![2., -5., 2., -5.]);
        assert_eq!(bits_per_spike(&neg, &spikes), 0.0);
        // No spikes at all: NaN.
        let zero = Array2::new(1, 2, vec![0., 0.]);
        assert!(bits_per_spike(&zero, &zero).is_nan());
        // A NaN rate is not floored away.
        let nan = Array2::new(2, 2, vec![2., f32::NAN, 2., 0.]);
        assert!(bits_per_spike(&nan, &spikes).is_nan());
        // state R^2 of non-finite or empty inputs.
        let z = Array2::new(2, 1, vec![1., f32::INFINITY]);
        assert!(state_r2(&z, &Array2::new(2, 1, vec![1., 2.])).is_nan());
        assert!(state_r2(&Array2::zeros(0, 1), &Array2::zeros(0, 1)).is_nan());
    }
}
