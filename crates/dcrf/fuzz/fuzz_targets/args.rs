//! Fuzz target: see `dcrf_fuzz::args`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dcrf_fuzz::args(data));
