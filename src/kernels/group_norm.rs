//! Within-sample statistics on an (N, C, S) view: GroupNorm(G) takes one set per (n, g), a
//! contiguous block of (C/G)·S values. LayerNorm (G = 1) and InstanceNorm (G = C) are the same
//! kernels; PyTorch's elementwise nn.LayerNorm is the (N, C·H·W, 1) view with G = 1. Blocks run
//! in parallel; each is read from memory once and revisited in cache.

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
                for (j, (o, &v)) in yb.iter_mut().zip(xb).enumerate() {
                    let a = invstd * gamma.map_or(1.0, |g| g[j]);
                    let z = center.sub(v) * a + beta.map_or(0.0, |b| b[j]);
                    *o = if relu { reduce::relu(z) } else { z };
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

/// Backward: with g = γ·dy inside each (n, group) set of m values,
/// dx = invstd/m · (m·g - Σg - x̂·Σg·x̂); per (n, c) the sums Σdy and Σdy·x̂ go to
/// `channel_sums[n·C + c]` for the parameter gradients. With `relu`, dy is masked by y > 0.
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
    channel_sums: &mut [(f64, f64)],
) {
    let (cg, s) = (shape.c / groups, shape.s);
    let block = cg * s;
    let tile = tile_for(block);
    let span = block * tile;
    dx.par_chunks_mut(span)
        .zip(x.par_chunks(span).zip(y.par_chunks(span)).zip(dy.par_chunks(span)))
        .zip(channel_sums.par_chunks_mut(cg * tile).zip(stats.par_chunks(tile)))
        .enumerate()
        .for_each(|(t, ((dxt, ((xt, yt), dt)), (sums, st)))| {
            let layout = Layout {
                block,
                s,
                first: t * tile,
                groups,
            };
            backward_tile(xt, yt, dt, dxt, layout, eps, gamma, relu, st, sums);
        });
}

multiversion! {
    /// A tile's backward: per block and channel run Σg and Σg·x̂ (into `sums`), for every block
    /// of the tile; then dx = invstd·(γ·g - Σγg/m - x̂·Σγg·x̂/m).
    fn backward_tile(xt: &[f32], yt: &[f32], dt: &[f32], dxt: &mut [f32], l: Layout, eps: f64, gamma: Option<&[f32]>, relu: bool, stats: &[ChannelStats], sums: &mut [(f64, f64)]) {
        // Per block: invstd and the two dx coefficients a = Σγg/m, b = Σγg·x̂/m·invstd.
        let mut coef = [(0.0f32, 0.0f32, 0.0f32); TILE];
        let cg = l.channels_per_block();
        let blocks = xt.chunks(l.block).zip(yt.chunks(l.block)).zip(dt.chunks(l.block));
        for (k, ((((xb, yb), db), st), bsums)) in blocks.zip(stats).zip(sums.chunks_mut(cg)).enumerate() {
            let gamma = gamma.map(|g| &g[l.channels(k)]);
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
    sums: &mut [(f64, f64)],
) -> (f32, f32, f32) {
    let invstd = inverse_std(st.var, eps);
    let center = Center::new(st.mean);
    let m = xb.len() as f64;
    if s == 1 {
        // nn.LayerNorm's elementwise affine: per-element sums in one pass.
        let (mut sg, mut sgx) = (0.0f64, 0.0f64);
        for (j, sum) in sums.iter_mut().enumerate() {
            let g = if relu { relu_mask(yb[j], db[j]) } else { db[j] };
            let xhat = center.sub(xb[j]) * invstd;
            *sum = (g as f64, (g * xhat) as f64);
            let gm = gamma.map_or(1.0, |gv| gv[j]);
            sg += (gm * g) as f64;
            sgx += (gm * g * xhat) as f64;
        }
        return (invstd, (sg / m) as f32, (sgx / m) as f32);
    }
    let (mut sg, mut sgx) = (0.0f64, 0.0f64);
    for (j, sum) in sums.iter_mut().enumerate() {
        let r = j * s..(j + 1) * s;
        let mut acc = PairSums::new();
        acc.add_grad(&xb[r.clone()], relu.then(|| &yb[r.clone()]), &db[r], center);
        let (sd, sdx) = acc.totals();
        let sdx_hat = sdx * invstd as f64;
        *sum = (sd, sdx_hat);
        let gm = gamma.map_or(1.0, |g| g[j]) as f64;
        sg += gm * sd;
        sgx += gm * sdx_hat;
    }
    (invstd, (sg / m) as f32, (sgx / m * invstd as f64) as f32)
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
        for (j, o) in dxb.iter_mut().enumerate() {
            let g = if relu { relu_mask(yb[j], db[j]) } else { db[j] };
            let xhat = center.sub(xb[j]) * invstd;
            *o = invstd * (gamma.map_or(1.0, |gv| gv[j]) * g - a - xhat * b);
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
