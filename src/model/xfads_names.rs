//! Reading a catniplab/xfads model saved under its own parameter names, as
//! `python -m latentloop import-xfads` writes it (python/latentloop/xfads_import.py): the
//! tensors of one model, and the metadata its weights cannot give.
//!
//! Mapping (an optional prefix such as Lightning's `ssm.` is accepted; the `nl_filter.`
//! copies of shared modules must equal the originals, and stand in for a missing one):
//!
//! | xfads key | latentloop tensor |
//! | --- | --- |
//! | `dynamics_mod.log_Q` | `dynamics.log_q` (Q = softplus, as in xfads) |
//! | `dynamics_mod.mean_fn.z_to_h.{weight,bias}` | `dynamics.w_zh`, `dynamics.b_zh` |
//! | `dynamics_mod.mean_fn.gru_cell.weight_hh` / `bias_hh` / `bias_ih` | `dynamics.w_hh` / `b_hh` / `b_ih` |
//! | `dynamics_mod.mean_fn.h_to_z.{weight,bias}` | `dynamics.w_out`, `dynamics.b_out` |
//! | `dynamics_mod.mean_fn.A.weight` (linear) | `dynamics.a` (bias 0) |
//! | nothing (diffusion, xfads's `DynamicsEye`) | `dynamics.a` = I (bias 0) |
//! | `initial_c_pdf.m_0`, `initial_c_pdf.log_Q_0` | `init.m0`, `init.log_q0` |
//! | `local_encoder.mlp.0.{weight,bias}` | `encoder.w1`, `encoder.b1` |
//! | `local_encoder.mlp.3.{weight,bias}` | `encoder.w2`, `encoder.b2` |
//! | `likelihood_pdf.readout_fn.1.{weight,bias}` | `readout.c`, `readout.b` (Poisson) |
//!
//! Metadata, required because the weights cannot say it: `dt` (bin width in seconds),
//! `likelihood` (Poisson and Bernoulli have the same tensors), `dynamics` (diffusion has none),
//! and for GRU dynamics `rmsnorm` (xfads's `use_layer_norm`, a weightless RMSNorm that only
//! its GRU applies: linear and diffusion ignore it here as there). `samples` (default 32)
//! and `behavior_dims` (with `behavior.d` / `behavior.bias`, as `fit readout` writes them)
//! are optional.
//!
//! Refused, by name, rather than decoded wrongly: tensors under the prefix that are not
//! mapped, an input network (`input_latent_fn`, or a GRU cell with inputs), a likelihood
//! other than Poisson, dynamics that disagree with their tensors, several models in one
//! file. `backward_encoder.*` is dropped: it reads future bins, which a causal decoder
//! has not got.

use super::card::{Card, DynamicsKind, ReadoutKind, UpdateKind};
use super::file::{ModelFile, Tensor};
use std::cell::RefCell;
use std::collections::BTreeSet;

const ANCHOR: &str = "dynamics_mod.log_Q";
const COPIES: &str = "nl_filter.";
/// How to make a file this loader takes: said with every refusal that the converter fixes.
const CONVERT: &str = "convert the checkpoint with `python -m latentloop import-xfads CHECKPOINT --dt SECONDS --out MODEL.safetensors` (see python/README.md)";

pub fn looks_like_xfads(f: &ModelFile) -> bool {
    !f.meta.contains_key("format") && f.tensors.keys().any(|k| k.ends_with(ANCHOR))
}

/// The tensors of the one model in the file, looked up by xfads name; remembers which were
/// taken, so that what is left over can be refused by name.
struct Names<'a> {
    f: &'a ModelFile,
    prefix: String,
    used: RefCell<BTreeSet<String>>,
}

impl Names<'_> {
    fn find(&self, name: &str) -> Option<&Tensor> {
        [format!("{}{name}", self.prefix), format!("{}{COPIES}{name}", self.prefix)].into_iter().find_map(|k| {
            let t = self.f.tensors.get(&k)?;
            self.used.borrow_mut().insert(k);
            Some(t)
        })
    }
    fn get(&self, name: &str) -> Result<&Tensor, String> {
        self.find(name).ok_or_else(|| format!("xfads model: missing tensor '{}{name}'", self.prefix))
    }
    fn dims(&self, name: &str, rank: usize) -> Result<Vec<usize>, String> {
        let t = self.get(name)?;
        if t.shape.len() != rank {
            return Err(format!(
                "xfads model: '{}{name}' has shape {:?}, expected {rank} dimensions",
                self.prefix, t.shape
            ));
        }
        Ok(t.shape.clone())
    }
    fn copy(&self, out: &mut ModelFile, from: &str, to: &str) -> Result<(), String> {
        out.insert(to, self.get(from)?.clone());
        Ok(())
    }
    /// Names under the prefix that start with `part` (after the prefix or its copies).
    fn under(&self, part: &str) -> Vec<&str> {
        let (p, c) = (format!("{}{part}", self.prefix), format!("{}{COPIES}{part}", self.prefix));
        self.f.tensors.keys().filter(|k| k.starts_with(&p) || k.starts_with(&c)).map(|k| k.as_str()).collect()
    }
}

/// The model's prefix: the one model in the file, or a refusal that lists them.
fn prefix(f: &ModelFile) -> Result<String, String> {
    let found: BTreeSet<&str> =
        f.tensors.keys().filter_map(|k| k.strip_suffix(ANCHOR)).map(|p| p.strip_suffix(COPIES).unwrap_or(p)).collect();
    match found.len() {
        1 => Ok(found.into_iter().next().unwrap_or_default().to_string()),
        _ => {
            let list: Vec<String> = found.iter().map(|p| format!("'{p}'")).collect();
            Err(format!(
                "several xfads models in the file (prefixes {}): latentloop will not pick one; \
                 {CONVERT} and --prefix to choose",
                list.join(", ")
            ))
        }
    }
}

pub fn convert(f: &ModelFile) -> Result<ModelFile, String> {
    let n = Names { f, prefix: prefix(f)?, used: RefCell::new(BTreeSet::new()) };
    let pre = n.prefix.clone();
    let meta = |key: &str, why: &str| -> Result<String, String> {
        f.meta.get(key).map(|v| v.trim().to_string()).ok_or_else(|| {
            format!("xfads model without metadata '{key}' ({why}), which its weights cannot give: {CONVERT}")
        })
    };
    if let Some(k) = n.under("input_latent_fn.").first() {
        return Err(format!(
            "xfads model with an input network ({k}): its dynamics take external inputs u_t each bin, \
             which latentloop's decoder does not feed; it cannot be decoded here"
        ));
    }
    let likelihood = meta("likelihood", "poisson or bernoulli have the same tensors")?;
    if likelihood != "poisson" {
        return Err(format!(
            "xfads model with likelihood '{likelihood}': latentloop maps xfads's Poisson likelihood only \
             (its readout is log rate = log dt + C z + b)"
        ));
    }
    if let Some(k) = ["likelihood_pdf.log_R", "likelihood_pdf.R_diag"].iter().find(|k| n.find(k).is_some()) {
        return Err(format!("xfads model: metadata says likelihood 'poisson', but '{pre}{k}' is a Gaussian's noise"));
    }
    let dynamics = meta("dynamics", "gru, linear or diffusion; diffusion has no tensors")?;

    let mut out = ModelFile::default();
    let l = n.dims("dynamics_mod.log_Q", 1)?[0];
    n.copy(&mut out, "dynamics_mod.log_Q", "dynamics.log_q")?;
    n.copy(&mut out, "initial_c_pdf.m_0", "init.m0")?;
    n.copy(&mut out, "initial_c_pdf.log_Q_0", "init.log_q0")?;

    let mean_fn = n.under("dynamics_mod.mean_fn.");
    let (kind, hidden, rmsnorm) = match dynamics.as_str() {
        "gru" => {
            let h = n.dims("dynamics_mod.mean_fn.gru_cell.weight_hh", 2)?[1];
            if let Some(w_ih) = n.find("dynamics_mod.mean_fn.gru_cell.weight_ih") {
                if w_ih.shape != [3 * h, 0] {
                    return Err(format!(
                        "xfads model: {pre}dynamics_mod.mean_fn.gru_cell.weight_ih has shape {:?}, expected [{}, 0]: \
                         the GRU cell takes an input, and latentloop's GRU dynamics have none",
                        w_ih.shape,
                        3 * h
                    ));
                }
            }
            for (from, to) in [
                ("z_to_h.weight", "dynamics.w_zh"),
                ("z_to_h.bias", "dynamics.b_zh"),
                ("gru_cell.weight_hh", "dynamics.w_hh"),
                ("gru_cell.bias_hh", "dynamics.b_hh"),
                ("gru_cell.bias_ih", "dynamics.b_ih"),
                ("h_to_z.weight", "dynamics.w_out"),
                ("h_to_z.bias", "dynamics.b_out"),
            ] {
                n.copy(&mut out, &format!("dynamics_mod.mean_fn.{from}"), to)?;
            }
            let rmsnorm = f.meta_opt("rmsnorm")?.ok_or_else(|| {
                format!(
                    "xfads model with GRU dynamics without metadata 'rmsnorm' (xfads's use_layer_norm, which leaves \
                     no trace in the weights and changes the dynamics): {CONVERT} and --rmsnorm"
                )
            })?;
            (DynamicsKind::Gru, h, rmsnorm)
        }
        "linear" => {
            n.copy(&mut out, "dynamics_mod.mean_fn.A.weight", "dynamics.a")?;
            out.insert("dynamics.b", Tensor::vector(vec![0.0; l]));
            (DynamicsKind::Linear, 0, false)
        }
        "diffusion" => {
            if !mean_fn.is_empty() {
                return Err(format!(
                    "xfads model: metadata says dynamics 'diffusion' (the identity, no parameters), but it has {}",
                    mean_fn.join(", ")
                ));
            }
            let eye = (0..l * l).map(|i| if i % (l + 1) == 0 { 1.0 } else { 0.0 }).collect();
            out.insert("dynamics.a", Tensor::matrix(l, l, eye));
            out.insert("dynamics.b", Tensor::vector(vec![0.0; l]));
            (DynamicsKind::Linear, 0, false)
        }
        other => {
            return Err(format!("xfads model with dynamics '{other}': latentloop maps gru, linear and diffusion"));
        }
    };

    let [he, ch] = n.dims("local_encoder.mlp.0.weight", 2)?[..] else { unreachable!() };
    let enc_out = n.dims("local_encoder.mlp.3.weight", 2)?[0];
    if enc_out % l != 0 || enc_out / l < 2 {
        return Err(format!("xfads model: local encoder output {enc_out} is not (r+1) x L with L = {l}"));
    }
    let rank = enc_out / l - 1;
    n.copy(&mut out, "local_encoder.mlp.0.weight", "encoder.w1")?;
    n.copy(&mut out, "local_encoder.mlp.0.bias", "encoder.b1")?;
    n.copy(&mut out, "local_encoder.mlp.3.weight", "encoder.w2")?;
    n.copy(&mut out, "local_encoder.mlp.3.bias", "encoder.b2")?;

    let [n_out, lr] = n.dims("likelihood_pdf.readout_fn.1.weight", 2)?[..] else { unreachable!() };
    if n_out != ch {
        return Err(format!("xfads model: readout has {n_out} neurons but the encoder reads {ch}"));
    }
    n.copy(&mut out, "likelihood_pdf.readout_fn.1.weight", "readout.c")?;
    n.copy(&mut out, "likelihood_pdf.readout_fn.1.bias", "readout.b")?;
    refuse_leftovers(&n)?;

    let behavior_dims = f.meta_opt::<usize>("behavior_dims")?.unwrap_or(0);
    if behavior_dims > 0 {
        for name in ["behavior.d", "behavior.bias"] {
            let t = f.tensors.get(name).ok_or_else(|| format!("behavior_dims > 0 but tensor '{name}' is missing"))?;
            out.insert(name, t.clone());
        }
    }
    let dt: f32 = meta("dt", "the bin width in seconds, xfads's cfg.bin_sz")?
        .parse()
        .map_err(|e| format!("xfads model: metadata 'dt': {e}"))?;
    let card = Card {
        latents: l,
        channels: ch,
        dt,
        samples: f.meta_opt("samples")?.unwrap_or(32),
        dynamics: kind,
        hidden,
        rmsnorm,
        substeps: 1,
        update: UpdateKind::Encoder,
        rank,
        encoder_hidden: he,
        readout: ReadoutKind::Poisson,
        readout_latents: lr,
        behavior_dims,
    };
    card.validate()?;
    card.write_meta(&mut out);
    Ok(out)
}

/// Every tensor of the model that was not mapped is refused by name; the `nl_filter.`
/// copies of mapped ones must equal them (the filter's references to the same modules).
fn refuse_leftovers(n: &Names) -> Result<(), String> {
    let used = n.used.borrow();
    let mut unknown = Vec::new();
    for (k, t) in &n.f.tensors {
        let Some(rest) = k.strip_prefix(n.prefix.as_str()) else { continue };
        if used.contains(k) || rest.starts_with("backward_encoder.") || k.starts_with("behavior.") {
            continue;
        }
        let original = rest.strip_prefix(COPIES).map(|r| format!("{}{r}", n.prefix));
        match original.as_ref().and_then(|o| used.contains(o).then(|| &n.f.tensors[o])) {
            Some(o) if o == t => {}
            Some(_) => {
                return Err(format!(
                    "xfads model: '{k}' differs from '{}', of which it should be the filter's copy",
                    original.unwrap_or_default()
                ))
            }
            None => unknown.push(format!("{k} {:?}", t.shape)),
        }
    }
    if unknown.is_empty() {
        return Ok(());
    }
    Err(format!(
        "xfads model with tensors latentloop does not map: {}; decoding without them would use a different model \
         (mapped: GRU, linear or diffusion dynamics, the low-rank local encoder, a masked linear Poisson readout)",
        unknown.join(", ")
    ))
}
