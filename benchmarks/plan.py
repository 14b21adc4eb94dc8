"""`rainforest plan`'s predictions against whole commands measured here, on real music.

Each case is planned as a new user would (``rainforest plan SOURCES --workers W --ranks R
--steps N ... --json``, a fresh calibration), then the real ``rainforest preprocess`` on
``W`` local workers and the real ``rainforest train`` under ``horovodrun -np R --gloo`` (one
rank pinned to one core, or R ranks on R cores) are timed whole, start-up included. Printed:
a Markdown table of every stage (predicted, measured, error) and the verdicts the issue asks
for: every stage within +-20%, the median error within 10%, every stage a minute or more.

The songs are the demo's: Debian's ``wesnoth-1.16-music`` (41 Ogg Vorbis tracks, 2.0 h),
fetched into the cache, and mp3 and Ogg Opus versions of them written once beside it
(``$RAINFOREST_CACHE/plan-bench``). A case takes distinct copies of a set (the same audio,
another tag: see tests/plancheck.py) until its preprocessing is expected to take
``--stage-seconds`` on its workers, by a quick timing of one song of each set here.

Run: ``python benchmarks/plan.py`` (six cases, about an hour on 2 cores: each case calibrates,
and the cases of 300 steps or more include ``--compile auto``'s trial; the first run also
writes the mp3 and Opus sets, about 15 minutes). ``--quick`` runs three small cases whose
stages take seconds, for development only: its errors say little. ``--case NAME`` runs
chosen cases. ``--curve PATH`` instead scores the held-out-bits prediction on a finished
quality run (see ``curve_check``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import plancheck  # noqa: E402
from machine import cpu_model  # noqa: E402

from conftest import rank_env  # noqa: E402
from rainforest.storage import cache_root  # noqa: E402

#: (set, copies of it or None to size, workers, ranks, steps, train options) of each full case.
FULL = {
    "ogg-1w-1r": (("ogg",), 1, 1, 250, ()),
    "opus-2w-2r-trial": (("opus",), 2, 2, 300, ()),
    "mixed-2w-2r-medium": (("ogg", "mp3", "opus"), 2, 2, 100, ("--config", "medium")),
    "mp3-1w-1r-medium": (("mp3",), 1, 1, 100, ("--config", "medium")),
    "ogg-2w-2r-600": (("ogg",), 2, 2, 600, ()),
    "opus-1w-1r-trial": (("opus",), 1, 1, 400, ()),
}
#: Small cases for development: seconds a stage, 3 songs a set.
QUICK = {
    "quick-ogg+mp3-1w-1r": (("ogg", "mp3"), 1, 1, 40, ("--config", "tiny")),
    "quick-opus-2w-2r": (("opus",), 2, 2, 40, ("--config", "tiny")),
    "quick-ogg-2w-2r-default": (("ogg",), 2, 2, 30, ("--batch-size", "2")),
}


def song_sets(quick: bool) -> dict[str, list[Path]]:
    """The demo's Ogg songs and their mp3 and Opus versions (written once, cached)."""
    import soundfile
    import soxr

    from rainforest.samples import debian_music, mp3_copies

    ogg = debian_music()[:3] if quick else debian_music()
    root = cache_root() / "plan-bench"
    sets = {"ogg": ogg, "mp3": mp3_copies(ogg, out_dir=root / "mp3")}
    opus = []
    for song in ogg:
        target = root / "opus" / f"{song.stem}.opus"
        if not target.exists():
            print(f"writing {target.name}", flush=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            audio, rate = soundfile.read(str(song), dtype="float32")
            partial = target.with_name(target.name + ".part")
            soundfile.write(str(partial), soxr.resample(audio, rate, 48000), 48000,
                            format="OGG", subtype="OPUS")
            os.replace(partial, target)
        opus.append(target)
    sets["opus"] = opus
    return sets


def seconds_per_set(sets: dict[str, list[Path]]) -> dict[str, tuple[float, float]]:
    """(seconds of audio, seconds of one core to encode them) of each set, from one song."""
    import soundfile

    costs = {}
    for name, songs in sets.items():
        audio = sum(soundfile.info(str(s)).duration for s in songs)
        costs[name] = (audio, audio * plancheck.encode_cost(songs[len(songs) // 2]))
    return costs


def build_cases(chosen: dict, sets: dict[str, list[Path]], root: Path,
                stage_seconds: float) -> list[plancheck.Case]:
    """Each case's sources: distinct copies of its sets, enough to keep its workers busy for
    ``stage_seconds`` by the quick timing (spread evenly over its sets)."""
    costs = seconds_per_set(sets)
    cases = []
    for name, (kinds, workers, ranks, steps, training) in chosen.items():
        work = sum(costs[k][1] for k in kinds)
        copies = max(1, math.ceil(stage_seconds * workers / work))
        sources = []
        for kind in kinds:
            folder = root / f"{kind}-x{copies}"
            for song in sets[kind]:  # kept from an earlier run where already written
                plancheck.distinct_copies(song, folder, copies)
            sources.append(str(folder))
        cases.append(plancheck.Case(name, tuple(sources), workers, ranks, steps,
                                    tuple(training), notes={"copies": copies}))
        print(f"{name}: {copies} cop{'y' if copies == 1 else 'ies'} of {'+'.join(kinds)} "
              f"({copies * sum(costs[k][0] for k in kinds) / 3600:.1f} h), {workers} worker(s),"
              f" {ranks} rank(s), {steps} steps {' '.join(training)}", flush=True)
    return cases


def _log_line(points: list[tuple[int, float]], steps: int) -> float:
    """The other form tried: a least-squares line in ln(step), at ``steps``."""
    xs = [math.log(s) for s, _ in points]
    mean_x, mean_y = sum(xs) / len(xs), sum(b for _, b in points) / len(points)
    slope = (sum((x - mean_x) * (b - mean_y) for x, (_, b) in zip(xs, points, strict=True))
             / sum((x - mean_x) ** 2 for x in xs))
    return mean_y + slope * (math.log(steps) - mean_x)


def curve_check(path: str, *, quarter: float = 0.25) -> None:
    """Score the held-out-bits prediction: fit the measurements of the first ``quarter`` of a
    run's wall time (past its warm-up), predict its last measurement's step, compare; and the
    same for a line in ln(step), the form the plan does not use.

    ``path`` is a ``benchmarks/quality.py`` output (``quality.json``: minutes since launch) or
    a run folder (``metrics.jsonl``: minutes since its first record).
    """
    from rainforest import checkpoint, runlog
    from rainforest.plan import fit_curve

    if path.endswith(".json"):
        with open(path, encoding="utf-8") as handle:
            document = json.load(handle)
        curves = {name: ([(p["minutes"], p["step"], p["bits"]) for p in r["held_out"]], 100)
                  for name, r in document["results"].items()}  # quality.py: the default warm-up
    else:
        rows = runlog.read_metrics(path)
        warmup = checkpoint.read_config(checkpoint.latest(path))["train"]["warmup_steps"]
        first = rows[0]["time"]
        curves = {path: ([((r["time"] - first) / 60, r["step"], r["validation_bits"])
                          for r in rows if "validation_bits" in r], warmup)}
    for name, (points, warmup) in curves.items():
        end = points[-1][0]
        fitted = [(step, bits) for minutes, step, bits in points
                  if minutes <= quarter * end and step > warmup]
        fit = fit_curve(fitted)
        last_step, last_bits = points[-1][1], points[-1][2]
        mean_last = sum(p[2] for p in points[-3:]) / len(points[-3:])
        guess = fit.predict(last_step)
        line = _log_line(fitted, last_step)
        print(f"{name}: fitted {fit.points} measurements of the first {quarter * end:.1f} of "
              f"{end:.1f} min (steps {fit.steps[0]}-{fit.steps[-1]}); at step {last_step}: "
              f"predicted {guess['bits']:.3f} ({guess['low']:.3f}-{guess['high']:.3f}), "
              f"measured {last_bits:.3f}, the mean of the last 3 {mean_last:.3f}: error "
              f"{guess['bits'] - last_bits:+.3f} bits ({guess['bits'] - mean_last:+.3f} against "
              f"the mean); a line in ln(step) instead: {line:.3f} ({line - last_bits:+.3f}, "
              f"{line - mean_last:+.3f})")


def _split(split: dict) -> str:
    """Predicted against measured start, middle and end of a training."""
    return ", ".join(f"{part} {split['predicted'][part]:.1f}/{split['measured'][part]:.1f} s"
                     for part in ("start", "middle", "end"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="three small development cases")
    parser.add_argument("--case", action="append", default=[], help="run only these cases")
    parser.add_argument("--stage-seconds", type=float, default=None,
                        help="preprocessing each case is sized to (default: 80, or 8 quick)")
    parser.add_argument("--work", default=None, help="where the copies and runs go (default: "
                        "the cache's plan-bench folder)")
    parser.add_argument("--curve", metavar="PATH", help="score the held-out-bits prediction on "
                        "a quality.json or run folder instead")
    args = parser.parse_args()
    if args.curve:
        curve_check(args.curve)
        return
    chosen = QUICK if args.quick else FULL
    if args.case:
        chosen = {name: chosen[name] for name in args.case}
    stage = args.stage_seconds or (8.0 if args.quick else 80.0)
    root = Path(args.work or cache_root() / "plan-bench" / ("quick" if args.quick else "full"))
    print(f"CPU: {cpu_model()}; {len(os.sched_getaffinity(0))} cores; load average "
          f"{os.getloadavg()[0]:.1f} at the start", flush=True)
    started = time.perf_counter()
    cases = build_cases(chosen, song_sets(args.quick), root, stage)
    checks = []
    for case in cases:
        found = plancheck.run_case(case, root / "runs", env=rank_env())
        for check in found:
            print(f"  {check['case']} {check['stage']}: predicted {check['predicted']:.1f} s, "
                  f"measured {check['measured']:.1f} s ({check['error']:+.1%})"
                  + (f"; {_split(check['split'])}" if "split" in check else ""), flush=True)
        checks += found
    print("\n" + plancheck.table(checks))
    print("\n" + plancheck.summary(checks))
    minutes = (time.perf_counter() - started) / 60
    print(f"load average {os.getloadavg()[0]:.1f} at the end; {minutes:.0f} min in all")


if __name__ == "__main__":
    main()
