//! BatchNorm kernels on an (N, C, S) view of NCHW data (S = H*W; S = 1 for BatchNorm1d).
//! Statistics are per channel over the N strided runs `x[n, c, :]`.
//! Reductions run per channel in f64 and writes per sample, so results do not depend on
//! the thread count.

use rayon::prelude::*;

/// Per-channel mean and biased variance: mean = Σx/m, var = Σ(x-mean)²/m with m = N*S,
/// two passes accumulated in f64 so a large mean never cancels the spread.
pub fn batch_norm_stats(
    x: &[f32],
    n: usize,
    c: usize,
    s: usize,
    mean: &mut [f32],
    var: &mut [f32],
) {
    debug_assert_eq!(x.len(), n * c * s);
    let m = (n * s) as f64;
    let stats: Vec<(f32, f32)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let runs = (0..n).map(|i| &x[(i * c + ch) * s..(i * c + ch + 1) * s]);
            let sum: f64 = runs
                .clone()
                .map(|r| r.iter().map(|&v| v as f64).sum::<f64>())
                .sum();
            let mu = sum / m;
            let sq: f64 = runs
                .map(|r| {
                    r.iter()
                        .map(|&v| (v as f64 - mu) * (v as f64 - mu))
                        .sum::<f64>()
                })
                .sum();
            (mu as f32, (sq / m) as f32)
        })
        .collect();
    for (ch, (mu, v)) in stats.into_iter().enumerate() {
        mean[ch] = mu;
        var[ch] = v;
    }
}

/// invstd = 1 / sqrt(var + eps), computed in f64 then rounded once.
pub fn inverse_std(var: &[f32], eps: f64, invstd: &mut [f32]) {
    for (o, &v) in invstd.iter_mut().zip(var) {
        *o = (1.0 / (v as f64 + eps).sqrt()) as f32;
    }
}

/// y = (x - mean) * invstd * gamma + beta, per channel; gamma = 1 and beta = 0 when absent.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_apply(
    x: &[f32],
    n: usize,
    c: usize,
    s: usize,
    mean: &[f32],
    invstd: &[f32],
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    y: &mut [f32],
) {
    debug_assert_eq!(x.len(), n * c * s);
    let scale: Vec<f32> = (0..c)
        .map(|ch| invstd[ch] * gamma.map_or(1.0, |g| g[ch]))
        .collect();
    let shift: Vec<f32> = (0..c).map(|ch| beta.map_or(0.0, |b| b[ch])).collect();
    y.par_chunks_mut(c * s)
        .zip(x.par_chunks(c * s))
        .for_each(|(ys, xs)| {
            for ch in 0..c {
                let (mu, a, b) = (mean[ch], scale[ch], shift[ch]);
                let xr = &xs[ch * s..(ch + 1) * s];
                let yr = &mut ys[ch * s..(ch + 1) * s];
                for (o, &v) in yr.iter_mut().zip(xr) {
                    *o = (v - mu) * a + b;
                }
            }
        });
}

/// Per-channel Σdy and Σdy·x̂ with x̂ = (x - mean) * invstd, accumulated in f64.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_grad_sums(
    x: &[f32],
    dy: &[f32],
    n: usize,
    c: usize,
    s: usize,
    mean: &[f32],
    invstd: &[f32],
    sum_dy: &mut [f64],
    sum_dy_xhat: &mut [f64],
) {
    let sums: Vec<(f64, f64)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let (mu, is) = (mean[ch] as f64, invstd[ch] as f64);
            let mut sd = 0.0f64;
            let mut sdx = 0.0f64;
            for i in 0..n {
                let off = (i * c + ch) * s;
                let (xr, dr) = (&x[off..off + s], &dy[off..off + s]);
                let mut run_d = 0.0f64;
                let mut run_dx = 0.0f64;
                for (&xv, &dv) in xr.iter().zip(dr) {
                    run_d += dv as f64;
                    run_dx += dv as f64 * (xv as f64 - mu);
                }
                sd += run_d;
                sdx += run_dx;
            }
            (sd, sdx * is)
        })
        .collect();
    for (ch, (a, b)) in sums.into_iter().enumerate() {
        sum_dy[ch] = a;
        sum_dy_xhat[ch] = b;
    }
}

/// Training-mode input gradient: dx = gamma*invstd/m * (m*dy - Σdy - x̂*Σdy·x̂), m = N*S.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_backward_input(
    x: &[f32],
    dy: &[f32],
    n: usize,
    c: usize,
    s: usize,
    mean: &[f32],
    invstd: &[f32],
    gamma: Option<&[f32]>,
    sum_dy: &[f64],
    sum_dy_xhat: &[f64],
    dx: &mut [f32],
) {
    let m = (n * s) as f64;
    // dx = k * (dy - a - x̂ * b) with k = gamma*invstd, a = Σdy/m, b = Σdy·x̂/m.
    let coef: Vec<(f32, f32, f32, f32, f32)> = (0..c)
        .map(|ch| {
            let k = gamma.map_or(1.0, |g| g[ch]) * invstd[ch];
            let a = (sum_dy[ch] / m) as f32;
            let b = (sum_dy_xhat[ch] / m) as f32;
            (k, a, b, mean[ch], invstd[ch])
        })
        .collect();
    dx.par_chunks_mut(c * s)
        .zip(x.par_chunks(c * s).zip(dy.par_chunks(c * s)))
        .for_each(|(dxs, (xs, dys))| {
            for (ch, &(k, a, b, mu, is)) in coef.iter().enumerate() {
                let r = ch * s..(ch + 1) * s;
                for ((o, &xv), &dv) in dxs[r.clone()].iter_mut().zip(&xs[r.clone()]).zip(&dys[r]) {
                    let xhat = (xv - mu) * is;
                    *o = k * (dv - a - xhat * b);
                }
            }
        });
}
