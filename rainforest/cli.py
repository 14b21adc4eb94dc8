"""The ``rainforest`` command: one subcommand per pipeline stage.

Exit status: 0 on success; 1 on an error (the message says what to do next); 3 when
``preprocess`` finished but some songs could not be used (they are listed in the manifest).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from rainforest import __version__
from rainforest.cluster import CLUSTER_HELP
from rainforest.errors import RainforestError
from rainforest.signals import graceful_stop

EXIT_SOME_SONGS_FAILED = 3


def add_config_options(parser, cls: type, *, title: str | None = None) -> None:
    """One option per command-line field of config class ``cls``, from its declaration.

    Defaults are not filled in by argparse (``SUPPRESS``), so :func:`given` can tell the
    options a user typed from the dataclass defaults; the help still shows the default.
    """
    from rainforest.config import cli_fields, flag_of

    group = parser.add_argument_group(title) if title else parser
    for field in cli_fields(cls):
        repeat = field.metadata.get("repeat")
        kind = field.metadata.get("type") or (
            str if field.default is None or repeat else type(field.default))
        help_text = field.metadata["help"].replace("%", "%%")
        shown = f"; default: {field.default}" if field.default not in (None, ()) else ""
        choices = field.metadata.get("choices")
        metavar = None if choices else {int: "N", float: "X"}.get(kind, field.name.upper())
        if kind is bool:  # --name / --no-name
            group.add_argument(flag_of(field), dest=field.name, default=argparse.SUPPRESS,
                               action=argparse.BooleanOptionalAction, help=help_text + shown)
            continue
        group.add_argument(flag_of(field), dest=field.name, type=kind, default=argparse.SUPPRESS,
                           choices=choices, help=help_text + shown, metavar=metavar,
                           action="append" if repeat else "store")


def given(args: argparse.Namespace, cls: type) -> dict:
    """The fields of ``cls`` that the user set on the command line."""
    from rainforest.config import cli_fields

    values = {f.name: getattr(args, f.name) for f in cli_fields(cls) if hasattr(args, f.name)}
    return {name: tuple(v) if isinstance(v, list) else v for name, v in values.items()}


def _audio_config(args: argparse.Namespace):
    from rainforest.config import AudioConfig

    return AudioConfig(**given(args, AudioConfig))


def _print_summary(summary: dict) -> None:
    print(
        f"\n{summary['songs']} songs, {summary['hours']:.2f} h of audio in {summary['shards']} "
        f"shard(s) at {summary['dataset']}"
    )
    print(
        f"this run: {summary['processed_songs']} song(s) processed in "
        f"{summary['elapsed_seconds']:.1f} s ({summary['realtime_factor']:.0f}x real time), "
        f"{summary['skipped_songs']} already done, {summary['duplicates']} duplicate(s) skipped"
    )
    if summary["failed"]:
        print(f"{summary['failed']} song(s) FAILED; see why with: rainforest inspect "
              f"{summary['dataset']}")
    else:
        print("0 songs failed")


def _cluster_settings(args: argparse.Namespace):
    """The settings of the chosen ``--cluster`` kind, from its own options."""
    from rainforest.cluster import SlurmSettings
    from rainforest.ec2 import EC2Settings

    if args.cluster.strip() == "slurm":
        return SlurmSettings(**given(args, SlurmSettings))
    if args.cluster.strip() == "ec2":
        return EC2Settings(**given(args, EC2Settings))
    return None


def add_cluster_options(parser) -> None:
    from rainforest.cluster import SlurmSettings
    from rainforest.ec2 import EC2Settings

    parser.add_argument("--cluster", default="local", help=CLUSTER_HELP)
    add_config_options(parser, SlurmSettings, title="Slurm worker jobs (--cluster slurm; "
                                                    "unset ones come from jobqueue.yaml)")
    add_config_options(parser, EC2Settings, title="EC2 VMs (--cluster ec2; unset ones come "
                                                  "from cloudprovider.yaml)")


def cmd_preprocess(args: argparse.Namespace) -> int:
    from rainforest.preprocess import preprocess

    summary = preprocess(
        args.sources, args.out, config=_audio_config(args), cluster=args.cluster,
        cluster_settings=_cluster_settings(args),
        songs_per_shard=args.songs_per_shard, labels=args.labels,
        progress=not args.no_progress,
        # with --json, stdout carries the JSON alone
        log=(lambda line: print(line, file=sys.stderr)) if args.json else print,
    )
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        _print_summary(summary)
    return EXIT_SOME_SONGS_FAILED if summary["failed"] else 0


def cmd_train(args: argparse.Namespace) -> int:
    import os

    # TensorFlow's C++ info lines would bury the progress output.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from rainforest import checkpoint
    from rainforest.model_config import load_model_config
    from rainforest.train import TrainConfig, train

    # An elastic rank that joins a running job finds its checkpoints: it resumes, then syncs.
    resume = args.resume or bool((args.resume_if_any or args.elastic)
                                 and checkpoint.list_checkpoints(args.run))
    result = train(args.dataset, args.run,
                   model_config=load_model_config(args.config) if args.config else None,
                   overrides=given(args, TrainConfig), resume=resume,
                   condition=args.condition, time_limit_minutes=args.time_limit,
                   elastic=args.elastic, progress=not args.no_progress)
    if result["rank"] == 0:
        from rainforest import runlog

        bits = result["validation_bits"]
        held = (f"held-out {bits:.3f} bits/sample (unigram {result['unigram_bits']:.3f})"
                if result["unigram_bits"] is not None else "no held-out songs")
        run = args.run
        print(f"done: step {result['step']} on {result['ranks']} rank(s), {held}; "
              f"checkpoints in {checkpoint.checkpoint_root(run)}, curves in "
              f"{os.path.join(run, runlog.CURVES_NAME)}, TensorBoard: tensorboard --logdir "
              f"{os.path.join(run, runlog.TENSORBOARD_DIR)}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from rainforest.generate import GenerationConfig, generate

    with graceful_stop(interrupt=True):  # scancel or a time limit keeps what was generated
        summary = generate(args.run, args.out, GenerationConfig(**given(args, GenerationConfig)),
                           progress=not args.no_progress)
    if not summary["files"]:
        print("nothing was generated, so nothing was written", file=sys.stderr)
        return 130 if summary["interrupted"] else 1
    state = "interrupted: kept" if summary["interrupted"] else "done:"
    print(f"{state} {summary['streams']} x {summary['seconds_generated']:.2f} s at "
          f"{summary['sample_rate']} Hz, {summary['samples_per_second']:,.0f} samples/s; "
          f"wav + spectrogram PNG per stream in {args.out}")
    return 0


def format_summary(info: dict) -> str:
    lines = [
        f"dataset      {info['dataset']} (format version {info['format_version']})",
        f"songs        {info['songs']}",
        f"audio        {info['hours']:.3f} h at {info['sample_rate']} Hz "
        f"({info['samples']:,} samples; {info['trimmed_seconds']:.1f} s of silence trimmed)",
        f"shards       {len(info['shards'])}",
    ]
    for shard in info["shards"]:
        lines.append(f"  {shard['name']}  {shard['songs']:4d} songs  {shard['megabytes']:9.2f} MB")
    if info["labels"]:
        lines.append("labels       " + ", ".join(f"{k} ({v})" for k, v in info["labels"].items()))
    for note in info["notes"]:
        lines.append(f"note         {note['source']}: {note['note']}")
    for duplicate in info["duplicates"]:
        lines.append(f"duplicate    {duplicate['source']} (same as {duplicate['same_as']})")
    lines.append(f"failed       {len(info['failed'])}")
    for failure in info["failed"]:
        lines.append(f"  {failure['source']}: {failure['reason']}")
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> int:
    from rainforest.dataset import summary

    info = summary(args.dataset)
    print(json.dumps(info, indent=1) if args.json else format_summary(info))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import os

    from rainforest.dataset import summary
    from rainforest.preprocess import preprocess

    if args.songs:
        sources = args.songs
    else:
        from rainforest.samples import debian_music

        print(f"fetching real songs: Debian package {args.package} (cached after the first time)")
        sources = [str(path) for path in debian_music(args.package)]
    out = os.path.join(args.out, "dataset")
    print(f"preprocessing {len(sources)} source(s) into {out} on cluster {args.cluster!r}")
    result = preprocess(sources, out, config=_audio_config(args), cluster=args.cluster,
                        cluster_settings=_cluster_settings(args))
    _print_summary(result)
    print()
    print(format_summary(summary(out)))
    if args.train_steps:
        run = os.path.join(args.out, "run")
        _demo_train(out, run, args)
        if args.generate_seconds > 0:
            from rainforest.generate import GenerationConfig, generate

            generated = os.path.join(args.out, "generated")
            print(f"\ngenerating 2 x {args.generate_seconds:g} s from {run} into {generated}")
            summary = generate(run, generated, GenerationConfig(
                seconds=args.generate_seconds, streams=2, seed=0, threads=2))
            print(f"generated {', '.join(summary['files'])} "
                  f"({summary['samples_per_second']:,.0f} samples/s)")
        from rainforest.report import report

        generated = os.path.join(args.out, "generated")
        page = report(run, os.path.join(args.out, "report"), dataset=out,
                      generated=generated if os.path.isdir(generated) else None,
                      throughput=result)
        print(f"\nreport: open {os.path.abspath(page)} in a browser")
    return 0


def _demo_train(dataset: str, run: str, args: argparse.Namespace) -> None:
    """Train on the demo dataset with horovodrun over Gloo on localhost, as a user would."""
    import subprocess

    from rainforest import checkpoint
    from rainforest.hosts import local_gloo_launcher

    command = [sys.executable, "-m", "rainforest.cli", "train", dataset, "--run", run,
               "--config", args.train_config, "--steps", str(args.train_steps),
               "--batch-size", "2", "--target-length", "2048", "--val-every",
               str(max(1, args.train_steps // 2)), "--checkpoint-every",
               str(max(1, args.train_steps // 2)), "--warmup-steps", "20",
               # four points on the timeline: hear it go from hiss towards music
               "--sample-every", str(max(1, args.train_steps // 4)), "--sample-seconds", "2"]
    if checkpoint.list_checkpoints(run):
        step = checkpoint.read_config(checkpoint.latest(run))["step"]
        if step >= args.train_steps:
            print(f"\n{run} is already trained to step {step}; delete it to train again")
            return
        command.append("--resume")
    if args.ranks > 1:
        launcher = local_gloo_launcher(args.ranks)
        if not launcher:
            raise RainforestError("horovodrun is not installed; run scripts/install.sh")
        command = [*launcher, *command]
    print(f"\ntraining: {' '.join(command)}", flush=True)
    if subprocess.run(command, check=False).returncode != 0:
        raise RainforestError(f"training failed; see the messages above (run folder {run})")


# --- fetch ------------------------------------------------------------------------------


def cmd_fetch(args: argparse.Namespace) -> int:
    from rainforest.fetch import FetchConfig, fetch, read_sources

    config = FetchConfig(**given(args, FetchConfig))
    sources = read_sources(args.sources, url_column=args.url_column,
                           url_template=args.url_template, label_columns=args.label_column)
    if not sources:
        raise RainforestError(f"no URLs found in {args.sources}; a text file needs one URL per "
                              "line, a CSV needs --url-column or --url-template")
    log = (lambda line: print(line, file=sys.stderr)) if args.json else print
    summary = fetch(sources, args.out, config=config, progress=not args.no_progress, log=log)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"\n{summary['fetched']} file(s) fetched ({summary['bytes'] / 1e6:.1f} MB) in "
              f"{summary['elapsed_seconds']:.1f} s, {summary['skipped']} already there, "
              f"{summary['failed']} failed; record: {summary['manifest']}")
        for failure in summary["failures"][:20]:
            print(f"  FAILED {failure['source']}: {failure['reason']}")
        if summary["failed"] > 20:
            print(f"  ... and {summary['failed'] - 20} more (see {summary['manifest']})")
    return EXIT_SOME_SONGS_FAILED if summary["failed"] else 0


def _add_fetch(commands) -> None:
    from rainforest.fetch import FETCH_NAME, FetchConfig

    fe = commands.add_parser(
        "fetch", help="download songs politely and resumably into a folder or s3:// prefix",
        description="Download songs from a text file of URLs, a metadata CSV (a URL column, or "
                    "a URL template filled from the row; FMA-style two-level headers are "
                    "flattened to group.column), http(s) URLs or an s3:// prefix. Polite: one "
                    "rate limit per host, retries with backoff, Retry-After honoured. "
                    "Resumable: files already fetched (same size and sha256 or ETag) are "
                    f"skipped. Every source is recorded in OUT/{FETCH_NAME} with its status, "
                    "sha256, final URL, labels and failure reason (exit status 3 if any "
                    "failed).",
    )
    fe.add_argument("sources", nargs="+", metavar="SOURCE",
                    help="URLs file (one per line), CSV file, http(s) URL or s3:// prefix")
    fe.add_argument("--out", required=True, metavar="URL",
                    help=f"folder or s3:// prefix for the songs and {FETCH_NAME}")
    fe.add_argument("--url-column", metavar="NAME", help="CSV column holding each song's URL")
    fe.add_argument("--url-template", metavar="TEMPLATE",
                    help="URL built from CSV columns, e.g. "
                         "'https://host/{track_id:06d[:3]}/{track_id:06d}.mp3' (a trailing "
                         "[a:b] in a field's format slices it)")
    fe.add_argument("--label-column", action="append", default=[], metavar="NAME",
                    help="CSV column to keep as a label (repeatable), e.g. track.genre_top")
    fe.add_argument("--no-progress", action="store_true", help="no progress bars")
    fe.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_config_options(fe, FetchConfig, title="politeness and safety")
    fe.set_defaults(handler=cmd_fetch)


# --- report -----------------------------------------------------------------------------


def cmd_report(args: argparse.Namespace) -> int:
    from rainforest.report import report

    throughput = None
    if args.preprocess_summary:
        with open(args.preprocess_summary, encoding="utf-8") as handle:
            throughput = json.load(handle)
    path = report(args.run, args.out, dataset=args.dataset, generated=args.generated,
                  throughput=throughput)
    print(f"report: {path}")
    return 0


def _add_report(commands) -> None:
    rep = commands.add_parser(
        "report", help="write a static HTML page about a run: curves, dataset, songs",
        description="Write OUT/index.html with its PNGs and wavs beside it (viewable offline): "
                    "training and held-out bits per sample against the unigram entropy, the "
                    "dataset's hours per label and failures, real and generated spectrograms "
                    "side by side with audio players, a timeline of the audio sampled during "
                    "training (train --sample-every) beside the loss curve, the model config "
                    "and checkpoint step.",
    )
    rep.add_argument("run", metavar="RUN", help="run folder written by `rainforest train`")
    rep.add_argument("--dataset", metavar="DS",
                     help="dataset folder or s3:// prefix (default: the one RUN trained on)")
    rep.add_argument("--generated", metavar="DIR", help="folder written by `rainforest generate`")
    rep.add_argument("--preprocess-summary", metavar="FILE.json",
                     help="output of `rainforest preprocess --json`, for the throughput table")
    rep.add_argument("--out", required=True, metavar="DIR", help="folder for index.html")
    rep.set_defaults(handler=cmd_report)


# --- plan -------------------------------------------------------------------------------


def cmd_plan(args: argparse.Namespace) -> int:
    from rainforest.plan import PlanConfig, format_plan, plan, plot_plan
    from rainforest.train import TrainConfig

    train = given(args, TrainConfig)
    document = plan(args.sources, PlanConfig(**given(args, PlanConfig)),
                    steps=train.get("steps", TrainConfig().steps), audio=_audio_config(args),
                    train=train, model=args.config, earlier=args.earlier,
                    # with --json, stdout carries the JSON alone
                    log=(lambda line: print(line, file=sys.stderr)) if args.json else print)
    if args.png:
        plot_plan(document, args.png)
    print(json.dumps(document, indent=1) if args.json else format_plan(document))
    return 0


def _add_plan(commands) -> None:
    from rainforest.config import AudioConfig
    from rainforest.plan import PlanConfig
    from rainforest.train import TrainConfig

    pl = commands.add_parser(
        "plan", help="predict the time and money of preprocessing and training, before a run",
        description="Read the sources' sizes, durations and codecs from their headers (no "
                    "decoding; local paths and s3://), calibrate on this machine (a song of "
                    "each codec preprocessed; whole training commands of the chosen settings "
                    "on one rank and on as many as this machine holds, with the run's step "
                    "choice, held-out measurements and checkpoints) or take the figures of an "
                    "earlier run or plan (--from), and print for each worker and rank count: "
                    "hours of audio, predicted preprocessing time and parallel efficiency, "
                    "training time for --steps (or the steps that fit --hours), core-hours, "
                    "with --price-per-hour the money, and with a run's held-out curve (--from "
                    "RUN) the bits per sample it would reach. The model and its measured error "
                    "are in docs/plan.md and docs/performance.md; its assumptions are printed "
                    "with the figures.",
    )
    pl.add_argument("sources", nargs="+", metavar="SRC",
                    help="song files, folders (searched recursively) or URLs such as "
                         "s3://bucket/songs/")
    pl.add_argument("--from", dest="earlier", action="append", default=[],
                    metavar="RUN|PLAN.json",
                    help="take the figures of a run folder (its step time, held-out "
                         "measurements, checkpoints and held-out curve) or of an earlier "
                         "`rainforest plan --json` output instead of calibrating (repeatable)")
    pl.add_argument("--config", metavar="NAME|FILE.json",
                    help="model config to calibrate training on (default: a --from run's model, "
                         "else 'default')")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.add_argument("--png", metavar="PATH", help="plot predicted time against workers here")
    add_config_options(pl, PlanConfig, title="plan")
    add_config_options(pl, TrainConfig, title="training, as `rainforest train` would run it")
    add_config_options(pl, AudioConfig, title="audio")
    pl.set_defaults(handler=cmd_plan)


def cmd_hosts(args: argparse.Namespace) -> int:
    import os

    from rainforest import hosts

    if args.where == "keepalive":
        print(hosts.KEEPALIVE_DIR)
        return 0
    if args.where == "slurm":
        found = hosts.slurm_hosts(os.environ, discover=args.discover)
        slots = args.slots or hosts.tasks_per_node(os.environ)
        if args.discover:  # elastic: horovodrun reaches the other nodes by ssh
            hosts.check_ssh_keepalive(found, os.environ)
    else:
        from rainforest.ec2 import run_addresses

        found = run_addresses(args.run, public=args.public, region=args.region,
                              tag_key=args.tag_key)
        slots = args.slots or 1
    form = "hostfile" if args.hostfile else ("lines" if args.discover else "horovod")
    if found:
        print(hosts.render(found, slots, form))
    return 0


def _add_hosts(commands) -> None:
    from rainforest.ec2 import RUN_TAG
    from rainforest.hosts import EXCLUDE_VARIABLE

    ho = commands.add_parser(
        "hosts", help="print a Slurm job's nodes or a run's EC2 VMs as a host list",
        description="Print hosts with their slots (ranks) for `horovodrun -H` (host:N,...), "
                    "as an OpenMPI hostfile (--hostfile), or one per line for "
                    "`horovodrun --host-discovery-script` (--discover). The launch/*-hosts.sh "
                    "and launch/slurm-discover.sh recipes call this.")
    where = ho.add_subparsers(dest="where", required=True, metavar="slurm|ec2|keepalive")
    slurm = where.add_parser(
        "slurm", help="inside a Slurm job: its nodes",
        description="The nodes of the Slurm job this runs in (scontrol show hostnames), with "
                    "SLURM_NTASKS_PER_NODE slots each.")
    slurm.add_argument("--discover", action="store_true",
                       help="elastic discovery: the nodes the job holds now (scontrol show job), "
                            "without those Slurm drains and those named one per line in the "
                            f"file ${EXCLUDE_VARIABLE}; one host:slots per line. Refuses other "
                            "nodes that the ssh on PATH would wait on forever (no keepalives)")
    ec2 = where.add_parser(
        "ec2", help="the running VMs tagged with a run",
        description=f"The running EC2 VMs whose tag {RUN_TAG} (--cluster ec2 sets it; tag your "
                    "own training VMs the same way) is RUN. Needs AWS credentials; "
                    "AWS_ENDPOINT_URL is honoured.")
    ec2.add_argument("run", metavar="RUN", help="the run tag's value")
    ec2.add_argument("--public", action="store_true",
                     help="public addresses (default: private, inside the VPC)")
    ec2.add_argument("--region", help="AWS region (default: the configured one)")
    ec2.add_argument("--tag-key", default=RUN_TAG, help="the tag to match (default: %(default)s)")
    for sub in (slurm, ec2):
        sub.add_argument("--slots", type=int, default=0, metavar="N",
                         help="ranks per host (default: Slurm's tasks per node; 1 on EC2)")
        sub.add_argument("--hostfile", action="store_true",
                         help="an OpenMPI hostfile, one 'host slots=N' per line")
        sub.set_defaults(handler=cmd_hosts)
    ec2.set_defaults(discover=False)
    keepalive = where.add_parser(
        "keepalive", help="the folder of rainforest's ssh with keepalives",
        description="Print the folder holding an `ssh` that adds ServerAliveInterval=5 and "
                    "ServerAliveCountMax=3. Put it first on horovodrun's PATH so that a node "
                    "that loses power ends its ssh session within 15 s; the launch/ scripts and "
                    "slurm/train.sbatch do.")
    keepalive.set_defaults(handler=cmd_hosts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rainforest",
        description="WaveNet song generation on a cluster: fetch songs politely, preprocess "
                    "them with Dask into mu-law shards, train with Horovod, generate audio, and "
                    "report on it all in one page.",
        epilog="Run `rainforest COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"rainforest {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_fetch, _add_plan, _add_preprocess, _add_train, _add_generate, _add_report,
                _add_inspect, _add_hosts, _add_demo):
        add(commands)
    return parser


def _add_preprocess(commands) -> None:
    from rainforest.config import AudioConfig
    from rainforest.labels import LABEL_HELP, NO_LABELS
    from rainforest.preprocess import SONGS_PER_SHARD

    pre = commands.add_parser(
        "preprocess", help="decode songs into a versioned dataset of mu-law shards",
        description="Decode songs (mp3, ogg, opus, flac, wav), mix to mono, resample, mu-law "
                    "encode and trim silence, spread over a Dask cluster, into shards plus a "
                    "manifest. Re-running over the same --out resumes: songs already done "
                    "(recognised by size and sha256) are skipped. Songs that cannot be used "
                    "are listed with their reason in the manifest; the run goes on "
                    "(exit status 3 if any failed).",
    )
    pre.add_argument("sources", nargs="+", metavar="SRC",
                     help="song files, folders (searched recursively) or URLs such as "
                          "s3://bucket/songs/")
    pre.add_argument("--out", required=True, metavar="DATASET",
                     help="dataset folder or s3:// prefix to write (or resume)")
    pre.add_argument("--songs-per-shard", type=int, default=SONGS_PER_SHARD,
                     help="songs per shard, the unit of work (default: %(default)s)")
    pre.add_argument("--labels", default=NO_LABELS, metavar="none|parent|fetch[:COL]|FILE.csv:COL",
                     help=LABEL_HELP + " (default: %(default)s)")
    pre.add_argument("--no-progress", action="store_true", help="no progress bars")
    pre.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_config_options(pre, AudioConfig, title="audio")
    add_cluster_options(pre)
    pre.set_defaults(handler=cmd_preprocess)


def _add_train(commands) -> None:
    from rainforest.model_config import PRESETS
    from rainforest.runlog import CURVES_NAME, METRICS_NAME, TENSORBOARD_DIR
    from rainforest.train import TrainConfig
    from rainforest.training_samples import SAMPLES_DIR

    tr = commands.add_parser(
        "train", help="train a WaveNet on a dataset (one process, horovodrun, mpirun or srun)",
        description="Train a WaveNet with Horovod ring allreduce. Run it as it is for one "
                    "process, or under `horovodrun -np 2 -H localhost:2 --gloo`, "
                    "`horovodrun --mpi`, `mpirun -np N` or Slurm's `srun`: every rank reads "
                    "its own share of the songs. Rank 0 shows progress, measures held-out bits "
                    "per sample, and writes checkpoints, TensorBoard scalars "
                    f"(RUN/{TENSORBOARD_DIR}), RUN/{METRICS_NAME} and RUN/{CURVES_NAME}; "
                    f"with --sample-every, audio samples in RUN/{SAMPLES_DIR} and TensorBoard. "
                    "SIGTERM or Ctrl-C writes a checkpoint and exits cleanly; --resume "
                    "continues exactly.",
    )
    tr.add_argument("dataset", metavar="DATASET",
                    help="dataset folder or s3:// prefix written by `rainforest preprocess`")
    tr.add_argument("--run", required=True, metavar="RUN",
                    help="run folder for checkpoints and logs (local, shared filesystem or "
                         "s3:// prefix)")
    tr.add_argument("--config", metavar="NAME|FILE.json",
                    help=f"model config: a preset ({', '.join(PRESETS)}) or a JSON file with "
                         "ModelConfig fields (default: the 'default' preset)")
    tr.add_argument("--condition", action="store_true",
                    help="condition on the songs' labels (preprocess with --labels)")
    tr.add_argument("--resume", action="store_true",
                    help="continue RUN from its latest checkpoint with its saved settings; "
                         "--steps may raise the total and the --sample-* settings may change, "
                         "other settings given are ignored with a warning")
    tr.add_argument("--resume-if-any", action="store_true",
                    help="resume if RUN has a checkpoint, else start a new run (for batch "
                         "scripts that may be requeued)")
    tr.add_argument("--time-limit", type=float, metavar="MINUTES",
                    help="stop cleanly with a checkpoint after this much wall time "
                         "(e.g. inside a Slurm time limit); --resume continues")
    tr.add_argument("--elastic", action="store_true",
                    help="survive lost ranks and take in new ones (horovodrun --gloo with "
                         "--min-np and --host-discovery-script; see launch/elastic-local.sh); "
                         "state is committed every --commit-every steps, and a rank that "
                         "joins resumes RUN")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_options(tr, TrainConfig, title="training")
    tr.set_defaults(handler=cmd_train)


def _add_generate(commands) -> None:
    from rainforest.generate import GENERATION_NAME, GenerationConfig

    gen = commands.add_parser(
        "generate", help="generate songs from a trained run",
        description="Generate audio from the newest checkpoint of RUN with the fused Numba "
                    "loop (no TensorFlow needed). Writes one 16-bit wav and one spectrogram "
                    f"PNG per stream into --out, plus {GENERATION_NAME} with the settings. "
                    "Ctrl-C (or SIGTERM) stops early and keeps what was generated so far.",
    )
    gen.add_argument("run", metavar="RUN",
                     help="run folder or s3:// prefix (or one checkpoint folder)")
    gen.add_argument("--out", required=True, help="output folder")
    gen.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_options(gen, GenerationConfig, title="generation")
    gen.set_defaults(handler=cmd_generate)


def _add_inspect(commands) -> None:
    ins = commands.add_parser("inspect", help="summarise a dataset",
                              description="Songs, hours, sample rate, shards and their sizes, "
                                          "and the songs that failed with their reasons.")
    ins.add_argument("dataset", metavar="DATASET", help="dataset folder or s3:// prefix")
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    ins.set_defaults(handler=cmd_inspect)


def _add_demo(commands) -> None:
    from rainforest.config import AudioConfig
    from rainforest.samples import DEFAULT_PACKAGE

    demo = commands.add_parser(
        "demo", help="run the pipeline end to end on real songs",
        description="Fetch real songs by Debian package name into the cache (or use --songs), "
                    "preprocess them on a local Dask cluster, and train a WaveNet on them "
                    "with 2 Horovod ranks (horovodrun, Gloo, localhost), then generate 2 songs "
                    "from it. Re-running resumes.",
    )
    demo.add_argument("--songs", nargs="+", metavar="SRC",
                      help="your own songs (files, folders, URLs) instead of the Debian package")
    demo.add_argument("--package", default=DEFAULT_PACKAGE,
                      help="Debian package with real music (default: %(default)s)")
    demo.add_argument("--out", default="demo-data", help="working folder (default: %(default)s)")
    demo.add_argument("--train-steps", type=int, default=200,
                      help="training steps after preprocessing (0: preprocess only; default: "
                           "%(default)s)")
    demo.add_argument("--ranks", type=int, default=2,
                      help="Horovod ranks for training, started by horovodrun over Gloo on "
                           "localhost (1: a single process; default: %(default)s)")
    demo.add_argument("--train-config", default="default",
                      help="model config preset or JSON file for the demo training "
                           "(default: %(default)s)")
    demo.add_argument("--generate-seconds", type=float, default=4.0,
                      help="seconds of audio to generate per stream after training (0: none; "
                           "default: %(default)s)")
    add_config_options(demo, AudioConfig, title="audio")
    add_cluster_options(demo)
    demo.set_defaults(handler=cmd_demo)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except RainforestError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


def run_stage(name: str) -> None:
    """``python -m rainforest.NAME ARGS`` runs ``rainforest NAME ARGS``."""
    sys.exit(main([name, *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
