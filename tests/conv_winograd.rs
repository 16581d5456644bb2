//! Winograd F(2x2,3x3) and F(4x4,3x3) convolutions (forward, input gradient, weight and bias
//! gradients) equal the float64 definition of the convolution on random data: maps whose sides
//! the tile divides and maps it does not (tiles clipped at the edge), one sample and batches
//! that share one gemm, with and without bias and a fused ReLU.

mod common;

use common::assert_close;
use normlab::kernels::winograd::WinogradTile;
use normlab::nn::conv2d::{Conv2d, ConvAlgorithm};
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

/// (y, dx, dW, db) of a 3x3 padding-1 conv in f64, straight from the definition; dy is masked by
/// y > 0 when `relu`.
fn reference(x: &Tensor, w: &[f32], b: Option<&[f32]>, oc: usize, dy: &Tensor, relu: bool) -> [Vec<f32>; 4] {
    let [n, c, h, wd] = x.shape[..] else { unreachable!() };
    let at = |s: usize, ch: usize, yy: isize, xx: isize| -> f64 {
        if yy < 0 || xx < 0 || yy >= h as isize || xx >= wd as isize {
            0.0
        } else {
            x.data[((s * c + ch) * h + yy as usize) * wd + xx as usize] as f64
        }
    };
    let mut y = vec![0.0f64; n * oc * h * wd];
    for s in 0..n {
        for o in 0..oc {
            for yy in 0..h {
                for xx in 0..wd {
                    let mut acc = b.map_or(0.0, |b| b[o] as f64);
                    for ch in 0..c {
                        for i in 0..3 {
                            for j in 0..3 {
                                acc += w[((o * c + ch) * 3 + i) * 3 + j] as f64
                                    * at(s, ch, yy as isize + i as isize - 1, xx as isize + j as isize - 1);
                            }
                        }
                    }
                    y[((s * oc + o) * h + yy) * wd + xx] = if relu { acc.max(0.0) } else { acc };
                }
            }
        }
    }
    let g: Vec<f64> = dy
        .data
        .iter()
        .zip(&y)
        .map(|(&d, &v)| if relu && v <= 0.0 { 0.0 } else { d as f64 })
        .collect();
    let (mut dx, mut dw, mut db) = (vec![0.0f64; x.data.len()], vec![0.0f64; w.len()], vec![0.0f64; oc]);
    for s in 0..n {
        for o in 0..oc {
            for yy in 0..h {
                for xx in 0..wd {
                    let gv = g[((s * oc + o) * h + yy) * wd + xx];
                    db[o] += gv;
                    for ch in 0..c {
                        for i in 0..3 {
                            for j in 0..3 {
                                let (iy, ix) = (yy as isize + i as isize - 1, xx as isize + j as isize - 1);
                                dw[((o * c + ch) * 3 + i) * 3 + j] += gv * at(s, ch, iy, ix);
                                if iy >= 0 && ix >= 0 && iy < h as isize && ix < wd as isize {
                                    dx[((s * c + ch) * h + iy as usize) * wd + ix as usize] +=
                                        gv * w[((o * c + ch) * 3 + i) * 3 + j] as f64;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    let f = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
    [f(y), f(dx), f(dw), f(db)]
}

#[test]
fn winograd_passes_equal_the_definition() {
    // (N, C, OC, H, W, bias, relu)
    let cases = [
        (1, 3, 4, 8, 8, false, false),
        (3, 5, 6, 7, 7, true, false),
        (2, 4, 3, 5, 6, false, true),
        (20, 8, 8, 6, 6, true, true),
        (1, 2, 2, 1, 1, true, false),
        (4, 16, 12, 13, 9, false, false),
        // Auto: Winograd forward and dx, im2col dW (16 channels, 16+ samples), over groups.
        (20, 16, 16, 6, 6, true, false),
    ];
    let algorithms = [
        ConvAlgorithm::Winograd(WinogradTile::F2),
        ConvAlgorithm::Winograd(WinogradTile::F4),
        ConvAlgorithm::Auto,
    ];
    for tile in algorithms {
        for (n, c, oc, h, w, bias, relu) in cases {
            let mut rng = ChaCha8Rng::seed_from_u64((n * 1000 + c * 10 + h) as u64);
            let mut conv = Conv2d::new(c, oc, 3, 1, 1, bias, &mut rng);
            if relu {
                conv = conv.with_relu();
            }
            conv.algorithm = tile;
            let x = random(&[n, c, h, w], &mut rng);
            let (mut y, mut dx) = (Tensor::default(), Tensor::default());
            conv.forward(&x, &mut y, Mode::Train).unwrap();
            let dy = random(&y.shape, &mut rng);
            conv.backward(&x, &y, &dy, &mut dx).unwrap();
            let b = conv.bias().map(|b| b.value.data.clone());
            let [want_y, want_dx, want_dw, want_db] =
                reference(&x, &conv.weight().value.data, b.as_deref(), oc, &dy, relu);
            let what = format!("{tile:?} N{n} C{c} OC{oc} {h}x{w}");
            assert_close(&format!("{what} y"), &y.data, &want_y, 1e-5);
            assert_close(&format!("{what} dx"), &dx.data, &want_dx, 1e-5);
            assert_close(&format!("{what} dW"), &conv.weight().grad.data, &want_dw, 1e-5);
            if let Some(b) = conv.bias() {
                assert_close(&format!("{what} db"), &b.grad.data, &want_db, 1e-5);
            }
        }
    }
}
