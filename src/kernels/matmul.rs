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
    assert!(c.len() >= m * n, "matmul: C has {} values, needs {}", c.len(), m * n);
    assert!(a.len() >= m * k, "matmul: A has {} values, needs {}", a.len(), m * k);
    assert!(b.len() >= k * n, "matmul: B has {} values, needs {}", b.len(), k * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    // (column stride, row stride) of each operand as gemm wants them.
    let (a_cs, a_rs) = match op_a {
        Op::N => (1, k as isize),
        Op::T => (m as isize, 1),
    };
    let (b_cs, b_rs) = match op_b {
        Op::N => (1, n as isize),
        Op::T => (k as isize, 1),
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
            n as isize,
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
}
