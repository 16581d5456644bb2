//! Winograd convolution F(m×m, 3×3) for 3x3, stride-1, padding-1 convolutions (Lavin & Gray,
//! 2016). The output is cut into m×m tiles; each reads a (m+2)×(m+2) input tile d. With the
//! constant matrices Bᵀ, G, Aᵀ:
//!
//!   y_tile = Aᵀ [ Σ_c (G g_{o,c} Gᵀ) ⊙ (Bᵀ d_c B) ] A
//!
//! so for each of the t² = (m+2)² transformed positions ξ the channel sum is one gemm,
//! M_ξ[P, OC] = V_ξ[P, C] · U_ξ[C, OC] over the P tiles of a batch of samples: t²·P·C·OC
//! multiplications where im2col+gemm does 9·m²·P·C·OC (2.25x fewer for m = 2, 4x for m = 4).
//!
//! Layouts: V and M are [P][t²][channels], tile-major, so a tile's t² transformed vectors are
//! written in one run (as [t²][P][channels] they went to t² places a buffer apart, and the
//! stores stalled); the gemm of position ξ reads rows t²·channels apart. Each sample is first
//! staged channels-last, so the transforms work on `LANES` channels at once with contiguous
//! loads (tiles as lanes needed strided gathers and ran 5x slower). The weight gradient goes through the same domain:
//! dU_ξ[C, OC] = V_ξᵀ · (A dy Aᵀ)_ξ, then dg = Gᵀ dU G. The input gradient is the forward
//! algorithm with the flipped kernel, channels swapped (a 3x3 padding-1 conv's adjoint).

mod filter;

pub use filter::{winograd_filter_gradient, winograd_filter_transform};
use std::mem::MaybeUninit;

/// The output tile size m of F(m×m, 3×3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WinogradTile {
    /// F(2×2, 3×3): 4×4 input tiles, 16 gemms, 2.25x fewer multiplications.
    F2,
    /// F(4×4, 3×3): 6×6 input tiles, 36 gemms, 4x fewer multiplications, more rounding error.
    F4,
}

impl WinogradTile {
    pub fn m(self) -> usize {
        match self {
            WinogradTile::F2 => 2,
            WinogradTile::F4 => 4,
        }
    }
    /// Input tile size t = m + 2; there are t² transformed positions.
    pub fn t(self) -> usize {
        self.m() + 2
    }
}

use crate::kernels::conv_direct::vectors_run_at_half_rate;
use crate::kernels::lanes::{lanes_entry, Lanes, Vector, HALF_LANES, LANES};

/// A 1-D transform of I values into O, applied to a window's columns and then to the rows of
/// the result (L x Lᵀ for f = L·):
/// Bᵀ, Aᵀ and A of F(2,3) and F(4,3) (points 0, ±1, ±2, ∞), written out as adds.
trait OneD<const I: usize, const O: usize> {
    fn apply<V: Vector>(x: [V; I]) -> [V; O];
}

/// Bᵀ d, F(2,3).
struct Bt2;
impl OneD<4, 4> for Bt2 {
    #[inline(always)]
    fn apply<V: Vector>([d0, d1, d2, d3]: [V; 4]) -> [V; 4] {
        [d0 - d2, d1 + d2, d2 - d1, d1 - d3]
    }
}

/// Bᵀ d, F(4,3). Products by 4 and 2 are exact, so a multiply-add rounds them as the
/// separate multiply and add did; the ones by 5 round once instead of twice.
struct Bt4;
impl OneD<6, 6> for Bt4 {
    #[inline(always)]
    fn apply<V: Vector>([d0, d1, d2, d3, d4, d5]: [V; 6]) -> [V; 6] {
        let (four, minus_four, minus_five) = (V::splat(4.0), V::splat(-4.0), V::splat(-5.0));
        let (t1, t2) = (d2.mul_add(minus_four, d4), d1.mul_add(minus_four, d3));
        let (t3, t4) = (d4 - d2, (d3 - d1).scale(2.0));
        [
            d0.mul_add(four, d2.mul_add(minus_five, d4)),
            t1 + t2,
            t1 - t2,
            t3 + t4,
            t3 - t4,
            d1.mul_add(four, d3.mul_add(minus_five, d5)),
        ]
    }
}

/// Aᵀ m, F(2,3).
struct At2;
impl OneD<4, 2> for At2 {
    #[inline(always)]
    fn apply<V: Vector>([m0, m1, m2, m3]: [V; 4]) -> [V; 2] {
        [m0 + m1 + m2, m1 - m2 - m3]
    }
}

/// Aᵀ m, F(4,3).
struct At4;
impl OneD<6, 4> for At4 {
    #[inline(always)]
    fn apply<V: Vector>([m0, m1, m2, m3, m4, m5]: [V; 6]) -> [V; 4] {
        // Products by 2, 4 and 8 are exact: the multiply-adds round as separate steps did.
        let (s12, d12, s34, d34) = (m1 + m2, m1 - m2, m3 + m4, m3 - m4);
        [
            m0 + s12 + s34,
            d34.mul_add(V::splat(2.0), d12),
            s34.mul_add(V::splat(4.0), s12),
            d34.mul_add(V::splat(8.0), d12) + m5,
        ]
    }
}

/// A g, F(2,3): the adjoint of Aᵀ.
struct A2;
impl OneD<2, 4> for A2 {
    #[inline(always)]
    fn apply<V: Vector>([g0, g1]: [V; 2]) -> [V; 4] {
        [g0, g0 + g1, g0 - g1, V::zero() - g1]
    }
}

/// A g, F(4,3).
struct A4;
impl OneD<4, 6> for A4 {
    #[inline(always)]
    fn apply<V: Vector>([g0, g1, g2, g3]: [V; 4]) -> [V; 6] {
        let (e, o) = (g0 + g2, g1 + g3);
        let (e2, o2) = (g2.mul_add(V::splat(4.0), g0), g3.mul_add(V::splat(8.0), g1.scale(2.0)));
        [g0, e + o, e - o, e2 + o2, e2 - o2, g3]
    }
}

/// Where the tiles of a batch of samples lie.
#[derive(Default, Debug)]
pub struct TilePlan {
    pub tile: Option<WinogradTile>,
    pub samples: usize,
    pub h: usize,
    pub w: usize,
    /// Tiles per column and per row of one sample.
    pub tiles_h: usize,
    pub tiles_w: usize,
    /// A band of one sample's rows: its h rows are image rows first.. of an image of full_h
    /// rows, the rows around it read from the image (a whole map: first 0, full_h = h).
    pub first: usize,
    pub full_h: usize,
    /// A last block of at most HALF_LANES channels goes through the transforms on
    /// `Lanes::Half` vectors (where AVX-512 runs at half rate: the same values at half the
    /// cost of a 16-lane vector).
    pub half_tails: bool,
}

impl TilePlan {
    /// Plans `samples` samples of h×w maps.
    pub fn update(&mut self, tile: WinogradTile, samples: usize, h: usize, w: usize) {
        let m = tile.m();
        *self = TilePlan {
            tile: Some(tile),
            samples,
            h,
            w,
            tiles_h: h.div_ceil(m),
            tiles_w: w.div_ceil(m),
            first: 0,
            full_h: h,
            half_tails: vectors_run_at_half_rate(),
        };
    }

    /// Plans rows `first..first + rows` of one sample of full_h × w maps: the transforms read
    /// the rows around the band from the image, and the output is the band's rows alone
    /// (channels × rows × w).
    pub fn update_band(&mut self, tile: WinogradTile, full_h: usize, w: usize, first: usize, rows: usize) {
        assert!(first + rows <= full_h, "winograd band: rows {first}+{rows} of {full_h}");
        self.update(tile, 1, rows, w);
        (self.first, self.full_h) = (first, full_h);
    }

    /// The staged map's rows that hold image rows (staged row r holds image row first + r - 1);
    /// the others are zero padding.
    fn staged_rows(&self) -> std::ops::Range<usize> {
        let (ph, _) = self.padded();
        usize::from(self.first == 0)..ph.min(self.full_h + 1 - self.first)
    }

    /// P: tiles over all samples.
    pub fn tiles(&self) -> usize {
        self.samples * self.tiles_h * self.tiles_w
    }

    fn m(&self) -> usize {
        self.tile.map_or(2, WinogradTile::m)
    }

    /// Rows and columns of one sample's zero-margined staged map: the tiles' extent plus the
    /// padding of 1 on each side.
    fn padded(&self) -> (usize, usize) {
        let m = self.m();
        (self.tiles_h * m + 2, self.tiles_w * m + 2)
    }

    /// Whether a block of n channels runs on `Lanes::Half` vectors.
    fn half_block(&self, n: usize) -> bool {
        self.half_tails && n <= HALF_LANES
    }

    /// Values of staging one sample of `channels` channels needs (the transforms' inputs and
    /// the output transform's channels-last result alike).
    pub fn staging_len(&self, channels: usize) -> usize {
        let (ph, pw) = self.padded();
        ph * pw * channels.next_multiple_of(LANES)
    }
}

/// Copies sample `x` [C, h, w] channels-last into `staging` [ph][pw][Cp] (Cp = C rounded up to
/// LANES) at row 1, column 1; the margins, the rows and columns past the map and the channels
/// past C stay as zeroed by the caller. LANES channels × LANES columns at a time: rows read
/// from the planes, transposed in registers, written as whole channel vectors (a value by
/// value scatter at stride Cp took 3 ns a value, a scalar transpose a tenth of a training step).
#[inline(always)]
fn stage_channels_last<V: Lanes>(plan: &TilePlan, x: &[f32], channels: usize, staging: &mut [f32]) {
    let (h, w) = (plan.full_h, plan.w);
    let (_, pw) = plan.padded();
    let cp = channels.next_multiple_of(LANES);
    for c0 in (0..channels).step_by(LANES) {
        let nc = LANES.min(channels - c0);
        for sy in plan.staged_rows() {
            let y = plan.first + sy - 1;
            for x0 in (0..w).step_by(LANES) {
                let nx = LANES.min(w - x0);
                let mut rows = [V::zero(); LANES];
                for (c, row) in rows.iter_mut().enumerate().take(nc) {
                    *row = V::load_first(&x[(c0 + c) * h * w + y * w + x0..], nx);
                }
                for (xx, col) in V::transpose(rows).iter().enumerate().take(nx) {
                    col.store(&mut staging[(sy * pw + 1 + x0 + xx) * cp + c0..]);
                }
            }
        }
    }
}

/// The inverse: y [C, h, w] of one sample from the channels-last `buf` [th·m][tw·m][Cp].
#[inline(always)]
fn unstage_channels_last<V: Lanes>(
    plan: &TilePlan,
    buf: &[f32],
    channels: usize,
    y: &mut [f32],
    residual: Option<(&[f32], bool)>,
) {
    let (h, w) = (plan.h, plan.w);
    let bw = plan.tiles_w * plan.m();
    let cp = channels.next_multiple_of(LANES);
    for c0 in (0..channels).step_by(LANES) {
        let nc = LANES.min(channels - c0);
        for yy in 0..h {
            for x0 in (0..w).step_by(LANES) {
                let nx = LANES.min(w - x0);
                let mut cols = [V::zero(); LANES];
                for (xx, col) in cols.iter_mut().enumerate().take(nx) {
                    *col = V::load(&buf[(yy * bw + x0 + xx) * cp + c0..]);
                }
                for (c, row) in V::transpose(cols).iter().enumerate().take(nc) {
                    let at = (c0 + c) * h * w + yy * w + x0;
                    let row = match residual {
                        Some((r, relu)) => {
                            let v = *row + V::load_first(&r[at..], nx);
                            if relu {
                                v.relu()
                            } else {
                                v
                            }
                        }
                        None => *row,
                    };
                    row.store_first(&mut y[at..], nx);
                }
            }
        }
    }
}

/// Transforms every tile of one staged sample: for each tile and each block of LANES channels,
/// loads the K×K window at (y0 + shift, x0 + shift) of the staged map, applies F on both sides
/// and stores position ξ at out[(p·t² + ξ)·channels + c].
#[inline(always)]
fn transform_sample<V: Lanes, const K: usize, const R: usize, F: OneD<K, R>>(
    plan: &TilePlan,
    staging: &[f32],
    channels: usize,
    shift: usize,
    first_tile: usize,
    out: &mut [f32],
) {
    let m = plan.m();
    let (_, pw) = plan.padded();
    let cp = channels.next_multiple_of(LANES);
    for ty in 0..plan.tiles_h {
        for tx in 0..plan.tiles_w {
            let p = first_tile + ty * plan.tiles_w + tx;
            let corner = (ty * m + shift) * pw + tx * m + shift;
            let tile_out = &mut out[p * R * R * channels..];
            for c0 in (0..channels).step_by(LANES) {
                let n = LANES.min(channels - c0);
                if plan.half_block(n) {
                    window_block::<V::Half, K, R, F>(staging, corner, pw, cp, c0, n, channels, tile_out);
                } else {
                    window_block::<V, K, R, F>(staging, corner, pw, cp, c0, n, channels, tile_out);
                }
            }
        }
    }
}

/// One K×K window of a vector's width of channels from c0 (n of them stored): F on the
/// columns, loaded as they are transformed, then on the rows, stored as they come (through
/// whole K×K and R×R arrays the transform spilled both to the stack and back: a quarter of its
/// time on one spill).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn window_block<V: Vector, const K: usize, const R: usize, F: OneD<K, R>>(
    staging: &[f32],
    corner: usize,
    pw: usize,
    cp: usize,
    c0: usize,
    n: usize,
    channels: usize,
    tile_out: &mut [f32],
) {
    // Written in place into uninitialized slots: a zeroed array was a libc memset of up to
    // 2.3 KB per window and channel block (behind a vzeroupper), one built by from_fn a memcpy
    // of as much (3-5% of vgg's folded inference either way).
    let mut cols = [[MaybeUninit::<V>::uninit(); R]; K];
    for (j, col) in cols.iter_mut().enumerate() {
        let t = F::apply(std::array::from_fn(|k| {
            V::load(&staging[(corner + k * pw + j) * cp + c0..])
        }));
        col.iter_mut().zip(t).for_each(|(slot, v)| {
            slot.write(v);
        });
    }
    for a in 0..R {
        // SAFETY: the loop above wrote every cols[j][a] (F gives R values per column).
        let row: [V; K] = std::array::from_fn(|j| unsafe { cols[j][a].assume_init() });
        for (b, v) in F::apply(row).into_iter().enumerate() {
            v.store_first(&mut tile_out[(a * R + b) * channels + c0..], n);
        }
    }
}

/// Zeroes what `stage_channels_last` does not write: the padding rows and columns around the
/// map and the tiles' extent past it (the output transform leaves its own layout in the same
/// buffer). The whole buffer's memset, once per batch of one or two samples, had been as many
/// bytes as the samples themselves.
fn zero_margins(plan: &TilePlan, channels: usize, staging: &mut [f32]) {
    let (ph, pw) = plan.padded();
    let (w, cp) = (plan.w, channels.next_multiple_of(LANES));
    let row = pw * cp;
    let staged = plan.staged_rows();
    staging[..staged.start * row].fill(0.0);
    staging[staged.end * row..ph * row].fill(0.0);
    for r in staging[staged.start * row..staged.end * row].chunks_exact_mut(row) {
        r[..cp].fill(0.0);
        r[(w + 1) * cp..].fill(0.0);
    }
}

/// Stages each sample channels-last and transforms all its tiles (`transform_sample`).
#[inline(always)]
fn transform_batch<V: Lanes, const K: usize, const R: usize, F: OneD<K, R>>(
    plan: &TilePlan,
    src: &[f32],
    channels: usize,
    shift: usize,
    out: &mut [f32],
    staging: &mut [f32],
) {
    let staging = &mut staging[..plan.staging_len(channels)];
    let per_sample = plan.tiles_h * plan.tiles_w;
    zero_margins(plan, channels, staging);
    let samples = src.chunks_exact(channels * plan.full_h * plan.w).take(plan.samples);
    for (s, sample) in samples.enumerate() {
        stage_channels_last::<V>(plan, sample, channels, staging);
        transform_sample::<V, K, R, F>(plan, staging, channels, shift, s * per_sample, out);
    }
}

#[inline(always)]
fn input_transform<V: Lanes>(plan: &TilePlan, x: &[f32], channels: usize, v: &mut [f32], staging: &mut [f32]) {
    match plan.tile {
        Some(WinogradTile::F2) => transform_batch::<V, 4, 4, Bt2>(plan, x, channels, 0, v, staging),
        Some(WinogradTile::F4) => transform_batch::<V, 6, 6, Bt4>(plan, x, channels, 0, v, staging),
        None => {}
    }
}

lanes_entry! {
    /// V[p][ξ][c] = (Bᵀ d_{p,c} B)[ξ] for the tiles p of the plan's samples (x: samples ×
    /// channels × h × w, zero padding 1). `staging` holds plan.staging_len(channels) values;
    /// v holds t²·P·channels.
    pub fn winograd_input_transform(plan: &TilePlan, x: &[f32], channels: usize, v: &mut [f32], staging: &mut [f32]) => input_transform
}

// The m×m output tile starts one row and one column past the staged corner: shift 1.
#[inline(always)]
fn gradient_transform<V: Lanes>(plan: &TilePlan, dy: &[f32], channels: usize, dm: &mut [f32], staging: &mut [f32]) {
    match plan.tile {
        Some(WinogradTile::F2) => transform_batch::<V, 2, 4, A2>(plan, dy, channels, 1, dm, staging),
        Some(WinogradTile::F4) => transform_batch::<V, 4, 6, A4>(plan, dy, channels, 1, dm, staging),
        None => {}
    }
}

lanes_entry! {
    /// DM[p][ξ][o] = (A dy_{p,o} Aᵀ)[ξ]: the gradient reaching M_ξ from an output gradient
    /// (samples × channels × h × w), positions past the map counting as zero.
    pub fn winograd_gradient_transform(plan: &TilePlan, dy: &[f32], channels: usize, dm: &mut [f32], staging: &mut [f32]) => gradient_transform
}

/// One sample's output tiles into the channels-last `buf` [th·m][tw·m][Cp]: Aᵀ M A (+ bias,
/// then ReLU), whole vectors of LANES channels (a last block on `Lanes::Half` vectors leaves
/// the rest of its LANES stale: the unstaging reads only the channels that exist).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn output_sample<V: Lanes, const K: usize, const R: usize, F: OneD<K, R>>(
    plan: &TilePlan,
    mbuf: &[f32],
    channels: usize,
    first_tile: usize,
    buf: &mut [f32],
    bias: Option<&[f32]>,
    relu: bool,
) {
    for ty in 0..plan.tiles_h {
        for tx in 0..plan.tiles_w {
            let p = first_tile + ty * plan.tiles_w + tx;
            for c0 in (0..channels).step_by(LANES) {
                let n = LANES.min(channels - c0);
                let block = OutputBlock {
                    plan,
                    channels,
                    c0,
                    n,
                    ty,
                    tx,
                };
                if plan.half_block(n) {
                    block.run::<V::Half, K, R, F>(mbuf, p, buf, bias, relu);
                } else {
                    block.run::<V, K, R, F>(mbuf, p, buf, bias, relu);
                }
            }
        }
    }
}

/// Channels c0 .. c0 + n of output tile (ty, tx).
struct OutputBlock<'a> {
    plan: &'a TilePlan,
    channels: usize,
    c0: usize,
    n: usize,
    ty: usize,
    tx: usize,
}

impl OutputBlock<'_> {
    /// Aᵀ M A of tile p's block on vectors of W: columns, then rows, streamed as in
    /// `transform_sample`.
    #[inline(always)]
    fn run<W: Vector, const K: usize, const R: usize, F: OneD<K, R>>(
        &self,
        mbuf: &[f32],
        p: usize,
        buf: &mut [f32],
        bias: Option<&[f32]>,
        relu: bool,
    ) {
        let (channels, c0, n) = (self.channels, self.c0, self.n);
        let (cp, bw) = (channels.next_multiple_of(LANES), self.plan.tiles_w * R);
        let tile_m = &mbuf[p * K * K * channels + c0..];
        // In place, neither zeroed nor moved (see `window_block`).
        let mut cols = [[MaybeUninit::<W>::uninit(); R]; K];
        for (j, col) in cols.iter_mut().enumerate() {
            let t = F::apply(std::array::from_fn(|k| {
                W::load_first(&tile_m[(k * K + j) * channels..], n)
            }));
            col.iter_mut().zip(t).for_each(|(slot, v)| {
                slot.write(v);
            });
        }
        let b = bias.map_or(W::zero(), |b| W::load_first(&b[c0..], n));
        for a in 0..R {
            // SAFETY: the loop above wrote every cols[j][a].
            let row: [W; K] = std::array::from_fn(|j| unsafe { cols[j][a].assume_init() });
            for (bcol, v) in F::apply(row).into_iter().enumerate() {
                let v = if bias.is_some() { v + b } else { v };
                let v = if relu { v.relu() } else { v };
                v.store(&mut buf[((self.ty * R + a) * bw + self.tx * R + bcol) * cp + c0..]);
            }
        }
    }
}

/// Aᵀ M A per sample into the staging buffer, then out to y: as it is, or pooled (`pool`:
/// bias and ReLU then go on the pooled quarter in `unstage_pooled`), or plus `residual` (the
/// ReLU then after the sum).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn output_transform<V: Lanes>(
    plan: &TilePlan,
    mbuf: &[f32],
    channels: usize,
    y: &mut [f32],
    bias: Option<&[f32]>,
    relu: bool,
    pool: bool,
    residual: Option<&[f32]>,
    staging: &mut [f32],
) {
    assert!(!pool || residual.is_none(), "winograd output: a residual with a pool");
    let Some(tile) = plan.tile else { return };
    let per_sample = plan.tiles_h * plan.tiles_w;
    let (h, w) = if pool {
        (plan.h / 2, plan.w / 2)
    } else {
        (plan.h, plan.w)
    };
    if channels * h * w == 0 {
        return;
    }
    let (tile_bias, tile_relu) = if pool {
        (None, false)
    } else {
        (bias, relu && residual.is_none())
    };
    let len = channels * h * w;
    assert!(
        residual.is_none_or(|r| r.len() >= plan.samples * len),
        "winograd output: residual"
    );
    for (s, ys) in y.chunks_exact_mut(len).take(plan.samples).enumerate() {
        let first = s * per_sample;
        match tile {
            WinogradTile::F2 => {
                output_sample::<V, 4, 2, At2>(plan, mbuf, channels, first, staging, tile_bias, tile_relu)
            }
            WinogradTile::F4 => {
                output_sample::<V, 6, 4, At4>(plan, mbuf, channels, first, staging, tile_bias, tile_relu)
            }
        }
        if pool {
            unstage_pooled::<V>(plan, staging, channels, ys, bias, relu);
        } else {
            let r = residual.map(|r| (&r[s * len..(s + 1) * len], relu));
            unstage_channels_last::<V>(plan, staging, channels, ys, r);
        }
    }
}

lanes_entry! {
    /// y_{p,o} = Aᵀ M_{p,o} A (+ bias[o], then ReLU when `relu`) from M [P][t²][channels], into
    /// y: samples × channels × h × w, tiles clipped at the map's edge. With `pool`, followed by
    /// a 2x2 stride-2 max-pool, the bias and ReLU on the pooled quarter, into y: samples ×
    /// channels × h/2 × w/2 (the pool's floor), the same values as the conv's output pooled by
    /// `max_pool_2x2_values` (inference's ConvPool: the full-size map never leaves the staging
    /// buffer). With `residual` r (y's shape, no pool): y = (Aᵀ M A + bias) + r, then the ReLU
    /// (a residual block's last conv, its sum made while the tile is in cache).
    /// `staging` holds plan.staging_len(channels) values.
    pub fn winograd_output_transform(
        plan: &TilePlan,
        mbuf: &[f32],
        channels: usize,
        y: &mut [f32],
        bias: Option<&[f32]>,
        relu: bool,
        pool: bool,
        residual: Option<&[f32]>,
        staging: &mut [f32],
    ) => output_transform
}

/// y [C, h/2, w/2] of one sample: act(maxpool2x2(v) + b) from the channels-last conv output v
/// in `buf` [th·m][tw·m][Cp] (no bias in it yet): the pool's first-maximum rule (`pool_max`),
/// then + bias and the ReLU on the pooled quarter, max(v + b) = max(v) + b exactly as in
/// `Conv2d::forward_max_pooled`.
#[inline(always)]
fn unstage_pooled<V: Lanes>(
    plan: &TilePlan,
    buf: &[f32],
    channels: usize,
    y: &mut [f32],
    bias: Option<&[f32]>,
    relu: bool,
) {
    let (ph, pw) = (plan.h / 2, plan.w / 2);
    let bw = plan.tiles_w * plan.m();
    let cp = channels.next_multiple_of(LANES);
    for c0 in (0..channels).step_by(LANES) {
        let nc = LANES.min(channels - c0);
        let b = bias.map_or(V::zero(), |b| V::load_first(&b[c0..], nc));
        for py in 0..ph {
            let (r0, r1) = (&buf[2 * py * bw * cp + c0..], &buf[(2 * py + 1) * bw * cp + c0..]);
            for x0 in (0..pw).step_by(LANES) {
                let nx = LANES.min(pw - x0);
                let mut cols = [V::zero(); LANES];
                for (xx, col) in cols.iter_mut().enumerate().take(nx) {
                    let at = 2 * (x0 + xx) * cp;
                    let m0 = V::load(&r0[at..]).pool_max(V::load(&r0[at + cp..]));
                    let m1 = V::load(&r1[at..]).pool_max(V::load(&r1[at + cp..]));
                    let m = m0.pool_max(m1);
                    let m = if bias.is_some() { m + b } else { m };
                    *col = if relu { m.relu() } else { m };
                }
                for (c, row) in V::transpose(cols).iter().enumerate().take(nc) {
                    row.store_first(&mut y[(c0 + c) * ph * pw + py * pw + x0..], nx);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::lanes::Portable;

    /// The portable lanes give the dispatched (AVX-512 here) transforms bit for bit: the same
    /// operations in the same order, on CPUs without AVX-512 too; a staging buffer full of NaN
    /// changes nothing.
    #[test]
    fn portable_transforms_match_the_dispatched_ones() {
        let tiles = [WinogradTile::F2, WinogradTile::F4];
        for (tile, half) in tiles.into_iter().flat_map(|t| [(t, false), (t, true)]) {
            // 20 channels: a last block of 4, on half vectors when `half`; the portable
            // reference stays on 16-lane vectors.
            let (samples, channels, h, w) = (3, 20, 7, 9);
            let (mut plan, mut reference) = (TilePlan::default(), TilePlan::default());
            plan.update(tile, samples, h, w);
            reference.update(tile, samples, h, w);
            (plan.half_tails, reference.half_tails) = (half, false);
            let t2 = tile.t() * tile.t();
            let x: Vec<f32> = (0..samples * channels * h * w)
                .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
                .collect();
            let mut staging = vec![0.0; plan.staging_len(channels)];
            let len = t2 * plan.tiles() * channels;
            let (mut a, mut b) = (vec![0.0; len], vec![0.0; len]);
            input_transform::<Portable>(&reference, &x, channels, &mut a, &mut staging);
            // Whatever the buffer held before (the output transform's layout): only its
            // margins are zeroed, the rest is overwritten.
            staging.fill(f32::NAN);
            winograd_input_transform(&plan, &x, channels, &mut b, &mut staging);
            assert_eq!(a, b, "{tile:?} input, half tails {half}");
            gradient_transform::<Portable>(&reference, &x, channels, &mut a, &mut staging);
            staging.fill(f32::NAN);
            winograd_gradient_transform(&plan, &x, channels, &mut b, &mut staging);
            assert_eq!(a, b, "{tile:?} gradient, half tails {half}");
            let bias: Vec<f32> = (0..channels).map(|c| c as f32 * 0.1 - 1.0).collect();
            // The output transform in the portable version or the dispatched one.
            let out = |portable: bool, y: &mut [f32], relu: bool, pool: bool, r: Option<&[f32]>, st: &mut [f32]| {
                if portable {
                    output_transform::<Portable>(&reference, &a, channels, y, Some(&bias), relu, pool, r, st);
                } else {
                    winograd_output_transform(&plan, &a, channels, y, Some(&bias), relu, pool, r, st);
                }
            };
            let (mut ya, mut yb) = (vec![0.0; x.len()], vec![0.0; x.len()]);
            out(true, &mut ya, true, false, None, &mut staging);
            out(false, &mut yb, true, false, None, &mut staging);
            assert_eq!(ya, yb, "{tile:?} output, half tails {half}");
            // Plus a residual, then the ReLU: the separate passes' values, bit for bit.
            let r: Vec<f32> = (0..x.len()).map(|i| (i % 13) as f32 * 0.37 - 2.0).collect();
            let mut plain = vec![0.0; x.len()];
            out(false, &mut plain, false, false, None, &mut staging);
            let want: Vec<f32> = plain
                .iter()
                .zip(&r)
                .map(|(v, r)| crate::kernels::reduce::relu(v + r))
                .collect();
            out(true, &mut ya, true, false, Some(&r), &mut staging);
            out(false, &mut yb, true, false, Some(&r), &mut staging);
            assert_eq!(ya, want, "{tile:?} output + residual");
            assert_eq!(yb, want, "{tile:?} output + residual");
            let pooled = samples * channels * (h / 2) * (w / 2);
            let (mut pa, mut pb) = (vec![0.0; pooled], vec![0.0; pooled]);
            out(true, &mut pa, true, true, None, &mut staging);
            out(false, &mut pb, true, true, None, &mut staging);
            assert_eq!(pa, pb, "{tile:?} pooled output, half tails {half}");
        }
    }
}
