# caption-cascade container image: the server binary, the libtorch libraries it loads (from the
# torch==2.11.0 wheel on PyPI) and the embedded models, on Debian bookworm.
#
# Everything in one command, for a machine that can reach a registry, PyPI and crates.io:
#   docker build -t caption-cascade:0.1.0 .                                  # CPU
#   docker build --build-arg VARIANT=cuda -t caption-cascade:0.1.0-cuda .    # CUDA
# With a binary built on the host instead (what `make image` and CI do; see the Makefile):
#   podman build --target host --build-arg VARIANT=cpu [--build-arg BASE=...] .
# which copies target/image/$VARIANT/, assembled by tools/image/bundle.sh. Both targets share the
# `runtime` stage, so their user, environment, entrypoint and layout are the same.
#
#   BASE     the runtime's base image, a Debian bookworm (glibc 2.36, libstdc++ 12), the same
#            release the binary is built on
#   VARIANT  cpu: the binary links libtorch_cpu only (built with CAPTION_CPU_ONLY=1), no CUDA
#                 libraries beyond the two libtorch_cpu itself needs (libcudart, libcupti)
#            cuda: libtorch_cuda and the NVIDIA libraries it loads; the driver (libcuda.so.1)
#                 comes from the host through the NVIDIA container toolkit
ARG BASE=debian:bookworm-slim
ARG VARIANT=cpu

# ---- source: build the binary from this checkout (needs a registry, PyPI and crates.io) ----
# Untested where this file was written: no registry or rustup server is reachable there. The
# `host` target below, whose folder the same tools/image/bundle.sh assembles, is what CI tests.
FROM rust:1-bookworm AS source
ARG VARIANT
ARG TORCH_VERSION=2.11.0
# cmake and nasm build libjpeg-turbo (turbojpeg-sys); g++ the libtorch bindings; binutils the bundle.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake nasm g++ binutils python3-venv \
 && rm -rf /var/lib/apt/lists/*
# The wheel is the CUDA build whatever the variant (PyPI has no other for Linux x86-64): several
# GB that stay in this stage; the bundle step below takes only what the binary loads.
RUN python3 -m venv /opt/torch \
 && /opt/torch/bin/pip install --no-cache-dir --disable-pip-version-check torch==${TORCH_VERSION}
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY crates/images/Cargo.toml crates/images/
COPY crates/images/src crates/images/src
COPY bench/main.rs bench/
COPY proto proto
COPY csrc csrc
COPY src src
COPY models/shapes-blip models/shapes-blip
COPY models/shapes-clip models/shapes-clip
COPY tools/image/bundle.sh tools/image/
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    export LIBTORCH="$(echo /opt/torch/lib/python3*/site-packages/torch)" \
 && export LD_LIBRARY_PATH="$LIBTORCH/lib" \
 && if [ "$VARIANT" = cpu ]; then export CAPTION_CPU_ONLY=1; fi \
 && cargo build --release --locked --bin caption-cascade \
 && tools/image/bundle.sh "$VARIANT" target/release/caption-cascade /dist

# ---- runtime: what both images share; the stages below add /app's contents ----
FROM ${BASE} AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="caption-cascade" \
      org.opencontainers.image.description="gRPC image captioning with a BLIP then CLIP cascade on libtorch (${VARIANT})" \
      org.opencontainers.image.licenses="Apache-2.0" \
      caption-cascade.variant="${VARIANT}"
# A fixed, numeric non-root user, so Kubernetes' runAsNonRoot can check it.
RUN groupadd --gid 10001 caption \
 && useradd --uid 10001 --gid 10001 --home-dir /app --no-create-home --shell /usr/sbin/nologin caption
# LD_LIBRARY_PATH wins over the build machine's RUNPATH left in the binary.
ENV PATH=/app/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LD_LIBRARY_PATH=/app/lib \
    CAPTION_BLIP_MODEL=/app/models/shapes-blip \
    CAPTION_CLIP_MODEL=/app/models/shapes-clip
WORKDIR /app
USER 10001:10001
EXPOSE 50051
ENTRYPOINT ["caption-cascade"]
CMD ["serve"]

# ---- host (`--target host`): the folder `make image` assembled from a binary built on the host ----
# Largest and least often changed first: a new binary is a small layer of its own.
FROM runtime AS host
ARG VARIANT
COPY target/image/${VARIANT}/lib/ /app/lib/
COPY target/image/${VARIANT}/models/ /app/models/
COPY target/image/${VARIANT}/MANIFEST /app/MANIFEST
COPY target/image/${VARIANT}/bin/ /app/bin/

# ---- the default target: the binary built by the `source` stage ----
FROM runtime AS image
COPY --from=source /dist/lib/ /app/lib/
COPY --from=source /dist/models/ /app/models/
COPY --from=source /dist/MANIFEST /app/MANIFEST
COPY --from=source /dist/bin/ /app/bin/
