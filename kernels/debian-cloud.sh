#!/usr/bin/env bash
# Fetches Debian's cloud kernel and turns it into what kiln boots:
#   DEST/vmlinux            uncompressed PVH-bootable ELF (QEMU -kernel, cloud-hypervisor payload)
#   DEST/modules/<name>.ko  the modules the guest agent loads, flat, named by module name
#   DEST/VERSION            the Debian package name and version these came from
#
# Usage: kernels/debian-cloud.sh DEST
#
# Integrity: `apt-get download` checks the .deb against the hashes in Debian's
# signed Release/Packages metadata, so nothing here needs its own checksums.
# Idempotent: when DEST/VERSION names the current candidate version and every
# artifact is present, it does nothing.
set -euo pipefail

DEST=${1:?usage: $0 DEST}
META=linux-image-cloud-amd64

# Modules the guest may need, in a valid load order. virtio over mmio for QEMU
# microvm and over pci for cloud-hypervisor; fuse + virtiofs for the shares;
# virtio_console for the host<->guest channel; kvm for nested virtualisation;
# virtio_net (with its failover dependencies) for builds given network.
MODULES=(virtio_ring virtio virtio_mmio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
         fuse virtiofs virtio_console irqbypass kvm kvm_intel kvm_amd
         failover net_failover virtio_net)

die() { echo "debian-cloud.sh: $*" >&2; exit 1; }

# The metapackage depends on exactly one versioned image package
# (linux-image-<abi>-cloud-amd64); that is the one carrying the files.
pkg=$(apt-cache depends "$META" 2>/dev/null | awk '/Depends: linux-image-[0-9].*-cloud-amd64/ {print $2; exit}')
[ -n "$pkg" ] || die "cannot resolve $META to a versioned package (is Debian's archive in apt's sources? try apt-get update)"
ver=$(apt-cache policy "$pkg" | awk '/Candidate:/ {print $2}')
[ -n "$ver" ] && [ "$ver" != "(none)" ] || die "no candidate version for $pkg"
want="$pkg $ver"

have_all() {
    [ -f "$DEST/VERSION" ] && [ "$(cat "$DEST/VERSION")" = "$want" ] && [ -s "$DEST/vmlinux" ] || return 1
    local m
    for m in "${MODULES[@]}"; do [ -s "$DEST/modules/$m.ko" ] || return 1; done
}
if have_all; then
    echo "kernel $want already in $DEST"
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"  # apt-get download drops to the _apt user
echo "fetching $want"
(cd "$work" && apt-get download -q "$pkg=$ver") || die "apt-get download $pkg=$ver failed"
deb=$(ls "$work"/*.deb)
dpkg-deb -x "$deb" "$work/x"

kver=${pkg#linux-image-}
bz="$work/x/boot/vmlinuz-$kver"
moddir="$work/x/lib/modules/$kver"
[ -f "$bz" ] || die "$bz not in the package"

# The bzImage carries the kernel as an LZ4 legacy-format stream (magic 02 21 4c 18).
# Decompress from the first occurrence; lz4 stops at the end of the frame and
# ignores the trailing setup data (it reports it, hence the tolerated status).
off=$(grep -obUaP '\x02\x21\x4c\x18' "$bz" | head -n1 | cut -d: -f1)
[ -n "$off" ] || die "no LZ4 legacy stream in $bz (has Debian changed the kernel compression?)"
tail -c +$((off + 1)) "$bz" | lz4 -dc > "$work/vmlinux" 2>/dev/null || true
[ "$(head -c 4 "$work/vmlinux" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ] \
    || die "decompressed kernel is not an ELF file"
# QEMU and cloud-hypervisor enter an uncompressed kernel through the Xen PVH
# note (XEN_ELFNOTE_PHYS32_ENTRY); without it they cannot boot it.
if command -v readelf >/dev/null; then
    readelf -n "$work/vmlinux" | grep -q 'Xen.*(0x00000012)' \
        || readelf -n "$work/vmlinux" | grep -qi 'PHYS32_ENTRY' \
        || die "vmlinux has no Xen PVH entry note"
else
    echo "debian-cloud.sh: readelf (binutils) missing, PVH note not checked" >&2
fi

# Find each module (files use '-' or '_'), check its dependencies are in the
# set and load earlier, and copy it flat under its module name.
mkdir -p "$work/modules"
declare -A seen=()
for m in "${MODULES[@]}"; do
    f=$(find "$moddir" \( -name "$m.ko" -o -name "${m//_/-}.ko" \) | head -n1)
    [ -n "$f" ] || die "module $m not in $pkg"
    deps=$(tr '\0' '\n' < "$f" | sed -n 's/^depends=//p' | head -n1)
    for d in ${deps//,/ }; do
        [ -n "${seen[$d]:-}" ] || die "module $m depends on $d, which is not loaded before it"
    done
    seen[$m]=1
    cp "$f" "$work/modules/$m.ko"
done

# Replace DEST's contents in one go so a half-written cache is never used.
mkdir -p "$DEST"
rm -rf "$DEST/modules" "$DEST/vmlinux" "$DEST/VERSION"
mv "$work/modules" "$DEST/modules"
mv "$work/vmlinux" "$DEST/vmlinux"
echo "$want" > "$DEST/VERSION"
echo "kernel $want -> $DEST ($(du -sh "$DEST" | cut -f1))"
