//! Lp-norm BatchNorm (Santurkar et al.): subtract the batch mean, divide by the mean L1 norm
//! or the L∞ norm of the centred values instead of the standard deviation.

use rayon::prelude::*;

use crate::kernels::reduce::{mean_var, Center};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LpKind {
    L1,
    Linf,
}

/// Per channel of an (N, C, S) view: the mean, the scale (mean|x - mean| for L1, max|x - mean|
/// for L∞) and the term backward needs: mean(sign(x - mean)) for L1, or for L∞ the flat index
/// of the largest |x - mean| and its sign (encoded as index·2 + (sign < 0)).
pub fn lp_stats(x: &[f32], n: usize, c: usize, s: usize, kind: LpKind) -> Vec<(f64, f32, f64)> {
    (0..c)
        .into_par_iter()
        .map(|ch| {
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
        })
        .collect()
}

/// Backward in place over dy for one channel layout, with u = (x - mean)/(scale + eps) and
/// g = gamma·dy over the m = N·S values of a channel:
/// dx_j = (g_j - mean(g))/s' - Σ(g·u)/(m·s') · (w_j - mean(w)),
/// w = sign(x - mean) for L1; w = m·sign(z*)·[j = argmax|z|] for L∞.
#[allow(clippy::too_many_arguments)]
pub fn lp_backward(
    x: &[f32],
    dy: &mut [f32],
    n: usize,
    c: usize,
    s: usize,
    kind: LpKind,
    stats: &[(f64, f32, f64)],
    eps: f64,
    gamma: Option<&[f32]>,
    dgamma: Option<&mut [f32]>,
    dbeta: Option<&mut [f32]>,
) {
    let m = (n * s) as f64;
    // Per channel: Σdy and Σdy·u.
    let sums: Vec<(f64, f64)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let (mean, scale, _) = stats[ch];
            let center = Center::new(mean);
            let inv = 1.0 / (scale as f64 + eps);
            let (mut sd, mut sdu) = (0.0f64, 0.0f64);
            for i in 0..n {
                let off = (i * c + ch) * s;
                for (&xv, &dv) in x[off..off + s].iter().zip(&dy[off..off + s]) {
                    sd += dv as f64;
                    sdu += dv as f64 * center.sub(xv) as f64 * inv;
                }
            }
            (sd, sdu)
        })
        .collect();
    if let (Some(dg), Some(db)) = (dgamma, dbeta) {
        for ch in 0..c {
            dg[ch] += sums[ch].1 as f32;
            db[ch] += sums[ch].0 as f32;
        }
    }
    for ch in 0..c {
        let (mean, scale, extra) = stats[ch];
        let center = Center::new(mean);
        let gm = gamma.map_or(1.0, |g| g[ch]) as f64;
        let inv = 1.0 / (scale as f64 + eps);
        let mean_g = gm * sums[ch].0 / m;
        let coef = gm * sums[ch].1 * inv / m;
        match kind {
            LpKind::L1 => {
                let mean_w = extra;
                for i in 0..n {
                    let off = (i * c + ch) * s;
                    for (o, &xv) in dy[off..off + s].iter_mut().zip(&x[off..off + s]) {
                        let z = center.sub(xv);
                        let w = if z == 0.0 { 0.0 } else { z.signum() as f64 };
                        *o = ((gm * *o as f64 - mean_g) * inv - coef * (w - mean_w)) as f32;
                    }
                }
            }
            LpKind::Linf => {
                let at = extra as usize / 2;
                let sign = if extra as usize % 2 == 1 { -1.0 } else { 1.0 };
                for i in 0..n {
                    let off = (i * c + ch) * s;
                    for o in dy[off..off + s].iter_mut() {
                        *o = ((gm * *o as f64 - mean_g) * inv + coef * sign) as f32;
                    }
                }
                dy[at] -= (coef * m * sign) as f32;
            }
        }
    }
}
