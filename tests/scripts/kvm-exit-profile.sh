#!/usr/bin/env bash
# Tests scripts/kvm-exit-profile's analysis on a made-up trace in tracefs'
# format: exits are paired with the same vCPU thread's next entry, nested
# page faults are split by address (guest RAM, the MMIO gap), and a trace
# without a pair is an error.
set -euo pipefail
# shellcheck source=tests/scripts/testlib.sh
. "$(dirname "$0")/testlib.sh"

cat >"$tmp/trace" <<'TRACE'
# tracer: nop
           vcpu0-439     [000] d..1.    10.000000: kvm_entry: vcpu 0, rip 0xffffffff81000000
           vcpu0-439     [000] .....    10.001000: kvm_exit: vcpu 0 reason npf rip 0x1 info1 0x0000000200000006 info2 0x000000000880bfe0 intr_info 0x800000f3 error_code 0x00000000
           vcpu1-440     [000] d..1.    10.001500: kvm_entry: vcpu 1, rip 0xffffffff81000000
           vcpu0-439     [000] .....    10.001100: kvm_page_fault: vcpu 0 rip 0x1 address 0x000000000880bfe0 error_code 0x200000006
           vcpu0-439     [000] d..1.    10.001200: kvm_entry: vcpu 0, rip 0x1
           vcpu0-439     [000] .....    10.002200: kvm_exit: vcpu 0 reason npf rip 0x1 info1 0x0000000100000004 info2 0x00000000d0000050 intr_info 0x00000000 error_code 0x00000000
           vcpu1-440     [000] .....    10.002500: kvm_exit: vcpu 1 reason msr rip 0x2 info1 0x0000000000000001 info2 0x0000000000000000 intr_info 0x00000000 error_code 0x00000000
           vcpu0-439     [000] d..1.    10.003200: kvm_entry: vcpu 0, rip 0x1
           vcpu1-440     [000] d..1.    10.002600: kvm_entry: vcpu 1, rip 0x2
           vcpu0-439     [000] .....    10.004200: kvm_exit: vcpu 0 reason npf rip 0x1 info1 0x0000000200000006 info2 0x000000000f93e000 intr_info 0x800000f3 error_code 0x00000000
           vcpu0-439     [000] d..1.    10.004600: kvm_entry: vcpu 0, rip 0x1
TRACE
out=$("$project/scripts/kvm-exit-profile" --analyse "$tmp/trace")
echo "$out"
# npf-ram: 0.2 ms + 0.4 ms; npf-mmio: 1.0 ms; msr (the other thread): 0.1 ms.
grep -Eq '^npf-ram +2 +0\.6 +300\.0$' <<<"$out" || fail "npf-ram row"
grep -Eq '^npf-mmio +1 +1\.0 +1000\.0$' <<<"$out" || fail "npf-mmio row"
grep -Eq '^msr +1 +0\.1 +100\.0$' <<<"$out" || fail "msr row"
grep -q "4 exits, 1.7 ms outside the guest" <<<"$out" || fail "the totals line"

printf '# tracer: nop\n' >"$tmp/empty"
if "$project/scripts/kvm-exit-profile" --analyse "$tmp/empty" 2>"$tmp/err"; then
    fail "a trace without exits passed"
fi
grep -q "no kvm_exit/kvm_entry pair" "$tmp/err" || fail "the empty trace's error: $(cat "$tmp/err")"

finish kvm-exit-profile
