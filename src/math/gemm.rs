//! Small dense matrix products for the per-bin path.
//!
//! Why our own: `matrixmultiply` and `gemm` both allocate packing buffers on every call, and
//! the per-bin step must not touch the heap. At the filter's shapes (tens to a few hundred
//! rows and columns) packing does not pay for itself anyway: B's column panel stays in L1
//! while we sweep A, so a 6x16 register-blocked FMA kernel reaches most of one core's peak.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};

/// Which routine made a product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Gemm,
    Gemv,
    GemvT,
}

/// The shape of one product `(m x k) . (k x n)`, as recorded by [`record`]. For `GemvT`, `k`
/// counts only the rows it used: it skips the rows whose `x` is zero, so a replay of the
/// shape does the work the step did, no more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub op: Op,
    pub m: usize,
    pub k: usize,
    pub n: usize,
}

impl Shape {
    pub fn flops(&self) -> f64 {
        2.0 * (self.m * self.k * self.n) as f64
    }
}

static RECORDING: AtomicBool = AtomicBool::new(false);
thread_local! {
    static SHAPES: RefCell<Vec<Shape>> = const { RefCell::new(Vec::new()) };
}

#[inline(always)]
fn note(op: Op, m: usize, k: usize, n: usize) {
    // One relaxed load per product when not recording; benches only.
    if RECORDING.load(Ordering::Relaxed) {
        SHAPES.with(|v| v.borrow_mut().push(Shape { op, m, k, n }));
    }
}

/// Runs `f` and returns the shapes of every product it made on this thread, so the benches
/// can count a step's arithmetic and replay its products alone (the "products-only" floor)
/// without a second, drifting description of the step.
pub fn record<R>(f: impl FnOnce() -> R) -> (R, Vec<Shape>) {
    SHAPES.with(|v| v.borrow_mut().clear());
    RECORDING.store(true, Ordering::SeqCst);
    let r = f();
    RECORDING.store(false, Ordering::SeqCst);
    (r, SHAPES.with(|v| std::mem::take(&mut *v.borrow_mut())))
}

/// A read-only strided view: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major `rows x cols` matrix stored densely.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        assert!(data.len() >= rows * cols, "matrix buffer too short");
        MatRef { data, rows, cols, rs: cols, cs: 1 }
    }

    /// The transpose, as a view (no copy).
    pub fn t(self) -> Self {
        MatRef { data: self.data, rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs }
    }

    fn check(&self) {
        if self.rows > 0 && self.cols > 0 {
            let last = (self.rows - 1) * self.rs + (self.cols - 1) * self.cs;
            assert!(last < self.data.len(), "matrix view out of bounds");
        }
    }
}

/// `C = alpha * A B + (accumulate ? C : 0)`, C row-major `m x n` with row stride `ldc`.
///
/// A may have any strides (so `A^T` is free); B must have contiguous rows (`cs == 1`), which
/// the filter's layouts are chosen to give.
pub fn gemm(c: &mut [f32], ldc: usize, a: MatRef, b: MatRef, alpha: f32, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "inner dimensions differ");
    assert_eq!(b.cs, 1, "B must have contiguous rows");
    a.check();
    b.check();
    note(Op::Gemm, m, k, n);
    if m == 0 || n == 0 {
        return;
    }
    assert!(ldc >= n && (m - 1) * ldc + n <= c.len(), "C buffer too short");
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                c[i * ldc..i * ldc + n].fill(0.0);
            }
        }
        return;
    }
    // SAFETY: every index the kernels touch was bounds-checked above.
    unsafe { imp::gemm(c.as_mut_ptr(), ldc, a, b, alpha, accumulate) }
}

/// `y = alpha * A x + (accumulate ? y : 0)` with A row-major (`rows x cols`, contiguous rows).
pub fn gemv(y: &mut [f32], a: &[f32], rows: usize, cols: usize, x: &[f32], alpha: f32, accumulate: bool) {
    assert!(a.len() >= rows * cols && x.len() >= cols && y.len() >= rows);
    note(Op::Gemv, rows, cols, 1);
    for (i, yi) in y[..rows].iter_mut().enumerate() {
        let d = dot(&a[i * cols..(i + 1) * cols], &x[..cols]) * alpha;
        *yi = if accumulate { *yi + d } else { d };
    }
}

/// `y = alpha * A^T x + (accumulate ? y : 0)` with A row-major (`rows x cols`): a sum of
/// scaled rows, which skips rows whose `x` is zero (sparse spike counts are mostly zeros).
/// Four rows at a time, so `y` is loaded and stored once per four rows; the FMAs are chained
/// in row order, so the result is that of one row at a time, bit for bit.
pub fn gemv_t(y: &mut [f32], a: &[f32], rows: usize, cols: usize, x: &[f32], alpha: f32, accumulate: bool) {
    assert!(a.len() >= rows * cols && x.len() >= rows && y.len() >= cols);
    if RECORDING.load(Ordering::Relaxed) {
        note(Op::GemvT, 1, x[..rows].iter().filter(|v| **v != 0.0).count(), cols);
    }
    let y = &mut y[..cols];
    if !accumulate {
        y.fill(0.0);
    }
    let row = |i: usize| &a[i * cols..(i + 1) * cols];
    let (mut idx, mut k) = ([0usize; 4], 0);
    for (i, &xi) in x[..rows].iter().enumerate() {
        if xi != 0.0 {
            idx[k] = i;
            k += 1;
            if k == 4 {
                let c = idx.map(|j| alpha * x[j]);
                axpy4(y, c, [row(idx[0]), row(idx[1]), row(idx[2]), row(idx[3])]);
                k = 0;
            }
        }
    }
    for &j in &idx[..k] {
        axpy(y, alpha * x[j], row(j));
    }
}

super::avx512_twin! {
    /// y += c0 r0 + c1 r1 + c2 r2 + c3 r3, accumulated in that order.
    fn axpy4(y: &mut [f32], c: [f32; 4], r: [&[f32]; 4]) {
        let n = y.len();
        let (r0, r1, r2, r3) = (&r[0][..n], &r[1][..n], &r[2][..n], &r[3][..n]);
        for j in 0..n {
            let mut t = c[0].mul_add(r0[j], y[j]);
            t = c[1].mul_add(r1[j], t);
            t = c[2].mul_add(r2[j], t);
            y[j] = c[3].mul_add(r3[j], t);
        }
    }
}

/// Dot product with eight independent partial sums, so it vectorises.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    if a.len() < 16 {
        // Short rows (r-sized): the chunked form's set-up would cost more than the work.
        return a.iter().zip(b).fold(0.0, |s, (x, y)| x.mul_add(*y, s));
    }
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s = x.mul_add(*y, s);
    }
    s
}

/// `y += alpha * x`.
pub fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    assert_eq!(y.len(), x.len());
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi = alpha.mul_add(*xi, *yi);
    }
}

#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
mod imp {
    use super::MatRef;
    use std::arch::x86_64::*;

    const MR: usize = 6;
    const NR: usize = 16;

    pub unsafe fn gemm(c: *mut f32, ldc: usize, a: MatRef, b: MatRef, alpha: f32, acc: bool) {
        let (m, k, n) = (a.rows, a.cols, b.cols);
        let (ap, bp) = (a.data.as_ptr(), b.data.as_ptr());
        // Column panels outermost: the k x 16 panel of B stays in L1 while all of A streams by.
        let mut j0 = 0;
        while j0 < n {
            let w = (n - j0).min(NR);
            let bj = bp.add(j0);
            let mut i0 = 0;
            while i0 < m {
                let h = (m - i0).min(MR);
                let ai = ap.add(i0 * a.rs);
                let ci = c.add(i0 * ldc + j0);
                if w == NR {
                    match h {
                        6 => tile::<6, false>(k, ai, a.rs, a.cs, bj, b.rs, ci, ldc, w, alpha, acc),
                        5 => tile::<5, false>(k, ai, a.rs, a.cs, bj, b.rs, ci, ldc, w, alpha, acc),
                        4 => tile::<4, false>(k, ai, a.rs, a.cs, bj, b.rs, ci, ldc, w, alpha, acc),
                        3 => tile::<3, false>(k, ai, a.rs, a.cs, bj, b.rs, ci, ldc, w, alpha, acc),
                        2 => tile::<2, false>(k, ai, a.rs, a.cs, bj, b.rs, ci, ldc, w, alpha, acc),
                        _ => tile::<1, false>(k, ai, a.rs, a.cs, bj, b.rs, ci, ldc, w, alpha, acc),
                    }
                } else {
                    match h {
                        6 => tile::<6, true>(k, ai, a.rs, a.cs, bj, b.rs, ci, ldc, w, alpha, acc),
                        5 => tile::<5, true>(k, ai, a.rs, a.cs, bj, b.rs, ci, ldc, w, alpha, acc),
                        4 => tile::<4, true>(k, ai, a.rs, a.cs, bj, b.rs, ci, ldc, w, alpha, acc),
                        3 => tile::<3, true>(k, ai, a.rs, a.cs, bj, b.rs, ci, ldc, w, alpha, acc),
                        2 => tile::<2, true>(k, ai, a.rs, a.cs, bj, b.rs, ci, ldc, w, alpha, acc),
                        _ => tile::<1, true>(k, ai, a.rs, a.cs, bj, b.rs, ci, ldc, w, alpha, acc),
                    }
                }
                i0 += MR;
            }
            j0 += NR;
        }
    }

    #[inline(always)]
    unsafe fn lane_mask(live: usize) -> __m256i {
        let idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        _mm256_cmpgt_epi32(_mm256_set1_epi32(live as i32), idx)
    }

    /// One `H x w` tile of C (w <= 16; MASKED when w < 16): H * 2 accumulators live in
    /// registers for the whole k loop.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const H: usize, const MASKED: bool>(
        k: usize,
        a: *const f32,
        rsa: usize,
        csa: usize,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        w: usize,
        alpha: f32,
        accumulate: bool,
    ) {
        let (m0, m1) = if MASKED {
            (lane_mask(w.min(8)), lane_mask(w.saturating_sub(8)))
        } else {
            (_mm256_set1_epi32(-1), _mm256_set1_epi32(-1))
        };
        let two = !MASKED || w > 8;
        let mut acc0 = [_mm256_setzero_ps(); H];
        let mut acc1 = [_mm256_setzero_ps(); H];
        let mut bp = b;
        let mut ap = a;
        for _ in 0..k {
            let (b0, b1) = if MASKED {
                let b0 = _mm256_maskload_ps(bp, m0);
                let b1 = if two { _mm256_maskload_ps(bp.add(8), m1) } else { _mm256_setzero_ps() };
                (b0, b1)
            } else {
                (_mm256_loadu_ps(bp), _mm256_loadu_ps(bp.add(8)))
            };
            for r in 0..H {
                let av = _mm256_broadcast_ss(&*ap.add(r * rsa));
                acc0[r] = _mm256_fmadd_ps(av, b0, acc0[r]);
                if two {
                    acc1[r] = _mm256_fmadd_ps(av, b1, acc1[r]);
                }
            }
            bp = bp.add(ldb);
            ap = ap.add(csa);
        }
        let al = _mm256_set1_ps(alpha);
        for r in 0..H {
            let cr = c.add(r * ldc);
            let mut v0 = _mm256_mul_ps(acc0[r], al);
            let mut v1 = _mm256_mul_ps(acc1[r], al);
            if MASKED {
                if accumulate {
                    v0 = _mm256_add_ps(v0, _mm256_maskload_ps(cr, m0));
                    if two {
                        v1 = _mm256_add_ps(v1, _mm256_maskload_ps(cr.add(8), m1));
                    }
                }
                _mm256_maskstore_ps(cr, m0, v0);
                if two {
                    _mm256_maskstore_ps(cr.add(8), m1, v1);
                }
            } else {
                if accumulate {
                    v0 = _mm256_add_ps(v0, _mm256_loadu_ps(cr));
                    v1 = _mm256_add_ps(v1, _mm256_loadu_ps(cr.add(8)));
                }
                _mm256_storeu_ps(cr, v0);
                _mm256_storeu_ps(cr.add(8), v1);
            }
        }
    }
}

#[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
mod imp {
    use super::MatRef;

    /// Portable fallback: correct everywhere, fast nowhere.
    pub unsafe fn gemm(c: *mut f32, ldc: usize, a: MatRef, b: MatRef, alpha: f32, acc: bool) {
        let (m, k, n) = (a.rows, a.cols, b.cols);
        for i in 0..m {
            let ci = std::slice::from_raw_parts_mut(c.add(i * ldc), n);
            if !acc {
                ci.fill(0.0);
            }
            for p in 0..k {
                let aip = alpha * a.data[i * a.rs + p * a.cs];
                let bp = &b.data[p * b.rs..p * b.rs + n];
                for (cj, bj) in ci.iter_mut().zip(bp) {
                    *cj = aip.mul_add(*bj, *cj);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: MatRef, b: MatRef) -> Vec<f64> {
        let mut c = vec![0.0f64; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                for p in 0..a.cols {
                    c[i * b.cols + j] += a.data[i * a.rs + p * a.cs] as f64 * b.data[p * b.rs + j * b.cs] as f64;
                }
            }
        }
        c
    }

    fn filled(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 2001) as f32 / 1000.0 - 1.0).collect()
    }

    #[test]
    fn gemm_matches_f64_reference_on_every_tail_shape() {
        for &(m, k, n) in &[(1, 1, 1), (7, 5, 3), (6, 16, 16), (13, 33, 17), (64, 32, 8), (24, 40, 31), (5, 0, 4)] {
            let a = filled(m * k, 1);
            let at = filled(k * m, 2);
            let b = filled(k * n, 3);
            for (av, label) in [(MatRef::new(&a, m, k), "A"), (MatRef::new(&at, k, m).t(), "A^T")] {
                let bv = MatRef::new(&b, k, n);
                let want = naive(av, bv);
                for acc in [false, true] {
                    let mut c = vec![0.5f32; m * n + 3];
                    gemm(&mut c, n, av, bv, -2.0, acc);
                    for i in 0..m * n {
                        let base = if acc { 0.5 } else { 0.0 };
                        let w = base - 2.0 * want[i];
                        assert!(
                            (c[i] as f64 - w).abs() < 1e-4 * (1.0 + w.abs()),
                            "{label} {m}x{k}x{n} acc={acc} i={i}: {} vs {w}",
                            c[i]
                        );
                    }
                    assert_eq!(&c[m * n..], &[0.5; 3], "wrote past C");
                }
            }
        }
    }

    #[test]
    fn gemv_forms_agree_with_reference() {
        let (r, c) = (11, 19);
        let a = filled(r * c, 4);
        let x = filled(c, 5);
        let xr = filled(r, 6);
        let mut y = vec![0.0; r];
        gemv(&mut y, &a, r, c, &x, 1.0, false);
        let mut yt = vec![1.0; c];
        gemv_t(&mut yt, &a, r, c, &xr, 1.0, true);
        for i in 0..r {
            let w: f64 = (0..c).map(|j| a[i * c + j] as f64 * x[j] as f64).sum();
            assert!((y[i] as f64 - w).abs() < 1e-5);
        }
        for j in 0..c {
            let w: f64 = 1.0 + (0..r).map(|i| a[i * c + j] as f64 * xr[i] as f64).sum::<f64>();
            assert!((yt[j] as f64 - w).abs() < 1e-5);
        }
    }
}
