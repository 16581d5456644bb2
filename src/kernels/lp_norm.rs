//! Lp-norm BatchNorm (Santurkar et al.): subtract the batch mean, divide by the mean L1 norm
//! or the L∞ norm of the centred values instead of the standard deviation.

use rayon::prelude::*;

use crate::kernels::reduce::{mean_var, Center};
use crate::kernels::simd::SharedOut;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LpKind {
    L1,
    Linf,
}

/// Per channel of an (N, C, S) view: the mean, the scale (mean|x - mean| for L1, max|x - mean|
/// for L∞) and the term backward needs: mean(sign(x - mean)) for L1, or for L∞ the flat index
/// of the largest |x - mean| and its sign (encoded as index·2 + (sign < 0)).
pub fn lp_stats(x: &[f32], n: usize, c: usize, s: usize, kind: LpKind, out: &mut [(f64, f32, f64)]) {
    out.par_iter_mut().enumerate().for_each(|(ch, o)| {
        *o = {
            let runs = (0..n).map(|i| &x[(i * c + ch) * s..(i * c + ch + 1) * s]);
            let (mean, _) = mean_var(runs);
            let center = Center::new(mean);
            let m = (n * s) as f64;
            match kind {
                LpKind::L1 => {
                    let (mut abs, mut sign) = (0.0f64, 0.0f64);
                    for i in 0..n {
                        for &v in &x[(i * c + ch) * s..(i * c + ch + 1) * s] {
                            let z = center.sub(v);
                            abs += z.abs() as f64;
                            sign += z.signum() as f64 * (z != 0.0) as u8 as f64;
                        }
                    }
                    (mean, (abs / m) as f32, sign / m)
                }
                LpKind::Linf => {
                    let (mut best, mut at, mut neg) = (-1.0f32, 0usize, false);
                    for i in 0..n {
                        let off = (i * c + ch) * s;
                        for (j, &v) in x[off..off + s].iter().enumerate() {
                            let z = center.sub(v);
                            if z.abs() > best {
                                best = z.abs();
                                at = off + j;
                                neg = z < 0.0;
                            }
                        }
                    }
                    (mean, best, (at * 2 + neg as usize) as f64)
                }
            }
        };
    });
}

/// Backward, per channel in parallel, with u = (x - mean)/(scale + eps) and g = gamma·dy
/// (dy masked by y > 0 when `relu`) over the m = N·S values of a channel:
/// dx_j = (g_j - mean(g))/s' - Σ(g·u)/(m·s') · (w_j - mean(w)),
/// w = sign(x - mean) for L1; w = m·sign(z*)·[j = argmax|z|] for L∞.
/// `sums[c]` receives (Σdy, Σdy·u) for the parameter gradients.
#[allow(clippy::too_many_arguments)]
pub fn lp_backward(
    x: &[f32],
    y: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    n: usize,
    c: usize,
    s: usize,
    kind: LpKind,
    relu: bool,
    stats: &[(f64, f32, f64)],
    eps: f64,
    gamma: Option<&[f32]>,
    sums: &mut [(f64, f64)],
) {
    let m = (n * s) as f64;
    let out = SharedOut::new(dx);
    let grad = |j: usize| if relu && y[j] <= 0.0 { 0.0 } else { dy[j] as f64 };
    sums.par_iter_mut().enumerate().for_each(|(ch, sum)| {
        let (mean, scale, extra) = stats[ch];
        let center = Center::new(mean);
        let inv = 1.0 / (scale as f64 + eps);
        let (mut sd, mut sdu) = (0.0f64, 0.0f64);
        for i in 0..n {
            let off = (i * c + ch) * s;
            for (j, &xv) in x.iter().enumerate().skip(off).take(s) {
                let g = grad(j);
                sd += g;
                sdu += g * center.sub(xv) as f64 * inv;
            }
        }
        *sum = (sd, sdu);
        let gm = gamma.map_or(1.0, |g| g[ch]) as f64;
        let mean_g = gm * sd / m;
        let coef = gm * sdu * inv / m;
        let (argmax, sign) = (extra as usize / 2, if extra as usize % 2 == 1 { -1.0 } else { 1.0 });
        for i in 0..n {
            let off = (i * c + ch) * s;
            // SAFETY: run (i, ch) belongs to this channel's task alone.
            let dr = unsafe { out.run(off, s) };
            for (k, o) in dr.iter_mut().enumerate() {
                let j = off + k;
                let base = (gm * grad(j) - mean_g) * inv;
                *o = match kind {
                    LpKind::L1 => {
                        let z = center.sub(x[j]);
                        let w = if z == 0.0 { 0.0 } else { z.signum() as f64 };
                        (base - coef * (w - extra)) as f32
                    }
                    LpKind::Linf => {
                        let spike = if j == argmax { coef * m * sign } else { 0.0 };
                        (base + coef * sign - spike) as f32
                    }
                };
            }
        }
    });
}
