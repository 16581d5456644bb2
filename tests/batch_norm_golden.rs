//! BatchNorm1d/2d against PyTorch: train forward, backward, buffer updates, eval forward.

mod common;

use common::{assert_close, assert_close_scaled, Golden};
use normlab::nn::batch_norm::{BatchNorm, BatchNormConfig};
use normlab::nn::layer::{backward_once, forward_once};
use normlab::nn::{Layer, Mode};
use serde_json::Value;

#[test]
fn batch_norm_matches_pytorch() {
    let g = Golden::open("batch_norm.safetensors");
    let cases: Vec<Value> = serde_json::from_str(&g.metadata()["cases"]).unwrap();
    assert!(cases.len() >= 30);
    for (i, case) in cases.iter().enumerate() {
        let p = |k: &str| format!("case{i}.{k}");
        let cfg = BatchNormConfig {
            eps: case["eps"].as_f64().unwrap(),
            momentum: case["momentum"].as_f64(),
            affine: case["affine"].as_bool().unwrap(),
            track_running_stats: case["track"].as_bool().unwrap(),
            ..Default::default()
        };
        let what = format!("case {i} {} {:?}", case["name"], case["shape"]);
        let dims = case["dims"].as_u64().unwrap() as usize;
        let x = g.tensor(&p("x"));
        let mut bn = BatchNorm::new(dims, x.shape[1], cfg);
        if cfg.affine {
            bn.weight.as_mut().unwrap().value = g.tensor(&p("weight"));
            bn.bias.as_mut().unwrap().value = g.tensor(&p("bias"));
        }
        if cfg.track_running_stats {
            bn.running_mean = Some(g.tensor(&p("running_mean_in")));
            bn.running_var = Some(g.tensor(&p("running_var_in")));
            bn.num_batches_tracked = 3;
        }
        let y = forward_once(&mut bn, &x, Mode::Train).unwrap();
        assert_close(&format!("{what} y_train"), &y.data, &g.tensor(&p("y_train")).data, 1e-5);
        let dy = g.tensor(&p("dy"));
        let dx = backward_once(&mut bn, &x, &y, &dy).unwrap();
        assert_close_scaled(
            &format!("{what} dx"),
            &dx.data,
            &g.tensor(&p("dx")).data,
            1e-4,
            dy.max_abs(),
        );
        if cfg.affine {
            let dw = &bn.weight.as_ref().unwrap().grad.data;
            assert_close(&format!("{what} dweight"), dw, &g.tensor(&p("dweight")).data, 1e-4);
            let db = &bn.bias.as_ref().unwrap().grad.data;
            assert_close(&format!("{what} dbias"), db, &g.tensor(&p("dbias")).data, 1e-4);
        }
        if cfg.track_running_stats {
            let rm = &bn.running_mean.as_ref().unwrap().data;
            assert_close(
                &format!("{what} running_mean"),
                rm,
                &g.tensor(&p("running_mean_out")).data,
                1e-5,
            );
            let rv = &bn.running_var.as_ref().unwrap().data;
            assert_close(
                &format!("{what} running_var"),
                rv,
                &g.tensor(&p("running_var_out")).data,
                1e-5,
            );
            assert_eq!(
                bn.num_batches_tracked,
                g.i64s(&p("num_batches_tracked_out"))[0],
                "{what}"
            );
        } else {
            assert!(
                bn.running_mean.is_none() && bn.buffers().is_empty(),
                "{what}: no buffers when not tracking"
            );
        }
        let ye = forward_once(&mut bn, &g.tensor(&p("x_eval")), Mode::Eval).unwrap();
        assert_close(&format!("{what} y_eval"), &ye.data, &g.tensor(&p("y_eval")).data, 1e-5);
    }
}

#[test]
fn one_value_per_channel_in_training_is_an_error() {
    let mut bn1 = BatchNorm::new(1, 4, BatchNormConfig::default());
    let err = forward_once(&mut bn1, &normlab::Tensor::zeros(&[1, 4]), Mode::Train)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("Expected more than 1 value per channel when training"),
        "{err}"
    );
    let mut bn2 = BatchNorm::new(2, 3, BatchNormConfig::default());
    assert!(forward_once(&mut bn2, &normlab::Tensor::zeros(&[1, 3, 1, 1]), Mode::Train).is_err());
    // Eval mode with running statistics is fine on a single value.
    assert!(forward_once(&mut bn2, &normlab::Tensor::zeros(&[1, 3, 1, 1]), Mode::Eval).is_ok());
    // Wrong rank and channel count are errors, not panics.
    assert!(forward_once(&mut bn2, &normlab::Tensor::zeros(&[2, 3]), Mode::Train).is_err());
    assert!(forward_once(&mut bn2, &normlab::Tensor::zeros(&[2, 5, 2, 2]), Mode::Train).is_err());
}
