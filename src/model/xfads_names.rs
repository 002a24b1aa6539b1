//! Reading a catniplab/xfads checkpoint saved as safetensors (e.g. with
//! `safetensors.torch.save_file(model.state_dict(), path, metadata={"dt": "0.02", "rmsnorm": "true"})`).
//!
//! Mapping (an optional prefix such as `ssm.` is accepted; the `nl_filter.` copies of shared
//! modules are ignored):
//!
//! | xfads key | latentloop tensor |
//! | --- | --- |
//! | `dynamics_mod.log_Q` | `dynamics.log_q` |
//! | `dynamics_mod.mean_fn.z_to_h.{weight,bias}` | `dynamics.w_zh`, `dynamics.b_zh` |
//! | `dynamics_mod.mean_fn.gru_cell.weight_hh` / `bias_hh` / `bias_ih` | `dynamics.w_hh` / `b_hh` / `b_ih` |
//! | `dynamics_mod.mean_fn.h_to_z.{weight,bias}` | `dynamics.w_out`, `dynamics.b_out` |
//! | `dynamics_mod.mean_fn.A.weight` (linear) | `dynamics.a` (bias 0) |
//! | `initial_c_pdf.m_0`, `initial_c_pdf.log_Q_0` | `init.m0`, `init.log_q0` |
//! | `local_encoder.mlp.0.{weight,bias}` | `encoder.w1`, `encoder.b1` |
//! | `local_encoder.mlp.3.{weight,bias}` | `encoder.w2`, `encoder.b2` |
//! | `likelihood_pdf.readout_fn.1.{weight,bias}` | `readout.c`, `readout.b` (Poisson) |
//!
//! `gru_cell.weight_ih` must be empty (3H x 0: the cell has no input). `backward_encoder.*`
//! is dropped: it looks at future bins, which a causal decoder cannot. What the weights do
//! not say must be in the metadata: `dt` (bin width in seconds) and `rmsnorm` (xfads's
//! `use_layer_norm`); `samples` (default 32) and `behavior_dims` are optional.

use super::card::{Card, DynamicsKind, ReadoutKind, UpdateKind};
use super::file::{ModelFile, Tensor};

const ANCHOR: &str = "dynamics_mod.log_Q";

pub fn looks_like_xfads(f: &ModelFile) -> bool {
    !f.meta.contains_key("format") && f.tensors.keys().any(|k| k.ends_with(ANCHOR))
}

pub fn convert(f: &ModelFile) -> Result<ModelFile, String> {
    let anchor = f
        .tensors
        .keys()
        .filter(|k| k.ends_with(ANCHOR))
        .min_by_key(|k| (k.contains("nl_filter."), k.len()))
        .ok_or("no dynamics_mod.log_Q tensor")?;
    let prefix = &anchor[..anchor.len() - ANCHOR.len()];
    let get = |name: &str| -> Result<&Tensor, String> {
        f.tensors
            .get(&format!("{prefix}{name}"))
            .ok_or_else(|| format!("xfads checkpoint: missing tensor '{prefix}{name}'"))
    };
    let dims = |name: &str, rank: usize| -> Result<Vec<usize>, String> {
        let t = get(name)?;
        if t.shape.len() != rank {
            return Err(format!(
                "xfads checkpoint: '{prefix}{name}' has shape {:?}, expected {rank} dimensions",
                t.shape
            ));
        }
        Ok(t.shape.clone())
    };
    let mut out = ModelFile::default();
    let copy = |out: &mut ModelFile, from: &str, to: &str| -> Result<(), String> {
        out.insert(to, get(from)?.clone());
        Ok(())
    };

    let l = dims("dynamics_mod.log_Q", 1)?[0];
    copy(&mut out, "dynamics_mod.log_Q", "dynamics.log_q")?;
    copy(&mut out, "initial_c_pdf.m_0", "init.m0")?;
    copy(&mut out, "initial_c_pdf.log_Q_0", "init.log_q0")?;

    let (dynamics, hidden) = if get("dynamics_mod.mean_fn.gru_cell.weight_hh").is_ok() {
        let h = dims("dynamics_mod.mean_fn.gru_cell.weight_hh", 2)?[1];
        if let Ok(w_ih) = get("dynamics_mod.mean_fn.gru_cell.weight_ih") {
            if w_ih.shape != [3 * h, 0] {
                return Err(format!(
                    "xfads checkpoint: gru_cell.weight_ih has shape {:?}; only input-free cells (shape [{}, 0]) are supported",
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
            copy(&mut out, &format!("dynamics_mod.mean_fn.{from}"), to)?;
        }
        (DynamicsKind::Gru, h)
    } else if get("dynamics_mod.mean_fn.A.weight").is_ok() {
        copy(&mut out, "dynamics_mod.mean_fn.A.weight", "dynamics.a")?;
        out.insert("dynamics.b", Tensor::vector(vec![0.0; l]));
        (DynamicsKind::Linear, 0)
    } else {
        return Err("xfads checkpoint: only GRU (mean_fn.gru_cell) and linear (mean_fn.A) dynamics are mapped".into());
    };

    let [he, n] = dims("local_encoder.mlp.0.weight", 2)?[..] else { unreachable!() };
    let enc_out = dims("local_encoder.mlp.3.weight", 2)?[0];
    if enc_out % l != 0 || enc_out / l < 2 {
        return Err(format!("xfads checkpoint: local encoder output {enc_out} is not (r+1) x L with L = {l}"));
    }
    let rank = enc_out / l - 1;
    copy(&mut out, "local_encoder.mlp.0.weight", "encoder.w1")?;
    copy(&mut out, "local_encoder.mlp.0.bias", "encoder.b1")?;
    copy(&mut out, "local_encoder.mlp.3.weight", "encoder.w2")?;
    copy(&mut out, "local_encoder.mlp.3.bias", "encoder.b2")?;

    let [n_out, lr] = dims("likelihood_pdf.readout_fn.1.weight", 2)?[..] else { unreachable!() };
    if n_out != n {
        return Err(format!("xfads checkpoint: readout has {n_out} neurons but the encoder reads {n}"));
    }
    copy(&mut out, "likelihood_pdf.readout_fn.1.weight", "readout.c")?;
    copy(&mut out, "likelihood_pdf.readout_fn.1.bias", "readout.b")?;

    let behavior_dims = f.meta_opt::<usize>("behavior_dims")?.unwrap_or(0);
    if behavior_dims > 0 {
        for name in ["behavior.d", "behavior.bias"] {
            let t = f.tensors.get(name).ok_or_else(|| format!("behavior_dims > 0 but tensor '{name}' is missing"))?;
            out.insert(name, t.clone());
        }
    }
    let card = Card {
        latents: l,
        channels: n,
        dt: f
            .meta_opt("dt")?
            .ok_or("xfads checkpoint: add metadata 'dt' (the bin width in seconds, xfads's bin_sz)")?,
        samples: f.meta_opt("samples")?.unwrap_or(32),
        dynamics,
        hidden,
        rmsnorm: f
            .meta_opt("rmsnorm")?
            .ok_or("xfads checkpoint: add metadata 'rmsnorm' = 'true' or 'false' (xfads's use_layer_norm)")?,
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
