"""`perfsim calibrate`: measure the host's roofs with microbenchmarks and write a host profile.

What is measured, at each thread count, and never the end-to-end decode it is later compared with:
  - streaming read bandwidth (kernels/stream.py), the memory roof of every op;
  - per kernel, its fixed cost per call (a tiny problem), its compute roof with the data in cache
    (a problem of a few hundred KB, repeated), and how much of its compute fails to hide under the
    memory traffic (`overlap`, from one run on operands four times the L3, at shapes no Phi-3
    model has: 4096-wide matrices, 16 heads of 128).
The profile has the schema of devices/*.yaml (plus `kernel_roofs` and `calibration`) and is written
to a temporary file then renamed, so an interrupted run never leaves a half-written profile.
"""

from __future__ import annotations

import datetime
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from perfsim import __version__
from perfsim.device import Device, device_from_data
from perfsim.errors import UserError
from perfsim.workload import attention_kernel

CALIBRATION_VERSION = 4  # bump whenever what is measured changes: older profiles are re-measured
DRAM_BYTES = 96 * 2**20  # operands of the out-of-cache runs: 3x this host class's 32 MiB L3
# Operands of the in-cache runs: an eighth of this host class's 32 MiB L3, and large enough that the
# work (not the ~10 us fixed cost) dominates; 256 KiB runs were too short to time (+-50% roofs).
CACHE_BYTES = 4 * 2**20


def cache_dir() -> Path:
    return Path(os.environ.get("PERFSIM_CACHE_DIR") or Path.home() / ".cache" / "perfsim")


def host_profile_path() -> Path:
    return cache_dir() / "host.yaml"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def host_fingerprint() -> dict:
    from perfsim.measure import available_threads

    return {"cpu_model": cpu_model(), "cores": available_threads(), "calibration_version": CALIBRATION_VERSION}


def _median_call_s(call, min_repeats: int = 7, min_seconds: float = 0.05, before=None) -> float:
    """Median seconds of one call, after a warm-up call; repeats until both minimums are met.
    `before`, if given, runs (untimed) before each timed call."""
    call()
    times = []
    start = time.perf_counter()
    while len(times) < min_repeats or time.perf_counter() - start < min_seconds:
        if before is not None:
            before()
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
        if len(times) > 5000:
            break
    return statistics.median(times)


@dataclass(frozen=True)
class KernelBench:
    """Three calls of one kernel: tiny (its fixed cost), in cache (its compute roof), from DRAM (overlap)."""

    kernel: str
    parallel: bool
    tiny: object  # () -> None
    in_cache: object  # () -> None, operands of CACHE_BYTES
    in_cache_flops: float
    in_cache_quarter: object  # () -> None, the same at a quarter of the work: the slope is the compute roof
    dram: object = None  # () -> None, rotating over operands larger than the L3
    dram_flops: float = 0.0
    dram_bytes: float = 0.0


def _gemv_bench(fmt: str) -> KernelBench:
    from perfsim.kernels.gemv import gemv, random_f16, random_f32, random_q4_0, random_q8_0
    from perfsim.quant import quant_format

    make = {"q4_0": random_q4_0, "q8_0": random_q8_0, "f16": random_f16, "f32": random_f32}[fmt]
    bytes_per_weight = quant_format(fmt).bits_per_element / 8
    cols = 4096
    rng = np.random.default_rng(0)
    x = rng.standard_normal(cols).astype(np.float32)

    def bench(rows, copies=1):
        matrices = [make(rows, cols, seed=i) for i in range(copies)]
        out = np.empty(rows, np.float32)
        state = {"i": 0}

        def call():
            state["i"] += 1
            gemv(matrices[state["i"] % copies], x, out)

        return call

    cache_rows = max(256, int(CACHE_BYTES / (cols * bytes_per_weight)) // 256 * 256)  # whole 32-row tiles per thread
    dram_rows = int(DRAM_BYTES / 3 / (cols * bytes_per_weight)) // 32 * 32
    return KernelBench(
        f"gemv.{fmt}", True, bench(32), bench(cache_rows), 2.0 * cache_rows * cols, bench(cache_rows // 4),
        bench(dram_rows, copies=3), 2.0 * dram_rows * cols, dram_rows * cols * bytes_per_weight,
    )


def _attention_bench(fmt: str, group: int = 1) -> KernelBench:
    """Attention of 16 query heads of 128 over 16 / group kv heads: no Phi-3 model has this shape, so
    the calibration must carry over. Grouped-query attention reuses each K/V row for `group` heads
    from L1, a different compute roof, calibrated on its own (kernel key attention.FORMAT.gqa)."""
    from perfsim.kernels.attention import attention, attention_cost, kv_append, new_kv_cache

    n_heads, head_dim = 16, 128
    n_kv_heads = n_heads // group

    def cache_of(n_layers, n_positions):
        cache = new_kv_cache(n_layers, n_kv_heads, n_positions, head_dim, fmt)
        rng = np.random.default_rng(0)
        for layer in range(n_layers):
            for pos in range(n_positions):
                kv_append(cache, layer, pos, *rng.standard_normal((2, n_kv_heads, head_dim), dtype=np.float32))
        return cache

    q = np.random.default_rng(1).standard_normal((n_heads, head_dim)).astype(np.float32)
    out = np.empty((n_heads, head_dim), np.float32)

    def bench(n_layers, n_positions):
        cache = cache_of(n_layers, n_positions)
        state = {"i": 0}

        def call():
            state["i"] += 1
            attention(q, cache, state["i"] % n_layers, n_positions, out)

        return call

    cost = lambda n: attention_cost(n_heads, n_kv_heads, head_dim, n, fmt)
    dram_positions = int(DRAM_BYTES / 3 / (cost(1).kv_bytes))
    cache_positions = 1024 * group  # the same bytes in cache for either grouping
    return KernelBench(
        attention_kernel(fmt, n_heads, n_kv_heads), True, bench(1, 1), bench(1, cache_positions), cost(cache_positions).flops,
        bench(1, cache_positions // 4), bench(3, dram_positions), cost(dram_positions).flops, cost(dram_positions).bytes,
    )


def _serial_benches() -> list[KernelBench]:
    """Kernels that run on one thread: their cost is the call plus a little in-cache work."""
    from perfsim.engine import Embedding
    from perfsim.kernels import elementwise as ew
    from perfsim.kernels.attention import kv_append, kv_append_cost, new_kv_cache
    from perfsim.quant import quant_format
    from perfsim.kernels.embedding import embedding_cost

    rng = np.random.default_rng(0)
    vec = lambda n: rng.standard_normal(n).astype(np.float32)
    small, large = 256, 16384
    benches = []

    def rmsnorm(n):
        x, w, out = vec(n), vec(n), np.empty(n, np.float32)
        return lambda: ew.rmsnorm(x, w, 1e-5, out)

    def silu_mul(n):
        gate_up, out = vec(2 * n), np.empty(n, np.float32)
        return lambda: ew.silu_mul(gate_up, out)

    def residual(n):
        x, d = vec(n), vec(n) * 0
        return lambda: ew.residual_add(x, d)

    def argmax(n):
        logits = vec(n)
        return lambda: ew.argmax(logits)

    def rope(n_heads):
        x, tables = vec(n_heads * 128).reshape(n_heads, 128), ew.rope_tables(4, 128)
        return lambda: ew.rope_rotate(x, tables.cos[1], tables.sin[1])

    benches += [
        KernelBench("rmsnorm", False, rmsnorm(small), rmsnorm(large), ew.rmsnorm_cost(large).flops, rmsnorm(large // 4)),
        KernelBench("silu_mul", False, silu_mul(small), silu_mul(large), ew.silu_mul_cost(large).flops, silu_mul(large // 4)),
        KernelBench("residual_add", False, residual(small), residual(large), ew.residual_add_cost(large).flops, residual(large // 4)),
        KernelBench("argmax", False, argmax(small), argmax(4 * large), ew.argmax_cost(4 * large).flops, argmax(large)),
        KernelBench("rope", False, rope(2), rope(64), ew.rope_cost(64, 128).flops, rope(16)),
    ]
    for fmt in ("f16", "q8_0", "f32"):
        def append(n_heads, fmt=fmt, n_layers=16, n_positions=256):
            # As in decode: each call writes the next layer, each head's row far from the others (measured
            # 14 us a call into one layer's cache, 24 us rotating over 32 layers, 31-38 us in decode).
            cache, kv = new_kv_cache(n_layers, n_heads, n_positions, 128, fmt), vec(2 * n_heads * 128).reshape(2, n_heads, 128)
            for array in cache.arrays:  # fault every page in now: a first touch (a huge page zeroed) inside
                array.fill(0)           # a timed call made kv_append look 1000x slower than it is in decode
            call = iter(range(10**9))

            def run():
                i = next(call)
                kv_append(cache, i % n_layers, (i // n_layers) % n_positions, kv[0], kv[1])
            return run
        # f32 appends count no FLOPs, so their roof is never divided into; 1 keeps gflops positive.
        flops = kv_append_cost(64, 128, fmt).flops or 1.0
        benches.append(KernelBench(f"kv_append.{fmt}", False, append(1), append(64), flops, append(16)))
    for fmt in ("q4_0", "q8_0", "f16", "f32"):
        def embedding(n, fmt=fmt):
            f = quant_format(fmt)
            if f.block_size == 1:
                table = vec(4 * n).reshape(4, n).astype(np.float16 if fmt == "f16" else np.float32)
            else:
                table = rng.integers(0, 256, size=(4, n // 32 * f.block_bytes), dtype=np.uint8)
                table.reshape(4, -1, f.block_bytes)[:, :, :2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
            emb, out = Embedding(f, table), np.empty(n, np.float32)
            return lambda: emb.row(2, out)
        benches.append(KernelBench(f"embedding.{fmt}", False, embedding(small), embedding(large), embedding_cost(large, quant_format(fmt)).flops,
                                   embedding(large // 4)))
    return benches


def _kernel_roof(bench: KernelBench, bandwidth_bytes_per_s: float, stream_read) -> dict:
    # In decode every op follows a GEMV that has streamed megabytes through the caches, so the fixed
    # cost is timed after an 8 MiB streaming read: measured on this host class, a hot loop calls
    # rmsnorm in 2.5 us and kv_append in 5 us, but 4-10 us and 12-30 us after such a read, as in decode.
    overhead_s = _median_call_s(bench.tiny, before=stream_read)
    # Serial kernels touch a few KB per call, all of it cold in decode: their work is timed cold too
    # (kv_append writes one 192-byte row per head, each a cache miss: ~1 us a head, not 10 ns).
    cold = None if bench.parallel else stream_read
    in_cache_s = _median_call_s(bench.in_cache, before=cold)
    quarter_s = _median_call_s(bench.in_cache_quarter, before=cold)
    # The slope between the two in-cache sizes is the compute roof, free of the fixed cost per call.
    gflops = 0.75 * bench.in_cache_flops / max(in_cache_s - quarter_s, 0.05 * in_cache_s) / 1e9
    overlap = 0.0
    if bench.dram is not None:
        # The memory roof right beside the DRAM run: the host's bandwidth drifts by 10-20% over a minute
        # (other VMs share its DRAM), which made this fit swing between 0 and 0.7 from run to run.
        from perfsim.measure import same_run_read_gb_s
        from perfsim.kernels.jit import threads_in_use

        # One fit swung 0.0-0.4 between calibrations; the median of three, each with its own roof, is steadier.
        fits = []
        for _ in range(3):
            bandwidth_before = same_run_read_gb_s(threads_in_use())
            dram_s = _median_call_s(bench.dram, min_repeats=7, min_seconds=0.1) - overhead_s
            bandwidth_bytes_per_s = 0.5e9 * (bandwidth_before + same_run_read_gb_s(threads_in_use()))
            compute_s, memory_s = bench.dram_flops / (gflops * 1e9), bench.dram_bytes / bandwidth_bytes_per_s
            fits.append(min(max((dram_s - max(compute_s, memory_s)) / min(compute_s, memory_s), 0.0), 1.0))
        overlap = statistics.median(fits)
    return {"gflops": _sig(gflops), "overlap": round(overlap, 4), "overhead_us": _sig(overhead_s * 1e6)}


def _sig(x: float) -> float:
    """Four significant digits: the profile stays readable and no small roof rounds to zero."""
    return float(f"{x:.4g}")


def measure_host(progress=None) -> dict:
    """All the microbenchmarks; returns the host profile as YAML-ready data."""
    from perfsim.kernels.jit import set_threads
    from perfsim.kernels.stream import best_read_gb_s, stream_buffer, sum_int64
    from perfsim.measure import available_threads

    started = time.perf_counter()
    report = progress or (lambda done, total, what: None)
    cores = available_threads()
    thread_counts = list(range(1, cores + 1))
    parallel = [_gemv_bench(f) for f in ("q4_0", "q8_0", "f16", "f32")]
    parallel += [_attention_bench(f, group) for f in ("f16", "q8_0", "f32") for group in (1, 4)]
    serial = _serial_benches()
    total = len(thread_counts) * (1 + len(parallel)) + len(serial)
    done = 0
    data = stream_buffer(256 * 2**20)
    flush = stream_buffer(8 * 2**20)
    stream_read = lambda: sum_int64(flush)
    bandwidth_gb_s, kernel_roofs = {}, {b.kernel: {} for b in parallel + serial}
    for threads in thread_counts:
        report(done, total, f"read bandwidth, {threads} threads")
        bandwidth_gb_s[threads] = _sig(best_read_gb_s(threads, data, repeats=9))
        done += 1
        for bench in parallel:
            report(done, total, f"{bench.kernel}, {threads} threads")
            set_threads(threads)
            kernel_roofs[bench.kernel][threads] = _kernel_roof(bench, bandwidth_gb_s[threads] * 1e9, stream_read)
            done += 1
    del data
    for bench in serial:  # one thread whatever Numba's setting: measured once, valid for every count
        report(done, total, bench.kernel)
        set_threads(1)
        roof = _kernel_roof(bench, bandwidth_gb_s[1] * 1e9, stream_read)
        for threads in thread_counts:
            kernel_roofs[bench.kernel][threads] = roof
        done += 1
    report(total, total, "done")
    import psutil

    fingerprint = host_fingerprint()
    measured_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    how = f"measured by perfsim calibrate {__version__} on {fingerprint['cpu_model']} at {measured_at}"
    best = lambda prefix: max(r[cores]["gflops"] for k, r in kernel_roofs.items() if k.startswith(prefix)) / 1e3
    return {
        "name": "host",
        "display_name": f"{fingerprint['cpu_model']} (this host, calibrated)",
        "kind": "host",
        "notes": "Calibrated by microbenchmarks of perfsim's own kernels; no end-to-end decode is measured to make it.",
        "memory": {
            "capacity_gb": round(psutil.virtual_memory().total / 1e9, 3),
            "peak_bandwidth_gb_s": max(bandwidth_gb_s.values()),
        },
        "default_unit": "cpu",
        "units": {
            "cpu": {
                "type": "cpu",
                "cores": cores,
                "peak_tflops": {"f32": _sig(best("attention.f32")), "f16": _sig(best("gemv.f16")), "int8": _sig(best("gemv.q4_0"))},
                "compute_efficiency": 1.0,
                "bandwidth_efficiency": 1.0,
                "bandwidth_gb_s_by_threads": bandwidth_gb_s,
                "overhead_us_per_op": kernel_roofs["residual_add"][1]["overhead_us"],
                "kernel_roofs": kernel_roofs,
            }
        },
        "sources": {
            "memory.capacity_gb": f"psutil.virtual_memory().total at {measured_at}",
            "memory.peak_bandwidth_gb_s": f"{how}: the best streaming read over thread counts (kernels/stream.py, 256 MiB)",
            "units.cpu.cores": "os.sched_getaffinity: the cores this process may run on",
            "units.cpu.peak_tflops": f"{how}: in-cache throughput of the fastest kernel of each precision",
            "units.cpu.compute_efficiency": "1: the peaks above are achieved, not vendor, figures",
            "units.cpu.bandwidth_efficiency": "1: the bandwidths are measured",
            "units.cpu.bandwidth_gb_s_by_threads": f"{how}: streaming read of 256 MiB, best of 9",
            "units.cpu.overhead_us_per_op": f"{how}: one call of a tiny serial kernel",
            "units.cpu.kernel_roofs": f"{how}: per kernel, tiny / in-cache / out-of-cache runs at non-Phi-3 shapes",
        },
        "calibration": dict(fingerprint, measured_at=measured_at, perfsim_version=__version__, seconds=round(time.perf_counter() - started, 1)),
    }


def write_profile(data: dict, path: Path) -> Device:
    """Validate, then write to a temporary file and rename: no half-written profile is ever read."""
    device = device_from_data(data, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(f"# Host profile written by perfsim calibrate {__version__}; re-run it to refresh.\n")
            yaml.safe_dump(data, f, sort_keys=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return device


def calibrate_host(progress=None, path: Path | None = None) -> Device:
    path = path or host_profile_path()
    return write_profile(measure_host(progress), path)


def stale_reason(device: Device) -> str | None:
    """Why a saved host profile may not be used on this machine, or None."""
    fingerprint = host_fingerprint()
    saved = device.calibration
    if not saved:
        return "it has no calibration record"
    for key, value in fingerprint.items():
        if saved.get(key) != value:
            return f"it was measured with {key} = {saved.get(key)!r}, this host has {value!r}"
    return None


def load_host_profile(progress=None, message=None, recalibrate: bool = True) -> Device:
    """The saved host profile; missing, stale or corrupt, it is re-measured (with a message)."""
    from perfsim.device import load_device_file

    path = host_profile_path()
    tell = message or (lambda text: None)
    reason = None
    if not path.exists():
        reason = f"no host profile at {path}"
    else:
        try:
            device = load_device_file(path)
            stale = stale_reason(device)
            if stale is None:
                return device
            reason = f"the host profile at {path} is stale: {stale}"
        except UserError as e:
            reason = f"the host profile at {path} is unreadable ({e})"
    if not recalibrate:
        raise UserError(f"{reason}; run 'perfsim calibrate'")
    tell(f"{reason}; calibrating this host (under a minute) ...")
    return calibrate_host(progress, path)
