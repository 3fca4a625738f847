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
# shellcheck source=scripts/lib.sh
. "$here/../scripts/lib.sh"
log() { echo "guest-kernel: $*" >&2; }

# The kernel source package to build from, as "PKG VERSION STATE" (STATE:
# installed or available): an installed linux-source-6.12 or -6.1 first (no
# download, a stable cache key), else the newest one apt offers, refreshing
# stale package lists once if none is offered.
kernel_source() {
    local candidate version attempt
    for candidate in linux-source-6.12 linux-source-6.1; do
        if isola_pkg_installed "$candidate"; then
            version=$(dpkg-query -W -f='${Version}' "$candidate")
            echo "$candidate $version installed"
            return 0
        fi
    done
    for attempt in 1 2; do
        for candidate in linux-source-6.12 linux-source-6.1; do
            if version=$(isola_apt_candidate "$candidate"); then
                echo "$candidate $version available"
                return 0
            fi
        done
        if [ $attempt -eq 2 ] || isola_apt_lists_fresh; then break; fi
        isola_apt_update
    done
    return 1
}

if [ "${1:-}" = --print-source ]; then
    if ! kernel_source; then
        log "neither linux-source-6.12 nor linux-source-6.1 is installed or available from apt"
        exit 1
    fi
    exit 0
fi

out=${1:?usage: build.sh OUT [BZIMAGE_OUT] | build.sh --print-source}
bzout=${2:-}
cache=$ISOLA_CACHE
fragment=$here/isola.config

if ! source_line=$(kernel_source); then
    log "neither linux-source-6.12 nor linux-source-6.1 is installed or available from apt (sources: /etc/apt/sources.list*)"
    exit 1
fi
read -r pkg srcver state <<<"$source_line"
# Bump RECIPE when a change to this script changes the kernel it produces.
RECIPE=2
fraghash=$( (echo "recipe $RECIPE"; cat "$fragment") | sha256sum | cut -c1-12)
# Keyed by the version apt would install (or has): a kernel in the cache
# needs neither the source package nor the build tools.
set_key() {
    key="${pkg#linux-source-}-$srcver-$fraghash"
    dir=$cache/kernel/$key
    vmlinux=$dir/vmlinux
    bzimage=$dir/bzImage
}
set_key

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

build_tools=(build-essential flex bison bc libelf-dev libssl-dev xz-utils)
if [ "$state" != installed ]; then
    log "installing $pkg and the kernel build tools"
    isola_apt_install "$pkg" "${build_tools[@]}"
    # A retry after refreshed lists may have installed a newer version.
    srcver=$(dpkg-query -W -f='${Version}' "$pkg")
    set_key
fi
for tool in flex bison bc gcc make xz; do
    if ! command -v "$tool" >/dev/null; then
        log "installing kernel build tools ($tool is missing)"
        isola_apt_install "${build_tools[@]}"
        break
    fi
done

log "building $key in $dir (8 to 25 minutes on 2 cores, depending on what else runs)"
start=$(date +%s)
work=$dir.work
rm -rf "$work"
mkdir -p "$work"
tarballs=(/usr/src/"$pkg".tar.*)
if [ ! -f "${tarballs[0]}" ]; then
    log "$pkg is installed but /usr/src/$pkg.tar.* is missing"
    exit 1
fi
log "unpacking ${tarballs[0]}"
tar -xf "${tarballs[0]}" -C "$work"
srcs=("$work"/linux-source-*/)
src=${srcs[0]%/}
if [ ! -d "$src" ]; then
    log "${tarballs[0]} holds no linux-source-* directory"
    exit 1
fi
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

# A first build compiles about KERNEL_OBJECTS objects; show how far it is.
KERNEL_OBJECTS=1200
kernel_progress() {
    local objects
    objects=$(find "$objdir" -name '*.o' -newer "$objdir/.config" | wc -l)
    echo "$objects of about $KERNEL_OBJECTS objects compiled"
}
log "compiling vmlinux and bzImage (make -j$(nproc)); a line every 30 s; log in $work/build.log"
if ! ISOLA_PROGRESS_FN=kernel_progress isola_with_progress "guest-kernel" --log "$work/build.log" \
    make -C "$src" O="$objdir" ARCH=x86_64 -j"$(nproc)" vmlinux bzImage; then
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
