"""Decode attention and its KV cache: against a float64 NumPy reference, formats bit for bit, costs by hand."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from perfsim.cost import Cost
from perfsim.kernels import attention as at
from perfsim.quant import F16, F32, Q8_0, Q4_0

FORMATS = ["f16", "q8_0", "f32"]


# --- f16 conversion -------------------------------------------------------------------------------


def test_f16_to_f32_is_exact_for_every_bit_pattern():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)  # normals, subnormals, +-0, +-inf, NaNs
    out = np.empty(bits.size, np.float32)
    at.f16_bits_to_f32_array(bits, out)
    expected = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(expected)
    assert nan.sum() == 2 * 1023
    np.testing.assert_array_equal(out[~nan].view(np.uint32), expected[~nan].view(np.uint32))
    assert np.isnan(out[nan]).all()  # the hardware quiets signalling NaNs; NumPy keeps their bits


def test_f32_to_f16_rounds_like_numpy():
    rng = np.random.default_rng(0)
    wide = rng.standard_normal(200_000) * 10.0 ** rng.integers(-9, 6, 200_000)
    f16_values = np.arange(0x7C00, dtype=np.uint16).view(np.float16).astype(np.float64)
    halfway = (f16_values[:-1] + f16_values[1:]) / 2  # exact ties (float32 holds them): round to even
    edges = [0.0, -0.0, np.inf, -np.inf, 65504.0, 65519.99, 65520.0, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 1e-9]
    x = np.concatenate([wide, halfway, -halfway, edges]).astype(np.float32)
    out = np.empty(x.size, np.uint16)
    at.f32_to_f16_bits_array(x, out)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(out, x.astype(np.float16).view(np.uint16))


def test_f16_python_fallbacks_agree_with_numpy():
    assert at._as_f32_py(np.float16(-2.5).view(np.uint16)) == np.float32(-2.5)
    assert at._f32_to_f16_bits_py(np.float32(6e-8)) == np.float16(6e-8).view(np.uint16)


# --- the cache and kv_append --------------------------------------------------------------------------


def random_rows(seed, n_kv_heads, head_dim, scale=1.0):
    rng = np.random.default_rng(seed)
    return (scale * rng.standard_normal((2, n_kv_heads, head_dim))).astype(np.float32)


@pytest.mark.parametrize("kv_format", FORMATS)
def test_cache_bytes_are_the_formats_exact_storage(kv_format):
    cache = at.new_kv_cache(3, 4, 64, 96, kv_format)
    per_layer = at.attention_cost(8, 4, 96, 64, kv_format).kv_bytes
    assert cache.nbytes == 3 * per_layer
    assert (cache.n_layers, cache.n_kv_heads, cache.max_context, cache.head_dim) == (3, 4, 64, 96)


def test_kv_append_f32_and_f16_round_trip():
    k, v = random_rows(1, 4, 64, scale=300.0)
    for kv_format, expect in (("f32", lambda a: a), ("f16", lambda a: a.astype(np.float16).astype(np.float32))):
        cache = at.new_kv_cache(2, 4, 8, 64, kv_format)
        at.kv_append(cache, 1, 5, k, v)
        k_read, v_read = at.dequantize_kv(cache, 1, 6)
        np.testing.assert_array_equal(k_read[:, 5], expect(k))
        np.testing.assert_array_equal(v_read[:, 5], expect(v))
        assert not np.any(k_read[:, :5]) and not np.any(at.dequantize_kv(cache, 0, 8)[0])


def test_kv_append_q8_0_matches_llama_cpp_rounding_and_error_bound():
    k, v = random_rows(2, 4, 128, scale=3.0)
    k[0, :32] = 0.0  # an all-zero block: scale 0, quants 0
    k[1, 32] = 127 * 0.5  # amax 63.5: d = 0.5 exactly, so x = 1.25 quantizes to round-half-away 3 (not 2)
    k[1, 33:64] = 1.25
    cache = at.new_kv_cache(1, 4, 4, 128, "q8_0")
    at.kv_append(cache, 0, 3, k, v)
    for x, quants, scales in ((k, cache.k, cache.k_scale), (v, cache.v, cache.v_scale)):
        expected_quants, expected_scales = at.quantize_q8_0_reference(x)
        np.testing.assert_array_equal(quants[0, :, 3], expected_quants)
        np.testing.assert_array_equal(scales[0, :, 3], expected_scales)
    assert np.all(cache.k[0, 0, 3, 0] == 0) and cache.k_scale[0, 0, 3, 0] == 0
    assert np.all(cache.k[0, 1, 3, 1, 1:] == 3)
    # Rounding moves an element by at most d/2; the f16-rounded scale d16 adds at most 127 * |d16 - d|.
    blocks = k.reshape(4, 4, 32)
    d = np.abs(blocks).max(axis=-1) / 127
    d16 = d.astype(np.float16).astype(np.float64)
    bound = 0.5 * d + 127 * np.abs(d16 - d) + 1e-7
    k_read = at.dequantize_kv(cache, 0, 4)[0][:, 3].reshape(4, 4, 32)
    assert np.all(np.abs(k_read - blocks) <= bound[..., None])


def test_cache_rejects_what_it_cannot_store():
    with pytest.raises(ValueError):
        at.new_kv_cache(1, 2, 8, 80, Q8_0)  # head_dim not a multiple of 32
    with pytest.raises(ValueError):
        at.new_kv_cache(1, 2, 8, 64, Q4_0)
    cache = at.new_kv_cache(1, 2, 8, 64, F16)
    with pytest.raises(ValueError):
        at.kv_append(cache, 0, 8, *random_rows(0, 2, 64))


# --- attention ----------------------------------------------------------------------------------------


def filled(n_kv_heads, head_dim, n_positions, kv_format, seed, n_layers=2):
    return at.filled_kv_cache(n_layers, n_kv_heads, n_positions, head_dim, kv_format, seed)


def run_attention(q, cache, layer, n_positions):
    out = np.full_like(q, np.nan)
    at.attention(q, cache, layer, n_positions, out)
    return out


@settings(max_examples=30, deadline=None)
@given(
    st.sampled_from([(8, 2), (8, 8), (32, 8), (6, 3), (5, 1)]),
    st.sampled_from([32, 64, 96, 128]),
    st.integers(1, 70),
    st.sampled_from(FORMATS),
    st.integers(0, 2**16),
)
def test_attention_matches_reference(heads, head_dim, n_positions, kv_format, seed):
    n_heads, n_kv_heads = heads
    cache = filled(n_kv_heads, head_dim, n_positions, kv_format, seed)
    q = (2 * np.random.default_rng(seed).standard_normal((n_heads, head_dim))).astype(np.float32)
    expected = at.attention_reference(q, *at.dequantize_kv(cache, 1, n_positions))
    np.testing.assert_allclose(run_attention(q, cache, 1, n_positions), expected, rtol=at.ATTENTION_RTOL, atol=at.ATTENTION_ATOL)


@pytest.mark.parametrize("kv_format", FORMATS)
@pytest.mark.parametrize("heads", [(32, 32, 96), (32, 8, 128)])  # Phi-3 Mini, Phi-3 Small
def test_attention_at_phi3_head_shapes(heads, kv_format):
    n_heads, n_kv_heads, head_dim = heads
    cache = filled(n_kv_heads, head_dim, 203, kv_format, seed=7)
    q = (3 * np.random.default_rng(7).standard_normal((n_heads, head_dim))).astype(np.float32)
    expected = at.attention_reference(q, *at.dequantize_kv(cache, 1, 203))
    np.testing.assert_allclose(run_attention(q, cache, 1, 203), expected, rtol=at.ATTENTION_RTOL, atol=at.ATTENTION_ATOL)


def test_gqa_head_h_reads_kv_head_h_over_group():
    # Each kv head's values are a constant (its index): with one position every query head's output is
    # that constant, whatever q is.
    n_heads, n_kv_heads, head_dim = 8, 2, 32
    cache = at.new_kv_cache(1, n_kv_heads, 4, head_dim, F32)
    k = np.random.default_rng(0).standard_normal((n_kv_heads, head_dim)).astype(np.float32)
    v = np.repeat(np.arange(n_kv_heads, dtype=np.float32)[:, None], head_dim, axis=1)
    at.kv_append(cache, 0, 0, k, v)
    out = run_attention(np.ones((n_heads, head_dim), np.float32), cache, 0, 1)
    np.testing.assert_array_equal(out[:, 0], [0, 0, 0, 0, 1, 1, 1, 1])


@pytest.mark.parametrize("kv_format", FORMATS)
def test_attention_reads_nothing_past_n_positions(kv_format):
    # Positions from n on hold huge keys and values: reading any of them would swamp the output.
    n_heads, n_kv_heads, head_dim, n = 4, 2, 64, 37
    cache = filled(n_kv_heads, head_dim, 48, kv_format, seed=3, n_layers=1)
    poison = np.full((2, n_kv_heads, head_dim), 1000.0, np.float32)
    for pos in range(n, 48):
        at.kv_append(cache, 0, pos, *poison)
    q = np.random.default_rng(3).standard_normal((n_heads, head_dim)).astype(np.float32)
    expected = at.attention_reference(q, *at.dequantize_kv(cache, 0, n))
    np.testing.assert_allclose(run_attention(q, cache, 0, n), expected, rtol=at.ATTENTION_RTOL, atol=at.ATTENTION_ATOL)


def test_attention_with_scores_far_apart_is_stable():
    # Scores ~ +-1000: without subtracting the max, exp overflows. The largest score takes all the weight.
    n_heads, head_dim = 2, 32
    cache = at.new_kv_cache(1, 1, 4, head_dim, F32)
    for pos, key_scale in enumerate([-1.0, 1.0, 0.5]):
        k = np.full((1, head_dim), key_scale, np.float32)
        at.kv_append(cache, 0, pos, k, np.full((1, head_dim), pos, np.float32))
    q = np.full((n_heads, head_dim), 1000 / math.sqrt(head_dim), np.float32)
    out = run_attention(q, cache, 0, 3)
    np.testing.assert_allclose(out, 1.0)


def test_softmax_numerators_far_below_the_max_are_zero_not_subnormal_products():
    """Numerators under exp(SOFTMAX_ZERO_BELOW) are stored as 0: near exp(-87) they made subnormal products
    with V, which Intel CPUs compute in microcode (Mini's attention 5.7x slower at context 512)."""
    offsets = np.array([0.0, -1.0, -59.0, -60.5, -70.0, -87.0, -300.0], np.float32)
    scores = (5.0 + offsets)[None, :].copy()
    inv_sums = np.empty(1, np.float32)
    at._softmax_numerators(scores, np.array([5.0], np.float32), offsets.size, inv_sums)
    expected = np.where(offsets >= at.SOFTMAX_ZERO_BELOW, np.exp(offsets.astype(np.float64)), 0.0)
    np.testing.assert_allclose(scores[0], expected, rtol=1e-6, atol=0)
    assert scores[0, 3:].tolist() == [0.0] * 4
    np.testing.assert_allclose(inv_sums[0], 1 / expected.sum(), rtol=1e-6)


@pytest.mark.parametrize("kv_format", [F16, F32, Q8_0])
def test_attention_with_peaked_scores_matches_reference(kv_format):
    # Scores spread over hundreds (a query 30x the usual): most numerators fall under the cutoff, and the
    # output still matches float64 softmax attention.
    rng = np.random.default_rng(7)
    n_heads, n_kv_heads, head_dim, n_positions = 4, 2, 64, 300
    cache = at.filled_kv_cache(1, n_kv_heads, n_positions, head_dim, kv_format, seed=3)
    q = (30 * rng.standard_normal((n_heads, head_dim))).astype(np.float32)
    k, v = at.dequantize_kv(cache, 0, n_positions)
    scores = np.einsum("hd,htd->ht", q.astype(np.float64), np.repeat(k, 2, axis=0)) / math.sqrt(head_dim)
    assert (scores.max(axis=1, keepdims=True) - scores > -at.SOFTMAX_ZERO_BELOW).mean() > 0.5  # most under the cutoff
    np.testing.assert_allclose(run_attention(q, cache, 0, n_positions), at.attention_reference(q, k, v), rtol=1e-4, atol=1e-4)


def test_q8_0_attention_stays_within_its_quantization_error_of_f32():
    # Against attention over the unquantized f32 rows. Two sources, both bounded from the data:
    # V: each element moves by <= 0.6 d (d/2 rounding + 127 |d16 - d| <= 0.062 d) and the output is a
    #   convex combination of rows, so it moves by <= 0.6 max d_v;
    # K: each score moves by <= sum|q| * 0.6 max d_k / sqrt(head_dim) =: delta; the softmax weights then
    #   move by a factor in [e^-2delta, e^2delta], so the output by <= (e^(2 delta) - 1) * 2 max|v|.
    n_heads, n_kv_heads, head_dim, n = 32, 8, 128, 300
    rng = np.random.default_rng(11)
    q = rng.standard_normal((n_heads, head_dim)).astype(np.float32)
    exact = at.new_kv_cache(1, n_kv_heads, n, head_dim, F32)
    quantized = at.new_kv_cache(1, n_kv_heads, n, head_dim, Q8_0)
    for pos in range(n):
        k, v = rng.standard_normal((2, n_kv_heads, head_dim)).astype(np.float32)
        at.kv_append(exact, 0, pos, k, v)
        at.kv_append(quantized, 0, pos, k, v)
    max_d_k = np.abs(exact.k.reshape(-1, 32)).max() / 127
    max_d_v = np.abs(exact.v.reshape(-1, 32)).max() / 127
    delta = np.abs(q).sum(axis=1).max() * 0.6 * max_d_k / math.sqrt(head_dim)
    bound = 0.6 * max_d_v + (math.exp(2 * delta) - 1) * 2 * np.abs(exact.v).max()
    error = np.abs(run_attention(q, quantized, 0, n) - run_attention(q, exact, 0, n)).max()
    assert error <= bound
    assert error > 1e-4  # the two caches do differ: this compares something


def test_attention_rejects_bad_arguments():
    cache = at.new_kv_cache(1, 2, 8, 32, F16)
    q = np.zeros((4, 32), np.float32)
    for n_positions in (0, 9):
        with pytest.raises(ValueError):
            at.attention(q, cache, 0, n_positions, np.empty_like(q))
    with pytest.raises(ValueError):
        at.attention(np.zeros((3, 32), np.float32), cache, 0, 4, np.empty((3, 32), np.float32))
    with pytest.raises(ValueError):
        at.attention(np.zeros((4, 64), np.float32), cache, 0, 4, np.empty((4, 64), np.float32))


# --- the inner loops vectorize --------------------------------------------------------------------------


def test_f16_dot_and_axpy_loops_use_8_wide_f16c_and_fma():
    q, k = np.ones((1, 96), np.float32), np.ones((8, 96), np.uint16)
    scores, score_max, acc = np.empty((1, 8), np.float32), np.empty(1, np.float32), np.zeros((1, 96), np.float32)
    for asm in (at.assembly(at._qk_scores, q, k, 8, scores, score_max), at.assembly(at._weighted_values, scores, k, 8, acc)):
        counts = at._vector_instruction_counts(asm)  # on 8 f32 lanes or more: ymm (Skylake-SP, Zen 3) or zmm (Zen 4)
        assert counts["vcvtph2ps"] >= 4 and counts["vfmadd"] >= 4


# --- cost formulas, pinned by hand ------------------------------------------------------------------------


def test_attention_cost_phi3_mini_4096_f16():
    cost = at.attention_cost(32, 32, 96, 4096, F16)
    assert cost.kv_bytes == 2 * 32 * 4096 * 96 * 2 == 50_331_648
    assert cost.act_bytes == 2 * 32 * 96 * 4
    assert cost.flops == 4 * 32 * 4096 * 96 + 4 * 32 * 4096 + 2 * 32 * 96
    assert cost.weight_bytes == 0


def test_attention_cost_per_format_and_gqa():
    assert at.attention_cost(32, 32, 96, 4096, "q8_0").kv_bytes == 2 * 32 * 4096 * 3 * 34
    assert at.attention_cost(32, 32, 96, 4096, F32).kv_bytes == 2 * 32 * 4096 * 96 * 4
    # Phi-3 Small: 8 kv heads read once for 32 query heads: a quarter of the bytes of 32 kv heads
    small = at.attention_cost(32, 8, 128, 8192, F16)
    assert small.kv_bytes == 2 * 8 * 8192 * 128 * 2
    assert at.attention_cost(8, 8, 128, 8192, F16).kv_bytes == small.kv_bytes
    assert small.flops > at.attention_cost(8, 8, 128, 8192, F16).flops


def test_kv_append_cost():
    assert at.kv_append_cost(32, 96, F16) == Cost(flops=2 * 3072, kv_bytes=2 * 3072 * 2, act_bytes=2 * 3072 * 4)  # one conversion per element
    assert at.kv_append_cost(32, 96, F32).flops == 0  # a copy
    assert at.kv_append_cost(32, 96, "q8_0") == Cost(flops=4 * 3072, kv_bytes=2 * 96 * 34, act_bytes=2 * 3072 * 4)
    assert at.kv_append_cost(32, 96, F32).kv_bytes == 2 * 3072 * 4


def test_validate_passes():
    at.validate()


@pytest.mark.parametrize("kv_format", FORMATS)
def test_kv_store_writes_each_position_as_kv_append_does(kv_format):
    """Positions 3..9 of layer 1 through one kv_store call: byte for byte what seven kv_append calls
    write, non-contiguous K and V views included (fill_cache passes kv[:, 0] and kv[:, 1]), and nothing
    outside those positions."""
    kv = np.random.default_rng(5).standard_normal((7, 2, 4, 64)).astype(np.float32) * 4
    one_call = at.new_kv_cache(2, 4, 12, 64, kv_format)
    at.kv_store(one_call, 1, 3, kv[:, 0], kv[:, 1])
    by_position = at.new_kv_cache(2, 4, 12, 64, kv_format)
    for t in range(7):
        at.kv_append(by_position, 1, 3 + t, kv[t, 0], kv[t, 1])
    for a, b in zip(one_call.arrays, by_position.arrays):
        np.testing.assert_array_equal(a, b)
    assert not one_call.arrays[0][1, :, :3].any() and not one_call.arrays[0][1, :, 10:].any() and not one_call.arrays[0][0].any()
    with pytest.raises(ValueError):
        at.kv_store(one_call, 0, 6, kv[:, 0], kv[:, 1])  # 6..12 runs past the 12-position cache
