"""Throughput of ``mulaw_encode`` against numpy and against a plain memory copy.

Run with ``python benchmarks/kernels.py [--repeats N]``. For each array size it times, side by
side in the same loop so that machine noise hits all three alike:

* kernel: ``rainforest.kernels.mulaw_encode(x, out=codes)``, preallocated output;
* numpy:  the same formula in float32 numpy (the obvious alternative to a kernel);
* copy:   ``np.copyto`` of the same float32 array into a preallocated one, the memory-bound
  ceiling any one-pass kernel can hope to approach.

It prints median throughput with min..max over the repeats (JIT warm-up excluded) and the
ratios kernel/numpy and kernel/copy. Targets: >= 5x numpy (one fused pass instead of numpy's
temporaries) and >= 0.5x copy (within a factor 2 of the memory bound).
"""

import argparse
import os
import platform
import time

import numpy as np

from rainforest.kernels import mulaw_encode

MU = 255
SIZES = {"large (2**24)": 2**24, "block (65536)": 65536}
#: Aim for this much work per timed repeat so timer resolution and call overhead don't dominate.
MIN_SECONDS_PER_REPEAT = 0.02
PAGE = 4096


def page_offset_empty(size, dtype, offset):
    """An empty array starting ``offset`` bytes past a 4 KiB page boundary.

    Placing source and destination at different page offsets keeps the copy baseline free of
    4K aliasing (loads stalled on unrelated stores at the same page offset), which otherwise
    makes it depend on where the allocator happened to put the arrays: importing Numba alone
    moved block-sized copies from ~6000 to ~700 M samples/s on the development machine.
    """
    nbytes = size * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + 2 * PAGE, dtype=np.uint8)
    start = -raw.ctypes.data % PAGE + offset
    return raw[start : start + nbytes].view(dtype)


def numpy_encode(x, out):
    """The mu-law formula written directly in float32 numpy."""
    clipped = np.clip(x, np.float32(-1), np.float32(1))
    y = np.sign(clipped) * np.log1p(np.float32(MU) * np.abs(clipped)) / np.float32(np.log1p(MU))
    np.floor((y + np.float32(1)) / np.float32(2) * np.float32(MU) + np.float32(0.5), out=y)
    out[...] = y  # float32 -> uint8 cast, as the kernel writes into a preallocated array
    return out


def time_per_call(function, calls):
    start = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - start) / calls


def benchmark(size, repeats, rng):
    x = page_offset_empty(size, np.float32, 0)
    x[...] = rng.uniform(-1.0, 1.0, size)
    codes = page_offset_empty(size, np.uint8, PAGE // 2)
    numpy_codes = np.empty(size, dtype=np.uint8)
    copy = page_offset_empty(size, np.float32, PAGE // 2)
    candidates = {
        "kernel": lambda: mulaw_encode(x, out=codes),
        "numpy": lambda: numpy_encode(x, numpy_codes),
        "copy": lambda: np.copyto(copy, x),
    }
    # Warm-up: JIT compilation (or cache load), page faults on the outputs, and a sanity check.
    for function in candidates.values():
        function()
    assert np.array_equal(codes, mulaw_encode(x)), "kernel is not deterministic"
    agree = np.mean(codes == numpy_codes)

    calls = {
        name: max(1, int(MIN_SECONDS_PER_REPEAT / time_per_call(function, 1)))
        for name, function in candidates.items()
    }
    seconds = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, function in candidates.items():  # interleaved: noise hits all three alike
            seconds[name].append(time_per_call(function, calls[name]))
    rates = {name: size / np.array(times) / 1e6 for name, times in seconds.items()}
    return rates, agree


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    print(f"CPU: {platform.processor() or platform.machine()}, os.cpu_count()={os.cpu_count()}, "
          f"usable={usable}; numpy {np.__version__}; repeats={args.repeats}")  # fmt: skip
    print("throughput in M samples/s: median [min .. max]; single thread")
    rng = np.random.default_rng(0)
    for label, size in SIZES.items():
        rates, agree = benchmark(size, args.repeats, rng)
        print(f"\n{label}: {size} float32 samples")
        for name, rate in rates.items():
            print(
                f"  {name:<7} {np.median(rate):8.0f}  [{rate.min():6.0f} .. {rate.max():6.0f}]"
                f"  IQR {np.subtract(*np.percentile(rate, [75, 25])):5.0f}"
            )
        kernel, numpy_rate, copy = (np.median(rates[n]) for n in ("kernel", "numpy", "copy"))
        print(f"  kernel/numpy = {kernel / numpy_rate:5.2f}x   (target >= 5x)")
        print(f"  kernel/copy  = {kernel / copy:5.2f}    (target >= 0.5)")
        print(f"  numpy float32 formula agrees with the kernel on {agree:.4%} of samples")


if __name__ == "__main__":
    main()
