//! Exact Poisson draws from a uniform source.
//!
//! Means below 10: sequential inversion (one uniform, about mean + 1 comparisons). From 10 on:
//! PTRS, Hormann's transformed rejection with squeeze ("The transformed rejection method for
//! generating Poisson random variables", Insurance: Mathematics and Economics 12, 1993),
//! about 2.3 uniforms per draw whatever the mean. Both are exact up to f64 rounding.

const PTRS_FROM: f64 = 10.0;

/// One Poisson(mean) draw. `uniform` must return values in the open interval (0, 1).
/// A mean that is not positive (or NaN) gives 0.
pub fn poisson(mean: f64, uniform: &mut impl FnMut() -> f64) -> u64 {
    if mean.is_nan() || mean <= 0.0 {
        return 0;
    }
    if mean < PTRS_FROM {
        inversion(mean, uniform)
    } else if mean < 1e15 {
        ptrs(mean, uniform)
    } else {
        // Beyond this the standard deviation is below one part in 3e7 of the mean and
        // k ln(mean) loses the digits the acceptance test needs; a count is its mean here.
        mean as u64
    }
}

fn inversion(mean: f64, uniform: &mut impl FnMut() -> f64) -> u64 {
    let u = uniform();
    let mut k = 0u64;
    let mut p = (-mean).exp();
    let mut cdf = p;
    // The cap only matters when rounding leaves the summed cdf just below u (probability
    // ~1e-16); by then the pmf is below 1e-100 for any mean under 10.
    while u > cdf && k < 200 {
        k += 1;
        p *= mean / k as f64;
        cdf += p;
    }
    k
}

fn ptrs(mean: f64, uniform: &mut impl FnMut() -> f64) -> u64 {
    let log_mean = mean.ln();
    let b = 0.931 + 2.53 * mean.sqrt();
    let a = -0.059 + 0.02483 * b;
    let inv_alpha = 1.1239 + 1.1328 / (b - 3.4);
    let v_r = 0.9277 - 3.6224 / (b - 2.0);
    loop {
        let u = uniform() - 0.5;
        let v = uniform();
        let us = 0.5 - u.abs();
        let k = ((2.0 * a / us + b) * u + mean + 0.43).floor();
        // Squeeze: the region where the hat is known to lie under the density.
        if us >= 0.07 && v <= v_r {
            return k as u64;
        }
        if k < 0.0 || (us < 0.013 && v > us) {
            continue;
        }
        if (v * inv_alpha / (a / (us * us) + b)).ln() <= -mean + k * log_mean - ln_factorial(k) {
            return k as u64;
        }
    }
}

/// ln(k!) for a non-negative integer-valued k: exact sums below 16, Stirling's series for
/// ln Gamma(k + 1) above (truncation error below 1e-14 there).
pub fn ln_factorial(k: f64) -> f64 {
    if k < 16.0 {
        let mut s = 0.0;
        let mut i = 2.0;
        while i <= k {
            s += f64::ln(i);
            i += 1.0;
        }
        return s;
    }
    let x = k + 1.0;
    let r = 1.0 / x;
    let r2 = r * r;
    let series = r * (1.0 / 12.0 - r2 * (1.0 / 360.0 - r2 * (1.0 / 1260.0 - r2 * (1.0 / 1680.0))));
    (x - 0.5) * x.ln() - x + 0.5 * (2.0 * std::f64::consts::PI).ln() + series
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::random::Uniforms;

    #[test]
    fn ln_factorial_matches_sums() {
        let mut exact = 0.0f64;
        for k in 0..400u32 {
            if k > 1 {
                exact += (k as f64).ln();
            }
            let got = ln_factorial(k as f64);
            assert!((got - exact).abs() <= 1e-12 * exact.max(1.0), "k {k}: {got} vs {exact}");
        }
    }

    fn draws(mean: f64, n: usize, seed: u64) -> Vec<u64> {
        let mut u = Uniforms::new(seed, 0, 0);
        let mut next = || u.next_f64();
        (0..n).map(|_| poisson(mean, &mut next)).collect()
    }

    /// Sample mean and variance within 5 standard errors: for Poisson(m) over n draws the
    /// mean's s.e. is sqrt(m / n) and the sample variance's is sqrt((m + 2 m^2) / n).
    #[test]
    fn mean_and_variance() {
        let n = 200_000;
        for (i, &m) in [0.01, 0.3, 1.6487, 4.0, 9.99, 10.0, 17.5, 60.0, 400.0, 1e5].iter().enumerate() {
            let x = draws(m, n, 100 + i as u64);
            let mean = x.iter().map(|&k| k as f64).sum::<f64>() / n as f64;
            let var = x.iter().map(|&k| (k as f64 - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
            let (se_mean, se_var) = ((m / n as f64).sqrt(), ((m + 2.0 * m * m) / n as f64).sqrt());
            assert!((mean - m).abs() < 5.0 * se_mean, "mean {m}: got {mean}");
            assert!((var - m).abs() < 5.0 * se_var, "mean {m}: variance {var}");
        }
    }

    /// Pearson chi-square against the exact pmf, cells with expected count >= 20 (tails
    /// merged). Under the null chi2 has mean df and s.d. sqrt(2 df); 5 s.d. is the bound.
    #[test]
    fn distribution_matches_pmf() {
        let n = 300_000usize;
        for (i, &m) in [2.5, 10.0, 33.0, 250.0].iter().enumerate() {
            let x = draws(m, n, 900 + i as u64);
            let kmax = (m + 12.0 * m.sqrt() + 20.0) as usize;
            let mut counts = vec![0f64; kmax + 1];
            for &k in &x {
                counts[(k as usize).min(kmax)] += 1.0;
            }
            let pmf: Vec<f64> =
                (0..=kmax).map(|k| (-m + k as f64 * m.ln() - ln_factorial(k as f64)).exp() * n as f64).collect();
            let (mut chi2, mut df) = (0.0, 0usize);
            let (mut obs, mut exp) = (0.0, 0.0);
            let total_exp: f64 = pmf.iter().sum();
            let mut seen_exp = 0.0;
            for k in 0..=kmax {
                obs += counts[k];
                exp += pmf[k];
                seen_exp += pmf[k];
                let rest = n as f64 - seen_exp;
                if exp >= 20.0 && rest >= 20.0 {
                    chi2 += (obs - exp).powi(2) / exp;
                    df += 1;
                    obs = 0.0;
                    exp = 0.0;
                }
            }
            // The last cell takes everything left, including mass above kmax.
            let exp_last = exp + (n as f64 - total_exp);
            chi2 += (obs - exp_last).powi(2) / exp_last;
            let df = df as f64; // cells - 1
            assert!(chi2 < df + 5.0 * (2.0 * df).sqrt(), "mean {m}: chi2 {chi2} with {df} df");
        }
    }

    #[test]
    fn degenerate_means() {
        let mut one = || 0.5;
        assert_eq!(poisson(0.0, &mut one), 0);
        assert_eq!(poisson(-3.0, &mut one), 0);
        assert_eq!(poisson(f64::NAN, &mut one), 0);
        assert_eq!(poisson(1e16, &mut one), 10_000_000_000_000_000);
        // Uniforms at the extremes of (0, 1) terminate.
        let mut hi = || 1.0 - 1e-17;
        assert!(poisson(5.0, &mut hi) <= 200);
    }
}
