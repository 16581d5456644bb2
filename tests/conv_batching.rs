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
        let batched_dw = conv.weight().grad.data.clone();
        conv.weight_mut().grad.data.fill(0.0);

        let (mut y1, mut dx1) = (Tensor::default(), Tensor::default());
        let mut sum_dw = vec![0.0f32; batched_dw.len()];
        for i in 0..n {
            let xi = sample(&x, i);
            conv.forward(&xi, &mut y1, Mode::Train).unwrap();
            conv.backward(&xi, &y1, &sample(&dy, i), &mut dx1).unwrap();
            let what = format!("case n{n} c{c} relu {relu}, sample {i}");
            assert_close(&format!("{what} y"), &y1.data, &sample(&y, i).data);
            assert_close(&format!("{what} dx"), &dx1.data, &sample(&dx, i).data);
            sum_dw
                .iter_mut()
                .zip(&conv.weight().grad.data)
                .for_each(|(s, g)| *s += g);
            conv.weight_mut().grad.data.fill(0.0);
        }
        assert_close(&format!("case n{n} c{c} relu {relu} dW"), &batched_dw, &sum_dw);
    }
}

/// Inference's fused conv → ReLU → 2x2 max-pool (`ConvPool`, made by `fuse_conv_pools` for the
/// folded model) gives exactly the two layers' outputs in eval mode, on batched small maps,
/// one sample per gemm, odd sizes (a 7x7 map pools to 3x3), with and without a bias, in the
/// direct kernel (pooled in registers, by phases) and in Winograd's output transform (F2 and F4, tiles past the map's
/// edge, more than 16 channels, a NaN in the input); in training it is the two layers (outputs
/// and every gradient).
#[test]
fn fused_conv_pool_equals_conv_then_pool() {
    use normlab::kernels::winograd::WinogradTile;
    use normlab::nn::conv_algorithm::ConvAlgorithm;
    use normlab::nn::conv_pool::{fuse_conv_pools, ConvPool};
    use normlab::nn::pool::MaxPool2d;
    use normlab::nn::sequential::Sequential;
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    // (N, C, OC, H, W, bias, algorithm)
    let cases = [
        (9, 3, 5, 6, 6, true, ConvAlgorithm::Im2col),
        (4, 1, 32, 28, 28, true, ConvAlgorithm::Im2col),
        (3, 2, 4, 7, 9, false, ConvAlgorithm::Im2col),
        (2, 1, 3, 11, 11, true, ConvAlgorithm::Auto),
        // The direct forward pools in its epilogue: one sample split over the threads by
        // channel blocks (6 channels: a partial block), and odd maps over sample groups.
        (1, 16, 6, 14, 14, true, ConvAlgorithm::Direct),
        (3, 5, 7, 7, 9, false, ConvAlgorithm::Direct),
        // A lone 28x28 sample in bands of row pairs (2+ threads), 33 channels, a NaN.
        (1, 2, 33, 28, 28, true, ConvAlgorithm::Direct),
        (2, 16, 16, 14, 14, true, ConvAlgorithm::Winograd(WinogradTile::F4)),
        (3, 5, 21, 7, 9, false, ConvAlgorithm::Winograd(WinogradTile::F4)),
        (2, 4, 18, 10, 13, true, ConvAlgorithm::Winograd(WinogradTile::F2)),
        (17, 3, 6, 6, 6, true, ConvAlgorithm::Auto),
    ];
    for (n, c, oc, h, w, bias, algorithm) in cases {
        let mut x = random(&[n, c, h, w], &mut ChaCha8Rng::seed_from_u64(rng.gen()));
        if oc == 18 || oc == 33 {
            // A NaN reaches every output channel of its windows: the pool's NaN rule.
            x.data[w + 3] = f32::NAN;
        }
        let build = |seed| {
            let mut conv = Conv2d::new(c, oc, 3, 1, 1, bias, &mut ChaCha8Rng::seed_from_u64(seed));
            conv.algorithm = algorithm;
            conv
        };
        let seed = rng.gen();
        let (mut conv, mut pool) = (build(seed), MaxPool2d::new(2, 2).with_relu());
        let mut fused = ConvPool::new(build(seed), MaxPool2d::new(2, 2).with_relu());
        let (mut mid, mut want, mut got) = (Tensor::default(), Tensor::default(), Tensor::default());
        conv.forward(&x, &mut mid, Mode::Eval).unwrap();
        pool.forward(&mid, &mut want, Mode::Eval).unwrap();
        fused.forward(&x, &mut got, Mode::Eval).unwrap();
        assert_eq!(got.shape, want.shape, "case {:?}", (n, c, oc, h, w));
        let bits = |t: &Tensor| t.data.iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
        assert_eq!(
            bits(&got),
            bits(&want),
            "eval outputs differ, case {:?}",
            (n, c, oc, h, w)
        );
        // The one-pass path ran, whatever the conv's method.
        let took = build(seed)
            .forward_max_pooled(&x, &mut Tensor::default(), true)
            .unwrap();
        assert!(took, "case {:?}", (n, c, oc, h, w));
        // Training: the same two layers, so the same outputs and gradients.
        let dy = random(&want.shape, &mut rng);
        let (mut dmid, mut dx_want, mut dx_got) = (Tensor::default(), Tensor::default(), Tensor::default());
        conv.forward(&x, &mut mid, Mode::Train).unwrap();
        pool.forward(&mid, &mut want, Mode::Train).unwrap();
        pool.backward(&mid, &want, &dy, &mut dmid).unwrap();
        conv.backward(&x, &mid, &dmid, &mut dx_want).unwrap();
        fused.forward(&x, &mut got, Mode::Train).unwrap();
        fused.backward(&x, &got, &dy, &mut dx_got).unwrap();
        assert_eq!(bits(&got), bits(&want));
        assert_eq!(bits(&dx_got), bits(&dx_want));
        let grads =
            |l: &mut dyn Layer| -> Vec<Vec<u32>> { l.params().into_iter().map(|(_, p)| bits(&p.grad)).collect() };
        assert_eq!(grads(&mut fused), grads(&mut conv));
    }
    // The pass: a conv without its own ReLU followed by a ReLU + 2x2 max-pool becomes one layer
    // under the conv's name; a conv with a fused ReLU, or a plain pool, is left alone.
    let mut net = Sequential::default();
    net.push("conv1", Conv2d::new(1, 4, 3, 1, 1, true, &mut rng));
    net.push("", MaxPool2d::new(2, 2).with_relu());
    net.push("conv2", Conv2d::new(4, 4, 3, 1, 1, true, &mut rng).with_relu());
    net.push("", MaxPool2d::new(2, 2));
    fuse_conv_pools(&mut net);
    let kinds: Vec<(String, &str)> = net.layers.iter().map(|(n, l)| (n.clone(), l.kind())).collect();
    assert_eq!(
        kinds,
        [
            ("conv1".to_string(), "Conv2d+ReLU+MaxPool2d"),
            ("conv2".to_string(), "Conv2d+ReLU"),
            (String::new(), "MaxPool2d"),
        ]
    );
    let keys: Vec<String> = net.named_params().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"]);
}

/// The direct forward (stride 1 and 2, the latter through its four phase planes) gives im2col's
/// outputs to f32 rounding: one sample split over the threads and batches over sample groups,
/// with and without bias and ReLU, odd and even sides, partial blocks of output channels.
#[test]
fn direct_forward_equals_im2col_for_stride_one_and_two() {
    use normlab::nn::conv_algorithm::ConvAlgorithm;
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    // (N, C, OC, H, W, stride, bias, relu)
    let cases = [
        (1, 16, 32, 28, 28, 2, true, true),
        (3, 3, 6, 7, 9, 2, false, false),
        (20, 2, 5, 14, 13, 2, true, false),
        (1, 8, 10, 5, 5, 1, true, true),
        (2, 32, 16, 14, 14, 2, false, true),
    ];
    for (n, c, oc, h, w, stride, bias, relu) in cases {
        let seed = rng.gen();
        let build = |algorithm| {
            let mut conv = Conv2d::new(c, oc, 3, stride, 1, bias, &mut ChaCha8Rng::seed_from_u64(seed));
            if relu {
                conv = conv.with_relu();
            }
            conv.algorithm = algorithm;
            conv
        };
        let x = random(&[n, c, h, w], &mut rng);
        let (mut want, mut got) = (Tensor::default(), Tensor::default());
        build(ConvAlgorithm::Im2col).forward(&x, &mut want, Mode::Eval).unwrap();
        build(ConvAlgorithm::Direct).forward(&x, &mut got, Mode::Eval).unwrap();
        assert_eq!(got.shape, want.shape);
        assert_close(
            &format!("direct, case {:?}", (n, c, oc, h, w, stride)),
            &got.data,
            &want.data,
        );
    }
}

/// A lone sample's direct forward splits into bands of output rows on several threads and into
/// blocks of channels on one: the same bits, for stride 1 and 2, pooled (odd heights drop
/// their last row), with a residual, with and without bias and ReLU, and band counts of 2 and
/// 3 (the last band shorter).
#[test]
fn direct_bands_equal_the_channel_blocks_bit_for_bit() {
    use normlab::nn::conv_algorithm::ConvAlgorithm;
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    // (C, OC, H, W, stride, bias, relu, what): what 0 plain, 1 pooled, 2 + residual.
    let cases = [
        (16, 6, 28, 28, 1, true, true, 0),
        (5, 9, 23, 17, 1, false, false, 0),
        (16, 6, 29, 13, 1, true, true, 1),
        (3, 20, 28, 28, 1, true, false, 1),
        (16, 32, 28, 28, 2, true, true, 0),
        (4, 7, 29, 15, 2, false, true, 0),
        (8, 12, 21, 14, 1, true, false, 2),
        (8, 5, 14, 14, 1, false, false, 2),
    ];
    for (c, oc, h, w, stride, bias, relu, what) in cases {
        let seed = rng.gen();
        let x = random(&[1, c, h, w], &mut rng);
        let (oh, ow) = ((h - 1) / stride + 1, (w - 1) / stride + 1);
        let r = random(&[1, oc, oh, ow], &mut rng);
        let case = format!("{:?}", (c, oc, h, w, stride, what));
        same_bits_on_more_threads(&case, &[2, 3], || {
            let mut conv = Conv2d::new(c, oc, 3, stride, 1, bias, &mut ChaCha8Rng::seed_from_u64(seed));
            if relu && what != 2 {
                conv = conv.with_relu();
            }
            conv.algorithm = ConvAlgorithm::Direct;
            fused_forward(&mut conv, what, relu, &x, &r)
        });
    }
}

/// The direct forward with the output channels in the vector lanes gives the 4-channel
/// kernel's bits (the same sums in the same order): one sample in bands and in runs of
/// channel groups on 1, 2 and 3 threads, batches over sample groups, stride 1 and 2, plain,
/// pooled and with a residual, partial groups of output channels.
#[test]
fn direct_lanes_equal_the_direct_kernel_bit_for_bit() {
    use normlab::nn::conv_algorithm::ConvAlgorithm;
    let mut rng = ChaCha8Rng::seed_from_u64(29);
    // (N, C, OC, H, W, stride, bias, relu, what): what 0 plain, 1 pooled, 2 + residual.
    let cases = [
        (1, 64, 128, 7, 7, 1, true, true, 1),
        (1, 24, 64, 7, 7, 1, true, false, 2),
        (1, 16, 40, 14, 14, 1, false, true, 0),
        (1, 32, 64, 14, 14, 2, true, true, 0),
        (1, 5, 70, 28, 28, 1, true, true, 1),
        (1, 6, 33, 21, 14, 1, true, false, 2),
        (3, 8, 33, 9, 8, 1, false, true, 0),
        (5, 3, 20, 7, 9, 2, true, true, 0),
    ];
    for (n, c, oc, h, w, stride, bias, relu, what) in cases {
        let seed = rng.gen();
        let x = random(&[n, c, h, w], &mut rng);
        let (oh, ow) = ((h - 1) / stride + 1, (w - 1) / stride + 1);
        let r = random(&[n, oc, oh, ow], &mut rng);
        let run = |algorithm| {
            let mut conv = Conv2d::new(c, oc, 3, stride, 1, bias, &mut ChaCha8Rng::seed_from_u64(seed));
            if relu && what != 2 {
                conv = conv.with_relu();
            }
            conv.algorithm = algorithm;
            let y = fused_forward(&mut conv, what, relu, &x, &r);
            y.data.iter().map(|v| v.to_bits()).collect::<Vec<u32>>()
        };
        let want = run(ConvAlgorithm::Direct);
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let got = pool.install(|| run(ConvAlgorithm::DirectLanes));
            let first = (0..want.len()).find(|&i| got.get(i) != Some(&want[i]));
            assert!(
                got.len() == want.len() && first.is_none(),
                "case {:?} on {threads} threads: first difference at {first:?}",
                (n, c, oc, h, w, stride, what)
            );
        }
    }
}

/// Runs one of the fused eval forwards (`what`: 0 plain, 1 pooled with `relu`, 2 + residual
/// `r` and ReLU); fails unless the fused path ran.
fn fused_forward(conv: &mut Conv2d, what: usize, relu: bool, x: &Tensor, r: &Tensor) -> Tensor {
    let mut y = Tensor::default();
    let fused = match what {
        0 => conv.forward(x, &mut y, Mode::Eval).map(|()| true),
        1 => conv.forward_max_pooled(x, &mut y, relu),
        _ => conv.forward_add_relu(x, &mut y, r),
    };
    assert!(fused.unwrap(), "case {what}: the fused path ran");
    y
}

/// `run` in a pool of one thread and of each of `threads` threads: the same bits every time.
fn same_bits_on_more_threads(case: &str, threads: &[usize], run: impl Fn() -> Tensor + Sync) {
    let on = |n: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap();
        let y = pool.install(&run);
        y.data.iter().map(|v| v.to_bits()).collect::<Vec<u32>>()
    };
    let want = on(1);
    for &n in threads {
        let got = on(n);
        let first = (0..want.len()).find(|&i| got.get(i) != Some(&want[i]));
        assert!(
            got.len() == want.len() && first.is_none(),
            "case {case} on {n} threads: first difference at {first:?}"
        );
    }
}

/// A lone sample's Winograd forward splits into bands of tile rows on several threads, each
/// staging its own rows with their halo, or on maps one or two tile rows high into runs of
/// output channels: the same bits as the whole map on one thread, for both tiles, pooled (odd
/// heights drop their last row), with a residual, with and without bias and ReLU, band counts
/// 2 to 4 (the last band shorter, or a single tile row), runs of 16 and 32 channels (the last
/// one a single channel).
#[test]
fn winograd_bands_equal_the_whole_map_bit_for_bit() {
    use normlab::kernels::winograd::WinogradTile;
    use normlab::nn::conv_algorithm::ConvAlgorithm;
    let mut rng = ChaCha8Rng::seed_from_u64(29);
    // (C, OC, H, W, tile, bias, relu, what): what 0 plain, 1 pooled, 2 + residual.
    let cases = [
        (16, 16, 28, 28, WinogradTile::F4, true, true, 0),
        (5, 9, 23, 17, WinogradTile::F4, false, false, 0),
        (7, 6, 13, 11, WinogradTile::F2, true, true, 0),
        (16, 6, 29, 13, WinogradTile::F4, true, true, 1),
        (3, 20, 14, 14, WinogradTile::F2, true, false, 1),
        (8, 12, 21, 14, WinogradTile::F4, true, false, 2),
        (18, 5, 7, 7, WinogradTile::F4, false, false, 2),
        (24, 40, 7, 7, WinogradTile::F4, true, true, 0),
        (16, 64, 7, 6, WinogradTile::F4, true, false, 1),
        (20, 33, 5, 9, WinogradTile::F2, false, false, 2),
    ];
    for (c, oc, h, w, tile, bias, relu, what) in cases {
        let seed = rng.gen();
        let x = random(&[1, c, h, w], &mut rng);
        let r = random(&[1, oc, h, w], &mut rng);
        let case = format!("{:?}", (c, oc, h, w, tile, what));
        same_bits_on_more_threads(&case, &[2, 3, 4], || {
            let mut conv = Conv2d::new(c, oc, 3, 1, 1, bias, &mut ChaCha8Rng::seed_from_u64(seed));
            if relu && what == 0 {
                conv = conv.with_relu();
            }
            conv.algorithm = ConvAlgorithm::Winograd(tile);
            fused_forward(&mut conv, what, relu, &x, &r)
        });
    }
}

/// The channel runs' cut of U follows the conv's current kernels: a lone 6x6 sample on 2
/// threads through F(4x4), then the same conv switched to F(2x2), then to new weights, gives
/// the bits of a fresh conv each time (a cut kept from the first call would be F(4x4)'s).
#[test]
fn winograd_channel_runs_follow_the_tile_and_the_weights() {
    use normlab::kernels::winograd::WinogradTile;
    use normlab::nn::conv_algorithm::ConvAlgorithm;
    let mut rng = ChaCha8Rng::seed_from_u64(31);
    let x = random(&[1, 16, 6, 6], &mut rng);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let bits = |conv: &mut Conv2d| {
        let mut y = Tensor::default();
        pool.install(|| conv.forward(&x, &mut y, Mode::Eval)).unwrap();
        y.data.iter().map(|v| v.to_bits()).collect::<Vec<u32>>()
    };
    let fresh = |tile, seed| {
        let mut conv = Conv2d::new(16, 40, 3, 1, 1, true, &mut ChaCha8Rng::seed_from_u64(seed));
        conv.algorithm = ConvAlgorithm::Winograd(tile);
        conv
    };
    let mut conv = fresh(WinogradTile::F4, 1);
    assert_eq!(bits(&mut conv), bits(&mut fresh(WinogradTile::F4, 1)));
    conv.algorithm = ConvAlgorithm::Winograd(WinogradTile::F2);
    assert_eq!(
        bits(&mut conv),
        bits(&mut fresh(WinogradTile::F2, 1)),
        "after the tile changed"
    );
    let other = fresh(WinogradTile::F2, 2);
    conv.weight_mut().value = other.weight().value.clone();
    conv.bias_mut().unwrap().value = other.bias().unwrap().value.clone();
    assert_eq!(
        bits(&mut conv),
        bits(&mut fresh(WinogradTile::F2, 2)),
        "after new weights"
    );
}
