#!/usr/bin/env bash
# Makes a fresh Debian 12 machine ready to build and run ssa-train, then builds.
# Idempotent: each step checks whether its result is already there, so a second
# run with nothing changed takes seconds.
#
#   ./setup.sh            install dependencies, configure and build (Release)
#   SSA_BUILD_DIR=...     build folder (default: build)
#   SSA_SKIP_APT=1        do not touch system packages (they are already there)
#   SSA_TORCH_PYTHON=...  use the torch of this python (e.g. a CUDA build on a GPU
#                         node) instead of installing the wheel into .venv
#   SSA_CMAKE_ARGS=...    extra CMake arguments for the first configure
# On a machine whose torch has CUDA and that has nvcc, the CUDA kernels are built
# and linked (SSA_CUDA_RUNTIME=ON).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
build_dir=${SSA_BUILD_DIR:-$root/build}
venv=$root/.venv
torch_version=2.11.0

log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

# 1. Debian packages. dict-gcide is the embedded default corpus; prometheus is
#    the real server the monitoring test scrapes with; slurm-wlm, munge and
#    libpmix2 make the throw-away one-node cluster of the Slurm test.
apt_packages=(
  build-essential cmake ninja-build pkg-config python3-venv
  libhdf5-dev hdf5-tools zlib1g-dev
  openmpi-bin libopenmpi-dev
  libyaml-cpp-dev libcli11-dev nlohmann-json3-dev
  prometheus-cpp-dev libcurl4-openssl-dev
  libgtest-dev libgmock-dev
  dict-gcide prometheus
  slurm-wlm munge libpmix2
)
if [[ "${SSA_SKIP_APT:-0}" != 1 ]]; then
  missing=()
  for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    log "installing Debian packages: ${missing[*]}"
    sudo_cmd=(); [[ $(id -u) -ne 0 ]] && sudo_cmd=(sudo)
    export DEBIAN_FRONTEND=noninteractive
    "${sudo_cmd[@]}" apt-get update -qq
    # prometheus would start a system service: keep package scripts from
    # starting daemons on a build machine.
    printf '#!/bin/sh\nexit 101\n' | "${sudo_cmd[@]}" tee /usr/sbin/policy-rc.d >/dev/null
    "${sudo_cmd[@]}" chmod +x /usr/sbin/policy-rc.d
    "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
    "${sudo_cmd[@]}" rm -f /usr/sbin/policy-rc.d
  fi
fi

# 2. LibTorch from the torch wheel, in a venv inside the repo (or a given python's).
if [[ -n "${SSA_TORCH_PYTHON:-}" ]]; then
  torch_python=$SSA_TORCH_PYTHON
else
  if [[ ! -x $venv/bin/python ]]; then
    log "creating $venv"
    python3 -m venv "$venv"
  fi
  if ! "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('torch') != '$torch_version')" 2>/dev/null; then
    log "installing torch==$torch_version (LibTorch) into $venv"
    # --no-deps: we need LibTorch's headers and shared libraries, not the
    # Python-side CUDA wheels (gigabytes); the CPU build links libtorch_cpu only.
    "$venv/bin/pip" install -q --no-deps "torch==$torch_version"
  fi
  torch_python=$venv/bin/python
fi
torch_dir=$("$torch_python" -c "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('torch').origin))")
torch_prefix=$torch_dir/share/cmake

cuda_runtime=OFF
if [[ -n "${SSA_TORCH_PYTHON:-}" ]] && command -v nvcc >/dev/null && command -v nvidia-smi >/dev/null \
   && [[ -e $torch_dir/lib/libtorch_cuda.so ]] && nvidia-smi -L >/dev/null 2>&1; then
  cuda_runtime=ON
fi

# libtorch_cpu.so of the CUDA wheel needs libcudart.so.13 and libcupti.so.13 at
# load time even when no GPU is used. Take them from a CUDA toolkit if one is
# installed, else from NVIDIA's small runtime wheels.
cuda_lib_dirs=()
for d in /usr/local/cuda/lib64 /usr/local/cuda/lib /usr/local/cuda/extras/CUPTI/lib64 /usr/local/lib; do
  [[ -e $d/libcudart.so.13 || -e $d/libcupti.so.13 ]] && cuda_lib_dirs+=("$d")
done
have() { for d in "${cuda_lib_dirs[@]}" "$venv/cuda-runtime"; do [[ -e $d/$1 ]] && return 0; done; ldconfig -p | grep -q "$1"; }
if [[ $cuda_runtime == OFF ]] && { ! have libcudart.so.13 || ! have libcupti.so.13; }; then
  log "installing the CUDA 13 runtime libraries LibTorch loads (no GPU needed)"
  "$venv/bin/pip" install -q --no-deps --target "$venv/cuda-wheels" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cupti==13.0.*"
  mkdir -p "$venv/cuda-runtime"
  find "$venv/cuda-wheels" -name 'lib*.so*' -exec ln -sf {} "$venv/cuda-runtime/" \;
fi
[[ -d $venv/cuda-runtime ]] && cuda_lib_dirs+=("$venv/cuda-runtime")
runtime_path=$(IFS=';'; echo "${cuda_lib_dirs[*]}")

# 3. Configure and build.
generator=()
command -v ninja >/dev/null && [[ ! -f $build_dir/Makefile ]] && generator=(-G Ninja)
if [[ ! -f $build_dir/CMakeCache.txt ]]; then
  log "configuring $build_dir"
  cmake -S "$root" -B "$build_dir" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_PREFIX_PATH="$torch_prefix${SSA_EXTRA_PREFIX:+;$SSA_EXTRA_PREFIX}" -DSSA_EXTRA_RPATH="$runtime_path" \
    -DSSA_CUDA_RUNTIME=$cuda_runtime ${SSA_CMAKE_ARGS:-}
fi
log "building"
cmake --build "$build_dir" --parallel "$(nproc)"
log "ready: $build_dir/launch/ssa"
