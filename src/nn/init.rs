//! PyTorch's default initialization, so a fresh normlab model is distributed like a fresh
//! PyTorch one.

use rand::Rng;

/// kaiming_uniform_(a=√5) for weights and the matching bias rule both reduce to U(-b, b)
/// with b = 1/√fan_in.
pub fn uniform_fan_in(rng: &mut impl Rng, len: usize, fan_in: usize) -> Vec<f32> {
    let bound = 1.0 / (fan_in as f32).sqrt();
    (0..len).map(|_| rng.gen_range(-bound..bound)).collect()
}
