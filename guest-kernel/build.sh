#!/usr/bin/env bash
# Builds the isola guest kernel (uncompressed ELF vmlinux, PVH-bootable) from
# Debian's kernel source package, with isola.config merged onto tinyconfig.
#
#   guest-kernel/build.sh OUT [BZIMAGE_OUT]
#
# OUT becomes a symlink to the cached vmlinux (the ELF a VMM boots through
# its PVH entry), BZIMAGE_OUT to the same kernel as a bzImage (for VMMs and
# tests of the Linux 64-bit boot protocol). The cache lives outside the
# checkout (ISOLA_CACHE, default ~/.cache/isola) and is keyed by the source
# package version and the fragment's hash, so a second run costs nothing.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build.sh OUT [BZIMAGE_OUT]}
bzout=${2:-}
cache=${ISOLA_CACHE:-$HOME/.cache/isola}
fragment=$here/isola.config
log() { echo "guest-kernel: $*" >&2; }

# Newest Debian kernel source the machine's package sources offer, 6.12 first.
pkg=
for candidate in linux-source-6.12 linux-source-6.1; do
    if dpkg-query -W -f='${Status}' "$candidate" 2>/dev/null | grep -q 'install ok installed' ||
        apt-cache policy "$candidate" 2>/dev/null | grep -q 'Candidate: [0-9]'; then
        pkg=$candidate
        break
    fi
done
if [ -z "$pkg" ]; then
    log "neither linux-source-6.12 nor linux-source-6.1 is available from apt"
    exit 1
fi
if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
    log "installing $pkg and the kernel build tools"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        "$pkg" build-essential flex bison bc libelf-dev libssl-dev xz-utils >&2
fi
for tool in flex bison bc gcc make; do
    if ! command -v "$tool" >/dev/null; then
        log "installing kernel build tools"
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            build-essential flex bison bc libelf-dev libssl-dev xz-utils >&2
        break
    fi
done

srcver=$(dpkg-query -W -f='${Version}' "$pkg")
# Bump RECIPE when a change to this script changes the kernel it produces.
RECIPE=2
fraghash=$( (echo "recipe $RECIPE"; cat "$fragment") | sha256sum | cut -c1-12)
key="${pkg#linux-source-}-$srcver-$fraghash"
dir=$cache/kernel/$key
vmlinux=$dir/vmlinux
bzimage=$dir/bzImage

link_out() {
    mkdir -p "$(dirname "$out")"
    ln -sfn "$vmlinux" "$out"
    if [ -n "$bzout" ]; then
        mkdir -p "$(dirname "$bzout")"
        ln -sfn "$bzimage" "$bzout"
    fi
}

if [ -f "$vmlinux" ] && [ -f "$bzimage" ]; then
    log "cached: $vmlinux ($key)"
    link_out
    exit 0
fi

log "building $key in $dir (about 5-6 minutes on 2 cores)"
start=$(date +%s)
work=$dir.work
rm -rf "$work"
mkdir -p "$work"
tarball=$(ls /usr/src/"$pkg".tar.* | head -n1)
log "unpacking $tarball"
tar -xf "$tarball" -C "$work"
src=$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'linux-source-*' | head -n1)
objdir=$work/obj
mkdir -p "$objdir"

log "configuring: tinyconfig + isola.config"
make -C "$src" O="$objdir" ARCH=x86_64 tinyconfig >/dev/null
KCONFIG_CONFIG="$objdir/.config" "$src/scripts/kconfig/merge_config.sh" -m -O "$objdir" \
    "$objdir/.config" "$fragment" >/dev/null
make -C "$src" O="$objdir" ARCH=x86_64 olddefconfig >/dev/null

# Every option the fragment asks for must have survived olddefconfig.
dropped=()
while IFS= read -r line; do
    case "$line" in
    CONFIG_*=*)
        grep -qxF "$line" "$objdir/.config" || dropped+=("$line")
        ;;
    "# CONFIG_"*" is not set")
        opt=${line#\# }
        opt=${opt%% *}
        if grep -q "^$opt=" "$objdir/.config"; then dropped+=("$line"); fi
        ;;
    esac
done <"$fragment"
if [ ${#dropped[@]} -gt 0 ]; then
    log "these options of isola.config did not survive olddefconfig (missing dependency?):"
    printf '  %s\n' "${dropped[@]}" >&2
    exit 1
fi

log "compiling vmlinux and bzImage (make -j$(nproc)); log in $work/build.log"
if ! make -C "$src" O="$objdir" ARCH=x86_64 -j"$(nproc)" vmlinux bzImage >"$work/build.log" 2>&1; then
    tail -n 40 "$work/build.log" >&2
    log "kernel build failed; full log in $work/build.log"
    exit 1
fi

mkdir -p "$dir"
cp "$objdir/vmlinux" "$vmlinux.tmp"
cp "$objdir/arch/x86/boot/bzImage" "$bzimage"
cp "$objdir/.config" "$dir/config"
mv "$vmlinux.tmp" "$vmlinux"
rm -rf "$work"
log "built $vmlinux ($(du -h "$vmlinux" | cut -f1)) in $(($(date +%s) - start)) s"
link_out
