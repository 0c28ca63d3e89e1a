#!/usr/bin/env bash
# Builds kiln's minimal guest kernel from Debian's linux-source package.
#   DEST/vmlinux   PVH-bootable ELF with every needed driver built in
#   DEST/modules/  empty (nothing to load; see minimal.config)
#   DEST/VERSION   source package, version and the fragment's hash
#
# Usage: kernels/build-minimal.sh DEST [--config-only]
#   DEST e.g. /var/cache/kiln/kernel-minimal; then point kiln at DEST instead
#   of the default kernel dir. --config-only stops after checking that the
#   fragment applies (a minute instead of a build), leaving DEST/config.
#
# Not part of `make`: the default kernel (debian-cloud.sh) needs no compiler.
# Takes a while on two cores (x86_64_defconfig plus the fragment). Idempotent:
# skips when DEST/VERSION matches the source version and the fragment.
set -euo pipefail

DEST=${1:?usage: $0 DEST [--config-only]}
CONFIG_ONLY=${2:-}
HERE=$(cd "$(dirname "$0")" && pwd)
FRAGMENT="$HERE/minimal.config"
BUILD_DEPS=(linux-source build-essential bc bison flex libelf-dev libssl-dev lz4 binutils)

die() { echo "build-minimal.sh: $*" >&2; exit 1; }

missing=()
for p in "${BUILD_DEPS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]}"
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

src_pkg=$(dpkg-query -W -f='${Depends}' linux-source | grep -o 'linux-source-[0-9.]*' | head -n1)
[ -n "$src_pkg" ] || die "cannot tell which linux-source-X.Y package linux-source installs"
src_ver=$(dpkg-query -W -f='${Version}' "$src_pkg")
tarball=$(ls /usr/src/"$src_pkg".tar.* 2>/dev/null | head -n1)
[ -n "$tarball" ] || die "no /usr/src/$src_pkg.tar.* (is $src_pkg installed?)"
want="$src_pkg $src_ver minimal $(sha256sum "$FRAGMENT" | cut -c1-16)"

if [ -f "$DEST/VERSION" ] && [ "$(cat "$DEST/VERSION")" = "$want" ] && [ -s "$DEST/vmlinux" ]; then
    echo "minimal kernel $want already in $DEST"
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "unpacking $tarball"
tar -xf "$tarball" -C "$work"
cd "$work/$src_pkg"

make -s x86_64_defconfig
# merge_config.sh warns about every option the fragment sets differently
# from defconfig; that is the point of the fragment.
./scripts/kconfig/merge_config.sh -m .config "$FRAGMENT" >/dev/null
make -s olddefconfig
# Every =y line of the fragment must have survived olddefconfig (a missing
# dependency silently drops an option).
while read -r line; do
    case "$line" in CONFIG_*=y) grep -qx "$line" .config || die "$line did not stick (missing dependency?)";; esac
done < "$FRAGMENT"

if [ "$CONFIG_ONLY" = --config-only ]; then
    mkdir -p "$DEST"
    cp .config "$DEST/config"
    echo "fragment applies cleanly; configuration in $DEST/config"
    exit 0
fi

echo "building vmlinux with $(nproc) jobs"
make -s -j"$(nproc)" vmlinux

readelf -n vmlinux | grep -q 'Xen.*(0x00000012)' || die "vmlinux has no Xen PVH entry note (CONFIG_PVH?)"

mkdir -p "$DEST"
rm -rf "$DEST/modules" "$DEST/vmlinux" "$DEST/VERSION"
mkdir "$DEST/modules"
cp vmlinux "$DEST/vmlinux"
cp .config "$DEST/config"
echo "$want" > "$DEST/VERSION"
echo "minimal kernel $want -> $DEST"
