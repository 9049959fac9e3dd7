"""The roofline: pure functions from (ops, device unit, threads) to predicted times.

Per op: time = max(FLOPs / achievable compute, bytes / achievable bandwidth) + the unit's fixed cost
per op (a calibrated host adds `overlap` x the smaller of the two, measured per kernel: how much of
the compute fails to hide under the memory traffic; for a kernel with an `overlap_power` p the max is
their power mean, (compute^p + memory^p)^(1/p)); the op is memory-, compute- or overhead-bound by
whichever term is largest. On a CPU, compute scales with threads but bandwidth saturates: one core streams `single_thread_bandwidth_gb_s`, all of
them together at most `bandwidth_efficiency` x the memory peak (or a measured table, for the host).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import NamedTuple

from perfsim.device import MATH_PRECISIONS, ComputeUnit, Device
from perfsim.errors import UserError
from perfsim.model import ModelSpec
from perfsim.quant import Formats
from perfsim.workload import MemoryFootprint, Op, decode_ops, memory_footprint, prefill_ops

MEMORY, COMPUTE, OVERHEAD = "memory", "compute", "overhead"
BYTES_PER_GB = 1e9  # bandwidths and capacities are decimal GB throughout, as vendors state bandwidth


@dataclass(frozen=True)
class Roofs:
    """What one compute unit achieves at a thread count."""

    bandwidth_bytes_per_s: float
    flops_per_s: tuple  # achievable, ((precision, FLOP/s), ...) for f32, f16, int8
    overhead_s_per_op: float
    # calibrated hosts, used before the above: ((kernel, FLOP/s, overlap, overlap power, overhead s, overhead s per
    # K/V byte a layer's attention reads, overhead s per byte of the call's operands, overhead s per weight byte a
    # layer streams, overhead s per K/V head, ((head_dim, time factor), ...), ((op name, overhead factor), ...)), ...)
    kernels: tuple = ()
    # Derived once: {kernel: (FLOP/s, overlap, overlap power, overhead s, overhead s per K/V byte, overhead s per operand
    # byte, overhead s per layer weight byte, overhead s per K/V head, {head_dim: time factor}, {op name: overhead factor})},
    # read by every prediction (built per prediction, it cost ~16 us of a ~30 us one).
    by_kernel: dict = field(init=False, compare=False, repr=False)
    # A measured run's K/V read rate (ComputeUnit.kv_bandwidth_gb_s_by_threads) for the ops' K/V bytes; 0: the bandwidth above
    kv_bandwidth_bytes_per_s: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "by_kernel", {k[0]: (*k[1:9], dict(k[9]), dict(k[10])) for k in self.kernels})

    def flops(self, precision: str) -> float:
        return dict(self.flops_per_s)[precision]


def resolve_threads(unit: ComputeUnit, threads: int | None) -> int:
    if unit.type != "cpu":
        if threads is not None:
            raise UserError(f"--threads applies to CPU units; unit {unit.name!r} is a {unit.type}")
        return 0
    if threads is None:
        return max(unit.bandwidth_gb_s_by_threads, default=unit.cores)
    if not 1 <= threads <= unit.cores:
        raise UserError(f"--threads must be between 1 and {unit.cores} (the unit's cores), got {threads}")
    return threads


def cpu_bandwidth_gb_s(device: Device, unit: ComputeUnit, threads: int) -> float:
    table = unit.bandwidth_gb_s_by_threads
    if table:
        measured = [t for t in table if t <= threads]
        return table[max(measured)] if measured else table[min(table)] * threads / min(table)
    return min(threads * unit.single_thread_bandwidth_gb_s, device.peak_bandwidth_gb_s * unit.bandwidth_efficiency)


@lru_cache(maxsize=256)
def unit_roofs(device: Device, unit: ComputeUnit, threads: int) -> Roofs:
    if unit.type == "cpu":
        bandwidth_gb_s = cpu_bandwidth_gb_s(device, unit, threads)
        share = threads / unit.cores
    else:
        bandwidth_gb_s = device.peak_bandwidth_gb_s * unit.bandwidth_efficiency
        share = 1.0
    flops = tuple((p, unit.peak_flops(p) * unit.compute_efficiency * share) for p in MATH_PRECISIONS)
    kernels = tuple(
        (kernel, r.gflops * 1e9, r.overlap, r.overlap_power, r.overhead_us * 1e-6, r.overhead_us_per_kv_mb * 1e-12,
         r.overhead_us_per_operand_mb * 1e-12, r.overhead_us_per_layer_mb * 1e-12, r.overhead_us_per_kv_head * 1e-6,
         tuple(sorted(r.time_factor_by_head_dim.items())), tuple(sorted(r.overhead_factor_by_op.items())))
        for kernel, by_threads in unit.kernel_roofs.items()
        if (r := by_threads.get(threads)) is not None
    )
    kv_bandwidth_gb_s = unit.kv_bandwidth_gb_s_by_threads.get(threads, 0.0) if unit.type == "cpu" else 0.0
    return Roofs(bandwidth_gb_s * BYTES_PER_GB, flops, unit.overhead_us_per_op * 1e-6, kernels, kv_bandwidth_bytes_per_s=kv_bandwidth_gb_s * BYTES_PER_GB)


def _roofs_by_op(roofs: Roofs):
    """(FLOP/s by precision, bytes/s, overhead s, {kernel: (FLOP/s, overlap, overlap power, overhead s, overhead s per
    byte of K/V a layer's attention reads, overhead s per byte of the call's operands, overhead s per weight byte a layer
    streams, overhead s per K/V head, {head_dim: time factor}, {op name: overhead factor})})."""
    return dict(roofs.flops_per_s), roofs.bandwidth_bytes_per_s, roofs.overhead_s_per_op, roofs.by_kernel


class OpTime(NamedTuple):  # a tuple, not a dataclass: a sweep builds ~10^5 of them a second
    op: Op
    compute_s: float
    memory_s: float
    overhead_s: float
    time_s: float  # all `count` executions
    bound: str  # memory | compute | overhead


def _op_terms(ops: tuple, roofs: Roofs):
    """Per op: (op, compute_s, memory_s, overlap, overlap power, overhead_s), the calibrated kernel's roofs when the
    unit has them, else the unit's roofs for the op's precision. A calibrated kernel's time factor for the
    op's head_dim (multi-head attention) scales its compute and memory times, not its fixed cost; its
    factor for the op's name (a serial kernel several ops run) scales the fixed cost."""
    flops_per_s, bandwidth, overhead_per_op, kernels = _roofs_by_op(roofs)
    kv_bandwidth = roofs.kv_bandwidth_bytes_per_s
    for op in ops:
        factor = 1.0
        if op.kernel in kernels:
            (op_flops_per_s, overlap, power, op_overhead, per_kv_byte, per_operand_byte, per_layer_byte, per_kv_head, factors,
             by_op) = kernels[op.kernel]
            op_overhead += (per_kv_byte * op.layer_kv_bytes + per_operand_byte * op.bytes / op.count + per_layer_byte * op.layer_weight_bytes
                            + per_kv_head * op.kv_heads)  # a call
            if by_op:  # two kernels of a calibrated host's dozen have factors; the lookup cost ~2 us a Mini prediction
                op_overhead *= by_op.get(op.name, 1.0)
            factor = factors.get(op.head_dim, 1.0)
        else:
            op_flops_per_s, overlap, power, op_overhead = flops_per_s[op.precision], 0.0, 0.0, overhead_per_op
        if kv_bandwidth and op.kv_bytes:  # a measured run's K/V stream at their own rate
            memory_s = (op.bytes - op.kv_bytes) / bandwidth + op.kv_bytes / kv_bandwidth
        else:
            memory_s = op.bytes / bandwidth
        yield op, factor * op.flops / op_flops_per_s, factor * memory_s, overlap, power, op_overhead * op.count


def roof_s(compute_s: float, memory_s: float, overlap: float = 0.0, power: float = 0.0) -> float:
    """An op's time before its fixed cost: the larger of its compute and memory times (their power mean when
    `power` > 0, KernelRoof.overlap_power) plus `overlap` x the smaller."""
    if power:
        return (compute_s**power + memory_s**power) ** (1.0 / power) + overlap * min(compute_s, memory_s)
    if compute_s > memory_s:
        return compute_s + overlap * memory_s
    return memory_s + overlap * compute_s


def decode_time_s(ops: tuple, roofs: Roofs) -> float:
    """Sum of the op times of `op_times`, without building them (a sweep needs only the total)."""
    total_s = 0.0
    for _, compute_s, memory_s, overlap, power, overhead_s in _op_terms(ops, roofs):
        total_s += roof_s(compute_s, memory_s, overlap, power) + overhead_s
    return total_s


def op_times(ops: tuple, roofs: Roofs) -> tuple:
    times = []
    for op, compute_s, memory_s, overlap, power, overhead_s in _op_terms(ops, roofs):
        if overhead_s > compute_s and overhead_s > memory_s:
            bound = OVERHEAD
        else:
            bound = COMPUTE if compute_s > memory_s else MEMORY
        times.append(OpTime(op, compute_s, memory_s, overhead_s, roof_s(compute_s, memory_s, overlap, power) + overhead_s, bound))
    return tuple(times)


@lru_cache(maxsize=1024)
def prefill_s(model: ModelSpec, formats: Formats, prompt_tokens: int, roofs: Roofs) -> float:
    return sum(t.time_s for t in op_times(prefill_ops(model, formats, prompt_tokens), roofs))


@dataclass(frozen=True)
class Prediction:
    device: Device
    unit: ComputeUnit
    threads: int  # 0 for GPU and NPU units
    model: ModelSpec
    formats: Formats
    context: int
    prompt_tokens: int
    roofs: Roofs
    decode_ops: tuple  # the workload's ops of one decode step
    decode_s: float  # predicted time of one decode step
    prefill_s: float
    memory: MemoryFootprint

    @cached_property
    def ops(self) -> tuple:
        """OpTime per decode op, in execution order (built on first use)."""
        return op_times(self.decode_ops, self.roofs)

    @property
    def decode_tokens_per_s(self) -> float:
        return 1.0 / self.decode_s

    @property
    def ms_per_token(self) -> float:
        return 1e3 * self.decode_s

    @property
    def ttft_ms(self) -> float:
        return 1e3 * self.prefill_s

    @property
    def weight_bytes_per_token(self) -> int:
        return sum(op.weight_bytes for op in self.decode_ops)

    @property
    def memory_capacity_bytes(self) -> int:
        return int(self.device.usable_memory_gb * BYTES_PER_GB)

    @property
    def fits_in_memory(self) -> bool:
        return self.memory.total_bytes <= self.memory_capacity_bytes


def predict(
    model: ModelSpec,
    formats: Formats,
    device: Device,
    context: int,
    prompt_tokens: int = 128,
    unit_name: str | None = None,
    threads: int | None = None,
) -> Prediction:
    unit = device.unit(unit_name)
    threads = resolve_threads(unit, threads)
    roofs = unit_roofs(device, unit, threads)
    ops = decode_ops(model, formats, context)
    return Prediction(device, unit, threads, model, formats, context, prompt_tokens, roofs, ops, decode_time_s(ops, roofs),
                      prefill_s(model, formats, prompt_tokens, roofs), memory_footprint(model, formats, context, prompt_tokens))
