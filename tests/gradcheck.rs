//! Finite-difference gradient checks: for f(x, θ) = Σ r ⊙ layer(x; θ) with a fixed random r,
//! the backward pass must agree with central differences for the input and every parameter.

use normlab::kernels::loss::softmax_cross_entropy;
use normlab::nn::activation::{ReLU, Sigmoid};
use normlab::nn::batch_norm::{BatchNorm, BatchNormConfig};
use normlab::nn::conv2d::Conv2d;
use normlab::nn::dropout::Dropout;
use normlab::nn::layer::{backward_once, forward_once};
use normlab::nn::linear::Linear;
use normlab::nn::pool::{AvgPool2d, GlobalAvgPool, MaxPool2d};
use normlab::nn::{Layer, Mode};
use normlab::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random(shape: &[usize], rng: &mut ChaCha8Rng) -> Tensor {
    let n = shape.iter().product();
    Tensor {
        shape: shape.to_vec(),
        data: (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect(),
    }
}

fn objective(layer: &mut dyn Layer, x: &Tensor, r: &Tensor) -> f64 {
    let y = forward_once(layer, x, Mode::Train).unwrap();
    y.data.iter().zip(&r.data).map(|(&a, &b)| a as f64 * b as f64).sum()
}

/// Relative error ||a - n|| / max(||a||, ||n||) over the checked coordinates.
fn rel_err(analytic: &[f64], numeric: &[f64]) -> f64 {
    let diff: f64 = analytic
        .iter()
        .zip(numeric)
        .map(|(a, n)| (a - n).powi(2))
        .sum::<f64>()
        .sqrt();
    let na: f64 = analytic.iter().map(|a| a * a).sum::<f64>().sqrt();
    let nn: f64 = numeric.iter().map(|a| a * a).sum::<f64>().sqrt();
    diff / na.max(nn).max(1e-12)
}

/// Checks up to `samples` coordinates of dx and of each parameter's gradient.
fn check(name: &str, layer: &mut dyn Layer, x: Tensor, h: f32) {
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let y = forward_once(layer, &x, Mode::Train).unwrap();
    let r = random(&y.shape, &mut rng);
    for (_, p) in layer.params() {
        p.grad.data.fill(0.0);
    }
    let y = forward_once(layer, &x, Mode::Train).unwrap();
    let dx = backward_once(layer, &x, &y, &r).unwrap();
    let samples = 24;
    let pick = |len: usize, rng: &mut ChaCha8Rng| -> Vec<usize> {
        if len <= samples {
            (0..len).collect()
        } else {
            (0..samples).map(|_| rng.gen_range(0..len)).collect()
        }
    };
    // Input gradient.
    let (mut ana, mut num) = (Vec::new(), Vec::new());
    for i in pick(x.len(), &mut rng) {
        let mut xp = x.clone();
        xp.data[i] += h;
        let fp = objective(layer, &xp, &r);
        xp.data[i] -= 2.0 * h;
        let fm = objective(layer, &xp, &r);
        num.push((fp - fm) / (2.0 * h as f64));
        ana.push(dx.data[i] as f64);
    }
    let e = rel_err(&ana, &num);
    assert!(
        e < 1e-2,
        "{name}: dx relative error {e:.2e}\nanalytic {ana:?}\nnumeric {num:?}"
    );
    // Parameter gradients.
    let grads: Vec<Vec<f32>> = layer.params().iter().map(|(_, p)| p.grad.data.clone()).collect();
    let count = grads.len();
    for (k, grad) in grads.iter().enumerate().take(count) {
        let (mut ana, mut num) = (Vec::new(), Vec::new());
        for i in pick(grad.len(), &mut rng) {
            layer.params()[k].1.value.data[i] += h;
            let fp = objective(layer, &x, &r);
            layer.params()[k].1.value.data[i] -= 2.0 * h;
            let fm = objective(layer, &x, &r);
            layer.params()[k].1.value.data[i] += h;
            num.push((fp - fm) / (2.0 * h as f64));
            ana.push(grad[i] as f64);
        }
        let e = rel_err(&ana, &num);
        let pname = layer.params()[k].0;
        assert!(e < 1e-2, "{name}: d{pname} relative error {e:.2e}");
    }
}

fn rng() -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(7)
}

#[test]
fn conv2d_gradients() {
    let mut g = rng();
    let mut conv = Conv2d::new(3, 4, 3, 1, 1, true, &mut g);
    conv.set_input_grad(true);
    check("conv 3x3 pad 1", &mut conv, random(&[2, 3, 5, 6], &mut g), 1e-2);
    let mut fused = Conv2d::new(3, 4, 3, 1, 1, true, &mut g).with_relu();
    fused.set_input_grad(true);
    check("conv + fused relu", &mut fused, random(&[2, 3, 5, 6], &mut g), 1e-3);
    let mut strided = Conv2d::new(2, 3, 3, 2, 0, false, &mut g);
    strided.set_input_grad(true);
    check("conv 3x3 stride 2", &mut strided, random(&[2, 2, 7, 7], &mut g), 1e-2);
}

#[test]
fn linear_gradients() {
    let mut g = rng();
    let mut fc = Linear::new(7, 5, true, &mut g);
    check("linear", &mut fc, random(&[4, 7], &mut g), 1e-2);
}

#[test]
fn activation_gradients() {
    let mut g = rng();
    check("relu", &mut ReLU, random(&[3, 4, 5], &mut g), 1e-3);
    check("sigmoid", &mut Sigmoid, random(&[3, 10], &mut g), 1e-2);
    let mut drop = Dropout::new(0.3).unwrap();
    drop.set_step_seed(5);
    check("dropout", &mut drop, random(&[4, 10], &mut g), 1e-2);
}

#[test]
fn pooling_gradients() {
    let mut g = rng();
    check(
        "maxpool",
        &mut MaxPool2d::new(2, 2),
        random(&[2, 3, 6, 6], &mut g),
        1e-3,
    );
    check(
        "avgpool",
        &mut AvgPool2d::new(2, 2),
        random(&[2, 3, 6, 4], &mut g),
        1e-2,
    );
    check(
        "global avgpool",
        &mut GlobalAvgPool,
        random(&[2, 3, 4, 4], &mut g),
        1e-2,
    );
}

#[test]
fn batch_norm_gradients() {
    let mut g = rng();
    let mut affine = BatchNorm::new(2, 3, BatchNormConfig::default());
    for (_, p) in affine.params() {
        p.value = random(&p.value.shape, &mut g);
    }
    check("bn2d", &mut affine, random(&[4, 3, 3, 3], &mut g), 1e-2);
    let cfg = BatchNormConfig {
        affine: false,
        track_running_stats: false,
        ..Default::default()
    };
    check(
        "bn2d no affine",
        &mut BatchNorm::new(2, 4, cfg),
        random(&[3, 4, 2, 2], &mut g),
        1e-2,
    );
    check(
        "bn1d",
        &mut BatchNorm::new(1, 5, BatchNormConfig::default()),
        random(&[6, 5], &mut g),
        1e-2,
    );
}

#[test]
fn softmax_cross_entropy_gradient() {
    let mut g = rng();
    let logits = random(&[4, 6], &mut g);
    let labels = [0u8, 5, 2, 2];
    let mut d = vec![0.0; logits.len()];
    softmax_cross_entropy(&logits.data, &labels, 6, &mut d);
    let mut scratch = vec![0.0; logits.len()];
    let h = 1e-2f32;
    for (i, &analytic) in d.iter().enumerate() {
        let mut p = logits.clone();
        p.data[i] += h;
        let (fp, _) = softmax_cross_entropy(&p.data, &labels, 6, &mut scratch);
        p.data[i] -= 2.0 * h;
        let (fm, _) = softmax_cross_entropy(&p.data, &labels, 6, &mut scratch);
        let num = (fp - fm) / (2.0 * h as f64);
        assert!((num - analytic as f64).abs() < 1e-4, "dlogit {i}: {num} vs {analytic}");
    }
}

/// Builds the layer for `spec` on a per-sample shape, with non-trivial affine parameters.
fn norm_layer(spec: &str, sample_shape: &[usize], relu: bool, g: &mut ChaCha8Rng) -> Box<dyn Layer> {
    let norm: normlab::nn::norm_spec::NormSpec = spec.parse().unwrap();
    let mut layer = norm.build(sample_shape, "test", relu).unwrap().unwrap();
    for (_, p) in layer.params() {
        p.value.data.iter_mut().for_each(|v| *v += g.gen_range(-0.5..0.5));
    }
    layer
}

#[test]
fn every_norm_spec_has_correct_gradients() {
    let mut g = rng();
    for (spec, shape) in [
        ("bn:momentum=none", vec![4, 3, 3, 3]),
        ("gn:2", vec![3, 4, 3, 3]),
        ("gn:2", vec![4, 6]),
        ("ln", vec![2, 3, 3, 3]),
        ("ln", vec![3, 5]),
        ("layernorm", vec![2, 3, 2, 3]),
        ("in:affine=true", vec![2, 3, 3, 3]),
        ("in:affine=true,track=true", vec![2, 3, 3, 3]),
        ("ghost:2", vec![6, 3, 2, 2]),
        ("ghost:3", vec![6, 4]),
        ("bn-l1", vec![4, 3, 3, 3]),
        ("bn-l1", vec![7, 4]),
        ("bn-linf", vec![4, 3, 3, 3]),
        ("bn-linf", vec![7, 4]),
    ] {
        for relu in [false, true] {
            let mut layer = norm_layer(spec, &shape[1..], relu, &mut g);
            let x = random(&shape, &mut g);
            check(&format!("{spec} relu={relu}"), layer.as_mut(), x, 1e-3);
        }
    }
}

#[test]
fn batch_renorm_gradients_with_r_and_d_clipped() {
    // r and d are constants for backward (stop-gradient); where they sit at their clip limits
    // they are locally constant in x too, so finite differences see the same function.
    // momentum=0 keeps the running statistics (and so the clipping) fixed across the probes.
    let mut g = rng();
    let mut layer = norm_layer("brn:rmax=2,dmax=1,warmup=8,momentum=0", &[3, 3, 3], false, &mut g);
    for (key, b) in layer.buffers() {
        match b {
            normlab::nn::BufferMut::F32(t) if key == "running_mean" => t.data.fill(50.0),
            normlab::nn::BufferMut::F32(t) => t.data.fill(1e4),
            normlab::nn::BufferMut::I64(n) => *n = 1_000_000,
        }
    }
    check("brn clipped", layer.as_mut(), random(&[4, 3, 3, 3], &mut g), 1e-2);
}
