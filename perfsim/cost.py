"""The cost of one operation as a value: FLOPs and bytes moved, bytes split by what they are."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Cost:
    flops: float = 0.0  # floating-point (or integer multiply-add) operations, a multiply-add = 2
    weight_bytes: int = 0  # model weights read from memory, in the stored format (scales included)
    kv_bytes: int = 0  # KV cache read or written
    act_bytes: int = 0  # activations read and written (small vectors for decode)

    @property
    def bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.act_bytes

    @property
    def intensity_flops_per_byte(self) -> float:
        return self.flops / self.bytes if self.bytes else float("inf")

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(
            self.flops + other.flops,
            self.weight_bytes + other.weight_bytes,
            self.kv_bytes + other.kv_bytes,
            self.act_bytes + other.act_bytes,
        )

    def __mul__(self, times: int) -> "Cost":
        return Cost(self.flops * times, self.weight_bytes * times, self.kv_bytes * times, self.act_bytes * times)

    __rmul__ = __mul__
