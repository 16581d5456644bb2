//! A product of small operands with the values in registers, M = op(A) · U, for the few to a
//! hundred columns of Winograd's channel sums (M_ξ = V_ξ · U_ξ) and of attention's heads
//! (S = Q Kᵀ, O = P V and their gradients, T ≈ 50 tokens, 16-32 values per head). The gemm
//! crate puts the output columns in its 16-lane vectors and rounds them up to a multiple of 16
//! (22 channels ran as 32), packs A on every call although each of its values is used only
//! OC/16 times, and costs microseconds per call (attention makes six per sample and head).
//! Here A is read in place, as stored or transposed, and the last few output columns run on
//! one masked vector (where AVX-512 runs at half rate, on 8-lane vectors when that wastes
//! fewer lanes: 19 columns as 24 rather than 32):
//!
//!   M[i][o] = Σ_k A[i][k] · U[k][o]
//!
//! R rows of M × up to 4 vectors (+ a tail) of output columns stay in registers while k runs;
//! each step broadcasts A[i][k] into the row's multiply-adds with U's row k. Past ~24 KB of U
//! the sum runs in chunks of k (Winograd 128x128: 0.73x -> 0.91x of gemm; still behind, so
//! conv2d keeps gemm there).

use crate::kernels::conv_direct::vectors_run_at_half_rate;
use crate::kernels::lanes::{lanes_entry, Lanes, Vector, HALF_LANES, LANES};
use crate::kernels::matmul::{Op, Operand};

/// Output channels per column group: 4 vectors (a tail rides along with the last group).
const GROUP_VECTORS: usize = 4;

/// Values of U per pass over the rows: the sum over k runs in chunks whose rows of U stay in
/// L1 (about 24 KB), M reloaded between them (the same multiply-add chain: M is f32 either
/// way).
const CHUNK_VALUES: usize = 6 << 10;

lanes_entry! {
    /// M [rows, oc] (rows `ldm` apart) = op(A) [rows, c] · U [c, oc] (rows contiguous),
    /// overwriting M's first oc values of each row. A is (values, row stride, Op) as in
    /// `matmul_strided`: Op::T reads A stored as [c, rows]. U is contiguous so that its rows
    /// come as slices of one known length (strided rows kept bounds checks in the loop:
    /// Winograd 93 -> 40 channels 1.3x -> 1.13x of gemm); callers pack strided operands.
    pub fn register_product(m: &mut [f32], ldm: usize, a: Operand, u: &[f32], rows: usize, c: usize, oc: usize) => product
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn product<V: Lanes>(m: &mut [f32], ldm: usize, a: Operand, u: &[f32], rows: usize, c: usize, oc: usize) {
    product_tails::<V>(m, ldm, a, u, rows, c, oc, vectors_run_at_half_rate())
}

/// `product`, on `Lanes::Half` vectors where `half_tails` (AVX-512 at half rate) and they
/// waste fewer lanes (the same sums either way).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn product_tails<V: Lanes>(
    m: &mut [f32],
    ldm: usize,
    a: Operand,
    u: &[f32],
    rows: usize,
    c: usize,
    oc: usize,
    half_tails: bool,
) {
    let span = |rows: usize, len: usize, ld: usize| {
        if rows == 0 || len == 0 {
            0
        } else {
            (rows - 1) * ld + len
        }
    };
    let (av, lda, op) = a;
    let (a_rows, a_len) = if op == Op::N { (rows, c) } else { (c, rows) };
    assert!(
        ldm >= oc
            && lda >= a_len
            && m.len() >= span(rows, oc, ldm)
            && av.len() >= span(a_rows, a_len, lda)
            && u.len() >= c * oc,
        "register_product: operands shorter than {rows} x {c} x {oc}"
    );
    if rows == 0 || oc == 0 {
        return;
    }
    if c == 0 {
        m.chunks_mut(ldm).take(rows).for_each(|r| r[..oc].fill(0.0));
        return;
    }
    let chunk = (CHUNK_VALUES / oc).max(LANES);
    // Half vectors where 16-lane ones would leave more than half of the last vector empty and
    // the columns still make one group of 8-lane vectors (more groups read A once more each).
    // One thread, the 36 positions of 392 tiles, AMD host (ymm multiply-adds at twice the zmm
    // rate), min of 40 alternating rounds, ms, 16-lane / 8-lane: 17->19 0.166 / 0.141, 43->37
    // 0.564 / 0.506, 64->24 0.534 / 0.416, 16->8 0.101 / 0.090, 32->22 0.312 / 0.297; but
    // 37->82 (three 8-lane groups) 1.065 / 1.201.
    let half = half_tails && (1..=HALF_LANES).contains(&(oc % LANES)) && oc < (GROUP_VECTORS + 1) * HALF_LANES;
    for k0 in (0..c).step_by(chunk) {
        let kc = chunk.min(c - k0);
        let a = (av, lda);
        match (op, half) {
            (Op::N, false) => columns::<V, false>(m, ldm, a, u, rows, (k0, kc), oc),
            (Op::T, false) => columns::<V, true>(m, ldm, a, u, rows, (k0, kc), oc),
            (Op::N, true) => columns::<V::Half, false>(m, ldm, a, u, rows, (k0, kc), oc),
            (Op::T, true) => columns::<V::Half, true>(m, ldm, a, u, rows, (k0, kc), oc),
        }
    }
}

/// `product` over k0 .. k0 + kc: M = A·U for the first chunk, M += A·U after; `AT`: A stored
/// transposed. V: the vectors of any width.
#[inline(always)]
fn columns<V: Vector, const AT: bool>(
    m: &mut [f32],
    ldm: usize,
    (a, lda): (&[f32], usize),
    u: &[f32],
    rows: usize,
    (k0, kc): (usize, usize),
    oc: usize,
) {
    let mut j = 0;
    while j < oc {
        let left = oc - j;
        let (full, tail) = if left / V::WIDTH > GROUP_VECTORS {
            (GROUP_VECTORS, 0)
        } else {
            (left / V::WIDTH, left % V::WIDTH)
        };
        let g = Group {
            ldm,
            a,
            lda,
            u,
            k0,
            oc,
            kc,
            j,
            tail,
        };
        // Rows per block: about 24 accumulators (of 32 registers) at any width. An 8-lane
        // (256-bit) tail for ≤ 8 channels was 5-10% slower than the masked 16-lane one on the
        // Intel host (AVX-512 there runs 2 multiply-adds a cycle at either width).
        match (full, tail > 0) {
            (0, false) => unreachable!("a column group has channels"),
            (0, true) => g.run::<V, AT, 12, 0, true>(m, rows),
            (1, false) => g.run::<V, AT, 12, 1, false>(m, rows),
            (1, true) => g.run::<V, AT, 12, 1, true>(m, rows),
            (2, false) => g.run::<V, AT, 12, 2, false>(m, rows),
            (2, true) => g.run::<V, AT, 8, 2, true>(m, rows),
            (3, false) => g.run::<V, AT, 8, 3, false>(m, rows),
            (3, true) => g.run::<V, AT, 6, 3, true>(m, rows),
            (4, false) => g.run::<V, AT, 6, 4, false>(m, rows),
            (4, true) => g.run::<V, AT, 4, 4, true>(m, rows),
            _ => unreachable!("at most {GROUP_VECTORS} whole vectors per group"),
        }
        j += full * V::WIDTH + tail;
    }
}

/// One column group: output columns j .. j + B·WIDTH + tail.
struct Group<'a> {
    ldm: usize,
    a: &'a [f32],
    lda: usize,
    u: &'a [f32],
    /// The chunk of the sum: k0 .. k0 + kc.
    k0: usize,
    kc: usize,
    oc: usize,
    j: usize,
    tail: usize,
}

impl Group<'_> {
    /// All rows: blocks of R, then the rest in blocks of 4, 2 and 1. One row at a time made
    /// each vector of M one chain of dependent multiply-adds, waiting out their latency: a
    /// lone sample's Winograd has 4 to 28 tiles (rows) per call, and 14x14 32->32 at batch 1
    /// spent more on its 4 left-over rows than on the block of 12.
    #[inline(always)]
    fn run<V: Vector, const AT: bool, const R: usize, const B: usize, const TAIL: bool>(
        &self,
        m: &mut [f32],
        rows: usize,
    ) {
        let mut i = 0;
        while i + R <= rows {
            self.block::<V, AT, R, B, TAIL>(m, i);
            i += R;
        }
        if R > 4 {
            while i + 4 <= rows {
                self.block::<V, AT, 4, B, TAIL>(m, i);
                i += 4;
            }
        }
        if R > 2 {
            while i + 2 <= rows {
                self.block::<V, AT, 2, B, TAIL>(m, i);
                i += 2;
            }
        }
        while i < rows {
            self.block::<V, AT, 1, B, TAIL>(m, i);
            i += 1;
        }
    }

    /// Rows i .. i + R of this group.
    #[inline(always)]
    fn block<V: Vector, const AT: bool, const R: usize, const B: usize, const TAIL: bool>(
        &self,
        m: &mut [f32],
        i: usize,
    ) {
        let (k0, kc, j, tail) = (self.k0, self.kc, self.j, self.tail);
        // Rows of A as stored (AT: its columns, one slice of R values per k).
        let x: [&[f32]; R] = std::array::from_fn(|r| {
            if AT {
                &[][..]
            } else {
                &self.a[(i + r) * self.lda + k0..][..kc]
            }
        });
        let (mut acc, mut acc_tail) = ([[V::zero(); B]; R], [V::zero(); R]);
        if k0 > 0 {
            for r in 0..R {
                let out = &m[(i + r) * self.ldm + j..];
                for b in 0..B {
                    acc[r][b] = V::load(&out[b * V::WIDTH..]);
                }
                if TAIL {
                    acc_tail[r] = V::load_first(&out[B * V::WIDTH..], tail);
                }
            }
        }
        // U's rows cut to this group's columns, each of a length known to cover the loads
        // (iterating `chunks(ldu)`, of a variable last length, kept the bounds checks in the
        // loop: Winograd 21 -> 22 channels 1.67x -> 1.45x of gemm).
        for (k, u_row) in self.u[k0 * self.oc..(k0 + kc) * self.oc]
            .chunks_exact(self.oc)
            .enumerate()
        {
            let u_row = &u_row[j..];
            let xt: &[f32] = if AT {
                &self.a[(k0 + k) * self.lda + i..][..R]
            } else {
                &[]
            };
            let w: [V; B] = std::array::from_fn(|b| V::load(&u_row[b * V::WIDTH..]));
            let w_tail = if TAIL {
                V::load_first(&u_row[B * V::WIDTH..], tail)
            } else {
                V::zero()
            };
            for r in 0..R {
                let s = V::splat(if AT { xt[r] } else { x[r][k] });
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
                acc[r][b].store(&mut out[b * V::WIDTH..]);
            }
            if TAIL {
                acc_tail[r].store_first(&mut out[B * V::WIDTH..], tail);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::lanes::Portable;

    #[inline(always)]
    fn product_half<V: Lanes>(m: &mut [f32], ldm: usize, a: Operand, u: &[f32], rows: usize, c: usize, oc: usize) {
        product_tails::<V>(m, ldm, a, u, rows, c, oc, true)
    }

    lanes_entry! {
        /// `register_product` with its tails of at most HALF_LANES columns on `Lanes::Half`
        /// whatever the CPU.
        pub fn register_product_half_tails(m: &mut [f32], ldm: usize, a: Operand, u: &[f32], rows: usize, c: usize, oc: usize) => product_half
    }

    /// Every column-group shape (tails of 0 and 1..15 columns, 1-5 vectors, more than one
    /// group), A as stored and transposed, strided rows of A and M, a row count that leaves
    /// a remainder, against the f64 sum; the dispatched version equals the portable one bit for
    /// bit, and so do the versions with tails of at most HALF_LANES columns on half vectors.
    #[test]
    fn product_matches_the_definition_at_every_width() {
        for oc in [1, 5, 8, 9, 16, 19, 22, 32, 40, 47, 64, 72, 82, 93, 128, 150] {
            for c in [1, 3, 21, 40, 300] {
                for op in [Op::N, Op::T] {
                    let rows = 29;
                    let (lda, ldm, ldu) = if op == Op::N {
                        (c + 3, oc + 5, oc)
                    } else {
                        (rows + 2, oc, oc + 7)
                    };
                    let a_rows = if op == Op::N { rows } else { c };
                    let a: Vec<f32> = (0..a_rows * lda)
                        .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
                        .collect();
                    let u: Vec<f32> = (0..(c - 1) * ldu + oc)
                        .map(|i| ((i * 53) % 89) as f32 / 40.0 - 1.1)
                        .collect();
                    let mut got = vec![7.0f32; rows * ldm];
                    register_product(&mut got, ldm, (&a, lda, op), &u, rows, c, oc);
                    let mut portable = vec![7.0f32; rows * ldm];
                    product::<Portable>(&mut portable, ldm, (&a, lda, op), &u, rows, c, oc);
                    assert_eq!(got, portable, "oc {oc} c {c} {op:?}: dispatched against portable");
                    for half_tails in [false, true] {
                        let mut other = vec![7.0f32; rows * ldm];
                        let a = (&a[..], lda, op);
                        product_tails::<Portable>(&mut other, ldm, a, &u, rows, c, oc, half_tails);
                        assert_eq!(other, got, "oc {oc} c {c} {op:?}: portable, half tails {half_tails}");
                    }
                    let mut half = vec![7.0f32; rows * ldm];
                    register_product_half_tails(&mut half, ldm, (&a, lda, op), &u, rows, c, oc);
                    assert_eq!(half, got, "oc {oc} c {c} {op:?}: dispatched with half tails");
                    let at = |i: usize, k: usize| if op == Op::N { a[i * lda + k] } else { a[k * lda + i] };
                    for i in 0..rows {
                        for o in 0..ldm {
                            let g = got[i * ldm + o];
                            if o >= oc {
                                assert_eq!(g, 7.0, "oc {oc} c {c}: wrote past the row at ({i}, {o})");
                                continue;
                            }
                            let want: f64 = (0..c).map(|k| at(i, k) as f64 * u[k * oc + o] as f64).sum();
                            assert!(
                                (g as f64 - want).abs() < 1e-4,
                                "oc {oc} c {c} {op:?} ({i}, {o}): {g} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
