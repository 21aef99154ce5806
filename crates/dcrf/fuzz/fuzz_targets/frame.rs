//! Fuzz target: see `dcrf_fuzz::frame`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dcrf_fuzz::frame(data));
