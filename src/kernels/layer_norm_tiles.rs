//! nn.LayerNorm on short rows (a transformer's tokens: 16 to `TILE_ROW_MAX` values), 16 rows
//! at a time. A row's own passes are a few vectors long, so what costs is the per-row scalar
//! work between them: folding each row's lanes into its sums and the division and square root
//! after. Here the lanes of 16 rows are folded together by one 16x16 transpose and 15 vector
//! adds (one lane per row), and each row's passes overlap its neighbours'. Written once on
//! `Lanes`; the layers take it where the CPU has AVX-512 (`tiles_vectorized`), elsewhere the
//! row kernels of group_norm.rs and layer_norm.rs. Measured: ARCHITECTURE.md, "LayerNorm on
//! token rows".

use rayon::prelude::*;

use crate::kernels::batch_norm::{inverse_std, ChannelStats};
use crate::kernels::lanes::{lanes_entry, Lanes, LANES};
use crate::kernels::reduce::{relu_mask, Center};
use crate::kernels::simd::prefetch_l2;

/// Rows per tile at most: one per lane.
pub(crate) const ROWS: usize = LANES;

/// Bytes of one tensor's rows per tile: the passes after the first re-read the tile's x and
/// dy from L1 (32 KB), so longer rows take fewer rows per tile (the rest of the lanes idle).
const TILE_BYTES: usize = 12 << 10;

/// Rows per tile for rows of `c` values.
pub(crate) fn tile_rows(c: usize) -> usize {
    (TILE_BYTES / (4 * c.max(1))).clamp(1, ROWS)
}

/// The shortest and longest rows the tiles take: below 16 values a row is all tail; above 256
/// the row kernels were faster (measured: the forward's three passes and the backward at 384
/// values; ARCHITECTURE.md), now those of layer_norm_rows.rs.
pub const TILE_ROW_MIN: usize = LANES;
pub const TILE_ROW_MAX: usize = 256;

/// Whether the tile kernels run on vector registers here (AVX-512); elsewhere their portable
/// twin is correct but slower than the row kernels, which the layers keep.
pub fn tiles_vectorized() -> bool {
    crate::kernels::lanes::has_avx512()
}

/// Whether rows of `c` values take the tiles on this CPU.
pub fn takes_tiles(c: usize) -> bool {
    (TILE_ROW_MIN..=TILE_ROW_MAX).contains(&c) && tiles_vectorized()
}

/// Lane i of the result: the sum of the lanes of `rows[i]` (transpose, then add the columns).
#[inline(always)]
pub(crate) fn row_totals<L: Lanes>(rows: [L; ROWS]) -> [f32; ROWS] {
    let mut t = L::transpose(rows);
    let mut half = ROWS / 2;
    while half > 0 {
        for l in 0..half {
            t[l] = t[l] + t[l + half];
        }
        half /= 2;
    }
    let mut out = [0.0f32; ROWS];
    t[0].store(&mut out);
    out
}

/// Σ f(v) of the whole vectors v of a row, folded as `add(acc, v)` in four chains (one chain
/// waits on the add's latency): Σx for LayerNorm, Σx² for RMSNorm.
#[inline(always)]
pub(crate) fn row_fold<L: Lanes>(row: &[f32], add: impl Fn(L, L) -> L) -> L {
    let mut acc = [L::zero(); 4];
    let mut quads = row.chunks_exact(4 * LANES);
    for q in &mut quads {
        for (k, a) in acc.iter_mut().enumerate() {
            *a = add(*a, L::load(&q[k * LANES..]));
        }
    }
    for v in quads.remainder().chunks_exact(LANES) {
        acc[0] = add(acc[0], L::load(v));
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3])
}

/// (Σd, Σd²) of d = x − m over the whole vectors of a row, in two chains each.
#[inline(always)]
pub(crate) fn centered_sums<L: Lanes>(row: &[f32], m: f32) -> (L, L) {
    let m = L::splat(m);
    let (mut a, mut q) = ([L::zero(); 2], [L::zero(); 2]);
    let mut pairs = row.chunks_exact(2 * LANES);
    for p in &mut pairs {
        for k in 0..2 {
            let d = L::load(&p[k * LANES..]) - m;
            a[k] = a[k] + d;
            q[k] = d.mul_add(d, q[k]);
        }
    }
    for v in pairs.remainder().chunks_exact(LANES) {
        let d = L::load(v) - m;
        a[0] = a[0] + d;
        q[0] = d.mul_add(d, q[0]);
    }
    (a[0] + a[1], q[0] + q[1])
}

// Per row: mean₀ = Σx/c, then the corrected two-pass statistics mean = mean₀ + Σd/c,
// var = Σd²/c − (Σd/c)² over d = x − mean₀; y = act((x − mean)·invstd·γ + β).
/// A run of rows of `c` values; row i's statistics go to `stats[i]`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn forward<L: Lanes>(
    x: &[f32],
    y: &mut [f32],
    c: usize,
    eps: f64,
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    relu: bool,
    stats: &mut [ChannelStats],
) {
    let (g, b) = (gamma.unwrap_or(&[]), beta.unwrap_or(&[]));
    // Called in place, not through a function pointer: a pointer's target is compiled without
    // the caller's AVX-512 (10x slower, measured).
    macro_rules! run {
        ($r:literal, $g:literal, $b:literal) => {
            forward_with::<L, $r, $g, $b>(x, y, c, eps, g, b, stats)
        };
    }
    match (relu, gamma.is_some(), beta.is_some()) {
        (false, true, true) => run!(false, true, true),
        (false, true, false) => run!(false, true, false),
        (false, false, true) => run!(false, false, true),
        (false, false, false) => run!(false, false, false),
        (true, true, true) => run!(true, true, true),
        (true, true, false) => run!(true, true, false),
        (true, false, true) => run!(true, false, true),
        (true, false, false) => run!(true, false, false),
    }
}

/// `forward` with whether there is a fused ReLU, a γ and a β as constants: the output pass's
/// loop then tests none of them per vector (LLVM did not hoist the tests: with them and the
/// masked loads of every vector, the loop's overhead was a third of the forward's samples).
#[inline(always)]
fn forward_with<L: Lanes, const RELU: bool, const G: bool, const B: bool>(
    x: &[f32],
    y: &mut [f32],
    c: usize,
    eps: f64,
    gamma: &[f32],
    beta: &[f32],
    stats: &mut [ChannelStats],
) {
    let inv_c = 1.0 / c as f64;
    let full = c / LANES * LANES;
    let tile = tile_rows(c);
    for ((xs, ys), sts) in x
        .chunks(tile * c)
        .zip(y.chunks_mut(tile * c))
        .zip(stats.chunks_mut(tile))
    {
        let rows = sts.len();
        let mut lanes = [L::zero(); ROWS];
        for (r, l) in lanes.iter_mut().enumerate().take(rows) {
            *l = row_fold::<L>(&xs[r * c..r * c + full], |a, v| a + v);
        }
        let totals = row_totals(lanes);
        let mut mean0 = [0.0f32; ROWS];
        for r in 0..rows {
            let tail: f32 = xs[r * c + full..(r + 1) * c].iter().sum();
            mean0[r] = (totals[r] + tail) * inv_c as f32;
        }
        let (mut a, mut q) = ([L::zero(); ROWS], [L::zero(); ROWS]);
        for r in 0..rows {
            (a[r], q[r]) = centered_sums::<L>(&xs[r * c..r * c + full], mean0[r]);
        }
        let (sd, sq) = (row_totals(a), row_totals(q));
        // The 16 rows' f64 statistics and inverse deviations in loops of a constant length,
        // the tails' sums apart, so that they run on f64 vectors: the scalar square root and
        // division per row were 5-7% of the forward's samples.
        let (mut sd, mut sq) = (sd.map(f64::from), sq.map(f64::from));
        if full < c {
            for r in 0..rows {
                for &v in &xs[r * c + full..(r + 1) * c] {
                    let d = (v - mean0[r]) as f64;
                    sd[r] += d;
                    sq[r] += d * d;
                }
            }
        }
        let (mut mean, mut var) = ([0.0f64; ROWS], [0.0f32; ROWS]);
        for r in 0..ROWS {
            let shift = sd[r] * inv_c;
            mean[r] = mean0[r] as f64 + shift;
            var[r] = (sq[r] * inv_c - shift * shift).max(0.0) as f32;
        }
        let mut invstd = [0.0f32; ROWS];
        for (o, &v) in invstd.iter_mut().zip(&var) {
            *o = inverse_std(v, eps);
        }
        for r in 0..rows {
            sts[r] = ChannelStats {
                mean: mean[r],
                var: var[r],
            };
        }
        for r in 0..rows {
            let (xr, yr) = (&xs[r * c..(r + 1) * c], &mut ys[r * c..(r + 1) * c]);
            output_row::<L, RELU, G, B>(xr, yr, Center::new(sts[r].mean), invstd[r], (gamma, beta));
        }
    }
}

/// n lanes of y = act((x − mean)·invstd·γ + β) from x's lanes at column j (a function, not a
/// closure: closures here were compiled without the caller's AVX-512, 4x slower).
#[inline(always)]
fn output_lanes<L: Lanes, const RELU: bool, const G: bool, const B: bool>(
    xv: L,
    center: Center,
    inv: f32,
    (gamma, beta): (&[f32], &[f32]),
    j: usize,
    n: usize,
) -> L {
    let d = (xv - L::splat(center.hi)) - L::splat(center.lo);
    let scale = if G {
        L::load_first(&gamma[j..], n).scale(inv)
    } else {
        L::splat(inv)
    };
    let shift = if B { L::load_first(&beta[j..], n) } else { L::zero() };
    let o = d.mul_add(scale, shift);
    if RELU {
        o.relu()
    } else {
        o
    }
}

/// One row's y = act((x − mean)·invstd·γ + β): whole vectors, then the tail's lanes.
#[inline(always)]
pub(crate) fn output_row<L: Lanes, const RELU: bool, const G: bool, const B: bool>(
    xr: &[f32],
    yr: &mut [f32],
    center: Center,
    inv: f32,
    affine: (&[f32], &[f32]),
) {
    let c = xr.len();
    let full = c / LANES * LANES;
    for (j, (xv, yv)) in xr[..full]
        .chunks_exact(LANES)
        .zip(yr[..full].chunks_exact_mut(LANES))
        .enumerate()
    {
        output_lanes::<L, RELU, G, B>(L::load(xv), center, inv, affine, j * LANES, LANES).store(yv);
    }
    if full < c {
        let n = c - full;
        let v = output_lanes::<L, RELU, G, B>(L::load_first(&xr[full..], n), center, inv, affine, full, n);
        v.store_first(&mut yr[full..], n);
    }
}

/// Rows per forward task: whole tiles of at least 2^14 values, so that small tensors stay on
/// one thread.
pub(crate) fn forward_task_rows(c: usize) -> usize {
    ((1 << 14) / c.max(1)).div_ceil(ROWS).max(1) * ROWS
}

/// The LayerNorm training forward on rows of `c` values (`takes_tiles(c)`), tasks of whole
/// tiles in parallel: row i's statistics into `stats[i]`, y = act((x − mean)·invstd·γ + β).
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_forward(
    x: &[f32],
    y: &mut [f32],
    c: usize,
    eps: f64,
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    relu: bool,
    stats: &mut [ChannelStats],
) {
    let rows = forward_task_rows(c);
    if stats.len() <= rows {
        layer_norm_forward_tiles(x, y, c, eps, gamma, beta, relu, stats);
        return;
    }
    y.par_chunks_mut(rows * c)
        .zip(x.par_chunks(rows * c))
        .zip(stats.par_chunks_mut(rows))
        .for_each(|((yt, xt), st)| layer_norm_forward_tiles(xt, yt, c, eps, gamma, beta, relu, st));
}

lanes_entry! {
    /// The LayerNorm training forward on a run of rows of `c` values, 16 rows per tile (see the
    /// module): statistics into `stats`, y = act((x − mean)·invstd·γ + β).
    pub fn layer_norm_forward_tiles(x: &[f32], y: &mut [f32], c: usize, eps: f64, gamma: Option<&[f32]>, beta: Option<&[f32]>, relu: bool, stats: &mut [ChannelStats]) => forward
}

// With g = dy (masked by y > 0 after a fused ReLU), x̂ = (x − mean)·invstd:
// dx = invstd·(γg − Σγg/c − x̂·Σγg·x̂/c) per row; dγ += g·x̂, dβ += g per column.
/// A run of rows; the column terms are added into `dg`, `db` (c values each).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward<L: Lanes>(
    x: &[f32],
    y: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    c: usize,
    eps: f64,
    gamma: Option<&[f32]>,
    relu: bool,
    stats: &[ChannelStats],
    dg: &mut [f32],
    db: &mut [f32],
) {
    let g = gamma.unwrap_or(&[]);
    // In place, not through a function pointer (see `forward`).
    match (relu, gamma.is_some()) {
        (false, true) => backward_with::<L, false, true>(x, y, dy, dx, c, eps, g, stats, dg, db),
        (false, false) => backward_with::<L, false, false>(x, y, dy, dx, c, eps, g, stats, dg, db),
        (true, true) => backward_with::<L, true, true>(x, y, dy, dx, c, eps, g, stats, dg, db),
        (true, false) => backward_with::<L, true, false>(x, y, dy, dx, c, eps, g, stats, dg, db),
    }
}

/// `backward` with whether there is a fused ReLU and a γ as constants (as `forward_with`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_with<L: Lanes, const RELU: bool, const G: bool>(
    x: &[f32],
    y: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    c: usize,
    eps: f64,
    gamma: &[f32],
    stats: &[ChannelStats],
    dg: &mut [f32],
    db: &mut [f32],
) {
    let full = c / LANES * LANES;
    let inv_c = 1.0 / c as f64;
    // At least one group: long rows (one per L1-sized tile) still share dγ, dβ four at a time.
    let tile = tile_rows(c).max(GROUP);
    for (t, sts) in stats.chunks(tile).enumerate() {
        let at = t * tile * c;
        let rows = sts.len();
        let mut inv = [0.0f32; ROWS];
        let mut centers = [Center { hi: 0.0, lo: 0.0 }; ROWS];
        for r in 0..rows {
            inv[r] = inverse_std(sts[r].var, eps);
            centers[r] = Center::new(sts[r].mean);
        }
        // Pass 1: each row's Σγg and Σγg·x̂ in lanes, its column terms into dγ, dβ.
        let (mut ag, mut aq) = ([L::zero(); ROWS], [L::zero(); ROWS]);
        let mut tails = [(0.0f64, 0.0f64); ROWS];
        let mut r = 0;
        while r < rows {
            // Four rows at a time share each load and store of dγ, dβ.
            let k = if rows - r >= GROUP { GROUP } else { 1 };
            let at_r = at + r * c;
            let span = at_r..at_r + k * c;
            let (xs, ys, ds) = (&x[span.clone()], &y[span.clone()], &dy[span]);
            let (sg, sq) = (&mut ag[r..r + k], &mut aq[r..r + k]);
            let (cs, iv) = (&centers[r..r + k], &inv[r..r + k]);
            if k == GROUP {
                column_terms::<L, GROUP, RELU, G>(xs, ys, ds, c, full, gamma, cs, iv, sg, sq, dg, db);
            } else {
                column_terms::<L, 1, RELU, G>(xs, ys, ds, c, full, gamma, cs, iv, sg, sq, dg, db);
            }
            for i in 0..k {
                let o = i * c;
                let (xr, yr, dr) = (&xs[o..o + c], &ys[o..o + c], &ds[o..o + c]);
                tails[r + i] = tail_terms::<RELU, G>(xr, yr, dr, full, gamma, cs[i], iv[i], dg, db);
            }
            r += k;
        }
        let (sg, sgx) = (row_totals(ag), row_totals(aq));
        // Pass 2: dx from the row's two coefficients.
        for r in 0..rows {
            let o = at + r * c;
            if c > PREFETCH_ABOVE && c <= TILE_ROW_MAX {
                let next = (o + tile * c).min(x.len())..(o + (tile + 1) * c).min(x.len());
                prefetch_l2(&x[next.clone()]);
                prefetch_l2(&dy[next]);
            }
            let (xr, yr, dr, dxr) = (&x[o..o + c], &y[o..o + c], &dy[o..o + c], &mut dx[o..o + c]);
            let (a, b) = (
                (sg[r] as f64 + tails[r].0) * inv_c,
                (sgx[r] as f64 + tails[r].1) * inv_c,
            );
            row_dx::<L, RELU, G>(xr, yr, dr, dxr, gamma, centers[r], inv[r], (a, b));
        }
    }
}

/// The column terms of a row's values full..c (past its whole vectors) added into `dg`, `db`;
/// returns their (Σγg, Σγg·x̂) in f64.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn tail_terms<const RELU: bool, const G: bool>(
    xr: &[f32],
    yr: &[f32],
    dr: &[f32],
    full: usize,
    gamma: &[f32],
    center: Center,
    inv: f32,
    dg: &mut [f32],
    db: &mut [f32],
) -> (f64, f64) {
    let (mut sg, mut sq) = (0.0f64, 0.0f64);
    for j in full..xr.len() {
        let g = if RELU { relu_mask(yr[j], dr[j]) } else { dr[j] };
        let xh = center.sub(xr[j]) * inv;
        let gg = if G { gamma[j] * g } else { g };
        sg += gg as f64;
        sq += (gg * xh) as f64;
        dg[j] += g * xh;
        db[j] += g;
    }
    (sg, sq)
}

// dx = invstd·(γg − a − x̂·b) = γg·invstd + (x − hi)·k1 + k0 with x̂ = (x − hi − lo)·invstd:
// k1 = −b·invstd², k0 = (lo·b·invstd − a)·invstd (three vector operations, not six).
/// One row's dx from its coefficients a = Σγg/c and b = Σγg·x̂/c.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn row_dx<L: Lanes, const RELU: bool, const G: bool>(
    xr: &[f32],
    yr: &[f32],
    dr: &[f32],
    dxr: &mut [f32],
    gamma: &[f32],
    center: Center,
    inv: f32,
    (a, b): (f64, f64),
) {
    let (c, iv) = (xr.len(), inv as f64);
    let full = c / LANES * LANES;
    let k1 = L::splat((-b * iv * iv) as f32);
    let k0 = L::splat(((center.lo as f64 * b * iv - a) * iv) as f32);
    let (hi, ivl) = (L::splat(center.hi), L::splat(inv));
    let mut j = 0;
    while j < full {
        dx_lanes::<L, RELU, G>(xr, yr, dr, gamma, hi, ivl, k1, k0, j, LANES).store(&mut dxr[j..]);
        j += LANES;
    }
    if full < c {
        let n = c - full;
        dx_lanes::<L, RELU, G>(xr, yr, dr, gamma, hi, ivl, k1, k0, full, n).store_first(&mut dxr[full..], n);
    }
}

/// n lanes of the backward's dx at column j (a function, not a closure: see `output_lanes`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn dx_lanes<L: Lanes, const RELU: bool, const G: bool>(
    xr: &[f32],
    yr: &[f32],
    dr: &[f32],
    gamma: &[f32],
    hi: L,
    iv: L,
    k1: L,
    k0: L,
    j: usize,
    n: usize,
) -> L {
    let mut g = L::load_first(&dr[j..], n);
    if RELU {
        g = g.where_positive(L::load_first(&yr[j..], n));
    }
    let gg = if G { g * L::load_first(&gamma[j..], n) } else { g };
    gg.mul_add(iv, (L::load_first(&xr[j..], n) - hi).mul_add(k1, k0))
}

/// Rows per group of the backward's first pass.
pub(crate) const GROUP: usize = 4;

/// Rows longer than this (up to `TILE_ROW_MAX`) have the backward's dx pass ask for the next
/// tile's x and dy into L2, row by row, while it works from L1: the first pass then reads
/// four interleaved runs of 12-16 lines each, too short for the hardware's stream prefetcher.
/// Measured (AMD host, forward + backward through the layer, alternating, 10 rounds of 101
/// calls, two runs): [6400, 192] 0.81 and 0.90 of the time, [4096, 256] 0.90 and 0.92,
/// [6400, 256] 0.80 and 0.74, faster in 8-10 rounds of 10; [6400, 128] level (0.99, faster in
/// 5 of 10; into L1 instead it was slower, ARCHITECTURE.md).
const PREFETCH_ABOVE: usize = 128;

/// The backward's first pass over the whole vectors of K rows: each row's Σγg, Σγg·x̂ added
/// into its lanes `sg`, `sq`; every column's Σg·x̂, Σg into `dg`, `db`, loaded and stored once
/// for the K rows (per row, the two stores cost as much as the rest of the pass).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn column_terms<L: Lanes, const K: usize, const RELU: bool, const G: bool>(
    xs: &[f32],
    ys: &[f32],
    ds: &[f32],
    c: usize,
    full: usize,
    gamma: &[f32],
    centers: &[Center],
    inv: &[f32],
    sg: &mut [L],
    sq: &mut [L],
    dg: &mut [f32],
    db: &mut [f32],
) {
    // x̂ = (x − hi − lo)·invstd as (x − hi)·invstd − lo·invstd: one fused operation fewer.
    let hi: [L; K] = std::array::from_fn(|i| L::splat(centers[i].hi));
    let nlo: [L; K] = std::array::from_fn(|i| L::splat(-centers[i].lo * inv[i]));
    let iv: [L; K] = std::array::from_fn(|i| L::splat(inv[i]));
    let mut a: [L; K] = std::array::from_fn(|i| sg[i]);
    let mut q: [L; K] = std::array::from_fn(|i| sq[i]);
    for j in (0..full).step_by(LANES) {
        let gm = if G { L::load(&gamma[j..]) } else { L::zero() };
        let (mut tg, mut tb) = (L::load(&dg[j..]), L::load(&db[j..]));
        for i in 0..K {
            let o = i * c + j;
            let mut g = L::load(&ds[o..]);
            if RELU {
                g = g.where_positive(L::load(&ys[o..]));
            }
            let xh = (L::load(&xs[o..]) - hi[i]).mul_add(iv[i], nlo[i]);
            let gg = if G { g * gm } else { g };
            a[i] = a[i] + gg;
            q[i] = gg.mul_add(xh, q[i]);
            tg = g.mul_add(xh, tg);
            tb = tb + g;
        }
        tg.store(&mut dg[j..]);
        tb.store(&mut db[j..]);
    }
    // Vector by vector: `copy_from_slice` of the K vectors was a libc memcpy call (behind a
    // vzeroupper) per group of rows.
    for i in 0..K {
        (sg[i], sq[i]) = (a[i], q[i]);
    }
}

lanes_entry! {
    /// nn.LayerNorm's backward on a run of rows of `c` values, 16 rows per tile (see the
    /// module): dx, and each row's dγ, dβ terms added into the f32 column runs `dg`, `db`.
    pub fn layer_norm_backward_tiles(x: &[f32], y: &[f32], dy: &[f32], dx: &mut [f32], c: usize, eps: f64, gamma: Option<&[f32]>, relu: bool, stats: &[ChannelStats], dg: &mut [f32], db: &mut [f32]) => backward
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::kernels::lanes::Portable;

    fn values(len: usize, seed: u32, offset: f32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let h = (i as u32)
                    .wrapping_mul(2654435761)
                    .wrapping_add(seed.wrapping_mul(40503));
                offset + (h >> 8) as f32 / (1u32 << 24) as f32 * 4.0 - 2.0
            })
            .collect()
    }

    /// Row statistics, y, dx, dγ and dβ in f64 from the definition.
    #[allow(clippy::type_complexity)]
    fn reference(
        x: &[f32],
        dy: &[f32],
        c: usize,
        eps: f64,
        gamma: &[f32],
        beta: &[f32],
        relu: bool,
    ) -> (Vec<(f64, f64)>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
        let (mut stats, mut y, mut dx) = (vec![], vec![0.0; x.len()], vec![0.0; x.len()]);
        let (mut dg, mut db) = (vec![0.0; c], vec![0.0; c]);
        for (r, (xr, dr)) in x.chunks(c).zip(dy.chunks(c)).enumerate() {
            let mean = xr.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
            let var = xr.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / c as f64;
            let inv = 1.0 / (var + eps).sqrt();
            stats.push((mean, var));
            let xh: Vec<f64> = xr.iter().map(|&v| (v as f64 - mean) * inv).collect();
            let mut g = vec![0.0; c];
            for j in 0..c {
                let z = xh[j] * gamma[j] as f64 + beta[j] as f64;
                y[r * c + j] = if relu { z.max(0.0) } else { z };
                g[j] = if relu && z <= 0.0 { 0.0 } else { dr[j] as f64 };
                dg[j] += g[j] * xh[j];
                db[j] += g[j];
            }
            let sg: f64 = (0..c).map(|j| gamma[j] as f64 * g[j]).sum::<f64>() / c as f64;
            let sgx: f64 = (0..c).map(|j| gamma[j] as f64 * g[j] * xh[j]).sum::<f64>() / c as f64;
            for j in 0..c {
                dx[r * c + j] = inv * (gamma[j] as f64 * g[j] - sg - xh[j] * sgx);
            }
        }
        (stats, y, dx, dg, db)
    }

    fn close(got: f32, want: f64, scale: f64, tol: f64, what: &str) {
        assert!(
            (got as f64 - want).abs() <= tol * scale.max(want.abs()),
            "{what}: {got} vs {want}"
        );
    }

    /// Both versions (the portable one always, the AVX-512 one where the CPU has it) against
    /// the f64 definition: rows of whole vectors and with tails, one tile and several with a
    /// partial last one (200 values: the next tile's rows asked into L2, up to the end of x),
    /// with and without γ, β and a fused ReLU, offsets up to 1e3 and a long row (4100 values,
    /// as the backward takes for long rows).
    #[test]
    fn tiles_match_the_definition() {
        let mut runs: Vec<(&str, Run)> = vec![("portable", run::<Portable>)];
        if tiles_vectorized() {
            runs.push(("entry", run_entry));
        }
        let cases = [
            (5, 16, 0.0f32),
            (37, 64, 0.0),
            (16, 100, 3.0),
            (20, 384, 1e3),
            (21, 200, 1.0),
            (3, 1024, 0.0),
            (9, 4100, 1e2),
        ];
        check_against_definition(&cases, &runs);
    }

    /// Each of `runs` (a forward then a backward) on rows (n, c, offset) of `cases`, with and
    /// without γ, β and a fused ReLU, against the f64 definition.
    pub(crate) fn check_against_definition(cases: &[(usize, usize, f32)], runs: &[(&str, Run)]) {
        for &(n, c, offset) in cases {
            for (affine, relu) in [(true, false), (false, false), (true, true)] {
                let x = values(n * c, 1, offset);
                let dy = values(n * c, 2, 0.0);
                let gamma = if affine { values(c, 3, 1.0) } else { vec![1.0; c] };
                let beta = if affine { values(c, 4, 0.0) } else { vec![0.0; c] };
                let (g, b) = if affine {
                    (Some(&gamma[..]), Some(&beta[..]))
                } else {
                    (None, None)
                };
                let eps = 1e-5;
                let (stats, y, dx, dg, db) = reference(&x, &dy, c, eps, &gamma, &beta, relu);
                for &(name, f) in runs {
                    let inputs = Inputs {
                        x: &x,
                        dy: &dy,
                        c,
                        eps,
                        gamma: g,
                        beta: b,
                        relu,
                    };
                    let mut out = Outputs::new(n, c);
                    f(&mut out, &inputs);
                    let what = format!("{name} n {n} c {c} affine {affine} relu {relu}");
                    for (r, (s, &(m, v))) in out.stats.iter().zip(&stats).enumerate() {
                        assert!(
                            (s.mean - m).abs() <= 1e-6 * (1.0 + m.abs()),
                            "{what} row {r} mean {} vs {m}",
                            s.mean
                        );
                        close(s.var, v, 0.0, 1e-5, &format!("{what} row {r} var"));
                    }
                    for i in 0..n * c {
                        close(out.y[i], y[i], 1.0, 1e-5, &format!("{what} y[{i}]"));
                        close(out.dx[i], dx[i], 1.0, 1e-4, &format!("{what} dx[{i}]"));
                    }
                    for j in 0..c {
                        close(out.dg[j], dg[j], n as f64, 1e-5, &format!("{what} dγ[{j}]"));
                        close(out.db[j], db[j], n as f64, 1e-5, &format!("{what} dβ[{j}]"));
                    }
                }
            }
        }
    }

    /// A forward then a backward of one kernel on `Inputs`, into `Outputs`.
    pub(crate) type Run = fn(&mut Outputs, &Inputs);

    pub(crate) struct Inputs<'a> {
        pub x: &'a [f32],
        pub dy: &'a [f32],
        pub c: usize,
        pub eps: f64,
        pub gamma: Option<&'a [f32]>,
        pub beta: Option<&'a [f32]>,
        pub relu: bool,
    }

    pub(crate) struct Outputs {
        pub stats: Vec<ChannelStats>,
        pub y: Vec<f32>,
        pub dx: Vec<f32>,
        pub dg: Vec<f32>,
        pub db: Vec<f32>,
    }

    impl Outputs {
        fn new(n: usize, c: usize) -> Self {
            Outputs {
                stats: vec![ChannelStats::default(); n],
                y: vec![0.0; n * c],
                dx: vec![0.0; n * c],
                dg: vec![0.0; c],
                db: vec![0.0; c],
            }
        }
    }

    fn run<L: Lanes>(o: &mut Outputs, i: &Inputs) {
        forward::<L>(i.x, &mut o.y, i.c, i.eps, i.gamma, i.beta, i.relu, &mut o.stats);
        let y = o.y.clone();
        backward::<L>(
            i.x, &y, i.dy, &mut o.dx, i.c, i.eps, i.gamma, i.relu, &o.stats, &mut o.dg, &mut o.db,
        );
    }

    fn run_entry(o: &mut Outputs, i: &Inputs) {
        layer_norm_forward_tiles(i.x, &mut o.y, i.c, i.eps, i.gamma, i.beta, i.relu, &mut o.stats);
        let y = o.y.clone();
        layer_norm_backward_tiles(
            i.x, &y, i.dy, &mut o.dx, i.c, i.eps, i.gamma, i.relu, &o.stats, &mut o.dg, &mut o.db,
        );
    }
}
