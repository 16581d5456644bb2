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

/// Central difference at one coordinate, or None at a kink (a ReLU or max-pool switching
/// within ±h): there the one-sided slopes disagree and no finite difference is meaningful.
fn central(f0: f64, fp: f64, fm: f64, h: f32) -> Option<f64> {
    let (right, left) = ((fp - f0) / h as f64, (f0 - fm) / h as f64);
    let scale = right.abs().max(left.abs()).max(1e-2);
    ((right - left).abs() <= 0.1 * scale).then_some((fp - fm) / (2.0 * h as f64))
}

/// Checks up to `samples` coordinates of dx and of each parameter's gradient; at most a quarter
/// of the coordinates may be skipped as kinks.
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
    let f0 = objective(layer, &x, &r);
    // Input gradient.
    let (mut ana, mut num, mut kinks) = (Vec::new(), Vec::new(), 0);
    let picked = pick(x.len(), &mut rng);
    for &i in &picked {
        let mut xp = x.clone();
        xp.data[i] += h;
        let fp = objective(layer, &xp, &r);
        xp.data[i] -= 2.0 * h;
        let fm = objective(layer, &xp, &r);
        match central(f0, fp, fm, h) {
            Some(d) => {
                num.push(d);
                ana.push(dx.data[i] as f64);
            }
            None => kinks += 1,
        }
    }
    assert!(
        kinks * 4 <= picked.len(),
        "{name}: {kinks} of {} dx coordinates sit on kinks",
        picked.len()
    );
    let e = rel_err(&ana, &num);
    assert!(
        e < 1e-2,
        "{name}: dx relative error {e:.2e}\nanalytic {ana:?}\nnumeric {num:?}"
    );
    // Parameter gradients.
    let grads: Vec<Vec<f32>> = layer.params().iter().map(|(_, p)| p.grad.data.clone()).collect();
    let count = grads.len();
    for (k, grad) in grads.iter().enumerate().take(count) {
        let (mut ana, mut num, mut kinks) = (Vec::new(), Vec::new(), 0);
        let picked = pick(grad.len(), &mut rng);
        for &i in &picked {
            layer.params()[k].1.value.data[i] += h;
            let fp = objective(layer, &x, &r);
            layer.params()[k].1.value.data[i] -= 2.0 * h;
            let fm = objective(layer, &x, &r);
            layer.params()[k].1.value.data[i] += h;
            match central(f0, fp, fm, h) {
                Some(d) => {
                    num.push(d);
                    ana.push(grad[i] as f64);
                }
                None => kinks += 1,
            }
        }
        let pname = layer.params()[k].0;
        assert!(
            kinks * 4 <= picked.len(),
            "{name}: {kinks} of {} d{pname} coordinates sit on kinks",
            picked.len()
        );
        let e = rel_err(&ana, &num);
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
        "relu+maxpool",
        &mut MaxPool2d::new(2, 2).with_relu(),
        random(&[2, 3, 6, 6], &mut g),
        1e-3,
    );
    check(
        "maxpool 3x3 stride 2",
        &mut MaxPool2d::new(3, 2).with_relu(),
        random(&[2, 3, 7, 7], &mut g),
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
        // H·W >= 64: the streaming BN kernels (sums per sample chunk, then a second pass).
        ("bn", vec![3, 2, 8, 9]),
        ("gn:2", vec![3, 4, 3, 3]),
        ("gn:2", vec![4, 6]),
        ("ln", vec![2, 3, 3, 3]),
        ("ln", vec![3, 5]),
        ("layernorm", vec![2, 3, 2, 3]),
        ("rms", vec![2, 3, 2, 3]),
        ("rms:affine=false", vec![3, 5]),
        ("in:affine=true", vec![2, 3, 3, 3]),
        ("in:affine=true,track=true", vec![2, 3, 3, 3]),
        ("ghost:2", vec![6, 3, 2, 2]),
        ("ghost:3", vec![6, 4]),
        ("bn-l1", vec![4, 3, 3, 3]),
        ("bn-l1", vec![7, 4]),
        ("bn-linf", vec![4, 3, 3, 3]),
        ("bn-linf", vec![7, 4]),
        // The noise is drawn from the layer's step seed, fixed across the probes.
        ("bn-noisy", vec![4, 3, 3, 3]),
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

/// The block's forward and backward equal the same computation chained by hand from the
/// layers checked above (conv, BN+ReLU, conv, BN, 1x1 conv + BN shortcut, add, ReLU).
#[test]
fn residual_block_is_its_layers_composed() {
    use normlab::nn::batch_norm::{BatchNorm, BatchNormConfig};
    use normlab::nn::norm_spec::NormSpec;
    use normlab::nn::residual::BasicBlock;
    let mut g = rng();
    let (n, cin, mid, cout, h, w, stride) = (4, 3, 5, 6, 6, 5, 2);
    let out = [(h - 1) / stride + 1, (w - 1) / stride + 1];
    let norm: NormSpec = "bn".parse().unwrap();
    let mut block = BasicBlock::new(cin, mid, cout, stride, out, &norm, "layer", &mut g).unwrap();
    for (_, p) in block.params() {
        p.value.data.iter_mut().for_each(|v| *v += g.gen_range(-0.3..0.3));
    }
    // The same parameters in stand-alone layers.
    let mut conv1 = Conv2d::new(cin, mid, 3, stride, 1, false, &mut g);
    let mut bn1 = BatchNorm::new(2, mid, BatchNormConfig::default()).with_relu();
    let mut conv2 = Conv2d::new(mid, cout, 3, 1, 1, false, &mut g);
    let mut bn2 = BatchNorm::new(2, cout, BatchNormConfig::default());
    let mut sc = Conv2d::new(cin, cout, 1, stride, 0, false, &mut g);
    let mut scbn = BatchNorm::new(2, cout, BatchNormConfig::default());
    for l in [&mut conv1 as &mut dyn Layer, &mut conv2, &mut sc] {
        l.set_input_grad(true);
    }
    let values: std::collections::HashMap<String, Tensor> = block
        .params()
        .into_iter()
        .map(|(k, p)| (k.to_string(), p.value.clone()))
        .collect();
    let parts: [(&str, &mut dyn Layer); 6] = [
        ("conv1", &mut conv1),
        ("bn1", &mut bn1),
        ("conv2", &mut conv2),
        ("bn2", &mut bn2),
        ("shortcut.0", &mut sc),
        ("shortcut.1", &mut scbn),
    ];
    let mut layers: Vec<&mut dyn Layer> = Vec::new();
    for (prefix, l) in parts {
        for (k, p) in l.params() {
            p.value = values[&format!("{prefix}.{k}")].clone();
        }
        layers.push(l);
    }
    let x = random(&[n, cin, h, w], &mut g);
    let dy_seed = random(&[n, cout, out[0], out[1]], &mut g);
    let y = forward_once(&mut block, &x, Mode::Train).unwrap();
    let dx = backward_once(&mut block, &x, &y, &dy_seed).unwrap();
    // By hand.
    let [c1, b1, c2, b2, s0, s1] = &mut layers[..] else {
        unreachable!()
    };
    let h1 = forward_once(*c1, &x, Mode::Train).unwrap();
    let a1 = forward_once(*b1, &h1, Mode::Train).unwrap();
    let h2 = forward_once(*c2, &a1, Mode::Train).unwrap();
    let a2 = forward_once(*b2, &h2, Mode::Train).unwrap();
    let hs = forward_once(*s0, &x, Mode::Train).unwrap();
    let ss = forward_once(*s1, &hs, Mode::Train).unwrap();
    let y_ref: Vec<f32> = a2.data.iter().zip(&ss.data).map(|(a, b)| (a + b).max(0.0)).collect();
    assert_eq!(y.data, y_ref);
    let dsum = Tensor {
        shape: dy_seed.shape.clone(),
        data: dy_seed
            .data
            .iter()
            .zip(&y_ref)
            .map(|(&d, &v)| if v > 0.0 { d } else { 0.0 })
            .collect(),
    };
    let dh2 = backward_once(*b2, &h2, &a2, &dsum).unwrap();
    let da1 = backward_once(*c2, &a1, &h2, &dh2).unwrap();
    let dh1 = backward_once(*b1, &h1, &a1, &da1).unwrap();
    let dx1 = backward_once(*c1, &x, &h1, &dh1).unwrap();
    let dhs = backward_once(*s1, &hs, &ss, &dsum).unwrap();
    let dx2 = backward_once(*s0, &x, &hs, &dhs).unwrap();
    let dx_ref: Vec<f32> = dx1.data.iter().zip(&dx2.data).map(|(a, b)| a + b).collect();
    assert_eq!(dx.data, dx_ref);
    let parts = ["conv1", "bn1", "conv2", "bn2", "shortcut.0", "shortcut.1"];
    for (prefix, l) in parts.iter().zip(layers.iter_mut()) {
        for (k, p) in l.params() {
            let key = format!("{prefix}.{k}");
            let got = &block
                .params()
                .into_iter()
                .find(|(n, _)| *n == key)
                .unwrap()
                .1
                .grad
                .data
                .clone();
            assert_eq!(got, &p.grad.data, "{key}");
        }
    }
}

/// Finite differences through a whole block, where the step rarely crosses a ReLU kink: the
/// identity-shortcut and no-norm variants (the BN variant is checked by composition above).
#[test]
fn residual_block_gradients() {
    use normlab::nn::norm_spec::NormSpec;
    use normlab::nn::residual::BasicBlock;
    let mut g = rng();
    for (spec, stride, cin, cout) in [("gn:2", 2, 2, 4), ("none", 1, 3, 3), ("none", 2, 2, 4)] {
        let norm: NormSpec = spec.parse().unwrap();
        let (h, w) = (3, 3);
        let out = [(h - 1) / stride + 1, (w - 1) / stride + 1];
        let mut block = BasicBlock::new(cin, 4, cout, stride, out, &norm, "layer", &mut g).unwrap();
        for (_, p) in block.params() {
            p.value.data.iter_mut().for_each(|v| *v += g.gen_range(-0.2..0.2));
        }
        check(
            &format!("block {spec} stride {stride}"),
            &mut block,
            random(&[3, cin, h, w], &mut g),
            2e-3,
        );
    }
}

#[test]
fn lstm_gradients_through_time_for_every_recurrent_norm() {
    use normlab::nn::lstm::{Lstm, RecurrentNorm};
    let norms = [
        ("none", RecurrentNorm::None),
        ("ln", RecurrentNorm::Layer { eps: 1e-5 }),
        (
            "bn",
            RecurrentNorm::Batch {
                eps: 1e-5,
                momentum: 0.1,
                per_step: true,
            },
        ),
        (
            "bn-shared",
            RecurrentNorm::Batch {
                eps: 1e-5,
                momentum: 0.1,
                per_step: false,
            },
        ),
    ];
    for (name, norm) in norms {
        for layers in [1, 2] {
            let mut g = rng();
            let mut lstm = Lstm::new(5, 4, layers, 4, norm, &mut g).unwrap();
            // γ away from its initial value, so the norms' gradients are not degenerate.
            lstm.visit_params(&mut |k, p| {
                if k.ends_with(".weight") || k.ends_with(".bias") {
                    p.value.data.iter_mut().for_each(|v| *v = 0.5 + 0.1 * (*v + 1.0));
                }
            });
            check(
                &format!("lstm {name}, {layers} layers"),
                &mut lstm,
                random(&[3, 4, 5], &mut g),
                3e-3,
            );
        }
    }
}

#[test]
fn attention_and_transformer_block_gradients() {
    use normlab::nn::norm_spec::NormSpec;
    use normlab::nn::vit::attention::Attention;
    use normlab::nn::vit::block::Block;
    use normlab::nn::vit::Placement;
    let mut g = rng();
    // Two samples of 5 tokens, width 8 in 2 heads.
    let mut attn = Attention::new(8, 2, 5, &mut g);
    check("attention", &mut attn, random(&[10, 8], &mut g), 1e-2);
    for (norm, placement) in [
        ("layernorm:eps=1e-6", Placement::Pre),
        ("rms", Placement::Post),
        ("bn", Placement::Pre),
    ] {
        let mut block = Block::new(8, 2, 5, 16, &NormSpec::builtin(norm), placement, "b", &mut g).unwrap();
        check(
            &format!("block {norm} {placement}"),
            &mut block,
            random(&[10, 8], &mut g),
            1e-2,
        );
    }
}
