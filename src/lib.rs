//! latentloop: a real-time closed-loop neural decoder.
//!
//! Data flow of one bin: acquire -> bin -> filter -> output. See docs/ARCHITECTURE.md.

pub mod error;
pub mod filter;
pub mod math;
pub mod model;

pub use error::{Error, Result};
