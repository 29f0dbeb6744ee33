#!/usr/bin/env bash
# Run the GPU matrix on an offline GPU host where the vLLM bundle is installed (/tmp/site/env.sh, see
# ../shared/device/README.md) and the GGUF and evaluation data were carried over. Runs the suite twice: a cold
# run that builds, serves, evaluates and records, and a warm rerun that must start no server.
# usage: ci/gpu_run.sh OUTDIR   (env: QG_GGUF, QG_DATA)
set -uo pipefail
OUT=${1:?usage: gpu_run.sh OUTDIR}
source /tmp/site/env.sh
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} QUANTGATE_CACHE=/tmp/qgcache QUANTGATE_DATA_DIR=${QG_DATA:-/tmp/qgdata}
export QUANTGATE_RESULTS=/tmp/qgres QUANTGATE_VLLM_ARGS=${QUANTGATE_VLLM_ARGS:---enforce-eager}
mkdir -p /tmp/qgcache/downloads /tmp/qgres "$OUT"
[ -f /tmp/qgcache/downloads/SmolLM2-135M-Instruct.Q4_1.gguf ] || cp "$QG_GGUF" /tmp/qgcache/downloads/
PYTEST=(python3 -m pytest -p quantgate.plugin -p no:cacheprovider --qg-matrix fixtures/gpu.yaml tests
        --ignore tests/selftest --ignore tests/test_perf.py -v -s -rA)
t0=$(date +%s)
"${PYTEST[@]}" --qg-accept --snapshot-update --junitxml /tmp/qgres/junit-cold.xml > /tmp/qgres/pytest-cold.log 2>&1
echo "cold rc=$? wall=$(( $(date +%s) - t0 ))s" | tee -a /tmp/qgres/summary.txt
t1=$(date +%s)
"${PYTEST[@]}" --junitxml /tmp/qgres/junit-warm.xml > /tmp/qgres/pytest-warm.log 2>&1
echo "warm rc=$? wall=$(( $(date +%s) - t1 ))s" | tee -a /tmp/qgres/summary.txt
tar czf "$OUT/results.tgz" -C /tmp/qgres . -C "$PWD" tests/__snapshots__ thresholds/accepted 2>/dev/null
cp /tmp/qgres/pytest-cold.log /tmp/qgres/pytest-warm.log /tmp/qgres/summary.txt "$OUT/"
