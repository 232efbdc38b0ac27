#!/usr/bin/env bash
# On a GPU node, after a CUDA build (SSA_TORCH_PYTHON=python3 ./setup.sh): the
# gpu-labelled tests, `ssa attn check` and `ssa attn bench`, a short bf16 SSA
# training run on one GPU, and — with two or more GPUs — 32K-token SSA training
# with cp = 1, cp = 2 and dp = 2, compared by `ssa report`. Every log goes to OUT
# (default gpu-check-out).
#
#   launch/gpu-check.sh [OUT]      SSA_CORPUS: gzip/plain text corpus (default gcide)
#                                  SSA_GPU_CHECK_PARTS: subset of "tests attn train1 cp" (default all)
#                                  SSA_GPU_CHECK_CP_SETS: extra --set options for the 32K runs, e.g.
#                                    "monitoring.profile_start=16 monitoring.profile_steps=2" (traces go to OUT)
#                                  SSA_GPU_CHECK_CP_GRIDS: "dp:cp" pairs of the 32K runs (default "1:1 1:2 2:1")
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=$(realpath -m "${1:-gpu-check-out}")
build=${SSA_BUILD_DIR:-$root/build}
ssa=${SSA_BINARY:-$build/launch/ssa}
export SSA_BINARY=$ssa  # for launch/slurm/ssa-local.sh
corpus=${SSA_CORPUS:-/usr/share/dictd/gcide.dict.dz}
parts=${SSA_GPU_CHECK_PARTS:-tests attn train1 cp}
work=${SSA_GPU_CHECK_WORK:-/tmp/ssa-gpu-check}
limit=${SSA_GPU_CHECK_TIMEOUT:-300}  # seconds per training run (a hung collective must not hang the check)
export NCCL_NVLS_ENABLE=0 OMP_NUM_THREADS=4
mkdir -p "$out" "$work"
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
has() { [[ " $parts " == *" $1 "* ]]; }
step() { echo "== $*" | tee -a "$out/summary.log"; }

nvidia-smi > "$out/nvidia-smi.log" 2>&1
if has tests; then
  step "gpu tests"
  ctest --test-dir "$build" -L gpu --output-on-failure > "$out/gpu-tests.log" 2>&1
  tail -3 "$out/gpu-tests.log" | tee -a "$out/summary.log"
fi
if has attn; then
  step "attn check"; "$ssa" attn check > "$out/attn-check.log" 2>&1; echo "exit $?" | tee -a "$out/summary.log"
  step "attn bench"; "$ssa" attn bench > "$out/attn-bench.log" 2>&1; echo "exit $?" | tee -a "$out/summary.log"
fi

data=$work/gcide
if has train1 || has cp; then
  "$ssa" data inspect "$data" > /dev/null 2>&1 ||
    "$ssa" data prepare --input "$corpus" --output "$data" --val-fraction 0.01 > "$out/prepare.log" 2>&1
fi
common=(--set data.path="$data" --set eval.data="$data/val" --set monitoring.progress_every=5
        --set train.device=cuda --set train.dtype=bf16 --set checkpoint.every=0)
if has train1; then
  step "train: 1 GPU, bf16, 8 layers x 1024, seq 8192, SSA"
  rm -rf "$work/run1"
  timeout "$limit" "$ssa" train --run-dir "$work/run1" "${common[@]}" \
    --set model.hidden=1024 --set model.n_layers=8 --set model.n_heads=16 --set model.n_kv_heads=2 \
    --set model.ffn_hidden=4096 --set train.seq_len=8192 --set train.global_batch=2 --set train.micro_batch=1 \
    --set attention.top_k=16 --set train.steps=20 --set eval.seq_lens=[8192] --set eval.top_ks=[16,64] \
    --set eval.batches=2 > "$out/train-gpu1.log" 2>&1
  echo "exit $?" | tee -a "$out/summary.log"
  cp "$work/run1/metrics.jsonl" "$out/train-gpu1.jsonl" 2>/dev/null
fi
if has cp && ((gpus >= 2)); then
  long=("${common[@]}" --set model.hidden=1024 --set model.n_layers=8 --set model.n_heads=16 --set model.n_kv_heads=2
        --set model.head_dim=64 --set model.ffn_hidden=4096 --set train.seq_len=32768 --set train.micro_batch=1
        --set attention.top_k=16 --set train.recompute=true --set train.steps=20 --set eval.at_end=false)
  for kv in ${SSA_GPU_CHECK_CP_SETS:-}; do long+=(--set "$kv"); done
  for grid in ${SSA_GPU_CHECK_CP_GRIDS:-1:1 1:2 2:1}; do
    IFS=: read -r dp cp <<< "$grid"
    gb=$dp
    step "train: 32K tokens, dp=$dp cp=$cp global_batch=$gb"
    rm -rf "$work/run-dp$dp-cp$cp"
    timeout "$limit" "$root/launch/slurm/ssa-local.sh" -n $((dp * cp)) train --run-dir "$work/run-dp$dp-cp$cp" "${long[@]}" \
      --set parallel.dp=$dp --set parallel.cp=$cp --set train.global_batch=$gb > "$out/train-dp$dp-cp$cp.log" 2>&1
    echo "exit $?" | tee -a "$out/summary.log"
    cp "$work/run-dp$dp-cp$cp/metrics.jsonl" "$out/train-dp$dp-cp$cp.jsonl" 2>/dev/null
    for f in "$work/run-dp$dp-cp$cp"/profile-rank*; do
      [[ -f $f ]] && cp "$f" "$out/train-dp$dp-cp$cp-$(basename "$f")"
    done
  done
  step "cp = 2 and dp = 2 against cp = 1 (medians after 3 warm-up steps)"
  runs=()
  for grid in ${SSA_GPU_CHECK_CP_GRIDS:-1:1 1:2 2:1}; do runs+=("$work/run-dp${grid%%:*}-cp${grid##*:}"); done
  "$ssa" report "${runs[@]}" 2>&1 | tee -a "$out/summary.log"
fi
step "done"
