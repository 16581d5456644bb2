//! Conv2d against float64 PyTorch (tests/goldens/conv.safetensors) with every algorithm:
//! im2col + gemm, Winograd F(2x2,3x3), Winograd F(4x4,3x3), the direct forward and the measured
//! choice (for these batches of under 16 samples the direct forward where the CPU has AVX-512,
//! else im2col). Outputs
//! within 1e-5 and gradients within 1e-4 of the largest reference value; the inputs are rebuilt
//! here from the same integer hash as scripts/make_goldens.py.

mod common;

use common::{assert_close, Golden};
use normlab::nn::conv2d::{Conv2d, ConvAlgorithm};
use normlab::nn::{Layer, Mode};
use normlab::Tensor;
use rand::SeedableRng;

/// n values in [-1, 1): k / 2^23 - 1 for a 24-bit hash k of (index, seed), exact in f32.
fn hashed_values(n: usize, seed: u32) -> Vec<f32> {
    (0..n as u32)
        .map(|i| {
            let mut x = i.wrapping_mul(0x9E37_79B1).wrapping_add(seed.wrapping_mul(0x85EB_CA77));
            x ^= x >> 15;
            x = x.wrapping_mul(0x2C1B_3C6D);
            x ^= x >> 12;
            x = x.wrapping_mul(0x297A_2D39);
            x ^= x >> 15;
            (x >> 8) as f32 / 8_388_608.0 - 1.0
        })
        .collect()
}

/// max |got - want| / max |want|, printed for the record (`--nocapture`).
fn relative_error(got: &[f32], want: &[f32]) -> f64 {
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs() as f64)
        .fold(0.0, f64::max);
    worst / want.iter().map(|v| v.abs() as f64).fold(1e-30, f64::max)
}

#[test]
fn conv_passes_match_pytorch_with_every_algorithm() {
    let g = Golden::open("conv.safetensors");
    let cases: Vec<(usize, usize, usize, usize, bool)> =
        serde_json::from_str(&g.metadata()["cases"]).expect("case list");
    assert!(cases.len() >= 3);
    for algorithm in ["im2col", "winograd2", "winograd4", "direct", "direct-lanes", "auto"] {
        for (i, &(n, c, oc, hw, bias)) in cases.iter().enumerate() {
            let i32_ = i as u32;
            let mut e = 0;
            while 4usize.pow(e + 1) <= 9 * c {
                e += 1;
            }
            let scale = 0.5f32.powi(e as i32);
            let mut conv = Conv2d::new(c, oc, 3, 1, 1, bias, &mut rand_chacha::ChaCha8Rng::seed_from_u64(0));
            conv.algorithm = algorithm.parse::<ConvAlgorithm>().unwrap();
            conv.weight_mut().value.data = hashed_values(oc * c * 9, 4 * i32_ + 1)
                .iter()
                .map(|v| v * scale)
                .collect();
            if let Some(b) = conv.bias_mut() {
                b.value.data = hashed_values(oc, 4 * i32_ + 2);
            }
            let x = Tensor {
                shape: vec![n, c, hw, hw],
                data: hashed_values(n * c * hw * hw, 4 * i32_),
            };
            let dy = Tensor {
                shape: vec![n, oc, hw, hw],
                data: hashed_values(n * oc * hw * hw, 4 * i32_ + 3),
            };
            let (mut y, mut dx) = (Tensor::default(), Tensor::default());
            conv.forward(&x, &mut y, Mode::Train).unwrap();
            conv.backward(&x, &y, &dy, &mut dx).unwrap();
            let what = format!("{algorithm} case {i} ({n}, {c}->{oc}, {hw}x{hw})");
            let rel = |got: &[f32], key: &str| relative_error(got, &g.tensor(&format!("case{i}.{key}")).data);
            eprintln!(
                "{what}: relative error y {:.1e}, dx {:.1e}, dW {:.1e}",
                rel(&y.data, "y"),
                rel(&dx.data, "dx"),
                rel(&conv.weight().grad.data, "dw")
            );
            assert_close(
                &format!("{what} y"),
                &y.data,
                &g.tensor(&format!("case{i}.y")).data,
                1e-5,
            );
            assert_close(
                &format!("{what} dx"),
                &dx.data,
                &g.tensor(&format!("case{i}.dx")).data,
                1e-4,
            );
            assert_close(
                &format!("{what} dW"),
                &conv.weight().grad.data,
                &g.tensor(&format!("case{i}.dw")).data,
                1e-4,
            );
            if let Some(b) = conv.bias() {
                assert_close(
                    &format!("{what} db"),
                    &b.grad.data,
                    &g.tensor(&format!("case{i}.db")).data,
                    1e-4,
                );
            }
        }
    }
}
