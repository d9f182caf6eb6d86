# partnergate — see README.md. The two commands a newcomer needs: `make demo`, `make test`.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: test deps control-plane build lint unit operator-apiserver-test kubelet-smoke demo e2e cluster-up cluster-down clean

## test: everything CI runs (installs what it needs first: Debian packages, the Go-built
## control plane cached in ~/.cache/partnergate)
test: deps control-plane lint unit chart-test image-selftest bench-smoke chart-cluster-test \
      operator-apiserver-test kubelet-smoke e2e

## control-plane: build (once, cached) etcd, kube-apiserver, controller-manager, scheduler,
## kubectl, helm and cert-manager (controller, cmctl, CRDs) from published Go modules
control-plane:
	tests/cluster/build.sh

## deps: Debian packages the tests use (postfix, swaks, openssl, ...)
deps:
	@tests/scripts/install-deps.sh

build:
	$(CARGO) build --workspace --bins

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --all-features -- -D warnings

## unit: unit tests plus the gateway's real-peer tests (swaks, openssl, postfix on loopback)
unit: build
	$(CARGO) test --workspace

## operator-apiserver-test: the operator's integration test on a private real kube-apiserver
operator-apiserver-test:
	tests/scripts/operator-apiserver-test.sh

## kubelet-smoke: the process kubelet on a private control plane (tests/kubelet/smoke.sh)
kubelet-smoke:
	tests/kubelet/smoke.sh

## demo: the whole system on a local control plane (left running; `make cluster-down` stops it)
demo: deps
	tests/e2e/demo.sh

## e2e: the end-to-end suite on the local control plane
e2e: deps
	tests/e2e/run.sh

## cluster-up / cluster-down: the bare local control plane (tests/cluster)
cluster-up:
	tests/cluster/build.sh
	tests/cluster/up.sh

cluster-down:
	tests/e2e/down.sh

clean:
	$(CARGO) clean

# --- image & chart ---
# `make image`: static release binaries -> OCI image archive target/image/partnergate.tar
# (no Docker, no registry; tests/image/build-oci.py). `make chart-test`: lint, render and assert
# the Helm chart (needs helm from tests/cluster/build.sh), unit-test its alerts with promtool and
# check alerts and dashboard against a private Prometheus scraping a standalone gateway (needs
# `make deps` for prometheus; about 15 s). `make chart-crds`: copy the generated
# CRD into the chart (tests/chart/test.sh fails when the copy drifts).
IMAGE_TARGET ?= x86_64-unknown-linux-gnu
IMAGE_BINS := target/$(IMAGE_TARGET)/release
IMAGE_ARCHIVE := target/image/partnergate.tar

.PHONY: image image-bins image-test image-selftest chart-crds chart-test chart-cluster-test

image-bins:
	RUSTFLAGS='-C target-feature=+crt-static' $(CARGO) build --release --locked \
	  --target $(IMAGE_TARGET) -p partnergate-gateway -p partnergate-operator

image: image-bins
	python3 tests/image/build-oci.py --gateway $(IMAGE_BINS)/partnergate-gateway \
	  --operator $(IMAGE_BINS)/partnergate-operator --out $(IMAGE_ARCHIVE)

image-test: image
	tests/image/test.sh $(IMAGE_ARCHIVE)

## image-selftest: the archive builder and validator on tiny stand-in binaries (seconds)
image-selftest:
	tests/image/test.sh --selftest

chart-crds:
	cp crds/partnerconnector.yaml charts/partnergate/files/crds/partnerconnector.yaml

chart-test:
	tests/chart/test.sh

## chart-cluster-test: the chart on a throwaway real API server (tests/cluster): install under
## Pod Security restricted, the operator's RBAC as the API server sees it, upgrade, uninstall
chart-cluster-test:
	tests/chart/cluster.sh

# --- benchmarks ---
# `make bench`: the gateway vs its peers (Postfix as a before-queue proxy and with its queue,
# Haraka, maddy) vs the limit (tests/bench starttls-forwarder) vs smtp-sink, plus the scale rows
# at 10 / 1,000 / 10,000 connectors; one table (tests/bench/run.sh, docs/benchmarks.md;
# BENCH_RUNS, BENCH_SECS, BENCH_SKIP, BENCH_SCALE, BENCH_GW_BEFORE). Haraka and maddy are
# installed and cached by tests/bench/peers.sh on first use (`make bench-peers` does it ahead).
# `make bench-profile`: perf profile of the gateway under the throughput load. Not part of
# `make test`; the generator's smoke run (tests/bench/smoke.sh) is.
.PHONY: bench bench-smoke bench-peers bench-profile

bench:
	@tests/scripts/install-deps.sh --bench
	tests/bench/run.sh

bench-smoke:
	tests/bench/smoke.sh

bench-peers:
	@tests/scripts/install-deps.sh --bench
	tests/bench/peers.sh haraka maddy

bench-profile:
	@tests/scripts/install-deps.sh --bench
	tests/bench/profile.sh

# --- relay model ---
## relay-model: the relay-transaction model test (gateway/tests/it/relay_model.rs) on 100,000
## generated transactions (`cargo test` runs 2,000). RELAY_MODEL_SEED picks another seed;
## RELAY_MODEL_SESSION=<n> replays one session of it.
.PHONY: relay-model
relay-model:
	RELAY_MODEL_CASES=100000 $(CARGO) test -p partnergate-gateway --test it relay_model:: -- --nocapture

# --- fuzzing ---
## fuzz: libFuzzer targets for the gateway (gateway/fuzz: session state machine, DATA path,
## config loader), each until FUZZ_RUNS executions (default unlimited) or FUZZ_SECS seconds
## (default 300), whichever comes first. FUZZ_PARALLEL=1 runs the targets side by side, one
## process each. Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`); not
## part of `make test`. New corpus entries stay in gateway/fuzz/corpus/<target>/ (only seed-*
## files are committed); crashes in gateway/fuzz/artifacts/<target>/; each run's final stats in
## target/fuzz-logs/<target>.log. The 10 M-execution run: make fuzz FUZZ_RUNS=10000000
## FUZZ_SECS=14400 FUZZ_PARALLEL=1. See docs/reliability.md.
FUZZ_SECS ?= 300
FUZZ_RUNS ?= -1
FUZZ_PARALLEL ?= 0
FUZZ_TARGETS ?= session data config
FUZZ_LOGS := $(CURDIR)/target/fuzz-logs
.PHONY: fuzz fuzz-build
fuzz-build:
	@command -v cargo-fuzz >/dev/null || { echo "cargo-fuzz missing: cargo install cargo-fuzz"; exit 1; }
	cd gateway/fuzz && $(CARGO) +nightly fuzz build -s none
fuzz: fuzz-build
	mkdir -p $(FUZZ_LOGS)
	cd gateway/fuzz && pids=; for t in $(FUZZ_TARGETS); do \
	  run="nice -n 10 $(CARGO) +nightly fuzz run -s none $$t corpus/$$t -- \
	    -runs=$(FUZZ_RUNS) -max_total_time=$(FUZZ_SECS) -print_final_stats=1"; \
	  if [ "$(FUZZ_PARALLEL)" = 1 ]; then $$run >$(FUZZ_LOGS)/$$t.log 2>&1 & pids="$$pids $$!"; \
	  else $$run 2>&1 | tee $(FUZZ_LOGS)/$$t.log; [ $${PIPESTATUS[0]} -eq 0 ] || exit 1; fi; \
	done; rc=0; for p in $$pids; do wait $$p || rc=1; done; \
	for t in $(FUZZ_TARGETS); do printf '%s: ' $$t; grep -E '^stat::number_of_executed_units' $(FUZZ_LOGS)/$$t.log || echo 'no final stats'; done; \
	exit $$rc
