"""JSON Patch (RFC 6902: add, replace, remove, test) on a definition document.

The optimizer states each change it recommends as a JSON Patch against the stored
document of the version it analysed, so a user can read exactly what would change and
apply it (`optimize --apply`) or by hand. Pointers follow RFC 6901.
"""

from __future__ import annotations

import copy
from typing import Any

from flowledger.domain.errors import InputInvalid

Patch = list[dict[str, Any]]


def apply_patch(document: dict[str, Any], patch: Patch) -> dict[str, Any]:
    """A new document with the patch applied; the given one is left as it was."""
    doc = copy.deepcopy(document)
    for number, op in enumerate(patch, 1):
        kind, path = op.get("op"), op.get("path")
        if not isinstance(path, str):
            raise InputInvalid(f"patch operation {number}: 'path' must be a string")
        parent, last = _parent(doc, path, number)
        if kind == "test":
            if _get(parent, last, path, number) != op.get("value"):
                raise InputInvalid(f"patch operation {number}: {path} does not hold the value")
        elif kind == "remove":
            _get(parent, last, path, number)
            del parent[_index(parent, last, path, number, adding=False)]
        elif kind in ("add", "replace"):
            if "value" not in op:
                raise InputInvalid(f"patch operation {number}: {kind} needs a 'value'")
            value = copy.deepcopy(op["value"])
            if isinstance(parent, list):
                at = _index(parent, last, path, number, adding=kind == "add")
                if kind == "add":
                    parent.insert(at, value)
                else:
                    parent[at] = value
            else:
                if kind == "replace":
                    _get(parent, last, path, number)
                parent[last] = value
        else:
            raise InputInvalid(f"patch operation {number}: unknown op {kind!r}")
    return doc


def _tokens(path: str, number: int) -> list[str]:
    if path == "":
        raise InputInvalid(f"patch operation {number}: the whole document cannot be replaced")
    if not path.startswith("/"):
        raise InputInvalid(f"patch operation {number}: path {path!r} must start with '/'")
    return [t.replace("~1", "/").replace("~0", "~") for t in path[1:].split("/")]


def _parent(doc: Any, path: str, number: int) -> tuple[Any, str]:
    tokens = _tokens(path, number)
    node = doc
    for token in tokens[:-1]:
        node = _get(node, token, path, number)
    if not isinstance(node, dict | list):
        raise InputInvalid(f"patch operation {number}: {path} is not inside an object or array")
    return node, tokens[-1]


def _get(node: Any, token: str, path: str, number: int) -> Any:
    if isinstance(node, dict):
        if token not in node:
            raise InputInvalid(f"patch operation {number}: {path} does not exist")
        return node[token]
    if isinstance(node, list):
        return node[_index(node, token, path, number, adding=False)]
    raise InputInvalid(f"patch operation {number}: {path} does not exist")


def _index(node: Any, token: str, path: str, number: int, *, adding: bool) -> Any:
    if isinstance(node, dict):
        return token
    if adding and token == "-":
        return len(node)
    if not token.isdigit() or (len(token) > 1 and token.startswith("0")):
        raise InputInvalid(f"patch operation {number}: {path}: {token!r} is not an array index")
    at = int(token)
    if at > len(node) or (at == len(node) and not adding):
        raise InputInvalid(f"patch operation {number}: {path}: index {at} is out of range")
    return at
