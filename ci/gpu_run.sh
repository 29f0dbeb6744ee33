#!/usr/bin/env bash
# Run the GPU matrix on an offline GPU host where the vLLM bundle is installed (/tmp/site/env.sh, see
# ../shared/device/README.md) and the GGUF and evaluation data were carried over.
#   1. cold: build, serve, evaluate, accept, snapshot, and the perf budgets against the same servers
#   2. warm: the accuracy suite again; it must start no server and evaluate nothing
#   3. items/s through the server against vLLM's offline engine (benchmarks/suite_cost.py, part c)
#   accept (only when asked for): the cold step without the perf budgets (accuracy, accept, snapshot), for a
#     lease too short for both
#   verify (only when asked for): the accuracy suite as a user's pull request runs it, against the committed
#     sm90 snapshot and accepted baselines: nothing accepted, nothing updated
#   perf (only when asked for): the perf budgets alone, `pytest -m perf`
#   nvfp4, fp8 (only when asked for): the product card's `pytest -m nvfp4` / `pytest -m fp8`, as a user runs them
# usage: ci/gpu_run.sh OUTDIR [STEP...]   (steps: cold accept verify warm ratio perf nvfp4 fp8; default: cold warm ratio)
#        env: QG_GGUF, QG_DATA, QG_BATCH (prompts per request in the ratio step, default the matrix's)
set -uo pipefail
OUT=${1:?usage: gpu_run.sh OUTDIR}
source /tmp/site/env.sh
export PYTHONPATH=$PWD/src:$PWD:${PYTHONPATH:-} QUANTGATE_CACHE=/tmp/qgcache QUANTGATE_DATA_DIR=${QG_DATA:-/tmp/qgdata}
export QUANTGATE_RESULTS=/tmp/qgres QUANTGATE_VLLM_ARGS=${QUANTGATE_VLLM_ARGS:---enforce-eager}
mkdir -p /tmp/qgcache/downloads /tmp/qgres "$OUT"
[ -f /tmp/qgcache/downloads/SmolLM2-135M-Instruct.Q4_1.gguf ] || cp "$QG_GGUF" /tmp/qgcache/downloads/
PYTEST=(python3 -m pytest -p quantgate.plugin -p no:cacheprovider --qg-matrix fixtures/gpu.yaml --pyargs quantgate.suite
        -v -s -rA)
note() { echo "$*" | tee -a /tmp/qgres/summary.txt; }
cold() {
  "${PYTEST[@]}" -m "not slow or perf" --qg-accept --snapshot-update --benchmark-json /tmp/qgres/bench-sm.json \
    --junitxml /tmp/qgres/junit-cold.xml > /tmp/qgres/pytest-cold.log 2>&1
}
accept() {
  "${PYTEST[@]}" -m "not slow and not perf" --qg-accept --snapshot-update --junitxml /tmp/qgres/junit-accept.xml \
    > /tmp/qgres/pytest-accept.log 2>&1
}
verify() {
  "${PYTEST[@]}" -m "not slow and not perf" --junitxml /tmp/qgres/junit-verify.xml > /tmp/qgres/pytest-verify.log 2>&1
}
warm() { "${PYTEST[@]}" -m "not perf" --junitxml /tmp/qgres/junit-warm.xml > /tmp/qgres/pytest-warm.log 2>&1; }
ratio() {
  python3 benchmarks/suite_cost.py --matrix fixtures/gpu.yaml --skip-cold --skip-warm --task gsm8k --items 400 \
    ${QG_BATCH:+--batch-size $QG_BATCH} > /tmp/qgres/suite_cost${QG_BATCH:+-b$QG_BATCH}.log 2>&1
}
perf() {
  "${PYTEST[@]}" -m perf --benchmark-json /tmp/qgres/bench-perf.json > /tmp/qgres/pytest-perf.log 2>&1
}
nvfp4() { "${PYTEST[@]}" -m nvfp4 --junitxml /tmp/qgres/junit-nvfp4.xml > /tmp/qgres/pytest-nvfp4.log 2>&1; }
fp8() { "${PYTEST[@]}" -m fp8 --junitxml /tmp/qgres/junit-fp8.xml > /tmp/qgres/pytest-fp8.log 2>&1; }
steps=("${@:2}")
[ ${#steps[@]} -gt 0 ] || steps=(cold warm ratio)
for step in "${steps[@]}"; do
  t=$(date +%s)
  "$step"
  note "$step rc=$? wall=$(( $(date +%s) - t ))s"
done
tar czf "$OUT/results.tgz" --exclude='*.safetensors' -C /tmp/qgres . -C "$PWD" tests/__snapshots__ thresholds/accepted 2>/dev/null
cp /tmp/qgres/*.log /tmp/qgres/summary.txt "$OUT/" 2>/dev/null
note "done"
