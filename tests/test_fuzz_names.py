"""Readers of names survive anything (property-based, Hypothesis): output names sanitised from
URLs and ``Content-Disposition`` headers, the names planned for a fetch, URL templates filled
from CSV rows, and label CSVs with the song names looked up in them.

A name always stays in its folder (no separator, no ``..``, no NUL, not hidden, at most 120
bytes), a template fills or raises ParameterError, and a label CSV, written by Python's csv
writer, reads back exactly, while a damaged one labels songs or raises RainforestError naming
the file. The JSON documents are in tests/test_fuzz_readers*.py; the damage in tests/fuzzing.py.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os

import pytest
from fuzzing import NASTY_NAMES, RAW, Scratch, damaged_bytes, outcome
from hypothesis import given
from hypothesis import strategies as st

from rainforest.documents import is_plain_name
from rainforest.errors import ParameterError, RainforestError
from rainforest.fetch import (
    FETCH_NAME,
    Source,
    content_disposition_name,
    fill_template,
    plan_names,
    safe_name,
)
from rainforest.labels import _FILE_LIKE, csv_labels

pytestmark = pytest.mark.slow  # some seconds per test under the default profile

NAMES = st.one_of(st.sampled_from(NASTY_NAMES), st.text(), st.binary().map(
    lambda raw: raw.decode("latin-1")), st.text().map(lambda text: text * 50))


def stays_in_folder(name: str, limit: int = 120) -> bool:
    folder = os.path.join(os.sep, "out")
    return (is_plain_name(name) and len(name.encode()) <= limit
            and os.path.dirname(os.path.normpath(os.path.join(folder, name))) == folder)


@given(st.one_of(NAMES, NAMES.map(lambda name: "".join(f"%{b:02X}" for b in name.encode(
    "utf-8", "surrogatepass")))))
def test_safe_name_always_gives_a_plain_name_inside_the_folder(raw):
    name = safe_name(raw)
    assert stays_in_folder(name), name
    assert safe_name(name) == name  # sanitising what was sanitised changes nothing


@given(st.one_of(NAMES, st.builds(
    lambda kind, name: f"{kind}; filename={name}", st.sampled_from(["attachment", "inline"]),
    NAMES), st.builds(lambda charset, name: f"attachment; filename*={charset}''{name}",
                      st.sampled_from(["utf-8", "latin-1", "x-unknown", ""]), NAMES)))
def test_a_content_disposition_header_gives_a_safe_name_or_none(header):
    # A header arrives as bytes, which http.client decodes as Latin-1.
    header = header.encode("utf-8", "surrogatepass").decode("latin-1")
    name = content_disposition_name(header)
    assert name is None or stays_in_folder(name), name


URLS = st.builds(lambda host, path: f"https://{host}/{path}", st.sampled_from(["a", "b"]),
                 st.one_of(st.sampled_from(["x.mp3", "X.MP3", "fetch.json", "manifest.json",
                                            "plan.json", "", "a/x.mp3"]), NAMES))


@given(st.lists(URLS, max_size=6, unique=True), st.data())
def test_planned_names_are_plain_unique_and_never_a_record(urls, data):
    """Earlier runs' names may be anything a damaged fetch.json held, or a name that this
    run would give another source (a URL-hash collision)."""
    taken = [safe_name(url.rsplit("/", 1)[-1]) for url in urls]
    tags = [hashlib.sha256(url.encode(errors="surrogatepass")).hexdigest()[:10] for url in urls]
    tagged = [f"{os.path.splitext(name)[0]}-{tag}{os.path.splitext(name)[1]}"
              for name, tag in zip(taken, tags, strict=True)]
    previous = {url: {"name": data.draw(st.one_of(st.sampled_from(taken + tagged), NAMES))}
                for url in data.draw(st.lists(st.sampled_from(urls), unique=True)
                                     if urls else st.just([]))}
    names = plan_names([Source(url) for url in urls], previous)
    assert sorted(names) == sorted(urls)
    folded = [name.casefold() for name in names.values()]
    assert len(set(folded)) == len(folded), names  # no two sources share a file
    assert not set(folded) & {FETCH_NAME, "manifest.json", "plan.json"}
    assert all(stays_in_folder(name, limit=255) for name in names.values()), names


FIELDS = st.sampled_from(["track_id", "name", "missing", "0", "", "track_id.real",
                          "track_id[0]", "name[0]", "name.upper", "track_id.nothing",
                          "name[x]", "track_id!z", "track_id!r"])
SPECS = st.one_of(st.sampled_from(["", ":06d", ":06d[:3]", ":x", ":>10", ":.2f", ":d[-2:]",
                                   ":[1:]", ":{name}", ":,", ":=^9", ":06d[a:b]", ":%"]),
                  st.integers(0, 10_000).map(lambda width: f":{width}"))
TEMPLATES = st.lists(st.one_of(
    st.text(max_size=5), st.sampled_from(["{", "}", "{{", "}}", "{{}}", "{}", "{0}"]),
    st.builds(lambda field, spec: "{" + field + spec + "}", FIELDS, SPECS)),
    max_size=6).map("".join)
ROWS = st.fixed_dictionaries({"track_id": st.one_of(st.integers(0, 10**6).map(str),
                                                    st.text(max_size=6), st.just("9" * 5000)),
                              "name": st.text(max_size=6)})


@given(TEMPLATES, ROWS)
def test_a_url_template_fills_or_is_refused_naming_the_option(template, row):
    url = outcome(lambda: fill_template(template, row), names="--url-template")
    assert isinstance(url, str | ParameterError), url
    if "{" not in template and "}" not in template:
        assert url == template


# --- label CSVs ------------------------------------------------------------------------------

LABELS = st.text(max_size=10).filter(lambda text: not _FILE_LIKE.search(text.strip()))


@given(st.lists(st.tuples(LABELS, LABELS), min_size=1, max_size=8))
def test_label_csvs_written_by_csv_writer_read_back_exactly(rows):
    with Scratch() as root:
        path = root / "tracks.csv"
        with open(path, "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["track_id", "file", "genre", "comment"])
            for index, (genre, comment) in enumerate(rows):
                writer.writerow([index, f"music/song{index:03d}.mp3", genre, comment])
        label = csv_labels(str(path), "genre")
        for index, (genre, _) in enumerate(rows):
            expected = genre.strip() or None
            assert label(f"/songs/song{index:03d}.mp3") == expected  # by its file name
            assert label(f"s3://bucket/{index:06d}.flac") == expected  # by its track id


TEMPLATE_CSV = (b"track_id,file,genre\r\n2,music/000002.mp3,Hip-Hop\r\n"
                b'5,"music/a,b.mp3",Rock\r\n7,x.ogg,\xc3\xa9lectro\r\n')
SONG_NAMES = st.one_of(st.sampled_from(["000002.mp3", "a,b.mp3", "x.ogg", "\u00b2.mp3",
                                        "\u0663.mp3", "9" * 5000 + ".mp3", "7", ""]), NAMES)


@given(st.one_of(damaged_bytes(TEMPLATE_CSV), st.builds(
    lambda raw, at: TEMPLATE_CSV[:at] + raw + TEMPLATE_CSV[at:],
    st.one_of(RAW, st.sampled_from([b"\x00", b'"', b"\r", b"x" * 200_000, b"\xef\xbb\xbf",
                                    "\u00b2".encode(), "\u0663".encode()])),
    st.integers(0, len(TEMPLATE_CSV)))), st.lists(SONG_NAMES, max_size=4))
def test_a_damaged_label_csv_labels_songs_or_is_refused_naming_it(data, songs):
    with Scratch() as root:
        path = root / "tracks.csv"
        path.write_bytes(data)
        label = outcome(lambda: csv_labels(str(path), "genre"), names=str(path))
        if not isinstance(label, RainforestError):
            for song in songs:
                assert isinstance(label(f"/music/{song}"), str | None)


@given(st.lists(st.tuples(st.integers(0, 10**6), LABELS), min_size=1, max_size=5),
       st.sampled_from(["\u00b2", "\u0663", "\uff13", "0" * 5000 + "1"]))
def test_a_track_id_in_odd_digits_is_a_number_or_no_match(rows, digits):
    with Scratch() as root:
        path = root / "tracks.csv"
        text = io.StringIO()
        csv.writer(text).writerows([["track_id", "genre"], *rows, [digits, "odd"]])
        path.write_text(text.getvalue(), encoding="utf-8")
        label = csv_labels(str(path), "genre")
        assert label(f"/music/{digits}.mp3") in {"odd", None} | {g.strip() for _, g in rows}
