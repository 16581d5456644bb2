//! Vectorizable reductions over one contiguous run: eight independent f32 accumulators (the
//! compiler maps them to SIMD lanes), combined in f64 by the callers across runs.

const LANES: usize = 8;

/// Σ (x - shift) and Σ (x - shift)² over a run.
#[inline]
pub fn sum_and_sq_shifted(run: &[f32], shift: f32) -> (f64, f64) {
    let mut s = [0.0f32; LANES];
    let mut q = [0.0f32; LANES];
    let chunks = run.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            let d = c[l] - shift;
            s[l] += d;
            q[l] += d * d;
        }
    }
    let (mut st, mut qt) = (0.0f64, 0.0f64);
    for &v in tail {
        let d = (v - shift) as f64;
        st += d;
        qt += d * d;
    }
    (
        s.iter().map(|&v| v as f64).sum::<f64>() + st,
        q.iter().map(|&v| v as f64).sum::<f64>() + qt,
    )
}

/// Σ (x - shift) over a run.
#[inline]
pub fn sum_shifted(run: &[f32], shift: f32) -> f64 {
    let mut s = [0.0f32; LANES];
    let chunks = run.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            s[l] += c[l] - shift;
        }
    }
    s.iter().map(|&v| v as f64).sum::<f64>() + tail.iter().map(|&v| (v - shift) as f64).sum::<f64>()
}

/// Σ dy and Σ dy·(x - shift) over a run.
#[inline]
pub fn sum_dy_and_dy_x(x: &[f32], dy: &[f32], shift: f32) -> (f64, f64) {
    let mut s = [0.0f32; LANES];
    let mut p = [0.0f32; LANES];
    let xc = x.chunks_exact(LANES);
    let dc = dy.chunks_exact(LANES);
    let (xt, dt) = (xc.remainder(), dc.remainder());
    for (xv, dv) in xc.zip(dc) {
        for l in 0..LANES {
            s[l] += dv[l];
            p[l] += dv[l] * (xv[l] - shift);
        }
    }
    let (mut st, mut pt) = (0.0f64, 0.0f64);
    for (&xv, &dv) in xt.iter().zip(dt) {
        st += dv as f64;
        pt += dv as f64 * (xv - shift) as f64;
    }
    (
        s.iter().map(|&v| v as f64).sum::<f64>() + st,
        p.iter().map(|&v| v as f64).sum::<f64>() + pt,
    )
}

/// Mean and biased variance of values seen as runs, by the corrected two-pass algorithm:
/// pass 1 finds the mean around a shift (the first value, so a large offset never enters an
/// f32 sum), pass 2 sums d = x - mean and d², and var = (Σd² - (Σd)²/m) / m.
pub fn mean_var<'a, I>(runs: I) -> (f32, f32)
where
    I: Iterator<Item = &'a [f32]> + Clone,
{
    let Some(shift) = runs.clone().find_map(|r| r.first().copied()) else {
        return (0.0, 0.0);
    };
    let m: usize = runs.clone().map(|r| r.len()).sum();
    let s1: f64 = runs.clone().map(|r| sum_shifted(r, shift)).sum();
    let mean = shift as f64 + s1 / m as f64;
    let mean32 = mean as f32;
    let (mut sd, mut sq) = (0.0f64, 0.0f64);
    for r in runs {
        let (a, b) = sum_and_sq_shifted(r, mean32);
        sd += a;
        sq += b;
    }
    let var = ((sq - sd * sd / m as f64) / m as f64).max(0.0);
    (mean32 + (sd / m as f64) as f32, var as f32)
}
