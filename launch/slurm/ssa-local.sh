#!/usr/bin/env bash
# `ssa` under mpirun on one node (no Slurm): one rank per GPU, or NP ranks on CPU.
#
#   launch/slurm/ssa-local.sh [-n NP] train --config configs/tiny.yaml --run-dir runs/x [...]
#
# NP defaults to the number of GPUs nvidia-smi lists, else 2. Ranks bind CUDA
# device = local rank. mpirun forwards SIGUSR1/SIGUSR2 to the ranks, so
# `kill -USR1 <mpirun pid>` asks for a checkpoint and exit; the exit code is then
# 3 (kExitRequeue) and running the same command again resumes.
#
# Environment: SSA_BINARY (default build/launch/ssa), NCCL_* and OMP_NUM_THREADS
# are passed to every rank; NCCL_NVLS_ENABLE defaults to 0 (NVLink multicast has
# taken GPUs out of service on some hosts).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
ssa=${SSA_BINARY:-$root/build/launch/ssa}

np=""
if [[ ${1:-} == -n ]]; then
  np=${2:?"-n needs a number of ranks"}
  shift 2
fi
if (($# == 0)); then
  echo "usage: $0 [-n NP] <ssa subcommand and options>" >&2
  exit 2
fi
if [[ -z $np ]]; then
  gpus=0
  if command -v nvidia-smi >/dev/null 2>&1; then gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); fi
  np=$((gpus > 0 ? gpus : 2))
fi
[[ -x $ssa ]] || { echo "$0: $ssa is not an executable (set SSA_BINARY or build first)" >&2; exit 2; }

export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

args=(-np "$np" --bind-to none -x NCCL_NVLS_ENABLE -x OMP_NUM_THREADS -x LD_LIBRARY_PATH -x PATH)
# Every other NCCL_* variable the caller set.
while IFS='=' read -r name _; do
  [[ $name == NCCL_* && $name != NCCL_NVLS_ENABLE ]] && args+=(-x "$name")
done < <(env)
(($(id -u) == 0)) && args+=(--allow-run-as-root)
((np > $(nproc))) && args+=(--oversubscribe)

exec mpirun "${args[@]}" "$ssa" "$@"
