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
    /// `narrow_product` on one run of at most `TASK_ROWS` rows (its partial sums live on the stack).
    pub fn narrow_rows(x: &[f32], w: &[f32], k: usize, o: usize, y: &mut [f32]) => rows
}

/// Features per pass over a task's rows: w's 10 × 512 values (20 KB) stay in L1 while every
/// pair of rows runs over them. A pair ran over all of k at once, w (250 KB for seed-cnn's
/// 6272 -> 10 head) from L2 for every pair: the head at batch 128 114 -> 108 µs (min of 6
/// alternating runs, AMD host). A count of outputs fixed at compile time (no branch per
/// output) measured slower, 109 -> 129 µs.
const CHUNK: usize = 32 * LANES;

#[inline(always)]
fn rows<V: Lanes>(x: &[f32], w: &[f32], k: usize, o: usize, y: &mut [f32]) {
    assert!(x.len() <= TASK_ROWS * k, "narrow_rows: more than a task's rows");
    let full = k / LANES * LANES;
    // The partial sums of every row of the task between chunks: stored and reloaded whole,
    // so each lane sums its features in the same order as in one pass.
    let mut acc = [[V::zero(); NARROW_MAX]; TASK_ROWS];
    for c0 in (0..full).step_by(CHUNK) {
        let c1 = (c0 + CHUNK).min(full);
        let mut pairs = x.chunks_exact(2 * k).zip(acc.chunks_exact_mut(2));
        for (xp, ap) in &mut pairs {
            let (x0, x1) = xp.split_at(k);
            let (a0, a1) = ap.split_at_mut(1);
            chunk::<V, 2>([x0, x1], w, k, o, c0..c1, [&mut a0[0], &mut a1[0]]);
        }
        let n = x.len() / k;
        if n % 2 == 1 {
            chunk::<V, 1>([&x[(n - 1) * k..]], w, k, o, c0..c1, [&mut acc[n - 1]]);
        }
    }
    for ((xr, yr), ar) in x.chunks_exact(k).zip(y.chunks_exact_mut(o)).zip(&acc) {
        for ((out, wr), a) in yr.iter_mut().zip(w.chunks_exact(k)).zip(ar) {
            let mut lanes = [0.0f32; LANES];
            a.store(&mut lanes);
            let mut s = tree_sum(lanes);
            for (p, q) in xr[full..k].iter().zip(&wr[full..k]) {
                s = p.mul_add(*q, s);
            }
            *out = s;
        }
    }
}

/// R rows of x against every output row of w over the features `range`, into their partial
/// sums `acc` (held in registers for the range).
#[inline(always)]
fn chunk<V: Lanes, const R: usize>(
    x: [&[f32]; R],
    w: &[f32],
    k: usize,
    o: usize,
    range: std::ops::Range<usize>,
    acc: [&mut [V; NARROW_MAX]; R],
) {
    let mut a: [[V; NARROW_MAX]; R] = std::array::from_fn(|r| *acc[r]);
    for i in range.step_by(LANES) {
        let xs: [V; R] = std::array::from_fn(|r| V::load(&x[r][i..]));
        for (j, wr) in w.chunks_exact(k).take(o).enumerate() {
            let wv = V::load(&wr[i..]);
            for r in 0..R {
                a[r][j] = xs[r].mul_add(wv, a[r][j]);
            }
        }
    }
    for (dst, src) in acc.into_iter().zip(a) {
        *dst = src;
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
