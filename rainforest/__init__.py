"""rainforest: an HPC toolkit for WaveNet song generation.

The stages are at the package's top, for notebooks and scripts as much as for the command
line (``rainforest --help``): :func:`fetch`, :func:`preprocess`, :func:`train`,
:func:`generate` and :func:`report`, and :func:`plan` (time and money before a run), with
their configs (:class:`AudioConfig`, :class:`ModelConfig`, :class:`TrainConfig`,
:class:`GenerationConfig`, :class:`FetchConfig`, :class:`PlanConfig`).
They load on first use, so ``import rainforest`` imports neither TensorFlow nor Dask.

Each stage's name is its module, and the module is callable as the stage:
``rainforest.train(...)`` runs ``rainforest.train.train(...)``. So a stage and its module never
shadow each other: ``import rainforest.train as m`` gives the module, ``mock.patch(
"rainforest.train.X")`` patches the module, and ``python -m rainforest.train`` runs it.
The README's "Python API" section has a worked example, and docs/layout.md is the map of
every module.
"""

from __future__ import annotations

import importlib
import inspect
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

#: The stages: each a module of that name, callable as its function of that name.
STAGES = ("fetch", "preprocess", "train", "generate", "report", "plan")
# The public name -> the module that defines it. Imported when first asked for (PEP 562).
_LAZY = {
    "FetchConfig": "rainforest.fetch",
    "AudioConfig": "rainforest.config",
    "TrainConfig": "rainforest.train",
    "ModelConfig": "rainforest.model_config",
    "GenerationConfig": "rainforest.generate",
    "PlanConfig": "rainforest.plan",
}

__all__ = [
    "AudioDecodeError",
    "DatasetFormatError",
    "ParameterError",
    "RainforestError",
    "__version__",
    *STAGES,
    *_LAZY,
]


class Stage(types.ModuleType):
    """A stage's module, callable as the stage: ``module(...)`` is ``module.<stage>(...)``.

    Its signature is the stage function's, so ``help`` and ``inspect.signature`` show it.
    """

    @property
    def function(self):
        """The stage function: the module's attribute of the module's own name."""
        return getattr(self, self.__name__.rsplit(".", 1)[1])

    @property
    def __signature__(self):
        return inspect.signature(self.function)

    def __call__(self, *args, **kwargs):
        return self.function(*args, **kwargs)


def _as_stage(module: types.ModuleType) -> types.ModuleType:
    module.__class__ = Stage
    return module


class _Package(types.ModuleType):
    """The package's module type: importing a stage's module (``import rainforest.train``)
    binds it here as a callable :class:`Stage`."""

    def __setattr__(self, name: str, value) -> None:
        if name in STAGES and isinstance(value, types.ModuleType):
            value = _as_stage(value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name in STAGES:
        return importlib.import_module(f"{__name__}.{name}")  # binds it, through _Package
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'rainforest' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(STAGES) | set(_LAZY))
