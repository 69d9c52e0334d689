#!/usr/bin/env bash
# Assembles what the container image's /app holds, from a built binary and the torch wheel it was
# linked against:
#   tools/image/bundle.sh VARIANT BINARY OUT   (VARIANT: cpu | cuda; LIBTORCH: the wheel's torch/ folder)
# OUT/bin/caption-cascade   the binary, debug info stripped
# OUT/lib/                  the shared libraries it loads from the wheel (torch/lib and nvidia/*/lib),
#                           found by following DT_NEEDED from the binary; the system ones (glibc,
#                           libstdc++, libgcc_s) come from the Debian base; symbol tables stripped
# OUT/models/shapes-{blip,clip}   the embedded models
# OUT/MANIFEST              what was bundled, and why
# The cpu variant refuses a binary that links libtorch_cuda (build it with CAPTION_CPU_ONLY=1).
# Used both by `make image` (binary built on the host) and by the Dockerfile's `build` stage.
set -euo pipefail
variant=${1:?variant: cpu or cuda}
binary=${2:?path of the caption-cascade binary}
out=${3:?output folder}
: "${LIBTORCH:?LIBTORCH must point at the torch folder of the torch wheel}"
models=${MODELS_DIR:-models}
case $variant in cpu | cuda) ;; *) echo "error: variant is cpu or cuda, not $variant" >&2; exit 2 ;; esac

torch_lib=$LIBTORCH/lib
site=$(dirname "$LIBTORCH")
search=("$torch_lib")
for d in "$site"/nvidia/*/lib; do [ -d "$d" ] && search+=("$d"); done
# Provided by the Debian base image (libc6, libstdc++6, libgcc-s1, zlib1g).
system_libs=" libc.so.6 libm.so.6 libdl.so.2 libpthread.so.0 librt.so.1 libutil.so.1 ld-linux-x86-64.so.2 libstdc++.so.6 libgcc_s.so.1 libz.so.1 "
# The CUDA driver: mounted into the container by the NVIDIA container toolkit, never bundled.
driver_libs=" libcuda.so.1 libnvidia-ml.so.1 "

needed() { readelf -dW "$1" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'; }
find_lib() {
    local d
    for d in "${search[@]}"; do
        if [ -e "$d/$1" ]; then echo "$d/$1"; return 0; fi
    done
    return 1
}

binary_needs=$(needed "$binary")
if [ "$variant" = cpu ] && grep -qE '^lib(torch_cuda|c10_cuda)' <<<"$binary_needs"; then
    echo "error: $binary links libtorch_cuda; build the cpu variant with CAPTION_CPU_ONLY=1" >&2
    exit 1
fi
if [ "$variant" = cuda ] && ! grep -q '^libtorch_cuda.so$' <<<"$binary_needs"; then
    echo "error: $binary does not link libtorch_cuda; build the cuda variant without CAPTION_CPU_ONLY" >&2
    exit 1
fi

rm -rf "$out"
mkdir -p "$out/bin" "$out/lib" "$out/models"
manifest=$out/MANIFEST
echo "# caption-cascade image contents, variant $variant, torch $(cat "$LIBTORCH/version.py" 2>/dev/null | sed -n "s/^__version__ = '\(.*\)'/\1/p")" >"$manifest"

declare -A seen=()
queue=()
add() { # NAME WHY
    [ -n "${seen[$1]:-}" ] && return 0
    seen[$1]=1
    if [[ $system_libs == *" $1 "* ]]; then echo "system $1 ($2)" >>"$manifest"; return 0; fi
    if [ "$variant" = cuda ] && [[ $driver_libs == *" $1 "* ]]; then echo "driver $1 ($2)" >>"$manifest"; return 0; fi
    local path
    path=$(find_lib "$1") || { echo "error: $1 (needed by $2) is neither in the wheel nor in the base image" >&2; exit 1; }
    cp -L "$path" "$out/lib/$1"
    echo "lib    $1 ($2)" >>"$manifest"
    queue+=("$1")
}
for n in $binary_needs; do add "$n" caption-cascade; done
if [ "$variant" = cuda ]; then
    # Loaded with dlopen, so not in any DT_NEEDED: cuDNN's sub-libraries, NVRTC (runtime-compiled
    # kernels) through libcaffe2_nvrtc, and the lazily loaded CUDA linear algebra.
    for pattern in libcudnn_*.so.9 libcaffe2_nvrtc.so libnvrtc-builtins.so.13.0 libtorch_cuda_linalg.so; do
        for d in "${search[@]}"; do
            for f in "$d"/$pattern; do [ -e "$f" ] && add "$(basename "$f")" dlopen; done
        done
    done
fi
while [ ${#queue[@]} -gt 0 ]; do
    lib=${queue[0]}
    queue=("${queue[@]:1}")
    for n in $(needed "$out/lib/$lib"); do add "$n" "$lib"; done
done

if [ "$variant" = cpu ]; then
    # The CUDA wheel's libtorch_cpu itself needs libcudart and libcupti (a few MB); nothing else of CUDA.
    stray=$(cd "$out/lib" && ls | grep -vE '^(libtorch_cpu|libc10|libgomp|libcudart|libcupti)\.so' || true)
    [ -z "$stray" ] || { echo "error: the cpu variant would carry unexpected libraries: $stray" >&2; exit 1; }
fi

cp "$binary" "$out/bin/caption-cascade"
if [ -z "${NO_STRIP:-}" ]; then
    strip --strip-debug "$out/bin/caption-cascade"
    # The torch libraries ship their full symbol tables (about 90 MB in libtorch_cpu alone); the
    # dynamic symbols the loader uses stay.
    for f in "$out"/lib/libtorch*.so "$out"/lib/libc10*.so; do [ -e "$f" ] && strip --strip-unneeded "$f"; done
fi
chmod 0755 "$out/bin/caption-cascade"
chmod 0644 "$out"/lib/*
for m in shapes-blip shapes-clip; do
    cp -r "$models/$m" "$out/models/$m"
done
chmod -R a+rX,go-w "$out"
echo "bundled $variant: $(du -sh --apparent-size "$out" | cut -f1) in $out ($(ls "$out/lib" | wc -l) libraries)"
