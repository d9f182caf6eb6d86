# partnergate — see README.md. The two commands a newcomer needs: `make demo`, `make test`.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: test deps build lint unit crd-check demo clean

## test: everything CI runs (installs what it needs first)
test: deps lint unit

## deps: Debian packages the tests use (postfix, swaks, openssl, ...)
deps:
	@tests/scripts/install-deps.sh

build:
	$(CARGO) build --workspace --bins

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## unit: unit tests plus the gateway's real-peer tests (swaks, openssl, postfix on loopback)
unit: build
	$(CARGO) test --workspace

clean:
	$(CARGO) clean
