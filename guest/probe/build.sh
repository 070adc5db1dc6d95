#!/bin/sh
# Build the hostd probe guest and print the path of the resulting ELF on stdout.
#
#   guest/probe/build.sh            release build (the one to boot)
#
# Needs only rustup/cargo; adds the x86_64-unknown-none target if it is missing
# (the only download). Output lands in cargo's own target dir: guest/probe/target/
# (or $CARGO_TARGET_DIR when set).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
target=x86_64-unknown-none
# .cargo/config.toml (target, rustflags) is found from the working directory.
cd "$here"

if command -v rustup >/dev/null 2>&1; then
    if ! rustup target list --installed | grep -qx "$target"; then
        echo "probe: adding rust target $target (rustup)" >&2
        rustup target add "$target" >&2
    fi
fi

cargo build --release --target "$target" >&2

out=${CARGO_TARGET_DIR:-$here/target}
case $out in /*) ;; *) out=$here/$out ;; esac
elf=$out/$target/release/probe
if [ ! -f "$elf" ]; then
    echo "probe: build finished but $elf is missing" >&2
    exit 1
fi
echo "$elf"
