//! The classic Kalman-filter BCI decoder (Wu et al. 2006; steady-state gain as in Malik et
//! al. 2011), ALGORITHM.md section 7.
//!
//! The state is `x = [behaviour (D dims); 1]`: the constant lets C's last column hold each
//! channel's baseline and A's last column a drift. It is kept exactly constant (A's last
//! row `[0, ..., 0, 1]`, zero noise and zero prior variance), so only the D x D behaviour
//! block carries covariance.
//!
//! - [`KalmanParams`], [`KalmanModel`]: the model, its file (`kalman.*` tensors, kind
//!   `kalman`) and the steady state computed offline by iterating the Riccati recursion;
//! - [`KalmanFilter`]: the per-bin [`Decoder`](crate::decoder::Decoder), in
//!   [`KalmanMode::Exact`] or [`KalmanMode::SteadyState`] mode;
//! - the least-squares fit is [`crate::fit::kalman`].
//!
//! File layout (row-major f32 tensors; n = D + 1, N channels): `kalman.a` (n x n),
//! `kalman.w` (n x n), `kalman.c` (N x n), `kalman.q` (N x N), `kalman.x0` (n),
//! `kalman.p0` (n x n), and the steady state `kalman.k_ss` (n x N), `kalman.m_ss`,
//! `kalman.j_ss`, `kalman.p_ss`, `kalman.p_ss_pred` (n x n). Metadata: format,
//! format_version, kind = kalman, channels, behavior_dims, states (= n), dt, lag.

mod filter;
mod model;

pub use filter::{KalmanFilter, KalmanMode};
pub use model::{KalmanModel, KalmanParams, SteadyOptions, SteadyState, STEADY_TENSORS, TENSORS};
