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
    if groups == 1 && s == 1 && crate::kernels::layer_norm_tiles::takes_tiles(shape.c) {
        // nn.LayerNorm's token rows: 16 rows at a time (layer_norm_tiles.rs).
        let k = crate::kernels::layer_norm_tiles::layer_norm_forward;
        return k(x, y, shape.c, eps, gamma, beta, relu, stats);
    }
    if groups == 1 && s == 1 && crate::kernels::layer_norm_rows::takes_rows(shape.c) {
        // Longer token rows (384, 768): one at a time on vector lanes (layer_norm_rows.rs).
        let k = crate::kernels::layer_norm_rows::layer_norm_forward;
        return k(x, y, shape.c, eps, gamma, beta, relu, stats);
    }
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
/// `layer_norm::layer_norm_backward`, which reduces over the samples directly.) With `relu`, dy is masked
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

pub(super) const LANES: usize = 8;

/// How one statistics set normalizes: x̂ = (x − mean)·invstd, and whether dy is masked by a
/// fused ReLU's output (y > 0).
#[derive(Clone, Copy)]
pub(super) struct SetNorm {
    pub(super) center: Center,
    pub(super) invstd: f32,
    pub(super) relu: bool,
}

impl SetNorm {
    #[inline(always)]
    pub(super) fn xhat(&self, x: f32) -> f32 {
        self.center.sub(x) * self.invstd
    }

    #[inline(always)]
    pub(super) fn grad(&self, y: f32, d: f32) -> f32 {
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
pub(super) fn block_dx(
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
