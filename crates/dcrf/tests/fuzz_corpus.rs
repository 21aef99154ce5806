//! Replays every committed fuzz corpus file (`crates/dcrf/fuzz/corpus/<target>/`) through the
//! fuzz targets' own harnesses, so a regression shows up in `cargo test` without cargo-fuzz.
//! Inputs that once crashed a target are kept in the corpus and also below, by name.

#[path = "../fuzz/src/lib.rs"]
#[allow(missing_docs, missing_debug_implementations)]
mod harness;

use std::path::Path;

fn replay(target: &str) -> usize {
    let run = harness::by_name(target).expect("a harness");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("a corpus entry").path())
        .collect();
    files.sort();
    for file in &files {
        let data = std::fs::read(file).expect("a corpus file");
        let outcome = std::panic::catch_unwind(|| run(&data));
        assert!(
            outcome.is_ok(),
            "{target}: {} failed; input: {:?}",
            file.display(),
            String::from_utf8_lossy(&data)
        );
    }
    files.len()
}

#[test]
fn frame_corpus() {
    assert!(replay("frame") >= 10);
}

#[test]
fn multiplex_corpus() {
    assert!(replay("multiplex") >= 10);
}

#[test]
fn args_corpus() {
    assert!(replay("args") >= 10);
}
