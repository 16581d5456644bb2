//! PyTorch's default initialization, so a fresh normlab model is distributed like a fresh
//! PyTorch one.

use rand::Rng;

/// kaiming_uniform_(a=√5) for weights and the matching bias rule both reduce to U(-b, b)
/// with b = 1/√fan_in.
pub fn uniform_fan_in(rng: &mut impl Rng, len: usize, fan_in: usize) -> Vec<f32> {
    let bound = 1.0 / (fan_in as f32).sqrt();
    (0..len).map(|_| rng.gen_range(-bound..bound)).collect()
}

/// timm's trunc_normal_(std, a=-2, b=2): N(0, std²) redrawn outside [-2, 2] (absolute bounds,
/// as timm's ViT calls it; at std 0.02 they are 100σ away). Box–Muller on the model's rng.
pub fn trunc_normal(rng: &mut impl Rng, len: usize, std: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let u1: f64 = rng.gen_range(f64::MIN_POSITIVE..1.0);
        let u2: f64 = rng.gen();
        let r = (-2.0 * u1.ln()).sqrt();
        for z in [
            r * (std::f64::consts::TAU * u2).cos(),
            r * (std::f64::consts::TAU * u2).sin(),
        ] {
            let v = (z * std as f64) as f32;
            if out.len() < len && (-2.0..=2.0).contains(&v) {
                out.push(v);
            }
        }
    }
    out
}
