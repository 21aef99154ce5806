//! Fuzz target: see `dcrf_fuzz::multiplex`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dcrf_fuzz::multiplex(data));
