# kiln: two commands for users (`make run`, `make test`); the rest are steps.
# Every step is idempotent and skips work already done, so both commands work
# on a fresh Debian 12 machine (as root) and are quick the second time.

SHELL := /bin/bash
CACHE_DIR ?= /var/cache/kiln
# kiln's own guest kernel (the default) and Debian's cloud kernel (the
# fallback, `--kernel debian-cloud`); see kernels/README.md.
KERNEL_DIR := $(CACHE_DIR)/kernel-kiln
DEBIAN_KERNEL_DIR := $(CACHE_DIR)/kernel-debian
AGENT := $(CACHE_DIR)/agent/kiln-agent
CARGO ?= cargo
DEBIAN_PACKAGES := qemu-system-x86 protobuf-compiler libseccomp-dev libcap-ng-dev busybox-static lz4 cpio nix-bin passt nftables dnsmasq-base openssh-server prometheus
# systemd-analyze, for the suite's check of contrib/kiln.service (a fresh
# Debian container has no systemd).
DEBIAN_PACKAGES += systemd
# Several hosts (README "Running several hosts"; tests/multihost.rs):
# PostgreSQL for the shared metadata, HAProxy in front of the hosts.
DEBIAN_PACKAGES += postgresql-15 haproxy
VIRTIOFSD_VERSION := 1.14.0
# Garage, the distributed S3 store the multi-host tests run on: built once
# from the crate registry into the cache (no Debian package exists).
GARAGE_VERSION := 2.5.0
GARAGE := $(CACHE_DIR)/tools/garage-$(GARAGE_VERSION)/bin/garage

.PHONY: run test deps apt python build kernel agent virtiofsd garage bench clean-cache

run: deps build
	./target/release/kiln serve --listen 127.0.0.1:8000 --data-dir $${KILN_DATA_DIR:-/var/lib/kiln}

test: deps garage build
	KILN_GARAGE=$(GARAGE) KILN_REQUIRE_VM_TESTS=1 $(CARGO) test --release --workspace -- --test-threads=2

deps: apt python virtiofsd kernel

apt:
	@missing=""; for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  policy=/usr/sbin/policy-rc.d; created=""; \
	  if [ ! -e $$policy ]; then printf '#!/bin/sh\nexit 101\n' > $$policy && chmod 755 $$policy && created=1; fi; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; status=$$?; \
	  if [ -n "$$created" ]; then rm -f $$policy; fi; \
	  exit $$status; \
	fi

# The independent test client (tests/independent) speaks gRPC from Python.
python:
	@python3 -c 'import grpc, blake3' 2>/dev/null || python3 -m pip install --quiet grpcio blake3

virtiofsd:
	@if ! command -v virtiofsd >/dev/null 2>&1 && [ ! -x $$HOME/.cargo/bin/virtiofsd ]; then \
	  $(CARGO) install virtiofsd --version $(VIRTIOFSD_VERSION) --locked; \
	fi

# Only the LMDB metadata engine, with its C libraries built from source: no
# -dev packages needed.
garage:
	@if [ ! -x $(GARAGE) ]; then \
	  $(CARGO) install garage --version $(GARAGE_VERSION) --locked --no-default-features --features bundled-libs,lmdb \
	    --root $(CACHE_DIR)/tools/garage-$(GARAGE_VERSION) --target-dir $(CACHE_DIR)/tools/garage-build \
	  && rm -rf $(CACHE_DIR)/tools/garage-build; \
	fi

kernel:
	./kernels/build-kiln.sh $(KERNEL_DIR)
	./kernels/debian-cloud.sh $(DEBIAN_KERNEL_DIR)

# Static like the rest of the agent: libseccomp.a from libseccomp-dev.
agent:
	RUSTFLAGS="-C target-feature=+crt-static" LIBSECCOMP_LINK_TYPE=static LIBSECCOMP_LIB_PATH=/usr/lib/x86_64-linux-gnu $(CARGO) build --release -p kiln-guest --bin kiln-agent --target x86_64-unknown-linux-gnu
	install -D -m 0755 target/x86_64-unknown-linux-gnu/release/kiln-agent $(AGENT)

build: agent
	$(CARGO) build --release --workspace

bench: deps build
	@command -v b3sum >/dev/null 2>&1 || [ -x $$HOME/.cargo/bin/b3sum ] || $(CARGO) install b3sum --locked
	$(CARGO) run --release --bin kiln-bench -- --out docs/bench.md

clean-cache:
	rm -rf $(CACHE_DIR)
