//! Pooling kernels over NCHW planes (kernel k, stride s, no padding).

use rayon::prelude::*;

use crate::kernels::lanes::{lanes_entry, Lanes, LANES};
use crate::kernels::reduce::beats;
use crate::kernels::simd::multiversion;

/// y[p, oy, ox] = max over the k×k window (then max(·, 0) when `relu`: a ReLU before the pool
/// commutes with the max, so it runs here on a quarter of the values); `argmax`, when given
/// (training), keeps the flat in-plane index of each winner. Inference passes None and skips it.
#[allow(clippy::too_many_arguments)]
pub fn max_pool_forward(
    x: &[f32],
    planes: usize,
    h: usize,
    w: usize,
    k: usize,
    s: usize,
    relu: bool,
    y: &mut [f32],
    argmax: Option<&mut [u32]>,
) {
    let (oh, ow) = ((h - k) / s + 1, (w - k) / s + 1);
    debug_assert_eq!(y.len(), planes * oh * ow);
    let plane_out = oh * ow;
    match argmax {
        None if k == 2 && s == 2 => y
            .par_chunks_mut(plane_out)
            .zip(x.par_chunks(h * w))
            .for_each(|(yp, xp)| max_pool_2x2_values(xp, w, ow, relu, yp)),
        Some(argmax) if k == 2 && s == 2 => y
            .par_chunks_mut(plane_out)
            .zip(argmax.par_chunks_mut(plane_out))
            .zip(x.par_chunks(h * w))
            .for_each(|((yp, ap), xp)| max_pool_2x2_plane(xp, w, ow, relu, yp, ap)),
        argmax => max_pool_generic(x, h, w, k, s, relu, y, argmax),
    }
}

/// Any window and stride: the first maximum in row-major order wins; NaN wins. The winners'
/// indices go to `argmax` when given; `relu` as in `max_pool_forward`.
#[allow(clippy::too_many_arguments)]
fn max_pool_generic(
    x: &[f32],
    h: usize,
    w: usize,
    k: usize,
    s: usize,
    relu: bool,
    y: &mut [f32],
    argmax: Option<&mut [u32]>,
) {
    let (oh, ow) = ((h - k) / s + 1, (w - k) / s + 1);
    let plane = |xp: &[f32], yp: &mut [f32], mut ap: Option<&mut [u32]>| {
        for oy in 0..oh {
            for ox in 0..ow {
                let mut best = f32::NEG_INFINITY;
                let mut at = (oy * s) * w + ox * s;
                for i in 0..k {
                    for j in 0..k {
                        let idx = (oy * s + i) * w + ox * s + j;
                        let v = xp[idx];
                        // NaN propagates as in PyTorch: a NaN wins the window.
                        if v > best || v.is_nan() {
                            best = v;
                            at = idx;
                            if v.is_nan() {
                                break;
                            }
                        }
                    }
                }
                yp[oy * ow + ox] = relu_if(best, relu);
                if let Some(ap) = ap.as_deref_mut() {
                    ap[oy * ow + ox] = at as u32;
                }
            }
        }
    };
    match argmax {
        Some(argmax) => y
            .par_chunks_mut(oh * ow)
            .zip(argmax.par_chunks_mut(oh * ow))
            .zip(x.par_chunks(h * w))
            .for_each(|((yp, ap), xp)| plane(xp, yp, Some(ap))),
        None => y
            .par_chunks_mut(oh * ow)
            .zip(x.par_chunks(h * w))
            .for_each(|(yp, xp)| plane(xp, yp, None)),
    }
}

#[inline(always)]
fn relu_if(v: f32, relu: bool) -> f32 {
    if relu {
        crate::kernels::reduce::relu(v)
    } else {
        v
    }
}

multiversion! {
    /// One plane of the common 2×2 / stride 2 window, two input rows at a time, with the winner's
    /// index. Branch-free selects, column pair by column pair, so random data costs no
    /// mispredictions and the loop vectorizes.
    fn max_pool_2x2_plane(xp: &[f32], w: usize, ow: usize, relu: bool, yp: &mut [f32], ap: &mut [u32]) {
        for (oy, (yr, ar)) in yp.chunks_exact_mut(ow).zip(ap.chunks_exact_mut(ow)).enumerate() {
            let r0 = &xp[2 * oy * w..2 * oy * w + 2 * ow];
            let r1 = &xp[(2 * oy + 1) * w..(2 * oy + 1) * w + 2 * ow];
            let base = (2 * oy * w) as u32;
            for (ox, ((o, a), (p0, p1))) in yr
                .iter_mut()
                .zip(ar.iter_mut())
                .zip(r0.chunks_exact(2).zip(r1.chunks_exact(2)))
                .enumerate()
            {
                let t = beats(p0[1], p0[0]);
                let (m0, i0) = (if t { p0[1] } else { p0[0] }, t as u32);
                let b = beats(p1[1], p1[0]);
                let (m1, i1) = (if b { p1[1] } else { p1[0] }, w as u32 + b as u32);
                let s = beats(m1, m0);
                *o = relu_if(if s { m1 } else { m0 }, relu);
                *a = base + 2 * ox as u32 + if s { i1 } else { i0 };
            }
        }
    }
}

multiversion! {
    /// `max_pool_2x2_values` for rows an even number `row` of values apart (ow ≤ row/2 outputs
    /// per row read from each row's first 2·ow), with `hp` (at least oh·row values) as
    /// scratch: every row pair's horizontal maxima in one run over the plane (whole vectors,
    /// where row by row a 28-wide map gives 14-value loops), then each output row the max of
    /// two runs of them. The comparisons are the ones of `max_pool_2x2_values` in the same
    /// order, so the values (and which NaN) are the same. A fused conv's epilogue
    /// (`Conv2d::forward_max_pooled`: rows of the map itself, its im2col buffer as the scratch;
    /// the direct kernel's padded rows, W + 2 apart), then + `bias` and the ReLU as
    /// `reduce::add_bias_relu` does (relu(max + b); + 0 under a ReLU without a bias).
    pub fn max_pool_2x2_values_even_rows(xp: &[f32], row: usize, ow: usize, bias: Option<f32>, relu: bool, yp: &mut [f32], hp: &mut [f32]) {
        let oh = yp.len() / ow.max(1);
        let hp = &mut hp[..oh * row];
        for (h, p) in hp.iter_mut().zip(xp[..2 * oh * row].chunks_exact(2)) {
            *h = if beats(p[1], p[0]) { p[1] } else { p[0] };
        }
        pool_row_pairs(hp, row, ow, bias, relu, yp);
    }
}

lanes_entry! {
    /// The second step of `max_pool_2x2_values_even_rows`: output row r is the max of the two
    /// runs of horizontal maxima in `hp`'s row r (at 0 and row/2), ow values each, then
    /// + bias and the ReLU; 16 lanes at a time with the last block masked. Auto-vectorized,
    /// a 14-value row (28-wide maps) took three 4-lane steps and two scalar ones, most of the
    /// pool's time in a seed-cnn inference.
    pub fn pool_row_pairs(hp: &[f32], row: usize, ow: usize, bias: Option<f32>, relu: bool, yp: &mut [f32]) => pool_row_pairs_with
}

#[inline(always)]
fn pool_row_pairs_with<L: Lanes>(hp: &[f32], row: usize, ow: usize, bias: Option<f32>, relu: bool, yp: &mut [f32]) {
    // The flags as constants, so that the loop tests neither.
    let b = bias.unwrap_or(0.0);
    match (bias.is_some() || relu, relu) {
        (false, _) => row_pairs::<L, false, false>(hp, row, ow, b, yp),
        (true, false) => row_pairs::<L, true, false>(hp, row, ow, b, yp),
        (true, true) => row_pairs::<L, true, true>(hp, row, ow, b, yp),
    }
}

#[inline(always)]
fn row_pairs<L: Lanes, const ADD: bool, const RELU: bool>(hp: &[f32], row: usize, ow: usize, b: f32, yp: &mut [f32]) {
    let (half, b) = (row / 2, L::splat(b));
    for (yr, rows) in yp.chunks_exact_mut(ow).zip(hp.chunks_exact(row)) {
        let mut j = 0;
        while j < ow {
            let n = LANES.min(ow - j);
            let mut m = L::load_first(&rows[j..], n).pool_max(L::load_first(&rows[half + j..], n));
            if ADD {
                m = m + b;
            }
            if RELU {
                m = m.relu();
            }
            m.store_first(&mut yr[j..], n);
            j += LANES;
        }
    }
}

multiversion! {
    /// `max_pool_2x2_plane` without the winners' indices (inference): the same values.
    pub fn max_pool_2x2_values(xp: &[f32], w: usize, ow: usize, relu: bool, yp: &mut [f32]) {
        for (oy, yr) in yp.chunks_exact_mut(ow).enumerate() {
            let r0 = &xp[2 * oy * w..2 * oy * w + 2 * ow];
            let r1 = &xp[(2 * oy + 1) * w..(2 * oy + 1) * w + 2 * ow];
            for (o, (p0, p1)) in yr.iter_mut().zip(r0.chunks_exact(2).zip(r1.chunks_exact(2))) {
                let m0 = if beats(p0[1], p0[0]) { p0[1] } else { p0[0] };
                let m1 = if beats(p1[1], p1[0]) { p1[1] } else { p1[0] };
                *o = relu_if(if beats(m1, m0) { m1 } else { m0 }, relu);
            }
        }
    }
}

/// dx[argmax] += dy: each output's gradient goes to the input that won its window; with a fused
/// ReLU (`relu_out` = the pool's output) only where that output is > 0.
pub fn max_pool_backward(
    dy: &[f32],
    relu_out: Option<&[f32]>,
    argmax: &[u32],
    plane_in: usize,
    plane_out: usize,
    dx: &mut [f32],
) {
    dx.par_chunks_mut(plane_in)
        .zip(dy.par_chunks(plane_out).zip(argmax.par_chunks(plane_out)))
        .enumerate()
        .for_each(|(p, (dxp, (dyp, ap)))| {
            dxp.fill(0.0);
            match relu_out {
                None => {
                    for (&g, &a) in dyp.iter().zip(ap) {
                        dxp[a as usize] += g;
                    }
                }
                Some(y) => {
                    let yp = &y[p * plane_out..(p + 1) * plane_out];
                    for ((&g, &a), &v) in dyp.iter().zip(ap).zip(yp) {
                        dxp[a as usize] += crate::kernels::reduce::relu_mask(v, g);
                    }
                }
            }
        });
}

/// y[p, oy, ox] = mean of the k×k window.
pub fn avg_pool_forward(x: &[f32], h: usize, w: usize, k: usize, s: usize, y: &mut [f32]) {
    let (oh, ow) = ((h - k) / s + 1, (w - k) / s + 1);
    let inv = 1.0 / (k * k) as f32;
    y.par_chunks_mut(oh * ow).zip(x.par_chunks(h * w)).for_each(|(yp, xp)| {
        for oy in 0..oh {
            for ox in 0..ow {
                let mut acc = 0.0f32;
                for i in 0..k {
                    for j in 0..k {
                        acc += xp[(oy * s + i) * w + ox * s + j];
                    }
                }
                yp[oy * ow + ox] = acc * inv;
            }
        }
    });
}

/// dx[window] += dy / (k*k).
pub fn avg_pool_backward(dy: &[f32], h: usize, w: usize, k: usize, s: usize, dx: &mut [f32]) {
    let (oh, ow) = ((h - k) / s + 1, (w - k) / s + 1);
    let inv = 1.0 / (k * k) as f32;
    dx.par_chunks_mut(h * w)
        .zip(dy.par_chunks(oh * ow))
        .for_each(|(dxp, dyp)| {
            dxp.fill(0.0);
            for oy in 0..oh {
                for ox in 0..ow {
                    let g = dyp[oy * ow + ox] * inv;
                    for i in 0..k {
                        for j in 0..k {
                            dxp[(oy * s + i) * w + ox * s + j] += g;
                        }
                    }
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_2x2_path_picks_the_same_winner_as_the_general_loop() {
        let (h, w) = (6, 8);
        // Ties, repeated values, negative zeros and NaNs in several positions.
        let mut x: Vec<f32> = (0..2 * h * w).map(|i| ((i * 7) % 5) as f32 - 2.0).collect();
        x[3] = f32::NAN;
        x[w + 12] = f32::NAN;
        x[w + 13] = f32::NAN;
        x[40] = -0.0;
        let n = 2 * (h / 2) * (w / 2);
        let (mut y1, mut a1, mut y2, mut a2) = (vec![0.0f32; n], vec![0; n], vec![0.0f32; n], vec![0; n]);
        max_pool_forward(&x, 2, h, w, 2, 2, false, &mut y1, Some(&mut a1));
        max_pool_generic(&x, h, w, 2, 2, false, &mut y2, Some(&mut a2));
        assert_eq!(a1, a2);
        let same = |p: &f32, q: &f32| p.to_bits() == q.to_bits() || (p.is_nan() && q.is_nan());
        assert!(y1.iter().zip(&y2).all(|(p, q)| same(p, q)));
        // Inference (no winners) gives the same values; the fused ReLU is relu(max), which keeps
        // a NaN window NaN as torch.relu does.
        let mut y3 = vec![0.0f32; n];
        max_pool_forward(&x, 2, h, w, 2, 2, false, &mut y3, None);
        assert!(y1.iter().zip(&y3).all(|(p, q)| same(p, q)));
        max_pool_forward(&x, 2, h, w, 2, 2, true, &mut y3, None);
        assert!(y1
            .iter()
            .zip(&y3)
            .all(|(p, q)| same(&crate::kernels::reduce::relu(*p), q)));
        assert!(
            y3.iter().any(|v| v.is_nan()),
            "NaN windows stay NaN through the fused ReLU"
        );
    }

    /// The row-pair path (rows of the map itself and the direct kernel's padded rows, W + 2
    /// apart) gives the values of `max_pool_2x2_values` then `add_bias_relu`, bit for bit and
    /// NaN for NaN, on both lane types: widths whose output rows are shorter than, equal to and
    /// longer than 16 lanes, with and without a bias and a ReLU.
    #[test]
    fn row_pairs_pool_as_the_plain_loops_do() {
        let same = |p: &f32, q: &f32| p.to_bits() == q.to_bits() || (p.is_nan() && q.is_nan());
        for (w, pad) in [(6, 0), (28, 0), (28, 2), (32, 0), (34, 2), (40, 0)] {
            let (h, row, ow) = (6, w + pad, w / 2);
            let mut x: Vec<f32> = (0..h * row).map(|i| ((i * 7) % 5) as f32 - 2.0).collect();
            x[1] = f32::NAN;
            x[row + 4] = f32::NAN;
            x[row + 5] = f32::NAN;
            x[2 * row + 2] = -0.0;
            x[2 * row + 3] = -0.0;
            for (bias, relu) in [(None, false), (None, true), (Some(0.5f32), false), (Some(-0.5), true)] {
                let n = (h / 2) * ow;
                let mut want = vec![0.0f32; n];
                max_pool_2x2_values(&x, row, ow, false, &mut want);
                if bias.is_some() || relu {
                    let b = bias.map(|b| vec![b]);
                    crate::kernels::reduce::add_bias_relu(&mut want, n, b.as_deref(), relu);
                }
                let what = format!("w {w} pad {pad} bias {bias:?} relu {relu}");
                let (mut got, mut hp) = (vec![0.0f32; n], vec![0.0f32; h / 2 * row]);
                max_pool_2x2_values_even_rows(&x, row, ow, bias, relu, &mut got, &mut hp);
                assert!(got.iter().zip(&want).all(|(p, q)| same(p, q)), "{what}");
                let mut portable = vec![0.0f32; n];
                pool_row_pairs_with::<crate::kernels::lanes::Portable>(&hp, row, ow, bias, relu, &mut portable);
                assert!(portable.iter().zip(&want).all(|(p, q)| same(p, q)), "portable {what}");
            }
        }
    }
}
