//! Direct 3x3 padding-1 convolution of one sample, stride 1 or 2, for the shapes where im2col +
//! gemm and Winograd spend more on moving data than on multiplying: a lone sample (inference
//! at batch 1) and few channels. Stride 1: the input is copied once into a zero-padded map
//! whose rows are W + 2 wide; on that grid each tap of the kernel is a fixed shift, so an
//! output run of 16 consecutive positions (crossing rows; the 2 positions per row that fall on
//! the padding are computed and dropped) reads 16 consecutive inputs per tap:
//!
//!   out[o][p] = Σ_c Σ_{ky,kx} w[o][c][ky][kx] · xp[c][p + ky·(W+2) + kx]
//!
//! Stride 2: the padded map is split into its four phases P_ab[i][j] = xp[2i + a][2j + b]
//! (rows ⌈(W+2)/2⌉ wide); tap (ky, kx) reads phase (ky mod 2, kx mod 2) shifted by
//! (⌊ky/2⌋, ⌊kx/2⌋), again a fixed shift on the output grid, whose rows are the phases' width.
//!
//! A block of 4 output channels × NB vectors of 16 positions stays in registers (24
//! accumulators at NB = 6) while the loop runs over the C·9 (channel, tap) pairs: per pair NB
//! loads, 4 broadcasts and 4·NB fused multiply-adds, in the same order for every position, so
//! the result does not depend on the blocking or the thread count.

use crate::kernels::lanes::{lanes_entry, Lanes, LANES};

/// Output channels computed together (the rows of the register block).
pub const DIRECT_CHANNELS: usize = 4;

/// The padded grid of one sample's map: `channels` maps of h × w, convolved with `stride`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirectGrid {
    pub channels: usize,
    pub h: usize,
    pub w: usize,
    /// 1 or 2.
    pub stride: usize,
}

impl DirectGrid {
    /// Output rows and columns.
    pub fn out_h(&self) -> usize {
        (self.h - 1) / self.stride + 1
    }
    pub fn out_w(&self) -> usize {
        (self.w - 1) / self.stride + 1
    }
    /// The row length of the output grid and of the (phase) planes: W + 2, or ⌈(W+2)/2⌉.
    pub fn row(&self) -> usize {
        (self.w + 2).div_ceil(self.stride)
    }
    /// Rows of one (phase) plane.
    fn plane_rows(&self) -> usize {
        (self.h + 2).div_ceil(self.stride)
    }
    /// One channel of the padded input: its map, or its four phase planes.
    pub fn plane(&self) -> usize {
        self.stride * self.stride * self.plane_rows() * self.row()
    }
    /// Where tap (ky, kx) reads, relative to the output position, within a channel.
    pub(crate) fn tap(&self, ky: usize, kx: usize) -> usize {
        let s = self.stride;
        let phase = (ky % s) * s + kx % s;
        phase * self.plane_rows() * self.row() + (ky / s) * self.row() + kx / s
    }
    /// The farthest any tap reads past the output position.
    fn reach(&self) -> usize {
        (0..9).map(|t| self.tap(t / 3, t % 3)).max().unwrap_or(0)
    }
    /// Vectors of LANES output positions covering the output grid's out_h · row positions.
    pub fn vectors(&self) -> usize {
        (self.out_h() * self.row()).div_ceil(LANES)
    }
    /// The padded input's length: every channel, plus the slack the last vector's taps read
    /// past the last one (those positions are dropped).
    pub fn padded_len(&self) -> usize {
        self.channels * self.plane() + self.vectors() * LANES + self.reach()
    }
    /// The length of an output block of `channels` maps on the output grid (DIRECT_CHANNELS
    /// for this kernel, LANE_CHANNELS for conv_direct_lanes).
    pub fn block_len(&self, channels: usize) -> usize {
        channels * self.vectors() * LANES
    }
}

/// xp = x [C, H, W] zero-padded by one on every side, rows W + 2 apart; with stride 2 split
/// into the four phase planes (`grid.padded_len()` values; the slack past the maps is zeroed
/// too).
pub fn direct_pad_input(x: &[f32], grid: DirectGrid, xp: &mut [f32]) {
    direct_pad_rows(x, grid.h, 0, grid, xp);
}

/// `direct_pad_input` for a band of output rows: the padded rows `first..first + grid.h + 2`
/// of a sample of `full_h` rows (x: [C, full_h, W]) as the padded map of a `grid.h`-row
/// sample, rows outside the image zero. The band's grid computes output rows
/// first/stride.. of the whole map (stride 2: `first` even, so every row keeps its phase).
pub fn direct_pad_rows(x: &[f32], full_h: usize, first: usize, grid: DirectGrid, xp: &mut [f32]) {
    assert!(
        grid.stride == 1 || first.is_multiple_of(2),
        "direct_pad_rows: an odd first row with stride 2"
    );
    let (w, row, plane) = (grid.w, grid.row(), grid.plane());
    let xp = &mut xp[..grid.padded_len()];
    xp.fill(0.0);
    // The band's padded rows i that hold image rows: first + i - 1 in 0..full_h.
    let rows = first.max(1) - first..(full_h + 1).saturating_sub(first).min(grid.h + 2);
    let phase_len = grid.plane_rows() * row;
    for (xc, pc) in x.chunks_exact(full_h * w).take(grid.channels).zip(xp.chunks_mut(plane)) {
        for i in rows.clone() {
            let xr = &xc[(first + i - 1) * w..][..w];
            if grid.stride == 1 {
                pc[i * row + 1..][..w].copy_from_slice(xr);
                continue;
            }
            // Padded position (i, c) goes to phase (i mod 2, c mod 2) at (i/2, c/2): even x
            // to the odd-column phase at x/2, odd x to the even-column phase at (x+1)/2.
            let at = (i % 2) * 2 * phase_len + (i / 2) * row;
            let (even_c, odd_c) = pc[at..].split_at_mut(phase_len);
            let (even_c, odd_c) = (&mut even_c[1..], &mut odd_c[..row]);
            for ((pair, e), o) in xr.chunks_exact(2).zip(even_c.iter_mut()).zip(odd_c.iter_mut()) {
                *o = pair[0];
                *e = pair[1];
            }
            if w % 2 == 1 {
                odd_c[w / 2] = xr[w - 1];
            }
        }
    }
}

lanes_entry! {
    /// y = act(src + bias) row by row, y's rows of `w` values taken from rows `row` apart in
    /// `src` (a direct conv's padded output grid); with `res` (y's shape) y = ReLU((src + bias)
    /// + res), the order of the separate passes. One pass where a copy and then
    /// `add_bias_relu` over the copy were two: resnet's stem (1 -> 16, 28x28, batch 128) 249
    /// -> 244 µs alone, 3 alternating runs; the whole forwards level within their noise.
    /// On vectors with masked ends: auto-vectorized, a 28-wide row took a vector and 12 scalar
    /// steps, and the copy was a quarter of a batch-1 1->32 conv's profile.
    pub fn copy_rows_bias_relu(src: &[f32], row: usize, y: &mut [f32], w: usize, bias: Option<f32>, res: Option<&[f32]>, relu: bool) => copy_rows
}

#[inline(always)]
fn copy_rows<V: Lanes>(
    src: &[f32],
    row: usize,
    y: &mut [f32],
    w: usize,
    bias: Option<f32>,
    res: Option<&[f32]>,
    relu: bool,
) {
    let b = V::splat(bias.unwrap_or(0.0));
    for (yy, yr) in y.chunks_mut(w).enumerate() {
        let s = &src[yy * row..yy * row + yr.len()];
        let r = res.map(|r| &r[yy * w..yy * w + yr.len()]);
        for at in (0..yr.len()).step_by(LANES) {
            let n = (yr.len() - at).min(LANES);
            let mut v = V::load_first(&s[at..], n);
            if bias.is_some() {
                v = v + b;
            }
            if let Some(r) = r {
                v = (v + V::load_first(&r[at..], n)).relu();
            } else if relu {
                v = v.relu();
            }
            v.store_first(&mut yr[at..], n);
        }
    }
}

/// Whether this CPU runs the direct kernel on vectors (AVX-512); elsewhere it runs on plain
/// arrays, correct but slower than im2col + gemm, and `auto` does not take it.
pub fn direct_is_vectorized() -> bool {
    crate::kernels::lanes::has_avx512()
}

/// Whether this CPU runs AVX-512 at half rate: AMD's family 19h (Zen 4) splits each 512-bit
/// operation over two 256-bit units, so the direct kernel's multiply-adds cost twice what they
/// cost on Intel's 512-bit units, and Winograd's saved multiplies pay on smaller convs
/// (nn::conv2d's `auto_passes` picks by it). Asked once (cpuid traps to the hypervisor in a VM).
pub fn vectors_run_at_half_rate() -> bool {
    static HALF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HALF.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::__cpuid;
            #[allow(unused_unsafe)]
            // SAFETY: cpuid leaves 0 and 1 exist on every x86_64 CPU.
            let (vendor, signature) = unsafe { (__cpuid(0), __cpuid(1).eax) };
            // "AuthenticAMD" in ebx, edx, ecx.
            let amd = [vendor.ebx, vendor.edx, vendor.ecx] == [0x6874_7541, 0x6974_6e65, 0x444d_4163];
            let family = ((signature >> 8) & 0xf) + ((signature >> 20) & 0xff);
            amd && family == 0x19 && direct_is_vectorized()
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

lanes_entry! {
    /// Output channels o0..o0 + DIRECT_CHANNELS of the conv of the padded sample `xp` with the
    /// [OC, C, 3, 3] weights `w`, on the output grid: channel o0 + r at `out[r·V·LANES..]`
    /// (V = `grid.vectors()`), position (y, x) at y·row + x (`grid.row()`); the columns
    /// x ≥ out_w hold nothing useful. Channels past OC repeat the last one's values (not to be
    /// read).
    pub fn direct_conv3x3_block(xp: &[f32], grid: DirectGrid, w: &[f32], out_channels: usize, o0: usize, out: &mut [f32]) => block
}

#[inline(always)]
fn block<V: Lanes>(xp: &[f32], grid: DirectGrid, w: &[f32], out_channels: usize, o0: usize, out: &mut [f32]) {
    let nv = grid.vectors();
    // Vectors per register block: the one of 4..=6 that wastes the least on the last block
    // (which is shifted back to end at the last vector, recomputing a few); fewer on tiny maps.
    let nb = if nv < 6 {
        nv
    } else {
        (4..=6)
            .min_by_key(|&b| (nv.div_ceil(b) * b, usize::MAX - b))
            .unwrap_or(6)
    };
    match nb {
        1 => run::<V, 1>(xp, grid, w, out_channels, o0, out),
        2 => run::<V, 2>(xp, grid, w, out_channels, o0, out),
        3 => run::<V, 3>(xp, grid, w, out_channels, o0, out),
        4 => run::<V, 4>(xp, grid, w, out_channels, o0, out),
        5 => run::<V, 5>(xp, grid, w, out_channels, o0, out),
        _ => run::<V, 6>(xp, grid, w, out_channels, o0, out),
    }
}

#[inline(always)]
fn run<V: Lanes, const NB: usize>(
    xp: &[f32],
    grid: DirectGrid,
    w: &[f32],
    out_channels: usize,
    o0: usize,
    out: &mut [f32],
) {
    let (c, plane, nv) = (grid.channels, grid.plane(), grid.vectors());
    let k = c * 9;
    let taps: [usize; 9] = std::array::from_fn(|t| grid.tap(t / 3, t % 3));
    // 9, opaque to the compiler: with a known trip count LLVM unrolls the taps at NB ≤ 4 and
    // spills accumulators (7x7 128->128, one thread: 128 -> 145 µs).
    let ntaps = std::hint::black_box(taps.len());
    let ws: [&[f32]; DIRECT_CHANNELS] = std::array::from_fn(|r| {
        let o = (o0 + r).min(out_channels - 1);
        &w[o * k..(o + 1) * k]
    });
    let span = NB * LANES + grid.reach();
    let mut start = 0;
    while start < nv {
        let s = start.min(nv - NB);
        let mut acc = [[V::zero(); NB]; DIRECT_CHANNELS];
        for ci in 0..c {
            let xc = &xp[ci * plane + s * LANES..][..span];
            for (t, &off) in taps[..ntaps].iter().enumerate() {
                // One bounds check per tap: the NB loads are then provably in range (checked per
                // load, the checks were as many instructions as the multiply-adds).
                let xt = &xc[off..off + NB * LANES];
                let xs: [V; NB] = std::array::from_fn(|v| V::load(&xt[v * LANES..]));
                for (r, wr) in ws.iter().enumerate() {
                    let b = V::splat(wr[ci * 9 + t]);
                    for v in 0..NB {
                        acc[r][v] = b.mul_add(xs[v], acc[r][v]);
                    }
                }
            }
        }
        for (r, ar) in acc.iter().enumerate() {
            let dst = &mut out[r * nv * LANES + s * LANES..];
            for (v, a) in ar.iter().enumerate() {
                a.store(&mut dst[v * LANES..]);
            }
        }
        start += NB;
    }
}

/// A test sample: the grid of a C×h×w map convolved with `stride`, its values x, [OC, C, 3, 3]
/// weights and the padded input (both kernels' tests).
#[cfg(test)]
pub(crate) fn test_sample(
    c: usize,
    oc: usize,
    h: usize,
    w: usize,
    stride: usize,
) -> (DirectGrid, Vec<f32>, Vec<f32>, Vec<f32>) {
    let grid = DirectGrid {
        channels: c,
        h,
        w,
        stride,
    };
    let x: Vec<f32> = (0..c * h * w).map(|i| ((i * 37 % 101) as f32) / 50.0 - 1.0).collect();
    let wt: Vec<f32> = (0..oc * c * 9).map(|i| ((i * 53 % 89) as f32) / 44.0 - 1.0).collect();
    let mut xp = vec![f32::NAN; grid.padded_len()];
    direct_pad_input(&x, grid, &mut xp);
    (grid, x, wt, xp)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The block equals the definition computed in f64 (to f32 rounding), stride 1 and 2, for
    /// maps whose output grid is shorter than one register block, one block and several, odd
    /// and even sides, and channel counts that leave a partial block of output channels.
    #[test]
    fn direct_block_is_the_definition() {
        let shapes = [
            (1, 3, 2, 2),
            (3, 5, 7, 7),
            (2, 4, 5, 13),
            (5, 9, 14, 14),
            (2, 6, 28, 28),
            (3, 4, 1, 1),
        ];
        for ((c, oc, h, w), stride) in shapes.into_iter().flat_map(|s| [(s, 1), (s, 2)]) {
            let (grid, x, wt, xp) = test_sample(c, oc, h, w, stride);
            let mut out = vec![f32::NAN; grid.block_len(DIRECT_CHANNELS)];
            for o0 in (0..oc).step_by(DIRECT_CHANNELS) {
                direct_conv3x3_block(&xp, grid, &wt, oc, o0, &mut out);
                for r in 0..DIRECT_CHANNELS.min(oc - o0) {
                    let o = o0 + r;
                    for y in 0..grid.out_h() {
                        for xx in 0..grid.out_w() {
                            let mut want = 0.0f64;
                            for ci in 0..c {
                                for ky in 0..3 {
                                    for kx in 0..3 {
                                        let (iy, ix) = (stride * y + ky, stride * xx + kx);
                                        if iy < 1 || ix < 1 || iy > h || ix > w {
                                            continue;
                                        }
                                        let xv = x[ci * h * w + (iy - 1) * w + ix - 1] as f64;
                                        want += wt[((o * c + ci) * 3 + ky) * 3 + kx] as f64 * xv;
                                    }
                                }
                            }
                            let got = out[r * grid.vectors() * LANES + y * grid.row() + xx] as f64;
                            assert!(
                                (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                                "c {c} oc {oc} {h}x{w} stride {stride}: out[{o}][{y}][{xx}] {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
