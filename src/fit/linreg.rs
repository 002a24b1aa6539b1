//! Least squares and ridge regression in f64: `y ≈ W x + b` over T rows.
//!
//! One mechanism serves the Kalman fit (A and C), the affine map of the state R^2 and
//! ridge-regression behaviour readouts. Inputs are anything implementing [`Rows`]:
//! [`Array2`] (f32 data), [`RowsF64`] (an f64 slice), an nalgebra `DMatrix<f64>`, or
//! [`Pick`] (selected rows of another matrix, for lags and trial-aware pairs without a copy).
//!
//! # Method, and why
//!
//! The normal equations `(Xc^T Xc + λ I) W^T = Xc^T Yc` on centred data (when `intercept`),
//! then `b = mean(y) - W mean(x)`; the intercept is not penalised. Solved by Cholesky after
//! scaling the columns to unit diagonal (Jacobi scaling). Why not QR or SVD of X:
//! - every user has T >> p (thousands to millions of bins, p from 1 to a few hundred): one
//!   streaming pass builds the p x p Gram matrix in O(T p^2) with O(p^2) memory, while QR
//!   needs X in memory and a ridge would need p extra rows;
//! - the usual causes of an ill-conditioned Gram matrix are handled before it is formed:
//!   centring removes offsets (two passes: means first, then centred products, so there is
//!   no cancellation) and the Jacobi scaling removes unit mismatch between columns (cm/s
//!   next to spike counts); the condition number left is that of the correlation matrix;
//! - the ridge λ adds to the diagonal directly.
//!
//! # Rank deficiency
//!
//! With `ridge = 0` a column that is constant (it duplicates the intercept) or (nearly) a
//! linear combination of the others is an error that names the column. Cholesky of the scaled
//! Gram matrix gives, at pivot j, `1 - R^2` of column j regressed on the earlier columns;
//! below 1e-10 the solution would carry fewer than ~6 correct digits, so it is refused
//! rather than returned. Any `ridge > 0` makes the system positive definite: a constant
//! column then gets weight exactly 0 and collinear columns share their weight (the limit
//! ridge -> 0 is the minimum-norm least-squares solution). [`lstsq_relative`] gives a ridge
//! in units of the data, for callers that want "a tiny ridge" whatever the units.

use crate::data::Array2;
use nalgebra::DMatrix;

/// A T x cols matrix whose rows can be read as f64.
pub trait Rows {
    fn nrows(&self) -> usize;
    fn ncols(&self) -> usize;
    /// Writes row `i` into `out` (length `ncols`).
    fn row_to(&self, i: usize, out: &mut [f64]);
}

impl Rows for Array2 {
    fn nrows(&self) -> usize {
        self.rows
    }
    fn ncols(&self) -> usize {
        self.cols
    }
    fn row_to(&self, i: usize, out: &mut [f64]) {
        out.iter_mut().zip(self.row(i)).for_each(|(o, &v)| *o = v as f64);
    }
}

impl Rows for DMatrix<f64> {
    fn nrows(&self) -> usize {
        self.nrows()
    }
    fn ncols(&self) -> usize {
        self.ncols()
    }
    fn row_to(&self, i: usize, out: &mut [f64]) {
        out.iter_mut().enumerate().for_each(|(j, o)| *o = self[(i, j)]);
    }
}

/// A row-major f64 matrix, borrowed.
#[derive(Clone, Copy, Debug)]
pub struct RowsF64<'a> {
    pub data: &'a [f64],
    pub rows: usize,
    pub cols: usize,
}

impl<'a> RowsF64<'a> {
    pub fn new(data: &'a [f64], rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "matrix shape and data length differ");
        RowsF64 { data, rows, cols }
    }
}

impl Rows for RowsF64<'_> {
    fn nrows(&self) -> usize {
        self.rows
    }
    fn ncols(&self) -> usize {
        self.cols
    }
    fn row_to(&self, i: usize, out: &mut [f64]) {
        out.copy_from_slice(&self.data[i * self.cols..(i + 1) * self.cols]);
    }
}

/// Rows `rows[0], rows[1], ...` of `inner`, in that order.
#[derive(Clone, Copy, Debug)]
pub struct Pick<'a, R: Rows + ?Sized> {
    pub inner: &'a R,
    pub rows: &'a [usize],
}

impl<R: Rows + ?Sized> Rows for Pick<'_, R> {
    fn nrows(&self) -> usize {
        self.rows.len()
    }
    fn ncols(&self) -> usize {
        self.inner.ncols()
    }
    fn row_to(&self, i: usize, out: &mut [f64]) {
        self.inner.row_to(self.rows[i], out)
    }
}

/// A fitted affine map `y = W x + b`.
#[derive(Clone, Debug, PartialEq)]
pub struct Linear {
    /// p, the length of x.
    pub inputs: usize,
    /// d, the length of y.
    pub outputs: usize,
    /// W, `outputs x inputs`, row-major.
    pub weights: Vec<f64>,
    /// b, `outputs` (all zero when fitted without an intercept).
    pub bias: Vec<f64>,
}

impl Linear {
    /// W[o, j].
    pub fn weight(&self, o: usize, j: usize) -> f64 {
        self.weights[o * self.inputs + j]
    }

    /// `out = W x + b` for one row.
    pub fn predict_row(&self, x: &[f64], out: &mut [f64]) {
        assert_eq!(x.len(), self.inputs, "input length");
        assert_eq!(out.len(), self.outputs, "output length");
        for (o, out_o) in out.iter_mut().enumerate() {
            let w = &self.weights[o * self.inputs..(o + 1) * self.inputs];
            *out_o = self.bias[o] + w.iter().zip(x).map(|(a, b)| a * b).sum::<f64>();
        }
    }

    /// Predictions for every row of `x`: `rows x outputs`, row-major.
    pub fn predict<X: Rows + ?Sized>(&self, x: &X) -> Vec<f64> {
        assert_eq!(x.ncols(), self.inputs, "x has {} columns, the map takes {}", x.ncols(), self.inputs);
        let mut xr = vec![0.0; self.inputs];
        let mut out = vec![0.0; x.nrows() * self.outputs];
        for (i, row) in out.chunks_exact_mut(self.outputs.max(1)).enumerate().take(x.nrows()) {
            x.row_to(i, &mut xr);
            self.predict_row(&xr, &mut row[..self.outputs]);
        }
        out
    }

    /// Predictions as an f32 array (e.g. a behaviour readout applied to a session).
    pub fn predict_array(&self, x: &Array2) -> Array2 {
        let p = self.predict(x);
        Array2::new(x.rows, self.outputs, p.into_iter().map(|v| v as f32).collect())
    }

    /// Mean over rows of `e e^T` with `e = y - (W x + b)`: `outputs x outputs`, row-major.
    /// Divides by the number of rows (the maximum-likelihood estimate).
    pub fn residual_cov<X: Rows + ?Sized, Y: Rows + ?Sized>(&self, x: &X, y: &Y) -> Vec<f64> {
        let (t, d) = (x.nrows(), self.outputs);
        assert_eq!(y.nrows(), t, "x and y have different numbers of rows");
        assert_eq!(y.ncols(), d, "y has {} columns, the map gives {d}", y.ncols());
        let (mut xr, mut yr, mut e) = (vec![0.0; self.inputs], vec![0.0; d], vec![0.0; d]);
        let mut cov = DMatrix::<f64>::zeros(d, d);
        let mut eb = DMatrix::<f64>::zeros(BLOCK.min(t), d);
        let mut start = 0;
        while start < t {
            let rows = (t - start).min(BLOCK);
            eb.fill(0.0);
            for r in 0..rows {
                x.row_to(start + r, &mut xr);
                y.row_to(start + r, &mut yr);
                self.predict_row(&xr, &mut e);
                for j in 0..d {
                    eb[(r, j)] = yr[j] - e[j];
                }
            }
            cov.gemm_tr(1.0, &eb, &eb, 1.0);
            start += rows;
        }
        let inv = 1.0 / t.max(1) as f64;
        // Exactly symmetric.
        (0..d * d).map(|k| (k / d, k % d)).map(|(a, b)| 0.5 * (cov[(a, b)] + cov[(b, a)]) * inv).collect()
    }
}

/// Rows per block of the Gram and covariance products.
const BLOCK: usize = 512;

/// How the penalty is given.
#[derive(Clone, Copy, Debug)]
enum Penalty {
    /// λ itself, added to `Xc^T Xc`.
    Absolute(f64),
    /// λ = value * trace(Xc^T Xc) / p.
    Relative(f64),
}

/// Pivots of the scaled Gram matrix below this (1 - R^2 of a column on the earlier ones) are
/// refused when there is no ridge.
const MIN_PIVOT: f64 = 1e-10;

/// Least squares `y ≈ W x + b` minimising `sum_t |y_t - W x_t - b|^2 + ridge |W|_F^2`
/// (sklearn's `Ridge(alpha=ridge, fit_intercept=intercept)`). `x` is T x p, `y` T x d.
/// Without `intercept`, b = 0 and nothing is centred.
///
/// Errors: no rows, row counts that differ, a non-finite value, a negative or non-finite
/// ridge, and (ridge = 0 only) a rank-deficient design, naming the column.
pub fn lstsq<X: Rows + ?Sized, Y: Rows + ?Sized>(x: &X, y: &Y, ridge: f64, intercept: bool) -> Result<Linear, String> {
    solve(x, y, Penalty::Absolute(ridge), intercept)
}

/// [`lstsq`] with `λ = ridge * trace(Xc^T Xc) / p`, i.e. `ridge` times T times the mean
/// variance of the columns of x: a penalty that means the same whatever the units and the
/// number of rows (1e-6 shrinks the weights by about a millionth of the signal).
pub fn lstsq_relative<X: Rows + ?Sized, Y: Rows + ?Sized>(
    x: &X,
    y: &Y,
    ridge: f64,
    intercept: bool,
) -> Result<Linear, String> {
    solve(x, y, Penalty::Relative(ridge), intercept)
}

fn solve<X: Rows + ?Sized, Y: Rows + ?Sized>(x: &X, y: &Y, pen: Penalty, intercept: bool) -> Result<Linear, String> {
    let (t, p, d) = (x.nrows(), x.ncols(), y.ncols());
    if y.nrows() != t {
        return Err(format!("x has {t} rows but y has {}", y.nrows()));
    }
    if t == 0 {
        return Err("no rows to fit".into());
    }
    let given = match pen {
        Penalty::Absolute(v) | Penalty::Relative(v) => v,
    };
    if !(given.is_finite() && given >= 0.0) {
        return Err(format!("ridge must be a finite number >= 0, got {given}"));
    }

    // Pass 1: means (and the finiteness check).
    let (mut xr, mut yr) = (vec![0.0; p], vec![0.0; d]);
    let (mut mx, mut my) = (vec![0.0; p], vec![0.0; d]);
    for i in 0..t {
        x.row_to(i, &mut xr);
        y.row_to(i, &mut yr);
        if let Some(j) = xr.iter().position(|v| !v.is_finite()) {
            return Err(format!("x[{i}, {j}] is not finite ({})", xr[j]));
        }
        if let Some(j) = yr.iter().position(|v| !v.is_finite()) {
            return Err(format!("y[{i}, {j}] is not finite ({})", yr[j]));
        }
        if intercept {
            mx.iter_mut().zip(&xr).for_each(|(m, v)| *m += v);
            my.iter_mut().zip(&yr).for_each(|(m, v)| *m += v);
        }
    }
    mx.iter_mut().chain(my.iter_mut()).for_each(|m| *m /= t as f64);

    if p == 0 {
        return Ok(Linear { inputs: 0, outputs: d, weights: vec![], bias: my });
    }

    // Pass 2: G = Xc^T Xc and B = Xc^T Yc, in blocks of rows so nalgebra's GEMM does the work.
    let mut g = DMatrix::<f64>::zeros(p, p);
    let mut bmat = DMatrix::<f64>::zeros(p, d);
    let (mut xb, mut yb) = (DMatrix::<f64>::zeros(BLOCK.min(t), p), DMatrix::<f64>::zeros(BLOCK.min(t), d));
    let mut start = 0;
    while start < t {
        let rows = (t - start).min(BLOCK);
        xb.fill(0.0);
        yb.fill(0.0);
        for r in 0..rows {
            x.row_to(start + r, &mut xr);
            y.row_to(start + r, &mut yr);
            for j in 0..p {
                xb[(r, j)] = xr[j] - mx[j];
            }
            for j in 0..d {
                yb[(r, j)] = yr[j] - my[j];
            }
        }
        g.gemm_tr(1.0, &xb, &xb, 1.0);
        bmat.gemm_tr(1.0, &xb, &yb, 1.0);
        start += rows;
    }

    let lambda = match pen {
        Penalty::Absolute(v) => v,
        Penalty::Relative(v) => {
            let tr = g.trace();
            // All columns constant: B = 0, so any positive λ gives W = 0.
            if tr > 0.0 {
                v * tr / p as f64
            } else {
                v
            }
        }
    };
    let of_what = if intercept { "around its mean (a constant column duplicates the intercept)" } else { "" };
    let mut scale = vec![0.0; p];
    for j in 0..p {
        g[(j, j)] += lambda;
        let gjj = g[(j, j)];
        if !(gjj > 0.0 && gjj.is_finite()) {
            return Err(format!("column {j} of x has no variation {of_what}; remove it or pass ridge > 0"));
        }
        scale[j] = gjj.sqrt();
    }
    let gs = DMatrix::from_fn(p, p, |i, j| g[(i, j)] / (scale[i] * scale[j]));
    let dependent = |j: usize, pivot2: f64| {
        let others = if intercept { "the intercept and columns" } else { "columns" };
        format!(
            "column {j} of x is (nearly) a linear combination of {others} 0..{j} (1 - R^2 = {pivot2:.1e}); \
             remove it or pass ridge > 0"
        )
    };
    let chol = match gs.cholesky() {
        Some(c) => c,
        None => {
            // Find the failing pivot for the message.
            let j = first_bad_pivot(&DMatrix::from_fn(p, p, |i, j| g[(i, j)] / (scale[i] * scale[j])));
            return Err(dependent(j, 0.0));
        }
    };
    if lambda == 0.0 {
        let l = chol.l();
        if let Some(j) = (0..p).find(|&j| l[(j, j)] * l[(j, j)] < MIN_PIVOT) {
            return Err(dependent(j, l[(j, j)] * l[(j, j)]));
        }
    }
    let bs = DMatrix::from_fn(p, d, |i, o| bmat[(i, o)] / scale[i]);
    let sol = chol.solve(&bs);
    let mut weights = vec![0.0; d * p];
    for o in 0..d {
        for j in 0..p {
            weights[o * p + j] = sol[(j, o)] / scale[j];
        }
    }
    let bias = if intercept {
        (0..d).map(|o| my[o] - (0..p).map(|j| weights[o * p + j] * mx[j]).sum::<f64>()).collect()
    } else {
        vec![0.0; d]
    };
    Ok(Linear { inputs: p, outputs: d, weights, bias })
}

/// The first row at which an unpivoted Cholesky of `a` meets a pivot <= 0.
fn first_bad_pivot(a: &DMatrix<f64>) -> usize {
    let n = a.nrows();
    let mut l = DMatrix::<f64>::zeros(n, n);
    for i in 0..n {
        for j in 0..=i {
            let s = a[(i, j)] - (0..j).map(|k| l[(i, k)] * l[(j, k)]).sum::<f64>();
            if i == j {
                if s.is_nan() || s <= 0.0 {
                    return i;
                }
                l[(i, i)] = s.sqrt();
            } else {
                l[(i, j)] = s / l[(j, j)];
            }
        }
    }
    n.saturating_sub(1)
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)] // matrix indices read better here
mod tests {
    use super::*;
    use crate::math::philox::{Normals, Purpose};

    /// x ~ N(0, 1) correlated columns with offsets, y = W x + b + small noise.
    fn problem(t: usize, noise: f64) -> (Vec<f64>, Vec<f64>, [[f64; 3]; 2], [f64; 2]) {
        let w = [[1.5, -2.0, 0.25], [0.0, 0.5, 3.0]];
        let b = [10.0, -4.0];
        let g = Normals::new(42);
        let mut z = vec![0.0f32; 5];
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for i in 0..t {
            g.fill(i as u64, Purpose::Sim, 0, &mut z);
            let xi = [z[0] as f64 + 100.0, 0.5 * z[0] as f64 + z[1] as f64, 1e-3 * z[2] as f64];
            for o in 0..2 {
                let v: f64 = b[o] + (0..3).map(|j| w[o][j] * xi[j]).sum::<f64>();
                y.push(v + noise * z[3 + o] as f64);
            }
            x.extend_from_slice(&xi);
        }
        (x, y, w, b)
    }

    #[test]
    fn recovers_known_coefficients_with_an_intercept() {
        // Noise-free: exact up to rounding even with an offset of 100 and a column of scale
        // 1e-3 (centring and Jacobi scaling at work).
        let t = 200;
        let (x, y, w, b) = problem(t, 0.0);
        let fit = lstsq(&RowsF64::new(&x, t, 3), &RowsF64::new(&y, t, 2), 0.0, true).unwrap();
        for o in 0..2 {
            for j in 0..3 {
                assert!((fit.weight(o, j) - w[o][j]).abs() < 1e-7, "W[{o},{j}] = {}", fit.weight(o, j));
            }
            assert!((fit.bias[o] - b[o]).abs() < 1e-6, "b[{o}] = {}", fit.bias[o]);
        }
        let pred = fit.predict(&RowsF64::new(&x, t, 3));
        assert!(pred.iter().zip(&y).all(|(p, y)| (p - y).abs() < 1e-8));
        let cov = fit.residual_cov(&RowsF64::new(&x, t, 3), &RowsF64::new(&y, t, 2));
        assert!(cov.iter().all(|c| c.abs() < 1e-15));
    }

    #[test]
    fn noisy_fit_is_within_standard_errors_and_residual_cov_is_the_noise() {
        // T = 4000, noise sd 0.1: s.e. of W[.,0] about 0.1 / sqrt(T) = 1.6e-3 (column 1 is
        // correlated with column 0: s.e. about 1.6e-3 * 1.1); residual variance 0.01 with
        // relative s.e. sqrt(2/T) = 2.2%.
        let t = 4000;
        let (x, y, w, _) = problem(t, 0.1);
        let (xv, yv) = (RowsF64::new(&x, t, 3), RowsF64::new(&y, t, 2));
        let fit = lstsq(&xv, &yv, 0.0, true).unwrap();
        for o in 0..2 {
            for j in 0..2 {
                assert!((fit.weight(o, j) - w[o][j]).abs() < 1e-2, "W[{o},{j}] = {}", fit.weight(o, j));
            }
        }
        let cov = fit.residual_cov(&xv, &yv);
        assert!((cov[0] - 0.01).abs() < 0.1 * 0.01 && (cov[3] - 0.01).abs() < 0.1 * 0.01, "{cov:?}");
        assert!(cov[1].abs() < 0.1 * 0.01 && cov[1] == cov[2]);
    }

    #[test]
    fn without_intercept_fits_through_the_origin() {
        // y = 2 x exactly: W = 2, b = 0. With an intercept column of ones given explicitly,
        // intercept = false reproduces the affine fit y = 3 x + 1: W = [3, 1].
        let x = Array2::new(4, 1, vec![1., 2., 3., 4.]);
        let y = Array2::new(4, 1, vec![2., 4., 6., 8.]);
        let fit = lstsq(&x, &y, 0.0, false).unwrap();
        assert!((fit.weights[0] - 2.0).abs() < 1e-12 && fit.bias == vec![0.0]);
        let x1 = RowsF64::new(&[1., 1., 2., 1., 3., 1., 4., 1.], 4, 2);
        let y1 = RowsF64::new(&[4., 7., 10., 13.], 4, 1);
        let fit = lstsq(&x1, &y1, 0.0, false).unwrap();
        assert!((fit.weights[0] - 3.0).abs() < 1e-12 && (fit.weights[1] - 1.0).abs() < 1e-12);
    }

    #[test]
    fn ridge_matches_the_closed_form() {
        // One centred column x = [-1, 0, 1], y = [-2, 0, 2]: Sxx = 2, Sxy = 4;
        // W = Sxy / (Sxx + λ) = 4 / 3 for λ = 1, b = mean(y) - W mean(x) = 5 - 4/3 * 10.
        let x = Array2::new(3, 1, vec![9., 10., 11.]);
        let y = Array2::new(3, 1, vec![3., 5., 7.]);
        let fit = lstsq(&x, &y, 1.0, true).unwrap();
        assert!((fit.weights[0] - 4.0 / 3.0).abs() < 1e-12);
        assert!((fit.bias[0] - (5.0 - 40.0 / 3.0)).abs() < 1e-12);
        // Relative: λ = 0.5 * Sxx / p = 1, the same fit.
        let rel = lstsq_relative(&x, &y, 0.5, true).unwrap();
        assert!((rel.weights[0] - fit.weights[0]).abs() < 1e-12);
    }

    #[test]
    fn rank_deficiency_is_an_error_without_ridge_and_harmless_with_one() {
        // Column 1 is constant; column 2 = column 0 + 1 (collinear given the intercept).
        let x = RowsF64::new(&[1., 5., 2., 2., 5., 3., 3., 5., 4., 4., 5., 5.], 4, 3);
        let y = RowsF64::new(&[1., 2., 3., 4.], 4, 1);
        let e = lstsq(&x, &y, 0.0, true).unwrap_err();
        assert!(e.contains("column 1") && e.contains("no variation"), "{e}");
        let x2 = RowsF64::new(&[1., 2., 2., 3., 3., 4., 4., 5.], 4, 2);
        let e = lstsq(&x2, &y, 0.0, true).unwrap_err();
        assert!(e.contains("column 1") && e.contains("linear combination"), "{e}");
        // With a tiny ridge: the constant column gets weight 0, the collinear pair shares
        // the slope 1 (0.5 each, the minimum-norm split), and predictions are exact.
        let fit = lstsq_relative(&x, &y, 1e-9, true).unwrap();
        assert_eq!(fit.weights[1], 0.0);
        assert!((fit.weights[0] - 0.5).abs() < 1e-6 && (fit.weights[2] - 0.5).abs() < 1e-6, "{:?}", fit.weights);
        let pred = fit.predict(&x);
        assert!(pred.iter().zip([1., 2., 3., 4.]).all(|(p, y)| (p - y).abs() < 1e-6), "{pred:?}");
        // More columns than rows.
        let e = lstsq(&RowsF64::new(&[1., 2., 3., 4., 6., 5.], 2, 3), &RowsF64::new(&[1., 2.], 2, 1), 0.0, true);
        assert!(e.unwrap_err().contains("column"));
    }

    #[test]
    fn bad_inputs_are_named() {
        let x = Array2::new(2, 1, vec![1., f32::NAN]);
        let y = Array2::new(2, 1, vec![1., 2.]);
        assert!(lstsq(&x, &y, 0.0, true).unwrap_err().contains("x[1, 0] is not finite"));
        let y3 = Array2::new(3, 1, vec![1., 2., 3.]);
        assert!(lstsq(&y3, &y, 0.0, true).unwrap_err().contains("3 rows but y has 2"));
        assert!(lstsq(&y, &y, -1.0, true).unwrap_err().contains("ridge"));
        let empty = Array2::new(0, 1, vec![]);
        assert!(lstsq(&empty, &empty, 0.0, true).unwrap_err().contains("no rows"));
    }

    #[test]
    fn pick_selects_rows_and_no_inputs_gives_the_mean() {
        // y_t = x_{t-1}: pairs (t-1, t) picked without copying.
        let s = Array2::new(5, 1, vec![1., 4., 2., 8., 3.]);
        let (prev, next): (Vec<usize>, Vec<usize>) = (0..4).map(|t| (t, t + 1)).unzip();
        let fit = lstsq(&Pick { inner: &s, rows: &prev }, &Pick { inner: &s, rows: &next }, 0.0, true).unwrap();
        assert_eq!((fit.inputs, fit.outputs), (1, 1));
        let none = RowsF64::new(&[], 3, 0);
        let fit = lstsq(&none, &RowsF64::new(&[1., 2., 6.], 3, 1), 0.0, true).unwrap();
        assert_eq!(fit.bias, vec![3.0]);
        let a = fit.predict_array(&Array2::new(2, 0, vec![]));
        assert_eq!(a.data, vec![3.0, 3.0]);
    }
}
