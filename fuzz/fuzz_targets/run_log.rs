#![no_main]
//! See normlab::fuzz_targets::run_log.

libfuzzer_sys::fuzz_target!(|data: &[u8]| normlab::fuzz_targets::run_log(data));
