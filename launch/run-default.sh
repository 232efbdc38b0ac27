#!/usr/bin/env bash
# The default run on CPU: byte-level shards of the GNU Collaborative
# International Dictionary of English, a tiny SSA model trained on them
# (configs/tiny.yaml, metrics served on http://127.0.0.1:9400/metrics while it
# trains), then perplexity under full and sparse inference, attention sparsity
# and entropy. Extra arguments go to `ssa train` (e.g. --set train.steps=50).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
ssa=${SSA_BINARY:-$root/build/launch/ssa}
corpus=/usr/share/dictd/gcide.dict.dz
data=data-cache/gcide
run=${SSA_RUN_DIR:-runs/tiny}

if ! "$ssa" data inspect "$data" >/dev/null 2>&1; then
  [[ -r $corpus ]] || { echo "run-default: $corpus is missing (Debian package dict-gcide; ./setup.sh installs it)" >&2; exit 1; }
  "$ssa" data prepare --input "$corpus" --output "$data" --val-fraction 0.01
fi
"$ssa" train --config configs/tiny.yaml --run-dir "$run" "$@"
"$ssa" eval --config configs/tiny.yaml --run-dir "$run"
