//! Compile-fail tests of `#[dcrf::consumer]`: every error the macro emits, each pointing at the
//! user's code (`tests/ui/*.stderr`), and the one-block form compiling (`tests/ui/pass`).
//!
//! Regenerate the expected output with `TRYBUILD=overwrite` and read every changed file.

#[test]
fn macro_errors() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
    t.pass("tests/ui/pass/*.rs");
}
