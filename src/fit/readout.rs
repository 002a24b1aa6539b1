//! `latentloop fit readout`: the behaviour readout `b_t = D m_t + c` of an XFADS model, by
//! ridge regression from the decoder's own causal filtered means. For a model that has
//! none (an imported XFADS checkpoint: the reference's behaviour decoder is an sklearn
//! Ridge outside its state dict), or to refresh a model's on a new calibration block.
//!
//! The ridge is chosen on a held-out tail (the last `valid_fraction` of the bins, as
//! `fit xfads` holds one out), then the readout is fitted again on every bin with it. The
//! lag-1 smoothed previous state `m_{t-1|t}` is scored beside it: it sees one bin more
//! data, so it decodes the previous bin better, but one bin late; `run` publishes the
//! filtered readout, so the filtered one is what is written.

use super::linreg::{lstsq_relative, Linear};
use crate::any_model::{AnyModel, DecoderOptions};
use crate::data::{Array2, Dataset};
use crate::error::{Error, Result};
use crate::eval::evaluate;
use crate::metrics::behavior_r2;
use crate::model::{ModelFile, Tensor};
use serde::Serialize;

/// Relative ridges tried (see [`lstsq_relative`]: times T times the mean latent variance).
pub const RIDGES: [f64; 8] = [1e-9, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];

#[derive(Clone, Debug)]
pub struct ReadoutOptions {
    pub valid_fraction: f64,
    /// A fixed relative ridge instead of the choice among [`RIDGES`].
    pub ridge: Option<f64>,
    pub decode: DecoderOptions,
}

#[derive(Clone, Debug, Serialize)]
pub struct RidgeScore {
    pub ridge: f64,
    /// Held-out R^2 of behaviour at t from the filtered mean m_t.
    pub filtered_r2: f64,
    /// Held-out R^2 of behaviour at t-1 from the lag-1 mean m_{t-1|t}.
    pub lag1_r2: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ReadoutReport {
    pub train_bins: usize,
    pub valid_bins: usize,
    pub behavior_dims: usize,
    /// R^2 of the readout the model had, on all of this data (None: it had none).
    pub before_r2: Option<f64>,
    pub scores: Vec<RidgeScore>,
    /// The chosen ridge and its held-out scores.
    pub chosen: RidgeScore,
}

/// The model file with its new readout (`behavior.d`, `behavior.bias`, `behavior_dims`),
/// and how it was chosen.
pub fn fit_readout(file: &ModelFile, data: &Dataset, o: &ReadoutOptions) -> Result<(ModelFile, ReadoutReport)> {
    let model = AnyModel::from_model_file(file).map_err(Error::Invalid)?;
    let AnyModel::Xfads(m) = &model else {
        return Err(Error::Invalid(
            "a Kalman decoder's behaviour is its state, not a readout: fit it again with `latentloop fit kalman`"
                .into(),
        ));
    };
    let behavior = data
        .behavior
        .as_ref()
        .ok_or_else(|| Error::Invalid("the data has no 'behavior' array: a readout is fitted to behaviour".into()))?;
    if data.channels() != m.card.channels {
        return Err(Error::Mismatch(format!(
            "the model reads {} channels, the data has {}",
            m.card.channels,
            data.channels()
        )));
    }
    if (data.dt - m.card.dt).abs() > 1e-6 * m.card.dt {
        return Err(Error::Mismatch(format!(
            "the data's bins are {} s, the model's {} s: its dynamics are per bin, so decode data binned as it was trained",
            data.dt, m.card.dt
        )));
    }
    if !(o.valid_fraction > 0.0 && o.valid_fraction < 1.0) {
        return Err(Error::Invalid(format!("valid fraction {}: expected a number in (0, 1)", o.valid_fraction)));
    }
    let (t, l, d) = (data.bins(), m.card.latents, behavior.cols);
    let n_valid = (t as f64 * o.valid_fraction).round() as usize;
    let n_train = t - n_valid;
    let need = 2 * (l + 1);
    if n_valid < need || n_train < need {
        return Err(Error::Invalid(format!(
            "{t} bins split into {n_train} to fit and {n_valid} to choose the ridge: at least {need} of each are needed"
        )));
    }
    let before_r2 = (model.behavior_dims() > 0)
        .then(|| evaluate(&model, data, o.decode).map(|(r, _)| r.behavior_r2))
        .transpose()?
        .flatten();
    let (_, out) = evaluate(&model, &Dataset { behavior: None, ..data.clone() }, o.decode)?;

    // Lag-1 pairs (m_{t-1|t}, behaviour t-1), never across a trial start.
    let starts = data.trial_starts.clone().unwrap_or_default();
    let lag_pairs = |from: usize, to: usize| -> (Array2, Array2) {
        let rows: Vec<usize> = (from.max(1)..to).filter(|i| !starts.contains(i)).collect();
        (pick(&out.lag1, &rows, 0), pick(behavior, &rows, 1))
    };
    let (lag_train, lag_train_y) = lag_pairs(0, n_train);
    let (lag_valid, lag_valid_y) = lag_pairs(n_train, t);
    let (x_train, y_train) = (out.means.rows_range(0, n_train), behavior.rows_range(0, n_train));
    let (x_valid, y_valid) = (out.means.rows_range(n_train, t), behavior.rows_range(n_train, t));
    let score = |ridge: f64| -> Result<RidgeScore> {
        let f = lstsq_relative(&x_train, &y_train, ridge, true).map_err(Error::Invalid)?;
        let g = lstsq_relative(&lag_train, &lag_train_y, ridge, true).map_err(Error::Invalid)?;
        Ok(RidgeScore {
            ridge,
            filtered_r2: r2_of(&f, &x_valid, &y_valid),
            lag1_r2: r2_of(&g, &lag_valid, &lag_valid_y),
        })
    };
    let scores = match o.ridge {
        Some(r) => vec![score(r)?],
        None => RIDGES.iter().map(|&r| score(r)).collect::<Result<Vec<_>>>()?,
    };
    let chosen = scores
        .iter()
        .filter(|s| s.filtered_r2.is_finite())
        .max_by(|a, b| a.filtered_r2.total_cmp(&b.filtered_r2))
        .cloned()
        .ok_or_else(|| Error::Invalid("the held-out behaviour is constant: no R^2 to choose the ridge by".into()))?;

    let fit = lstsq_relative(&out.means, behavior, chosen.ridge, true).map_err(Error::Invalid)?;
    let mut file = file.clone();
    file.insert("behavior.d", Tensor::matrix(d, l, fit.weights.iter().map(|&v| v as f32).collect()));
    file.insert("behavior.bias", Tensor::vector(fit.bias.iter().map(|&v| v as f32).collect()));
    file.set_meta("behavior_dims", d);
    // The written file must load (and decode what was fitted).
    AnyModel::from_model_file(&file).map_err(Error::Invalid)?;
    Ok((file, ReadoutReport { train_bins: n_train, valid_bins: n_valid, behavior_dims: d, before_r2, scores, chosen }))
}

/// Rows `rows - shift` of `a`.
fn pick(a: &Array2, rows: &[usize], shift: usize) -> Array2 {
    let data = rows.iter().flat_map(|&i| a.row(i - shift).iter().copied()).collect();
    Array2::new(rows.len(), a.cols, data)
}

fn r2_of(f: &Linear, x: &Array2, y: &Array2) -> f64 {
    let pred = Array2::new(y.rows, y.cols, f.predict(x).iter().map(|&v| v as f32).collect());
    behavior_r2(&pred, y)
}
