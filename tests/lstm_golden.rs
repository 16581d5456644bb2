//! The LSTM against PyTorch (tests/goldens/lstm.safetensors, scripts/make_goldens.py lstm):
//! nn.LSTM for the plain one, a transcription of the formulas for LN-LSTM and both BN-LSTMs.
//! Output sequence, final states, running statistics and eval-mode output within 1e-5 of the
//! largest magnitude, BPTT gradients of every parameter and of the input within 1e-4.

mod common;

use common::{assert_close, Golden};
use normlab::nn::lstm::{Lstm, RecurrentNorm};
use normlab::nn::{BufferMut, Layer, Mode};
use normlab::Tensor;
use rand::SeedableRng;

#[test]
fn lstm_matches_pytorch_forward_and_backward_through_time() {
    let g = Golden::open("lstm.safetensors");
    let cases: serde_json::Value = serde_json::from_str(&g.metadata()["cases"]).unwrap();
    assert_eq!(cases.as_array().unwrap().len(), 9, "the golden file's cases");
    for (i, case) in cases.as_array().unwrap().iter().enumerate() {
        let p = format!("case{i}.");
        let get = |k: &str| case[k].as_u64().unwrap() as usize;
        let (n, t, input, hidden, layers) = (get("n"), get("steps"), get("input"), get("hidden"), get("layers"));
        let name = case["norm"].as_str().unwrap();
        let norm = match name {
            "none" => RecurrentNorm::None,
            "ln" => RecurrentNorm::Layer { eps: 1e-5 },
            _ => RecurrentNorm::Batch {
                eps: 1e-5,
                momentum: 0.1,
                per_step: name == "bn",
            },
        };
        let what = format!("case {i} ({name}, {layers} layers)");
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let mut lstm = Lstm::new(input, hidden, layers, t, norm, &mut rng).unwrap();
        let mut loaded = 0;
        lstm.visit_params(&mut |k, param| {
            let v = g.tensor(&format!("{p}in.{k}"));
            assert_eq!(param.value.shape, v.shape, "{what}: {k}");
            param.value.data.copy_from_slice(&v.data);
            loaded += 1;
        });
        assert_eq!(
            loaded,
            case["params"].as_array().unwrap().len(),
            "{what}: parameter count"
        );
        let x = g.tensor(&format!("{p}in.x"));
        let mut y = Tensor::default();
        lstm.forward(&x, &mut y, Mode::Train).unwrap();
        let (seq, h_n, c_n) = lstm.outputs(n);
        assert_close(
            &format!("{what}: output sequence"),
            &seq,
            &g.tensor(&format!("{p}out.seq")).data,
            1e-5,
        );
        assert_close(
            &format!("{what}: h_n"),
            &h_n,
            &g.tensor(&format!("{p}out.h_n")).data,
            1e-5,
        );
        assert_close(
            &format!("{what}: c_n"),
            &c_n,
            &g.tensor(&format!("{p}out.c_n")).data,
            1e-5,
        );
        let dy = g.tensor(&format!("{p}in.dy"));
        let mut dx = Tensor::default();
        lstm.backward(&x, &y, &dy, &mut dx).unwrap();
        assert_close(
            &format!("{what}: dx"),
            &dx.data,
            &g.tensor(&format!("{p}out.dx")).data,
            1e-4,
        );
        lstm.visit_params(&mut |k, param| {
            let want = g.tensor(&format!("{p}grad.{k}"));
            assert_close(&format!("{what}: d{k}"), &param.grad.data, &want.data, 1e-4);
        });
        if name.starts_with("bn") {
            for (k, b) in lstm.buffers() {
                if let BufferMut::F32(v) = b {
                    let want = g.tensor(&format!("{p}out.{k}"));
                    assert_eq!(v.shape, want.shape, "{what}: {k}");
                    assert_close(&format!("{what}: {k}"), &v.data, &want.data, 1e-5);
                }
            }
            // Eval mode normalizes with those running statistics.
            lstm.forward(&x, &mut y, Mode::Eval).unwrap();
            assert_close(
                &format!("{what}: eval output"),
                &y.data,
                &g.tensor(&format!("{p}out.eval_h_last")).data,
                1e-5,
            );
        }
    }
}
