# shellcheck shell=bash
# Helpers shared by the project's install paths (the Makefile's deps,
# guest-kernel/build.sh, tests/kvm-host/setup-*). Source it; it sets no
# shell options of its own.
#
# Two rules these helpers keep, because breaking them passed CI on a warm
# machine and failed on a fresh one:
#   - never pipe a command into grep -q or head under pipefail: grep/head
#     exit early, the command dies of SIGPIPE, and pipefail reports 141.
#     Capture the output first, then test it (make lint checks this).
#   - a look-up or install against apt's package lists needs lists that
#     exist and are recent: run `apt-get update` (once) when they are not,
#     and once more before giving up on an install.

ISOLA_CACHE=${ISOLA_CACHE:-$HOME/.cache/isola}
# virtiofsd for the emulated KVM host's root file system and for sandboxes:
# the Rust one, at a version we tested, in the cache (never Debian QEMU 7.2's
# C virtiofsd, which shares no root file system with virtme-ng).
ISOLA_VIRTIOFSD_VERSION=1.14.0
ISOLA_TOOLS=$ISOLA_CACHE/tools

# Cargo's build directory in the cache, outside the checkout, as the guest
# kernel's build is: a checkout without a `target` of its own gets
# `target` -> $ISOLA_CARGO_TARGET (default $ISOLA_CACHE/cargo-target), so a
# new clone on this machine (CI's, a second work tree) compiles the
# workspace's own crates, not its ~300 dependencies again (cargo names a
# crate's artifacts after its package, profile and flags, not after where
# the checkout lies). A `target` that exists (a directory, or a link, even
# one whose directory was removed) is kept.
# Cargo finds a crate's sources changed by their mtimes against its
# outputs', so in a shared directory sources older than another checkout's
# build would pass as built: a checkout that was not the last to use it
# has its files made newer than any output first (a new clone's are
# already). One build at a time per machine: checkouts sharing it share
# target/release's binaries.
isola_cargo_target() {
    local project link dir last me
    project=$(cd "$1" && pwd -P)
    link=$project/target
    if [ -L "$link" ]; then
        dir=$(readlink "$link")
        [[ "$dir" = /* ]] || dir=$project/$dir
        mkdir -p "$dir"
    elif [ -e "$link" ]; then
        return 0
    else
        dir=${ISOLA_CARGO_TARGET:-$ISOLA_CACHE/cargo-target}
        mkdir -p "$dir"
        ln -s "$dir" "$link"
        echo "make: cargo builds in $dir (target links there)" >&2
    fi
    # The checkout and its link's inode and change time: a checkout made
    # again at the same path (its files restored with old mtimes) is
    # another checkout.
    me="$project $(stat -c '%i %z' "$link")"
    last=$dir/.isola-checkout
    if [ "$(cat "$last" 2>/dev/null || true)" != "$me" ]; then
        # Every build directory (fuzz/ has its own target), build/ and .git
        # left out.
        if ! find "$project" \( -name target -o -path "$project/build" -o -path "$project/.git" \) \
            -prune -o -type f -exec touch -c {} +; then
            echo "make: cannot touch the files of $project (another user's?): cargo, sharing $dir, could take another checkout's build for this one's" >&2
            return 1
        fi
        echo "$me" >"$last"
    fi
}

isola_as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -E "$@"; fi
}

# True when PKG is installed (dpkg's status, not just known).
isola_pkg_installed() {
    local status
    status=$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) || return 1
    [ "$status" = "install ok installed" ]
}

# Prints the candidate version apt would install for PKG; false if none.
isola_apt_candidate() {
    local policy version
    policy=$(apt-cache policy "$1" 2>/dev/null) || return 1
    version=$(sed -n 's/^ *Candidate: *//p' <<<"$policy")
    case "$version" in
    '' | '(none)') return 1 ;;
    esac
    echo "$version"
}

# apt's lists, and our stamp of the last `apt-get update` we ran (apt leaves
# an unchanged list's mtime alone, so the lists' own age can mislead).
ISOLA_APT_LISTS=${ISOLA_APT_LISTS:-/var/lib/apt/lists}
ISOLA_APT_STAMP=${ISOLA_APT_STAMP:-$ISOLA_CACHE/apt-updated}

# True when apt's package lists can be trusted: we refreshed them in the
# last day, or every configured source has a list and one is less than a
# day old. (debootstrap leaves a fresh list of the main suite and none for
# -updates and -security: that is not fresh.)
isola_apt_lists_fresh() {
    [ -n "$(find "$ISOLA_APT_STAMP" -mmin -1440 -print 2>/dev/null)" ] && return 0
    local targets f
    # shellcheck disable=SC2016 # $(FILENAME) is apt's format field, not ours
    targets=$(apt-get indextargets --no-release-info --format '$(FILENAME)' \
        'Identifier: Packages' "Architecture: $(dpkg --print-architecture)" 2>/dev/null) || return 1
    while IFS= read -r f; do
        [ -n "$f" ] || continue
        # A configured source that was never fetched (lists may be .lz4).
        compgen -G "$ISOLA_APT_LISTS/${f##*/}*" >/dev/null || return 1
    done <<<"$targets"
    [ -n "$(find "$ISOLA_APT_LISTS" -maxdepth 1 -name '*_Packages*' -mmin -1440 -print -quit 2>/dev/null)" ]
}

# apt-get update, unless one ran in the last minute (several install steps
# of one `make` share it) or -f forces it.
isola_apt_update() {
    if [ "${1:-}" != -f ] && [ -n "$(find "$ISOLA_APT_STAMP" -mmin -1 -print 2>/dev/null)" ]; then return 0; fi
    echo "isola: refreshing apt's package lists (apt-get update)" >&2
    if isola_as_root apt-get update -qq >&2; then
        mkdir -p "$(dirname "$ISOLA_APT_STAMP")" && touch "$ISOLA_APT_STAMP"
    else
        echo "isola: warning: apt-get update failed" >&2
    fi
}

# apt-get install PKG..., refreshing stale package lists first, and once
# more if the install fails (lists that name versions the mirror dropped).
isola_apt_install() {
    echo "isola: installing $* (apt-get)" >&2
    isola_apt_lists_fresh || isola_apt_update
    local cmd=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@")
    if isola_as_root "${cmd[@]}" >&2; then return 0; fi
    echo "isola: apt-get install $* failed; refreshing the package lists and trying once more" >&2
    isola_apt_update -f
    isola_as_root "${cmd[@]}" >&2
}

# isola_with_progress LABEL [--log FILE] CMD...
# Runs CMD (its output into FILE if given), printing "LABEL: still working,
# N s[, PROGRESS]" on stderr every ISOLA_PROGRESS_EVERY seconds (default 30)
# while it runs. PROGRESS is what the function named by ISOLA_PROGRESS_FN
# prints, if set. Returns CMD's status and nothing else, whatever the
# caller's `set -e`: stopping the ticker (kill, then wait, which reports
# 143 for a killed job) must never become the caller's status.
isola_with_progress() {
    local label=$1 logfile=
    shift
    if [ "${1:-}" = --log ]; then
        logfile=$2
        shift 2
    fi
    local every=${ISOLA_PROGRESS_EVERY:-30} start status=0 ticker
    start=$(date +%s)
    # The ticker sleeps in a child of its own and takes that child with it
    # when stopped: an orphaned sleep would hold the caller's stdout and
    # stderr open (a `$(...)` around the caller would wait for it). Its
    # stdout is not the caller's: progress goes to stderr only.
    (
        # shellcheck disable=SC2046 # jobs -p: one pid per word
        trap 'kill $(jobs -p) 2>/dev/null; exit 0' TERM
        while :; do
            sleep "$every" &
            wait "$!" || exit 0
            extra=
            if [ -n "${ISOLA_PROGRESS_FN:-}" ]; then extra=", $("$ISOLA_PROGRESS_FN" 2>/dev/null)"; fi
            echo "$label: still working, $(($(date +%s) - start)) s$extra" >&2
        done
    ) >/dev/null &
    ticker=$!
    if [ -n "$logfile" ]; then
        "$@" >"$logfile" 2>&1 || status=$?
    else
        "$@" || status=$?
    fi
    kill "$ticker" 2>/dev/null || true
    wait "$ticker" 2>/dev/null || true
    return "$status"
}

# Path of the Rust virtiofsd at ISOLA_VIRTIOFSD_VERSION, installing it into
# the cache (cargo install --locked, about 2 minutes) if missing.
isola_virtiofsd() {
    local bin=$ISOLA_TOOLS/bin/virtiofsd version=
    if [ -x "$bin" ]; then version=$("$bin" --version 2>/dev/null) || version=; fi
    if [[ "$version" != *" $ISOLA_VIRTIOFSD_VERSION"* ]]; then
        local need=()
        command -v pkg-config >/dev/null || need+=(pkg-config)
        isola_pkg_installed libseccomp-dev || need+=(libseccomp-dev)
        isola_pkg_installed libcap-ng-dev || need+=(libcap-ng-dev)
        if [ ${#need[@]} -gt 0 ]; then isola_apt_install "${need[@]}"; fi
        echo "isola: installing virtiofsd $ISOLA_VIRTIOFSD_VERSION into $ISOLA_TOOLS (cargo install, about 2 minutes)" >&2
        isola_with_progress "isola: cargo install virtiofsd" \
            cargo install --locked --quiet --root "$ISOLA_TOOLS" virtiofsd --version "$ISOLA_VIRTIOFSD_VERSION" >&2
    fi
    echo "$bin"
}

# isola_debian_unpack SUITE DIR PKG...: downloads the packages PKG from
# Debian's SUITE (bookworm-backports, trixie, unstable) and unpacks them
# into DIR, made anew; the .debs stay beside it in $(dirname DIR)/debs for a
# caller that reads their control fields. Nothing is installed: apt works
# on a private state in the cache that knows only SUITE, so the machine's
# sources, lists and caches are left alone.
isola_debian_unpack() {
    local suite=$1 dest=$2
    shift 2
    local apt=$ISOLA_CACHE/apt-$suite
    mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial"
    local keyring=/usr/share/keyrings/debian-archive-keyring.gpg signed=
    [ -r "$keyring" ] && signed=" [signed-by=$keyring]"
    echo "deb$signed http://deb.debian.org/debian $suite main" >"$apt/sources.list"
    local opts=(-o "Dir::Etc::sourcelist=$apt/sources.list" -o Dir::Etc::sourceparts=-
        -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache" -o APT::Sandbox::User=root)
    isola_as_root apt-get "${opts[@]}" update -qq >&2 || {
        echo "isola: apt-get update of $suite failed" >&2
        return 1
    }
    local debs
    debs=$(dirname "$dest")/debs
    rm -rf "$debs" "$dest"
    mkdir -p "$debs" "$dest"
    local pkgs=("$@")
    (cd "$debs" && isola_as_root apt-get "${opts[@]}" download -qq "${pkgs[@]/%//$suite}" >&2) || {
        echo "isola: cannot download ${pkgs[*]} from $suite" >&2
        return 1
    }
    local pkg deb
    for pkg in "${pkgs[@]}"; do
        if ! compgen -G "$debs/${pkg}_*.deb" >/dev/null; then
            echo "isola: apt-get download of $pkg from $suite left no .deb" >&2
            return 1
        fi
    done
    for deb in "$debs"/*.deb; do
        dpkg-deb -x "$deb" "$dest" || {
            echo "isola: cannot unpack $deb" >&2
            return 1
        }
    done
}

# The version that `BIN --version` prints as its third word, without a
# leading v or a trailing comma (containerd: "containerd
# github.com/containerd/containerd/v2 v2.1.9 REV" -> 2.1.9; Docker: "Docker
# version 28.5.2+dfsg4, build REV" -> 28.5.2+dfsg4), or failure.
isola_tool_version() {
    local out
    out=$("$1" --version 2>/dev/null) || return 1
    out=$(awk '{print $3; exit}' <<<"$out")
    out=${out#v}
    out=${out%,}
    [[ "$out" =~ ^[0-9]+\.[0-9]+ ]] || return 1
    echo "$out"
}

# isola_suite_tools DIR PREFIX SUITE PKG... -- TOOL...: tools from Debian's
# SUITE, unpacked into DIR (never installed), pinned by version PREFIX
# ("1.7.", "2.", "28."): a newer point release is accepted, because the
# suites, unstable above all, drop old versions. Prints DIR/bin, which
# links each TOOL (from the packages' /usr/bin or /usr/sbin); the first
# TOOL's version is the one checked. Unpacks only when DIR/bin's is not a
# PREFIX version.
isola_suite_tools() {
    local dir=$1 prefix=$2 suite=$3 pkgs=() wanted=() version
    shift 3
    while [ $# -gt 0 ] && [ "$1" != -- ]; do
        pkgs+=("$1")
        shift
    done
    [ $# -gt 0 ] && shift
    wanted=("$@")
    if version=$(isola_tool_version "$dir/bin/${wanted[0]}") && [[ "$version" == "$prefix"* ]]; then
        echo "$dir/bin"
        return 0
    fi
    echo "isola: fetching ${pkgs[*]} (${wanted[0]} ${prefix}x) from Debian $suite into $dir" >&2
    rm -rf "$dir.new"
    isola_debian_unpack "$suite" "$dir.new/root" "${pkgs[@]}" || return 1
    rm -rf "$dir.new/debs"
    mkdir -p "$dir.new/bin"
    local tool path
    for tool in "${wanted[@]}"; do
        for path in usr/bin usr/sbin; do
            [ -x "$dir.new/root/$path/$tool" ] || continue
            ln -s "$dir/root/$path/$tool" "$dir.new/bin/$tool"
            break
        done
        [ -L "$dir.new/bin/$tool" ] || {
            echo "isola: Debian $suite's ${pkgs[*]} have no $tool" >&2
            return 1
        }
    done
    rm -rf "$dir"
    mv "$dir.new" "$dir"
    if ! version=$(isola_tool_version "$dir/bin/${wanted[0]}") || [[ "$version" != "$prefix"* ]]; then
        echo "isola: Debian $suite's ${wanted[0]} is ${version:-not runnable here}, not ${prefix}x" >&2
        return 1
    fi
    echo "isola: ${wanted[0]} $version in $dir/bin" >&2
    echo "$dir/bin"
}

# The containerd a node runs, by minor (1.6, 1.7) or major (2) version:
# prints the directory that holds its containerd, ctr and
# containerd-shim-runc-v2. 1.6 is the machine's own (bookworm's, which
# tests/kvm-host/setup-e2e installs); 1.7 comes from Debian trixie, 2 from
# unstable (isola_suite_tools).
isola_containerd() {
    local want=$1 bin version
    case "$want" in
    1.6)
        bin=$(command -v containerd 2>/dev/null) || {
            echo "isola: no containerd on PATH (tests/kvm-host/setup-e2e installs Debian's $want)" >&2
            return 1
        }
        bin=$(dirname "$bin")
        if version=$(isola_tool_version "$bin/containerd") && [[ "$version" == 1.6.* ]]; then
            echo "$bin"
            return 0
        fi
        echo "isola: the containerd in $bin is ${version:-unknown}, not $want" >&2
        return 1
        ;;
    1.7 | 2)
        local suite=trixie
        [ "$want" = 2 ] && suite=unstable
        isola_suite_tools "$ISOLA_TOOLS/containerd-$want" "$want." "$suite" containerd \
            -- containerd ctr containerd-shim-runc-v2
        ;;
    *)
        echo "isola: no containerd '$want': 1.6, 1.7 or 2" >&2
        return 1
        ;;
    esac
}

# Docker's daemon and client, major version ISOLA_DOCKER_MAJOR, from Debian
# unstable (isola_suite_tools): prints a directory with dockerd, docker,
# docker-proxy and docker-init. dockerd needs a containerd (tests start
# their own: --containerd), runc and iptables from the machine.
ISOLA_DOCKER_MAJOR=28
isola_docker() {
    isola_suite_tools "$ISOLA_TOOLS/docker-$ISOLA_DOCKER_MAJOR" "$ISOLA_DOCKER_MAJOR." unstable \
        docker.io docker-cli tini-static -- dockerd docker docker-proxy docker-init
}

# The machine's Debian release (bookworm, ...), empty when it has none.
isola_debian_codename() {
    (. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}") || true
}

# The QEMU that emulates the KVM host (tests/kvm-host/run), installing it
# into the cache if missing; prints the path of a qemu-system-x86_64 to
# give virtme-ng. Debian bookworm's QEMU 7.2 does not apply the SVM
# intercept of XSETBV to a nested guest: the guest's XCR0 changes behind
# KVM's back, so every guest kernel finds its XSAVE sizes inconsistent
# (a WARNING at boot, XSAVE disabled) and about one boot in a few dozen
# hangs right there. QEMU 10 intercepts it (tested). Where the system QEMU
# is older than that, the one from the release's backports is unpacked
# into the cache (the machine's own QEMU stays as it is).
ISOLA_QEMU_MIN_MAJOR=10
isola_emulator_qemu() {
    local system version major
    system=$(command -v qemu-system-x86_64 2>/dev/null) || system=
    if [ -n "$system" ]; then
        version=$("$system" --version 2>/dev/null) || version=
        major=$(sed -n 's/^QEMU emulator version \([0-9]*\)\..*/\1/p' <<<"$version")
        if [ -n "$major" ] && [ "$major" -ge "$ISOLA_QEMU_MIN_MAJOR" ]; then
            echo "$system"
            return 0
        fi
    fi
    local codename
    codename=$(isola_debian_codename)
    if [ -z "$codename" ]; then
        echo "isola: no QEMU >= $ISOLA_QEMU_MIN_MAJOR and no Debian release to fetch one from" >&2
        return 1
    fi
    local dir=$ISOLA_TOOLS/qemu-$codename-backports
    if [ -x "$dir/bin/qemu-system-x86_64" ] && "$dir/bin/qemu-system-x86_64" --version >/dev/null 2>&1; then
        echo "$dir/bin/qemu-system-x86_64"
        return 0
    fi
    echo "isola: fetching QEMU from $codename-backports into $dir (the system's is ${major:-missing}, older than $ISOLA_QEMU_MIN_MAJOR)" >&2
    rm -rf "$dir.new"
    isola_debian_unpack "$codename-backports" "$dir.new/root" \
        qemu-system-x86 qemu-system-common qemu-system-data seabios || return 1
    # Its libraries come from the release itself: install those missing.
    local depends name need=()
    depends=$(dpkg-deb -f "$dir.new/debs"/qemu-system-x86_*.deb Depends)
    while IFS= read -r name; do
        case "$name" in '' | qemu-* | seabios | ipxe-qemu) continue ;; esac
        isola_pkg_installed "$name" || need+=("$name")
    done < <(tr ',' '\n' <<<"$depends" | sed 's/|.*//; s/(.*//; s/[[:space:]]//g')
    if [ ${#need[@]} -gt 0 ]; then isola_apt_install "${need[@]}"; fi
    rm -rf "$dir.new/debs"
    mkdir -p "$dir.new/bin"
    # Its firmware and option ROMs first, before the system QEMU's.
    cat >"$dir.new/bin/qemu-system-x86_64" <<WRAPPER
#!/bin/sh
exec "$dir/root/usr/bin/qemu-system-x86_64" -L "$dir/root/usr/share/qemu" -L "$dir/root/usr/share/seabios" "\$@"
WRAPPER
    chmod +x "$dir.new/bin/qemu-system-x86_64"
    rm -rf "$dir"
    mv "$dir.new" "$dir"
    if ! version=$("$dir/bin/qemu-system-x86_64" --version 2>&1); then
        echo "isola: the QEMU unpacked into $dir does not run: $version" >&2
        return 1
    fi
    echo "isola: ${version%%$'\n'*}" >&2
    echo "$dir/bin/qemu-system-x86_64"
}

# isola_descendants PID: every descendant of PID, one pid a line, children
# before their own children. Read from /proc, not ps: a fresh machine
# (debootstrap's minbase) has no procps, and tests/kvm-host/run's watchdog,
# finding nothing to kill, would wait forever on a wedged emulated host.
isola_descendants() {
    local stat line pid ppid rest
    for stat in /proc/[0-9]*/stat; do
        read -r line 2>/dev/null <"$stat" || continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        rest=${line##*) }
        ppid=${rest#* }
        ppid=${ppid%% *}
        [ "$ppid" = "$1" ] || continue
        pid=${stat#/proc/}
        pid=${pid%/stat}
        echo "$pid"
        isola_descendants "$pid"
    done
    return 0
}

# AppArmor's parser and its policy files (tunables, abstractions) from the
# machine's Debian release, unpacked into the cache, not installed: prints
# a root with sbin/apparmor_parser and etc/apparmor.d. The tests' AppArmor
# host (tests/kvm-host/apparmor-host) shows them to containerd and dockerd
# in the emulated KVM host, whose kernel has AppArmor enabled: they see an
# AppArmor node exactly when /sbin/apparmor_parser exists.
isola_apparmor() {
    local codename version
    codename=$(isola_debian_codename)
    if [ -z "$codename" ]; then
        echo "isola: no Debian release to fetch AppArmor's parser from" >&2
        return 1
    fi
    local dir=$ISOLA_TOOLS/apparmor-$codename
    if "$dir/root/sbin/apparmor_parser" --version >/dev/null 2>&1 && [ -r "$dir/root/etc/apparmor.d/tunables/global" ]; then
        echo "$dir/root"
        return 0
    fi
    echo "isola: fetching apparmor from Debian $codename into $dir" >&2
    rm -rf "$dir.new"
    isola_debian_unpack "$codename" "$dir.new/root" apparmor || return 1
    rm -rf "$dir.new/debs"
    if ! version=$("$dir.new/root/sbin/apparmor_parser" --version 2>/dev/null) ||
        [ ! -r "$dir.new/root/etc/apparmor.d/tunables/global" ]; then
        echo "isola: Debian $codename's apparmor has no runnable sbin/apparmor_parser and tunables: ${version:-}" >&2
        return 1
    fi
    rm -rf "$dir"
    mv "$dir.new" "$dir"
    echo "isola: ${version%%$'\n'*} in $dir/root" >&2
    echo "$dir/root"
}
