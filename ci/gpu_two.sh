#!/usr/bin/env bash
# Issue 16 on a host with 2 GPUs (2 H200s), vLLM bundle installed as in ../shared/device/README.md (source
# /tmp/site/env.sh), the GGUF and evaluation data carried over. Everything lands in OUTDIR; every step writes its
# own log and a line in OUTDIR/summary.txt, and a failed step does not stop the next.
#   prebuild  build the checkpoints once (GPU 0), outside the timings; write the TP-2 model (ci/make_tp2_model.py)
#   single    the two variants (fp8-modelopt, nvfp4-modelopt) and their BF16 baseline on one GPU: wall time
#   two       the same with `pytest -n 2`: a worker per GPU, placement recorded by NVML (ci/gpu_placement.py)
#   tp2       fixtures/gpu-tp2.yaml: `gpus: 2`, served with --tensor-parallel-size 2; kernel lines saved
#   shards    the same two variants as two shards with their own results dirs (after a baseline shard), run at
#             once on GPU 0 and GPU 1, merged with `quantgate merge`
#   tables    the score tables of single, two and merged, side by side, and their differences
# usage: ci/gpu_two.sh OUTDIR [STEP...]   (default: all, in the order above; ~12 min of GPU time at QG_LIMIT=100)
#        env: QG_GGUF (the GGUF, if not yet in the cache), QG_DATA, QG_LIMIT (items per task, default 100)
# A run can exceed one 10-minute command: start it with `setsid nohup bash ci/gpu_two.sh /tmp/out2 > /tmp/out2.log
# 2>&1 &` and poll for /tmp/out2/summary.txt's "done" line.
set -uxo pipefail
OUT=$(mkdir -p "${1:?usage: gpu_two.sh OUTDIR [STEP...]}" && cd "$1" && pwd)
[ -f /tmp/site/env.sh ] && source /tmp/site/env.sh
export PYTHONPATH=$PWD/src:$PWD:${PYTHONPATH:-} QUANTGATE_CACHE=${QUANTGATE_CACHE:-/tmp/qgcache}
export QUANTGATE_DATA_DIR=${QG_DATA:-${QUANTGATE_DATA_DIR:-/tmp/qgdata}}
export QUANTGATE_VLLM_ARGS=${QUANTGATE_VLLM_ARGS:---enforce-eager}
unset CUDA_VISIBLE_DEVICES QUANTGATE_RESULTS
# NVLink multicast stays off on these shared hosts (a program using it can take the GPUs out of service), in
# NCCL, PyTorch, NVSHMEM and vLLM's symmetric-memory all-reduce; every server inherits this environment.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 VLLM_ALLREDUCE_USE_SYMM_MEM=0
LIMIT=${QG_LIMIT:-100}
R=/tmp/qg2   # results dirs, one per run; the checkpoint cache is shared
mkdir -p "$QUANTGATE_CACHE/downloads" "$R"
if [ ! -f "$QUANTGATE_CACHE/downloads/SmolLM2-135M-Instruct.Q4_1.gguf" ] && [ -n "${QG_GGUF:-}" ]; then
  cp "$QG_GGUF" "$QUANTGATE_CACHE/downloads/"
fi
SEL="smollm2-135m/bf16 or fp8-modelopt or nvfp4-modelopt"
PYTEST=(python3 -m pytest -p quantgate.plugin -p no:cacheprovider --pyargs quantgate.suite -v -rA
        -m "not perf and not slow" --qg-limit "$LIMIT")
note() { echo "$*" | tee -a "$OUT/summary.txt"; }
placement_start() {  # $1: name; samples NVML into $OUT/placement-$1.jsonl until placement_stop
  rm -f "$R/stop-$1"
  python3 ci/gpu_placement.py "$OUT/placement-$1.jsonl" --interval 1 --stop-file "$R/stop-$1" \
    > "$OUT/placement-$1.txt" 2>&1 &
  echo $! > "$R/placement-$1.pid"
}
placement_stop() {
  touch "$R/stop-$1"
  wait "$(cat "$R/placement-$1.pid")" 2>/dev/null
  cat "$OUT/placement-$1.txt"
}
keep() {  # $1: results dir name; keeps its server logs, junit and the result keys (not the checkpoints)
  mkdir -p "$OUT/results-$1"
  cp -r "$R/$1/_server_logs" "$R/$1/_servers" "$OUT/results-$1/" 2>/dev/null
  find "$R/$1" -name provenance.json | sed "s|$R/$1/||" > "$OUT/results-$1/entries.txt"
}

prebuild() {
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
  CUDA_VISIBLE_DEVICES=0 python3 - <<'PY' > "$OUT/prebuild.log" 2>&1
import time
from quantgate.matrix import load_matrix, load_thresholds
from quantgate.runner import Run
run = Run(load_matrix("fixtures/gpu.yaml"), load_thresholds("thresholds/retention.yaml"), "/tmp/qg2/prebuild")
for v in ("bf16", "fp8-modelopt", "nvfp4-modelopt"):
    t = time.monotonic()
    c = run.variant("smollm2-135m", v).served_checkpoint()
    print(f"{v}: {c.path} ({time.monotonic() - t:.0f}s)", flush=True)
PY
  local rc=$?
  python3 ci/make_tp2_model.py --out /tmp/qg-tp2-model >> "$OUT/prebuild.log" 2>&1 || rc=$?
  return $rc
}

single() {
  rm -rf "$R/single"
  CUDA_VISIBLE_DEVICES=0 "${PYTEST[@]}" --qg-matrix fixtures/gpu.yaml --qg-results "$R/single" -k "$SEL" \
    --junitxml "$OUT/junit-single.xml" > "$OUT/pytest-single.log" 2>&1
  local rc=$?; keep single; return $rc
}

two() {
  rm -rf "$R/two"
  placement_start two
  "${PYTEST[@]}" -n 2 --qg-matrix fixtures/gpu.yaml --qg-results "$R/two" -k "$SEL" \
    --junitxml "$OUT/junit-two.xml" > "$OUT/pytest-two.log" 2>&1
  local rc=$?
  placement_stop two
  grep -E "^\[gw[0-9]\]" "$OUT/pytest-two.log" > "$OUT/two-tests-per-worker.txt"
  keep two; return $rc
}

tp2() {
  rm -rf "$R/tp2"
  placement_start tp2
  CUDA_VISIBLE_DEVICES=0,1 "${PYTEST[@]}" --qg-matrix fixtures/gpu-tp2.yaml --qg-results "$R/tp2" -k kernel_path \
    --junitxml "$OUT/junit-tp2.xml" > "$OUT/pytest-tp2.log" 2>&1
  local rc=$?
  placement_stop tp2
  for log in "$R"/tp2/_server_logs/*.log; do
    echo "== $log"
    head -1 "$log" | tr ' ' '\n' | grep -A1 -- "--tensor-parallel-size"
    grep -E "Selected|Using .*(Kernel|kernel)|backend|world_size|tensor_parallel_size|TP[0-9]|rank [0-9]|Rank" \
      "$log" | head -40
  done > "$OUT/tp2-kernel-lines.txt" 2>&1
  keep tp2; return $rc
}

shards() {
  rm -rf "$R/shard-base" "$R/shard-a" "$R/shard-b" "$R/merged"
  # The baseline first, as a CI matrix would (docs/multi-gpu.md): both shards reuse it instead of each
  # evaluating it again, so the merge finds the same result under the baseline's keys.
  local t0=$(date +%s)
  CUDA_VISIBLE_DEVICES=0 "${PYTEST[@]}" --qg-matrix fixtures/gpu.yaml --qg-results "$R/shard-base" \
    -k "smollm2-135m/bf16" > "$OUT/pytest-shard-base.log" 2>&1
  note "shard-base rc=$? wall=$(( $(date +%s) - t0 ))s"
  cp -a "$R/shard-base" "$R/shard-a" && cp -a "$R/shard-base" "$R/shard-b"
  t0=$(date +%s)
  CUDA_VISIBLE_DEVICES=0 "${PYTEST[@]}" --qg-matrix fixtures/gpu.yaml --qg-results "$R/shard-a" -k fp8-modelopt \
    > "$OUT/pytest-shard-a.log" 2>&1 &
  local a=$!
  CUDA_VISIBLE_DEVICES=1 "${PYTEST[@]}" --qg-matrix fixtures/gpu.yaml --qg-results "$R/shard-b" -k nvfp4-modelopt \
    > "$OUT/pytest-shard-b.log" 2>&1 &
  local b=$!
  wait $a; local ra=$?
  wait $b; local rb=$?
  note "shard-a rc=$ra shard-b rc=$rb (at once on GPU 0 and 1) wall=$(( $(date +%s) - t0 ))s"
  python3 -m quantgate.cli merge "$R/shard-a" "$R/shard-b" --into "$R/merged" > "$OUT/merge.log" 2>&1
  local rm=$?
  cat "$OUT/merge.log"
  keep merged
  [ $ra -eq 0 ] && [ $rb -eq 0 ] && return $rm
  return 1
}

tables() {
  python3 - "$R" "$LIMIT" <<'PY' > "$OUT/tables.md" 2>&1
import sys
from quantgate import verdicts
from quantgate.errors import QuantgateError
from quantgate.matrix import load_matrix, load_thresholds, with_task_limits
from quantgate.runner import Run
root, limit = sys.argv[1], sys.argv[2]
matrix = with_task_limits(load_matrix("fixtures/gpu.yaml"), limit)
th = load_thresholds("thresholds/retention.yaml")
stable = {}
for name in ("single", "two", "merged"):
    try:
        t = verdicts.score_table(Run(matrix, th, f"{root}/{name}", reuse_only=True), "smollm2-135m", partial=True)
    except QuantgateError as exc:
        print(f"## {name}: no table ({exc})\n")
        continue
    stable[name] = t.render(stable=True)
    print(f"## {name}\n\n{t.render()}\n")
for name in ("two", "merged"):
    if "single" in stable and name in stable:
        same = stable[name] == stable["single"]
        print(f"{name} table {'EQUALS' if same else 'DIFFERS FROM'} the single-GPU table (stable rendering)")
        if not same:
            import difflib
            print("\n".join(difflib.unified_diff(stable["single"].splitlines(), stable[name].splitlines(),
                                                 "single", name, lineterm="")))
PY
  local rc=$?
  tail -5 "$OUT/tables.md"
  return $rc
}

steps=("${@:2}")
[ ${#steps[@]} -gt 0 ] || steps=(prebuild single two tp2 shards tables)
for step in "${steps[@]}"; do
  t=$(date +%s)
  "$step"
  note "$step rc=$? wall=$(( $(date +%s) - t ))s"
done
python3 - "$OUT/summary.txt" <<'PY' | tee -a "$OUT/summary.txt"
import re, sys
walls = dict(re.findall(r"^(single|two) rc=\d+ wall=(\d+)s", open(sys.argv[1]).read(), re.M))
if len(walls) == 2:
    print(f"wall: 1 GPU {walls['single']}s, 2 GPUs (-n 2) {walls['two']}s, "
          f"speed-up {int(walls['single']) / max(int(walls['two']), 1):.2f}x")
PY
note "done"
