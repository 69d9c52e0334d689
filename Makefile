# caption-cascade: the whole set-up is `make demo` or `make test` on a fresh machine.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV          := .venv
PYTHON        ?= python3
TORCH_VERSION := 2.11.0
TORCH_STAMP   := $(VENV)/.torch-$(TORCH_VERSION)
CLIENT_STAMP  := $(VENV)/.clients-$(shell cksum < tests/clients/requirements.txt | cut -d' ' -f1)
HELM_STAMP    := $(VENV)/.helm-$(shell cksum < tests/helm/requirements.txt | cut -d' ' -f1)
# The Node.js client test's pinned npm packages; inside node_modules, so `npm ci` (which empties it) resets it.
NODE_DIR      := tests/clients/node
NODE_STAMP    := $(NODE_DIR)/node_modules/.installed-$(shell cksum < $(NODE_DIR)/package-lock.json | cut -d' ' -f1)
# apache-beam needs protobuf < 7 and .venv's grpcio-tools protobuf >= 7: the Beam test has its own venv.
BEAM_VENV     := .venv-beam
BEAM_STAMP    := $(BEAM_VENV)/.beam-$(shell cksum < tests/beam/requirements.txt | cut -d' ' -f1)
# Reinstalled whenever the package's sources or the proto change (tests/beam_pipeline.rs checks it).
BEAM_CLIENT   := $(BEAM_VENV)/.client-installed
# transformers and its pinned companions, for the benchmark's baseline (the fixture generator's pins).
BENCH_STAMP   := $(VENV)/.bench-$(shell cksum < tools/requirements-train.txt | cut -d' ' -f1)
CLIENT_SOURCES = $(shell find clients/python -type f \( -name '*.py' -o -name '*.toml' -o -name '*.in' -o -name '*.md' \) \
                   -not -path '*/build/*' -not -path '*/_pb/*' -not -path '*.egg-info/*') $(wildcard proto/*/*/*.proto)
# Resolved when a recipe runs, after the venv exists: through the shell, because make's own
# `wildcard` may answer from a directory listing it read before pip filled the venv.
LIBTORCH       = $(shell ls -d $(CURDIR)/$(VENV)/lib/python3*/site-packages/torch 2>/dev/null | head -n 1)
CARGO_ENV      = LIBTORCH="$(LIBTORCH)" LD_LIBRARY_PATH="$(LIBTORCH)/lib:$$LD_LIBRARY_PATH"
DEMO_IMAGES    = $(sort $(wildcard examples/images/*.png examples/images/*.jpg))

.PHONY: help setup build-tools build install demo test lint fmt models clean fuzz soak beam-env image-tools image-base image test-image bench cuda-bins

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

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

# Where `make install` puts the binary (PREFIX/bin) and the embedded models (PREFIX/share/caption-cascade).
PREFIX ?= $(HOME)/.local

install: setup ## put caption-cascade on PATH (PREFIX/bin, default ~/.local/bin) with the embedded models beside it
	$(CARGO_ENV) cargo install --locked --path . --root "$(PREFIX)" --bin caption-cascade --target-dir target --force
	mkdir -p "$(PREFIX)/share/caption-cascade/models"
	cp -r models/shapes-blip models/shapes-clip "$(PREFIX)/share/caption-cascade/models/"
	@echo "installed $(PREFIX)/bin/caption-cascade (libtorch stays in $(LIBTORCH): keep this checkout's .venv)"

demo: build ## caption the sample scenes with the embedded models
	$(CARGO_ENV) cargo run --locked --quiet -- caption $(DEMO_IMAGES)

# The Python client test's packages (tests/clients/requirements.txt): grpcio-tools for its stubs,
# and what tests/python_client.rs's fresh venv sees (through a .pth file) when it pip-installs
# clients/python offline, as a user's `pip install ./clients/python` would.
$(CLIENT_STAMP): $(TORCH_STAMP)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/clients/requirements.txt
	touch $@

# Helm's SDK and the Kubernetes schemas, for the chart check (no helm binary or cluster needed).
$(HELM_STAMP): $(TORCH_STAMP)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/helm/requirements.txt
	touch $@

# @grpc/grpc-js and @grpc/proto-loader for tests/node_client.rs, exactly as package-lock.json pins them.
$(NODE_STAMP): $(NODE_DIR)/package.json $(NODE_DIR)/package-lock.json
	@command -v npm >/dev/null || { \
		echo "installing nodejs and npm (Debian packages) for the Node.js client test"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get install -y -q nodejs npm >/dev/null || \
		{ $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q nodejs npm >/dev/null; }; }
	cd $(NODE_DIR) && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	touch $@

$(BEAM_STAMP):
	$(PYTHON) -m venv $(BEAM_VENV)
	$(BEAM_VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/beam/requirements.txt
	touch $@

# The client package, built as a user would install it: its build generates the gRPC stubs with
# this venv's grpcio-tools, and pip checks the requirements it derives from them.
$(BEAM_CLIENT): $(BEAM_STAMP) $(CLIENT_SOURCES)
	rm -rf clients/python/build
	$(BEAM_VENV)/bin/pip install --quiet --disable-pip-version-check --no-build-isolation ./clients/python
	touch $@

beam-env: $(BEAM_CLIENT) ## .venv-beam: apache-beam and the Python client package (clients/python), for the Beam test

test: setup $(CLIENT_STAMP) $(HELM_STAMP) $(BEAM_CLIENT) $(NODE_STAMP) ## run every test (Rust, Python and Node.js gRPC clients, Beam, the Helm chart)
	$(CARGO_ENV) cargo test --locked --workspace

lint: setup ## rustfmt and clippy, warnings are errors
	cargo fmt --all --check
	$(CARGO_ENV) cargo clippy --locked --workspace --all-targets -- -D warnings

$(BENCH_STAMP): $(TORCH_STAMP)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r tools/requirements-train.txt
	touch $@

BENCH_DTYPE ?= fp32
BENCH_QUANTIZE ?= none
BENCH_ARGS  ?=
bench: setup $(BENCH_STAMP) ## caption-bench (release) against transformers on the same weights, side by side (BENCH_DTYPE=fp32|bf16|fp16, BENCH_QUANTIZE=none|int8; 4–6 minutes on 2 cores)
	$(CARGO_ENV) cargo build --locked --release --bin caption-bench
	$(CARGO_ENV) $(VENV)/bin/python bench/compare.py --dtype $(BENCH_DTYPE) --quantize $(BENCH_QUANTIZE) --out bench/out/cpu-$(BENCH_DTYPE)$(if $(filter int8,$(BENCH_QUANTIZE)),-int8).json $(BENCH_ARGS)

cuda-bins: setup ## release caption-cascade and caption-bench, stripped into target/cuda-bin (about 18 MB each) to carry to a GPU machine for bench/run_cuda.sh
	$(CARGO_ENV) cargo build --locked --release --bin caption-cascade --bin caption-bench
	mkdir -p target/cuda-bin
	strip -o target/cuda-bin/caption-cascade target/release/caption-cascade
	strip -o target/cuda-bin/caption-bench target/release/caption-bench

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
# Two soaks, one after the other: hostile images against one combined server (tests/hostile_images.rs),
# then every trust boundary at once against the split topology with replicas killed and stopped
# (tests/soak.rs). docs/testing.md, Soak.
soak: setup ## two soaks of SOAK_SECONDS each (default 600): hostile images on a combined server, then hostile callers and chaos on the split topology; checks codes, losses, RSS bounds
	SOAK_SECONDS=$(SOAK_SECONDS) $(CARGO_ENV) cargo test --locked --test hostile_images -- --ignored --nocapture soak
	SOAK_SECONDS=$(SOAK_SECONDS) $(CARGO_ENV) cargo test --locked --test soak -- --ignored --nocapture --exact soak_split_topology_with_hostile_callers_and_chaos

models: setup ## retrain the embedded models (13-14 minutes on 2 cores)
	$(VENV)/bin/pip install --quiet -r tools/requirements-train.txt
	$(VENV)/bin/python tools/train_shapes.py

# The container image (Dockerfile), built here from a release build on the host: no registry is
# needed. The base is Debian bookworm made with debootstrap (tools/image/make_base.sh, once); the
# binary, the libtorch libraries it loads and the models go to target/image/$(IMAGE_VARIANT)/
# (tools/image/bundle.sh), which the Dockerfile's `host` target copies. Needs root (debootstrap,
# podman mount). With a registry, `docker build .` builds it all from source instead.
IMAGE_VARIANT ?= cpu
IMAGE_NAME    ?= caption-cascade
APP_VERSION   := $(shell sed -n 's/^appVersion: *"*\([^"]*\)"*/\1/p' helm/caption-cascade/Chart.yaml)
IMAGE_TAG     ?= $(APP_VERSION)$(if $(filter cuda,$(IMAGE_VARIANT)),-cuda)
IMAGE         := $(IMAGE_NAME):$(IMAGE_TAG)
IMAGE_BASE    ?= caption-base:bookworm
# The cpu binary must not link libtorch_cuda (build.rs reads CAPTION_CPU_ONLY; a change rebuilds the crate).
IMAGE_CARGO_ENV = $(if $(filter cpu,$(IMAGE_VARIANT)),CAPTION_CPU_ONLY=1,env -u CAPTION_CPU_ONLY)

# runc: crun (podman's default runtime) cannot start containers in sandboxes with hybrid cgroups.
image-tools:
	@command -v podman >/dev/null && command -v debootstrap >/dev/null && command -v runc >/dev/null || { \
		echo "installing podman, runc and debootstrap (Debian packages) to build and run the container image"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get install -y -q podman runc debootstrap >/dev/null || \
		{ $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q podman runc debootstrap >/dev/null; }; }

image-base: image-tools ## the image's Debian bookworm base, caption-base:bookworm (debootstrap), once
	tools/image/make_base.sh $(IMAGE_BASE)

image: setup image-base ## build the container image caption-cascade:<appVersion> (IMAGE_VARIANT=cpu|cuda) with podman
	$(IMAGE_CARGO_ENV) $(CARGO_ENV) cargo build --release --locked --bin caption-cascade
	LIBTORCH="$(LIBTORCH)" tools/image/bundle.sh $(IMAGE_VARIANT) target/release/caption-cascade target/image/$(IMAGE_VARIANT)
	podman build --isolation chroot --build-arg BASE=$(IMAGE_BASE) --build-arg VARIANT=$(IMAGE_VARIANT) \
		--target host -t $(IMAGE) .
	@podman image inspect --format '{{.Size}}' $(IMAGE) | numfmt --to=si --suffix=B | sed 's|^|$(IMAGE): |'

test-image: image $(CLIENT_STAMP) $(HELM_STAMP) ## build the image, check its config and contents, caption the sample scenes inside it
	$(VENV)/bin/python tests/image/test_image.py --image $(IMAGE) --variant $(IMAGE_VARIANT)

clean:
	cargo clean
