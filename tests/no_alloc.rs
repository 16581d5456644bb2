//! A training step allocates nothing once the first batch has sized every buffer — nothing of
//! normlab's: the gemm crate allocates its packing buffers inside every call, and those are
//! told apart with `inside_gemm`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use normlab::models::{Model, ModelSpec};
use normlab::optim::{Optimizer, OptimizerConfig};
use normlab::train::train_step;
use normlab::Tensor;

struct Counting;
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !normlab::kernels::matmul::inside_gemm() {
            ALLOCS.fetch_add(1, Ordering::SeqCst);
        }
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !normlab::kernels::matmul::inside_gemm() {
            ALLOCS.fetch_add(1, Ordering::SeqCst);
        }
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn training_steps_after_the_first_allocate_nothing() {
    // One thread: rayon's own bookkeeping for cross-thread jobs is not ours to count.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    pool.install(|| {
        for (model, norm) in [
            ("seed-cnn", "bn"),
            ("vgg:8,M,16,M", "gn:4"),
            ("vgg:8,M", "ghost:4"),
            ("vgg:8,M", "layernorm"),
            ("vgg:8,M", "rms"),
            ("mlp", "bn"),
            // 16 images of 50 tokens: 800 rows, so the Linear layers run by blocks.
            ("vit:32,2,2,4", "layernorm"),
        ] {
            let spec = ModelSpec::new(
                normlab::models::Arch::builtin(model),
                normlab::nn::norm_spec::NormSpec::builtin(norm),
                [1, 28, 28],
                10,
            )
            .unwrap();
            let mut m = Model::build(&spec, 0).unwrap();
            let mut opt = Optimizer::new(OptimizerConfig::default());
            let x = Tensor {
                shape: vec![16, 1, 28, 28],
                data: (0..16 * 784).map(|i| (i % 7) as f32 - 3.0).collect(),
            };
            let labels: Vec<u8> = (0..16).map(|i| i % 10).collect();
            for step in 0..3 {
                // clone_from reuses the input's allocation once it has one.
                m.input_mut().clone_from(&x);
                let before = ALLOCS.load(Ordering::SeqCst);
                train_step(&mut m, &mut opt, &labels, 10, 1e-3, 1e-4).unwrap();
                let during = ALLOCS.load(Ordering::SeqCst) - before;
                if step == 2 {
                    assert_eq!(during, 0, "{model} {norm}: step {step} allocated {during} times");
                }
            }
        }
    });
}
