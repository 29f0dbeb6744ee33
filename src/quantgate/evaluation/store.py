"""The result store: one directory per evaluation, keyed by its provenance, written atomically.

Layout: <results>/<model>/<variant>/<task>/<key16>/
  provenance.json  the full key and the context (versions, hardware, kernel path, git state, timings)
  aggregate.json   lm-eval's aggregate metrics for the task
  samples.jsonl    lm-eval's per-item samples (doc, prompt arguments, responses, per-item metrics)
  server.log       the vLLM server log of the run that produced it
A result is reused only when every field of its key matches; anything else is a different experiment.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock

from quantgate.evaluation.provenance import key_digest


@dataclass
class StoredResult:
    path: Path
    provenance: dict[str, Any]
    aggregate: dict[str, Any]
    _samples: list[dict[str, Any]] | None = field(default=None, repr=False)

    @property
    def samples(self) -> list[dict[str, Any]]:
        if self._samples is None:
            with open(self.path / "samples.jsonl", encoding="utf-8") as fh:
                self._samples = [json.loads(line) for line in fh if line.strip()]
        return self._samples


class ResultStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def entry_dir(self, model: str, variant: str, task: str, key: dict[str, Any]) -> Path:
        return self.root / model / variant / task / key_digest(key)[:16]

    def lock(self, model: str, variant: str, task: str, key: dict[str, Any]) -> FileLock:
        d = self.entry_dir(model, variant, task, key)
        d.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(d) + ".lock")

    def variant_lock(self, model: str, variant: str) -> FileLock:
        """Held while one process serves and evaluates a variant, so processes sharing this store (xdist
        workers) start its server once. Blocks without a timeout: the holder is evaluating."""
        d = self.root / model / variant
        d.mkdir(parents=True, exist_ok=True)
        return FileLock(str(d / ".serving.lock"))

    def get(self, model: str, variant: str, task: str, key: dict[str, Any]) -> StoredResult | None:
        d = self.entry_dir(model, variant, task, key)
        prov = d / "provenance.json"
        if not prov.exists():
            return None
        provenance = json.loads(prov.read_text())
        if provenance.get("key") != json.loads(json.dumps(key, default=str)):
            return None  # a hash-prefix collision or a hand-edited entry: never trust it
        return StoredResult(d, provenance, json.loads((d / "aggregate.json").read_text()))

    def find(self, model: str, variant: str, task: str, key: dict[str, Any]) -> StoredResult | None:
        """The result for `key` under `variant`, else under any other variant of the model with the same key.

        A key names the served checkpoint, engine, task and settings but not the variant, so two variants
        that serve the same bytes the same way (a modelopt export emulated on a CPU, and its `emulate: true`
        twin) share one evaluation instead of repeating it.
        """
        hit = self.get(model, variant, task, key)
        if hit is not None:
            return hit
        digest = key_digest(key)[:16]
        for other in sorted(self.root.glob(f"{model}/*/{task}/{digest}")):
            if other.parent.parent.name != variant:
                hit = self.get(model, other.parent.parent.name, task, key)
                if hit is not None:
                    return hit
        return None

    def put(
        self,
        model: str,
        variant: str,
        task: str,
        key: dict[str, Any],
        context: dict[str, Any],
        aggregate: dict[str, Any],
        samples: Iterable[dict[str, Any]],
        server_log: Path | None,
    ) -> StoredResult:
        final = self.entry_dir(model, variant, task, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            provenance = {"key": key, **context}
            (tmp / "provenance.json").write_text(json.dumps(provenance, indent=2, default=str))
            (tmp / "aggregate.json").write_text(json.dumps(aggregate, indent=2, default=str))
            with open(tmp / "samples.jsonl", "w", encoding="utf-8") as fh:
                for s in samples:
                    fh.write(json.dumps(s, default=str, ensure_ascii=False) + "\n")
            if server_log is not None and server_log.exists():
                shutil.copyfile(server_log, tmp / "server.log")
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.get(model, variant, task, key)  # type: ignore[return-value]


class ServerRecords:
    """What a server for a given checkpoint logged last time (its kernel path), so a rerun can compute
    its result keys, which include the kernel path, without starting the server again."""

    def __init__(self, root: Path) -> None:
        self.dir = Path(root) / "_servers"

    def get(self, key: dict[str, Any]) -> dict[str, Any] | None:
        f = self.dir / f"{key_digest(key)[:16]}.json"
        return json.loads(f.read_text()) if f.exists() else None

    def put(self, key: dict[str, Any], record: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        f = self.dir / f"{key_digest(key)[:16]}.json"
        tmp = f.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, **record}, indent=2, default=str))
        tmp.replace(f)
