//! Matrix products through the `gemm` crate, behind one safe, bounds-checked call.

use std::cell::Cell;

use gemm::Parallelism;

thread_local! {
    static IN_GEMM: Cell<bool> = const { Cell::new(false) };
}

/// True while this thread is inside a gemm call. gemm allocates its packing buffers on every
/// call (its API takes no workspace); this lets an allocation counter tell those from normlab's.
pub fn inside_gemm() -> bool {
    IN_GEMM.with(|f| f.get())
}

/// How a row-major operand is read: as stored, or transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    N,
    T,
}

/// C[m,n] (+)= op(A)[m,k] · op(B)[k,n], all row-major; `accumulate` adds to C instead of overwriting.
/// With `threads > 1` gemm splits the output, never the k sum, so results do not depend on it.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    c: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    op_a: Op,
    b: &[f32],
    op_b: Op,
    accumulate: bool,
    threads: usize,
) {
    let lda = if op_a == Op::N { k } else { m };
    let ldb = if op_b == Op::N { n } else { k };
    matmul_strided(c, n, m, n, k, (a, lda, op_a), (b, ldb, op_b), accumulate, threads);
}

/// A row-major operand of `matmul_strided`: its values, the distance between its stored rows
/// (at least its stored row length), and how it is read.
pub type Operand<'a> = (&'a [f32], usize, Op);

/// `matmul` on sub-matrices whose rows lie `ldc`, `lda`, `ldb` values apart (Winograd's
/// transformed positions interleaved in one buffer).
#[allow(clippy::too_many_arguments)]
pub fn matmul_strided(
    c: &mut [f32],
    ldc: usize,
    m: usize,
    n: usize,
    k: usize,
    (a, lda, op_a): Operand,
    (b, ldb, op_b): Operand,
    accumulate: bool,
    threads: usize,
) {
    // The stored shape of each operand: rows × row length.
    let (a_rows, a_len) = if op_a == Op::N { (m, k) } else { (k, m) };
    let (b_rows, b_len) = if op_b == Op::N { (k, n) } else { (n, k) };
    let span = |rows: usize, len: usize, ld: usize| {
        if rows == 0 || len == 0 {
            0
        } else {
            (rows - 1) * ld + len
        }
    };
    assert!(
        ldc >= n && lda >= a_len && ldb >= b_len,
        "matmul: a row stride is shorter than its row"
    );
    assert!(
        c.len() >= span(m, n, ldc),
        "matmul: C has {} values, needs {}",
        c.len(),
        span(m, n, ldc)
    );
    assert!(
        a.len() >= span(a_rows, a_len, lda),
        "matmul: A has {} values, needs {}",
        a.len(),
        span(a_rows, a_len, lda)
    );
    assert!(
        b.len() >= span(b_rows, b_len, ldb),
        "matmul: B has {} values, needs {}",
        b.len(),
        span(b_rows, b_len, ldb)
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.chunks_mut(ldc).take(m).for_each(|row| row[..n].fill(0.0));
        }
        return;
    }
    // (column stride, row stride) of each operand as gemm wants them.
    let (a_cs, a_rs) = match op_a {
        Op::N => (1, lda as isize),
        Op::T => (lda as isize, 1),
    };
    let (b_cs, b_rs) = match op_b {
        Op::N => (1, ldb as isize),
        Op::T => (ldb as isize, 1),
    };
    let parallelism = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    IN_GEMM.with(|f| f.set(true));
    // SAFETY: the asserts above guarantee every index gemm touches lies inside the slices,
    // and `c` is borrowed mutably, so it cannot alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
    IN_GEMM.with(|f| f.set(false));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: &[f32], ta: Op, b: &[f32], tb: Op) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0;
                for p in 0..k {
                    let av = if ta == Op::N { a[i * k + p] } else { a[p * m + i] };
                    let bv = if tb == Op::N { b[p * n + j] } else { b[j * k + p] };
                    s += av * bv;
                }
                c[i * n + j] = s;
            }
        }
        c
    }

    #[test]
    fn all_transpose_combinations_match_naive() {
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.91).cos()).collect();
        for ta in [Op::N, Op::T] {
            for tb in [Op::N, Op::T] {
                let mut c = vec![1.0; m * n];
                matmul(&mut c, m, n, k, &a, ta, &b, tb, true, 1);
                let want = naive(m, n, k, &a, ta, &b, tb);
                for (x, y) in c.iter().zip(&want) {
                    assert!((x - (y + 1.0)).abs() < 1e-5);
                }
            }
        }
    }

    /// Operands inside wider rows (strides past their row length) give the dense result,
    /// and C's values between its rows stay untouched.
    #[test]
    fn strided_operands_match_dense_ones() {
        let (m, n, k) = (4, 6, 5);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.91).cos()).collect();
        let widen = |v: &[f32], len: usize, ld: usize| -> Vec<f32> {
            v.chunks(len)
                .flat_map(|row| row.iter().copied().chain(std::iter::repeat_n(f32::NAN, ld - len)))
                .collect()
        };
        for ta in [Op::N, Op::T] {
            for tb in [Op::N, Op::T] {
                let (la, lb) = (if ta == Op::N { k } else { m }, if tb == Op::N { n } else { k });
                let (aw, bw) = (widen(&a, la, la + 3), widen(&b, lb, lb + 2));
                let mut c = vec![7.0f32; m * (n + 4)];
                matmul_strided(&mut c, n + 4, m, n, k, (&aw, la + 3, ta), (&bw, lb + 2, tb), false, 1);
                let want = naive(m, n, k, &a, ta, &b, tb);
                for (i, row) in c.chunks(n + 4).enumerate() {
                    for j in 0..n {
                        assert!((row[j] - want[i * n + j]).abs() < 1e-5);
                    }
                    assert!(row[n..].iter().all(|&v| v == 7.0));
                }
            }
        }
    }
}
