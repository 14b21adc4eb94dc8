"""rainforest: an HPC toolkit for WaveNet song generation.

The stages are functions at the package's top, for notebooks and scripts as much as for the
command line (``rainforest --help``): :func:`fetch`, :func:`preprocess`, :func:`train`,
:func:`generate` and :func:`report`, and :func:`plan` (time and money before a run), with
their configs (:class:`AudioConfig`, :class:`ModelConfig`, :class:`TrainConfig`,
:class:`GenerationConfig`, :class:`FetchConfig`, :class:`PlanConfig`).
They load on first use, so ``import rainforest`` imports neither TensorFlow nor Dask.
The README's "Python API" section has a worked example, and docs/layout.md is the map of
every module.
"""

from __future__ import annotations

import importlib
import sys
import types
from importlib.metadata import PackageNotFoundError, version

from rainforest.errors import (
    AudioDecodeError,
    DatasetFormatError,
    ParameterError,
    RainforestError,
)

try:
    __version__ = version("rainforest")
except PackageNotFoundError:  # a source tree on sys.path without an install
    __version__ = "0+unknown"

# The public name -> the module that defines it. Imported when first asked for (PEP 562).
_LAZY = {
    "fetch": "rainforest.fetch",
    "FetchConfig": "rainforest.fetch",
    "preprocess": "rainforest.preprocess",
    "AudioConfig": "rainforest.config",
    "train": "rainforest.train",
    "TrainConfig": "rainforest.train",
    "ModelConfig": "rainforest.model_config",
    "generate": "rainforest.generate",
    "GenerationConfig": "rainforest.generate",
    "report": "rainforest.report",
    "plan": "rainforest.plan",
    "PlanConfig": "rainforest.plan",
}

__all__ = [
    "AudioDecodeError",
    "DatasetFormatError",
    "ParameterError",
    "RainforestError",
    "__version__",
    *_LAZY,
]


class _Package(types.ModuleType):
    """The package's module type: a stage's function keeps the name its module also has.

    Importing ``rainforest.train`` binds the module on the package as ``train``; that binding
    is dropped, so ``rainforest.train`` stays the function. Code that wants the module imports
    from it (``from rainforest.train import Trainer``) or takes it from ``sys.modules``.
    """

    def __setattr__(self, name: str, value) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'rainforest' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
