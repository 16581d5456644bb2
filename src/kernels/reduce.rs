//! Vectorizable reductions over one contiguous run: 32 independent f32 accumulators (the
//! compiler maps them to four AVX2 or two AVX-512 registers, so the adds of consecutive
//! iterations do not wait on each other), combined in f64 by the callers across runs.

const LANES: usize = 32;
/// Width of the second loop that takes what is left of a run after the 32-wide one.
const SHORT: usize = 8;

/// The f64 total of the f32 lanes, folded pairwise in f32 (32 -> 8 -> 4 -> 2 -> 1) and
/// converted once: folding the last eight in f64 put a serial chain of eight dependent f64 adds
/// after every run, which weighed on short runs (49 values on 7x7 maps). The eight pass through
/// `black_box`: without it LLVM scalarizes the loop that fills the lanes (measured 50% slower).
#[inline(always)]
#[allow(clippy::needless_range_loop)] // explicit lanes are what the vectorizer needs
pub fn lanes_total(lanes: [f32; LANES]) -> f64 {
    let mut eight = [0.0f32; SHORT];
    for l in 0..SHORT {
        eight[l] = (lanes[l] + lanes[l + 2 * SHORT]) + (lanes[l + SHORT] + lanes[l + 3 * SHORT]);
    }
    let eight = std::hint::black_box(eight);
    let four = [
        eight[0] + eight[4],
        eight[1] + eight[5],
        eight[2] + eight[6],
        eight[3] + eight[7],
    ];
    ((four[0] + four[2]) + (four[1] + four[3])) as f64
}

/// A mean carried as f32 hi + lo (hi + lo = the f64 mean to ~48 bits): `(x - hi) - lo` is
/// exact in its first step for x near hi, so a large offset never swamps a small spread.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Center {
    pub hi: f32,
    pub lo: f32,
}

impl Center {
    pub fn new(mean: f64) -> Self {
        let hi = mean as f32;
        Center {
            hi,
            lo: (mean - hi as f64) as f32,
        }
    }
    #[inline(always)]
    pub fn sub(&self, x: f32) -> f32 {
        (x - self.hi) - self.lo
    }
}

/// Σ of a power-of-two number of lanes by halving (a few vector adds, not a chain of N
/// dependent ones), in the same order on every CPU.
#[inline(always)]
pub fn tree_sum<T: Copy + std::ops::Add<Output = T>, const N: usize>(mut t: [T; N]) -> T {
    debug_assert!(N.is_power_of_two());
    let mut half = N / 2;
    while half > 0 {
        for l in 0..half {
            t[l] = t[l] + t[l + half];
        }
        half /= 2;
    }
    t[0]
}

/// RMSNorm's 1/√(mean(x²) + eps), computed in f64 and rounded once to f32 (PyTorch's float64
/// reference agrees within the goldens' tolerance); here for the row and the tile kernels.
pub fn inverse_rms(mean_square: f64, eps: f64) -> f32 {
    (1.0 / (mean_square + eps).sqrt()) as f32
}

/// max(z, 0) that keeps NaN and -0.0, as torch.relu does (f32::max(NaN, 0) is 0, which hid
/// NaN weights as a loss of exactly 0) and as AVX-512's `max(0, z)` in `Lanes::relu` does;
/// a compare and a select, so it vectorizes.
#[inline(always)]
pub fn relu(z: f32) -> f32 {
    if z < 0.0 {
        0.0
    } else {
        z
    }
}

/// 0 where y <= 0, else g: the ReLU gradient mask as bit operations, which vectorize to a
/// compare and an AND (an `if` here compiles to a branch per value). A NaN output passes g on,
/// as PyTorch's threshold_backward does.
#[inline(always)]
pub fn relu_mask(y: f32, g: f32) -> f32 {
    f32::from_bits(g.to_bits() & ((y <= 0.0) as u32).wrapping_sub(1))
}

/// b beats a in a max-pool's window: larger, or NaN where a is not (the first maximum in
/// row-major order wins). Here, below both the pool and the lane types that share the rule.
#[inline(always)]
pub(crate) fn beats(b: f32, a: f32) -> bool {
    (b > a) | (b.is_nan() & !a.is_nan())
}

crate::kernels::simd::multiversion! {
    /// v = v + bias[row] (then max(·, 0) when `relu`) over rows of `cols` values: a conv's
    /// epilogue while its output is in cache.
    pub fn add_bias_relu(v: &mut [f32], cols: usize, bias: Option<&[f32]>, relu: bool) {
        for (r, row) in v.chunks_mut(cols).enumerate() {
            let b = bias.map_or(0.0, |b| b[r]);
            if relu {
                row.iter_mut().for_each(|x| *x = self::relu(*x + b));
            } else {
                row.iter_mut().for_each(|x| *x += b);
            }
        }
    }
}

crate::kernels::simd::multiversion! {
    /// out[r] += Σ_j v[r·cols + j] over rows of `cols` values (a conv's bias gradient), in
    /// SHORT·2 independent lanes: a plain `.sum()` is one serial chain of scalar adds.
    #[allow(clippy::needless_range_loop)] // explicit lanes are what the vectorizer needs
    pub fn add_row_sums(v: &[f32], cols: usize, out: &mut [f32]) {
        for (o, row) in out.iter_mut().zip(v.chunks(cols)) {
            let chunks = row.chunks_exact(2 * SHORT);
            let tail: f32 = chunks.remainder().iter().sum();
            let mut lanes = [0.0f32; 2 * SHORT];
            for ch in chunks {
                for l in 0..2 * SHORT {
                    lanes[l] += ch[l];
                }
            }
            *o += lanes.iter().sum::<f32>() + tail;
        }
    }
}

/// Values a lane accumulates in f32 before its sum moves to f64.
const FLUSH: usize = 4096;

/// Running sums over many runs: f32 lanes (flushed to f64 every `FLUSH` values, so no lane sums
/// more than FLUSH/8 terms) plus f64 totals, so short runs pay no per-run conversion.
#[derive(Clone, Copy)]
pub struct PairSums {
    a: [f32; LANES],
    b: [f32; LANES],
    pending: usize,
    pub total_a: f64,
    pub total_b: f64,
}

impl PairSums {
    #[inline(always)]
    pub fn new() -> Self {
        PairSums {
            a: [0.0; LANES],
            b: [0.0; LANES],
            pending: 0,
            total_a: 0.0,
            total_b: 0.0,
        }
    }

    #[inline(always)]
    fn after(&mut self, n: usize) {
        self.pending += n;
        if self.pending >= FLUSH {
            self.flush();
        }
    }

    #[inline(always)]
    pub fn flush(&mut self) {
        self.total_a += lanes_total(self.a);
        self.total_b += lanes_total(self.b);
        self.a = [0.0; LANES];
        self.b = [0.0; LANES];
        self.pending = 0;
    }

    /// Adds Σ(x - c) and Σ(x - c)² of a run.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)] // explicit lanes are what the vectorizer needs
    pub fn add_centered_and_sq(&mut self, run: &[f32], c: Center) {
        let chunks = run.chunks_exact(LANES);
        let short = chunks.remainder().chunks_exact(SHORT);
        let tail = short.remainder();
        for ch in chunks {
            let ch: &[f32; LANES] = ch.try_into().expect("exact chunk");
            for l in 0..LANES {
                let d = c.sub(ch[l]);
                self.a[l] += d;
                self.b[l] += d * d;
            }
        }
        for ch in short {
            let ch: &[f32; SHORT] = ch.try_into().expect("exact chunk");
            for l in 0..SHORT {
                let d = c.sub(ch[l]);
                self.a[l] += d;
                self.b[l] += d * d;
            }
        }
        for &v in tail {
            let d = c.sub(v) as f64;
            self.total_a += d;
            self.total_b += d * d;
        }
        self.after(run.len());
    }

    /// Adds Σg and Σg·(x - c) of a run, g = dy, or dy·[y > 0] when `mask` is given.
    #[inline(always)]
    pub fn add_grad(&mut self, x: &[f32], mask: Option<&[f32]>, dy: &[f32], c: Center) {
        match mask {
            None => self.add_grad_lanes::<false>(x, x, dy, c),
            Some(y) => self.add_grad_lanes::<true>(x, y, dy, c),
        }
        self.after(x.len());
    }

    /// `add_grad` for one choice of masking (y is ignored when MASK is false).
    #[inline(always)]
    #[allow(clippy::needless_range_loop)] // explicit lanes are what the vectorizer needs
    fn add_grad_lanes<const MASK: bool>(&mut self, x: &[f32], y: &[f32], dy: &[f32], c: Center) {
        let g = |yv: f32, dv: f32| if MASK { relu_mask(yv, dv) } else { dv };
        let (xc, yc, dc) = (x.chunks_exact(LANES), y.chunks_exact(LANES), dy.chunks_exact(LANES));
        let (xs, ys, ds) = (
            xc.remainder().chunks_exact(SHORT),
            yc.remainder().chunks_exact(SHORT),
            dc.remainder().chunks_exact(SHORT),
        );
        let (xt, yt, dt) = (xs.remainder(), ys.remainder(), ds.remainder());
        for ((xv, yv), dv) in xc.zip(yc).zip(dc) {
            let xv: &[f32; LANES] = xv.try_into().expect("exact");
            let yv: &[f32; LANES] = yv.try_into().expect("exact");
            let dv: &[f32; LANES] = dv.try_into().expect("exact");
            for l in 0..LANES {
                let gv = g(yv[l], dv[l]);
                self.a[l] += gv;
                self.b[l] += gv * c.sub(xv[l]);
            }
        }
        for ((xv, yv), dv) in xs.zip(ys).zip(ds) {
            let xv: &[f32; SHORT] = xv.try_into().expect("exact");
            let yv: &[f32; SHORT] = yv.try_into().expect("exact");
            let dv: &[f32; SHORT] = dv.try_into().expect("exact");
            for l in 0..SHORT {
                let gv = g(yv[l], dv[l]);
                self.a[l] += gv;
                self.b[l] += gv * c.sub(xv[l]);
            }
        }
        for ((&xv, &yv), &dv) in xt.iter().zip(yt).zip(dt) {
            let gv = g(yv, dv) as f64;
            self.total_a += gv;
            self.total_b += gv * c.sub(xv) as f64;
        }
    }

    /// The f64 totals, with everything pending flushed.
    #[inline(always)]
    pub fn totals(mut self) -> (f64, f64) {
        self.flush();
        (self.total_a, self.total_b)
    }
}

impl Default for PairSums {
    fn default() -> Self {
        Self::new()
    }
}

/// Mean and biased variance of values seen as runs, in one pass of shifted sums: with K an
/// estimate of the mean (the first value of each of up to 64 runs, i.e. of different samples,
/// topped up with eight values spread over the first run when there are few runs), Σd and Σd² of d = x - K give
/// mean = K + Σd/m and var = (Σd² - (Σd)²/m)/m. K sits within a few standard deviations of
/// the mean, so the subtraction loses almost nothing, and a large offset never enters an f32 sum.
#[inline(always)]
pub fn mean_var<'a, I>(runs: I) -> (f64, f32)
where
    I: Iterator<Item = &'a [f32]> + Clone,
{
    let Some(shift) = shift_estimate(runs.clone()) else {
        return (0.0, 0.0);
    };
    let mut acc = PairSums::new();
    let mut m = 0usize;
    for r in runs {
        acc.add_centered_and_sq(r, shift);
        m += r.len();
    }
    let (sd, sq) = acc.totals();
    shifted_mean_var(shift, sd, sq, m)
}

/// The shift K of `mean_var`: the mean of the first value of up to 64 runs, topped up with eight
/// values spread over the first run when there are fewer than 16 runs; None without values.
#[inline(always)]
pub fn shift_estimate<'a, I>(runs: I) -> Option<Center>
where
    I: Iterator<Item = &'a [f32]> + Clone,
{
    let (mut head, mut k) = (0.0f64, 0usize);
    for r in runs.clone().take(64) {
        if let Some(&v) = r.first() {
            head += v as f64;
            k += 1;
        }
    }
    if k < 16 {
        // Few runs: add eight evenly spaced values of the first run (cheap for short blocks).
        let first = runs.clone().find(|r| !r.is_empty()).unwrap_or(&[]);
        let step = (first.len() / 8).max(1);
        for &v in first.iter().skip(step).step_by(step).take(8) {
            head += v as f64;
            k += 1;
        }
    }
    (k > 0).then(|| Center::new(head / k as f64))
}

/// mean = K + Σd/m, var = (Σd² - (Σd)²/m)/m from the shifted sums Σd, Σd² of m values.
#[inline(always)]
pub fn shifted_mean_var(shift: Center, sum_d: f64, sum_sq: f64, m: usize) -> (f64, f32) {
    let var = ((sum_sq - sum_d * sum_d / m as f64) / m as f64).max(0.0);
    (shift.hi as f64 + shift.lo as f64 + sum_d / m as f64, var as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact(values: &[f32]) -> (f64, f64) {
        let m = values.len() as f64;
        let mean = values.iter().map(|&v| v as f64).sum::<f64>() / m;
        (mean, values.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / m)
    }

    #[test]
    fn row_sums_add_every_value_of_each_row() {
        for cols in [1, 7, 16, 49, 50] {
            let v: Vec<f32> = (0..3 * cols).map(|i| (i % 5) as f32 - 1.5).collect();
            let mut out = [1.0f32; 3];
            add_row_sums(&v, cols, &mut out);
            for (r, &o) in out.iter().enumerate() {
                let want = 1.0 + v[r * cols..(r + 1) * cols].iter().map(|&x| x as f64).sum::<f64>();
                assert_eq!(o as f64, want, "cols {cols} row {r}");
            }
        }
    }

    #[test]
    fn mean_var_is_exact_for_offsets_and_outlier_runs() {
        let noise = |i: usize| ((i as f64 * 0.7548776662).fract() - 0.5) as f32;
        // 128 runs of 49: mean 1e4, spread 1e-2; then the same with run 0 shifted by 100 sigma.
        for outlier in [0.0f32, 1.0] {
            let data: Vec<f32> = (0..128 * 49)
                .map(|i| 1e4 + 0.02 * noise(i) + if i < 49 { outlier } else { 0.0 })
                .collect();
            let (mean, var) = mean_var(data.chunks(49));
            let (em, ev) = exact(&data);
            assert!((mean - em).abs() < 1e-7 * em.abs(), "mean {mean} vs {em}");
            assert!(
                ((var as f64) - ev).abs() < 1e-5 * ev,
                "var {var} vs {ev} (outlier {outlier})"
            );
        }
    }
}
