"""The WaveNet's shape: its config, presets and arithmetic, without TensorFlow.

van den Oord et al., "WaveNet: A Generative Model for Raw Audio" (2016), sections 2.1-2.5.
This module imports no TensorFlow, so generation machines without TensorFlow can read a
checkpoint's config; the Keras network built from it is in ``rainforest.network``. Neither
knows anything about distribution; ``rainforest.train`` adds Horovod.

Shapes: ``codes`` are ``(batch, length)`` integer mu-law codes. The network is "valid"
(no padding): every layer shortens the sequence by its dilation, so an input of
``receptive_field(config) - 1 + T`` codes yields ``T`` logit vectors; the one at position
``i`` sees inputs ``i .. i + receptive_field - 1`` and predicts the code that follows them.

Every weight is an explicit, named array so that ``rainforest.generate`` can read it:

- input: a kernel-2 causal convolution over one-hot codes, stored as two embedding tables
  (``input_previous``, ``input_current``) and a bias: a convolution over one-hot inputs is
  a table lookup, so it costs no multiply-adds.
- block ``k`` with dilation ``d``: ``gate_kernel`` (2, residual, 2*gate) with tap 0 on
  ``x[t-d]`` and tap 1 on ``x[t]``, filter channels first, gate channels second;
  ``gate_bias``; ``condition_kernel`` (condition, 2*gate) when labels exist;
  ``residual_kernel``/``residual_bias`` (absent in the last block, whose residual output
  nothing reads); ``skip_kernel``/``skip_bias``.
- output: ReLU, ``output1`` (skip, skip), ReLU, ``output2`` (skip, classes).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from rainforest.config import Config, documented, setting
from rainforest.errors import ParameterError


@documented
@dataclass(frozen=True)
class ModelConfig(Config):
    """A WaveNet's shape. Saved in every checkpoint; generation needs nothing else.

    Chosen with ``--config`` (a preset of :data:`PRESETS` or a JSON file of these fields), so
    the fields have no flags of their own.

    Examples
    --------
    >>> receptive_field(ModelConfig())
    1024
    >>> receptive_field(PRESETS["medium"])
    2048
    """

    dilations: tuple[int, ...] = setting(
        tuple(2**i for i in range(9)) * 2,
        "the dilation of each residual block, in order; the default, 2 x (1, 2, ..., 256), "
        "gives a receptive field of 1024 codes (64 ms at 16 kHz)", cli=False)
    residual_channels: int = setting(32, "width of the residual stream", cli=False)
    gate_channels: int = setting(32, "width of each half (filter, gate) of the gated unit",
                                 cli=False)
    skip_channels: int = setting(64, "width of the skip sum feeding the output stack",
                                 cli=False)
    classes: int = setting(256, "number of code values; 256 for 8-bit mu-law", cli=False)
    labels: tuple[str, ...] = setting(
        (), "label names for global conditioning (van den Oord et al. 2016, section 2.5) in id "
        "order, empty for an unconditioned model; `rainforest train --condition` fills them "
        "from the dataset manifest", cli=False)
    condition_channels: int = setting(16, "width of the label embedding (ignored without "
                                      "labels)", cli=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dilations", tuple(int(d) for d in self.dilations))
        object.__setattr__(self, "labels", tuple(str(label) for label in self.labels))
        if not self.dilations or any(d < 1 for d in self.dilations):
            raise ParameterError(f"dilations must be positive integers, got {self.dilations}")
        for name in ("residual_channels", "gate_channels", "skip_channels",
                     "condition_channels"):
            if getattr(self, name) < 1:
                raise ParameterError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.classes < 2:
            raise ParameterError(f"classes must be >= 2, got {self.classes}")
        if len(set(self.labels)) != len(self.labels):
            raise ParameterError(f"labels must be distinct, got {self.labels}")

    @property
    def conditioned(self) -> bool:
        return bool(self.labels)


def _stacks(top: int, repeats: int) -> tuple[int, ...]:
    return tuple(2**i for i in range(int(math.log2(top)) + 1)) * repeats


PRESETS: dict[str, ModelConfig] = {
    # For tests and smoke runs: trains in seconds on a laptop core.
    "tiny": ModelConfig(dilations=_stacks(8, 2), residual_channels=16, gate_channels=16,
                        skip_channels=32),
    "default": ModelConfig(),
    # The config the training and generation benchmarks measure.
    "medium": ModelConfig(dilations=_stacks(512, 2), residual_channels=64, gate_channels=64,
                          skip_channels=128),
}


def load_model_config(spec: str) -> ModelConfig:
    """A preset name (``tiny``, ``default``, ``medium``) or a path to a JSON file."""
    if spec in PRESETS:
        return PRESETS[spec]
    if not spec.endswith(".json"):
        raise ParameterError(
            f"--config {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a .json file"
        )
    try:
        with open(spec, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise ParameterError(f"model config file {spec} does not exist") from None
    except ValueError as error:
        raise ParameterError(f"model config file {spec} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ParameterError(f"model config file {spec} must hold a JSON object")
    return ModelConfig.from_dict(data)


def receptive_field(config: ModelConfig) -> int:
    """How many input codes determine one output: 2 (the input convolution) + sum of dilations.

    ``config`` is anything with ``dilations``: a :class:`ModelConfig`, or the fused loop's
    network read from a checkpoint.
    """
    return 2 + int(sum(config.dilations))


def multiply_adds_per_sample(config: ModelConfig) -> int:
    """Multiply-accumulates of the forward pass per output sample (the input lookup is free)."""
    r, g, s, c = (config.residual_channels, config.gate_channels, config.skip_channels,
                  config.classes)
    per_block = 2 * r * 2 * g + g * s + g * r
    last_block_has_no_residual = g * r
    return len(config.dilations) * per_block - last_block_has_no_residual + s * s + s * c


def weight_layout(config: ModelConfig) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """The network's weights as Keras creates them: for the model (key ``""``) and for each
    block (``"block00"``, ...), the ordered ``(name, shape)`` list of its variables.

    ``rainforest.network`` creates the Keras weights from this list (with
    :func:`initializer_of`), and Keras' ``model.weights.h5`` stores each layer's variables by
    creation order only, so this is also what lets ``rainforest.generate`` read a checkpoint
    without TensorFlow.
    ``tests/test_generate.py`` checks it against the Keras model itself.
    """
    r, g, s, c = (config.residual_channels, config.gate_channels, config.skip_channels,
                  config.classes)
    top = [("input_previous", (c, r)), ("input_current", (c, r)), ("input_bias", (r,))]
    if config.conditioned:
        top.append(("label_embedding", (len(config.labels), config.condition_channels)))
    top += [("output1_kernel", (s, s)), ("output1_bias", (s,)),
            ("output2_kernel", (s, c)), ("output2_bias", (c,))]
    layout = {"": top}
    last = len(config.dilations) - 1
    for k in range(len(config.dilations)):
        block = [("gate_kernel", (2, r, 2 * g)), ("gate_bias", (2 * g,))]
        if config.conditioned:
            block.append(("condition_kernel", (config.condition_channels, 2 * g)))
        if k != last:
            block += [("residual_kernel", (g, r)), ("residual_bias", (r,))]
        block += [("skip_kernel", (g, s)), ("skip_bias", (s,))]
        layout[block_name(k)] = block
    return layout


def initializer_of(name: str) -> str:
    """The Keras initializer each weight starts from, by its name in :func:`weight_layout`."""
    if name.endswith("_bias"):
        return "zeros"
    if name == "label_embedding":
        return "random_normal"
    return "glorot_uniform"


def block_name(index: int) -> str:
    return f"block{index:02d}"

