//! Within-sample statistics on an (N, C, S) view: GroupNorm(G) takes one set per (n, g), a
//! contiguous block of (C/G)·S values. LayerNorm (G = 1) and InstanceNorm (G = C) are the same
//! kernels; PyTorch's elementwise nn.LayerNorm is the (N, C·H·W, 1) view with G = 1. Blocks run
//! in parallel; each is read from memory once and revisited in cache.

use rayon::prelude::*;

use crate::kernels::batch_norm::{apply_run, inverse_std, ChannelStats};
use crate::kernels::reduce::{mean_var, relu_mask, Center, PairSums};
use crate::kernels::simd::multiversion;

/// Values per f32 run inside a block before the f64 combine.
const RUN: usize = 4096;

/// Training forward: per (n, g) block, statistics (into `stats[n·G + g]`), then
/// y = act((x - mean)·invstd·γ[c] + β[c]).
#[allow(clippy::too_many_arguments)]
pub fn group_norm_forward_train(
    x: &[f32],
    y: &mut [f32],
    c: usize,
    s: usize,
    groups: usize,
    eps: f64,
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    relu: bool,
    stats: &mut [ChannelStats],
) {
    let cg = c / groups;
    let block = cg * s;
    y.par_chunks_mut(block)
        .zip(x.par_chunks(block))
        .zip(stats.par_iter_mut())
        .enumerate()
        .for_each(|(k, ((yb, xb), st))| {
            let g0 = (k % groups) * cg;
            let gamma = gamma.map(|g| &g[g0..g0 + cg]);
            let beta = beta.map(|b| &b[g0..g0 + cg]);
            forward_block(xb, yb, s, eps, gamma, beta, relu, st);
        });
}

multiversion! {
    /// One block: statistics, then y = act((x - mean)·invstd·γ[j] + β[j]) over its channel runs
    /// of length s (s = 1 is nn.LayerNorm's elementwise affine).
    fn forward_block(xb: &[f32], yb: &mut [f32], s: usize, eps: f64, gamma: Option<&[f32]>, beta: Option<&[f32]>, relu: bool, st: &mut ChannelStats) {
        let (mean, var) = mean_var(xb.chunks(RUN));
        *st = ChannelStats { mean, var };
        let invstd = inverse_std(var, eps);
        let center = Center::new(mean);
        if s == 1 {
            // Elementwise affine: one pass over the block with per-element γ, β.
            for (j, (o, &v)) in yb.iter_mut().zip(xb).enumerate() {
                let a = invstd * gamma.map_or(1.0, |g| g[j]);
                let z = center.sub(v) * a + beta.map_or(0.0, |b| b[j]);
                *o = if relu { z.max(0.0) } else { z };
            }
            return;
        }
        for (j, (xr, yr)) in xb.chunks(s).zip(yb.chunks_mut(s)).enumerate() {
            let a = invstd * gamma.map_or(1.0, |g| g[j]);
            apply_run(xr, yr, center, a, beta.map_or(0.0, |b| b[j]), relu);
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
    c: usize,
    s: usize,
    groups: usize,
    eps: f64,
    gamma: Option<&[f32]>,
    relu: bool,
    stats: &[ChannelStats],
    channel_sums: &mut [(f64, f64)],
) {
    let cg = c / groups;
    let block = cg * s;
    dx.par_chunks_mut(block)
        .zip(x.par_chunks(block).zip(y.par_chunks(block)).zip(dy.par_chunks(block)))
        .zip(channel_sums.par_chunks_mut(cg).zip(stats.par_iter()))
        .enumerate()
        .for_each(|(k, ((dxb, ((xb, yb), db)), (sums, st)))| {
            let g0 = (k % groups) * cg;
            let gamma = gamma.map(|g| &g[g0..g0 + cg]);
            backward_block(xb, yb, db, dxb, s, eps, gamma, relu, st, sums);
        });
}

multiversion! {
    /// One block's backward: per channel run Σg and Σg·x̂ (into `sums`), then
    /// dx = invstd·(γ·g - Σγg/m - x̂·Σγg·x̂/m).
    fn backward_block(xb: &[f32], yb: &[f32], db: &[f32], dxb: &mut [f32], s: usize, eps: f64, gamma: Option<&[f32]>, relu: bool, st: &ChannelStats, sums: &mut [(f64, f64)]) {
        let invstd = inverse_std(st.var, eps);
        let center = Center::new(st.mean);
        let m = xb.len() as f64;
        if s == 1 {
            // nn.LayerNorm's elementwise affine: one pass of per-element sums, one of dx.
            let (mut sg, mut sgx) = (0.0f64, 0.0f64);
            for (j, sum) in sums.iter_mut().enumerate() {
                let g = if relu { relu_mask(yb[j], db[j]) } else { db[j] };
                let xhat = center.sub(xb[j]) * invstd;
                *sum = (g as f64, (g * xhat) as f64);
                let gm = gamma.map_or(1.0, |gv| gv[j]);
                sg += (gm * g) as f64;
                sgx += (gm * g * xhat) as f64;
            }
            let (a, b) = ((sg / m) as f32, (sgx / m) as f32);
            for (j, o) in dxb.iter_mut().enumerate() {
                let g = if relu { relu_mask(yb[j], db[j]) } else { db[j] };
                let xhat = center.sub(xb[j]) * invstd;
                *o = invstd * (gamma.map_or(1.0, |gv| gv[j]) * g - a - xhat * b);
            }
            return;
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
        let (a, b) = ((sg / m) as f32, (sgx / m * invstd as f64) as f32);
        for (j, ((dxr, xr), (yr, dr))) in
            dxb.chunks_mut(s).zip(xb.chunks(s)).zip(yb.chunks(s).zip(db.chunks(s))).enumerate()
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
}
