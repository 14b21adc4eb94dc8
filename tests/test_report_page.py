"""The report's template on its own: autoescaping on, no undefined names, shipped in the wheel.

(The whole page, from a real run and opened in headless Chromium, is tests/test_report.py.)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from html.parser import HTMLParser
from pathlib import Path

import jinja2
import pytest

from rainforest.report import TEMPLATE, render_page

ROOT = Path(__file__).resolve().parent.parent
HOSTILE = "\"'><script>alert(1)</script><img src=x onerror=alert(1)>&amp;"


def _figure(text: str) -> dict:
    return {"png": "a.png", "wav": "a.wav", "title": text}


def _page_data(text: str) -> dict:
    """Everything the template shows, each free-text value ``text``."""
    rows = [(text, text)]
    return dict(
        run_name=text, version=text, run=text, step=text, metrics_name=text,
        training={"png": "bits.png", "summary": rows},
        timeline={"png": "timeline.png", "steps": [
            {"step": 2, "loss_bits": 1.5, "seconds": text, "temperature": text, "seed": text,
             "figures": [_figure(text)]}]},
        real_seconds=4.0, real=[_figure(text)], generated=[_figure(text)],
        dataset={"url": text, "songs": text, "hours": 0.5, "sample_rate": text,
                 "shards": text, "hours_png": "hours.png", "hours_per_label": rows,
                 "throughput": rows, "failed": [{"source": text, "reason": text}]},
        model=rows, train=rows)


class _Markup(HTMLParser):
    """The page as the browser's parser sees it: its tags and attributes, and its text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attributes: list[tuple[str, str | None]] = []
        self.text = ""

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attributes += attrs

    def handle_data(self, data):
        self.text += data


def _parse(page: str) -> _Markup:
    parser = _Markup()
    parser.feed(page)
    parser.close()
    return parser


def test_every_value_goes_into_the_page_as_text_never_as_markup():
    plain = _parse(render_page(**_page_data("plain")))
    hostile = _parse(render_page(**_page_data(HOSTILE)))
    assert hostile.tags == plain.tags  # no value added an element (no <script>, no <img>)
    assert "script" not in hostile.tags and ("src", "x") not in hostile.attributes
    # Each value reads back exactly as given, in the text and inside attribute values.
    assert hostile.text.count(HOSTILE) == plain.text.count("plain") >= 25
    assert ("alt", f"spectrogram of {HOSTILE}") in hostile.attributes


def test_a_name_the_template_uses_but_is_not_given_is_an_error():
    data = _page_data("plain")
    del data["metrics_name"], data["training"]
    with pytest.raises(jinja2.UndefinedError, match="training"):
        render_page(**data)


@pytest.mark.slow
def test_the_wheel_ships_the_template(tmp_path):
    source = tmp_path / "source"  # a copy: the build writes beside the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("rainforest", "kernels"):
        shutil.copytree(ROOT / name, source / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path), str(source)], check=True,
                   capture_output=True, timeout=600)
    [wheel] = tmp_path.glob("rainforest-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert f"rainforest/templates/{TEMPLATE}" in archive.namelist()
