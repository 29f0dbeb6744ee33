#!/usr/bin/env bash
# Issue 14's long workload on an offline GPU host (the vLLM bundle in /tmp/site, ../shared/device/README.md):
# benchmarks/server_levers.py with gsm8k repeated (QG_REPEATS, default 6: 2,400 generations, ~30 s of engine time
# on an H200) and the full hellaswag validation set (10,042 items, 40,168 loglikelihood requests), baseline and its
# repeat (the flip noise floor) against vLLM's offline engine, then `vllm serve --api-server-count 4`.
# usage: ci/gpu_long_levers.sh OUTDIR      env: QG_GGUF, QG_DATA, QG_REPEATS, QG_DEADLINE_S (1100), QG_LEVERS,
#        QG_REPEAT_TASKS (tasks whose baseline runs twice for the flip noise floor; default: both)
# Background-friendly: setsid nohup bash ci/gpu_long_levers.sh /tmp/long > /tmp/long.log 2>&1 &; poll OUTDIR/DONE
set -uo pipefail
OUT=${1:?usage: gpu_long_levers.sh OUTDIR}
QG_PROFILE= QG_DEADLINE_S=${QG_DEADLINE_S:-1100} bash "$(dirname "$0")/gpu_levers.sh" "$OUT" \
  --repeats "${QG_REPEATS:-6}" --items hellaswag=all --levers ${QG_LEVERS:-api-servers} \
  --repeat-tasks ${QG_REPEAT_TASKS:-gsm8k hellaswag} --step-timeout-s 420 --offline-timeout-s 420
