//! Conv2d's input gradient, col2im(Wᵀ·dy) through whichever im2col path the geometry takes
//! (padded planes, same-width shifted planes, per-row copies), batched or not, equals the
//! definition dx[c, y, x] = Σ_o Σ_ij W[o, c, i, j] · g[o, y - i + p, x - j + p], where g = dy
//! (· [y > 0] with a fused ReLU).

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

/// (N, C, OC, H, W, kernel, padding, relu): one sample per gemm (N = 3) and batched (N = 20 on
/// 5x6 maps), a 5x5 kernel, a shrinking output (padding 0), OC > C, a fused ReLU, and 17x16 maps
/// (past the padded-plane limits).
type Case = (usize, usize, usize, usize, usize, usize, usize, bool);
const CASES: [Case; 7] = [
    (3, 4, 3, 5, 6, 3, 1, false),
    (20, 4, 3, 5, 6, 3, 1, false),
    (3, 5, 4, 6, 7, 5, 2, false),
    (3, 4, 3, 5, 6, 3, 0, false),
    (20, 3, 5, 5, 6, 3, 1, false),
    (20, 4, 3, 5, 6, 3, 1, true),
    (2, 2, 3, 17, 16, 3, 1, false),
];

#[test]
fn input_gradient_equals_the_definition() {
    for (n, c, oc, h, w, k, p, relu) in CASES {
        let mut rng = ChaCha8Rng::seed_from_u64((n * 100 + c * 10 + k) as u64);
        let mut conv = Conv2d::new(c, oc, k, 1, p, false, &mut rng);
        if relu {
            conv = conv.with_relu();
        }
        let x = random(&[n, c, h, w], &mut rng);
        let (mut y, mut dx) = (Tensor::default(), Tensor::default());
        conv.forward(&x, &mut y, Mode::Train).unwrap();
        let (oh, ow) = (y.shape[2], y.shape[3]);
        let dy = random(&y.shape, &mut rng);
        conv.backward(&x, &y, &dy, &mut dx).unwrap();

        let wt = &conv.weight().value.data;
        let mut want = vec![0.0f64; x.data.len()];
        for s in 0..n {
            for o in 0..oc {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let at = ((s * oc + o) * oh + oy) * ow + ox;
                        if relu && y.data[at] <= 0.0 {
                            continue;
                        }
                        let g = dy.data[at] as f64;
                        for ci in 0..c {
                            for i in 0..k {
                                for j in 0..k {
                                    let (iy, ix) = ((oy + i) as isize - p as isize, (ox + j) as isize - p as isize);
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                        continue;
                                    }
                                    let wv = wt[((o * c + ci) * k + i) * k + j] as f64;
                                    want[((s * c + ci) * h + iy as usize) * w + ix as usize] += wv * g;
                                }
                            }
                        }
                    }
                }
            }
        }
        let worst = dx
            .data
            .iter()
            .zip(&want)
            .map(|(&a, &b)| (a as f64 - b).abs())
            .fold(0.0, f64::max);
        assert!(
            worst < 1e-5,
            "case n{n} c{c} oc{oc} k{k} p{p} relu {relu}: max |dx - definition| {worst}"
        );
    }
}
