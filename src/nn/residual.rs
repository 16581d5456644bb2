//! The basic residual block of CIFAR-style ResNets:
//! y = ReLU(norm2(conv2(norm1+ReLU(conv1(x)))) + shortcut(x)), where the shortcut is the
//! identity, or a 1x1 conv + norm when the stride or width changes. State-dict names follow
//! torchvision: conv1, bn1, conv2, bn2, shortcut.0 (conv), shortcut.1 (norm).

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::kernels::reduce::relu_mask;
use crate::nn::conv2d::Conv2d;
use crate::nn::layer::{BufferMut, Layer, Mode, Param};
use crate::nn::norm_spec::NormSpec;
use crate::onnx::graph::OnnxGraph;
use crate::tensor::Tensor;

const CHUNK: usize = 1 << 14;

pub struct BasicBlock {
    pub in_channels: usize,
    /// The inner width (conv1's outputs), the one network slimming prunes.
    pub mid_channels: usize,
    pub out_channels: usize,
    pub stride: usize,
    pub conv1: Conv2d,
    pub norm1: Box<dyn Layer>,
    pub conv2: Conv2d,
    pub norm2: Box<dyn Layer>,
    pub shortcut: Option<(Conv2d, Box<dyn Layer>)>,
    /// Which of norm1, norm2 and the shortcut's norm are identities (--norm none, the folded
    /// model): their passes are skipped, not run as copies (resnet folded at batch 128: two
    /// full-size copies per block).
    identity: [bool; 3],
    /// h1 = conv1(x), a1 = norm1+ReLU(h1), h2 = conv2(a1), a2 = norm2(h2), hs = shortcut conv, s = its norm.
    acts: [Tensor; 6],
    /// Gradients of the same tensors, and of x through each branch.
    grads: [Tensor; 8],
}

impl BasicBlock {
    /// `spatial` is the output [H, W]; errors name the block (`prefix`) when the norm rejects its shape.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        in_channels: usize,
        mid_channels: usize,
        out_channels: usize,
        stride: usize,
        spatial: [usize; 2],
        norm: &NormSpec,
        prefix: &str,
        rng: &mut impl rand::Rng,
    ) -> Result<Self> {
        let bias = norm.wants_bias();
        let [h, w] = spatial;
        // Without a norm (--norm none) the slots hold an identity and conv1 applies the ReLU.
        let mut identity = [false; 3];
        let mut or_identity = |slot: usize, l: Option<Box<dyn Layer>>| {
            identity[slot] = l.is_none();
            l.unwrap_or_else(|| Box::new(Identity))
        };
        let mut conv1 = Conv2d::new(in_channels, mid_channels, 3, stride, 1, bias, rng);
        let norm1 = or_identity(0, norm.build(&[mid_channels, h, w], &format!("{prefix}.bn1"), true)?);
        let conv2 = Conv2d::new(mid_channels, out_channels, 3, 1, 1, bias, rng);
        let norm2 = or_identity(1, norm.build(&[out_channels, h, w], &format!("{prefix}.bn2"), false)?);
        let shortcut = if stride != 1 || in_channels != out_channels {
            let conv = Conv2d::new(in_channels, out_channels, 1, stride, 0, bias, rng);
            Some((
                conv,
                or_identity(
                    2,
                    norm.build(&[out_channels, h, w], &format!("{prefix}.shortcut.1"), false)?,
                ),
            ))
        } else {
            None
        };
        if identity[0] {
            conv1 = conv1.with_relu();
        }
        let mut block = BasicBlock {
            in_channels,
            mid_channels,
            out_channels,
            stride,
            conv1,
            norm1,
            conv2,
            norm2,
            shortcut,
            identity,
            acts: Default::default(),
            grads: Default::default(),
        };
        block.conv1.set_input_grad(true);
        Ok(block)
    }
}

/// The empty norm slot of a block without normalization.
struct Identity;

impl Layer for Identity {
    fn kind(&self) -> &'static str {
        "Identity"
    }

    fn export_onnx(&self, _g: &mut OnnxGraph, x: &str, _name: &str) -> Result<String> {
        Ok(x.to_string())
    }
    fn forward(&mut self, x: &Tensor, y: &mut Tensor, _mode: Mode) -> Result<()> {
        y.clone_from(x);
        Ok(())
    }
    fn backward(&mut self, _x: &Tensor, _y: &Tensor, dy: &Tensor, dx: &mut Tensor) -> Result<()> {
        dx.clone_from(dy);
        Ok(())
    }
}

fn add_into(dst: &mut [f32], src: &[f32]) {
    dst.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(a, b)| *a += b));
}

impl Layer for BasicBlock {
    fn kind(&self) -> &'static str {
        "BasicBlock"
    }

    fn export_onnx(&self, g: &mut OnnxGraph, x: &str, name: &str) -> Result<String> {
        let h1 = self.conv1.export_onnx(g, x, &format!("{name}.conv1"))?;
        let a1 = self.norm1.export_onnx(g, &h1, &format!("{name}.bn1"))?;
        let h2 = self.conv2.export_onnx(g, &a1, &format!("{name}.conv2"))?;
        let a2 = self.norm2.export_onnx(g, &h2, &format!("{name}.bn2"))?;
        let s = match &self.shortcut {
            Some((conv, norm)) => {
                let hs = conv.export_onnx(g, x, &format!("{name}.shortcut.0"))?;
                norm.export_onnx(g, &hs, &format!("{name}.shortcut.1"))?
            }
            None => x.to_string(),
        };
        let sum = g.node("Add", &[&a2, &s], &[], 4);
        Ok(g.node("Relu", &[&sum], &[], 4))
    }

    // y = ReLU(a2 + s)
    fn forward(&mut self, x: &Tensor, y: &mut Tensor, mode: Mode) -> Result<()> {
        if x.shape.len() != 4 || x.shape[1] != self.in_channels {
            return Err(Error::shape(
                "BasicBlock",
                format!("expected [N, {}, H, W], got {:?}", self.in_channels, x.shape),
            ));
        }
        let [h1, a1, h2, a2, hs, s] = &mut self.acts;
        let [id1, id2, id_short] = self.identity;
        self.conv1.forward(x, h1, mode)?;
        let a1: &Tensor = if id1 {
            h1
        } else {
            self.norm1.forward(h1, a1, mode)?;
            a1
        };
        let shortcut: &Tensor = match self.shortcut.as_mut() {
            Some((conv, _)) if id_short => {
                conv.forward(x, hs, mode)?;
                hs
            }
            Some((conv, norm)) => {
                conv.forward(x, hs, mode)?;
                norm.forward(hs, s, mode)?;
                s
            }
            None => x,
        };
        // Inference without norm2 (the folded model): the sum and the ReLU inside conv2's
        // Winograd output transform or direct epilogue (resnet folded, alternating builds:
        // batch 128 23.8-24.7 -> 21.1-22.6 ms, batch 1 0.393-0.399 -> 0.384-0.387 ms).
        if id2 && mode == Mode::Eval && self.conv2.forward_add_relu(a1, y, shortcut)? {
            return Ok(());
        }
        self.conv2.forward(a1, h2, mode)?;
        let a2: &Tensor = if id2 {
            h2
        } else {
            self.norm2.forward(h2, a2, mode)?;
            a2
        };
        if shortcut.shape != a2.shape {
            return Err(Error::shape(
                "BasicBlock",
                format!("shortcut {:?} does not match {:?}", shortcut.shape, a2.shape),
            ));
        }
        y.resize_to(&a2.shape)?;
        y.data
            .par_chunks_mut(CHUNK)
            .zip(a2.data.par_chunks(CHUNK).zip(shortcut.data.par_chunks(CHUNK)))
            .for_each(|(o, (a, b))| {
                o.iter_mut()
                    .zip(a)
                    .zip(b)
                    .for_each(|((o, &a), &b)| *o = crate::kernels::reduce::relu(a + b))
            });
        Ok(())
    }

    fn backward(&mut self, x: &Tensor, y: &Tensor, dy: &Tensor, dx: &mut Tensor) -> Result<()> {
        if dy.shape != y.shape {
            return Err(Error::shape(
                "BasicBlock",
                format!("gradient {:?} does not match output {:?}", dy.shape, y.shape),
            ));
        }
        let [h1, a1, h2, a2, hs, s] = &self.acts;
        let [id1, id2, id_short] = self.identity;
        let (a1, a2, s) = (
            if id1 { h1 } else { a1 },
            if id2 { h2 } else { a2 },
            if id_short { hs } else { s },
        );
        let [dsum, dh2, da1, dh1, dx_main, dhs, dx_short, _] = &mut self.grads;
        // The gradient reaching both branches: dy·[y > 0].
        dsum.resize_to(&dy.shape)?;
        dsum.data
            .par_chunks_mut(CHUNK)
            .zip(dy.data.par_chunks(CHUNK).zip(y.data.par_chunks(CHUNK)))
            .for_each(|(o, (g, v))| {
                o.iter_mut()
                    .zip(g)
                    .zip(v)
                    .for_each(|((o, &g), &v)| *o = relu_mask(v, g))
            });
        let dh2: &Tensor = if id2 {
            dsum
        } else {
            self.norm2.backward(h2, a2, dsum, dh2)?;
            dh2
        };
        self.conv2.backward(a1, h2, dh2, da1)?;
        let dh1: &Tensor = if id1 {
            da1
        } else {
            self.norm1.backward(h1, a1, da1, dh1)?;
            dh1
        };
        self.conv1.backward(x, h1, dh1, dx_main)?;
        dx.clone_from(dx_main);
        match self.shortcut.as_mut() {
            Some((conv, norm)) => {
                let dhs: &Tensor = if id_short {
                    dsum
                } else {
                    norm.backward(hs, s, dsum, dhs)?;
                    dhs
                };
                conv.backward(x, hs, dhs, dx_short)?;
                add_into(&mut dx.data, &dx_short.data);
            }
            None => add_into(&mut dx.data, &dsum.data),
        }
        Ok(())
    }

    fn visit_params<'a>(&'a mut self, f: &mut dyn FnMut(&'static str, &'a mut Param)) {
        self.conv1
            .visit_params(&mut |k, p| f(if k == "weight" { "conv1.weight" } else { "conv1.bias" }, p));
        self.norm1
            .visit_params(&mut |k, p| f(if k == "weight" { "bn1.weight" } else { "bn1.bias" }, p));
        self.conv2
            .visit_params(&mut |k, p| f(if k == "weight" { "conv2.weight" } else { "conv2.bias" }, p));
        self.norm2
            .visit_params(&mut |k, p| f(if k == "weight" { "bn2.weight" } else { "bn2.bias" }, p));
        if let Some((conv, norm)) = self.shortcut.as_mut() {
            conv.visit_params(&mut |k, p| {
                f(
                    if k == "weight" {
                        "shortcut.0.weight"
                    } else {
                        "shortcut.0.bias"
                    },
                    p,
                )
            });
            norm.visit_params(&mut |k, p| {
                f(
                    if k == "weight" {
                        "shortcut.1.weight"
                    } else {
                        "shortcut.1.bias"
                    },
                    p,
                )
            });
        }
    }

    fn visit_parts(&mut self, f: &mut dyn FnMut(&mut dyn std::any::Any)) {
        f(&mut self.conv1);
        self.norm1.visit_parts(f);
        f(&mut self.conv2);
        self.norm2.visit_parts(f);
        if let Some((conv, norm)) = self.shortcut.as_mut() {
            f(conv);
            norm.visit_parts(f);
        }
    }

    fn set_stats_mode(&mut self, mode: crate::nn::StatsMode) -> usize {
        let shortcut = self.shortcut.as_mut().map_or(0, |(_, n)| n.set_stats_mode(mode));
        self.norm1.set_stats_mode(mode) + self.norm2.set_stats_mode(mode) + shortcut
    }

    fn buffers(&mut self) -> Vec<(&'static str, BufferMut<'_>)> {
        let key = |prefix: &str, k: &str| -> &'static str {
            match (prefix, k) {
                ("bn1", "running_mean") => "bn1.running_mean",
                ("bn1", "running_var") => "bn1.running_var",
                ("bn1", "running_scale") => "bn1.running_scale",
                ("bn1", _) => "bn1.num_batches_tracked",
                ("bn2", "running_mean") => "bn2.running_mean",
                ("bn2", "running_var") => "bn2.running_var",
                ("bn2", "running_scale") => "bn2.running_scale",
                ("bn2", _) => "bn2.num_batches_tracked",
                (_, "running_mean") => "shortcut.1.running_mean",
                (_, "running_var") => "shortcut.1.running_var",
                (_, "running_scale") => "shortcut.1.running_scale",
                _ => "shortcut.1.num_batches_tracked",
            }
        };
        let mut out = Vec::new();
        for (k, b) in self.norm1.buffers() {
            out.push((key("bn1", k), b));
        }
        for (k, b) in self.norm2.buffers() {
            out.push((key("bn2", k), b));
        }
        if let Some((_, norm)) = self.shortcut.as_mut() {
            for (k, b) in norm.buffers() {
                out.push((key("shortcut.1", k), b));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Without norms (the folded model), the eval forward sums the shortcut in conv2's Winograd
    /// output transform or the direct kernel's epilogue (17 samples and one, 8 to 32 channels):
    /// the same bits as the separate conv, sum and ReLU of the train forward with the same
    /// algorithm (`auto` may pick another one for an eval forward than for training).
    #[test]
    fn fused_residual_sum_equals_the_separate_passes() {
        use crate::nn::conv_algorithm::ConvAlgorithm;
        let mut g = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let norm: NormSpec = "none".parse().unwrap();
        let algorithms = [
            ConvAlgorithm::Winograd(crate::kernels::winograd::WinogradTile::F4),
            ConvAlgorithm::Direct,
        ];
        for ((n, cin, cout, stride, hw), algorithm) in [
            (17, 16, 16, 1, 9),
            (17, 16, 32, 2, 14),
            (1, 16, 16, 1, 9),
            (1, 8, 12, 2, 7),
            (3, 8, 12, 1, 9),
        ]
        .into_iter()
        .flat_map(|case| algorithms.map(|a| (case, a)))
        {
            let out = (hw - 1) / stride + 1;
            let mut block = BasicBlock::new(cin, cout, cout, stride, [out, out], &norm, "b", &mut g).unwrap();
            block.visit_parts(&mut |part| {
                if let Some(conv) = part.downcast_mut::<crate::nn::conv2d::Conv2d>() {
                    conv.algorithm = algorithm;
                }
            });
            let data: Vec<f32> = (0..n * cin * hw * hw).map(|_| g.gen_range(-1.0..1.0)).collect();
            let x = Tensor::from_vec(&[n, cin, hw, hw], data).unwrap();
            let (mut fused, mut separate) = (Tensor::default(), Tensor::default());
            block.forward(&x, &mut fused, Mode::Eval).unwrap();
            assert!(
                block.acts[2].data.is_empty(),
                "{algorithm:?}: the eval forward did not fuse"
            );
            block.forward(&x, &mut separate, Mode::Train).unwrap();
            assert_eq!(fused.shape, separate.shape);
            let bits = |t: &Tensor| t.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&fused),
                bits(&separate),
                "{cin}->{cout} stride {stride} {algorithm:?}"
            );
        }
    }
}
