"""Device profiles: YAML data validated once into frozen dataclasses.

A profile keeps vendor peaks apart from the fractions of them that are achievable, names its compute
units (a phone has a CPU, a GPU and an NPU with different peaks) and a default one, cites a source
for every number (`sources:` maps a field path, or a prefix of it, to a citation; the loader rejects
an uncited number), and may list published measurements (`references:`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from functools import cache
from importlib import resources
from pathlib import Path

from perfsim.errors import UserError
from perfsim.schema import Fields, load_yaml

MATH_PRECISIONS = ("f32", "f16", "int8")
# When a unit lists no peak for a precision, the op runs at the first listed one in its row: a CPU
# without f16 arithmetic converts to f32; int8 dot products fall back to f16 on a GPU without them; an
# NPU with only f16 runs f32 work in f16.
_PRECISION_FALLBACK = {"int8": ("int8", "f16", "f32"), "f16": ("f16", "f32", "int8"), "f32": ("f32", "f16", "int8")}
UNIT_TYPES = ("cpu", "gpu", "npu")
DEVICE_KINDS = ("phone", "laptop", "desktop", "server", "host")
RELATIONS = {"=": "", ">": "more than ", "<": "less than ", "~": "about "}


# eq=False: profiles compare and hash by identity, so predictions can be cached per unit.
@dataclass(frozen=True, eq=False)
class ComputeUnit:
    name: str
    type: str  # cpu | gpu | npu
    peak_tflops: dict  # vendor peak by math precision ("f32", "f16", "int8"), dense
    compute_efficiency: float  # achievable fraction of peak_tflops
    bandwidth_efficiency: float  # achievable fraction of the device's peak memory bandwidth, all cores
    overhead_us_per_op: float  # fixed cost of dispatching one op (kernel launch, thread fork/join)
    cores: int = 0  # CPU only: cores the unit can use; threads are counted against these
    single_thread_bandwidth_gb_s: float = 0.0  # CPU only: what one core streams by itself
    bandwidth_gb_s_by_threads: dict = field(default_factory=dict)  # measured read bandwidth, if any
    kernel_roofs: dict = field(default_factory=dict)  # measured, per kernel and thread count: KernelRoof
    # calibrated hosts: perfsim.measure.cold_call_probe_us beside the calibration's decode steps, per thread count
    cold_call_us_by_threads: dict = field(default_factory=dict)
    # calibrated hosts: perfsim.measure.compute_probe_gflops (the q4_0 GEMV's in-cache roof), the median of the calibration's
    # decode steps' probes per thread count: the speed state every parallel kernel's compute roof is stated at
    compute_probe_gflops_by_threads: dict = field(default_factory=dict)
    # The host as one measured run found it (perfsim.compare.with_same_run_host), never a profile's: the read
    # rate of the memory its K/V cache landed in, per thread count, for the K/V bytes (the others: the
    # bandwidth above). Not given: the K/V bytes stream at the bandwidth above too.
    kv_bandwidth_gb_s_by_threads: dict = field(default_factory=dict)

    def peak_flops(self, precision: str) -> float:
        listed = next(p for p in _PRECISION_FALLBACK[precision] if p in self.peak_tflops)  # the loader ensures one
        return self.peak_tflops[listed] * 1e12


@dataclass(frozen=True)
class KernelRoof:
    """What one kernel achieves on a calibrated host at one thread count (perfsim calibrate)."""

    gflops: float  # with its data in cache: the compute roof this kernel really sees
    overlap: float  # 0: compute hides under memory traffic (a pure roofline); 1: they add up
    overhead_us: float  # fixed cost of one call: Python dispatch, parallel fork/join
    # 0: compute and memory combine as max(compute, memory) + overlap x the smaller. p >= 1: as their power mean
    # (compute^p + memory^p)^(1/p) + overlap x the smaller, a roofline whose corner is rounded: near the ridge
    # neither hides the other. perfsim calibrate sets it for the q4_0 GEMVs (perfsim.calibrate.GEMV_OVERLAP_POWER).
    overlap_power: float = 0.0
    # Serial kernels: the fixed cost grows with the K/V a layer's attention reads (decimal MB), that is
    # with the context (Phi-3 Mini's serial ops: 15-20% more a call at context 4096 than at 128).
    overhead_us_per_kv_mb: float = 0.0
    # Serial kernels: and with the bytes of the call's own operands (decimal MB): a cold call pays for
    # each page it touches. Phi-3 Small's norms and residual adds (hidden 4096) cost 2-5 us more a call
    # than Mini's (3072), 12 KB more operands; the calibration's two models differ by as much.
    overhead_us_per_operand_mb: float = 0.0
    # Serial kernels: and with the weight bytes a decoder layer streams between two of its calls (decimal
    # MB, Op.layer_weight_bytes): what a call finds cold depends on how much went through the caches since
    # it last ran. Same hidden size and heads, an MLP 8x wider (a layer of 45 -> 254 MB): RoPE, the norms,
    # kv_append and the residual add after attention cost 1.17-1.41x a call (one thread).
    overhead_us_per_layer_mb: float = 0.0
    # Attention: and with the K/V heads of the call (Op.kv_heads): each K/V head starts its own streams, cold.
    # Cold calls at contexts 128 and 512 (Zen 4 host, f16 K/V, head_dim 128): the time at no K/V bytes
    # was 81, 92 and 125 us at 16, 20 and 32 heads on one thread, 41, 47 and 58 on two; with groups of 4
    # query heads, 57 and 76 us at 6 and 12 K/V heads on one thread. Fitted at one model's heads, the
    # fixed cost had Phi-3 Mini's attention (32 K/V heads, against the calibration model's 20) 20% fast on
    # one thread at context 128 (median of eight rounds), 17% at 512.
    overhead_us_per_kv_head: float = 0.0
    # Multi-head attention: {head_dim: time beyond the fixed cost per K/V byte, over the same at the head_dim
    # the roof was fitted at (128)}, measured by microbenchmark. Rows of 96 f16 values streamed at 0.68 of
    # the read on one thread, against 0.75 for rows of 128; the per-byte roofline has no term for that.
    time_factor_by_head_dim: dict = field(default_factory=dict)
    # Serial kernels several ops run: {op name: multiple of the fixed cost above (all four terms) that op
    # pays}, measured in the calibration's decode. Its place in the layer sets it: Phi-3 Mini's norm before
    # attention (after the MLP) costs 1.5x its norm before the MLP, the same kernel on the same operands.
    overhead_factor_by_op: dict = field(default_factory=dict)

    def with_fixed_costs_scaled(self, factor: float) -> "KernelRoof":
        """This roof with every term of its fixed cost per call times `factor` (perfsim.compare scales them by
        a run's cold-call probe over the calibration's); the compute roof and overlap stay."""
        return dataclasses.replace(self, overhead_us=self.overhead_us * factor, overhead_us_per_kv_mb=self.overhead_us_per_kv_mb * factor,
                                   overhead_us_per_operand_mb=self.overhead_us_per_operand_mb * factor,
                                   overhead_us_per_layer_mb=self.overhead_us_per_layer_mb * factor,
                                   overhead_us_per_kv_head=self.overhead_us_per_kv_head * factor)

    def with_compute_scaled(self, factor: float) -> "KernelRoof":
        """This roof with its compute roof times `factor` (perfsim.compare scales the GEMVs' and attention's
        by a run's compute probe over the calibration's); the fixed costs and overlap stay."""
        return dataclasses.replace(self, gflops=self.gflops * factor)


# How a kernel's compute roof follows the compute probe (perfsim.measure.compute_probe_gflops, the q4_0 GEMV's
# in-cache roof) when the host's CPU changes speed state: the roof is scaled by (probe / reference) ** this.
# The GEMVs are the probe's own kernel. Attention follows it at about half its ratio: timed alone beside the
# probe over 2,860 (one thread) and 3,988 (two) readings as the state flipped (2026-11-28), Phi-3 Mini's
# attention at context 512 (its K/V in L3) moved with the probe at an elasticity of 0.64 and 0.49, at 2048
# from DRAM 0.33 and 0.29. Scaled by the whole ratio, two sets of 24 sweep points predicted attention +6.6%
# and +14.7% slow on average (at two threads up to +58%: a calibration in the fast state, sweeps in the slow
# ones); by its square root, -3.9% and +4.3%, points holding every bound 21 -> 21 and 17 -> 19 of 24. (Scaling
# attention by the q4_0 GEMV's probe alone, calibration v32, one probe before and after a point, attention's roofs
# taken at other moments in whatever state the host was then, had Phi-3 Small's attention -10% to -26% on one
# thread; not scaling it, a slow state took Small's and Medium's attention to -14% to -31%.) The serial kernels,
# on one thread whatever the count, do not follow it (elasticity 0).
# Grouped-query attention (kernels "attention.*.gqa") follows it less. Over the twentieth session's eight rounds
# of sweeps, Phi-3 Small's and Medium's attention on one thread erred by the probe's ratio to the power -0.27
# and -0.30 (correlations -0.73 and -0.79; ratios 0.68-1.49): an elasticity of about 0.2, not 0.5. Timed
# beside the probe (Small's shape, contexts 1024 and 4096, ~6,000 readings each), it came out 0.30 and 0.19
# on one thread, 0.03 and 0.16 on two; Mini's multi-head shape 0.52 and 0.38, 0.75 and 0.17. Re-predicted at
# 0.2, those rounds' 192 points held every bound at 126 against 120 (with attention's cost per K/V head).
# (kernel name pattern, elasticity): the first pattern a kernel matches (fnmatch) gives its elasticity; none, 0.
PROBE_ELASTICITY_BY_KERNEL = (("gemv.*", 1.0), ("attention.*.gqa", 0.2), ("attention.*", 0.5))


def probe_elasticity(kernel: str) -> float:
    """The exponent `kernel`'s compute roof follows the compute probe's ratio by (0: it does not)."""
    return next((e for pattern, e in PROBE_ELASTICITY_BY_KERNEL if fnmatchcase(kernel, pattern)), 0.0)


def compute_state_factor(kernel: str, probe_ratio: float) -> float:
    """What `kernel`'s compute roof is multiplied by when the compute probe reads `probe_ratio` x its reference."""
    return probe_ratio ** probe_elasticity(kernel) if probe_ratio > 0 else 1.0


@dataclass(frozen=True)
class Reference:
    """A published decode measurement, shown beside the prediction."""

    model: str
    weights: str  # closest perfsim weight format (the publication's own words go in `note`)
    decode_tokens_per_s: float
    relation: str  # "=", ">" (at least), "<" (at most) or "~" (about), as the source states it
    source: str
    unit: str = ""  # the compute unit it ran on, when the source says
    note: str = ""

    @property
    def claim(self) -> str:
        return f"{RELATIONS[self.relation]}{self.decode_tokens_per_s:g} tokens/s"


@dataclass(frozen=True, eq=False)
class Device:
    name: str
    display_name: str
    kind: str
    memory_capacity_gb: float
    usable_memory_gb: float  # what one process may hold (a phone OS caps apps well below capacity)
    peak_bandwidth_gb_s: float
    units: dict  # name -> ComputeUnit
    default_unit: str
    references: tuple = ()
    sources: dict = field(default_factory=dict)
    notes: str = ""
    path: str = ""
    calibration: dict = field(default_factory=dict)  # host profiles: what was measured, where and when

    def unit(self, name: str | None = None) -> ComputeUnit:
        name = name or self.default_unit
        if name not in self.units:
            raise UserError(f"device {self.name!r} has no unit {name!r}; its units: {', '.join(self.units)}")
        return self.units[name]


THREAD_COUNT = "a thread count (a whole number >= 1)"


def _is_thread_count(k) -> bool:
    return isinstance(k, int) and k >= 1


def _thread_counts(fields: Fields) -> list:
    """The keys of a mapping by thread count, each checked to be one."""
    for threads in fields.data:
        if not _is_thread_count(threads):
            fields.fail(str(threads), f"expected {THREAD_COUNT} as the key")
    return list(fields.data)


def _positive_numbers(f: Fields, key: str, key_ok, expected_key: str) -> dict:
    """{key: positive number} under `key`, if present; every key passes `key_ok`, or the error says
    `expected_key` is what was expected as the key."""
    numbers = f.mapping(key, required=False)
    if numbers is None:
        return {}
    for k in numbers.data:
        if not key_ok(k):
            numbers.fail(str(k), f"expected {expected_key} as the key")
    out = {k: numbers.number(k, exclusive_minimum=0) for k in list(numbers.data)}
    numbers.done()
    return out


def _factors_by_head_dim(f: Fields, key: str) -> dict:
    """{head_dim: positive number} under `key`, if present."""
    return _positive_numbers(f, key, lambda k: isinstance(k, int) and not isinstance(k, bool) and k >= 1, "a head_dim (a whole number >= 1)")


def _factors_by_op(f: Fields, key: str) -> dict:
    """{decode op name: positive number} under `key`, if present."""
    from perfsim.workload import DECODE_OP_NAMES

    return _positive_numbers(f, key, lambda op: op in DECODE_OP_NAMES, f"a decode op name ({', '.join(DECODE_OP_NAMES)})")


def _numbers_by_threads(f: Fields, key: str) -> dict:
    """{thread count: positive number} under `key`, if present."""
    return _positive_numbers(f, key, _is_thread_count, THREAD_COUNT)


def _unit_from_fields(name: str, f: Fields) -> ComputeUnit:
    unit_type = f.text("type", choices=UNIT_TYPES)
    peaks = f.mapping("peak_tflops")
    peak_tflops = {p: peaks.number(p, exclusive_minimum=0, required=False) for p in MATH_PRECISIONS}
    peaks.done()
    peak_tflops = {p: v for p, v in peak_tflops.items() if v is not None}
    if not peak_tflops:
        peaks.fail("", f"expected at least one of {', '.join(MATH_PRECISIONS)}")
    is_cpu = unit_type == "cpu"
    by_threads = _numbers_by_threads(f, "bandwidth_gb_s_by_threads")
    cold_call_us_by_threads = _numbers_by_threads(f, "cold_call_us_by_threads")
    compute_probe_gflops_by_threads = _numbers_by_threads(f, "compute_probe_gflops_by_threads")
    kernel_roofs = {}
    kernels_fields = f.mapping("kernel_roofs", required=False)
    if kernels_fields is not None:
        for kernel in list(kernels_fields.data):
            per_threads = kernels_fields.mapping(kernel)
            roofs = {}
            for key in _thread_counts(per_threads):
                roof = per_threads.mapping(key)
                roofs[key] = KernelRoof(roof.number("gflops", exclusive_minimum=0), roof.number("overlap", minimum=0, maximum=1),
                                        roof.number("overhead_us", minimum=0),
                                        overlap_power=roof.number("overlap_power", minimum=1, required=False, default=0.0),
                                        overhead_us_per_kv_mb=roof.number("overhead_us_per_kv_mb", minimum=0, required=False, default=0.0),
                                        overhead_us_per_operand_mb=roof.number("overhead_us_per_operand_mb", minimum=0, required=False,
                                                                               default=0.0),
                                        overhead_us_per_layer_mb=roof.number("overhead_us_per_layer_mb", minimum=0, required=False, default=0.0),
                                        overhead_us_per_kv_head=roof.number("overhead_us_per_kv_head", minimum=0, required=False, default=0.0),
                                        time_factor_by_head_dim=_factors_by_head_dim(roof, "time_factor_by_head_dim"),
                                        overhead_factor_by_op=_factors_by_op(roof, "overhead_factor_by_op"))
                roof.done()
            per_threads.done()
            kernel_roofs[kernel] = roofs
        kernels_fields.done()
    unit = ComputeUnit(
        name=name,
        type=unit_type,
        peak_tflops=peak_tflops,
        compute_efficiency=f.number("compute_efficiency", exclusive_minimum=0, maximum=1),
        bandwidth_efficiency=f.number("bandwidth_efficiency", exclusive_minimum=0, maximum=1),
        overhead_us_per_op=f.number("overhead_us_per_op", minimum=0),
        cores=f.integer("cores", minimum=1, required=is_cpu, default=0),
        single_thread_bandwidth_gb_s=f.number("single_thread_bandwidth_gb_s", exclusive_minimum=0, required=is_cpu and not by_threads, default=0.0),
        bandwidth_gb_s_by_threads=by_threads,
        kernel_roofs=kernel_roofs,
        cold_call_us_by_threads=cold_call_us_by_threads,
        compute_probe_gflops_by_threads=compute_probe_gflops_by_threads,
    )
    f.done()
    return unit


def _reference_from_fields(f: Fields) -> Reference:
    from perfsim.quant import quant_format  # a reference's format must be one perfsim can model

    ref = Reference(
        model=f.text("model"),
        weights=f.text("weights"),
        decode_tokens_per_s=f.number("decode_tokens_per_s", exclusive_minimum=0),
        relation=f.text("relation", choices=tuple(RELATIONS)),
        source=f.text("source"),
        unit=f.text("unit", required=False, default=""),
        note=f.text("note", required=False, default=""),
    )
    f.done()
    try:
        quant_format(ref.weights)
    except UserError as e:
        f.fail("weights", str(e))
    return ref


def _numeric_paths(data, prefix=""):
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _numeric_paths(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(data, (int, float)) and not isinstance(data, bool):
        yield prefix


def _check_sources(top: Fields, data: dict, sources: dict):
    """Every number in the profile (outside references, which carry their own source) is cited."""
    cited = set(sources)
    for path in _numeric_paths({k: v for k, v in data.items() if k not in ("references", "sources", "calibration")}):
        parts = path.split(".")
        if not any(".".join(parts[:i]) in cited for i in range(1, len(parts) + 1)):
            top.fail("sources", f"no source for {path}; every number needs an entry (its path or a prefix) under sources:")


def device_from_data(data, where: str) -> Device:
    top = Fields(data, where)
    name = top.text("name")
    memory = top.mapping("memory")
    capacity_gb = memory.number("capacity_gb", exclusive_minimum=0)
    usable_gb = memory.number("usable_gb", exclusive_minimum=0, maximum=capacity_gb, required=False, default=capacity_gb)
    bandwidth = memory.number("peak_bandwidth_gb_s", exclusive_minimum=0)
    memory.done()
    units_fields = top.mapping("units")
    units = {unit_name: _unit_from_fields(unit_name, units_fields.mapping(unit_name)) for unit_name in list(units_fields.data)}
    units_fields.done()
    if not units:
        units_fields.fail("", "expected at least one compute unit")
    default_unit = top.text("default_unit", choices=tuple(units))
    source_fields = top.mapping("sources")
    sources = {key: source_fields.text(key) for key in list(source_fields.data)}
    source_fields.done()
    references = []
    for i, item in enumerate(top.items("references", required=False)):
        references.append(_reference_from_fields(Fields(item, where, f"references[{i}]")))
    calibration = {}
    calibration_fields = top.mapping("calibration", required=False)
    if calibration_fields is not None:
        c = calibration_fields
        calibration = {
            "cpu_model": c.text("cpu_model"), "cores": c.integer("cores", minimum=1), "measured_at": c.text("measured_at"),
            "perfsim_version": c.text("perfsim_version"), "calibration_version": c.integer("calibration_version", minimum=1),
            "seconds": c.number("seconds", minimum=0),
        }
        if c.data.get("cpu_id") is not None:  # vendor, family and model numbers (perfsim.calibrate.cpu_id); older profiles have none
            calibration["cpu_id"] = c.text("cpu_id")
        if c.data.get("other_load_fraction") is not None:  # CPU time other processes took meanwhile, over the cores' time
            calibration["other_load_fraction"] = c.number("other_load_fraction", minimum=0)
        if c.data.get("stolen_fraction") is not None:  # vCPU time the hypervisor gave other guests meanwhile (/proc/stat steal)
            calibration["stolen_fraction"] = c.number("stolen_fraction", minimum=0)
        if c.data.get("previous_bandwidth_gb_s_by_threads") is not None:  # the streaming reads of the calibration it replaced
            calibration["previous_bandwidth_gb_s_by_threads"] = _numbers_by_threads(c, "previous_bandwidth_gb_s_by_threads")
            calibration["previous_measured_at"] = c.text("previous_measured_at")
        second_looks = c.items("second_looks", required=False)  # in-cache roofs measured faster a second time
        if not all(isinstance(line, str) for line in second_looks):
            c.fail("second_looks", "expected a list of text lines")
        if second_looks:
            calibration["second_looks"] = list(second_looks)
        c.done()
    device = Device(
        name=name,
        display_name=top.text("display_name"),
        kind=top.text("kind", choices=DEVICE_KINDS),
        memory_capacity_gb=capacity_gb,
        usable_memory_gb=usable_gb,
        peak_bandwidth_gb_s=bandwidth,
        units=units,
        default_unit=default_unit,
        references=tuple(references),
        sources=sources,
        notes=top.text("notes", required=False, default=""),
        path=where,
        calibration=calibration,
    )
    top.done()
    _check_sources(top, data, sources)
    return device


def load_device_file(path: str | Path) -> Device:
    return device_from_data(load_yaml(Path(path)), str(path))


@cache
def _packaged_profiles() -> dict[str, Path]:
    folder = resources.files("perfsim.devices")
    return dict(sorted((Path(p.name).stem, Path(str(p))) for p in folder.iterdir() if p.name.endswith(".yaml")))


@cache
def builtin_devices() -> dict[str, Device]:
    return {name: get_device(name) for name in _packaged_profiles()}


@cache
def get_device(name: str) -> Device:
    """A shipped profile by name; only that file is read."""
    profiles = _packaged_profiles()
    if name not in profiles:
        raise UserError(f"unknown device {name!r}; known devices: {', '.join(profiles)}, host (or --device-file PATH)")
    return load_device_file(profiles[name])
