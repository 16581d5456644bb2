//! nn.LayerNorm on rows too long for the tiles and too short to share dγ, dβ across rows
//! (`layer_norm_tiles::TILE_ROW_MAX` < c < 2,048 values: a transformer's 384 and 768), one row
//! at a time on `Lanes`, forward and backward. Their memory traffic is the row kernels' of
//! group_norm.rs and layer_norm.rs (each row read once from memory, once more from L1); what
//! changed is the arithmetic: fused multiply-adds, the tiles' three-operation dx, no bounds
//! checks or spilled pointers in the loops, and forward tasks of 2^14 values (GroupNorm's took
//! 1,024: two rows). Measured (AMD host, forward + backward through the layer, 2 threads, the
//! two versions alternating in one process, geometric means of 10 rounds of 101 calls), the
//! time against those row kernels: [4096, 320] 0.69, [4096, 384] 0.70, [2048, 768] 0.77,
//! [64, 768] 0.81, [2048, 1024] 0.83, [1024, 1536] 0.89, faster in 7-10 of 10 rounds.
//! Tried: the forward's statistics for 8 rows before their outputs (forward alone 0.80-0.90 of
//! the time, forward + backward 1.08 times it at 384 and 768: not taken).

use rayon::prelude::*;

use crate::kernels::batch_norm::{inverse_std, ChannelStats};
use crate::kernels::lanes::{lanes_entry, Lanes, LANES};
use crate::kernels::layer_norm_tiles::{centered_sums, column_terms, output_row, row_dx, tail_terms};
use crate::kernels::layer_norm_tiles::{tiles_vectorized, TILE_ROW_MAX};
use crate::kernels::reduce::{shift_estimate, shifted_mean_var, Center};

/// Rows of this many values and more are layer_norm.rs's long rows (its `LONG_TILES_FROM`).
pub const ROWS_BELOW: usize = 2048;

/// Whether rows of `c` values take these kernels on this CPU: longer than the tiles', shorter
/// than the long rows of layer_norm.rs, with AVX-512 (elsewhere the row kernels of
/// group_norm.rs and layer_norm.rs).
pub fn takes_rows(c: usize) -> bool {
    c > TILE_ROW_MAX && c < ROWS_BELOW && tiles_vectorized()
}

// Per row: d = x − K over a shift K within a few deviations of the mean (the mean of nine of
// its values, as GroupNorm's `mean_var`), mean = K + Σd/c, var = (Σd² − (Σd)²/c)/c;
// y = act((x − mean)·invstd·γ + β).
/// A run of rows of `c` values; row i's statistics go to `stats[i]`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward<L: Lanes>(
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
    // In place, not through a function pointer (see layer_norm_tiles.rs `forward`).
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

/// `forward` with whether there is a fused ReLU, a γ and a β as constants.
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
    let full = c / LANES * LANES;
    for ((xr, yr), st) in x.chunks_exact(c).zip(y.chunks_exact_mut(c)).zip(stats.iter_mut()) {
        let shift = shift_estimate(std::iter::once(xr)).unwrap_or(Center { hi: 0.0, lo: 0.0 });
        let k = Center { hi: shift.hi, lo: 0.0 };
        let (a, q) = centered_sums::<L>(&xr[..full], k.hi);
        let (mut sd, mut sq) = (a.reduce_sum() as f64, q.reduce_sum() as f64);
        for &v in &xr[full..] {
            let d = (v - k.hi) as f64;
            sd += d;
            sq += d * d;
        }
        let (mean, var) = shifted_mean_var(k, sd, sq, c);
        *st = ChannelStats { mean, var };
        output_row::<L, RELU, G, B>(xr, yr, Center::new(mean), inverse_std(var, eps), (gamma, beta));
    }
}

lanes_entry! {
    /// The LayerNorm training forward on a run of rows of `c` values, one at a time (see the
    /// module): statistics into `stats`, y = act((x − mean)·invstd·γ + β).
    pub fn layer_norm_forward_rows(x: &[f32], y: &mut [f32], c: usize, eps: f64, gamma: Option<&[f32]>, beta: Option<&[f32]>, relu: bool, stats: &mut [ChannelStats]) => forward
}

/// The LayerNorm training forward on rows of `c` values in tasks of whole rows of at least
/// 2^14 values (as the tiles' forward), in parallel.
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
    let rows = ((1usize << 14) / c.max(1)).max(1);
    y.par_chunks_mut(rows * c)
        .zip(x.par_chunks(rows * c))
        .zip(stats.par_chunks_mut(rows))
        .for_each(|((yt, xt), st)| layer_norm_forward_rows(xt, yt, c, eps, gamma, beta, relu, st));
}

// With g = dy (masked by y > 0 after a fused ReLU), x̂ = (x − mean)·invstd:
// dx = invstd·(γg − Σγg/c − x̂·Σγg·x̂/c) per row; dγ += g·x̂, dβ += g per column.
/// A run of rows; the column terms are added into `dg`, `db` (c values each).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward<L: Lanes>(
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
    // In place, not through a function pointer (see layer_norm_tiles.rs `forward`).
    match (relu, gamma.is_some()) {
        (false, true) => backward_with::<L, false, true>(x, y, dy, dx, c, eps, g, stats, dg, db),
        (false, false) => backward_with::<L, false, false>(x, y, dy, dx, c, eps, g, stats, dg, db),
        (true, true) => backward_with::<L, true, true>(x, y, dy, dx, c, eps, g, stats, dg, db),
        (true, false) => backward_with::<L, true, false>(x, y, dy, dx, c, eps, g, stats, dg, db),
    }
}

/// `backward` with whether there is a fused ReLU and a γ as constants.
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
    let rows = x.chunks_exact(c).zip(y.chunks_exact(c)).zip(dy.chunks_exact(c));
    for (((xr, yr), dr), (dxr, st)) in rows.zip(dx.chunks_exact_mut(c).zip(stats)) {
        let (center, inv) = (Center::new(st.mean), inverse_std(st.var, eps));
        // Pass 1: Σγg and Σγg·x̂ in lanes (the tail in f64), the column terms into dγ, dβ.
        let (mut ag, mut aq) = ([L::zero()], [L::zero()]);
        column_terms::<L, 1, RELU, G>(xr, yr, dr, c, full, gamma, &[center], &[inv], &mut ag, &mut aq, dg, db);
        let (tg, tq) = tail_terms::<RELU, G>(xr, yr, dr, full, gamma, center, inv, dg, db);
        // Pass 2, from L1.
        let (a, b) = (
            (ag[0].reduce_sum() as f64 + tg) * inv_c,
            (aq[0].reduce_sum() as f64 + tq) * inv_c,
        );
        row_dx::<L, RELU, G>(xr, yr, dr, dxr, gamma, center, inv, (a, b));
    }
}

lanes_entry! {
    /// nn.LayerNorm's backward on a run of rows of `c` values, one at a time (see the module):
    /// dx, and each row's dγ, dβ terms added into the f32 column runs `dg`, `db`.
    pub fn layer_norm_backward_rows(x: &[f32], y: &[f32], dy: &[f32], dx: &mut [f32], c: usize, eps: f64, gamma: Option<&[f32]>, relu: bool, stats: &[ChannelStats], dg: &mut [f32], db: &mut [f32]) => backward
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::lanes::Portable;
    use crate::kernels::layer_norm_tiles::tests::{check_against_definition, Inputs, Outputs, Run};

    fn run<L: Lanes>(o: &mut Outputs, i: &Inputs) {
        forward::<L>(i.x, &mut o.y, i.c, i.eps, i.gamma, i.beta, i.relu, &mut o.stats);
        let y = o.y.clone();
        let (dx, dg, db) = (&mut o.dx, &mut o.dg, &mut o.db);
        backward::<L>(i.x, &y, i.dy, dx, i.c, i.eps, i.gamma, i.relu, &o.stats, dg, db);
    }

    fn run_entry(o: &mut Outputs, i: &Inputs) {
        layer_norm_forward(i.x, &mut o.y, i.c, i.eps, i.gamma, i.beta, i.relu, &mut o.stats);
        let y = o.y.clone();
        let (dx, dg, db) = (&mut o.dx, &mut o.dg, &mut o.db);
        layer_norm_backward_rows(i.x, &y, i.dy, dx, i.c, i.eps, i.gamma, i.relu, &o.stats, dg, db);
    }

    /// Both versions (the portable one always, the AVX-512 one where the CPU has it) against the
    /// f64 definition, with the tiles' test: whole vectors and tails, offsets up to 1e3, rows
    /// from below a vector to the longest these kernels take, and several tasks of the forward
    /// (2^14 values each).
    #[test]
    fn rows_match_the_definition() {
        let mut runs: Vec<(&str, Run)> = vec![("rows portable", run::<Portable>)];
        if tiles_vectorized() {
            runs.push(("rows entry", run_entry));
        }
        let cases = [
            (3, 7, 0.0f32),
            (20, 384, 1e3),
            (6, 770, 5.0),
            (4, 1536, 1e3),
            (50, 2047, 1.0),
        ];
        check_against_definition(&cases, &runs);
    }
}
