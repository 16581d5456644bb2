#![no_main]
//! See normlab::fuzz_targets::cifar.

libfuzzer_sys::fuzz_target!(|data: &[u8]| normlab::fuzz_targets::cifar(data));
