"""rainforest: an HPC toolkit for WaveNet song generation.

Stages, one module each: ``fetch`` (songs from URLs, CSVs or S3), ``audio`` (a song to
codes), ``preprocess`` (songs to a dataset), ``dataset`` (the dataset format and training
input), ``train``, ``generate`` and ``report`` (one page of what happened). The model is
``model_config`` (its shape, without TensorFlow) and ``network`` (the Keras network). Shared
pieces: ``config``, ``storage``, ``documents``, ``plots``, ``runlog``, ``checkpoint``,
``labels``, ``cluster``, ``samples``, ``errors`` and ``cli``; the Numba kernels are
``rainforest.kernels``.
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
