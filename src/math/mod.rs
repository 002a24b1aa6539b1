//! Numerical building blocks of the per-bin path: all f32, all allocation-free.

pub mod chol;
pub mod fast;
pub mod gemm;
pub mod philox;
