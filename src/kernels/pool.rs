//! Pooling kernels over NCHW planes (kernel k, stride s, no padding).

use rayon::prelude::*;

/// y[p, oy, ox] = max over the k×k window; `argmax` keeps the flat in-plane index of the winner.
#[allow(clippy::too_many_arguments)]
pub fn max_pool_forward(
    x: &[f32],
    planes: usize,
    h: usize,
    w: usize,
    k: usize,
    s: usize,
    y: &mut [f32],
    argmax: &mut [u32],
) {
    let (oh, ow) = ((h - k) / s + 1, (w - k) / s + 1);
    debug_assert_eq!(y.len(), planes * oh * ow);
    if k == 2 && s == 2 {
        return max_pool_2x2(x, h, w, y, argmax);
    }
    y.par_chunks_mut(oh * ow)
        .zip(argmax.par_chunks_mut(oh * ow))
        .zip(x.par_chunks(h * w))
        .for_each(|((yp, ap), xp)| {
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
                    yp[oy * ow + ox] = best;
                    ap[oy * ow + ox] = at as u32;
                }
            }
        });
}

/// The common 2×2 / stride 2 window, two input rows at a time; same winner rule as above (the
/// first maximum in row-major order; NaN wins).
fn max_pool_2x2(x: &[f32], h: usize, w: usize, y: &mut [f32], argmax: &mut [u32]) {
    let (oh, ow) = (h / 2, w / 2);
    y.par_chunks_mut(oh * ow)
        .zip(argmax.par_chunks_mut(oh * ow))
        .zip(x.par_chunks(h * w))
        .for_each(|((yp, ap), xp)| {
            for oy in 0..oh {
                let (r0, r1) = (
                    &xp[2 * oy * w..2 * oy * w + w],
                    &xp[(2 * oy + 1) * w..(2 * oy + 1) * w + w],
                );
                let (yr, ar) = (&mut yp[oy * ow..(oy + 1) * ow], &mut ap[oy * ow..(oy + 1) * ow]);
                let base = (2 * oy * w) as u32;
                for ox in 0..ow {
                    // Branch-free (selects, not jumps): random data would mispredict branches.
                    let (mut best, mut at) = (r0[2 * ox], 0u32);
                    for (j, v) in [
                        (1u32, r0[2 * ox + 1]),
                        (w as u32, r1[2 * ox]),
                        (w as u32 + 1, r1[2 * ox + 1]),
                    ] {
                        let wins = v > best || (v.is_nan() & !best.is_nan());
                        best = if wins { v } else { best };
                        at = if wins { j } else { at };
                    }
                    yr[ox] = best;
                    ar[ox] = base + 2 * ox as u32 + at;
                }
            }
        });
}

/// dx[argmax] += dy: each output's gradient goes to the input that won its window.
pub fn max_pool_backward(dy: &[f32], argmax: &[u32], plane_in: usize, plane_out: usize, dx: &mut [f32]) {
    dx.par_chunks_mut(plane_in)
        .zip(dy.par_chunks(plane_out).zip(argmax.par_chunks(plane_out)))
        .for_each(|(dxp, (dyp, ap))| {
            dxp.fill(0.0);
            for (&g, &a) in dyp.iter().zip(ap) {
                dxp[a as usize] += g;
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
