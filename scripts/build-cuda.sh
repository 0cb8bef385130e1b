#!/usr/bin/env bash
# Build candor with candle's CUDA backend on a machine without a GPU or a CUDA install.
#
#   scripts/build-cuda.sh            # release build with --features cuda,nccl
#   FEATURES=cuda scripts/build-cuda.sh
#   JOBS=2 scripts/build-cuda.sh     # cargo -j (default: all cores)
#   CANDOR_CUDA_CACHE=~/.cache/candor-cuda TARGET_DIR=~/.cache/candor-cuda/target scripts/build-cuda.sh
#                                    # keep the wheels and the build outside the clone (CI)
#
# What it does (each step skipped when its result is already there):
#   1. installs the CUDA 13.0 toolchain and libraries from the Python package registry
#      (nvcc, nvvm, headers, cudart, nvrtc, cuBLAS, cuRAND, NCCL) into .cache/cuda/py
#      (ignored by git);
#   2. writes a stub libcuda.so (soname libcuda.so.1) defining the CUDA driver API symbols
#      cudarc declares, and unversioned link names (libcublas.so → libcublas.so.13, …), in
#      .cache/cuda/py/nvidia/cu13/lib/stubs, where cudarc's build script looks. The real
#      driver (and the real libraries) are loaded at run time on the GPU machine;
#   3. builds the `candor` binary into target-cuda/ (a separate target dir, so it does not
#      evict the CPU build in target/), for compute capability 9.0 (H100/H200) unless
#      CUDA_COMPUTE_CAP says otherwise;
#   4. strips it into target-cuda/candor (≈ what a GPU machine needs: copy it there and set
#      LD_LIBRARY_PATH to the CUDA 13 libraries; see docs/gpu.md);
#   5. checks that it starts and trains on the CPU with the wheels' libraries and the stub
#      driver (which answers no real CUDA call: the GPU path needs a GPU machine).
#
# Facts it relies on (docs/gpu.md): cudarc 0.19.10 reads the toolkit version from
# CUDARC_CUDA_VERSION (it panics on toolkits newer than 13.4), candle-kernels compiles its
# PTX with nvcc for CUDA_COMPUTE_CAP, and cudarc links libcuda, libnvrtc, libcurand,
# libcublas, libcublasLt, libcudart (and libnccl with the nccl feature) dynamically.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

FEATURES=${FEATURES:-cuda,nccl}
JOBS=${JOBS:-$(nproc)}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CUDARC_CUDA_VERSION=13000
TARGET_DIR=${TARGET_DIR:-$root/target-cuda}
CACHE=${CANDOR_CUDA_CACHE:-$root/.cache/cuda}
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
PY=$CACHE/py
CU=$PY/nvidia/cu13
STUBS=$CU/lib/stubs

# The toolchain wheels, pinned to CUDA 13.0 (cudarc 0.19.10 knows up to 13.4; PyTorch's
# cu130 builds ship the same runtime libraries on the GPU machine).
WHEELS=(
  "nvidia-cuda-nvcc==13.0.88"
  "nvidia-cuda-crt==13.0.88"
  "nvidia-nvvm==13.0.88"
  "nvidia-cuda-cccl==13.0.85"
  "nvidia-cuda-runtime==13.0.96"
  "nvidia-cuda-nvrtc==13.0.88"
  "nvidia-cublas==13.0.2.14"
  "nvidia-curand==10.4.0.35"
  "nvidia-nccl-cu13==2.28.9"
)
stamp=$CACHE/wheels.txt
step() { echo "build-cuda: $*" >&2; }
t0=$(date +%s)

# 1. toolchain
if [[ ! -x $CU/bin/nvcc || "$(cat "$stamp" 2>/dev/null)" != "${WHEELS[*]}" ]]; then
  step "installing the CUDA 13.0 toolchain wheels into ${PY#$root/}"
  rm -rf "$PY"
  mkdir -p "$CACHE"
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --no-compile \
    --target "$PY" "${WHEELS[@]}"
  echo "${WHEELS[*]}" >"$stamp"
fi
export PATH=$CU/bin:$PATH
export CUDA_ROOT=$CU CUDA_PATH=$CU CUDA_HOME=$CU
nvcc --version | grep -q "release 13.0" || { step "nvcc in $CU/bin is not CUDA 13.0"; exit 1; }

# 2. link names and the driver stub
cudarc_dir() {
  # cudarc's source, as cargo resolved it for this workspace
  cargo metadata --format-version 1 --all-features |
    python3 -c 'import json,sys; m=json.load(sys.stdin); print(next(p["manifest_path"] for p in m["packages"] if p["name"]=="cudarc").rsplit("/",1)[0])'
}
mkdir -p "$STUBS"
for lib in cublas.so.13 cublasLt.so.13 cudart.so.13 nvrtc.so.13 curand.so.10; do
  ln -sfn "../lib${lib}" "$STUBS/lib${lib%.so.*}.so"
done
ln -sfn "../../../nccl/lib/libnccl.so.2" "$STUBS/libnccl.so"
if [[ ! -f $STUBS/libcuda.so || ! -f $STUBS/cuda-stub.c ]]; then
  src=$(cudarc_dir)
  step "writing the libcuda.so.1 stub from $src/src/driver/sys"
  # every driver-API function cudarc can call (a superset of what the binary references)
  grep -ohE '\bfn cu[A-Z][A-Za-z0-9_]*\(' "$src"/src/driver/sys/*.rs | sed -E 's/^fn (.*)\($/\1/' | sort -u |
    awk 'BEGIN { print "/* Link-time stand-in for the CUDA driver (libcuda.so.1): the real one is loaded at run time. */" }
         { printf "void %s(void) {}\n", $1 }' >"$STUBS/cuda-stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$STUBS/libcuda.so" "$STUBS/cuda-stub.c"
fi

# 3. build
step "cargo build --release --features $FEATURES (target dir ${TARGET_DIR#$root/}, -j$JOBS, sm_$CUDA_COMPUTE_CAP)"
tb=$(date +%s)
cargo build --release -j"$JOBS" -p candor-cli --bin candor --features "$FEATURES" --target-dir "$TARGET_DIR"
step "cargo build took $(( $(date +%s) - tb )) s"

# the binary references only driver symbols the stub defines (else the link above failed);
# report how many it needs, as a check that the stub is not silently empty
need=$(nm -D --undefined-only "$TARGET_DIR/release/candor" | awk '{print $2}' | grep -cE '^cu[A-Z]' || true)
have=$(nm -D --defined-only "$STUBS/libcuda.so" | grep -cE ' cu[A-Z]' || true)
step "the binary imports $need driver functions; the stub defines $have"
[[ $need -gt 0 ]] || { step "the binary imports no CUDA driver function: was it built without --features cuda?"; exit 1; }

# 4. strip a copy
strip -o "$TARGET_DIR/candor" "$TARGET_DIR/release/candor"
step "$(du -h "$TARGET_DIR/release/candor" | cut -f1) unstripped, $(du -h "$TARGET_DIR/candor" | cut -f1) stripped: ${TARGET_DIR#$root/}/candor"

# 5. smoke test on the CPU: every library the binary needs resolves, and it trains a step
mkdir -p "$CACHE/rt"
ln -sfn "$STUBS/libcuda.so" "$CACHE/rt/libcuda.so.1"
LD_LIBRARY_PATH="$CACHE/rt:$CU/lib:$PY/nvidia/nccl/lib" "$TARGET_DIR/candor" bench --shape tiny --device cpu --steps 1 --warmup 0 >&2
step "done in $(( $(date +%s) - t0 )) s"
