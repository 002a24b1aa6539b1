//! Cholesky factorisation and triangular solves for the small SPD systems of the update
//! (r x r). Row-major, lower triangle, in place; no allocation.

use super::gemm::dot;

/// The matrix was not positive definite: the pivot of this row was not > 0 (or was NaN).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NotPositiveDefinite {
    pub row: usize,
    pub pivot: f32,
}

/// Overwrites the lower triangle of the `n x n` row-major `a` with L, A = L L^T, and zeros
/// the strict upper triangle.
pub fn cholesky(a: &mut [f32], n: usize) -> Result<(), NotPositiveDefinite> {
    assert!(a.len() >= n * n);
    for i in 0..n {
        for j in 0..=i {
            // Rows i and j of L up to column j are final.
            let (ri, rj) = (i * n, j * n);
            let s = a[ri + j] - dot(&a[ri..ri + j], &a[rj..rj + j]);
            if i == j {
                if s.is_nan() || s <= 0.0 {
                    return Err(NotPositiveDefinite { row: i, pivot: s });
                }
                a[ri + i] = s.sqrt();
            } else {
                a[ri + j] = s / a[rj + j];
            }
        }
        a[i * n + i + 1..(i + 1) * n].fill(0.0);
    }
    Ok(())
}

/// Solves L y = b in place (b becomes y).
pub fn solve_lower(l: &[f32], n: usize, b: &mut [f32]) {
    for i in 0..n {
        let s = b[i] - dot(&l[i * n..i * n + i], &b[..i]);
        b[i] = s / l[i * n + i];
    }
}

/// Solves L^T x = y in place.
pub fn solve_lower_t(l: &[f32], n: usize, y: &mut [f32]) {
    for i in (0..n).rev() {
        let mut s = y[i];
        for k in i + 1..n {
            s -= l[k * n + i] * y[k];
        }
        y[i] = s / l[i * n + i];
    }
}

/// b <- A^{-1} b given A's Cholesky factor.
pub fn cho_solve(l: &[f32], n: usize, b: &mut [f32]) {
    solve_lower(l, n, b);
    solve_lower_t(l, n, b);
}

/// log det A = 2 sum ln L_ii.
pub fn logdet(l: &[f32], n: usize) -> f32 {
    (0..n).map(|i| l[i * n + i].ln()).sum::<f32>() * 2.0
}

/// tr(A^{-1}) = ||L^{-1}||_F^2, using `scratch` (n) for one column of L^{-1} at a time.
pub fn trace_inv(l: &[f32], n: usize, scratch: &mut [f32]) -> f32 {
    let col = &mut scratch[..n];
    let mut t = 0.0;
    for j in 0..n {
        col.fill(0.0);
        col[j] = 1.0;
        // Column j of L^{-1} is zero above row j.
        for i in j..n {
            let s = col[i] - dot(&l[i * n + j..i * n + i], &col[j..i]);
            col[i] = s / l[i * n + i];
        }
        t += dot(&col[j..], &col[j..]);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use nalgebra::DMatrix;

    fn spd(n: usize) -> (Vec<f32>, DMatrix<f64>) {
        let b = DMatrix::<f64>::from_fn(n, n + 2, |i, j| ((i * 7 + j * 3) % 11) as f64 / 5.0 - 1.0);
        let a = &b * b.transpose() + DMatrix::identity(n, n);
        let v: Vec<f32> = (0..n * n).map(|k| a[(k / n, k % n)] as f32).collect();
        (v, a)
    }

    #[test]
    fn cholesky_solve_logdet_trace_match_nalgebra() {
        for n in [1usize, 3, 8, 15, 33] {
            let (mut l, a) = spd(n);
            cholesky(&mut l, n).unwrap();
            let rhs: Vec<f32> = (0..n).map(|i| i as f32 - 2.0).collect();
            let mut x = rhs.clone();
            cho_solve(&l, n, &mut x);
            let want = a
                .clone()
                .cholesky()
                .unwrap()
                .solve(&nalgebra::DVector::from_iterator(n, rhs.iter().map(|&v| v as f64)));
            for i in 0..n {
                assert!((x[i] as f64 - want[i]).abs() < 1e-4 * (1.0 + want[i].abs()), "n={n}");
            }
            let ld = a.clone().cholesky().unwrap().l().diagonal().iter().map(|d| d.ln()).sum::<f64>() * 2.0;
            assert!((logdet(&l, n) as f64 - ld).abs() < 1e-4 * (1.0 + ld.abs()));
            let tr = a.clone().try_inverse().unwrap().trace();
            let mut s = vec![0.0; n];
            assert!((trace_inv(&l, n, &mut s) as f64 - tr).abs() < 1e-4 * (1.0 + tr));
            for i in 0..n {
                for j in i + 1..n {
                    assert_eq!(l[i * n + j], 0.0);
                }
            }
        }
    }

    #[test]
    fn cholesky_rejects_indefinite_and_nan() {
        let mut a = vec![1.0, 2.0, 2.0, 1.0];
        assert_eq!(cholesky(&mut a, 2).unwrap_err().row, 1);
        let mut b = vec![f32::NAN, 0.0, 0.0, 1.0];
        assert_eq!(cholesky(&mut b, 2).unwrap_err().row, 0);
    }
}
