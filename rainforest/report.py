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

Every string put into the page is HTML-escaped: song names and failure reasons come from
files a stranger may have named.
"""

from __future__ import annotations

import html
import json
import os
import shutil
from collections.abc import Callable
from typing import Any

import numpy as np

from rainforest import __version__, checkpoint, storage
from rainforest.errors import ParameterError
from rainforest.plots import png_figure, spectrogram_png
from rainforest.runlog import draw_curves, read_metrics
from rainforest.training_samples import SAMPLES_DIR, sampled_steps

REAL_SECONDS = 4.0  # seconds of each real song shown and played
REAL_SONGS = 4


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


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
    import soundfile

    items = []
    for name in sorted(os.listdir(generated)):
        if not name.endswith(".wav") or name.startswith("."):
            continue
        stem = "generated-" + name[:-4]
        shutil.copyfile(os.path.join(generated, name), os.path.join(out, stem + ".wav"))
        png = os.path.join(generated, name[:-4] + ".png")
        if os.path.exists(png):
            shutil.copyfile(png, os.path.join(out, stem + ".png"))
        else:
            samples, rate = soundfile.read(os.path.join(generated, name), dtype="float32")
            spectrogram_png(samples, rate, os.path.join(out, stem + ".png"))
        items.append({"title": name, "wav": stem + ".wav", "png": stem + ".png"})
    return items


def _table(rows: list[tuple[Any, Any]]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _figure(png: str, wav: str | None, title: str) -> str:
    audio = (f'<audio controls preload="metadata" src="{_e(wav)}"></audio>' if wav else "")
    return (f'<figure><img src="{_e(png)}" alt="spectrogram of {_e(title)}">'
            f"<figcaption>{_e(title)}</figcaption>{audio}</figure>")


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222;
       padding: 0 1em; background: #fafaf7; }
h1 { color: #2d5f35; } h2 { border-bottom: 2px solid #3a7d44; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .5em 0 1em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #eef3ea; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }
figure { margin: 0 0 1em; } figure img { width: 100%; border: 1px solid #ddd; }
audio { width: 100%; } img.plot { max-width: 100%; }
.overview { display: flex; gap: 2em; align-items: flex-start; flex-wrap: wrap; }
.timeline { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; align-items: start; }
.timeline > img { position: sticky; top: 0; width: 100%; }
.timeline h3 { margin: .3em 0; }
"""


def _section_training(run: str, rows, config: dict[str, Any], out: str) -> str:
    parts = [f"<h2>Training</h2><p>Run <code>{_e(run)}</code>, checkpoint at step "
             f"<b>{_e(config['step'])}</b>.</p>"]
    if rows:
        draw_curves(rows, os.path.join(out, "bits.png"))
        parts.append('<div class="overview"><img class="plot" src="bits.png" '
                     'alt="bits per sample by step">')
        held = [r for r in rows if "validation_bits" in r]
        summary = [("last step logged", rows[-1]["step"])]
        if "loss_bits" in rows[-1]:
            summary.append(("training bits/sample", f"{rows[-1]['loss_bits']:.3f}"))
        if held:
            summary += [("held-out bits/sample", f"{held[-1]['validation_bits']:.3f}"),
                        ("unigram entropy, bits", f"{held[-1]['unigram_bits']:.3f}")]
        parts.append(_table(summary) + "</div>")
    else:
        parts.append("<p>No <code>metrics.jsonl</code> in the run.</p>")
    return "\n".join(parts)


def _copy_samples(run: str, step: int, index: dict[str, Any], out: str) -> list[str]:
    """The figures of one sampled step, its files copied beside the page."""
    folder = storage.join(run, SAMPLES_DIR, checkpoint.step_name(step))
    figures = []
    for name, label in zip(index["files"], index["labels"], strict=True):
        stem = f"sample-{checkpoint.step_name(step)}-{name[:-4]}"
        for suffix in (".wav", ".png"):
            with storage.Staged(os.path.join(out, stem + suffix)) as staging, \
                    open(staging, "wb") as handle:
                handle.write(storage.read_bytes(storage.join(folder, name[:-4] + suffix)))
        title = f"step {step}" + (f" [{label}]" if label is not None else "")
        figures.append(_figure(stem + ".png", stem + ".wav", title))
    return figures


def _section_timeline(run: str, rows, out: str) -> str:
    """Each sampled step's spectrograms and players, beside the loss curve marked there."""
    sampled = sampled_steps(run)
    if not sampled:
        return ("<h2>Timeline</h2><p>No audio samples in the run (train with "
                "<code>--sample-every N</code> to hear the model at every Nth step).</p>")
    draw_curves(rows, os.path.join(out, "timeline.png"), marks=[step for step, _ in sampled])
    loss = {r["step"]: r["loss_bits"] for r in rows if "loss_bits" in r}
    entries = []
    for step, index in sampled:
        bits = f", training {loss[step]:.3f} bits/sample" if step in loss else ""
        entries.append(f'<div class="step" id="sample-{step}"><h3>Step {step}{_e(bits)}</h3>'
                       f"<p>{_e(index['seconds'])} s at temperature {_e(index['temperature'])}"
                       f", seed {_e(index['seed'])}</p>"
                       + "".join(_copy_samples(run, step, index, out)) + "</div>")
    return ('<h2>Timeline</h2><section id="timeline" class="timeline">'
            '<img class="plot" src="timeline.png" alt="bits per sample, sampled steps marked">'
            f"<div>{''.join(entries)}</div></section>")


def _section_config(config: dict[str, Any]) -> str:
    return ("<h2>Configuration</h2><div class=\"pair\"><div><h3>Model</h3>"
            + _table(sorted(config["model"].items())) + "</div><div><h3>Training settings</h3>"
            + _table(sorted(config.get("train", {}).items())) + "</div></div>")


def _section_dataset(dataset, throughput: dict[str, Any] | None, out: str) -> str:
    from rainforest.dataset import summary

    info = summary(dataset.url)
    rate = dataset.audio.sample_rate
    hours: dict[str, float] = {}
    for song in dataset.songs:
        key = "(no label)" if song.label is None else str(song.label)
        hours[key] = hours.get(key, 0.0) + song.length / rate / 3600.0
    parts = [f"<h2>Dataset</h2><p><code>{_e(dataset.url)}</code>: {info['songs']} songs, "
             f"{info['hours']:.3f} h at {rate} Hz in {len(info['shards'])} shard(s).</p>"]
    if hours:
        plot_hours(hours, os.path.join(out, "hours.png"))
        parts.append('<img class="plot" src="hours.png" alt="hours per label">')
        parts.append(_table([(label, f"{h:.3f} h ({60 * h:.1f} min)")
                             for label, h in hours.items()]))
    if throughput:
        parts.append("<h3>Preprocessing throughput</h3>" + _table([
            ("songs processed", throughput.get("processed_songs")),
            ("wall seconds", f"{throughput.get('elapsed_seconds', 0):.1f}"),
            ("real-time factor", f"{throughput.get('realtime_factor', 0):.0f}x")]))
    else:
        parts.append("<p>Preprocessing throughput: not recorded (pass the output of "
                     "<code>rainforest preprocess --json</code> with "
                     "<code>--preprocess-summary</code>).</p>")
    failed = info["failed"]
    parts.append(f"<h3>Failures ({len(failed)})</h3>")
    if failed:
        parts.append("<table><tr><th>source</th><th>reason</th></tr>" + "".join(
            f"<tr><td>{_e(f['source'])}</td><td>{_e(f['reason'])}</td></tr>" for f in failed)
            + "</table>")
    else:
        parts.append("<p>None.</p>")
    return "\n".join(parts)


def _section_songs(dataset, generated: str | None, out: str) -> str:
    real = []
    if dataset is not None:
        for index, song in enumerate(_pick_real_songs(dataset)):
            wav, png = _write_real_clip(dataset, song, out, f"real-{index:02d}")
            label = f" [{song.label}]" if song.label is not None else ""
            real.append(_figure(png, wav, os.path.basename(song.source) + label))
    made = []
    if generated:
        meta_path = os.path.join(generated, "generation.json")
        label = None
        if os.path.exists(meta_path):
            with open(meta_path, encoding="utf-8") as handle:
                label = json.load(handle).get("settings", {}).get("label")
        for item in _copy_generated(generated, out):
            title = item["title"] + (f" [{label}]" if label else "")
            made.append(_figure(item["png"], item["wav"], title))
    return ("<h2>Real and generated</h2><div class=\"pair\"><div><h3>Real (first "
            f"{REAL_SECONDS:g} s)</h3>{''.join(real) or '<p>No dataset given.</p>'}</div>"
            f"<div><h3>Generated</h3>{''.join(made) or '<p>No generated songs given.</p>'}"
            "</div></div>")


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
    from rainforest.dataset import Dataset

    if storage.is_remote(out):
        raise ParameterError("--out must be a local folder (the page is opened from disk)")
    config = checkpoint.read_config(checkpoint.latest(run))
    dataset = dataset or config.get("data", {}).get("dataset")
    if generated and not os.path.isdir(generated):
        raise ParameterError(f"--generated {generated}: no such folder")
    os.makedirs(out, exist_ok=True)
    data = None
    if dataset and storage.exists(storage.join(dataset, "manifest.json")):
        data = Dataset(dataset)
    elif dataset:
        log(f"note: dataset {dataset} not found; the report leaves it out")
    rows = read_metrics(run)
    sections = [_section_training(run, rows, config, out), _section_timeline(run, rows, out),
                _section_songs(data, generated, out)]
    if data is not None:
        sections.append(_section_dataset(data, throughput, out))
    sections.append(_section_config(config))
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>rainforest report: {_e(os.path.basename(os.path.abspath(run)))}</title>"
            f"<style>{_STYLE}</style></head><body>"
            f"<h1>rainforest report</h1><p>rainforest {_e(__version__)}</p>"
            + "\n".join(sections) + "</body></html>\n")
    path = os.path.join(out, "index.html")
    storage.write_bytes_atomic(path, page.encode("utf-8"))
    return path


__all__ = ["plot_hours", "report"]
