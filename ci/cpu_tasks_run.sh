#!/usr/bin/env bash
# The CPU run of fixtures/cpu-tasks.yaml (issue 11, item 10): make the two checkpoints quantgate does not build
# (examples/external-checkpoints/prepare.py), then run the suite on that matrix with huggingface_hub reading an
# offline Hub cache. Extra arguments go to `quantgate run` (e.g. -x, --qg-limit).
#   bash ci/cpu_tasks_run.sh [QUANTGATE RUN ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python examples/external-checkpoints/prepare.py --out external-checkpoints
export HF_HUB_CACHE="$PWD/external-checkpoints/hf-cache" HF_HUB_OFFLINE=1
.venv/bin/quantgate check --matrix fixtures/cpu-tasks.yaml
exec .venv/bin/quantgate run --matrix fixtures/cpu-tasks.yaml "$@"
