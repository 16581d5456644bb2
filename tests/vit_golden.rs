//! The Vision Transformer against float64 PyTorch in timm's layout (tests/goldens/vit.safetensors,
//! from scripts/make_goldens.py): the attention's forward and backward, one block pre- and
//! post-norm with every norm it takes (output, input and parameter gradients, BN's running
//! statistics), and two SGD steps of whole small ViTs, each step from PyTorch's parameters
//! before it (loss within 1e-4, every gradient within 1e-4 of the largest reference value).

mod common;

use common::{assert_close, assert_close_scaled, load_state, Golden};
use normlab::kernels::attention::{attention_backward, attention_forward, attention_scratch_len, AttentionShape};
use normlab::models::{Arch, Model, ModelSpec};
use normlab::nn::norm_spec::NormSpec;
use normlab::nn::vit::block::Block;
use normlab::nn::vit::Placement;
use normlab::nn::{BufferMut, Layer, Mode};
use normlab::tensor::Tensor;
use rand::SeedableRng;

fn numbers(meta: &str) -> Vec<usize> {
    serde_json::from_str(meta).unwrap()
}

/// The norm spec for the goldens' norm names (PyTorch's modules as the script builds them).
fn norm(name: &str) -> NormSpec {
    NormSpec::builtin(match name {
        "layernorm" => "layernorm:eps=1e-6",
        "rms" => "rms",
        "bn" => "bn",
        _ => "none",
    })
}

/// The largest magnitude among the golden's tensors whose names start with `prefix`.
fn largest(g: &Golden, prefix: &str) -> f32 {
    g.names()
        .iter()
        .filter(|n| n.starts_with(prefix))
        .map(|n| g.tensor(n).max_abs())
        .fold(0.0, f32::max)
}

#[test]
fn attention_forward_and_backward_match_pytorch() {
    let g = Golden::open("vit.safetensors");
    let [batch, tokens, heads, head_dim] = numbers(&g.metadata()["attention"])[..] else {
        panic!("attention metadata")
    };
    let s = AttentionShape {
        batch,
        tokens,
        heads,
        head_dim,
    };
    let qkv = g.tensor("attention.qkv").data;
    let mut out = vec![0.0; batch * tokens * s.dim()];
    let mut probs = vec![0.0; s.probs_len()];
    let mut scratch = vec![f32::NAN; attention_scratch_len(s)];
    attention_forward(&qkv, &mut out, &mut probs, &mut scratch, s);
    assert_close("attention out", &out, &g.tensor("attention.out").data, 1e-5);
    let mut dqkv = vec![f32::NAN; qkv.len()];
    scratch.fill(f32::NAN);
    attention_backward(
        &qkv,
        &probs,
        &g.tensor("attention.dout").data,
        &mut dqkv,
        &mut scratch,
        s,
    );
    assert_close("attention dqkv", &dqkv, &g.tensor("attention.dqkv").data, 1e-5);
}

#[test]
fn one_block_pre_and_post_matches_pytorch_with_every_norm() {
    let g = Golden::open("vit.safetensors");
    let meta = g.metadata();
    let [batch, tokens, dim, heads, ratio] = numbers(&meta["block"])[..] else {
        panic!("block metadata")
    };
    let norms: Vec<String> = serde_json::from_str(&meta["norms"]).unwrap();
    for name in &norms {
        for placement in [Placement::Pre, Placement::Post] {
            let key = format!("block.{name}.{placement}");
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
            let mut block = Block::new(
                dim,
                heads,
                tokens,
                dim * ratio,
                &norm(name),
                placement,
                "block",
                &mut rng,
            )
            .unwrap();
            for (k, p) in block.params() {
                p.value = g.tensor(&format!("{key}.before.{k}"));
            }
            for (k, b) in block.buffers() {
                match b {
                    BufferMut::F32(t) => *t = g.tensor(&format!("{key}.before.{k}")),
                    BufferMut::I64(v) => *v = g.i64s(&format!("{key}.before.{k}"))[0],
                }
            }
            let x = g.tensor(&format!("{key}.x"));
            let mut y = Tensor::default();
            block.forward(&x, &mut y, Mode::Train).unwrap();
            assert_eq!(y.shape, [batch * tokens, dim]);
            assert_close(&format!("{key} y"), &y.data, &g.tensor(&format!("{key}.y")).data, 1e-5);
            let mut dx = Tensor::default();
            block
                .backward(&x, &y, &g.tensor(&format!("{key}.dy")), &mut dx)
                .unwrap();
            assert_close(
                &format!("{key} dx"),
                &dx.data,
                &g.tensor(&format!("{key}.dx")).data,
                1e-4,
            );
            // A gradient that is zero analytically (a bias feeding BN over the rows) is float32
            // noise at the scale of the gradients flowing in: 1e-2 of the largest one.
            let floor = 1e-2 * largest(&g, &format!("{key}.grad."));
            for (k, p) in block.params() {
                let want = g.tensor(&format!("{key}.grad.{k}")).data;
                assert_close_scaled(&format!("{key} d{k}"), &p.grad.data, &want, 1e-4, floor);
            }
            for (k, b) in block.buffers() {
                match b {
                    BufferMut::F32(t) => assert_close(
                        &format!("{key} {k}"),
                        &t.data,
                        &g.tensor(&format!("{key}.after.{k}")).data,
                        1e-5,
                    ),
                    BufferMut::I64(v) => assert_eq!(*v, g.i64s(&format!("{key}.after.{k}"))[0], "{key} {k}"),
                }
            }
        }
    }
}

#[test]
fn two_sgd_steps_of_small_vits_match_pytorch() {
    let g = Golden::open("vit.safetensors");
    let cases: Vec<(String, String, String)> = serde_json::from_str(&g.metadata()["steps"]).unwrap();
    for (i, (model, norm_name, _)) in cases.iter().enumerate() {
        let spec = ModelSpec::new(model.parse::<Arch>().unwrap(), norm(norm_name), [1, 28, 28], 10).unwrap();
        let mut net = Model::build(&spec, 0).unwrap();
        let what = format!("{model} {norm_name}");
        for s in 0..2 {
            let pre = format!("steps{i}");
            load_state(&mut net, &g, &format!("{pre}.before{s}"));
            let y: Vec<u8> = g.i64s(&format!("{pre}.y{s}")).iter().map(|&v| v as u8).collect();
            net.net.zero_grad();
            *net.input_mut() = g.tensor(&format!("{pre}.x{s}"));
            net.forward(Mode::Train).unwrap();
            let (logits, dlogits) = net.net.output_and_grad();
            dlogits.resize_to(&logits.shape).unwrap();
            let (loss, _) = normlab::kernels::loss::softmax_cross_entropy(&logits.data, &y, 10, &mut dlogits.data);
            net.backward().unwrap();
            let want = g.f64s(&format!("{pre}.loss{s}"))[0];
            assert!(
                (loss - want).abs() <= 1e-4 * want.abs().max(1.0),
                "{what} step {s}: loss {loss} vs {want}"
            );
            let floor = 1e-2 * largest(&g, &format!("{pre}.grad{s}."));
            for (name, p) in net.net.named_params() {
                let want = g.tensor(&format!("{pre}.grad{s}.{name}")).data;
                assert_close_scaled(&format!("{what} step {s} d{name}"), &p.grad.data, &want, 1e-4, floor);
            }
            for (name, b) in net.net.named_buffers() {
                match b {
                    BufferMut::F32(t) => {
                        let want = g.tensor(&format!("{pre}.after{s}.{name}")).data;
                        assert_close(&format!("{what} step {s} {name}"), &t.data, &want, 1e-4)
                    }
                    BufferMut::I64(v) => assert_eq!(*v, g.i64s(&format!("{pre}.after{s}.{name}"))[0]),
                }
            }
        }
    }
}
