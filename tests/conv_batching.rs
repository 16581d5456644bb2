//! Conv2d batches several samples' columns into one gemm (small maps) and splits a batch into
//! fixed sample groups. Whatever the batching, the result must be what each sample gives alone:
//! the same outputs and input gradients, and a weight gradient equal to the per-sample sum.

use normlab::nn::conv2d::Conv2d;
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

fn sample(t: &Tensor, i: usize) -> Tensor {
    let len = t.sample_len();
    let mut shape = t.shape.clone();
    shape[0] = 1;
    Tensor {
        shape,
        data: t.data[i * len..(i + 1) * len].to_vec(),
    }
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    let worst = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(worst <= 1e-5 * scale, "{what}: max |diff| {worst} vs scale {scale}");
}

/// (N, C, OC, H, W, relu, bias). 20 samples of 5x6 maps: groups of 3 batched into one gemm; 23
/// samples of 7x7 maps with 128 input channels: the column-size limit batches 3 at a time, so
/// each group of 3 is one gemm and the last group is ragged.
const CASES: [(usize, usize, usize, usize, usize, bool, bool); 3] = [
    (20, 3, 4, 5, 6, false, true),
    (20, 3, 4, 5, 6, true, true),
    (23, 128, 8, 7, 7, false, false),
];

#[test]
fn batched_conv_equals_sample_by_sample() {
    for (n, c, oc, h, w, relu, bias) in CASES {
        let mut rng = ChaCha8Rng::seed_from_u64(n as u64 + c as u64);
        let mut conv = Conv2d::new(c, oc, 3, 1, 1, bias, &mut rng);
        if relu {
            conv = conv.with_relu();
        }
        let x = random(&[n, c, h, w], &mut rng);
        let dy = random(&[n, oc, h, w], &mut rng);
        let (mut y, mut dx) = (Tensor::default(), Tensor::default());
        conv.forward(&x, &mut y, Mode::Train).unwrap();
        conv.backward(&x, &y, &dy, &mut dx).unwrap();
        let batched_dw = conv.weight.grad.data.clone();
        conv.weight.grad.data.fill(0.0);

        let (mut y1, mut dx1) = (Tensor::default(), Tensor::default());
        let mut sum_dw = vec![0.0f32; batched_dw.len()];
        for i in 0..n {
            let xi = sample(&x, i);
            conv.forward(&xi, &mut y1, Mode::Train).unwrap();
            conv.backward(&xi, &y1, &sample(&dy, i), &mut dx1).unwrap();
            let what = format!("case n{n} c{c} relu {relu}, sample {i}");
            assert_close(&format!("{what} y"), &y1.data, &sample(&y, i).data);
            assert_close(&format!("{what} dx"), &dx1.data, &sample(&dx, i).data);
            sum_dw.iter_mut().zip(&conv.weight.grad.data).for_each(|(s, g)| *s += g);
            conv.weight.grad.data.fill(0.0);
        }
        assert_close(&format!("case n{n} c{c} relu {relu} dW"), &batched_dw, &sum_dw);
    }
}
