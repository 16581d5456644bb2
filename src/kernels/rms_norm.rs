//! RMSNorm (Zhang & Sennrich 2019; torch.nn.RMSNorm, timm's RmsNorm) on rows of D values: no
//! centring and no shift, one statistic per row. Rows run in parallel; each is read once from
//! memory and revisited in cache. Rows of 16-1024 values go to `rms_norm_tiles` on AVX-512.

use rayon::prelude::*;

use crate::kernels::reduce::{self, relu_mask};
use crate::kernels::simd::multiversion;

/// Values per f64 lane group in the row sums (independent chains: vector speed).
const LANES: usize = 8;

/// Rows per parallel task: at least this many values, so that small tensors stay on one thread.
const TASK_VALUES: usize = 1 << 14;

pub use crate::kernels::reduce::inverse_rms;

/// Σx² over `v` in 8 f64 lanes (independent chains: vector speed).
#[inline(always)]
fn sum_of_squares(v: &[f32]) -> f64 {
    let mut acc = [0.0f64; LANES];
    let mut chunks = v.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            acc[l] += (c[l] * c[l]) as f64;
        }
    }
    for (l, &x) in chunks.remainder().iter().enumerate() {
        acc[l] += (x * x) as f64;
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
    if crate::kernels::rms_norm_tiles::takes_tiles(d) {
        return crate::kernels::rms_norm_tiles::rms_norm_forward(x, y, d, eps, gamma, relu, inv_rms);
    }
    let rows = rows_per_task(d);
    y.par_chunks_mut(d * rows)
        .zip(x.par_chunks(d * rows))
        .zip(inv_rms.par_chunks_mut(rows))
        .for_each(|((yt, xt), rt)| forward_rows(xt, yt, d, eps, gamma, relu, rt));
}

multiversion! {
    fn forward_rows(xt: &[f32], yt: &mut [f32], d: usize, eps: f64, gamma: Option<&[f32]>, relu: bool, rt: &mut [f32]) {
        for ((xr, yr), r) in xt.chunks(d).zip(yt.chunks_mut(d)).zip(rt.iter_mut()) {
            *r = inverse_rms(sum_of_squares(xr) / d as f64, eps);
            let inv = *r;
            match (gamma, relu) {
                (Some(g), false) => yr.iter_mut().zip(xr).zip(g).for_each(|((o, &v), &gm)| *o = v * inv * gm),
                (Some(g), true) => yr.iter_mut().zip(xr).zip(g).for_each(|((o, &v), &gm)| *o = reduce::relu(v * inv * gm)),
                (None, false) => yr.iter_mut().zip(xr).for_each(|(o, &v)| *o = v * inv),
                (None, true) => yr.iter_mut().zip(xr).for_each(|(o, &v)| *o = reduce::relu(v * inv)),
            }
        }
    }
}

// With g = γ·dy (masked by y > 0 after a fused ReLU) and x̂ = x·r:
// dx = r·(g − x̂·Σ(g·x̂)/D) per row; dγ = Σ_rows dy·x̂.
/// As `layer_norm_backward`: a few tasks per thread, each a run of whole rows with its own f32
/// column accumulators for dγ (in `scratch`, reused across calls), summed in f64 into `dgamma`.
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
    dgamma: &mut [f64],
    scratch: &mut Vec<f32>,
) {
    let d = d.max(1);
    let (rows, used) = crate::kernels::shape::row_tasks(inv_rms.len(), x.len());
    if scratch.len() < used * d {
        scratch.resize(used * d, 0.0);
    }
    let acc = &mut scratch[..used * d];
    let span = rows * d;
    let tiles = crate::kernels::rms_norm_tiles::takes_tiles(d);
    let task = |dxt: &mut [f32], xt: &[f32], yt: &[f32], dt: &[f32], rt: &[f32], a: &mut [f32]| {
        a.fill(0.0);
        if tiles {
            crate::kernels::rms_norm_tiles::rms_norm_backward_tiles(xt, yt, dt, dxt, d, gamma, relu, rt, a);
        } else {
            backward_rows(xt, yt, dt, dxt, d, gamma, relu, rt, a);
        }
    };
    if used == 1 {
        task(dx, x, y, dy, inv_rms, acc);
    } else {
        dx.par_chunks_mut(span)
            .zip(x.par_chunks(span).zip(y.par_chunks(span)).zip(dy.par_chunks(span)))
            .zip(inv_rms.par_chunks(rows).zip(acc.par_chunks_mut(d)))
            .for_each(|((dxt, ((xt, yt), dt)), (rt, a))| task(dxt, xt, yt, dt, rt, a));
    }
    dgamma.fill(0.0);
    for a in acc.chunks(d) {
        dgamma.iter_mut().zip(a).for_each(|(g, &v)| *g += v as f64);
    }
}

multiversion! {
    fn backward_rows(xt: &[f32], yt: &[f32], dt: &[f32], dxt: &mut [f32], d: usize, gamma: Option<&[f32]>, relu: bool, rt: &[f32], acc: &mut [f32]) {
        let ones = [1.0f32; LANES];
        let rows = xt.chunks(d).zip(yt.chunks(d)).zip(dt.chunks(d)).zip(dxt.chunks_mut(d)).zip(rt);
        for ((((xr, yr), dr), dxr), &r) in rows {
            // One pass: Σγg·x̂ in 8 f64 lanes and each element's g·x̂ into its column of dγ.
            let mut lanes = [0.0f64; LANES];
            let full = d / LANES * LANES;
            let blocks = xr[..full]
                .chunks_exact(LANES)
                .zip(yr[..full].chunks_exact(LANES))
                .zip(dr[..full].chunks_exact(LANES))
                .zip(acc[..full].chunks_exact_mut(LANES));
            for (k, (((x8, y8), d8), a8)) in blocks.enumerate() {
                let g8 = gamma.map_or(&ones[..], |g| &g[k * LANES..(k + 1) * LANES]);
                for l in 0..LANES {
                    let g = if relu { relu_mask(y8[l], d8[l]) } else { d8[l] };
                    let xh = x8[l] * r;
                    a8[l] += g * xh;
                    lanes[l] += (g8[l] * g * xh) as f64;
                }
            }
            for i in full..d {
                let g = if relu { relu_mask(yr[i], dr[i]) } else { dr[i] };
                let xh = xr[i] * r;
                acc[i] += g * xh;
                lanes[i - full] += (gamma.map_or(1.0, |gm| gm[i]) * g * xh) as f64;
            }
            let c = (lanes.iter().sum::<f64>() / d as f64) as f32;
            // dx = r·(γg − x̂·c), from cache.
            let it = dxr.iter_mut().zip(xr).zip(yr.iter().zip(dr));
            let dx = |o: &mut f32, x: f32, y: f32, d: f32, gm: f32| {
                let g = if relu { relu_mask(y, d) } else { d };
                *o = r * (gm * g - x * r * c);
            };
            match gamma {
                Some(gv) => it.zip(gv).for_each(|(((o, &x), (&y, &d)), &gm)| dx(o, x, y, d, gm)),
                None => it.for_each(|((o, &x), (&y, &d))| dx(o, x, y, d, 1.0)),
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
            rms_norm_backward(
                &x,
                &y,
                &dy,
                &mut dx,
                d,
                Some(&gamma),
                false,
                &r,
                &mut dg,
                &mut Vec::new(),
            );
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
