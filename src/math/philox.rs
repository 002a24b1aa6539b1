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

/// Blocks per vectorised pass (128 normals): two registers of 16, whose independent
/// Philox chains overlap.
const LANES: usize = 32;

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
        self.fill_any::<false>(step, purpose, first, out, cols)
    }

    /// # Safety
    ///
    /// The CPU must have AVX-512 F, VL and DQ (`super::has_avx512()`).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,avx512dq")]
    unsafe fn fill_avx512(&self, step: u64, purpose: Purpose, first: u32, out: &mut [f32], cols: usize) {
        // `fill_any::<true>` reaches the AVX-512 kernel only through this function, whose
        // caller checked the CPU's features.
        self.fill_any::<true>(step, purpose, first, out, cols)
    }

    /// One pass of LANES blocks: the AVX-512 kernel (`WIDE`, only reached from
    /// `fill_avx512`) or the portable code.
    #[inline(always)]
    fn block<const WIDE: bool>(
        &self,
        c0: &[u32; LANES],
        c1: &[u32; LANES],
        c2: u32,
        c3: u32,
        out: &mut [f32; 4 * LANES],
    ) {
        #[cfg(target_arch = "x86_64")]
        if WIDE {
            // SAFETY: WIDE is true only inside `fill_avx512`, entered when the CPU has AVX-512.
            unsafe { wide::normals_block(c0, c1, c2, c3, self.key, out) };
            return;
        }
        self.normals_block(c0, c1, c2, c3, out)
    }

    #[inline(always)]
    fn fill_any<const WIDE: bool>(&self, step: u64, purpose: Purpose, first: u32, out: &mut [f32], cols: usize) {
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
                        Ok(full) => self.block::<WIDE>(&c0, &c1, c2, c3, full),
                        Err(_) => {
                            self.block::<WIDE>(&c0, &c1, c2, c3, &mut buf);
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
                if cols.is_multiple_of(4) && per_pass * per_row == LANES && dst.len() == 4 * LANES {
                    self.block::<WIDE>(&c0, &c1, c2, c3, dst.try_into().unwrap());
                    continue;
                }
                self.block::<WIDE>(&c0, &c1, c2, c3, &mut buf);
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

/// The same pass written with AVX-512 intrinsics: Philox on 16 counters per register and
/// Box-Muller on whole registers, the four normals of each block interleaved in registers.
/// Compiled from the portable code, the pass spends as long in moving words between stack
/// arrays as in the arithmetic. Every operation is the portable code's, in its order (IEEE
/// add, multiply, divide, square root and fused multiply-add round alike), so both draw the
/// same bits (tested).
#[cfg(target_arch = "x86_64")]
mod wide {
    use super::{fast::LN2, LANES, M0, M1, W0, W1};
    use std::arch::x86_64::*;

    /// `super::uniform` in one FMA: f 2^-24 + 2^-25 rounded once equals (f + 0.5) rounded,
    /// then scaled by 2^-24 exactly (a power of two, no subnormals), for every f < 2^24
    /// (test `uniform_as_one_fma_is_exact`).
    ///
    /// # Safety
    ///
    /// The CPU must have AVX-512 F (called only from `normals_block`).
    #[inline(always)]
    unsafe fn uniform(x: __m512i) -> __m512 {
        // SAFETY: register-only intrinsics, inside `normals_block`'s AVX-512 features.
        unsafe {
            let f = _mm512_cvtepi32_ps(_mm512_srli_epi32::<8>(x));
            _mm512_fmadd_ps(f, _mm512_set1_ps(1.0 / 16_777_216.0), _mm512_set1_ps(0.5 / 16_777_216.0))
        }
    }

    /// sqrt(-2 ln u), `fast::ln` lane by lane.
    ///
    /// # Safety
    ///
    /// The CPU must have AVX-512 F and DQ (called only from `normals_block`).
    #[inline(always)]
    unsafe fn radius(u: __m512) -> __m512 {
        // SAFETY: register-only intrinsics, inside `normals_block`'s AVX-512 features.
        unsafe {
            let bits = _mm512_castps_si512(u);
            let e = _mm512_sub_epi32(
                _mm512_and_si512(_mm512_srli_epi32::<23>(bits), _mm512_set1_epi32(0xff)),
                _mm512_set1_epi32(127),
            );
            let m = _mm512_castsi512_ps(_mm512_or_si512(
                _mm512_and_si512(bits, _mm512_set1_epi32(0x007f_ffff)),
                _mm512_set1_epi32(0x3f80_0000),
            ));
            let big = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(m, _mm512_set1_ps(std::f32::consts::SQRT_2));
            let m = _mm512_mask_mul_ps(m, big, m, _mm512_set1_ps(0.5));
            let e = _mm512_mask_add_epi32(e, big, e, _mm512_set1_epi32(1));
            let one = _mm512_set1_ps(1.0);
            let s = _mm512_div_ps(_mm512_sub_ps(m, one), _mm512_add_ps(m, one));
            let s2 = _mm512_mul_ps(s, s);
            let mut p = _mm512_set1_ps(1.0 / 9.0);
            p = _mm512_fmadd_ps(p, s2, _mm512_set1_ps(1.0 / 7.0));
            p = _mm512_fmadd_ps(p, s2, _mm512_set1_ps(1.0 / 5.0));
            p = _mm512_fmadd_ps(p, s2, _mm512_set1_ps(1.0 / 3.0));
            p = _mm512_fmadd_ps(p, s2, one);
            let two_s_p = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(2.0), s), p);
            let ln = _mm512_fmadd_ps(_mm512_cvtepi32_ps(e), _mm512_set1_ps(LN2), two_s_p);
            _mm512_sqrt_ps(_mm512_mul_ps(_mm512_set1_ps(-2.0), ln))
        }
    }

    /// (cos 2 pi u, sin 2 pi u), `fast::sincos_2pi` lane by lane.
    ///
    /// # Safety
    ///
    /// The CPU must have AVX-512 F and DQ (called only from `normals_block`).
    #[inline(always)]
    unsafe fn sincos(u: __m512) -> (__m512, __m512) {
        // SAFETY: register-only intrinsics, inside `normals_block`'s AVX-512 features.
        unsafe {
            const FLOOR: i32 = _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC;
            let qf = _mm512_roundscale_ps::<FLOOR>(_mm512_add_ps(
                _mm512_mul_ps(_mm512_set1_ps(4.0), u),
                _mm512_set1_ps(0.5),
            ));
            let x = _mm512_mul_ps(
                _mm512_sub_ps(u, _mm512_mul_ps(_mm512_set1_ps(0.25), qf)),
                _mm512_set1_ps(std::f32::consts::TAU),
            );
            let x2 = _mm512_mul_ps(x, x);
            let mut s = _mm512_set1_ps(1.0 / 362_880.0);
            s = _mm512_fmadd_ps(s, x2, _mm512_set1_ps(-1.0 / 5040.0));
            s = _mm512_fmadd_ps(s, x2, _mm512_set1_ps(1.0 / 120.0));
            s = _mm512_fmadd_ps(s, x2, _mm512_set1_ps(-1.0 / 6.0));
            s = _mm512_fmadd_ps(_mm512_mul_ps(s, x2), x, x);
            let mut c = _mm512_set1_ps(-1.0 / 3_628_800.0);
            c = _mm512_fmadd_ps(c, x2, _mm512_set1_ps(1.0 / 40320.0));
            c = _mm512_fmadd_ps(c, x2, _mm512_set1_ps(-1.0 / 720.0));
            c = _mm512_fmadd_ps(c, x2, _mm512_set1_ps(1.0 / 24.0));
            c = _mm512_fmadd_ps(c, x2, _mm512_set1_ps(-0.5));
            c = _mm512_fmadd_ps(c, x2, _mm512_set1_ps(1.0));
            // The quadrant q = qf mod 4 as an integer (qf is a small whole number): odd q swaps
            // cos and sin, q in {1, 2} negates the cosine, q in {2, 3} the sine.
            let q = _mm512_cvttps_epi32(qf);
            let bit = |v: __m512i, b: i32| _mm512_test_epi32_mask(v, _mm512_set1_epi32(b));
            let swap = bit(q, 1);
            let (cs, sn) = (_mm512_mask_blend_ps(swap, c, s), _mm512_mask_blend_ps(swap, s, c));
            let sign = _mm512_set1_ps(-0.0);
            let neg = |v: __m512, k: __mmask16| _mm512_mask_xor_ps(v, k, v, sign);
            (neg(cs, bit(_mm512_add_epi32(q, _mm512_set1_epi32(1)), 2)), neg(sn, bit(q, 2)))
        }
    }

    /// # Safety
    ///
    /// The CPU must have AVX-512 F, VL and DQ.
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl,avx512dq")]
    pub(super) unsafe fn normals_block(
        c0: &[u32; LANES],
        c1: &[u32; LANES],
        c2: u32,
        c3: u32,
        key: [u32; 2],
        out: &mut [f32; 4 * LANES],
    ) {
        // SAFETY: the caller checked the features; the loads and stores are of the
        // fixed-size arrays passed in (LANES counters in, 4 LANES normals out).
        unsafe {
            // Each 32-bit word lives in the low half of a 64-bit lane (8 lanes per register,
            // HALVES registers): one multiply gives the product's high word (>> 32) and its low
            // word in place. The high halves of the lanes fill with junk that no multiply reads
            // (it takes the low halves only) and XOR never moves down. The HALVES independent
            // chains are interleaved so the multiplies' latency overlaps.
            const HALVES: usize = LANES / 8;
            let half =
                |v: &[u32; LANES], h: usize| _mm512_cvtepu32_epi64(_mm256_loadu_si256(v.as_ptr().add(8 * h).cast()));
            let mut x0: [__m512i; HALVES] = std::array::from_fn(|h| half(c0, h));
            let mut x1: [__m512i; HALVES] = std::array::from_fn(|h| half(c1, h));
            let mut x2 = [_mm512_set1_epi64(c2 as i64); HALVES];
            let mut x3 = [_mm512_set1_epi64(c3 as i64); HALVES];
            let (m0, m1) = (_mm512_set1_epi64(M0 as i64), _mm512_set1_epi64(M1 as i64));
            let (mut k0, mut k1) = (key[0], key[1]);
            for round in 0..10 {
                if round > 0 {
                    k0 = k0.wrapping_add(W0);
                    k1 = k1.wrapping_add(W1);
                }
                let (kv0, kv1) = (_mm512_set1_epi64(k0 as i64), _mm512_set1_epi64(k1 as i64));
                for h in 0..HALVES {
                    let p0 = _mm512_mul_epu32(x0[h], m0);
                    let p1 = _mm512_mul_epu32(x2[h], m1);
                    // 0x96: a ^ b ^ c.
                    x0[h] = _mm512_ternarylogic_epi64::<0x96>(_mm512_srli_epi64::<32>(p1), x1[h], kv0);
                    x2[h] = _mm512_ternarylogic_epi64::<0x96>(_mm512_srli_epi64::<32>(p0), x3[h], kv1);
                    x1[h] = p1;
                    x3[h] = p0;
                }
            }
            // Back to 16 words per register: the even (low) 32-bit halves of two registers.
            let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
            for g in 0..HALVES / 2 {
                let word = |x: &[__m512i; HALVES]| _mm512_permutex2var_epi32(x[2 * g], even, x[2 * g + 1]);
                let (ra, rb) = (radius(uniform(word(&x0))), radius(uniform(word(&x2))));
                let ((ca, sa), (cb, sb)) = (sincos(uniform(word(&x1))), sincos(uniform(word(&x3))));
                let (a, b, c, d) =
                    (_mm512_mul_ps(ra, ca), _mm512_mul_ps(ra, sa), _mm512_mul_ps(rb, cb), _mm512_mul_ps(rb, sb));
                // Block l's normals (a_l, b_l, c_l, d_l) go to out[4l..4l+4]: a 4 x 16 transpose.
                let (t0, t1) = (_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
                let (t2, t3) = (_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
                let pd = _mm512_castps_pd;
                let ps = _mm512_castpd_ps;
                let u0 = ps(_mm512_unpacklo_pd(pd(t0), pd(t2)));
                let u1 = ps(_mm512_unpackhi_pd(pd(t0), pd(t2)));
                let u2 = ps(_mm512_unpacklo_pd(pd(t1), pd(t3)));
                let u3 = ps(_mm512_unpackhi_pd(pd(t1), pd(t3)));
                let v0 = _mm512_shuffle_f32x4::<0b01_00_01_00>(u0, u1);
                let v1 = _mm512_shuffle_f32x4::<0b01_00_01_00>(u2, u3);
                let v2 = _mm512_shuffle_f32x4::<0b11_10_11_10>(u0, u1);
                let v3 = _mm512_shuffle_f32x4::<0b11_10_11_10>(u2, u3);
                let o = out.as_mut_ptr().add(64 * g);
                _mm512_storeu_ps(o, _mm512_shuffle_f32x4::<0b10_00_10_00>(v0, v1));
                _mm512_storeu_ps(o.add(16), _mm512_shuffle_f32x4::<0b11_01_11_01>(v0, v1));
                _mm512_storeu_ps(o.add(32), _mm512_shuffle_f32x4::<0b10_00_10_00>(v2, v3));
                _mm512_storeu_ps(o.add(48), _mm512_shuffle_f32x4::<0b11_01_11_01>(v2, v3));
            }
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
    fn uniform_as_one_fma_is_exact() {
        // What the AVX-512 kernel computes, for every 24-bit value.
        for f in 0..1u32 << 24 {
            let one_fma = (f as f32).mul_add(1.0 / 16_777_216.0, 0.5 / 16_777_216.0);
            assert_eq!(one_fma.to_bits(), uniform(f << 8).to_bits(), "f = {f}");
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
