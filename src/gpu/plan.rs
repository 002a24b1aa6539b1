//! The step of a [`super::GpuBatch`] as a list of kernel launches, planned once at build
//! time, stage by stage in the order of one bin (they read alongside kernels/predict.cu,
//! kernels/update.cu and the CPU's src/filter/mod.rs):
//!
//! 1. [`Plan::noise`]: every normal of the bin (Philox), which does not depend on its data;
//! 2. [`Plan::dynamics`]: F = f(Z) for the S samples (linear, mlp, node's RK4, gru), RMSNorm;
//! 3. [`Plan::prediction`]: m_p, the centred factor M^T and the predictive draws E;
//! 4. [`Plan::potential`]: the bin's (k, K): encoder, Gaussian or Poisson-Laplace;
//! 5. [`Plan::update`]: the r x r algebra, m_f, lag-1 mean, behaviour, posterior draws.

use super::exec::{Exec, Launch, A};
use super::weights::Packed;
use super::OUT_HEADER;
use crate::model::{DynamicsKind, Observation, XfadsModel};
use cudarc::driver::sys::CUdeviceptr;

/// Control words per decoder in the input buffer: [step lo, step hi, flags, 0].
pub(super) const CTRL: usize = 4;
/// Thread block of the tiled kernels (gemm, rk4 stage, predictive draws).
const TILE: (u32, u32, u32) = (32, 8, 1);

fn dim(n: usize, per: usize) -> u32 {
    n.div_ceil(per).max(1) as u32
}

/// Sizes of one decoder.
#[derive(Clone, Copy, Debug)]
pub(super) struct Dims {
    pub(super) b: usize,
    pub(super) s: usize,
    pub(super) l: usize,
    pub(super) r: usize,
    pub(super) n: usize,
    /// Hidden width of the dynamics.
    pub(super) h: usize,
    /// Hidden width of the encoder (0 without one).
    pub(super) he: usize,
    /// Latents the readout sees (Poisson-Laplace update; L otherwise).
    pub(super) lr: usize,
    /// Floats of the potential: (r + 1) L.
    pub(super) kw: usize,
    /// Behaviour dims.
    pub(super) dd: usize,
}

impl Dims {
    pub(super) fn of(m: &XfadsModel, b: usize, samples: Option<usize>) -> Dims {
        let (l, r) = (m.latents(), m.rank());
        let (he, lr) = match &m.observation {
            Observation::Encoder { he, .. } => (*he, l),
            Observation::PoissonLaplace { lr, .. } => (0, *lr),
            Observation::Gaussian { .. } => (0, l),
        };
        Dims {
            b,
            s: samples.unwrap_or(m.card.samples).max(2),
            l,
            r,
            n: m.channels(),
            h: m.dynamics.hidden,
            he,
            lr,
            kw: (r + 1) * l,
            dd: m.behavior.as_ref().map_or(0, |b| b.dims()),
        }
    }
    /// Floats of the update's scratch per decoder (ll_upd_at in kernels/update.cu).
    pub(super) fn scratch(&self) -> usize {
        let (s, l, r) = (self.s, self.l, self.r);
        s * r + l * r + r * l + s + l + r + r + l + l + 3 * r * r + s
    }
    pub(super) fn outw(&self) -> usize {
        OUT_HEADER + 2 * self.l + self.dd
    }
}

/// The device buffers of a batch (pointers into allocations the executor owns).
#[derive(Clone, Copy, Debug)]
pub(super) struct Buffers {
    /// The input: B control rows, then B bins.
    pub(super) din: CUdeviceptr,
    pub(super) dkeys: CUdeviceptr,
    /// The output rows (status, KL, mean, lag-1 mean, behaviour).
    pub(super) dout: CUdeviceptr,
    pub(super) wts: CUdeviceptr,
    /// The samples of q_t (S x L per decoder).
    pub(super) z: CUdeviceptr,
    f: CUdeviceptr,
    mt: CUdeviceptr,
    e: CUdeviceptr,
    w2: CUdeviceptr,
    w1: CUdeviceptr,
    wr: CUdeviceptr,
    mp: CUdeviceptr,
    /// The filtered means (m0 at the start).
    pub(super) mdev: CUdeviceptr,
    hid: CUdeviceptr,
    gates: CUdeviceptr,
    hnew: CUdeviceptr,
    tmp: CUdeviceptr,
    accb: CUdeviceptr,
    kk: CUdeviceptr,
    ehid: CUdeviceptr,
    vp: CUdeviceptr,
    scratch: CUdeviceptr,
    okflag: CUdeviceptr,
}

impl Buffers {
    /// Allocates every buffer of the batch, zeroed; `weights` floats for the packed weights.
    pub(super) fn alloc(exec: &mut dyn Exec, d: &Dims, m: &XfadsModel, weights: usize) -> Result<Buffers, String> {
        let mut alloc = |len: usize| exec.alloc(len);
        let (b, s, l, r, n, h) = (d.b, d.s, d.l, d.r, d.n, d.h.max(1));
        let sl = s * l;
        let gru = m.dynamics.kind == DynamicsKind::Gru;
        let node = m.dynamics.kind == DynamicsKind::Node;
        Ok(Buffers {
            din: alloc(b * CTRL + b * n)?,
            dkeys: alloc(2 * b)?,
            dout: alloc(b * d.outw())?,
            wts: alloc(weights)?,
            z: alloc(b * sl)?,
            f: alloc(b * sl)?,
            mt: alloc(b * sl)?,
            e: alloc(b * sl)?,
            w2: alloc(b * sl)?,
            w1: alloc(b * s * s)?,
            wr: alloc(b * s * r)?,
            mp: alloc(b * l)?,
            mdev: alloc(b * l)?,
            hid: alloc(b * s * h)?,
            gates: alloc(if gru { b * s * 3 * h } else { 1 })?,
            hnew: alloc(if gru { b * s * h } else { 1 })?,
            tmp: alloc(if node { b * sl } else { 1 })?,
            accb: alloc(if node { b * sl } else { 1 })?,
            kk: alloc(b * d.kw)?,
            ehid: alloc(b * d.he.max(1))?,
            vp: alloc(b * n)?,
            scratch: alloc(b * d.scratch())?,
            okflag: alloc(b)?,
        })
    }
}

/// What every stage needs: sizes, strides, buffers, and where each weight is.
#[derive(Clone, Copy)]
pub(super) struct Plan<'a> {
    m: &'a XfadsModel,
    pack: &'a Packed,
    buf: Buffers,
    b: usize,
    s: usize,
    l: usize,
    r: usize,
    n: usize,
    hh: usize,
    he: usize,
    lr: usize,
    kw: usize,
    dd: usize,
    scratch_len: usize,
    outw: usize,
    s_sl: i64,
    s_sh: i64,
    /// Stride between decoders' weights (0 when they share one model).
    s_w: i64,
    inv_s: f32,
    scale: f32,
    ctrl: CUdeviceptr,
    y: CUdeviceptr,
    dummy: CUdeviceptr,
}

impl<'a> Plan<'a> {
    pub(super) fn new(m: &'a XfadsModel, d: &Dims, pack: &'a Packed, buf: Buffers, s_w: i64) -> Self {
        let (s, h) = (d.s, d.h.max(1));
        let inv_s = 1.0f32 / s as f32;
        let dummy = buf.wts + 4 * pack.off("none") as u64;
        Plan {
            m,
            pack,
            buf,
            b: d.b,
            s,
            l: d.l,
            r: d.r,
            n: d.n,
            hh: d.h,
            he: d.he,
            lr: d.lr,
            kw: d.kw,
            dd: d.dd,
            scratch_len: d.scratch(),
            outw: d.outw(),
            s_sl: (s * d.l) as i64,
            s_sh: (s * h) as i64,
            s_w,
            inv_s,
            scale: inv_s.sqrt(),
            ctrl: buf.din,
            y: buf.din + 4 * (d.b * CTRL) as u64,
            dummy,
        }
    }

    /// The whole step, stage by stage.
    pub(super) fn launches(&self) -> Vec<Launch> {
        let mut ops = Vec::new();
        self.noise(&mut ops);
        self.dynamics(&mut ops);
        self.prediction(&mut ops);
        self.potential(&mut ops);
        self.update(&mut ops);
        ops
    }

    /// Device address of a packed weight.
    fn wp(&self, name: &str) -> CUdeviceptr {
        self.buf.wts + 4 * self.pack.off(name) as u64
    }

    /// C = epilogue(A W + bias) for every decoder (`ll_gemm_epi`; `mode` picks the epilogue).
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        ops: &mut Vec<Launch>,
        a: CUdeviceptr,
        s_a: i64,
        w: CUdeviceptr,
        bias: CUdeviceptr,
        cin: CUdeviceptr,
        c: CUdeviceptr,
        s_c: i64,
        (mm, nn, kk_): (usize, usize, usize),
        mode: i32,
    ) {
        let Plan { b, s_w, ctrl, .. } = *self;
        let tile = TILE;
        ops.push((
            "ll_gemm_epi",
            (dim(nn, 32), dim(mm, 32), b as u32),
            tile,
            0,
            vec![
                A::P(ctrl),
                A::P(a),
                A::L(s_a),
                A::P(w),
                A::P(bias),
                A::L(s_w),
                A::P(cin),
                A::P(c),
                A::L(s_c),
                A::I(mm as i32),
                A::I(nn as i32),
                A::I(kk_ as i32),
                A::I(mode),
            ],
        ));
    }

    /// Every normal of the bin: w1, w2 (prediction) and w_r (update).
    fn noise(&self, ops: &mut Vec<Launch>) {
        let Plan { b, s, l, r, ctrl, .. } = *self;
        let Buffers { dkeys, w2, w1, wr, .. } = self.buf;
        let (g1, g2, g3) = (s.div_ceil(4), l.div_ceil(4), r.div_ceil(4));
        ops.push((
            "ll_noise",
            (dim(s * (g1 + g2 + g3), 128), b as u32, 1),
            (128, 1, 1),
            0,
            vec![A::P(ctrl), A::P(dkeys), A::P(w1), A::P(w2), A::P(wr), A::I(s as i32), A::I(l as i32), A::I(r as i32)],
        ));
    }

    /// F = f(Z): the dynamics of every sample, then RMSNorm where the model has it.
    fn dynamics(&self, ops: &mut Vec<Launch>) {
        let Plan { b, s, l, hh, s_sl, s_sh, s_w, ctrl, dummy, .. } = *self;
        let Buffers { z, f, hid, gates, hnew, tmp, accb, .. } = self.buf;
        let tile = TILE;
        match self.m.dynamics.kind {
            DynamicsKind::Linear => {
                self.gemm(ops, z, s_sl, self.wp("dyn.at"), self.wp("dyn.a"), dummy, f, s_sl, (s, l, l), 1)
            }
            DynamicsKind::Mlp => {
                self.gemm(ops, z, s_sl, self.wp("dyn.w1t"), self.wp("dyn.b1"), dummy, hid, s_sh, (s, hh, l), 2);
                self.gemm(ops, hid, s_sh, self.wp("dyn.w2t"), self.wp("dyn.b2"), z, f, s_sl, (s, l, hh), 3);
            }
            DynamicsKind::Node => {
                let sub = self.m.dynamics.substeps.max(1);
                let dt = 1.0f32 / sub as f32;
                let (half, dt6) = (0.5f32 * dt, dt / 6.0f32);
                for k in 0..sub {
                    let x0 = if k == 0 { z } else { f };
                    for stage in 0..4 {
                        let input = if stage == 0 { x0 } else { tmp };
                        self.gemm(
                            ops,
                            input,
                            s_sl,
                            self.wp("dyn.w1t"),
                            self.wp("dyn.b1"),
                            dummy,
                            hid,
                            s_sh,
                            (s, hh, l),
                            2,
                        );
                        ops.push((
                            "ll_rk4_stage",
                            (dim(l, 32), dim(s, 32), b as u32),
                            tile,
                            0,
                            vec![
                                A::P(ctrl),
                                A::P(hid),
                                A::L(s_sh),
                                A::P(self.wp("dyn.w2t")),
                                A::P(self.wp("dyn.b2")),
                                A::L(s_w),
                                A::P(x0),
                                A::P(f),
                                A::P(tmp),
                                A::P(accb),
                                A::L(s_sl),
                                A::I(s as i32),
                                A::I(l as i32),
                                A::I(hh as i32),
                                A::I(stage),
                                A::F(half),
                                A::F(dt),
                                A::F(dt6),
                            ],
                        ));
                    }
                }
            }
            DynamicsKind::Gru => {
                self.gemm(ops, z, s_sl, self.wp("dyn.wzh_t"), self.wp("dyn.bzh"), dummy, hid, s_sh, (s, hh, l), 1);
                self.gemm(ops, hid, s_sh, self.wp("dyn.whh_t"), dummy, dummy, gates, 3 * s_sh, (s, 3 * hh, hh), 0);
                ops.push((
                    "ll_gru_cell",
                    (dim(s * hh, 256), b as u32, 1),
                    (256, 1, 1),
                    0,
                    vec![
                        A::P(ctrl),
                        A::P(hid),
                        A::P(gates),
                        A::P(hnew),
                        A::L(s_sh),
                        A::L(3 * s_sh),
                        A::P(self.wp("dyn.b_r")),
                        A::P(self.wp("dyn.b_u")),
                        A::P(self.wp("dyn.b_in")),
                        A::P(self.wp("dyn.b_hn")),
                        A::L(s_w),
                        A::I(s as i32),
                        A::I(hh as i32),
                    ],
                ));
                self.gemm(ops, hnew, s_sh, self.wp("dyn.wout_t"), self.wp("dyn.bout"), dummy, f, s_sl, (s, l, hh), 1);
            }
        }
        if self.m.dynamics.rmsnorm {
            ops.push((
                "ll_rmsnorm",
                (dim(s, 128), b as u32, 1),
                (128, 1, 1),
                0,
                vec![A::P(ctrl), A::P(f), A::L(s_sl), A::I(s as i32), A::I(l as i32)],
            ));
        }
    }

    /// m_p, M^T and the predictive draws E = M w1 + sqrt(Q) w2.
    fn prediction(&self, ops: &mut Vec<Launch>) {
        let Plan { b, s, l, s_sl, s_w, inv_s, scale, ctrl, .. } = *self;
        let Buffers { f, mt, e, w2, w1, mp, .. } = self.buf;
        let tile = TILE;
        ops.push((
            "ll_moments",
            (dim(l, 128), b as u32, 1),
            (128, 1, 1),
            0,
            vec![
                A::P(ctrl),
                A::P(f),
                A::P(mt),
                A::P(mp),
                A::P(self.wp("m0")),
                A::L(s_w),
                A::L(s_sl),
                A::I(s as i32),
                A::I(l as i32),
                A::F(inv_s),
                A::F(scale),
            ],
        ));
        ops.push((
            "ll_pred_draws",
            (dim(l, 32), dim(s, 32), b as u32),
            tile,
            0,
            vec![
                A::P(ctrl),
                A::P(w1),
                A::P(mt),
                A::P(w2),
                A::P(e),
                A::P(self.wp("sqrt_q")),
                A::P(self.wp("sqrt_q0")),
                A::L(s_w),
                A::I(s as i32),
                A::I(l as i32),
            ],
        ));
    }

    /// The bin's potential (k, K).
    fn potential(&self, ops: &mut Vec<Launch>) {
        let Plan { b, l, n, he, lr, kw, s_w, ctrl, y, .. } = *self;
        let Buffers { mp, kk, ehid, vp, .. } = self.buf;
        match &self.m.observation {
            Observation::Encoder { .. } => {
                ops.push((
                    "ll_enc_hidden",
                    (dim(he, 128), b as u32, 1),
                    (128, 1, 1),
                    0,
                    vec![
                        A::P(ctrl),
                        A::P(y),
                        A::I(n as i32),
                        A::P(self.wp("enc.w1t")),
                        A::P(self.wp("enc.b1")),
                        A::L(s_w),
                        A::P(ehid),
                        A::I(he as i32),
                    ],
                ));
                ops.push((
                    "ll_enc_out",
                    (dim(kw, 128), b as u32, 1),
                    (128, 1, 1),
                    0,
                    vec![
                        A::P(ctrl),
                        A::P(ehid),
                        A::I(he as i32),
                        A::P(self.wp("enc.w2t")),
                        A::P(self.wp("enc.b2")),
                        A::L(s_w),
                        A::P(kk),
                        A::I(kw as i32),
                    ],
                ));
            }
            Observation::Gaussian { .. } => ops.push((
                "ll_pot_gaussian",
                (dim(l * n, 256), b as u32, 1),
                (256, 1, 1),
                0,
                vec![
                    A::P(ctrl),
                    A::P(y),
                    A::I(n as i32),
                    A::P(self.wp("obs.c")),
                    A::P(self.wp("obs.b")),
                    A::P(self.wp("obs.rinv")),
                    A::P(self.wp("obs.kfix")),
                    A::L(s_w),
                    A::P(kk),
                    A::I(l as i32),
                ],
            )),
            Observation::PoissonLaplace { dt, .. } => {
                ops.push((
                    "ll_pot_pl_a",
                    (dim(n, 128), b as u32, 1),
                    (128, 1, 1),
                    0,
                    vec![
                        A::P(ctrl),
                        A::P(y),
                        A::I(n as i32),
                        A::P(self.wp("obs.c")),
                        A::P(self.wp("obs.ct")),
                        A::P(self.wp("obs.b")),
                        A::L(s_w),
                        A::P(mp),
                        A::P(kk),
                        A::P(vp),
                        A::I(l as i32),
                        A::I(lr as i32),
                        A::F(*dt),
                    ],
                ));
                ops.push((
                    "ll_pot_pl_b",
                    (dim(l, 128), b as u32, 1),
                    (128, 1, 1),
                    0,
                    vec![
                        A::P(ctrl),
                        A::I(n as i32),
                        A::P(self.wp("obs.c")),
                        A::L(s_w),
                        A::P(vp),
                        A::P(kk),
                        A::I(l as i32),
                        A::I(lr as i32),
                    ],
                ));
            }
        }
    }

    /// The low-rank update: products, Gram matrix, the r x r core (m_f, lag-1, behaviour,
    /// KL), then the posterior draws.
    fn update(&self, ops: &mut Vec<Launch>) {
        let Plan { b, s, l, r, dd, scratch_len, outw, s_w, inv_s, scale, ctrl, .. } = *self;
        let Buffers { dout, z, mt, e, wr, mp, mdev, kk, scratch, okflag, .. } = self.buf;
        // The update's products, two kernels with one argument list.
        let upd_args = vec![
            A::P(ctrl),
            A::P(kk),
            A::P(mt),
            A::P(mp),
            A::P(self.wp("sqrt_q")),
            A::P(self.wp("sqrt_q0")),
            A::L(s_w),
            A::P(scratch),
            A::L(scratch_len as i64),
            A::I(s as i32),
            A::I(l as i32),
            A::I(r as i32),
        ];
        for (name, outputs) in [("ll_update_products", s * r + l * r + s), ("ll_update_gram", r * r + r * l + l)] {
            ops.push((name, (dim(outputs, 128), b as u32, 1), (128, 1, 1), 0, upd_args.clone()));
        }
        ops.push((
            "ll_update_core",
            (b as u32, 1, 1),
            (512, 1, 1),
            0,
            vec![
                A::P(ctrl),
                A::P(kk),
                A::P(mt),
                A::P(z),
                A::P(mp),
                A::P(mdev),
                A::P(self.wp("m0")),
                A::P(self.wp("beh.d")),
                A::P(self.wp("beh.bias")),
                A::L(s_w),
                A::P(scratch),
                A::L(scratch_len as i64),
                A::P(dout),
                A::I(outw as i32),
                A::P(okflag),
                A::I(s as i32),
                A::I(l as i32),
                A::I(r as i32),
                A::I(dd as i32),
                A::F(inv_s),
                A::F(scale),
            ],
        ));
        ops.push((
            "ll_update_draws",
            (s as u32, b as u32, 1),
            (128, 1, 1),
            (2 * r * 4) as u32,
            vec![
                A::P(ctrl),
                A::P(kk),
                A::P(e),
                A::P(wr),
                A::P(mp),
                A::P(scratch),
                A::L(scratch_len as i64),
                A::P(okflag),
                A::P(z),
                A::I(s as i32),
                A::I(l as i32),
                A::I(r as i32),
            ],
        ));
    }
}
