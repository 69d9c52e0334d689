# caption-cascade: the whole set-up is `make demo` or `make test` on a fresh machine.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV          := .venv
PYTHON        ?= python3
TORCH_VERSION := 2.11.0
TORCH_STAMP   := $(VENV)/.torch-$(TORCH_VERSION)
CLIENT_STAMP  := $(VENV)/.clients-$(shell cksum < tests/clients/requirements.txt | cut -d' ' -f1)
HELM_STAMP    := $(VENV)/.helm-$(shell cksum < tests/helm/requirements.txt | cut -d' ' -f1)
# Resolved when a recipe runs, after the venv exists.
LIBTORCH       = $(firstword $(wildcard $(CURDIR)/$(VENV)/lib/python3*/site-packages/torch))
CARGO_ENV      = LIBTORCH="$(LIBTORCH)" LD_LIBRARY_PATH="$(LIBTORCH)/lib:$$LD_LIBRARY_PATH"
DEMO_IMAGES    = $(sort $(wildcard examples/images/*.png examples/images/*.jpg))

.PHONY: help setup build-tools build demo test lint fmt models clean fuzz soak

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-8s %s\n", $$1, $$2}'

setup: $(TORCH_STAMP) build-tools ## install libtorch (torch==$(TORCH_VERSION) from PyPI) into .venv, and cmake + nasm, once

# libjpeg-turbo (the JPEG decoder Pillow bundles) is built from source by turbojpeg-sys.
build-tools:
	@command -v cmake >/dev/null && command -v nasm >/dev/null || { \
		echo "installing cmake and nasm (Debian packages) to build libjpeg-turbo"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get install -y -q cmake nasm >/dev/null || \
		{ $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q cmake nasm >/dev/null; }; }

$(TORCH_STAMP):
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check torch==$(TORCH_VERSION)
	touch $@

build: setup ## compile the server and CLI
	$(CARGO_ENV) cargo build --locked --bins

demo: build ## caption the sample scenes with the embedded models
	$(CARGO_ENV) cargo run --locked --quiet -- caption $(DEMO_IMAGES)

$(CLIENT_STAMP): $(TORCH_STAMP)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/clients/requirements.txt
	touch $@

# Helm's SDK and the Kubernetes schemas, for the chart check (no helm binary or cluster needed).
$(HELM_STAMP): $(TORCH_STAMP)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/helm/requirements.txt
	touch $@

test: setup $(CLIENT_STAMP) $(HELM_STAMP) ## run every test (Rust, a Python gRPC client, the Helm chart)
	$(CARGO_ENV) cargo test --locked --workspace

lint: setup ## rustfmt and clippy, warnings are errors
	cargo fmt --all --check
	$(CARGO_ENV) cargo clippy --locked --workspace --all-targets -- -D warnings

FUZZ_SECONDS ?= 60
# No single allocation may exceed this: the fuzz target's limits allow about 32 MB per decode.
FUZZ_MALLOC_MB ?= 128
fuzz: build-tools ## fuzz image decoding and preprocessing with libFuzzer for FUZZ_SECONDS (default 60)
	command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz@0.13.2
	mkdir -p crates/images/fuzz/corpus/decode
	# cargo-fuzz needs nightly features; RUSTC_BOOTSTRAP lets the stable toolchain provide them.
	cd crates/images && RUSTC_BOOTSTRAP=1 cargo fuzz run decode fuzz/corpus/decode fuzz/seeds/decode -- \
		-max_total_time=$(FUZZ_SECONDS) -malloc_limit_mb=$(FUZZ_MALLOC_MB) -rss_limit_mb=2048 -timeout=10

SOAK_SECONDS ?= 600
soak: setup ## mixed hostile and normal traffic against the server for SOAK_SECONDS (default 600); checks RSS stays bounded
	SOAK_SECONDS=$(SOAK_SECONDS) $(CARGO_ENV) cargo test --locked --test hostile_images -- --ignored --nocapture soak

models: setup ## retrain the embedded models (13-14 minutes on 2 cores)
	$(VENV)/bin/pip install --quiet -r tools/requirements-train.txt
	$(VENV)/bin/python tools/train_shapes.py

clean:
	cargo clean
