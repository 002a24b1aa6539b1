//! Cholesky factorisation and explicit inverse for the small SPD system of the update
//! (r x r, A = I + K^T P_p K, so A >= I and well conditioned unless K is huge). The filter
//! needs A^-1 against S right-hand sides, its trace and its log-determinant: one explicit
//! inverse (r^3) turns the S solves into one GEMM. Row-major, lower triangle; no allocation.

use super::gemm::{dot, gemm, MatRef};

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
                if !(s.is_finite() && s > 0.0) {
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

/// Writes L^-1 (lower triangular, n x n row-major) into `out`, given the factor L.
pub fn lower_inverse(l: &[f32], n: usize, out: &mut [f32]) {
    out[..n * n].fill(0.0);
    for j in 0..n {
        out[j * n + j] = 1.0 / l[j * n + j];
        for i in j + 1..n {
            let mut s = 0.0f32;
            for k in j..i {
                s = l[i * n + k].mul_add(out[k * n + j], s);
            }
            out[i * n + j] = -s / l[i * n + i];
        }
    }
}

/// A^-1 = L^-T L^-1 from L^-1 (`linv`), written to `out` (n x n, symmetric).
pub fn inverse_from_lower_inverse(linv: &[f32], n: usize, out: &mut [f32]) {
    let li = MatRef::new(&linv[..n * n], n, n);
    gemm(out, n, li.t(), li, 1.0, false);
}

/// log det A = 2 sum ln L_ii.
pub fn logdet(l: &[f32], n: usize) -> f32 {
    (0..n).map(|i| l[i * n + i].ln()).sum::<f32>() * 2.0
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
    fn cholesky_inverse_logdet_match_nalgebra() {
        for n in [1usize, 3, 8, 15, 33] {
            let (mut l, a) = spd(n);
            cholesky(&mut l, n).unwrap();
            let mut linv = vec![0.0; n * n];
            lower_inverse(&l, n, &mut linv);
            let mut y: Vec<f32> = (0..n).map(|i| i as f32 - 2.0).collect();
            let rhs = y.clone();
            solve_lower(&l, n, &mut y);
            for i in 0..n {
                let want: f32 = (0..n).map(|k| linv[i * n + k] * rhs[k]).sum();
                assert!((y[i] - want).abs() < 1e-4 * (1.0 + want.abs()), "n={n} solve_lower");
            }
            let mut ainv = vec![0.0; n * n];
            inverse_from_lower_inverse(&linv, n, &mut ainv);
            let want = a.clone().try_inverse().unwrap();
            for i in 0..n * n {
                let w = want[(i / n, i % n)];
                assert!((ainv[i] as f64 - w).abs() < 1e-4 * (1.0 + w.abs()), "n={n} A^-1 entry {i}");
            }
            let ld = a.clone().cholesky().unwrap().l().diagonal().iter().map(|d| d.ln()).sum::<f64>() * 2.0;
            assert!((logdet(&l, n) as f64 - ld).abs() < 1e-4 * (1.0 + ld.abs()));

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
