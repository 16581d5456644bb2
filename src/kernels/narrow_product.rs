//! y = x Wᵀ for a few outputs per row (a classifier head: 10 classes from thousands of
//! features). gemm packs x, the large operand, on every call; here each row of x is read once
//! from memory while all its outputs' 16-lane partial sums stay in registers:
//!
//!   y[i][o] = Σ_k x[i][k] · w[o][k]
//!
//! Two rows × up to NARROW_MAX outputs at a time; the lanes are summed in a fixed order (the
//! same on every CPU).

use rayon::prelude::*;

use crate::kernels::lanes::{lanes_entry, Lanes, LANES};
use crate::kernels::reduce::tree_sum;

/// The most outputs per row this kernel takes (2 rows × 12 outputs: 24 accumulators).
pub const NARROW_MAX: usize = 12;

/// Rows per parallel task.
const TASK_ROWS: usize = 8;

/// y [n, o] = x [n, k] · w [o, k]ᵀ for o ≤ NARROW_MAX, rows split over the threads.
pub fn narrow_product(x: &[f32], w: &[f32], k: usize, o: usize, y: &mut [f32]) {
    assert!(
        (1..=NARROW_MAX).contains(&o) && k > 0,
        "narrow_product: {o} outputs of {k}"
    );
    y.par_chunks_mut(TASK_ROWS * o)
        .zip(x.par_chunks(TASK_ROWS * k))
        .for_each(|(yt, xt)| narrow_rows(xt, w, k, o, yt));
}

lanes_entry! {
    /// `narrow_product` on one run of rows.
    pub fn narrow_rows(x: &[f32], w: &[f32], k: usize, o: usize, y: &mut [f32]) => rows
}

#[inline(always)]
fn rows<V: Lanes>(x: &[f32], w: &[f32], k: usize, o: usize, y: &mut [f32]) {
    let mut pairs = x.chunks_exact(2 * k).zip(y.chunks_exact_mut(2 * o));
    for (xp, yp) in &mut pairs {
        let (x0, x1) = xp.split_at(k);
        let (y0, y1) = yp.split_at_mut(o);
        block::<V, 2>([x0, x1], w, k, o, [y0, y1]);
    }
    let (xr, yr) = (
        x.chunks_exact(2 * k).remainder(),
        y.chunks_exact_mut(2 * o).into_remainder(),
    );
    if !xr.is_empty() {
        block::<V, 1>([xr], w, k, o, [yr]);
    }
}

/// R rows of x against every output row of w.
#[inline(always)]
fn block<V: Lanes, const R: usize>(x: [&[f32]; R], w: &[f32], k: usize, o: usize, y: [&mut [f32]; R]) {
    let full = k / LANES * LANES;
    let mut acc = [[V::zero(); NARROW_MAX]; R];
    for i in (0..full).step_by(LANES) {
        let xs: [V; R] = std::array::from_fn(|r| V::load(&x[r][i..]));
        for (j, wr) in w.chunks_exact(k).take(o).enumerate() {
            let wv = V::load(&wr[i..]);
            for r in 0..R {
                acc[r][j] = xs[r].mul_add(wv, acc[r][j]);
            }
        }
    }
    for (r, yr) in y.into_iter().enumerate() {
        for (j, (out, wr)) in yr.iter_mut().zip(w.chunks_exact(k)).enumerate() {
            let mut lanes = [0.0f32; LANES];
            acc[r][j].store(&mut lanes);
            let mut s = tree_sum(lanes);
            for (a, b) in x[r][full..k].iter().zip(&wr[full..k]) {
                s = a.mul_add(*b, s);
            }
            *out = s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the f64 sum, for feature counts with and without a partial vector, odd row
    /// counts (a lone last row) and 1..=NARROW_MAX outputs.
    #[test]
    fn narrow_product_is_the_sum() {
        for (n, k, o) in [(1, 5, 1), (3, 16, 10), (17, 6272, 10), (9, 100, 12), (20, 33, 7)] {
            let x: Vec<f32> = (0..n * k).map(|i| ((i * 31 % 97) as f32) / 48.0 - 1.0).collect();
            let w: Vec<f32> = (0..o * k).map(|i| ((i * 17 % 83) as f32) / 41.0 - 1.0).collect();
            let mut y = vec![f32::NAN; n * o];
            narrow_product(&x, &w, k, o, &mut y);
            for i in 0..n {
                for j in 0..o {
                    let want: f64 = (0..k).map(|t| x[i * k + t] as f64 * w[j * k + t] as f64).sum();
                    let got = y[i * o + j] as f64;
                    let scale: f64 = (0..k).map(|t| (x[i * k + t] as f64 * w[j * k + t] as f64).abs()).sum();
                    assert!(
                        (got - want).abs() <= 1e-6 * scale.max(1.0),
                        "({n},{k},{o}) y[{i}][{j}] {got} vs {want}"
                    );
                }
            }
        }
    }
}
