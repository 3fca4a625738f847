#!/usr/bin/env bash
# Tests that tests/kvm-host/run reports an emulated KVM host that fails to
# boot with the cause from its console, instead of a bare status. The
# failure is the one a machine with only Debian QEMU 7.2's C virtiofsd
# had: a virtiofsd that cannot serve the root file system, so the emulated
# host panics with "virtio-fs: tag <ROOTFS> not found". Skipped where the
# KVM host is native (no emulated host to fail).
set -euo pipefail
project=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=scripts/lib.sh
. "$project/scripts/lib.sh"
if [ "${ISOLA_KVM_HOST:-}" = native ] || { [ -z "${ISOLA_KVM_HOST:-}" ] && [ ! -d /sys/module/kvm_pvm ] &&
    grep -qwE 'vmx|svm' /proc/cpuinfo; }; then
    echo "kvm-host-boot-failure: skipped (native KVM host)"
    exit 0
fi
# The real tools first (virtme-ng), then a cache whose virtiofsd passes
# the version check but never serves.
tools=$("$project/tests/kvm-host/setup-emulated")
venv=${tools%%:*}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/tools/bin"
ln -s "$(dirname "$venv")" "$tmp/tools/$(basename "$(dirname "$venv")")"
# The emulator too, when it lives in the cache (not the system's).
qemu=$(isola_emulator_qemu)
case "$qemu" in "$ISOLA_TOOLS"/*)
    qemu_dir=${qemu%/bin/*}
    ln -s "$qemu_dir" "$tmp/tools/$(basename "$qemu_dir")"
    ;;
esac
cat >"$tmp/tools/bin/virtiofsd" <<FAKE
#!/bin/sh
[ "\$1" = --version ] && { echo "virtiofsd $ISOLA_VIRTIOFSD_VERSION"; exit 0; }
echo "fake virtiofsd: refusing to serve" >&2
exit 1
FAKE
chmod +x "$tmp/tools/bin/virtiofsd"

status=0
ISOLA_CACHE=$tmp ISOLA_KVM_HOST=emulated ISOLA_KVM_HOST_RETRIES=0 \
    "$project/tests/kvm-host/run" true 2>"$tmp/stderr" || status=$?
fail() {
    echo "kvm-host-boot-failure: FAIL: $*" >&2
    sed 's/^/    /' "$tmp/stderr" >&2
    exit 1
}
[ "$status" -ne 0 ] || fail "run exited 0 although the emulated host could not boot"
grep -q 'failed (vng status [0-9]*) before reaching the command' "$tmp/stderr" ||
    fail "no 'failed before reaching the command' line"
grep -q 'tag <ROOTFS> not found' "$tmp/stderr" || fail "the console's cause is not shown"
echo "kvm-host-boot-failure: ok (status $status, the cause shown: virtio-fs: tag <ROOTFS> not found)"
