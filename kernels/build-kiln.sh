#!/usr/bin/env bash
# Builds kiln's own guest kernel from Debian's linux-source package:
# allnoconfig plus kernels/kiln.config, everything built in.
#   DEST/vmlinux   PVH-bootable ELF
#   DEST/modules/  empty (the kernel has no module support)
#   DEST/config    the resulting .config
#   DEST/VERSION   source package, version, "kiln" and the fragment's hash
#
# Usage: kernels/build-kiln.sh DEST [--config-only]
#   --config-only stops after checking that the fragment applies.
#
# Run by `make kernel`. Idempotent: skips when DEST/VERSION matches the
# source version and the fragment. The unpacked source is kept in
# DEST.src (keyed by the source version), so a changed fragment rebuilds
# incrementally; remove it to reclaim ~1.4 GB.
set -euo pipefail

DEST=${1:?usage: $0 DEST [--config-only]}
CONFIG_ONLY=${2:-}
HERE=$(cd "$(dirname "$0")" && pwd)
FRAGMENT="$HERE/kiln.config"
BUILD_DEPS=(linux-source build-essential bc bison flex libelf-dev libssl-dev binutils xz-utils)

die() { echo "build-kiln.sh: $*" >&2; exit 1; }

missing=()
for p in "${BUILD_DEPS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]}"
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

src_pkg=$(dpkg-query -W -f='${Depends}' linux-source | grep -o 'linux-source-[0-9.]*' | head -n1)
[ -n "$src_pkg" ] || die "cannot tell which linux-source-X.Y package linux-source installs"
src_ver=$(dpkg-query -W -f='${Version}' "$src_pkg")
tarball=$(ls /usr/src/"$src_pkg".tar.* 2>/dev/null | head -n1)
[ -n "$tarball" ] || die "no /usr/src/$src_pkg.tar.* (is $src_pkg installed?)"
want="$src_pkg $src_ver kiln $(sha256sum "$FRAGMENT" | cut -c1-16)"

if [ -f "$DEST/VERSION" ] && [ "$(cat "$DEST/VERSION")" = "$want" ] && [ -s "$DEST/vmlinux" ]; then
    echo "kiln kernel $want already in $DEST"
    exit 0
fi

src_root="$DEST.src"
tree="$src_root/$src_pkg"
if [ "$(cat "$src_root/SOURCE" 2>/dev/null)" != "$src_pkg $src_ver" ]; then
    rm -rf "$src_root"
    mkdir -p "$src_root"
    echo "unpacking $tarball"
    tar -xf "$tarball" -C "$src_root"
    echo "$src_pkg $src_ver" > "$src_root/SOURCE"
fi
cd "$tree"

# allnoconfig with the fragment as the set of options to turn on: the
# kernel's own way to say "these and nothing else".
make -s KCONFIG_ALLCONFIG="$FRAGMENT" allnoconfig
# A missing dependency silently drops an option: every line of the
# fragment must be in the result.
while read -r line; do
    case "$line" in
        CONFIG_*=y) grep -qx "$line" .config || die "$line did not stick (missing dependency?)";;
        "# CONFIG_"*" is not set") sym=${line#"# "}; sym=${sym%% *}
            ! grep -q "^$sym=" .config || die "$sym is on although the fragment turns it off";;
    esac
done < "$FRAGMENT"
! grep -qx 'CONFIG_MODULES=y' .config || die "CONFIG_MODULES is on"

if [ "$CONFIG_ONLY" = --config-only ]; then
    mkdir -p "$DEST"
    cp .config "$DEST/config"
    echo "fragment applies cleanly; configuration in $DEST/config"
    exit 0
fi

echo "building vmlinux with $(nproc) jobs"
start=$(date +%s)
make -s -j"$(nproc)" vmlinux
echo "built in $(( $(date +%s) - start )) s"

readelf -n vmlinux | grep -q 'Xen.*(0x00000012)' || die "vmlinux has no Xen PVH entry note (CONFIG_PVH?)"

tmp="$DEST.new"
rm -rf "$tmp"
mkdir -p "$tmp/modules"
cp vmlinux "$tmp/vmlinux"
cp .config "$tmp/config"
echo "$want" > "$tmp/VERSION"
rm -rf "$DEST"
mv "$tmp" "$DEST"
echo "kiln kernel $want -> $DEST"
