"""The environment settings that keep known vLLM faults out of a server, by vLLM version (pure logic; the fault
itself is reproduced against vLLM's own code by benchmarks/vllm_payload_reuse.py)."""

from __future__ import annotations

import importlib.metadata
import os
import sys
import types

import pytest

from quantgate.engines import vllm_cli
from quantgate.engines.vllm_workarounds import PAYLOAD_REUSE_THRESHOLD, THRESHOLD_ENV, workaround_env


@pytest.mark.parametrize("version", ["0.26.0", "0.26.0+cpu", "0.25.1", "0.9.2.post2", "0.26.1rc1", "garbage"])
def test_versions_with_the_payload_reuse_fault_get_every_tensor_inline(version):
    settings, notes = workaround_env(version, {})
    assert settings == {THRESHOLD_ENV: str(PAYLOAD_REUSE_THRESHOLD)}
    assert len(notes) == 1 and "50053" in notes[0] and version in notes[0]


@pytest.mark.parametrize("version", ["0.27.0", "0.27.1", "0.31.0+cpu", "1.0.0", "0.30.0rc2"])
def test_fixed_versions_are_left_alone(version):
    assert workaround_env(version, {}) == ({}, [])


def test_a_threshold_the_user_set_wins():
    assert workaround_env("0.26.0", {THRESHOLD_ENV: "1024"}) == ({}, [])


def test_threshold_fits_msgpack_ext_length_field():
    # an inline tensor is one msgpack "ext 32" object: its length must fit 32 bits
    assert PAYLOAD_REUSE_THRESHOLD == 2**32 - 1


def _fake_vllm_cli(monkeypatch, seen: dict) -> None:
    """Stand in for vllm.entrypoints.cli.main (fault-injection style): record the environment vLLM would see."""
    module = types.ModuleType("vllm.entrypoints.cli.main")
    module.main = lambda: seen.update(env=dict(os.environ), argv=list(sys.argv))
    for name in ("vllm", "vllm.entrypoints", "vllm.entrypoints.cli"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "vllm.entrypoints.cli.main", module)
    monkeypatch.setattr(importlib.metadata, "version", importlib.metadata.version)  # main() rebinds it


@pytest.mark.parametrize(("installed", "expected"), [("0.26.0", str(PAYLOAD_REUSE_THRESHOLD)), ("0.31.0", None)])
def test_the_server_entry_applies_them_before_vllm_starts(monkeypatch, capsys, installed, expected):
    seen: dict = {}
    _fake_vllm_cli(monkeypatch, seen)
    monkeypatch.delenv(THRESHOLD_ENV, raising=False)
    monkeypatch.setattr(vllm_cli, "vllm_version", lambda: installed)
    monkeypatch.setattr(sys, "argv", ["vllm_cli"])
    assert vllm_cli.main(["serve", "/m"]) == 0
    assert seen["argv"][1:] == ["serve", "/m"]
    assert seen["env"].get(THRESHOLD_ENV) == expected
    # named in the server's log (its stderr), or not at all
    assert ("50053" in capsys.readouterr().err) == (expected is not None)
