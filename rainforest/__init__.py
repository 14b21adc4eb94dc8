"""rainforest: an HPC toolkit for WaveNet song generation.

Stages, one module each: ``fetch``, ``audio``, ``preprocess``, ``dataset``, ``model``,
``train``, ``generate``, ``report``. Shared pieces: ``config``, ``storage``, ``cluster``,
``errors``, ``labels``, ``cli``.
"""

from rainforest.errors import (
    AudioDecodeError,
    DatasetFormatError,
    ParameterError,
    RainforestError,
)

__version__ = "0.1.0"

__all__ = [
    "AudioDecodeError",
    "DatasetFormatError",
    "ParameterError",
    "RainforestError",
    "__version__",
]
