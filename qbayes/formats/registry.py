"""The registry of number formats: a new format is one module defining a
:class:`~.base.Format` subclass plus one line in :data:`FORMATS`."""
from __future__ import annotations

from ..errors import QBayesError
from .base import Format
from .int_affine import IntAffine
from .nf4 import NF4

FORMATS: dict[str, Format] = {f.name: f for f in (IntAffine(), NF4())}


def get_format(name: str) -> Format:
    """The registered format called ``name`` (``"int"``, ``"nf4"``)."""
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise QBayesError(f"unknown number format {name!r}: choose one of {sorted(FORMATS)}") from None


def register_format(fmt: Format) -> Format:
    """Add ``fmt`` to the registry under ``fmt.name`` (refusing to replace another one)."""
    if not isinstance(fmt, Format) or not fmt.name:
        raise QBayesError("register_format takes a named qbayes.formats.Format instance")
    if fmt.name in FORMATS and FORMATS[fmt.name] is not fmt:
        raise QBayesError(f"a format named {fmt.name!r} is already registered")
    FORMATS[fmt.name] = fmt
    return fmt
