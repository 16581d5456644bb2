//! Writes what a `normlab train --seed S` run of seed-cnn starts from: its initial weights (a
//! safetensors file under PyTorch state-dict names) and its sample order for each epoch (raw
//! little-endian u32, epochs x samples). `bench/same_start_vs_pytorch.py` trains PyTorch from
//! exactly that start, so a difference in accuracy between the two comes from the arithmetic,
//! not from drawing other weights or batches.
//!
//!   cargo run --release --example init_and_order -- SEED EPOCHS SAMPLES OUT_PREFIX

use std::collections::HashMap;

use normlab::checkpoint;
use normlab::data::epoch_order;
use normlab::models::{Model, ModelSpec};

fn main() -> normlab::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [seed, epochs, samples, prefix] = &args[..] else {
        eprintln!("usage: init_and_order SEED EPOCHS SAMPLES OUT_PREFIX");
        std::process::exit(2);
    };
    let parse = |s: &str| -> u64 {
        s.parse().unwrap_or_else(|_| {
            eprintln!("error: '{s}' is not a non-negative integer");
            std::process::exit(2)
        })
    };
    let (seed, epochs, samples) = (parse(seed), parse(epochs) as usize, parse(samples) as usize);
    let spec = ModelSpec::new(
        normlab::models::Arch::builtin("seed-cnn"),
        normlab::nn::norm_spec::NormSpec::builtin("bn"),
        [1, 28, 28],
        10,
    )?;
    let mut model = Model::build(&spec, seed)?;
    let bytes = checkpoint::serialize(&checkpoint::state_dict(&mut model), HashMap::new())?;
    normlab::files::write_atomic(format!("{prefix}.init.safetensors").as_ref(), &bytes)?;
    let mut order = Vec::with_capacity(epochs * samples * 4);
    for epoch in 0..epochs {
        for i in epoch_order(samples, seed, epoch, true) {
            order.extend_from_slice(&(i as u32).to_le_bytes());
        }
    }
    normlab::files::write_atomic(format!("{prefix}.order.u32").as_ref(), &order)?;
    Ok(())
}
