//! Numerical building blocks of the per-bin path: all f32, all allocation-free.

pub mod chol;
pub mod fast;
pub mod gemm;
pub mod philox;

use std::sync::OnceLock;

/// Whether no element is NaN or infinite. An integer max over the magnitudes' bits (a
/// reduction that vectorises, unlike an early-exit search): finite values stay below the
/// exponent-all-ones pattern.
pub fn all_finite(v: &[f32]) -> bool {
    v.iter().map(|x| x.to_bits() & 0x7fff_ffff).max().unwrap_or(0) < 0x7f80_0000
}

/// Whether this CPU has AVX-512 (F, VL, DQ); checked once, then an atomic load.
pub fn has_avx512() -> bool {
    static FLAG: OnceLock<bool> = OnceLock::new();
    *FLAG.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512vl")
                && std::is_x86_feature_detected!("avx512dq")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Defines a hot elementwise function twice: as written (x86-64-v3, AVX2), and compiled for
/// AVX-512, taken at run time where the CPU has it. Same source, same arithmetic per lane:
/// the results are identical, only the vector width differs.
macro_rules! avx512_twin {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn any($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512dq")]
                unsafe fn wide($($arg: $ty),*) {
                    any($($arg),*)
                }
                if $crate::math::has_avx512() {
                    // SAFETY: the CPU reports the features `wide` was compiled for.
                    unsafe { wide($($arg),*) };
                    return;
                }
            }
            any($($arg),*)
        }
    };
}
pub(crate) use avx512_twin;

#[cfg(test)]
mod tests {
    #[test]
    fn all_finite_rejects_nan_and_infinities_only() {
        assert!(super::all_finite(&[]));
        assert!(super::all_finite(&[0.0, -0.0, f32::MAX, f32::MIN, f32::MIN_POSITIVE / 2.0, 1e-45]));
        for bad in [f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut v = vec![1.0f32; 37];
            v[29] = bad;
            assert!(!super::all_finite(&v), "{bad}");
        }
    }
}
