//! Within-sample statistics on an (N, C, S) view: GroupNorm(G) takes one set per (n, g), a
//! contiguous block of (C/G)·S values. LayerNorm (G = 1) and InstanceNorm (G = C) are the same
//! kernels; PyTorch's elementwise nn.LayerNorm is the (N, C·H·W, 1) view with G = 1. Blocks run
//! in parallel; each is read from memory once and revisited in cache.

use rayon::prelude::*;

use crate::kernels::batch_norm::{apply_run, grad_sums_run, ChannelStats};
use crate::kernels::reduce::{mean_var, Center};
use crate::kernels::simd::multiversion;

/// Values per f32 run inside a block before the f64 combine.
const RUN: usize = 4096;

multiversion! {
    fn block_stats(block: &[f32]) -> ChannelStats {
        let (mean, var) = mean_var(block.chunks(RUN));
        ChannelStats { mean, var }
    }
}

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
            *st = block_stats(xb);
            let invstd = crate::kernels::batch_norm::inverse_std(st.var, eps);
            let center = Center::new(st.mean);
            let g0 = (k % groups) * cg;
            for j in 0..cg {
                let ch = g0 + j;
                let a = invstd * gamma.map_or(1.0, |g| g[ch]);
                let b = beta.map_or(0.0, |b| b[ch]);
                apply_run(&xb[j * s..(j + 1) * s], &mut yb[j * s..(j + 1) * s], center, a, b, relu);
            }
        });
}

/// dx over one channel run of a block: dx = k·g - invstd·(a + (x - mean)·b), g = dy (· [y > 0]).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn block_dx_run(
    x: &[f32],
    y: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    center: Center,
    k: f32,
    invstd: f32,
    a: f32,
    b: f32,
    relu: bool,
) {
    for (((o, &xv), &yv), &g) in dx.iter_mut().zip(x).zip(y).zip(dy) {
        let g = if relu && yv <= 0.0 { 0.0 } else { g };
        *o = k * g - invstd * (a + center.sub(xv) * b);
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
    let m = block as f64;
    dx.par_chunks_mut(block)
        .zip(x.par_chunks(block).zip(y.par_chunks(block)).zip(dy.par_chunks(block)))
        .zip(channel_sums.par_chunks_mut(cg).zip(stats.par_iter()))
        .enumerate()
        .for_each(|(k, ((dxb, ((xb, yb), db)), (sums, st)))| {
            let invstd = crate::kernels::batch_norm::inverse_std(st.var, eps);
            let center = Center::new(st.mean);
            let g0 = (k % groups) * cg;
            let (mut sg, mut sgx) = (0.0f64, 0.0f64);
            for j in 0..cg {
                let r = j * s..(j + 1) * s;
                let (sd, sdx) = grad_sums_run(&xb[r.clone()], &yb[r.clone()], &db[r], center, relu);
                let sdx_hat = sdx * invstd as f64;
                sums[j] = (sd, sdx_hat);
                let gm = gamma.map_or(1.0, |g| g[g0 + j]) as f64;
                sg += gm * sd;
                sgx += gm * sdx_hat;
            }
            let (a, b) = ((sg / m) as f32, (sgx / m * invstd as f64) as f32);
            for j in 0..cg {
                let r = j * s..(j + 1) * s;
                let kk = invstd * gamma.map_or(1.0, |g| g[g0 + j]);
                block_dx_run(
                    &xb[r.clone()],
                    &yb[r.clone()],
                    &db[r.clone()],
                    &mut dxb[r],
                    center,
                    kk,
                    invstd,
                    a,
                    b,
                    relu,
                );
            }
        });
}
