//! RMSNorm (Zhang & Sennrich 2019; torch.nn.RMSNorm, timm's RmsNorm) on rows of D values: no
//! centring and no shift, one statistic per row. Rows run in parallel; each is read once from
//! memory and revisited in cache.

use rayon::prelude::*;

use crate::kernels::reduce::{self, relu_mask};
use crate::kernels::simd::multiversion;

/// Values per f64 lane group in the row sums (independent chains: vector speed).
const LANES: usize = 8;

/// Rows per parallel task: at least this many values, so that small tensors stay on one thread.
const TASK_VALUES: usize = 1 << 14;

/// 1/√(mean(x²) + eps), computed in f64 and rounded once to f32 (PyTorch's float64 reference
/// agrees within the goldens' tolerance).
pub fn inverse_rms(mean_square: f64, eps: f64) -> f32 {
    (1.0 / (mean_square + eps).sqrt()) as f32
}

/// Σ over `v` of f(v) in 8 f64 lanes.
#[inline(always)]
fn lane_sum(v: &[f32], f: impl Fn(usize, f32) -> f32) -> f64 {
    let mut acc = [0.0f64; LANES];
    let full = v.len() / LANES * LANES;
    for (k, chunk) in v[..full].chunks_exact(LANES).enumerate() {
        for l in 0..LANES {
            acc[l] += f(k * LANES + l, chunk[l]) as f64;
        }
    }
    for (i, &x) in v.iter().enumerate().skip(full) {
        acc[i - full] += f(i, x) as f64;
    }
    acc.iter().sum()
}

fn rows_per_task(d: usize) -> usize {
    (TASK_VALUES / d.max(1)).max(1)
}

// y = act(x · r · γ) with r = 1/√(mean(x²) + eps) per row; `inv_rms[i]` keeps row i's r.
pub fn rms_norm_forward(
    x: &[f32],
    y: &mut [f32],
    d: usize,
    eps: f64,
    gamma: Option<&[f32]>,
    relu: bool,
    inv_rms: &mut [f32],
) {
    let rows = rows_per_task(d);
    y.par_chunks_mut(d * rows)
        .zip(x.par_chunks(d * rows))
        .zip(inv_rms.par_chunks_mut(rows))
        .for_each(|((yt, xt), rt)| forward_rows(xt, yt, d, eps, gamma, relu, rt));
}

multiversion! {
    fn forward_rows(xt: &[f32], yt: &mut [f32], d: usize, eps: f64, gamma: Option<&[f32]>, relu: bool, rt: &mut [f32]) {
        for ((xr, yr), r) in xt.chunks(d).zip(yt.chunks_mut(d)).zip(rt.iter_mut()) {
            *r = inverse_rms(lane_sum(xr, |_, v| v * v) / d as f64, eps);
            let inv = *r;
            let act = |v: f32| if relu { reduce::relu(v) } else { v };
            match gamma {
                Some(g) => yr.iter_mut().zip(xr).zip(g).for_each(|((o, &v), &gm)| *o = act(v * inv * gm)),
                None => yr.iter_mut().zip(xr).for_each(|(o, &v)| *o = act(v * inv)),
            }
        }
    }
}

// With g = γ·dy (masked by y > 0 after a fused ReLU) and x̂ = x·r:
// dx = r·(g − x̂·Σ(g·x̂)/D) per row; dγ = Σ_rows dy·x̂ (f64, into `dgamma` when given).
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_backward(
    x: &[f32],
    y: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    d: usize,
    gamma: Option<&[f32]>,
    relu: bool,
    inv_rms: &[f32],
    dgamma: Option<&mut [f64]>,
) {
    let rows = rows_per_task(d);
    let span = d * rows;
    let want_dgamma = dgamma.is_some();
    let partial: Vec<Vec<f64>> = dx
        .par_chunks_mut(span)
        .zip(x.par_chunks(span).zip(y.par_chunks(span)).zip(dy.par_chunks(span)))
        .zip(inv_rms.par_chunks(rows))
        .map(|((dxt, ((xt, yt), dt)), rt)| {
            let mut acc = if want_dgamma { vec![0.0f64; d] } else { Vec::new() };
            backward_rows(xt, yt, dt, dxt, d, gamma, relu, rt, &mut acc);
            acc
        })
        .collect();
    if let Some(dg) = dgamma {
        dg.fill(0.0);
        for acc in &partial {
            dg.iter_mut().zip(acc).for_each(|(a, &v)| *a += v);
        }
    }
}

multiversion! {
    #[allow(clippy::too_many_arguments)]
    fn backward_rows(xt: &[f32], yt: &[f32], dt: &[f32], dxt: &mut [f32], d: usize, gamma: Option<&[f32]>, relu: bool, rt: &[f32], acc: &mut [f64]) {
        let rows = xt.chunks(d).zip(yt.chunks(d)).zip(dt.chunks(d)).zip(dxt.chunks_mut(d)).zip(rt);
        for ((((xr, yr), dr), dxr), &r) in rows {
            let grad = |i: usize| if relu { relu_mask(yr[i], dr[i]) } else { dr[i] };
            let gm = |i: usize| gamma.map_or(1.0, |g| g[i]);
            // Σ g·x̂ over the row.
            let s = lane_sum(xr, |i, v| gm(i) * grad(i) * (v * r));
            let c = (s / d as f64) as f32;
            for (i, o) in dxr.iter_mut().enumerate() {
                let xh = xr[i] * r;
                *o = r * (gm(i) * grad(i) - xh * c);
            }
            if !acc.is_empty() {
                for (i, a) in acc.iter_mut().enumerate() {
                    *a += (grad(i) * (xr[i] * r)) as f64;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The definition in f64, row by row.
    fn reference(x: &[f32], dy: &[f32], d: usize, gamma: &[f32], eps: f64) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (mut y, mut dx, mut dg) = (vec![0.0; x.len()], vec![0.0; x.len()], vec![0.0; d]);
        for ((xr, dr), (yr, dxr)) in x.chunks(d).zip(dy.chunks(d)).zip(y.chunks_mut(d).zip(dx.chunks_mut(d))) {
            let ms: f64 = xr.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / d as f64;
            let r = 1.0 / (ms + eps).sqrt();
            let s: f64 = (0..d).map(|i| gamma[i] as f64 * dr[i] as f64 * xr[i] as f64 * r).sum();
            for i in 0..d {
                let xh = xr[i] as f64 * r;
                yr[i] = xh * gamma[i] as f64;
                dxr[i] = r * (gamma[i] as f64 * dr[i] as f64 - xh * s / d as f64);
                dg[i] += dr[i] as f64 * xh;
            }
        }
        (y, dx, dg)
    }

    #[test]
    fn forward_and_backward_match_the_definition_on_both_paths() {
        for (n, d) in [(3, 5), (4, 37), (70, 300), (2, 20000)] {
            let x: Vec<f32> = (0..n * d).map(|i| ((i * 7919 % 2003) as f32 / 1001.5) - 1.0).collect();
            let dy: Vec<f32> = (0..n * d).map(|i| ((i * 104729 % 997) as f32 / 498.5) - 1.0).collect();
            let gamma: Vec<f32> = (0..d).map(|i| 0.5 + (i % 7) as f32 * 0.25).collect();
            let (mut y, mut dx, mut r) = (vec![0.0; n * d], vec![0.0; n * d], vec![0.0; n]);
            rms_norm_forward(&x, &mut y, d, 1e-6, Some(&gamma), false, &mut r);
            let mut dg = vec![0.0; d];
            rms_norm_backward(&x, &y, &dy, &mut dx, d, Some(&gamma), false, &r, Some(&mut dg));
            let (ye, dxe, dge) = reference(&x, &dy, d, &gamma, 1e-6);
            let close = |a: f64, b: f64| (a - b).abs() <= 2e-5 * (1.0 + b.abs());
            assert!(y.iter().zip(&ye).all(|(&a, &b)| close(a as f64, b)), "y, n {n} d {d}");
            assert!(
                dx.iter().zip(&dxe).all(|(&a, &b)| close(a as f64, b)),
                "dx, n {n} d {d}"
            );
            assert!(dg.iter().zip(&dge).all(|(&a, &b)| close(a, b)), "dγ, n {n} d {d}");
        }
    }
}
