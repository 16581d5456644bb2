//! Winograd's kernel-side transforms: U = G k Gᵀ for the forward pass and the input gradient,
//! and its adjoint dk = Gᵀ dU G for the weight gradient, in f64 (the data-side transforms and
//! the tile plan are the parent module's).

use rayon::prelude::*;

use super::WinogradTile;
use crate::kernels::simd::SharedOut;

// G of F(2×2, 3×3) and of F(4×4, 3×3), in f64 (the filter transforms run once per step).
const G2: [[f64; 3]; 4] = [[1., 0., 0.], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0., 0., 1.]];
const G4: [[f64; 3]; 6] = [
    [1. / 4., 0., 0.],
    [-1. / 6., -1. / 6., -1. / 6.],
    [-1. / 6., 1. / 6., -1. / 6.],
    [1. / 24., 1. / 12., 1. / 6.],
    [1. / 24., -1. / 12., 1. / 6.],
    [0., 0., 1.],
];

/// Kernels transformed together, one per f64 lane (an AVX-512 register holds 8).
const KERNELS: usize = 8;

/// Up to `KERNELS` 3x3 kernels, value ij of kernel l at [ij][l].
type KernelLanes = [[f64; KERNELS]; 9];

/// Up to `KERNELS` kernels in the Winograd domain, position ξ of kernel l at [ξ][l] (the first
/// t² of 36 entries).
type DomainLanes = [[f64; KERNELS]; 36];

// U = G k Gᵀ, separable: (G k)[a][j] = Σ_i G[a][i] k[i][j], then U[a][b] = Σ_j (G k)[a][j] G[b][j].
/// The kernels' G k (3 lane vectors per row of G) into `gk`, from which `filter_position`
/// gives each U_ξ.
#[inline(always)]
fn filter_columns(g: &[[f64; 3]], k: &KernelLanes, gk: &mut [[[f64; KERNELS]; 3]; 6]) {
    for (row, ga) in gk.iter_mut().zip(g) {
        for (j, v) in row.iter_mut().enumerate() {
            *v = combine(*ga, [&k[j], &k[3 + j], &k[6 + j]]);
        }
    }
}

/// c₀·x₀ + c₁·x₁ + c₂·x₂ lane by lane (scalars times lane vectors: LLVM vectorized the loops
/// above across G's rows instead, gathering G's columns with masks, measured).
#[inline(always)]
fn combine(c: [f64; 3], x: [&[f64; KERNELS]; 3]) -> [f64; KERNELS] {
    let mut out = [0.0; KERNELS];
    for l in 0..KERNELS {
        out[l] = c[0] * x[0][l] + c[1] * x[1][l] + c[2] * x[2][l];
    }
    out
}

/// U_ξ of the kernels for ξ = (a, b), from their G k, rounded to f32 into `dst` (its length:
/// how many lanes are kernels). Stored as computed: a [36][8] result array spilled (measured).
#[inline(always)]
fn filter_position(g: &[[f64; 3]], gk: &[[[f64; KERNELS]; 3]; 6], a: usize, b: usize, dst: &mut [f32]) {
    let u = combine(g[b], [&gk[a][0], &gk[a][1], &gk[a][2]]);
    let mut v = [0.0f32; KERNELS];
    for l in 0..KERNELS {
        v[l] = u[l] as f32;
    }
    match <&mut [f32; KERNELS]>::try_from(&mut *dst) {
        // A whole vector: one store (copy_from_slice of a run length called memmove, measured).
        Ok(full) => *full = v,
        Err(_) => {
            let n = dst.len();
            dst.copy_from_slice(&v[..n]);
        }
    }
}

// dk = Gᵀ dU G, separable: (dU G)[a][j] = Σ_b dU[a][b] G[b][j], then dk[i][j] = Σ_a G[a][i] (dU G)[a][j].
#[inline(always)]
fn filter_gradient_lanes(g: &[[f64; 3]], du: &DomainLanes) -> KernelLanes {
    let t = g.len();
    let mut dug = [[[0.0f64; KERNELS]; 3]; 6];
    for (a, row) in dug.iter_mut().enumerate().take(t) {
        for (b, gb) in g.iter().enumerate() {
            let d = &du[a * t + b];
            for (j, v) in row.iter_mut().enumerate() {
                for l in 0..KERNELS {
                    v[l] += d[l] * gb[j];
                }
            }
        }
    }
    let mut dk = [[0.0f64; KERNELS]; 9];
    for (ga, row) in g.iter().zip(&dug) {
        for i in 0..3 {
            for j in 0..3 {
                for l in 0..KERNELS {
                    dk[i * 3 + j][l] += ga[i] * row[j][l];
                }
            }
        }
    }
    dk
}

/// The Winograd-domain kernels of `w` [OC, C, 3, 3], U_ξ = (G k Gᵀ)_ξ in f64: with `adjoint`
/// false, u[ξ][c][o] for k = w[o, c] (the forward pass: V[P, C] · U[C, OC]); with it true,
/// u[ξ][o][c] for k = w[o, c] rotated by 180° (the input gradient: V[P, OC] · U[OC, C]).
/// Each u[ξ] is [rows][cols]; tasks own runs of rows, and each kernel is read once and
/// transformed with 7 others in f64 lanes, its t² values written to t² contiguous row runs.
/// (Per position over all kernels, with each ξ reading every weight again, a 128x128 conv took
/// 0.96 ms on 2 threads; see ARCHITECTURE.md for this one.)
pub fn winograd_filter_transform(
    tile: WinogradTile,
    w: &[f32],
    out_channels: usize,
    in_channels: usize,
    adjoint: bool,
    u: &mut [f32],
) {
    let t2 = tile.t() * tile.t();
    let oc_c = out_channels * in_channels;
    assert!(w.len() >= oc_c * 9 && u.len() >= t2 * oc_c);
    let (rows, cols) = if adjoint {
        (out_channels, in_channels)
    } else {
        (in_channels, out_channels)
    };
    let out = SharedOut::new(&mut u[..t2 * oc_c]);
    let per_task = rows.div_ceil(2 * rayon::current_num_threads()).max(1);
    (0..rows.div_ceil(per_task)).into_par_iter().for_each(|task| {
        let first = task * per_task;
        filter_transform_rows(
            tile,
            w,
            in_channels,
            adjoint,
            first,
            per_task.min(rows - first),
            rows,
            cols,
            &out,
        );
    });
}

crate::kernels::simd::multiversion! {
    /// Rows first..first + count of every u[ξ] (see `winograd_filter_transform`), `KERNELS`
    /// columns at a time.
    fn filter_transform_rows(tile: WinogradTile, w: &[f32], in_channels: usize, adjoint: bool, first: usize, count: usize, rows: usize, cols: usize, out: &SharedOut) {
        // No closure carries the arithmetic (only the row iteration below): a closure is
        // compiled apart from the `multiversion!` function, without its AVX-512 (measured here too).
        let t = tile.t();
        let g_rows = hidden_g(tile);
        let mut gk = [[[[0.0f64; KERNELS]; 3]; 6]; ROW_BLOCKS];
        for (r, c0) in (first..first + count).flat_map(|r| (0..cols).step_by(ROW_BLOCKS * KERNELS).map(move |c0| (r, c0))) {
            let span = (ROW_BLOCKS * KERNELS).min(cols - c0);
            // G k of the span's kernels, each read once...
            for (jb, g) in gk.iter_mut().enumerate().take(span.div_ceil(KERNELS)) {
                let j0 = c0 + jb * KERNELS;
                let n = KERNELS.min(cols - j0);
                let mut k: KernelLanes = [[0.0; KERNELS]; 9];
                if n == KERNELS {
                    for l in 0..KERNELS {
                        gather_kernel(w, in_channels, adjoint, r, j0 + l, l, &mut k);
                    }
                } else {
                    for l in 0..n {
                        gather_kernel(w, in_channels, adjoint, r, j0 + l, l, &mut k);
                    }
                }
                filter_columns(g_rows, &k, g);
            }
            // ...then each position's run of the row, written in one stream (the t² slabs lie
            // a multiple of 4 KB apart: interleaved stores to all of them thrashed one L1 set).
            for a in 0..t {
                for b in 0..t {
                    // SAFETY: row r of every u[ξ] belongs to this task alone.
                    let run = unsafe { out.run((a * t + b) * rows * cols + r * cols + c0, span) };
                    for (dst, g) in run.chunks_mut(KERNELS).zip(&gk) {
                        filter_position(g_rows, g, a, b, dst);
                    }
                }
            }
        }
    }
}

/// G's rows as a slice whose length the compiler does not see: with G's shape known, LLVM
/// vectorized the filter transforms across G's rows (gathering its columns with masks), not
/// across the 8 kernels (measured).
#[inline(always)]
fn hidden_g(tile: WinogradTile) -> &'static [[f64; 3]] {
    std::hint::black_box(match tile {
        WinogradTile::F2 => &G2[..],
        WinogradTile::F4 => &G4[..],
    })
}

/// Blocks of `KERNELS` columns whose G k `filter_transform_rows` holds at a time (36 KB).
const ROW_BLOCKS: usize = 32;

/// Kernel (row r, column j) of `winograd_filter_transform`'s layout into lane l of `k`.
#[inline(always)]
fn gather_kernel(w: &[f32], in_channels: usize, adjoint: bool, r: usize, j: usize, l: usize, k: &mut KernelLanes) {
    let (o, c) = if adjoint { (r, j) } else { (j, r) };
    let kernel: &[f32; 9] = w[(o * in_channels + c) * 9..][..9].try_into().expect("9 values");
    for ij in 0..9 {
        // Rotated by 180°: k[i][j] = w[2 - i][2 - j], flat 8 - ij.
        k[ij][l] = kernel[if adjoint { 8 - ij } else { ij }] as f64;
    }
}

/// dw[o, c] += (Gᵀ dU_{c,o} G) in f64: the kernel gradient from its Winograd-domain sum
/// dU [t²][C][OC] (the adjoint of `winograd_filter_transform`'s forward mode); tasks own
/// `KERNELS` output channels each, read as f64 lanes from dU's contiguous rows.
pub fn winograd_filter_gradient(
    tile: WinogradTile,
    du: &[f32],
    out_channels: usize,
    in_channels: usize,
    dw: &mut [f32],
) {
    let (t2, oc_c) = (tile.t() * tile.t(), out_channels * in_channels);
    assert!(du.len() >= t2 * oc_c && dw.len() >= oc_c * 9);
    dw[..oc_c * 9]
        .par_chunks_mut(KERNELS * in_channels * 9)
        .enumerate()
        .for_each(|(block, dwb)| filter_gradient_block(tile, du, out_channels, in_channels, block * KERNELS, dwb));
}

crate::kernels::simd::multiversion! {
    /// Output channels o0.. of `winograd_filter_gradient` (dwb: their [C, 3, 3] kernels).
    fn filter_gradient_block(tile: WinogradTile, du: &[f32], out_channels: usize, in_channels: usize, o0: usize, dwb: &mut [f32]) {
        let t2 = tile.t() * tile.t();
        let g_rows = hidden_g(tile);
        let n = dwb.len() / (in_channels * 9);
        let oc_c = out_channels * in_channels;
        for c in 0..in_channels {
            let mut d: DomainLanes = [[0.0; KERNELS]; 36];
            for (xi, lanes) in d[..t2].iter_mut().enumerate() {
                let src = &du[xi * oc_c + c * out_channels + o0..][..n];
                for (l, &v) in src.iter().enumerate() {
                    lanes[l] = v as f64;
                }
            }
            let dk = filter_gradient_lanes(g_rows, &d);
            for l in 0..n {
                for (ij, v) in dk.iter().enumerate() {
                    dwb[(l * in_channels + c) * 9 + ij] += v[l] as f32;
                }
            }
        }
    }
}
