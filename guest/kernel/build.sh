#!/usr/bin/env bash
# Build hostd's guest kernel from Debian's linux-source-6.1 package.
#
#   guest/kernel/build.sh            build (or reuse) and print the output directory
#
# Output: $HOSTD_CACHE/kernel/<key>/{vmlinux,bzImage,config}, where <key> is a hash of
# everything that goes into the build (the recipe version below, the config fragment, the
# patches, the linux-source package version). $HOSTD_CACHE/kernel/default points at the newest
# build; `hostd build` uses it for `kernel = "default"`.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${HOSTD_CACHE:-$HOME/.cache/hostd}
src_pkg=linux-source-6.1

if ! dpkg-query -W -f='${Status}' "$src_pkg" 2>/dev/null | grep -q 'install ok installed'; then
    echo "hostd kernel: installing $src_pkg and build tools (apt-get)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "$src_pkg" build-essential flex bison bc \
        libelf-dev libssl-dev cpio xz-utils >/dev/null
fi
src_version=$(dpkg-query -W -f='${Version}' "$src_pkg")

patches() { [ -d "$here/patches" ] && find "$here/patches" -type f -name '*.patch' | LC_ALL=C sort; true; }
# Bump when a change to this script changes the kernel it produces.
recipe=2
key=$( { echo "$src_pkg $src_version recipe $recipe"; cat "$here/hostd.config";
         patches | xargs -r cat; } |
       sha256sum | cut -c1-16)
out=$cache/kernel/$key
if [ -f "$out/vmlinux" ] && [ -f "$out/bzImage" ]; then
    ln -sfn "$key" "$cache/kernel/default"
    echo "$out"
    exit 0
fi

# One build at a time on this machine (two would fight over CPU and the cache).
mkdir -p "$cache/kernel"
exec 9>"$cache/kernel/.lock"
flock 9
if [ -f "$out/vmlinux" ] && [ -f "$out/bzImage" ]; then
    ln -sfn "$key" "$cache/kernel/default"
    echo "$out"
    exit 0
fi
work=$cache/kernel/build-$key
rm -rf "$work"
mkdir -p "$work"
# A failed build leaves nothing behind but its log (kept for reading).
trap 'status=$?; if [ $status != 0 ]; then find "$work" -mindepth 1 -maxdepth 1 ! -name make.log -exec rm -rf {} +; fi' EXIT
echo "hostd kernel: building $src_pkg $src_version (key $key) in $work; this takes a few minutes" >&2
tar -C "$work" -xf /usr/src/$src_pkg.tar.xz
cd "$work/$src_pkg"
for p in $(patches); do
    echo "hostd kernel: applying $(basename "$p")" >&2
    patch -p1 --quiet < "$p"
done

# Reproducible build metadata: the same inputs give the same kernel.
export KBUILD_BUILD_TIMESTAMP="1970-01-01" KBUILD_BUILD_USER=hostd KBUILD_BUILD_HOST=hostd \
       KBUILD_BUILD_VERSION=1
make -s tinyconfig >/dev/null
scripts/kconfig/merge_config.sh -m .config "$here/hostd.config" >/dev/null
make -s olddefconfig >/dev/null
# Every line of the fragment must have survived olddefconfig, or the kernel is not the one asked for.
missing=0
while read -r line; do
    case "$line" in CONFIG_*=n) opt=${line%=n}; grep -q "^$opt=" .config && { echo "not disabled: $opt" >&2; missing=1; } ;;
                    CONFIG_*) grep -qx "$line" .config || { echo "not set: $line" >&2; missing=1; } ;; esac
done < <(grep -v '^#' "$here/hostd.config" | grep .)
[ "$missing" = 0 ] || { echo "hostd kernel: config fragment did not apply (see above)" >&2; exit 1; }

jobs=$(nproc)
if ! make -s -j"$jobs" vmlinux bzImage >"$work/make.log" 2>&1; then
    tail -40 "$work/make.log" >&2
    echo "hostd kernel: build failed; full log in $work/make.log" >&2
    exit 1
fi
mkdir -p "$out.tmp"
objcopy --strip-all vmlinux "$out.tmp/vmlinux"
cp arch/x86/boot/bzImage "$out.tmp/bzImage"
cp .config "$out.tmp/config"
cp System.map "$out.tmp/System.map"
rm -rf "$out"
mv "$out.tmp" "$out"
ln -sfn "$key" "$cache/kernel/default"
cd /
rm -rf "$work"
echo "hostd kernel: done: $out" >&2
echo "$out"
