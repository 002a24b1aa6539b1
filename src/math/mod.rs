//! Numerical building blocks of the per-bin path: all f32, all allocation-free.

pub mod chol;
pub mod fast;
pub mod gemm;
pub mod philox;

use std::sync::OnceLock;

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
