# shellcheck shell=bash
# Sourced by the script tests in tests/scripts: `project` (the checkout),
# `tmp` (a directory removed on exit), `fail MSG` (counts a failure and
# goes on) and `finish NAME` (exits 1 naming the failures, if any).
set -euo pipefail
# shellcheck disable=SC2034 # used by the scripts that source this
project=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
failures=0
fail() {
    echo "FAIL: $*" >&2
    failures=$((failures + 1))
}
finish() {
    if [ "$failures" -ne 0 ]; then
        echo "$1: $failures failure(s)" >&2
        exit 1
    fi
    echo "$1: all passed"
}
