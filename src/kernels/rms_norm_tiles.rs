//! RMSNorm on short rows, 16 rows at a time: `layer_norm_tiles`' scheme (one register
//! transpose folds the lanes of 16 rows, dγ loaded and stored once per 4 rows) for RMSNorm's
//! one statistic, so that RMSNorm's time against LayerNorm's compares the norms, not two
//! kernels' care. Rows of 16 to 1024 values take it on AVX-512 (`takes_tiles`).

use rayon::prelude::*;

use crate::kernels::lanes::{lanes_entry, Lanes, LANES};
use crate::kernels::layer_norm_tiles::{
    forward_task_rows, row_fold, row_totals, tile_rows, tiles_vectorized, GROUP, ROWS, TILE_ROW_MIN,
};
use crate::kernels::reduce::{inverse_rms, relu_mask};

/// The longest rows the tiles take: up to 1024 values they beat the row kernel (measured at
/// 384 and 768 values, unlike LayerNorm's tiles: one statistic, no β).
pub const TILE_ROW_MAX: usize = 1024;

/// Whether rows of `d` values take the tiles on this CPU (AVX-512).
pub fn takes_tiles(d: usize) -> bool {
    (TILE_ROW_MIN..=TILE_ROW_MAX).contains(&d) && tiles_vectorized()
}

// y = act(x · r · γ) with r = 1/√(Σx²/d + eps) per row, kept in `inv_rms`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn forward<L: Lanes>(
    x: &[f32],
    y: &mut [f32],
    d: usize,
    eps: f64,
    gamma: Option<&[f32]>,
    relu: bool,
    inv_rms: &mut [f32],
) {
    let full = d / LANES * LANES;
    let tile = tile_rows(d);
    for ((xs, ys), rs) in x
        .chunks(tile * d)
        .zip(y.chunks_mut(tile * d))
        .zip(inv_rms.chunks_mut(tile))
    {
        let rows = rs.len();
        let mut lanes = [L::zero(); ROWS];
        for (r, l) in lanes.iter_mut().enumerate().take(rows) {
            *l = row_fold::<L>(&xs[r * d..r * d + full], |a, v| v.mul_add(v, a));
        }
        let totals = row_totals(lanes);
        for r in 0..rows {
            let tail: f64 = xs[r * d + full..(r + 1) * d].iter().map(|&v| (v * v) as f64).sum();
            rs[r] = inverse_rms((totals[r] as f64 + tail) / d as f64, eps);
        }
        for r in 0..rows {
            let (xr, yr) = (&xs[r * d..(r + 1) * d], &mut ys[r * d..(r + 1) * d]);
            let inv = L::splat(rs[r]);
            let mut j = 0;
            while j < d {
                let n = LANES.min(d - j);
                let v = L::load_first(&xr[j..], n) * inv;
                let o = gamma.map_or(v, |g| v * L::load_first(&g[j..], n));
                (if relu { o.relu() } else { o }).store_first(&mut yr[j..], n);
                j += LANES;
            }
        }
    }
}

lanes_entry! {
    /// The RMSNorm forward on a run of rows of `d` values, 16 rows per tile: r into `inv_rms`,
    /// y = act(x·r·γ).
    pub fn rms_norm_forward_tiles(x: &[f32], y: &mut [f32], d: usize, eps: f64, gamma: Option<&[f32]>, relu: bool, inv_rms: &mut [f32]) => forward
}

/// The RMSNorm forward on rows of `d` values (`takes_tiles(d)`), tasks of whole tiles in
/// parallel.
pub fn rms_norm_forward(
    x: &[f32],
    y: &mut [f32],
    d: usize,
    eps: f64,
    gamma: Option<&[f32]>,
    relu: bool,
    inv_rms: &mut [f32],
) {
    let rows = forward_task_rows(d);
    if inv_rms.len() <= rows {
        rms_norm_forward_tiles(x, y, d, eps, gamma, relu, inv_rms);
        return;
    }
    y.par_chunks_mut(rows * d)
        .zip(x.par_chunks(rows * d))
        .zip(inv_rms.par_chunks_mut(rows))
        .for_each(|((yt, xt), rt)| rms_norm_forward_tiles(xt, yt, d, eps, gamma, relu, rt));
}

/// The backward's first pass over the whole vectors of K rows: each row's Σγg·x̂ added into
/// its lanes `sq`; every column's Σg·x̂ into `dg`, loaded and stored once for the K rows.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn column_terms<L: Lanes, const K: usize>(
    xs: &[f32],
    ys: &[f32],
    ds: &[f32],
    d: usize,
    full: usize,
    gamma: Option<&[f32]>,
    relu: bool,
    inv: &[f32],
    sq: &mut [L],
    dg: &mut [f32],
) {
    let iv: [L; K] = std::array::from_fn(|i| L::splat(inv[i]));
    let mut q: [L; K] = std::array::from_fn(|i| sq[i]);
    for j in (0..full).step_by(LANES) {
        let gm = gamma.map(|gm| L::load(&gm[j..]));
        let mut tg = L::load(&dg[j..]);
        for i in 0..K {
            let o = i * d + j;
            let mut g = L::load(&ds[o..]);
            if relu {
                g = g.where_positive(L::load(&ys[o..]));
            }
            let xh = L::load(&xs[o..]) * iv[i];
            let gg = gm.map_or(g, |gm| gm * g);
            q[i] = gg.mul_add(xh, q[i]);
            tg = g.mul_add(xh, tg);
        }
        tg.store(&mut dg[j..]);
    }
    // Vector by vector, not `copy_from_slice` (a libc memcpy call: layer_norm_tiles.rs).
    #[allow(clippy::manual_memcpy)]
    for i in 0..K {
        sq[i] = q[i];
    }
}

// With g = dy (masked by y > 0 after a fused ReLU) and x̂ = x·r:
// dx = r·(γg − x̂·Σ(γg·x̂)/d) per row; dγ += g·x̂ per column.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward<L: Lanes>(
    x: &[f32],
    y: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    d: usize,
    gamma: Option<&[f32]>,
    relu: bool,
    inv_rms: &[f32],
    dg: &mut [f32],
) {
    let full = d / LANES * LANES;
    let tile = tile_rows(d);
    for (t, inv) in inv_rms.chunks(tile).enumerate() {
        let at = t * tile * d;
        let rows = inv.len();
        let mut aq = [L::zero(); ROWS];
        let mut tails = [0.0f64; ROWS];
        let mut r = 0;
        while r < rows {
            let k = if rows - r >= GROUP { GROUP } else { 1 };
            let span = at + r * d..at + (r + k) * d;
            let (xs, ys, ds) = (&x[span.clone()], &y[span.clone()], &dy[span]);
            let (sq, iv) = (&mut aq[r..r + k], &inv[r..r + k]);
            if k == GROUP {
                column_terms::<L, GROUP>(xs, ys, ds, d, full, gamma, relu, iv, sq, dg);
            } else {
                column_terms::<L, 1>(xs, ys, ds, d, full, gamma, relu, iv, sq, dg);
            }
            for i in 0..k {
                let o = i * d;
                for j in full..d {
                    let g = if relu {
                        relu_mask(ys[o + j], ds[o + j])
                    } else {
                        ds[o + j]
                    };
                    let xh = xs[o + j] * iv[i];
                    tails[r + i] += (gamma.map_or(1.0, |gm| gm[j]) * g * xh) as f64;
                    dg[j] += g * xh;
                }
            }
            r += k;
        }
        let sums = row_totals(aq);
        for r in 0..rows {
            let o = at + r * d;
            let (xr, yr, dr, dxr) = (&x[o..o + d], &y[o..o + d], &dy[o..o + d], &mut dx[o..o + d]);
            let c = L::splat(((sums[r] as f64 + tails[r]) / d as f64) as f32);
            let iv = L::splat(inv[r]);
            let mut j = 0;
            while j < d {
                let n = LANES.min(d - j);
                let mut g = L::load_first(&dr[j..], n);
                if relu {
                    g = g.where_positive(L::load_first(&yr[j..], n));
                }
                let gg = gamma.map_or(g, |gm| L::load_first(&gm[j..], n) * g);
                ((gg - (L::load_first(&xr[j..], n) * iv) * c) * iv).store_first(&mut dxr[j..], n);
                j += LANES;
            }
        }
    }
}

lanes_entry! {
    /// RMSNorm's backward on a run of rows of `d` values, 16 rows per tile: dx, and each row's
    /// dγ terms added into the f32 column run `dg`.
    pub fn rms_norm_backward_tiles(x: &[f32], y: &[f32], dy: &[f32], dx: &mut [f32], d: usize, gamma: Option<&[f32]>, relu: bool, inv_rms: &[f32], dg: &mut [f32]) => backward
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::lanes::Portable;

    /// Both versions against the f64 definition: whole vectors and tails, partial tiles, with
    /// and without γ and a fused ReLU.
    #[test]
    fn tiles_match_the_definition() {
        for &(n, d) in &[(5, 16), (37, 64), (18, 100), (9, 256), (6, 1000)] {
            for (affine, relu) in [(true, false), (false, false), (true, true)] {
                let x: Vec<f32> = (0..n * d).map(|i| ((i * 7919 % 2003) as f32 / 1001.5) - 1.0).collect();
                let dy: Vec<f32> = (0..n * d).map(|i| ((i * 104729 % 997) as f32 / 498.5) - 1.0).collect();
                let gamma: Vec<f32> = (0..d)
                    .map(|i| if affine { 0.5 + (i % 7) as f32 * 0.25 } else { 1.0 })
                    .collect();
                let g = affine.then_some(&gamma[..]);
                let eps = 1e-6;
                // The definition in f64.
                let (mut ye, mut dxe, mut dge) = (vec![0.0f64; n * d], vec![0.0f64; n * d], vec![0.0f64; d]);
                for r in 0..n {
                    let xr = &x[r * d..(r + 1) * d];
                    let ms = xr.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / d as f64;
                    let inv = 1.0 / (ms + eps).sqrt();
                    let z: Vec<f64> = (0..d).map(|j| xr[j] as f64 * inv * gamma[j] as f64).collect();
                    let gr: Vec<f64> = (0..d)
                        .map(|j| if relu && z[j] <= 0.0 { 0.0 } else { dy[r * d + j] as f64 })
                        .collect();
                    let s: f64 = (0..d)
                        .map(|j| gamma[j] as f64 * gr[j] * xr[j] as f64 * inv)
                        .sum::<f64>()
                        / d as f64;
                    for j in 0..d {
                        let xh = xr[j] as f64 * inv;
                        ye[r * d + j] = if relu { z[j].max(0.0) } else { z[j] };
                        dxe[r * d + j] = inv * (gamma[j] as f64 * gr[j] - xh * s);
                        dge[j] += gr[j] * xh;
                    }
                }
                type Run =
                    fn(&[f32], &mut [f32], &[f32], &mut [f32], &mut [f32], usize, Option<&[f32]>, bool, &mut [f32]);
                let mut runs: Vec<(&str, Run)> = vec![("portable", run::<Portable>)];
                if tiles_vectorized() {
                    runs.push(("entry", run_entry));
                }
                for (name, f) in runs {
                    let (mut y, mut dx, mut dg, mut inv) =
                        (vec![0.0; n * d], vec![0.0; n * d], vec![0.0; d], vec![0.0; n]);
                    f(&x, &mut y, &dy, &mut dx, &mut dg, d, g, relu, &mut inv);
                    let what = format!("{name} n {n} d {d} affine {affine} relu {relu}");
                    let close = |a: f32, b: f64, scale: f64| (a as f64 - b).abs() <= 2e-5 * (scale + b.abs());
                    assert!(y.iter().zip(&ye).all(|(&a, &b)| close(a, b, 1.0)), "y, {what}");
                    assert!(dx.iter().zip(&dxe).all(|(&a, &b)| close(a, b, 1.0)), "dx, {what}");
                    assert!(dg.iter().zip(&dge).all(|(&a, &b)| close(a, b, n as f64)), "dγ, {what}");
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn run<L: Lanes>(
        x: &[f32],
        y: &mut [f32],
        dy: &[f32],
        dx: &mut [f32],
        dg: &mut [f32],
        d: usize,
        g: Option<&[f32]>,
        relu: bool,
        inv: &mut [f32],
    ) {
        forward::<L>(x, y, d, 1e-6, g, relu, inv);
        backward::<L>(x, y, dy, dx, d, g, relu, inv, dg);
    }

    #[allow(clippy::too_many_arguments)]
    fn run_entry(
        x: &[f32],
        y: &mut [f32],
        dy: &[f32],
        dx: &mut [f32],
        dg: &mut [f32],
        d: usize,
        g: Option<&[f32]>,
        relu: bool,
        inv: &mut [f32],
    ) {
        rms_norm_forward_tiles(x, y, d, 1e-6, g, relu, inv);
        rms_norm_backward_tiles(x, y, dy, dx, d, g, relu, inv, dg);
    }
}
