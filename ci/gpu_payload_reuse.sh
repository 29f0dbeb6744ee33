#!/usr/bin/env bash
# vLLM < 0.27's engine-output payload reuse fault on an offline GPU host (the vLLM 0.26 bundle in /tmp/site,
# ../shared/device/README.md), and quantgate's workaround (src/quantgate/engines/vllm_workarounds.py):
#   1. vLLM's own output thread, without and with the workaround, QG_REPRO_RUNS times each
#      (benchmarks/vllm_payload_reuse.py; CPU only, runs beside the GPU steps)
#   2. the loglikelihood lever rows: hellaswag (QG_ITEMS, default 5000) through one API server, four, and four
#      with vLLM's own tensor threshold (the workaround off), against the offline engine
#      (benchmarks/server_levers.py through ci/gpu_levers.sh)
#   3. the GPU matrix as a pull request runs it, with fixtures/gpu.yaml's four API servers
#      (ci/gpu_run.sh OUT verify)
# usage: ci/gpu_payload_reuse.sh OUTDIR   env: QG_GGUF, QG_DATA (as ci/gpu_run.sh), QG_ITEMS, QG_REPRO_RUNS (2),
#        QG_STEPS (default "repro levers verify")
# Background-friendly: setsid nohup bash ci/gpu_payload_reuse.sh /tmp/p9 > /tmp/p9.log 2>&1 &; poll OUTDIR/DONE
set -uo pipefail
OUT=${1:?usage: gpu_payload_reuse.sh OUTDIR}
mkdir -p "$OUT"
rm -f "$OUT/DONE"
here=$(cd "$(dirname "$0")" && pwd)
repro() {
  ( source /tmp/site/env.sh
    for i in $(seq "${QG_REPRO_RUNS:-2}"); do
      python3 benchmarks/vllm_payload_reuse.py --out "$OUT/repro-default-$i.json" >> "$OUT/repro.log" 2>&1
      python3 benchmarks/vllm_payload_reuse.py --workaround --out "$OUT/repro-workaround-$i.json" \
        >> "$OUT/repro.log" 2>&1
    done )
}
levers() {  # fixtures/gpu.yaml's prefill budget, as in session 7's rows
  QUANTGATE_VLLM_ARGS="--enforce-eager --max-num-batched-tokens 16384" QG_PROFILE= QG_DEADLINE_S=${QG_DEADLINE_S:-560} bash "$here/gpu_levers.sh" "$OUT/levers" --tasks hellaswag \
    --items hellaswag="${QG_ITEMS:-5000}" --levers api-servers workaround-off --repeat-tasks \
    --concurrency 256 --concurrencies --batch-sizes --step-timeout-s 300
}
verify() { bash "$here/gpu_run.sh" "$OUT/matrix" verify; }
t0=$(date +%s)
steps=(${QG_STEPS:-repro levers verify})
if [[ " ${steps[*]} " == *" repro "* ]]; then repro & repro_pid=$!; fi
for step in "${steps[@]}"; do
  [ "$step" = repro ] && continue
  t=$(date +%s); "$step"; echo "$step rc=$? wall=$(( $(date +%s) - t ))s" | tee -a "$OUT/steps.txt"
done
[ -n "${repro_pid:-}" ] && wait "$repro_pid"
echo "done wall=$(( $(date +%s) - t0 ))s" | tee -a "$OUT/steps.txt" > "$OUT/DONE"
