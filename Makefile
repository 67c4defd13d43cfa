# husk: two commands on a fresh machine: `make demo`, then `make test`.
CARGO ?= cargo
GUEST := target/guest
AGENT_TARGET := x86_64-unknown-linux-gnu
AGENT := target/$(AGENT_TARGET)/release/husk-agent
# The agent is PID 1 of a guest with no libc: link it statically.
AGENT_RUSTFLAGS := -C target-feature=+crt-static
TEST_THREADS ?= 2
BENCH ?=

FUZZ_SECONDS ?= 60
FUZZ_TARGETS := stream_header agent_reply mmio_transport agent_plan seccomp_compile virtio_net

.PHONY: all deps tools kernel agent initramfs initramfs-hostile binaries net-bench build demo test bench conformance fuzz lint install clean

all: build

deps:
	scripts/install-deps.sh

tools: deps
	scripts/install-tools.sh

kernel: deps
	guest-kernel/build.sh $(GUEST)/vmlinux

agent:
	RUSTFLAGS="$(AGENT_RUSTFLAGS)" $(CARGO) build --release -p husk-agent --target $(AGENT_TARGET)

initramfs: agent deps
	strip -o target/husk-agent.stripped $(AGENT)
	agent/build-initramfs.sh target/husk-agent.stripped $(GUEST)/initramfs.img

# The hostile-guest tests' agent (tests/tests/hostile.rs): the `hostile-test`
# feature, built in a target directory of its own so the production agent
# above is never built with it, packed into an initramfs of its own.
HOSTILE_TARGET_DIR := target/hostile
HOSTILE_AGENT := $(HOSTILE_TARGET_DIR)/$(AGENT_TARGET)/release/husk-agent
initramfs-hostile: deps
	RUSTFLAGS="$(AGENT_RUSTFLAGS)" $(CARGO) build --release -p husk-agent --features hostile-test \
		--target $(AGENT_TARGET) --target-dir $(HOSTILE_TARGET_DIR)
	strip -o target/husk-agent-hostile.stripped $(HOSTILE_AGENT)
	agent/build-initramfs.sh target/husk-agent-hostile.stripped $(GUEST)/initramfs-hostile.img

# The whole workspace at once: the tests then reuse the same feature-unified
# dependencies instead of compiling them a second time.
binaries:
	$(CARGO) build --release --workspace --bins

# The network benchmark's tool runs in a busybox rootfs and in a bare
# initramfs with no libc: static, as the agent.
net-bench:
	RUSTFLAGS="$(AGENT_RUSTFLAGS)" $(CARGO) build --release -p husk-net-bench --target $(AGENT_TARGET)

build: tools kernel initramfs initramfs-hostile binaries net-bench

demo: build
	scripts/demo.sh

# Then the client tests a second time, each test served by a warm pool of
# its own (HUSK_TEST_POOL=1, tests/src/pool.rs): one test at a time, since
# the pool's configuration is named in the test process's environment.
POOL_CLIENT_TESTS = --test cli --test podman --test containerd --test cri
test: build
	$(CARGO) test --release --workspace --no-fail-fast -- --test-threads=$(TEST_THREADS)
	HUSK_TEST_POOL=1 $(CARGO) test --release -p husk-tests --no-fail-fast $(POOL_CLIENT_TESTS) -- --test-threads=1

# `make bench BENCH=containerd` runs only the named sections (see bench/run.py).
bench: build
	python3 bench/run.py $(BENCH)

# The OCI runtime-tools validation suite on husk and runc in the same run;
# regenerates the table in docs/oci-conformance.md.
conformance: build
	scripts/conformance.sh

# cargo-fuzz (nightly) on what the host decodes from a guest, on husk-vmm's
# virtio-mmio transport, and on the agent's spec planner and seccomp
# compiler (checked against a reference model): each target replays its regressions and corpus
# (fuzz/corpus, fuzz/regressions: in the repo), then fuzzes for FUZZ_SECONDS.
# A crash stops the run and leaves its input in fuzz/artifacts/<target>/:
# add it to fuzz/regressions/<target>/ with the fix.
fuzz:
	command -v cargo-fuzz >/dev/null || $(CARGO) install --locked cargo-fuzz
	python3 fuzz/seeds.py
	cd fuzz && for t in $(FUZZ_TARGETS); do \
		cargo +nightly fuzz run -O $$t corpus/$$t regressions/$$t -- \
			-max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 -timeout=10 || exit 1; \
	done

# Installs the binaries and guest artifacts where husk and containerd find them.
install: build
	install -d $(DESTDIR)/usr/local/bin $(DESTDIR)/usr/local/share/husk
	install -m 0755 target/release/husk target/release/husk-vmm target/release/containerd-shim-husk-v2 $(DESTDIR)/usr/local/bin/
	install -m 0644 $(GUEST)/vmlinux $(GUEST)/initramfs.img $(DESTDIR)/usr/local/share/husk/

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p husk-agent --features hostile-test --all-targets -- -D warnings

clean:
	$(CARGO) clean
