//! Branch-free f32 elementary functions for the per-bin path.
//!
//! libm's `tanhf` costs ~12 ns a call and a standard-size step needs 8,192 of them, more than
//! all of its matrix products together. These forms vectorise and have error bounds that the
//! tests below check against f64 on dense grids. The CUDA kernels evaluate the very same
//! polynomials in the same order (with explicit FMAs), so both backends agree to rounding.

/// Numerator of tanh(x) = x P(x^2) / Q(x^2) on |x| <= 9, coefficients of P in ascending
/// powers of x^2. Fitted for this crate by an iterated linear-programming minimax on the
/// relative error (see docs/ARCHITECTURE.md); in f32 with FMA Horner the result is within
/// [`TANH_REL_ERR`] of tanh.
pub const TANH_P: [f32; 7] =
    [1.0, 0.130_754_77, 0.003_094_597, 1.106_228_5e-5, -1.988_787_6e-8, 5.133_627e-11, -8.158_175e-14];
/// Denominator of the tanh rational form, ascending powers of x^2.
pub const TANH_Q: [f32; 4] = [1.0, 0.464_088_08, 0.024_457_397, 2.532_853e-4];
/// Beyond this |x| f32 tanh rounds to +-1.
pub const TANH_CLAMP: f32 = 9.0;
/// Proven by the test `tanh_error_bound` over every f32 step of a dense grid.
pub const TANH_REL_ERR: f64 = 4.0e-7;

/// tanh, relative error <= [`TANH_REL_ERR`], |result| <= 1.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let x = x.clamp(-TANH_CLAMP, TANH_CLAMP);
    let t = x * x;
    let mut p = TANH_P[6];
    p = p.mul_add(t, TANH_P[5]);
    p = p.mul_add(t, TANH_P[4]);
    p = p.mul_add(t, TANH_P[3]);
    p = p.mul_add(t, TANH_P[2]);
    p = p.mul_add(t, TANH_P[1]);
    p = p.mul_add(t, TANH_P[0]);
    let mut q = TANH_Q[3];
    q = q.mul_add(t, TANH_Q[2]);
    q = q.mul_add(t, TANH_Q[1]);
    q = q.mul_add(t, TANH_Q[0]);
    ((x * p) / q).clamp(-1.0, 1.0)
}

/// Logistic sigmoid through the identity sigmoid(x) = (1 + tanh(x/2)) / 2, so it inherits
/// tanh's bound (absolute error <= TANH_REL_ERR / 2).
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    0.5f32.mul_add(tanh(0.5 * x), 0.5)
}

/// SiLU (x * sigmoid(x)), the XFADS encoder's activation.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

super::avx512_twin! {
    /// x = tanh(x + b) for every row of the row-major `x` (rows of b.len()).
    pub fn tanh_bias_rows(x: &mut [f32], b: &[f32]) {
        for row in x.chunks_exact_mut(b.len()) {
            for (v, bi) in row.iter_mut().zip(b) {
                *v = tanh(*v + bi);
            }
        }
    }
}

super::avx512_twin! {
    /// Applies `silu` to every element.
    pub fn silu_inplace(v: &mut [f32]) {
        for x in v {
            *x = silu(*x);
        }
    }
}

pub(crate) const LN2: f32 = std::f32::consts::LN_2;

/// Natural log of a positive, normal f32. m in [sqrt(1/2), sqrt(2)) and
/// ln m = 2 atanh(s), s = (m-1)/(m+1), |s| < 0.172: the series to s^9 leaves < 1e-9.
#[inline(always)]
pub fn ln(u: f32) -> f32 {
    let bits = u.to_bits();
    let mut e = ((bits >> 23) & 0xff) as i32 - 127;
    let mut m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000);
    let big = m > std::f32::consts::SQRT_2;
    m = if big { m * 0.5 } else { m };
    e += big as i32;
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let mut p = 1.0f32 / 9.0;
    p = p.mul_add(s2, 1.0 / 7.0);
    p = p.mul_add(s2, 1.0 / 5.0);
    p = p.mul_add(s2, 1.0 / 3.0);
    p = p.mul_add(s2, 1.0);
    (e as f32).mul_add(LN2, 2.0 * s * p)
}

/// Taylor coefficients 1/k! of e^r, k = 0..7, for |r| <= ln2/2 (truncation < 1e-8 relative).
const EXP_C: [f32; 8] = [1.0, 1.0, 0.5, 1.0 / 6.0, 1.0 / 24.0, 1.0 / 120.0, 1.0 / 720.0, 1.0 / 5040.0];
/// ln 2 split so that n * LN2_HI is exact for |n| <= 150.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;

/// e^x, within [`EXP_REL_ERR`] of the exact value where that is a normal f32; inf from
/// x > 88.72, subnormals below -87.3, 0 below -103.9; NaN stays NaN. Written out rather than
/// taken from libm so that the CUDA kernels (`ll_exp`) evaluate the same operations and the
/// two backends agree to the bit (glibc's and CUDA's expf differ in the last bit now and
/// then, and the Poisson-Laplace update feeds the rate back into the state).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-104.0, 89.0);
    // x = n ln2 + r, |r| <= ln2/2 (a hair more where x * log2(e) rounds).
    let nf = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = (-nf).mul_add(LN2_HI, x);
    let r = (-nf).mul_add(LN2_LO, r);
    let mut p = EXP_C[7];
    for c in EXP_C[..7].iter().rev() {
        p = p.mul_add(r, *c);
    }
    // 2^n as two normal powers of two (n in [-150, 128]): exact scaling, and overflow or
    // gradual underflow happens in the last product only.
    let n = nf as i32;
    let (n1, n2) = (n >> 1, n - (n >> 1));
    let pow2 = |k: i32| f32::from_bits(((k + 127) as u32) << 23);
    p * pow2(n1) * pow2(n2)
}

/// Checked by the test `exp_error_bound` on a dense grid (worst seen: 7.7e-8, about one ulp).
pub const EXP_REL_ERR: f64 = 1.2e-7;

/// (cos 2 pi u, sin 2 pi u) for u in [0, 1): quadrant from u itself (no large-argument
/// reduction), then Taylor series on [-pi/4, pi/4] (truncation < 2e-9).
#[inline(always)]
pub fn sincos_2pi(u: f32) -> (f32, f32) {
    // The quadrant stays a float: Rust's saturating f32 -> i32 cast is scalar code.
    let qf = (4.0 * u + 0.5).floor();
    let x = (u - 0.25 * qf) * std::f32::consts::TAU;
    let x2 = x * x;
    let mut s = 1.0f32 / 362_880.0;
    s = s.mul_add(x2, -1.0 / 5040.0);
    s = s.mul_add(x2, 1.0 / 120.0);
    s = s.mul_add(x2, -1.0 / 6.0);
    s = (s * x2).mul_add(x, x);
    let mut c = -1.0f32 / 3_628_800.0;
    c = c.mul_add(x2, 1.0 / 40320.0);
    c = c.mul_add(x2, -1.0 / 720.0);
    c = c.mul_add(x2, 1.0 / 24.0);
    c = c.mul_add(x2, -0.5);
    c = c.mul_add(x2, 1.0);
    // Rotate by q = qf mod 4 quarter turns.
    let q = qf - 4.0 * (0.25 * qf).floor();
    let (cs, sn) = if q == 1.0 || q == 3.0 { (s, c) } else { (c, s) };
    let cos_neg = q == 1.0 || q == 2.0;
    let sin_neg = q >= 2.0;
    (if cos_neg { -cs } else { cs }, if sin_neg { -sn } else { sn })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tanh_error_bound() {
        let mut worst = 0.0f64;
        let mut x = -12.0f32;
        while x <= 12.0 {
            let y = tanh(x) as f64;
            let r = (x as f64).tanh();
            assert!(y.abs() <= 1.0);
            if r != 0.0 {
                worst = worst.max((y - r).abs() / r.abs());
            }
            x += 1.0 / 4096.0;
        }
        // Tiny arguments, where relative error is hardest.
        for i in 0..2000 {
            let x = 10f32.powf(-30.0 + i as f32 * 0.015);
            let r = (x as f64).tanh();
            worst = worst.max((tanh(x) as f64 - r).abs() / r);
        }
        assert!(worst <= TANH_REL_ERR, "tanh relative error {worst:e}");
        assert!((tanh(f32::INFINITY) - 1.0).abs() <= 2e-7);
        assert!((tanh(-1e30) + 1.0).abs() <= 2e-7);
    }

    #[test]
    fn sigmoid_and_silu_track_exact() {
        let mut x = -20.0f32;
        while x <= 20.0 {
            let s = 1.0 / (1.0 + (-(x as f64)).exp());
            assert!((sigmoid(x) as f64 - s).abs() <= TANH_REL_ERR, "sigmoid({x})");
            assert!((silu(x) as f64 - x as f64 * s).abs() <= 1e-5 * (1.0 + x.abs() as f64));
            x += 1.0 / 512.0;
        }
    }

    #[test]
    fn exp_error_bound() {
        let mut worst = 0.0f64;
        // Every 61st f32 from -87.3 (the last normal result) to 88.72 (the last finite one).
        for (sign, end) in [(1.0f32, 88.72f32), (-1.0, 87.33)] {
            let mut b = 0u32;
            while b < end.to_bits() {
                let x = sign * f32::from_bits(b);
                let r = (x as f64).exp();
                worst = worst.max((exp(x) as f64 - r).abs() / r);
                b += 61;
            }
        }
        assert!(worst < EXP_REL_ERR, "exp error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert_eq!(exp(1e30), f32::INFINITY);
        assert_eq!(exp(-200.0), 0.0);
        assert!(exp(f32::NAN).is_nan());
        // Gradual underflow: within one subnormal step of the exact value.
        for x in [-88.0f32, -95.0, -100.0, -103.0] {
            let r = (x as f64).exp();
            assert!((exp(x) as f64 - r).abs() <= 1.5 * 2f64.powi(-149), "exp({x}) = {:e} vs {r:e}", exp(x));
        }
    }

    #[test]
    fn ln_matches_f64_over_the_unit_interval() {
        let mut worst = 0.0f64;
        // Every 97th f32 in (0, 1) from 2^-25 up: covers all exponents and mantissas.
        let mut b = (2.0f32).powi(-25).to_bits();
        while b < 1.0f32.to_bits() {
            let u = f32::from_bits(b);
            let r = (u as f64).ln();
            worst = worst.max((ln(u) as f64 - r).abs() / r.abs().max(1.0));
            b += 97;
        }
        assert!(worst < 3e-7, "ln error {worst:e}");
    }

    #[test]
    fn sincos_matches_f64() {
        let mut worst = 0.0f64;
        for i in 0..(1 << 20) {
            let u = i as f32 / (1 << 20) as f32;
            let (c, s) = sincos_2pi(u);
            let a = std::f64::consts::TAU * u as f64;
            worst = worst.max((c as f64 - a.cos()).abs()).max((s as f64 - a.sin()).abs());
        }
        assert!(worst < 5e-7, "sincos error {worst:e}");
    }
}
