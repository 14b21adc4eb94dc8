"""Where a song's label comes from, for ``rainforest preprocess --labels``.

- ``none``: no labels.
- ``parent``: the song's folder name (``jazz/a.mp3`` -> ``jazz``).
- ``fetch`` or ``fetch:COLUMN``: the label ``rainforest fetch`` recorded for the file in the
  ``fetch.json`` beside it (``COLUMN`` picks one of several label columns).
- ``FILE.csv:COLUMN``: a metadata CSV (flat, or two-level like the FMA's ``tracks.csv``). A
  row labels the song whose file name appears in one of its cells (a path or URL ending in
  the name), or whose file stem equals the row's first cell as a number (``track_id`` 2 ->
  ``000002.mp3``).
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Callable

from rainforest import storage
from rainforest.errors import ParameterError

LabelMode = str | Callable[[str], str | None]

#: The default: songs carry no label.
NO_LABELS = "none"
LABEL_HELP = ("'parent' labels each song with its folder name, e.g. a genre folder; 'fetch' "
              "takes the labels `rainforest fetch` recorded in fetch.json beside the songs "
              "(fetch:COL picks a column); FILE.csv:COL a metadata CSV's column, rows matched "
              "by file name or by track id = file stem; for global conditioning")

_FILE_LIKE = re.compile(r"\.[A-Za-z0-9]{2,5}$")


def _split(url: str) -> tuple[str, str]:
    url = url.replace(os.sep, "/")
    return posixpath.dirname(url), posixpath.basename(url)


def _number_key(text: str) -> str | None:
    text = text.strip()
    if not text.isdecimal():  # isdigit() would take "²", which int() refuses
        return None
    try:
        return str(int(text))
    except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
        return None


def _fetch_labels(column: str | None) -> Callable[[str], str | None]:
    from rainforest.fetch import labels_by_file

    folders: dict[str, dict[str, str]] = {}

    def label(url: str) -> str | None:
        folder, name = _split(url)
        if folder not in folders:
            folders[folder] = labels_by_file(folder, column)
        return folders[folder].get(name)

    return label


def csv_labels(path: str, column: str) -> Callable[[str], str | None]:
    """A song URL -> label function from one column of a metadata CSV."""
    from rainforest.fetch import read_csv_file

    if not storage.exists(path):
        raise ParameterError(f"--labels {path}:{column}: no such CSV file")
    rows = read_csv_file(path)
    if rows and column not in rows[0]:
        raise ParameterError(f"{path} has no column {column!r}; it has: "
                             f"{', '.join(list(rows[0])[:30])}")
    by_name: dict[str, str] = {}
    by_number: dict[str, str] = {}
    for row in rows:
        value = row[column].strip()
        if not value:
            continue
        cells = list(row.values())
        if cells and (key := _number_key(cells[0])) is not None:
            by_number.setdefault(key, value)
        for cell in cells:
            if _FILE_LIKE.search(cell.strip()):
                by_name.setdefault(posixpath.basename(cell.strip().rstrip("/")), value)

    def label(url: str) -> str | None:
        name = _split(url)[1]
        if name in by_name:
            return by_name[name]
        key = _number_key(os.path.splitext(name)[0])
        return by_number.get(key) if key is not None else None

    return label


def resolve(mode: str) -> LabelMode:
    """``"none"``, ``"parent"``, or a song URL -> label function for the other forms."""
    if mode in (NO_LABELS, "parent"):
        return mode
    if mode == "fetch" or mode.startswith("fetch:"):
        return _fetch_labels(mode.partition(":")[2] or None)
    path, sep, column = mode.rpartition(":")
    if sep and path.lower().endswith(".csv") and column:
        return csv_labels(path, column)
    raise ParameterError(f"--labels {mode!r}: use none, parent, fetch, fetch:COLUMN or "
                         "FILE.csv:COLUMN")
