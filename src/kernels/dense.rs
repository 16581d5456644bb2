//! A dense layer's products over blocks of rows, each block's work done while its rows sit in
//! the core's L2: the forward's bias added right after the block's product, and the backward's
//! three uses of dy (dW, db, dx) from one read of it. Over the whole batch as three gemm calls
//! and two passes, the rows ([N·T, D] tokens of a ViT: 6-25 MB) streamed from memory five
//! times; a vit:64 step spent 52 ms in its Linear layers here against 35 ms in PyTorch's.
//!
//! Every sum has a fixed order whatever the thread count: dW and db are summed per span of
//! rows (the spans depend on the row count only), then the spans in order.

use rayon::prelude::*;

use crate::kernels::gelu;
use crate::kernels::matmul::{matmul, Op};
use crate::kernels::simd::{multiversion, SharedOut};

/// Values of x and y per block of rows: the backward's blocks (x, dy and dx: 256 KB) stay in
/// L2; the forward's are larger, since each block's gemm packs all of W again (512 -> 128 at
/// 6400 rows, alternating runs: 64K values 3.6 ms, 256K 2.9 ms; backward 64K 5.4 ms, 256K 5.8;
/// vit:128 training, alternating builds: backward 32K 463-470, 64K 467-479, 160K 439-450
/// images/s).
const BLOCK_VALUES: usize = 64 << 10;
const FORWARD_BLOCK_VALUES: usize = 256 << 10;

/// The most spans of rows the backward sums dW over separately (each a partial dW).
const SPANS: usize = 8;

/// The most weights for which the backward keeps per-span partials (SPANS × 512 KB).
pub const DENSE_MAX_WEIGHTS: usize = 128 << 10;

/// Rows per block of `values` for a layer of `inputs` -> `outputs`.
fn block_rows(values: usize, inputs: usize, outputs: usize) -> usize {
    (values / (inputs + outputs).max(1)).clamp(16, 1024)
}

/// `rows` in blocks of about `block` rows, their count a multiple of 4 and all of one size but
/// the last (shorter), so that they share out evenly on 1, 2 or 4 threads: 13 blocks of 512 on
/// 2 threads left one idle for a twelfth of vit:128's qkv forward (6400 rows, 128 -> 384). From
/// the row count alone: gemm's order of summation depends on the block's rows, and the output
/// must not depend on the thread count.
fn balanced_block(rows: usize, block: usize) -> usize {
    const SHARES: usize = 4;
    let blocks = rows.div_ceil(block.max(1)).div_ceil(SHARES) * SHARES;
    rows.div_ceil(blocks.max(1)).max(1)
}

/// How the backward splits `rows`: (rows per span, span count, rows per block in a span). At
/// most SPANS spans of equal rows (the last shorter), each in blocks of about `block` rows; from
/// the row count alone, so the sums keep their order at any thread count, and 8 even spans
/// share out evenly on 1, 2, 4 or 8 threads (spans of 7 blocks and one of 1 left a thread of 2
/// idle for a ninth of vit:128's qkv backward).
fn spans(rows: usize, block: usize) -> (usize, usize, usize) {
    let count = rows.div_ceil(block.max(1)).clamp(1, SPANS);
    let span_rows = rows.div_ceil(count).max(1);
    let span_block = span_rows.div_ceil(span_rows.div_ceil(block.max(1)));
    (span_rows, rows.div_ceil(span_rows).max(1), span_block)
}

/// Values of the scratch `dense_backward` needs for `rows` rows of `inputs` -> `outputs`.
pub fn dense_scratch_len(rows: usize, inputs: usize, outputs: usize) -> usize {
    let (_, count, _) = spans(rows, block_rows(BLOCK_VALUES, inputs, outputs));
    count * (inputs * outputs + outputs)
}

/// What `dense_forward` does with each block of y while it is in cache.
pub enum DenseThen<'a> {
    /// Nothing more.
    Nothing,
    /// y += r (a residual connection; r has y's shape).
    AddResidual(&'a [f32]),
    /// g = GELU(y), y replaced by GELU'(y), the slope the backward multiplies by (the MLP's
    /// first layer; g has y's shape).
    GeluKeepingSlope(&'a mut [f32]),
}

// y[n, o] = x[n, i] · Wᵀ + b (then `then`), block by block in parallel.
pub fn dense_forward(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    inputs: usize,
    outputs: usize,
    y: &mut [f32],
    then: DenseThen,
) {
    let rows = x.len() / inputs.max(1);
    assert!(
        x.len() == rows * inputs && y.len() == rows * outputs && w.len() == inputs * outputs,
        "dense_forward: {rows} rows of {inputs} -> {outputs}"
    );
    assert!(bias.is_none_or(|b| b.len() == outputs), "dense_forward: bias");
    let (residual, gelu) = match then {
        DenseThen::Nothing => (None, None),
        DenseThen::AddResidual(r) => (Some(r), None),
        DenseThen::GeluKeepingSlope(g) => (None, Some(g)),
    };
    assert!(residual.is_none_or(|r| r.len() == y.len()), "dense_forward: residual");
    assert!(
        gelu.as_ref().is_none_or(|g| g.len() == y.len()),
        "dense_forward: gelu output"
    );
    let gelu = gelu.map(SharedOut::new);
    let block = balanced_block(rows, block_rows(FORWARD_BLOCK_VALUES, inputs, outputs));
    y.par_chunks_mut(block * outputs)
        .zip(x.par_chunks(block * inputs))
        .enumerate()
        .for_each(|(k, (yb, xb))| {
            let r = xb.len() / inputs;
            matmul(yb, r, outputs, inputs, xb, Op::N, w, Op::T, false, 1);
            let at = k * block * outputs;
            let res = residual.map(|res| &res[at..at + yb.len()]);
            // SAFETY: each block's rows of g are written by this task alone.
            let gb = gelu.as_ref().map(|g| unsafe { g.run(at, yb.len()) });
            forward_epilogue(yb, outputs, bias, res, gb);
        });
}

multiversion! {
    /// y += b, y += r, g = GELU(y) with y ← GELU'(y) (each where given) over a block's rows, one
    /// row at a time through all its steps while it is in L1: as passes over the block,
    /// compiled for the baseline CPU, they were 2.8% of a vit:128 step in `perf`.
    fn forward_epilogue(yb: &mut [f32], outputs: usize, bias: Option<&[f32]>, residual: Option<&[f32]>, gelu: Option<&mut [f32]>) {
        let mut gelu = gelu;
        for (j, row) in yb.chunks_exact_mut(outputs).enumerate() {
            let cols = j * outputs..(j + 1) * outputs;
            if let Some(b) = bias {
                row.iter_mut().zip(b).for_each(|(v, bv)| *v += bv);
            }
            if let Some(r) = residual {
                row.iter_mut().zip(&r[cols.clone()]).for_each(|(v, rv)| *v += rv);
            }
            if let Some(g) = gelu.as_deref_mut() {
                g[cols].iter_mut().zip(row.iter_mut()).for_each(|(o, v)| {
                    let (gelu, slope) = gelu::gelu_and_slope(*v);
                    *o = gelu;
                    *v = slope;
                });
            }
        }
    }
}

// dW += dyᵀ · x, db += Σ_n dy, dx = dy · W: per block, from the block's rows in cache; dW and
// db summed per span of blocks into `scratch`, then the spans in order. With `gelu_slope` s
// (x = GELU(u), s = GELU'(u)), dx is the gradient at u instead: dx = (dy · W) ⊙ s.
#[allow(clippy::too_many_arguments)]
pub fn dense_backward(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    inputs: usize,
    outputs: usize,
    dw: &mut [f32],
    db: Option<&mut [f32]>,
    dx: Option<&mut [f32]>,
    gelu_slope: Option<&[f32]>,
    scratch: &mut [f32],
) {
    let (i, o) = (inputs, outputs);
    let rows = x.len() / i.max(1);
    assert!(
        x.len() == rows * i && dy.len() == rows * o && w.len() == i * o && dw.len() == i * o,
        "dense_backward: {rows} rows of {i} -> {o}"
    );
    assert!(db.as_ref().is_none_or(|b| b.len() == o), "dense_backward: db");
    assert!(dx.as_ref().is_none_or(|d| d.len() == x.len()), "dense_backward: dx");
    assert!(
        gelu_slope.is_none_or(|u| u.len() == x.len()),
        "dense_backward: gelu slope"
    );
    assert_eq!(scratch.len(), dense_scratch_len(rows, i, o), "dense_backward: scratch");
    let (span_rows, _, block) = spans(rows, block_rows(BLOCK_VALUES, i, o));
    let part = i * o + o;
    let dx = dx.map(SharedOut::new);
    scratch
        .par_chunks_mut(part)
        .zip(x.par_chunks(span_rows * i).zip(dy.par_chunks(span_rows * o)))
        .enumerate()
        .for_each(|(s, (partial, (xs, gs)))| {
            let (pw, pb) = partial.split_at_mut(i * o);
            pb.fill(0.0);
            for (k, (xb, gb)) in xs.chunks(block * i).zip(gs.chunks(block * o)).enumerate() {
                let r = xb.len() / i;
                let at = (s * span_rows + k * block) * i;
                if let (Some(u), Some(_)) = (gelu_slope, &dx) {
                    prefetch(&u[at..at + r * i]);
                }
                matmul(pw, o, i, r, gb, Op::T, xb, Op::N, k > 0, 1);
                for row in gb.chunks_exact(o) {
                    pb.iter_mut().zip(row).for_each(|(s, v)| *s += v);
                }
                if let Some(d) = &dx {
                    // SAFETY: each block's rows of dx are written by this task alone.
                    let d = unsafe { d.run(at, r * i) };
                    matmul(d, r, i, o, gb, Op::N, w, Op::N, false, 1);
                    if let Some(u) = gelu_slope {
                        gelu::scale_by_slope(&u[at..at + r * i], d);
                    }
                }
            }
        });
    sum_spans(dw, scratch, part, 0);
    if let Some(db) = db {
        sum_spans(db, scratch, part, i * o);
    }
}

/// Asks for `v` in L2 while a block's products run: what the epilogue reads back from memory
/// after them (the GELU's slope in the backward, then its input: its loads stalled it, 7.0% -> 4.6% of a
/// vit:128 step; vit:128 training 473-493 -> 488-500, vit:64 1,699-1,762 -> 1,735-1,810
/// images/s, alternating builds). The forward's residual the same way was slower (vit:128
/// 463-483 vs 483-490).
fn prefetch(v: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in v.chunks(16) {
        // SAFETY: a prefetch reads nothing and cannot fault; the address lies inside `v`.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(line.as_ptr().cast()) };
    }
}

/// out[e] += Σ_s partials[s·part + at + e], the spans in order, element by element.
fn sum_spans(out: &mut [f32], partials: &[f32], part: usize, at: usize) {
    const CHUNK: usize = 256;
    let count = partials.len() / part;
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, oc)| {
        let start = at + c * CHUNK;
        let mut acc = [0.0f32; CHUNK];
        let acc = &mut acc[..oc.len()];
        for s in 0..count {
            let p = &partials[s * part + start..][..oc.len()];
            acc.iter_mut().zip(p).for_each(|(a, v)| *a += v);
        }
        oc.iter_mut().zip(acc.iter()).for_each(|(o, a)| *o += a);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|v| ((v * 37 + seed * 11) % 101) as f32 / 50.0 - 1.0)
            .collect()
    }

    /// Against the f64 definition at sizes that leave partial blocks and spans, and the same
    /// bits in pools of 1 and 3 threads.
    #[test]
    fn dense_matches_the_definition_at_any_thread_count() {
        for (rows, i, o) in [(1, 3, 5), (37, 64, 17), (3001, 40, 24), (700, 200, 200)] {
            let (x, w, b, dy) = (values(rows * i, 1), values(i * o, 2), values(o, 3), values(rows * o, 4));
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                pool.install(|| {
                    let mut y = vec![0.0; rows * o];
                    dense_forward(&x, &w, Some(&b), i, o, &mut y, DenseThen::Nothing);
                    let (mut dw, mut db, mut dx) = (vec![0.5; i * o], vec![0.25; o], vec![9.0; rows * i]);
                    let mut scratch = vec![f32::NAN; dense_scratch_len(rows, i, o)];
                    dense_backward(
                        &x,
                        &w,
                        &dy,
                        i,
                        o,
                        &mut dw,
                        Some(&mut db),
                        Some(&mut dx),
                        None,
                        &mut scratch,
                    );
                    (y, dw, db, dx)
                })
            };
            let one = run(1);
            assert_eq!(one, run(3), "{rows}x{i}->{o}: thread counts");
            let (y, dw, db, dx) = one;
            let near = |got: f32, want: f64, what: &str| {
                assert!(
                    (got as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "{what}: {got} vs {want}"
                )
            };
            for n in 0..rows {
                for c in 0..o {
                    let want = b[c] as f64 + (0..i).map(|k| x[n * i + k] as f64 * w[c * i + k] as f64).sum::<f64>();
                    near(y[n * o + c], want, "y");
                }
                for k in 0..i {
                    let want: f64 = (0..o).map(|c| dy[n * o + c] as f64 * w[c * i + k] as f64).sum();
                    near(dx[n * i + k], want, "dx");
                }
            }
            for c in 0..o {
                near(db[c], 0.25 + (0..rows).map(|n| dy[n * o + c] as f64).sum::<f64>(), "db");
                for k in 0..i {
                    let want = 0.5
                        + (0..rows)
                            .map(|n| dy[n * o + c] as f64 * x[n * i + k] as f64)
                            .sum::<f64>();
                    near(dw[c * i + k], want, "dW");
                }
            }
        }
    }

    /// The epilogues equal the separate passes bit for bit: y + r, GELU(y) and its slope, and
    /// dx ⊙ GELU'(u) from the kept slope as `gelu_backward` computes it from u.
    #[test]
    fn fused_epilogues_equal_the_separate_passes() {
        let (rows, i, o) = (1500, 48, 40);
        let (x, w, b, r) = (values(rows * i, 1), values(i * o, 2), values(o, 3), values(rows * o, 5));
        let mut plain = vec![0.0; rows * o];
        dense_forward(&x, &w, Some(&b), i, o, &mut plain, DenseThen::Nothing);
        let mut y = vec![0.0; rows * o];
        dense_forward(&x, &w, Some(&b), i, o, &mut y, DenseThen::AddResidual(&r));
        let want: Vec<f32> = plain.iter().zip(&r).map(|(a, b)| a + b).collect();
        assert_eq!(y, want, "residual");
        let (mut y, mut g) = (vec![0.0; rows * o], vec![f32::NAN; rows * o]);
        dense_forward(&x, &w, Some(&b), i, o, &mut y, DenseThen::GeluKeepingSlope(&mut g));
        let (mut want, mut slope) = (vec![0.0; rows * o], vec![0.0; rows * o]);
        gelu::gelu_forward(&plain, &mut want);
        gelu::gelu_backward(&plain, &vec![1.0; rows * o], &mut slope);
        assert_eq!((&y, &g), (&slope, &want), "gelu and its slope");
        let (dy, u) = (values(rows * o, 6), values(rows * i, 7));
        let mut slope = vec![0.0; rows * i];
        gelu::gelu_backward(&u, &vec![1.0; rows * i], &mut slope);
        let run = |through: Option<&[f32]>| {
            let (mut dw, mut dx) = (vec![0.0; i * o], vec![0.0; rows * i]);
            let mut scratch = vec![0.0; dense_scratch_len(rows, i, o)];
            dense_backward(&x, &w, &dy, i, o, &mut dw, None, Some(&mut dx), through, &mut scratch);
            (dw, dx)
        };
        let ((dw, dx), (dw_gelu, dx_gelu)) = (run(None), run(Some(&slope)));
        let mut want = vec![0.0; rows * i];
        gelu::gelu_backward(&u, &dx, &mut want);
        assert_eq!((dw_gelu, dx_gelu), (dw, want), "gelu backward");
    }
}
