//! What the pipeline and `eval` drive once per bin, whatever the model: the XFADS filter or
//! the Kalman-filter decoder.

//!
//! This file knows no implementation: `Filter`, `KalmanFilter` and `GpuFilter` implement the
//! trait, and [`crate::any_model`] (above them all) builds the right one from a model file.

/// Why a bin was refused. The decoder's state is untouched by a refused bin.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum BinError {
    #[error("bin has {got} channels, the model expects {want}")]
    WrongLength { got: usize, want: usize },
    #[error("channel {channel} is not finite ({value})")]
    NonFinite { channel: usize, value: f32 },
    /// The GPU backend failed (a CUDA driver error, e.g. a lost device). Unlike the other
    /// variants the decoder's state is unknown afterwards: rebuild it.
    #[error("{0}")]
    Device(&'static str),
}

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepInfo {
    /// The bin index this step decoded (0 for the first bin).
    pub step: u64,
    /// No data: the state is the prediction.
    pub predict_only: bool,
    /// The update's algebra broke down (non-finite potential); the state was reset to the
    /// prior and this bin is predict-only.
    pub reset: bool,
    /// KL(q_t || predictive), in nats: how surprising the bin was (0 if not computed).
    pub kl: f32,
}

/// Checks a bin's length and values without touching any state.
pub fn validate_bin(y: &[f32], channels: usize) -> Result<(), BinError> {
    if y.len() != channels {
        return Err(BinError::WrongLength { got: y.len(), want: channels });
    }
    if crate::math::all_finite(y) {
        return Ok(());
    }
    let channel = y.iter().position(|v| !v.is_finite()).expect("a non-finite value");
    Err(BinError::NonFinite { channel, value: y[channel] })
}

/// One decoder instance, stepped once per bin. Implementations allocate nothing, lock
/// nothing and make no system call in `predict` and `step`.
pub trait Decoder: Send {
    fn channels(&self) -> usize;
    /// Length of `mean` and `lag1_mean`.
    fn latents(&self) -> usize;
    /// Length of `behavior` (0 if the model decodes none).
    fn behavior_dims(&self) -> usize;
    /// Work for the next bin that does not depend on its data, so a real-time loop can do it
    /// ahead of the bin's arrival. `step` does it if it was not done.
    fn predict(&mut self) {}
    /// Decodes one bin; `None` is a bin without data (a predict-only step).
    fn step(&mut self, y: Option<&[f32]>) -> Result<StepInfo, BinError>;
    /// Decoded behaviour of the last step.
    fn behavior(&self) -> &[f32];
    /// Filtered state mean of the last step.
    fn mean(&self) -> &[f32];
    /// Lag-1 smoothed mean of the previous state, given the last bin too.
    fn lag1_mean(&self) -> &[f32];
    /// Starts over from the prior (e.g. after the source restarted).
    fn reset(&mut self);
    /// For [`Decoder::carry_state_from`]: the concrete decoder.
    fn as_any(&self) -> &dyn std::any::Any;
    /// Takes over `other`'s state (a model swapped in between bins, on the same latent
    /// space): the filtered state, the lag-1 mean and the bin counter, so that the new model
    /// goes on where the old one was. Returns false, changing nothing, where the two are not
    /// of one kind and shape (then the caller starts this one from its prior). Allocates
    /// nothing.
    fn carry_state_from(&mut self, _other: &dyn Decoder) -> bool {
        false
    }
}
