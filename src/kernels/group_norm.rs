//! Within-sample statistics on an (N, C, S) view: GroupNorm(G) takes one set per (n, g), a
//! contiguous block of (C/G)·S values. LayerNorm (G = 1) and InstanceNorm (G = C) are the same
//! kernels; PyTorch's elementwise nn.LayerNorm is the (N, C·H·W, 1) view with G = 1. Blocks run
//! in parallel; each is read from memory once and revisited in cache.

use std::iter::repeat;

use rayon::prelude::*;

use crate::kernels::batch_norm::{apply_run, inverse_std, ChannelStats, Ncs};
use crate::kernels::reduce::{self, mean_var, relu_mask, Center, PairSums};
use crate::kernels::simd::multiversion;

/// Values per f32 run inside a block before the f64 combine.
const RUN: usize = 4096;

/// Small blocks are processed several at a time, up to `TILE` blocks of together at most
/// `TILE_VALUES` values (so the tile's x, y, dy and dx stay in L1): first the statistics of every
/// block of the tile, then their outputs. Each block's scalar tail (f64 combine, square root,
/// division) then overlaps its neighbours' sums instead of stalling the pass after it, and
/// dispatch and task overhead are paid once per tile (InstanceNorm on 7x7 maps: 49 values).
/// Measured A/B: 512 or 2048 values per tile were slower on some shapes, 4096 (out of L1) on all.
const TILE: usize = 16;
const TILE_VALUES: usize = 1024;

/// Blocks per task.
fn tile_for(block: usize) -> usize {
    (TILE_VALUES / block.max(1)).clamp(1, TILE)
}

/// Training forward: per (n, g) block, statistics (into `stats[n·G + g]`), then
/// y = act((x - mean)·invstd·γ[c] + β[c]).
#[allow(clippy::too_many_arguments)]
pub fn group_norm_forward_train(
    x: &[f32],
    y: &mut [f32],
    shape: Ncs,
    groups: usize,
    eps: f64,
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    relu: bool,
    stats: &mut [ChannelStats],
) {
    let (cg, s) = (shape.c / groups, shape.s);
    let block = cg * s;
    let tile = tile_for(block);
    y.par_chunks_mut(block * tile)
        .zip(x.par_chunks(block * tile))
        .zip(stats.par_chunks_mut(tile))
        .enumerate()
        .for_each(|(t, ((yt, xt), st))| {
            let layout = Layout {
                block,
                s,
                first: t * tile,
                groups,
            };
            forward_tile(xt, yt, layout, eps, gamma, beta, relu, st);
        });
}

/// Where a tile's blocks sit: `block` values each in channel runs of `s`, the first being
/// block `first` of the tensor (its group is `first % groups`).
#[derive(Clone, Copy)]
struct Layout {
    block: usize,
    s: usize,
    first: usize,
    groups: usize,
}

impl Layout {
    /// Channels per block (the group's channel runs).
    fn channels_per_block(&self) -> usize {
        self.block / self.s
    }

    /// The channel range of the tile's k-th block within γ and β.
    fn channels(&self, k: usize) -> std::ops::Range<usize> {
        let cg = self.channels_per_block();
        let g0 = ((self.first + k) % self.groups) * cg;
        g0..g0 + cg
    }
}

multiversion! {
    /// A tile of blocks: the statistics of each, then y = act((x - mean)·invstd·γ[j] + β[j])
    /// over its channel runs of length s (s = 1 is nn.LayerNorm's elementwise affine).
    fn forward_tile(xt: &[f32], yt: &mut [f32], l: Layout, eps: f64, gamma: Option<&[f32]>, beta: Option<&[f32]>, relu: bool, stats: &mut [ChannelStats]) {
        for (xb, st) in xt.chunks(l.block).zip(stats.iter_mut()) {
            let (mean, var) = mean_var(xb.chunks(RUN));
            *st = ChannelStats { mean, var };
        }
        for (k, ((xb, yb), st)) in xt.chunks(l.block).zip(yt.chunks_mut(l.block)).zip(stats.iter()).enumerate() {
            let ch = l.channels(k);
            let gamma = gamma.map(|g| &g[ch.clone()]);
            let beta = beta.map(|b| &b[ch]);
            let invstd = inverse_std(st.var, eps);
            let center = Center::new(st.mean);
            if l.s == 1 {
                // Elementwise affine: one pass over the block with per-element γ, β.
                match (gamma, beta) {
                    (Some(g), Some(b)) => affine_elementwise(xb, yb, center, invstd, g.iter().copied(), b.iter().copied(), relu),
                    (Some(g), None) => affine_elementwise(xb, yb, center, invstd, g.iter().copied(), repeat(0.0), relu),
                    (None, Some(b)) => affine_elementwise(xb, yb, center, invstd, repeat(1.0), b.iter().copied(), relu),
                    (None, None) => affine_elementwise(xb, yb, center, invstd, repeat(1.0), repeat(0.0), relu),
                }
                continue;
            }
            for (j, (xr, yr)) in xb.chunks(l.s).zip(yb.chunks_mut(l.s)).enumerate() {
                let a = invstd * gamma.map_or(1.0, |g| g[j]);
                apply_run(xr, yr, center, a, beta.map_or(0.0, |b| b[j]), relu);
            }
        }
    }
}

/// y = act((x − mean)·invstd·γ[j] + β[j]) over a block with per-element γ, β (nn.LayerNorm);
/// generic over the two iterators so that each combination compiles to one vector loop.
#[inline(always)]
fn affine_elementwise(
    xb: &[f32],
    yb: &mut [f32],
    center: Center,
    invstd: f32,
    gamma: impl Iterator<Item = f32>,
    beta: impl Iterator<Item = f32>,
    relu: bool,
) {
    let it = yb.iter_mut().zip(xb).zip(gamma.zip(beta));
    if relu {
        it.for_each(|((o, &v), (g, b))| *o = reduce::relu(center.sub(v) * (invstd * g) + b));
    } else {
        it.for_each(|((o, &v), (g, b))| *o = center.sub(v) * (invstd * g) + b);
    }
}

/// Backward: with g = γ·dy inside each (n, group) set of m values,
/// dx = invstd/m · (m·g - Σg - x̂·Σg·x̂); per (n, c) the sums Σdy and Σdy·x̂ go to
/// `channel_sums[n·C + c]` for the parameter gradients, when given. (nn.LayerNorm's C·H·W
/// per-element sums would be four tensor-sizes of f64: its layer and the Python API use
/// `layer_norm_backward`, which reduces over the samples directly.) With `relu`, dy is masked
/// by y > 0.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_backward(
    x: &[f32],
    y: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    shape: Ncs,
    groups: usize,
    eps: f64,
    gamma: Option<&[f32]>,
    relu: bool,
    stats: &[ChannelStats],
    channel_sums: Option<&mut [(f64, f64)]>,
) {
    let (cg, s) = (shape.c / groups, shape.s);
    let block = cg * s;
    let tile = tile_for(block);
    let span = block * tile;
    let layout = |t: usize| Layout {
        block,
        s,
        first: t * tile,
        groups,
    };
    let tiles = dx
        .par_chunks_mut(span)
        .zip(x.par_chunks(span).zip(y.par_chunks(span)).zip(dy.par_chunks(span)));
    match channel_sums {
        Some(cs) => tiles
            .zip(cs.par_chunks_mut(cg * tile).zip(stats.par_chunks(tile)))
            .enumerate()
            .for_each(|(t, ((dxt, ((xt, yt), dt)), (sums, st)))| {
                backward_tile(xt, yt, dt, dxt, layout(t), eps, gamma, relu, st, Some(sums))
            }),
        None => tiles
            .zip(stats.par_chunks(tile))
            .enumerate()
            .for_each(|(t, ((dxt, ((xt, yt), dt)), st))| {
                backward_tile(xt, yt, dt, dxt, layout(t), eps, gamma, relu, st, None)
            }),
    }
}

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
        lane_sums_and_columns(x8, y8, d8, gm, norm, &mut acc, g8, b8);
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

multiversion! {
    /// A tile's backward: per block and channel run Σg and Σg·x̂ (into `sums`), for every block
    /// of the tile; then dx = invstd·(γ·g - Σγg/m - x̂·Σγg·x̂/m).
    fn backward_tile(xt: &[f32], yt: &[f32], dt: &[f32], dxt: &mut [f32], l: Layout, eps: f64, gamma: Option<&[f32]>, relu: bool, stats: &[ChannelStats], sums: Option<&mut [(f64, f64)]>) {
        // Per block: invstd and the two dx coefficients a = Σγg/m, b = Σγg·x̂/m·invstd.
        let mut coef = [(0.0f32, 0.0f32, 0.0f32); TILE];
        let cg = l.channels_per_block();
        let blocks = xt.chunks(l.block).zip(yt.chunks(l.block)).zip(dt.chunks(l.block));
        let mut sums = sums;
        for (k, (((xb, yb), db), st)) in blocks.zip(stats).enumerate() {
            let gamma = gamma.map(|g| &g[l.channels(k)]);
            let bsums = sums.as_deref_mut().map(|s| &mut s[k * cg..(k + 1) * cg]);
            coef[k] = block_grad_sums(xb, yb, db, l.s, eps, gamma, relu, st, bsums);
        }
        let blocks = dxt.chunks_mut(l.block).zip(xt.chunks(l.block)).zip(yt.chunks(l.block)).zip(dt.chunks(l.block));
        for (k, ((((dxb, xb), yb), db), st)) in blocks.zip(stats).enumerate() {
            let gamma = gamma.map(|g| &g[l.channels(k)]);
            block_dx(xb, yb, db, dxb, l.s, gamma, relu, st, coef[k]);
        }
    }
}

/// One block's sums for the backward: per channel run (Σg, Σg·x̂) into `sums`; returns
/// (invstd, a, b) with a = Σγg/m and b = Σγg·x̂/m·invstd.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn block_grad_sums(
    xb: &[f32],
    yb: &[f32],
    db: &[f32],
    s: usize,
    eps: f64,
    gamma: Option<&[f32]>,
    relu: bool,
    st: &ChannelStats,
    sums: Option<&mut [(f64, f64)]>,
) -> (f32, f32, f32) {
    let invstd = inverse_std(st.var, eps);
    let center = Center::new(st.mean);
    let m = xb.len() as f64;
    if s == 1 {
        // nn.LayerNorm's elementwise affine: per-element sums in one pass.
        let norm = SetNorm { center, invstd, relu };
        let (sg, sgx) = elementwise_grad_sums(xb, yb, db, gamma, norm, sums);
        return (invstd, (sg / m) as f32, (sgx / m) as f32);
    }
    let (mut sg, mut sgx) = (0.0f64, 0.0f64);
    let mut sums = sums;
    for j in 0..xb.len() / s {
        let r = j * s..(j + 1) * s;
        let mut acc = PairSums::new();
        acc.add_grad(&xb[r.clone()], relu.then(|| &yb[r.clone()]), &db[r], center);
        let (sd, sdx) = acc.totals();
        let sdx_hat = sdx * invstd as f64;
        if let Some(sums) = sums.as_deref_mut() {
            sums[j] = (sd, sdx_hat);
        }
        let gm = gamma.map_or(1.0, |g| g[j]) as f64;
        sg += gm * sd;
        sgx += gm * sdx_hat;
    }
    (invstd, (sg / m) as f32, (sgx / m * invstd as f64) as f32)
}

/// Per element: (g, g·x̂) into `sums` when given (g = dy masked by y > 0 with `relu`); returns
/// Σγ·g and Σγ·g·x̂, accumulated in f64 over 8 lanes (independent chains, so the loop runs at
/// vector speed rather than at one dependent f64 add per element).
#[inline(always)]
fn elementwise_grad_sums(
    xb: &[f32],
    yb: &[f32],
    db: &[f32],
    gamma: Option<&[f32]>,
    n: SetNorm,
    sums: Option<&mut [(f64, f64)]>,
) -> (f64, f64) {
    let mut acc = ([0.0f64; LANES], [0.0f64; LANES]);
    let ones = [1.0f32; LANES];
    let full = xb.len() / LANES * LANES;
    let blocks = xb[..full]
        .chunks_exact(LANES)
        .zip(yb[..full].chunks_exact(LANES))
        .zip(db[..full].chunks_exact(LANES));
    for (k, ((x8, y8), d8)) in blocks.enumerate() {
        let g8 = gamma.map_or(&ones[..], |g| &g[k * LANES..(k + 1) * LANES]);
        lane_sums(x8, y8, d8, g8, n, &mut acc);
    }
    let tail = xb.len() - full;
    let gt = gamma.map_or(&ones[..tail], |g| &g[full..]);
    lane_sums(&xb[full..], &yb[full..], &db[full..], gt, n, &mut acc);
    if let Some(sums) = sums {
        for (((sum, &x), &y), &d) in sums.iter_mut().zip(xb).zip(yb).zip(db) {
            let g = n.grad(y, d);
            *sum = (g as f64, (g * n.xhat(x)) as f64);
        }
    }
    (acc.0.iter().sum(), acc.1.iter().sum())
}

const LANES: usize = 8;

/// How one statistics set normalizes: x̂ = (x − mean)·invstd, and whether dy is masked by a
/// fused ReLU's output (y > 0).
#[derive(Clone, Copy)]
struct SetNorm {
    center: Center,
    invstd: f32,
    relu: bool,
}

impl SetNorm {
    #[inline(always)]
    fn xhat(&self, x: f32) -> f32 {
        self.center.sub(x) * self.invstd
    }

    #[inline(always)]
    fn grad(&self, y: f32, d: f32) -> f32 {
        if self.relu {
            relu_mask(y, d)
        } else {
            d
        }
    }
}

/// Up to LANES elements added lane by lane into Σγg and Σγg·x̂.
#[inline(always)]
fn lane_sums(x: &[f32], y: &[f32], d: &[f32], gm: &[f32], n: SetNorm, acc: &mut ([f64; LANES], [f64; LANES])) {
    for l in 0..x.len().min(LANES) {
        let g = n.grad(y[l], d[l]);
        acc.0[l] += (gm[l] * g) as f64;
        acc.1[l] += (gm[l] * g * n.xhat(x[l])) as f64;
    }
}

/// One block's dx from its coefficients (invstd, a, b) of `block_grad_sums`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn block_dx(
    xb: &[f32],
    yb: &[f32],
    db: &[f32],
    dxb: &mut [f32],
    s: usize,
    gamma: Option<&[f32]>,
    relu: bool,
    st: &ChannelStats,
    (invstd, a, b): (f32, f32, f32),
) {
    let center = Center::new(st.mean);
    if s == 1 {
        let dx = |o: &mut f32, x: f32, y: f32, d: f32, gm: f32| {
            let g = if relu { relu_mask(y, d) } else { d };
            *o = invstd * (gm * g - a - center.sub(x) * invstd * b);
        };
        let it = dxb.iter_mut().zip(xb).zip(yb.iter().zip(db));
        match gamma {
            Some(gv) => it.zip(gv).for_each(|(((o, &x), (&y, &d)), &gm)| dx(o, x, y, d, gm)),
            None => it.for_each(|((o, &x), (&y, &d))| dx(o, x, y, d, 1.0)),
        }
        return;
    }
    for (j, ((dxr, xr), (yr, dr))) in dxb
        .chunks_mut(s)
        .zip(xb.chunks(s))
        .zip(yb.chunks(s).zip(db.chunks(s)))
        .enumerate()
    {
        let k = invstd * gamma.map_or(1.0, |g| g[j]);
        if relu {
            for (((o, &xv), &yv), &g) in dxr.iter_mut().zip(xr).zip(yr).zip(dr) {
                *o = k * relu_mask(yv, g) - invstd * (a + center.sub(xv) * b);
            }
        } else {
            for ((o, &xv), &g) in dxr.iter_mut().zip(xr).zip(dr) {
                *o = k * g - invstd * (a + center.sub(xv) * b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
