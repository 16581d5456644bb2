//! Vectorizable reductions over one contiguous run: eight independent f32 accumulators (the
//! compiler maps them to SIMD lanes), combined in f64 by the callers across runs.

const LANES: usize = 8;

/// The f64 total of eight f32 lanes. The lanes pass through `black_box` first: without it,
/// LLVM sees each lane converted on its own after the loop and scalarizes the whole loop.
#[inline(always)]
pub fn lanes_total(lanes: [f32; LANES]) -> f64 {
    std::hint::black_box(lanes).iter().map(|&v| v as f64).sum()
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

/// Σ (x - shift) and Σ (x - shift)² over a run.
#[inline(always)]
pub fn sum_and_sq_shifted(run: &[f32], shift: Center) -> (f64, f64) {
    let mut s = [0.0f32; LANES];
    let mut q = [0.0f32; LANES];
    let chunks = run.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        let c: &[f32; LANES] = c.try_into().expect("exact chunk");
        for l in 0..LANES {
            let d = shift.sub(c[l]);
            s[l] += d;
            q[l] += d * d;
        }
    }
    let (mut st, mut qt) = (0.0f64, 0.0f64);
    for &v in tail {
        let d = shift.sub(v) as f64;
        st += d;
        qt += d * d;
    }
    (lanes_total(s) + st, lanes_total(q) + qt)
}

/// Σ (x - shift) over a run.
#[inline(always)]
pub fn sum_shifted(run: &[f32], shift: Center) -> f64 {
    let mut s = [0.0f32; LANES];
    let chunks = run.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        let c: &[f32; LANES] = c.try_into().expect("exact chunk");
        for l in 0..LANES {
            s[l] += shift.sub(c[l]);
        }
    }
    lanes_total(s) + tail.iter().map(|&v| shift.sub(v) as f64).sum::<f64>()
}

/// Σ dy and Σ dy·(x - shift) over a run.
#[inline(always)]
pub fn sum_dy_and_dy_x(x: &[f32], dy: &[f32], shift: Center) -> (f64, f64) {
    let mut s = [0.0f32; LANES];
    let mut p = [0.0f32; LANES];
    let xc = x.chunks_exact(LANES);
    let dc = dy.chunks_exact(LANES);
    let (xt, dt) = (xc.remainder(), dc.remainder());
    for (xv, dv) in xc.zip(dc) {
        let (xv, dv): (&[f32; LANES], &[f32; LANES]) = (xv.try_into().expect("exact"), dv.try_into().expect("exact"));
        for l in 0..LANES {
            s[l] += dv[l];
            p[l] += dv[l] * shift.sub(xv[l]);
        }
    }
    let (mut st, mut pt) = (0.0f64, 0.0f64);
    for (&xv, &dv) in xt.iter().zip(dt) {
        st += dv as f64;
        pt += dv as f64 * shift.sub(xv) as f64;
    }
    (lanes_total(s) + st, lanes_total(p) + pt)
}

/// Mean and biased variance of values seen as runs, by the corrected two-pass algorithm:
/// pass 1 finds the mean around a shift (the first value, so a large offset never enters an
/// f32 sum), pass 2 sums d = x - mean and d², and var = (Σd² - (Σd)²/m) / m.
#[inline(always)]
pub fn mean_var<'a, I>(runs: I) -> (f64, f32)
where
    I: Iterator<Item = &'a [f32]> + Clone,
{
    let Some(shift) = runs.clone().find_map(|r| r.first().copied()) else {
        return (0.0, 0.0);
    };
    // Pass 1 around the first value: Σ(x - x₀) stays small however large the offset.
    let m: usize = runs.clone().map(|r| r.len()).sum();
    let s1: f64 = runs
        .clone()
        .map(|r| sum_shifted(r, Center { hi: shift, lo: 0.0 }))
        .sum();
    let mean = shift as f64 + s1 / m as f64;
    let (mut sd, mut sq) = (0.0f64, 0.0f64);
    for r in runs {
        let (a, b) = sum_and_sq_shifted(r, Center::new(mean));
        sd += a;
        sq += b;
    }
    let var = ((sq - sd * sd / m as f64) / m as f64).max(0.0);
    (mean + sd / m as f64, var as f32)
}
