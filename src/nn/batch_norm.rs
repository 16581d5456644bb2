//! BatchNorm1d / BatchNorm2d with PyTorch semantics: biased variance to normalize, unbiased
//! variance into running_var, momentum or cumulative averaging, optional affine and
//! running statistics.

use crate::error::{Error, Result};
use crate::kernels::batch_norm as k;
use crate::nn::layer::{BufferMut, Layer, Mode, Param, ParamKind};
use crate::tensor::Tensor;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchNormConfig {
    pub eps: f64,
    /// `None` is PyTorch's momentum=None: a cumulative average with factor 1/num_batches_tracked.
    pub momentum: Option<f64>,
    pub affine: bool,
    pub track_running_stats: bool,
}

impl Default for BatchNormConfig {
    fn default() -> Self {
        BatchNormConfig {
            eps: 1e-5,
            momentum: Some(0.1),
            affine: true,
            track_running_stats: true,
        }
    }
}

impl BatchNormConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.eps > 0.0 && self.eps.is_finite()) {
            return Err(Error::invalid(format!("BatchNorm eps must be > 0, got {}", self.eps)));
        }
        if let Some(m) = self.momentum {
            if !(0.0..=1.0).contains(&m) {
                return Err(Error::invalid(format!("BatchNorm momentum must be in [0, 1], got {m}")));
            }
        }
        Ok(())
    }
}

/// What the last training forward leaves for backward.
#[derive(Default)]
struct Cache {
    input: Tensor,
    mean: Vec<f32>,
    invstd: Vec<f32>,
}

pub struct BatchNorm {
    /// 1 for BatchNorm1d ([N, C] or [N, C, L]), 2 for BatchNorm2d ([N, C, H, W]).
    pub dims: usize,
    pub channels: usize,
    pub config: BatchNormConfig,
    pub weight: Option<Param>,
    pub bias: Option<Param>,
    pub running_mean: Option<Tensor>,
    pub running_var: Option<Tensor>,
    pub num_batches_tracked: i64,
    cache: Cache,
}

impl BatchNorm {
    pub fn new(dims: usize, channels: usize, config: BatchNormConfig) -> Self {
        let (weight, bias) = if config.affine {
            (
                Some(Param::new(Tensor::full(&[channels], 1.0), ParamKind::Norm)),
                Some(Param::new(Tensor::zeros(&[channels]), ParamKind::Norm)),
            )
        } else {
            (None, None)
        };
        let (running_mean, running_var) = if config.track_running_stats {
            (Some(Tensor::zeros(&[channels])), Some(Tensor::full(&[channels], 1.0)))
        } else {
            (None, None)
        };
        BatchNorm {
            dims,
            channels,
            config,
            weight,
            bias,
            running_mean,
            running_var,
            num_batches_tracked: 0,
            cache: Cache::default(),
        }
    }

    fn name(&self) -> &'static str {
        if self.dims == 1 {
            "BatchNorm1d"
        } else {
            "BatchNorm2d"
        }
    }

    /// (N, C, S) of the input, checked against the layer's dimensionality and channels.
    fn view(&self, x: &Tensor) -> Result<(usize, usize, usize)> {
        let ok_rank = match self.dims {
            1 => matches!(x.shape.len(), 2 | 3),
            _ => x.shape.len() == 4,
        };
        let want = if self.dims == 1 {
            "[N, C] or [N, C, L]"
        } else {
            "[N, C, H, W]"
        };
        if !ok_rank {
            return Err(Error::shape(
                self.name(),
                format!("expected input {want}, got {:?}", x.shape),
            ));
        }
        if x.shape[1] != self.channels {
            return Err(Error::shape(
                self.name(),
                format!("expected {} channels, got input {:?}", self.channels, x.shape),
            ));
        }
        Ok((x.shape[0], x.shape[1], x.shape[2..].iter().product()))
    }

    /// running = (1 - f)·running + f·batch, with the unbiased variance var·m/(m-1).
    fn update_running_stats(&mut self, mean: &[f32], var: &[f32], m: usize) {
        let (Some(rm), Some(rv)) = (self.running_mean.as_mut(), self.running_var.as_mut()) else {
            return;
        };
        self.num_batches_tracked += 1;
        let f = match self.config.momentum {
            Some(m) => m,
            None => 1.0 / self.num_batches_tracked as f64,
        };
        let unbias = m as f64 / (m as f64 - 1.0);
        for c in 0..self.channels {
            rm.data[c] = ((1.0 - f) * rm.data[c] as f64 + f * mean[c] as f64) as f32;
            rv.data[c] = ((1.0 - f) * rv.data[c] as f64 + f * var[c] as f64 * unbias) as f32;
        }
    }
}

impl Layer for BatchNorm {
    fn kind(&self) -> &'static str {
        self.name()
    }

    // y = (x - mean) / sqrt(var + eps) * gamma + beta
    fn forward(&mut self, x: Tensor, mode: Mode) -> Result<Tensor> {
        let (n, c, s) = self.view(&x)?;
        let use_batch_stats = mode == Mode::Train || !self.config.track_running_stats;
        let mut mean = vec![0.0f32; c];
        let mut var = vec![0.0f32; c];
        if use_batch_stats {
            if n * s <= 1 {
                return Err(Error::shape(
                    self.name(),
                    format!(
                        "Expected more than 1 value per channel when training, got input size {:?}",
                        x.shape
                    ),
                ));
            }
            k::batch_norm_stats(&x.data, n, c, s, &mut mean, &mut var);
            if mode == Mode::Train {
                self.update_running_stats(&mean, &var, n * s);
            }
        } else {
            mean.copy_from_slice(&self.running_mean.as_ref().expect("tracked").data);
            var.copy_from_slice(&self.running_var.as_ref().expect("tracked").data);
        }
        let mut invstd = vec![0.0f32; c];
        k::inverse_std(&var, self.config.eps, &mut invstd);
        let mut y = Tensor::zeros(&x.shape);
        let gamma = self.weight.as_ref().map(|p| p.value.data.as_slice());
        let beta = self.bias.as_ref().map(|p| p.value.data.as_slice());
        k::batch_norm_apply(&x.data, n, c, s, &mean, &invstd, gamma, beta, &mut y.data);
        if mode == Mode::Train {
            self.cache.input = x;
            self.cache.mean = mean;
            self.cache.invstd = invstd;
        }
        Ok(y)
    }

    // dx = gamma·invstd/m · (m·dy - Σdy - x̂·Σdy·x̂),  dgamma = Σdy·x̂,  dbeta = Σdy
    fn backward(&mut self, mut dy: Tensor) -> Result<Tensor> {
        let x = &self.cache.input;
        if x.is_empty() || dy.shape != x.shape {
            return Err(Error::shape(
                self.name(),
                format!("gradient {:?} does not match the last forward", dy.shape),
            ));
        }
        let (n, c, s) = self.view(x)?;
        let (mean, invstd) = (&self.cache.mean, &self.cache.invstd);
        let mut sum_dy = vec![0.0f64; c];
        let mut sum_dy_xhat = vec![0.0f64; c];
        k::batch_norm_grad_sums(&x.data, &dy.data, n, c, s, mean, invstd, &mut sum_dy, &mut sum_dy_xhat);
        let gamma = self.weight.as_ref().map(|p| p.value.data.as_slice());
        // Backward follows a training forward, which always normalizes with batch statistics.
        k::batch_norm_backward_input(
            &x.data,
            &mut dy.data,
            n,
            c,
            s,
            mean,
            invstd,
            gamma,
            &sum_dy,
            &sum_dy_xhat,
        );
        if let (Some(w), Some(b)) = (self.weight.as_mut(), self.bias.as_mut()) {
            for ch in 0..c {
                w.grad.data[ch] += sum_dy_xhat[ch] as f32;
                b.grad.data[ch] += sum_dy[ch] as f32;
            }
        }
        Ok(dy)
    }

    fn params(&mut self) -> Vec<(&'static str, &mut Param)> {
        let mut v = Vec::new();
        if let Some(w) = self.weight.as_mut() {
            v.push(("weight", w));
        }
        if let Some(b) = self.bias.as_mut() {
            v.push(("bias", b));
        }
        v
    }

    fn buffers(&mut self) -> Vec<(&'static str, BufferMut<'_>)> {
        match (self.running_mean.as_mut(), self.running_var.as_mut()) {
            (Some(rm), Some(rv)) => vec![
                ("running_mean", BufferMut::F32(rm)),
                ("running_var", BufferMut::F32(rv)),
                ("num_batches_tracked", BufferMut::I64(&mut self.num_batches_tracked)),
            ],
            _ => Vec::new(),
        }
    }
}
