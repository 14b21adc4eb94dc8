"""Every public kernel against its slow twin in ``tests/reference.py``, bit for bit."""

import functools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import reference
from rainforest import kernels
from rainforest.errors import ParameterError

# numba compiles on first call, so no per-example deadline; examples stay few to keep it fast.
PROPERTY = settings(max_examples=60, deadline=None)

FLOAT32 = st.floats(width=32, allow_nan=False, allow_infinity=True, allow_subnormal=True)
UNIT_FLOAT32 = st.floats(min_value=-1.0, max_value=1.0, width=32)
CODES = hnp.arrays(np.uint8, st.integers(0, 300))


def assert_same(actual, expected):
    """Equal values, dtype and shape: the kernels promise exactness, not closeness."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    mismatch = np.flatnonzero(actual.reshape(-1) != expected.reshape(-1))
    assert mismatch.size == 0, f"{mismatch.size} mismatches, first at flat index {mismatch[0]}"


# --- float32 ordinals: consecutive integers for consecutive float32 values ----------------------

_ONE_ORDINAL = int(np.float32(1.0).view(np.int32))


def to_ordinal(x):
    """Rank of each float32 in float order, with 0 for +0.0 (and -0.0)."""
    bits = np.asarray(x, dtype=np.float32).view(np.int32).astype(np.int64)
    magnitude = bits & 0x7FFFFFFF
    return np.where(bits < 0, -magnitude, magnitude)


def from_ordinal(ordinals):
    ordinals = np.asarray(ordinals, dtype=np.int64)
    magnitude = np.abs(ordinals).astype(np.int32).view(np.float32)
    return np.where(ordinals < 0, -magnitude, magnitude).astype(np.float32)


@functools.cache
def code_thresholds():
    """Ordinal of the smallest float32 in [-1, 1] that the reference encodes as k, k = 1..255.

    Found by bisecting the reference itself, so the kernel's own tables are not trusted.
    """
    targets = np.arange(1, 256)
    lo = np.full(255, -_ONE_ORDINAL, dtype=np.int64)
    hi = np.full(255, _ONE_ORDINAL, dtype=np.int64)
    while np.any(lo < hi):
        mid = (lo + hi) // 2  # floors towards -inf, so lo < hi keeps mid < hi
        reaches = reference.mulaw_encode(from_ordinal(mid)) >= targets
        hi = np.where(reaches, mid, hi)
        lo = np.where(reaches, lo, mid + 1)
    return hi


def threshold_neighbourhood(ulps):
    """Every float32 within ``ulps`` steps of each code threshold."""
    steps = np.arange(-ulps, ulps + 1)
    return from_ordinal((code_thresholds()[:, None] + steps).reshape(-1))


# --- mu-law encode -------------------------------------------------------------------------------


def test_thresholds_are_exact_boundaries_of_the_reference():
    # Guards the helpers below: at t_k the reference gives k, one float32 lower it gives k - 1.
    thresholds = code_thresholds()
    assert_same(reference.mulaw_encode(from_ordinal(thresholds)), np.arange(1, 256, dtype=np.uint8))
    assert_same(
        reference.mulaw_encode(from_ordinal(thresholds - 1)), np.arange(255, dtype=np.uint8)
    )
    assert np.all(np.diff(thresholds) > 0)


def test_encode_matches_reference_at_every_threshold_and_its_float32_neighbours():
    # np.nextafter both ways of every threshold, plus a few more steps for good measure.
    thresholds = from_ordinal(code_thresholds())
    below = np.nextafter(thresholds, np.float32(-np.inf))
    above = np.nextafter(thresholds, np.float32(np.inf))
    for x in (thresholds, below, above, threshold_neighbourhood(ulps=64)):
        assert_same(kernels.mulaw_encode(x), reference.mulaw_encode(x))


EDGE_VALUES = [
    0.0, -0.0, 1.0, -1.0, 1.0000001, -1.0000001, 2.0, -2.0, 1e30, -1e30, np.inf, -np.inf,
    1e-45, -1e-45, 1.1754942e-38, -1.1754942e-38, 1.1754944e-38, -1.1754944e-38,
    1e-18, -1e-18, 3e-18, -3e-18, 1e-19, -1e-19, 1e-17, -1e-17, 0.5, -0.5,
    np.finfo(np.float32).max, -np.finfo(np.float32).max,
]  # fmt: skip


@pytest.mark.parametrize("value", EDGE_VALUES)
def test_encode_edge_values(value):
    x = np.array([value], dtype=np.float32)
    assert_same(kernels.mulaw_encode(x), reference.mulaw_encode(x))


def test_encode_signed_zero_and_clipping():
    codes = kernels.mulaw_encode(np.array([-0.0, 0.0, -np.inf, -5.0, -1.0, 1.0, 5.0, np.inf]))
    assert codes.tolist() == [128, 128, 0, 0, 0, 255, 255, 255]


def test_encode_matches_reference_on_tiny_values_around_zero():
    # The code-128 threshold sits near -1e-18: sweep every float32 exponent from denormals up.
    magnitudes = np.float32(2.0) ** np.arange(-149, 1, dtype=np.float32)
    magnitudes = np.concatenate([magnitudes, np.nextafter(magnitudes, np.float32(0))])
    x = np.concatenate([magnitudes, -magnitudes])
    assert_same(kernels.mulaw_encode(x), reference.mulaw_encode(x))


def test_encode_matches_reference_on_a_strided_sweep_of_all_float32_in_range():
    # ~1M values spread over every float32 ordinal in [-1, 1], tiny exponents included.
    x = from_ordinal(np.arange(-_ONE_ORDINAL - 5, _ONE_ORDINAL + 6, 2039))
    assert_same(kernels.mulaw_encode(x), reference.mulaw_encode(x))


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int16, np.int8, np.uint8])
def test_encode_converts_other_dtypes_through_float32(dtype):
    x = np.array([-3, -1, 0, 1, 3]).astype(dtype)
    assert_same(kernels.mulaw_encode(x), reference.mulaw_encode(x))


def test_encode_float64_input_rounds_to_float32_first():
    # A float64 just below a threshold may round up onto it; the caller sees float32 semantics.
    t = from_ordinal(code_thresholds()).astype(np.float64)
    x = np.concatenate([t - 1e-12, t + 1e-12])
    assert_same(kernels.mulaw_encode(x), reference.mulaw_encode(x))


@PROPERTY
@given(hnp.arrays(np.float32, st.integers(0, 2000), elements=FLOAT32))
def test_encode_matches_reference_property(x):
    assert_same(kernels.mulaw_encode(x), reference.mulaw_encode(x))


@PROPERTY
@given(hnp.arrays(np.float32, st.integers(1, 500), elements=UNIT_FLOAT32))
def test_decode_of_encode_is_within_half_a_bin(x):
    decoded = kernels.mulaw_decode(kernels.mulaw_encode(x)).astype(np.float64)

    def companded(v):
        v = np.clip(np.asarray(v, dtype=np.float64), -1.0, 1.0)
        return np.sign(v) * np.log1p(255 * np.abs(v)) / np.log1p(255)

    # Bins are 2/255 wide in the companded domain; 1e-6 covers the float32 rounding of centres.
    assert np.all(np.abs(companded(decoded) - companded(x)) <= 1 / 255 + 1e-6)


@PROPERTY
@given(hnp.arrays(np.float32, st.integers(2, 500), elements=FLOAT32))
def test_encode_is_monotonic(x):
    codes = kernels.mulaw_encode(np.sort(x))
    assert np.all(np.diff(codes.astype(np.int16)) >= 0)


def test_encode_is_monotonic_across_every_threshold():
    codes = kernels.mulaw_encode(np.sort(threshold_neighbourhood(ulps=8)))
    steps = np.diff(codes.astype(np.int16))
    assert np.all(steps >= 0)
    assert np.count_nonzero(steps) == 255  # every code is reached, none is skipped


def test_encode_writes_into_out():
    x = np.linspace(-1, 1, 1001, dtype=np.float32)
    out = np.full(x.shape, 7, dtype=np.uint8)
    result = kernels.mulaw_encode(x, out=out)
    assert result is out
    assert_same(out, reference.mulaw_encode(x))


@pytest.mark.parametrize("where", [0, 3, 4096, 9998])
def test_encode_nan_raises_naming_the_first_index(where):
    x = np.zeros(10_000, dtype=np.float32)
    x[where] = np.nan
    x[-1] = -np.nan  # a second NaN, with the sign bit set, must not be named first
    with pytest.raises(ParameterError, match=rf"2 NaN sample\(s\), the first at index {where}\b"):
        kernels.mulaw_encode(x)


def test_encode_nan_payloads_are_all_detected():
    # Quiet, signalling and negative NaNs all count, whatever their payload bits.
    payloads = np.array([0x7FC00000, 0x7F800001, 0xFFC00000, 0xFF800001, 0x7FFFFFFF], np.uint32)
    for i, bits in enumerate(payloads):
        x = np.zeros(5, dtype=np.float32)
        x.view(np.uint32)[i] = bits
        with pytest.raises(ParameterError, match=rf"index {i}\b"):
            kernels.mulaw_encode(x)


@pytest.mark.parametrize(
    "bad",
    [np.zeros((2, 3), np.float32), np.float32(0.5), np.array(["a", "b"]), np.zeros(3, complex)],
    ids=["2-D", "0-D", "strings", "complex"],
)
def test_encode_rejects_wrong_shape_or_dtype(bad):
    with pytest.raises(ParameterError):
        kernels.mulaw_encode(bad)


@pytest.mark.parametrize(
    "out",
    [np.empty(4, np.uint8), np.empty(5, np.int8), np.empty((5, 1), np.uint8), [0] * 5,
     np.empty(10, np.uint8)[::2]],
    ids=["short", "int8", "2-D", "list", "strided"],
)  # fmt: skip
def test_encode_rejects_unfit_out(out):
    with pytest.raises(ParameterError):
        kernels.mulaw_encode(np.zeros(5, np.float32), out=out)


# --- mu-law decode -------------------------------------------------------------------------------


def test_decode_matches_reference_for_every_code():
    codes = np.arange(256, dtype=np.uint8)
    assert_same(kernels.mulaw_decode(codes), reference.mulaw_decode(codes))
    assert_same(kernels.DECODE_TABLE, reference.mulaw_decode(codes))


@PROPERTY
@given(CODES)
def test_decode_matches_reference_property(codes):
    assert_same(kernels.mulaw_decode(codes), reference.mulaw_decode(codes))


def test_encode_of_decode_is_identity():
    codes = np.arange(256, dtype=np.uint8)
    assert_same(kernels.mulaw_encode(kernels.mulaw_decode(codes)), codes)


@pytest.mark.parametrize(
    "bad",
    [np.array([0.5, 1.0]), np.array([256]), np.array([-1]), np.zeros((2, 2), np.uint8)],
    ids=["float", "too-big", "negative", "2-D"],
)
def test_decode_rejects_bad_codes(bad):
    with pytest.raises(ParameterError):
        kernels.mulaw_decode(bad)


# --- downmix -------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 2, 6])
def test_downmix_matches_reference(channels):
    rng = np.random.default_rng(channels)
    frames = rng.uniform(-1, 1, size=(4097, channels)).astype(np.float32)
    frames[:5] = [[np.float32(1e-45)] * channels, [3e38] * channels, [-0.0] * channels,
                  [0.1] * channels, [1.0, *[-1.0] * (channels - 1)]]  # fmt: skip
    assert_same(kernels.downmix(frames), reference.downmix(frames))


def test_downmix_averages_all_channels_not_only_the_left():
    frames = np.array([[1.0, 0.0], [0.0, 1.0], [0.25, 0.75]], dtype=np.float32)
    assert kernels.downmix(frames).tolist() == [0.5, 0.5, 0.5]


def test_downmix_accepts_non_contiguous_frames():
    frames = np.asfortranarray(np.random.default_rng(0).standard_normal((100, 6), np.float32))
    assert_same(kernels.downmix(frames[::3]), reference.downmix(frames[::3]))


@PROPERTY
@given(
    hnp.arrays(
        np.float32,
        st.tuples(st.integers(0, 300), st.integers(1, 8)),
        elements=st.floats(width=32, allow_nan=False, allow_infinity=False),
    )
)
def test_downmix_matches_reference_property(frames):
    assert_same(kernels.downmix(frames), reference.downmix(frames))


@pytest.mark.parametrize(
    "bad",
    [np.zeros(4, np.float32), np.zeros((4, 0), np.float32), np.zeros((4, 2), np.float64)],
    ids=["1-D", "no-channels", "float64"],
)
def test_downmix_rejects_bad_frames(bad):
    with pytest.raises(ParameterError):
        kernels.downmix(bad)


# --- non-finite samples --------------------------------------------------------------------------


def test_count_non_finite_matches_reference():
    rng = np.random.default_rng(7)
    samples = rng.uniform(-2, 2, 70_000).astype(np.float32)
    special = [np.nan, np.inf, -np.inf, np.float32(3.4e38), np.float32(-3.4e38),
               np.float32(1e-45), -0.0, np.float32(np.nan) * -1]
    samples[rng.choice(samples.size, 40, replace=False)] = np.resize(special, 40)
    expected = reference.count_non_finite(samples)
    assert expected == 20  # 4 of every 8 specials: NaN, +inf, -inf, -NaN
    assert kernels.count_non_finite(samples) == expected
    assert kernels.count_non_finite(samples[:0]) == 0


@PROPERTY
@given(hnp.arrays(np.float32, st.integers(0, 300), elements=st.floats(width=32)))
def test_count_non_finite_matches_reference_property(samples):
    assert kernels.count_non_finite(samples) == reference.count_non_finite(samples)


def test_count_non_finite_rejects_2d():
    with pytest.raises(ParameterError):
        kernels.count_non_finite(np.zeros((2, 2), np.float32))


# --- trimming ------------------------------------------------------------------------------------


CODE_CASES = {
    "empty": [],
    "all-silent": [128, 128, 127, 128],
    "one-loud": [128, 128, 250, 128],
    "loud-ends": [0, 128, 128, 255],
    "ramp": list(range(256)),
}


@pytest.mark.parametrize("codes", CODE_CASES.values(), ids=CODE_CASES.keys())
@pytest.mark.parametrize("threshold", [0.0, 1e-6, 0.01, 0.5, 1.0])
def test_trim_matches_reference(codes, threshold):
    codes = np.array(codes, dtype=np.uint8)
    assert kernels.peak_amplitude(codes) == reference.peak_amplitude(codes)
    assert kernels.trim_bounds(codes, threshold=threshold) == reference.trim_bounds(
        codes, threshold
    )


def test_peak_amplitude_of_every_pair_of_codes_matches_reference():
    # The kernel reads only the smallest and largest code; every pair checks that shortcut.
    pairs = np.stack(np.meshgrid(np.arange(256), np.arange(256)), -1).reshape(-1, 2)
    pairs = np.concatenate([pairs, np.full((len(pairs), 1), 128)], axis=1).astype(np.uint8)
    assert [kernels.peak_amplitude(p) for p in pairs] == [
        reference.peak_amplitude(p) for p in pairs
    ]


def test_trim_threshold_equal_to_an_amplitude_counts_as_loud():
    codes = np.array([128, 200, 128, 190, 128], dtype=np.uint8)
    exact = float(np.abs(np.float64(reference.mulaw_decode([190])[0])))
    assert kernels.trim_bounds(codes, threshold=exact) == (1, 4)
    assert kernels.trim_bounds(codes, threshold=np.nextafter(exact, 2.0)) == (1, 2)


def test_trim_all_silent_gives_empty_range():
    # No code decodes to exactly 0: the quietest, 127 and 128, sit half a bin (~8.6e-5) away.
    silent = np.array([128, 127, 128, 128], dtype=np.uint8)
    assert kernels.peak_amplitude(silent) == reference.peak_amplitude(silent) < 1e-4
    assert kernels.trim_bounds(silent, threshold=1e-3) == (0, 0)


@PROPERTY
@given(CODES, st.floats(0.0, 1.0))
def test_trim_matches_reference_property(codes, threshold):
    assert kernels.peak_amplitude(codes) == reference.peak_amplitude(codes)
    assert kernels.trim_bounds(codes, threshold=threshold) == reference.trim_bounds(
        codes, threshold
    )


@pytest.mark.parametrize("threshold", [-0.1, 1.5, float("nan")])
def test_trim_rejects_thresholds_outside_unit_range(threshold):
    with pytest.raises(ParameterError):
        kernels.trim_bounds(np.zeros(3, np.uint8), threshold=threshold)


def test_relative_threshold():
    assert kernels.relative_threshold(0.5, 20) == pytest.approx(0.05)
    with pytest.raises(ParameterError):
        kernels.relative_threshold(0.5, 0)


# --- windows -------------------------------------------------------------------------------------


SHARDS = {
    "one-song": ([0], [1000], 100),
    "exact-fit": ([0, 10], [10, 4], 4),
    "short-song-skipped": ([0, 50, 53], [50, 3, 40], 10),
    "gaps-between-songs": ([5, 200, 1000], [100, 300, 20], 20),
    "window-one": ([0, 7], [7, 9], 1),
}


def assert_inside_songs(starts, offsets, lengths, window):
    """Each window [s, s + window) lies entirely inside one song."""
    offsets, lengths = np.asarray(offsets), np.asarray(lengths)
    starts = np.asarray(starts)
    fits = (starts[:, None] >= offsets) & (starts[:, None] + window <= offsets + lengths)
    assert np.all(fits.any(axis=1)), starts[~fits.any(axis=1)]


@pytest.mark.parametrize("skip", [1, 7, 50, 2**40 + 3])
@pytest.mark.parametrize("seed", [0, 2**64 - 1])
def test_random_window_starts_skip_continues_the_same_stream(skip, seed):
    offsets, lengths, window = SHARDS[next(iter(SHARDS))]
    if skip < 1000:  # the reference draws every skipped value; the kernel jumps
        longer = kernels.random_window_starts(offsets, lengths, window=window,
                                              count=skip + 20, seed=seed)
        skipped = kernels.random_window_starts(offsets, lengths, window=window, count=20,
                                               seed=seed, skip=skip)
        assert_same(skipped, longer[skip:])
        assert_same(skipped, reference.random_window_starts(offsets, lengths, window, 20,
                                                            seed, skip=skip))
    else:  # far jumps: skipping in two hops equals skipping at once
        once = kernels.random_window_starts(offsets, lengths, window=window, count=5,
                                            seed=seed, skip=skip)
        first = kernels.random_window_starts(offsets, lengths, window=window, count=5,
                                             seed=seed, skip=skip - 3)
        assert_same(once[:2], first[3:])


def test_random_window_starts_refuse_a_negative_skip():
    with pytest.raises(ParameterError, match="skip must be a non-negative integer"):
        kernels.random_window_starts([0], [10], window=2, count=1, seed=0, skip=-1)


@pytest.mark.parametrize("offsets, lengths, window", SHARDS.values(), ids=SHARDS.keys())
@pytest.mark.parametrize("seed", [0, 1, 12345, 2**64 - 1])
def test_random_window_starts_match_reference(offsets, lengths, window, seed):
    starts = kernels.random_window_starts(offsets, lengths, window=window, count=50, seed=seed)
    assert_same(starts, reference.random_window_starts(offsets, lengths, window, 50, seed))
    assert_inside_songs(starts, offsets, lengths, window)


@st.composite
def shards(draw):
    """Songs laid out in order with optional gaps, and a window that fits at least one song."""
    lengths = draw(st.lists(st.integers(0, 300), min_size=1, max_size=8))
    gaps = draw(st.lists(st.integers(0, 5), min_size=len(lengths), max_size=len(lengths)))
    offsets = np.cumsum(np.array(gaps) + np.array([0, *lengths[:-1]])).tolist()
    window = draw(st.integers(1, max(1, max(lengths))))
    return offsets, lengths, window


@PROPERTY
@given(shards(), st.integers(1, 200), st.integers(0, 2**64 - 1))
def test_random_window_starts_property(shard, count, seed):
    offsets, lengths, window = shard
    if max(lengths) < window:
        with pytest.raises(ParameterError):
            kernels.random_window_starts(offsets, lengths, window=window, count=count, seed=seed)
        return
    starts = kernels.random_window_starts(offsets, lengths, window=window, count=count, seed=seed)
    assert_same(starts, reference.random_window_starts(offsets, lengths, window, count, seed))
    assert_inside_songs(starts, offsets, lengths, window)


def test_random_window_starts_are_reproducible_by_seed():
    def draw(seed):
        return kernels.random_window_starts([0, 500], [500, 700], window=64, count=100, seed=seed)

    assert_same(draw(7), draw(7))
    assert_same(draw(np.uint64(7)), draw(7))
    assert not np.array_equal(draw(7), draw(8))


def test_random_window_starts_are_roughly_uniform():
    offsets, lengths, window = [0, 40, 140], [40, 100, 5], 10
    positions = [
        o + k for o, n in zip(offsets, lengths, strict=True) for k in range(n - window + 1)
    ]
    per_position = 200
    count = per_position * len(positions)
    starts = kernels.random_window_starts(offsets, lengths, window=window, count=count, seed=3)
    hits = np.array([np.count_nonzero(starts == p) for p in positions])
    assert hits.sum() == count  # nothing falls outside the valid positions
    chi_square = float(((hits - per_position) ** 2 / per_position).sum())
    dof = len(positions) - 1
    # Mean dof, sd sqrt(2 dof): eight sds is generous enough never to flake on a fixed seed.
    assert chi_square < dof + 8 * np.sqrt(2 * dof), chi_square


def test_random_window_longer_than_every_song_raises():
    with pytest.raises(ParameterError, match="longer than every song"):
        kernels.random_window_starts([0, 10], [10, 20], window=21, count=1, seed=0)


@pytest.mark.parametrize(
    "kwargs",
    [dict(window=0), dict(count=0), dict(seed=-1), dict(seed=2**64), dict(window=2.5)],
    ids=["window-0", "count-0", "seed-negative", "seed-too-big", "window-float"],
)
def test_random_window_starts_reject_bad_arguments(kwargs):
    arguments = dict(window=4, count=3, seed=0) | kwargs
    with pytest.raises(ParameterError):
        kernels.random_window_starts([0], [10], **arguments)


def test_window_starts_reject_mismatched_songs():
    with pytest.raises(ParameterError, match="differ in length"):
        kernels.strided_window_starts([0, 10], [10], window=2, stride=1)
    with pytest.raises(ParameterError, match="non-negative"):
        kernels.random_window_starts([0], [-5], window=2, count=1, seed=0)


@pytest.mark.parametrize("offsets, lengths, window", SHARDS.values(), ids=SHARDS.keys())
@pytest.mark.parametrize("stride", [1, 3, 64, 10_000])
def test_strided_window_starts_match_reference(offsets, lengths, window, stride):
    starts = kernels.strided_window_starts(offsets, lengths, window=window, stride=stride)
    assert_same(starts, reference.strided_window_starts(offsets, lengths, window, stride))
    if starts.size:
        assert_inside_songs(starts, offsets, lengths, window)


@PROPERTY
@given(shards(), st.integers(1, 50))
def test_strided_window_starts_property(shard, stride):
    offsets, lengths, window = shard
    starts = kernels.strided_window_starts(offsets, lengths, window=window, stride=stride)
    assert_same(starts, reference.strided_window_starts(offsets, lengths, window, stride))
    if starts.size:
        assert_inside_songs(starts, offsets, lengths, window)


# --- cutting -------------------------------------------------------------------------------------


@PROPERTY
@given(st.data())
def test_cut_windows_matches_reference(data):
    codes = data.draw(hnp.arrays(np.uint8, st.integers(1, 400)))
    window = data.draw(st.integers(1, codes.size))
    starts = data.draw(st.lists(st.integers(0, codes.size - window), max_size=30))
    assert_same(
        kernels.cut_windows(codes, starts, window=window),
        reference.cut_windows(codes, starts, window),
    )


@pytest.mark.parametrize("starts", [[-1], [8]], ids=["before", "after"])
def test_cut_windows_reject_windows_outside_codes(starts):
    with pytest.raises(ParameterError, match="outside the codes"):
        kernels.cut_windows(np.zeros(10, np.uint8), starts, window=3)


def test_cut_windows_reject_non_codes():
    with pytest.raises(ParameterError):
        kernels.cut_windows(np.zeros(10, np.int16), [0], window=3)
