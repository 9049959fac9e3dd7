"""Measured decode on the host: run the engine, time every op, summarize as a Measurement.

The decoded tokens attend to context - n_tokens + 1 ... context positions (the cache is filled with
random K/V up to the first of them), so `--context 4096` measures the last tokens a Phi-3 Mini 4k
can decode, and the prediction compared with it is made at the same contexts.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
import weakref
from dataclasses import dataclass

from perfsim.errors import UserError
from perfsim.model import ModelSpec
from perfsim.quant import Formats
from perfsim.workload import check_context, decode_ops, memory_footprint


def interquartile_mean(values) -> float:
    """The mean of the middle half of `values` (a quarter of them, rounded down, left out at each end).

    What a measured decode reports of its steps: this host's steps are bimodal (its compute speed flips
    between two levels ~1.4x apart every 0.1-1 s), and the median of 16 steps lands in either mode; the
    mean takes in the odd disturbed step. Over the ninth session's 28 sweeps (504 points), the
    interquartile means of the measured and the predicted steps came within 10% at 269 of 280 Phi-3
    Mini points and 204 of 224 Phi-3 Small points, against 265 and 196 with medians."""
    return statistics.fmean(middle_half(values))


def middle_half(values) -> list:
    """`values` sorted, without the quarter (rounded down) at each end: what interquartile_mean averages."""
    ordered = sorted(values)
    cut = len(ordered) // 4
    return ordered[cut:len(ordered) - cut]


@dataclass(frozen=True)
class Measurement:
    model: ModelSpec
    formats: Formats
    threads: int
    contexts: tuple  # context of each measured step
    step_seconds: tuple  # wall time of each measured step
    op_seconds: dict  # op name -> per-step seconds (summed over layers), same order as step_seconds
    load_s: float  # weights read or generated, and repacked
    warmup_s: float  # first step, JIT compile or cache load included, minus a steady step
    peak_rss_bytes: int
    weights_origin: str
    stream_gb_s: float = 0.0  # median of the streaming passes run right before each step (read_pass_gb_s)
    step_stream_gb_s: tuple = ()  # each step's pass, same order as step_seconds
    cold_call_us: float = 0.0  # median of the cold-call probes run after each pass (cold_call_probe_us)
    step_cold_call_us: tuple = ()  # each step's probe, same order as step_seconds
    # Page faults the process took inside each step (minor: a page mapped, zeroed or copied). A steady
    # decode step takes a few (0-3 in each of 864 steps of 54 sweep points, Phi-3 Mini and Small): its
    # weights, K/V and scratch are mapped before; many more mean it paid for memory it did not ask for.
    step_page_faults: tuple = ()
    # Seconds the hypervisor ran something else on this VM's vCPUs during each step (/proc/stat's steal
    # column, all vCPUs summed; 10 ms ticks). A guest cannot see what its host does to it otherwise.
    # Nonzero only for a step whose every attempt was disturbed (timed_step re-runs the others).
    step_steal_s: tuple = ()
    set_aside_step_seconds: tuple = ()  # wall time of each attempt re-run because time was stolen during it
    kv_stream_gb_s: float = 0.0  # median of the K/V passes run before each step (read_kv_pass_gb_s; 0: none)
    step_kv_stream_gb_s: tuple = ()  # each step's K/V pass, same order as step_seconds
    compute_gflops: float = 0.0  # median of the compute probes run before each step (compute_probe_gflops; 0: none)
    step_compute_gflops: tuple = ()  # each step's compute probe, same order as step_seconds
    # memory-state ratios of whole runs measured again because the host's memory was in another state than when
    # calibrated (perfsim.compare.measured_in_calibrated_state), in the order they ran
    set_aside_memory_state_ratios: tuple = ()

    @property
    def decode_tokens_per_s(self) -> float:
        return 1.0 / interquartile_mean(self.step_seconds)

    @property
    def ms_per_token(self) -> float:
        return 1e3 * interquartile_mean(self.step_seconds)

    @property
    def stolen_fraction(self) -> float:
        """vCPU time the hypervisor took during the measured steps (all vCPUs summed) over their wall
        time: a measurement taken while the host ran other guests on our vCPUs says more about them."""
        return sum(self.step_steal_s) / sum(self.step_seconds) if self.step_steal_s else 0.0

    def op_time_s(self, name: str) -> float:
        return interquartile_mean(self.op_seconds[name])

    @property
    def each_step_stream_gb_s(self) -> tuple:
        """The streaming pass before each step; a run that kept only their median: it, for every step."""
        return self.step_stream_gb_s or (self.stream_gb_s,) * len(self.step_seconds)

    @property
    def each_step_kv_stream_gb_s(self) -> tuple:
        """The K/V pass before each step (0.0: none, the K/V then stream at the streaming pass's rate)."""
        return self.step_kv_stream_gb_s or (self.kv_stream_gb_s,) * len(self.step_seconds)

    @property
    def each_step_compute_gflops(self) -> tuple:
        """The compute probe before each step (0.0: none); a run that kept only their median: it, for every step."""
        return self.step_compute_gflops or (self.compute_gflops,) * len(self.step_seconds)

    @property
    def each_step_cold_call_us(self) -> tuple:
        """The cold-call probe before each step; a run that kept only their median: it, for every step."""
        return self.step_cold_call_us or (self.cold_call_us,) * len(self.step_seconds)


def _page_faults() -> int:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt + usage.ru_majflt


_TICKS_PER_S = []


def _own_cpus_ticks(path: str, cpus: set | None = None) -> list[int]:
    """The per-CPU lines of /proc/stat (user nice system idle iowait irq softirq steal ...) of the CPUs this
    process may run on (`cpus`, default its affinity), summed, in clock ticks since boot; the all-CPUs line
    where /proc/stat has no line for them; [] where it cannot be read. Under `taskset -c 0` with a process on
    the other vCPU, the all-CPUs line had a calibration warn that other processes "took 101% of the 1 cores"."""
    if not _TICKS_PER_S:
        _TICKS_PER_S.append(os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100)
    if cpus is None:
        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    try:
        with open(path, encoding="ascii") as f:
            lines = [line.split() for line in f if line.startswith("cpu")]
        all_cpus = [int(v) for v in lines[0][1:]] if lines and lines[0][0] == "cpu" else []
        own = [[int(v) for v in fields[1:]] for fields in lines if fields[0][3:].isdigit() and int(fields[0][3:]) in cpus]
        return [sum(column) for column in zip(*own)] if own else all_cpus
    except (OSError, ValueError):
        return []


def stolen_cpu_s(path: str = "/proc/stat", cpus: set | None = None) -> float:
    """Seconds stolen from the vCPUs this process may run on (`cpus`, default its affinity) since boot (0.0
    where /proc/stat has no steal column)."""
    ticks = _own_cpus_ticks(path, cpus)
    return ticks[7] / _TICKS_PER_S[0] if len(ticks) > 7 else 0.0


def busy_cpu_s(path: str = "/proc/stat", cpus: set | None = None) -> float:
    """Seconds the CPUs this process may run on (`cpus`, default its affinity) spent running something
    since boot (user, nice, system, irq, softirq), ours and every other process's; 0.0 where /proc/stat
    cannot be read."""
    ticks = _own_cpus_ticks(path, cpus)
    return (ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6]) / _TICKS_PER_S[0] if len(ticks) > 6 else 0.0


def available_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_threads(threads: int | None) -> int:
    cores = available_threads()
    if threads is None:
        return cores
    if not 1 <= threads <= cores:
        raise UserError(f"--threads must be between 1 and {cores} (this machine's cores), got {threads}")
    return threads


def check_run(model: ModelSpec, formats: Formats, context: int, n_tokens: int) -> None:
    """Bad options and a host too small are refused before anything is allocated."""
    import psutil

    if n_tokens < 1:
        raise UserError(f"--tokens must be at least 1, got {n_tokens}")
    check_context(model, context)
    if n_tokens > context:
        raise UserError(f"--tokens ({n_tokens}) cannot exceed --context ({context}): the measured tokens end at the context")
    needed = memory_footprint(model, formats, context).total_bytes
    available = psutil.virtual_memory().available
    if needed > 0.9 * available:
        raise UserError(f"{model.name} needs {needed / 1e9:.1f} GB ({formats.weights.name} weights + KV cache at {context}) "
                        f"but this host has {available / 1e9:.1f} GB available")


# A step the hypervisor took vCPU time from (steal) is run again, from the same position with the same
# token, at most this many times; the attempts set aside are kept in the record. Measured here
# (2026-11-27): Phi-3 Mini on 2 threads at context 512, steps with 70-110 ms stolen took 138-173 ms
# against ~80 ms undisturbed, and 7 such steps of 16 put the point's median 14% slow.
STEAL_RETRIES = 2


@dataclass(frozen=True)
class TimedStep:
    """One decode step as measured decode and calibration time it."""

    seconds: float
    stream_gb_s: float  # the streaming pass run right before it (read_pass_gb_s)
    cold_call_us: float  # the cold-call probe run after that pass (cold_call_probe_us)
    page_faults: int
    steal_s: float  # stolen during it: 0.0 unless every attempt was disturbed
    set_aside_s: tuple  # wall time of each earlier attempt, which had time stolen
    kv_stream_gb_s: float = 0.0  # the K/V pass run before the streaming pass (read_kv_pass_gb_s; 0: none)
    compute_gflops: float = 0.0  # the compute probe run before the passes (compute_probe_gflops; 0: none)


def host_before_step(threads: int, session) -> tuple:
    """(compute probe GFLOP/s, K/V pass GB/s, weights' pass GB/s): the microbenchmarks run right before a
    measured step, in this order (the passes leave the probe's matrices out of the caches), by measured
    decode, calibration's decode and the gate's decode rounds alike."""
    compute_gflops = compute_probe_gflops(threads)
    kv_stream_gb_s = read_kv_pass_gb_s(threads, session)
    return compute_gflops, kv_stream_gb_s, read_pass_gb_s(threads, session)


def timed_step(session, token: int, threads: int) -> TimedStep:
    """A compute probe, a K/V pass, a streaming pass, a cold-call probe, then session.step(token), timed (the
    passes leave the probe's matrices out of the caches); run again, probes and passes included, from the
    same position (the same K/V slot rewritten with the same values) while the hypervisor stole time during
    it or them, at most STEAL_RETRIES times: a pass it stole from reads low, and the step is then predicted
    at that rate (Phi-3 Mini on two threads, 13 steps of 16 re-run for steal in the step: its passes read
    8.4-19.7 GB/s, the steps' predictions 0.58-1.41x their measured GEMVs)."""
    position, set_aside = session.position, []
    for attempt in range(1 + STEAL_RETRIES):
        session.position = position
        steal_at_probes = stolen_cpu_s()
        compute_gflops, kv_stream_gb_s, stream_gb_s = host_before_step(threads, session)
        cold_call_us = cold_call_probe_us()
        faults_before, steal_before = _page_faults(), stolen_cpu_s()
        start = time.perf_counter()
        session.step(token)
        seconds = time.perf_counter() - start
        steal_after = stolen_cpu_s()
        page_faults, steal_s = _page_faults() - faults_before, steal_after - steal_before
        if steal_after - steal_at_probes <= 0 or attempt == STEAL_RETRIES:
            return TimedStep(seconds, stream_gb_s, cold_call_us, page_faults, steal_s, tuple(set_aside), kv_stream_gb_s, compute_gflops)
        set_aside.append(seconds)


def measure_decode(engine, context: int, n_tokens: int, threads: int, load_s: float = 0.0, seed: int = 0) -> Measurement:
    """Decode n_tokens ending at `context` with `threads` Numba threads; one warm-up step first.

    Each step follows a compute probe (compute_probe_gflops), a pass over its K/V cache and one over its
    weights (read_kv_pass_gb_s, read_pass_gb_s) and a cold-call probe (cold_call_probe_us), all untimed
    in the step: perfsim.compare predicts each step with the memory roofs of its own passes, its compute
    roofs scaled by its own compute probe and its fixed costs by its own cold-call probe
    (with_same_run_host). Other VMs share this host's DRAM, and its bandwidth drifts by 10-30% over a
    minute; a roof taken before and after 16 steps missed that drift. A step the hypervisor stole time
    from is run again (timed_step)."""
    from perfsim.kernels.jit import set_threads

    set_threads(threads)
    first = context - n_tokens
    session = engine.session(context)
    session.fill_cache(first, seed)
    start = time.perf_counter()
    session.step(1)  # warm-up: compiles or loads the kernels from Numba's cache, faults pages in
    warmup_step_s = time.perf_counter() - start
    session.position = first
    read_kv_pass_gb_s(threads, session)
    read_pass_gb_s(threads, session)  # compile or load the streaming kernel, fault its buffer in
    cold_call_probe_us()
    compute_probe_gflops(threads)
    token, steps, ops = 1, [], {name: [] for name in session.op_seconds}
    for _ in range(n_tokens):
        steps.append(timed_step(session, token, threads))
        token = session.next_token
        for name, seconds in session.op_seconds.items():
            ops[name].append(seconds)
    return Measurement(
        model=engine.model,
        formats=engine.formats,
        threads=threads,
        contexts=tuple(range(first + 1, context + 1)),
        step_seconds=tuple(s.seconds for s in steps),
        op_seconds={name: tuple(v) for name, v in ops.items()},
        load_s=load_s,
        warmup_s=max(warmup_step_s - interquartile_mean(s.seconds for s in steps), 0.0),
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        weights_origin=engine.weights.origin,
        stream_gb_s=statistics.median(s.stream_gb_s for s in steps),
        step_stream_gb_s=tuple(s.stream_gb_s for s in steps),
        kv_stream_gb_s=statistics.median(s.kv_stream_gb_s for s in steps),
        step_kv_stream_gb_s=tuple(s.kv_stream_gb_s for s in steps),
        compute_gflops=statistics.median(s.compute_gflops for s in steps),
        step_compute_gflops=tuple(s.compute_gflops for s in steps),
        cold_call_us=statistics.median(s.cold_call_us for s in steps),
        step_cold_call_us=tuple(s.cold_call_us for s in steps),
        step_page_faults=tuple(s.page_faults for s in steps),
        step_steal_s=tuple(s.steal_s for s in steps),
        set_aside_step_seconds=tuple(seconds for s in steps for seconds in s.set_aside_s),
    )


_STREAM_BUFFER = []
# 2x this host class's L3, and read last a whole decode step (GBs) ago, so every pass comes from DRAM;
# 128 MiB measured the same rates but added 67 MB to the peak resident memory of every measured run.
SAME_RUN_STREAM_BYTES = 64 * 2**20
SAMPLE_CHUNK_BYTES = 2**20  # a session's pass reads 64 chunks of its own memory (kernels/stream.py: sample_chunks)
# The end of a step (the lm_head, the last layer) may still be in the caches when the next step's pass
# runs: the sample leaves out the last 2x the L3 of the weights a step reads. In the first calibration
# model (180 MB) that is a third of them; in Phi-3 Mini (2.1 GB) 3%.
SAMPLE_SKIPS_LAST_BYTES = 64 * 2**20


# A K/V pass reads SAME_RUN_STREAM_BYTES of the cache, or all of it when it holds less, each byte once; under
# this much it is not timed (0.8 ms on two threads): at context 4000 the first calibration model's cache
# holds 123 MB before its last layer and the grouped-query model's 37 MB, Phi-3 Mini's 49 MB at context 128.
KV_SAMPLE_MIN_BYTES = 16 * 2**20

# session -> the chunks its passes read (typed Lists, or None): made once per session (~3 ms), as its
# weights and its K/V cache stay where they are
_WEIGHT_SAMPLES, _KV_SAMPLES = weakref.WeakKeyDictionary(), weakref.WeakKeyDictionary()


def _once_per_session(samples: weakref.WeakKeyDictionary, session, regions: list, n_bytes: int, min_bytes: int):
    """sample_chunks of `regions` (n_bytes of them, capped at what they hold), made on the session's first
    pass and kept in `samples`; None when the regions hold under min_bytes."""
    if session not in samples:
        from perfsim.kernels.stream import sample_chunks

        space = sum(r.nbytes for r in regions)
        samples[session] = sample_chunks(regions, min(n_bytes, space), SAMPLE_CHUNK_BYTES) if space >= min_bytes else None
    return samples[session]


def _session_sample(session):
    """The chunks of the session's weights its pass reads, or None for a model too small to sample from
    DRAM (the pass then reads its own buffer)."""
    if session in _WEIGHT_SAMPLES:
        return _WEIGHT_SAMPLES[session]
    regions, skipped = session.streamed_weights(), 0
    while regions and skipped < SAMPLE_SKIPS_LAST_BYTES:
        skipped += regions.pop().nbytes
    return _once_per_session(_WEIGHT_SAMPLES, session, regions, SAME_RUN_STREAM_BYTES, SAME_RUN_STREAM_BYTES)


def _session_kv_sample(session):
    """The chunks of the session's K/V cache its K/V pass reads: every layer's but the last (read shortly
    before the end of the previous step, it may still be in the caches), or None when those layers hold
    under KV_SAMPLE_MIN_BYTES. The previous step read the others long enough ago (a layer's MLP weights,
    30 MB and more, streamed after each), and the weights' pass follows this one."""
    regions = [array[: array.shape[0] - 1] for array in session.cache.arrays]  # whole layers: C-contiguous (views: no copy)
    return _once_per_session(_KV_SAMPLES, session, regions, SAME_RUN_STREAM_BYTES, KV_SAMPLE_MIN_BYTES)


def read_kv_pass_gb_s(threads: int, session) -> float:
    """One streaming read of a sample of the session's K/V cache (its allocation, the positions not yet
    written included: they were faulted in with the rest) with `threads` threads, in GB/s; 0.0 when its layers
    before the last hold under KV_SAMPLE_MIN_BYTES. The read rate of memory on this KVM host depends on where it
    landed, and a session's K/V cache is an allocation of its own: fourteen sessions of the first
    calibration model at context 4000, made one after another in one process, read 14.7-22.9 GB/s from
    their caches on two threads, and their attention streamed 11.1-16.6 GB/s, 0.70-0.83 of that
    (correlation 0.96 over the fourteen). The K/V bytes a step reads are predicted at this rate
    (perfsim.compare.with_same_run_host), the weights at read_pass_gb_s's."""
    from perfsim.kernels.jit import set_threads
    from perfsim.kernels.stream import read_chunks_s

    chunks = _session_kv_sample(session)
    if chunks is None:
        return 0.0
    set_threads(threads)
    return sum(c.nbytes for c in chunks) / read_chunks_s(chunks) / 1e9


def read_pass_gb_s(threads: int, session=None) -> float:
    """One streaming read with `threads` threads, in GB/s: the memory roof at the moment of the work that
    follows it. Calibration fits its kernels' `overlap` against passes of this same kind (one pass right
    before the work, not a best-of), so a prediction made with this roof is like for like.

    Given a decode session, the pass reads a sample of the weights its next step streams
    (Session.streamed_weights): SAME_RUN_STREAM_BYTES in chunks spread over them, where they were placed
    in memory. On this KVM host the rate of memory depends on where it landed: a pass over a 64 MiB
    buffer of its own once read 7.2-7.5 GB/s on one thread for a whole Phi-3 Medium sweep (10.8-11.4 in
    the others) while the GEMVs ran as usual, and in another sweep Phi-3 Small's GEMVs ran 9-18% slower
    than their buffer said. Measured in one process, at contexts 128 and 4000, the GEMVs of the first two
    calibration models and of Phi-3 Mini streamed 0.92-0.94 of this sample's rate on one thread, 0.86-0.90
    of the buffer's. A sample that took in the K/V the step reads too (mostly rows of a few tens of KB at
    short contexts, which read slower for being short) gave 0.91-1.07 and shifted calibration's q4_0 fit
    (overlap 0.31, fixed cost 0 on one thread, against 0.04-0.11 and 40-60 us); attention's own fit absorbs
    how its K/V reads against this roof. Without a session, or when a step streams under
    2 x SAME_RUN_STREAM_BYTES of weights (less than that is left once SAMPLE_SKIPS_LAST_BYTES are), the
    pass reads a buffer of SAME_RUN_STREAM_BYTES."""
    from perfsim.kernels.jit import set_threads
    from perfsim.kernels.stream import read_chunks_s, read_pass_s, stream_buffer

    set_threads(threads)
    chunks = _session_sample(session) if session is not None else None
    if chunks is not None:
        return sum(c.nbytes for c in chunks) / read_chunks_s(chunks) / 1e9
    if not _STREAM_BUFFER:
        _STREAM_BUFFER.append(stream_buffer(SAME_RUN_STREAM_BYTES))
    return _STREAM_BUFFER[0].nbytes / read_pass_s(_STREAM_BUFFER[0]) / 1e9


_COMPUTE_PROBE = []
COMPUTE_PROBE_CALLS = 5  # calls of each size a compute probe times, in turn: ~2 ms on one thread, ~1 ms on two


def compute_probe_gflops(threads: int) -> float:
    """The q4_0 GEMV's in-cache compute roof now, with `threads` threads, in GFLOP/s: the slope between a
    4 MiB and a 1 MiB matrix (calibration's in-cache bench), each timed COMPUTE_PROBE_CALLS times in turn,
    their medians. Run before every measured step (timed_step), in calibration as in measured decode.

    This host's compute speed changes state while its memory reads on as before. Measured here
    (2026-11-28, 5 slopes at a time, 40 times over 5 minutes): on two threads the probe read ~57, ~76 or
    ~111 GFLOP/s, holding one level for a second or more (57 is the one-thread roof: two threads doing
    the work of one, as if the two vCPUs shared a core); on one thread 56, and now and then 22-36. The
    memory-bound streaming pass does not see it; compute-heavy kernels do. Over 70 steps of Phi-3 Small at
    context 4000 on two threads, this probe taken before each step, in blocks of 5 steps, the GEMVs' and
    attention's speed followed the block's mean probe (correlation 0.84 each). A probe taken once before and
    once after a whole point (calibration v32) read either level for all its steps. perfsim.compare scales every
    parallel kernel's compute roof by a step's probe over the profile's (with_same_run_host), and
    calibration states every roof at the profile's probe (_state_normalized), each at the kernel's
    elasticity (perfsim.device.probe_elasticity: the GEMVs 1, multi-head attention 0.5, grouped-query 0.2)."""
    import numpy as np

    from perfsim.calibrate import _gemv_bench
    from perfsim.kernels.jit import set_threads

    if not _COMPUTE_PROBE:
        _COMPUTE_PROBE.append(_gemv_bench("q4_0"))
    bench = _COMPUTE_PROBE[0]
    set_threads(threads)
    bench.in_cache.run()
    bench.in_cache_quarter.run()
    whole_s, quarter_s = np.empty(COMPUTE_PROBE_CALLS), np.empty(COMPUTE_PROBE_CALLS)
    for i in range(COMPUTE_PROBE_CALLS):
        start = time.perf_counter()
        bench.in_cache.run()
        middle = time.perf_counter()
        bench.in_cache_quarter.run()
        whole_s[i], quarter_s[i] = middle - start, time.perf_counter() - middle
    whole, quarter = float(np.median(whole_s)), float(np.median(quarter_s))
    return 0.75 * bench.in_cache_flops / max(whole - quarter, 0.05 * whole) / 1e9


_PROBE_OPERANDS = []
PROBE_SIZE = 3072  # Phi-3 Mini's hidden size; calibration and measured decode run the same probe


def cold_call_probe_us() -> float:
    """Microseconds of three tiny serial kernel calls (an RMSNorm, a residual add and a SiLU-gated product
    of PROBE_SIZE values), run right after a streaming pass has left the caches cold: what a call on a
    cold call path costs the host at this moment. Serial ops' fixed costs in decode are such calls, and
    a shared host's varies: in one round (calibration v12), every op group of Phi-3 Mini ran 5-47%
    slower than calibration had predicted while the per-step streaming pass said the memory was no
    slower. Calibration records the probe beside its decode steps, and compare scales the fixed costs by
    the ratio, as the streaming pass sets the memory roof. Measured over three rounds: Mini's serial ops'
    mean |error| 32%, 16%, 16% without the scaling, 19%, 11%, 15% with it; Small's about even."""
    import numpy as np

    from perfsim.kernels.elementwise import residual_add, rmsnorm, silu_mul

    if not _PROBE_OPERANDS:
        rng = np.random.default_rng(0)
        _PROBE_OPERANDS.extend(rng.standard_normal(n).astype(np.float32) for n in (PROBE_SIZE, PROBE_SIZE, PROBE_SIZE, 2 * PROBE_SIZE))
    x, weight, out, gate_up = _PROBE_OPERANDS
    start = time.perf_counter()
    rmsnorm(x, weight, 1e-5, out)
    residual_add(out, x)
    silu_mul(gate_up, out)
    return (time.perf_counter() - start) * 1e6


def measurement_record(m: Measurement) -> dict:
    kinds = {op.name: op.kind for op in decode_ops(m.model, m.formats, m.contexts[-1])}
    return {
        "decode_tokens_per_s": m.decode_tokens_per_s,
        "ms_per_token": m.ms_per_token,
        "threads": m.threads,
        "contexts": [m.contexts[0], m.contexts[-1]],
        "steps": len(m.step_seconds),
        "step_seconds": list(m.step_seconds),
        "load_s": m.load_s,
        "warmup_s": m.warmup_s,
        "peak_rss_bytes": m.peak_rss_bytes,
        "stream_gb_s": m.stream_gb_s,
        "step_stream_gb_s": list(m.step_stream_gb_s),
        "kv_stream_gb_s": m.kv_stream_gb_s,
        "compute_gflops": m.compute_gflops,
        "step_compute_gflops": list(m.step_compute_gflops),
        "step_kv_stream_gb_s": list(m.step_kv_stream_gb_s),
        "cold_call_us": m.cold_call_us,
        "step_cold_call_us": list(m.step_cold_call_us),
        "step_page_faults": list(m.step_page_faults),
        "step_steal_s": list(m.step_steal_s),
        "stolen_fraction": m.stolen_fraction,
        "set_aside_step_seconds": list(m.set_aside_step_seconds),
        "set_aside_memory_state_ratios": list(m.set_aside_memory_state_ratios),
        "weights": m.weights_origin,
        "ops": [{"name": name, "kind": kinds[name], "time_s": m.op_time_s(name)} for name in m.op_seconds],
    }
