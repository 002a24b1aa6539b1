//! Fitting, offline (f64, allocating freely; nothing here runs per bin).
//!
//! - [`linreg`]: least squares / ridge regression with an optional intercept: the one
//!   mechanism behind the Kalman fit, the state R^2 affine map and behaviour readouts;
//! - [`kalman`]: the least-squares fit of the Kalman-filter decoder (ALGORITHM.md section 7);
//! - [`xfads`]: training of the nonlinear latent-dynamics model (section 6);
//! - [`readout`]: the behaviour readout of a model that has none (an imported XFADS
//!   model), or a fresh one on a new calibration block.

pub mod kalman;
pub mod linreg;
pub mod readout;
pub mod xfads;
