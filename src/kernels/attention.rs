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

lanes_entry! {
    /// kt [hd, t] = the head's rows of `x` [t, hd] (rows `ld` apart), transposed: the product
    /// kernel reads U by rows. Squares of 16 rows x 16 values go through registers (value by
    /// value, the scattered stores were 2.7% of a vit:128 step).
    pub fn transpose_head(x: &[f32], ld: usize, t: usize, hd: usize, kt: &mut [f32]) => transpose_head_lanes
}

#[inline(always)]
fn transpose_head_lanes<V: Lanes>(x: &[f32], ld: usize, t: usize, hd: usize, kt: &mut [f32]) {
    let (rows16, cols16) = (t / LANES * LANES, hd / LANES * LANES);
    for j0 in (0..rows16).step_by(LANES) {
        for e0 in (0..cols16).step_by(LANES) {
            let square = V::transpose(std::array::from_fn(|r| V::load(&x[(j0 + r) * ld + e0..])));
            for (c, v) in square.into_iter().enumerate() {
                v.store(&mut kt[(e0 + c) * t + j0..]);
            }
        }
    }
    // The rows and values outside whole squares, one at a time.
    for (j, row) in x.chunks(ld).take(t).enumerate() {
        let from = if j < rows16 { cols16 } else { 0 };
        for (e, &v) in row[..hd].iter().enumerate().skip(from) {
            kt[e * t + j] = v;
        }
    }
}

/// rows [t, hd] = the head's rows of `x` (rows `ld` apart), contiguous: the product kernel's U.
/// A row of a constant 16 or 32 values copies as inlined vector moves: as a call to libc's
/// memcpy each, the copies were 5.5% of the attention's time.
fn pack_head<'a>(x: &[f32], ld: usize, t: usize, hd: usize, rows: &'a mut [f32]) -> &'a [f32] {
    fn rows_of<const HD: usize>(x: &[f32], ld: usize, t: usize, rows: &mut [f32]) {
        for (dst, src) in rows.chunks_exact_mut(HD).zip(x.chunks(ld)).take(t) {
            dst.copy_from_slice(&src[..HD]);
        }
    }
    match hd {
        16 => rows_of::<16>(x, ld, t, rows),
        32 => rows_of::<32>(x, ld, t, rows),
        _ => {
            for (dst, src) in rows.chunks_exact_mut(hd).zip(x.chunks(ld)).take(t) {
                dst.copy_from_slice(&src[..hd]);
            }
        }
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

/// Rows a softmax step runs side by side: a row's reductions (max, then sum) are chains of
/// dependent shuffles that one row alone leaves the core waiting on.
const SOFTMAX_ROWS: usize = 8;

#[inline(always)]
fn softmax<V: Lanes>(scores: &mut [f32], t: usize, scale: f32) {
    let mut groups = scores.chunks_exact_mut(SOFTMAX_ROWS * t);
    for group in groups.by_ref() {
        softmax_group::<V, SOFTMAX_ROWS>(group, t, scale);
    }
    for row in groups.into_remainder().chunks_exact_mut(t) {
        softmax_group::<V, 1>(row, t, scale);
    }
}

/// `softmax` on R rows at once, each with the operations in the order one row alone takes.
#[inline(always)]
fn softmax_group<V: Lanes, const R: usize>(rows: &mut [f32], t: usize, scale: f32) {
    let (whole, tail) = (t / LANES * LANES, t % LANES);
    let mut max: [V; R] =
        std::array::from_fn(|r| V::load_first_or(&rows[r * t + whole..], tail, f32::NEG_INFINITY).scale(scale));
    for c in (0..whole).step_by(LANES) {
        for (r, m) in max.iter_mut().enumerate() {
            *m = m.max(V::load(&rows[r * t + c..]).scale(scale));
        }
    }
    let max: [V; R] = std::array::from_fn(|r| V::splat(max[r].reduce_max()));
    let mut sum = [V::zero(); R];
    for c in (0..whole).step_by(LANES) {
        for r in 0..R {
            let e = (V::load(&rows[r * t + c..]).scale(scale) - max[r]).exp();
            e.store(&mut rows[r * t + c..]);
            sum[r] = sum[r] + e;
        }
    }
    if tail > 0 {
        for r in 0..R {
            let at = r * t + whole;
            let e = (V::load_first(&rows[at..], tail).scale(scale) - max[r]).exp();
            e.store_first(&mut rows[at..], tail);
            sum[r] = sum[r] + e.keep_first(tail);
        }
    }
    let inv: [f32; R] = std::array::from_fn(|r| 1.0 / sum[r].reduce_sum());
    for (r, &inv) in inv.iter().enumerate() {
        let row = &mut rows[r * t..(r + 1) * t];
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
    let mut groups = ds
        .chunks_exact_mut(SOFTMAX_ROWS * t)
        .zip(p.chunks_exact(SOFTMAX_ROWS * t));
    for (dg, pg) in groups.by_ref() {
        softmax_backward_group::<V, SOFTMAX_ROWS>(dg, pg, t, scale);
    }
    let done = ds.len() / (SOFTMAX_ROWS * t) * SOFTMAX_ROWS * t;
    for (dr, pr) in ds[done..].chunks_exact_mut(t).zip(p[done..].chunks_exact(t)) {
        softmax_backward_group::<V, 1>(dr, pr, t, scale);
    }
}

/// `softmax_backward` on R rows at once, each with the operations in the order one row alone
/// takes.
#[inline(always)]
fn softmax_backward_group<V: Lanes, const R: usize>(dr: &mut [f32], pr: &[f32], t: usize, scale: f32) {
    let (whole, tail) = (t / LANES * LANES, t % LANES);
    let mut dot: [V; R] = std::array::from_fn(|r| {
        let at = r * t + whole;
        V::load_first(&dr[at..], tail) * V::load_first(&pr[at..], tail)
    });
    for c in (0..whole).step_by(LANES) {
        for (r, d) in dot.iter_mut().enumerate() {
            *d = V::load(&dr[r * t + c..]).mul_add(V::load(&pr[r * t + c..]), *d);
        }
    }
    let dot: [V; R] = std::array::from_fn(|r| V::splat(dot[r].reduce_sum()));
    for (r, &dot) in dot.iter().enumerate() {
        let (d, p) = (&mut dr[r * t..(r + 1) * t], &pr[r * t..(r + 1) * t]);
        for c in (0..whole).step_by(LANES) {
            let v = (V::load(&p[c..]) * (V::load(&d[c..]) - dot)).scale(scale);
            v.store(&mut d[c..]);
        }
        if tail > 0 {
            let v = (V::load_first(&p[whole..], tail) * (V::load_first(&d[whole..], tail) - dot)).scale(scale);
            v.store_first(&mut d[whole..], tail);
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

    /// Rows of 1 to 197 (whole vectors, masked tails), 11 of them (a group of SOFTMAX_ROWS and
    /// rows alone): each row sums to 1 and matches the f64 softmax; backward matches its
    /// formula; the dispatched versions equal the portable ones, and the rows of a group the
    /// same rows taken alone, bit for bit.
    #[test]
    fn softmax_rows_match_the_formula_in_both_versions() {
        use crate::kernels::lanes::Portable;
        const ROWS: usize = SOFTMAX_ROWS + 3;
        for t in [1, 2, 15, 16, 17, 50, 64, 197] {
            let scores: Vec<f32> = (0..ROWS * t).map(|i| ((i * 37 % 101) as f32 / 7.0) - 6.0).collect();
            let (mut got, mut portable, mut alone) = (scores.clone(), scores.clone(), scores.clone());
            softmax_rows(&mut got, t, 0.25);
            softmax::<Portable>(&mut portable, t, 0.25);
            alone
                .chunks_mut(t)
                .for_each(|row| softmax_group::<Portable, 1>(row, t, 0.25));
            assert_eq!(got, portable, "t {t}: forward");
            assert_eq!(got, alone, "t {t}: forward, rows in a group");
            for (row, srow) in got.chunks(t).zip(scores.chunks(t)) {
                let max = srow.iter().map(|&v| v as f64 * 0.25).fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = srow.iter().map(|&v| (v as f64 * 0.25 - max).exp()).sum();
                for (p, &v) in row.iter().zip(srow) {
                    let want = (v as f64 * 0.25 - max).exp() / z;
                    assert!((*p as f64 - want).abs() < 1e-6, "t {t}: {p} vs {want}");
                }
            }
            let dp: Vec<f32> = (0..ROWS * t).map(|i| ((i * 53 % 89) as f32 / 40.0) - 1.1).collect();
            let (mut ds, mut ds_portable, mut ds_alone) = (dp.clone(), dp.clone(), dp.clone());
            softmax_backward_rows(&mut ds, &got, t, 0.25);
            softmax_backward::<Portable>(&mut ds_portable, &got, t, 0.25);
            ds_alone
                .chunks_mut(t)
                .zip(got.chunks(t))
                .for_each(|(d, p)| softmax_backward_group::<Portable, 1>(d, p, t, 0.25));
            assert_eq!(ds, ds_portable, "t {t}: backward");
            assert_eq!(ds, ds_alone, "t {t}: backward, rows in a group");
            for ((d, g), p) in ds.chunks(t).zip(dp.chunks(t)).zip(got.chunks(t)) {
                let dot: f64 = g.iter().zip(p).map(|(&a, &b)| a as f64 * b as f64).sum();
                for j in 0..t {
                    let want = 0.25 * p[j] as f64 * (g[j] as f64 - dot);
                    assert!((d[j] as f64 - want).abs() < 1e-6, "t {t}: dS {} vs {want}", d[j]);
                }
            }
        }
    }

    /// A head's rows transposed (16x16 squares and the rest) and packed, on both lane types,
    /// for head widths with and without whole squares and token counts with partial ones.
    #[test]
    fn heads_transpose_and_pack_exactly() {
        use crate::kernels::lanes::Portable;
        for (t, hd) in [(50, 16), (50, 32), (33, 20), (7, 5), (16, 48)] {
            let ld = 3 * hd + 7;
            let x: Vec<f32> = (0..t * ld).map(|i| i as f32).collect();
            let want: Vec<f32> = (0..hd * t).map(|i| x[(i % t) * ld + i / t]).collect();
            let (mut kt, mut kt_portable) = (vec![f32::NAN; hd * t], vec![f32::NAN; hd * t]);
            transpose_head(&x, ld, t, hd, &mut kt);
            transpose_head_lanes::<Portable>(&x, ld, t, hd, &mut kt_portable);
            assert_eq!((&kt, &kt_portable), (&want, &want), "transpose {t} x {hd}");
            let mut rows = vec![f32::NAN; t * hd];
            let packed = pack_head(&x, ld, t, hd, &mut rows);
            let want: Vec<f32> = (0..t * hd).map(|i| x[(i / hd) * ld + i % hd]).collect();
            assert_eq!(packed, &want[..], "pack {t} x {hd}");
        }
    }

    /// A small odd shape, and the model's (50 tokens, heads of 16 and 32: whole transposed
    /// squares, groups of softmax rows).
    #[test]
    fn forward_matches_the_formula() {
        for (batch, tokens, heads, head_dim) in [(3, 7, 2, 5), (2, 50, 2, 16), (2, 50, 2, 32)] {
            let s = AttentionShape {
                batch,
                tokens,
                heads,
                head_dim,
            };
            let qkv: Vec<f32> = (0..s.batch * s.tokens * 3 * s.dim())
                .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
                .collect();
            let mut out = vec![0.0; s.batch * s.tokens * s.dim()];
            let mut probs = vec![0.0; s.probs_len()];
            let mut scratch = vec![f32::NAN; attention_scratch_len(s)];
            attention_forward(&qkv, &mut out, &mut probs, &mut scratch, s);
            for (a, b) in out.iter().zip(reference(&qkv, s)) {
                assert!((*a as f64 - b).abs() < 1e-5, "{s:?}: {a} vs {b}");
            }
            for row in probs.chunks(s.tokens) {
                assert!((row.iter().map(|&v| v as f64).sum::<f64>() - 1.0).abs() < 1e-6);
            }
        }
    }
}
