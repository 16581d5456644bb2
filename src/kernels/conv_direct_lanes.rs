//! The direct 3x3 convolution (kernels::conv_direct's padded grid and taps) with the output
//! channels in the vector lanes instead of the positions, for a lone sample on small maps
//! (7x7 at batch 1), where 16 positions per vector waste lanes on the grid's padding columns
//! and the 4-channel register block reloads each input vector for every 4 channels. The
//! weights are packed once, [group of 2·LANES output channels][C][9 taps][2·LANES]; a block
//! of 2 channel vectors × NP positions of one output row stays in registers while the loop
//! runs over the C·9 (channel, tap) pairs: per pair 2 weight loads, NP broadcasts of an input
//! value and 2·NP fused multiply-adds:
//!
//!   out[o][y][x] = Σ_c Σ_t packed[o / 2L][c][t][o mod 2L] · xp[c][y·row + x + tap(t)]
//!
//! The sum runs in the same order as conv_direct's (channel, then tap, one rounding per
//! multiply-add), so both kernels give the same bits.

use crate::kernels::conv_direct::DirectGrid;
use crate::kernels::lanes::{lanes_entry, Lanes, LANES};

/// Output channels per group: two vectors.
pub const LANE_CHANNELS: usize = 2 * LANES;

/// Positions per register block: one 7-wide row (vgg's and resnet's last maps) in 14
/// accumulators, 2 weight vectors and a broadcast of AVX-512's 32 registers.
const NP: usize = 7;

/// Packs [OC, C, 3, 3] weights into `packed` as [⌈OC / LANE_CHANNELS⌉][C][9][LANE_CHANNELS],
/// the channels past OC zero.
pub fn pack_lane_weights(w: &[f32], out_channels: usize, channels: usize, packed: &mut [f32]) {
    let k = channels * 9;
    assert_eq!(w.len(), out_channels * k, "pack_lane_weights: weights");
    let groups = out_channels.div_ceil(LANE_CHANNELS);
    assert_eq!(packed.len(), groups * k * LANE_CHANNELS, "pack_lane_weights: packed");
    packed.fill(0.0);
    for (o, wo) in w.chunks_exact(k).enumerate() {
        let group = &mut packed[(o / LANE_CHANNELS) * k * LANE_CHANNELS..][..k * LANE_CHANNELS];
        for (j, &v) in wo.iter().enumerate() {
            group[j * LANE_CHANNELS + o % LANE_CHANNELS] = v;
        }
    }
}

lanes_entry! {
    /// The LANE_CHANNELS output channels of one packed group `wg` ([C][9][LANE_CHANNELS]) of
    /// the conv of the padded sample `xp`, on the output grid as conv_direct writes it: channel
    /// r at `out[r·V·LANES..]` (V = `grid.vectors()`), position (y, x) at y·row + x; the
    /// columns x ≥ out_w are not written.
    pub fn lanes_conv3x3_group(xp: &[f32], grid: DirectGrid, wg: &[f32], out: &mut [f32]) => group
}

#[inline(always)]
fn group<V: Lanes>(xp: &[f32], grid: DirectGrid, wg: &[f32], out: &mut [f32]) {
    let (c, plane, row) = (grid.channels, grid.plane(), grid.row());
    let span = grid.vectors() * LANES;
    assert!(wg.len() >= c * 9 * LANE_CHANNELS, "lanes_conv3x3_group: weights");
    assert!(out.len() >= LANE_CHANNELS * span, "lanes_conv3x3_group: out");
    let taps: [usize; 9] = std::array::from_fn(|t| grid.tap(t / 3, t % 3));
    let reach = NP + taps.iter().max().copied().unwrap_or(0);
    let (oh, ow) = (grid.out_h(), grid.out_w());
    for y in 0..oh {
        for x0 in (0..ow).step_by(NP) {
            let at = y * row + x0;
            let mut acc = [[V::zero(); NP]; 2];
            for ci in 0..c {
                // The last block of a row reads up to NP - 1 positions past the row's end, into
                // the next row or the grid's slack (padded_len); those sums are not stored.
                let xc = &xp[ci * plane + at..][..reach];
                let wc = &wg[ci * 9 * LANE_CHANNELS..][..9 * LANE_CHANNELS];
                for (t, &off) in taps.iter().enumerate() {
                    let xt = &xc[off..off + NP];
                    let wt = &wc[t * LANE_CHANNELS..][..LANE_CHANNELS];
                    let w = [V::load(wt), V::load(&wt[LANES..])];
                    for (p, &v) in xt.iter().enumerate() {
                        let s = V::splat(v);
                        for (a, wv) in acc.iter_mut().zip(w) {
                            a[p] = wv.mul_add(s, a[p]);
                        }
                    }
                }
            }
            let np = NP.min(ow - x0);
            for (h, ah) in acc.iter().enumerate() {
                for (p, a) in ah[..np].iter().enumerate() {
                    let mut v = [0.0f32; LANES];
                    a.store(&mut v);
                    for (r, value) in v.into_iter().enumerate() {
                        out[(h * LANES + r) * span + at + p] = value;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::conv_direct::{direct_conv3x3_block, test_sample, DIRECT_CHANNELS};

    /// Every output channel and position equals conv_direct's block bit for bit (the same
    /// sums in the same order), stride 1 and 2, maps narrower than a register block, one
    /// block wide and wider with a partial last block, channel counts that leave a partial
    /// group.
    #[test]
    fn lane_groups_are_the_direct_kernel_bit_for_bit() {
        let shapes = [
            (3, 5, 7, 7),
            (2, 33, 5, 13),
            (5, 40, 14, 14),
            (1, 32, 3, 2),
            (4, 64, 9, 8),
        ];
        for ((c, oc, h, w), stride) in shapes.into_iter().flat_map(|s| [(s, 1), (s, 2)]) {
            let (grid, _, wt, xp) = test_sample(c, oc, h, w, stride);
            let mut packed = vec![f32::NAN; oc.div_ceil(LANE_CHANNELS) * c * 9 * LANE_CHANNELS];
            pack_lane_weights(&wt, oc, c, &mut packed);
            let span = grid.vectors() * LANES;
            let mut want = vec![0.0; grid.block_len(DIRECT_CHANNELS)];
            let mut got = vec![f32::NAN; LANE_CHANNELS * span];
            for (g, wg) in packed.chunks(c * 9 * LANE_CHANNELS).enumerate() {
                lanes_conv3x3_group(&xp, grid, wg, &mut got);
                for o in g * LANE_CHANNELS..((g + 1) * LANE_CHANNELS).min(oc) {
                    let r = o % DIRECT_CHANNELS;
                    direct_conv3x3_block(&xp, grid, &wt, oc, o - r, &mut want);
                    for y in 0..grid.out_h() {
                        for xx in 0..grid.out_w() {
                            let at = y * grid.row() + xx;
                            let (a, b) = (got[(o % LANE_CHANNELS) * span + at], want[r * span + at]);
                            assert!(
                                a.to_bits() == b.to_bits(),
                                "c {c} oc {oc} {h}x{w} stride {stride}: out[{o}][{y}][{xx}] {a} vs {b}"
                            );
                        }
                    }
                }
            }
        }
    }
}
