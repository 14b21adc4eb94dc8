"""`rainforest report` on a tiny real run, opened in a real headless Chromium."""

from __future__ import annotations

import io
import json
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

import audiogen
import chromium
from conftest import TINY_TRAINING, run_cli

pytestmark = pytest.mark.slow

HOSTILE = "<img src=x onerror=alert(1)>.mp3"  # a file name, so no slash

# Every <img> decoded and every <audio> read its metadata, judged by the browser itself.
CHECK_MEDIA = """(async () => {
  const images = [...document.images].map(i => ({src: i.getAttribute('src'),
      ok: i.complete && i.naturalWidth > 0}));
  const audios = await Promise.all([...document.querySelectorAll('audio')].map(a =>
    new Promise(done => {
      const finish = ok => done({src: a.getAttribute('src'), ok, seconds: a.duration});
      if (a.readyState >= 1) return finish(true);
      a.addEventListener('loadedmetadata', () => finish(true), {once: true});
      a.addEventListener('error', () => finish(false), {once: true});
      a.load();
      setTimeout(() => finish(a.readyState >= 1), 30000);
    })));
  return {images, audios, scripts: document.scripts.length,
          text: document.body.innerText};
})()"""


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory) -> dict[str, Path]:
    """A labelled dataset with one hostile failure, 4 training steps, 2 generated streams."""
    root = tmp_path_factory.mktemp("report")
    songs = root / "songs"
    audiogen.write_periodic_songs(songs)
    audiogen.write_html(songs / "low" / HOSTILE)
    paths = {name: root / name for name in ("dataset", "run", "generated", "report")}
    summary = run_cli("preprocess", songs, "--out", paths["dataset"], "--labels", "parent",
                      "--cluster", "sync", "--no-progress", "--json", expect_failed_songs=True)
    (root / "preprocess.json").write_text(summary.stdout)
    run_cli("train", paths["dataset"], "--run", paths["run"], *TINY_TRAINING, "--steps", "4",
            "--val-every", "2", "--condition")
    run_cli("generate", paths["run"], "--seconds", "0.3", "--streams", "2", "--label", "high",
            "--out", paths["generated"], "--no-progress")
    result = run_cli("report", paths["run"], "--generated", paths["generated"],
                     "--preprocess-summary", root / "preprocess.json", "--out", paths["report"])
    assert f"report: {paths['report'] / 'index.html'}" in result.stdout
    return paths


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.links += [(tag, value) for name, value in attrs if name in ("src", "href")]


def test_page_links_only_files_beside_it_and_escapes_names(tiny_report):
    page = (tiny_report["report"] / "index.html").read_text()
    parser = _Links()
    parser.feed(page)
    assert "&lt;img src=x onerror=alert(1)&gt;.mp3" in page
    assert ("img", "x") not in parser.links  # the hostile song name did not become markup
    sources = [value for tag, value in parser.links]
    assert {tag for tag, _ in parser.links} == {"img", "audio"}
    assert all("/" not in value and ":" not in value for value in sources)  # offline, beside
    for value in sources:
        assert (tiny_report["report"] / value).stat().st_size > 100, value
    names = set(sources)
    assert {"bits.png", "hours.png", "generated-stream-000.wav", "generated-stream-001.png",
            "real-00.wav", "real-01.png"} <= names
    assert "step <b>4</b>" in page
    assert "real-time factor" in page and "Failures (1)" in page
    for field in ("residual_channels", "dilations", "labels"):
        assert f"<th>{field}</th>" in page


def test_report_opens_in_headless_chromium_without_broken_media(tiny_report, tmp_path):
    if chromium.executable() is None:
        pytest.fail("Debian's chromium package is missing; scripts/install.sh installs it")
    page = (tiny_report["report"] / "index.html").resolve().as_uri()
    with chromium.Chromium(tmp_path / "profile") as browser:
        browser.open(page, width=1200, height=1800)
        seen = browser.evaluate(CHECK_MEDIA)
        png = browser.screenshot()
    assert len(seen["images"]) >= 6 and len(seen["audios"]) >= 4
    assert [i["src"] for i in seen["images"] if not i["ok"]] == []
    assert [a["src"] for a in seen["audios"] if not a["ok"]] == []
    generated = [a for a in seen["audios"] if a["src"].startswith("generated-")]
    assert len(generated) == 2 and all(abs(a["seconds"] - 0.3) < 0.01 for a in generated)
    assert seen["scripts"] == 0 and HOSTILE in seen["text"]  # shown as text, not run

    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
    assert pixels.shape[:2] == (1800, 1200)
    colours = np.unique(pixels.reshape(-1, 3), axis=0).shape[0]
    assert pixels.std() > 20 and colours > 200, (pixels.std(), colours)  # not a blank page
    target = os.environ.get("RAINFOREST_REPORT_SCREENSHOT")
    if target:  # how docs/report.md's screenshot is made: by this test, not by hand
        small = Image.open(io.BytesIO(png)).convert("RGB").resize((800, 1200), Image.LANCZOS)
        small.quantize(colors=64).save(target, format="PNG", optimize=True)


def test_report_refuses_a_missing_generated_folder(tiny_report, tmp_path):
    result = run_cli("report", tiny_report["run"], "--generated", tmp_path / "nope", "--out",
                     tmp_path / "r", check=False)
    assert result.returncode == 1 and "no such folder" in result.stderr
    assert not (tmp_path / "r" / "index.html").exists()


def test_report_page_is_complete_without_a_dataset_or_songs(tiny_report, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_report["run"], run)
    config = json.loads(next(run.glob("checkpoints/step-*/config.json")).read_text())
    assert config["data"]["dataset"]
    result = run_cli("report", run, "--dataset", tmp_path / "gone", "--out", tmp_path / "r")
    assert "not found" in result.stdout
    page = (tmp_path / "r" / "index.html").read_text()
    assert "No dataset given." in page and "No generated songs given." in page
