"""pytest-xdist scheduling by variant: every test of one (model, variant) goes to one worker, so its server starts
once, on that worker's device(s).

xdist's `--dist loadgroup` carries each test's `xdist_group` to the controller by appending `@group` to the test
id in the worker. pytest 9.2 made node ids structured and that append no longer takes (pytest-xdist issue #1386,
open with xdist 3.8.0): the groups are silently ignored and one variant's tests are spread over workers. The
controller's scheduler here reads the variant from the parameter id instead, which the matrix makes
unambiguous (`model/variant` labels), and falls back to xdist's own group or file rules for other tests.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def variant_scope(nodeid: str, labels: Iterable[str]) -> str | None:
    """The `model/variant` label of the test `nodeid`, read from its parameter id, or None.

    `test_retention[smollm2-135m/fp8-modelopt-hellaswag]` -> `smollm2-135m/fp8-modelopt`: pytest joins a test's
    parameter ids with `-`, so a label must fill the whole id or be bounded by `[`, `-` or `]`. The longest label
    wins (`nvfp4-modelopt` over a variant named `nvfp4`). An `@group` suffix (xdist before pytest 9.2) is ignored.
    """
    head, bracket, params = nodeid.partition("[")
    if not bracket:
        return None
    params = params[: params.rfind("]")] if "]" in params else params
    parts = params.split("-")
    for label in sorted(set(labels), key=len, reverse=True):
        n = len(label.split("-"))
        if any("-".join(parts[i : i + n]) == label for i in range(len(parts) - n + 1)):
            return label
    return None


def variant_scheduling(labels: Iterable[str]) -> type:
    """xdist's LoadGroupScheduling with each test's scope taken from its variant (variant_scope) where it has
    one; other tests keep xdist's rule (their `@group`, else their own id)."""
    from xdist.scheduler import LoadGroupScheduling

    known = tuple(labels)

    class VariantScheduling(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            label = variant_scope(nodeid, known)
            return f"quantgate:{label}" if label else super()._split_scope(nodeid)

    return VariantScheduling


def make_variant_scheduler(config: Any, log: Any, labels: Iterable[str]) -> Any:
    """The scheduler for `pytest_xdist_make_scheduler` (variant_scheduling over the matrix's labels)."""
    return variant_scheduling(labels)(config, log)
