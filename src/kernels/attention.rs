//! Multi-head self-attention over a fused qkv projection in timm's layout: row (b, t) of `qkv`
//! holds [q | k | v], each D = H·d values with head h at h·d. Every product reads the heads in
//! place through the gemm crate's strides (no copy per head); samples run in parallel, one
//! task per sample doing its H heads.

use rayon::prelude::*;

use crate::kernels::matmul::{matmul_strided, Op};
use crate::kernels::simd::multiversion;

/// The attention's sizes: `batch` samples of `tokens` rows, `heads` heads of `head_dim` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    pub batch: usize,
    pub tokens: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl AttentionShape {
    /// Model width D = H·d.
    pub fn dim(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Values of the attention probabilities kept for backward (B·H·T·T).
    pub fn probs_len(&self) -> usize {
        self.batch * self.heads * self.tokens * self.tokens
    }

    /// timm's scale d^-1/2.
    pub fn scale(&self) -> f32 {
        (self.head_dim as f32).powf(-0.5)
    }
}

// P = softmax(scale · Q Kᵀ) per row, O = P V, per sample and head; O goes to `out` [B·T, D]
// with head h at columns h·d, P to `probs` [B, H, T, T].
pub fn attention_forward(qkv: &[f32], out: &mut [f32], probs: &mut [f32], s: AttentionShape) {
    let (t, d, hd) = (s.tokens, s.dim(), s.head_dim);
    assert_eq!(qkv.len(), s.batch * t * 3 * d, "attention: qkv");
    assert_eq!(out.len(), s.batch * t * d, "attention: out");
    assert_eq!(probs.len(), s.probs_len(), "attention: probs");
    let scale = s.scale();
    out.par_chunks_mut(t * d)
        .zip(qkv.par_chunks(t * 3 * d))
        .zip(probs.par_chunks_mut(s.heads * t * t))
        .for_each(|((o, x), p)| {
            for (h, ph) in p.chunks_mut(t * t).enumerate() {
                let (q, k, v) = (&x[h * hd..], &x[d + h * hd..], &x[2 * d + h * hd..]);
                matmul_strided(ph, t, t, t, hd, (q, 3 * d, Op::N), (k, 3 * d, Op::T), false, 1);
                softmax_rows(ph, t, scale);
                matmul_strided(
                    &mut o[h * hd..],
                    d,
                    t,
                    hd,
                    t,
                    (ph, t, Op::N),
                    (v, 3 * d, Op::N),
                    false,
                    1,
                );
            }
        });
}

multiversion! {
    // p = exp(scale·s − max)/Σ exp(scale·s − max) over each row of `t`, in place (the max taken
    // over the scaled scores; the sum in f64).
    fn softmax_rows(scores: &mut [f32], t: usize, scale: f32) {
        for row in scores.chunks_mut(t) {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v * scale));
            row.iter_mut().for_each(|v| *v = crate::kernels::special::exp(*v * scale - max));
            let sum: f64 = row.iter().map(|&v| v as f64).sum();
            let inv = (1.0 / sum) as f32;
            row.iter_mut().for_each(|v| *v *= inv);
        }
    }
}

multiversion! {
    // dS = scale · P ⊙ (dP − Σ_j dP·P) over each row, in place in dP.
    fn softmax_backward_rows(ds: &mut [f32], p: &[f32], t: usize, scale: f32) {
        for (dr, pr) in ds.chunks_mut(t).zip(p.chunks(t)) {
            let dot: f64 = dr.iter().zip(pr).map(|(&a, &b)| a as f64 * b as f64).sum();
            let dot = dot as f32;
            dr.iter_mut().zip(pr).for_each(|(v, &pv)| *v = scale * pv * (*v - dot));
        }
    }
}

// With G = dO per head: dV = Pᵀ G; dP = G Vᵀ; dS = scale · P ⊙ (dP − Σ_j dP·P); dQ = dS K;
// dK = dSᵀ Q. `scratch` holds dP/dS (B·H·T·T values, overwritten); dqkv is [B·T, 3·D].
pub fn attention_backward(
    qkv: &[f32],
    probs: &[f32],
    dout: &[f32],
    dqkv: &mut [f32],
    scratch: &mut [f32],
    s: AttentionShape,
) {
    let (t, d, hd) = (s.tokens, s.dim(), s.head_dim);
    assert_eq!(qkv.len(), s.batch * t * 3 * d, "attention backward: qkv");
    assert_eq!(dqkv.len(), qkv.len(), "attention backward: dqkv");
    assert_eq!(dout.len(), s.batch * t * d, "attention backward: dout");
    assert_eq!(probs.len(), s.probs_len(), "attention backward: probs");
    assert_eq!(scratch.len(), s.probs_len(), "attention backward: scratch");
    let scale = s.scale();
    dqkv.par_chunks_mut(t * 3 * d)
        .zip(qkv.par_chunks(t * 3 * d))
        .zip(dout.par_chunks(t * d).zip(probs.par_chunks(s.heads * t * t)))
        .zip(scratch.par_chunks_mut(s.heads * t * t))
        .for_each(|(((dx, x), (g, p)), sc)| {
            for h in 0..s.heads {
                let (ph, ds) = (&p[h * t * t..(h + 1) * t * t], &mut sc[h * t * t..(h + 1) * t * t]);
                let (q, k, v) = (&x[h * hd..], &x[d + h * hd..], &x[2 * d + h * hd..]);
                let gh = &g[h * hd..];
                // dV = Pᵀ G
                matmul_strided(
                    &mut dx[2 * d + h * hd..],
                    3 * d,
                    t,
                    hd,
                    t,
                    (ph, t, Op::T),
                    (gh, d, Op::N),
                    false,
                    1,
                );
                // dP = G Vᵀ, then the softmax's backward in place, scaled.
                matmul_strided(ds, t, t, t, hd, (gh, d, Op::N), (v, 3 * d, Op::T), false, 1);
                softmax_backward_rows(ds, ph, t, scale);
                // dQ = dS K, dK = dSᵀ Q
                matmul_strided(
                    &mut dx[h * hd..],
                    3 * d,
                    t,
                    hd,
                    t,
                    (ds, t, Op::N),
                    (k, 3 * d, Op::N),
                    false,
                    1,
                );
                matmul_strided(
                    &mut dx[d + h * hd..],
                    3 * d,
                    t,
                    hd,
                    t,
                    (ds, t, Op::T),
                    (q, 3 * d, Op::N),
                    false,
                    1,
                );
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The naive formula in f64, row by row.
    fn reference(qkv: &[f32], s: AttentionShape) -> Vec<f64> {
        let (t, d, hd) = (s.tokens, s.dim(), s.head_dim);
        let mut out = vec![0.0; s.batch * t * d];
        let at = |b: usize, i: usize, part: usize, h: usize, j: usize| {
            qkv[(b * t + i) * 3 * d + part * d + h * hd + j] as f64
        };
        for b in 0..s.batch {
            for h in 0..s.heads {
                for i in 0..t {
                    let scores: Vec<f64> = (0..t)
                        .map(|j| {
                            (0..hd).map(|e| at(b, i, 0, h, e) * at(b, j, 1, h, e)).sum::<f64>() / (hd as f64).sqrt()
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = scores.iter().map(|v| (v - max).exp()).sum();
                    for e in 0..hd {
                        out[(b * t + i) * d + h * hd + e] =
                            (0..t).map(|j| (scores[j] - max).exp() / z * at(b, j, 2, h, e)).sum();
                    }
                }
            }
        }
        out
    }

    #[test]
    fn forward_matches_the_formula() {
        let s = AttentionShape {
            batch: 3,
            tokens: 7,
            heads: 2,
            head_dim: 5,
        };
        let qkv: Vec<f32> = (0..s.batch * s.tokens * 3 * s.dim())
            .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
            .collect();
        let mut out = vec![0.0; s.batch * s.tokens * s.dim()];
        let mut probs = vec![0.0; s.probs_len()];
        attention_forward(&qkv, &mut out, &mut probs, s);
        for (a, b) in out.iter().zip(reference(&qkv, s)) {
            assert!((*a as f64 - b).abs() < 1e-5, "{a} vs {b}");
        }
        for row in probs.chunks(s.tokens) {
            assert!((row.iter().map(|&v| v as f64).sum::<f64>() - 1.0).abs() < 1e-6);
        }
    }
}
