#!/usr/bin/env bash
# Tests the helpers of scripts/lib.sh the way the install paths call them:
# each case is a new bash that sets -euo pipefail, sources lib.sh and calls
# the helper as a plain command, so a status that leaks out of a helper
# (a `wait` on a killed job, a failed `kill`, a `grep` that found nothing)
# ends that script as it would end scripts/virtiofsd or guest-kernel/build.sh.
# Nothing here needs the network: apt-get, apt-cache, dpkg-query, sudo,
# cargo, pkg-config and QEMU are fakes on PATH, and ISOLA_CACHE is a
# temporary directory.
# The cases are code for another bash: their $ expand there, not here.
# shellcheck disable=SC2016
set -euo pipefail
project=$(cd "$(dirname "$0")/../.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
failures=0
fakes=$tmp/bin
mkdir -p "$fakes"

# --- Fakes, driven by files under $FAKE_STATE --------------------------------
# dpkg-query -W -f=FORMAT PKG: installed/PKG holds its version.
cat >"$fakes/dpkg-query" <<'EOF'
#!/usr/bin/env bash
pkg=${!#}
f=$FAKE_STATE/installed/$pkg
[ -f "$f" ] || { echo "dpkg-query: no packages found matching $pkg" >&2; exit 1; }
case "$2" in
*Status*) printf 'install ok installed' ;;
*Version*) cat "$f" ;;
esac
EOF
# apt-get: logs every call; `install` fails while install-failures (a
# count) is above zero; `indextargets` prints nothing (no sources).
cat >"$fakes/apt-get" <<'EOF'
#!/usr/bin/env bash
[ "$1" = indextargets ] && exit 0
echo "apt-get $*" >>"$FAKE_STATE/apt-get.log"
for a in "$@"; do
    if [ "$a" = install ]; then
        n=$(cat "$FAKE_STATE/install-failures" 2>/dev/null || echo 0)
        if [ "$n" -gt 0 ]; then
            echo $((n - 1)) >"$FAKE_STATE/install-failures"
            echo "E: Version '1.0' for 'pkg' was not found" >&2
            exit 100
        fi
    fi
done
exit 0
EOF
# sudo -E CMD...: as the caller (isola_as_root uses it when not root).
cat >"$fakes/sudo" <<'EOF'
#!/usr/bin/env bash
[ "$1" = -E ] && shift
exec "$@"
EOF
cat >"$fakes/pkg-config" <<'EOF'
#!/bin/sh
exit 0
EOF
# cargo install --locked --quiet --root DIR virtiofsd --version V: takes
# cargo-seconds (default 3) and then makes DIR/bin/virtiofsd answering
# `--version` with V, as a real install would; cargo-status overrides
# the outcome.
cat >"$fakes/cargo" <<'EOF'
#!/usr/bin/env bash
echo "cargo $*" >>"$FAKE_STATE/cargo.log"
root= version=
while [ $# -gt 0 ]; do
    case "$1" in
    --root) root=$2; shift ;;
    --version) version=$2; shift ;;
    esac
    shift
done
sleep "$(cat "$FAKE_STATE/cargo-seconds" 2>/dev/null || echo 3)"
status=$(cat "$FAKE_STATE/cargo-status" 2>/dev/null || echo 0)
[ "$status" -eq 0 ] || exit "$status"
mkdir -p "$root/bin"
printf '#!/bin/sh\necho "virtiofsd %s"\n' "$version" >"$root/bin/virtiofsd"
chmod +x "$root/bin/virtiofsd"
EOF
# qemu-system-x86_64 --version: prints qemu-version.
cat >"$fakes/qemu-system-x86_64" <<'EOF'
#!/usr/bin/env bash
echo "QEMU emulator version $(cat "$FAKE_STATE/qemu-version")"
EOF
chmod +x "$fakes"/*

# --- The harness -------------------------------------------------------------
# strict NAME CODE: runs CODE in a new `bash` that sets -euo pipefail and
# sources lib.sh, with the fakes first on PATH and a fresh state and cache.
# CODE ends with `echo reached-end >&2`, so a helper that killed its
# caller is told from one that returned. Sets $out, $err, $status, $state.
strict() {
    local name=$1 code=$2
    state=$tmp/state.$name
    mkdir -p "$state/installed" "$state/cache"
    touch "$state/apt-get.log" "$state/cargo.log"
    # lib.sh's apt stamp in the cache makes the lists count as fresh.
    touch "$state/cache/apt-updated"
    status=0
    out=$(FAKE_STATE=$state PATH="$fakes:$PATH" ISOLA_CACHE=$state/cache ISOLA_CARGO_TARGET='' \
        ISOLA_APT_LISTS=$state/lists bash -c "
# The cases are code for another bash: their $ expand there, not here.
# shellcheck disable=SC2016
set -euo pipefail
. '$project/scripts/lib.sh'
$code
echo reached-end >&2" 2>"$state/stderr") || status=$?
    err=$(cat "$state/stderr")
}

pass() { echo "ok   $1"; }
fail() {
    echo "FAIL $1: $2"
    sed 's/^/       stderr: /' "$state/stderr"
    failures=$((failures + 1))
}
# expect NAME STATUS: the case exited with STATUS, and reached its end iff 0.
expect() {
    local name=$1 want=$2 reached=0
    [[ "$err" != *reached-end* ]] || reached=1
    if [ "$status" -ne "$want" ]; then
        fail "$name" "status $status, want $want"
        return 1
    fi
    if [ "$want" -eq 0 ] && [ $reached -eq 0 ]; then
        fail "$name" "status 0 but the script stopped before its end"
        return 1
    fi
    return 0
}
ticks() {
    local n
    n=$(grep -c "still working" <<<"$err") || true
    echo "$n"
}

# --- isola_with_progress -----------------------------------------------------
# A command that outlives several ticks and succeeds: 0, and the ticks shown.
strict progress-success 'ISOLA_PROGRESS_EVERY=1 isola_with_progress "job" sleep 3.5'
if expect progress-success 0; then
    if [ "$(ticks)" -ge 2 ]; then pass "progress-success: 0 after $(ticks) progress lines"; else
        fail progress-success "$(ticks) progress lines for a 3.5 s command at 1 s"; fi
fi

# The same command failing with 3: exactly 3.
strict progress-fails-3 'ISOLA_PROGRESS_EVERY=1 isola_with_progress "job" bash -c "sleep 2.5; exit 3"'
expect progress-fails-3 3 && pass "progress-fails-3: 3"

# Under `if !` (guest-kernel/build.sh's way) the status is still the command's.
strict progress-if-not 'if ! ISOLA_PROGRESS_EVERY=1 isola_with_progress "job" bash -c "sleep 1.5; exit 3"; then
    echo "failed as expected" >&2; else exit 9; fi'
expect progress-if-not 0 && pass "progress-if-not: the failure seen by the caller"

# A command shorter than one tick: 0 and no progress line.
strict progress-quick 'isola_with_progress "job" true'
if expect progress-quick 0; then
    if [ "$(ticks)" -eq 0 ]; then pass "progress-quick: 0, no progress line"; else
        fail progress-quick "$(ticks) progress lines for a command shorter than a tick"; fi
fi

# --log FILE: the command's output in FILE, PROGRESS from ISOLA_PROGRESS_FN.
strict progress-log 'count() { echo "3 of 7 done"; }
ISOLA_PROGRESS_FN=count ISOLA_PROGRESS_EVERY=1 isola_with_progress "job" --log "$FAKE_STATE/job.log" \
    bash -c "echo to-the-log; echo err-to-the-log >&2; sleep 2.5"'
if expect progress-log 0; then
    if [ "$(cat "$state/job.log")" = $'to-the-log\nerr-to-the-log' ] && [[ "$err" == *"job: still working, "*" s, 3 of 7 done"* ]]; then
        pass "progress-log: output in the log, progress from ISOLA_PROGRESS_FN"
    else
        fail progress-log "log '$(cat "$state/job.log")'"
    fi
fi

# Inside $(...): the ticker leaves nothing holding the caller's pipe open
# (an orphaned `sleep 30` would keep the substitution waiting ~30 s).
t0=$(date +%s)
strict progress-substitution 'x=$(ISOLA_PROGRESS_EVERY=30 isola_with_progress "job" sleep 1; echo done)
[ "$x" = done ]'
t1=$(date +%s)
if expect progress-substitution 0; then
    if [ $((t1 - t0)) -lt 20 ]; then pass "progress-substitution: returned in $((t1 - t0)) s"; else
        fail progress-substitution "took $((t1 - t0)) s: the ticker's sleep held the pipe open"; fi
fi

# --- isola_descendants --------------------------------------------------------
# A process tree (a subshell with a child, and a child) found whole without
# ps (a fresh machine has no procps: the kvm-host watchdog found nothing to
# kill and waited forever on a wedged emulated host).
strict descendants 'ps() { echo "ps called" >&2; return 127; }
bash -c "(sleep 30; true) & sleep 31 & wait" & top=$!
for _ in $(seq 100); do
    [ "$(isola_descendants $top | wc -l)" -ge 3 ] && break
    sleep 0.1
done
found=$(isola_descendants $top)
comms=$(for p in $found; do cat /proc/$p/comm; done | sort | tr "\n" " ")
kill $found $top 2>/dev/null || true
echo "found: $comms" >&2
[ "$comms" = "bash sleep sleep " ]
[ -z "$(isola_descendants 999999999)" ]'
if expect descendants 0; then
    if [[ "$err" == *"ps called"* ]]; then fail descendants "it called ps"; else
        pass "descendants: a subshell, its child and a child, without ps"; fi
fi

# --- isola_virtiofsd and scripts/virtiofsd -----------------------------------
# The first install, as `make virtiofsd` runs it: scripts/virtiofsd under its
# own set -euo pipefail, a cargo install that takes 3 s with a tick every
# second. It prints the path and exits 0.
strict virtiofsd-install 'echo 3 >"$FAKE_STATE/cargo-seconds"
touch "$FAKE_STATE/installed/libseccomp-dev" "$FAKE_STATE/installed/libcap-ng-dev"
ISOLA_PROGRESS_EVERY=1 "'"$project"'/scripts/virtiofsd"'
want=$state/cache/tools/bin/virtiofsd
if expect virtiofsd-install 0; then
    if [ "$out" != "$want" ]; then
        fail virtiofsd-install "printed '$out', want '$want'"
    elif ! grep -q -- "install --locked --quiet --root $state/cache/tools virtiofsd --version 1.14.0" "$state/cargo.log"; then
        fail virtiofsd-install "cargo was called as: $(cat "$state/cargo.log")"
    elif [ "$(ticks)" -lt 1 ]; then
        fail virtiofsd-install "no progress line during a 3 s install"
    elif [ -s "$state/apt-get.log" ]; then
        fail virtiofsd-install "apt-get ran with its dependencies installed: $(cat "$state/apt-get.log")"
    else
        pass "virtiofsd-install: printed the path after a 3 s install with $(ticks) progress lines"
    fi
fi

# Missing apt dependencies are installed first.
strict virtiofsd-deps 'echo 0 >"$FAKE_STATE/cargo-seconds"; isola_virtiofsd'
if expect virtiofsd-deps 0; then
    if grep -q 'install .*libseccomp-dev libcap-ng-dev' "$state/apt-get.log"; then pass "virtiofsd-deps: libseccomp-dev libcap-ng-dev installed first"; else
        fail virtiofsd-deps "apt-get: $(cat "$state/apt-get.log")"; fi
fi

# Already at the pinned version: nothing to do, no cargo.
strict virtiofsd-present 'mkdir -p "$ISOLA_TOOLS/bin"
printf "#!/bin/sh\necho \"virtiofsd 1.14.0\"\n" >"$ISOLA_TOOLS/bin/virtiofsd"
chmod +x "$ISOLA_TOOLS/bin/virtiofsd"
isola_virtiofsd'
if expect virtiofsd-present 0; then
    if [ ! -s "$state/cargo.log" ] && [ "$out" = "$state/cache/tools/bin/virtiofsd" ]; then pass "virtiofsd-present: no install"; else
        fail virtiofsd-present "printed '$out'; cargo: $(cat "$state/cargo.log")"; fi
fi

# Another version in the cache: replaced by the pinned one.
strict virtiofsd-other-version 'echo 0 >"$FAKE_STATE/cargo-seconds"
touch "$FAKE_STATE/installed/libseccomp-dev" "$FAKE_STATE/installed/libcap-ng-dev"
mkdir -p "$ISOLA_TOOLS/bin"
printf "#!/bin/sh\necho \"virtiofsd 1.10.1\"\n" >"$ISOLA_TOOLS/bin/virtiofsd"
chmod +x "$ISOLA_TOOLS/bin/virtiofsd"
isola_virtiofsd >/dev/null
"$ISOLA_TOOLS/bin/virtiofsd" --version'
if expect virtiofsd-other-version 0; then
    if [ "$out" = "virtiofsd 1.14.0" ]; then pass "virtiofsd-other-version: reinstalled at 1.14.0"; else
        fail virtiofsd-other-version "now '$out'"; fi
fi

# cargo install fails: the script fails with cargo's status.
strict virtiofsd-cargo-fails 'echo 0 >"$FAKE_STATE/cargo-seconds"; echo 101 >"$FAKE_STATE/cargo-status"
touch "$FAKE_STATE/installed/libseccomp-dev" "$FAKE_STATE/installed/libcap-ng-dev"
"'"$project"'/scripts/virtiofsd"'
expect virtiofsd-cargo-fails 101 && pass "virtiofsd-cargo-fails: 101, cargo's status"

# --- apt helpers ---------------------------------------------------------------
strict pkg-installed 'echo 1.0 >"$FAKE_STATE/installed/present"
isola_pkg_installed present
if isola_pkg_installed absent; then exit 9; fi'
expect pkg-installed 0 && pass "pkg-installed: installed and not installed told apart"

# An install that fails once (lists naming versions the mirror dropped) is
# retried after a forced apt-get update; lists count as fresh (the stamp).
strict apt-install-retry 'echo 1 >"$FAKE_STATE/install-failures"; isola_apt_install pkg-a pkg-b'
if expect apt-install-retry 0; then
    log=$(cat "$state/apt-get.log")
    want_log="apt-get install -y -qq --no-install-recommends pkg-a pkg-b
apt-get update -qq
apt-get install -y -qq --no-install-recommends pkg-a pkg-b"
    if [ "$log" = "$want_log" ]; then pass "apt-install-retry: install, update, install"; else
        fail apt-install-retry "apt-get calls: $log"; fi
fi

# Failing twice: the caller sees the failure (apt-get's 100).
strict apt-install-fails 'echo 2 >"$FAKE_STATE/install-failures"; isola_apt_install pkg-a'
expect apt-install-fails 100 && pass "apt-install-fails: 100"

# Stale lists (no stamp, no lists): refreshed before the install.
strict apt-install-stale 'rm -f "$ISOLA_APT_STAMP"; isola_apt_install pkg-a'
if expect apt-install-stale 0; then
    if [ "$(head -n 1 "$state/apt-get.log")" = "apt-get update -qq" ]; then pass "apt-install-stale: lists refreshed first"; else
        fail apt-install-stale "apt-get calls: $(cat "$state/apt-get.log")"; fi
fi

# --- isola_emulator_qemu -------------------------------------------------------
# The system's QEMU is new enough: its path.
strict qemu-system 'echo 10.0.2 >"$FAKE_STATE/qemu-version"; isola_emulator_qemu'
if expect qemu-system 0; then
    if [ "$out" = "$fakes/qemu-system-x86_64" ]; then pass "qemu-system: the system's QEMU 10"; else
        fail qemu-system "printed '$out'"; fi
fi

# Too old, but the backports one is in the cache already: no apt-get.
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
if [ -n "$codename" ]; then
    strict qemu-cached 'echo "7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)" >"$FAKE_STATE/qemu-version"
dir=$ISOLA_TOOLS/qemu-'"$codename"'-backports/bin
mkdir -p "$dir"
printf "#!/bin/sh\necho \"QEMU emulator version 10.0.2\"\n" >"$dir/qemu-system-x86_64"
chmod +x "$dir/qemu-system-x86_64"
isola_emulator_qemu'
    if expect qemu-cached 0; then
        if [ "$out" = "$state/cache/tools/qemu-$codename-backports/bin/qemu-system-x86_64" ] && [ ! -s "$state/apt-get.log" ]; then
            pass "qemu-cached: the cached backports QEMU"
        else
            fail qemu-cached "printed '$out'; apt-get: $(cat "$state/apt-get.log")"
        fi
    fi
fi

# --- isola_containerd -----------------------------------------------------------
# fake_containerd DIR VERSION-LINE: DIR/containerd answering --version so.
fake_containerd='fake_containerd() { mkdir -p "$1"; printf "#!/bin/sh\necho \"%s\"\n" "$2" >"$1/containerd"; chmod +x "$1/containerd"; }'
# A newer point release of the pinned major in the cache: taken, no apt-get.
strict containerd-cached "$fake_containerd"'
fake_containerd "$ISOLA_TOOLS/containerd-2/bin" "containerd github.com/containerd/containerd/v2 v2.2.1 0123abc"
isola_containerd 2'
if expect containerd-cached 0; then
    if [ "$out" = "$state/cache/tools/containerd-2/bin" ] && [ ! -s "$state/apt-get.log" ]; then
        pass "containerd-cached: a cached 2.2.1 serves 2"
    else
        fail containerd-cached "printed '$out'; apt-get: $(cat "$state/apt-get.log")"
    fi
fi
# 1.6 is the machine's: one on PATH of another version is an error, no fetch.
strict containerd-system-other "$fake_containerd"'
fake_containerd "$FAKE_STATE/bin" "containerd github.com/containerd/containerd 1.7.24~ds1 1.7.24~ds1-6"
PATH=$FAKE_STATE/bin:$PATH isola_containerd 1.6'
if expect containerd-system-other 1; then
    if [[ "$err" == *"is 1.7.24~ds1, not 1.6"* ]] && [ ! -s "$state/apt-get.log" ]; then
        pass "containerd-system-other: 1.7 on PATH is not 1.6"
    else
        fail containerd-system-other "stderr does not name the versions"
    fi
fi
# A cached one of another major: fetched anew from unstable; the fake
# apt-get downloads nothing, which is named.
strict containerd-refetch "$fake_containerd"'
fake_containerd "$ISOLA_TOOLS/containerd-2/bin" "containerd github.com/containerd/containerd/v3 v3.0.0 0123abc"
isola_containerd 2'
if expect containerd-refetch 1; then
    if grep -q "download.*containerd/unstable" "$state/apt-get.log" && [[ "$err" == *"download of containerd from unstable left no .deb"* ]]; then
        pass "containerd-refetch: 3.0 in the cache is not 2: fetched, and the empty download named"
    else
        fail containerd-refetch "apt-get: $(cat "$state/apt-get.log")"
    fi
fi
strict containerd-unknown 'isola_containerd 1.5'
if expect containerd-unknown 1; then
    if [[ "$err" == *"no containerd '1.5'"* ]]; then pass "containerd-unknown: 1.5 refused"; else
        fail containerd-unknown "stderr does not name it"; fi
fi

# --- isola_apparmor ---------------------------------------------------------------
# fake_apparmor ROOT: a parser answering --version and Debian's tunables.
fake_apparmor='fake_apparmor() { mkdir -p "$1/sbin" "$1/etc/apparmor.d/tunables"; printf "#!/bin/sh\necho AppArmor parser version 3.0.8\n" >"$1/sbin/apparmor_parser"; chmod +x "$1/sbin/apparmor_parser"; : >"$1/etc/apparmor.d/tunables/global"; }'
codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
strict apparmor-cached "$fake_apparmor"'
fake_apparmor "$ISOLA_TOOLS/apparmor-'"$codename"'/root"
isola_apparmor'
if expect apparmor-cached 0; then
    if [ "$out" = "$state/cache/tools/apparmor-$codename/root" ] && [ ! -s "$state/apt-get.log" ]; then
        pass "apparmor-cached: the cached parser and policy files serve"
    else
        fail apparmor-cached "printed '$out'; apt-get: $(cat "$state/apt-get.log")"
    fi
fi
# Without its policy files the cached root is fetched anew; the fake
# apt-get downloads nothing, which is named.
strict apparmor-refetch "$fake_apparmor"'
fake_apparmor "$ISOLA_TOOLS/apparmor-'"$codename"'/root"
rm -r "$ISOLA_TOOLS/apparmor-'"$codename"'/root/etc"
isola_apparmor'
if expect apparmor-refetch 1; then
    if grep -q "download.*apparmor/$codename" "$state/apt-get.log" && [[ "$err" == *"download of apparmor from $codename left no .deb"* ]]; then
        pass "apparmor-refetch: a cache without tunables is fetched again, the empty download named"
    else
        fail apparmor-refetch "apt-get: $(cat "$state/apt-get.log")"
    fi
fi

# --- isola_cargo_target --------------------------------------------------------
# A checkout without target: a link to the cache's build directory.
strict cargo-target-new 'mkdir -p "$FAKE_STATE/co" && isola_cargo_target "$FAKE_STATE/co"'
if expect cargo-target-new 0; then
    if [ "$(readlink "$state/co/target")" = "$state/cache/cargo-target" ] && [ -d "$state/cache/cargo-target" ]; then
        pass "cargo-target-new: target links to the cache's directory"
    else
        fail cargo-target-new "target is $(ls -ld "$state/co/target" 2>&1)"
    fi
fi
# A checkout's own target directory is kept, and nothing is made in the cache.
strict cargo-target-own 'mkdir -p "$FAKE_STATE/co/target" && isola_cargo_target "$FAKE_STATE/co"'
if expect cargo-target-own 0; then
    if [ -d "$state/co/target" ] && [ ! -L "$state/co/target" ] && [ ! -e "$state/cache/cargo-target" ]; then
        pass "cargo-target-own: a target directory of the checkout stays"
    else
        fail cargo-target-own "target is $(ls -ld "$state/co/target" 2>&1)"
    fi
fi
# A link whose directory is gone (the cache was removed) gets its directory.
strict cargo-target-dangling 'mkdir -p "$FAKE_STATE/co" && ln -s "$FAKE_STATE/elsewhere/t" "$FAKE_STATE/co/target" && isola_cargo_target "$FAKE_STATE/co"'
if expect cargo-target-dangling 0; then
    if [ -d "$state/elsewhere/t" ] && [ "$(readlink "$state/co/target")" = "$state/elsewhere/t" ]; then
        pass "cargo-target-dangling: the link's directory is made again"
    else
        fail cargo-target-dangling "elsewhere: $(ls -la "$state/elsewhere" 2>&1)"
    fi
fi

# A checkout that did not use the shared directory last has its files made
# newer than any output there (cargo would take its older sources for
# built); the last one's are left alone.
strict cargo-target-switch '
mkdir -p "$FAKE_STATE/a/src" "$FAKE_STATE/b/src"
echo a >"$FAKE_STATE/a/src/lib.rs"
echo b >"$FAKE_STATE/b/src/lib.rs"
touch -d "2000-01-01" "$FAKE_STATE/a/src/lib.rs" "$FAKE_STATE/b/src/lib.rs"
isola_cargo_target "$FAKE_STATE/a"
isola_cargo_target "$FAKE_STATE/b"
touch -d "2000-01-01" "$FAKE_STATE/b/src/lib.rs"
isola_cargo_target "$FAKE_STATE/b"'
if expect cargo-target-switch 0; then
    a=$(stat -c %Y "$state/a/src/lib.rs") b=$(stat -c %Y "$state/b/src/lib.rs")
    if [ "$a" -gt 946684800 ] && [ "$b" -eq 946684800 ] &&
        [ "$(cat "$state/cache/cargo-target/.isola-checkout")" = "$(cd "$state/b" && pwd -P) $(stat -c '%i %z' "$state/b/target")" ] &&
        [ "$(readlink "$state/b/target")" = "$state/cache/cargo-target" ]; then
        pass "cargo-target-switch: a checkout new to the directory is touched, its last user is not"
    else
        fail cargo-target-switch "mtimes a=$a b=$b, last=$(cat "$state/cache/cargo-target/.isola-checkout" 2>&1)"
    fi
fi

# The same path made again (a new link): touched again, though it was the
# last; a nested build directory (fuzz/target) is not touched.
strict cargo-target-again '
mkdir -p "$FAKE_STATE/c/src" "$FAKE_STATE/c/fuzz/target"
echo c >"$FAKE_STATE/c/src/lib.rs"
echo o >"$FAKE_STATE/c/fuzz/target/out"
isola_cargo_target "$FAKE_STATE/c"
rm "$FAKE_STATE/c/target"
touch -d "2000-01-01" "$FAKE_STATE/c/src/lib.rs" "$FAKE_STATE/c/fuzz/target/out"
isola_cargo_target "$FAKE_STATE/c"'
if expect cargo-target-again 0; then
    c=$(stat -c %Y "$state/c/src/lib.rs") o=$(stat -c %Y "$state/c/fuzz/target/out")
    if [ "$c" -gt 946684800 ] && [ "$o" -eq 946684800 ]; then
        pass "cargo-target-again: a checkout made again is touched, fuzz/target is not"
    else
        fail cargo-target-again "mtimes src=$c fuzz/target=$o"
    fi
fi

if [ $failures -gt 0 ]; then
    echo "lib-helpers: $failures failures" >&2
    exit 1
fi
echo "lib-helpers: all passed"
