//! The channel sum of one transformed position ξ, M_ξ = V_ξ · U_ξ, for the few to a hundred
//! channels of a convolution: the gemm crate puts the output channels in its 16-lane vectors
//! and rounds them up to a multiple of 16 (22 channels ran as 32), and packs V_ξ on every call
//! although each of its values is used only OC/16 times. Here V_ξ is read in place and the
//! last few output channels run on one masked vector:
//!
//!   M[i][o] = Σ_k V[i][k] · U[k][o]
//!
//! R rows of M × up to 4 vectors (+ a tail) of output channels stay in registers while k runs;
//! each step broadcasts V[i][k] into the row's multiply-adds with U's row k. Past ~24 KB of U
//! the sum runs in chunks of k (128x128: 0.73x -> 0.91x of gemm; still behind, so conv2d
//! keeps gemm there).

use crate::kernels::lanes::{lanes_entry, Lanes, LANES};

/// Output channels per column group: 4 vectors (a tail rides along with the last group).
const GROUP_VECTORS: usize = 4;

/// Values of U per pass over the rows: the sum over k runs in chunks whose rows of U stay in
/// L1 (about 24 KB), M reloaded between them (the same multiply-add chain: M is f32 either
/// way).
const CHUNK_VALUES: usize = 6 << 10;

lanes_entry! {
    /// M [rows, oc] (rows `ldm` apart) = V [rows, c] (rows `ldv` apart) · U [c, oc] (rows
    /// contiguous), overwriting M's first oc values of each row.
    pub fn winograd_product(m: &mut [f32], ldm: usize, v: &[f32], ldv: usize, u: &[f32], rows: usize, c: usize, oc: usize) => product
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn product<V: Lanes>(m: &mut [f32], ldm: usize, v: &[f32], ldv: usize, u: &[f32], rows: usize, c: usize, oc: usize) {
    let span = |rows: usize, len: usize, ld: usize| if rows == 0 { 0 } else { (rows - 1) * ld + len };
    assert!(
        ldm >= oc && ldv >= c && m.len() >= span(rows, oc, ldm) && v.len() >= span(rows, c, ldv) && u.len() >= c * oc,
        "winograd_product: operands shorter than {rows} x {c} x {oc}"
    );
    if rows == 0 || oc == 0 {
        return;
    }
    let chunk = (CHUNK_VALUES / oc).max(LANES);
    for k0 in (0..c).step_by(chunk) {
        let kc = chunk.min(c - k0);
        columns::<V>(m, ldm, v, ldv, u, rows, (k0, kc), oc);
    }
}

/// `product` over k0 .. k0 + kc: M = V·U for the first chunk, M += V·U after.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn columns<V: Lanes>(
    m: &mut [f32],
    ldm: usize,
    v: &[f32],
    ldv: usize,
    u: &[f32],
    rows: usize,
    (k0, kc): (usize, usize),
    oc: usize,
) {
    let mut j = 0;
    while j < oc {
        let left = oc - j;
        let (full, tail) = if left / LANES > GROUP_VECTORS {
            (GROUP_VECTORS, 0)
        } else {
            (left / LANES, left % LANES)
        };
        let g = Group {
            ldm,
            v,
            ldv,
            u,
            k0,
            kc,
            oc,
            j,
            tail,
        };
        // Rows per block: about 24 accumulators (of 32 registers) at any width. An 8-lane
        // (256-bit) tail for ≤ 8 channels was 5-10% slower than the masked 16-lane one on this
        // host (Intel Xeon with AVX-512: both widths run 2 multiply-adds a cycle).
        match (full, tail > 0) {
            (0, false) => unreachable!("a column group has channels"),
            (0, true) => g.run::<V, 12, 0, true>(m, rows),
            (1, false) => g.run::<V, 12, 1, false>(m, rows),
            (1, true) => g.run::<V, 12, 1, true>(m, rows),
            (2, false) => g.run::<V, 12, 2, false>(m, rows),
            (2, true) => g.run::<V, 8, 2, true>(m, rows),
            (3, false) => g.run::<V, 8, 3, false>(m, rows),
            (3, true) => g.run::<V, 6, 3, true>(m, rows),
            (4, false) => g.run::<V, 6, 4, false>(m, rows),
            (4, true) => g.run::<V, 4, 4, true>(m, rows),
            _ => unreachable!("at most {GROUP_VECTORS} whole vectors per group"),
        }
        j += full * LANES + tail;
    }
}

/// One column group: output channels j .. j + B·LANES + tail.
struct Group<'a> {
    ldm: usize,
    v: &'a [f32],
    ldv: usize,
    u: &'a [f32],
    /// The chunk of the sum: k0 .. k0 + kc.
    k0: usize,
    kc: usize,
    oc: usize,
    j: usize,
    tail: usize,
}

impl Group<'_> {
    /// All rows: blocks of R, then the rest one at a time.
    #[inline(always)]
    fn run<V: Lanes, const R: usize, const B: usize, const TAIL: bool>(&self, m: &mut [f32], rows: usize) {
        let whole = rows / R * R;
        for i in (0..whole).step_by(R) {
            self.block::<V, R, B, TAIL>(m, i);
        }
        for i in whole..rows {
            self.block::<V, 1, B, TAIL>(m, i);
        }
    }

    /// Rows i .. i + R of this group.
    #[inline(always)]
    fn block<V: Lanes, const R: usize, const B: usize, const TAIL: bool>(&self, m: &mut [f32], i: usize) {
        let (k0, kc, j, tail) = (self.k0, self.kc, self.j, self.tail);
        let x: [&[f32]; R] = std::array::from_fn(|r| &self.v[(i + r) * self.ldv + k0..][..kc]);
        let (mut acc, mut acc_tail) = ([[V::zero(); B]; R], [V::zero(); R]);
        if k0 > 0 {
            for r in 0..R {
                let out = &m[(i + r) * self.ldm + j..];
                for b in 0..B {
                    acc[r][b] = V::load(&out[b * LANES..]);
                }
                if TAIL {
                    acc_tail[r] = V::load_first(&out[B * LANES..], tail);
                }
            }
        }
        for (k, u_row) in self.u[k0 * self.oc..(k0 + kc) * self.oc]
            .chunks_exact(self.oc)
            .enumerate()
        {
            let u_row = &u_row[j..];
            let w: [V; B] = std::array::from_fn(|b| V::load(&u_row[b * LANES..]));
            let w_tail = if TAIL {
                V::load_first(&u_row[B * LANES..], tail)
            } else {
                V::zero()
            };
            for r in 0..R {
                let s = V::splat(x[r][k]);
                for b in 0..B {
                    acc[r][b] = s.mul_add(w[b], acc[r][b]);
                }
                if TAIL {
                    acc_tail[r] = s.mul_add(w_tail, acc_tail[r]);
                }
            }
        }
        for r in 0..R {
            let out = &mut m[(i + r) * self.ldm + j..];
            for b in 0..B {
                acc[r][b].store(&mut out[b * LANES..]);
            }
            if TAIL {
                acc_tail[r].store_first(&mut out[B * LANES..], tail);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::lanes::Portable;

    /// Every column-group shape (tails of 0 and 1..15 channels, 1-5 vectors, more than
    /// one group) against the f64 sum, strided rows, a row count that leaves a remainder; the
    /// dispatched version equals the portable one bit for bit.
    #[test]
    fn product_matches_the_definition_at_every_width() {
        for oc in [1, 5, 8, 9, 16, 22, 32, 40, 47, 64, 72, 93, 128, 150] {
            for c in [1, 3, 21, 40, 300] {
                let rows = 29;
                let (ldv, ldm) = (c + 3, oc + 5);
                let v: Vec<f32> = (0..rows * ldv).map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0).collect();
                let u: Vec<f32> = (0..c * oc).map(|i| ((i * 53) % 89) as f32 / 40.0 - 1.1).collect();
                let mut got = vec![7.0f32; rows * ldm];
                winograd_product(&mut got, ldm, &v, ldv, &u, rows, c, oc);
                let mut portable = vec![7.0f32; rows * ldm];
                product::<Portable>(&mut portable, ldm, &v, ldv, &u, rows, c, oc);
                assert_eq!(got, portable, "oc {oc} c {c}: dispatched against portable");
                for i in 0..rows {
                    for o in 0..ldm {
                        let g = got[i * ldm + o];
                        if o >= oc {
                            assert_eq!(g, 7.0, "oc {oc} c {c}: wrote past the row at ({i}, {o})");
                            continue;
                        }
                        let want: f64 = (0..c).map(|k| v[i * ldv + k] as f64 * u[k * oc + o] as f64).sum();
                        assert!(
                            (g as f64 - want).abs() < 1e-4,
                            "oc {oc} c {c} ({i}, {o}): {g} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
