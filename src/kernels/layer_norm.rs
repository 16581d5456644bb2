//! PyTorch's elementwise nn.LayerNorm backward on the (N, C, 1) view (C = the normalized
//! shape's size, one statistics set per row): dx and dγ, dβ summed over the rows, without the
//! per-element sums GroupNorm's backward would write. The forward is GroupNorm's
//! (`group_norm_forward_train` with G = 1, S = 1). Rows of 16-256 values go to
//! `layer_norm_tiles` on AVX-512, forward and backward, and so does the backward of rows of
//! 2,048 to 2^15 values in tasks of at least 16 rows; rows of 257-2,047 values go to
//! `layer_norm_rows`, forward and backward. Row sums run in 16 f32 lanes added into f64
//! lanes every `FLUSH` values: vector speed at f64-like accuracy.

use rayon::prelude::*;

use crate::kernels::batch_norm::{inverse_std, ChannelStats, Ncs};
use crate::kernels::layer_norm_tiles;
use crate::kernels::reduce::{relu_mask, tree_sum, Center};
use crate::kernels::simd::multiversion;

/// Values per f32 lane group (one AVX-512 register, two AVX2 ones).
const W: usize = 16;

/// Values summed in the f32 lanes before they are added into the f64 totals: each lane adds
/// 16 values, so its rounding stays at a few ulps of a block's sum.
const FLUSH: usize = 16 * W;

/// Rows of at least this many values take `layer_norm_backward_columns`: a row's x, dy and dx
/// no longer fit in L2 for a second pass, and per-task column accumulators (2·C floats, read
/// and written once per row) move as many bytes as the data.
const LONG_ROW: usize = 1 << 15;

/// Rows from `LONG_TILES_FROM` values up to `LONG_TILES_TO` take the tiles' backward too, in
/// tasks of at least `LONG_TASK_ROWS` rows: 4 rows per tile share each load and store of dγ
/// and dβ, which for rows that do not fit L1 are L2 traffic as large as the row's own. Measured
/// (2 threads, forward + backward): [512, 4096] 1.47–1.87 → 1.07–1.37 ms, [256, 16384]
/// 3.62–4.13 → 3.26–3.66 ms; [128, 25088] level; [32, 12544] (8 rows per task) 0.33 → 0.55 ms
/// and [1024, 1024] 0.43 → 0.45 ms slower, hence the bounds. Rows of 2^15 values and more
/// (`LONG_ROW`) in such tasks took the columns' backward before: [64, 32768] 1.34–1.71 →
/// 1.27–1.52 ms (AMD host, two sets of alternating runs of a scratch probe, medians of 300).
const LONG_TILES_FROM: usize = 2048;
const _: () = assert!(LONG_TILES_FROM == crate::kernels::layer_norm_rows::ROWS_BELOW);
const LONG_TILES_TO: usize = 1 << 16;
const LONG_TASK_ROWS: usize = 16;

/// Whether `layer_norm_backward` takes the tiles for rows of `c` values, `rows` per task.
fn backward_takes_tiles(c: usize, rows: usize) -> bool {
    layer_norm_tiles::takes_tiles(c)
        || ((LONG_TILES_FROM..LONG_TILES_TO).contains(&c)
            && rows >= LONG_TASK_ROWS
            && layer_norm_tiles::tiles_vectorized())
}

/// Values i..i+W of `v`, copied: the loops read their inputs into arrays, compute into an
/// array and store it whole, so LLVM need not prove that an output does not alias an input
/// (with references into the slices it emitted scalar code, measured).
#[inline(always)]
fn lanes(v: &[f32], i: usize) -> [f32; W] {
    v[i..i + W].try_into().expect("W values")
}

/// Stores `o` at i..i+W of `v`.
#[inline(always)]
fn store(v: &mut [f32], i: usize, o: [f32; W]) {
    v[i..i + W].copy_from_slice(&o);
}

// nn.LayerNorm's backward on the (N, C, 1) view, one statistics set per sample: with
// g = γ·dy, dx = invstd·(g − Σg/C − x̂·Σg·x̂/C) per row; dγ = Σ_n dy·x̂, dβ = Σ_n dy.
/// A few tasks per thread, each a run of whole rows: every row is read once from memory for
/// one fused pass (its two sums, and its dy·x̂ and dy added into the task's f32 column
/// accumulators in `scratch`, resized here and reused across calls) and once more from cache
/// for dx; the tasks' accumulators are summed in f64 at the end and added, rounded once, into
/// `dgamma` and `dbeta` (the layer's gradients themselves: an f64 copy of them, written here
/// and added by the layer in one thread, was 10% of the time of [8, 64, 56, 56]'s forward +
/// backward). Measured against the previous kernels: see ARCHITECTURE.md, "LayerNorm's
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
    dgamma: &mut [f32],
    dbeta: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let c = shape.c.max(1);
    let (rows, used) = crate::kernels::shape::row_tasks(shape.n, x.len());
    if c >= LONG_ROW && !backward_takes_tiles(c, rows) && x.len() >= 1 << 15 {
        layer_norm_backward_columns(x, y, dy, dx, c, eps, gamma, relu, stats, dgamma, dbeta);
        return;
    }
    let span = rows * c;
    // Allocates only when a call needs more than any before (the engine's layer: first step).
    if scratch.len() < used * 2 * c {
        scratch.resize(used * 2 * c, 0.0);
    }
    let acc = &mut scratch[..used * 2 * c];
    let task = |dxt: &mut [f32], xt: &[f32], yt: &[f32], dt: &[f32], st: &[ChannelStats], a: &mut [f32]| {
        a.fill(0.0);
        let (g, b) = a.split_at_mut(c);
        if backward_takes_tiles(c, rows) {
            layer_norm_tiles::layer_norm_backward_tiles(xt, yt, dt, dxt, c, eps, gamma, relu, st, g, b);
        } else if crate::kernels::layer_norm_rows::takes_rows(c) {
            crate::kernels::layer_norm_rows::layer_norm_backward_rows(xt, yt, dt, dxt, c, eps, gamma, relu, st, g, b);
        } else {
            backward_rows(xt, yt, dt, dxt, c, gamma, relu, st, eps, g, b);
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
    let acc = &*acc;
    if c < 2 * COLUMN_TASK {
        add_task_sums(acc, c, 0, dgamma, dbeta);
        return;
    }
    dgamma
        .par_chunks_mut(COLUMN_TASK)
        .zip(dbeta.par_chunks_mut(COLUMN_TASK))
        .enumerate()
        .for_each(|(j, (dg, db))| add_task_sums(acc, c, j * COLUMN_TASK, dg, db));
}

/// dγ[j] += Σ_t g_t[at + j] and dβ[j] += Σ_t b_t[at + j] over the tasks' accumulators
/// `acc` ([g_t | b_t] of c values each), each sum in f64 and rounded once.
fn add_task_sums(acc: &[f32], c: usize, at: usize, dgamma: &mut [f32], dbeta: &mut [f32]) {
    for (i, (g, b)) in dgamma.iter_mut().zip(dbeta.iter_mut()).enumerate() {
        let (mut sg, mut sb) = (0.0f64, 0.0f64);
        for a in acc.chunks(2 * c) {
            sg += a[at + i] as f64;
            sb += a[c + at + i] as f64;
        }
        *g += sg as f32;
        *b += sb as f32;
    }
}

multiversion! {
    /// Rows of `c` values of `layer_norm_backward`, their dγ, dβ terms added into `dg`, `db`.
    fn backward_rows(xt: &[f32], yt: &[f32], dt: &[f32], dxt: &mut [f32], c: usize, gamma: Option<&[f32]>, relu: bool, stats: &[ChannelStats], eps: f64, dg: &mut [f32], db: &mut [f32]) {
        let rows = xt.chunks(c).zip(yt.chunks(c)).zip(dt.chunks(c)).zip(dxt.chunks_mut(c));
        for ((((xr, yr), dr), dxr), st) in rows.zip(stats) {
            let invstd = inverse_std(st.var, eps);
            let center = Center::new(st.mean);
            let m = c as f64;
            let (sg, sgx) = row_sums_for(xr, yr, dr, gamma, relu, center, invstd, dg, db);
            let coef = (invstd, (sg / m) as f32, (sgx / m) as f32);
            row_dx_for(xr, yr, dr, dxr, gamma, relu, center, coef)
        }
    }
}

/// `row_sums` instantiated for whether there is a γ and a fused ReLU (both backward paths).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn row_sums_for(
    xr: &[f32],
    yr: &[f32],
    dr: &[f32],
    gamma: Option<&[f32]>,
    relu: bool,
    center: Center,
    invstd: f32,
    dg: &mut [f32],
    db: &mut [f32],
) -> (f64, f64) {
    let gm = gamma.unwrap_or(&[]);
    match (gamma.is_some(), relu) {
        (true, false) => row_sums::<true, false>(xr, yr, dr, gm, center, invstd, dg, db),
        (true, true) => row_sums::<true, true>(xr, yr, dr, gm, center, invstd, dg, db),
        (false, false) => row_sums::<false, false>(xr, yr, dr, gm, center, invstd, dg, db),
        (false, true) => row_sums::<false, true>(xr, yr, dr, gm, center, invstd, dg, db),
    }
}

/// `row_dx` instantiated for whether there is a γ and a fused ReLU (both backward paths).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn row_dx_for(
    xr: &[f32],
    yr: &[f32],
    dr: &[f32],
    dxr: &mut [f32],
    gamma: Option<&[f32]>,
    relu: bool,
    center: Center,
    coef: (f32, f32, f32),
) {
    let gm = gamma.unwrap_or(&[]);
    match (gamma.is_some(), relu) {
        (true, false) => row_dx::<true, false>(xr, yr, dr, dxr, gm, center, coef),
        (true, true) => row_dx::<true, true>(xr, yr, dr, dxr, gm, center, coef),
        (false, false) => row_dx::<false, false>(xr, yr, dr, dxr, gm, center, coef),
        (false, true) => row_dx::<false, true>(xr, yr, dr, dxr, gm, center, coef),
    }
}

/// One row's (Σγg, Σγg·x̂), with each element's g·x̂ and g added into its column's dγ, dβ
/// (g = dy, masked by y > 0 after a fused ReLU): the one fused pass of the backward.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn row_sums<const G: bool, const R: bool>(
    xr: &[f32],
    yr: &[f32],
    dr: &[f32],
    gamma: &[f32],
    center: Center,
    invstd: f32,
    dg: &mut [f32],
    db: &mut [f32],
) -> (f64, f64) {
    let full = xr.len() / W * W;
    let ones = [1.0f32; W];
    // Every FLUSH values the f32 lanes go into f64 lanes. The loop is written out here, not in
    // a helper taking a closure: a closure is compiled apart from the `multiversion!` function
    // that calls it, without its AVX-512 (measured: scalar code).
    let (mut total_g, mut total_gx) = ([0.0f64; W], [0.0f64; W]);
    for start in (0..full).step_by(FLUSH) {
        let mut a = [0.0f32; W];
        let mut q = [0.0f32; W];
        for i in (start..(start + FLUSH).min(full)).step_by(W) {
            let (x, d) = (lanes(xr, i), lanes(dr, i));
            let y = if R { lanes(yr, i) } else { d };
            let gm = if G { lanes(gamma, i) } else { ones };
            let (mut gs, mut bs) = (lanes(dg, i), lanes(db, i));
            for l in 0..W {
                let g = grad::<R>(y[l], d[l]);
                let xh = center.sub(x[l]) * invstd;
                a[l] += gm[l] * g;
                q[l] += gm[l] * g * xh;
                gs[l] += g * xh;
                bs[l] += g;
            }
            store(dg, i, gs);
            store(db, i, bs);
        }
        for l in 0..W {
            total_g[l] += a[l] as f64;
            total_gx[l] += q[l] as f64;
        }
    }
    let (mut sg, mut sgx) = (tree_sum(total_g), tree_sum(total_gx));
    for i in full..xr.len() {
        let g = grad::<R>(yr[i], dr[i]);
        let xh = center.sub(xr[i]) * invstd;
        let gm = if G { gamma[i] } else { 1.0 };
        sg += (gm * g) as f64;
        sgx += (gm * g * xh) as f64;
        dg[i] += g * xh;
        db[i] += g;
    }
    (sg, sgx)
}

/// dy, masked by y > 0 after a fused ReLU.
#[inline(always)]
fn grad<const R: bool>(y: f32, d: f32) -> f32 {
    if R {
        relu_mask(y, d)
    } else {
        d
    }
}

/// One row's dx = invstd·(γg − a − x̂·b) from its coefficients (invstd, a = Σγg/m,
/// b = Σγg·x̂/m).
#[inline(always)]
fn row_dx<const G: bool, const R: bool>(
    xr: &[f32],
    yr: &[f32],
    dr: &[f32],
    dxr: &mut [f32],
    gamma: &[f32],
    center: Center,
    (invstd, a, b): (f32, f32, f32),
) {
    let full = xr.len() / W * W;
    let ones = [1.0f32; W];
    for i in (0..full).step_by(W) {
        let (x, d) = (lanes(xr, i), lanes(dr, i));
        let y = if R { lanes(yr, i) } else { d };
        let gm = if G { lanes(gamma, i) } else { ones };
        let mut o = [0.0f32; W];
        for l in 0..W {
            o[l] = invstd * (gm[l] * grad::<R>(y[l], d[l]) - a - center.sub(x[l]) * invstd * b);
        }
        store(dxr, i, o);
    }
    for i in full..xr.len() {
        dxr[i] =
            invstd * (if G { gamma[i] } else { 1.0 } * grad::<R>(yr[i], dr[i]) - a - center.sub(xr[i]) * invstd * b);
    }
}

/// Columns per task of `layer_norm_backward_columns` (two f32 column runs: 32 KB, in L2).
const COLUMN_TASK: usize = 4096;

/// `layer_norm_backward` for long rows, split by columns: each task owns a run of columns and
/// goes down all rows, adding each row's partial Σγg, Σγg·x̂ and its columns' dγ, dβ (into the
/// task's f32 runs, added into `dgamma` and `dbeta` at the end); then dx per (row, column
/// run) from the combined sums.
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
    dgamma: &mut [f32],
    dbeta: &mut [f32],
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
            let gm = gamma.map(|g| &g[cols.clone()]);
            let (mut g32, mut b32) = (vec![0.0f32; dg.len()], vec![0.0f32; dg.len()]);
            for (r, (st, p)) in stats.iter().zip(part.iter_mut()).enumerate() {
                let at = r * c + cols.start..r * c + cols.end;
                *p = column_run_sums(
                    &x[at.clone()],
                    &y[at.clone()],
                    &dy[at],
                    gm,
                    st,
                    eps,
                    relu,
                    &mut g32,
                    &mut b32,
                );
            }
            dg.iter_mut().zip(&g32).for_each(|(o, &v)| *o += v);
            db.iter_mut().zip(&b32).for_each(|(o, &v)| *o += v);
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
    /// One row's run of columns: its (Σγg, Σγg·x̂), and g·x̂, g added into the run's dγ, dβ.
    fn column_run_sums(xr: &[f32], yr: &[f32], dr: &[f32], gamma: Option<&[f32]>, st: &ChannelStats, eps: f64, relu: bool, dg: &mut [f32], db: &mut [f32]) -> (f64, f64) {
        let (center, invstd) = (Center::new(st.mean), inverse_std(st.var, eps));
        row_sums_for(xr, yr, dr, gamma, relu, center, invstd, dg, db)
    }
}

multiversion! {
    /// One row's run of columns of dx, from the row's coefficients.
    fn column_run_dx(xr: &[f32], yr: &[f32], dr: &[f32], dxr: &mut [f32], gamma: Option<&[f32]>, relu: bool, st: &ChannelStats, coef: (f32, f32, f32)) {
        row_dx_for(xr, yr, dr, dxr, gamma, relu, Center::new(st.mean), coef)
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
        // 2^15 values and more split by columns (a last run shorter than COLUMN_TASK), or on
        // tiles in tasks of 16 rows and more (64 rows on up to 2 threads).
        for (n, c) in [
            (1, 37),
            (3, 100),
            (8, 1000),
            (33, 257),
            (40, 1000),
            (5, 9001),
            (3, 40_003),
            (64, 33_000),
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
                // Added into: what the gradients held before stays in them.
                let (mut dg, mut db) = (vec![1.0f32; c], vec![-1.0f32; c]);
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
                    let (g, b) = (dg[j] as f64 - 1.0, db[j] as f64 + 1.0);
                    assert!(close(g, dg_ref[j], 1e-5), "dγ[{j}] {g} vs {} (n {n}, c {c})", dg_ref[j]);
                    assert!(close(b, db_ref[j], 1e-5), "dβ[{j}] {b} vs {} (n {n}, c {c})", db_ref[j]);
                }
            }
        }
    }
}
