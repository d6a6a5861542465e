"""The model's output tree: how the tensors a bundle computes nest in tuples, lists and dicts.

In a manifest the tree is JSON: ``{"tensor": name}``, ``{"tuple": [...]}``, ``{"list": [...]}``,
``{"dict": {key: ...}}`` or ``{"const": value}`` (a number, string, bool or None the model returns
as is). :func:`walk` is the one walker over it; the rest are short uses of it.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from edgepart.errors import BundleError

KINDS = ("tensor", "tuple", "list", "dict", "const")
MAX_DEPTH = 64


def walk(spec: dict, leaf: Callable[[str], Any], _depth: int = 0) -> Any:
    """Rebuild the tree with ``leaf(name)`` for each tensor, in depth-first order of appearance."""
    if _depth > MAX_DEPTH:
        raise BundleError(f"output tree nested deeper than {MAX_DEPTH}")
    if "tensor" in spec:
        return leaf(spec["tensor"])
    if "tuple" in spec:
        return tuple(walk(s, leaf, _depth + 1) for s in spec["tuple"])
    if "list" in spec:
        return [walk(s, leaf, _depth + 1) for s in spec["list"]]
    if "dict" in spec:
        return {k: walk(s, leaf, _depth + 1) for k, s in spec["dict"].items()}
    return spec.get("const")


def leaves(spec: dict) -> list[str]:
    """The tensor names of the tree, in the order :func:`walk` visits them."""
    names: list[str] = []
    walk(spec, names.append)
    return names


def flatten(value: Any, spec: dict) -> list[Any]:
    """The leaves of ``value`` (shaped like ``spec``) in the order of :func:`leaves`."""
    out: list[Any] = []

    def go(v: Any, s: dict, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise BundleError(f"output tree nested deeper than {MAX_DEPTH}")
        if "tensor" in s:
            out.append(v)
        elif "tuple" in s or "list" in s:
            for x, ss in zip(v, s.get("tuple", s.get("list")), strict=True):
                go(x, ss, depth + 1)
        elif "dict" in s:
            for k, ss in s["dict"].items():
                go(v[k], ss, depth + 1)
    go(value, spec, 0)
    return out


def validate(spec: Any, where: str = "output", _depth: int = 0) -> None:
    """Raise BundleError unless ``spec`` is a well-formed output tree."""
    if _depth > MAX_DEPTH:
        raise BundleError(f"{where}: nested deeper than {MAX_DEPTH}")
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise BundleError(f"{where}: expected one of {{{', '.join(KINDS)}: ...}}, got {str(spec)[:80]!r}")
    kind, v = next(iter(spec.items()))
    if kind == "tensor" and not isinstance(v, str):
        raise BundleError(f"{where}.tensor: must be a tensor name")
    elif kind in ("tuple", "list"):
        if not isinstance(v, list):
            raise BundleError(f"{where}.{kind}: must be a list")
        for i, s in enumerate(v):
            validate(s, f"{where}.{kind}[{i}]", _depth + 1)
    elif kind == "dict":
        if not isinstance(v, dict):
            raise BundleError(f"{where}.dict: must be an object")
        for k, s in v.items():
            validate(s, f"{where}.dict[{k!r}]", _depth + 1)
    elif kind == "const" and not (v is None or isinstance(v, (bool, int, float, str))):
        raise BundleError(f"{where}.const: must be a number, string, bool or null")
