"""The elementwise kernels against NumPy references and against formulas written out here."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from perfsim.cost import Cost
from perfsim.kernels import elementwise as ew

SETTINGS = settings(max_examples=40, deadline=None)  # no deadline: the first example compiles


def vectors(draw, n, scale=1.0, seed=None):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)) if seed is None else seed)
    return (scale * rng.standard_normal(n)).astype(np.float32)


def test_exp_f32_within_5_ulp_of_float64_exp_over_its_range():
    x = np.linspace(ew.EXP_F32_MIN_ARG, ew.EXP_F32_MAX_ARG, 200_001).astype(np.float32)
    out = np.empty_like(x)
    ew.exp_f32_array(x, out)
    exact = np.exp(x.astype(np.float64))
    assert np.max(np.abs(out - exact) / exact) < 6 * 2.0**-24


def test_exp_f32_clamps_instead_of_overflowing():
    x = np.array([-1000.0, -88.5, 88.5, 1000.0, 0.0], np.float32)
    out = np.empty_like(x)
    ew.exp_f32_array(x, out)
    assert np.all(np.isfinite(out))
    assert 0 < out[0] < 2e-38 and out[1] == out[0]
    assert out[3] == out[2] == pytest.approx(np.exp(88.0), rel=1e-6)
    assert out[4] == 1.0


@SETTINGS
@given(st.data(), st.integers(1, 5000), st.sampled_from([1e-3, 1.0, 300.0]), st.sampled_from([1e-5, 1e-6]))
def test_rmsnorm_matches_reference(data, n, scale, eps):
    x = vectors(data.draw, n, scale)
    weight = vectors(data.draw, n)
    out = np.empty_like(x)
    ew.rmsnorm(x, weight, eps, out)
    np.testing.assert_allclose(out, ew.rmsnorm_reference(x, weight, eps), rtol=2e-5, atol=1e-6)


def test_rmsnorm_in_place_and_by_hand():
    x = np.array([3.0, 4.0], np.float32)  # mean of squares 12.5
    ew.rmsnorm(x, np.array([1.0, 2.0], np.float32), 0.0, x)
    np.testing.assert_allclose(x, [3 / np.sqrt(12.5), 8 / np.sqrt(12.5)], rtol=1e-6)


def hf_rope(x, pos, theta, rotary_dim):
    """Hugging Face's Phi-3 RoPE, written out: Phi3RotaryEmbedding (float32 inv_freq and angle) and
    apply_rotary_pos_emb with rotate_half, on the first rotary_dim dims of each head."""
    inv_freq = (1.0 / theta ** (np.arange(0, rotary_dim, 2, dtype=np.int64) / rotary_dim)).astype(np.float32)
    freqs = np.float32(pos) * inv_freq
    emb = np.concatenate([freqs, freqs])
    cos, sin = np.cos(emb.astype(np.float64)), np.sin(emb.astype(np.float64))

    def rotate_half(v):
        half = v.shape[-1] // 2
        return np.concatenate([-v[..., half:], v[..., :half]], axis=-1)

    rot, rest = x[..., :rotary_dim].astype(np.float64), x[..., rotary_dim:]
    return np.concatenate([(rot * cos + rotate_half(rot) * sin).astype(np.float32), rest], axis=-1)


@SETTINGS
@given(
    st.data(),
    st.integers(1, 40),
    st.sampled_from([(96, 96), (128, 128), (64, 32), (96, 48), (8, 2)]),
    st.integers(0, 8191),
    st.sampled_from([10000.0, 500000.0]),
)
def test_rope_matches_hf_rotate_half(data, n_heads, dims, pos, theta):
    head_dim, rotary_dim = dims
    x = vectors(data.draw, n_heads * head_dim).reshape(n_heads, head_dim)
    expected = hf_rope(x, pos, theta, rotary_dim)
    with_tables = x.copy()
    ew.rope(with_tables, pos, tables=ew.rope_tables(pos + 1, rotary_dim, theta))
    np.testing.assert_allclose(with_tables, expected, rtol=1e-5, atol=1e-5)
    without_tables = x.copy()
    ew.rope(without_tables, pos, theta, rotary_dim)
    np.testing.assert_array_equal(without_tables, with_tables)
    np.testing.assert_array_equal(with_tables[:, rotary_dim:], x[:, rotary_dim:])


def test_rope_float32_angle_stays_within_its_rounding_of_the_exact_rotation():
    # HF's float32 angle (float32 inv_freq times float32 position) is off from the exact angle by at most
    # two roundings, 2 * pos * 2^-24 rad; a pair (a, b) then moves by at most that times its norm.
    x = np.random.default_rng(3).standard_normal((32, 96)).astype(np.float32)
    pos = 4095
    exact_angle = pos * 10000.0 ** (-np.arange(0, 96, 2) / 96)
    cos, sin = np.cos(exact_angle), np.sin(exact_angle)
    a, b = x[:, :48].astype(np.float64), x[:, 48:].astype(np.float64)
    exact = np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=1)
    bound = 2 * pos * 2.0**-24 * np.max(np.hypot(a, b)) + 1e-6
    ew.rope(x, pos)
    np.testing.assert_allclose(x, exact, rtol=0, atol=bound)


def test_rope_pairs_i_with_i_plus_half_by_hand():
    x = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)  # pairs (1, 3) and (2, 4)
    ew.rope(x, 1, theta=1.0)  # inv_freq = 1 for both pairs: angle 1 rad
    c, s = np.cos(1.0), np.sin(1.0)
    np.testing.assert_allclose(x[0], [1 * c - 3 * s, 2 * c - 4 * s, 3 * c + 1 * s, 4 * c + 2 * s], rtol=1e-6)


def test_rope_rejects_impossible_rotary_dims():
    x = np.zeros((2, 8), np.float32)
    with pytest.raises(ValueError):
        ew.rope(x, 0, rotary_dim=16)
    with pytest.raises(ValueError):
        ew.rope(x, 0, rotary_dim=5)
    with pytest.raises(ValueError):
        ew.rope(x, 0, rotary_dim=4, tables=ew.rope_tables(4, 8))


@SETTINGS
@given(st.data(), st.integers(1, 9000), st.sampled_from([1.0, 8.0, 60.0]))
def test_silu_mul_matches_reference(data, n, scale):
    gate_up = vectors(data.draw, 2 * n, scale)
    out = np.empty(n, np.float32)
    ew.silu_mul(gate_up, out)
    np.testing.assert_allclose(out, ew.silu_mul_reference(gate_up), rtol=1e-5, atol=1e-6)


def test_silu_mul_gates_with_the_first_half():
    gate_up = np.array([0.0, 2.0, 5.0, 7.0], np.float32)  # gate [0, 2], up [5, 7]
    out = np.empty(2, np.float32)
    ew.silu_mul(gate_up, out)
    np.testing.assert_allclose(out, [0.0, 2 / (1 + np.exp(-2.0)) * 7], rtol=1e-6)


@SETTINGS
@given(st.data(), st.integers(1, 5000))
def test_residual_add_in_place(data, n):
    x, delta = vectors(data.draw, n), vectors(data.draw, n)
    expected = x + delta
    ew.residual_add(x, delta)
    np.testing.assert_array_equal(x, expected)


@SETTINGS
@given(st.data(), st.integers(1, 40000))
def test_argmax_matches_numpy(data, n):
    logits = vectors(data.draw, n)
    assert ew.argmax(logits) == np.argmax(logits)


def test_argmax_takes_the_first_of_ties():
    logits = np.array([1.0, 5.0, -2.0, 5.0, 5.0], np.float32)
    assert ew.argmax(logits) == 1
    assert ew.argmax(np.full(7, -3.0, np.float32)) == 0


def test_costs_pinned_by_hand_at_phi3_mini_shapes():
    assert ew.rmsnorm_cost(3072) == Cost(flops=4 * 3072, weight_bytes=3072 * 4, act_bytes=2 * 3072 * 4)
    # 32 heads x 96 dims read and written, plus 48 cos + 48 sin
    assert ew.rope_cost(32, 96) == Cost(flops=3 * 3072, act_bytes=2 * 3072 * 4 + 96 * 4)
    assert ew.rope_cost(32, 96, rotary_dim=32).act_bytes == 2 * 32 * 32 * 4 + 32 * 4
    assert ew.silu_mul_cost(8192) == Cost(flops=5 * 8192, act_bytes=(2 * 8192 + 8192) * 4)
    assert ew.residual_add_cost(3072) == Cost(flops=3072, act_bytes=3 * 3072 * 4)
    assert ew.argmax_cost(32064) == Cost(flops=32064, act_bytes=32064 * 4)


def test_validate_passes():
    ew.validate()
