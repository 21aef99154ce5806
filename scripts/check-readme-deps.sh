#!/usr/bin/env bash
# Checks that the README's "Use it in your crate" block is all a user needs: type-checks
# (`cargo check`, build scripts included) every example of crates/dcrf/examples/ as a binary of
# a new crate, outside the workspace, whose [dependencies] are exactly that ```toml block. dcrf
# is not published, so a [patch.crates-io] section points dcrf and dcrf-macros at this
# checkout. The workspace's Cargo.lock is copied in, so the versions are the ones tested here,
# and the target directory defaults to the workspace's, so checked dependencies are reused.
# Fails if any example does not compile. The examples are built, run and tested with the
# workspace (crates/dcrf/tests/examples.rs).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"

# The first ```toml block of the README that has a `[dependencies]` line, verbatim.
deps="$(awk '
  /^```toml[[:space:]]*$/ { inblock = 1; block = ""; found = 0; next }
  inblock && /^```[[:space:]]*$/ { if (found) { printf "%s", block; exit } inblock = 0; next }
  inblock { block = block $0 "\n"; if ($0 ~ /^\[dependencies\][[:space:]]*$/) found = 1 }
' "$root/README.md")"
if [[ -z "$deps" ]]; then
  echo "error: README.md has no \`\`\`toml block with a [dependencies] line" >&2
  exit 1
fi

# A fixed temporary directory, laid anew on each run: with the examples' times kept (`cp -p`),
# a second run with nothing changed rebuilds nothing.
crate="${TMPDIR:-/tmp}/dcrf-readme-deps-check"
rm -rf "$crate"
mkdir -p "$crate/src/bin"
cat > "$crate/Cargo.toml" <<TOML
[package]
name = "readme-deps-check"
version = "0.0.0"
edition = "2024"
publish = false

# Its own workspace, whatever directory the temporary one is in.
[workspace]

$deps

[patch.crates-io]
dcrf = { path = "$root/crates/dcrf" }
dcrf-macros = { path = "$root/crates/dcrf-macros" }
TOML
cp "$root/Cargo.lock" "$crate/Cargo.lock"
examples=("$root"/crates/dcrf/examples/*.rs)
cp -p "${examples[@]}" "$crate/src/bin/"

echo "check-readme-deps: checking ${#examples[@]} examples with only the README's [dependencies]:"
printf '%s\n' "$deps" | sed 's/^/  /'
(cd "$crate" && cargo check --bins)
echo "check-readme-deps: ok"
