//! The exact GELU (nn.GELU(approximate='none'), timm's MLP activation), with Φ from
//! `special::normal_cdf_and_kernel` so the loops vectorize.

use rayon::prelude::*;

use crate::kernels::simd::multiversion;
use crate::kernels::special::normal_cdf_and_kernel;

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// 1/√(2π)
const INV_SQRT_2PI: f32 = 0.398_942_3;

// y = x·Φ(x) = x/2·(1 + erf(x/√2))
pub fn gelu_forward(x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len(), "gelu: y");
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(yc, xc)| forward_chunk(xc, yc));
}

multiversion! {
    /// `gelu_forward` on one thread.
    fn forward_chunk(xc: &[f32], yc: &mut [f32]) {
        yc.iter_mut().zip(xc).for_each(|(o, &v)| *o = gelu(v));
    }
}

/// GELU(x) = x·Φ(x), inlined into the callers' vector loops.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    x * normal_cdf_and_kernel(x).0
}

/// (GELU(x), GELU'(x)) = (x·Φ(x), Φ(x) + x·φ(x)) from one Φ: the forward keeps the slope for
/// the backward, which then multiplies instead of evaluating Φ and φ again (the ViT's GELU
/// backward was 3.9% of a vit:128 step). The slope is the same expression `gelu_backward`
/// takes, so the gradients keep their bits.
#[inline(always)]
pub fn gelu_and_slope(x: f32) -> (f32, f32) {
    let (cdf, kernel) = normal_cdf_and_kernel(x);
    (x * cdf, cdf + x * INV_SQRT_2PI * kernel)
}

// g = GELU(x), x ← GELU'(x): the MLP's activation, its input replaced by the slope at it.
pub fn gelu_forward_keeping_slope(x: &mut [f32], g: &mut [f32]) {
    assert_eq!(x.len(), g.len(), "gelu: g");
    x.par_chunks_mut(CHUNK)
        .zip(g.par_chunks_mut(CHUNK))
        .for_each(|(xc, gc)| forward_slope_chunk(xc, gc));
}

multiversion! {
    /// `gelu_forward_keeping_slope` on one thread.
    fn forward_slope_chunk(xc: &mut [f32], gc: &mut [f32]) {
        for (v, o) in xc.iter_mut().zip(gc.iter_mut()) {
            let (g, slope) = gelu_and_slope(*v);
            *o = g;
            *v = slope;
        }
    }
}

// d ← d·GELU'(u) from the slope the forward kept, in parallel runs.
pub fn gelu_backward_from_slope(slope: &[f32], d: &mut [f32]) {
    assert_eq!(slope.len(), d.len(), "gelu backward: slope");
    d.par_chunks_mut(CHUNK)
        .zip(slope.par_chunks(CHUNK))
        .for_each(|(dc, sc)| scale_by_slope(sc, dc));
}

multiversion! {
    /// d ← d·slope in place, on one thread (dense_backward's epilogue: the gradient of a Linear
    /// whose input was GELU(u), with the slope GELU'(u) the forward kept).
    pub fn scale_by_slope(slope: &[f32], dc: &mut [f32]) {
        dc.iter_mut().zip(slope).for_each(|(o, &s)| *o *= s);
    }
}

// dx = dy·(Φ(x) + x·φ(x)), φ(x) = exp(−x²/2)/√(2π)
pub fn gelu_backward(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    assert_eq!(x.len(), dy.len(), "gelu backward: dy");
    assert_eq!(x.len(), dx.len(), "gelu backward: dx");
    dx.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
        .for_each(|(dc, (xc, gc))| backward_chunk(xc, gc, dc));
}

multiversion! {
    fn backward_chunk(xc: &[f32], gc: &[f32], dc: &mut [f32]) {
        for ((o, &v), &g) in dc.iter_mut().zip(xc).zip(gc) {
            let (cdf, kernel) = normal_cdf_and_kernel(v);
            *o = g * (cdf + v * INV_SQRT_2PI * kernel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The forward that keeps the slope gives GELU's values and, in place of x, the derivative
    /// `gelu_backward` takes, bit for bit (over several parallel chunks).
    #[test]
    fn forward_keeps_the_slope_gelu_backward_uses() {
        let x: Vec<f32> = (0..3 * CHUNK + 5)
            .map(|i| ((i * 37 % 1001) as f32 / 100.0) - 5.0)
            .collect();
        let (mut want_g, mut want_slope) = (vec![0.0; x.len()], vec![0.0; x.len()]);
        gelu_forward(&x, &mut want_g);
        gelu_backward(&x, &vec![1.0; x.len()], &mut want_slope);
        let (mut slope, mut g) = (x.clone(), vec![f32::NAN; x.len()]);
        gelu_forward_keeping_slope(&mut slope, &mut g);
        assert_eq!((g, slope), (want_g, want_slope));
    }

    #[test]
    fn gelu_matches_known_values_and_its_derivative() {
        // GELU(1) = Φ(1) = 0.841344746..., GELU(-2) = -2·Φ(-2) = -0.045500264...
        let x = [0.0f32, 1.0, -2.0, 3.5];
        let mut y = [0.0; 4];
        gelu_forward(&x, &mut y);
        assert!(y[0].abs() < 1e-7);
        assert!((y[1] - 0.841_344_7).abs() < 1e-6);
        assert!((y[2] + 0.045_500_26).abs() < 1e-6);
        let mut dx = [0.0; 4];
        gelu_backward(&x, &[1.0; 4], &mut dx);
        for (i, &v) in x.iter().enumerate() {
            let h = 1e-3f64;
            let f = |z: f64| 0.5 * z * (1.0 + libm::erf(z / std::f64::consts::SQRT_2));
            let fd = (f(v as f64 + h) - f(v as f64 - h)) / (2.0 * h);
            assert!((dx[i] as f64 - fd).abs() < 1e-5, "x {v}: {} vs {fd}", dx[i]);
        }
    }
}
