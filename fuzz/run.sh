#!/usr/bin/env bash
# Runs fuzz targets with cargo-fuzz (libFuzzer, AddressSanitizer) on the stable toolchain:
#
#   fuzz/run.sh [SECONDS] [TARGET...]      every target (default) for SECONDS (default 60) each
#
# One `cargo fuzz build` for all targets, then each target runs in turn. Everything it
# keeps lives outside the clone, under ${HOSTD_CACHE:-~/.cache/hostd}, so that coverage
# and the build accumulate between runs:
#   fuzz/<target>/            the corpus, seeded from fuzz/regressions/<target>/ each run
#   fuzz-artifacts/<target>/  what a failing run left (crash-*, timeout-*, oom-*, leak-*)
#   fuzz-logs/<target>.log    libFuzzer's output of the last run
#   fuzz-target/              the fuzz crate's cargo target directory
# Exits non-zero when any target fails to build or start, or finds a crash, naming the
# target and the reproducer. cargo-fuzz is installed from crates.io when missing.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
secs=${1:-60}
shift || true
case $secs in '' | *[!0-9]*) echo "fuzz: SECONDS must be a number, got '$secs'" >&2; exit 2 ;; esac

all=($(sed -n 's/^name = "\(.*\)"$/\1/p' "$here/Cargo.toml" | grep -vx hostd-fuzz))
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")
for t in "${targets[@]}"; do
    if ! printf '%s\n' "${all[@]}" | grep -qx -- "$t"; then
        echo "fuzz: no target '$t' (targets: ${all[*]})" >&2
        exit 2
    fi
done

cache=${HOSTD_CACHE:-$HOME/.cache/hostd}
export CARGO_TARGET_DIR=$cache/fuzz-target
# cargo-fuzz passes -Z flags (sanitizer, coverage) to rustc: RUSTC_BOOTSTRAP lets the
# stable toolchain take them, so no nightly toolchain is needed.
export RUSTC_BOOTSTRAP=1
cargo_fuzz_version=0.13.2
if ! cargo fuzz --version 2>/dev/null | grep -q " $cargo_fuzz_version\$"; then
    echo "fuzz: cargo install cargo-fuzz $cargo_fuzz_version (into ~/.cargo/bin)" >&2
    cargo install cargo-fuzz --version "$cargo_fuzz_version" --locked
fi

cd "$here"
echo "fuzz: building ${#targets[@]} target(s)" >&2
build_args=()
[ ${#targets[@]} -eq 1 ] && build_args=("${targets[0]}")
if ! nice -n 10 cargo fuzz build -O "${build_args[@]}"; then
    echo "fuzz: FAILED: the fuzz crate does not build (cargo fuzz build -O)" >&2
    exit 1
fi
host=$(rustc -vV | sed -n 's/^host: //p')
bin_dir=$CARGO_TARGET_DIR/$host/release

failed=()
for t in "${targets[@]}"; do
    corpus=$cache/fuzz/$t
    artifacts=$cache/fuzz-artifacts/$t
    log=$cache/fuzz-logs/$t.log
    mkdir -p "$corpus" "$artifacts" "$(dirname "$log")"
    # Seeds and past crashes: the corpus always holds them (libFuzzer names its own
    # corpus files by content hash, so these never clash).
    if [ -d "regressions/$t" ]; then
        cp -f "regressions/$t"/* "$corpus"/
    fi
    before=$(ls -A "$artifacts" | wc -l)
    echo "fuzz: $t for ${secs}s" >&2
    rc=0
    nice -n 10 "$bin_dir/$t" -artifact_prefix="$artifacts/" -max_total_time="$secs" \
        -timeout=10 -max_len=65536 -print_final_stats=1 "$corpus" >"$log" 2>&1 || rc=$?
    # libFuzzer's last status line: coverage (cov: edges, ft: features), corpus, speed.
    stats=$(grep -E '^#[0-9]+' "$log" | tail -1 | grep -oE '(cov|ft|corp|exec/s|rss): [^ ]+' |
        tr '\n' ' ' || true)
    if [ "$rc" -eq 0 ]; then
        echo "fuzz: $t: clean: $(grep -E '^Done [0-9]+ runs' "$log" | tail -1); $stats" >&2
        continue
    fi
    failed+=("$t")
    repro=$(ls -t "$artifacts" 2>/dev/null | head -1)
    echo "fuzz: $t: FAILED (libFuzzer exit $rc); last stats: ${stats:-none}" >&2
    grep -E -A1 -m 3 "panicked at|^SUMMARY|ERROR: libFuzzer|==ERROR" "$log" >&2 || tail -20 "$log" >&2
    if [ "$(ls -A "$artifacts" | wc -l)" -gt "$before" ] && [ -n "$repro" ]; then
        echo "fuzz: $t: reproducer: $artifacts/$repro" >&2
        echo "fuzz: $t: replay it: $bin_dir/$t $artifacts/$repro" >&2
        echo "fuzz: $t: keep it as a regression: cp $artifacts/$repro $here/regressions/$t/" >&2
    else
        echo "fuzz: $t: no reproducer written (it did not start?); the log: $log" >&2
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: FAILED: ${failed[*]} (logs in $cache/fuzz-logs/)" >&2
    exit 1
fi
echo "fuzz: all ${#targets[@]} target(s) clean for ${secs}s each" >&2
