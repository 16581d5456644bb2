//! Multi-head self-attention over a fused qkv projection in timm's layout: row (b, t) of `qkv`
//! holds [q | k | v], each D = H·d values with head h at h·d. Every product reads the heads in
//! place (only Kᵀ and Vᵀ are packed, the product kernel reading U by rows); samples run in
//! parallel, one task per sample doing its H heads.

use rayon::prelude::*;

use crate::kernels::lanes::{lanes_entry, Lanes, LANES};
use crate::kernels::matmul::Op;
use crate::kernels::register_product::register_product;

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

/// Values of the scratch `attention_forward` and `attention_backward` take, per sample: one
/// head's Kᵀ or Vᵀ, one head's rows of K, V, Q or dO packed, and one head's dP (used head
/// after head, so it stays in L1; as [B, H, T, T] it went through memory, 5 MB a vit:64 block).
pub fn attention_scratch_len(s: AttentionShape) -> usize {
    s.batch * (2 * s.head_dim * s.tokens + s.tokens * s.tokens)
}

/// Per-sample scratch: (a head transposed [hd, t], a head's rows packed [t, hd], dP [t, t]).
fn split_scratch(sc: &mut [f32], t: usize, hd: usize) -> (&mut [f32], &mut [f32], &mut [f32]) {
    let (kt, rest) = sc.split_at_mut(hd * t);
    let (rows, ds) = rest.split_at_mut(t * hd);
    (kt, rows, ds)
}

/// kt [hd, t] = the head's rows of `x` [t, hd] (rows `ld` apart), transposed: the product
/// kernel reads U by rows.
fn transpose_head(x: &[f32], ld: usize, t: usize, hd: usize, kt: &mut [f32]) {
    for (j, row) in x.chunks(ld).take(t).enumerate() {
        for (e, &v) in row[..hd].iter().enumerate() {
            kt[e * t + j] = v;
        }
    }
}

/// rows [t, hd] = the head's rows of `x` (rows `ld` apart), contiguous: the product kernel's U.
fn pack_head<'a>(x: &[f32], ld: usize, t: usize, hd: usize, rows: &'a mut [f32]) -> &'a [f32] {
    for (dst, src) in rows.chunks_exact_mut(hd).zip(x.chunks(ld)).take(t) {
        dst.copy_from_slice(&src[..hd]);
    }
    &rows[..t * hd]
}

// P = softmax(scale · Q Kᵀ) per row, O = P V, per sample and head; O goes to `out` [B·T, D]
// with head h at columns h·d, P to `probs` [B, H, T, T]. The products run in registers
// (`register_product`) on the heads in place; `scratch` holds each head's Kᵀ.
pub fn attention_forward(qkv: &[f32], out: &mut [f32], probs: &mut [f32], scratch: &mut [f32], s: AttentionShape) {
    let (t, d, hd) = (s.tokens, s.dim(), s.head_dim);
    assert_eq!(qkv.len(), s.batch * t * 3 * d, "attention: qkv");
    assert_eq!(out.len(), s.batch * t * d, "attention: out");
    assert_eq!(probs.len(), s.probs_len(), "attention: probs");
    assert_eq!(scratch.len(), attention_scratch_len(s), "attention: scratch");
    let scale = s.scale();
    out.par_chunks_mut(t * d)
        .zip(qkv.par_chunks(t * 3 * d))
        .zip(
            probs
                .par_chunks_mut(s.heads * t * t)
                .zip(scratch.par_chunks_mut(2 * hd * t + t * t)),
        )
        .for_each(|((o, x), (p, sc))| {
            let (kt, packed, _) = split_scratch(sc, t, hd);
            for (h, ph) in p.chunks_mut(t * t).enumerate() {
                let (q, k, v) = (&x[h * hd..], &x[d + h * hd..], &x[2 * d + h * hd..]);
                transpose_head(k, 3 * d, t, hd, kt);
                register_product(ph, t, (q, 3 * d, Op::N), kt, t, hd, t);
                softmax_rows(ph, t, scale);
                let v = pack_head(v, 3 * d, t, hd, packed);
                register_product(&mut o[h * hd..], d, (ph, t, Op::N), v, t, t, hd);
            }
        });
}

lanes_entry! {
    // p = exp(scale·s − max)/Σ exp(scale·s − max) over each row of `t`, in place (the max taken
    // over the scaled scores), in vectors with a masked last one: a row of 50 was a tenth of a
    // ViT training step as a scalar max and f64 sum around a vectorized exp.
    pub fn softmax_rows(scores: &mut [f32], t: usize, scale: f32) => softmax
}

#[inline(always)]
fn softmax<V: Lanes>(scores: &mut [f32], t: usize, scale: f32) {
    let (whole, tail) = (t / LANES * LANES, t % LANES);
    for row in scores.chunks_exact_mut(t) {
        let mut max = V::load_first_or(&row[whole..], tail, f32::NEG_INFINITY).scale(scale);
        for c in (0..whole).step_by(LANES) {
            max = max.max(V::load(&row[c..]).scale(scale));
        }
        let max = V::splat(max.reduce_max());
        let mut sum = V::zero();
        for c in (0..whole).step_by(LANES) {
            let e = (V::load(&row[c..]).scale(scale) - max).exp();
            e.store(&mut row[c..]);
            sum = sum + e;
        }
        if tail > 0 {
            let e = (V::load_first(&row[whole..], tail).scale(scale) - max).exp();
            e.store_first(&mut row[whole..], tail);
            sum = sum + e.keep_first(tail);
        }
        let inv = 1.0 / sum.reduce_sum();
        for c in (0..whole).step_by(LANES) {
            V::load(&row[c..]).scale(inv).store(&mut row[c..]);
        }
        if tail > 0 {
            V::load_first(&row[whole..], tail)
                .scale(inv)
                .store_first(&mut row[whole..], tail);
        }
    }
}

lanes_entry! {
    // dS = scale · P ⊙ (dP − Σ_j dP·P) over each row, in place in dP.
    pub fn softmax_backward_rows(ds: &mut [f32], p: &[f32], t: usize, scale: f32) => softmax_backward
}

#[inline(always)]
fn softmax_backward<V: Lanes>(ds: &mut [f32], p: &[f32], t: usize, scale: f32) {
    let (whole, tail) = (t / LANES * LANES, t % LANES);
    for (dr, pr) in ds.chunks_exact_mut(t).zip(p.chunks_exact(t)) {
        let mut dot = V::load_first(&dr[whole..], tail) * V::load_first(&pr[whole..], tail);
        for c in (0..whole).step_by(LANES) {
            dot = V::load(&dr[c..]).mul_add(V::load(&pr[c..]), dot);
        }
        let dot = V::splat(dot.reduce_sum());
        for c in (0..whole).step_by(LANES) {
            let v = (V::load(&pr[c..]) * (V::load(&dr[c..]) - dot)).scale(scale);
            v.store(&mut dr[c..]);
        }
        if tail > 0 {
            let v = (V::load_first(&pr[whole..], tail) * (V::load_first(&dr[whole..], tail) - dot)).scale(scale);
            v.store_first(&mut dr[whole..], tail);
        }
    }
}

// With G = dO per head: dV = Pᵀ G; dP = G Vᵀ; dS = scale · P ⊙ (dP − Σ_j dP·P); dQ = dS K;
// dK = dSᵀ Q. `scratch` holds each head's Vᵀ and dP/dS; dqkv is [B·T, 3·D].
#[allow(clippy::too_many_arguments)]
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
    assert_eq!(scratch.len(), attention_scratch_len(s), "attention backward: scratch");
    let scale = s.scale();
    dqkv.par_chunks_mut(t * 3 * d)
        .zip(qkv.par_chunks(t * 3 * d))
        .zip(dout.par_chunks(t * d).zip(probs.par_chunks(s.heads * t * t)))
        .zip(scratch.par_chunks_mut(2 * hd * t + t * t))
        .for_each(|(((dx, x), (g, p)), sc)| {
            let (vt, packed, ds) = split_scratch(sc, t, hd);
            for h in 0..s.heads {
                let ph = &p[h * t * t..(h + 1) * t * t];
                let (q, k, v) = (&x[h * hd..], &x[d + h * hd..], &x[2 * d + h * hd..]);
                let gh = &g[h * hd..];
                // dV = Pᵀ G
                let gp = pack_head(gh, d, t, hd, packed);
                register_product(&mut dx[2 * d + h * hd..], 3 * d, (ph, t, Op::T), gp, t, t, hd);
                // dP = G Vᵀ, then the softmax's backward in place, scaled.
                transpose_head(v, 3 * d, t, hd, vt);
                register_product(ds, t, (gh, d, Op::N), vt, t, hd, t);
                softmax_backward_rows(ds, ph, t, scale);
                // dQ = dS K, dK = dSᵀ Q
                let kp = pack_head(k, 3 * d, t, hd, packed);
                register_product(&mut dx[h * hd..], 3 * d, (ds, t, Op::N), kp, t, t, hd);
                let qp = pack_head(q, 3 * d, t, hd, packed);
                register_product(&mut dx[d + h * hd..], 3 * d, (ds, t, Op::T), qp, t, t, hd);
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

    /// Rows of 1 to 197 (whole vectors, masked tails): each row sums to 1 and matches the f64
    /// softmax; backward matches its formula; the dispatched versions equal the portable ones
    /// bit for bit.
    #[test]
    fn softmax_rows_match_the_formula_in_both_versions() {
        use crate::kernels::lanes::Portable;
        for t in [1, 2, 15, 16, 17, 50, 64, 197] {
            let scores: Vec<f32> = (0..3 * t).map(|i| ((i * 37 % 101) as f32 / 7.0) - 6.0).collect();
            let (mut got, mut portable) = (scores.clone(), scores.clone());
            softmax_rows(&mut got, t, 0.25);
            softmax::<Portable>(&mut portable, t, 0.25);
            assert_eq!(got, portable, "t {t}: forward");
            for (row, srow) in got.chunks(t).zip(scores.chunks(t)) {
                let max = srow.iter().map(|&v| v as f64 * 0.25).fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = srow.iter().map(|&v| (v as f64 * 0.25 - max).exp()).sum();
                for (p, &v) in row.iter().zip(srow) {
                    let want = (v as f64 * 0.25 - max).exp() / z;
                    assert!((*p as f64 - want).abs() < 1e-6, "t {t}: {p} vs {want}");
                }
            }
            let dp: Vec<f32> = (0..3 * t).map(|i| ((i * 53 % 89) as f32 / 40.0) - 1.1).collect();
            let (mut ds, mut ds_portable) = (dp.clone(), dp.clone());
            softmax_backward_rows(&mut ds, &got, t, 0.25);
            softmax_backward::<Portable>(&mut ds_portable, &got, t, 0.25);
            assert_eq!(ds, ds_portable, "t {t}: backward");
            for ((d, g), p) in ds.chunks(t).zip(dp.chunks(t)).zip(got.chunks(t)) {
                let dot: f64 = g.iter().zip(p).map(|(&a, &b)| a as f64 * b as f64).sum();
                for j in 0..t {
                    let want = 0.25 * p[j] as f64 * (g[j] as f64 - dot);
                    assert!((d[j] as f64 - want).abs() < 1e-6, "t {t}: dS {} vs {want}", d[j]);
                }
            }
        }
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
        let mut scratch = vec![f32::NAN; attention_scratch_len(s)];
        attention_forward(&qkv, &mut out, &mut probs, &mut scratch, s);
        for (a, b) in out.iter().zip(reference(&qkv, s)) {
            assert!((*a as f64 - b).abs() < 1e-5, "{a} vs {b}");
        }
        for row in probs.chunks(s.tokens) {
            assert!((row.iter().map(|&v| v as f64).sum::<f64>() - 1.0).abs() < 1e-6);
        }
    }
}
