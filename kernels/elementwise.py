"""The small per-token kernels of a decoder layer: RMSNorm, RoPE, SiLU-gated product, residual add, argmax.

Each kernel comes as a plain NumPy reference, the Numba kernel the engine runs, and its cost formula
(pure Python; the simulator calls these same functions). At Phi-3 Mini shapes the vectors are 3072 to
32064 floats (12 to 128 KB), all in L1/L2, so each call costs 1-15 us and the kernels are serial: an
empty Numba parallel region alone measured 2.4 us on one thread and 4 us on two.

Also here, because the attention softmax needs it too: `exp_f32`, an exp that LLVM can vectorize
(there is no SVML in this Numba, so math.exp stays a scalar libm call per element).

Run `python -m perfsim.kernels.elementwise` to validate and time them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from perfsim.cost import Cost
from perfsim.kernels.jit import jit

F32_BYTES = 4

# --- exp that vectorizes -----------------------------------------------------------------------------

# Cephes expf: x = n*ln2 + r with |r| <= ln2/2, exp(r) by a degree-7 polynomial, 2^n built in the
# exponent bits. Branch-free, so a loop over it becomes 8-wide AVX2 code. Measured (1M elements,
# contended box): 1.2 G elements/s against 0.15 G/s for the scalar libm call math.exp; largest error
# 5 ulp (3e-7 relative) over [-87, 88] against float64 exp (fastmath lets LLVM merge the two-part
# ln2 reduction, which costs the last few ulp; nothing here needs them).
_LOG2E = 1.4426950408889634
_LN2_HI = 0.693359375  # 9 significant bits: n * _LN2_HI is exact for |n| <= 128
_LN2_LO = -2.12194440e-4
EXP_F32_MIN_ARG = -87.0  # clamped here: 2^n needs n >= -126 to stay a normal float (result ~1.6e-38)
EXP_F32_MAX_ARG = 88.0  # and n <= 127 (result ~1.65e38; float32 max is 3.4e38)


@jit()
def exp_f32(x):
    """exp(x) in float32 for x clamped to [EXP_F32_MIN_ARG, EXP_F32_MAX_ARG]; NaN in gives garbage."""
    x = min(max(x, np.float32(EXP_F32_MIN_ARG)), np.float32(EXP_F32_MAX_ARG))
    n = np.floor(x * np.float32(_LOG2E) + np.float32(0.5))  # np.floor keeps float32; math.floor is int64
    r = x - n * np.float32(_LN2_HI) - n * np.float32(_LN2_LO)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    exp_r = p * r * r + r + np.float32(1.0)
    two_to_n = np.int32((np.int32(n) + 127) << 23).view(np.float32)
    return exp_r * two_to_n


@jit()
def exp_f32_array(x, out):
    """out[i] = exp_f32(x[i]) (a test handle on exp_f32)."""
    for i in range(x.size):
        out[i] = exp_f32(x[i])


# --- RMSNorm -----------------------------------------------------------------------------------------


def rmsnorm_reference(x, weight, eps):
    x64 = x.astype(np.float64)
    return (x64 / np.sqrt(np.mean(x64 * x64) + eps) * weight).astype(np.float32)


@jit()
def rmsnorm(x, weight, eps, out):
    """out = x / sqrt(mean(x^2) + eps) * weight; x, weight, out f32[n] (out may be x)."""
    n = x.size
    sum_sq = np.float32(0.0)
    for i in range(n):
        sum_sq += x[i] * x[i]
    inv_rms = np.float32(1.0) / np.float32(math.sqrt(sum_sq / np.float32(n) + np.float32(eps)))
    for i in range(n):
        out[i] = x[i] * inv_rms * weight[i]


def rmsnorm_cost(n: int) -> Cost:
    """Reads x and the f32 norm weight, writes out. FLOPs: x*x accumulated (2n) and two scalings (2n)."""
    return Cost(flops=4 * n, weight_bytes=n * F32_BYTES, act_bytes=2 * n * F32_BYTES)


# --- RoPE (NEOX / rotate-half, as Hugging Face's Phi-3) ------------------------------------------------


@dataclass(frozen=True)
class RopeTables:
    """cos and sin of position * inv_freq, f32[max_positions, rotary_dim // 2], precomputed once per model."""

    cos: np.ndarray
    sin: np.ndarray

    @property
    def rotary_dim(self) -> int:
        return 2 * self.cos.shape[1]


def rope_tables(max_positions: int, rotary_dim: int, theta: float = 10000.0) -> RopeTables:
    """cos/sin for positions 0..max_positions-1."""
    return _rope_cos_sin(np.arange(max_positions), rotary_dim, theta)


def _rope_cos_sin(positions, rotary_dim: int, theta: float) -> RopeTables:
    """Follows HF's float32 arithmetic so the engine tracks transformers' Phi-3 at long positions.

    HF computes inv_freq = 1 / theta^(2i/d) and the angle position * inv_freq in float32, then cos/sin of
    that float32 angle. The float32 angle is off from the exact one by up to position * 2^-24 rad
    (2.4e-4 at 4096); matching HF's rounding, not the exact angle, is what keeps the golden test tight.
    """
    if rotary_dim % 2 or rotary_dim <= 0:
        raise ValueError(f"rotary_dim must be even and positive, got {rotary_dim}")
    inv_freq = (1.0 / theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)).astype(np.float32)
    angle = np.asarray(positions, dtype=np.float32)[:, None] * inv_freq[None, :]  # float32 product, as HF
    angle64 = angle.astype(np.float64)
    return RopeTables(np.cos(angle64).astype(np.float32), np.sin(angle64).astype(np.float32))


def rope_reference(x, pos, theta=10000.0, rotary_dim=None):
    """Returns the rotated copy of x f32[n_heads, head_dim]; pairs (i, i + rotary_dim/2)."""
    rotary_dim = x.shape[1] if rotary_dim is None else rotary_dim
    half = rotary_dim // 2
    tables = _rope_cos_sin([pos], rotary_dim, theta)
    cos, sin = tables.cos[0].astype(np.float64), tables.sin[0].astype(np.float64)
    out = x.copy()
    x1, x2 = x[:, :half].astype(np.float64), x[:, half:rotary_dim].astype(np.float64)
    out[:, :half] = x1 * cos - x2 * sin
    out[:, half:rotary_dim] = x2 * cos + x1 * sin
    return out


@jit()
def rope_rotate(x, cos, sin):
    """In place on x f32[n_heads, head_dim]: rotate pairs (i, i + half) by (cos[i], sin[i]), f32[half]."""
    half = cos.size
    for h in range(x.shape[0]):
        first = x[h, :half]
        second = x[h, half : 2 * half]
        for i in range(half):
            a = first[i]
            b = second[i]
            first[i] = a * cos[i] - b * sin[i]
            second[i] = b * cos[i] + a * sin[i]


def rope(x, pos, theta=10000.0, rotary_dim=None, tables=None):
    """Rotates x f32[n_heads, head_dim] in place for position pos (apply to q and to k).

    With `tables` (from rope_tables) no trigonometry runs per call; without, this call computes the
    one row it needs (tens of us of NumPy: fine for tests, not for a decode loop).
    """
    row = pos
    if tables is None:
        tables, row = _rope_cos_sin([pos], x.shape[1] if rotary_dim is None else rotary_dim, theta), 0
    if rotary_dim is not None and rotary_dim != tables.rotary_dim:
        raise ValueError(f"rotary_dim {rotary_dim} does not match the tables' {tables.rotary_dim}")
    if tables.rotary_dim > x.shape[1]:  # the kernel does not bounds-check: it would write into the next head
        raise ValueError(f"rotary_dim {tables.rotary_dim} exceeds head_dim {x.shape[1]}")
    rope_rotate(x, tables.cos[row], tables.sin[row])


def rope_cost(n_heads: int, head_dim: int, rotary_dim: int | None = None) -> Cost:
    """Reads and writes the rotated part of every head, reads one cos and one sin row.

    FLOPs: 4 multiplies and 2 adds per rotated pair, 3 per rotated element.
    """
    rotary_dim = head_dim if rotary_dim is None else rotary_dim
    rotated = n_heads * rotary_dim
    table_bytes = rotary_dim * F32_BYTES  # rotary_dim/2 cos + rotary_dim/2 sin
    return Cost(flops=3 * rotated, act_bytes=2 * rotated * F32_BYTES + table_bytes)


# --- SiLU-gated product (Phi-3's fused gate_up: gate first, as HF Phi3MLP and llama.cpp's swiglu) ----------


def silu_mul_reference(gate_up):
    n = gate_up.size // 2
    gate, up = gate_up[:n].astype(np.float64), gate_up[n:].astype(np.float64)
    return (gate / (1.0 + np.exp(-gate)) * up).astype(np.float32)


@jit()
def silu_mul(gate_up, out):
    """out = silu(gate_up[:n]) * gate_up[n:]; gate_up f32[2n], out f32[n]."""
    n = out.size
    gate = gate_up[:n]
    up = gate_up[n : 2 * n]
    for i in range(n):
        g = gate[i]
        out[i] = g / (np.float32(1.0) + exp_f32(-g)) * up[i]


def silu_mul_cost(n: int) -> Cost:
    """Reads 2n, writes n. FLOPs per element: exp (counted as one), add, divide, two multiplies."""
    return Cost(flops=5 * n, act_bytes=3 * n * F32_BYTES)


# --- residual add, argmax --------------------------------------------------------------------------


@jit()
def residual_add(x, delta):
    """x += delta in place; f32[n]."""
    for i in range(x.size):
        x[i] += delta[i]


def residual_add_cost(n: int) -> Cost:
    return Cost(flops=n, act_bytes=3 * n * F32_BYTES)


@jit()
def argmax(logits):
    """Index of the first largest value (np.argmax's tie rule) of finite logits f32[n]."""
    # Scalar: max reductions do not vectorize in this Numba (its fcmp carries no fast-math flags, so
    # LLVM will not form a vector max); tried max(), a select and np.maximum, all ~11 us at 32064.
    # Once per token, against tens of milliseconds of GEMV, that is not worth an intrinsic.
    best_index = 0
    best = logits[0]
    for i in range(logits.size):
        if logits[i] > best:
            best = logits[i]
            best_index = i
    return best_index


def argmax_cost(n: int) -> Cost:
    """Reads the logits once; one compare per logit counted as a FLOP."""
    return Cost(flops=n, act_bytes=n * F32_BYTES)


# --- validate and benchmark -----------------------------------------------------------------------------


def validate(seed: int = 0) -> None:
    """Each kernel against its NumPy reference at Phi-3 Mini shapes; raises AssertionError."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(3072).astype(np.float32)
    weight = rng.uniform(0.5, 1.5, 3072).astype(np.float32)
    out = np.empty_like(x)
    rmsnorm(x, weight, 1e-5, out)
    np.testing.assert_allclose(out, rmsnorm_reference(x, weight, 1e-5), rtol=1e-5, atol=1e-6)

    heads = rng.standard_normal((32, 96)).astype(np.float32)
    expected = rope_reference(heads, 1234)
    rope(heads, 1234, tables=rope_tables(2048, 96))
    np.testing.assert_allclose(heads, expected, rtol=1e-5, atol=1e-5)

    gate_up = (4 * rng.standard_normal(2 * 8192)).astype(np.float32)
    out = np.empty(8192, np.float32)
    silu_mul(gate_up, out)
    np.testing.assert_allclose(out, silu_mul_reference(gate_up), rtol=1e-5, atol=1e-6)

    delta = rng.standard_normal(3072).astype(np.float32)
    expected = x + delta
    residual_add(x, delta)
    np.testing.assert_array_equal(x, expected)

    logits = rng.standard_normal(32064).astype(np.float32)
    assert argmax(logits) == int(np.argmax(logits))


def _median_time_s(fn, repeats: int = 2001) -> float:
    import time

    fn()
    times_s = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times_s.append(time.perf_counter() - start)
    return float(np.median(times_s))


def main() -> None:
    validate()
    rng = np.random.default_rng(0)
    hidden, intermediate, vocab, n_heads, head_dim = 3072, 8192, 32064, 32, 96  # Phi-3 Mini
    x = rng.standard_normal(hidden).astype(np.float32)
    weight = np.ones(hidden, np.float32)
    out = np.empty(hidden, np.float32)
    heads = rng.standard_normal((n_heads, head_dim)).astype(np.float32)
    tables = rope_tables(4096, head_dim)
    gate_up = rng.standard_normal(2 * intermediate).astype(np.float32)
    mlp_out = np.empty(intermediate, np.float32)
    logits = rng.standard_normal(vocab).astype(np.float32)
    cases = [
        ("rmsnorm", lambda: rmsnorm(x, weight, 1e-5, out), rmsnorm_cost(hidden)),
        ("rope", lambda: rope_rotate(heads, tables.cos[100], tables.sin[100]), rope_cost(n_heads, head_dim)),
        ("silu_mul", lambda: silu_mul(gate_up, mlp_out), silu_mul_cost(intermediate)),
        ("residual_add", lambda: residual_add(x, out), residual_add_cost(hidden)),
        ("argmax", lambda: argmax(logits), argmax_cost(vocab)),
    ]
    print("Phi-3 Mini shapes, one thread, data in L1/L2; the time includes the Numba call overhead (0.5-1 us)")
    for name, run, cost in cases:
        time_s = _median_time_s(run)
        print(f"{name:13s} {time_s * 1e6:7.2f} us  {cost.bytes / 1e3:6.1f} KB  {cost.bytes / time_s / 1e9:6.1f} GB/s")


if __name__ == "__main__":
    main()
