//! Small dense matrix products for the per-bin path.
//!
//! Why our own: `matrixmultiply` and `gemm` both allocate packing buffers on every call, and
//! the per-bin step must not touch the heap. At the filter's shapes (tens to a few hundred
//! rows and columns) packing does not pay for itself anyway: B's column panel stays in L1
//! while we sweep A, so a register-blocked FMA kernel (3 x 32 tiles) reaches most of one core's peak.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};

/// Which routine made a product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Gemm,
    /// A product with [`Weights`]: B read from its contiguous column panels.
    GemmWeights,
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
    gemm_unrecorded(c, ldc, a, b, alpha, accumulate)
}

fn gemm_unrecorded(c: &mut [f32], ldc: usize, a: MatRef, b: MatRef, alpha: f32, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
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

/// Columns per panel of the AVX2 kernel (four vectors) and of [`Weights`].
const PANEL: usize = 32;

/// A constant right-hand factor B (k x n, row-major; a model's weights in compute layout),
/// kept twice: row-major, which the GPU upload and training read (`Deref`), and as column
/// panels of [`PANEL`] columns, each a contiguous k x w block, which [`gemm_weights`] reads.
/// Why: B's rows are n floats apart, and at n = 384 (the GRU's 3H) the 128 rows of one panel
/// fall into a sixteenth of L1's sets and evict each other; a contiguous panel does not.
/// Measured on the GRU's 64 x 128 x 384 product: 62 -> 85 GFLOP/s.
#[derive(Clone, Debug)]
pub struct Weights {
    k: usize,
    n: usize,
    rows: Vec<f32>,
    panels: Vec<f32>,
}

impl Weights {
    /// From a row-major `k x n` matrix.
    pub fn new(rows: Vec<f32>, k: usize, n: usize) -> Self {
        assert_eq!(rows.len(), k * n, "weights: {k} x {n} needs {} values", k * n);
        let mut panels = Vec::with_capacity(k * n);
        for j0 in (0..n).step_by(PANEL) {
            let w = (n - j0).min(PANEL);
            for row in rows.chunks_exact(n) {
                panels.extend_from_slice(&row[j0..j0 + w]);
            }
        }
        Weights { k, n, rows, panels }
    }
    pub fn rows(&self) -> usize {
        self.k
    }
    pub fn cols(&self) -> usize {
        self.n
    }
}

impl std::ops::Deref for Weights {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.rows
    }
}

/// `C = alpha * A B + (accumulate ? C : 0)` with B given as [`Weights`]: the same
/// arithmetic as [`gemm`], bit for bit, panel by panel.
pub fn gemm_weights(c: &mut [f32], ldc: usize, a: MatRef, b: &Weights, alpha: f32, accumulate: bool) {
    let (m, k, n) = (a.rows, b.k, b.n);
    assert_eq!(a.cols, k, "inner dimensions differ");
    a.check();
    note(Op::GemmWeights, m, k, n);
    if m == 0 || n == 0 {
        return;
    }
    assert!(ldc >= n && (m - 1) * ldc + n <= c.len(), "C buffer too short");
    for j0 in (0..n).step_by(PANEL) {
        let w = (n - j0).min(PANEL);
        let panel = MatRef::new(&b.panels[j0 * k..j0 * k + k * w], k, w);
        gemm_unrecorded(&mut c[j0..], ldc, a, panel, alpha, accumulate);
    }
}

/// `y = alpha * A x + (accumulate ? y : 0)` with A row-major (`rows x cols`, contiguous rows).
pub fn gemv(y: &mut [f32], a: &[f32], rows: usize, cols: usize, x: &[f32], alpha: f32, accumulate: bool) {
    assert!(a.len() >= rows * cols && x.len() >= cols && y.len() >= rows);
    note(Op::Gemv, rows, cols, 1);
    let x = &x[..cols];
    let put = |yi: &mut f32, d: f32| {
        let d = d * alpha;
        *yi = if accumulate { *yi + d } else { d };
    };
    let whole = rows / 8 * 8;
    for (i, y8) in y[..whole].chunks_exact_mut(8).enumerate() {
        let d = dot8(&a[8 * i * cols..8 * (i + 1) * cols], cols, x);
        y8.iter_mut().zip(d).for_each(|(yi, d)| put(yi, d));
    }
    for (i, yi) in y[..rows].iter_mut().enumerate().skip(whole) {
        put(yi, dot(&a[i * cols..(i + 1) * cols], x));
    }
}

/// `dot` of each of 8 consecutive rows (`a` is 8 x cols) with `x`, bit for bit, computed
/// together so that the rows' FMA chains overlap.
fn dot8(a: &[f32], cols: usize, x: &[f32]) -> [f32; 8] {
    assert!(a.len() == 8 * cols && x.len() == cols);
    if cols < 16 {
        // Short rows are one FMA chain each (see `dot`): eight chains interleaved.
        let mut s = [0f32; 8];
        for (j, xj) in x.iter().enumerate() {
            for (r, s) in s.iter_mut().enumerate() {
                *s = a[r * cols + j].mul_add(*xj, *s);
            }
        }
        return s;
    }
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    // SAFETY: a holds 8 rows of cols and x holds cols (asserted above).
    unsafe {
        imp::dot8(a.as_ptr(), cols, x.as_ptr())
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
    std::array::from_fn(|r| dot(&a[r * cols..(r + 1) * cols], x))
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

    const NR: usize = super::PANEL;

    /// Why these tiles (measured on Zen 3, products of a filter step timed old against new):
    /// a 3 x 32 tile does 12 FMAs per 3 broadcasts of A (6 x 16: per 6) and was 10-20%
    /// faster on the filter's shapes, so on this core the broadcasts, not the FMAs, seem to
    /// bound 6 x 16. Narrower panels (the last one, or n = r) use 4 x 24, 6 x 16 and 8 x 8
    /// tiles: at least 8 accumulators, enough independent FMA chains for both pipes, and
    /// only the last vector is masked. Every element of C is one FMA chain over k in order,
    /// whatever the tile: the result is the same bit for bit (the GPU kernels rely on it).
    ///
    /// # Safety
    ///
    /// `c` must be valid for reads and writes of `a.rows` rows of `b.cols` floats at row stride
    /// `ldc`, and `a`, `b` must be views whose strides stay inside their data (`super::gemm`
    /// checks all of it before calling).
    pub unsafe fn gemm(c: *mut f32, ldc: usize, a: MatRef, b: MatRef, alpha: f32, acc: bool) {
        // SAFETY: the caller's contract: every A, B and C index the panels, tiles and tails
        // touch lies inside the views and C (see `# Safety`); AVX2 and FMA are compiled in.
        unsafe {
            let (m, k, n) = (a.rows, a.cols, b.cols);
            let (ap, bp) = (a.data.as_ptr(), b.data.as_ptr());
            // Column panels outermost: the k x 32 panel of B stays in L1 while all of A streams by.
            let mut j0 = 0;
            while j0 < n {
                let w = (n - j0).min(NR);
                let p = Panel { k, a: ap, rsa: a.rs, csa: a.cs, b: bp.add(j0), ldb: b.rs, tail: w - 8 * ((w - 1) / 8) };
                let cj = c.add(j0);
                match (w.div_ceil(8), p.tail == 8) {
                    (4, true) => rows::<3, 4, true, false>(&p, m, cj, ldc, alpha, acc),
                    (4, false) => rows::<3, 4, true, true>(&p, m, cj, ldc, alpha, acc),
                    (3, true) => rows::<4, 3, false, false>(&p, m, cj, ldc, alpha, acc),
                    (3, false) => rows::<4, 3, false, true>(&p, m, cj, ldc, alpha, acc),
                    (2, true) => rows::<6, 2, false, false>(&p, m, cj, ldc, alpha, acc),
                    (2, false) => rows::<6, 2, false, true>(&p, m, cj, ldc, alpha, acc),
                    (_, true) => rows::<8, 1, false, false>(&p, m, cj, ldc, alpha, acc),
                    (_, false) => rows::<8, 1, false, true>(&p, m, cj, ldc, alpha, acc),
                }
                j0 += NR;
            }
        }
    }

    /// One column panel of the product: A (any strides), B's panel, and how many lanes of
    /// its last vector are live (1..=8).
    struct Panel {
        k: usize,
        a: *const f32,
        rsa: usize,
        csa: usize,
        b: *const f32,
        ldb: usize,
        tail: usize,
    }

    /// All rows of one panel in tiles of H rows. The last tile may have fewer live rows: it
    /// reads its last live row again in place of the missing ones and stores only the live
    /// ones, so that each tile shape is compiled once (the kernel stays small enough for
    /// the instruction caches; one instance per remainder made it 106 KB).
    ///
    /// # Safety
    ///
    /// `p` must describe A and B panels that are readable for `m` rows of A and `p.k` rows
    /// of B, and `c` must be writable for `m` rows of the panel's width at stride `ldc`.
    #[inline(always)]
    unsafe fn rows<const H: usize, const NV: usize, const AFIRST: bool, const MASKED: bool>(
        p: &Panel,
        m: usize,
        c: *mut f32,
        ldc: usize,
        alpha: f32,
        acc: bool,
    ) {
        // SAFETY: `gemm` passes panels and a C column offset inside the checked views.
        unsafe {
            let mut i0 = 0;
            while i0 < m {
                let live = (m - i0).min(H);
                tile::<H, NV, AFIRST, MASKED>(p, p.a.add(i0 * p.rsa), live, c.add(i0 * ldc), ldc, alpha, acc);
                i0 += H;
            }
        }
    }

    /// [`super::dot`] of 8 consecutive rows (row stride `cols >= 16`) with `x`, each row's
    /// arithmetic exactly that of `dot`: lane l of a row's register is its partial sum l,
    /// and the same pairwise adds (l + l+4, then neighbours, then halves) are done for 8
    /// rows at once by 128-bit adds and horizontal adds, instead of one row at a time.
    ///
    /// # Safety
    ///
    /// `a` must be readable for 8 rows of `cols` floats, contiguous, and `x` for `cols` floats.
    #[inline]
    pub unsafe fn dot8(a: *const f32, cols: usize, x: *const f32) -> [f32; 8] {
        // SAFETY: the caller's contract covers every load below (8 rows of cols, x of cols).
        unsafe {
            let chunks = cols / 8;
            let mut acc = [_mm256_setzero_ps(); 8];
            for c in 0..chunks {
                let xv = _mm256_loadu_ps(x.add(8 * c));
                for (r, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(r * cols + 8 * c)), xv, *acc);
                }
            }
            // t_r = (p0 + p4, p1 + p5, p2 + p6, p3 + p7) of row r.
            let t: [__m128; 8] =
                std::array::from_fn(|r| _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps::<1>(acc[r])));
            // ((p0 + p4) + (p1 + p5)) + ((p2 + p6) + (p3 + p7)) for rows 0-3 and 4-7.
            let lo = _mm_hadd_ps(_mm_hadd_ps(t[0], t[1]), _mm_hadd_ps(t[2], t[3]));
            let hi = _mm_hadd_ps(_mm_hadd_ps(t[4], t[5]), _mm_hadd_ps(t[6], t[7]));
            let mut s = [0f32; 8];
            _mm_storeu_ps(s.as_mut_ptr(), lo);
            _mm_storeu_ps(s.as_mut_ptr().add(4), hi);
            for (r, s) in s.iter_mut().enumerate() {
                for j in 8 * chunks..cols {
                    *s = (*a.add(r * cols + j)).mul_add(*x.add(j), *s);
                }
            }
            s
        }
    }

    /// # Safety
    ///
    /// AVX2 must be available (it is compiled in wherever this module is).
    #[inline(always)]
    unsafe fn lane_mask(live: usize) -> __m256i {
        // SAFETY: register-only intrinsics; AVX2 is compiled in.
        unsafe {
            let idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            _mm256_cmpgt_epi32(_mm256_set1_epi32(live as i32), idx)
        }
    }

    /// One `H x 8 NV` tile of C: H * NV accumulators live in registers for the whole k loop.
    /// AFIRST broadcasts the H values of A first and streams B's vectors through one
    /// register (for NV = 4: 3 + 12 + 1 registers); otherwise B's NV vectors are loaded first
    /// and A's values stream. Either way no accumulator spills out of the 16 registers.
    // Indexed loops over the register arrays: both indices address acc, B and A at once.
    /// # Safety
    ///
    /// `a` must be readable for `live` rows (stride `p.rsa`) over `p.k` columns (stride
    /// `p.csa`), B's panel for `p.k` rows of `8 NV` floats (the last vector masked to `p.tail`
    /// lanes when MASKED), and `c` writable for `live` rows of the panel at stride `ldc`.
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    unsafe fn tile<const H: usize, const NV: usize, const AFIRST: bool, const MASKED: bool>(
        p: &Panel,
        a: *const f32,
        live: usize,
        c: *mut f32,
        ldc: usize,
        alpha: f32,
        accumulate: bool,
    ) {
        // SAFETY: the caller's contract; rows past `live` re-read the last live row, and
        // only live rows are stored.
        unsafe {
            let mask = lane_mask(p.tail);
            let last_masked = |v: usize| MASKED && v == NV - 1;
            let load_b = |bp: *const f32, v: usize| {
                if last_masked(v) {
                    _mm256_maskload_ps(bp.add(8 * v), mask)
                } else {
                    _mm256_loadu_ps(bp.add(8 * v))
                }
            };
            let row: [usize; H] = std::array::from_fn(|r| r.min(live - 1) * p.rsa);
            let mut acc = [[_mm256_setzero_ps(); NV]; H];
            let (mut ap, mut bp) = (a, p.b);
            for _ in 0..p.k {
                if AFIRST {
                    let av: [__m256; H] = std::array::from_fn(|r| _mm256_broadcast_ss(&*ap.add(row[r])));
                    for v in 0..NV {
                        let bv = load_b(bp, v);
                        for r in 0..H {
                            acc[r][v] = _mm256_fmadd_ps(av[r], bv, acc[r][v]);
                        }
                    }
                } else {
                    let bv: [__m256; NV] = std::array::from_fn(|v| load_b(bp, v));
                    for (r, off) in row.iter().enumerate() {
                        let av = _mm256_broadcast_ss(&*ap.add(*off));
                        for v in 0..NV {
                            acc[r][v] = _mm256_fmadd_ps(av, bv[v], acc[r][v]);
                        }
                    }
                }
                bp = bp.add(p.ldb);
                ap = ap.add(p.csa);
            }
            let al = _mm256_set1_ps(alpha);
            for r in 0..live {
                let cr = c.add(r * ldc);
                for v in 0..NV {
                    let cv = cr.add(8 * v);
                    let mut x = _mm256_mul_ps(acc[r][v], al);
                    if last_masked(v) {
                        if accumulate {
                            x = _mm256_add_ps(x, _mm256_maskload_ps(cv, mask));
                        }
                        _mm256_maskstore_ps(cv, mask, x);
                    } else {
                        if accumulate {
                            x = _mm256_add_ps(x, _mm256_loadu_ps(cv));
                        }
                        _mm256_storeu_ps(cv, x);
                    }
                }
            }
        }
    }
}

#[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
use portable as imp;

/// The fallback where AVX2 and FMA are not compiled in: slow, and the same bits as the AVX2
/// kernel (each element one FMA chain over k, then alpha, then C). Compiled into the tests
/// everywhere, so that CI, which builds for x86-64-v3, checks it against the kernel.
#[cfg(any(test, not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))))]
mod portable {
    use super::MatRef;

    /// # Safety
    ///
    /// As the AVX2 kernel's: `c` valid for `a.rows` rows of `b.cols` floats at stride `ldc`,
    /// and views whose strides stay inside their data.
    pub unsafe fn gemm(c: *mut f32, ldc: usize, a: MatRef, b: MatRef, alpha: f32, acc: bool) {
        // SAFETY: the caller's contract (see `# Safety`) covers every C row sliced below.
        unsafe {
            let (m, k, n) = (a.rows, a.cols, b.cols);
            const W: usize = 64;
            for i in 0..m {
                let ci = std::slice::from_raw_parts_mut(c.add(i * ldc), n);
                for (j0, cj) in (0..n).step_by(W).zip(ci.chunks_mut(W)) {
                    let mut s = [0f32; W];
                    let s = &mut s[..cj.len()];
                    for p in 0..k {
                        let aip = a.data[i * a.rs + p * a.cs];
                        let bp = &b.data[p * b.rs + j0..p * b.rs + j0 + s.len()];
                        s.iter_mut().zip(bp).for_each(|(sj, bj)| *sj = aip.mul_add(*bj, *sj));
                    }
                    for (c, s) in cj.iter_mut().zip(s.iter()) {
                        let v = s * alpha;
                        *c = if acc { v + *c } else { v };
                    }
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

    /// The contract the GPU kernels are built on: element (i, j) is the FMA chain
    /// `fma(a_ik, b_kj, .)` over k in order from 0, times alpha, plus C if accumulating,
    /// whichever tile (3 x 32, 4 x 24, 6 x 16, 8 x 8, masked or not, short last tiles) computed it.
    #[test]
    fn gemm_is_one_fma_chain_per_element_on_every_tile() {
        for m in [1usize, 2, 3, 4, 5, 7, 11, 12, 13, 25] {
            for n in [1usize, 4, 7, 8, 9, 15, 16, 17, 24, 25, 31, 32, 33, 40, 47, 64, 71] {
                let k = 1 + (m * 7 + n) % 19;
                let (a, b) = (filled(m * k, 7), filled(k * n, 8));
                let av = MatRef::new(&a, k, m).t();
                for acc in [false, true] {
                    let mut c = filled(m * n, 9);
                    let before = c.clone();
                    gemm(&mut c, n, av, MatRef::new(&b, k, n), 0.75, acc);
                    for i in 0..m {
                        for j in 0..n {
                            let chain = (0..k).fold(0.0f32, |s, p| a[p * m + i].mul_add(b[p * n + j], s)) * 0.75;
                            let want = if acc { chain + before[i * n + j] } else { chain };
                            assert_eq!(c[i * n + j].to_bits(), want.to_bits(), "{m}x{k}x{n} acc={acc} ({i}, {j})");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_portable_fallback_draws_the_kernels_bits() {
        // k >= 1: `gemm` answers k = 0 itself, before any kernel.
        for (m, k, n) in [(1usize, 9usize, 1usize), (7, 5, 3), (13, 33, 17), (64, 32, 8), (24, 40, 71), (3, 1, 70)] {
            let (a, b) = (filled(m * k, 19), filled(k * n, 20));
            let av = MatRef::new(&a, k, m).t();
            for acc in [false, true] {
                let (mut c1, mut c2) = (filled(m * n, 21), filled(m * n, 21));
                gemm(&mut c1, n, av, MatRef::new(&b, k, n), -0.75, acc);
                // SAFETY: c2 holds m x n and the views were checked by `gemm` above.
                unsafe { portable::gemm(c2.as_mut_ptr(), n, av, MatRef::new(&b, k, n), -0.75, acc) };
                assert!(c1.iter().zip(&c2).all(|(x, y)| x.to_bits() == y.to_bits()), "{m}x{k}x{n} acc={acc}");
            }
        }
    }

    #[test]
    fn products_with_weights_equal_plain_products_bit_for_bit() {
        for (m, k, n) in
            [(5usize, 3usize, 1usize), (7, 9, 32), (13, 17, 33), (64, 128, 384), (3, 4, 71), (2, 0, 5), (0, 4, 40)]
        {
            let (a, b) = (filled(m * k, 10), filled(k * n, 11));
            let w = Weights::new(b.clone(), k, n);
            assert_eq!((&w[..], w.rows(), w.cols()), (&b[..], k, n));
            for acc in [false, true] {
                let (mut c1, mut c2) = (filled(m * n + 2, 12), filled(m * n + 2, 12));
                gemm(&mut c1, n, MatRef::new(&a, m, k), MatRef::new(&b, k, n), -1.5, acc);
                gemm_weights(&mut c2, n, MatRef::new(&a, m, k), &w, -1.5, acc);
                assert!(c1.iter().zip(&c2).all(|(x, y)| x.to_bits() == y.to_bits()), "{m}x{k}x{n} acc={acc}");
            }
        }
    }

    #[test]
    fn gemv_rows_are_dot_products_bit_for_bit() {
        for (rows, cols) in [(1usize, 40usize), (8, 16), (9, 17), (64, 32), (23, 45), (16, 15), (40, 8)] {
            let (a, x) = (filled(rows * cols, 13), filled(cols, 14));
            for acc in [false, true] {
                let mut y = filled(rows, 15);
                let before = y.clone();
                gemv(&mut y, &a, rows, cols, &x, -0.5, acc);
                for i in 0..rows {
                    let d = dot(&a[i * cols..(i + 1) * cols], &x) * -0.5;
                    let want = if acc { before[i] + d } else { d };
                    assert_eq!(y[i].to_bits(), want.to_bits(), "{rows}x{cols} acc={acc} row {i}");
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
