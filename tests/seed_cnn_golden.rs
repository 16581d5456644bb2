//! Full training steps of seed-cnn against PyTorch: same initial weights and batches give the
//! same losses and updated parameters and buffers, for SGD (nesterov), Adam and AdamW.

mod common;

use common::{assert_close, golden_step, load_state, Golden};
use normlab::models::{Model, ModelSpec};
use normlab::nn::BufferMut;
use normlab::optim::{Optimizer, OptimizerConfig, OptimizerKind};

fn run(kind: OptimizerKind, lr: f64, weight_decay: f64, nesterov: bool, prefix: &str) {
    let g = Golden::open("seed_cnn_steps.safetensors");
    let spec = ModelSpec::new(
        normlab::models::Arch::builtin("seed-cnn"),
        normlab::nn::norm_spec::NormSpec::builtin("bn"),
        [1, 28, 28],
        10,
    )
    .unwrap();
    let mut model = Model::build(&spec, 0).unwrap();
    load_state(&mut model, &g, "init");
    let cfg = OptimizerConfig {
        kind,
        lr,
        momentum: 0.9,
        weight_decay,
        nesterov,
        ..OptimizerConfig::default()
    };
    let mut opt = Optimizer::new(cfg);
    let want_losses = g.f64s(&format!("{prefix}.losses"));
    for (s, want) in want_losses.iter().enumerate() {
        let loss = golden_step(&mut model, &g, s);
        assert!(
            (loss - want).abs() <= 1e-4 * want.abs().max(1.0),
            "{prefix} step {s}: loss {loss} vs {want}"
        );
        opt.step(&mut model.net, lr);
    }
    for (name, p) in model.net.named_params() {
        assert_close(
            &format!("{prefix} {name}"),
            &p.value.data,
            &g.tensor(&format!("{prefix}.{name}")).data,
            1e-4,
        );
    }
    for (name, b) in model.net.named_buffers() {
        match b {
            BufferMut::F32(t) => assert_close(
                &format!("{prefix} {name}"),
                &t.data,
                &g.tensor(&format!("{prefix}.{name}")).data,
                1e-4,
            ),
            BufferMut::I64(v) => assert_eq!(*v, g.i64s(&format!("{prefix}.{name}"))[0]),
        }
    }
}

#[test]
fn sgd_steps_match_pytorch() {
    run(OptimizerKind::Sgd, 0.05, 0.05, true, "sgd");
}

#[test]
fn adam_steps_match_pytorch() {
    run(OptimizerKind::Adam, 1e-3, 0.5, false, "adam");
}

#[test]
fn adamw_steps_match_pytorch() {
    run(OptimizerKind::Adamw, 1e-2, 0.5, false, "adamw");
}
