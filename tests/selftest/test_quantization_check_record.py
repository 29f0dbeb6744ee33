"""A passed quantization-config check is recorded and read back while the checkpoint's files are unchanged
(checkpoints/inspect.py check_quantization_config); any change of a file checks again; a failure is never
recorded. No timing: the saving is measured in benchmarks/warm_rerun.py."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import save_file

from quantgate.checkpoints import inspect as inspect_mod
from quantgate.errors import BuildError
from tests.selftest import fault_harness as fh


@pytest.fixture
def checks(tmp_path, monkeypatch):
    """The number of times the tensors were really decoded and checked."""
    monkeypatch.setenv("QUANTGATE_CACHE", str(tmp_path / "cache"))
    ran: list[int] = []
    real = inspect_mod.quantization_mismatches
    monkeypatch.setattr(inspect_mod, "quantization_mismatches", lambda *a: ran.append(1) or real(*a))
    return ran


def test_a_passed_check_is_read_back_until_a_file_changes(tmp_path, checks):
    ckpt = fh.fake_weights_dir(tmp_path / "ckpt")
    inspect_mod.check_quantization_config(ckpt, "m/bf16")
    inspect_mod.check_quantization_config(ckpt, "m/bf16")
    assert len(checks) == 1
    # An int8 weight with no quantization_config in config.json: the changed file is checked, and fails.
    save_file({"model.embed_tokens.weight": np.ones((64, 64), np.float16),
               "model.layers.0.mlp.down_proj.weight": np.ones((64, 64), np.int8)}, str(ckpt / "model.safetensors"))
    for _ in range(2):  # a failure is not recorded: found again on every use
        with pytest.raises(BuildError, match="no quantization_config"):
            inspect_mod.check_quantization_config(ckpt, "m/v")
    assert len(checks) == 3


def test_a_change_of_the_checking_code_checks_again(tmp_path, checks, monkeypatch):
    ckpt = fh.fake_weights_dir(tmp_path / "ckpt")
    inspect_mod.check_quantization_config(ckpt, "m/bf16")
    edited = tmp_path / "inspect_edited.py"
    edited.write_bytes(inspect_mod.Path(inspect_mod.__file__).read_bytes() + b"\n# edited\n")
    monkeypatch.setattr(inspect_mod, "__file__", str(edited))
    inspect_mod.check_quantization_config(ckpt, "m/bf16")
    assert len(checks) == 2
