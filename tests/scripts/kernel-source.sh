#!/usr/bin/env bash
# Tests guest-kernel/build.sh --print-source, the decision "which kernel
# source package, and is it installed", against fake dpkg-query, apt-cache
# and apt-get on PATH. apt-cache prints as much as the real one does and
# more, so piping `apt-cache policy` into grep -q under pipefail (status
# 141, the bug that kept fresh machines from building) fails here.
# Then runs the real one against this machine's apt.
set -euo pipefail
project=$(cd "$(dirname "$0")/../.." && pwd)
build=$project/guest-kernel/build.sh
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
failures=0

# Fakes driven by files in $tmp/state: installed/PKG holds an installed
# version, available/PKG a candidate, after-update/PKG a candidate that
# appears only once apt-get update ran. Every apt-get call is logged.
mkdir -p "$tmp/bin"
cat >"$tmp/bin/dpkg-query" <<'EOF'
#!/usr/bin/env bash
# dpkg-query -W -f=FORMAT PKG
pkg=${!#}
f=$FAKE_STATE/installed/$pkg
[ -f "$f" ] || { echo "dpkg-query: no packages found matching $pkg" >&2; exit 1; }
case "$2" in
*Status*) printf 'install ok installed' ;;
*Version*) cat "$f" ;;
esac
EOF
cat >"$tmp/bin/apt-cache" <<'EOF'
#!/usr/bin/env bash
# apt-cache policy PKG: a candidate line early, then a long version table.
pkg=$2
candidate='(none)'
[ -f "$FAKE_STATE/available/$pkg" ] && candidate=$(cat "$FAKE_STATE/available/$pkg")
if [ -f "$FAKE_STATE/updated" ] && [ -f "$FAKE_STATE/after-update/$pkg" ]; then
    candidate=$(cat "$FAKE_STATE/after-update/$pkg")
fi
echo "$pkg:"
echo "  Installed: (none)"
echo "  Candidate: $candidate"
echo "  Version table:"
for i in $(seq 1 20000); do echo "     6.1.$i-1 500        500 http://deb.debian.org/debian bookworm/main amd64 Packages"; done
EOF
cat >"$tmp/bin/apt-get" <<'EOF'
#!/usr/bin/env bash
# indextargets: the list files the configured sources should have.
if [ "$1" = indextargets ]; then
    [ -f "$FAKE_STATE/indextargets" ] && cat "$FAKE_STATE/indextargets"
    exit 0
fi
echo "apt-get $*" >>"$FAKE_STATE/apt-get.log"
[ "$1" = update ] && touch "$FAKE_STATE/updated"
exit 0
EOF
chmod +x "$tmp/bin"/*

# check NAME EXPECTED-OUTPUT EXPECTED-STATUS EXPECTED-APT-UPDATES SETUP...
# SETUP entries are "dir/pkg=version", "stale" (apt lists a week old) or
# "source=NAME" (a configured source whose list file NAME was never fetched).
check() {
    local name=$1 want=$2 want_status=$3 want_updates=$4
    shift 4
    local state=$tmp/state.$name entry
    rm -rf "$state"
    mkdir -p "$state"/{installed,available,after-update} "$state/lists" "$state/cache"
    touch "$state/lists/deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages"
    touch "$state/apt-get.log"
    for entry in "$@"; do
        case "$entry" in
        stale) touch -d '7 days ago' "$state/lists"/* ;;
        source=*)
            {
                echo "/var/lib/apt/lists/deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages"
                echo "/var/lib/apt/lists/${entry#source=}"
            } >>"$state/indextargets"
            ;;
        *=*) echo "${entry#*=}" >"$state/${entry%%=*}" ;;
        esac
    done
    local got status=0 updates
    got=$(FAKE_STATE=$state PATH="$tmp/bin:$PATH" ISOLA_CACHE="$state/cache" \
        ISOLA_APT_LISTS="$state/lists" "$build" --print-source 2>"$state/stderr") || status=$?
    updates=$(grep -c '^apt-get update' "$state/apt-get.log") || true
    if [ "$got" = "$want" ] && [ "$status" -eq "$want_status" ] && [ "$updates" -eq "$want_updates" ]; then
        echo "ok   $name: ${got:-(nothing)} (status $status, $updates apt-get update)"
    else
        echo "FAIL $name: got '$got' status $status with $updates apt-get update;" \
            "want '$want' status $want_status with $want_updates"
        sed 's/^/       stderr: /' "$state/stderr"
        failures=$((failures + 1))
    fi
    if grep -q '^apt-get install' "$state/apt-get.log"; then
        echo "FAIL $name: --print-source installed something"
        failures=$((failures + 1))
    fi
}

check available-only "linux-source-6.1 6.1.172-1 available" 0 0 \
    available/linux-source-6.1=6.1.172-1
check installed "linux-source-6.1 6.1.170-1 installed" 0 0 \
    installed/linux-source-6.1=6.1.170-1 available/linux-source-6.1=6.1.172-1
check installed-beats-newer-available "linux-source-6.1 6.1.170-1 installed" 0 0 \
    installed/linux-source-6.1=6.1.170-1 available/linux-source-6.12=6.12.57-1
check newest-available "linux-source-6.12 6.12.57-1 available" 0 0 \
    available/linux-source-6.1=6.1.172-1 available/linux-source-6.12=6.12.57-1
check stale-lists-updated-once "linux-source-6.1 6.1.172-1 available" 0 1 \
    stale after-update/linux-source-6.1=6.1.172-1
check none-fresh-lists "" 1 0
check none-stale-lists "" 1 1 stale
# debootstrap: the main list is fresh, -security was never fetched.
check none-source-never-fetched "" 1 1 \
    source=deb.debian.org_debian-security_dists_bookworm-security_main_binary-amd64_Packages
check none-every-source-fetched "" 1 0 \
    source=deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages

echo "this machine: $("$build" --print-source)"
if [ $failures -gt 0 ]; then
    echo "kernel-source: $failures failures" >&2
    exit 1
fi
