//! Within-sample statistics on an (N, C, S) view: GroupNorm(G) takes one set per (n, g), a
//! contiguous block of (C/G)·S values. LayerNorm (G = 1) and InstanceNorm (G = C) are the same
//! kernels; PyTorch's elementwise nn.LayerNorm is the (N, C·H·W, 1) view with G = 1.

use rayon::prelude::*;

use crate::kernels::reduce::{mean_var, sum_dy_and_dy_x, Center};

/// Per-(n, g) mean and biased variance, written at index n*G + g.
pub fn group_norm_stats(x: &[f32], n: usize, c: usize, s: usize, groups: usize, mean: &mut [f64], var: &mut [f32]) {
    let block = c / groups * s;
    debug_assert_eq!(x.len(), n * c * s);
    let stats: Vec<(f64, f32)> = x.par_chunks(block).map(|b| mean_var(b.chunks(4096))).collect();
    for (i, (mu, v)) in stats.into_iter().enumerate() {
        mean[i] = mu;
        var[i] = v;
    }
}

/// y = (x - mean[n,g]) * invstd[n,g] * gamma[c] + beta[c].
#[allow(clippy::too_many_arguments)]
pub fn group_norm_apply(
    x: &[f32],
    c: usize,
    s: usize,
    groups: usize,
    mean: &[f64],
    invstd: &[f32],
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    y: &mut [f32],
) {
    let cg = c / groups;
    y.par_chunks_mut(c * s)
        .zip(x.par_chunks(c * s))
        .enumerate()
        .for_each(|(i, (ys, xs))| {
            for ch in 0..c {
                let k = i * groups + ch / cg;
                let a = invstd[k] * gamma.map_or(1.0, |g| g[ch]);
                let (mu, b) = (Center::new(mean[k]), beta.map_or(0.0, |b| b[ch]));
                let r = ch * s..(ch + 1) * s;
                for (o, &v) in ys[r.clone()].iter_mut().zip(&xs[r]) {
                    *o = mu.sub(v) * a + b;
                }
            }
        });
}

/// Backward in place over dy, with g = dy·gamma inside each (n, group) set of m values:
/// dx = invstd/m · (m·g - Σg - x̂·Σg·x̂);  dgamma[c] += Σ dy·x̂;  dbeta[c] += Σ dy.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_backward(
    x: &[f32],
    dy: &mut [f32],
    n: usize,
    c: usize,
    s: usize,
    groups: usize,
    mean: &[f64],
    invstd: &[f32],
    gamma: Option<&[f32]>,
    dgamma: Option<&mut [f32]>,
    dbeta: Option<&mut [f32]>,
) {
    let cg = c / groups;
    let m = (cg * s) as f64;
    // Per (n, channel): Σdy and Σdy·(x - mean) — the parameter gradients and, weighted by
    // gamma, the group sums.
    let per_channel: Vec<(f64, f64)> = (0..n * c)
        .into_par_iter()
        .map(|nc| {
            let k = (nc / c) * groups + (nc % c) / cg;
            sum_dy_and_dy_x(
                &x[nc * s..(nc + 1) * s],
                &dy[nc * s..(nc + 1) * s],
                Center::new(mean[k]),
            )
        })
        .collect();
    if let (Some(dg), Some(db)) = (dgamma, dbeta) {
        for ch in 0..c {
            let (mut sg, mut sb) = (0.0f64, 0.0f64);
            for i in 0..n {
                let (sd, sdx) = per_channel[i * c + ch];
                sg += sdx * invstd[i * groups + ch / cg] as f64;
                sb += sd;
            }
            dg[ch] += sg as f32;
            db[ch] += sb as f32;
        }
    }
    dy.par_chunks_mut(c * s)
        .zip(x.par_chunks(c * s))
        .enumerate()
        .for_each(|(i, (ds, xs))| {
            for g in 0..groups {
                let k = i * groups + g;
                let (mu, is) = (Center::new(mean[k]), invstd[k]);
                // Σg and Σg·x̂ over the group, g = dy·gamma.
                let (mut sg, mut sgx) = (0.0f64, 0.0f64);
                for ch in g * cg..(g + 1) * cg {
                    let gm = gamma.map_or(1.0, |gv| gv[ch]) as f64;
                    let (sd, sdx) = per_channel[i * c + ch];
                    sg += gm * sd;
                    sgx += gm * sdx * is as f64;
                }
                let (a, b) = ((sg / m) as f32, (sgx / m * is as f64) as f32);
                for ch in g * cg..(g + 1) * cg {
                    let k2 = is * gamma.map_or(1.0, |gv| gv[ch]);
                    let r = ch * s..(ch + 1) * s;
                    for (o, &xv) in ds[r.clone()].iter_mut().zip(&xs[r]) {
                        // dx = invstd·(g - a - (x - mean)·b) with g = gamma·dy
                        *o = k2 * *o - is * (a + mu.sub(xv) * b);
                    }
                }
            }
        });
}
