"""Damage for property-based tests of readers (tests/test_fuzz_*.py): strategies that break
documents and bytes as no writer of ours would, and the checks every reader must pass.

A reader given damage must return a value its users can use, or raise
:class:`~rainforest.errors.RainforestError` naming the file (:func:`outcome`), and must not
write outside the folder it reads (:func:`tree`, :func:`changed_outside`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

from hypothesis import strategies as st

from rainforest.errors import RainforestError

#: Names with path tricks, control characters, odd Unicode, and sheer length.
NASTY_NAMES = ["", ".", "..", "../x", "../../escape.mp3", "/etc/passwd", "/", "a/../../b",
               "a\x00b", "\x00", "x" * 300, "é" * 200, "x" * 5000, "C:\\evil", "..\\..\\x",
               "~/x", "\u202eevil", ".hidden", " ", "a\nb", "%2e%2e%2fx", "\ud800", "con",
               "step-000000003/../../..", "part-00000/../../escape", "shards/../../x.npy",
               "ｆｕｌｌ／ｗｉｄｔｈ", "part-99999", "part-0", "part-00001", "part-" + "1" * 5000]
TEXTS = st.one_of(st.sampled_from(NASTY_NAMES), st.text(max_size=12))
NUMBERS = st.one_of(st.integers(-3, 3), st.floats(),
                    st.sampled_from([2**31, 2**63 - 1, 2**63, 2**64, -2**63 - 1, 10**30,
                                     10**400, 1e308, -0.0, 0.5]))
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXTS)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(TEXTS, inner, max_size=3)), max_leaves=6)
#: Raw bytes that JSON writers never emit: constants, overflow, nesting, bad UTF-8, halves.
RAW = st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"9" * 5000,
                       b"[" * 100_000, b"\x00", b"\xff\xfe", b"\xef\xbb\xbf", b'"\\ud800"',
                       b",", b"}", b'"', b"\\", b"-", b"true", b"null"])


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*prefix, index))


def _path(draw, document, focus: tuple[str, ...] = ()) -> tuple:
    """A place in ``document``: a walk down from the root, one key at a time (so a small part,
    ``files``, is as likely as a long one, ``songs``), or one place of a key drawn from the
    document's distinct keys (so a song's ``offset`` is as likely as ``format``) or from
    ``focus``, the keys its reader trusts most (names, offsets, checksums)."""
    way = draw(st.sampled_from(["walk", "key", "focus"] if focus else ["walk", "key"]))
    if way != "walk":
        places: dict[str, list[tuple]] = {}
        for path in _paths(document):
            if path and isinstance(path[-1], str) and (way == "key" or path[-1] in focus):
                places.setdefault(path[-1], []).append(path)
        if places:
            return draw(st.sampled_from(places[draw(st.sampled_from(sorted(places)))]))
    path, node = (), document
    while isinstance(node, dict | list) and node and draw(st.sampled_from([1, 1, 1, 0])):
        key = draw(st.sampled_from(list(node) if isinstance(node, dict) else range(len(node))))
        path, node = (*path, key), node[key]
    return path


def _get(document, path):
    for step in path:
        document = document[step]
    return document


def _set(document, path, value):
    if not path:
        return value
    _get(document, path[:-1])[path[-1]] = value
    return document


def _extreme(draw, value):
    """A value of ``value``'s own type at an edge: a name with a path trick, a count one off
    or past int64, a float that JSON does not allow."""
    if isinstance(value, bool) or value is None:
        return draw(VALUES)
    if isinstance(value, int):
        return draw(st.one_of(st.integers(-2, 2).map(lambda step: value + step),
                              st.sampled_from([-1, 0, 2**63 - 1, 2**63, 10**400])))
    if isinstance(value, float):
        return draw(st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e308, -value]))
    if isinstance(value, str):
        return draw(st.one_of(st.sampled_from(NASTY_NAMES), st.just(value + "x"),
                              st.just(value.upper()), st.just(value[:-1]), TEXTS))
    return draw(st.sampled_from([[], {}, [value], {"": value}]))


@st.composite
def damaged(draw, document, *focus: str) -> bytes:
    """``document`` with one to three changes to its values (more often to those of the keys
    in ``focus``), or to its bytes, or both."""
    document = copy.deepcopy(document)
    how = draw(st.sampled_from(["values", "values", "values", "values", "bytes", "both"]))
    for _ in range(draw(st.integers(1, 3)) if how != "bytes" else 0):
        path = _path(draw, document, focus)
        change = draw(st.sampled_from(["edge", "edge", "retype", "delete", "add", "copy",
                                       "rename"]))
        node = _get(document, path)
        if change == "edge":
            document = _set(document, path, _extreme(draw, node))
        elif change == "retype":
            document = _set(document, path, draw(VALUES))
        elif change == "copy":  # a value from elsewhere: a duplicate name, a foreign sha256
            document = _set(document, path, copy.deepcopy(_get(document, _path(draw,
                                                                                document))))
        elif change == "delete" and path:
            del _get(document, path[:-1])[path[-1]]
        elif change == "add" and isinstance(node, dict):
            node[draw(TEXTS)] = draw(VALUES)
        elif change == "rename" and isinstance(node, dict) and node:  # a key: a file's name
            key = draw(st.sampled_from(sorted(node)))
            node[draw(st.one_of(st.sampled_from(NASTY_NAMES), TEXTS))] = node.pop(key)
    data = json.dumps(document, indent=1).encode()
    return draw(damaged_bytes(data)) if how != "values" else data


@st.composite
def damaged_bytes(draw, data: bytes, *, least: int = 1) -> bytes:
    """``data`` cut short, with bytes flipped, or with RAW bytes put in (``least`` to 2 times)."""
    data = bytearray(data)
    for _ in range(draw(st.integers(least, 2))):
        how = draw(st.sampled_from(["cut", "flip", "insert"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if how == "cut":
            del data[at:]
        elif how == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        else:
            data[at:at] = draw(RAW)
    return bytes(data)


def header_ok(data: bytes, kind: str, version: int) -> bool:
    """Whether ``data`` parses (leniently) to a ``kind`` document of exactly ``version``."""
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):
        return False
    return (isinstance(document, dict) and document.get("format") == kind
            and type(document.get("version")) is int and document["version"] == version)


def outcome(read, *, names: str):
    """``read()``'s value, or the RainforestError it raised, which must name ``names``.

    Any other exception fails the test."""
    try:
        return read()
    except RainforestError as error:
        assert names in str(error), f"the message does not name {names}: {error}"
        return error


def tree(root: Path) -> dict[str, str]:
    return {path.relative_to(root).as_posix(): "folder" if path.is_dir()
            else hashlib.sha256(path.read_bytes()).hexdigest() for path in root.rglob("*")}


def changed_outside(root: Path, before: dict[str, str], inside: str | None = None) -> list[str]:
    """Paths under ``root`` that changed since ``before``, other than those in the folder
    ``inside`` (relative to ``root``; None: no change is allowed anywhere)."""
    after = tree(root)
    return sorted(path for path in before.keys() | after.keys()
                  if before.get(path) != after.get(path)
                  and not (inside and (path == inside or path.startswith(inside + "/"))))


def sha256_file(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class Scratch:
    """A fresh folder per example (pytest's tmp_path is one per test), and a cache of its own
    beside it (``RAINFOREST_CACHE``: the sha256 and shard caches), outside the tree watched."""

    def __enter__(self) -> Path:
        self._folder = tempfile.TemporaryDirectory(prefix="rainforest-fuzz-")
        self._cache = os.environ.get("RAINFOREST_CACHE")
        os.environ["RAINFOREST_CACHE"] = os.path.join(self._folder.name, "cache")
        root = Path(self._folder.name, "root")
        root.mkdir()
        return root

    def __exit__(self, *exc) -> None:
        if self._cache is None:
            os.environ.pop("RAINFOREST_CACHE", None)
        else:
            os.environ["RAINFOREST_CACHE"] = self._cache
        self._folder.cleanup()


def template_document(folder: Path, name: str) -> dict:
    return json.loads((folder / name).read_text())


def damage_in_copy(template: Path, root: Path, name: str, data: bytes) -> Path:
    folder = root / template.name
    shutil.copytree(template, folder)
    (folder / name).write_bytes(data)
    return folder
