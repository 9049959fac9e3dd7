"""Decode attention for one layer over the KV cache, and the cache itself (f16, q8_0 or f32).

One new token: for each query head, scores = q.k / sqrt(head_dim) over positions 0..n_positions-1,
a max-subtracted softmax, then the weighted sum of the values. Every K and V byte of the layer is
read once and used for 2 FLOPs per stored element and per query head sharing it, so the kernel is
memory-bound: Phi-3 Mini at 4096 positions, f16, reads 2 * 32 kv heads * 4096 * 96 * 2 B = 50.3 MB
per layer, 1.7 ms at 30 GB/s, 54 ms per token over 32 layers (the Q4_0 weights are ~2.2 GB, 72 ms).

Layout (KVCache): k and v [n_layers, n_kv_heads, max_context, head_dim], each kv head's positions
contiguous, so a head's K, then its V, stream front to back. f16 is stored as uint16 bits and widened
with the F16C instruction vcvtph2ps through an LLVM intrinsic (Numba cannot type np.float16 on the
CPU); q8_0 stores int8 quants [.., max_context, head_dim/32, 32] and their fp16 scales
[.., max_context, head_dim/32] in two arrays: 34 bytes per 32 elements, exactly GGUF's Q8_0.

GQA: the query heads sharing a kv head are processed together inside the loop over positions, so
each K and V row is fetched from memory once and reused from L1 for the whole group.

Run `python -m perfsim.kernels.attention` to validate and time it against the streaming-read roof.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from perfsim.cost import Cost
from perfsim.kernels import gemv
from perfsim.kernels.elementwise import exp_f32
from perfsim.kernels.jit import LazyIntrinsic, LazyKernel, jit, prange, prefetch_for_write, zeros_huge_pages
from perfsim.quant import F16, F32, Q8_0, QuantFormat, quant_format

KV_FORMATS = (F16, Q8_0, F32)  # what KVCache stores; f16 is the default
KV_FORMAT_NAMES = tuple(f.name for f in KV_FORMATS)
Q8_BLOCK = Q8_0.block_size
F32_BYTES = 4
_LOWEST_F32 = np.float32(-3.4028234663852886e38)  # not -inf: fastmath lets LLVM assume no infinities


# --- f16 <-> f32 conversion ------------------------------------------------------------------------------


def _as_f32_py(x):
    """Stored element to float32: uint16 holds f16 bits, float32 passes through."""
    if isinstance(x, np.uint16):
        return np.float32(x.view(np.float16))
    return np.float32(x)


def _build_as_f32():
    # fpext half -> float: LLVM emits vcvtph2ps (F16C), 8 elements per instruction, exact for every
    # value (normals, subnormals, inf; NaNs come out quiet). Measured in a sum loop over 16384 L1-resident
    # values: 11-17 G elements/s, against 1.7 (branchy) and 2.5 (branch-free select) G/s for the
    # bit-manipulation conversion in plain Numba code: that one cannot feed 30 GB/s of f16.
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def as_f32(typingctx, x):
        if x == types.uint16:

            def codegen(context, builder, signature, args):
                return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

        elif x == types.float32:

            def codegen(context, builder, signature, args):
                return args[0]

        else:
            return None
        return types.float32(x), codegen

    return as_f32


def _f32_to_f16_bits_py(x):
    return np.float32(x).astype(np.float16).view(np.uint16)


def _build_f32_to_f16_bits():
    # fptrunc float -> half: vcvtps2ph, round to nearest even like NumPy's astype(np.float16),
    # overflow to inf, subnormals exact (checked bit for bit against NumPy in the tests).
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def f32_to_f16_bits(typingctx, x):
        def codegen(context, builder, signature, args):
            return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

        return types.uint16(types.float32), codegen

    return f32_to_f16_bits


as_f32 = LazyIntrinsic(_build_as_f32, _as_f32_py)
f32_to_f16_bits = LazyIntrinsic(_build_f32_to_f16_bits, _f32_to_f16_bits_py)


@jit()
def f16_bits_to_f32_array(bits, out):
    """out f32[n] = the f16 values whose bits are bits u16[n] (a test and benchmark handle on as_f32)."""
    for i in range(bits.size):
        out[i] = as_f32(bits[i])


@jit()
def f32_to_f16_bits_array(x, out):
    """out u16[n] = bits of x f32[n] rounded to f16."""
    for i in range(x.size):
        out[i] = f32_to_f16_bits(x[i])


# --- the KV cache ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer, [n_layers, n_kv_heads, max_context, ...], in one format.

    f32: k, v float32 [..., head_dim]; f16: k, v uint16 holding f16 bits [..., head_dim];
    q8_0: k, v int8 [..., head_dim / 32, 32] and k_scale, v_scale uint16 f16 bits [..., head_dim / 32].
    """

    kv_format: QuantFormat
    k: np.ndarray
    v: np.ndarray
    k_scale: np.ndarray | None = None
    v_scale: np.ndarray | None = None

    @property
    def n_layers(self) -> int:
        return self.k.shape[0]

    @property
    def n_kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def max_context(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k.shape[3] * (self.k.shape[4] if self.k.ndim == 5 else 1)

    @property
    def arrays(self) -> tuple:
        return tuple(a for a in (self.k, self.v, self.k_scale, self.v_scale) if a is not None)

    @property
    def nbytes(self) -> int:
        """Storage of K and V, scales included: the kv_format's exact bytes."""
        return sum(a.nbytes for a in self.arrays)


def new_kv_cache(n_layers, n_kv_heads, max_context, head_dim, kv_format: QuantFormat | str = F16) -> KVCache:
    """A zeroed cache. np.zeros maps untouched pages lazily: a long max_context costs address space only."""
    kv_format = quant_format(kv_format) if isinstance(kv_format, str) else kv_format
    rows = (n_layers, n_kv_heads, max_context)
    if kv_format == F32:
        return KVCache(kv_format, zeros_huge_pages(rows + (head_dim,), np.float32), zeros_huge_pages(rows + (head_dim,), np.float32))
    if kv_format == F16:
        return KVCache(kv_format, zeros_huge_pages(rows + (head_dim,), np.uint16), zeros_huge_pages(rows + (head_dim,), np.uint16))
    if kv_format == Q8_0:
        if head_dim % Q8_BLOCK:
            raise ValueError(f"q8_0 needs head_dim a multiple of {Q8_BLOCK}, got {head_dim}")
        blocks = rows + (head_dim // Q8_BLOCK,)
        quants = blocks + (Q8_BLOCK,)
        return KVCache(
            kv_format,
            zeros_huge_pages(quants, np.int8),
            zeros_huge_pages(quants, np.int8),
            zeros_huge_pages(blocks, np.uint16),
            zeros_huge_pages(blocks, np.uint16),
        )
    raise ValueError(f"the KV cache stores {', '.join(f.name for f in KV_FORMATS)}, not {kv_format.name}")


def kv_cache_format(name: str) -> QuantFormat:
    """A KV-cache format by name; the user's error if the cache cannot store it."""
    from perfsim.errors import UserError

    if name not in KV_FORMAT_NAMES:
        raise UserError(f"the KV cache stores {', '.join(KV_FORMAT_NAMES)}, not {name!r}")
    return quant_format(name)


# --- NumPy references ------------------------------------------------------------------------------------


def quantize_q8_0_reference(x):
    """x f32[..., n] (n a multiple of 32) as a q8_0 KV row: (quants int8 [..., n/32, 32], scale bits u16 [..., n/32]).

    gemv's llama.cpp-exact quantize_row_q8_0_ref (quants from the float32 d = max|x| / 127, ties away
    from zero), with d then rounded to f16 for storage as GGUF does.
    """
    quants, d = gemv.quantize_q8_0_reference(x.reshape(-1))
    blocks = x.shape[:-1] + (-1,)
    return quants.reshape(blocks + (Q8_BLOCK,)), d.astype(np.float16).view(np.uint16).reshape(blocks)


def dequantize_kv(cache: KVCache, layer: int, n_positions: int):
    """K and V of one layer as f32[n_kv_heads, n_positions, head_dim]."""
    shape = (cache.n_kv_heads, n_positions, cache.head_dim)
    if cache.kv_format == Q8_0:

        def dequantize(quants, scale_bits):
            scales = scale_bits[layer, :, :n_positions].view(np.float16).astype(np.float32)
            return (quants[layer, :, :n_positions] * scales[..., None]).reshape(shape)

        return dequantize(cache.k, cache.k_scale), dequantize(cache.v, cache.v_scale)
    if cache.kv_format == F16:
        return tuple(a[layer, :, :n_positions].view(np.float16).astype(np.float32) for a in (cache.k, cache.v))
    return cache.k[layer, :, :n_positions].copy(), cache.v[layer, :, :n_positions].copy()


def attention_reference(q, k, v):
    """q f32[n_heads, head_dim], k and v f32[n_kv_heads, n_positions, head_dim] -> f32[n_heads, head_dim].

    Float64 throughout; query head h reads kv head h // (n_heads // n_kv_heads).
    """
    n_heads, head_dim = q.shape
    group = n_heads // k.shape[0]
    k_per_head = np.repeat(k.astype(np.float64), group, axis=0)
    v_per_head = np.repeat(v.astype(np.float64), group, axis=0)
    scores = np.einsum("hd,htd->ht", q.astype(np.float64), k_per_head) / math.sqrt(head_dim)
    weights = np.exp(scores - scores.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    return np.einsum("ht,htd->hd", weights, v_per_head).astype(np.float32)


# --- Numba kernels: f16 and f32 storage --------------------------------------------------------------------


@jit()
def _qk_scores(q_scaled, k_head, n_positions, scores, score_max):
    """scores[g, t] = q_scaled[g] . k_head[t]; score_max[g] = max over t. k_head f32 or f16-bits [T, D]."""
    group, head_dim = q_scaled.shape
    n_quads = n_positions // 4
    for g in range(group):
        score_max[g] = _LOWEST_F32
    # Four positions per pass: four independent 8-wide FMA chains share each q load, and the horizontal
    # sums cost a quarter as much per position. One position per pass measured 17-23 GB/s from L3,
    # four 24-26 GB/s (4096 x 96 f16, one thread). A layout tiled [T/32, D, 32] (scores as vertical
    # FMAs, no horizontal sums) measured 12 GB/s: the 32-wide inner loop reloads and stores the scores.
    # Eight positions per pass measured slower than four (24-29 against 26-36 GB/s in L2).
    # Grouped-query heads go two at a time: eight chains, and each K row widened once for both. In L2
    # (256 positions x 128, groups of 4, one thread) 16% faster than one head at a time; four heads
    # of two positions each (eight chains too, half the widenings) measured no faster than one head.
    for quad in range(n_quads):
        t = 4 * quad
        for pair in range(group // 2):
            g = 2 * pair
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            a3 = np.float32(0.0)
            b0 = np.float32(0.0)
            b1 = np.float32(0.0)
            b2 = np.float32(0.0)
            b3 = np.float32(0.0)
            for d in range(head_dim):
                qa = q_scaled[g, d]
                qb = q_scaled[g + 1, d]
                k0 = as_f32(k_head[t, d])
                k1 = as_f32(k_head[t + 1, d])
                k2 = as_f32(k_head[t + 2, d])
                k3 = as_f32(k_head[t + 3, d])
                a0 += qa * k0
                a1 += qa * k1
                a2 += qa * k2
                a3 += qa * k3
                b0 += qb * k0
                b1 += qb * k1
                b2 += qb * k2
                b3 += qb * k3
            scores[g, t] = a0
            scores[g, t + 1] = a1
            scores[g, t + 2] = a2
            scores[g, t + 3] = a3
            scores[g + 1, t] = b0
            scores[g + 1, t + 1] = b1
            scores[g + 1, t + 2] = b2
            scores[g + 1, t + 3] = b3
            score_max[g] = max(score_max[g], a0, a1, a2, a3)
            score_max[g + 1] = max(score_max[g + 1], b0, b1, b2, b3)
        if group % 2:  # multi-head attention (a group of 1), or an odd group's last head
            g = group - 1
            s0 = np.float32(0.0)
            s1 = np.float32(0.0)
            s2 = np.float32(0.0)
            s3 = np.float32(0.0)
            for d in range(head_dim):
                qd = q_scaled[g, d]
                s0 += qd * as_f32(k_head[t, d])
                s1 += qd * as_f32(k_head[t + 1, d])
                s2 += qd * as_f32(k_head[t + 2, d])
                s3 += qd * as_f32(k_head[t + 3, d])
            scores[g, t] = s0
            scores[g, t + 1] = s1
            scores[g, t + 2] = s2
            scores[g, t + 3] = s3
            score_max[g] = max(score_max[g], s0, s1, s2, s3)
    for t in range(4 * n_quads, n_positions):
        for g in range(group):
            s = np.float32(0.0)
            for d in range(head_dim):
                s += q_scaled[g, d] * as_f32(k_head[t, d])
            scores[g, t] = s
            score_max[g] = max(score_max[g], s)


@jit()
def _weighted_values(weights, v_head, n_positions, acc):
    """acc[g] += sum over t of weights[g, t] * v_head[t]; v_head f32 or f16-bits [T, D], acc f32[group, D]."""
    group, head_dim = acc.shape
    n_quads = n_positions // 4
    # Four positions per pass: one load and one store of acc per four rows of V, not per row.
    for quad in range(n_quads):
        t = 4 * quad
        for g in range(group):
            w0 = weights[g, t]
            w1 = weights[g, t + 1]
            w2 = weights[g, t + 2]
            w3 = weights[g, t + 3]
            for d in range(head_dim):
                acc[g, d] += (
                    w0 * as_f32(v_head[t, d])
                    + w1 * as_f32(v_head[t + 1, d])
                    + w2 * as_f32(v_head[t + 2, d])
                    + w3 * as_f32(v_head[t + 3, d])
                )
    for t in range(4 * n_quads, n_positions):
        for g in range(group):
            w = weights[g, t]
            for d in range(head_dim):
                acc[g, d] += w * as_f32(v_head[t, d])


# A softmax numerator exp(x), x = score - max <= 0, is stored as 0 below this. exp(-60) = 8.8e-27 of the
# largest term, far under float32's 6e-8 resolution of the sum, so the output does not change; but
# numerators near exp(-87) = 1.6e-38 times V made subnormal products in _weighted_values, which Intel
# CPUs compute in microcode without flush-to-zero: Phi-3 Mini's attention at context 512 with the
# random GGUF's peaked scores took 155-163 ms a step on a Skylake-SP host, 28 ms with this cutoff.
SOFTMAX_ZERO_BELOW = -60.0


@jit()
def _softmax_numerators(scores, score_max, n_positions, inv_sums):
    """scores[g, :n] = exp(scores - score_max[g]) in place, 0 below SOFTMAX_ZERO_BELOW; inv_sums[g] = 1 / their sum."""
    for g in range(scores.shape[0]):
        row = scores[g]
        m = score_max[g]
        total = np.float32(0.0)
        for t in range(n_positions):
            x = row[t] - m
            e = exp_f32(x) if x >= np.float32(SOFTMAX_ZERO_BELOW) else np.float32(0.0)
            row[t] = e
            total += e
        inv_sums[g] = np.float32(1.0) / total


@jit(parallel=True)
def _attention(q, k, v, layer, n_positions, out):
    """q, out f32[n_heads, head_dim]; k, v [n_layers, n_kv_heads, max_context, head_dim] f32 or f16 bits."""
    n_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    group = n_heads // n_kv_heads
    scale = np.float32(1.0 / math.sqrt(head_dim))
    # One kv head per iteration, its whole query group inside: 32 (Mini), 8 (Small) or 10 (Medium) kv
    # heads are plenty for 2 threads. The scores (group x n_positions f32, 16 KB per head at 4096) stay
    # in L1/L2 between the three passes.
    # Scratch for all heads, allocated once; each kv head's iteration works on its group's rows.
    # (The fixed cost of a call, launch and allocations, measured ~4 us + 0.1 us per kv head.)
    q_scaled = q * scale
    scores = np.empty((n_heads, n_positions), np.float32)
    score_max = np.empty(n_heads, np.float32)
    inv_sums = np.empty(n_heads, np.float32)
    acc = np.zeros((n_heads, head_dim), np.float32)
    for kv_head in prange(n_kv_heads):
        heads = slice(kv_head * group, (kv_head + 1) * group)
        _qk_scores(q_scaled[heads], k[layer, kv_head], n_positions, scores[heads], score_max[heads])
        _softmax_numerators(scores[heads], score_max[heads], n_positions, inv_sums[heads])
        _weighted_values(scores[heads], v[layer, kv_head], n_positions, acc[heads])
    for h in range(n_heads):
        for d in range(head_dim):
            out[h, d] = acc[h, d] * inv_sums[h]


# --- Numba kernels: q8_0 storage ---------------------------------------------------------------------------


@jit()
def _qk_scores_q8_0(q_scaled, k_quants, k_scales, n_positions, scores, score_max):
    """As _qk_scores; q_scaled f32[group, D/32, 32], k_quants int8[T, D/32, 32], k_scales f16 bits [T, D/32]."""
    group, n_blocks = q_scaled.shape[0], q_scaled.shape[1]
    n_quads = n_positions // 4
    for g in range(group):
        score_max[g] = _LOWEST_F32
    for quad in range(n_quads):
        t = 4 * quad
        for g in range(group):
            s0 = np.float32(0.0)
            s1 = np.float32(0.0)
            s2 = np.float32(0.0)
            s3 = np.float32(0.0)
            for b in range(n_blocks):
                a0 = np.float32(0.0)
                a1 = np.float32(0.0)
                a2 = np.float32(0.0)
                a3 = np.float32(0.0)
                for i in range(Q8_BLOCK):  # a constant trip count: unrolled, no loop-entry checks (1.2-1.4x)
                    qi = q_scaled[g, b, i]
                    a0 += qi * np.float32(k_quants[t, b, i])
                    a1 += qi * np.float32(k_quants[t + 1, b, i])
                    a2 += qi * np.float32(k_quants[t + 2, b, i])
                    a3 += qi * np.float32(k_quants[t + 3, b, i])
                s0 += a0 * as_f32(k_scales[t, b])
                s1 += a1 * as_f32(k_scales[t + 1, b])
                s2 += a2 * as_f32(k_scales[t + 2, b])
                s3 += a3 * as_f32(k_scales[t + 3, b])
            scores[g, t] = s0
            scores[g, t + 1] = s1
            scores[g, t + 2] = s2
            scores[g, t + 3] = s3
            score_max[g] = max(score_max[g], s0, s1, s2, s3)
    for t in range(4 * n_quads, n_positions):
        for g in range(group):
            s = np.float32(0.0)
            for b in range(n_blocks):
                a = np.float32(0.0)
                for i in range(Q8_BLOCK):
                    a += q_scaled[g, b, i] * np.float32(k_quants[t, b, i])
                s += a * as_f32(k_scales[t, b])
            scores[g, t] = s
            score_max[g] = max(score_max[g], s)


@jit()
def _weighted_values_q8_0(weights, v_quants, v_scales, n_positions, acc):
    """As _weighted_values; v_quants int8[T, D/32, 32], v_scales f16 bits [T, D/32], acc f32[group, D/32, 32]."""
    group, n_blocks = acc.shape[0], acc.shape[1]
    n_quads = n_positions // 4
    for quad in range(n_quads):
        t = 4 * quad
        for g in range(group):
            for b in range(n_blocks):
                w0 = weights[g, t] * as_f32(v_scales[t, b])
                w1 = weights[g, t + 1] * as_f32(v_scales[t + 1, b])
                w2 = weights[g, t + 2] * as_f32(v_scales[t + 2, b])
                w3 = weights[g, t + 3] * as_f32(v_scales[t + 3, b])
                for i in range(Q8_BLOCK):
                    acc[g, b, i] += (
                        w0 * np.float32(v_quants[t, b, i])
                        + w1 * np.float32(v_quants[t + 1, b, i])
                        + w2 * np.float32(v_quants[t + 2, b, i])
                        + w3 * np.float32(v_quants[t + 3, b, i])
                    )
    for t in range(4 * n_quads, n_positions):
        for g in range(group):
            for b in range(n_blocks):
                w = weights[g, t] * as_f32(v_scales[t, b])
                for i in range(Q8_BLOCK):
                    acc[g, b, i] += w * np.float32(v_quants[t, b, i])


@jit(parallel=True)
def _attention_q8_0(q, k_quants, k_scales, v_quants, v_scales, layer, n_positions, out):
    """As _attention, over q8_0 storage (see KVCache)."""
    n_heads, head_dim = q.shape
    n_kv_heads, n_blocks, block = k_quants.shape[1], k_quants.shape[3], k_quants.shape[4]
    group = n_heads // n_kv_heads
    scale = np.float32(1.0 / math.sqrt(head_dim))
    q_scaled = (q * scale).reshape(n_heads, n_blocks, block)
    scores = np.empty((n_heads, n_positions), np.float32)
    score_max = np.empty(n_heads, np.float32)
    inv_sums = np.empty(n_heads, np.float32)
    acc = np.zeros((n_heads, n_blocks, block), np.float32)
    for kv_head in prange(n_kv_heads):
        heads = slice(kv_head * group, (kv_head + 1) * group)
        k_head, k_head_scales = k_quants[layer, kv_head], k_scales[layer, kv_head]
        _qk_scores_q8_0(q_scaled[heads], k_head, k_head_scales, n_positions, scores[heads], score_max[heads])
        _softmax_numerators(scores[heads], score_max[heads], n_positions, inv_sums[heads])
        _weighted_values_q8_0(scores[heads], v_quants[layer, kv_head], v_scales[layer, kv_head], n_positions, acc[heads])
    acc_rows = acc.reshape(n_heads, head_dim)
    for h in range(n_heads):
        for d in range(head_dim):
            out[h, d] = acc_rows[h, d] * inv_sums[h]


# --- appending a position --------------------------------------------------------------------------------


@jit()
def _append_f16(k_new, v_new, k_cache, v_cache, layer, pos):
    """k_cache[layer, h, pos] = f16 bits of k_new[h] for every kv head h; the same for v. One call
    for K and V: the two calls on strided views it replaced spent ~10 us a layer in Python and in
    Numba's argument typing, a third of kv_append's time in decode."""
    n_heads, head_dim, max_context = k_new.shape[0], k_new.shape[1], k_cache.shape[2]
    for h in range(n_heads):  # every row misses the caches: ask for all of them before writing any
        row = ((layer * n_heads + h) * max_context + pos) * head_dim
        for line in range(0, head_dim, 32):
            prefetch_for_write(k_cache, row + line)
            prefetch_for_write(v_cache, row + line)
    for h in range(n_heads):
        for d in range(k_new.shape[1]):
            k_cache[layer, h, pos, d] = f32_to_f16_bits(k_new[h, d])
            v_cache[layer, h, pos, d] = f32_to_f16_bits(v_new[h, d])


@jit()
def _append_f32(k_new, v_new, k_cache, v_cache, layer, pos):
    for h in range(k_new.shape[0]):
        for d in range(k_new.shape[1]):
            k_cache[layer, h, pos, d] = k_new[h, d]
            v_cache[layer, h, pos, d] = v_new[h, d]


@jit(fastmath=False)  # `amax / 127` must stay a division (fastmath may make it amax * (1/127))
def _store_q8_0(src, quants, scales, layer, pos):
    """quantize_q8_0_reference of src f32[n_kv_heads, D/32, 32] into quants[layer, :, pos] int8[.., D/32, 32],
    scales[layer, :, pos] u16[.., D/32]."""
    for h in range(src.shape[0]):
        for b in range(src.shape[1]):
            amax = np.float32(0.0)
            for i in range(src.shape[2]):
                amax = max(amax, abs(src[h, b, i]))
            d = amax / np.float32(127.0)
            inv_d = np.float32(1.0) / d if d != 0 else np.float32(0.0)
            scales[layer, h, pos, b] = f32_to_f16_bits(d)
            for i in range(src.shape[2]):
                scaled = np.float64(src[h, b, i] * inv_d)  # round half away from zero, as C's roundf
                quants[layer, h, pos, b, i] = np.int8(math.copysign(math.floor(abs(scaled) + 0.5), scaled))


@jit(fastmath=False)
def _append_q8_0(k_new, v_new, k_cache, k_scale, v_cache, v_scale, layer, pos):
    _store_q8_0(k_new, k_cache, k_scale, layer, pos)
    _store_q8_0(v_new, v_cache, v_scale, layer, pos)


def kv_append(cache: KVCache, layer: int, pos: int, k_new, v_new) -> None:
    """Writes position pos of one layer: k_new, v_new f32[n_kv_heads, head_dim], converted to the cache's format."""
    if not 0 <= pos < cache.max_context:
        raise ValueError(f"position {pos} is outside the cache (max_context {cache.max_context})")
    if cache.kv_format == F16:
        _append_f16(k_new, v_new, cache.k, cache.v, layer, pos)
    elif cache.kv_format == F32:
        _append_f32(k_new, v_new, cache.k, cache.v, layer, pos)
    else:
        blocks = (cache.n_kv_heads, cache.head_dim // Q8_BLOCK, Q8_BLOCK)
        _append_q8_0(k_new.reshape(blocks), v_new.reshape(blocks), cache.k, cache.k_scale, cache.v, cache.v_scale, layer, pos)


@jit()
def _store_positions_f16(k_new, v_new, k_cache, v_cache, layer, start):
    for t in range(k_new.shape[0]):
        _append_f16(k_new[t], v_new[t], k_cache, v_cache, layer, start + t)


@jit()
def _store_positions_f32(k_new, v_new, k_cache, v_cache, layer, start):
    for t in range(k_new.shape[0]):
        _append_f32(k_new[t], v_new[t], k_cache, v_cache, layer, start + t)


@jit(fastmath=False)
def _store_positions_q8_0(k_new, v_new, k_cache, k_scale, v_cache, v_scale, layer, start):
    for t in range(k_new.shape[0]):
        _append_q8_0(k_new[t], v_new[t], k_cache, k_scale, v_cache, v_scale, layer, start + t)


def kv_store(cache: KVCache, layer: int, start: int, k_new, v_new) -> None:
    """Positions start .. start+n-1 of one layer: k_new, v_new f32[n, n_kv_heads, head_dim], each position
    written exactly as kv_append writes it. One call for a cache's worth of positions: filling Phi-3
    Mini's cache to 4096 positions through kv_append made 131072 calls, ~15 us of Python each."""
    n = k_new.shape[0]
    if not (0 <= start and start + n <= cache.max_context):
        raise ValueError(f"positions {start}..{start + n - 1} are outside the cache (max_context {cache.max_context})")
    if cache.kv_format == F16:
        _store_positions_f16(k_new, v_new, cache.k, cache.v, layer, start)
    elif cache.kv_format == F32:
        _store_positions_f32(k_new, v_new, cache.k, cache.v, layer, start)
    else:
        blocks = (n, cache.n_kv_heads, cache.head_dim // Q8_BLOCK, Q8_BLOCK)
        _store_positions_q8_0(np.ascontiguousarray(k_new).reshape(blocks), np.ascontiguousarray(v_new).reshape(blocks),
                              cache.k, cache.k_scale, cache.v, cache.v_scale, layer, start)


FILL_POOL_VALUES = 2**22  # fill_random_kv draws its K/V from windows into this many N(0,1) values


def fill_random_kv(cache: KVCache, n_positions: int, seed: int = 0) -> None:
    """Positions 0..n_positions-1 of every layer get N(0,1) K and V, written through kv_store; each
    256-position chunk is a window at a random offset into one pool of N(0,1) draws. Drawing every value
    took 9 s of Phi-3 Mini's 4096-position fill (802M values); what the cache holds does not change the
    speed of decode."""
    rng = np.random.default_rng(seed)
    n_heads, head_dim = cache.n_kv_heads, cache.head_dim
    chunk_values = 256 * 2 * n_heads * head_dim  # 256 positions per kv_store call keeps temporaries small
    pool = rng.standard_normal(max(FILL_POOL_VALUES, 2 * chunk_values), dtype=np.float32)
    for layer in range(cache.n_layers):
        for start in range(0, n_positions, 256):
            n = min(256, n_positions - start)
            offset = int(rng.integers(0, pool.size - chunk_values + 1))
            kv = pool[offset : offset + n * 2 * n_heads * head_dim].reshape(n, 2, n_heads, head_dim)
            kv_store(cache, layer, start, kv[:, 0], kv[:, 1])


def attention(q, cache: KVCache, layer: int, n_positions: int, out) -> None:
    """out f32[n_heads, head_dim] = attention of q f32[n_heads, head_dim] over positions 0..n_positions-1.

    Parallel over kv heads (Numba's thread count). n_heads must be a multiple of n_kv_heads; query head
    h uses kv head h // (n_heads // n_kv_heads).
    """
    n_heads, head_dim = q.shape
    if head_dim != cache.head_dim or n_heads % cache.n_kv_heads or out.shape != q.shape:
        raise ValueError(f"q {q.shape} / out {out.shape} do not fit a cache of {cache.n_kv_heads} x {cache.head_dim}")
    if not 1 <= n_positions <= cache.max_context:
        raise ValueError(f"n_positions {n_positions} is outside 1..{cache.max_context}")
    if cache.kv_format == Q8_0:
        _attention_q8_0(q, cache.k, cache.k_scale, cache.v, cache.v_scale, layer, n_positions, out)
    else:
        _attention(q, cache.k, cache.v, layer, n_positions, out)


# --- cost formulas (the simulator's single source of truth for these ops) -----------------------------------


def attention_cost(n_heads, n_kv_heads, head_dim, n_positions, kv_format: QuantFormat | str = F16) -> Cost:
    """One layer, one token. kv_bytes: every stored K and V byte of the n_positions, scales included,
    read once per kv head (the group's query heads reuse it from L1). act_bytes: q read, out written.

    FLOPs: 2 per element for q.k and 2 for the weighted V sum, per query head: 4 * n_heads * n_positions
    * head_dim; softmax 4 per score (max, subtract, exp, add); 2 * n_heads * head_dim for scaling q by
    1/sqrt(head_dim) and the output by 1/sum. Format conversion and q8_0 scale products are not counted
    (at most 1/16 of the dot products). The scores scratch (L1/L2-resident) is not memory traffic.
    """
    kv_format = quant_format(kv_format) if isinstance(kv_format, str) else kv_format
    kv_bytes = 2 * n_kv_heads * n_positions * kv_format.storage_bytes(head_dim)
    flops = 4 * n_heads * n_positions * head_dim + 4 * n_heads * n_positions + 2 * n_heads * head_dim
    return Cost(flops=flops, kv_bytes=kv_bytes, act_bytes=2 * n_heads * head_dim * F32_BYTES)


def kv_append_cost(n_kv_heads, head_dim, kv_format: QuantFormat | str = F16) -> Cost:
    """Writes one position of K and V in the cache's format, reads them as f32.

    FLOPs: none for f32 (a copy); f16 counts 1 per element (the f32 -> f16 conversion), q8_0 2 (the
    |x| max and the x / d).
    """
    kv_format = quant_format(kv_format) if isinstance(kv_format, str) else kv_format
    n = n_kv_heads * head_dim
    flops = {"f32": 0, "f16": 2 * n}.get(kv_format.name, 2 * 2 * n)
    return Cost(flops=flops, kv_bytes=2 * kv_format.storage_bytes(n), act_bytes=2 * n * F32_BYTES)


# --- validate and benchmark ----------------------------------------------------------------------------------


def filled_kv_cache(n_layers, n_kv_heads, max_context, head_dim, kv_format, seed=0) -> KVCache:
    """A cache whose every position holds random K and V (N(0,1)), written as kv_append writes them."""
    rng = np.random.default_rng(seed)
    cache = new_kv_cache(n_layers, n_kv_heads, max_context, head_dim, kv_format)
    for layer in range(n_layers):
        kv = rng.standard_normal((max_context, 2, n_kv_heads, head_dim), np.float32)
        kv_store(cache, layer, 0, kv[:, 0], kv[:, 1])
    return cache


# Tolerances against the float64 reference over the dequantized cache (so they measure the kernel, not
# the storage format): float32 scores, weights and sums. Measured largest absolute error 2-6e-6 for
# every format at 4096 positions (Mini) and 1000 (Small), N(0,1) keys and values, q ~ N(0, 9).
ATTENTION_RTOL = ATTENTION_ATOL = 1e-5


def validate(seed: int = 0) -> None:
    """Every format, MHA and GQA, a context that is not a multiple of 4; raises AssertionError."""
    rng = np.random.default_rng(seed)
    for n_heads, n_kv_heads, head_dim in ((32, 32, 96), (32, 8, 128)):
        for kv_format in KV_FORMATS:
            cache = filled_kv_cache(2, n_kv_heads, 131, head_dim, kv_format, seed)
            q = (2 * rng.standard_normal((n_heads, head_dim))).astype(np.float32)
            out = np.empty_like(q)
            attention(q, cache, 1, 131, out)
            expected = attention_reference(q, *dequantize_kv(cache, 1, 131))
            np.testing.assert_allclose(out, expected, rtol=ATTENTION_RTOL, atol=ATTENTION_ATOL)


def assembly(kernel, *args) -> str:
    """x86 assembly of a jit kernel for args' types (compiled afresh: Numba cannot show cached code)."""
    import numba

    kernel(*args)  # materializes the kernel's callees in its module
    # jit.py swaps a compiled kernel's callees, in the module globals, for their Numba dispatchers.
    options = dict(kernel.options if isinstance(kernel, LazyKernel) else kernel.targetoptions, cache=False)
    options.pop("nopython", None)  # implied by njit, which warns if it is given
    fresh = numba.njit(**options)(kernel.py_func)
    fresh(*args)
    return fresh.inspect_asm(fresh.signatures[0])


def _vector_instruction_counts(asm: str) -> dict:
    """Instructions on 8 f32 lanes or more: ymm (LLVM's choice for Skylake-SP and Zen 3) or zmm (for Zen 4)."""
    lines = asm.splitlines()
    count = lambda op: sum(1 for line in lines if op in line and ("ymm" in line or "zmm" in line))  # noqa: E731
    return {op: count(op) for op in ("vcvtph2ps", "vfmadd", "vcvtdq2ps")}


PHI3_ATTENTION_SHAPES = {"Phi-3 Mini": (32, 32, 96), "Phi-3 Small": (32, 8, 128)}  # (heads, kv heads, head_dim)


PEAKED_Q_SCALE = 30.0  # the benchmark's peaked query: scores spread over hundreds, most numerators tiny


def main(formats=KV_FORMATS, contexts=(512, 2048, 4096), rounds=7, shapes=PHI3_ATTENTION_SHAPES) -> None:
    """Phi-3 attention per shape, format, thread count and context, against the streaming-read roof.

    The box is shared, so each round times one pass of kernels/stream.py's read kernel right before each
    attention sweep and the figure reported is the median over rounds of their ratio.
    """
    from perfsim.kernels import stream
    from perfsim.kernels.jit import max_threads, set_threads

    validate()
    for name, kernel, args in (
        ("_qk_scores f16", _qk_scores, (np.ones((1, 96), np.float32), np.ones((8, 96), np.uint16), 8, np.empty((1, 8), np.float32), np.empty(1, np.float32))),
        ("_weighted_values f16", _weighted_values, (np.ones((1, 8), np.float32), np.ones((8, 96), np.uint16), 8, np.zeros((1, 96), np.float32))),
    ):
        print(f"{name}: ymm/zmm instruction counts {_vector_instruction_counts(assembly(kernel, *args))}")

    # Enough layers that one sweep (>= 100 MB at 512 f16, 16 x 6.3 MB for Mini) dwarfs the 32 MB L3: each
    # call reads its layer from DRAM, as in decode.
    n_layers = 16
    stream_data = stream.stream_buffer()
    import numba

    print(f"one layer a call, sweeps over {n_layers} layers; streaming = one {stream_data.nbytes >> 20} MiB pass of kernels/stream.py "
          f"just before; medians of {rounds} rounds; Numba threading layer {numba.threading_layer()}")
    for shape_name, (n_heads, n_kv_heads, head_dim) in shapes.items():
        print(f"{shape_name}: {n_heads} heads, {n_kv_heads} kv heads, head_dim {head_dim}")
        q = np.random.default_rng(1).standard_normal((n_heads, head_dim)).astype(np.float32)
        out = np.empty_like(q)
        for kv_format in formats:
            cache = new_kv_cache(n_layers, n_kv_heads, max(contexts), head_dim, kv_format)
            fill_random_kv(cache, max(contexts))
            for n_threads in sorted({1, min(2, max_threads())}):
                set_threads(n_threads)
                # The query as drawn, and (first context) 30x it: peaked scores, most softmax numerators
                # tiny, as trained weights make them; the two should take the same time (SOFTMAX_ZERO_BELOW).
                for n_positions, q_scale in [(c, 1.0) for c in contexts] + [(contexts[0], PEAKED_Q_SCALE)]:
                    q_in = q * np.float32(q_scale)

                    def sweep(n_positions=n_positions, cache=cache, q_in=q_in):
                        for layer in range(n_layers):
                            attention(q_in, cache, layer, n_positions, out)

                    sweep_seconds, pass_seconds = stream.paired_rounds(stream_data, sweep, rounds)
                    layer_seconds, bandwidths = sweep_seconds / n_layers, stream_data.nbytes / pass_seconds / 1e9
                    cost = attention_cost(n_heads, n_kv_heads, head_dim, n_positions, kv_format)
                    time_s = float(np.median(layer_seconds))
                    fraction = float(np.median(cost.bytes / layer_seconds / 1e9 / bandwidths))
                    print(
                        f"{kv_format.name:5s} threads {n_threads} context {n_positions:5d}{f' q x{q_scale:g}' if q_scale != 1 else ''}: {time_s * 1e3:7.3f} ms"
                        f"  {cost.bytes / 1e6:6.1f} MB  {cost.bytes / time_s / 1e9:5.1f} GB/s  {cost.flops / time_s / 1e9:5.1f} GFLOP/s"
                        f"  streaming {float(np.median(bandwidths)):5.1f} GB/s  {fraction:4.0%} of streaming"
                    )
            del cache


if __name__ == "__main__":
    import sys

    main(formats=[quant_format(name) for name in sys.argv[1:]] or KV_FORMATS)
