"""Storage formats for weights, activations and the KV cache, with their exact cost in bytes.

A block format stores `block_size` elements in `block_bytes` bytes, scales included:
  f32   1 element in 4 bytes
  f16   1 element in 2 bytes
  q8_0  32 int8 + one fp16 scale = 34 bytes per 32 (8.5 bits per weight; GGUF's Q8_0)
  q4_0  32 nibbles + one fp16 scale = 18 bytes per 32 (4.5 bits per weight; GGUF's Q4_0)
  int4_gN  N nibbles + one fp16 scale = N/2 + 2 bytes per N (e.g. int4_g128: 4.125 bits per weight)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from perfsim.errors import UserError


@dataclass(frozen=True)
class QuantFormat:
    name: str
    block_size: int  # elements per block
    block_bytes: int  # bytes per block, scales included

    @property
    def bits_per_element(self) -> float:
        return 8 * self.block_bytes / self.block_size

    def storage_bytes(self, n_elements: int) -> int:
        """Exact bytes to store n_elements; block formats need a whole number of blocks."""
        if n_elements % self.block_size:
            raise ValueError(f"{self.name} stores blocks of {self.block_size}; {n_elements} elements is not a multiple")
        return n_elements // self.block_size * self.block_bytes


F32 = QuantFormat("f32", 1, 4)
F16 = QuantFormat("f16", 1, 2)
Q8_0 = QuantFormat("q8_0", 32, 34)
Q4_0 = QuantFormat("q4_0", 32, 18)

FIXED_FORMATS = {f.name: f for f in (F32, F16, Q8_0, Q4_0)}
_GROUPED_INT4 = re.compile(r"int4_g(\d+)")


def grouped_int4(group_size: int) -> QuantFormat:
    if group_size < 2 or group_size % 2:
        raise ValueError("int4 group size must be an even number >= 2")
    return QuantFormat(f"int4_g{group_size}", group_size, group_size // 2 + 2)


def quant_format(name: str) -> QuantFormat:
    """Look a format up by name: f32, f16, q8_0, q4_0, or int4_gN for a grouped int4 with group size N."""
    key = name.strip().lower()
    if key in FIXED_FORMATS:
        return FIXED_FORMATS[key]
    grouped = _GROUPED_INT4.fullmatch(key)
    if grouped and int(grouped.group(1)) >= 2 and int(grouped.group(1)) % 2 == 0:
        return grouped_int4(int(grouped.group(1)))
    known = ", ".join(FIXED_FORMATS) + ", int4_gN (N even, e.g. int4_g128)"
    raise UserError(f"unknown format {name!r}; expected one of: {known}")


@dataclass(frozen=True)
class Formats:
    """The three separate choices: how weights, activations and the KV cache are stored."""

    weights: QuantFormat = Q4_0
    activations: QuantFormat = F32
    kv_cache: QuantFormat = F16

    def __post_init__(self):
        object.__setattr__(self, "_hash", hash((self.weights, self.activations, self.kv_cache)))

    def __hash__(self) -> int:  # cached: formats key the workload's caches
        return self._hash
