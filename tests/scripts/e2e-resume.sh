#!/usr/bin/env bash
# Tests tests/e2e/resume, which runs the e2e test binaries on the KVM host
# and, after a wedge, runs only the tests the wedged try did not finish.
# The binary is a real libtest one (rustc --test), so the test pins the
# libtest interface resume relies on: --list --format=terse, --exact with
# several names, "test NAME ... ok" lines written as each test ends.
# A "wedge" is the test `c_wedges` killing resume's whole process group on
# its first run, as the watchdog kills the emulated host: nothing after it
# runs or records anything.
set -euo pipefail
# shellcheck source=tests/scripts/testlib.sh
. "$(dirname "$0")/testlib.sh"

cat >"$tmp/t.rs" <<'EOF'
use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
fn state() -> PathBuf { PathBuf::from(std::env::var("STATE").unwrap()) }
fn ran(name: &str) {
    let mut f = OpenOptions::new().create(true).append(true).open(state().join("ran")).unwrap();
    writeln!(f, "{name}").unwrap();
}
#[test] fn a_passes() { ran("a_passes"); }
#[test] fn b_fails() { ran("b_fails"); panic!("b fails"); }
#[test] fn c_wedges() {
    ran("c_wedges");
    let mark = state().join("wedged");
    if !mark.exists() {
        std::fs::write(&mark, "").unwrap();
        // A wedge comes long after the output before it reached resume's
        // log: wait (bounded) until b's result line is there.
        if let Ok(log) = std::env::var("WEDGE_AFTER") {
            for _ in 0..500 {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                if text.contains("test b_fails ... FAILED\n") { break; }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        // SAFETY: signals our own process group, as a watchdog would.
        unsafe { libc_kill(0, 9); }
    }
}
#[test] fn d_after() { ran("d_after"); }
#[test] #[ignore] fn e_ignored() { ran("e_ignored"); }
extern "C" { #[link_name = "kill"] fn libc_kill(pid: i32, sig: i32) -> i32; }
EOF
rustc --edition 2021 --test -o "$tmp/suite-0123abcd" "$tmp/t.rs" 2>"$tmp/rustc.log" || {
    cat "$tmp/rustc.log" >&2
    exit 1
}

# resume PROGRESS ARGS...: in its own process group (setsid), so the wedge
# kills it and not this script. Prints the status.
resume() {
    local s=0
    STATE=$tmp/state WEDGE_AFTER=$tmp/p1/suite.log.1 setsid --wait "$project/tests/e2e/resume" "$@" >>"$tmp/stdout" 2>>"$tmp/stderr" || s=$?
    echo "$s"
}
ran() { tr '\n' ' ' <"$tmp/state/ran" | sed 's/ $//'; }

# --- A wedge, then a try that finishes the rest -------------------------------
mkdir -p "$tmp/state"
s=$(resume "$tmp/p1" 1 --include-ignored "$tmp/suite-0123abcd")
[ "$s" = 137 ] || fail "the wedged try should die by SIGKILL (137), got $s"
[ "$(ran)" = "a_passes b_fails c_wedges" ] || fail "first try ran '$(ran)'"
s=$(resume "$tmp/p1" 1 --include-ignored "$tmp/suite-0123abcd")
[ "$s" = 1 ] || fail "a failed test in an earlier try should make the run fail, got $s"
[ "$(ran)" = "a_passes b_fails c_wedges c_wedges d_after e_ignored" ] ||
    fail "the second try should run only c, d and e, ran '$(ran)'"
grep -q "suite: 2 of 5 tests finished in an earlier try; running the other 3" "$tmp/stderr" ||
    fail "the second try should say what it skips: $(cat "$tmp/stderr")"
grep -q "^    suite: b_fails$" "$tmp/stderr" || fail "the failed test should be named: $(cat "$tmp/stderr")"
# Each finished test says how long it took, and the binary in all.
grep -qE "^e2e: suite: d_after ok in [0-9]+ s$" "$tmp/stderr" ||
    fail "each test's time should be said: $(cat "$tmp/stderr")"
grep -qE "^e2e: suite: [0-9]+ s in all$" "$tmp/stderr" ||
    fail "the binary's time should be said: $(cat "$tmp/stderr")"
# A third try has nothing left to run and still reports the failure.
s=$(resume "$tmp/p1" 1 --include-ignored "$tmp/suite-0123abcd")
[ "$s" = 1 ] || fail "a third try should still fail, got $s"
[ "$(wc -l <"$tmp/state/ran")" = 6 ] || fail "a third try should run nothing"

# --- Name filters choose tests; without --include-ignored, e is skipped ------
rm -rf "$tmp/state" && mkdir -p "$tmp/state" && : >"$tmp/state/wedged"
s=$(resume "$tmp/p2" 2 a_ d_ "$tmp/suite-0123abcd")
[ "$s" = 0 ] || fail "passing tests chosen by filters should pass, got $s"
[ "$(ran)" = "a_passes d_after" ] || fail "filters a_ d_ ran '$(ran)'"
s=$(resume "$tmp/p3" 1 e_ "$tmp/suite-0123abcd")
[ "$s" = 0 ] || fail "an ignored test alone should pass, got $s"
[ "$(ran)" = "a_passes d_after" ] || fail "an ignored test ran without --include-ignored"

# A failed test's time is said too.
: >"$tmp/stderr"
s=$(resume "$tmp/p5" 1 b_ "$tmp/suite-0123abcd")
[ "$s" = 1 ] || fail "a failing test alone should fail, got $s"
grep -qE "^e2e: suite: b_fails FAILED in [0-9]+ s$" "$tmp/stderr" ||
    fail "a failed test's time should be said: $(cat "$tmp/stderr")"

# --- A binary that cannot list its tests fails the run -------------------------
printf '#!/bin/sh\nexit 3\n' >"$tmp/broken-0123abcd"
chmod +x "$tmp/broken-0123abcd"
s=$(resume "$tmp/p4" 1 a_ "$tmp/broken-0123abcd" "$tmp/suite-0123abcd")
[ "$s" = 1 ] || fail "a binary that cannot list its tests should fail the run, got $s"

finish e2e-resume
