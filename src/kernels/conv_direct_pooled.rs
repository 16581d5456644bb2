//! The direct 3x3 stride-1 convolution followed by a 2x2 stride-2 max-pool, pooled in
//! registers. Each pooled output is the max of four conv outputs, one per phase (ry, rx) of
//! the conv's output grid: conv[2y + ry][2x + rx]. With the padded input split into its four
//! phase planes (kernels::conv_direct's stride-2 grid, rows ⌈(W+2)/2⌉ wide), the conv output
//! of phase (ry, rx) at pooled position (y, x) reads input combination (ry + ky, rx + kx),
//! a fixed shift of that grid, so all four phases of 16 pooled positions come from 16
//! contiguous loads per input channel (one per combination (sy, sx) in 0..4 × 0..4):
//!
//!   out[o][y][x] = max_{ry,rx} Σ_c Σ_{ky,kx} w[o][c][ky][kx] · xp[c][2y + ry + ky][2x + rx + kx]
//!
//! Each phase's sum runs over (channel, ky, kx) in conv_direct's order, one rounding per
//! multiply-add, and the max takes the phases in PyTorch's window order with its NaN rule
//! (Lanes::pool_max), so the values equal conv_direct's block pooled afterwards, bit for bit.
//! The full-size conv output never leaves the registers: seed-cnn's stem (1 -> 32, 28x28)
//! stored four channel maps per block and pooled them in a second pass (a quarter of its
//! inference profile), with permutes for the horizontal pairs that this layout does not need.

use crate::kernels::conv_direct::{DirectGrid, DIRECT_CHANNELS};
use crate::kernels::lanes::{lanes_entry, Lanes, LANES};

/// The stride-2 grid whose padded input (`direct_pad_input`) and output grid this kernel
/// uses for a stride-1 conv of `channels` h × w maps; pooled row y is its output row y.
pub fn pooled_grid(channels: usize, h: usize, w: usize) -> DirectGrid {
    DirectGrid {
        channels,
        h,
        w,
        stride: 2,
    }
}

lanes_entry! {
    /// Output channels o0..o0 + DIRECT_CHANNELS (those past `out_channels` repeat the last) of
    /// the pooled conv of the padded sample `xp` (`direct_pad_input` on `grid`, a
    /// `pooled_grid`) into the grid buffer `out`: channel r at `out[r·V·LANES..]` (V =
    /// `grid.vectors()`), pooled position (y, x) at y·row + x; the positions with x ≥ w / 2 or
    /// y ≥ h / 2 hold sums that are not pooled outputs. No bias. For bands of a lone sample,
    /// whose rows of a channel are not one run of y; `direct_conv3x3_pooled_planes` otherwise.
    pub fn direct_conv3x3_pooled_block(xp: &[f32], grid: DirectGrid, w: &[f32], out_channels: usize, o0: usize, out: &mut [f32]) => block
}

#[inline(always)]
fn block<V: Lanes>(xp: &[f32], grid: DirectGrid, w: &[f32], out_channels: usize, o0: usize, out: &mut [f32]) {
    let nv = grid.vectors();
    assert!(
        out.len() >= DIRECT_CHANNELS * nv * LANES,
        "direct_conv3x3_pooled_block: out"
    );
    pooled::<V>(xp, grid, w, out_channels, o0, |r, v, m| {
        m.store(&mut out[r * nv * LANES + v * LANES..]);
    });
}

/// The pooled outputs of one vector of a pooled grid: the lanes that are outputs (x < w/2,
/// y < h/2) and the index in the pooled plane of the first of them.
#[derive(Clone, Copy, Debug, Default)]
pub struct KeptLanes {
    pub keep: u16,
    pub at: u32,
}

/// `KeptLanes` of every vector of `grid` (a `pooled_grid`) into `lanes`.
pub fn pooled_lanes(grid: DirectGrid, lanes: &mut Vec<KeptLanes>) {
    let (row, ph, pw) = (grid.row(), grid.h / 2, grid.w / 2);
    lanes.clear();
    let mut at = 0u32;
    for v in 0..grid.vectors() {
        let mut keep = 0u16;
        for l in 0..LANES {
            let p = v * LANES + l;
            if p / row < ph && p % row < pw {
                keep |= 1 << l;
            }
        }
        lanes.push(KeptLanes { keep, at });
        at += keep.count_ones();
    }
}

/// The epilogue of `direct_conv3x3_pooled_planes`: + bias[o], then ReLU when `relu`, each
/// vector's outputs stored at their places in the plane (`lanes`: `pooled_lanes` of the grid).
#[derive(Clone, Copy)]
pub struct PooledPlanes<'a> {
    pub bias: Option<&'a [f32]>,
    pub relu: bool,
    pub lanes: &'a [KeptLanes],
}

lanes_entry! {
    /// `direct_conv3x3_pooled_block` with its epilogue (`PooledPlanes`), straight into y: the
    /// channels o0.. (up to DIRECT_CHANNELS, as many whole planes of (h/2)·(w/2) as `y`
    /// holds). Where the block went through a grid buffer and a copy of its rows (masked
    /// loads and stores of 14 values a row: a tenth of seed-cnn's folded forward), each vector
    /// is compressed to its outputs in a register and stored once.
    pub fn direct_conv3x3_pooled_planes(xp: &[f32], grid: DirectGrid, w: &[f32], out_channels: usize, o0: usize, epilogue: PooledPlanes, y: &mut [f32]) => planes
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn planes<V: Lanes>(
    xp: &[f32],
    grid: DirectGrid,
    w: &[f32],
    out_channels: usize,
    o0: usize,
    e: PooledPlanes,
    y: &mut [f32],
) {
    let plane = (grid.h / 2) * (grid.w / 2);
    assert_eq!(e.lanes.len(), grid.vectors(), "direct_conv3x3_pooled_planes: lanes");
    let channels = (y.len() / plane.max(1)).min(DIRECT_CHANNELS);
    let bias: [V; DIRECT_CHANNELS] =
        std::array::from_fn(|r| V::splat(e.bias.map_or(0.0, |b| b[(o0 + r).min(out_channels - 1)])));
    pooled::<V>(xp, grid, w, out_channels, o0, |r, v, m| {
        if r >= channels {
            return;
        }
        let m = if e.bias.is_some() { m + bias[r] } else { m };
        let m = if e.relu { m.relu() } else { m };
        let KeptLanes { keep, at } = e.lanes[v];
        if keep != 0 {
            m.store_kept(keep, &mut y[r * plane + at as usize..(r + 1) * plane]);
        }
    });
}

/// The pooled conv of 16 positions at a time, each channel r's pooled vector v handed to
/// `store(r, v, max)`.
#[inline(always)]
fn pooled<V: Lanes>(
    xp: &[f32],
    grid: DirectGrid,
    w: &[f32],
    out_channels: usize,
    o0: usize,
    mut store: impl FnMut(usize, usize, V),
) {
    assert_eq!(grid.stride, 2, "direct_conv3x3_pooled_block: a pooled grid");
    let (c, plane, nv) = (grid.channels, grid.plane(), grid.vectors());
    let k = c * 9;
    // Combination (3, 3) reaches a row and a column past the stride-2 taps, which the grid's
    // slack (three phase planes past the last channel's first) covers.
    assert!(xp.len() >= grid.padded_len(), "direct_conv3x3_pooled_block: input");
    let offsets: [[usize; 4]; 4] = std::array::from_fn(|sy| std::array::from_fn(|sx| grid.tap(sy, sx)));
    let span = LANES + offsets[3][3];
    let ws: [&[f32]; DIRECT_CHANNELS] = std::array::from_fn(|r| {
        let o = (o0 + r).min(out_channels - 1);
        &w[o * k..(o + 1) * k]
    });
    for v in 0..nv {
        // acc[r][ry][rx]: channel r's conv output of phase (ry, rx).
        let mut acc = [[[V::zero(); 2]; 2]; DIRECT_CHANNELS];
        for ci in 0..c {
            let xc = &xp[ci * plane + v * LANES..][..span];
            let at = |sy: usize| -> [V; 4] { std::array::from_fn(|sx| V::load(&xc[offsets[sy][sx]..])) };
            let wc: [&[f32]; DIRECT_CHANNELS] = std::array::from_fn(|r| &ws[r][ci * 9..ci * 9 + 9]);
            // Input row combination sy feeds phase ry through kernel row ky = sy - ry; rising
            // sy gives each phase its kernel rows in order, and within a row its columns.
            input_row::<V, 0>(at(0), &wc, &mut acc);
            input_row::<V, 1>(at(1), &wc, &mut acc);
            input_row::<V, 2>(at(2), &wc, &mut acc);
            input_row::<V, 3>(at(3), &wc, &mut acc);
        }
        for (r, a) in acc.iter().enumerate() {
            store(r, v, a[0][0].pool_max(a[0][1]).pool_max(a[1][0].pool_max(a[1][1])));
        }
    }
}

/// The multiply-adds of input row combination SY (its four column combinations `xs`) into
/// every phase it feeds; SY a constant, so that every index below is one and the
/// accumulators stay in registers (with a run-time row range they went to the stack).
#[inline(always)]
fn input_row<V: Lanes, const SY: usize>(
    xs: [V; 4],
    wc: &[&[f32]; DIRECT_CHANNELS],
    acc: &mut [[[V; 2]; 2]; DIRECT_CHANNELS],
) {
    for (w, ar) in wc.iter().zip(acc.iter_mut()) {
        for (ry, phases) in ar.iter_mut().enumerate() {
            if SY < ry || SY - ry > 2 {
                continue;
            }
            let ky = SY - ry;
            for kx in 0..3 {
                let b = V::splat(w[ky * 3 + kx]);
                for (rx, a) in phases.iter_mut().enumerate() {
                    *a = b.mul_add(xs[rx + kx], *a);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::conv_direct::{direct_conv3x3_block, direct_pad_input, test_sample};
    use crate::kernels::reduce::beats;

    /// Every pooled output equals conv_direct's stride-1 block pooled in PyTorch's window
    /// order, bit for bit: even and odd sides, maps of one pooled row or column, a partial
    /// block of output channels, several input channels, and NaNs and signed zeros in the
    /// windows (the max's NaN rule and its first-of-equals).
    #[test]
    fn pooled_blocks_are_the_direct_block_pooled_bit_for_bit() {
        let shapes = [
            (1, 32, 28, 28),
            (3, 5, 7, 7),
            (2, 6, 5, 13),
            (4, 9, 2, 2),
            (1, 4, 3, 8),
            (5, 8, 14, 14),
        ];
        for (c, oc, h, w) in shapes {
            let (grid, mut x, wt, _) = test_sample(c, oc, h, w, 1);
            // A NaN and signed zeros in a few windows (zero weights' products of ±0).
            x[(h / 2) * w + w / 2] = f32::NAN;
            let mut wt = wt;
            if oc > 3 {
                wt[3 * c * 9..4 * c * 9].fill(0.0);
                wt[3 * c * 9] = -0.0;
            }
            let mut xp = vec![f32::NAN; grid.padded_len()];
            direct_pad_input(&x, grid, &mut xp);
            let pg = pooled_grid(c, h, w);
            let mut pp = vec![f32::NAN; pg.padded_len()];
            direct_pad_input(&x, pg, &mut pp);
            let (span, pspan) = (grid.vectors() * LANES, pg.vectors() * LANES);
            let mut full = vec![f32::NAN; grid.block_len(DIRECT_CHANNELS)];
            let mut got = vec![f32::NAN; pg.block_len(DIRECT_CHANNELS)];
            for o0 in (0..oc).step_by(DIRECT_CHANNELS) {
                direct_conv3x3_block(&xp, grid, &wt, oc, o0, &mut full);
                direct_conv3x3_pooled_block(&pp, pg, &wt, oc, o0, &mut got);
                for r in 0..DIRECT_CHANNELS.min(oc - o0) {
                    for y in 0..h / 2 {
                        for xx in 0..w / 2 {
                            let at = |dy: usize, dx: usize| full[r * span + (2 * y + dy) * grid.row() + 2 * xx + dx];
                            let mut want = f32::NEG_INFINITY;
                            for (dy, dx) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                                if beats(at(dy, dx), want) {
                                    want = at(dy, dx);
                                }
                            }
                            let g = got[r * pspan + y * pg.row() + xx];
                            assert!(
                                g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                                "c {c} oc {oc} {h}x{w}: out[{}][{y}][{xx}] {g} vs {want}",
                                o0 + r
                            );
                        }
                    }
                }
            }
        }
    }
}
