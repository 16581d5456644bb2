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
//! Layouts: V and M are [t²][P][channels]. Each sample is first staged channels-last, so the
//! transforms work on `LANES` channels at once with contiguous loads (tiles as lanes needed
//! strided gathers and ran 5x slower). The weight gradient goes through the same domain:
//! dU_ξ[C, OC] = V_ξᵀ · (A dy Aᵀ)_ξ, then dg = Gᵀ dU G. The input gradient is the forward
//! algorithm with the flipped kernel, channels swapped (a 3x3 padding-1 conv's adjoint).

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

/// Channels transformed together: one AVX-512 register of f32.
const LANES: usize = 16;

/// A vector of LANES channels' values. The transforms are written once on this trait and
/// compiled twice: on AVX-512 registers through intrinsics and on plain arrays. Arrays alone
/// were turned by LLVM into gathers and scatters across the tile (5-10x slower); both
/// versions do the same adds, subtracts and multiplies in the same order, so they agree bit
/// for bit.
trait Lanes: Copy + std::ops::Add<Output = Self> + std::ops::Sub<Output = Self> {
    fn zero() -> Self;
    /// The first LANES values of `src`.
    fn load(src: &[f32]) -> Self;
    fn store(self, dst: &mut [f32]);
    fn scale(self, c: f32) -> Self;
    /// max(v, 0) lane by lane, 0 for NaN (as `reduce::relu`).
    fn relu(self) -> Self;
}

#[derive(Clone, Copy)]
struct Portable([f32; LANES]);

impl std::ops::Add for Portable {
    type Output = Self;
    #[inline(always)]
    fn add(mut self, o: Self) -> Self {
        self.0.iter_mut().zip(o.0).for_each(|(a, b)| *a += b);
        self
    }
}

impl std::ops::Sub for Portable {
    type Output = Self;
    #[inline(always)]
    fn sub(mut self, o: Self) -> Self {
        self.0.iter_mut().zip(o.0).for_each(|(a, b)| *a -= b);
        self
    }
}

impl Lanes for Portable {
    #[inline(always)]
    fn zero() -> Self {
        Portable([0.0; LANES])
    }
    #[inline(always)]
    fn load(src: &[f32]) -> Self {
        let mut v = [0.0; LANES];
        v.copy_from_slice(&src[..LANES]);
        Portable(v)
    }
    #[inline(always)]
    fn store(self, dst: &mut [f32]) {
        dst[..LANES].copy_from_slice(&self.0);
    }
    #[inline(always)]
    fn scale(mut self, c: f32) -> Self {
        self.0.iter_mut().for_each(|a| *a *= c);
        self
    }
    #[inline(always)]
    fn relu(mut self) -> Self {
        self.0.iter_mut().for_each(|a| *a = crate::kernels::reduce::relu(*a));
        self
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// LANES f32 in one register; only built inside functions compiled with AVX-512F and
    /// called after `is_x86_feature_detected!("avx512f")`.
    #[derive(Clone, Copy)]
    pub(super) struct Avx512(__m512);

    // SAFETY (every intrinsic below): these inline into the `#[target_feature(enable =
    // "avx512f")]` entry points, which run only on CPUs that have AVX-512F; loads and stores
    // are bounds-checked against LANES values first.
    impl std::ops::Add for Avx512 {
        type Output = Self;
        #[inline(always)]
        fn add(self, o: Self) -> Self {
            Avx512(unsafe { _mm512_add_ps(self.0, o.0) })
        }
    }

    impl std::ops::Sub for Avx512 {
        type Output = Self;
        #[inline(always)]
        fn sub(self, o: Self) -> Self {
            Avx512(unsafe { _mm512_sub_ps(self.0, o.0) })
        }
    }

    impl super::Lanes for Avx512 {
        #[inline(always)]
        fn zero() -> Self {
            Avx512(unsafe { _mm512_setzero_ps() })
        }
        #[inline(always)]
        fn load(src: &[f32]) -> Self {
            let src = &src[..super::LANES];
            Avx512(unsafe { _mm512_loadu_ps(src.as_ptr()) })
        }
        #[inline(always)]
        fn store(self, dst: &mut [f32]) {
            let dst = &mut dst[..super::LANES];
            unsafe { _mm512_storeu_ps(dst.as_mut_ptr(), self.0) }
        }
        #[inline(always)]
        fn scale(self, c: f32) -> Self {
            Avx512(unsafe { _mm512_mul_ps(self.0, _mm512_set1_ps(c)) })
        }
        #[inline(always)]
        fn relu(self) -> Self {
            // max(0, v) returns its second operand when either is NaN: 0, as reduce::relu.
            Avx512(unsafe { _mm512_max_ps(_mm512_setzero_ps(), self.0) })
        }
    }
}

/// Runs `$body` with `$V` bound to the AVX-512 lanes where the CPU has them, else to the
/// portable ones; the body's generic code is compiled once per lane type.
macro_rules! with_lanes {
    ($V:ident => $body:block) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                #[target_feature(enable = "avx512f")]
                unsafe fn run_avx512(f: impl FnOnce()) {
                    f()
                }
                type $V = avx512::Avx512;
                // SAFETY: the CPU has AVX-512F, which the lane type's intrinsics need.
                unsafe { run_avx512(|| $body) };
                return;
            }
        }
        type $V = Portable;
        $body
    }};
}

/// A 1-D transform of I values into O, applied to columns and then rows by `separable`.
trait OneD<const I: usize, const O: usize> {
    fn apply<V: Lanes>(x: [V; I]) -> [V; O];
}

macro_rules! one_d {
    ($name:ident, $i:literal, $o:literal, $f:ident) => {
        struct $name;
        impl OneD<$i, $o> for $name {
            #[inline(always)]
            fn apply<V: Lanes>(x: [V; $i]) -> [V; $o] {
                $f(x)
            }
        }
    };
}
one_d!(Bt2, 4, 4, bt2);
one_d!(Bt4, 6, 6, bt4);
one_d!(At2, 4, 2, at2);
one_d!(At4, 6, 4, at4);
one_d!(A2, 2, 4, a2);
one_d!(A4, 4, 6, a4);

// The 1-D transforms, written out (Bᵀ, Aᵀ and A of F(2,3) and F(4,3); points 0, ±1, ±2, ∞).

// Bᵀ d, F(2,3).
#[inline(always)]
fn bt2<V: Lanes>([d0, d1, d2, d3]: [V; 4]) -> [V; 4] {
    [d0 - d2, d1 + d2, d2 - d1, d1 - d3]
}

// Bᵀ d, F(4,3).
#[inline(always)]
fn bt4<V: Lanes>([d0, d1, d2, d3, d4, d5]: [V; 6]) -> [V; 6] {
    let (t1, t2) = (d4 - d2.scale(4.0), d3 - d1.scale(4.0));
    let (t3, t4) = (d4 - d2, (d3 - d1).scale(2.0));
    [
        d0.scale(4.0) - d2.scale(5.0) + d4,
        t1 + t2,
        t1 - t2,
        t3 + t4,
        t3 - t4,
        d1.scale(4.0) - d3.scale(5.0) + d5,
    ]
}

// Aᵀ m, F(2,3).
#[inline(always)]
fn at2<V: Lanes>([m0, m1, m2, m3]: [V; 4]) -> [V; 2] {
    [m0 + m1 + m2, m1 - m2 - m3]
}

// Aᵀ m, F(4,3).
#[inline(always)]
fn at4<V: Lanes>([m0, m1, m2, m3, m4, m5]: [V; 6]) -> [V; 4] {
    let (s12, d12, s34, d34) = (m1 + m2, m1 - m2, m3 + m4, m3 - m4);
    [
        m0 + s12 + s34,
        d12 + d34.scale(2.0),
        s12 + s34.scale(4.0),
        d12 + d34.scale(8.0) + m5,
    ]
}

// A g, F(2,3): the adjoint of Aᵀ.
#[inline(always)]
fn a2<V: Lanes>([g0, g1]: [V; 2]) -> [V; 4] {
    [g0, g0 + g1, g0 - g1, V::zero() - g1]
}

// A g, F(4,3).
#[inline(always)]
fn a4<V: Lanes>([g0, g1, g2, g3]: [V; 4]) -> [V; 6] {
    let (e, o) = (g0 + g2, g1 + g3);
    let (e2, o2) = (g0 + g2.scale(4.0), g1.scale(2.0) + g3.scale(8.0));
    [g0, e + o, e - o, e2 + o2, e2 - o2, g3]
}

/// out = f applied to every column of x, then to every row of the result: L x Lᵀ for the
/// 1-D transform f = L·.
#[inline(always)]
fn separable<V: Lanes, const I: usize, const O: usize, F: OneD<I, O>>(x: &[[V; I]; I], out: &mut [[V; O]; O]) {
    let mut cols = [[V::zero(); I]; O];
    for j in 0..I {
        let mut col = [V::zero(); I];
        for k in 0..I {
            col[k] = x[k][j];
        }
        let r = F::apply(col);
        for a in 0..O {
            cols[a][j] = r[a];
        }
    }
    for a in 0..O {
        out[a] = F::apply(cols[a]);
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
        };
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

    /// Values of staging one sample of `channels` channels needs (the transforms' inputs and
    /// the output transform's channels-last result alike).
    pub fn staging_len(&self, channels: usize) -> usize {
        let (ph, pw) = self.padded();
        ph * pw * channels.next_multiple_of(LANES)
    }
}

/// Copies sample `x` [C, h, w] channels-last into `staging` [ph][pw][Cp] (Cp = C rounded up to
/// LANES) at row 1, column 1; the margins, the rows and columns past the map and the channels
/// past C stay as zeroed by the caller. Blocks of LANES channels × LANES columns go through a
/// small square, read row-wise from the planes and written as whole channel vectors (a value
/// by value scatter at stride Cp took 3 ns a value).
#[allow(clippy::needless_range_loop)] // xx indexes the square's columns
fn stage_channels_last(plan: &TilePlan, x: &[f32], channels: usize, staging: &mut [f32]) {
    let (h, w) = (plan.h, plan.w);
    let (_, pw) = plan.padded();
    let cp = channels.next_multiple_of(LANES);
    let mut square = [[0.0f32; LANES]; LANES];
    for c0 in (0..channels).step_by(LANES) {
        let nc = LANES.min(channels - c0);
        // The channels past C stay zero (their lanes are computed on and never stored).
        square.iter_mut().skip(nc).for_each(|row| *row = [0.0; LANES]);
        for y in 0..h {
            for x0 in (0..w).step_by(LANES) {
                let nx = LANES.min(w - x0);
                for (c, row) in square.iter_mut().enumerate().take(nc) {
                    let src = &x[(c0 + c) * h * w + y * w + x0..];
                    row[..nx].copy_from_slice(&src[..nx]);
                }
                for xx in 0..nx {
                    let at = ((y + 1) * pw + 1 + x0 + xx) * cp + c0;
                    let mut v = [0.0f32; LANES];
                    for (c, lane) in v.iter_mut().enumerate() {
                        *lane = square[c][xx];
                    }
                    staging[at..at + LANES].copy_from_slice(&v);
                }
            }
        }
    }
}

/// The inverse: y [C, h, w] of one sample from the channels-last `buf` [th·m][tw·m][Cp].
fn unstage_channels_last(plan: &TilePlan, buf: &[f32], channels: usize, y: &mut [f32]) {
    let (h, w) = (plan.h, plan.w);
    let bw = plan.tiles_w * plan.m();
    let cp = channels.next_multiple_of(LANES);
    let mut square = [[0.0f32; LANES]; LANES];
    for c0 in (0..channels).step_by(LANES) {
        let nc = LANES.min(channels - c0);
        for yy in 0..h {
            for x0 in (0..w).step_by(LANES) {
                let nx = LANES.min(w - x0);
                for (xx, col) in square.iter_mut().enumerate().take(nx) {
                    let at = (yy * bw + x0 + xx) * cp + c0;
                    col.copy_from_slice(&buf[at..at + LANES]);
                }
                for c in 0..nc {
                    let dst = &mut y[(c0 + c) * h * w + yy * w + x0..];
                    for (xx, d) in dst[..nx].iter_mut().enumerate() {
                        *d = square[xx][c];
                    }
                }
            }
        }
    }
}

/// Transforms every tile of one staged sample: for each tile and each block of LANES channels,
/// loads the K×K window at (y0 + shift, x0 + shift) of the staged map, applies F on both sides
/// and stores position ξ at out[(ξ·P + p)·channels + c] (P = all tiles of the batch).
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
    let (cp, p_total) = (channels.next_multiple_of(LANES), plan.tiles());
    let (mut d, mut v) = ([[V::zero(); K]; K], [[V::zero(); R]; R]);
    let mut spill = [0.0f32; LANES];
    for ty in 0..plan.tiles_h {
        for tx in 0..plan.tiles_w {
            let p = first_tile + ty * plan.tiles_w + tx;
            let corner = (ty * m + shift) * pw + tx * m + shift;
            for c0 in (0..channels).step_by(LANES) {
                let n = LANES.min(channels - c0);
                for (k, dk) in d.iter_mut().enumerate() {
                    for (j, dkj) in dk.iter_mut().enumerate() {
                        *dkj = V::load(&staging[(corner + k * pw + j) * cp + c0..]);
                    }
                }
                separable::<V, K, R, F>(&d, &mut v);
                for (xi, val) in v.iter().flatten().enumerate() {
                    let dst = &mut out[(xi * p_total + p) * channels + c0..];
                    if n == LANES {
                        val.store(dst);
                    } else {
                        val.store(&mut spill);
                        dst[..n].copy_from_slice(&spill[..n]);
                    }
                }
            }
        }
    }
}

/// V[ξ][p][c] = (Bᵀ d_{p,c} B)[ξ] for the tiles p of the plan's samples (x: samples ×
/// channels × h × w, zero padding 1). `staging` holds plan.staging_len(channels) values; v
/// holds t²·P·channels.
pub fn winograd_input_transform(plan: &TilePlan, x: &[f32], channels: usize, v: &mut [f32], staging: &mut [f32]) {
    let Some(tile) = plan.tile else { return };
    let staging = &mut staging[..plan.staging_len(channels)];
    let per_sample = plan.tiles_h * plan.tiles_w;
    staging.fill(0.0);
    with_lanes!(L => {
        for (s, xs) in x.chunks_exact(channels * plan.h * plan.w).take(plan.samples).enumerate() {
            stage_channels_last(plan, xs, channels, staging);
            match tile {
                WinogradTile::F2 => transform_sample::<L, 4, 4, Bt2>(plan, staging, channels, 0, s * per_sample, v),
                WinogradTile::F4 => transform_sample::<L, 6, 6, Bt4>(plan, staging, channels, 0, s * per_sample, v),
            }
        }
    })
}

/// DM[ξ][p][o] = (A dy_{p,o} Aᵀ)[ξ]: the gradient reaching M_ξ from an output gradient
/// (samples × channels × h × w), positions past the map counting as zero.
pub fn winograd_gradient_transform(plan: &TilePlan, dy: &[f32], channels: usize, dm: &mut [f32], staging: &mut [f32]) {
    let Some(tile) = plan.tile else { return };
    let staging = &mut staging[..plan.staging_len(channels)];
    let per_sample = plan.tiles_h * plan.tiles_w;
    staging.fill(0.0);
    with_lanes!(L => {
        for (s, ds) in dy.chunks_exact(channels * plan.h * plan.w).take(plan.samples).enumerate() {
            stage_channels_last(plan, ds, channels, staging);
            // The m×m output tile starts one row and one column past the staged corner.
            match tile {
                WinogradTile::F2 => transform_sample::<L, 2, 4, A2>(plan, staging, channels, 1, s * per_sample, dm),
                WinogradTile::F4 => transform_sample::<L, 4, 6, A4>(plan, staging, channels, 1, s * per_sample, dm),
            }
        }
    })
}

/// One sample's output tiles into the channels-last `buf` [th·m][tw·m][Cp]: Aᵀ M A (+ bias,
/// then ReLU), whole vectors of LANES channels.
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
    let p_total = plan.tiles();
    let (cp, bw) = (channels.next_multiple_of(LANES), plan.tiles_w * R);
    let (mut mm, mut out) = ([[V::zero(); K]; K], [[V::zero(); R]; R]);
    // The first n values of src, zero-filled to LANES (the last block of channels).
    let partial = |src: &[f32], n: usize| {
        let mut spill = [0.0f32; LANES];
        spill[..n].copy_from_slice(&src[..n]);
        V::load(&spill)
    };
    for ty in 0..plan.tiles_h {
        for tx in 0..plan.tiles_w {
            let p = first_tile + ty * plan.tiles_w + tx;
            for c0 in (0..channels).step_by(LANES) {
                let n = LANES.min(channels - c0);
                for (a, mma) in mm.iter_mut().enumerate() {
                    for (b, v) in mma.iter_mut().enumerate() {
                        let src = &mbuf[((a * K + b) * p_total + p) * channels + c0..];
                        *v = if n == LANES { V::load(src) } else { partial(src, n) };
                    }
                }
                separable::<V, K, R, F>(&mm, &mut out);
                let b = match bias {
                    Some(b) if n == LANES => V::load(&b[c0..]),
                    Some(b) => partial(&b[c0..], n),
                    None => V::zero(),
                };
                for (a, out_a) in out.iter().enumerate() {
                    for (bcol, &v) in out_a.iter().enumerate() {
                        let v = if bias.is_some() { v + b } else { v };
                        let v = if relu { v.relu() } else { v };
                        v.store(&mut buf[((ty * R + a) * bw + tx * R + bcol) * cp + c0..]);
                    }
                }
            }
        }
    }
}

/// y_{p,o} = Aᵀ M_{p,o} A (+ bias[o], then ReLU when `relu`) from M [t²][P][channels], into
/// y: samples × channels × h × w, tiles clipped at the map's edge. `staging` holds
/// plan.staging_len(channels) values.
pub fn winograd_output_transform(
    plan: &TilePlan,
    mbuf: &[f32],
    channels: usize,
    y: &mut [f32],
    bias: Option<&[f32]>,
    relu: bool,
    staging: &mut [f32],
) {
    let Some(tile) = plan.tile else { return };
    let per_sample = plan.tiles_h * plan.tiles_w;
    with_lanes!(L => {
        for (s, ys) in y.chunks_exact_mut(channels * plan.h * plan.w).take(plan.samples).enumerate() {
            match tile {
                WinogradTile::F2 => output_sample::<L, 4, 2, At2>(plan, mbuf, channels, s * per_sample, staging, bias, relu),
                WinogradTile::F4 => output_sample::<L, 6, 4, At4>(plan, mbuf, channels, s * per_sample, staging, bias, relu),
            }
            unstage_channels_last(plan, staging, channels, ys);
        }
    })
}

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

fn filter_sandwich<const T: usize>(g: &[[f64; 3]; T], k: &[[f64; 3]; 3]) -> [[f64; T]; T] {
    let mut tmp = [[0.0f64; 3]; T];
    for a in 0..T {
        for j in 0..3 {
            tmp[a][j] = (0..3).map(|i| g[a][i] * k[i][j]).sum();
        }
    }
    let mut u = [[0.0f64; T]; T];
    for a in 0..T {
        for b in 0..T {
            u[a][b] = (0..3).map(|j| tmp[a][j] * g[b][j]).sum();
        }
    }
    u
}

/// The Winograd-domain kernels of `w` [OC, C, 3, 3], G k Gᵀ in f64: with `adjoint` false,
/// u[ξ][c][o] for k = w[o, c] (the forward pass: V[P, C] · U[C, OC]); with it true, u[ξ][o][c]
/// for k = w[o, c] rotated by 180° (the input gradient: V[P, OC] · U[OC, C]).
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
    for o in 0..out_channels {
        for c in 0..in_channels {
            let src = &w[(o * in_channels + c) * 9..(o * in_channels + c) * 9 + 9];
            let k: [[f64; 3]; 3] = std::array::from_fn(|i| {
                std::array::from_fn(|j| if adjoint { src[(2 - i) * 3 + 2 - j] } else { src[i * 3 + j] } as f64)
            });
            let at = if adjoint {
                o * in_channels + c
            } else {
                c * out_channels + o
            };
            match tile {
                WinogradTile::F2 => {
                    for (xi, v) in filter_sandwich(&G2, &k).iter().flatten().enumerate() {
                        u[xi * oc_c + at] = *v as f32;
                    }
                }
                WinogradTile::F4 => {
                    for (xi, v) in filter_sandwich(&G4, &k).iter().flatten().enumerate() {
                        u[xi * oc_c + at] = *v as f32;
                    }
                }
            }
        }
    }
}

fn filter_gradient<const T: usize>(g: &[[f64; 3]; T], du: &[[f64; T]; T]) -> [[f64; 3]; 3] {
    let mut tmp = [[0.0f64; T]; 3];
    for i in 0..3 {
        for b in 0..T {
            tmp[i][b] = (0..T).map(|a| g[a][i] * du[a][b]).sum();
        }
    }
    let mut k = [[0.0f64; 3]; 3];
    for i in 0..3 {
        for j in 0..3 {
            k[i][j] = (0..T).map(|b| tmp[i][b] * g[b][j]).sum();
        }
    }
    k
}

/// dw[o, c] += Gᵀ dU_{c,o} G in f64: the kernel gradient from its Winograd-domain sum
/// dU [t²][C][OC] (the adjoint of `winograd_filter_transform`'s forward mode).
pub fn winograd_filter_gradient(
    tile: WinogradTile,
    du: &[f32],
    out_channels: usize,
    in_channels: usize,
    dw: &mut [f32],
) {
    let (t, oc_c) = (tile.t(), out_channels * in_channels);
    assert!(du.len() >= t * t * oc_c && dw.len() >= oc_c * 9);
    for o in 0..out_channels {
        for c in 0..in_channels {
            let at = c * out_channels + o;
            let k = match tile {
                WinogradTile::F2 => {
                    let d: [[f64; 4]; 4] =
                        std::array::from_fn(|a| std::array::from_fn(|b| du[(a * 4 + b) * oc_c + at] as f64));
                    filter_gradient(&G2, &d)
                }
                WinogradTile::F4 => {
                    let d: [[f64; 6]; 6] =
                        std::array::from_fn(|a| std::array::from_fn(|b| du[(a * 6 + b) * oc_c + at] as f64));
                    filter_gradient(&G4, &d)
                }
            };
            let dst = &mut dw[(o * in_channels + c) * 9..(o * in_channels + c) * 9 + 9];
            for (d, v) in dst.iter_mut().zip(k.iter().flatten()) {
                *d += *v as f32;
            }
        }
    }
}
