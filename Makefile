# isola: build everything with `make`, test everything with `make test`.
# Targets install what they need (apt-get, pip, cargo install) on first use.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
CARGO ?= cargo
BUILD := build
# The agent is PID 1 of a guest with no libraries: a static glibc binary,
# built with the size-optimised `guest` profile (Cargo.toml).
# An explicit --target keeps +crt-static away from build scripts and
# proc-macros, which must stay dynamic.
GUEST_TARGET := x86_64-unknown-linux-gnu
AGENT := target/$(GUEST_TARGET)/guest/isola-agent
# The pod sandbox (pause) container's one binary, static like the agent.
PAUSE := target/$(GUEST_TARGET)/guest/pause
ROOTFS_BUILDER := target/release/rootfs-builder
# `none` (plain cpio) boots faster than gzip: see docs/architecture.md.
INITRD_COMPRESS ?= none

# Where `make install` puts isola (DESTDIR stages it elsewhere).
PREFIX ?= /usr/local
DESTDIR ?=

.PHONY: all binaries agent kernel initrd virtiofsd busybox-rootfs busybox-image pause-image hostile-initrd deps test checks unit-test lint e2e e2e-build e2e-run boot-demo bench bench-kernel fuzz install uninstall demo fresh-check clean

all: binaries kernel initrd virtiofsd

# What `make` needs beyond the Rust toolchain (scripts/deps).
deps:
	@scripts/deps

binaries: deps
	@echo "make: building host binaries (release)"
	$(CARGO) build --release --workspace --exclude isola-agent --exclude isola-hostile --bins

agent: deps
	@echo "make: building isola-agent (static, $(GUEST_TARGET))"
	RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --profile guest --target $(GUEST_TARGET) -p isola-agent
	@[[ "$$(file -b $(AGENT))" == *static* ]] || { echo "make: $(AGENT) is not statically linked" >&2; exit 1; }

kernel: deps
	guest-kernel/build.sh $(BUILD)/vmlinux $(BUILD)/bzImage

initrd: agent binaries
	@mkdir -p $(BUILD)
	$(ROOTFS_BUILDER) --agent $(AGENT) --output $(BUILD)/initrd.img --compress $(INITRD_COMPRESS)

# The Rust virtiofsd that sandboxes serve their Share with: cargo install
# --locked at the pinned version into $ISOLA_CACHE/tools, with its apt
# dependencies; nothing to do once installed.
virtiofsd: deps
	@scripts/virtiofsd >/dev/null

# The busybox root file system of the container tests (tests/rootfs/busybox).
busybox-rootfs:
	tests/rootfs/busybox $(BUILD)/busybox-rootfs

# The busybox OCI images for `ctr image import`, built from Debian's
# busybox-static without a registry, byte-for-byte reproducible
# (tests/images/busybox-oci); a stamp beside each skips a build already
# done. busybox.tar is docker.io/library/busybox:latest; busybox-user.tar,
# docker.io/library/busybox-user:latest, has User, WorkingDir and one more
# Env in its config, for the shim's tests that env, cwd and user come from
# the image.
busybox-image:
	tests/images/busybox-oci $(BUILD)/images/busybox.tar
	tests/images/busybox-oci --name docker.io/library/busybox-user:latest \
		--user 1000:1000 --workdir /home/user --env GREETING=hello-from-image \
		$(BUILD)/images/busybox-user.tar

# The pod sandbox image, isola.local/pause:1 (tests/images/pause-oci): the
# static pause binary (pause/) alone, for containerd's CRI `sandbox_image`
# where no registry is reachable.
pause-image: deps
	RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --profile guest --target $(GUEST_TARGET) -p isola-pause
	@[[ "$$(file -b $(PAUSE))" == *static* ]] || { echo "make: $(PAUSE) is not statically linked" >&2; exit 1; }
	tests/images/pause-oci $(PAUSE) $(BUILD)/images/pause.tar

# A test-only initrd whose init attacks its VMM (tests/hostile): never the
# product initrd.
HOSTILE := target/$(GUEST_TARGET)/release/isola-hostile
hostile-initrd: binaries
	RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --release --target $(GUEST_TARGET) -p isola-hostile
	@mkdir -p $(BUILD)
	$(ROOTFS_BUILDER) --agent $(HOSTILE) --output $(BUILD)/hostile-initrd.img --compress none

# The binaries, guest images, virtiofsd and configs into DESTDIR/PREFIX
# and /etc/isola (scripts/install: an existing /etc/isola/config.toml is
# never overwritten), and isola monitor's systemd unit
# (configs/isola-monitor.service, not enabled).
install: all
	PREFIX='$(PREFIX)' DESTDIR='$(DESTDIR)' scripts/install install

# Removes what `make install` installed (an admin's config stays).
uninstall:
	PREFIX='$(PREFIX)' DESTDIR='$(DESTDIR)' scripts/install uninstall

# `ctr run` of a busybox container in an isola microVM on a KVM host,
# through containerd (scripts/demo): staged under build/demo, or installed
# into PREFIX with INSTALL=1.
demo: all busybox-image
	tests/kvm-host/setup-e2e
	PREFIX='$(PREFIX)' INSTALL='$(INSTALL)' scripts/demo

# Everything the end-to-end suite runs is built first (all cores); then
# the suite runs in the KVM host while the static checks and unit tests run
# natively beside it: an emulated KVM host keeps one CPU busy and the
# other mostly idle. The checks build in a target directory of their own
# (cargo locks its build directory: the e2e runs' cargo would wait for
# theirs) with one job. Output lines interleave (make -O line).
test: e2e-build
	$(MAKE) -j2 --output-sync=line checks e2e-run

# `make lint` and `make unit-test` in target/checks, one cargo job.
checks:
	CARGO_TARGET_DIR='$(CURDIR)/target/checks' CARGO_BUILD_JOBS=1 $(MAKE) lint unit-test

# The project's shell scripts: every file under scripts/, guest-kernel/,
# tests/ and .ci/ whose first line names a shell.
SHELL_SCRIPTS = $(shell grep -lsE '^\#!.*\b(ba)?sh\b' scripts/* guest-kernel/* tests/*/* .ci/*)

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	shellcheck -x $(SHELL_SCRIPTS) scripts/lib.sh
	scripts/check-pipes $(SHELL_SCRIPTS) scripts/lib.sh Makefile

unit-test: deps
	tests/scripts/kernel-source.sh
	tests/scripts/lib-helpers.sh
	tests/scripts/e2e-resume.sh
	tests/scripts/kvm-exit-profile.sh
	$(CARGO) test --workspace --exclude isola-e2e
	$(CARGO) test -p isola-e2e --lib --bins

e2e: e2e-build
	$(MAKE) e2e-run

# What the end-to-end suite needs, built and set up.
e2e-build: all hostile-initrd busybox-rootfs busybox-image pause-image
	tests/kvm-host/setup-e2e
	$(CARGO) test -p isola-e2e --tests --no-run

# The end-to-end suite alone, on what e2e-build made.
e2e-run: deps
	tests/scripts/kvm-host-boot-failure.sh
	# An emulated KVM host has 1 CPU (with 2, nested guests crash now and
	# then), the hostile guest's floods get 2 (with 1 they starve the host's
	# heartbeat); docs/architecture.md, "KVM host for tests".
	E2E_EXCEPT=hostile,docker,pods tests/e2e/run --include-ignored
	ISOLA_KVM_HOST_CPUS=2 E2E_ONLY=hostile tests/e2e/run
	# The newer containerd a node runs (1.7 from Debian trixie, 2.x from
	# unstable, unpacked into the cache), each with its config form: on
	# 1.7 a part of the shim's and the CRI pod tests; on 2.x, on an
	# AppArmor host (tests/kvm-host/apparmor-host), every CRI pod test,
	# Docker 28 and another part of the shim's tests. All of them on every
	# version would pass 45 minutes.
	ISOLA_E2E_CONTAINERD=1.7 E2E_ONLY=containerd,pods tests/e2e/run $(E2E_ON_1_7)
	ISOLA_E2E_CONTAINERD=2 ISOLA_E2E_APPARMOR=1 E2E_ONLY=containerd,pods,docker tests/e2e/run $(E2E_ON_2)

# The tests (name filters) that run on containerd 1.7 and 2.x.
E2E_ON_1_7 = ctr_run_prints a_running_container_execs a_restarted_containerd \
	stdin_is_delivered an_isola_pod_runs isola_monitor_labels
E2E_ON_2 = ctr_run_prints a_running_container_execs terminals_with_cri task_events_reach setup_containerd \
	an_isola_pod_runs pods_reach_each_other host_network_pid_and_ipc ten_pods \
	volumes_host_path container_lifecycle docker_

# Boots the guest under QEMU microvm on a KVM host and prints the time to
# `isola-agent ready`.
boot-demo: all
	tests/kvm-host/setup-e2e
	$(CARGO) build --release -p isola-e2e --bin boot-demo
	tests/kvm-host/run target/release/boot-demo --runs $(or $(RUNS),1)

# Side by side on a KVM host, RUNS=N (default 5) each: isola-vmm against
# QEMU microvm (boot to agent ready, VMM memory overhead, start-up CPU),
# then `isola run` against runc (start, stdout throughput, virtio-fs read),
# then containerd's isola shim against its runc shim (`ctr run --rm` wall
# time, host PSS of an idle container and of 10 side by side; isola from
# its template and booting cold; samples and a PNG of their distributions
# in build/bench/shim.{json,png}), then CRI pods with handler isola
# against runc (pod start, 10 pods at once against one, host PSS of an
# idle pod, network throughput host ↔ pod with virtio-net offloads on and
# off and runc). Each saves its rows (every sample) in
# build/bench/*.rows.json; bench-table prints them as one table (medians,
# min-max, ratios, goals) and writes it to build/bench/table.md.
bench: all busybox-rootfs busybox-image pause-image
	tests/kvm-host/setup-e2e
	rm -f build/bench/*.rows.json build/bench/table.md
	tests/kvm-host/run target/release/bench --runs $(or $(RUNS),5)
	tests/kvm-host/run target/release/bench-containers --runs $(or $(RUNS),5)
	tests/kvm-host/run target/release/bench-shim --runs $(or $(RUNS),5)
	tests/kvm-host/run target/release/bench-pods --runs $(or $(RUNS),5)
	scripts/bench-plot build/bench/shim.json
	target/release/bench-table

# This build's guest kernel against another vmlinux (AGAINST=PATH, e.g. an
# earlier isola.config's build in ~/.cache/isola/kernel/): boot to agent
# ready and guest RAM touched, side by side (tests/e2e/src/bin/bench-kernel.rs).
bench-kernel: all
	@[ -n "$(AGAINST)" ] || { echo "make: bench-kernel needs AGAINST=PATH-OF-A-VMLINUX" >&2; exit 2; }
	tests/kvm-host/setup-e2e
	tests/kvm-host/run target/release/bench-kernel --runs $(or $(RUNS),5) --against '$(AGAINST)'

# Every fuzz target for FUZZ_SECONDS (default 60) each; `make test`
# replays the corpora on stable (unit tests).
fuzz: deps
	scripts/fuzz

# The README's two commands as a new user runs them on a new machine
# (scripts/fresh-check): in a throwaway Debian root made by debootstrap,
# from a clone of the committed HEAD, with an empty cache but for the guest
# kernel (FRESH_CHECK_FLAGS=--build-kernel builds that too). Each step's
# time, and the first failure with its log. Not part of `make test`: it
# takes an hour or more. Run it before resolving an issue that touches
# scripts/, the Makefile, guest-kernel/, tests/kvm-host/ or the README's
# commands.
fresh-check:
	scripts/fresh-check $(FRESH_CHECK_FLAGS)

# cargo clean of a target that links to the cache's build directory would
# remove only the link: the directory goes (every checkout's build there).
clean:
	if [ -L target ]; then rm -rf "$$(readlink -f target)"; fi
	$(CARGO) clean
	rm -rf $(BUILD)
