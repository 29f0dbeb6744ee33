#!/usr/bin/env bash
# Issue 14's lever table and profile on an offline GPU host (the vLLM bundle in /tmp/site, see
# ../shared/device/README.md): benchmarks/server_levers.py for gsm8k then hellaswag, sharing each server between
# the two tasks, with a whole-run deadline so that it ends inside the machine's hold; every step is written to
# OUTDIR as it finishes (levers.md, levers.json, results.jsonl, profile-*.md, logs/).
# usage: ci/gpu_levers.sh OUTDIR [extra server_levers.py arguments]
#        env: QG_GGUF (the embedded GGUF, when the BF16 conversion is not cached yet), QG_DATA (offline data),
#             QG_MODEL_DIR (a BF16 checkpoint dir; default: converted into /tmp/qgcache), QG_DEADLINE_S (660),
#             QG_PROFILE (default --profile; empty: no profiled runs)
# Background-friendly: setsid nohup bash ci/gpu_levers.sh /tmp/levers > /tmp/levers.log 2>&1 &
#                      then poll for /tmp/levers/DONE
set -uo pipefail
OUT=${1:?usage: gpu_levers.sh OUTDIR [ARGS...]}
source /tmp/site/env.sh
export PYTHONPATH=$PWD/src:$PWD:${PYTHONPATH:-} QUANTGATE_CACHE=/tmp/qgcache QUANTGATE_DATA_DIR=${QG_DATA:-/tmp/qgdata}
export QUANTGATE_VLLM_ARGS=${QUANTGATE_VLLM_ARGS:---enforce-eager}
mkdir -p /tmp/qgcache/downloads "$OUT"
rm -f "$OUT/DONE"
if [ -z "${QG_MODEL_DIR:-}" ] && [ -n "${QG_GGUF:-}" ]; then
  [ -f /tmp/qgcache/downloads/SmolLM2-135M-Instruct.Q4_1.gguf ] || cp "$QG_GGUF" /tmp/qgcache/downloads/
fi
t=$(date +%s)
python3 benchmarks/server_levers.py --data-dir "$QUANTGATE_DATA_DIR" ${QG_MODEL_DIR:+--model-dir "$QG_MODEL_DIR"} \
  --tasks gsm8k hellaswag ${QG_PROFILE---profile} --deadline-s "${QG_DEADLINE_S:-660}" --out "$OUT" "${@:2}" \
  > "$OUT/server_levers.log" 2>&1
echo "server_levers rc=$? wall=$(( $(date +%s) - t ))s" | tee "$OUT/DONE"
