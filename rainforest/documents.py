"""Versioned JSON documents: the one format-and-version check every reader uses.

Every JSON file rainforest writes (dataset manifest, plan, shard records, checkpoint configs)
carries ``format`` and ``version``. A reader refuses a foreign document or a version it does not
know, with an error that says what to do next, rather than misreading it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
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
    if type(document.get("version")) is not int or document["version"] != version:  # not true, 1.0
        raise error(f"{where} has format version {document.get('version')!r}, but this "
                    f"rainforest reads version {version}; {advice}")
    return document


def read_document(url: str, *, kind: str, version: int, error: type[RainforestError],
                  advice: str, missing: str) -> dict[str, Any]:
    """Read the JSON document at ``url`` and check it; ``missing`` is the message if absent."""
    if not storage.exists(url):
        raise error(missing)
    document = parse_json(storage.read_bytes(url), where=url, error=error)
    return check_format(document, kind=kind, version=version, where=url, error=error,
                        advice=advice)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} is too large for a float")
    return number


def parse_json(data: bytes, *, where: str, error: type[RainforestError]) -> Any:
    """JSON as rainforest writes it (no NaN, no Infinity, no float beyond the float range).

    Anything else, damaged bytes, a cut-off file or nesting deeper than Python parses, raises
    ``error`` naming ``where``.
    """
    try:
        return json.loads(data, parse_constant=_no_constant, parse_float=_finite)
    except (ValueError, RecursionError) as problem:
        raise error(f"{where} is not valid JSON ({problem}); the file is damaged") from None


@dataclass(frozen=True)
class Kind:
    """What a field of a document must hold: a test, and its description for the message."""

    description: str
    test: Callable[[Any], bool]


_SHA256 = re.compile(r"[0-9a-f]{64}")
_LARGEST = 2**63  # a count or offset beyond int64 is damage, and no float holds it exactly


def is_plain_name(name: Any) -> bool:
    """Whether ``name`` is one file name that stays in its folder: no separator, NUL or control
    character, not hidden (nor ``.``, ``..`` or a staging name), at most 255 UTF-8 bytes.

    Examples
    --------
    >>> is_plain_name("model.weights.h5"), is_plain_name("../x"), is_plain_name("a\\x00b")
    (True, False, False)
    """
    if type(name) is not str or not name.isprintable() or "/" in name or "\\" in name:
        return False
    try:
        size = len(name.encode())
    except UnicodeEncodeError:  # a lone surrogate, which JSON's \ud800 can carry
        return False
    return 0 < size <= 255 and not name.startswith(".")


NATURAL = Kind("a whole number from 0 to 2**63 - 1",
               lambda v: type(v) is int and 0 <= v < _LARGEST)
NUMBER = Kind("a finite number", lambda v: (type(v) is int and abs(v) < _LARGEST)
              or (type(v) is float and math.isfinite(v)))
TEXT = Kind("a string", lambda v: type(v) is str)
OPTIONAL_TEXT = Kind("a string or null", lambda v: v is None or type(v) is str)
OBJECT = Kind("an object", lambda v: type(v) is dict)
LIST = Kind("a list", lambda v: type(v) is list)
SHA256 = Kind("a sha256 (64 lowercase hex digits)",
              lambda v: type(v) is str and _SHA256.fullmatch(v) is not None)
OPTIONAL_SHA256 = Kind("a sha256 or null", lambda v: v is None or SHA256.test(v))
NAME = Kind("a plain file name", is_plain_name)


def check_fields(record: Any, fields: dict[str, Kind], *, where: str, what: str,
                 error: type[RainforestError], advice: str,
                 optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """Return ``record`` if it is an object whose ``fields`` hold their kinds, else raise.

    ``what`` names the record in ``where`` (``"song 3"``); a field in ``optional`` may be
    absent. ``advice`` ends the message (what the user should do).

    Examples
    --------
    >>> from rainforest.errors import DatasetFormatError
    >>> check_fields({"n": 3}, {"n": NATURAL}, where="f.json", what="it",
    ...              error=DatasetFormatError, advice="re-run")
    {'n': 3}
    """
    damaged = f"the file is damaged or was not written by rainforest: {advice}"
    if type(record) is not dict:
        raise error(f"{where}: {what} is {_shown(record)}, not an object; {damaged}")
    for name, kind in fields.items():
        if name not in record:
            if name in optional:
                continue
            raise error(f"{where}: {what} has no {name!r}; {damaged}")
        if not kind.test(record[name]):
            raise error(f"{where}: {what} has {name} = {_shown(record[name])}, not "
                        f"{kind.description}; {damaged}")
    return record


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
