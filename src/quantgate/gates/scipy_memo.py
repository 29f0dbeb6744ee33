"""A persistent memo of the scipy calls the gates make, so that a warm rerun never imports scipy.stats.

Importing ``scipy.stats`` costs about a second, more than a warm rerun's whole budget share (issue 14: a warm
rerun in at most 3 s). The gates' scipy calls (a normal quantile, a binomial cdf or exact test, Tang's score
interval found with ``scipy.optimize.brentq``, a Student t interval) are pure functions of a few numbers or one
array, so their results are kept in ``<results>/_memo/scipy.json`` and read back when the exact same inputs come
again. scipy stays the only source of these numbers: the memo only repeats what scipy returned.

Key of an entry: sha256 over the function's name and its exact inputs (floats by their exact binary value,
arrays by dtype, shape and a sha256 of their bytes) and ``CODE_VERSION``, itself a sha256 of scipy's and numpy's
versions and of the source of this module and of ``quantgate.gates.stats`` (where the memoized Tang interval
lives). Another input, level, threshold, scipy or code gives another key, hence a recomputation; nothing is
ever invalidated in place. Every quantgate step around these calls (pairing, counting, bootstrap resampling,
the gate's decision) still runs on every rerun.

Concurrency: pytest-xdist workers each hold the entries they read at first use; a worker that computes a new
entry merges it into the file under a file lock (``filelock``) and writes the file atomically
(``quantgate.atomic``), so concurrent workers never lose each other's entries and readers never see a partial
file. A file that cannot be read (corrupt, wrong shape) is ignored with a warning and rewritten at the next
new entry; the numbers are then recomputed by scipy.

Without ``use(path)`` (a library call outside a Run, the selftests of the statistics) nothing is stored and
every call goes to scipy.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from quantgate.atomic import atomic_write_json
from quantgate.errors import QuantgateError

MEMO_FILE = Path("_memo") / "scipy.json"


class MemoWarning(UserWarning):
    """The memo file could not be read or written; the numbers are recomputed by scipy."""


class _Memo:
    """The entries of one memo file: read once per process, new entries merged in under a lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[str, Any] | None = None

    def _read_file(self) -> dict[str, Any]:
        if not self.path.exists():
            return {}
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(doc, dict) or not isinstance(doc.get("entries"), dict):
                raise ValueError("not a JSON object with an 'entries' object")
            return doc["entries"]
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            warnings.warn(f"quantgate: the scipy memo {self.path} is unreadable ({exc}); ignored, its numbers "
                          "are recomputed", MemoWarning, stacklevel=4)
            return {}

    def get(self, key: str) -> Any:
        if self._entries is None:
            self._entries = self._read_file()
        return self._entries.get(key)

    def put(self, key: str, value: Any) -> None:
        from filelock import FileLock

        assert self._entries is not None
        self._entries[key] = value
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(self.path) + ".lock"):
                merged = {**self._read_file(), **self._entries}
                atomic_write_json(self.path, {"entries": merged}, sort_keys=True)
            self._entries = merged
        except (OSError, QuantgateError) as exc:
            warnings.warn(f"quantgate: the scipy memo {self.path} was not written ({exc})", MemoWarning,
                          stacklevel=4)


_memo: _Memo | None = None
_code_version: str | None = None


def use(path: Path | None) -> None:
    """Keep the memo in the file `path` from now on in this process (None: keep none)."""
    global _memo
    _memo = None if path is None else _Memo(Path(path))


def memo_path(results: Path) -> Path:
    """The memo file of a results directory (beside the results, skipped by `quantgate merge` as `_memo/`)."""
    return Path(results) / MEMO_FILE


def code_version() -> str:
    """sha256 of scipy's and numpy's versions and of the source of the code whose results are kept."""
    global _code_version
    if _code_version is None:
        import scipy  # the package alone (~20 ms); scipy.stats is what costs a second

        here = Path(__file__).resolve().parent
        h = hashlib.sha256(f"scipy {scipy.__version__} numpy {np.__version__}".encode())
        for name in ("scipy_memo.py", "stats.py"):
            h.update((here / name).read_bytes())
        _code_version = h.hexdigest()
    return _code_version


def _canonical(x: Any) -> Any:
    """A JSON-able value that differs whenever `x` does: floats by their exact bits, arrays by their bytes."""
    if isinstance(x, (bool, str)) or x is None:
        return x
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x).hex()
    if isinstance(x, np.ndarray):
        a = np.ascontiguousarray(x)
        return ["ndarray", a.dtype.str, list(a.shape), hashlib.sha256(a.tobytes()).hexdigest()]
    if isinstance(x, (tuple, list)):
        return [_canonical(v) for v in x]
    raise TypeError(f"cannot key the scipy memo by a {type(x).__name__}")


def _key(name: str, args: tuple[Any, ...]) -> str:
    doc = json.dumps([code_version(), name, _canonical(args)], separators=(",", ":"))
    return hashlib.sha256(doc.encode()).hexdigest()


def _to_json(value: Any) -> Any:
    # Floats as their exact hex form: NaN and infinities included, and no rounding through decimal text.
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    return float(value).hex()


def _from_json(doc: Any) -> Any:
    if isinstance(doc, list):
        return tuple(_from_json(v) for v in doc)
    if not isinstance(doc, str):
        raise ValueError(f"not a float in hex form: {doc!r}")
    return float.fromhex(doc)


def memoized(name: str, compute: Callable[..., Any], *args: Any) -> Any:
    """`compute(*args)` (a float or a tuple of floats), read back from the memo when one is in use and holds
    the same call. A malformed entry is recomputed (with a warning) and replaced."""
    if _memo is None:
        return compute(*args)
    key = _key(name, args)
    held = _memo.get(key)
    if held is not None:
        try:
            return _from_json(held)
        except (ValueError, TypeError) as exc:
            warnings.warn(f"quantgate: the scipy memo {_memo.path} holds a malformed entry for {name} ({exc}); "
                          "recomputed", MemoWarning, stacklevel=3)
    value = compute(*args)
    _memo.put(key, _to_json(value))
    return value


# ---------------------------------------------------------------------------------- the memoized scipy calls


def norm_ppf(q: float) -> float:
    """``scipy.stats.norm.ppf(q)``: the standard normal quantile at probability `q` in (0, 1)."""

    def compute(q: float) -> float:
        from scipy import stats

        return float(stats.norm.ppf(q))

    return memoized("norm.ppf", compute, float(q))


def binom_cdf(k: int, n: int, p: float) -> float:
    """``scipy.stats.binom.cdf(k, n, p)``: P(X <= k) for X ~ Binomial(n, p)."""

    def compute(k: int, n: int, p: float) -> float:
        from scipy import stats

        return float(stats.binom.cdf(k, n, p))

    return memoized("binom.cdf", compute, int(k), int(n), float(p))


def binomtest_pvalue(k: int, n: int, p: float, alternative: str) -> float:
    """``scipy.stats.binomtest(k, n, p, alternative).pvalue``: the exact binomial test's p-value."""

    def compute(k: int, n: int, p: float, alternative: str) -> float:
        from scipy import stats

        return float(stats.binomtest(k, n, p, alternative).pvalue)

    return memoized("binomtest.pvalue", compute, int(k), int(n), float(p), str(alternative))


def ttest_1samp_ci(x: np.ndarray, level: float) -> tuple[float, float]:
    """``scipy.stats.ttest_1samp(x, popmean=0.0).confidence_interval(confidence_level=level)`` as (low, high):
    the two-sided Student t interval at `level` for the mean of the 1-d float array `x`."""

    def compute(x: np.ndarray, level: float) -> tuple[float, float]:
        from scipy import stats

        ci = stats.ttest_1samp(x, popmean=0.0).confidence_interval(confidence_level=level)
        return float(ci.low), float(ci.high)

    return memoized("ttest_1samp.confidence_interval", compute, np.asarray(x, dtype=float), float(level))


__all__ = [
    "MEMO_FILE", "MemoWarning", "binom_cdf", "binomtest_pvalue", "code_version", "memo_path", "memoized",
    "norm_ppf", "ttest_1samp_ci", "use",
]
