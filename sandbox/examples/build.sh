#!/usr/bin/env bash
# Rebuilds the example nanoservices into sandbox/examples/wasm/*.wasm.
# Needs the wasm32-wasip2 target: rustup target add wasm32-wasip2
# The built .wasm files are committed, so tests and CI do not need this.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
target="${EXAMPLES_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/hostd/examples-target}"
cd "$here"
CARGO_TARGET_DIR="$target" cargo build --release --locked --target wasm32-wasip2
mkdir -p wasm
for crate in hello counter fetch secret files version spin membomb escape sneaky-fetch bucket-thief secret-thief endless bucket-filler handle-hog; do
    cp "$target/wasm32-wasip2/release/${crate//-/_}.wasm" "wasm/$crate.wasm"
done
ls -l wasm
