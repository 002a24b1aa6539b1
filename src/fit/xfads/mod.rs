//! `latentloop fit xfads`: training the causal XFADS model (ALGORITHM.md section 6) from a
//! calibration block, then its behaviour readout by ridge regression.
//!
//! Loss per bin: KL(q_t || N(m_p,t, P_p,t)) - (1/S) sum_s log p(y_t | z_t^(s)), averaged over
//! the bins of a minibatch. Adam, gradient norm clipped to 1, Q >= 1e-3 after every step.
//!
//! Two ways to get gradients, one differentiable step (`graph::step`):
//! - `local` (forward-only, temporally local): once per epoch, the runtime filter runs over
//!   the training block with no gradient and keeps every bin's samples; the losses of all
//!   bins are then computed in batches that are parallel in time, each from the detached
//!   samples of its previous bin. No back-propagation through time, no backward smoother.
//! - `bptt`: segments of `bptt_len` bins start from those samples and the step is chained
//!   through time inside each segment; gradients flow through the whole segment.
//!
//! Splits are contiguous in time: training block first, validation block last (early
//! stopping on its one-step-ahead bits/spike). The noise is the runtime's Philox noise, so
//! what is trained is what `eval` and `run` execute with the same seed.

pub mod graph;
pub mod ops;

use crate::any_model::{AnyModel, DecoderOptions};
use crate::data::{Array2, Dataset};
use crate::error::{Error, Result};
use crate::eval::{evaluate, EvalOutputs, EvalReport};
use crate::filter::{Filter, FilterOptions};
use crate::fit::linreg;
use crate::math::philox::Normals;
use crate::model::{
    build, softplus_inv, Card, DynamicsKind, ModelFile, ReadoutKind, Tensor as FileTensor, UpdateKind, XfadsModel,
};
use candle_core::{Device, Tensor, Var};
use graph::{Noise, Params};
use ops::DynOp;
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GradMode {
    Local,
    Bptt,
}

#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub dynamics: DynamicsKind,
    pub latents: usize,
    pub samples: usize,
    pub rank: usize,
    pub hidden: usize,
    pub encoder_hidden: usize,
    pub substeps: usize,
    pub rmsnorm: bool,
    /// Lr (default: all latents).
    pub readout_latents: Option<usize>,
    pub epochs: usize,
    /// Bins per minibatch.
    pub batch: usize,
    pub bptt_len: usize,
    pub lr: f64,
    pub grad: GradMode,
    pub seed: u64,
    pub valid_fraction: f64,
    /// Epochs without a better validation score before stopping.
    pub patience: usize,
    pub max_seconds: Option<f64>,
    /// Ridge of the behaviour readout (absolute, on filtered means).
    pub ridge: f64,
    pub quiet: bool,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            dynamics: DynamicsKind::Node,
            latents: 3,
            samples: 16,
            rank: 3,
            hidden: 64,
            encoder_hidden: 64,
            substeps: 2,
            rmsnorm: false,
            readout_latents: None,
            epochs: 200,
            batch: 256,
            bptt_len: 16,
            lr: 3e-3,
            grad: GradMode::Local,
            seed: 1,
            valid_fraction: 0.15,
            patience: 15,
            max_seconds: None,
            ridge: 1e-3,
            quiet: false,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct EpochLog {
    pub epoch: usize,
    pub seconds: f64,
    pub train_loss: f64,
    pub valid_bits_per_spike: Option<f64>,
    /// Minibatches skipped because their gradient was not finite.
    pub skipped_batches: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct TrainReport {
    pub grad: GradMode,
    pub train_bins: usize,
    pub valid_bins: usize,
    pub epochs_run: usize,
    pub best_epoch: usize,
    pub seconds: f64,
    pub seconds_per_epoch: f64,
    /// The trained model on the validation block (the model as written, behaviour included).
    pub valid: EvalReport,
    pub history: Vec<EpochLog>,
}

pub struct Trained {
    pub file: ModelFile,
    pub report: TrainReport,
    /// Per-bin outputs on the validation block (what `eval` gives on that block).
    pub valid_outputs: EvalOutputs,
}

struct Adam {
    lr: f64,
    t: i32,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl Adam {
    const B1: f64 = 0.9;
    const B2: f64 = 0.999;
    const EPS: f64 = 1e-8;

    fn new(vars: &[&Var], lr: f64) -> candle_core::Result<Self> {
        let zeros = |v: &&Var| v.as_tensor().zeros_like();
        Ok(Adam {
            lr,
            t: 0,
            m: vars.iter().map(zeros).collect::<candle_core::Result<_>>()?,
            v: vars.iter().map(zeros).collect::<candle_core::Result<_>>()?,
        })
    }

    /// One step with the gradients scaled by `scale` (gradient clipping).
    fn step(&mut self, vars: &[&Var], grads: &[Tensor], scale: f64) -> candle_core::Result<()> {
        self.t += 1;
        let (c1, c2) = (1.0 - Self::B1.powi(self.t), 1.0 - Self::B2.powi(self.t));
        for (i, (var, g)) in vars.iter().zip(grads).enumerate() {
            let g = (g * scale)?;
            self.m[i] = ((&self.m[i] * Self::B1)? + (&g * (1.0 - Self::B1))?)?;
            self.v[i] = ((&self.v[i] * Self::B2)? + (g.sqr()? * (1.0 - Self::B2))?)?;
            let update = ((&self.m[i] / c1)? / ((&self.v[i] / c2)?.sqrt()? + Self::EPS)?)?;
            var.set(&(var.as_tensor() - (update * self.lr)?)?)?;
        }
        Ok(())
    }
}

fn candle_err(e: candle_core::Error) -> Error {
    Error::Invalid(format!("training: {e}"))
}

fn card_for(o: &TrainOptions, channels: usize, dt: f32) -> Card {
    Card {
        latents: o.latents,
        channels,
        dt,
        samples: o.samples,
        dynamics: o.dynamics,
        hidden: if o.dynamics == DynamicsKind::Linear { 0 } else { o.hidden },
        rmsnorm: o.rmsnorm,
        substeps: o.substeps,
        update: UpdateKind::Encoder,
        rank: o.rank,
        encoder_hidden: o.encoder_hidden,
        readout: ReadoutKind::Poisson,
        readout_latents: o.readout_latents.unwrap_or(o.latents),
        behavior_dims: 0,
    }
}

/// The starting model: random weights (dynamics near the identity), each neuron's log rate
/// bias at its mean rate in the training block, and the encoder's input weights scaled by
/// 1/sqrt(1 + variance) of each channel's counts, so that its first activations are O(1)
/// whatever the firing rates (the model still reads raw counts).
fn initial_model(card: &Card, train: &Dataset, seed: u64) -> ModelFile {
    let mut f = build::random(card, seed, 0.1, 0.5);
    let (t, n) = (train.bins(), train.channels());
    let (mut mean, mut sq) = (vec![0.0f64; n], vec![0.0f64; n]);
    for i in 0..t {
        for (j, v) in train.spikes.row(i).iter().enumerate() {
            mean[j] += *v as f64;
            sq[j] += (*v as f64) * (*v as f64);
        }
    }
    let b: Vec<f32> = mean.iter().map(|m| ((m / t as f64).max(1e-3) / card.dt as f64).ln() as f32).collect();
    f.insert("readout.b", FileTensor::vector(b));
    let w1 = f.tensors.get_mut("encoder.w1").expect("an encoder model");
    for row in w1.data.chunks_exact_mut(n) {
        for j in 0..n {
            let var = sq[j] / t as f64 - (mean[j] / t as f64).powi(2);
            row[j] /= (1.0 + var).sqrt() as f32;
        }
    }
    f
}

/// The runtime filter over `data` with no gradient: the samples after every bin (T x S x L).
fn forward_samples(model: &Arc<XfadsModel>, data: &Dataset, o: &TrainOptions) -> Result<Vec<f32>> {
    let mut f = Filter::new(model.clone(), FilterOptions { samples: Some(o.samples), seed: o.seed });
    let sl = o.samples * o.latents;
    let mut bank = Vec::with_capacity(data.bins() * sl);
    let trial_start = data.trial_start_mask();
    for (t, &new_trial) in trial_start.iter().enumerate() {
        if t > 0 && new_trial {
            f.reset();
        }
        f.step(Some(data.spikes.row(t))).map_err(|e| Error::Invalid(format!("training data, bin {t}: {e}")))?;
        bank.extend_from_slice(f.sample_matrix());
    }
    Ok(bank)
}

/// The bins whose loss is taken from the samples of the bin before: every bin but a trial's
/// first (local), or the starts of whole `bptt_len` segments inside one trial (bptt).
fn loss_starts(train: &Dataset, o: &TrainOptions) -> Vec<usize> {
    let trial_start = train.trial_start_mask();
    match o.grad {
        GradMode::Local => (1..train.bins()).filter(|&t| !trial_start[t]).collect(),
        GradMode::Bptt => {
            let mut starts = Vec::new();
            let mut t = 1;
            while t + o.bptt_len <= train.bins() {
                match (t..t + o.bptt_len).find(|&u| trial_start[u]) {
                    // A segment may not cross into the next trial: restart after its first bin.
                    Some(u) => t = u + 1,
                    None => {
                        starts.push(t);
                        t += o.bptt_len;
                    }
                }
            }
            starts
        }
    }
}

/// A deterministic shuffle (Fisher-Yates on Philox uniforms).
fn shuffle(v: &mut [usize], seed: u64, epoch: usize) {
    let g = Normals::new(seed ^ 0x5eed_5eed);
    let mut u = vec![0.0f32; v.len()];
    g.fill(epoch as u64, crate::math::philox::Purpose::Train, 1, &mut u);
    for i in (1..v.len()).rev() {
        // A normal's CDF-free use: rank by value. Cheap and uniform enough for shuffling.
        let j = ((u[i].abs() * 7919.0) as usize) % (i + 1);
        v.swap(i, j);
    }
}

fn rows(data: &Array2, idx: &[usize], dev: &Device) -> candle_core::Result<Tensor> {
    let mut v = Vec::with_capacity(idx.len() * data.cols);
    for &i in idx {
        v.extend_from_slice(data.row(i));
    }
    Tensor::from_vec(v, (idx.len(), data.cols), dev)
}

fn bank_rows(bank: &[f32], idx: &[usize], s: usize, l: usize, dev: &Device) -> candle_core::Result<Tensor> {
    let mut v = Vec::with_capacity(idx.len() * s * l);
    for &i in idx {
        v.extend_from_slice(&bank[i * s * l..(i + 1) * s * l]);
    }
    Tensor::from_vec(v, (idx.len(), s, l), dev)
}

/// The loss of one minibatch: bins `ts` (local) or segments starting at `ts` (bptt).
#[allow(clippy::too_many_arguments)]
fn minibatch_loss(
    p: &Params,
    op: &DynOp,
    card: &Card,
    o: &TrainOptions,
    train: &Dataset,
    bank: &[f32],
    ts: &[usize],
    normals: &Normals,
    dev: &Device,
) -> candle_core::Result<Tensor> {
    let (s, l, r) = (o.samples, o.latents, o.rank);
    let prev: Vec<usize> = ts.iter().map(|t| t - 1).collect();
    let mut z = bank_rows(bank, &prev, s, l, dev)?.detach();
    let steps = if o.grad == GradMode::Local { 1 } else { o.bptt_len };
    let mut total: Option<Tensor> = None;
    for k in 0..steps {
        let now: Vec<usize> = ts.iter().map(|t| t + k).collect();
        let steps_u64: Vec<u64> = now.iter().map(|&t| t as u64).collect();
        let noise = Noise::draw(normals, &steps_u64, s, l, r, dev)?;
        let y = rows(&train.spikes, &now, dev)?;
        let out = graph::step(p, op, card, &z, &y, &noise)?;
        let loss = (out.kl - out.ell)?.mean_all()?;
        total = Some(match total {
            None => loss,
            Some(t) => (t + loss)?,
        });
        z = out.z;
    }
    total.expect("at least one step") / steps as f64
}

pub fn train(data: &Dataset, o: &TrainOptions) -> Result<Trained> {
    let (t_all, n) = (data.bins(), data.channels());
    if !(0.02..=0.5).contains(&o.valid_fraction) {
        return Err(Error::Invalid(format!("valid fraction {} is outside 0.02..=0.5", o.valid_fraction)));
    }
    let n_valid = ((t_all as f64) * o.valid_fraction).round() as usize;
    let n_train = t_all - n_valid;
    let min_train = 4 * o.batch.max(o.bptt_len + 1);
    if n_train < min_train || n_valid < 20 {
        return Err(Error::Invalid(format!(
            "{t_all} bins are too few: training needs at least {min_train} bins and validation 20"
        )));
    }
    if o.samples < 2 || o.latents == 0 || o.rank == 0 || o.epochs == 0 || o.batch == 0 {
        return Err(Error::Invalid("samples >= 2, latents, rank, epochs and batch >= 1 are required".into()));
    }
    let (train, valid) = (data.slice(0, n_train), data.slice(n_train, t_all));
    let card = card_for(o, n, data.dt);
    card.validate().map_err(Error::Invalid)?;
    let dev = Device::Cpu;
    let base = initial_model(&card, &train, o.seed);
    let p = Params::from_file(&base, &card, &dev).map_err(Error::Invalid)?;
    let op = DynOp {
        kind: card.dynamics,
        latents: card.latents,
        hidden: card.hidden,
        rmsnorm: card.rmsnorm,
        substeps: card.substeps,
    };
    let vars = p.vars();
    let mut adam = Adam::new(&vars, o.lr).map_err(candle_err)?;
    let normals = Normals::new(o.seed);
    let q_floor = softplus_inv(1e-3) as f64;
    let decode =
        DecoderOptions { filter: FilterOptions { samples: Some(o.samples), seed: o.seed }, ..Default::default() };
    let compile = |p: &Params| -> Result<(ModelFile, Arc<XfadsModel>)> {
        let f = p.to_file(&base, &card).map_err(candle_err)?;
        let m = XfadsModel::compile(&f).map_err(Error::Invalid)?;
        Ok((f, Arc::new(m)))
    };

    let bar = crate::progress::bar(o.epochs as u64, o.quiet, "{bar:25} epoch {pos}/{len} {msg} [{elapsed}]");
    let started = Instant::now();
    let mut history = Vec::new();
    let (mut best_score, mut best_epoch, mut best_file) = (f64::NEG_INFINITY, 0usize, None::<ModelFile>);
    let mut starts = loss_starts(&train, o);
    if starts.is_empty() {
        return Err(Error::Invalid(format!("no trial of the training block is longer than {} bins", o.bptt_len)));
    }
    let per_batch = match o.grad {
        GradMode::Local => o.batch,
        GradMode::Bptt => (o.batch / o.bptt_len).max(1),
    };
    for epoch in 1..=o.epochs {
        let t0 = Instant::now();
        let (_, model) = compile(&p)?;
        let bank = forward_samples(&model, &train, o)?;
        shuffle(&mut starts, o.seed, epoch);
        let (mut loss_sum, mut batches, mut skipped) = (0.0f64, 0usize, 0usize);
        for chunk in starts.chunks(per_batch) {
            let loss = minibatch_loss(&p, &op, &card, o, &train, &bank, chunk, &normals, &dev).map_err(candle_err)?;
            let grads = loss.backward().map_err(candle_err)?;
            let gs: Vec<Tensor> = vars
                .iter()
                .map(|v| grads.get(v).cloned().unwrap_or_else(|| v.as_tensor().zeros_like().unwrap()))
                .collect();
            let norm2: f64 = gs
                .iter()
                .map(|g| g.sqr().and_then(|x| x.sum_all()).and_then(|x| x.to_scalar::<f32>()).unwrap_or(0.0) as f64)
                .sum();
            let norm = norm2.sqrt();
            if !norm.is_finite() {
                // A minibatch whose loss overflowed (extreme counts against a poor model)
                // teaches nothing: skip it, and give up only if most of an epoch does.
                skipped += 1;
                continue;
            }
            adam.step(&vars, &gs, if norm > 1.0 { 1.0 / norm } else { 1.0 }).map_err(candle_err)?;
            p.log_q.set(&p.log_q.as_tensor().clamp(q_floor, f64::INFINITY).map_err(candle_err)?).map_err(candle_err)?;
            loss_sum += loss.to_scalar::<f32>().map_err(candle_err)? as f64;
            batches += 1;
        }
        if skipped * 2 > batches + skipped {
            return Err(Error::Invalid(format!(
                "training diverged at epoch {epoch}: {skipped} of {} minibatches had a non-finite gradient",
                batches + skipped
            )));
        }
        let (file, model) = compile(&p)?;
        let (vr, _) = evaluate(&AnyModel::Xfads(model), &valid, decode)?;
        let score = vr.bits_per_spike.unwrap_or(f64::NEG_INFINITY);
        let log = EpochLog {
            epoch,
            seconds: t0.elapsed().as_secs_f64(),
            train_loss: loss_sum / batches.max(1) as f64,
            valid_bits_per_spike: vr.bits_per_spike,
            skipped_batches: skipped,
        };
        bar.set_message(format!(
            "loss {:.3}  held-out bits/spike {:.4}  best {:.4}",
            log.train_loss,
            score,
            best_score.max(score)
        ));
        bar.inc(1);
        history.push(log);
        if score > best_score {
            (best_score, best_epoch, best_file) = (score, epoch, Some(file));
        }
        let out_of_time = o.max_seconds.is_some_and(|m| started.elapsed().as_secs_f64() >= m);
        if epoch - best_epoch >= o.patience || out_of_time {
            break;
        }
    }
    bar.finish_and_clear();
    let mut file = best_file.ok_or_else(|| Error::Invalid("training produced no valid model".into()))?;
    let train_seconds = started.elapsed().as_secs_f64();

    // Behaviour readout: ridge regression from the filtered means on the training block.
    if let Some(b) = &train.behavior {
        let model = AnyModel::Xfads(Arc::new(XfadsModel::compile(&file).map_err(Error::Invalid)?));
        let (_, out) = evaluate(&model, &Dataset { behavior: None, ..train.clone() }, decode)?;
        let fit = linreg::lstsq(&out.means, b, o.ridge, true).map_err(Error::Invalid)?;
        let dd = b.cols;
        file.insert("behavior.d", FileTensor::matrix(dd, o.latents, fit.weights.iter().map(|&v| v as f32).collect()));
        file.insert("behavior.bias", FileTensor::vector(fit.bias.iter().map(|&v| v as f32).collect()));
        Card { behavior_dims: dd, ..card.clone() }.write_meta(&mut file);
    }
    let model = AnyModel::Xfads(Arc::new(XfadsModel::compile(&file).map_err(Error::Invalid)?));
    let (valid_report, valid_outputs) = evaluate(&model, &valid, decode)?;
    let epochs_run = history.len();
    Ok(Trained {
        file,
        report: TrainReport {
            grad: o.grad,
            train_bins: n_train,
            valid_bins: n_valid,
            epochs_run,
            best_epoch,
            seconds: train_seconds,
            seconds_per_epoch: history.iter().map(|h| h.seconds).sum::<f64>() / epochs_run.max(1) as f64,
            valid: valid_report,
            history,
        },
        valid_outputs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn losses_never_pair_bins_across_a_trial_start() {
        let data = Dataset {
            spikes: Array2::zeros(40, 2),
            trial_starts: Some(vec![0, 10, 25, 99]),
            dt: 0.02,
            ..Default::default()
        };
        let local = loss_starts(&data, &TrainOptions::default());
        assert_eq!(local.len(), 40 - 3);
        assert!(![0, 10, 25].iter().any(|t| local.contains(t)));
        let o = TrainOptions { grad: GradMode::Bptt, bptt_len: 4, ..Default::default() };
        assert_eq!(loss_starts(&data, &o), vec![1, 5, 11, 15, 19, 26, 30, 34]);
    }
}
