#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 60) with cargo-fuzz (nightly toolchain):
#   fuzz/run.sh [SECONDS] [TARGET...]
# Corpora live in ~/.cache/hostd/fuzz/<target>, seeded with a real probe ELF and a real
# image header so the fuzzer starts from valid inputs.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=($(sed -n 's/^name = "\(.*\)"$/\1/p' "$here/Cargo.toml" | grep -v hostd-fuzz))
command -v cargo-fuzz >/dev/null || cargo +nightly install cargo-fuzz --locked
corpus=${HOSTD_CACHE:-$HOME/.cache/hostd}/fuzz
mkdir -p "$corpus/image_and_kernel" "$corpus/virtio_mmio"
probe=$(bash "$here/../guest/probe/build.sh" | tail -1)
cp "$probe" "$corpus/image_and_kernel/probe.elf"
# A real image header: build a tiny image with a stand-in kernel.
tmp=$(mktemp -d)
printf '\177ELF\002\001\001' > "$tmp/vmlinux"; head -c 4096 /dev/zero >> "$tmp/vmlinux"
printf 'name = "seed"\nkernel = "vmlinux"\n' > "$tmp/seed.toml"
(cd "$here/.." && cargo run -q -- build "$tmp/seed.toml" -o "$tmp/seed.img" 2>/dev/null) && head -c 8192 "$tmp/seed.img" > "$corpus/image_and_kernel/seed-head.img"
rm -rf "$tmp"
cd "$here"
for t in "${targets[@]}"; do
    echo "fuzz: $t for ${secs}s" >&2
    cargo +nightly fuzz run -O "$t" "$corpus/$t" -- -max_total_time="$secs" -max_len=65536 2>&1 | grep -E "DONE|ERROR|SUMMARY|panicked|Done" || true
done
