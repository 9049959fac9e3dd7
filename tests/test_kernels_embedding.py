"""Embedding rows against gguf's own dequantizer (an independent implementation) and the reference."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

from perfsim.kernels.embedding import embedding_cost, embedding_row, embedding_row_reference
from perfsim.quant import Q4_0


@pytest.mark.parametrize("fmt, qtype", [("q4_0", QT.Q4_0), ("q8_0", QT.Q8_0)])
def test_rows_match_gguf_dequantize(fmt, qtype):
    rng = np.random.default_rng(0)
    weights = (rng.standard_normal((50, 256)) * rng.uniform(1e-3, 10, size=(50, 1))).astype(np.float32)
    weights[3, :32] = 0  # an all-zero block: scale 0
    table = quantize(weights, qtype)
    expected = dequantize(table, qtype).reshape(weights.shape)
    out = np.empty(256, np.float32)
    for token in (0, 3, 17, 49):
        embedding_row(table, fmt, token, out)
        np.testing.assert_array_equal(out, expected[token])
        np.testing.assert_array_equal(embedding_row_reference(table, fmt, token), expected[token])


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_float_tables(dtype):
    table = np.random.default_rng(1).standard_normal((8, 64)).astype(dtype)
    out = np.empty(64, np.float32)
    embedding_row(table, "f16" if dtype == np.float16 else "f32", 5, out)
    np.testing.assert_array_equal(out, table[5].astype(np.float32))


def test_cost_is_one_row_in_the_stored_format():
    assert embedding_cost(3072, Q4_0).weight_bytes == 3072 // 32 * 18 == 1728
