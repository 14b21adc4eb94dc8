"""One static page that shows what a run did: ``rainforest report RUN --out DIR``.

``DIR/index.html`` with every PNG and wav beside it, so the folder can be copied anywhere and
opened without a network. It shows:

- training and held-out bits per sample against the unigram entropy (``RUN/metrics.jsonl``);
- the dataset's hours per label, its failures, and preprocessing throughput when known;
- real songs (from the dataset's shards) and generated ones (``--generated``) side by side as
  spectrograms, each with an ``<audio>`` player;
- the checkpoint's step and its model and training configs;
- a timeline of the audio samples made during training (``train --sample-every``): each
  sampled step's spectrograms with players, beside the loss curve marked at those steps.

The markup is one Jinja2 template beside this module, ``templates/report.html``; the code
here computes what goes in (copies the wavs, draws the PNGs, collects the rows) and hands the
template plain data. The template is rendered with autoescaping on, so every string put into
the page is HTML-escaped: song names, labels and failure reasons come from files a stranger
may have named.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from typing import Any

import jinja2
import numpy as np

from rainforest import __version__, checkpoint, storage
from rainforest.errors import ParameterError
from rainforest.generate import GENERATION_NAME, is_stream_file, spectrogram_file
from rainforest.plots import png_figure, spectrogram_png
from rainforest.runlog import METRICS_NAME, draw_curves, read_metrics
from rainforest.training_samples import SAMPLES_DIR, sampled_steps

REAL_SECONDS = 4.0  # seconds of each real song shown and played
REAL_SONGS = 4
PAGE_NAME = "index.html"
TEMPLATE = "report.html"
BITS_PNG, TIMELINE_PNG, HOURS_PNG = "bits.png", "timeline.png", "hours.png"
# Autoescaping on for every template, whatever its name; an undefined name is an error, not
# an empty string.
_TEMPLATES = jinja2.Environment(loader=jinja2.PackageLoader("rainforest", "templates"),
                                autoescape=True, undefined=jinja2.StrictUndefined,
                                trim_blocks=True, lstrip_blocks=True,
                                keep_trailing_newline=True)


def plot_hours(hours: dict[str, float], path: str) -> None:
    """The dataset's hours of audio per label, as horizontal bars."""
    names = list(hours)
    with png_figure(path, size=(7, 0.5 + 0.35 * max(1, len(names)))) as axes:
        axes.barh(names, [hours[n] for n in names], color="#3a7d44")
        axes.invert_yaxis()
        axes.set_xlabel("hours")
        axes.grid(alpha=0.3, axis="x")


def _write_real_clip(dataset, song, out: str, stem: str) -> tuple[str, str]:
    """A clip of one dataset song as wav and spectrogram PNG (names relative to ``out``)."""
    import soundfile

    from rainforest.kernels import mulaw_decode

    rate = dataset.audio.sample_rate
    codes = np.ascontiguousarray(dataset.song_codes(song)[: int(REAL_SECONDS * rate)])
    samples = mulaw_decode(codes)
    wav = os.path.join(out, stem + ".wav")
    with storage.Staged(wav) as staging:
        soundfile.write(staging, samples, rate, subtype="PCM_16", format="WAV")
    spectrogram_png(samples, rate, os.path.join(out, stem + ".png"))
    return stem + ".wav", stem + ".png"


def _pick_real_songs(dataset) -> list:
    """Up to REAL_SONGS songs, one per label first, in manifest order."""
    chosen, labels = [], set()
    for song in dataset.songs:
        if song.label not in labels:
            chosen.append(song)
            labels.add(song.label)
    chosen += [s for s in dataset.songs if s not in chosen]
    return chosen[:REAL_SONGS]


def _copy_generated(generated: str, out: str) -> list[dict[str, str]]:
    """The streams of a ``rainforest generate`` folder, copied beside the page."""
    import soundfile

    items = []
    for name in sorted(filter(is_stream_file, os.listdir(generated))):
        stem = "generated-" + os.path.splitext(name)[0]
        shutil.copyfile(os.path.join(generated, name), os.path.join(out, stem + ".wav"))
        png = os.path.join(generated, spectrogram_file(name))
        if os.path.exists(png):
            shutil.copyfile(png, os.path.join(out, stem + ".png"))
        else:
            samples, rate = soundfile.read(os.path.join(generated, name), dtype="float32")
            spectrogram_png(samples, rate, os.path.join(out, stem + ".png"))
        items.append({"title": name, "wav": stem + ".wav", "png": stem + ".png"})
    return items


def _figure(png: str, wav: str | None, title: str) -> dict[str, str | None]:
    return {"png": png, "wav": wav, "title": title}


def _training(rows, out: str) -> dict[str, Any] | None:
    """The bits-per-sample plot and the last logged figures, or None without metrics."""
    if not rows:
        return None
    draw_curves(rows, os.path.join(out, BITS_PNG))
    held = [r for r in rows if "validation_bits" in r]
    summary = [("last step logged", rows[-1]["step"])]
    if "loss_bits" in rows[-1]:
        summary.append(("training bits/sample", f"{rows[-1]['loss_bits']:.3f}"))
    if held:
        summary += [("held-out bits/sample", f"{held[-1]['validation_bits']:.3f}"),
                    ("unigram entropy, bits", f"{held[-1]['unigram_bits']:.3f}")]
    return {"png": BITS_PNG, "summary": summary}


def _copy_samples(run: str, step: int, index: dict[str, Any], out: str) -> list[dict]:
    """The figures of one sampled step, its files copied beside the page."""
    folder = storage.join(run, SAMPLES_DIR, checkpoint.step_name(step))
    figures = []
    for wav, label in zip(index["files"], index["labels"], strict=True):
        stem = f"sample-{checkpoint.step_name(step)}-{os.path.splitext(wav)[0]}"
        for source, target in ((wav, stem + ".wav"), (spectrogram_file(wav), stem + ".png")):
            with storage.Staged(os.path.join(out, target)) as staging, \
                    open(staging, "wb") as handle:
                handle.write(storage.read_bytes(storage.join(folder, source)))
        title = f"step {step}" + (f" [{label}]" if label is not None else "")
        figures.append(_figure(stem + ".png", stem + ".wav", title))
    return figures


def _timeline(run: str, rows, out: str) -> dict[str, Any] | None:
    """Each sampled step's figures, beside the loss curve marked there; None if none."""
    sampled = sampled_steps(run)
    if not sampled:
        return None
    draw_curves(rows, os.path.join(out, TIMELINE_PNG), marks=[step for step, _ in sampled])
    loss = {r["step"]: r["loss_bits"] for r in rows if "loss_bits" in r}
    steps = [{"step": step, "loss_bits": loss.get(step), "seconds": index["seconds"],
              "temperature": index["temperature"], "seed": index["seed"],
              "figures": _copy_samples(run, step, index, out)}
             for step, index in sampled]
    return {"png": TIMELINE_PNG, "steps": steps}


def _dataset(dataset, throughput: dict[str, Any] | None, out: str) -> dict[str, Any]:
    """The dataset's size, hours per label (plotted), throughput and failures."""
    from rainforest.dataset import summary

    info = summary(dataset.url)
    rate = dataset.audio.sample_rate
    hours: dict[str, float] = {}
    for song in dataset.songs:
        key = "(no label)" if song.label is None else str(song.label)
        hours[key] = hours.get(key, 0.0) + song.length / rate / 3600.0
    if hours:
        plot_hours(hours, os.path.join(out, HOURS_PNG))
    speed = None
    if throughput:
        speed = [("songs processed", throughput.get("processed_songs")),
                 ("wall seconds", f"{throughput.get('elapsed_seconds', 0):.1f}"),
                 ("real-time factor", f"{throughput.get('realtime_factor', 0):.0f}x")]
    return {"url": dataset.url, "songs": info["songs"], "hours": info["hours"],
            "sample_rate": rate, "shards": len(info["shards"]), "hours_png": HOURS_PNG,
            "hours_per_label": [(label, f"{h:.3f} h ({60 * h:.1f} min)")
                                for label, h in hours.items()],
            "throughput": speed, "failed": info["failed"]}


def _real_songs(dataset, out: str) -> list[dict]:
    figures = []
    for index, song in enumerate(_pick_real_songs(dataset)):
        wav, png = _write_real_clip(dataset, song, out, f"real-{index:02d}")
        label = f" [{song.label}]" if song.label is not None else ""
        figures.append(_figure(png, wav, os.path.basename(song.source) + label))
    return figures


def _generated_songs(generated: str, out: str) -> list[dict]:
    meta_path = os.path.join(generated, GENERATION_NAME)
    label = None
    if os.path.exists(meta_path):
        with open(meta_path, encoding="utf-8") as handle:
            label = json.load(handle).get("settings", {}).get("label")
    return [_figure(item["png"], item["wav"], item["title"] + (f" [{label}]" if label else ""))
            for item in _copy_generated(generated, out)]


def render_page(**data: Any) -> str:
    """The page from ``templates/report.html``; every value is escaped as it goes in."""
    return _TEMPLATES.get_template(TEMPLATE).render(**data)


def report(run: str, out: str, *, dataset: str | None = None, generated: str | None = None,
           throughput: dict[str, Any] | None = None,
           log: Callable[[str], None] = print) -> str:
    """Write ``out/index.html`` (and its PNGs and wavs) for ``run``; returns the page's path.

    Parameters
    ----------
    run : str
        A run folder written by ``rainforest train``.
    out : str
        Local folder for the page.
    dataset : str, optional
        The dataset; by default the one the checkpoint was trained on, if it still exists.
    generated : str, optional
        A folder written by ``rainforest generate``.
    throughput : dict, optional
        ``rainforest preprocess --json`` output, for the throughput table.

    Examples
    --------
    >>> report("runs/first", "report/", generated="songs/")   # doctest: +SKIP
    """
    from rainforest.dataset import MANIFEST_NAME, Dataset

    if storage.is_remote(out):
        raise ParameterError("--out must be a local folder (the page is opened from disk)")
    config = checkpoint.read_config(checkpoint.latest(run))
    dataset = dataset or config.get("data", {}).get("dataset")
    if generated and not os.path.isdir(generated):
        raise ParameterError(f"--generated {generated}: no such folder")
    os.makedirs(out, exist_ok=True)
    data = None
    if dataset and storage.exists(storage.join(dataset, MANIFEST_NAME)):
        data = Dataset(dataset)
    elif dataset:
        log(f"note: dataset {dataset} not found; the report leaves it out")
    rows = read_metrics(run, log=lambda message: log(f"warning: {message}"))
    page = render_page(
        run_name=os.path.basename(os.path.abspath(run)), version=__version__, run=run,
        step=config["step"], metrics_name=METRICS_NAME, training=_training(rows, out),
        timeline=_timeline(run, rows, out), real_seconds=REAL_SECONDS,
        real=_real_songs(data, out) if data is not None else [],
        generated=_generated_songs(generated, out) if generated else [],
        dataset=_dataset(data, throughput, out) if data is not None else None,
        model=sorted(config["model"].items()), train=sorted(config.get("train", {}).items()))
    path = os.path.join(out, PAGE_NAME)
    storage.write_bytes_atomic(path, page.encode("utf-8"))
    return path


__all__ = ["plot_hours", "report"]


if __name__ == "__main__":  # python -m rainforest.report ARGS is rainforest report ARGS
    from rainforest.cli import run_stage

    run_stage("report")
