//! latentloop: a real-time closed-loop neural decoder.
//!
//! Data flow of one bin: acquire -> bin -> filter -> output. See docs/ARCHITECTURE.md.
//!
//! - [`filter`]: the causal XFADS filter step (where a bin is decoded);
//! - [`kalman`]: the classic Kalman-filter BCI decoder;
//! - [`decoder`]: the per-bin interface both implement; [`any_model`]: load a file, build its decoder;
//! - [`model`]: model files and the compiled models;
//! - [`fit`]: least squares, the Kalman fit, training;
//! - [`sim`]: synthetic rigs; [`data`]: .npz sessions; [`metrics`]: accuracy measures;
//! - [`math`]: the allocation-free numerical kernels.

pub mod any_model;
pub mod config;
pub mod data;
pub mod decoder;
pub mod error;
pub mod eval;
pub mod filter;
pub mod fit;
#[doc(hidden)]
pub mod fuzzing;
pub mod gpu;
pub mod kalman;
pub mod math;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod progress;
pub mod replay;
pub mod session;
pub mod sim;
pub mod wire;

pub use error::{Error, Result};
