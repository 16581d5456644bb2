use normlab::nn::layer::Mode;
use normlab::nn::norm_spec::NormSpec;
use normlab::tensor::Tensor;
use std::time::Instant;
fn med(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}
fn main() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(std::env::var("T").ok().and_then(|v| v.parse().ok()).unwrap_or(2))
        .build()
        .unwrap();
    pool.install(|| {
        for spec in ["layernorm", "rms"] {
            for shape in [[4096usize, 384, 1, 1], [2048, 768, 1, 1], [6400, 128, 1, 1]] {
                let n: usize = shape.iter().product();
                let mut layer = NormSpec::builtin(spec)
                    .build(&shape[1..], "ln", false)
                    .unwrap()
                    .unwrap();
                let x =
                    Tensor::from_vec(&shape, (0..n).map(|i| ((i * 37 % 101) as f32) / 25.0 - 2.0).collect()).unwrap();
                let dy =
                    Tensor::from_vec(&shape, (0..n).map(|i| ((i * 53 % 97) as f32) / 25.0 - 2.0).collect()).unwrap();
                let (mut y, mut dx) = (Tensor::default(), Tensor::default());
                let (mut tf, mut tb) = (vec![], vec![]);
                for _ in 0..300 {
                    let t = Instant::now();
                    layer.forward(&x, &mut y, Mode::Train).unwrap();
                    tf.push(t.elapsed().as_secs_f64());
                    let t = Instant::now();
                    layer.backward(&x, &y, &dy, &mut dx).unwrap();
                    tb.push(t.elapsed().as_secs_f64());
                }
                println!(
                    "{spec} {shape:?} fwd {:.3} ms bwd {:.3} ms",
                    med(tf) * 1e3,
                    med(tb) * 1e3
                );
            }
        }
    });
}
#[allow(dead_code)]
fn copy_probe() {}
