"""The checkpoint format of a training run: its names, ``config.json``, writer and readers.

Layout of a run folder (local)::

    RUN/checkpoints/step-000001000/model.weights.h5   Keras weights (HDF5: arrays only)
    RUN/checkpoints/step-000001000/optimizer.h5       optimizer variables (HDF5: arrays only)
    RUN/checkpoints/step-000001000/config.json        configs, step, data position, sha256s
    RUN/checkpoints/latest                            name of the newest checkpoint (last)
    RUN/tensorboard/, RUN/metrics.jsonl, RUN/curves.png

A checkpoint is assembled in a hidden staging folder and renamed into place, then ``latest``
is replaced atomically, so a reader never sees half a checkpoint. A run folder may also be an
``s3://`` prefix: there the checkpoint is uploaded under a temporary prefix and copied to its
final one with ``config.json`` last (``storage.Staged``), a checkpoint counts only once its
``config.json`` is there, and ``latest`` is written after it. Nothing is pickled: a
checkpoint from a stranger cannot run code. Reading the config needs no TensorFlow.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np

from rainforest import storage
from rainforest.config import AudioConfig, Config
from rainforest.documents import (
    NATURAL,
    OBJECT,
    SHA256,
    check_fields,
    is_plain_name,
    read_document,
)
from rainforest.errors import CheckpointError
from rainforest.model_config import ModelConfig, weight_layout

FORMAT = "rainforest-checkpoint"
VERSION = 1
CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.weights.h5"
OPTIMIZER_NAME = "optimizer.h5"


def step_name(step: int) -> str:
    return f"step-{step:09d}"


def checkpoint_root(run: str) -> str:
    return storage.join(run, CHECKPOINT_DIR)


def _finished(folder: str) -> bool:
    """A checkpoint is there once its config.json is: it is written (or copied) last."""
    return storage.exists(storage.join(folder, CONFIG_NAME))


def list_checkpoints(run: str) -> list[str]:
    """Finished checkpoint folders of a run, oldest first."""
    root = checkpoint_root(run)
    return [storage.join(root, name) for name in storage.list_names(root)
            if name.startswith("step-") and _finished(storage.join(root, name))]


def remove_leftovers(run: str) -> list[str]:
    """Delete what a killed writer left in the run: staging files, folders or prefixes (of
    checkpoints, and of the logs beside them), and on an object store the step prefixes
    whose copy never reached config.json. Returns the checkpoint names removed. (A local step
    folder is renamed into place whole, so one without config.json is damage, which is
    reported when read, not deleted.)"""
    storage.remove_stale_staging(run)  # e.g. a log upload cut off by the kill
    root = checkpoint_root(run)
    names = [name for name in storage.list_names(root)
             if (name.startswith(".") and storage.TEMP_MARKER in name)
             or (storage.is_remote(root) and name.startswith("step-")
                 and not _finished(storage.join(root, name)))]
    for name in names:
        storage.remove_tree(storage.join(root, name))
    return names


def latest(run: str) -> str:
    """The folder of the newest checkpoint of ``run`` (a run folder or a checkpoint folder)."""
    if storage.exists(storage.join(run, CONFIG_NAME)):
        return run
    pointer = storage.join(checkpoint_root(run), LATEST)
    if not storage.exists(pointer):
        if not storage.exists(run):
            raise CheckpointError(f"run folder {run} does not exist")
        finished = list_checkpoints(run)
        if finished:  # the writer was stopped after publishing its first one, before the pointer
            return max(finished)  # step names sort by step
        raise CheckpointError(
            f"{run} has no checkpoint yet ({pointer} is missing); train with "
            f"`rainforest train DATASET --run {run}` first"
        )
    name = storage.read_bytes(pointer).decode("utf-8", "replace").strip()
    folder = storage.join(checkpoint_root(run), name)
    if not (name.startswith("step-") and is_plain_name(name)) or not storage.exists(folder):
        raise CheckpointError(f"{pointer} names {name!r}, which is not a checkpoint of {run}")
    return folder


@contextlib.contextmanager
def local_copy(folder: str) -> Iterator[str]:
    """A local folder with the checkpoint's files: ``folder`` itself, or a temporary download
    of an ``s3://`` checkpoint (removed afterwards), for readers that need local files."""
    if not storage.is_remote(folder):
        yield folder
        return
    directory = tempfile.mkdtemp(prefix="rainforest-checkpoint-")
    try:
        storage.download_folder(folder, directory)
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def read_config(folder: str) -> dict[str, Any]:
    """A checkpoint's ``config.json``, checked for format and version, with its ``files``:
    plain names in the folder, each with a sha256, the weights among them."""
    url = storage.join(folder, CONFIG_NAME)
    document = read_document(
        url, kind=FORMAT, version=VERSION, error=CheckpointError,
        advice="upgrade rainforest, or train into a new --run",
        missing=f"{folder} has no {CONFIG_NAME}: not a rainforest checkpoint")
    advice = "resume from an older checkpoint by pointing `latest` at it, or start a new --run"
    check_fields(document, {"step": NATURAL, "files": OBJECT, "model": OBJECT, "audio": OBJECT,
                            "train": OBJECT, "data": OBJECT}, where=url, what="it",
                 error=CheckpointError, advice=advice,
                 optional=("model", "audio", "train", "data"))
    files = document["files"]
    wrong = [name for name, digest in files.items()
             if not is_plain_name(name) or not SHA256.test(digest)]
    if wrong or WEIGHTS_NAME not in files:
        raise CheckpointError(
            f"{url} lists {sorted(wrong)[:3] or 'no ' + WEIGHTS_NAME} among its files, each of "
            f"which must be a file of the checkpoint with its sha256, the weights included: "
            f"the file is damaged or was not written by rainforest; {advice}")
    return document


def verify(folder: str, config: dict[str, Any]) -> None:
    """Check every file of a checkpoint against the sha256 recorded in its config."""
    for name, digest in config["files"].items():
        path = storage.join(folder, name)
        if not storage.exists(path):
            raise CheckpointError(f"checkpoint {folder} lacks {name}; it is damaged")
        if storage.sha256_of(path) != digest:
            raise CheckpointError(
                f"{path} does not match the sha256 in {CONFIG_NAME}: the checkpoint is damaged. "
                "Resume from an older one by pointing `latest` at it, or start a new --run"
            )


def write(run: str, step: int, config: dict[str, Any], save_files, *, keep: int) -> str:
    """Write checkpoint ``step`` atomically and keep the newest ``keep`` checkpoints.

    ``save_files(folder)`` writes the array files into ``folder``; their sha256s are recorded
    in ``config.json`` under ``files``.
    """
    root = checkpoint_root(run)
    storage.remove_stale_staging(root)  # what a killed write left; only rank 0 writes here
    final = storage.join(root, step_name(step))
    with storage.Staged(final, folder=True, marker=CONFIG_NAME) as staging:
        save_files(staging)
        files = {name: storage.sha256_of(os.path.join(staging, name))
                 for name in sorted(os.listdir(staging))}
        document = {"format": FORMAT, "version": VERSION, "step": step, **config,
                    "files": files}
        with open(os.path.join(staging, CONFIG_NAME), "wb") as handle:
            handle.write(storage.dumps_json(document))
    storage.write_bytes_atomic(storage.join(root, LATEST), step_name(step).encode() + b"\n")
    for old in list_checkpoints(run)[:-keep]:
        storage.discard(old, marker=CONFIG_NAME)
    return final


def save_arrays(path: str, arrays: list[tuple[str, np.ndarray]]) -> None:
    """Named numeric arrays, in order, into an HDF5 file (no objects, nothing pickled)."""
    import h5py

    with h5py.File(path, "w") as handle:
        for index, (name, array) in enumerate(arrays):
            dataset = handle.create_dataset(f"{index:05d}", data=np.asarray(array))
            dataset.attrs["name"] = name


def load_arrays(path: str) -> list[tuple[str, np.ndarray]]:
    """The arrays :func:`save_arrays` wrote, refusing anything that is not plain numbers."""
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            out = []
            for key in sorted(handle):
                dataset = handle[key]
                if dataset.dtype.kind not in "biuf":
                    raise CheckpointError(f"{path} holds non-numeric data ({dataset.dtype})")
                out.append((str(dataset.attrs["name"]), dataset[()]))
            return out
    except OSError as error:
        raise CheckpointError(f"{path} is not a readable HDF5 file ({error})") from None


def _keras_variable_groups(handle) -> dict[str, Any]:
    """Map ``""`` (the model) and ``"block00"``... to the h5 groups of their variables."""
    groups: dict[str, Any] = {}

    def visit(path, obj):
        if path.endswith("vars") and hasattr(obj, "keys"):
            key = "" if path == "vars" else str(obj.attrs.get("name", path))
            groups[key] = obj

    handle.visititems(visit)
    return groups


def read_weights(path: str, config: ModelConfig) -> dict[str, np.ndarray]:
    """Every weight of ``config``'s network from a Keras ``model.weights.h5``, as float32.

    Keys are ``"input_bias"``, ``"block03/gate_kernel"`` and so on. Keras stores each layer's
    variables by creation order only; :func:`~rainforest.model_config.weight_layout` names
    them, so reading needs no TensorFlow.
    """
    import h5py

    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise CheckpointError(f"{path} is not a readable HDF5 file ({error})") from None
    with handle:
        groups = _keras_variable_groups(handle)
        weights = {}
        for owner, entries in weight_layout(config).items():
            if owner not in groups:
                raise CheckpointError(
                    f"{path} has no weights for {owner or 'the model'}: it does not belong to "
                    f"the model config saved next to it")
            group = groups[owner]
            if len(group) != len(entries):
                raise CheckpointError(
                    f"{path}: {owner or 'the model'} has {len(group)} variables, the config "
                    f"implies {len(entries)}")
            for index, (name, shape) in enumerate(entries):
                data = group[str(index)]
                if data.dtype.kind != "f" or tuple(data.shape) != shape:
                    raise CheckpointError(
                        f"{path}: {owner}/{name} is {data.dtype}{tuple(data.shape)}, the "
                        f"checkpoint's config implies float{shape}")
                weights[f"{owner}/{name}" if owner else name] = np.asarray(data, np.float32)
    return weights


def weights_in_order(arrays, config: ModelConfig) -> dict[str, np.ndarray]:
    """Named weights, as :func:`read_weights` names them, from arrays in the Keras model's own
    order (``model.weights``, which :func:`~rainforest.model_config.weight_layout` follows):
    how a training rank's copy of its weights reaches the fused loop without a Keras file."""
    entries = [(f"{owner}/{name}" if owner else name, shape)
               for owner, items in weight_layout(config).items() for name, shape in items]
    if len(arrays) != len(entries):
        raise CheckpointError(f"{len(arrays)} weight arrays given, the config implies "
                              f"{len(entries)}")
    for (key, shape), array in zip(entries, arrays, strict=True):
        if tuple(array.shape) != shape:
            raise CheckpointError(f"weight {key} is {tuple(array.shape)}, the config implies "
                                  f"{shape}")
    return {key: np.asarray(array, np.float32) for (key, _), array in zip(entries, arrays,
                                                                             strict=True)}


def config_document(*, model: ModelConfig, audio: AudioConfig, train: Config, next_step: int,
                    learning_rate: float, data: dict[str, Any],
                    metrics: dict[str, float]) -> dict[str, Any]:
    """What a checkpoint's ``config.json`` holds besides its header and ``files``: every
    config of the run, the optimizer, the data position (``data["next_step"]``) and the
    last metrics. :func:`write` adds the header and the files' sha256s."""
    return {"model": model.to_dict(), "audio": audio.to_dict(), "train": train.to_dict(),
            "optimizer": {"name": "adam", "file": OPTIMIZER_NAME, "learning_rate": learning_rate},
            "data": {**data, "next_step": next_step}, "metrics": dict(metrics)}


def saved_shape(folder: str, document: dict[str, Any]) -> tuple[ModelConfig, AudioConfig]:
    """The model and audio configs a checkpoint's ``config.json`` records."""
    try:
        return (ModelConfig.from_dict(document["model"]),
                AudioConfig.from_dict(document["audio"]))
    except (KeyError, TypeError, ValueError) as error:  # ParameterError is a ValueError
        raise CheckpointError(f"{folder}/{CONFIG_NAME} has no usable model/audio config: "
                              f"{error}") from None
