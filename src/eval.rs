//! `latentloop eval`: the causal decoder run bin by bin over a recorded or simulated session,
//! exactly as `run` would decode it, and scored.
//!
//! What each number means:
//! - `behavior_r2`: decoded behaviour (filtered, causal) against the recorded behaviour,
//!   variance-weighted over dimensions (FALCON);
//! - `bits_per_spike`: one-step-ahead predictive rates (the mean rate over predictive draws,
//!   before the bin is seen) against the counts, over the per-neuron mean (NLB);
//! - `rate_r2`: filtered rates (mean over posterior draws) against the true rates;
//! - `state_r2` / `lag1_state_r2`: affine map from the true latents to the filtered means /
//!   to the lag-1 smoothed means of the previous bin (Sedler et al.);
//! - `bins_per_second`: bins decoded per second of filter-step time (metrics excluded).

use crate::any_model::{AnyModel, DecoderOptions};
use crate::data::npz::{write_arrays, Dtype, NpyArray};
use crate::data::{Array2, Dataset};
use crate::decoder::Decoder;
use crate::error::{Error, Result};
use crate::filter::Filter;
use crate::metrics;
use crate::model::Readout;
use crate::pipeline::source::{BinSlot, Counters};
use crate::pipeline::step::{Outcome, Step};
use crate::wire::output::FLAG_PREDICT_ONLY;
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

#[derive(Serialize, Debug, Clone)]
pub struct EvalReport {
    pub model: String,
    pub bins: usize,
    pub channels: usize,
    pub behavior_r2: Option<f64>,
    pub bits_per_spike: Option<f64>,
    pub rate_r2: Option<f64>,
    pub state_r2: Option<f64>,
    pub lag1_state_r2: Option<f64>,
    pub bins_per_second: f64,
    pub predict_only_bins: usize,
    pub mean_kl: f64,
}

/// Per-bin outputs of an evaluation.
#[derive(Debug, Clone)]
pub struct EvalOutputs {
    /// Decoded behaviour, T x D (D = 0 if none).
    pub behavior: Array2,
    /// Filtered means m_t, T x L.
    pub means: Array2,
    /// Row t: m_{t-1|t} (row 0: the prior mean).
    pub lag1: Array2,
    /// Filtered rates (Poisson readout only), T x N.
    pub rates: Option<Array2>,
    /// One-step-ahead predictive rates (Poisson readout only), T x N.
    pub predictive_rates: Option<Array2>,
}

impl EvalOutputs {
    /// Writes the outputs as an .npz (behavior, latents, lag1, rates, predictive_rates).
    pub fn write_npz(&self, path: impl AsRef<Path>) -> Result<()> {
        let arr = |a: &Array2| NpyArray {
            shape: vec![a.rows, a.cols],
            dtype: Dtype::F4,
            data: a.data.iter().map(|&v| v as f64).collect(),
        };
        let mut list =
            vec![("behavior", arr(&self.behavior)), ("latents", arr(&self.means)), ("lag1", arr(&self.lag1))];
        if let Some(r) = &self.rates {
            list.push(("rates", arr(r)));
        }
        if let Some(r) = &self.predictive_rates {
            list.push(("predictive_rates", arr(r)));
        }
        let refs: Vec<(&str, &NpyArray)> = list.iter().map(|(n, a)| (*n, a)).collect();
        write_arrays(path, &refs)
    }
}

/// Mean over the rows of `draws` (S x L, plus `offset`) of the readout's expected counts.
fn mean_rate(
    readout: &Readout,
    draws: &[f32],
    offset: &[f32],
    l: usize,
    z: &mut [f32],
    tmp: &mut [f32],
    out: &mut [f32],
) {
    out.fill(0.0);
    let s = draws.len() / l;
    for row in draws.chunks_exact(l) {
        for i in 0..l {
            z[i] = row[i] + offset[i];
        }
        readout.mean(z, tmp);
        out.iter_mut().zip(tmp.iter()).for_each(|(o, t)| *o += t);
    }
    out.iter_mut().for_each(|o| *o /= s as f32);
}

pub fn evaluate(model: &AnyModel, data: &Dataset, opts: DecoderOptions) -> Result<(EvalReport, EvalOutputs)> {
    let (t_len, n) = (data.bins(), data.channels());
    if model.channels() != n {
        return Err(Error::Mismatch(format!("the model reads {} channels, the data has {n}", model.channels())));
    }
    let d = model.behavior_dims();
    if let Some(b) = &data.behavior {
        if d > 0 && b.cols != d {
            return Err(Error::Mismatch(format!(
                "the model decodes {d} behaviour dimensions, the data has {}",
                b.cols
            )));
        }
    }
    let poisson = match model {
        AnyModel::Xfads(m) => matches!(m.readout, Readout::Poisson { .. }).then(|| m.clone()),
        AnyModel::Kalman(_) => None,
    };
    let l = model.latents();
    let mut out = EvalOutputs {
        behavior: Array2::zeros(t_len, d),
        means: Array2::zeros(t_len, l),
        lag1: Array2::zeros(t_len, l),
        rates: poisson.as_ref().map(|_| Array2::zeros(t_len, n)),
        predictive_rates: poisson.as_ref().map(|_| Array2::zeros(t_len, n)),
    };
    // Rates need the filter's draws, so a Poisson XFADS model is driven as a Filter.
    let mut filter = poisson.as_ref().map(|m| Filter::new(m.clone(), opts.filter));
    let mut other: Option<Box<dyn Decoder>> = filter.is_none().then(|| model.decoder(opts));
    let (mut z, mut tmp, zero) = (vec![0.0; l], vec![0.0; n], vec![0.0; l]);
    let (mut step_secs, mut predict_only, mut kl_sum) = (0.0f64, 0usize, 0.0f64);
    // The bins go through the per-bin step `run` uses: bin t is sequence number t, and the
    // first bin of each trial is a restart (the decoder starts over from its prior).
    let mut step = Step::new(u64::MAX);
    let counters = Counters::default();
    let mut slot = BinSlot::new(n, 0);
    for (t, &new_trial) in data.trial_start_mask().iter().enumerate() {
        slot.seq = t as u64;
        slot.restart = new_trial;
        slot.counts.copy_from_slice(data.spikes.row(t));
        if let (Some(f), Some(m)) = (filter.as_mut(), poisson.as_ref()) {
            // The one-step-ahead predictive rates, from the prediction the step will use (a
            // trial's first bin predicts from the prior).
            if t > 0 && new_trial {
                f.reset();
            }
            let start = Instant::now();
            f.predict();
            step_secs += start.elapsed().as_secs_f64();
            let draws = f.predictive_draws().expect("predicted");
            let mp = f.predicted_mean().to_vec();
            mean_rate(&m.readout, draws, &mp, l, &mut z, &mut tmp, out.predictive_rates.as_mut().unwrap().row_mut(t));
        }
        let dec: &mut dyn Decoder = match (filter.as_mut(), other.as_mut()) {
            (Some(f), _) => f,
            (None, Some(d)) => &mut **d,
            (None, None) => unreachable!("a filter or another decoder"),
        };
        let start = Instant::now();
        let outcome = step.apply(dec, &slot, 0, &counters);
        step_secs += start.elapsed().as_secs_f64();
        let Outcome::Decoded(h) = outcome else { unreachable!("bin {t} is the next sequence number") };
        out.behavior.row_mut(t).copy_from_slice(dec.behavior());
        out.means.row_mut(t).copy_from_slice(dec.mean());
        out.lag1.row_mut(t).copy_from_slice(dec.lag1_mean());
        predict_only += (h.flags & FLAG_PREDICT_ONLY != 0) as usize;
        kl_sum += h.kl as f64;
        if let (Some(f), Some(m)) = (filter.as_ref(), poisson.as_ref()) {
            mean_rate(
                &m.readout,
                f.sample_matrix(),
                &zero,
                l,
                &mut z,
                &mut tmp,
                out.rates.as_mut().unwrap().row_mut(t),
            );
        }
    }

    let lag = model.behavior_lag();
    let behavior_r2 = match (&data.behavior, d) {
        (Some(b), d) if d > 0 && t_len > lag + 1 => {
            Some(metrics::behavior_r2(&out.behavior.rows_range(0, t_len - lag), &b.rows_range(lag, t_len)))
        }
        _ => None,
    };
    let bits_per_spike = out.predictive_rates.as_ref().map(|r| metrics::bits_per_spike(r, &data.spikes));
    let rate_r2 = match (&out.rates, &data.rates) {
        (Some(p), Some(truth)) => Some(metrics::rate_r2(p, truth)),
        _ => None,
    };
    let (state_r2, lag1_state_r2) = match &data.latents {
        Some(truth) if t_len > 2 => (
            Some(metrics::state_r2(truth, &out.means)),
            Some(metrics::state_r2(&truth.rows_range(0, t_len - 1), &out.lag1.rows_range(1, t_len))),
        ),
        _ => (None, None),
    };
    let finite = |v: Option<f64>| v.filter(|x| x.is_finite());
    let report = EvalReport {
        model: model.describe(),
        bins: t_len,
        channels: n,
        behavior_r2: finite(behavior_r2),
        bits_per_spike: finite(bits_per_spike),
        rate_r2: finite(rate_r2),
        state_r2: finite(state_r2),
        lag1_state_r2: finite(lag1_state_r2),
        bins_per_second: t_len as f64 / step_secs.max(1e-12),
        predict_only_bins: predict_only,
        mean_kl: kl_sum / t_len.max(1) as f64,
    };
    Ok((report, out))
}
