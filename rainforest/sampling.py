"""Training input: which songs are held out, each rank's share, and the windows cut from them.

Nothing here depends on how a dataset is stored (that is :mod:`rainforest.dataset`): the
windows are a pure function of the songs, the seed, the rank and the step, so a resumed run
reads exactly what an uninterrupted one would.
"""

from __future__ import annotations

import hashlib

import numpy as np

from rainforest.dataset import Dataset, Song
from rainforest.errors import ParameterError
from rainforest.kernels import cut_windows, random_window_starts, strided_window_starts


def split_songs(songs: list[Song], *, validation_fraction: float) -> tuple[list[Song], list[Song]]:
    """Split songs into (training, validation) by a hash of the song id.

    The split depends only on the ids (content hashes) and the fraction, so it is the same on
    every run, every rank and every machine, and adding songs never moves an old song from
    training into validation unless its rank in the hash order changes the cut.

    Examples
    --------
    >>> songs = [Song(str(i), "", "part-00000", 0, 10, None) for i in range(10)]
    >>> train, held_out = split_songs(songs, validation_fraction=0.2)
    >>> len(train), len(held_out)
    (8, 2)
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise ParameterError(f"validation fraction must be in [0, 1), got {validation_fraction}")
    if validation_fraction == 0.0:
        return list(songs), []
    if len(songs) < 2:
        raise ParameterError(
            f"the dataset has {len(songs)} song(s); a held-out split by song needs at least 2. "
            "Add songs, or pass --val-fraction 0 to train without validation"
        )
    order = sorted(songs, key=lambda s: hashlib.sha256(s.id.encode()).hexdigest())
    held = min(len(songs) - 1, max(1, round(validation_fraction * len(songs))))
    held_ids = {s.id for s in order[:held]}
    return ([s for s in songs if s.id not in held_ids], [s for s in songs if s.id in held_ids])


def rank_share(songs: list[Song], *, rank: int, size: int) -> list[Song]:
    """The songs rank ``rank`` of ``size`` trains on: disjoint shares balanced by length.

    Longest songs first, each to the rank with the fewest samples so far (ties: lowest rank).

    Examples
    --------
    >>> songs = [Song(str(i), "", "p", 0, n, None) for i, n in enumerate([5, 9, 4, 3])]
    >>> [s.length for s in rank_share(songs, rank=0, size=2)], \\
    ...     [s.length for s in rank_share(songs, rank=1, size=2)]
    ([9, 3], [5, 4])
    """
    if not 0 <= rank < size:
        raise ParameterError(f"rank must be in 0..{size - 1}, got {rank}")
    if len(songs) < size:
        raise ParameterError(
            f"{len(songs)} training song(s) cannot give each of {size} ranks its own share; "
            "use fewer ranks or more songs"
        )
    totals = [0] * size
    mine: list[Song] = []
    for song in sorted(songs, key=lambda s: (-s.length, s.id)):
        target = min(range(size), key=lambda r: (totals[r], r))
        totals[target] += song.length
        if target == rank:
            mine.append(song)
    return sorted(mine, key=lambda s: (s.shard, s.offset))


def _derive_seed(*parts: int) -> int:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


class WindowSampler:
    """Random training windows from one rank's songs, a pure function of the step number.

    Step ``s`` lies in epoch ``s // steps_per_epoch``; an epoch is one random stream seeded by
    ``(seed, rank, epoch)``, of which step ``s`` takes the next ``batch_size`` draws. The data
    position is therefore just the step, and a resumed run sees exactly the windows an
    uninterrupted one would. An epoch has as many target samples as the rank's songs have codes.

    Parameters
    ----------
    dataset : Dataset
    songs : list of Song
        This rank's share (see :func:`rank_share`).
    window : int
        Codes per window: receptive field + target length.
    target_length : int
    batch_size : int
        Windows per step on this rank.
    seed, rank : int
    label_ids : dict, optional
        Label name -> id for conditioned models.
    """

    def __init__(self, dataset: Dataset, songs: list[Song], *, window: int, target_length: int,
                 batch_size: int, seed: int, rank: int,
                 label_ids: dict[str, int] | None = None) -> None:
        self.dataset = dataset
        self.songs = [s for s in songs if s.length >= window]
        if not self.songs:
            longest = max((s.length for s in songs), default=0)
            raise ParameterError(
                f"a training window of {window} codes (receptive field + target length) is "
                f"longer than every song of rank {rank} (longest: {longest} codes, "
                f"{longest / dataset.audio.sample_rate:.2f} s); use a shorter --target-length "
                "or a model with a smaller receptive field"
            )
        self.window, self.batch_size, self.seed, self.rank = window, batch_size, seed, rank
        self.lengths = np.array([s.length for s in self.songs], dtype=np.int64)
        self.virtual_offsets = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        total = int(self.lengths.sum())
        self.steps_per_epoch = max(1, total // (batch_size * target_length))
        self.label_ids = label_ids
        self.labels = np.array(
            [label_ids[s.label] if label_ids else 0 for s in self.songs], dtype=np.int32)

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``(batch_size, window)`` uint8 windows and int32 song labels of ``step``."""
        epoch, within = divmod(int(step), self.steps_per_epoch)
        starts = random_window_starts(
            self.virtual_offsets, self.lengths, window=self.window, count=self.batch_size,
            seed=_derive_seed(self.seed, self.rank, epoch), skip=within * self.batch_size)
        which = np.searchsorted(self.virtual_offsets, starts, side="right") - 1
        return self._cut(which, starts - self.virtual_offsets[which]), self.labels[which]

    def _cut(self, which: np.ndarray, local_starts: np.ndarray) -> np.ndarray:
        out = np.empty((which.shape[0], self.window), dtype=np.uint8)
        shards = np.array([self.songs[i].shard for i in which])
        for shard in np.unique(shards):
            rows = np.flatnonzero(shards == shard)
            shard_starts = np.array(
                [self.songs[which[j]].offset + local_starts[j] for j in rows], dtype=np.int64)
            out[rows] = cut_windows(self.dataset.shard_codes(str(shard)), shard_starts,
                                    window=self.window)
        return out

    def tf_dataset(self, first_step: int, last_step: int, *, prefetch: int = 2):
        """A ``tf.data.Dataset`` of the batches of steps ``first_step .. last_step - 1``."""
        import tensorflow as tf

        def load(step):
            windows, labels = tf.numpy_function(self.batch, [step], [tf.uint8, tf.int32],
                                                stateful=False)
            windows.set_shape((self.batch_size, self.window))
            labels.set_shape((self.batch_size,))
            return windows, labels

        steps = tf.data.Dataset.range(first_step, last_step)
        return steps.map(load, num_parallel_calls=1, deterministic=True).prefetch(prefetch)


def validation_windows(dataset: Dataset, songs: list[Song], *, window: int, count: int,
                       rank: int, size: int,
                       label_ids: dict[str, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """This rank's part of a fixed set of held-out windows (the same on every run).

    Non-overlapping windows through every held-out song, thinned evenly to at most ``count``,
    then dealt round-robin to the ranks.
    """
    usable = [s for s in songs if s.length >= window]
    if not usable:
        longest = max((s.length for s in songs), default=0)
        raise ParameterError(
            f"a window of {window} codes is longer than every held-out song (longest: "
            f"{longest}); use a shorter --target-length or pass --val-fraction 0"
        )
    pairs = []
    for index, song in enumerate(usable):
        for start in strided_window_starts([song.offset], [song.length], window=window,
                                           stride=window):
            pairs.append((index, int(start)))
    chosen = np.linspace(0, len(pairs) - 1, num=min(count, len(pairs))).round().astype(int)
    mine = [pairs[i] for i in np.unique(chosen)][rank::size]
    windows = np.empty((len(mine), window), dtype=np.uint8)
    labels = np.zeros(len(mine), dtype=np.int32)
    for row, (index, start) in enumerate(mine):
        song = usable[index]
        windows[row] = dataset.shard_codes(song.shard)[start : start + window]
        if label_ids:
            labels[row] = label_ids[song.label]
    return windows, labels
