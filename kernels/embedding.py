"""Token embedding lookup: one row of token_embd, dequantized into the f32 residual stream.

Decode reads one row per token (3072 weights of Phi-3 Mini: 1,728 bytes in q4_0), so this op is all
fixed cost; the NumPy version spent ~150-280 us a token in decode on ~10 small array operations, the
kernel below ~5 us. The table stays in its stored format (GGUF blocks, memory-mapped from the file).
"""

from __future__ import annotations

import numpy as np

from perfsim.cost import Cost
from perfsim.kernels.jit import f16_to_f32, jit
from perfsim.quant import QuantFormat


def embedding_cost(hidden_size: int, weights: QuantFormat) -> Cost:
    """One row in its stored format read, one f32 row written; a multiply per weight."""
    return Cost(flops=hidden_size, weight_bytes=weights.storage_bytes(hidden_size), act_bytes=4 * hidden_size)


def embedding_row_reference(table: np.ndarray, format_name: str, token: int) -> np.ndarray:
    """Plain NumPy: row `token` of a (vocab, bytes per row) GGUF block table, or of an f16/f32 table."""
    raw = table[token]
    if format_name in ("f16", "f32"):
        return raw.astype(np.float32)
    block_bytes = 18 if format_name == "q4_0" else 34
    blocks = raw.reshape(-1, block_bytes)
    scales = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    if format_name == "q8_0":
        values = blocks[:, 2:].view(np.int8).astype(np.float32)
    else:  # q4_0: byte j holds element j (low nibble) and j + 16 (high nibble), value = d * (nibble - 8)
        nibbles = blocks[:, 2:]
        values = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.float32) - 8
    return (values * scales).reshape(-1)


@jit()
def embedding_row_q4_0(table, token, out):
    """out f32[hidden] = row `token` of a q4_0 table uint8 (vocab, hidden / 32 * 18)."""
    row = table[token]
    for b in range(out.size // 32):
        d = f16_to_f32(np.uint16(row[18 * b]) | (np.uint16(row[18 * b + 1]) << np.uint16(8)))
        for j in range(16):
            byte = row[18 * b + 2 + j]
            out[32 * b + j] = d * np.float32(np.int32(byte & 0x0F) - 8)
            out[32 * b + j + 16] = d * np.float32(np.int32(byte >> 4) - 8)


@jit()
def embedding_row_q8_0(table, token, out):
    """out f32[hidden] = row `token` of a q8_0 table uint8 (vocab, hidden / 32 * 34)."""
    row = table[token]
    for b in range(out.size // 32):
        d = f16_to_f32(np.uint16(row[34 * b]) | (np.uint16(row[34 * b + 1]) << np.uint16(8)))
        for j in range(32):
            q = np.int32(row[34 * b + 2 + j])
            out[32 * b + j] = d * np.float32(q - 256 if q > 127 else q)


def embedding_row(table: np.ndarray, format_name: str, token: int, out: np.ndarray) -> None:
    if format_name == "q4_0":
        embedding_row_q4_0(table, token, out)
    elif format_name == "q8_0":
        embedding_row_q8_0(table, token, out)
    else:  # f16/f32: a conversion NumPy does in one call
        out[:] = table[token]
