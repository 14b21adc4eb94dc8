"""Slow, obviously correct twins of the public kernels in ``rainforest.kernels``.

Each function follows the written convention step by step in float64 numpy or plain Python
integers, with no tables and no shared code with the kernels, so that agreement between the
two is evidence rather than tautology. Speed does not matter here; clarity does.
"""

import numpy as np

MU = 255
MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB


def mulaw_encode(x):
    """mu-law codes of ``x`` by the formula, evaluated in float64.

    Parameters
    ----------
    x : array_like
        Samples; converted to float32 first (as the kernel's caller sees them), then float64.

    Returns
    -------
    np.ndarray of uint8
    """
    x = np.asarray(x, dtype=np.float32).astype(np.float64)
    if np.isnan(x).any():
        raise ValueError("the mu-law formula is undefined for NaN")
    x = np.clip(x, -1.0, 1.0)
    y = np.sign(x) * np.log1p(MU * np.abs(x)) / np.log1p(MU)
    codes = np.floor((y + 1.0) / 2.0 * MU + 0.5)
    return codes.astype(np.uint8)


def mulaw_decode(codes):
    """Bin-centre samples of mu-law ``codes``, computed in float64 and returned as float32."""
    y = 2.0 * np.asarray(codes).astype(np.float64) / MU - 1.0
    x = np.sign(y) * ((1.0 + MU) ** np.abs(y) - 1.0) / MU
    return x.astype(np.float32)


def downmix(frames):
    """Mean over channels of a (frames, channels) float32 array: float64 sum, then float32."""
    frames = np.asarray(frames, dtype=np.float32)
    channels = frames.shape[1]
    total = np.zeros(frames.shape[0], dtype=np.float64)
    for c in range(channels):  # channel order, as a left-to-right sum
        total += frames[:, c].astype(np.float64)
    return (total * (1.0 / channels)).astype(np.float32)


def count_non_finite(samples):
    """How many samples are NaN or infinite."""
    samples = np.asarray(samples, dtype=np.float32)
    return int(np.sum(np.isnan(samples)) + np.sum(np.isinf(samples)))


def _abs_amplitudes(codes):
    # decode gives float32; widen before taking |.| so comparisons are made in float64
    return np.abs(mulaw_decode(codes).astype(np.float64))


def peak_amplitude(codes):
    """Largest decoded absolute amplitude, 0.0 for no codes."""
    amplitudes = _abs_amplitudes(codes)
    return float(amplitudes.max()) if amplitudes.size else 0.0


def trim_bounds(codes, threshold):
    """``(first, last + 1)`` over the samples whose amplitude is >= threshold, else (0, 0)."""
    loud = np.flatnonzero(_abs_amplitudes(codes) >= threshold)
    if loud.size == 0:
        return 0, 0
    return int(loud[0]), int(loud[-1]) + 1


def splitmix64(state):
    """The splitmix64 output function applied to a 64-bit ``state`` (Python ints)."""
    z = state
    z = ((z ^ (z >> 30)) * MIX1) & MASK64
    z = ((z ^ (z >> 27)) * MIX2) & MASK64
    return z ^ (z >> 31)


def _valid_counts(lengths, window):
    return [max(0, int(n) - window + 1) for n in lengths]


def random_window_starts(offsets, lengths, window, count, seed, skip=0):
    """Window starts drawn by splitmix64: state += golden, draw = mix(state) % total.

    ``skip`` draws are made and thrown away first.
    """
    valid = _valid_counts(lengths, window)
    cumulative = []
    running = 0
    for v in valid:
        running += v
        cumulative.append(running)
    total = cumulative[-1]
    state = int(seed)
    starts = []
    for _ in range(skip + count):
        state = (state + GOLDEN) & MASK64
        draw = splitmix64(state) % total
        song = next(s for s, c in enumerate(cumulative) if c > draw)
        before = cumulative[song - 1] if song > 0 else 0
        starts.append(int(offsets[song]) + draw - before)
    return np.array(starts[skip:], dtype=np.int64)


def strided_window_starts(offsets, lengths, window, stride):
    """Every ``stride``-th valid start of each song, song after song."""
    starts = []
    for offset, valid in zip(offsets, _valid_counts(lengths, window), strict=True):
        starts.extend(int(offset) + k for k in range(0, valid, stride))
    return np.array(starts, dtype=np.int64)


def cut_windows(codes, starts, window):
    """The windows ``codes[s : s + window]`` stacked into a (len(starts), window) array."""
    codes = np.asarray(codes)
    if len(starts) == 0:
        return np.empty((0, window), dtype=codes.dtype)
    return np.stack([codes[int(s) : int(s) + window] for s in starts])


def queue_wavenet_logits(weights, dilations, codes, *, label_id=None, dtype=np.float64):
    """Fast-WaveNet by the book: one sample at a time, a deque of the last ``d`` inputs per
    layer, one numpy call per product. ``weights`` are named as
    ``rainforest.checkpoint.read_weights`` returns them.

    Feeds ``codes`` (1-D) from time 1 with zero-filled queues and returns the logits of every
    time ``t >= receptive_field - 1`` (whose inputs all lie inside ``codes``), predicting
    ``codes[t + 1]``: the same positions as the full forward pass.
    """
    from collections import deque

    w = {name: np.asarray(array, dtype) for name, array in weights.items()}
    residual = w["input_bias"].shape[0]
    layers = len(dilations)
    names = [f"block{k:02d}" for k in range(layers)]
    queues = [deque([np.zeros(residual, dtype)] * d, maxlen=d) for d in dilations]
    condition = None if label_id is None else w["label_embedding"][label_id]
    receptive = 2 + sum(dilations)
    out = []
    for t in range(1, len(codes)):
        x = w["input_previous"][codes[t - 1]] + w["input_current"][codes[t]] + w["input_bias"]
        skip = 0
        for k, name in enumerate(names):
            past = queues[k][0]
            queues[k].append(x)
            kernel = w[f"{name}/gate_kernel"]
            z = past @ kernel[0] + x @ kernel[1] + w[f"{name}/gate_bias"]
            if condition is not None:
                z = z + condition @ w[f"{name}/condition_kernel"]
            gate = z.shape[0] // 2
            gated = np.tanh(z[:gate]) / (1 + np.exp(-z[gate:]))
            skip = skip + gated @ w[f"{name}/skip_kernel"] + w[f"{name}/skip_bias"]
            if k + 1 < layers:
                x = x + gated @ w[f"{name}/residual_kernel"] + w[f"{name}/residual_bias"]
        if t >= receptive - 1:
            head = np.maximum(np.maximum(skip, 0) @ w["output1_kernel"] + w["output1_bias"], 0)
            out.append(head @ w["output2_kernel"] + w["output2_bias"])
    return np.array(out)


def stored_weights_as_float32(stored):
    """The float32 values of stored weights: float32 as they are, bfloat16 (uint16, the upper
    half of a float32) shifted into place, int8 converted."""
    stored = np.asarray(stored)
    if stored.dtype == np.uint16:
        return (stored.astype(np.uint32) << 16).view(np.float32)
    return stored.astype(np.float32)


def fused_multiply_add32(a, b, c):
    """``a * b + c`` of float32 arrays rounded once to float32 (what an FMA instruction gives).

    The product of two float32 is exact in float64 (24 + 24 significant bits); the sum is made
    exact as ``s + e`` (Knuth's TwoSum). Rounding ``s`` to float32 is then the correct rounding
    of ``s + e``, except where ``s`` lies exactly halfway between two float32 and ``e != 0``:
    there the exact value lies on ``e``'s side of the tie.
    """
    a, b, c = (np.asarray(v, np.float32).astype(np.float64) for v in (a, b, c))
    product = a * b
    s = product + c
    z = s - product
    e = (product - (s - z)) + (c - z)
    nearest = s.astype(np.float32)
    neighbour = np.nextafter(nearest, np.where(nearest > s, -np.inf, np.inf).astype(np.float32))
    halfway = (nearest.astype(np.float64) + neighbour.astype(np.float64)) / 2 == s
    side = np.where(e > 0, np.maximum(nearest, neighbour), np.minimum(nearest, neighbour))
    return np.where(halfway & (e != 0), side, nearest)


def ordered_product(x, weights, scale, start):
    """``start + (x * scale) @ weights`` summed as the fused generation loop promises: for every
    output its start value, then the rows k = 0, 1, ..., K-1 in order, each added by one fused
    multiply-add of ``x[b, k] * scale[k]`` (a float32 product, rounded) and ``weights[k]``.

    ``weights`` (K, N) are the stored weights (float32, bfloat16 as uint16, or int8), ``scale``
    (K,) their row scales, ``start`` (B, N) the start values (the bias).
    """
    weights = stored_weights_as_float32(weights)
    factors = np.asarray(x, np.float32) * np.asarray(scale, np.float32)[None, :]
    out = np.array(start, np.float32)
    for k in range(weights.shape[0]):
        out = fused_multiply_add32(factors[:, k:k + 1], weights[k][None, :], out)
    return out


def residual_stack(hidden, gate_bias, gate_kernel, residual_kernel, residual_bias, skip_kernel,
                   dilations, targets, d_skip):
    """The WaveNet residual stack's skip sum and every gradient, in float64, by the chain rule
    written out block by block (the twin of ``rainforest.kernels.train_stack``).

    ``hidden`` (B, n, R), ``gate_bias`` (B, L, 2G), ``gate_kernel`` (L, 2R, 2G) with the tap on
    x[t] in rows R.., ``residual_kernel`` (L-1, G, R), ``residual_bias`` (L-1, R),
    ``skip_kernel`` (L, G, S); ``d_skip`` (B, targets, S) is the gradient arriving at the skip
    sum. Returns ``(skip, (d_hidden, d_gate_bias, d_gate_kernel, d_residual_kernel,
    d_residual_bias, d_skip_kernel))``.
    """
    f64 = [np.asarray(a, np.float64) for a in (hidden, gate_bias, gate_kernel, residual_kernel,
                                                residual_bias, skip_kernel, d_skip)]
    x, bias, wg, wr, br, ws, d_skip = f64
    layers, r, g = len(dilations), x.shape[2], wg.shape[2] // 2
    inputs, tanhs, sigmoids, gateds = [], [], [], []
    skip = np.zeros((x.shape[0], targets, ws.shape[2]))
    for k, d in enumerate(dilations):
        inputs.append(x)
        z = x[:, :-d] @ wg[k, :r] + x[:, d:] @ wg[k, r:] + bias[:, k][:, None, :]
        a, s = np.tanh(z[..., :g]), 1.0 / (1.0 + np.exp(-z[..., g:]))
        gated = a * s
        tanhs.append(a)
        sigmoids.append(s)
        gateds.append(gated)
        skip += gated[:, -targets:] @ ws[k]
        if k < layers - 1:
            x = gated @ wr[k] + br[k] + x[:, d:]
    grads = [np.zeros_like(v) for v in (bias, wg, wr, br, ws)]
    d_bias, d_wg, d_wr, d_br, d_ws = grads
    d_next = None
    for k in range(layers - 1, -1, -1):
        d, x, gated = dilations[k], inputs[k], gateds[k]
        d_gated = np.zeros_like(gated)
        d_gated[:, -targets:] += d_skip @ ws[k].T
        d_ws[k] = np.einsum("btg,bts->gs", gated[:, -targets:], d_skip)
        if d_next is not None:
            d_gated += d_next @ wr[k].T
            d_wr[k] = np.einsum("btg,btr->gr", gated, d_next)
            d_br[k] = d_next.sum(axis=(0, 1))
        a, s = tanhs[k], sigmoids[k]
        dz = np.concatenate([d_gated * s * (1 - a * a), d_gated * a * s * (1 - s)], axis=-1)
        d_bias[:, k] = dz.sum(axis=1)
        d_wg[k, :r] = np.einsum("btr,btz->rz", x[:, :-d], dz)
        d_wg[k, r:] = np.einsum("btr,btz->rz", x[:, d:], dz)
        dx = np.zeros_like(x)
        dx[:, :-d] += dz @ wg[k, :r].T
        dx[:, d:] += dz @ wg[k, r:].T
        if d_next is not None:
            dx[:, d:] += d_next
        d_next = dx
    return skip, (d_next, d_bias, d_wg, d_wr, d_br, d_ws)


def bfloat16_bits(values):
    """float32 values rounded to bfloat16, ties to even, as uint16 (NaN as a quiet NaN)."""
    values = np.asarray(values, np.float32)
    out = []
    for value in values.ravel().tolist():
        if value != value:
            out.append(0x7FC0)
            continue
        bits = int(np.float32(value).view(np.uint32))
        upper, lower = bits >> 16, bits & 0xFFFF
        if lower > 0x8000 or (lower == 0x8000 and upper & 1):
            upper += 1
        out.append(upper & 0xFFFF)
    return np.array(out, np.uint16).reshape(values.shape)


def pair_products(total, pairs, factors):
    """What VDPBF16PS gives, lane by lane: ``total`` + odd products, then + even products, each
    addition rounded to float32. ``pairs`` (K/2, 2N) and ``factors`` (K,) are bfloat16 bits."""
    def widen(bits):
        return np.float64((np.asarray(bits, np.uint32) << 16).view(np.float32))

    out = np.array(total, np.float32)
    for p in range(pairs.shape[0]):
        for lane in range(out.shape[0]):
            for e in (1, 0):
                product = widen(pairs[p, 2 * lane + e]) * widen(factors[2 * p + e])  # exact
                out[lane] = np.float32(np.float64(out[lane]) + product)
    return out
