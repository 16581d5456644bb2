//! Within-sample norms: GroupNorm(G), LayerNorm as GroupNorm(1) with a per-channel affine (the
//! GN paper's LN), InstanceNorm2d (G = C, optional affine and running statistics) and
//! PyTorch's nn.LayerNorm with an elementwise affine over the trailing dimensions.

use crate::error::{Error, Result};
use crate::kernels::batch_norm::{self as bnk, ChannelStats, Ncs};
use crate::kernels::group_norm as k;
use crate::nn::layer::{running_buffers, visit_weight_bias, BufferMut, Layer, Mode, Param, ParamKind, StatsMode};
use crate::onnx::graph::{relu_if, Attr, OnnxGraph};
use crate::onnx::norms::{affine_or, batch_normalization};
use crate::tensor::Tensor;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WithinSample {
    /// nn.GroupNorm(G, C).
    Group(usize),
    /// GroupNorm(1, C): normalize over (C, H, W), per-channel affine.
    Layer,
    /// nn.InstanceNorm1d/2d: one set per (n, c).
    Instance,
    /// nn.LayerNorm(normalized_shape = trailing dims), elementwise affine.
    LayerElementwise,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WithinSampleConfig {
    pub kind: WithinSample,
    pub eps: f64,
    pub affine: bool,
    /// InstanceNorm only: keep running statistics (PyTorch's track_running_stats).
    pub track_running_stats: bool,
    /// InstanceNorm only: momentum of the running statistics.
    pub momentum: f64,
}

/// Per-step working state, sized once and reused.
#[derive(Default)]
struct Scratch {
    /// Per (n, group) statistics of the last training forward.
    stats: Vec<ChannelStats>,
    /// Per (n, channel) Σdy and Σdy·x̂.
    channel_sums: Vec<(f64, f64)>,
    /// Running-statistics apply: mean, scale, shift per channel (in the eval-mode backward:
    /// mean, 1/σ and γ).
    mean: Vec<f64>,
    scale: Vec<f32>,
    shift: Vec<f32>,
    /// Per channel Σdy and Σdy·x̂ of the eval-mode backward.
    fixed_sums: Vec<bnk::ChannelSums>,
    /// nn.LayerNorm's form without γ and β: the dγ and dβ the kernel adds into (dropped), and
    /// the backward's per-task accumulators.
    elementwise_grads: (Vec<f32>, Vec<f32>),
    layer_norm_tasks: Vec<f32>,
}

pub struct GroupNorm {
    pub config: WithinSampleConfig,
    /// Channels (dimension 1) of the input.
    pub channels: usize,
    /// Per-sample shape [C] or [C, H, W] the layer was built for.
    pub sample_shape: Vec<usize>,
    pub weight: Option<Param>,
    pub bias: Option<Param>,
    pub running_mean: Option<Tensor>,
    pub running_var: Option<Tensor>,
    pub num_batches_tracked: i64,
    /// A ReLU fused after the affine (forward and backward), when the model has one there.
    pub relu: bool,
    /// InstanceNorm with running statistics: how they are used (see BatchNorm).
    pub stats_mode: StatsMode,
    last_running: bool,
    /// Batches averaged so far in `StatsMode::Accumulate`.
    accumulated: u64,
    scratch: Scratch,
}

impl GroupNorm {
    /// `sample_shape` is [C] after a linear layer or [C, H, W] after a conv.
    pub fn new(config: WithinSampleConfig, sample_shape: &[usize], layer: &str) -> Result<Self> {
        let channels = sample_shape[0];
        if let WithinSample::Group(g) = config.kind {
            if g == 0 || !channels.is_multiple_of(g) {
                return Err(Error::invalid(format!(
                    "{layer}: GroupNorm needs the {channels} channels to split into {g} equal groups (C % G != 0)"
                )));
            }
        }
        if config.kind == WithinSample::Instance && sample_shape.len() < 2 {
            return Err(Error::invalid(format!(
                "{layer}: InstanceNorm needs spatial values per channel; features of shape [{channels}] have one"
            )));
        }
        if !(config.eps > 0.0 && config.eps.is_finite()) {
            return Err(Error::invalid(format!("{layer}: eps must be > 0, got {}", config.eps)));
        }
        if !(0.0..=1.0).contains(&config.momentum) {
            return Err(Error::invalid(format!(
                "{layer}: momentum must be in [0, 1], got {}",
                config.momentum
            )));
        }
        let affine_shape = match config.kind {
            WithinSample::LayerElementwise => sample_shape.to_vec(),
            _ => vec![channels],
        };
        let (weight, bias) = if config.affine {
            (
                Some(Param::new(Tensor::full(&affine_shape, 1.0), ParamKind::Norm)),
                Some(Param::new(Tensor::zeros(&affine_shape), ParamKind::Norm)),
            )
        } else {
            (None, None)
        };
        let tracks = config.kind == WithinSample::Instance && config.track_running_stats;
        Ok(GroupNorm {
            config,
            channels,
            sample_shape: sample_shape.to_vec(),
            weight,
            bias,
            running_mean: tracks.then(|| Tensor::zeros(&[channels])),
            running_var: tracks.then(|| Tensor::full(&[channels], 1.0)),
            num_batches_tracked: 0,
            relu: false,
            stats_mode: StatsMode::Normal,
            last_running: false,
            accumulated: 0,
            scratch: Scratch::default(),
        })
    }

    /// The same layer with a ReLU fused after it.
    pub fn with_relu(mut self) -> Self {
        self.relu = true;
        self
    }

    fn name(&self) -> &'static str {
        if self.relu {
            return match self.config.kind {
                WithinSample::Group(_) => "GroupNorm+ReLU",
                WithinSample::Layer | WithinSample::LayerElementwise => "LayerNorm+ReLU",
                WithinSample::Instance => "InstanceNorm+ReLU",
            };
        }
        match self.config.kind {
            WithinSample::Group(_) => "GroupNorm",
            WithinSample::Layer | WithinSample::LayerElementwise => "LayerNorm",
            WithinSample::Instance if self.sample_shape.len() == 3 => "InstanceNorm2d",
            WithinSample::Instance => "InstanceNorm1d",
        }
    }

    /// (N, C', S', G) of the kernels' view for input `x`.
    fn view(&self, x: &Tensor) -> Result<(usize, usize, usize, usize)> {
        if x.shape.len() < 2 || x.shape[1..] != self.sample_shape[..] {
            return Err(Error::shape(
                self.name(),
                format!("expected input [N, {}], got {:?}", join(&self.sample_shape), x.shape),
            ));
        }
        let (n, c, s) = (x.shape[0], self.channels, x.sample_len() / self.channels);
        Ok(match self.config.kind {
            WithinSample::Group(g) => (n, c, s, g),
            WithinSample::Layer => (n, c, s, 1),
            WithinSample::Instance => (n, c, s, c),
            WithinSample::LayerElementwise => (n, c * s, 1, 1),
        })
    }

    /// InstanceNorm: running = (1-m)·running + m·mean over samples of the per-instance
    /// statistics (variance unbiased over the S values), as PyTorch does.
    fn update_running_stats(&mut self, n: usize, s: usize) {
        let st = &self.scratch.stats;
        let (Some(rm), Some(rv)) = (self.running_mean.as_mut(), self.running_var.as_mut()) else {
            return;
        };
        let m = if self.stats_mode == StatsMode::Accumulate {
            self.accumulated += 1;
            1.0 / self.accumulated as f64
        } else {
            self.config.momentum
        };
        let unbias = s as f64 / (s as f64 - 1.0);
        for ch in 0..self.channels {
            let bm: f64 = (0..n).map(|i| st[i * self.channels + ch].mean).sum::<f64>() / n as f64;
            let bv: f64 = (0..n)
                .map(|i| st[i * self.channels + ch].var as f64 * unbias)
                .sum::<f64>()
                / n as f64;
            rm.data[ch] = ((1.0 - m) * rm.data[ch] as f64 + m * bm) as f32;
            rv.data[ch] = ((1.0 - m) * rv.data[ch] as f64 + m * bv) as f32;
        }
    }
}

fn join(dims: &[usize]) -> String {
    dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
}

impl Layer for GroupNorm {
    fn kind(&self) -> &'static str {
        self.name()
    }

    // Eval mode: GroupNormalization (GN, and LN as GN(1)), LayerNormalization (nn.LayerNorm's
    // elementwise form), InstanceNormalization, or BatchNormalization for InstanceNorm with
    // running statistics. A [N, C] input gets a trailing axis around GroupNormalization.
    fn export_onnx(&self, g: &mut OnnxGraph, x: &str, name: &str) -> Result<String> {
        let rank = g.rank(x)?;
        let c = self.channels;
        let affine = (
            self.weight.as_ref().map(|p| p.value.data.as_slice()),
            self.bias.as_ref().map(|p| p.value.data.as_slice()),
        );
        let eps = ("epsilon", Attr::Float(self.config.eps as f32));
        let y = match self.config.kind {
            WithinSample::Group(_) | WithinSample::Layer => {
                let groups = match self.config.kind {
                    WithinSample::Group(gr) => gr,
                    _ => 1,
                };
                let scale = g.constant(&format!("{name}.weight"), &[c], &affine_or(affine.0, &[c], 1.0))?;
                let bias = g.constant(&format!("{name}.bias"), &[c], &affine_or(affine.1, &[c], 0.0))?;
                let attrs = [eps, ("num_groups", Attr::Int(groups as i64))];
                if rank == 2 {
                    let axes = g.constant_i64(&format!("{name}.axes"), &[2]);
                    let x3 = g.node("Unsqueeze", &[x, &axes], &[], 3);
                    let y3 = g.node("GroupNormalization", &[&x3, &scale, &bias], &attrs, 3);
                    g.node("Squeeze", &[&y3, &axes], &[], 2)
                } else {
                    g.node("GroupNormalization", &[x, &scale, &bias], &attrs, rank)
                }
            }
            WithinSample::LayerElementwise => {
                let shape = self.sample_shape.clone();
                let scale = g.constant(&format!("{name}.weight"), &shape, &affine_or(affine.0, &shape, 1.0))?;
                let bias = g.constant(&format!("{name}.bias"), &shape, &affine_or(affine.1, &shape, 0.0))?;
                g.node(
                    "LayerNormalization",
                    &[x, &scale, &bias],
                    &[eps, ("axis", Attr::Int(1))],
                    rank,
                )
            }
            WithinSample::Instance => match (&self.running_mean, &self.running_var) {
                (Some(rm), Some(rv)) => batch_normalization(g, x, name, affine, (&rm.data, &rv.data), self.config.eps)?,
                _ => {
                    let scale = g.constant(&format!("{name}.weight"), &[c], &affine_or(affine.0, &[c], 1.0))?;
                    let bias = g.constant(&format!("{name}.bias"), &[c], &affine_or(affine.1, &[c], 0.0))?;
                    g.node("InstanceNormalization", &[x, &scale, &bias], &[eps], rank)
                }
            },
        };
        Ok(relu_if(g, y, self.relu))
    }

    // y = (x - mean_set) / sqrt(var_set + eps) * gamma + beta, one set per (n, group)
    fn forward(&mut self, x: &Tensor, y: &mut Tensor, mode: Mode) -> Result<()> {
        let (n, c, s, groups) = self.view(x)?;
        y.resize_to(&x.shape)?;
        let gamma = self.weight.as_ref().map(|p| p.value.data.as_slice());
        let beta = self.bias.as_ref().map(|p| p.value.data.as_slice());
        let (eps, relu) = (self.config.eps, self.relu);
        self.last_running = self.running_mean.is_some() && self.stats_mode.uses_running(mode);
        if let (true, Some(rm), Some(rv)) = (self.last_running, self.running_mean.as_ref(), self.running_var.as_ref()) {
            // InstanceNorm with running statistics normalizes like BatchNorm in eval mode.
            let sc = &mut self.scratch;
            sc.mean.clear();
            sc.scale.clear();
            sc.shift.clear();
            for ch in 0..c {
                sc.mean.push(rm.data[ch] as f64);
                sc.scale
                    .push(bnk::inverse_std(rv.data[ch], eps) * gamma.map_or(1.0, |g| g[ch]));
                sc.shift.push(beta.map_or(0.0, |b| b[ch]));
            }
            let affine = bnk::ChannelAffine {
                mean: &sc.mean,
                scale: &sc.scale,
                shift: &sc.shift,
            };
            bnk::batch_norm_forward_fixed(&x.data, &mut y.data, Ncs::new(n, c, s), affine, relu);
            return Ok(());
        }
        if self.config.kind == WithinSample::Instance && s <= 1 {
            return Err(Error::shape(
                self.name(),
                format!(
                    "Expected more than 1 spatial element when training, got input size {:?}",
                    x.shape
                ),
            ));
        }
        self.scratch.stats.resize(n * groups, ChannelStats::default());
        let stats = &mut self.scratch.stats;
        k::group_norm_forward_train(
            &x.data,
            &mut y.data,
            Ncs::new(n, c, s),
            groups,
            eps,
            gamma,
            beta,
            relu,
            stats,
        );
        if self.stats_mode.updates_running(mode) {
            self.update_running_stats(n, s);
        }
        Ok(())
    }

    fn backward(&mut self, x: &Tensor, y: &Tensor, dy: &Tensor, dx: &mut Tensor) -> Result<()> {
        let (n, c, s, groups) = self.view(x)?;
        if dy.shape != x.shape || y.shape != x.shape {
            return Err(Error::shape(
                self.name(),
                format!("gradient {:?} does not match the input {:?}", dy.shape, x.shape),
            ));
        }
        if self.last_running {
            // Eval-mode backward of the running-statistics affine map, as BatchNorm's; the
            // scratch vectors of the fixed apply hold mean, 1/σ and γ (no allocation per step).
            dx.resize_to(&x.shape)?;
            let (rm, rv) = (self.running_mean.as_ref(), self.running_var.as_ref());
            let (rm, rv) = (&rm.expect("tracked").data, &rv.expect("tracked").data);
            let sc = &mut self.scratch;
            sc.mean.clear();
            sc.mean.extend(rm.iter().map(|&m| m as f64));
            sc.scale.clear();
            sc.scale
                .extend(rv.iter().map(|&v| bnk::inverse_std(v, self.config.eps)));
            sc.shift.clear();
            sc.shift
                .extend((0..c).map(|ch| self.weight.as_ref().map_or(1.0, |w| w.value.data[ch])));
            sc.fixed_sums.resize(c, bnk::ChannelSums::default());
            bnk::batch_norm_backward_fixed(
                &x.data,
                &y.data,
                &dy.data,
                Some(&mut dx.data),
                Ncs::new(n, c, s),
                &sc.mean,
                &sc.scale,
                &sc.shift,
                self.relu,
                &mut sc.fixed_sums,
            );
            if let (Some(w), Some(b)) = (self.weight.as_mut(), self.bias.as_mut()) {
                for (ch, sum) in sc.fixed_sums.iter().enumerate() {
                    w.grad.data[ch] += sum.sum_dy_xhat as f32;
                    b.grad.data[ch] += sum.sum_dy as f32;
                }
            }
            return Ok(());
        }
        if self.scratch.stats.len() != n * groups {
            return Err(Error::invalid(format!(
                "{} backward needs a training forward first",
                self.name()
            )));
        }
        dx.resize_to(&x.shape)?;
        let sc = &mut self.scratch;
        let (eps, relu) = (self.config.eps, self.relu);
        if self.config.kind == WithinSample::LayerElementwise {
            // One channel per element: dγ, dβ summed over the samples by the kernel itself,
            // added straight into the parameters' gradients (into zeroed scratch for a missing
            // parameter).
            let (dg_scratch, db_scratch) = &mut sc.elementwise_grads;
            let zeroed = |v: &mut Vec<f32>| {
                v.clear();
                v.resize(c, 0.0);
            };
            let (gamma, dg) = match self.weight.as_mut() {
                Some(w) => (Some(w.value.data.as_slice()), &mut w.grad.data),
                None => {
                    zeroed(dg_scratch);
                    (None, dg_scratch)
                }
            };
            let db = match self.bias.as_mut() {
                Some(b) => &mut b.grad.data,
                None => {
                    zeroed(db_scratch);
                    db_scratch
                }
            };
            crate::kernels::layer_norm::layer_norm_backward(
                &x.data,
                &y.data,
                &dy.data,
                &mut dx.data,
                Ncs::new(n, c, s),
                eps,
                gamma,
                relu,
                &sc.stats,
                dg,
                db,
                &mut sc.layer_norm_tasks,
            );
            return Ok(());
        }
        let gamma = self.weight.as_ref().map(|p| p.value.data.as_slice());
        sc.channel_sums.resize(n * c, (0.0, 0.0));
        k::group_norm_backward(
            &x.data,
            &y.data,
            &dy.data,
            &mut dx.data,
            Ncs::new(n, c, s),
            groups,
            eps,
            gamma,
            relu,
            &sc.stats,
            Some(&mut sc.channel_sums),
        );
        if let (Some(w), Some(b)) = (self.weight.as_mut(), self.bias.as_mut()) {
            for ch in 0..c {
                let (mut sg, mut sb) = (0.0f64, 0.0f64);
                for i in 0..n {
                    let (sd, sdx) = sc.channel_sums[i * c + ch];
                    sg += sdx;
                    sb += sd;
                }
                w.grad.data[ch] += sg as f32;
                b.grad.data[ch] += sb as f32;
            }
        }
        Ok(())
    }

    fn visit_params<'a>(&'a mut self, f: &mut dyn FnMut(&'static str, &'a mut Param)) {
        visit_weight_bias(self.weight.as_mut(), self.bias.as_mut(), f);
    }

    fn set_stats_mode(&mut self, mode: StatsMode) -> usize {
        if self.running_mean.is_none() {
            return 0;
        }
        self.stats_mode = mode;
        self.accumulated = 0;
        let frozen = matches!(mode, StatsMode::Frozen { affine: true });
        self.visit_params(&mut |_, p| p.frozen = frozen);
        1
    }

    fn buffers(&mut self) -> Vec<(&'static str, BufferMut<'_>)> {
        running_buffers(
            self.running_mean.as_mut(),
            self.running_var.as_mut(),
            "running_var",
            &mut self.num_batches_tracked,
        )
    }
}
