"""Make the two checkpoints of fixtures/cpu-tasks.yaml that quantgate does not build itself.

1. `smollm2-135m-nvfp4-ct/`: a compressed-tensors NVFP4 checkpoint (W4A4, llm-compressor's NVFP4 preset)
   of the demo model, made by `quantize_with_llmcompressor.py` outside quantgate. The matrix names it by
   local path.
2. `hf-cache/`: a Hugging Face Hub cache, laid out the way huggingface_hub lays out a download
   (`models--org--name/{blobs,refs,snapshots/<commit>}`, snapshot files as relative symlinks to blobs), that
   holds a compressed-tensors W8A8 checkpoint (SmoothQuant 0.8, then W8A8) as
   `quantgate-examples/SmolLM2-135M-Instruct-W8A8` at commit EXAMPLE_COMMIT. The matrix names it as a
   `kind: hub` source; with `HF_HUB_CACHE` pointing here and `HF_HUB_OFFLINE=1`, quantgate obtains it through
   huggingface_hub's own download code, from the cache.

No Hub is reachable from the machines this was made on, so the Hub-cache stands in for a download: the loading
code is the real one, the commit id is ours.

    .venv/bin/python examples/external-checkpoints/prepare.py [--out external-checkpoints]

Idempotent: a finished checkpoint is kept. Needs the offline data folder (WikiText-2 for calibration).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
HUB_REPO = "quantgate-examples/SmolLM2-135M-Instruct-W8A8"
# A stand-in commit id (40 lowercase hex digits, as huggingface_hub requires); fixtures/cpu-tasks.yaml pins it.
# A Hub commit never changes content, and quantgate's cache trusts that (a checkpoint is cached by repo and
# commit): change this id whenever what prepare.py writes changes (v2: SmoothQuant 0.8 before W8A8).
EXAMPLE_COMMIT = "f34c58154391d394618df877d62d5161e88b0531"


def quantize(base: Path, out: Path, scheme: str, calibration_text: Path | None, *extra: str) -> None:
    """Run quantize_with_llmcompressor.py in the llm-compressor environment quantgate keeps (quantgate.envs)."""
    if (out / "config.json").is_file():
        print(f"kept {out}")
        return
    from quantgate.envs import builder_python

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [builder_python("llmcompressor"), str(HERE / "quantize_with_llmcompressor.py"),
           "--base", str(base), "--out", str(tmp), "--scheme", scheme]
    if calibration_text:
        cmd += ["--calibration-text", str(calibration_text)]
    subprocess.run([*cmd, *extra], check=True)
    tmp.rename(out)


def lay_out_hub_cache(checkpoint: Path, cache: Path, repo: str, commit: str) -> Path:
    """Copy `checkpoint` into `cache` as huggingface_hub stores a snapshot; returns the snapshot folder.

    Layout (huggingface_hub.file_download): blobs/<sha256> holds each file once, snapshots/<commit>/<name> is a
    relative symlink to it, refs/main holds the commit.
    """
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / commit
    if snap.is_dir() and (snap / "config.json").exists():
        print(f"kept {snap}")
        return snap
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for f in sorted(p for p in checkpoint.iterdir() if p.is_file()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        blob = root / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(f, blob)
        link = snap / f.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, snap))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return snap


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("external-checkpoints"),
                    help="where the checkpoints go (default: external-checkpoints/ in the working directory, where "
                    "fixtures/cpu-tasks.yaml looks for them)")
    ap.add_argument("--matrix", default="fixtures/cpu-tasks.yaml",
                    help="the matrix whose first model is the BF16 base (default: %(default)s)")
    args = ap.parse_args()

    from quantgate.checkpoints.obtain import baseline_checkpoint
    from quantgate.matrix import load_matrix
    from quantgate.paths import data_dir

    base = baseline_checkpoint(load_matrix(args.matrix).models[0]).path
    text = data_dir() / "wikitext2" / "wiki.test.raw"
    out = args.out.resolve()
    quantize(base, out / "smollm2-135m-nvfp4-ct", "NVFP4", text)
    # SmoothQuant 0.8 before W8A8, as llm-compressor's W8A8 examples do: plain RTN W8A8 of this model sits on the
    # INT8 top-1 agreement limit (0.887 [0.877, 0.897] against 0.88 at 32 documents: the critical gate could not
    # pass it), SmoothQuant's is the demo's 0.909
    quantize(base, out / "w8a8-sq-for-hub-cache", "W8A8", text, "--smoothquant", "0.8")
    snap = lay_out_hub_cache(out / "w8a8-sq-for-hub-cache", out / "hf-cache", HUB_REPO, EXAMPLE_COMMIT)
    print(f"local path : {out / 'smollm2-135m-nvfp4-ct'}")
    print(f"hub cache  : HF_HUB_CACHE={out / 'hf-cache'} HF_HUB_OFFLINE=1 ({HUB_REPO}@{EXAMPLE_COMMIT}, {snap})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
