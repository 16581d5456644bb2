//! `normlab bench`: the norm kernels on the shapes that matter, through the real layer code,
//! as time, GB/s of tensor traffic and the fraction of this machine's copy bandwidth (measured
//! by the same command), plus end-to-end training images/s of seed-cnn and vgg.

use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::models::{Model, ModelSpec};
use crate::nn::conv2d::Conv2d;
use crate::nn::norm_spec::NormSpec;
use crate::nn::{Layer, Mode};
use crate::optim::{Optimizer, OptimizerConfig};
use crate::tensor::Tensor;
use crate::train::train_step;

/// The (N, C, H, W) shapes of the speed issue.
pub const SHAPES: [[usize; 4]; 6] = [
    [128, 32, 28, 28],
    [128, 64, 14, 14],
    [64, 128, 16, 16],
    [32, 256, 7, 7],
    [8, 64, 56, 56],
    [256, 16, 32, 32],
];

/// What is timed: the norm spec, the passes, and how many tensor-sizes of traffic they need.
pub const KERNELS: [(&str, &str, &str, f64); 8] = [
    ("bn_train_fwd", "bn", "fwd", 2.0),
    ("bn_train_fwd_bwd", "bn", "fwd+bwd", 5.0),
    ("bn_eval_fwd", "bn", "eval", 2.0),
    ("gn_fwd_bwd", "gn", "fwd+bwd", 5.0),
    ("ln_fwd_bwd", "ln", "fwd+bwd", 5.0),
    ("in_fwd_bwd", "in", "fwd+bwd", 5.0),
    ("layernorm_fwd_bwd", "layernorm", "fwd+bwd", 5.0),
    ("rms_fwd_bwd", "rms", "fwd+bwd", 5.0),
];

/// Transformer activations [B·T, D, 1, 1] (the trailing-dims norms only): normlab's own
/// vit:64 and vit:128 at batch 128 on Fashion-MNIST (50 tokens of 4x4 patches), and D = 384 and
/// 768 as in ViT-S and ViT-B with 4096 and 2048 tokens.
pub const TOKEN_SHAPES: [[usize; 4]; 4] = [
    [6400, 64, 1, 1],
    [6400, 128, 1, 1],
    [4096, 384, 1, 1],
    [2048, 768, 1, 1],
];

#[derive(Clone, Debug, Serialize)]
pub struct KernelResult {
    pub kernel: String,
    pub spec: String,
    pub shape: [usize; 4],
    pub ms: f64,
    /// Tensor traffic (tensor-sizes × bytes) per second.
    pub gb_per_s: f64,
    pub copy_fraction: f64,
    pub traffic_tensor_sizes: f64,
    /// Median ms of the same traffic as plain streams over tensors of this shape (`streams`),
    /// timed in blocks alternating with the kernel's (`time_medians_alternating`): the limit at
    /// this size, where the data may sit in cache and the 256 MiB copy's rate understates it.
    pub streams_ms: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct TrainResult {
    pub model: String,
    pub norm: String,
    pub batch_size: usize,
    pub images_per_sec: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub threads: usize,
    /// Parallel memory copy of a 256 MiB buffer, counting bytes read plus bytes written.
    pub copy_gb_per_s: f64,
    /// With `--filter conv`: the machine's measured GEMM rate, the conv table's limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gemm_peak_gflops: Option<f64>,
    pub kernels: Vec<KernelResult>,
    pub convs: Vec<ConvResult>,
    pub training: Vec<TrainResult>,
}

/// Median of `reps` timings of `f` (seconds), after one warm-up call.
fn time_median(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        f()?;
        t.push(t0.elapsed().as_secs_f64());
    }
    t.sort_by(|a, b| a.total_cmp(b));
    Ok(t[t.len() / 2])
}

/// Copy bandwidth: 256 MiB copied in parallel chunks, (read + write) bytes per second.
pub fn copy_bandwidth(reps: usize) -> f64 {
    let n = 64 << 20;
    let (src, mut dst) = (vec![1.0f32; n], vec![0.0f32; n]);
    let secs = time_median(reps, || {
        parallel_copy(&src, &mut dst);
        Ok(())
    })
    .expect("copy cannot fail");
    std::hint::black_box(&dst);
    2.0 * (n * 4) as f64 / secs / 1e9
}

/// `dst = src` in chunks of 64 K values over the worker threads.
fn parallel_copy(src: &[f32], dst: &mut [f32]) {
    parallel_copy_chunks(src, dst, 1 << 16);
}

/// `dst = src` in chunks of `chunk` values over the worker threads.
fn parallel_copy_chunks(src: &[f32], dst: &mut [f32], chunk: usize) {
    dst.par_chunks_mut(chunk)
        .zip(src.par_chunks(chunk))
        .for_each(|(d, s)| d.copy_from_slice(s));
}

/// Timed calls per block of `time_medians_alternating`.
const BLOCK: usize = 5;

/// Medians (seconds) of `reps` timings each of `f` and `g`, timed in alternating blocks of
/// `BLOCK` calls, each block after one untimed call of the same side: a burst of host load
/// slows both alike, and each side runs from the cache its own previous call left, as
/// PyTorch's back-to-back timing loop does. (Call by call, a kernel on tensors of a few MB ran
/// after the streams had evicted its data: [6400, 128] LayerNorm forward + backward 0.75 ms
/// in turns against 0.56-0.58 back to back in a probe minutes later, while PyTorch's side
/// is timed back to back.)
fn time_medians_alternating(
    reps: usize,
    mut f: impl FnMut() -> Result<()>,
    mut g: impl FnMut() -> Result<()>,
) -> Result<(f64, f64)> {
    let (mut tf, mut tg) = (Vec::with_capacity(reps), Vec::with_capacity(reps));
    while tf.len() < reps {
        let block = BLOCK.min(reps - tf.len());
        for (h, t) in [(&mut f as &mut dyn FnMut() -> Result<()>, &mut tf), (&mut g, &mut tg)] {
            h()?;
            for _ in 0..block {
                let t0 = Instant::now();
                h()?;
                t.push(t0.elapsed().as_secs_f64());
            }
        }
    }
    let median = |mut t: Vec<f64>| {
        t.sort_by(|a, b| a.total_cmp(b));
        t[t.len() / 2]
    };
    Ok((median(tf), median(tg)))
}

fn random_tensor(shape: &[usize], rng: &mut ChaCha8Rng) -> Tensor {
    let n = shape.iter().product();
    Tensor {
        shape: shape.to_vec(),
        data: (0..n).map(|_| rng.gen_range(-2.0..2.0)).collect(),
    }
}

/// One call of a kernel on one shape through the layer's forward/backward, as a closure over
/// its own layer and random tensors.
fn kernel_call(
    kernel: &str,
    spec: &'static str,
    passes: &str,
    shape: [usize; 4],
) -> Result<impl FnMut() -> Result<()>> {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let norm = NormSpec::builtin(spec);
    let mut layer = norm.build(&shape[1..], kernel, false)?.expect("a norm");
    let x = random_tensor(&shape, &mut rng);
    let dy = random_tensor(&shape, &mut rng);
    let (mut y, mut dx) = (Tensor::default(), Tensor::default());
    let passes = passes.to_string();
    Ok(move || {
        // With the workers polling, as a model's forward and backward run in training
        // (`Model::forward`) and as PyTorch's OpenMP workers spin between regions: without it
        // the second worker slept between the calls' regions, 4-12% of LayerNorm forward +
        // backward on the token shapes and [128, 64, 14, 14] (alternating, geometric means
        // of 8 rounds).
        crate::workers::with_workers_awake(|| -> Result<()> {
            match passes.as_str() {
                "eval" => layer.forward(&x, &mut y, Mode::Eval)?,
                "fwd" => layer.forward(&x, &mut y, Mode::Train)?,
                _ => {
                    layer.forward(&x, &mut y, Mode::Train)?;
                    layer.backward(&x, &y, &dy, &mut dx)?;
                }
            }
            Ok(())
        })
    })
}

/// Times one kernel on one shape through the layer's forward/backward (median seconds).
pub fn bench_kernel(kernel: &str, spec: &'static str, passes: &str, shape: [usize; 4], reps: usize) -> Result<f64> {
    time_median(reps, kernel_call(kernel, spec, passes, shape)?)
}

/// `bench_kernel` in turns with `streams` on tensors of the same shape: the medians in seconds,
/// (kernel, streams).
fn bench_kernel_against_streams(
    kernel: &str,
    spec: &'static str,
    passes: &str,
    shape: [usize; 4],
    reps: usize,
) -> Result<(f64, f64)> {
    let n = shape.iter().product::<usize>();
    let (x, dy) = (vec![1.0f32; n], vec![0.5f32; n]);
    let (mut y, mut dx) = (vec![0.0f32; n], vec![0.0f32; n]);
    let backward = passes == "fwd+bwd";
    let times = time_medians_alternating(reps, kernel_call(kernel, spec, passes, shape)?, || {
        crate::workers::with_workers_awake(|| streams(&x, &dy, &mut y, &mut dx, backward));
        Ok(())
    })?;
    std::hint::black_box((&y, &dx));
    Ok(times)
}

/// A norm's least memory traffic as plain parallel streams: y = x (a forward reads its input
/// and writes its output), then with `backward` dx = x + dy (reads x and dy, writes dx). On
/// tensors that fit in cache this is the limit the 256 MiB copy's rate understates.
fn streams(x: &[f32], dy: &[f32], y: &mut [f32], dx: &mut [f32], backward: bool) {
    const CHUNK: usize = 1 << 14;
    parallel_copy_chunks(x, y, CHUNK);
    if backward {
        dx.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
            .for_each(|(o, (a, b))| o.iter_mut().zip(a.iter().zip(b)).for_each(|(o, (a, b))| *o = a + b));
    }
}

/// The machine's GEMM rate: a 1024^3 f32 product through `kernels::matmul` (the gemm crate,
/// every thread), 2·M·N·K flops per call; the best of the medians of three square shapes, so a
/// conv's GFLOP/s has a printed limit beside it.
pub fn gemm_peak_gflops(reps: usize) -> f64 {
    let mut best = 0.0f64;
    for size in [512usize, 1024, 1536] {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let a: Vec<f32> = (0..size * size).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let b: Vec<f32> = (0..size * size).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let mut c = vec![0.0f32; size * size];
        let threads = rayon::current_num_threads();
        let secs = time_median(reps.clamp(3, 7), || {
            use crate::kernels::matmul::{matmul, Op};
            matmul(&mut c, size, size, size, &a, Op::N, &b, Op::N, false, threads);
            Ok(())
        })
        .expect("a product cannot fail");
        std::hint::black_box(&c);
        best = best.max(2.0 * (size * size * size) as f64 / secs / 1e9);
    }
    best
}

/// The 3x3 stride-1 convolutions of vgg and resnet in a batch of 128 Fashion-MNIST images, as
/// (N, C, OC, H=W): vgg's six, then resnet's stem and the 3x3 convs of its three stages.
pub const CONV_SHAPES: [[usize; 4]; 9] = [
    [128, 1, 32, 28],
    [128, 32, 32, 28],
    [128, 32, 64, 14],
    [128, 64, 64, 14],
    [128, 64, 128, 7],
    [128, 128, 128, 7],
    [128, 16, 16, 28],
    [128, 32, 32, 14],
    [128, 64, 64, 7],
];

/// Median times (ms) of one conv's passes with one algorithm: forward, the weight gradient
/// alone (backward without the input gradient) and the whole backward.
#[derive(Clone, Debug, Serialize)]
pub struct ConvResult {
    pub shape: [usize; 4],
    pub algorithm: String,
    pub forward_ms: f64,
    pub weight_grad_ms: f64,
    pub backward_ms: f64,
    /// The direct algorithm's flops over the time: 2·N·C·OC·H·W·9 per pass (forward, weight
    /// gradient, input gradient alike), whatever the algorithm does instead.
    pub forward_gflops: f64,
    pub backward_gflops: f64,
}

/// 2·N·C·OC·H·W·9: the multiply-adds of a 3x3 padding-1 conv's direct algorithm, counted twice.
pub fn conv_direct_flops([n, c, oc, hw]: [usize; 4]) -> f64 {
    2.0 * (n * c * oc * hw * hw * 9) as f64
}

/// The conv algorithms `bench --filter conv` compares, side by side.
pub const CONV_ALGORITHMS: [&str; 6] = ["im2col", "winograd2", "winograd4", "direct", "direct-lanes", "auto"];

/// Times one 3x3 padding-1 conv (N, C, OC, H=W) with one algorithm through the layer code.
pub fn bench_conv(shape: [usize; 4], algorithm: &str, reps: usize) -> Result<ConvResult> {
    let [n, c, oc, hw] = shape;
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut conv = Conv2d::new(c, oc, 3, 1, 1, false, &mut rng);
    conv.algorithm = algorithm.parse().map_err(Error::invalid)?;
    let x = random_tensor(&[n, c, hw, hw], &mut rng);
    let dy = random_tensor(&[n, oc, hw, hw], &mut rng);
    let (mut y, mut dx) = (Tensor::default(), Tensor::default());
    let forward = time_median(reps, || conv.forward(&x, &mut y, Mode::Train))?;
    conv.set_input_grad(false);
    let weight_grad = time_median(reps, || conv.backward(&x, &y, &dy, &mut dx))?;
    conv.set_input_grad(true);
    let backward = time_median(reps, || conv.backward(&x, &y, &dy, &mut dx))?;
    let flops = conv_direct_flops(shape);
    Ok(ConvResult {
        shape,
        algorithm: algorithm.into(),
        forward_ms: forward * 1e3,
        weight_grad_ms: weight_grad * 1e3,
        backward_ms: backward * 1e3,
        forward_gflops: flops / forward / 1e9,
        // The backward is two passes of the forward's flops: dW and dx.
        backward_gflops: 2.0 * flops / backward / 1e9,
    })
}

/// The models `bench` trains, as (model, norm).
pub const TRAINING_MODELS: [(&str, &str); 4] = [("seed-cnn", "bn"), ("vgg", "bn"), ("vgg", "gn:8"), ("resnet", "bn")];

/// Training images/s of `model` with `norm` on random data through the real training step.
pub fn bench_training(model: crate::models::Arch, norm: &'static str, batch: usize, steps: usize) -> Result<f64> {
    let spec = ModelSpec::new(model, NormSpec::builtin(norm), [1, 28, 28], 10)?;
    let mut m = Model::build(&spec, 0)?;
    let mut opt = Optimizer::new(OptimizerConfig::default());
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let x = random_tensor(&[batch, 1, 28, 28], &mut rng);
    let labels: Vec<u8> = (0..batch).map(|i| (i % 10) as u8).collect();
    let secs = time_median(steps, || {
        m.input_mut().clone_from(&x);
        train_step(&mut m, &mut opt, &labels, 10, 1e-3, 0.0).map(|_| ())
    })?;
    Ok(batch as f64 / secs)
}

/// Everything whose name contains `filter` (all when empty), with `progress` called before
/// each measurement.
pub fn run(
    quick: bool,
    reps: Option<usize>,
    filter: &str,
    shape: Option<[usize; 4]>,
    progress: &mut dyn FnMut(&str),
) -> Result<BenchReport> {
    let reps = reps.unwrap_or(if quick { 3 } else { 15 });
    progress("memory copy");
    // One shape is one entry of a comparison that alternates shape by shape: a shorter copy.
    let copy = copy_bandwidth(if shape.is_some() { reps.min(7) } else { reps });
    let mut kernels = Vec::new();
    for (kernel, spec, passes, traffic) in KERNELS.into_iter().filter(|k| k.0.contains(filter)) {
        let tokens: &[[usize; 4]] = if matches!(spec, "layernorm" | "rms") {
            &TOKEN_SHAPES
        } else {
            &[]
        };
        let table: Vec<[usize; 4]> = SHAPES.iter().chain(tokens).copied().collect();
        for shape in shape.map_or(table, |s| vec![s]) {
            progress(&format!("{kernel} {shape:?}"));
            let (secs, stream_secs) = bench_kernel_against_streams(kernel, spec, passes, shape, reps)?;
            let bytes = shape.iter().product::<usize>() as f64 * 4.0 * traffic;
            let gbps = bytes / secs / 1e9;
            kernels.push(KernelResult {
                kernel: kernel.into(),
                spec: spec.into(),
                shape,
                ms: secs * 1e3,
                gb_per_s: gbps,
                copy_fraction: gbps / copy,
                traffic_tensor_sizes: traffic,
                streams_ms: stream_secs * 1e3,
            });
        }
    }
    let mut convs = Vec::new();
    let mut gemm_peak = None;
    if filter == "conv" {
        progress("gemm peak");
        gemm_peak = Some(gemm_peak_gflops(reps));
        // Shape by shape, the algorithms one after another: a burst of host load hits them alike.
        for shape in CONV_SHAPES {
            for algorithm in CONV_ALGORITHMS {
                progress(&format!("conv {shape:?} {algorithm}"));
                convs.push(bench_conv(shape, algorithm, reps)?);
            }
        }
    }
    let mut training = Vec::new();
    // A shape asks for kernels only.
    for (model, norm) in TRAINING_MODELS.into_iter().filter(|_| shape.is_none()) {
        let arch = crate::models::Arch::builtin(model);
        let name = arch.to_string();
        let label = format!("{name} {norm}");
        if !(filter.is_empty() || label.contains(filter) || filter == "training") {
            continue;
        }
        progress(&format!("training {label}"));
        let steps = if quick { 3 } else { 40 };
        let ips = bench_training(arch, norm, 128, steps)?;
        training.push(TrainResult {
            model: name,
            norm: norm.into(),
            batch_size: 128,
            images_per_sec: ips,
        });
    }
    Ok(BenchReport {
        threads: rayon::current_num_threads(),
        copy_gb_per_s: copy,
        gemm_peak_gflops: gemm_peak,
        kernels,
        convs,
        training,
    })
}

/// Inference latency of a model before and after a transformation (pruning, folding).
#[derive(Clone, Debug, Serialize)]
pub struct Latency {
    pub batch: usize,
    pub before_ms: f64,
    pub after_ms: f64,
    pub speedup: f64,
}

/// Median eval-mode latency (ms) of one forward of `batch` images, over `reps` timed runs
/// after one warm-up: the inference benchmark's normlab side.
pub fn inference_latency(model: &mut Model, batch: usize, reps: usize) -> Result<f64> {
    Ok(inference_latencies(&mut [model], batch, reps)?[0])
}

/// Timed forwards of one model per round of `inference_latencies`, after an untimed one.
pub const ROUND_FORWARDS: usize = 5;

/// `inference_latency` of several models side by side: the models take turns, a round of
/// `ROUND_FORWARDS` timed forwards each after an untimed one, so a burst of load on a shared
/// host slows them alike and their ratio (a pruned net against its original) holds where one
/// model timed after the other did not (vgg and its slimmed net, timed one after the other,
/// five invocations: 1.98x to 2.24x). Turns of a single forward measured each model with its
/// caches full of the other's (the slimmed vgg 7.4-8.3 -> 9.6 ms), which no deployment sees.
pub fn inference_latencies(models: &mut [&mut Model], batch: usize, reps: usize) -> Result<Vec<f64>> {
    let inputs: Vec<Tensor> = models
        .iter()
        .map(|m| {
            let [c, h, w] = m.spec.input;
            random_tensor(&[batch, c, h, w], &mut ChaCha8Rng::seed_from_u64(3))
        })
        .collect();
    let reps = reps.max(1);
    let mut times = vec![Vec::with_capacity(reps); models.len()];
    while times[0].len() < reps {
        // One model needs no turns: one warm-up, then every timed forward.
        let turn = if models.len() == 1 { reps } else { ROUND_FORWARDS };
        let round = turn.min(reps - times[0].len());
        for ((model, x), t) in models.iter_mut().zip(&inputs).zip(&mut times) {
            for i in 0..=round {
                model.input_mut().clone_from(x);
                let t0 = Instant::now();
                model.forward(Mode::Eval)?;
                if i > 0 {
                    t.push(t0.elapsed().as_secs_f64());
                }
            }
        }
    }
    Ok(times
        .into_iter()
        .map(|mut t| {
            t.sort_by(|a, b| a.total_cmp(b));
            t[t.len() / 2] * 1e3
        })
        .collect())
}

/// Median eval-mode time (ms) of each layer of one forward of `batch` images, as (layer, ms).
pub fn inference_layer_times(model: &mut Model, batch: usize, reps: usize) -> Result<Vec<(String, f64)>> {
    let [c, h, w] = model.spec.input;
    let x = random_tensor(&[batch, c, h, w], &mut ChaCha8Rng::seed_from_u64(3));
    let n = model.net.layers.len();
    let mut per_layer = vec![Vec::with_capacity(reps); n];
    let mut seconds = vec![0.0; n];
    for i in 0..=reps {
        model.input_mut().clone_from(&x);
        crate::workers::with_workers_awake(|| model.net.forward_timed(Mode::Eval, &mut seconds).map(|_| ()))?;
        if i > 0 {
            per_layer.iter_mut().zip(&seconds).for_each(|(v, &s)| v.push(s));
        }
    }
    Ok(model
        .net
        .layers
        .iter()
        .zip(per_layer.iter_mut())
        .map(|((name, layer), t)| {
            t.sort_by(|a, b| a.total_cmp(b));
            let label = if name.is_empty() {
                layer.kind().to_string()
            } else {
                format!("{name} {}", layer.kind())
            };
            (label, t[t.len() / 2] * 1e3)
        })
        .collect())
}

/// Median eval-mode latency of both models at batch 1 and 128 (`fold`'s and `prune`'s
/// report), the two taking turns as in `inference_latencies`.
pub fn compare_latency(before: &mut Model, after: &mut Model) -> Result<Vec<Latency>> {
    let mut out = Vec::new();
    for batch in [1usize, 128] {
        let reps = if batch == 1 { 1000 } else { 100 };
        let ms = inference_latencies(&mut [&mut *before, &mut *after], batch, reps)?;
        out.push(Latency {
            batch,
            before_ms: ms[0],
            after_ms: ms[1],
            speedup: ms[0] / ms[1],
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Models of different inputs timed side by side: one median each, and each model ran on
    /// an input of its own shape at the batch asked (its logits have that many rows), whatever
    /// the reps against the turn length.
    #[test]
    fn side_by_side_latencies_time_every_model_on_its_own_input() {
        let build = |arch: &'static str, input: [usize; 3]| {
            let spec = ModelSpec::new(crate::models::Arch::builtin(arch), NormSpec::builtin("bn"), input, 10);
            Model::build(&spec.unwrap(), 0).unwrap()
        };
        let (mut mlp, mut cnn) = (build("mlp", [1, 8, 8]), build("seed-cnn", [3, 12, 12]));
        for reps in [1, 7] {
            let ms = inference_latencies(&mut [&mut mlp, &mut cnn], 3, reps).unwrap();
            assert_eq!(ms.len(), 2);
            assert!(ms.iter().all(|&t| t > 0.0 && t.is_finite()), "{ms:?}");
            for m in [&mut mlp, &mut cnn] {
                assert_eq!(m.input_mut().shape[0], 3);
                assert_eq!(m.net.output_and_grad().0.shape, [3, 10]);
            }
        }
        assert!(inference_latency(&mut cnn, 2, 3).unwrap() > 0.0);
        let ms = compare_latency(&mut mlp, &mut build("mlp", [1, 8, 8])).unwrap();
        assert_eq!(ms.iter().map(|l| l.batch).collect::<Vec<_>>(), [1, 128]);
    }

    /// The streams reference does the traffic it stands for: every value of y and dx written
    /// (a length past one chunk, uneven), and dx only with a backward.
    #[test]
    fn streams_write_the_whole_outputs() {
        let n = (1 << 14) * 3 + 5;
        let x: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let dy = vec![0.5f32; n];
        for backward in [false, true] {
            let (mut y, mut dx) = (vec![f32::NAN; n], vec![f32::NAN; n]);
            streams(&x, &dy, &mut y, &mut dx, backward);
            assert_eq!(y, x);
            assert!(dx
                .iter()
                .zip(&x)
                .all(|(&d, &v)| if backward { d == v + 0.5 } else { d.is_nan() }));
        }
        let (kernel, stream) =
            bench_kernel_against_streams("bn_train_fwd_bwd", "bn", "fwd+bwd", [4, 3, 5, 5], 3).unwrap();
        assert!(kernel > 0.0 && stream > 0.0 && kernel.is_finite() && stream.is_finite());
    }
}
