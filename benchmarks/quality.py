"""Time to quality: held-out bits per sample against wall time, on real music.

Usage: python benchmarks/quality.py [--minutes 20] [--ranks 2] [--variant NAME="ARGS"]...

The songs are the demo's: Debian's ``wesnoth-1.16-music`` (41 Ogg tracks, GPL-2+), fetched
and preprocessed once into the cache (``$RAINFOREST_CACHE`` or ``~/.cache/rainforest``,
``quality/PACKAGE-dataset``). Each variant trains the default config from scratch with ``horovodrun
--gloo`` on localhost (``--ranks`` ranks share the cores, as in ``scripts/demo.sh``) under
``--time-limit``; the usual song hash (the default ``--val-fraction``) holds out 4 of the 41.
Variants run one after another in this process tree, so each has the machine to itself.

The clock starts when ``horovodrun`` is launched, so Python and TensorFlow start-up, the
``--compile auto`` / ``--precision auto`` trial and the first trace all count, as they do for a
user. A variant's figure is its last held-out measurement at or before ``--minutes``, and
the mean of the last few, since one measurement moves by about 0.05 bits.

Printed: the CPU, each variant's step choice, steps, samples/s and held-out bits at each
quarter of the budget; written: ``quality.png`` (held-out bits against minutes, one line per
variant, with the target and the unigram entropy) and ``quality.json`` beside the runs.

A variant is ``NAME=ARGS``: extra ``rainforest train`` options, e.g.
``--variant lr3e-3="--lr 3e-3"``. Without ``--variant``, one variant ``defaults``
runs with no extra options. Variants that end at the same ``--steps`` are also compared step
by step: each one's largest and mean difference in held-out bits from the first variant (the
fused kernels against graph mode, say).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time

from machine import describe

from rainforest import checkpoint, runlog
from rainforest.hosts import local_gloo_launcher
from rainforest.plots import png_figure
from rainforest.preprocess import preprocess
from rainforest.samples import DEFAULT_PACKAGE, debian_music
from rainforest.storage import cache_root

#: The issue's target: held-out bits per sample within the budget.
TARGET_BITS = 4.0
#: Held-out measurements averaged for a steadier figure (one moves by about 0.05 bits).
SMOOTHED = 3
#: Far more steps than fit in the budget: the time limit ends every run.
UNBOUNDED_STEPS = 1_000_000


def dataset_folder(package: str) -> str:
    """The demo's songs, preprocessed once (re-running resumes, so a cached dataset is reused)."""
    out = str(cache_root() / "quality" / f"{package}-dataset")
    sources = [str(path) for path in debian_music(package)]
    preprocess(sources, out, progress=False, log=lambda line: None)
    return out


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, separator, options = text.partition("=")
    if not separator or not name:
        raise argparse.ArgumentTypeError(f"--variant wants NAME=\"ARGS\", got {text!r}")
    return name, shlex.split(options)


def train_variant(dataset: str, run: str, options: list[str], args) -> dict:
    """One run from scratch under the time limit; its held-out curve against launch time."""
    if os.path.exists(run):
        shutil.rmtree(run)
    launcher = local_gloo_launcher(args.ranks)
    if not launcher:
        raise SystemExit("horovodrun is not installed; run scripts/install.sh")
    command = [*launcher, sys.executable, "-m", "rainforest.cli", "train", dataset, "--run", run,
               "--steps", str(UNBOUNDED_STEPS), "--time-limit", str(args.minutes),
               "--val-every", str(args.val_every), "--checkpoint-every", str(UNBOUNDED_STEPS),
               "--no-progress", *options]
    launched = time.time()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"training failed ({' '.join(command)}):\n{result.stdout[-3000:]}\n"
                         f"{result.stderr[-3000:]}")
    rows = runlog.read_metrics(run)
    held = [{"minutes": (row["time"] - launched) / 60, "step": row["step"],
             "bits": row["validation_bits"], "unigram": row["unigram_bits"]}
            for row in rows if "validation_bits" in row]
    rates = [row["samples_per_second"] for row in rows if "samples_per_second" in row]
    data = checkpoint.read_config(checkpoint.latest(run))["data"]
    return {"options": options, "held_out": held, "steps": rows[-1]["step"],
            "samples_per_second": statistics.median(rates) if rates else None,
            "step_choice": data.get("step_choice"),
            "first_step_minutes": (rows[0]["time"] - launched) / 60}


def measured_by(held: list[dict], minutes: float) -> list[dict]:
    """The held-out measurements taken at or before ``minutes`` after launch."""
    return [point for point in held if point["minutes"] <= minutes]


def plot(results: dict[str, dict], path: str, minutes: float) -> None:
    with png_figure(path, size=(8, 4.5)) as axes:
        for name, result in results.items():
            held = result["held_out"]
            axes.plot([p["minutes"] for p in held], [p["bits"] for p in held], "o-", ms=3,
                      label=name)
        unigram = [r["held_out"][-1]["unigram"] for r in results.values() if r["held_out"]]
        if unigram:
            axes.axhline(unigram[0], color="grey", ls="--", label="unigram entropy")
        axes.axhline(TARGET_BITS, color="#b22222", ls=":", label=f"target {TARGET_BITS:g}")
        axes.axvline(minutes, color="black", lw=0.8)
        axes.set_xlabel("minutes since launch")
        axes.set_ylabel("held-out bits per sample")
        axes.legend()
        axes.grid(alpha=0.3)


def report(name: str, result: dict, minutes: float) -> None:
    choice = result["step_choice"] or {}
    print(f"\n{name}: {' '.join(result['options']) or '(no extra options)'}")
    print(f"  step: {choice.get('compile')}, {choice.get('precision')} ({choice.get('reason')});"
          f" first step at {result['first_step_minutes']:.2f} min; {result['steps']} steps, "
          f"median {result['samples_per_second'] or float('nan'):,.0f} samples/s")
    for quarter in (0.25, 0.5, 0.75, 1.0):
        before = measured_by(result["held_out"], quarter * minutes)
        if before:
            print(f"  at {quarter * minutes:5.1f} min: {before[-1]['bits']:.3f} bits "
                  f"(step {before[-1]['step']}, measured at {before[-1]['minutes']:.2f} min)")
    if before:  # the whole budget's measurements, from the last quarter
        final = before[-1]
        verdict = "met" if final["bits"] <= TARGET_BITS else "MISSED"
        last = [point["bits"] for point in before[-SMOOTHED:]]
        print(f"  target <= {TARGET_BITS:g} bits in {minutes:g} min: {final['bits']:.3f}: "
              f"{verdict} (mean of the last {len(last)} measurements {sum(last) / len(last):.3f})")


def compare_by_step(results: dict[str, dict]) -> None:
    """Held-out bits at each step every variant measured, and each variant's largest
    difference from the first (runs of equal ``--steps``: the same measurements, step for
    step)."""
    names = list(results)
    by_step = {name: {p["step"]: p["bits"] for p in results[name]["held_out"]} for name in names}
    steps = sorted(set.intersection(*(set(points) for points in by_step.values())))
    if len(names) < 2 or not steps:
        return
    print("\nheld-out bits by step: " + ", ".join(names))
    for step in steps:
        print(f"  step {step:6d}: " + "  ".join(f"{by_step[n][step]:.4f}" for n in names))
    first = names[0]
    for name in names[1:]:
        gaps = [by_step[name][step] - by_step[first][step] for step in steps]
        print(f"{name} - {first}: largest {max(gaps, key=abs):+.4f} bits, mean "
              f"{statistics.mean(gaps):+.4f} over {len(steps)} measurements")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--val-every", type=int, default=50,
                        help="steps between held-out measurements (default: %(default)s)")
    parser.add_argument("--variant", type=parse_variant, action="append", default=[],
                        metavar='NAME="ARGS"')
    parser.add_argument("--package", default=DEFAULT_PACKAGE)
    parser.add_argument("--out", default=str(cache_root() / "quality" / "runs"))
    args = parser.parse_args()
    variants = dict(args.variant) or {"defaults": []}
    print(describe(), flush=True)
    dataset = dataset_folder(args.package)
    print(f"dataset: {dataset} ({args.package}); runs in {args.out}", flush=True)
    results = {}
    for name, options in variants.items():
        results[name] = train_variant(dataset, os.path.join(args.out, name), options, args)
        report(name, results[name], args.minutes)
    compare_by_step(results)
    os.makedirs(args.out, exist_ok=True)
    plot(results, os.path.join(args.out, "quality.png"), args.minutes)
    with open(os.path.join(args.out, "quality.json"), "w", encoding="utf-8") as handle:
        json.dump({"minutes": args.minutes, "ranks": args.ranks, "results": results}, handle,
                  indent=1)
    print(f"\nwrote {os.path.join(args.out, 'quality.png')} and quality.json; load average "
          f"{os.getloadavg()}")


if __name__ == "__main__":
    main()
