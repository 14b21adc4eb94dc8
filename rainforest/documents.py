"""Versioned JSON documents: the one format-and-version check every reader uses.

Every JSON file rainforest writes (dataset manifest, plan, shard records, checkpoint configs)
carries ``format`` and ``version``. A reader refuses a foreign document or a version it does not
know, with an error that says what to do next, rather than misreading it.
"""

from __future__ import annotations

from typing import Any

from rainforest import storage
from rainforest.errors import RainforestError


def check_format(document: Any, *, kind: str, version: int, where: str,
                 error: type[RainforestError], advice: str) -> dict[str, Any]:
    """Return ``document`` if it is a ``kind`` document of ``version``, else raise ``error``.

    ``advice`` is appended to the unknown-version message (what the user should do).

    Examples
    --------
    >>> from rainforest.errors import DatasetFormatError
    >>> check_format({"format": "x", "version": 1}, kind="x", version=1, where="f.json",
    ...              error=DatasetFormatError, advice="")["version"]
    1
    """
    found = document.get("format") if isinstance(document, dict) else type(document).__name__
    if found != kind:
        raise error(f"{where} is not a rainforest file of kind {kind!r} (found {found!r}); "
                    f"is this path the right one?")
    if document.get("version") != version:
        raise error(f"{where} has format version {document.get('version')!r}, but this "
                    f"rainforest reads version {version}; {advice}")
    return document


def read_document(url: str, *, kind: str, version: int, error: type[RainforestError],
                  advice: str, missing: str) -> dict[str, Any]:
    """Read the JSON document at ``url`` and check it; ``missing`` is the message if absent."""
    if not storage.exists(url):
        raise error(missing)
    try:
        document = storage.read_json(url)
    except ValueError as problem:
        raise error(f"{url} is not valid JSON ({problem}); the file is damaged") from None
    return check_format(document, kind=kind, version=version, where=url, error=error,
                        advice=advice)
