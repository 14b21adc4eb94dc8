"""Every JSON document is read through documents.read_document: a foreign file or an unknown
version is refused with the same kind of message, naming the file and what to do."""

from __future__ import annotations

import json

import pytest

from rainforest.errors import DatasetFormatError
from rainforest.fetch import FETCH_FORMAT, FETCH_NAME, VERSION, read_fetch_manifest


def test_fetch_record_of_another_version_is_refused_with_advice(tmp_path):
    (tmp_path / FETCH_NAME).write_text(json.dumps({"format": FETCH_FORMAT,
                                                   "version": VERSION + 1, "entries": []}))
    with pytest.raises(DatasetFormatError, match=rf"{FETCH_NAME} has format version "
                                                 rf"{VERSION + 1}.*start a fresh fetch"):
        read_fetch_manifest(str(tmp_path))


def test_a_foreign_fetch_json_is_not_taken_for_a_record(tmp_path):
    (tmp_path / FETCH_NAME).write_text(json.dumps({"entries": []}))
    with pytest.raises(DatasetFormatError, match="not a rainforest file of kind"):
        read_fetch_manifest(str(tmp_path))


def test_no_fetch_record_is_none_and_a_good_one_is_read(tmp_path):
    assert read_fetch_manifest(str(tmp_path)) is None
    record = {"format": FETCH_FORMAT, "version": VERSION, "entries": []}
    (tmp_path / FETCH_NAME).write_text(json.dumps(record))
    assert read_fetch_manifest(str(tmp_path)) == record
