#!/usr/bin/env bash
# One GPU session for issues 12 and 14 on an offline GPU host (the vLLM bundle in /tmp/site, see
# ../shared/device/README.md): the run-to-run noise of two identical evaluations, with and without vLLM's
# batch-invariant kernels (benchmarks/determinism.py), and the server-lever table and profile
# (ci/gpu_levers.sh, benchmarks/server_levers.py). Every step has a timeout and writes to OUTDIR as it ends.
# usage: ci/gpu_noise_and_levers.sh OUTDIR        env: QG_GGUF, QG_DATA (as ci/gpu_run.sh)
# Background-friendly: setsid nohup bash ci/gpu_noise_and_levers.sh /tmp/o > /tmp/o.log 2>&1 &; poll OUTDIR/DONE
set -uo pipefail
OUT=${1:?usage: gpu_noise_and_levers.sh OUTDIR}
mkdir -p "$OUT"; rm -f "$OUT/DONE"
source /tmp/site/env.sh
export PYTHONPATH=$PWD/src:$PWD:${PYTHONPATH:-} QUANTGATE_CACHE=/tmp/qgcache QUANTGATE_DATA_DIR=${QG_DATA:-/tmp/qgdata}
export QUANTGATE_VLLM_ARGS=${QUANTGATE_VLLM_ARGS:---enforce-eager}
mkdir -p /tmp/qgcache/downloads
[ -f /tmp/qgcache/downloads/SmolLM2-135M-Instruct.Q4_1.gguf ] || cp "$QG_GGUF" /tmp/qgcache/downloads/
note() { echo "$*" | tee -a "$OUT/summary.txt"; }
det() {  # det NAME [--batch-invariant]
  local t; t=$(date +%s)
  timeout 420 python3 benchmarks/determinism.py --matrix fixtures/gpu.yaml --variant bf16 --task gsm8k \
    --limit 400 --json "$OUT/$1.json" "${@:2}" > "$OUT/$1.log" 2>&1
  note "$1 rc=$? wall=$(( $(date +%s) - t ))s"
}
det determinism
t=$(date +%s)
QG_DEADLINE_S=${QG_DEADLINE_S:-600} QG_GGUF= bash ci/gpu_levers.sh "$OUT/levers"
note "levers rc=$? wall=$(( $(date +%s) - t ))s"
det determinism-batch-invariant --batch-invariant
tar czf "$OUT/levers.tgz" -C "$OUT" levers 2>/dev/null
note "done" && touch "$OUT/DONE"
