//! BatchNorm kernels on an (N, C, S) view of NCHW data (S = H*W; S = 1 for BatchNorm1d).
//! Statistics are per channel over the N strided runs `x[n, c, :]`. Reductions run per
//! channel (f32 lanes within a run, f64 across runs) and writes per sample, so results do
//! not depend on the thread count.

use rayon::prelude::*;

use crate::kernels::reduce::{mean_var, sum_dy_and_dy_x, Center};

/// The S-long run of channel `ch` in sample `i`.
#[inline]
fn run(x: &[f32], c: usize, s: usize, i: usize, ch: usize) -> &[f32] {
    &x[(i * c + ch) * s..(i * c + ch + 1) * s]
}

/// Per-channel mean and biased variance: mean = Σx/m, var = Σ(x-mean)²/m with m = N*S.
pub fn batch_norm_stats(x: &[f32], n: usize, c: usize, s: usize, mean: &mut [f64], var: &mut [f32]) {
    debug_assert_eq!(x.len(), n * c * s);
    let stats: Vec<(f64, f32)> = (0..c)
        .into_par_iter()
        .map(|ch| mean_var((0..n).map(|i| run(x, c, s, i, ch))))
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

/// y = (x - mean) * scale + shift per channel (scale = invstd·gamma, shift = beta).
#[allow(clippy::too_many_arguments)]
pub fn normalize_affine(x: &[f32], c: usize, s: usize, mean: &[f64], scale: &[f32], shift: &[f32], y: &mut [f32]) {
    let center: Vec<Center> = mean.iter().map(|&m| Center::new(m)).collect();
    y.par_chunks_mut(c * s).zip(x.par_chunks(c * s)).for_each(|(ys, xs)| {
        for ch in 0..c {
            let (mu, a, b) = (center[ch], scale[ch], shift[ch]);
            let r = ch * s..(ch + 1) * s;
            for (o, &v) in ys[r.clone()].iter_mut().zip(&xs[r]) {
                *o = mu.sub(v) * a + b;
            }
        }
    });
}

/// y = (x - mean) * invstd * gamma + beta, per channel; gamma = 1 and beta = 0 when absent.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_apply(
    x: &[f32],
    n: usize,
    c: usize,
    s: usize,
    mean: &[f64],
    invstd: &[f32],
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    y: &mut [f32],
) {
    debug_assert_eq!(x.len(), n * c * s);
    let scale: Vec<f32> = (0..c).map(|ch| invstd[ch] * gamma.map_or(1.0, |g| g[ch])).collect();
    let shift: Vec<f32> = (0..c).map(|ch| beta.map_or(0.0, |b| b[ch])).collect();
    normalize_affine(x, c, s, mean, &scale, &shift, y);
}

/// Per-channel Σdy and Σdy·x̂ with x̂ = (x - mean) * invstd.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_grad_sums(
    x: &[f32],
    dy: &[f32],
    n: usize,
    c: usize,
    s: usize,
    mean: &[f64],
    invstd: &[f32],
    sum_dy: &mut [f64],
    sum_dy_xhat: &mut [f64],
) {
    let sums: Vec<(f64, f64)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let (mut sd, mut sdx) = (0.0f64, 0.0f64);
            for i in 0..n {
                let (a, b) = sum_dy_and_dy_x(run(x, c, s, i, ch), run(dy, c, s, i, ch), Center::new(mean[ch]));
                sd += a;
                sdx += b;
            }
            (sd, sdx * invstd[ch] as f64)
        })
        .collect();
    for (ch, (a, b)) in sums.into_iter().enumerate() {
        sum_dy[ch] = a;
        sum_dy_xhat[ch] = b;
    }
}

/// Training-mode input gradient, in place over dy:
/// dx = gamma*invstd/m * (m*dy - Σdy - x̂*Σdy·x̂), m = N*S.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_backward_input(
    x: &[f32],
    dy: &mut [f32],
    n: usize,
    c: usize,
    s: usize,
    mean: &[f64],
    invstd: &[f32],
    gamma: Option<&[f32]>,
    sum_dy: &[f64],
    sum_dy_xhat: &[f64],
) {
    let m = (n * s) as f64;
    // dx = k * (dy - a - (x - mean) * b') with k = gamma*invstd, a = Σdy/m, b' = invstd·Σdy·x̂/m.
    let coef: Vec<(f32, f32, f32, Center)> = (0..c)
        .map(|ch| {
            let k = gamma.map_or(1.0, |g| g[ch]) * invstd[ch];
            let a = (sum_dy[ch] / m) as f32;
            let b = (sum_dy_xhat[ch] / m * invstd[ch] as f64) as f32;
            (k, a, b, Center::new(mean[ch]))
        })
        .collect();
    dy.par_chunks_mut(c * s).zip(x.par_chunks(c * s)).for_each(|(ds, xs)| {
        for (ch, &(k, a, b, mu)) in coef.iter().enumerate() {
            let r = ch * s..(ch + 1) * s;
            for (o, &xv) in ds[r.clone()].iter_mut().zip(&xs[r]) {
                *o = k * (*o - a - mu.sub(xv) * b);
            }
        }
    });
}
