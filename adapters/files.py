"""Reading definitions from files: the I/O stays at the edge, the checks in the domain."""

from __future__ import annotations

import os

from flowledger.domain.definitions import (
    MAX_DEFINITION_BYTES,
    WorkflowDefinition,
    load_definition,
)
from flowledger.domain.errors import DefinitionInvalid


def load_definition_file(path: str | os.PathLike[str]) -> WorkflowDefinition:
    """Read and check the definition in a YAML or JSON file (errors name the path)."""
    source = os.fspath(path)
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_DEFINITION_BYTES + 1)
    except OSError as exc:
        raise DefinitionInvalid(source, [f"cannot read the file: {exc.strerror or exc}"]) from None
    return load_definition(data, source)
