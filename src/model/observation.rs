//! The observation side: readouts y | z, the update's Gaussian potential (k, K) from a bin
//! (ALGORITHM.md section 3), and the linear behaviour readout.

use super::card::{ReadoutKind, UpdateKind};
use super::file::ModelFile;
use crate::math::fast;
use crate::math::gemm::{gemv, gemv_t};

/// `w` (rows x cols, row-major) transposed.
pub(crate) fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; w.len()];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = w[i * cols + j];
        }
    }
    t
}

/// y | z. Rates are expected counts per bin.
#[derive(Clone, Debug)]
pub enum Readout {
    /// y ~ Poisson(dt exp(C z[:Lr] + b)), C is N x Lr.
    Poisson {
        lr: usize,
        c: Vec<f32>,
        b: Vec<f32>,
        dt: f32,
    },
    /// y = C z + b + v, v ~ N(0, diag(R)), C is N x L.
    Gaussian {
        c: Vec<f32>,
        b: Vec<f32>,
        r: Vec<f32>,
    },
    None,
}

impl Readout {
    pub fn from_file(f: &ModelFile, kind: ReadoutKind, l: usize, lr: usize, n: usize, dt: f32) -> Result<Self, String> {
        Ok(match kind {
            ReadoutKind::Poisson => Readout::Poisson {
                lr,
                c: f.get("readout.c", &[n, lr], "C, N x Lr")?.to_vec(),
                b: f.get("readout.b", &[n], "log-rate bias b, N")?.to_vec(),
                dt,
            },
            ReadoutKind::Gaussian => {
                let r: Vec<f32> = f
                    .get("readout.log_r", &[n], "observation noise, R = softplus(log_r), N")?
                    .iter()
                    .map(|&v| softplus(v))
                    .collect();
                if let Some(i) = r.iter().position(|&v| v <= 0.0) {
                    return Err(format!("readout.log_r[{i}] gives R = 0 (underflow)"));
                }
                Readout::Gaussian {
                    c: f.get("readout.c", &[n, l], "C, N x L")?.to_vec(),
                    b: f.get("readout.b", &[n], "bias b, N")?.to_vec(),
                    r,
                }
            }
            ReadoutKind::None => Readout::None,
        })
    }

    /// Expected observation at latent z (L): Poisson counts per bin, or the Gaussian mean.
    /// False when the model has no readout.
    pub fn mean(&self, z: &[f32], out: &mut [f32]) -> bool {
        match self {
            Readout::Poisson { lr, c, b, dt } => {
                let n = b.len();
                gemv(out, c, n, *lr, &z[..*lr], 1.0, false);
                for (o, bi) in out[..n].iter_mut().zip(b) {
                    *o = dt * (*o + bi).exp();
                }
                true
            }
            Readout::Gaussian { c, b, .. } => {
                let n = b.len();
                gemv(out, c, n, c.len() / n, z, 1.0, false);
                out[..n].iter_mut().zip(b).for_each(|(o, bi)| *o += bi);
                true
            }
            Readout::None => false,
        }
    }
}

/// How a bin becomes the potential exp(k^T z - z^T K K^T z / 2).
#[derive(Clone, Debug)]
pub enum Observation {
    /// XFADS local encoder: out = W2 silu(W1 y + b1) + b2, k = out[:L], K = out[L:] (L x r).
    /// Both weights are kept transposed: products become sums of scaled rows (no horizontal
    /// sums), and W1's rows for silent channels are skipped.
    Encoder { r: usize, he: usize, w1t: Vec<f32>, b1: Vec<f32>, w2t: Vec<f32>, b2: Vec<f32> },
    /// Exact linear-Gaussian: k = C^T R^-1 (y - b), K = C^T R^-1/2 (constant).
    Gaussian { c: Vec<f32>, b: Vec<f32>, rinv: Vec<f32>, kfix: Vec<f32> },
    /// Point-process (Laplace at the predicted mean).
    PoissonLaplace { lr: usize, c: Vec<f32>, ct: Vec<f32>, b: Vec<f32>, dt: f32 },
}

/// Per-bin buffers of `potential`.
#[derive(Clone, Debug)]
pub struct Scratch {
    hid: Vec<f32>,
    v: Vec<f32>,
}

impl Observation {
    pub fn from_file(
        f: &ModelFile,
        kind: UpdateKind,
        readout: &Readout,
        l: usize,
        n: usize,
        r: usize,
        he: usize,
    ) -> Result<Self, String> {
        Ok(match (kind, readout) {
            (UpdateKind::Encoder, _) => {
                let w1 = f.get("encoder.w1", &[he, n], "encoder W1, H_enc x N")?;
                let w2 = f.get("encoder.w2", &[(r + 1) * l, he], "encoder W2, (r+1)L x H_enc")?;
                Observation::Encoder {
                    r,
                    he,
                    w1t: transpose(w1, he, n),
                    b1: f.get("encoder.b1", &[he], "encoder b1, H_enc")?.to_vec(),
                    w2t: transpose(w2, (r + 1) * l, he),
                    b2: f.get("encoder.b2", &[(r + 1) * l], "encoder b2, (r+1)L")?.to_vec(),
                }
            }
            (UpdateKind::Gaussian, Readout::Gaussian { c, b, r: rv }) => {
                let rinv: Vec<f32> = rv.iter().map(|v| 1.0 / v).collect();
                let mut kfix = vec![0.0; l * n];
                for i in 0..l {
                    for j in 0..n {
                        kfix[i * n + j] = c[j * l + i] * rinv[j].sqrt();
                    }
                }
                Observation::Gaussian { c: c.clone(), b: b.clone(), rinv, kfix }
            }
            (UpdateKind::PoissonLaplace, Readout::Poisson { lr, c, b, dt }) => {
                Observation::PoissonLaplace { lr: *lr, c: c.clone(), ct: transpose(c, n, *lr), b: b.clone(), dt: *dt }
            }
            (k, _) => return Err(format!("the {k} update does not fit this readout")),
        })
    }

    /// The same update with `channels` treated as missing. The Gaussian and Poisson-Laplace
    /// updates drop their rows (a zero row of C contributes nothing to k and K: exactly the
    /// update without those channels). A learned encoder cannot drop an input, so it sees 0
    /// counts there (zero-fill; the cost is documented in docs/CONTROL.md: a silent channel
    /// still means something to the encoder, biasing the potential where that channel
    /// usually fires).
    pub fn masked(&self, channels: &[usize]) -> Observation {
        let mut o = self.clone();
        match &mut o {
            Observation::Encoder { he, w1t, .. } => {
                for &j in channels {
                    w1t[j * *he..(j + 1) * *he].fill(0.0);
                }
            }
            Observation::Gaussian { c, b, kfix, .. } => {
                let (n, l) = (b.len(), c.len() / b.len().max(1));
                for &j in channels {
                    c[j * l..(j + 1) * l].fill(0.0);
                    for i in 0..l {
                        kfix[i * n + j] = 0.0;
                    }
                }
            }
            Observation::PoissonLaplace { lr, c, ct, b, .. } => {
                let (n, lr) = (b.len(), *lr);
                for &j in channels {
                    c[j * lr..(j + 1) * lr].fill(0.0);
                    for i in 0..lr {
                        ct[i * n + j] = 0.0;
                    }
                }
            }
        }
        o
    }

    /// r, the number of columns of K.
    pub fn rank(&self) -> usize {
        match self {
            Observation::Encoder { r, .. } => *r,
            Observation::Gaussian { b, .. } | Observation::PoissonLaplace { b, .. } => b.len(),
        }
    }

    pub fn scratch(&self) -> Scratch {
        let (h, v) = match self {
            Observation::Encoder { he, .. } => (*he, 0),
            Observation::Gaussian { b, .. } | Observation::PoissonLaplace { b, .. } => (0, b.len()),
        };
        Scratch { hid: vec![0.0; h], v: vec![0.0; v] }
    }

    /// Writes the potential of bin `y` (N) into `kk` = [k (L) | K (L x r, row-major)];
    /// `mp` (L) is the predicted mean.
    pub fn potential(&self, y: &[f32], mp: &[f32], kk: &mut [f32], scr: &mut Scratch) {
        let l = mp.len();
        match self {
            Observation::Encoder { r, he, w1t, b1, w2t, b2 } => {
                let hid = &mut scr.hid;
                hid.copy_from_slice(b1);
                gemv_t(hid, w1t, y.len(), *he, y, 1.0, true);
                fast::silu_inplace(hid);
                let out = &mut kk[..(r + 1) * l];
                out.copy_from_slice(b2);
                gemv_t(out, w2t, *he, (r + 1) * l, hid, 1.0, true);
            }
            Observation::Gaussian { c, b, rinv, kfix } => {
                let n = b.len();
                let w = &mut scr.v;
                for j in 0..n {
                    w[j] = (y[j] - b[j]) * rinv[j];
                }
                let (k, kmat) = kk.split_at_mut(l);
                gemv_t(k, c, n, l, w, 1.0, false);
                kmat[..l * n].copy_from_slice(kfix);
            }
            Observation::PoissonLaplace { lr, c, ct, b, dt } => {
                let (n, lr) = (b.len(), *lr);
                let v = &mut scr.v;
                gemv(v, c, n, lr, &mp[..lr], 1.0, false);
                let (k, kmat) = kk.split_at_mut(l);
                // K = [C^T diag(sqrt lam); 0]: rows beyond Lr do not see the data.
                for j in 0..n {
                    let lam = dt * crate::math::fast::exp(v[j] + b[j]);
                    let sq = lam.sqrt();
                    for i in 0..lr {
                        kmat[i * n + j] = ct[i * n + j] * sq;
                    }
                    // k = C^T (y - lam) + K K^T m_p = C^T (y - lam + lam * C m_p)
                    v[j] = y[j] - lam + lam * v[j];
                }
                kmat[lr * n..l * n].fill(0.0);
                gemv_t(k, c, n, lr, v, 1.0, false);
                k[lr..].fill(0.0);
            }
        }
    }
}

/// u = D z + d, the behaviour readout fitted by ridge regression.
#[derive(Clone, Debug)]
pub struct Behavior {
    pub d: Vec<f32>,
    pub bias: Vec<f32>,
}

impl Behavior {
    pub fn dims(&self) -> usize {
        self.bias.len()
    }
    pub fn apply(&self, z: &[f32], out: &mut [f32]) {
        let dd = self.bias.len();
        gemv(out, &self.d, dd, z.len(), z, 1.0, false);
        out[..dd].iter_mut().zip(&self.bias).for_each(|(o, b)| *o += b);
    }
}

/// PyTorch softplus (beta 1), overflow-safe.
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

/// Inverse of softplus, for writing Q back as log_q.
pub fn softplus_inv(y: f32) -> f32 {
    if y > 20.0 {
        y
    } else {
        (y.exp_m1()).ln()
    }
}
