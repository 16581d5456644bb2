//! Model builders: seed-cnn (the articles' network), mlp (the BN paper's MNIST network) and
//! vgg (a configurable conv stack). A model is a Sequential plus the spec that rebuilds it.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::nn::activation::Sigmoid;
use crate::nn::conv2d::Conv2d;
use crate::nn::dropout::Dropout;
use crate::nn::linear::Linear;
use crate::nn::lstm::{Lstm, RecurrentNorm};
use crate::nn::norm_spec::NormSpec;
use crate::nn::pool::{GlobalAvgPool, MaxPool2d};
use crate::nn::residual::BasicBlock;
use crate::nn::{Mode, Sequential};
use crate::tensor::Tensor;

mod arch;
pub use arch::*;

/// What a model spec may ask for. Specs come from the command line and from checkpoint
/// metadata, which is untrusted: beyond these limits a spec is an error, never an allocation.
pub const MAX_INPUT_CHANNELS: usize = 64;
pub use crate::data::{MAX_CLASSES, MAX_INPUT_SIDE};
/// Conv and linear weights of one model (1 GiB of f32).
pub const MAX_WEIGHTS: usize = 1 << 28;
/// Tokens of a ViT (the attention keeps T² probabilities per head and sample).
pub const MAX_VIT_TOKENS: usize = 4097;

/// Everything needed to rebuild a model's structure; stored in checkpoint metadata.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// The architecture (stored as its canonical text: `seed-cnn:W` for W conv filters, as
    /// pruning leaves it, `vgg:<cfg>`, `resnet:<inner widths of its six blocks>`, ...).
    pub model: Arch,
    /// The norm after each conv/linear layer (stored as its canonical text).
    pub norm: NormSpec,
    /// Input [C, H, W].
    pub input: [usize; 3],
    pub classes: usize,
    /// Dropout probability before the classifier (0 = none); has no parameters, so PyTorch
    /// state dicts are unaffected.
    #[serde(default)]
    pub dropout: f32,
}

pub struct Model {
    pub spec: ModelSpec,
    pub net: Sequential,
}

impl ModelSpec {
    /// Forward floating-point operations per image of the conv and linear layers (2 per
    /// multiply-add; norms, activations and pooling are not counted).
    pub fn flops(&self) -> Result<usize> {
        let [c, h, w] = self.input;
        let macs = match self.model.clone() {
            Arch::SeedCnn(width) => c * width * 9 * h * w + width * (h / 2) * (w / 2) * self.classes,
            Arch::Mlp => c * h * w * 100 + 2 * 100 * 100 + 100 * self.classes,
            Arch::Vgg(items) => {
                let (mut ch, mut hh, mut ww, mut total) = (c, h, w, 0);
                for item in items {
                    match item {
                        Some(out) => {
                            total += ch * out * 9 * hh * ww;
                            ch = out;
                        }
                        None => {
                            hh /= 2;
                            ww /= 2;
                        }
                    }
                }
                total + ch * hh * ww * self.classes
            }
            Arch::ResNet(mids) => {
                let (mut ch, mut hh, mut ww) = (16, h, w);
                let mut total = c * 16 * 9 * h * w;
                for (b, &mid) in mids.iter().enumerate() {
                    let (out, stride) = RESNET_STAGES[b / 2];
                    let stride = if b % 2 == 0 { stride } else { 1 };
                    (hh, ww) = ((hh - 1) / stride + 1, (ww - 1) / stride + 1);
                    total += (ch * mid * 9 + mid * out * 9) * hh * ww;
                    if stride != 1 || ch != out {
                        total += ch * out * hh * ww;
                    }
                    ch = out;
                }
                total + ch * self.classes
            }
            Arch::Lstm(hid, layers) => {
                let per_step: usize = (0..layers)
                    .map(|l| 4 * hid * (if l == 0 { w } else { hid } + hid))
                    .sum();
                per_step * h + hid * self.classes
            }
            Arch::Vit(v) => {
                let patches = (h / v.patch) * (w / v.patch);
                let t = patches + 1;
                let (d, hid) = (v.dim, v.hidden());
                // Patch conv; per block qkv, proj, fc1, fc2 and the two attention products.
                patches * d * c * v.patch * v.patch
                    + v.depth * (t * (4 * d * d + 2 * d * hid) + 2 * t * t * d)
                    + d * self.classes
            }
        };
        Ok(2 * macs)
    }

    /// The conv and linear weights the model holds (its biases and norm parameters come on
    /// top), computed without building it; an error beyond `MAX_WEIGHTS` or when the input
    /// or class count is outside the limits or too small for the architecture.
    pub fn parameter_count(&self) -> Result<usize> {
        let [c, h, w] = self.input;
        if [c, h, w].contains(&0) || c > MAX_INPUT_CHANNELS || h > MAX_INPUT_SIDE || w > MAX_INPUT_SIDE {
            return Err(Error::invalid(format!(
                "input shape {:?} is outside [1..={MAX_INPUT_CHANNELS}, 1..={MAX_INPUT_SIDE}, 1..={MAX_INPUT_SIDE}]",
                self.input
            )));
        }
        if !(1..=MAX_CLASSES).contains(&self.classes) {
            return Err(Error::invalid(format!(
                "{} classes is outside 1..={MAX_CLASSES}",
                self.classes
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::invalid(format!("dropout {} is outside [0, 1)", self.dropout)));
        }
        let (c, h, w, k) = (c as u128, h as u128, w as u128, self.classes as u128);
        let weights: u128 = match self.model.clone() {
            Arch::SeedCnn(width) => {
                if h < 2 || w < 2 {
                    return Err(Error::invalid(format!(
                        "seed-cnn pools its input by 2: images must be at least 2x2, got {h}x{w}"
                    )));
                }
                let width = width as u128;
                c * width * 9 + width * (h / 2) * (w / 2) * k
            }
            Arch::Mlp => c * h * w * 100 + 2 * 100 * 100 + 100 * k,
            Arch::Vgg(items) => {
                let (mut ch, mut hh, mut ww, mut total) = (c, h, w, 0u128);
                for item in items {
                    match item {
                        Some(out) => {
                            total += ch * out as u128 * 9;
                            ch = out as u128;
                        }
                        None => {
                            if hh < 2 || ww < 2 {
                                return Err(Error::invalid(format!(
                                    "vgg cfg pools a {hh}x{ww} map below 1x1; use fewer M or larger images"
                                )));
                            }
                            hh /= 2;
                            ww /= 2;
                        }
                    }
                }
                total + ch * hh * ww * k
            }
            Arch::ResNet(mids) => {
                let mut ch = 16u128;
                let mut total = c * 16 * 9;
                for (b, &mid) in mids.iter().enumerate() {
                    let (out, stride) = RESNET_STAGES[b / 2];
                    let out = out as u128;
                    total += ch * mid as u128 * 9 + mid as u128 * out * 9;
                    // A 1x1 shortcut conv only where the block changes the shape.
                    if (b % 2 == 0 && stride != 1) || ch != out {
                        total += ch * out;
                    }
                    ch = out;
                }
                total + ch * k
            }
            Arch::Lstm(hid, layers) => {
                if c != 1 {
                    return Err(Error::invalid(format!(
                        "lstm reads a grey image row by row ({h} steps of {w} pixels); these images have {c} channels"
                    )));
                }
                let hid = hid as u128;
                let stack: u128 = (0..layers)
                    .map(|l| 4 * hid * (if l == 0 { w } else { hid } + hid))
                    .sum();
                stack + hid * k
            }
            Arch::Vit(v) => {
                let (p, d, hid) = (v.patch as u128, v.dim as u128, v.hidden() as u128);
                if h % p != 0 || w % p != 0 {
                    return Err(Error::invalid(format!(
                        "vit patch side {p} does not divide the {h}x{w} images; choose P dividing both sides (or --resize)"
                    )));
                }
                let tokens = (h / p) * (w / p) + 1;
                if tokens > MAX_VIT_TOKENS as u128 {
                    return Err(Error::invalid(format!(
                        "vit with {p}x{p} patches on {h}x{w} images has {tokens} tokens, more than {MAX_VIT_TOKENS}; use larger patches"
                    )));
                }
                c * d * p * p + v.depth as u128 * (4 * d * d + 2 * d * hid) + d * k
            }
        };
        if weights > MAX_WEIGHTS as u128 {
            return Err(Error::invalid(format!(
                "model {} on input {:?} would have {weights} weights, more than the limit {MAX_WEIGHTS}",
                self.model, self.input
            )));
        }
        Ok(weights as usize)
    }

    /// Validates the architecture against the input and class count; errors name the bad part.
    pub fn new(model: Arch, norm: NormSpec, input: [usize; 3], classes: usize) -> Result<Self> {
        let spec = ModelSpec {
            model,
            norm,
            input,
            classes,
            dropout: 0.0,
        };
        spec.parameter_count()?;
        Ok(spec)
    }
}

/// The norm inside an LSTM's recurrence for `--norm`: none, ln (LN-LSTM), bn (per-step BN) or
/// bn-shared (statistics shared across steps).
fn recurrent_norm(norm: &NormSpec) -> Result<RecurrentNorm> {
    use crate::nn::batch_norm::{BatchNormConfig, BatchStats};
    use crate::nn::group_norm::WithinSample;
    let batch = |c: &BatchNormConfig, per_step: bool| {
        match c.momentum {
        Some(momentum) if c.affine && c.track_running_stats => Ok(RecurrentNorm::Batch {
            eps: c.eps,
            momentum,
            per_step,
        }),
        _ => Err(Error::invalid(
            "lstm's BN keeps running statistics with an exponential momentum and its γ, β: drop momentum=none, affine=false and track=false",
        )),
    }
    };
    match norm {
        NormSpec::None => Ok(RecurrentNorm::None),
        NormSpec::Within(c) if c.kind == WithinSample::Layer && c.affine => Ok(RecurrentNorm::Layer { eps: c.eps }),
        NormSpec::Batch(c) if c.stats == BatchStats::Standard => batch(c, true),
        NormSpec::SharedBatch(c) => batch(c, false),
        other => Err(Error::invalid(format!(
            "lstm supports --norm none, ln (LN-LSTM), bn (per-step BN-LSTM) and bn-shared, not {other}"
        ))),
    }
}

/// timm's VisionTransformer: patch_embed.proj (a P×P stride-P conv), the token rows with
/// cls_token and pos_embed, blocks.{i}, the final norm, the class token's row, and the head.
fn build_vit(
    net: &mut Sequential,
    v: VitConfig,
    norm: &NormSpec,
    spec: &ModelSpec,
    rng: &mut ChaCha8Rng,
) -> Result<()> {
    use crate::nn::vit::{
        attention::vit_linear,
        block::Block,
        tokens::{ClassToken, PatchTokens},
    };
    if matches!(norm, NormSpec::Within(c) if c.kind != crate::nn::group_norm::WithinSample::LayerElementwise)
        || matches!(
            norm,
            NormSpec::Group { .. } | NormSpec::NoisyBatch(_) | NormSpec::SharedBatch(_)
        )
    {
        return Err(Error::invalid(format!(
            "vit's blocks take --norm layernorm (default, eps 1e-6 as timm's), rms, bn (over batch and tokens) or none, not {norm}"
        )));
    }
    let [c, h, w] = spec.input;
    let patches = (h / v.patch) * (w / v.patch);
    let tokens = patches + 1;
    net.push(
        "patch_embed.proj",
        Conv2d::new(c, v.dim, v.patch, v.patch, 0, true, rng),
    );
    net.push("", PatchTokens::new(v.dim, patches, rng));
    for i in 0..v.depth {
        let name = format!("blocks.{i}");
        let block = Block::new(v.dim, v.heads, tokens, v.hidden(), norm, v.placement, &name, rng)?;
        net.push(&name, block);
    }
    if let Some(layer) = norm.build(&[v.dim], "norm", false)? {
        net.push_boxed("norm", layer);
    }
    net.push("", ClassToken { tokens, dim: v.dim });
    if spec.dropout > 0.0 {
        net.push("", Dropout::new(spec.dropout)?);
    }
    net.push("head", vit_linear(v.dim, spec.classes, rng));
    Ok(())
}

impl Model {
    /// Builds the model with PyTorch-style random initialization from `seed`.
    pub fn build(spec: &ModelSpec, seed: u64) -> Result<Model> {
        spec.parameter_count()?;
        let arch = spec.model.clone();
        let norm = spec.norm;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let [c, h, w] = spec.input;
        let bias = norm.wants_bias();
        let mut net = Sequential::default();
        // The ReLU after a conv is fused into the norm that follows the conv. Without a norm it
        // goes into the max-pool when one follows (ReLU and max commute, and the pool's output is
        // a quarter of the size), else into the conv (applied while its output is in cache).
        let no_norm = norm == NormSpec::None;
        let push_conv = |net: &mut Sequential, name: &str, conv: Conv2d, pool_follows: bool| {
            net.push(
                name,
                if no_norm && !pool_follows {
                    conv.with_relu()
                } else {
                    conv
                },
            );
        };
        let pool_after_relu = || {
            let pool = MaxPool2d::new(2, 2);
            if no_norm {
                pool.with_relu()
            } else {
                pool
            }
        };
        let push_dropout = |net: &mut Sequential| -> Result<()> {
            if spec.dropout > 0.0 {
                net.push("", Dropout::new(spec.dropout)?);
            }
            Ok(())
        };
        let push_norm_relu = |net: &mut Sequential, name: String, sample_shape: &[usize]| -> Result<()> {
            if let Some(layer) = norm.build(sample_shape, &name, true)? {
                net.push_boxed(&name, layer);
            }
            Ok(())
        };
        match arch {
            Arch::SeedCnn(width) => {
                push_conv(&mut net, "conv1", Conv2d::new(c, width, 3, 1, 1, bias, &mut rng), true);
                push_norm_relu(&mut net, "bn1".into(), &[width, h, w])?;
                net.push("", pool_after_relu());
                // Linear reads [N, W, 14, 14] as [N, W*196]: PyTorch's Flatten without the copy.
                push_dropout(&mut net)?;
                net.push(
                    "fc1",
                    Linear::new(width * (h / 2) * (w / 2), spec.classes, true, &mut rng),
                );
            }
            Arch::Mlp => {
                let mut width = c * h * w;
                for i in 1..=3 {
                    net.push(&format!("fc{i}"), Linear::new(width, 100, bias, &mut rng));
                    if let Some(layer) = norm.build(&[100], &format!("bn{i}"), false)? {
                        net.push_boxed(&format!("bn{i}"), layer);
                    }
                    net.push("", Sigmoid);
                    width = 100;
                }
                push_dropout(&mut net)?;
                net.push("fc4", Linear::new(width, spec.classes, true, &mut rng));
            }
            Arch::Vgg(items) => {
                let (mut ch, mut hh, mut ww) = (c, h, w);
                let mut k = 0;
                for (i, &item) in items.iter().enumerate() {
                    match item {
                        Some(out) => {
                            k += 1;
                            let pool_follows = items.get(i + 1) == Some(&None);
                            push_conv(
                                &mut net,
                                &format!("conv{k}"),
                                Conv2d::new(ch, out, 3, 1, 1, bias, &mut rng),
                                pool_follows,
                            );
                            push_norm_relu(&mut net, format!("bn{k}"), &[out, hh, ww])?;
                            ch = out;
                        }
                        None => {
                            if hh < 2 || ww < 2 {
                                return Err(Error::invalid(format!("vgg cfg pools a {hh}x{ww} map below 1x1")));
                            }
                            let after_conv = i > 0 && items[i - 1].is_some();
                            net.push(
                                "",
                                if after_conv {
                                    pool_after_relu()
                                } else {
                                    MaxPool2d::new(2, 2)
                                },
                            );
                            hh /= 2;
                            ww /= 2;
                        }
                    }
                }
                push_dropout(&mut net)?;
                net.push("fc1", Linear::new(ch * hh * ww, spec.classes, true, &mut rng));
            }
            Arch::ResNet(mids) => {
                push_conv(&mut net, "conv1", Conv2d::new(c, 16, 3, 1, 1, bias, &mut rng), false);
                push_norm_relu(&mut net, "bn1".into(), &[16, h, w])?;
                let (mut ch, mut hh, mut ww) = (16, h, w);
                for (b, &mid) in mids.iter().enumerate() {
                    let (out, stride) = RESNET_STAGES[b / 2];
                    let stride = if b % 2 == 0 { stride } else { 1 };
                    (hh, ww) = ((hh - 1) / stride + 1, (ww - 1) / stride + 1);
                    let name = format!("layer{}.{}", b / 2 + 1, b % 2);
                    let block = BasicBlock::new(ch, mid, out, stride, [hh, ww], &norm, &name, &mut rng)?;
                    net.push(&name, block);
                    ch = out;
                }
                net.push("", GlobalAvgPool);
                push_dropout(&mut net)?;
                net.push("fc", Linear::new(ch, spec.classes, true, &mut rng));
            }
            Arch::Vit(v) => build_vit(&mut net, v, &norm, spec, &mut rng)?,
            Arch::Lstm(hid, layers) => {
                let recurrent = recurrent_norm(&norm)?;
                net.push("lstm", Lstm::new(w, hid, layers, h, recurrent, &mut rng)?);
                push_dropout(&mut net)?;
                net.push("fc", Linear::new(hid, spec.classes, true, &mut rng));
            }
        }
        // The first layer never needs dL/dx (it is the data).
        if let Some((_, first)) = net.layers.first_mut() {
            first.set_input_grad(false);
        }
        Ok(Model {
            spec: spec.clone(),
            net,
        })
    }

    /// The input buffer: fill it (the data loader writes batches straight into it), then call
    /// `forward`.
    pub fn input_mut(&mut self) -> &mut Tensor {
        self.net.input_mut()
    }

    /// Runs the network on the input set through `input_mut`; returns the logits.
    pub fn forward(&mut self, mode: Mode) -> Result<&Tensor> {
        let [c, h, w] = self.spec.input;
        let x = self.net.input_mut();
        if x.shape.len() != 4 || x.shape[1..] != [c, h, w] {
            return Err(Error::shape(
                self.spec.model.to_string(),
                format!("expected input [N, {c}, {h}, {w}], got {:?}", x.shape),
            ));
        }
        // A chain of short parallel regions (at batch 1, tens of µs each): keep the workers
        // polling between them rather than waking them per region (crate::workers).
        crate::workers::with_workers_awake(|| self.net.forward(mode))
    }

    /// Backward after a training forward, once the loss has filled the logits' gradient.
    pub fn backward(&mut self) -> Result<()> {
        crate::workers::with_workers_awake(|| self.net.backward())
    }

    /// Total number of learnable values.
    pub fn parameter_count(&mut self) -> usize {
        let mut n = 0;
        self.net.visit_params(&mut |p| n += p.value.len());
        n
    }

    /// The layers' PyTorch kinds in order, for a printed summary.
    pub fn summary(&self) -> String {
        self.net
            .layers
            .iter()
            .map(|(n, l)| {
                if n.is_empty() {
                    l.kind().to_string()
                } else {
                    format!("{n}:{}", l.kind())
                }
            })
            .collect::<Vec<_>>()
            .join(" -> ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::ParamKind;

    /// The count that checks a checkpoint's size against its metadata must be the weights the
    /// built model really has: an overcount refuses valid files (a narrow resnet once did).
    #[test]
    fn optional_abilities_reach_every_conv_and_syncbn_inside_blocks_too() {
        use crate::nn::conv_algorithm::ConvAlgorithm;
        let spec = ModelSpec::new(
            crate::models::Arch::builtin("resnet:4,4,8,8,8,8"),
            NormSpec::builtin("syncbn"),
            [1, 28, 28],
            10,
        )
        .unwrap();
        let mut m = Model::build(&spec, 0).unwrap();
        // The stem, two convs per block and the three strided blocks' shortcuts.
        let convs = m.net.set_conv_algorithm(ConvAlgorithm::Im2col);
        let comm = crate::dist::single_process();
        let syncs = m.net.set_communicator(&comm);
        assert_eq!((convs, syncs), (1 + 6 * 2 + 2, 1 + 6 * 2 + 2));
        let plain = ModelSpec::new(
            crate::models::Arch::builtin("resnet:4,4,8,8,8,8"),
            NormSpec::builtin("bn"),
            [1, 28, 28],
            10,
        )
        .unwrap();
        assert_eq!(Model::build(&plain, 0).unwrap().net.set_communicator(&comm), 0);
    }

    /// The scratch the convs and blocks share at this size carries nothing from one call to
    /// the next: a batch's logits are the same bits before and after another model of other
    /// widths ran through the same sets, and agree with the samples run one by one (their own
    /// scratch, other algorithms) to float rounding.
    #[test]
    fn shared_scratch_carries_nothing_between_calls() {
        let build = |arch: &'static str| {
            let spec = ModelSpec::new(
                crate::models::Arch::builtin(arch),
                NormSpec::builtin("bn"),
                [1, 28, 28],
                10,
            );
            Model::build(&spec.unwrap(), 0).unwrap()
        };
        let (mut m, mut other) = (build("resnet"), build("resnet:8,8,24,24,40,40"));
        let n = 24;
        let x: Vec<f32> = (0..n * 784).map(|i| ((i * 37 % 101) as f32) / 50.0 - 1.0).collect();
        let run = |m: &mut Model, x: &[f32]| {
            m.input_mut().resize_to(&[x.len() / 784, 1, 28, 28]).unwrap();
            m.input_mut().data.copy_from_slice(x);
            m.forward(Mode::Eval).unwrap().data.clone()
        };
        let first = run(&mut m, &x);
        run(&mut other, &x);
        assert_eq!(run(&mut m, &x), first);
        for (i, sample) in x.chunks(784).enumerate() {
            for (a, b) in run(&mut m, sample).iter().zip(&first[i * 10..]) {
                assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "sample {i}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn parameter_count_matches_the_built_weights() {
        for model in [
            "seed-cnn",
            "seed-cnn:5",
            "mlp",
            "vgg:8,M,16,M",
            "resnet",
            "resnet:4,4,8,8,8,8",
            "resnet:1,2,3,4,5,6",
        ] {
            let spec = ModelSpec::new(
                crate::models::Arch::builtin(model),
                NormSpec::builtin("bn"),
                [1, 28, 28],
                10,
            )
            .unwrap();
            let mut m = Model::build(&spec, 0).unwrap();
            let mut weights = 0;
            m.net.visit_params(&mut |p| {
                if p.kind == ParamKind::Weight {
                    weights += p.value.len();
                }
            });
            assert_eq!(spec.parameter_count().unwrap(), weights, "{model}");
        }
    }
}
