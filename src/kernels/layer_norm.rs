//! PyTorch's elementwise nn.LayerNorm backward on the (N, C, 1) view (C = the normalized
//! shape's size, one statistics set per row): dx and dγ, dβ summed over the rows, without the
//! per-element sums GroupNorm's backward would write. The forward is GroupNorm's
//! (`group_norm_forward_train` with G = 1, S = 1); the per-set math is shared with it.

use rayon::prelude::*;

use crate::kernels::batch_norm::{inverse_std, ChannelStats, Ncs};
use crate::kernels::group_norm::{block_dx, SetNorm, LANES};
use crate::kernels::reduce::Center;
use crate::kernels::simd::multiversion;

// nn.LayerNorm's backward on the (N, C, 1) view, one statistics set per sample: with
// g = γ·dy, dx = invstd·(g − Σg/C − x̂·Σg·x̂/C) per row; dγ = Σ_n dy·x̂, dβ = Σ_n dy.
/// A few tasks per thread, each a run of whole rows: every row is read once from memory for
/// one fused pass (its two sums, and its dy·x̂ and dy added into the task's f32 column
/// accumulators in `scratch`, resized here and reused across calls) and once more from cache
/// for dx; the tasks' accumulators are summed in f64 at the end. Measured against the
/// previous kernel (f64 accumulators per rayon split and a separate column pass, or a third
/// pass over x and dy for fewer than 4 rows per thread): see ARCHITECTURE.md, "LayerNorm's
/// backward".
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_backward(
    x: &[f32],
    y: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    shape: Ncs,
    eps: f64,
    gamma: Option<&[f32]>,
    relu: bool,
    stats: &[ChannelStats],
    dgamma: &mut [f64],
    dbeta: &mut [f64],
    scratch: &mut Vec<f32>,
) {
    let c = shape.c.max(1);
    if c >= COLUMN_SPLIT_FROM && x.len() >= 1 << 15 {
        layer_norm_backward_columns(x, y, dy, dx, c, eps, gamma, relu, stats, dgamma, dbeta);
        return;
    }
    let (rows, used) = crate::kernels::shape::row_tasks(shape.n, x.len());
    let span = rows * c;
    // Allocates only when a call needs more than any before (the engine's layer: first step).
    if scratch.len() < used * 2 * c {
        scratch.resize(used * 2 * c, 0.0);
    }
    let acc = &mut scratch[..used * 2 * c];
    let task = |dxt: &mut [f32], xt: &[f32], yt: &[f32], dt: &[f32], st: &[ChannelStats], a: &mut [f32]| {
        a.fill(0.0);
        let (g, b) = a.split_at_mut(c);
        let rows = dxt.chunks_mut(c).zip(xt.chunks(c)).zip(yt.chunks(c)).zip(dt.chunks(c));
        for ((((dxr, xr), yr), dr), st) in rows.zip(st) {
            layer_norm_row(xr, yr, dr, dxr, gamma, st, eps, relu, g, b);
        }
    };
    if used == 1 {
        task(dx, x, y, dy, stats, acc);
    } else {
        dx.par_chunks_mut(span)
            .zip(x.par_chunks(span).zip(y.par_chunks(span)).zip(dy.par_chunks(span)))
            .zip(stats.par_chunks(rows).zip(acc.par_chunks_mut(2 * c)))
            .for_each(|((dxt, ((xt, yt), dt)), (st, a))| task(dxt, xt, yt, dt, st, a));
    }
    dgamma.fill(0.0);
    dbeta.fill(0.0);
    for a in acc.chunks(2 * c) {
        let (g, b) = a.split_at(c);
        dgamma.iter_mut().zip(g).for_each(|(d, &v)| *d += v as f64);
        dbeta.iter_mut().zip(b).for_each(|(d, &v)| *d += v as f64);
    }
}

/// Rows of at least this many values take `layer_norm_backward_columns`: a row's x, dy and dx
/// no longer fit in L2 for the row kernel's second pass, and its per-task column accumulators
/// (2·C floats, read and written once per row) move as many bytes as the data.
const COLUMN_SPLIT_FROM: usize = 1 << 15;

/// Columns per task of `layer_norm_backward_columns` (its f64 dγ, dβ: 64 KB, in L2).
const COLUMN_TASK: usize = 4096;

/// `layer_norm_backward` for long rows, split by columns: each task owns a run of columns and
/// goes down all rows, adding each row's partial Σγg, Σγg·x̂ and its columns' dγ, dβ directly
/// (no per-task copies of the columns); then dx per (row, column run) from the combined sums.
#[allow(clippy::too_many_arguments)]
fn layer_norm_backward_columns(
    x: &[f32],
    y: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    c: usize,
    eps: f64,
    gamma: Option<&[f32]>,
    relu: bool,
    stats: &[ChannelStats],
    dgamma: &mut [f64],
    dbeta: &mut [f64],
) {
    let n = stats.len();
    let runs = c.div_ceil(COLUMN_TASK);
    // partial[j·n + r]: row r's (Σγg, Σγg·x̂) over column run j.
    let mut partial = vec![(0.0f64, 0.0f64); runs * n];
    dgamma
        .par_chunks_mut(COLUMN_TASK)
        .zip(dbeta.par_chunks_mut(COLUMN_TASK))
        .zip(partial.par_chunks_mut(n))
        .enumerate()
        .for_each(|(j, ((dg, db), part))| {
            let cols = j * COLUMN_TASK..j * COLUMN_TASK + dg.len();
            dg.fill(0.0);
            db.fill(0.0);
            let gm = gamma.map(|g| &g[cols.clone()]);
            for (r, (st, p)) in stats.iter().zip(part.iter_mut()).enumerate() {
                let at = r * c + cols.start..r * c + cols.end;
                *p = column_run_sums(&x[at.clone()], &y[at.clone()], &dy[at], gm, st, eps, relu, dg, db);
            }
        });
    let coef: Vec<(f32, f32, f32)> = (0..n)
        .map(|r| {
            let (sg, sgx) = (0..runs).fold((0.0, 0.0), |a, j| {
                let p = partial[j * n + r];
                (a.0 + p.0, a.1 + p.1)
            });
            let m = c as f64;
            (inverse_std(stats[r].var, eps), (sg / m) as f32, (sgx / m) as f32)
        })
        .collect();
    dx.par_chunks_mut(c).enumerate().for_each(|(r, dxr)| {
        dxr.par_chunks_mut(COLUMN_TASK).enumerate().for_each(|(j, dxs)| {
            let at = r * c + j * COLUMN_TASK..r * c + j * COLUMN_TASK + dxs.len();
            let gm = gamma.map(|g| &g[at.start - r * c..at.end - r * c]);
            column_run_dx(
                &x[at.clone()],
                &y[at.clone()],
                &dy[at],
                dxs,
                gm,
                relu,
                &stats[r],
                coef[r],
            );
        });
    });
}

multiversion! {
    /// One row's run of columns: its (Σγg, Σγg·x̂) in f64 lanes, and g·x̂, g added into the
    /// columns' dγ, dβ.
    fn column_run_sums(xr: &[f32], yr: &[f32], dr: &[f32], gamma: Option<&[f32]>, st: &ChannelStats, eps: f64, relu: bool, dg: &mut [f64], db: &mut [f64]) -> (f64, f64) {
        let norm = SetNorm { center: Center::new(st.mean), invstd: inverse_std(st.var, eps), relu };
        row_sums_and_columns(xr, yr, dr, gamma, norm, dg, db)
    }
}

multiversion! {
    /// One row's run of columns of dx, from the row's coefficients.
    fn column_run_dx(xr: &[f32], yr: &[f32], dr: &[f32], dxr: &mut [f32], gamma: Option<&[f32]>, relu: bool, st: &ChannelStats, coef: (f32, f32, f32)) {
        block_dx(xr, yr, dr, dxr, 1, gamma, relu, st, coef);
    }
}

multiversion! {
    /// One row of `layer_norm_backward`: Σγg and Σγg·x̂ (f64 lanes) and the row's dγ, dβ terms
    /// (into the task's f32 columns) in one pass, then dx.
    fn layer_norm_row(xr: &[f32], yr: &[f32], dr: &[f32], dxr: &mut [f32], gamma: Option<&[f32]>, st: &ChannelStats, eps: f64, relu: bool, dg: &mut [f32], db: &mut [f32]) {
        let invstd = inverse_std(st.var, eps);
        let center = Center::new(st.mean);
        let m = xr.len() as f64;
        let norm = SetNorm { center, invstd, relu };
        let (sg, sgx) = row_sums_and_columns(xr, yr, dr, gamma, norm, dg, db);
        block_dx(xr, yr, dr, dxr, 1, gamma, relu, st, (invstd, (sg / m) as f32, (sgx / m) as f32));
    }
}

/// A row's (Σγg, Σγg·x̂) in 8 f64 lanes, with each element's g·x̂ and g added into its column's
/// dγ, dβ (f32 per-task accumulators or f64 outputs): the one fused pass of both LayerNorm
/// backwards.
#[inline(always)]
fn row_sums_and_columns<A: Copy + std::ops::AddAssign + From<f32>>(
    xr: &[f32],
    yr: &[f32],
    dr: &[f32],
    gamma: Option<&[f32]>,
    norm: SetNorm,
    dg: &mut [A],
    db: &mut [A],
) -> (f64, f64) {
    let mut acc = ([0.0f64; LANES], [0.0f64; LANES]);
    let ones = [1.0f32; LANES];
    let full = xr.len() / LANES * LANES;
    let lanes = xr[..full]
        .chunks_exact(LANES)
        .zip(yr[..full].chunks_exact(LANES))
        .zip(dr[..full].chunks_exact(LANES))
        .zip(
            dg[..full]
                .chunks_exact_mut(LANES)
                .zip(db[..full].chunks_exact_mut(LANES)),
        );
    for (k, (((x8, y8), d8), (g8, b8))) in lanes.enumerate() {
        let gm = gamma.map_or(&ones[..], |g| &g[k * LANES..(k + 1) * LANES]);
        // Fixed-length arrays: the lane loop unrolls into vector operations (with slices of a
        // run-time length it stayed scalar, its f64 lanes shuffled in and out of registers).
        let arr = |v: &[f32]| -> [f32; LANES] { v.try_into().expect("a full chunk") };
        let (gs, bs): (&mut [A; LANES], &mut [A; LANES]) = (
            g8.try_into().expect("a full chunk"),
            b8.try_into().expect("a full chunk"),
        );
        full_lane_sums_and_columns(&arr(x8), &arr(y8), &arr(d8), &arr(gm), norm, &mut acc, gs, bs);
    }
    let tail = xr.len() - full;
    let gm = gamma.map_or(&ones[..tail], |g| &g[full..]);
    lane_sums_and_columns(
        &xr[full..],
        &yr[full..],
        &dr[full..],
        gm,
        norm,
        &mut acc,
        &mut dg[full..],
        &mut db[full..],
    );
    (acc.0.iter().sum(), acc.1.iter().sum())
}

/// `lane_sums_and_columns` on exactly LANES elements.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn full_lane_sums_and_columns<A: Copy + std::ops::AddAssign + From<f32>>(
    x: &[f32; LANES],
    y: &[f32; LANES],
    d: &[f32; LANES],
    gm: &[f32; LANES],
    n: SetNorm,
    acc: &mut ([f64; LANES], [f64; LANES]),
    dg: &mut [A; LANES],
    db: &mut [A; LANES],
) {
    for l in 0..LANES {
        let g = n.grad(y[l], d[l]);
        let xh = n.xhat(x[l]);
        acc.0[l] += (gm[l] * g) as f64;
        acc.1[l] += (gm[l] * g * xh) as f64;
        dg[l] += A::from(g * xh);
        db[l] += A::from(g);
    }
}

/// `lane_sums`, and each element's g·x̂ and g added into its column's dγ, dβ.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn lane_sums_and_columns<A: Copy + std::ops::AddAssign + From<f32>>(
    x: &[f32],
    y: &[f32],
    d: &[f32],
    gm: &[f32],
    n: SetNorm,
    acc: &mut ([f64; LANES], [f64; LANES]),
    dg: &mut [A],
    db: &mut [A],
) {
    for l in 0..x.len().min(LANES) {
        let g = n.grad(y[l], d[l]);
        let xh = n.xhat(x[l]);
        acc.0[l] += (gm[l] * g) as f64;
        acc.1[l] += (gm[l] * g * xh) as f64;
        dg[l] += A::from(g * xh);
        db[l] += A::from(g);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::group_norm::{group_norm_backward, group_norm_forward_train};

    /// Deterministic values in about [-2, 2).
    fn values(len: usize, seed: u32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state % 4000) as f32 / 1000.0 - 2.0
            })
            .collect()
    }

    #[test]
    fn layer_norm_backward_matches_the_per_element_reference() {
        // Under 2^15 values one task; above, several, each with its own accumulators; rows of
        // 2^15 values and more split by columns (a last run shorter than COLUMN_TASK).
        for (n, c) in [
            (1, 37),
            (3, 100),
            (8, 1000),
            (33, 257),
            (40, 1000),
            (5, 9001),
            (3, 40_003),
        ] {
            for (affine, relu) in [(false, false), (true, false), (true, true)] {
                let shape = Ncs { n, c, s: 1 };
                let x = values(n * c, 1);
                let dy = values(n * c, 2);
                let gamma = affine.then(|| values(c, 3));
                let beta = affine.then(|| values(c, 4));
                let mut y = vec![0.0; n * c];
                let mut stats = vec![ChannelStats::default(); n];
                group_norm_forward_train(
                    &x,
                    &mut y,
                    shape,
                    1,
                    1e-5,
                    gamma.as_deref(),
                    beta.as_deref(),
                    relu,
                    &mut stats,
                );
                // The reference: GroupNorm's backward with its per-element sums, summed over rows.
                let mut dx_ref = vec![0.0; n * c];
                let mut per = vec![(0.0, 0.0); n * c];
                group_norm_backward(
                    &x,
                    &y,
                    &dy,
                    &mut dx_ref,
                    shape,
                    1,
                    1e-5,
                    gamma.as_deref(),
                    relu,
                    &stats,
                    Some(&mut per),
                );
                let (mut dg_ref, mut db_ref) = (vec![0.0f64; c], vec![0.0f64; c]);
                for row in per.chunks(c) {
                    for (j, &(sd, sdx)) in row.iter().enumerate() {
                        db_ref[j] += sd;
                        dg_ref[j] += sdx;
                    }
                }
                let mut dx = vec![0.0; n * c];
                let (mut dg, mut db) = (vec![f64::NAN; c], vec![f64::NAN; c]);
                // Scratch left dirty by a larger call: each call clears what it uses.
                let mut scratch = vec![f32::NAN; 3 * n * c];
                layer_norm_backward(
                    &x,
                    &y,
                    &dy,
                    &mut dx,
                    shape,
                    1e-5,
                    gamma.as_deref(),
                    relu,
                    &stats,
                    &mut dg,
                    &mut db,
                    &mut scratch,
                );
                let close = |a: f64, b: f64, tol: f64| (a - b).abs() <= tol * (1.0 + b.abs());
                for (i, (&a, &b)) in dx.iter().zip(&dx_ref).enumerate() {
                    assert!(close(a as f64, b as f64, 1e-5), "dx[{i}] {a} vs {b} (n {n}, c {c})");
                }
                for j in 0..c {
                    assert!(
                        close(dg[j], dg_ref[j], 1e-5),
                        "dγ[{j}] {} vs {} (n {n}, c {c})",
                        dg[j],
                        dg_ref[j]
                    );
                    assert!(
                        close(db[j], db_ref[j], 1e-5),
                        "dβ[{j}] {} vs {} (n {n}, c {c})",
                        db[j],
                        db_ref[j]
                    );
                }
            }
        }
    }
}
