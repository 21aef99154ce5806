#!/usr/bin/env bash
# Coverage-guided fuzzing (libFuzzer, via cargo-fuzz) of the frame parser and dispatch, the
# multiplex envelope and argument decoding: the targets in crates/dcrf/fuzz/fuzz_targets/, their
# harnesses in crates/dcrf/fuzz/src/lib.rs.
#
#   scripts/fuzz.sh [SECONDS]      # each target for SECONDS (default 60); CI runs it with 15
#   scripts/fuzz.sh 300 frame      # one target
#
# Toolchain: cargo-fuzz passes nightly-only flags to rustc (-Z sanitizer, the sancov passes).
# RUSTC_BOOTSTRAP=1 lets a stable rustc accept them; nothing else is built with it.
# No sanitizer (-s none): the targets are safe Rust (the workspace forbids unsafe code), so
# AddressSanitizer would only add build time; panics, overflow checks (debug assertions are on)
# and timeouts are what libFuzzer reports.
#
# New inputs go to a scratch directory (crates/dcrf/fuzz/target/corpus/<target>); the committed
# corpus (crates/dcrf/fuzz/corpus/<target>) is only read. To add to it, minimize first:
#   cargo fuzz cmin -s none <target> corpus/<target>   (in crates/dcrf/fuzz, with RUSTC_BOOTSTRAP=1)
# A crash leaves its input in crates/dcrf/fuzz/artifacts/<target>/ and fails the script; copy it
# into the corpus, where crates/dcrf/tests/fuzz_corpus.rs replays it under `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/../crates/dcrf/fuzz"

seconds="${1:-60}"
shift || true
targets=("$@")
[[ ${#targets[@]} -eq 0 ]] && targets=(frame multiplex args)

CARGO_FUZZ_VERSION=0.13.1
if ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
  cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi

export RUSTC_BOOTSTRAP=1
# Its own build directory: the fuzz build's flags differ from every other build's.
export CARGO_TARGET_DIR="$PWD/target"
unset CARGO_PROFILE_DEV_DEBUG CARGO_PROFILE_TEST_DEBUG
opts=(-s none --debug-assertions)

start=$(date +%s)
cargo fuzz build "${opts[@]}"
echo "fuzz build: $(($(date +%s) - start)) s"

for target in "${targets[@]}"; do
  scratch="target/corpus/$target"
  mkdir -p "$scratch"
  echo "== $target: ${seconds} s"
  # -timeout: one input taking over 10 s is a hang; -rss_limit_mb: a leak or a blow-up.
  cargo fuzz run "${opts[@]}" "$target" "$scratch" "corpus/$target" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -dict=dcrf.dict -print_final_stats=1 2>&1 \
    | grep -vE '^#[0-9]+\s+(NEW|REDUCE|pulse)' || { echo "fuzz target $target failed" >&2; exit 1; }
done
echo "fuzzing: $(($(date +%s) - start)) s in all"
