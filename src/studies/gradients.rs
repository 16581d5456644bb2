//! The articles' central explanation of BN: it keeps gradients from vanishing or exploding. A
//! probe measures each conv/linear layer's weight-gradient norm ‖∂L/∂W‖ on one fixed batch, at
//! initialization and for a trained model, so the learning-rate study can compare the spread
//! of those norms across layers with and without BN.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::data::{Dataset, InputNorm};
use crate::error::Result;
use crate::models::{Model, ModelSpec};
use crate::nn::ParamKind;
use crate::train::TrainConfig;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GradientNorms {
    pub norm: String,
    pub seed: u64,
    /// "init" or "final".
    pub when: String,
    /// (layer weight name, ‖∂L/∂W‖) in network order.
    pub layers: Vec<(String, f64)>,
}

/// ‖∂L/∂W‖ of every conv/linear weight of `model` on the first 128 images of `data`.
pub fn weight_gradient_norms(model: &mut Model, data: &Dataset, norm: InputNorm) -> Result<Vec<(String, f64)>> {
    let idx: Vec<usize> = (0..data.len().min(128)).collect();
    let mut labels = Vec::new();
    data.batch(&idx, norm, model.input_mut(), &mut labels)?;
    crate::train::loss_and_grad(model, &labels, data.classes)?;
    Ok(model
        .net
        .named_params()
        .into_iter()
        .filter(|(_, p)| p.kind == ParamKind::Weight)
        .map(|(name, p)| {
            let n = p.grad.data.iter().map(|&g| (g as f64) * (g as f64)).sum::<f64>().sqrt();
            (name, n)
        })
        .collect())
}

/// The probe at initialization (the run's seed and init scale) and, when given, for the
/// trained model in `final_model`.
pub fn probe(
    config: &TrainConfig,
    seed: u64,
    final_model: Option<&Path>,
    data: &Dataset,
    norm: InputNorm,
) -> Result<Vec<GradientNorms>> {
    let spec = ModelSpec::new(config.model.clone(), config.norm, data.shape, data.classes)?;
    let mut model = Model::build(&spec, seed)?;
    if let Some(k) = config.init_scale {
        model.net.visit_params(&mut |p| {
            if p.kind == ParamKind::Weight {
                p.value.data.iter_mut().for_each(|w| *w *= k);
            }
        });
    }
    let mut out = vec![GradientNorms {
        norm: config.norm.short(),
        seed,
        when: "init".into(),
        layers: weight_gradient_norms(&mut model, data, norm)?,
    }];
    if let Some(path) = final_model {
        let (mut trained, meta) = crate::checkpoint::load_model(path)?;
        out.push(GradientNorms {
            norm: config.norm.short(),
            seed,
            when: "final".into(),
            layers: weight_gradient_norms(&mut trained, data, meta.input_norm)?,
        });
    }
    Ok(out)
}
