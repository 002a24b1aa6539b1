//! Recorded or simulated sessions: binned spike counts, behaviour, and (for simulated rigs)
//! the ground truth. On disk: a NumPy `.npz` (see `npz`).
//!
//! Layout (arrays are T x columns, rows are time bins):
//! - `spikes`  T x N  counts per bin (any integer or float dtype)
//! - `behavior` T x D  (e.g. cursor velocity); optional for a lab's recording only if no
//!   behaviour is decoded
//! - `dt`      scalar, bin width in seconds
//! - `latents` T x L_true  true latent state (simulated rigs only)
//! - `rates`   T x N  true expected counts per bin (simulated rigs only)
//! - `trial_starts` K  optional, first bin of each trial (int). Trials are concatenated
//!   recordings, not one stream: decoding (eval) and training start each trial from the prior,
//!   and nothing pairs the last bin of a trial with the first of the next.

pub mod npz;

/// A row-major `rows x cols` f32 array.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Array2 {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Array2 {
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Self {
        assert_eq!(rows * cols, data.len(), "array shape and data length differ");
        Array2 { rows, cols, data }
    }
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Array2 { rows, cols, data: vec![0.0; rows * cols] }
    }
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }
    pub fn row_mut(&mut self, i: usize) -> &mut [f32] {
        &mut self.data[i * self.cols..(i + 1) * self.cols]
    }
    /// Rows `start..end` as a new array.
    pub fn rows_range(&self, start: usize, end: usize) -> Array2 {
        Array2::new(end - start, self.cols, self.data[start * self.cols..end * self.cols].to_vec())
    }
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct Dataset {
    pub spikes: Array2,
    pub behavior: Option<Array2>,
    pub dt: f32,
    pub latents: Option<Array2>,
    pub rates: Option<Array2>,
    pub trial_starts: Option<Vec<usize>>,
}

impl Dataset {
    pub fn bins(&self) -> usize {
        self.spikes.rows
    }
    pub fn channels(&self) -> usize {
        self.spikes.cols
    }
    /// Whether bin t begins a trial: bin 0, and every listed trial start.
    pub fn trial_start_mask(&self) -> Vec<bool> {
        let mut mask = vec![false; self.bins()];
        if let Some(m) = mask.first_mut() {
            *m = true;
        }
        for &s in self.trial_starts.iter().flatten() {
            if let Some(m) = mask.get_mut(s) {
                *m = true;
            }
        }
        mask
    }

    /// Bins `start..end` (trial starts are shifted and clipped to the range).
    pub fn slice(&self, start: usize, end: usize) -> Dataset {
        let part = |a: &Option<Array2>| a.as_ref().map(|a| a.rows_range(start, end));
        Dataset {
            spikes: self.spikes.rows_range(start, end),
            behavior: part(&self.behavior),
            dt: self.dt,
            latents: part(&self.latents),
            rates: part(&self.rates),
            trial_starts: self
                .trial_starts
                .as_ref()
                .map(|v| v.iter().filter(|&&s| s >= start && s < end).map(|s| s - start).collect()),
        }
    }
}
