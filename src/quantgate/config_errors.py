"""pydantic validation errors of quantgate's YAML files, rewritten as one line per mistake.

Each line names the key by its path through the file, with list items named by their `id` or `name` where they
have one (``models.smollm2-135m.variants.w8a8-int8.recpie``, not ``models.0.variants.1.recpie``), what was
given, and what is allowed: the keys of that block for an unknown key, the values of a fixed set for a bad
value, each with the close names difflib finds (``difflib.get_close_matches``, its default cutoff 0.6).
"""

from __future__ import annotations

import difflib
import re
import types
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

_GIVEN_MAX = 60  # characters of a given value quoted in a message


def format_validation_errors(
    path: Path,
    err: ValidationError,
    what: str = "configuration",
    locate: Callable[[list[Any]], list[Any]] | None = None,
    *,
    schema: type[BaseModel] | None = None,
    data: Any = None,
) -> str:
    """``<file>: invalid <what>`` and one indented line per error of `err`.

    `schema` (the model validated) and `data` (the parsed YAML it was given) let a line name list items by
    their `id`/`name` and list the keys allowed where an unknown key was found; `locate` may instead rewrite a
    location (a list of pydantic loc parts) itself.
    """
    lines = [f"{path}: invalid {what}"]
    errors = err.errors()
    for e in errors:
        if _explained_elsewhere(e, errors):
            continue
        loc = list(e["loc"])
        names, block = _walk(schema, data, loc) if schema is not None else (_plain(loc), None)
        parts = locate(loc) if locate else names
        where = ".".join(str(p) for p in parts) or "(top level)"
        lines.append(f"  {where}: {_message(e, block)}")
    return "\n".join(lines)


def _explained_elsewhere(e: dict[str, Any], errors: list[dict[str, Any]]) -> bool:
    """Whether another error of `errors` already says what `e` would: a scalar member's complaint about a mapping
    in a union (`metrics: [str | DerivedMetric]`) that another member's errors explain, or a bad union tag
    copied from a sibling key that has its own error."""
    if e["type"] == "union_tag_invalid":
        # a recipe's builder is the variant's (quantgate.matrix.Variant._recipe_kind): the variant's own
        # `builder` line already says what is wrong
        ctx = e.get("ctx", {})
        sibling = (*e["loc"][:-1], str(ctx.get("discriminator", "")).strip("'"))
        return any(o["loc"] == sibling and o.get("input") == ctx.get("tag") for o in errors)
    if not (isinstance(e.get("input"), dict) and e["type"] in _SCALAR_TYPES):
        return False
    parent = e["loc"][:-1]
    return any(o is not e and o["loc"][: len(parent)] == parent and o["loc"] != e["loc"] for o in errors)


_SCALAR_TYPES = frozenset({"string_type", "int_type", "float_type", "bool_type", "int_parsing", "float_parsing"})


def close_names(given: Any, allowed: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the allowed names closest to `given`, else ``""``."""
    near = difflib.get_close_matches(str(given), allowed, n=3)
    return f" (did you mean {' or '.join(repr(n) for n in near)}?)" if near else ""


def _message(e: dict[str, Any], block: type[BaseModel] | None) -> str:
    kind, given = e["type"], e.get("input")
    if kind == "extra_forbidden":
        key = str(e["loc"][-1])
        if block is None:
            return f"unknown key {key!r} (not allowed here)"
        allowed = list(block.model_fields)
        return f"unknown key {key!r}{close_names(key, allowed)}; allowed keys here: {', '.join(allowed)}"
    if kind in ("literal_error", "enum"):
        allowed = re.findall(r"'([^']*)'", e.get("ctx", {}).get("expected", ""))
        what = "key" if e["loc"] and e["loc"][-1] == "[key]" else "value"
        return f"{e['msg']}; {what} given: {_quote(given)}{close_names(given, allowed)}"
    if kind == "union_tag_invalid":
        ctx = e.get("ctx", {})
        allowed = re.findall(r"'([^']*)'", ctx.get("expected_tags", ""))
        key = str(ctx.get("discriminator", "kind")).strip("'")
        return (f"{key}: {ctx.get('tag')!r} is not one of {', '.join(allowed)}"
                f"{close_names(ctx.get('tag'), allowed)}")
    if kind in ("value_error", "assertion_error"):  # quantgate's own validators word the value themselves
        return e["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if isinstance(given, (str, int, float, bool)):
        return f"{e['msg']}; given: {_quote(given)}"
    return e["msg"]


def _quote(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _GIVEN_MAX else text[: _GIVEN_MAX - 3] + "..."


def _plain(loc: list[Any]) -> list[Any]:
    return [p for p in loc if p != "[key]"]


def _walk(schema: type, data: Any, loc: list[Any]) -> tuple[list[Any], type[BaseModel] | None]:
    """(the location as the file names it, the model class of the block holding the last key).

    Walks the schema's annotations and the data side by side: a list index becomes the item's `id` or `name`
    (when unique in its list), and a union member's tag that pydantic puts in the location (the `kind` of a
    source, the `builder` of a recipe) is dropped, as it is no key of the file.
    """
    names: list[Any] = []
    t: Any = schema
    block: type[BaseModel] | None = None
    i = 0
    while i < len(loc):
        part = loc[i]
        members = _members(t)
        if len(members) > 1:  # pydantic names the member it validated against: its tag or its class name
            chosen = [m for m in members if part in (_tag(m), getattr(m, "__name__", None), str(m))]
            if not chosen:
                return names + _plain(loc[i:]), None
            t, i = chosen[0], i + 1
            continue
        t = members[0] if members else None
        origin = get_origin(t)
        if isinstance(t, type) and issubclass(t, BaseModel):
            block = t
            field = t.model_fields.get(part) if isinstance(part, str) else None
            names.append(part)
            data = data.get(part) if isinstance(data, dict) else None
            if field is None:  # an unknown key (extra_forbidden), or a model-level error
                return names + _plain(loc[i + 1:]), block
            t = field.annotation
        elif origin in (list, tuple) and isinstance(part, int):
            names.append(_item_name(data, part))
            data = data[part] if isinstance(data, list) and part < len(data) else None
            t = get_args(t)[0]
        elif origin is dict:
            names.append(part)
            if i + 1 < len(loc) and loc[i + 1] == "[key]":
                return names, None
            data = data.get(part) if isinstance(data, dict) else None
            t = get_args(t)[1]
        else:
            return names + _plain(loc[i:]), None
        i += 1
    return names, _model_class(t) or block


def _members(t: Any) -> list[Any]:
    """The types a (possibly Optional, Annotated or union) annotation allows, None left out."""
    while get_origin(t) is Annotated:
        t = get_args(t)[0]
    if get_origin(t) in (Union, types.UnionType):
        return [m for a in get_args(t) if a is not type(None) for m in _members(a)]
    return [t]


def _model_class(t: Any) -> type[BaseModel] | None:
    members = _members(t)
    if len(members) == 1 and isinstance(members[0], type) and issubclass(members[0], BaseModel):
        return members[0]
    return None


def _tag(member: Any) -> Any:
    """The discriminator value of a tagged union member (its one-value Literal field), else None."""
    if not (isinstance(member, type) and issubclass(member, BaseModel)):
        return None
    for f in member.model_fields.values():
        if get_origin(f.annotation) is Literal and len(get_args(f.annotation)) == 1:
            return get_args(f.annotation)[0]
    return None


def _item_name(items: Any, index: int) -> Any:
    """An item's `id`, else its `name`, when that is unique among the list's items; else its index."""
    if not isinstance(items, list) or index >= len(items) or not isinstance(items[index], dict):
        return index

    def label(x: Any) -> Any:
        return (x.get("id") or x.get("name")) if isinstance(x, dict) else None

    name = label(items[index])
    if not isinstance(name, str) or not name or [label(x) for x in items].count(name) > 1:
        return index
    return name
