//! RMSNorm over the trailing dimensions (torch.nn.RMSNorm(normalized_shape = [C] or [C, H, W]),
//! timm's RmsNorm): y = x / √(mean(x²) + eps) · γ per sample, with an elementwise γ and no β.
//! Zhang & Sennrich (2019) drop LayerNorm's centring and claim the same quality for less time.

use crate::error::{Error, Result};
use crate::kernels::rms_norm as k;
use crate::nn::layer::{Layer, Mode, Param, ParamKind};
use crate::onnx::graph::{relu_if, Attr, OnnxGraph};
use crate::onnx::norms::affine_or;
use crate::tensor::Tensor;

pub struct RmsNorm {
    pub eps: f64,
    /// Per-sample shape [C] or [C, H, W]: the normalized shape and γ's.
    pub sample_shape: Vec<usize>,
    pub weight: Option<Param>,
    /// A ReLU fused after the scale (forward and backward).
    pub relu: bool,
    /// 1/RMS per sample of the last forward.
    inv_rms: Vec<f32>,
    /// The backward's dγ and per-task accumulators, sized once (a step allocates nothing).
    dgamma: Vec<f64>,
    tasks: Vec<f32>,
}

impl RmsNorm {
    pub fn new(eps: f64, affine: bool, sample_shape: &[usize], layer: &str) -> Result<Self> {
        if sample_shape.is_empty() || sample_shape.contains(&0) {
            return Err(Error::invalid(format!(
                "{layer}: RMSNorm needs a normalized shape with no zero size, got {sample_shape:?}"
            )));
        }
        if !(eps > 0.0 && eps.is_finite()) {
            return Err(Error::invalid(format!("{layer}: eps must be > 0, got {eps}")));
        }
        Ok(RmsNorm {
            eps,
            sample_shape: sample_shape.to_vec(),
            weight: affine.then(|| Param::new(Tensor::full(sample_shape, 1.0), ParamKind::Norm)),
            relu: false,
            inv_rms: Vec::new(),
            dgamma: Vec::new(),
            tasks: Vec::new(),
        })
    }

    /// The same layer, with a ReLU fused after it when `relu`.
    pub fn with_relu(mut self, relu: bool) -> Self {
        self.relu = relu;
        self
    }

    fn check(&self, x: &Tensor) -> Result<(usize, usize)> {
        if x.shape.len() < 2 || x.shape[1..] != self.sample_shape[..] {
            return Err(Error::shape(
                self.kind(),
                format!("expected input [N, {:?}], got {:?}", self.sample_shape, x.shape),
            ));
        }
        Ok((x.shape[0], x.sample_len()))
    }
}

impl Layer for RmsNorm {
    fn kind(&self) -> &'static str {
        if self.relu {
            "RMSNorm+ReLU"
        } else {
            "RMSNorm"
        }
    }

    // y = x · r · γ, r = 1/√(mean over the sample of x² + eps); the same in both modes.
    fn forward(&mut self, x: &Tensor, y: &mut Tensor, _mode: Mode) -> Result<()> {
        let (n, d) = self.check(x)?;
        y.resize_to(&x.shape)?;
        self.inv_rms.resize(n, 0.0);
        let gamma = self.weight.as_ref().map(|p| p.value.data.as_slice());
        k::rms_norm_forward(&x.data, &mut y.data, d, self.eps, gamma, self.relu, &mut self.inv_rms);
        Ok(())
    }

    fn backward(&mut self, x: &Tensor, y: &Tensor, dy: &Tensor, dx: &mut Tensor) -> Result<()> {
        let (n, d) = self.check(x)?;
        if dy.shape != x.shape || y.shape != x.shape {
            return Err(Error::shape(
                self.kind(),
                format!("gradient {:?} does not match the input {:?}", dy.shape, x.shape),
            ));
        }
        if self.inv_rms.len() != n {
            return Err(Error::invalid(
                "RMSNorm backward needs a forward of the same batch first",
            ));
        }
        dx.resize_to(&x.shape)?;
        self.dgamma.resize(d, 0.0);
        let gamma = self.weight.as_ref().map(|w| w.value.data.as_slice());
        k::rms_norm_backward(
            &x.data,
            &y.data,
            &dy.data,
            &mut dx.data,
            d,
            gamma,
            self.relu,
            &self.inv_rms,
            &mut self.dgamma,
            &mut self.tasks,
        );
        if let Some(w) = self.weight.as_mut() {
            w.grad
                .data
                .iter_mut()
                .zip(&self.dgamma)
                .for_each(|(g, &v)| *g += v as f32);
        }
        Ok(())
    }

    fn visit_params<'a>(&'a mut self, f: &mut dyn FnMut(&'static str, &'a mut Param)) {
        if let Some(w) = self.weight.as_mut() {
            f("weight", w);
        }
    }

    // Opset 21 has no RMSNormalization (opset 23 does): its decomposition,
    // x / Sqrt(ReduceMean(x·x over the sample) + eps) · γ.
    fn export_onnx(&self, g: &mut OnnxGraph, x: &str, name: &str) -> Result<String> {
        let rank = g.rank(x)?;
        let shape = self.sample_shape.clone();
        let axes: Vec<i64> = (1..rank as i64).collect();
        let axes = g.constant_i64(&format!("{name}.axes"), &axes);
        let eps = g.constant(&format!("{name}.eps"), &[], &[self.eps as f32])?;
        let square = g.node("Mul", &[x, x], &[], rank);
        let mean = g.node("ReduceMean", &[&square, &axes], &[("keepdims", Attr::Int(1))], rank);
        let shifted = g.node("Add", &[&mean, &eps], &[], rank);
        let rms = g.node("Sqrt", &[&shifted], &[], rank);
        let normalized = g.node("Div", &[x, &rms], &[], rank);
        let weight = self.weight.as_ref().map(|p| p.value.data.as_slice());
        let scale = g.constant(&format!("{name}.weight"), &shape, &affine_or(weight, &shape, 1.0))?;
        let y = g.node("Mul", &[&normalized, &scale], &[], rank);
        Ok(relu_if(g, y, self.relu))
    }
}
