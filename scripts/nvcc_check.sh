#!/usr/bin/env bash
# Compile-only check of the CUDA sources for Hopper (sm_90a), run by `make lint` (so CI) wherever
# nvcc exists: every csrc/cuda/*.cu must compile, and no kernel may spill to local memory
# (ptxas -v register/spill lines are printed). csrc/bindings_cuda.cpp (torch headers) is
# syntax-checked too when the installed torch ships its CUDA headers.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || true)}
if [[ -z "$NVCC" ]]; then
  echo "nvcc_check: nvcc not found; skipping the CUDA compile check"
  exit 0
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
status=0
for src in csrc/cuda/*.cu; do
  [[ -e "$src" ]] || continue
  log="$out/$(basename "$src").log"
  if ! "$NVCC" -c -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -Xptxas -v -Icsrc \
      "$src" -o "$out/$(basename "$src").o" >"$log" 2>&1; then
    cat "$log"
    echo "nvcc_check: $src does not compile"
    status=1
    continue
  fi
  grep -E "registers|spill" "$log" | sed "s|^|$src: |"
  if grep -E "[1-9][0-9]* bytes spill (stores|loads)" "$log" >/dev/null; then
    echo "nvcc_check: $src spills to local memory"
    status=1
  fi
done
torch_include=$(python3 -c "import torch.utils.cpp_extension as c; print(c.include_paths()[0])" \
  2>/dev/null || true)
if [[ -n "$torch_include" && -e "$torch_include/c10/cuda/CUDAGuard.h" ]]; then
  # CPU torch wheels lack the generated cuda_cmake_macros.h: an empty stand-in suffices to parse.
  mkdir -p "$out/stub/c10/cuda/impl" && touch "$out/stub/c10/cuda/impl/cuda_cmake_macros.h"
  cuda_include=""
  for root in "${CUDA_HOME:-}" /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$NVCC")")")"; do
    if [[ -n "$root" && -e "$root/include/cuda_runtime.h" ]]; then
      cuda_include="$root/include"
      break
    fi
  done
  py_include=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['include'])")
  if ! g++ -fsyntax-only -w -std=c++17 -DKIMI_WITH_CUDA -I"$torch_include" \
      -I"$torch_include/torch/csrc/api/include" -I"$out/stub" -I"$cuda_include" \
      -I"$py_include" -Icsrc csrc/bindings_cuda.cpp; then
    echo "nvcc_check: csrc/bindings_cuda.cpp does not compile"
    status=1
  fi
fi
[[ $status -eq 0 ]] && echo "nvcc_check: CUDA sources compile for sm_90a, no spills"
exit $status
