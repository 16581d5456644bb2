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
