//! Model builders: seed-cnn (the articles' network), mlp (the BN paper's MNIST network) and
//! vgg (a configurable conv stack). A model is a Sequential plus the spec that rebuilds it.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::nn::activation::Sigmoid;
use crate::nn::conv2d::Conv2d;
use crate::nn::linear::Linear;
use crate::nn::norm_spec::NormSpec;
use crate::nn::pool::MaxPool2d;
use crate::nn::{Mode, Sequential};
use crate::tensor::Tensor;

/// The default VGG configuration: numbers are 3x3 conv widths, `M` a 2x2 max-pool.
pub const DEFAULT_VGG: &str = "32,32,M,64,64,M,128,128,M";

/// Everything needed to rebuild a model's structure; stored in checkpoint metadata.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// `seed-cnn` (or `seed-cnn:W` for W conv filters, as pruning leaves it), `mlp` or `vgg:<cfg>`.
    pub model: String,
    /// Canonical norm spec (see `NormSpec`'s Display).
    pub norm: String,
    /// Input [C, H, W].
    pub input: [usize; 3],
    pub classes: usize,
}

#[derive(Clone, Debug, PartialEq)]
enum Arch {
    /// The conv width (32 in the articles).
    SeedCnn(usize),
    Mlp,
    Vgg(Vec<Option<usize>>),
}

fn parse_arch(model: &str) -> Result<Arch> {
    let (name, cfg) = model.split_once(':').unwrap_or((model, ""));
    match (name, cfg) {
        ("seed-cnn", "") => Ok(Arch::SeedCnn(32)),
        ("seed-cnn", w) => match w.parse::<usize>() {
            Ok(w) if w > 0 => Ok(Arch::SeedCnn(w)),
            _ => Err(Error::invalid(format!(
                "seed-cnn width '{w}' is not a whole number > 0"
            ))),
        },
        ("mlp", "") => Ok(Arch::Mlp),
        ("vgg", cfg) => {
            let cfg = if cfg.is_empty() { DEFAULT_VGG } else { cfg };
            let items = cfg
                .split(',')
                .map(|t| match t.trim() {
                    "M" | "m" => Ok(None),
                    w => match w.parse::<usize>() {
                        Ok(c) if c > 0 => Ok(Some(c)),
                        _ => Err(Error::invalid(format!(
                            "vgg cfg item '{w}' is neither a width > 0 nor M"
                        ))),
                    },
                })
                .collect::<Result<Vec<_>>>()?;
            if !items.iter().any(|i| i.is_some()) {
                return Err(Error::invalid(format!("vgg cfg '{cfg}' has no conv layer")));
            }
            Ok(Arch::Vgg(items))
        }
        _ => Err(Error::invalid(format!(
            "unknown model '{model}' (known: seed-cnn[:width], mlp, vgg[:cfg])"
        ))),
    }
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
        let macs = match parse_arch(&self.model)? {
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
        };
        Ok(2 * macs)
    }

    /// Canonicalizes and validates; errors name the bad part.
    pub fn new(model: &str, norm: &str, input: [usize; 3], classes: usize) -> Result<Self> {
        let arch = parse_arch(model)?;
        let norm_spec: NormSpec = norm.parse()?;
        let model = match arch {
            Arch::Vgg(_) if !model.contains(':') => format!("vgg:{DEFAULT_VGG}"),
            _ => model.to_string(),
        };
        Ok(ModelSpec {
            model,
            norm: norm_spec.to_string(),
            input,
            classes,
        })
    }
}

impl Model {
    /// Builds the model with PyTorch-style random initialization from `seed`.
    pub fn build(spec: &ModelSpec, seed: u64) -> Result<Model> {
        let arch = parse_arch(&spec.model)?;
        let norm: NormSpec = spec.norm.parse()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let [c, h, w] = spec.input;
        let bias = norm.wants_bias();
        let mut net = Sequential::default();
        // The ReLU after a conv is fused into the norm that follows the conv, or without a norm
        // into the conv itself (bias and ReLU applied while its output is in cache).
        let fuse_into_conv = norm == NormSpec::None;
        let push_conv = |net: &mut Sequential, name: &str, conv: Conv2d| {
            net.push(name, if fuse_into_conv { conv.with_relu() } else { conv });
        };
        let push_norm_relu = |net: &mut Sequential, name: String, sample_shape: &[usize]| -> Result<()> {
            if let Some(layer) = norm.build(sample_shape, &name, true)? {
                net.push_boxed(&name, layer);
            }
            Ok(())
        };
        match arch {
            Arch::SeedCnn(width) => {
                push_conv(&mut net, "conv1", Conv2d::new(c, width, 3, 1, 1, bias, &mut rng));
                push_norm_relu(&mut net, "bn1".into(), &[width, h, w])?;
                net.push("", MaxPool2d::new(2, 2));
                // Linear reads [N, W, 14, 14] as [N, W*196]: PyTorch's Flatten without the copy.
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
                net.push("fc4", Linear::new(width, spec.classes, true, &mut rng));
            }
            Arch::Vgg(items) => {
                let (mut ch, mut hh, mut ww) = (c, h, w);
                let mut k = 0;
                for item in items {
                    match item {
                        Some(out) => {
                            k += 1;
                            push_conv(
                                &mut net,
                                &format!("conv{k}"),
                                Conv2d::new(ch, out, 3, 1, 1, bias, &mut rng),
                            );
                            push_norm_relu(&mut net, format!("bn{k}"), &[out, hh, ww])?;
                            ch = out;
                        }
                        None => {
                            if hh < 2 || ww < 2 {
                                return Err(Error::invalid(format!("vgg cfg pools a {hh}x{ww} map below 1x1")));
                            }
                            net.push("", MaxPool2d::new(2, 2));
                            hh /= 2;
                            ww /= 2;
                        }
                    }
                }
                net.push("fc1", Linear::new(ch * hh * ww, spec.classes, true, &mut rng));
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
                &self.spec.model,
                format!("expected input [N, {c}, {h}, {w}], got {:?}", x.shape),
            ));
        }
        self.net.forward(mode)
    }

    /// Backward after a training forward, once the loss has filled the logits' gradient.
    pub fn backward(&mut self) -> Result<()> {
        self.net.backward()
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
