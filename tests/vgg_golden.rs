//! Training steps of vgg:16,16,M,32,32,M,M with BN against float64 PyTorch
//! (tests/goldens/vgg_steps.safetensors), with every convolution algorithm (the measured choice
//! for this batch of 8 is the direct forward where the CPU has AVX-512, else im2col). Each step starts
//! from PyTorch's parameters and running statistics before it (rounded to f32 on both sides),
//! so the check is the step itself: the loss within 1e-4, every gradient and the running
//! statistics after it within 1e-4 of the largest reference value.

mod common;

use common::{assert_close, golden_step, load_state, Golden};
use normlab::models::{Model, ModelSpec};
use normlab::nn::conv2d::ConvAlgorithm;
use normlab::nn::BufferMut;

fn run(algorithm: &str) {
    let g = Golden::open("vgg_steps.safetensors");
    let meta = g.metadata();
    let spec = ModelSpec::new(
        meta["model"].parse::<normlab::models::Arch>().unwrap(),
        normlab::nn::norm_spec::NormSpec::builtin("bn"),
        [1, 28, 28],
        10,
    )
    .unwrap();
    let mut model = Model::build(&spec, 0).unwrap();
    assert_eq!(
        model
            .net
            .set_conv_algorithm(algorithm.parse::<ConvAlgorithm>().unwrap()),
        4
    );
    let steps: usize = meta["steps"].parse().unwrap();
    for s in 0..steps {
        load_state(&mut model, &g, &format!("before{s}"));
        let loss = golden_step(&mut model, &g, s);
        let want = g.f64s(&format!("loss{s}"))[0];
        assert!(
            (loss - want).abs() <= 1e-4 * want.abs().max(1.0),
            "{algorithm} step {s}: loss {loss} vs {want}"
        );
        for (name, p) in model.net.named_params() {
            let want = g.tensor(&format!("grad{s}.{name}")).data;
            assert_close(&format!("{algorithm} step {s} d{name}"), &p.grad.data, &want, 1e-4);
        }
        for (name, b) in model.net.named_buffers() {
            match b {
                BufferMut::F32(t) => {
                    let want = g.tensor(&format!("after{s}.{name}")).data;
                    assert_close(&format!("{algorithm} step {s} {name}"), &t.data, &want, 1e-4)
                }
                BufferMut::I64(v) => assert_eq!(*v, g.i64s(&format!("after{s}.{name}"))[0]),
            }
        }
    }
}

#[test]
fn vgg_steps_match_pytorch_with_im2col() {
    run("im2col");
}

#[test]
fn vgg_steps_match_pytorch_with_winograd_2x2() {
    run("winograd2");
}

#[test]
fn vgg_steps_match_pytorch_with_winograd_4x4() {
    run("winograd4");
}

#[test]
fn vgg_steps_match_pytorch_with_the_direct_forward() {
    run("direct");
}

#[test]
fn vgg_steps_match_pytorch_with_output_channels_in_the_lanes() {
    run("direct-lanes");
}

#[test]
fn vgg_steps_match_pytorch_with_the_measured_choice() {
    run("auto");
}
