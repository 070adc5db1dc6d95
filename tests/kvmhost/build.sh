#!/usr/bin/env bash
# Builds the nested real-KVM test host (issue 21): Debian's own kernel with its KVM
# modules, and a busybox initramfs whose init loads them (kvm_amd under QEMU TCG with
# emulated SVM), moves itself onto a tmpfs root (hostd's jail needs pivot_root), and
# runs /kvmtest/run.sh from a payload archive appended by the test.
# Cached in ~/.cache/hostd/kvmhost/KEY, KEY = sha256 of this directory's files and the
# exact package versions. Prints that directory as its last line of output:
#   DIR/vmlinuz   the Debian kernel
#   DIR/base.cpio busybox, the modules, /init and /stage2 (newc)
# HOSTD_KVMHOST_KERNEL_PKG picks the kernel package (default: the newest
# linux-image-6.1.0-N-amd64 in the apt lists).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${HOSTD_CACHE:-${HOME:-/root}/.cache/hostd}/kvmhost"

pkg="${HOSTD_KVMHOST_KERNEL_PKG:-$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' \
        | cut -d' ' -f1 | sort -V | tail -1)}"
[ -n "$pkg" ] || { echo "kvmhost: no linux-image-6.1.0-*-amd64 in the apt lists (apt-get update)" >&2; exit 1; }
version() { apt-cache show --no-all-versions "$1" | sed -n 's/^Version: //p' | head -1; }
kver="$(version "$pkg")"
bver="$(version busybox-static)"
[ -n "$kver" ] && [ -n "$bver" ] || { echo "kvmhost: $pkg or busybox-static not in the apt lists" >&2; exit 1; }

key="$( { echo "$pkg=$kver busybox-static=$bver"; cat "$here/build.sh" "$here/init" "$here/stage2"; } \
        | sha256sum | cut -c1-16)"
out="$cache/$key"
if [ -f "$out/base.cpio" ] && [ -f "$out/vmlinuz" ]; then
    echo "$out"
    exit 0
fi

echo "kvmhost: building $out ($pkg $kver, busybox-static $bver)" >&2
mkdir -p "$cache"
work="$(mktemp -d "$cache/.build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download -q "$pkg=$kver" "busybox-static=$bver" >&2) 2>&1 \
    | grep -v 'Download is performed unsandboxed' >&2 || true
ls "$work"/linux-image-*.deb "$work"/busybox-static_*.deb >/dev/null
mkdir "$work/k" "$work/b" "$work/root"
dpkg-deb -x "$work"/linux-image-*.deb "$work/k"
dpkg-deb -x "$work"/busybox-static_*.deb "$work/b"

root="$work/root"
mkdir -p "$root"/{bin,sbin,lib/modules,proc,sys,dev,tmp,run,root,newroot,kvmtest}
cp "$work/b/bin/busybox" "$root/bin/busybox"
mods="$work/k/lib/modules/"*/kernel
# In load order (dependencies first, as the modules' own depends= fields say).
for m in virt/lib/irqbypass.ko drivers/crypto/ccp/ccp.ko arch/x86/kvm/kvm.ko \
         arch/x86/kvm/kvm-amd.ko drivers/net/tun.ko; do
    f=$(echo $mods/$m*)
    case "$f" in
        *.xz) xz -dc "$f" > "$root/lib/modules/$(basename "$m")" ;;
        *) cp "$f" "$root/lib/modules/$(basename "$m")" ;;
    esac
done
install -m 0755 "$here/init" "$root/init"
install -m 0755 "$here/stage2" "$root/stage2"
# Reproducible: sorted entries, fixed mtimes, root-owned.
find "$root" -exec touch -h -d @0 {} +
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 --reproducible) > "$work/base.cpio"
cp "$work"/k/boot/vmlinuz-* "$work/vmlinuz"
mkdir -p "$out.tmp"
mv "$work/base.cpio" "$work/vmlinuz" "$out.tmp/"
rm -rf "$out"
mv "$out.tmp" "$out"
echo "$out"
