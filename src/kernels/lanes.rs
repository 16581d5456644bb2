//! A vector of LANES f32 written once as a trait and compiled twice: on AVX-512 registers
//! through intrinsics, and on plain arrays for CPUs without them. Kernels generic over `Lanes`
//! (the Winograd transforms, the direct convolution) enter through `lanes_entry!`.

/// Values per vector: one AVX-512 register of f32.
pub(crate) const LANES: usize = 16;

/// A vector of f32 lanes at some width: the loads, stores and arithmetic that kernels written
/// for either width (`Lanes` or its 8-lane `Lanes::Half`) use.
pub(crate) trait Vector:
    Copy + std::ops::Add<Output = Self> + std::ops::Sub<Output = Self> + std::ops::Mul<Output = Self>
{
    /// Values per vector.
    const WIDTH: usize;
    fn zero() -> Self;
    /// The first WIDTH values of `src`.
    fn load(src: &[f32]) -> Self;
    fn store(self, dst: &mut [f32]);
    /// The first n values of `src`, the other lanes zero (the last block of channels or columns).
    #[inline(always)]
    fn load_first(src: &[f32], n: usize) -> Self {
        if n == Self::WIDTH {
            return Self::load(src);
        }
        let mut spill = [0.0f32; LANES];
        spill[..n].copy_from_slice(&src[..n]);
        Self::load(&spill)
    }
    /// Stores the first n lanes only.
    #[inline(always)]
    fn store_first(self, dst: &mut [f32], n: usize) {
        if n == Self::WIDTH {
            return self.store(dst);
        }
        let mut spill = [0.0f32; LANES];
        self.store(&mut spill);
        dst[..n].copy_from_slice(&spill[..n]);
    }
    fn scale(self, c: f32) -> Self;
    /// c in every lane.
    fn splat(c: f32) -> Self;
    /// self·b + c lane by lane, rounded once (a fused multiply-add).
    fn mul_add(self, b: Self, c: Self) -> Self;
    /// max(v, 0) lane by lane, 0 for NaN (as `reduce::relu`).
    fn relu(self) -> Self;
}

/// Values in a `Lanes::Half`.
pub(crate) const HALF_LANES: usize = 8;

/// A vector of LANES channels' values. The transforms are written once on this trait and
/// compiled twice: on AVX-512 registers through intrinsics and on plain arrays. Arrays alone
/// were turned by LLVM into gathers and scatters across the tile (5-10x slower); both
/// versions do the same adds, subtracts and multiplies in the same order, so they agree bit
/// for bit.
pub(crate) trait Lanes: Vector {
    /// HALF_LANES values (a 256-bit register on AVX-512), for channel counts that would leave
    /// most of a full vector empty: where AVX-512 runs at half rate (AMD's Zen 4) it costs
    /// half of one.
    type Half: Vector;
    /// self where `by` > 0 or NaN, else 0, lane by lane (as `reduce::relu_mask`: the ReLU's
    /// gradient mask).
    fn where_positive(self, by: Self) -> Self;
    /// `later` where it beats self (larger, or NaN where self is not), else self, lane by lane:
    /// the max-pool's rule, under which the first maximum of a window wins (`reduce::beats`).
    fn pool_max(self, later: Self) -> Self;
    /// The LANES × LANES square with rows and columns swapped: out[j] lane i = rows[i] lane j.
    fn transpose(rows: [Self; LANES]) -> [Self; LANES];
    /// The first n values of `src`, the other lanes `fill`.
    #[inline(always)]
    fn load_first_or(src: &[f32], n: usize, fill: f32) -> Self {
        let mut spill = [fill; LANES];
        spill[..n].copy_from_slice(&src[..n]);
        Self::load(&spill)
    }
    /// The first n lanes, the others zero.
    fn keep_first(self, n: usize) -> Self;
    /// Stores the lanes whose bit is set in `keep`, in lane order, at dst[..count] (count the
    /// bits set); the rest of dst is untouched.
    #[inline(always)]
    fn store_kept(self, keep: u16, dst: &mut [f32]) {
        let mut spill = [0.0f32; LANES];
        self.store(&mut spill);
        let dst = &mut dst[..keep.count_ones() as usize];
        let kept = spill.iter().enumerate().filter(|&(l, _)| keep >> l & 1 == 1);
        for (d, (_, &v)) in dst.iter_mut().zip(kept) {
            *d = v;
        }
    }
    /// `later` where it is larger or either is NaN, else self (x86's max), lane by lane.
    fn max(self, later: Self) -> Self;
    /// `special::exp` lane by lane, the same operations in the same order.
    fn exp(self) -> Self;
    /// The lanes' sum as a tree: lane i + lane i+8, then i+4, i+2, i+1.
    fn reduce_sum(self) -> f32;
    /// The lanes' max in the same tree (`max`'s rule at each step).
    fn reduce_max(self) -> f32;
}

/// x86's max rule on two values: `b` unless a > b.
#[inline(always)]
fn x86_max(a: f32, b: f32) -> f32 {
    if a > b {
        a
    } else {
        b
    }
}

/// The tree of `reduce_sum` and `reduce_max` on an array.
#[inline(always)]
fn tree(mut v: [f32; LANES], op: impl Fn(f32, f32) -> f32) -> f32 {
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            v[i] = op(v[i], v[i + width]);
        }
    }
    v[0]
}

/// W values in a plain array (LANES, or HALF_LANES for `Lanes::Half`).
#[derive(Clone, Copy)]
pub(crate) struct Portable<const W: usize = LANES>([f32; W]);

impl<const W: usize> std::ops::Add for Portable<W> {
    type Output = Self;
    #[inline(always)]
    fn add(mut self, o: Self) -> Self {
        self.0.iter_mut().zip(o.0).for_each(|(a, b)| *a += b);
        self
    }
}

impl<const W: usize> std::ops::Sub for Portable<W> {
    type Output = Self;
    #[inline(always)]
    fn sub(mut self, o: Self) -> Self {
        self.0.iter_mut().zip(o.0).for_each(|(a, b)| *a -= b);
        self
    }
}

impl<const W: usize> std::ops::Mul for Portable<W> {
    type Output = Self;
    #[inline(always)]
    fn mul(mut self, o: Self) -> Self {
        self.0.iter_mut().zip(o.0).for_each(|(a, b)| *a *= b);
        self
    }
}

impl<const W: usize> Vector for Portable<W> {
    const WIDTH: usize = W;
    #[inline(always)]
    fn zero() -> Self {
        Portable([0.0; W])
    }
    #[inline(always)]
    fn load(src: &[f32]) -> Self {
        let mut v = [0.0; W];
        v.copy_from_slice(&src[..W]);
        Portable(v)
    }
    #[inline(always)]
    fn store(self, dst: &mut [f32]) {
        dst[..W].copy_from_slice(&self.0);
    }
    #[inline(always)]
    fn scale(mut self, c: f32) -> Self {
        self.0.iter_mut().for_each(|a| *a *= c);
        self
    }
    #[inline(always)]
    fn splat(c: f32) -> Self {
        Portable([c; W])
    }
    #[inline(always)]
    fn mul_add(mut self, b: Self, c: Self) -> Self {
        for ((a, b), c) in self.0.iter_mut().zip(b.0).zip(c.0) {
            *a = a.mul_add(b, c);
        }
        self
    }
    #[inline(always)]
    fn relu(mut self) -> Self {
        self.0.iter_mut().for_each(|a| *a = crate::kernels::reduce::relu(*a));
        self
    }
}

impl Lanes for Portable {
    type Half = Portable<HALF_LANES>;
    #[inline(always)]
    fn where_positive(mut self, by: Self) -> Self {
        self.0
            .iter_mut()
            .zip(by.0)
            .for_each(|(a, y)| *a = crate::kernels::reduce::relu_mask(y, *a));
        self
    }
    #[inline(always)]
    fn pool_max(mut self, later: Self) -> Self {
        for (a, b) in self.0.iter_mut().zip(later.0) {
            if crate::kernels::reduce::beats(b, *a) {
                *a = b;
            }
        }
        self
    }
    #[inline(always)]
    fn transpose(rows: [Self; LANES]) -> [Self; LANES] {
        std::array::from_fn(|j| Portable(std::array::from_fn(|i| rows[i].0[j])))
    }
    #[inline(always)]
    fn keep_first(mut self, n: usize) -> Self {
        self.0[n.min(LANES)..].fill(0.0);
        self
    }
    #[inline(always)]
    fn max(mut self, later: Self) -> Self {
        self.0.iter_mut().zip(later.0).for_each(|(a, b)| *a = x86_max(*a, b));
        self
    }
    #[inline(always)]
    fn exp(mut self) -> Self {
        self.0.iter_mut().for_each(|a| *a = crate::kernels::special::exp(*a));
        self
    }
    #[inline(always)]
    fn reduce_sum(self) -> f32 {
        tree(self.0, |a, b| a + b)
    }
    #[inline(always)]
    fn reduce_max(self) -> f32 {
        tree(self.0, x86_max)
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use std::arch::x86_64::*;

    /// LANES f32 in one register; only built inside functions compiled with AVX-512F and
    /// called after `is_x86_feature_detected!("avx512f")`.
    #[derive(Clone, Copy)]
    pub(crate) struct Avx512(__m512);

    // SAFETY (every intrinsic below): these inline into the `#[target_feature(enable =
    // "avx512f,avx512vl,fma")]` entry points, which run only where `has_avx512()`; loads and
    // stores are bounds-checked against the vector's width first.
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

    impl std::ops::Mul for Avx512 {
        type Output = Self;
        #[inline(always)]
        fn mul(self, o: Self) -> Self {
            Avx512(unsafe { _mm512_mul_ps(self.0, o.0) })
        }
    }

    /// HALF_LANES f32 in a 256-bit register (masked loads and stores through AVX-512VL), under
    /// the same conditions as `Avx512`.
    #[derive(Clone, Copy)]
    pub(crate) struct Avx256(__m256);

    impl std::ops::Add for Avx256 {
        type Output = Self;
        #[inline(always)]
        fn add(self, o: Self) -> Self {
            Avx256(unsafe { _mm256_add_ps(self.0, o.0) })
        }
    }

    impl std::ops::Sub for Avx256 {
        type Output = Self;
        #[inline(always)]
        fn sub(self, o: Self) -> Self {
            Avx256(unsafe { _mm256_sub_ps(self.0, o.0) })
        }
    }

    impl std::ops::Mul for Avx256 {
        type Output = Self;
        #[inline(always)]
        fn mul(self, o: Self) -> Self {
            Avx256(unsafe { _mm256_mul_ps(self.0, o.0) })
        }
    }

    impl super::Vector for Avx256 {
        const WIDTH: usize = super::HALF_LANES;
        #[inline(always)]
        fn zero() -> Self {
            Avx256(unsafe { _mm256_setzero_ps() })
        }
        #[inline(always)]
        fn load(src: &[f32]) -> Self {
            let src = &src[..super::HALF_LANES];
            Avx256(unsafe { _mm256_loadu_ps(src.as_ptr()) })
        }
        #[inline(always)]
        fn store(self, dst: &mut [f32]) {
            let dst = &mut dst[..super::HALF_LANES];
            unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), self.0) }
        }
        #[inline(always)]
        fn load_first(src: &[f32], n: usize) -> Self {
            let src = &src[..n.min(super::HALF_LANES)];
            let mask = ((1u32 << src.len()) - 1) as __mmask8;
            Avx256(unsafe { _mm256_maskz_loadu_ps(mask, src.as_ptr()) })
        }
        #[inline(always)]
        fn store_first(self, dst: &mut [f32], n: usize) {
            let dst = &mut dst[..n.min(super::HALF_LANES)];
            let mask = ((1u32 << dst.len()) - 1) as __mmask8;
            unsafe { _mm256_mask_storeu_ps(dst.as_mut_ptr(), mask, self.0) }
        }
        #[inline(always)]
        fn scale(self, c: f32) -> Self {
            Avx256(unsafe { _mm256_mul_ps(self.0, _mm256_set1_ps(c)) })
        }
        #[inline(always)]
        fn splat(c: f32) -> Self {
            Avx256(unsafe { _mm256_set1_ps(c) })
        }
        #[inline(always)]
        fn mul_add(self, b: Self, c: Self) -> Self {
            Avx256(unsafe { _mm256_fmadd_ps(self.0, b.0, c.0) })
        }
        #[inline(always)]
        fn relu(self) -> Self {
            // max(0, v) returns its second operand when either is NaN: 0, as reduce::relu.
            Avx256(unsafe { _mm256_max_ps(_mm256_setzero_ps(), self.0) })
        }
    }

    /// Lanes 8..16 (through f64: extracting f32 x 8 needs AVX-512DQ).
    #[inline(always)]
    unsafe fn high_half(v: __m512) -> __m256 {
        _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)))
    }

    impl super::Vector for Avx512 {
        const WIDTH: usize = super::LANES;
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
        // Masked: the default's copy through a stack array called memcpy, and the vector load
        // of bytes just written by it stalled (30% of the input transform in a vgg step).
        #[inline(always)]
        fn load_first(src: &[f32], n: usize) -> Self {
            let src = &src[..n.min(super::LANES)];
            let mask = ((1u32 << src.len()) - 1) as __mmask16;
            Avx512(unsafe { _mm512_maskz_loadu_ps(mask, src.as_ptr()) })
        }
        #[inline(always)]
        fn store_first(self, dst: &mut [f32], n: usize) {
            let dst = &mut dst[..n.min(super::LANES)];
            let mask = ((1u32 << dst.len()) - 1) as __mmask16;
            unsafe { _mm512_mask_storeu_ps(dst.as_mut_ptr(), mask, self.0) }
        }
        #[inline(always)]
        fn scale(self, c: f32) -> Self {
            Avx512(unsafe { _mm512_mul_ps(self.0, _mm512_set1_ps(c)) })
        }
        #[inline(always)]
        fn splat(c: f32) -> Self {
            Avx512(unsafe { _mm512_set1_ps(c) })
        }
        #[inline(always)]
        fn mul_add(self, b: Self, c: Self) -> Self {
            Avx512(unsafe { _mm512_fmadd_ps(self.0, b.0, c.0) })
        }
        #[inline(always)]
        fn relu(self) -> Self {
            // max(0, v) returns its second operand when either is NaN: 0, as reduce::relu.
            Avx512(unsafe { _mm512_max_ps(_mm512_setzero_ps(), self.0) })
        }
    }

    impl super::Lanes for Avx512 {
        type Half = Avx256;
        #[inline(always)]
        fn where_positive(self, by: Self) -> Self {
            // "Not less than or equal, unordered": true where by > 0 and where by is NaN.
            unsafe {
                let keep = _mm512_cmp_ps_mask::<_CMP_NLE_UQ>(by.0, _mm512_setzero_ps());
                Avx512(_mm512_maskz_mov_ps(keep, self.0))
            }
        }
        #[inline(always)]
        fn pool_max(self, later: Self) -> Self {
            // `later` where !(later <= self) (larger, or either a NaN) and self is a number:
            // two compares (the second masked by the first) where three and two mask
            // operations were (seed-cnn's stem pools 4 phases per vector).
            unsafe {
                let self_number = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(self.0, self.0);
                let take = _mm512_mask_cmp_ps_mask::<_CMP_NLE_UQ>(self_number, later.0, self.0);
                Avx512(_mm512_mask_blend_ps(take, self.0, later.0))
            }
        }
        // 16x16 in registers: pairs of rows interleaved as f32 then as f64 give, in each
        // 128-bit lane L, column 4L + c of four rows (u[4g + c]); two rounds of 128-bit lane
        // shuffles gather a column's four row groups.
        #[inline(always)]
        fn transpose(r: [Self; 16]) -> [Self; 16] {
            unsafe {
                let mut t = [_mm512_setzero_ps(); 16];
                for k in 0..8 {
                    t[2 * k] = _mm512_unpacklo_ps(r[2 * k].0, r[2 * k + 1].0);
                    t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k].0, r[2 * k + 1].0);
                }
                let mut u = [_mm512_setzero_ps(); 16];
                for g in 0..4 {
                    let pd = |v: __m512| _mm512_castps_pd(v);
                    let (a, b, c, d) = (pd(t[4 * g]), pd(t[4 * g + 2]), pd(t[4 * g + 1]), pd(t[4 * g + 3]));
                    u[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
                    u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
                    u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
                    u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
                }
                let mut out = [Avx512(_mm512_setzero_ps()); 16];
                for c in 0..4 {
                    let v = _mm512_shuffle_f32x4::<0x88>(u[c], u[4 + c]);
                    let w = _mm512_shuffle_f32x4::<0xdd>(u[c], u[4 + c]);
                    let v2 = _mm512_shuffle_f32x4::<0x88>(u[8 + c], u[12 + c]);
                    let w2 = _mm512_shuffle_f32x4::<0xdd>(u[8 + c], u[12 + c]);
                    out[c] = Avx512(_mm512_shuffle_f32x4::<0x88>(v, v2));
                    out[4 + c] = Avx512(_mm512_shuffle_f32x4::<0x88>(w, w2));
                    out[8 + c] = Avx512(_mm512_shuffle_f32x4::<0xdd>(v, v2));
                    out[12 + c] = Avx512(_mm512_shuffle_f32x4::<0xdd>(w, w2));
                }
                out
            }
        }
        #[inline(always)]
        fn load_first_or(src: &[f32], n: usize, fill: f32) -> Self {
            let src = &src[..n.min(super::LANES)];
            let mask = ((1u32 << src.len()) - 1) as __mmask16;
            Avx512(unsafe { _mm512_mask_loadu_ps(_mm512_set1_ps(fill), mask, src.as_ptr()) })
        }
        #[inline(always)]
        fn keep_first(self, n: usize) -> Self {
            let mask = ((1u32 << n.min(super::LANES)) - 1) as __mmask16;
            Avx512(unsafe { _mm512_maskz_mov_ps(mask, self.0) })
        }
        // Compressed in a register, then a masked store: the compress instruction's own
        // memory form is microcoded on AMD's Zen 4.
        #[inline(always)]
        fn store_kept(self, keep: u16, dst: &mut [f32]) {
            let dst = &mut dst[..keep.count_ones() as usize];
            let mask = ((1u32 << dst.len()) - 1) as __mmask16;
            unsafe {
                let packed = _mm512_maskz_compress_ps(keep, self.0);
                _mm512_mask_storeu_ps(dst.as_mut_ptr(), mask, packed)
            }
        }
        #[inline(always)]
        fn max(self, later: Self) -> Self {
            // maxps returns its second operand unless the first is larger.
            Avx512(unsafe { _mm512_max_ps(self.0, later.0) })
        }
        // special::exp's steps, each rounded on its own as there (no fused multiply-adds).
        #[inline(always)]
        fn exp(self) -> Self {
            unsafe {
                let c = _mm512_set1_ps;
                const MAGIC: f32 = 12_582_912.0;
                // clamp(−87, 88) keeping NaN: maxps/minps return their second operand on NaN.
                let x = _mm512_min_ps(c(88.0), _mm512_max_ps(c(-87.0), self.0));
                let shifted = _mm512_add_ps(_mm512_mul_ps(x, c(std::f32::consts::LOG2_E)), c(MAGIC));
                let n = _mm512_sub_ps(shifted, c(MAGIC));
                let ni = _mm512_sub_epi32(_mm512_castps_si512(shifted), _mm512_set1_epi32(MAGIC.to_bits() as i32));
                let r = _mm512_add_ps(
                    _mm512_sub_ps(x, _mm512_mul_ps(n, c(0.693_359_4))),
                    _mm512_mul_ps(n, c(2.121_944_4e-4)),
                );
                let step = |p: __m512, k: f32| _mm512_add_ps(_mm512_mul_ps(p, r), c(k));
                let p = step(c(1.987_569_1e-4), 1.398_2e-3);
                let p = step(p, 8.333_452e-3);
                let p = step(p, 4.166_579_6e-2);
                let p = step(p, 0.166_666_65);
                let p = step(p, 0.5);
                let e = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(p, r), r), r), c(1.0));
                let pow2 = _mm512_slli_epi32::<23>(_mm512_add_epi32(ni, _mm512_set1_epi32(127)));
                Avx512(_mm512_mul_ps(e, _mm512_castsi512_ps(pow2)))
            }
        }
        #[inline(always)]
        fn reduce_sum(self) -> f32 {
            unsafe {
                let v = self.0;
                let h = _mm256_add_ps(_mm512_castps512_ps256(v), high_half(v));
                let q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
                let d = _mm_add_ps(q, _mm_movehl_ps(q, q));
                _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)))
            }
        }
        #[inline(always)]
        fn reduce_max(self) -> f32 {
            unsafe {
                let v = self.0;
                let h = _mm256_max_ps(_mm512_castps512_ps256(v), high_half(v));
                let q = _mm_max_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
                let d = _mm_max_ps(q, _mm_movehl_ps(q, q));
                _mm_cvtss_f32(_mm_max_ss(d, _mm_movehdup_ps(d)))
            }
        }
    }
}

/// Whether the CPU runs the AVX-512 lane types: AVX-512F, its 256-bit forms (VL, for `Avx256`'s
/// masks) and FMA.
pub(crate) fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Defines `pub fn $name(args)` that runs `$imp::<Avx512>` inside a function compiled with
/// AVX-512F (and VL, FMA) where the CPU has it (`has_avx512`), else `$imp::<Portable>`. The
/// generic body must be inlined into the target-feature function itself: passed in as a
/// closure it was compiled without the feature, and the intrinsics became calls (3x slower
/// than im2col).
macro_rules! lanes_entry {
    ($(#[$m:meta])* pub fn $name:ident($($arg:ident: $ty:ty),* $(,)?) => $imp:ident) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        pub fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            if $crate::kernels::lanes::has_avx512() {
                #[target_feature(enable = "avx512f,avx512vl,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn with_avx512($($arg: $ty),*) {
                    $imp::<$crate::kernels::lanes::avx512::Avx512>($($arg),*)
                }
                // SAFETY: the CPU has AVX-512F, VL and FMA, which the lane types' intrinsics need.
                return unsafe { with_avx512($($arg),*) };
            }
            $imp::<$crate::kernels::lanes::Portable>($($arg),*)
        }
    };
}

pub(crate) use lanes_entry;

#[cfg(test)]
mod tests {
    use super::*;

    /// ReLU on both lane types and `reduce::relu` keep NaN and -0.0 as torch.relu does
    /// (torch.relu(-0.0) is -0.0), bit for bit.
    #[test]
    fn relu_is_torch_s_on_both_lane_types() {
        let x: [f32; LANES] = std::array::from_fn(|i| [-0.0, f32::NAN, -1.5, 2.5, 0.0, f32::NEG_INFINITY][i % 6]);
        let want: Vec<u32> = [0x8000_0000u32, f32::NAN.to_bits(), 0, 2.5f32.to_bits(), 0, 0].into();
        let bits = |v: [f32; LANES]| -> Vec<u32> { v.iter().map(|f| f.to_bits()).collect() };
        let scalar = bits(x.map(crate::kernels::reduce::relu));
        let portable = bits(Portable::load(&x).relu().0);
        for (i, (s, p)) in scalar.iter().zip(&portable).enumerate() {
            assert_eq!((*s, *p), (want[i % 6], want[i % 6]), "lane {i}: {}", x[i]);
        }
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") {
            #[target_feature(enable = "avx512f")]
            unsafe fn relu512(x: &[f32; LANES]) -> [f32; LANES] {
                let mut out = [0.0; LANES];
                avx512::Avx512::load(x).relu().store(&mut out);
                out
            }
            // SAFETY: the CPU has AVX-512F.
            assert_eq!(bits(unsafe { relu512(&x) }), scalar);
        }
    }

    /// The AVX-512 register transpose equals the portable one (where the CPU has AVX-512).
    #[test]
    fn register_transpose_matches_the_portable_one() {
        let rows: [Portable; LANES] = std::array::from_fn(|i| Portable(std::array::from_fn(|j| (i * 100 + j) as f32)));
        let want = Portable::transpose(rows);
        for (j, col) in want.iter().enumerate() {
            for (i, &v) in col.0.iter().enumerate() {
                assert_eq!(v, (i * 100 + j) as f32);
            }
        }
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") {
            #[target_feature(enable = "avx512f")]
            unsafe fn transposed(rows: &[Portable; LANES]) -> [[f32; LANES]; LANES] {
                let v: [avx512::Avx512; LANES] = std::array::from_fn(|i| avx512::Avx512::load(&rows[i].0));
                let mut out = [[0.0f32; LANES]; LANES];
                for (o, t) in out.iter_mut().zip(avx512::Avx512::transpose(v)) {
                    t.store(o);
                }
                out
            }
            // SAFETY: the CPU has AVX-512F.
            let got = unsafe { transposed(&rows) };
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(g, &w.0);
            }
        }
    }

    /// The pool's rule in both versions: ties keep the first (signed zeros tell), NaN beats a
    /// number, a later NaN does not replace an earlier one.
    #[test]
    fn pool_max_is_the_pools_rule_in_both_versions() {
        let pairs = [
            (1.0, 2.0),
            (2.0, 1.0),
            (-0.0, 0.0),
            (0.0, -0.0),
            (1.0, f32::NAN),
            (f32::NAN, 1.0),
            (-f32::NAN, f32::NAN),
            (-3.0, -3.0),
        ];
        let a: [f32; LANES] = std::array::from_fn(|i| pairs[i % pairs.len()].0);
        let b: [f32; LANES] = std::array::from_fn(|i| pairs[i % pairs.len()].1);
        let want: [f32; LANES] = std::array::from_fn(|i| {
            if crate::kernels::reduce::beats(b[i], a[i]) {
                b[i]
            } else {
                a[i]
            }
        });
        let bits = |v: [f32; LANES]| v.map(f32::to_bits);
        assert_eq!(bits(Portable(a).pool_max(Portable(b)).0), bits(want));
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") {
            #[target_feature(enable = "avx512f")]
            unsafe fn pooled(a: &[f32; LANES], b: &[f32; LANES]) -> [f32; LANES] {
                let mut out = [0.0f32; LANES];
                avx512::Avx512::load(a)
                    .pool_max(avx512::Avx512::load(b))
                    .store(&mut out);
                out
            }
            // SAFETY: the CPU has AVX-512F.
            assert_eq!(bits(unsafe { pooled(&a, &b) }), bits(want));
        }
    }

    /// The softmax's primitives in both versions, bit for bit: exp equals `special::exp`
    /// lane by lane (NaN, ±inf and the clamp's ends included), the reductions follow the tree,
    /// max follows x86's rule, the masked loads fill and keep what they say.
    #[test]
    fn softmax_primitives_agree_in_both_versions() {
        let specials = [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -87.5,
            88.5,
            -0.0,
            0.0,
            1e-30,
        ];
        let inputs: Vec<[f32; LANES]> = (0..200)
            .map(|k| {
                std::array::from_fn(|i| match (k * LANES + i) % 23 {
                    0..=7 if k % 3 == 0 => specials[(k + i) % specials.len()],
                    j => ((k * 131 + i * 17 + j) % 2001) as f32 / 10.0 - 100.0,
                })
            })
            .collect();
        let bits = |v: [f32; LANES]| v.map(f32::to_bits);
        for (k, x) in inputs.iter().enumerate() {
            let e = Portable(*x).exp().0;
            for i in 0..LANES {
                assert_eq!(
                    e[i].to_bits(),
                    crate::kernels::special::exp(x[i]).to_bits(),
                    "exp({})",
                    x[i]
                );
            }
            let y = inputs[(k + 1) % inputs.len()];
            let want = (
                bits(e),
                Portable(*x).reduce_sum().to_bits(),
                Portable(*x).reduce_max().to_bits(),
                bits(Portable(*x).max(Portable(y)).0),
                bits(Portable::load_first_or(x, k % LANES, -7.0).0),
                bits(Portable(*x).keep_first(k % LANES).0),
            );
            for (i, &v) in x.iter().enumerate() {
                let first = i < k % LANES;
                assert_eq!(want.4[i], if first { v } else { -7.0 }.to_bits());
                assert_eq!(want.5[i], if first { v } else { 0.0 }.to_bits());
            }
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx512f") {
                type Got = ([u32; LANES], u32, u32, [u32; LANES], [u32; LANES], [u32; LANES]);
                #[target_feature(enable = "avx512f")]
                unsafe fn dispatched(x: &[f32; LANES], y: &[f32; LANES], n: usize) -> Got {
                    let out = |v: avx512::Avx512| {
                        let mut o = [0.0f32; LANES];
                        v.store(&mut o);
                        o.map(f32::to_bits)
                    };
                    let v = avx512::Avx512::load(x);
                    (
                        out(v.exp()),
                        v.reduce_sum().to_bits(),
                        v.reduce_max().to_bits(),
                        out(v.max(avx512::Avx512::load(y))),
                        out(avx512::Avx512::load_first_or(x, n, -7.0)),
                        out(v.keep_first(n)),
                    )
                }
                // SAFETY: the CPU has AVX-512F.
                let got = unsafe { dispatched(x, &y, k % LANES) };
                assert_eq!(got, want, "inputs {x:?}");
            }
        }
    }

    #[test]
    fn where_positive_is_the_relu_mask_in_both_versions() {
        let by: [f32; LANES] = std::array::from_fn(|i| match i % 5 {
            0 => 1.5,
            1 => -2.0,
            2 => 0.0,
            3 => f32::NAN,
            _ => -0.0,
        });
        let v: [f32; LANES] = std::array::from_fn(|i| i as f32 + 0.25);
        let want: [f32; LANES] = std::array::from_fn(|i| crate::kernels::reduce::relu_mask(by[i], v[i]));
        assert_eq!(Portable(v).where_positive(Portable(by)).0, want);
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") {
            #[target_feature(enable = "avx512f")]
            unsafe fn masked(v: &[f32; LANES], by: &[f32; LANES]) -> [f32; LANES] {
                let mut out = [0.0f32; LANES];
                avx512::Avx512::load(v)
                    .where_positive(avx512::Avx512::load(by))
                    .store(&mut out);
                out
            }
            // SAFETY: the CPU has AVX-512F.
            assert_eq!(unsafe { masked(&v, &by) }, want);
        }
    }

    /// store_kept writes exactly the kept lanes, in order, and nothing past them, on both lane
    /// types: no lane, one, a run, scattered ones, all.
    #[test]
    fn store_kept_packs_the_kept_lanes_in_order() {
        let v: [f32; LANES] = std::array::from_fn(|i| i as f32 + 0.5);
        for keep in [0u16, 1, 0x8000, 0x3ffe, 0xa5a5, 0x7fff, 0xffff] {
            let want: Vec<f32> = (0..LANES).filter(|l| keep >> l & 1 == 1).map(|l| v[l]).collect();
            let check = |got: [f32; LANES + 2], what: &str| {
                assert_eq!(&got[..want.len()], &want[..], "{what} {keep:#x}");
                assert!(
                    got[want.len()..].iter().all(|x| *x == -1.0),
                    "{what} {keep:#x}: wrote past the kept lanes"
                );
            };
            let mut got = [-1.0f32; LANES + 2];
            Portable::load(&v).store_kept(keep, &mut got);
            check(got, "portable");
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx512f") {
                #[target_feature(enable = "avx512f")]
                unsafe fn kept(v: &[f32; LANES], keep: u16) -> [f32; LANES + 2] {
                    let mut out = [-1.0f32; LANES + 2];
                    avx512::Avx512::load(v).store_kept(keep, &mut out);
                    out
                }
                // SAFETY: the CPU has AVX-512F.
                check(unsafe { kept(&v, keep) }, "avx512");
            }
        }
    }
}
