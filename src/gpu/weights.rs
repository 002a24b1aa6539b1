//! The model's weights as one flat f32 buffer for the device, uploaded once, in the compute
//! layout the CPU filter uses (`Dynamics::compiled_tensors`).

use crate::model::{DynamicsKind, Observation, XfadsModel};
use std::collections::HashMap;

/// Named slices of one flat buffer.
#[derive(Clone, Debug, Default)]
pub struct Packed {
    pub data: Vec<f32>,
    offsets: HashMap<&'static str, (usize, usize)>,
}

impl Packed {
    fn put(&mut self, name: &'static str, v: &[f32]) {
        // 16-byte alignment of every tensor (float4-friendly, and tidy).
        while !self.data.len().is_multiple_of(4) {
            self.data.push(0.0);
        }
        self.offsets.insert(name, (self.data.len(), v.len()));
        self.data.extend_from_slice(v);
    }

    /// Offset (in floats) of a tensor; the scratch float at the end for tensors the model
    /// does not have (kernels given it never read it).
    pub fn off(&self, name: &str) -> usize {
        self.offsets.get(name).map_or(self.data.len() - 1, |o| o.0)
    }

    #[cfg(test)]
    pub fn get(&self, name: &str) -> Option<&[f32]> {
        self.offsets.get(name).map(|&(o, n)| &self.data[o..o + n])
    }
}

fn field<'a>(t: &[(&'static str, &'a [f32])], name: &str, len: usize) -> Result<&'a [f32], String> {
    let v =
        t.iter().find(|(n, _)| *n == name).map(|(_, v)| *v).ok_or_else(|| format!("dynamics weight {name} missing"))?;
    if v.len() != len {
        return Err(format!("dynamics weight {name} has {} values, expected {len}", v.len()));
    }
    Ok(v)
}

/// Packs everything the kernels read. Layout names are the kernels' parameter names.
pub fn pack(model: &XfadsModel) -> Result<Packed, String> {
    let (l, h) = (model.latents(), model.dynamics.hidden);
    let mut p = Packed::default();
    p.put("m0", &model.m0);
    let sq: Vec<f32> = model.q.iter().map(|q| q.sqrt()).collect();
    let sq0: Vec<f32> = model.q0.iter().map(|q| q.sqrt()).collect();
    p.put("sqrt_q", &sq);
    p.put("sqrt_q0", &sq0);
    let t = model.dynamics.compiled_tensors();
    match model.dynamics.kind {
        DynamicsKind::Linear => {
            p.put("dyn.at", field(&t, "at", l * l)?);
            p.put("dyn.a", field(&t, "a", l)?);
        }
        DynamicsKind::Mlp | DynamicsKind::Node => {
            p.put("dyn.w1t", field(&t, "w1t", l * h)?);
            p.put("dyn.b1", field(&t, "b1", h)?);
            p.put("dyn.w2t", field(&t, "w2t", h * l)?);
            p.put("dyn.b2", field(&t, "b2", l)?);
        }
        DynamicsKind::Gru => {
            p.put("dyn.wzh_t", field(&t, "wzh_t", l * h)?);
            p.put("dyn.bzh", field(&t, "bzh", h)?);
            p.put("dyn.whh_t", field(&t, "whh_t", h * 3 * h)?);
            p.put("dyn.b_r", field(&t, "b_r", h)?);
            p.put("dyn.b_u", field(&t, "b_u", h)?);
            p.put("dyn.b_in", field(&t, "b_in", h)?);
            p.put("dyn.b_hn", field(&t, "b_hn", h)?);
            p.put("dyn.wout_t", field(&t, "wout_t", h * l)?);
            p.put("dyn.bout", field(&t, "bout", l)?);
        }
    }
    match &model.observation {
        Observation::Encoder { w1t, b1, w2t, b2, .. } => {
            p.put("enc.w1t", w1t);
            p.put("enc.b1", b1);
            p.put("enc.w2t", w2t);
            p.put("enc.b2", b2);
        }
        Observation::Gaussian { c, b, rinv, kfix } => {
            p.put("obs.c", c);
            p.put("obs.b", b);
            p.put("obs.rinv", rinv);
            p.put("obs.kfix", kfix);
        }
        Observation::PoissonLaplace { c, ct, b, .. } => {
            p.put("obs.c", c);
            p.put("obs.ct", ct);
            p.put("obs.b", b);
        }
    }
    if let Some(bh) = &model.behavior {
        p.put("beh.d", &bh.d);
        p.put("beh.bias", &bh.bias);
    }
    p.data.push(0.0); // the scratch float `off` falls back to
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{build, Card, ReadoutKind, UpdateKind};

    fn card(d: DynamicsKind) -> Card {
        Card {
            latents: 5,
            channels: 7,
            dt: 0.01,
            samples: 8,
            dynamics: d,
            hidden: 6,
            rmsnorm: false,
            substeps: 2,
            update: UpdateKind::Encoder,
            rank: 2,
            encoder_hidden: 9,
            readout: ReadoutKind::Poisson,
            readout_latents: 5,
            behavior_dims: 2,
        }
    }

    fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        let mut t = vec![0.0; w.len()];
        for i in 0..rows {
            for j in 0..cols {
                t[j * rows + i] = w[i * cols + j];
            }
        }
        t
    }

    fn same_bits(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    }

    #[test]
    fn packed_dynamics_weights_are_the_files_transposed_bit_for_bit() {
        let (l, h) = (5, 6);
        for kind in [DynamicsKind::Linear, DynamicsKind::Mlp, DynamicsKind::Node, DynamicsKind::Gru] {
            let mut f = build::random(&card(kind), 3, 0.05, 0.3);
            // Awkward values: subnormal, huge, negative zero, many digits.
            if kind == DynamicsKind::Mlp {
                let mut w1 = f.get("dynamics.w1", &[h, l], "").unwrap().to_vec();
                w1[0] = 1e-42;
                w1[1] = -3.4e38;
                w1[2] = -0.0;
                w1[3] = 0.1 + 0.2;
                f.insert("dynamics.w1", crate::model::Tensor::matrix(h, l, w1));
            }
            let m = XfadsModel::compile(&f).unwrap();
            let p = pack(&m).unwrap();
            let get = |n: &str, s: &[usize]| f.get(n, s, "").unwrap().to_vec();
            match kind {
                DynamicsKind::Linear => {
                    assert!(same_bits(p.get("dyn.at").unwrap(), &transpose(&get("dynamics.a", &[l, l]), l, l)));
                }
                DynamicsKind::Mlp | DynamicsKind::Node => {
                    assert!(same_bits(p.get("dyn.w1t").unwrap(), &transpose(&get("dynamics.w1", &[h, l]), h, l)));
                    assert!(same_bits(p.get("dyn.w2t").unwrap(), &transpose(&get("dynamics.w2", &[l, h]), l, h)));
                    assert!(same_bits(p.get("dyn.b2").unwrap(), &get("dynamics.b2", &[l])));
                }
                DynamicsKind::Gru => {
                    let whh = get("dynamics.w_hh", &[3 * h, h]);
                    assert!(same_bits(p.get("dyn.whh_t").unwrap(), &transpose(&whh, 3 * h, h)));
                    assert!(same_bits(p.get("dyn.wout_t").unwrap(), &transpose(&get("dynamics.w_out", &[l, h]), l, h)));
                }
            }
            assert!(same_bits(p.get("m0").unwrap(), &m.m0));
            assert_eq!(p.off("no such tensor"), p.data.len() - 1);
        }
    }
}
