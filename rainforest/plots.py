"""The one way rainforest draws a figure: off-screen, saved as a PNG under a staging name."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rainforest import storage


@contextlib.contextmanager
def png_figure(path: str, *, size: tuple[float, float], dpi: int = 100,
               tight: bool = True) -> Iterator[object]:
    """Yield the axes of a new figure; on success it is written to ``path`` atomically.

    Uses matplotlib's Agg backend, so it works on machines without a display.

    Examples
    --------
    >>> with png_figure("/tmp/line.png", size=(3, 2)) as axes:  # doctest: +SKIP
    ...     axes.plot([0, 1], [1, 0])
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=size, dpi=dpi)
    try:
        yield axes
        if tight:
            figure.tight_layout()
        with storage.Staged(path) as staging:
            figure.savefig(staging, format="png")
    finally:
        plt.close(figure)


def spectrogram_png(samples, rate: int, path: str) -> None:
    """A spectrogram of mono ``samples`` at ``rate`` Hz, titled with the file's stem."""
    import os

    with png_figure(path, size=(8, 3.5)) as axis:
        axis.specgram(samples, NFFT=512, Fs=rate, noverlap=384, cmap="magma")
        axis.set_xlabel("time (s)")
        axis.set_ylabel("frequency (Hz)")
        axis.set_title(os.path.splitext(os.path.basename(path))[0])
