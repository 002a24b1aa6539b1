//! Counter-based normal draws: Philox4x32-10 (Salmon et al., SC'11) and Box-Muller.
//!
//! Every draw of the filter is a pure function of (seed, step, purpose, sample, index), so a
//! GPU kernel computes the same numbers in any order, a step can be replayed, and no
//! generator state has to be carried or locked. The layout below is part of the model
//! contract with `kernels/philox.cuh`; change both or neither.
//!
//! counter = [index / 4, sample, step as u32, purpose | (step >> 32) << 8],
//! key     = [seed as u32, seed >> 32].
//! Each block gives 4 uniforms u = (x >> 8 + 0.5) 2^-24 in (0, 1) and, by Box-Muller on the
//! pairs (u0, u1) and (u2, u3), the normals index 4b .. 4b+3:
//! n0 = r(u0) cos 2 pi u1, n1 = r(u0) sin 2 pi u1, n2 = r(u2) cos 2 pi u3, n3 = r(u2) sin 2 pi u3,
//! with r(u) = sqrt(-2 ln u).

use super::fast;

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// What a draw is for; keeps the filter's noise streams disjoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Purpose {
    /// w1_s in R^S: combination weights of the centred predictive factor.
    PredictMix = 0,
    /// w2_s in R^L: the diagonal process-noise part of a predictive draw (and step 0's prior).
    PredictDiag = 1,
    /// w_s in R^r: the update's extra noise for exact posterior draws.
    Update = 2,
    /// Simulators and training (never collides with the filter's streams).
    Sim = 8,
    Train = 9,
}

/// The Philox4x32-10 bijection.
#[inline(always)]
pub fn philox4x32_10(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = ctr;
    let (mut k0, mut k1) = (key[0], key[1]);
    for round in 0..10 {
        if round > 0 {
            k0 = k0.wrapping_add(W0);
            k1 = k1.wrapping_add(W1);
        }
        let p0 = M0 as u64 * c[0] as u64;
        let p1 = M1 as u64 * c[2] as u64;
        c = [(p1 >> 32) as u32 ^ c[1] ^ k0, p1 as u32, (p0 >> 32) as u32 ^ c[3] ^ k1, p0 as u32];
    }
    c
}

#[inline(always)]
fn uniform(x: u32) -> f32 {
    ((x >> 8) as f32 + 0.5) * (1.0 / 16_777_216.0)
}

/// Blocks per vectorised pass (64 normals).
const LANES: usize = 16;

/// A keyed family of normal streams.
#[derive(Clone, Copy, Debug)]
pub struct Normals {
    key: [u32; 2],
    /// Whether the AVX-512 compilation may be used (where the CPU has it): 16-lane products
    /// and three-way XORs roughly halve the instructions per normal. `portable` clears it.
    wide: bool,
}

impl Normals {
    pub fn new(seed: u64) -> Self {
        Normals { key: [seed as u32, (seed >> 32) as u32], wide: true }
    }

    /// The same generator restricted to the portable (AVX2 or scalar) path, for tests and
    /// benches that compare the two paths.
    pub fn portable(seed: u64) -> Self {
        Normals { wide: false, ..Self::new(seed) }
    }

    /// Fills `out` with normals 0..out.len() of the stream (step, purpose, sample).
    pub fn fill(&self, step: u64, purpose: Purpose, sample: u32, out: &mut [f32]) {
        let cols = out.len();
        self.fill_matrix(step, purpose, sample, out, cols)
    }

    /// Fills a row-major `rows x cols` matrix, row s from stream sample `s`.
    pub fn fill_rows(&self, step: u64, purpose: Purpose, out: &mut [f32], cols: usize) {
        self.fill_matrix(step, purpose, 0, out, cols)
    }

    /// Row i of `out` (rows x cols) is the stream of sample `first + i`. The lanes of a pass
    /// run over all (row, block) pairs, so short rows (L or r normals) waste no draws.
    fn fill_matrix(&self, step: u64, purpose: Purpose, first: u32, out: &mut [f32], cols: usize) {
        if cols == 0 || out.is_empty() {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if self.wide && super::has_avx512() {
            // SAFETY: `wide` is set only when the CPU reports these features.
            unsafe { self.fill_avx512(step, purpose, first, out, cols) };
            return;
        }
        self.fill_any(step, purpose, first, out, cols)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,avx512dq")]
    unsafe fn fill_avx512(&self, step: u64, purpose: Purpose, first: u32, out: &mut [f32], cols: usize) {
        self.fill_any(step, purpose, first, out, cols)
    }

    #[inline(always)]
    fn fill_any(&self, step: u64, purpose: Purpose, first: u32, out: &mut [f32], cols: usize) {
        let c2 = step as u32;
        let c3 = purpose as u32 | (((step >> 32) as u32) << 8);
        let rows = out.len() / cols;
        let per_row = cols.div_ceil(4);
        let mut buf = [0f32; 4 * LANES];
        if per_row >= LANES {
            // Long rows: a pass is LANES consecutive blocks of one row.
            for (r, row) in out.chunks_exact_mut(cols).enumerate() {
                for (pass, dst) in row.chunks_mut(4 * LANES).enumerate() {
                    let c0: [u32; LANES] = std::array::from_fn(|l| (pass * LANES + l) as u32);
                    let c1 = [first + r as u32; LANES];
                    match <&mut [f32; 4 * LANES]>::try_from(&mut *dst) {
                        Ok(full) => self.normals_block(&c0, &c1, c2, c3, full),
                        Err(_) => {
                            self.normals_block(&c0, &c1, c2, c3, &mut buf);
                            dst.copy_from_slice(&buf[..dst.len()]);
                        }
                    }
                }
            }
        } else {
            // Short rows (L or r normals): a pass holds whole rows, in a fixed lane pattern.
            let per_pass = LANES / per_row;
            let c0: [u32; LANES] = std::array::from_fn(|l| (l % per_row) as u32);
            for (pass, dst) in out.chunks_mut(per_pass * cols).enumerate() {
                let row0 = pass * per_pass;
                let c1: [u32; LANES] =
                    std::array::from_fn(|l| first + (row0 + (l / per_row).min(per_pass - 1)).min(rows - 1) as u32);
                // Rows of whole blocks filling every lane: the pass is already in place.
                if cols % 4 == 0 && per_pass * per_row == LANES && dst.len() == 4 * LANES {
                    self.normals_block(&c0, &c1, c2, c3, dst.try_into().unwrap());
                    continue;
                }
                self.normals_block(&c0, &c1, c2, c3, &mut buf);
                for (k, row) in dst.chunks_mut(cols).enumerate() {
                    row.copy_from_slice(&buf[4 * per_row * k..4 * per_row * k + cols]);
                }
            }
        }
    }

    /// The 4 normals of each of LANES blocks (counter words c0, c1 per lane). The Philox
    /// words are made by scalar code (64-bit multiplies give both halves at once; AVX2's
    /// 32x32 multiply needs shuffles that cost more), Box-Muller on all lanes at once (ln,
    /// sqrt, sincos vectorise).
    #[inline(always)]
    fn normals_block(&self, c0: &[u32; LANES], c1: &[u32; LANES], c2: u32, c3: u32, out: &mut [f32; 4 * LANES]) {
        // Radii from words 0 and 2, angles from words 1 and 3.
        let mut rad = [0f32; 2 * LANES];
        let mut ang = [0f32; 2 * LANES];
        for l in 0..LANES {
            let x = philox4x32_10([c0[l], c1[l], c2, c3], self.key);
            rad[l] = uniform(x[0]);
            ang[l] = uniform(x[1]);
            rad[LANES + l] = uniform(x[2]);
            ang[LANES + l] = uniform(x[3]);
        }
        let mut cs = [0f32; 2 * LANES];
        let mut sn = [0f32; 2 * LANES];
        for i in 0..2 * LANES {
            let r = (-2.0 * fast::ln(rad[i])).sqrt();
            let (c, s) = fast::sincos_2pi(ang[i]);
            cs[i] = r * c;
            sn[i] = r * s;
        }
        for l in 0..LANES {
            out[4 * l] = cs[l];
            out[4 * l + 1] = sn[l];
            out[4 * l + 2] = cs[LANES + l];
            out[4 * l + 3] = sn[LANES + l];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn philox_known_answers_from_random123() {
        assert_eq!(philox4x32_10([0; 4], [0; 2]), [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]);
        assert_eq!(philox4x32_10([u32::MAX; 4], [u32::MAX; 2]), [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]);
        assert_eq!(
            philox4x32_10([0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0]),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn fill_is_a_function_of_the_counter_only() {
        let g = Normals::new(0x1234_5678_9abc);
        let mut long = vec![0.0; 77];
        g.fill(5, Purpose::Update, 3, &mut long);
        let mut short = vec![0.0; 13];
        g.fill(5, Purpose::Update, 3, &mut short);
        assert_eq!(&long[..13], &short[..]);
        // Normal 8 is the cosine half of block 2's first pair: the documented layout.
        let x = philox4x32_10([2, 3, 5, Purpose::Update as u32], g.key);
        let r = (-2.0 * fast::ln(uniform(x[0]))).sqrt();
        assert_eq!(long[8], r * fast::sincos_2pi(uniform(x[1])).0);
        assert_eq!(long[9], r * fast::sincos_2pi(uniform(x[1])).1);
        let mut other = vec![0.0; 13];
        g.fill(5, Purpose::Update, 4, &mut other);
        assert_ne!(other, short);
    }

    #[test]
    fn a_matrix_fill_is_its_rows_filled_one_by_one() {
        let g = Normals::new(3);
        for cols in [1usize, 3, 4, 6, 8, 33] {
            let rows = 7;
            let mut m = vec![0.0; rows * cols];
            g.fill_rows(11, Purpose::PredictDiag, &mut m, cols);
            for r in 0..rows {
                let mut row = vec![0.0; cols];
                g.fill(11, Purpose::PredictDiag, r as u32, &mut row);
                assert_eq!(&m[r * cols..(r + 1) * cols], &row[..], "cols {cols} row {r}");
            }
        }
    }

    #[test]
    fn wide_and_portable_paths_draw_identical_numbers() {
        let (a, b) = (Normals::new(42), Normals::portable(42));
        for len in [1usize, 7, 64, 65, 1000] {
            let (mut x, mut y) = (vec![0.0; len], vec![0.0; len]);
            a.fill(3, Purpose::PredictMix, 9, &mut x);
            b.fill(3, Purpose::PredictMix, 9, &mut y);
            assert_eq!(x, y, "len {len}");
        }
    }

    #[test]
    fn normals_have_standard_moments() {
        let g = Normals::new(7);
        let n = 1 << 20;
        let mut v = vec![0.0f32; n];
        g.fill(0, Purpose::Sim, 0, &mut v);
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n as f64;
        let kurt = v.iter().map(|&x| (x as f64 - mean).powi(4)).sum::<f64>() / n as f64 / (var * var);
        // Standard errors at n = 2^20: mean 1e-3, variance 1.4e-3, kurtosis 4.8e-3.
        assert!(mean.abs() < 5e-3, "mean {mean}");
        assert!((var - 1.0).abs() < 7e-3, "var {var}");
        assert!((kurt - 3.0).abs() < 0.03, "kurtosis {kurt}");
        // Tail mass beyond 3 sigma: 0.0027 expected, s.e. 5e-5.
        let tail = v.iter().filter(|x| x.abs() > 3.0).count() as f64 / n as f64;
        assert!((tail - 0.0027).abs() < 3e-4, "tail {tail}");
    }
}
