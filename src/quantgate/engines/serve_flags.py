"""vLLM serve flags as vLLM's own parser reads them: one spelling per setting, and the settings quantgate owns.

A matrix's `serve_args` (and QUANTGATE_VLLM_ARGS) go on a `vllm serve` command line after the flags quantgate
sets itself, and argparse keeps the last value of a flag: a serve arg that repeats one of quantgate's flags, or
one given twice, silently replaces a value. Comparing flags therefore needs the name vLLM resolves each spelling to.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

# vLLM's short option aliases (vllm 0.31): `-asc` in vllm/entrypoints/launchers/cli_args.py; `-tp`, `-pp`, `-dp`
# and `-q` in vllm/engine/arg_utils.py (EngineArgs.add_cli_args, add_argument("--tensor-parallel-size", "-tp")).
SHORT_ALIASES = {
    "-asc": "--api-server-count",
    "-tp": "--tensor-parallel-size",
    "-pp": "--pipeline-parallel-size",
    "-dp": "--data-parallel-size",
    "-q": "--quantization",
}

# What the server's address, key and model name are: quantgate binds every server to 127.0.0.1 on a free port with
# its own API key and names the model itself (vllm_server.VllmServer.command).
RESERVED_ARGS = ("--host", "--port", "--api-key", "--served-model-name", "--model")
_RESERVED_WHY = ("quantgate binds every server to 127.0.0.1 on a free port with its own API key, and names the "
                 "model itself")

# The flags quantgate sets on every server from a matrix field -> what to write instead. Set in serve_args they
# would override that field without the matrix, the result keys or the report showing it.
OWNED_FLAGS: dict[str, str] = {
    **dict.fromkeys(RESERVED_ARGS, _RESERVED_WHY),
    "--max-model-len": "set the model's `max_model_len` (quantgate passes it to every server and sizes memory "
                       "and prompts from it)",
    "--seed": "set `generation.seed` (the matrix-wide or the model's generation block)",
    "--generation-config": "quantgate serves with `--generation-config vllm` so that a checkpoint's "
                           "generation_config.json never changes sampling; set sampling in the matrix's "
                           "`generation` block (matrix-wide, per model or per task)",
    "--trust-remote-code": "set the model's `trust_remote_code: true`",
    "--api-server-count": "set the model's `api_server_count: N`",
    "--tensor-parallel-size": "set the model's `gpus: K` (it also reserves the devices)",
}
# The owned flags VllmServer.command() itself sets; the runner adds --tensor-parallel-size from `gpus`.
SERVER_OWNED_FLAGS = tuple(f for f in OWNED_FLAGS if f != "--tensor-parallel-size")


def flag_name(arg: str) -> str | None:
    """The long option name vLLM resolves a command-line token to, or None for a value (not an option).

    vLLM's FlexibleArgumentParser (vllm/utils/argparse_utils.py, `parse_args`) rewrites `_` to `-` in a long
    option's name before argparse sees it (`--max_num_seqs` is `--max-num-seqs`), and argparse reads `--x=v` as
    `--x v`; the short aliases are SHORT_ALIASES (`-asc` for `--api-server-count`). A token starting with one
    dash that is not an alias (`-1`) is a value. Examples: '--max_model_len=4096' -> '--max-model-len',
    '-asc' -> '--api-server-count', '4096' -> None.
    """
    if arg.startswith("--") and len(arg) > 2:
        return arg.split("=", 1)[0].replace("_", "-")
    if arg.startswith("-"):
        return SHORT_ALIASES.get(arg.split("=", 1)[0])
    return None


def setting_name(arg: str) -> str | None:
    """The setting a token sets: flag_name, with a boolean flag's negation `--no-X` counted as `--X` (vLLM
    declares its boolean engine args with argparse.BooleanOptionalAction, vllm/engine/arg_utils.py, which
    adds `--no-X`). None for a value."""
    name = flag_name(arg)
    if name is not None and name.startswith("--no-"):
        return "--" + name.removeprefix("--no-")
    return name


def settings(args: Iterable[str]) -> list[str]:
    """The settings of an argument list, in order, one per option token (values left out)."""
    return [s for s in map(setting_name, args) if s is not None]


def owned_flag_overrides(args: Iterable[str], owned: Iterable[str] = OWNED_FLAGS) -> list[str]:
    """The tokens of `args` (as written) that set a flag in `owned`, in any of vLLM's spellings."""
    owned = set(owned)
    return [a for a in args if setting_name(a) in owned]


def owned_flag_message(bad: list[str]) -> str:
    """One line: which owned flags `bad` (from owned_flag_overrides) sets, and the matrix field for each."""
    names = list(dict.fromkeys(s for s in map(setting_name, bad) if s is not None))
    reasons = list(dict.fromkeys(OWNED_FLAGS[n] for n in names))
    hints = "; ".join(
        f"{', '.join(n for n in names if OWNED_FLAGS[n] == why)}: {why}" for why in reasons
    )
    given = "" if bad == names else f" (given as {bad})"
    return f"may not set {names}{given}: quantgate sets them itself; {hints}"


def repeated(args: Iterable[str]) -> list[str]:
    """The settings given more than once in `args` (vLLM would keep the last value silently), sorted."""
    seen = settings(args)
    return sorted({s for s in seen if seen.count(s) > 1})


# Where vLLM builds its `vllm serve` parser (make_arg_parser): vllm/entrypoints/launchers/cli_args.py from 0.31,
# vllm/entrypoints/openai/cli_args.py before (0.26 and the releases around it).
_PARSER_MODULES = ("vllm.entrypoints.launchers.cli_args", "vllm.entrypoints.openai.cli_args")


@functools.lru_cache(maxsize=1)
def vllm_serve_options() -> frozenset[str] | None:
    """Every option string the installed vLLM's `vllm serve` accepts (its own parser, built the way `vllm serve`
    builds it), or None where vLLM or that parser cannot be imported here. Imports vLLM: ~15 s on 2 cores,
    once per process."""
    import importlib

    for name in _PARSER_MODULES:
        try:
            module = importlib.import_module(name)
            from vllm.utils.argparse_utils import FlexibleArgumentParser
        except ImportError:
            continue
        try:
            parser = module.make_arg_parser(FlexibleArgumentParser())
        except Exception:  # noqa: BLE001 - a vLLM that cannot build its parser here: the check is skipped, said so
            return None
        return frozenset(o for action in parser._actions for o in action.option_strings)
    return None


def unknown_flags(args: Iterable[str], known: Iterable[str]) -> list[str]:
    """The option tokens of `args` (as written) that name no option in `known` (vllm_serve_options), in vLLM's
    spellings (flag_name). A dotted name (`--compilation-config.level 3`) is checked by its part before the
    first dot, which is how vLLM's FlexibleArgumentParser reads JSON-valued options."""
    known = set(known)
    out = []
    for a in args:
        name = flag_name(a)
        if name is None and a.startswith("-") and not a.lstrip("-").replace(".", "").isdigit():
            # a short option: argparse also reads `-O3` as `-O 3`
            name = a.split("=", 1)[0] if a[:2] not in known else a[:2]
        if name is not None and name not in known and name.split(".", 1)[0] not in known:
            out.append(a)
    return out
