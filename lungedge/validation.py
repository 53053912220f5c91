"""The entry point to schema checks, importable without pydantic.

:func:`validate` checks a file's data against :mod:`lungedge.schemas` (pydantic) when pydantic is
installed; on a bare machine without it (a GPU server with only the runtime), lungedge's files are
read unchecked and a one-time note says so. Kept apart from :mod:`lungedge.limits`, which the
schemas themselves use (the size cap), so that the two do not import each other.
"""

from __future__ import annotations

import sys

_warned = False


def validate(model, data, where) -> None:
    """Check ``data`` against :mod:`lungedge.schemas`'s model named ``model`` ("row" for a bench or eval row),
    or against a dataclass ``model`` (its fields and their ``metadata["schema"]`` constraints: see
    :func:`lungedge.schemas.dataclass_model`): one line naming ``where`` and the field; without pydantic,
    a one-time note and no check."""
    global _warned
    try:
        from . import schemas
    except ModuleNotFoundError as exc:
        if exc.name != "pydantic":
            raise
        if not _warned:
            _warned = True
            print("note: pydantic is not installed; lungedge's files are read without schema checks", file=sys.stderr)
        return
    if model == "row":
        schemas.check_row(data, where)
    elif isinstance(model, str):
        schemas.check(getattr(schemas, model), data, where)
    else:
        schemas.check(schemas.dataclass_model(model), data, where)
