"""`perfsim gate`: a performance gate for CI. Did a change make a kernel slower, or move what the
performance model predicts?

CI machines are shared and noisy, so no metric is an absolute speed. Each is a ratio that stays put
across runs on one machine:
  kernels   a kernel's achieved GB/s (bytes from its cost formula / wall time) over the streaming read
            bandwidth (kernels/stream.py) measured in the same round, at the same thread count;
  decode    Phi-3 Mini q4_0 decode, weight bytes per token x tokens/s over the same-round read bandwidth;
  accuracy  the signed error of the host prediction against a real decode step (perfsim.compare, the
            host profile's read bandwidth replaced by the one measured in the same round); and the
            prediction for every published reference in the shipped device profiles, which is
            deterministic and may not move at all.

Noise handling. A round is one streaming pass (256 MiB, 8x the L3) immediately followed by the
timed work, and gives one ratio. A round is *clean* when the process got the CPUs it asked for in both
halves (process CPU time >= 90% of threads x wall time; another process on our core shows up as
missing CPU time). A metric is the median of its clean rounds (15 wanted, at least 5, within a time
budget); with fewer clean rounds it is the median of all of them and is flagged "busy". Each work item
is a sweep over enough copies of the operands (>= 96 MiB, 3x the L3) that every call reads DRAM.
A kernel round also reads a CPU-speed probe first (kernels/probe.py, no code shared with the kernels),
and the baseline records its median: a kernel metric is the median of the clean rounds in the baseline's
CPU-speed state (the probe at >= CPU_SPEED_FRACTION of the baseline's), or, with fewer than 5 of those,
of all clean rounds, flagged "slow CPU". Likewise the baseline records its kernel metrics' median streaming
pass, and of the rounds in its CPU-speed state only those whose pass read within MEMORY_STATE_RATIO of it
count (with fewer than 5, all of them, flagged "other memory state"). A metric beyond its tolerance is
re-measured up to twice more and fails only if every attempt does; a failing attempt that was busy, had a
slow CPU or met another memory state is re-measured after a pause without using up a retry (8 such pauses
of each kind per gate run at most).

Tolerances (made by --update-baseline, which runs the suites UPDATE_RUNS times, each with freshly
allocated operands): value = median of the runs; spread = a robust sigma of the metric (the larger of
1.4826 x MAD over runs and the standard error of one run's median); tolerance = K_SPREAD x spread,
clamped to [floor, cap]. The floor (20% for ratios, 0.15 for a prediction error) covers what this
class of shared 2-core VM moves between processes even when quiet (the neighbours' memory traffic,
page placement); the cap (25% / 0.20) keeps a 1.5x slower kernel (-33%) always detectable even
from a noisy baseline. Deterministic predictions get a 1e-9 relative tolerance.

The baseline (JSON, committed) records the machine it came from (perfsim.calibrate.host_fingerprint),
and gates/ keeps one per machine class, named after it (baseline-amd-epyc-2-cores.json): by default the
gate compares against this machine's. A baseline from another CPU model or core count is refused unless
--allow-other-machine; one from another CPU generation under the same model name (its cpu_id) is compared
with a note.

Exit codes: 0 pass, 1 a regression, 2 bad input (perfsim.errors.UserError).
"""

from __future__ import annotations

import dataclasses
import datetime
import fnmatch
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from perfsim.errors import UserError
from perfsim.files import write_text_atomically
from perfsim.kernels.jit import max_threads, set_threads, threads_in_use

BASELINE_FORMAT = "perfsim-gate-baseline"
BASELINE_VERSION = 1

# --- measurement settings ------------------------------------------------------------------------------------
STREAM_BYTES = 256 * 2**20  # the same-round roof: one pass, 8x the 32 MiB L3 (calibrate's size)
EVICT_BYTES = 96 * 2**20  # a kernel sweep touches at least this much (3x the L3): every call reads DRAM
CLEAN_CPU_FRACTION = 0.9  # a round is clean if CPU time >= this x threads x wall time, in both halves
TARGET_ROUNDS = 15  # clean rounds wanted per metric
MIN_CLEAN_ROUNDS = 5  # fewer clean rounds than this: the median of all rounds, flagged busy
ROUND_BUDGET_S = 3.0  # per metric and attempt: stop looking for clean rounds after this long
RETRIES = 2  # re-measurements of a failing metric before it counts
# Seconds before each re-measurement. It was 1 s, and on the Skylake-SP host one CI run (fresh clone, after
# the test suite) saw every ratio 6-12% low and Phi-3 Mini's attention 24-25% low in all three attempts,
# with clean rounds throughout; in the same clone two minutes later it read -1% and -6%. A slow spell of the
# host lasts longer than 3 s, so the retries are spread over a minute.
RETRY_PAUSE_S = 30.0
# A failing attempt that was busy (too few clean rounds) says more about the neighbours than the code:
# it is re-measured after a pause without using up a retry, up to this many times per gate run.
BUSY_RETRIES = 8
BUSY_PAUSE_S = 5.0
# The CPU's speed state. On the Skylake-SP host the CPU runs slow for seconds to an hour at a time while
# memory reads on as before (perfsim.kernels.probe), and kernels close to balanced between compute and memory
# lose their share of the stream: the one-thread q4_0 GEMV at 3072x8192 read 0.89 of it in the fast state and
# 0.76 in the slow one, and failed one CI run at 0.70 against a baseline of 0.907 (sixteenth session). A kernel
# round therefore reads a CPU-speed probe that shares no code with the kernels (kernels/probe.py), and the
# baseline records its median. A round is in the baseline's state when its probe read at least this fraction
# of the baseline's (the fast state read 21-24 GFLOP/s on one thread, the slow one 13-16): the metric is the
# median of the clean rounds in that state, when at least MIN_CLEAN_ROUNDS were; else of all clean rounds,
# flagged "slow CPU". Measured over 2,185 rounds of each metric in 5 minutes, rounds kept by this fraction of
# the fast state's probe read 0.883 of the stream (3072x8192, one thread), those left out 0.791.
CPU_SPEED_FRACTION = 0.85
# A failing attempt flagged slow CPU is re-measured after a pause without using up a retry, like a busy one.
SLOW_CPU_RETRIES = 8
SLOW_CPU_PAUSE_S = 15.0
# The memory's state. On the Zen 4 EPYC guest (2026-12) the two-thread streaming pass moves between about 33 and
# about 50 GB/s for seconds to minutes at a time, while the CPU-speed probe reads on as before, and the kernels do
# not follow the pass all the way. Over 727 clean rounds of the two-thread q8_0 GEMV at 9216x3072 (40 gate-like
# measurements in 6 minutes), rounds whose pass read 33-36 GB/s gave 0.909 of it (the kernel at 31.0 GB/s) and
# those at 45-60 GB/s 0.755 (37.7 GB/s); the one-thread q4_0 GEMVs read 0.85 of a pass at 24-30 GB/s and 0.80 at
# 30-40. One fresh-clone CI run (nineteenth session) met a 41 GB/s state and its q8_0 metric read 0.52 and 0.53
# against a baseline of 0.83 (passed on its third attempt, 0.68). The baseline therefore records each kernel
# metric's median pass, and a kernel round counts when its pass read within this factor of it (either way: a
# slower memory flatters a kernel's share as a faster one understates it); with fewer than MIN_CLEAN_ROUNDS such
# rounds, the metric is the median of the clean rounds in the CPU-speed state, flagged "other memory state", and a
# failing attempt so flagged is re-measured after a pause without using up a retry.
MEMORY_STATE_RATIO = 1.2
MEMORY_STATE_RETRIES = 8
MEMORY_STATE_PAUSE_S = 15.0

# --- tolerance policy ----------------------------------------------------------------------------------------
UPDATE_RUNS = 5  # --update-baseline: runs of each suite the baseline is the median of
K_SPREAD = 5.0
# Floors: between separate gate processes on the quiet 2-core box, the ratios moved with a robust sigma
# of 2-7% (up to 8% from the baseline in ten runs) and the host prediction error by ~0.05: more than the
# 5 in-process runs of --update-baseline see, so a floor of ~2 sigma, and a failure must repeat 3 times.
# Caps: a 1.5x slower kernel (-33%) always fails, however noisy the baseline was. Widened from 12/20% after
# a run on the final tree saw attention at 2 threads 15.6% under its baseline (a false alarm blocks every
# change from landing; -33% less this box's worst 8% noise still clears a 25% cap).
# The relative floor went from 15% to 20% on the Skylake-SP host (twelfth session): the two-thread q4_0 GEMV
# at 16384x3072 read 0.773 and 0.774 of the stream in two fresh-clone CI runs (the gate after the test suite),
# 0.824 in a quiet gate run alone, against 0.82-0.91 in the five runs of --update-baseline (value 0.898):
# -13.8% from a baseline whose runs spread 2%, 1.2 points inside a 15% floor.
RELATIVE_FLOOR, RELATIVE_CAP = 0.20, 0.25  # fractions of the baseline value (ratios)
# The host error of a 15-round median moves with each gate run's own calibration, which the baseline's runs
# (one calibration) do not see: over six fresh-clone CI runs, three of calibration v26 and three of v27, it came
# out -0.123 (a first try; -0.064 on the second) to +0.112, against baselines of +0.10 and +0.01. Floor 0.15
# (0.10 before v27, whose baseline of +0.099 hid that spread). Floor 0.20, the cap (2026-12-07, the Zen 4 EPYC
# guest, calibration v39): seven gates, each after a fresh calibration, ended at -0.035 to +0.165 at context 256
# and -0.006 to +0.161 at 2048 against a baseline of -0.02 and -0.00, and three first tries read +0.17 to +0.29
# (passed on the second); the baseline's own five runs spread 0.017 and 0.037.
ABSOLUTE_FLOOR, ABSOLUTE_CAP = 0.20, 0.20  # in the metric's units (signed prediction errors)
DETERMINISTIC_RTOL = 1e-9

DIRECTIONS = ("higher", "lower", "abs_lower", "equal")
DIRECTION_TEXT = {"higher": "higher is better", "lower": "lower is better", "abs_lower": "closer to 0 is better",
                  "equal": "must not move"}

# --- what is measured --------------------------------------------------------------------------------------
# q4_0 at Phi-3 Mini's qkv, gate_up and down shapes; q8_0 at one shape.
GEMV_SHAPES = (("q4_0", 9216, 3072), ("q4_0", 16384, 3072), ("q4_0", 3072, 8192), ("q8_0", 9216, 3072))
ATTENTION_CASES = (("f16", 2048),)
# Phi-3 Mini with 8 of its 32 layers: generating the full model's random weights takes ~40 s on the
# 2-core box (over the gate's budget); 8 layers still read 565 MB of weights per token, 18x the L3.
DECODE_LAYERS = 8
DECODE_CONTEXTS = (256, 2048)
REFERENCE_CONTEXT, REFERENCE_PROMPT = 256, 128  # perfsim profile's defaults


# =============================================================================================================
# Samples, probes and suites


@dataclass
class Sample:
    """One measurement of one metric."""

    value: float
    spread: float = 0.0  # robust sigma of one round's value, in the metric's units (0: deterministic)
    rounds: int = 1  # rounds the value is the median of
    total_rounds: int = 1  # rounds run, dirty ones included
    busy: bool = False  # too few clean rounds: the value is the median of all of them
    slow_cpu: bool = False  # too few clean rounds in the baseline's CPU-speed state: the median of all clean rounds
    other_memory_state: bool = False  # too few of those in its memory state: the median of the ones in its CPU-speed state
    detail: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Probe:
    name: str
    description: str
    direction: str  # one of DIRECTIONS
    tolerance: str  # relative | absolute | exact
    measure: Callable[[], Sample]
    display: str = "fraction"  # fraction | error | tokens/s: how values print


class Host:
    """What the probes of one gate invocation share: the stream buffer, the decode engine, the host
    profile (all slow to make), the thread counts and the progress callback."""

    def __init__(self, progress: Callable[[str], None] | None = None):
        self.progress = progress or (lambda message: None)
        self._stream = None
        self._engine = None
        self._profile = None
        self.decode_cache = {}  # context -> Rounds of this run (see decode_rounds)
        # a gate run's budget of re-measurements that use up no retry, per Sample flag (_free_retry_kinds)
        self.free_retries_left = {"busy": BUSY_RETRIES, "slow_cpu": SLOW_CPU_RETRIES, "other_memory_state": MEMORY_STATE_RETRIES}
        self.cpu_speed_baseline = {}  # metric name -> the baseline's CPU-speed probe, GFLOP/s (kernel suite)
        self.stream_baseline = {}  # metric name -> the baseline's median streaming pass, GB/s (kernel suite)

    def new_run(self) -> None:
        """--update-baseline: the next run measures everything afresh."""
        self.decode_cache.clear()

    @property
    def all_threads(self) -> int:
        from perfsim.kernels.jit import max_threads
        from perfsim.measure import available_threads

        return max(1, min(available_threads(), max_threads()))

    @property
    def thread_counts(self) -> tuple:
        return tuple(sorted({1, self.all_threads}))

    def stream(self):
        if self._stream is None:
            from perfsim.kernels.stream import stream_buffer

            self._stream = stream_buffer(STREAM_BYTES)
        return self._stream

    def engine(self):
        if self._engine is None:
            from perfsim.engine import Engine

            model = decode_model()
            self.progress(f"gate: generating random q4_0 weights of {model.name} ({DECODE_LAYERS} of 32 layers) ...")
            start = time.perf_counter()
            self._engine = Engine.random(model, "q4_0", "f16", seed=0)
            self.progress(f"gate: weights generated in {time.perf_counter() - start:.1f} s")
        return self._engine

    def accuracy_probe_names(self) -> list[str]:
        """The names of the host accuracy probes (the ones that need the host profile)."""
        return [_host_accuracy_name(self, context) for context in DECODE_CONTEXTS]

    def profile(self):
        if self._profile is None:
            from perfsim.calibrate import load_host_profile

            self._profile = load_host_profile(message=self.progress)
        return self._profile


def decode_model():
    from perfsim.model import get_model

    return dataclasses.replace(get_model("phi-3-mini"), n_layers=DECODE_LAYERS, name=f"phi-3-mini-{DECODE_LAYERS}l")


def thread_tag(threads: int, host: Host) -> str:
    """t1 or tall (every core): names stay the same on a machine with another core count."""
    return "tall" if threads == host.all_threads and threads > 1 else f"t{threads}"


def robust_sigma(values) -> float:
    if len(values) < 2:
        return 0.0
    center = statistics.median(values)
    return 1.4826 * statistics.median(abs(v - center) for v in values)


@dataclass(frozen=True)
class Round:
    stream_gb_s: float  # the streaming pass
    work_s: float  # the timed work right after it
    clean: bool  # both halves got threads x wall time of CPU (no other process on our cores)
    result: object = None  # what work() returned
    kv_stream_gb_s: float = 0.0  # decode rounds: the K/V pass before the streaming pass (perfsim.measure.read_kv_pass_gb_s)
    compute_gflops: float = 0.0  # decode rounds: the compute probe before the passes (perfsim.measure.compute_probe_gflops)
    cpu_speed_gflops: float = 0.0  # kernel rounds: the CPU-speed probe before the pass (perfsim.kernels.probe)
    in_state: bool = True  # the probe read at least CPU_SPEED_FRACTION of the baseline's (always, without one)
    in_memory_state: bool = True  # the pass read within MEMORY_STATE_RATIO of the baseline's (always, without one)


@dataclass(frozen=True)
class Rounds:
    threads: int
    rounds: tuple
    cpu_speed_baseline: float | None = None  # the baseline's CPU-speed probe, GFLOP/s (None: not judged)
    stream_baseline: float | None = None  # the baseline's median streaming pass, GB/s (None: not judged)

    @property
    def busy(self) -> bool:
        return sum(r.clean for r in self.rounds) < MIN_CLEAN_ROUNDS

    @property
    def slow_cpu(self) -> bool:
        return not self.busy and sum(r.clean and r.in_state for r in self.rounds) < MIN_CLEAN_ROUNDS

    @property
    def other_memory_state(self) -> bool:
        return (not self.busy and not self.slow_cpu
                and sum(r.clean and r.in_state and r.in_memory_state for r in self.rounds) < MIN_CLEAN_ROUNDS)

    @property
    def used(self) -> tuple:
        """The clean rounds in the baseline's CPU-speed and memory states; those in its CPU-speed state when too
        few were also in its memory state (other memory state); all clean rounds when too few were in its
        CPU-speed state (slow CPU); all rounds when too few were clean (busy)."""
        if self.busy:
            return self.rounds
        if self.slow_cpu:
            return tuple(r for r in self.rounds if r.clean)
        return tuple(r for r in self.rounds if r.clean and r.in_state and (r.in_memory_state or self.other_memory_state))

    def sample(self, value_of_round: Callable[[Round], float], **detail) -> Sample:
        used = self.used
        values = [value_of_round(r) for r in used]
        if any(r.cpu_speed_gflops for r in self.rounds):
            detail = {"cpu_speed_gflops": statistics.median(r.cpu_speed_gflops for r in used),
                      "cpu_speed_baseline_gflops": self.cpu_speed_baseline,
                      "in_state_rounds": sum(r.clean and r.in_state for r in self.rounds), **detail}
        if self.stream_baseline:
            detail = {"stream_baseline_gb_s": self.stream_baseline,
                      "in_memory_state_rounds": sum(r.clean and r.in_state and r.in_memory_state for r in self.rounds), **detail}
        return Sample(statistics.median(values), spread=robust_sigma(values), rounds=len(values), total_rounds=len(self.rounds),
                      busy=self.busy, slow_cpu=self.slow_cpu, other_memory_state=self.other_memory_state,
                      detail={"threads": self.threads, "stream_gb_s": statistics.median(r.stream_gb_s for r in used),
                              "clean_rounds": sum(r.clean for r in self.rounds), **detail})


def measure_rounds(host: Host, threads: int, work: Callable[[], object], target: int = TARGET_ROUNDS,
                   budget_s: float = ROUND_BUDGET_S, session=None, cpu_speed_baseline: float | None = None,
                   stream_baseline: float | None = None) -> Rounds:
    """Rounds of (a streaming pass, then one call of `work`) at `threads` Numba threads, after a warm-up,
    until `target` are clean (and, given the baseline's CPU-speed probe and streaming pass, in its states) or the budget is
    spent (and at least `target` ran). Without a session, the CPU-speed probe, then a pass over the host's
    buffer; given a decode session, measured decode's compute probe, K/V pass and streaming pass
    (perfsim.measure: samples of the session's K/V cache and of its weights)."""
    from perfsim.kernels import stream as stream_kernels
    from perfsim.kernels.jit import set_threads
    from perfsim.kernels.probe import cpu_speed_gflops
    from perfsim.measure import host_before_step

    data = host.stream()

    def read_passes() -> tuple:  # (stream GB/s, K/V stream GB/s, compute probe GFLOP/s, CPU-speed probe GFLOP/s)
        if session is None:
            speed = cpu_speed_gflops(threads)
            start = time.perf_counter()
            stream_kernels.sum_int64(data)
            return data.nbytes / (time.perf_counter() - start) / 1e9, 0.0, 0.0, speed
        compute_gflops, kv_stream_gb_s, stream_gb_s = host_before_step(threads, session)
        return stream_gb_s, kv_stream_gb_s, compute_gflops, 0.0

    set_threads(threads)
    read_passes()  # compile or load from Numba's cache; wake the thread pool
    work()
    wall, cpu = time.perf_counter, time.process_time
    rounds = []
    n_clean = 0
    start = wall()
    while True:
        c0, t0 = cpu(), wall()
        stream_gb_s, kv_stream_gb_s, compute_gflops, speed = read_passes()
        c1, t1 = cpu(), wall()
        result = work()
        c2, t2 = cpu(), wall()
        clean = c1 - c0 >= CLEAN_CPU_FRACTION * threads * (t1 - t0) and c2 - c1 >= CLEAN_CPU_FRACTION * threads * (t2 - t1)
        in_state = cpu_speed_baseline is None or speed >= CPU_SPEED_FRACTION * cpu_speed_baseline
        in_memory_state = stream_baseline is None or 1 / MEMORY_STATE_RATIO <= stream_gb_s / stream_baseline <= MEMORY_STATE_RATIO
        n_clean += clean and in_state and in_memory_state
        rounds.append(Round(stream_gb_s, t2 - t1, clean, result, kv_stream_gb_s, compute_gflops, speed, in_state, in_memory_state))
        elapsed = wall() - start
        if n_clean >= target or (elapsed >= budget_s and len(rounds) >= target) or elapsed >= 4 * budget_s:
            return Rounds(threads, tuple(rounds), cpu_speed_baseline, stream_baseline)


def paired_rounds(host: Host, threads: int, work: Callable[[], None], work_bytes: float, name: str,
                  target: int = TARGET_ROUNDS, budget_s: float = ROUND_BUDGET_S) -> Sample:
    """The median over rounds of (work_bytes / work seconds) / (stream bytes / stream seconds), for the
    metric `name` (whose baseline's CPU-speed probe and streaming pass, if any, set which rounds count)."""
    rounds = measure_rounds(host, threads, work, target, budget_s, cpu_speed_baseline=host.cpu_speed_baseline.get(name),
                            stream_baseline=host.stream_baseline.get(name))
    return rounds.sample(lambda r: work_bytes / r.work_s / 1e9 / r.stream_gb_s,
                         work_gb_s=statistics.median(work_bytes / r.work_s / 1e9 for r in rounds.used))


def _once(make):
    """A fixture made on first use, then shared (by the 1-thread and all-thread probes of one shape)."""
    cache = []

    def get():
        if not cache:
            cache.append(make())
        return cache[0]

    return get


# --- suite: kernels ------------------------------------------------------------------------------------------


def _gemv_fixture(fmt: str, rows: int, cols: int):
    from perfsim.kernels import gemv as gemv_kernels
    from perfsim.quant import quant_format

    import numpy as np

    make = {"q4_0": gemv_kernels.random_q4_0, "q8_0": gemv_kernels.random_q8_0}[fmt]
    cost = gemv_kernels.gemv_cost(rows, cols, quant_format(fmt))
    copies = gemv_kernels.dram_copies(make(rows, cols, 0), EVICT_BYTES)  # memcpys: not 4x the generation time
    n_copies = len(copies)
    x = np.random.default_rng(1).standard_normal(cols).astype(np.float32)
    return copies, x, np.empty(rows, np.float32), cost.bytes * n_copies


def _gemv_probe(host: Host, fixture, fmt: str, rows: int, cols: int, threads: int) -> Probe:
    name = f"kernels.gemv.{fmt}.{rows}x{cols}.{thread_tag(threads, host)}"

    def measure() -> Sample:
        from perfsim.kernels import gemv as gemv_kernels

        copies, x, out, sweep_bytes = fixture()
        calls = [gemv_kernels.bind_gemv(weights, x, out) for weights in copies]  # as decode calls them; looked up per sample, so a test can swap it

        def sweep():
            for call in calls:
                call()

        return paired_rounds(host, threads, sweep, sweep_bytes, name)

    return Probe(name,
                 f"{fmt} GEMV {rows}x{cols}, {threads} thread(s): achieved GB/s (gemv_cost bytes) / same-round stream read GB/s",
                 "higher", "relative", measure)


def _attention_fixture(kv_format: str, n_positions: int):
    from perfsim.kernels import attention as attention_kernels
    from perfsim.model import get_model

    import numpy as np

    m = get_model("phi-3-mini")
    cost = attention_kernels.attention_cost(m.n_heads, m.n_kv_heads, m.head_dim, n_positions, kv_format)
    n_layers = max(3, math.ceil(EVICT_BYTES / cost.kv_bytes))
    one = attention_kernels.filled_kv_cache(1, m.n_kv_heads, n_positions, m.head_dim, kv_format, seed=0)
    cache = attention_kernels.new_kv_cache(n_layers, m.n_kv_heads, n_positions, m.head_dim, kv_format)
    for full, part in zip(cache.arrays, one.arrays):
        full[:] = part  # every layer gets its own pages (written, so never the shared zero page)
    q = np.random.default_rng(1).standard_normal((m.n_heads, m.head_dim)).astype(np.float32)
    return cache, q, np.empty_like(q), n_layers, cost.bytes * n_layers


def _attention_probe(host: Host, fixture, kv_format: str, n_positions: int, threads: int) -> Probe:
    name = f"kernels.attention.{kv_format}.ctx{n_positions}.{thread_tag(threads, host)}"

    def measure() -> Sample:
        from perfsim.kernels import attention as attention_kernels

        cache, q, out, n_layers, sweep_bytes = fixture()

        def sweep():
            for layer in range(n_layers):
                attention_kernels.attention(q, cache, layer, n_positions, out)

        return paired_rounds(host, threads, sweep, sweep_bytes, name)

    return Probe(name,
                 f"Phi-3 Mini attention, {kv_format} KV cache, {n_positions} positions, {threads} thread(s): "
                 "achieved GB/s (attention_cost bytes) / same-round stream read GB/s", "higher", "relative", measure)


def kernel_probes(host: Host) -> list[Probe]:
    probes = []
    for fmt, rows, cols in GEMV_SHAPES:
        fixture = _once(lambda fmt=fmt, rows=rows, cols=cols: _gemv_fixture(fmt, rows, cols))
        probes += [_gemv_probe(host, fixture, fmt, rows, cols, t) for t in host.thread_counts]
    for kv_format, n_positions in ATTENTION_CASES:
        fixture = _once(lambda kv_format=kv_format, n_positions=n_positions: _attention_fixture(kv_format, n_positions))
        probes += [_attention_probe(host, fixture, kv_format, n_positions, t) for t in host.thread_counts]
    return probes


# --- suite: decode -------------------------------------------------------------------------------------------
# decode.* and accuracy.host.* read the same rounds (one decode step each, right after a streaming pass),
# measured once per run and context; a re-measurement (retry) measures afresh.


def decode_rounds(host: Host, context: int, fresh: bool = False) -> Rounds:
    cached = host.decode_cache.get(context)
    if cached is not None and not fresh:
        return cached
    engine = host.engine()
    session = engine.session(context)
    session.fill_cache(context - 1)

    def step():  # always the token at `context`: the same work every round
        session.position = context - 1
        session.step(1)
        return dict(session.op_seconds)

    rounds = measure_rounds(host, host.all_threads, step, TARGET_ROUNDS, 2 * ROUND_BUDGET_S, session)
    host.decode_cache[context] = rounds
    return rounds


def _decode_probe(host: Host, context: int) -> Probe:
    threads = host.all_threads
    calls = []

    def measure() -> Sample:
        from perfsim.workload import decode_ops

        rounds = decode_rounds(host, context, fresh=bool(calls))
        calls.append(1)
        engine = host.engine()
        weight_bytes = sum(op.weight_bytes for op in decode_ops(engine.model, engine.formats, context))
        return rounds.sample(lambda r: weight_bytes / r.work_s / 1e9 / r.stream_gb_s,
                             tokens_per_s=1 / statistics.median(r.work_s for r in rounds.used))

    return Probe(f"decode.q4_0.ctx{context}.{thread_tag(threads, host)}",
                 f"{decode_model().name} q4_0 random-weight decode at context {context}, {threads} thread(s): "
                 "tokens/s x weight bytes per token / same-round stream read bytes/s", "higher", "relative", measure)


def decode_probes(host: Host) -> list[Probe]:
    return [_decode_probe(host, context) for context in DECODE_CONTEXTS]


# --- suite: accuracy -----------------------------------------------------------------------------------------


def _measurement(engine, threads: int, rounds, context: int):
    """Rounds as a perfsim.measure.Measurement: one measured decode step each, all at `context`, with
    the passes and the compute probe measured right before them (medians) as its same-run host."""
    from perfsim.measure import Measurement

    return Measurement(model=engine.model, formats=engine.formats, threads=threads, contexts=(context,) * len(rounds),
                       step_seconds=tuple(r.work_s for r in rounds),
                       op_seconds={name: tuple(r.result[name] for r in rounds) for name in rounds[0].result},
                       load_s=0.0, warmup_s=0.0, peak_rss_bytes=0, weights_origin=engine.weights.origin,
                       stream_gb_s=statistics.median(r.stream_gb_s for r in rounds),
                       kv_stream_gb_s=statistics.median(r.kv_stream_gb_s for r in rounds),
                       compute_gflops=statistics.median(r.compute_gflops for r in rounds))


def _host_accuracy_name(host: Host, context: int) -> str:
    return f"accuracy.host.ctx{context}.{thread_tag(host.all_threads, host)}"


def _host_accuracy_probe(host: Host, context: int) -> Probe:
    threads = host.all_threads
    calls = []

    def measure() -> Sample:
        from perfsim.compare import compare, memory_state_ratio, memory_state_warning

        profile, engine = host.profile(), host.engine()
        rounds = decode_rounds(host, context, fresh=bool(calls))
        calls.append(1)

        def error(r: Round) -> float:  # this round's step against the prediction at this round's bandwidth
            return compare(profile, _measurement(engine, threads, [r], context)).tokens_per_s_error

        whole = _measurement(engine, threads, rounds.used, context)
        state_ratio = memory_state_ratio(profile, whole)
        return rounds.sample(error, measured_tokens_per_s=whole.decode_tokens_per_s,
                             profile_bandwidth_gb_s=profile.unit().bandwidth_gb_s_by_threads.get(threads),
                             error_with_profile_bandwidth=compare(profile, whole, same_run_host=False).tokens_per_s_error,
                             memory_state_ratio=state_ratio, warning=memory_state_warning(state_ratio, threads))

    return Probe(_host_accuracy_name(host, context),
                 f"signed error (predicted - measured) / measured of decode tokens/s on this host (perfsim.compare, with the "
                 f"read bandwidth of the same round), {decode_model().name} q4_0 at context {context}, {threads} thread(s)",
                 "abs_lower", "absolute", measure, display="error")


def _reference_probe(device, ref, model) -> Probe:
    def measure() -> Sample:
        from perfsim.quant import Formats, quant_format
        from perfsim.roofline import predict

        p = predict(model, Formats(weights=quant_format(ref.weights)), device, REFERENCE_CONTEXT, REFERENCE_PROMPT, ref.unit or None)
        return Sample(p.decode_tokens_per_s, detail={"reference_tokens_per_s": ref.decode_tokens_per_s, "claim": ref.claim})

    unit = f" {ref.unit} unit" if ref.unit else ""
    return Probe(f"accuracy.reference.{device.name}{'.' + ref.unit if ref.unit else ''}.{ref.model}.{ref.weights}",
                 f"predicted decode tokens/s of {ref.model} {ref.weights} on {device.display_name}{unit} (context {REFERENCE_CONTEXT}); "
                 f"published: {ref.claim}", "equal", "exact", measure, display="tokens/s")


def accuracy_probes(host: Host) -> list[Probe]:
    from perfsim.device import builtin_devices
    from perfsim.model import preset_models

    probes = [_host_accuracy_probe(host, context) for context in DECODE_CONTEXTS]
    models = preset_models()
    names = set()
    for device in builtin_devices().values():
        for ref in device.references:
            if ref.model in models:
                probe = _reference_probe(device, ref, models[ref.model])
                if probe.name in names:  # two references to one configuration: one prediction is enough
                    continue
                names.add(probe.name)
                probes.append(probe)
    return probes


SUITES: dict[str, tuple[str, Callable[[Host], list[Probe]]]] = {
    "kernels": ("kernel efficiency: achieved GB/s over the same-round stream read bandwidth", kernel_probes),
    "decode": ("decode tokens/s x weight bytes per token over the same-round stream read bandwidth", decode_probes),
    "accuracy": ("prediction error on the host, and the predictions for the published references", accuracy_probes),
}
DEFAULT_SUITES = ("kernels", "decode", "accuracy")


# =============================================================================================================
# Baselines


def machine_slug(machine: dict) -> str:
    """'AMD EPYC', 2 cores -> 'amd-epyc-2-cores': the baseline file's name for that machine."""
    words = "".join(c if c.isalnum() else " " for c in f"{machine.get('cpu_model')} {machine.get('cores')} cores".lower()).split()
    return "-".join(words)


def default_baseline_path(machine: dict | None = None) -> Path:
    """gates/baseline-<machine>.json of the checkout perfsim runs from (editable install), else of the current
    directory. One baseline per machine class: the same-run ratios differ between CPUs (a q4_0 GEMV on one
    thread read 0.99-1.00 of the stream on the Zen 3 EPYC guest, 0.91-0.93 on the Skylake-SP one, 0.77-0.86 on
    the Zen 4 EPYC one; q8_0 0.87, 0.78 and 0.77), so each class CI runs on keeps its own tolerances. The Zen 3
    and Zen 4 guests both read 'AMD EPYC': amd-epyc-2-cores.json holds the Zen 4's since 2026-12-07."""
    name = f"baseline-{machine_slug(machine or machine_fingerprint())}.json"
    checkout = Path(__file__).resolve().parent.parent / "gates"
    return checkout / name if checkout.is_dir() else Path("gates") / name


def machine_fingerprint() -> dict:
    from perfsim.calibrate import host_fingerprint

    fingerprint = host_fingerprint()
    return {"cpu_model": fingerprint["cpu_model"], "cores": fingerprint["cores"], "cpu_id": fingerprint["cpu_id"]}


def same_machine(a: dict, b: dict) -> bool:
    return a.get("cpu_model") == b.get("cpu_model") and a.get("cores") == b.get("cores")


def other_generation(a: dict, b: dict) -> bool:
    """Same model name and cores, but both record a CPU generation (perfsim.calibrate.cpu_id) and they differ. A KVM
    guest's model name can hide it: the Zen 3 and Zen 4 EPYC guests both read 'AMD EPYC', and their same-run ratios
    differ (default_baseline_path). Such a baseline is still compared, with a note; older baselines record no
    generation (the Skylake-SP one)."""
    return same_machine(a, b) and bool(a.get("cpu_id")) and bool(b.get("cpu_id")) and a["cpu_id"] != b["cpu_id"]


def describe_machine(m: dict) -> str:
    return f"{m.get('cpu_model')!s}, {m.get('cores')} cores" + (f", {m['cpu_id']}" if m.get("cpu_id") else "")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def load_baseline(path: Path) -> dict:
    """The baseline file, validated; any problem is one UserError line."""
    fix = "restore it (git checkout) or remake it with 'perfsim gate --update-baseline'"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"no baseline at {path}; make one on a quiet machine with 'perfsim gate --update-baseline' (or pass --baseline PATH)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the baseline {path}: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg}, line {e.lineno} column {e.colno}); {fix}") from None

    def bad(what):
        return UserError(f"{path}: {what}; {fix}")

    if not isinstance(data, dict) or data.get("format") != BASELINE_FORMAT:
        raise bad(f"not a perfsim gate baseline (expected \"format\": \"{BASELINE_FORMAT}\")")
    if data.get("version") != BASELINE_VERSION:
        raise bad(f"baseline version {data.get('version')!r}, this perfsim reads version {BASELINE_VERSION}")
    machine = data.get("machine")
    if not isinstance(machine, dict) or not isinstance(machine.get("cpu_model"), str) or not isinstance(machine.get("cores"), int):
        raise bad("\"machine\" must hold \"cpu_model\" (text) and \"cores\" (a whole number)")
    if "cpu_id" in machine and not isinstance(machine["cpu_id"], str):
        raise bad(f"\"machine\": \"cpu_id\" must be text (e.g. \"AuthenticAMD family 25 model 17\"), got {machine['cpu_id']!r}")
    metrics = data.get("metrics")
    if not isinstance(metrics, dict):
        raise bad("\"metrics\" must be an object of metric name -> {value, tolerance, direction}")
    for name, entry in metrics.items():
        if not isinstance(entry, dict):
            raise bad(f"metric {name!r} must be an object")
        if not _finite(entry.get("value")):
            raise bad(f"metric {name!r}: \"value\" must be a finite number, got {entry.get('value')!r}")
        if not _finite(entry.get("tolerance")) or entry["tolerance"] < 0:
            raise bad(f"metric {name!r}: \"tolerance\" must be a number >= 0, got {entry.get('tolerance')!r}")
        if entry.get("direction") not in DIRECTIONS:
            raise bad(f"metric {name!r}: \"direction\" must be one of {', '.join(DIRECTIONS)}, got {entry.get('direction')!r}")
        if "cpu_speed_gflops" in entry and not (_finite(entry["cpu_speed_gflops"]) and entry["cpu_speed_gflops"] > 0):
            raise bad(f"metric {name!r}: \"cpu_speed_gflops\" must be a number > 0 (GFLOP/s), got {entry['cpu_speed_gflops']!r}")
        if "stream_gb_s" in entry and not (_finite(entry["stream_gb_s"]) and entry["stream_gb_s"] > 0):
            raise bad(f"metric {name!r}: \"stream_gb_s\" must be a number > 0 (GB/s), got {entry['stream_gb_s']!r}")
    return data


def tolerance_for(kind: str, value: float, spread: float) -> float:
    """Absolute tolerance in the metric's units: K_SPREAD x spread, clamped to the floor and cap."""
    if kind == "exact":
        return DETERMINISTIC_RTOL * abs(value)
    if kind == "relative":
        scale = abs(value)
        return min(max(K_SPREAD * spread, RELATIVE_FLOOR * scale), RELATIVE_CAP * scale)
    return min(max(K_SPREAD * spread, ABSOLUTE_FLOOR), ABSOLUTE_CAP)


def passes(direction: str, baseline: float, tolerance: float, now: float) -> bool:
    if not math.isfinite(now):
        return False
    if direction == "higher":
        return now >= baseline - tolerance
    if direction == "lower":
        return now <= baseline + tolerance
    if direction == "abs_lower":
        return abs(now) <= abs(baseline) + tolerance
    if direction == "equal":
        return abs(now - baseline) <= tolerance
    raise ValueError(f"unknown direction {direction!r}")


def better(direction: str, baseline: float, tolerance: float, now: float) -> bool:
    """Improved beyond the tolerance: worth a baseline update (never a failure)."""
    if direction == "higher":
        return now > baseline + tolerance
    if direction == "lower":
        return now < baseline - tolerance
    if direction == "abs_lower":
        return abs(now) < abs(baseline) - tolerance
    return False


# =============================================================================================================
# Running


@dataclass
class Row:
    name: str
    suite: str
    description: str
    direction: str
    tolerance_kind: str
    display: str
    verdict: str  # pass | better | FAIL | missing (fails) | not measured (other machine) | new | baselined
    baseline: float | None = None
    tolerance: float | None = None
    now: float | None = None
    attempts: list = field(default_factory=list)  # Samples, in order
    note: str = ""
    spread: float | None = None  # --update-baseline: run-to-run sigma
    run_values: list = field(default_factory=list)  # --update-baseline

    def add_note(self, text: str) -> None:
        self.note = (self.note + "; " if self.note else "") + text

    @property
    def failed(self) -> bool:
        return self.verdict in ("FAIL", "missing")

    @property
    def sample(self) -> Sample | None:
        """The attempt the verdict rests on: the passing one, else the best of the failing ones."""
        if not self.attempts:
            return None
        ok = [s for s in self.attempts if self.baseline is None or passes(self.direction, self.baseline, self.tolerance, s.value)]
        if ok:
            return ok[-1]
        key = {"higher": lambda s: s.value, "lower": lambda s: -s.value, "abs_lower": lambda s: -abs(s.value)}.get(
            self.direction, lambda s: -abs(s.value - self.baseline))
        return max(self.attempts, key=key)

    def change(self) -> float | None:
        if self.baseline is None or self.now is None:
            return None
        if self.tolerance_kind == "absolute" or self.baseline == 0:
            return self.now - self.baseline
        return (self.now - self.baseline) / abs(self.baseline)

    def record(self) -> dict:
        s = self.sample
        return {
            "name": self.name, "suite": self.suite, "description": self.description, "direction": self.direction,
            "tolerance_kind": self.tolerance_kind, "baseline": self.baseline, "tolerance": self.tolerance, "now": self.now,
            "change": self.change(), "change_kind": "absolute" if self.tolerance_kind == "absolute" or self.baseline == 0 else "relative",
            "verdict": self.verdict, "note": self.note,
            "attempts": [s.value for s in self.attempts],
            "attempt_details": [{"value": s.value, "busy": s.busy, "slow_cpu": s.slow_cpu, "other_memory_state": s.other_memory_state,
                                 "rounds": s.rounds, "total_rounds": s.total_rounds, "clean_rounds": s.detail.get("clean_rounds"),
                                 "cpu_speed_gflops": s.detail.get("cpu_speed_gflops"), "stream_gb_s": s.detail.get("stream_gb_s")}
                                for s in self.attempts],
            "rounds": s.rounds if s else None, "total_rounds": s.total_rounds if s else None,
            "round_spread": s.spread if s else None, "busy": s.busy if s else None, "detail": s.detail if s else {},
            **({"spread": self.spread, "run_values": self.run_values} if self.verdict == "baselined" else {}),
        }


def _selected(name: str, patterns) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _check_suites(suites) -> list[str]:
    names = []
    for item in suites or DEFAULT_SUITES:
        for name in str(item).split(","):
            name = name.strip()
            if not name:
                continue
            if name not in SUITES:
                raise UserError(f"unknown gate suite {name!r}; expected one of: {', '.join(SUITES)}")
            if name not in names:
                names.append(name)
    if not names:
        raise UserError(f"no gate suite given; expected one or more of: {', '.join(SUITES)}")
    return names


def _check_output(path, option: str) -> Path | None:
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} {path}: is a directory; expected a file path")
    if not path.parent.is_dir():
        raise UserError(f"{option} {path}: the folder {path.parent} does not exist")
    return path


def _probes(host: Host, suite: str, patterns) -> list[Probe]:
    return [p for p in SUITES[suite][1](host) if _selected(p.name, patterns)]


def run_gate(suites: list[str] | None, baseline_path, update_baseline: bool, json_path, markdown_path,
             allow_other_machine: bool, progress: Callable[[str], None] | None = None, *,
             metrics: list[str] | None = None, runs: int = UPDATE_RUNS, out=None) -> int:
    """Run the gate; returns the exit code: 0 pass (or baseline written), 1 a regression.

    `metrics`: glob patterns; only matching metrics are measured and compared (tests, quick checks).
    `runs`: with update_baseline, how many times each suite runs. Bad input raises UserError (exit 2).
    """
    started = time.perf_counter()
    tell = progress or (lambda message: None)
    out = out or sys.stdout
    suite_names = _check_suites(suites)
    machine = machine_fingerprint()
    path = Path(baseline_path) if baseline_path else default_baseline_path(machine)
    json_out, markdown_out = _check_output(json_path, "--json"), _check_output(markdown_path, "--markdown")
    if runs < 1:
        raise UserError(f"runs must be at least 1, got {runs}")
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    host = Host(tell)
    previous_threads = _numba_threads()
    try:
        if "accuracy" in suite_names and any(_selected(name, metrics) for name in host.accuracy_probe_names()):
            # The host profile first, calibrated (when there is none valid) before any suite allocates its operands,
            # as `perfsim calibrate`, profile and sweep do. Calibrated last, after the kernel fixtures and the decode
            # engine, 3 of 11 gates (whose runs saw the memory state their calibration did) fitted the q4_0 GEMVs'
            # fixed cost at 0-17 us, their calls' time beyond the weights' pass scattering -380 to +300 us from one
            # op to the next; 35-49 us in the other 8, 36-54 in the 4 calibrated first, 30-51 in 25 `perfsim
            # calibrate` runs. A Mini sweep on one such profile came out +5.1% to +9.5% at every point. 3 of the
            # last 4 CI gates' calibrations had fitted q4_0 unusually (0 us at overlap 0.25-0.37; 7-22 us; 71-94 us).
            host.profile()
        if update_baseline:
            rows, notes = _update(host, suite_names, metrics, path, machine, runs, load_start, tell)
        else:
            if not baseline_path and not path.exists():
                others = sorted(p.name for p in path.parent.glob("baseline-*.json"))
                raise UserError(f"no gate baseline for this machine ({describe_machine(machine)}) at {path}; "
                                f"{'the ones there are for other machines: ' + ', '.join(others) if others else 'there is none'}. "
                                "Make one on a quiet machine with 'perfsim gate --update-baseline', or compare against another "
                                "with --baseline PATH --allow-other-machine")
            baseline = load_baseline(path)
            other = not same_machine(baseline["machine"], machine)
            notes = []
            if other:
                if not allow_other_machine:
                    raise UserError(f"the baseline {path} was made on another machine ({describe_machine(baseline['machine'])}); "
                                    f"this is {describe_machine(machine)}: its tolerances do not apply here. Make a baseline on this "
                                    "machine (--update-baseline) or pass --allow-other-machine to compare the same-run ratios anyway")
                notes.append(f"baseline from another machine ({describe_machine(baseline['machine'])}; this is {describe_machine(machine)}), "
                             "compared anyway as --allow-other-machine asks: only same-run-normalized ratios are compared (kernel and "
                             "decode rates over this run's stream bandwidth, prediction errors) and deterministic predictions, never an "
                             "absolute speed; the tolerances are that machine's")
            elif other_generation(baseline["machine"], machine):
                notes.append(f"baseline from another CPU generation under the same name ({baseline['machine']['cpu_id']}; this is "
                             f"{machine['cpu_id']}): its values and tolerances may not fit this CPU; if metrics fail here, make a "
                             "baseline on this machine (--update-baseline)")
            rows = _check(host, suite_names, metrics, baseline, tell, other)
    finally:
        _restore_threads(previous_threads)
    seconds = time.perf_counter() - started
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    failed = [r for r in rows if r.failed]
    exit_code = 1 if failed else 0
    summary = _summary(rows, update_baseline, seconds, load_start, load_end, path)
    notes = notes + _noise_notes(rows)
    print(format_table(rows, update_baseline), file=out)
    print("", file=out)
    for line in summary + notes + [f"{r.name}: {r.note}" for r in rows if r.note and not update_baseline]:  # an update's table has them
        print(line, file=out)
    report = {
        "verdict": "baseline written" if update_baseline else ("fail" if failed else "pass"), "exit_code": exit_code,
        "baseline": str(path), "suites": suite_names, "metric_patterns": metrics or [], "machine": machine,
        "seconds": round(seconds, 1), "load_average_1m": [load_start, load_end], "summary": summary, "notes": notes,
        "settings": settings(), "metrics": [r.record() for r in rows],
    }
    if json_out:
        json_out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if markdown_out:
        markdown_out.write_text(format_markdown(rows, update_baseline, summary, notes), encoding="utf-8")
    return exit_code


def settings() -> dict:
    return {"stream_bytes": STREAM_BYTES, "evict_bytes": EVICT_BYTES, "clean_cpu_fraction": CLEAN_CPU_FRACTION,
            "target_rounds": TARGET_ROUNDS, "min_clean_rounds": MIN_CLEAN_ROUNDS, "round_budget_s": ROUND_BUDGET_S,
            "retries": RETRIES, "busy_retries": BUSY_RETRIES, "cpu_speed_fraction": CPU_SPEED_FRACTION,
            "slow_cpu_retries": SLOW_CPU_RETRIES, "memory_state_ratio": MEMORY_STATE_RATIO,
            "memory_state_retries": MEMORY_STATE_RETRIES, "k_spread": K_SPREAD, "relative_floor": RELATIVE_FLOOR, "relative_cap": RELATIVE_CAP,
            "absolute_floor": ABSOLUTE_FLOOR, "absolute_cap": ABSOLUTE_CAP, "deterministic_rtol": DETERMINISTIC_RTOL,
            "decode_layers": DECODE_LAYERS}


def _numba_threads():
    return threads_in_use() if "numba" in sys.modules else None


def _restore_threads(threads) -> None:
    if "numba" in sys.modules:
        set_threads(threads or max_threads())


def _check(host: Host, suite_names, patterns, baseline: dict, tell, other_machine: bool = False) -> list[Row]:
    entries = baseline["metrics"]
    # Kernel metrics baselined with the CPU-speed probe count only rounds in the baseline's state (CPU_SPEED_FRACTION).
    host.cpu_speed_baseline = {name: e["cpu_speed_gflops"] for name, e in entries.items() if e.get("cpu_speed_gflops")}
    # ... and, baselined with their streaming pass, only rounds in the baseline's memory state (MEMORY_STATE_RATIO).
    host.stream_baseline = {name: e["stream_gb_s"] for name, e in entries.items() if e.get("stream_gb_s")}
    rows = []
    for suite in suite_names:
        probes = _probes(host, suite, patterns)
        produced = set()
        for probe in probes:
            produced.add(probe.name)
            entry = entries.get(probe.name)
            tell(f"gate: {probe.name} ...")
            row = Row(probe.name, suite, probe.description, probe.direction, probe.tolerance, probe.display, "new")
            row.attempts.append(probe.measure())
            if entry is None:
                row.now = row.attempts[0].value
                row.note = "not in the baseline (update it to gate this metric)"
                rows.append(row)
                continue
            # The baseline's direction rules: a metric's meaning is fixed when it is baselined.
            row.direction, row.baseline, row.tolerance = entry["direction"], entry["value"], entry["tolerance"]
            counted = 1  # attempts that count towards 1 + RETRIES
            while not passes(row.direction, row.baseline, row.tolerance, row.attempts[-1].value) and probe.tolerance != "exact":
                last = row.attempts[-1]
                free = next((kind for kind in _free_retry_kinds() if getattr(last, kind[0]) and host.free_retries_left[kind[0]] > 0), None)
                if free:
                    flag, pause_s, met, _ = free
                    host.free_retries_left[flag] -= 1
                    tell(f"gate: {probe.name} = {last.value:.4g} is beyond its tolerance, {met(last)}; waiting {pause_s:g} s and measuring again")
                    time.sleep(pause_s)
                elif counted <= RETRIES:
                    counted += 1
                    tell(f"gate: {probe.name} = {last.value:.4g} is beyond its tolerance; measuring again ({counted} of {RETRIES + 1})")
                    time.sleep(RETRY_PAUSE_S)
                else:
                    break
                row.attempts.append(probe.measure())
            row.now = row.sample.value
            ok = passes(row.direction, row.baseline, row.tolerance, row.now)
            row.verdict = ("better" if better(row.direction, row.baseline, row.tolerance, row.now) else "pass") if ok else "FAIL"
            if len(row.attempts) > 1:
                row.note = (f"passed on attempt {len(row.attempts)}" if ok
                            else f"failed all {len(row.attempts)} attempts: {', '.join(f'{s.value:.4g}' for s in row.attempts)}")
                flagged = [(sum(getattr(a, flag) for a in row.attempts), what) for flag, _, _, what in _free_retry_kinds()]
                if any(n for n, _ in flagged):
                    row.note += " (" + ", ".join(f"{n} of them {what}" for n, what in flagged if n) + ")"
            if row.verdict == "better":
                row.add_note("improved beyond the tolerance: update the baseline to lock it in")
            if row.sample.busy:
                row.add_note(
                    f"busy: only {row.sample.detail.get('clean_rounds', 0)} clean rounds of {row.sample.total_rounds}")
            if row.sample.slow_cpu:
                row.add_note(_state_note(row, "slow CPU", "in_state_rounds", "CPU-speed state", _cpu_speed_text, "all clean rounds"))
            if row.sample.other_memory_state:
                row.add_note(_state_note(row, "other memory state", "in_memory_state_rounds", "memory state", _memory_state_text,
                                         "the clean rounds in its CPU-speed state"))
            if row.sample.detail.get("warning"):
                row.add_note(row.sample.detail["warning"])
            rows.append(row)
        for name in sorted(entries):
            if name.split(".")[0] == suite and _selected(name, patterns) and name not in produced:
                e = entries[name]
                # On another machine a metric may not exist (a 1-core host has no all-thread runs): not a regression.
                rows.append(Row(name, suite, e.get("description", ""), e["direction"], e.get("tolerance_kind", "relative"),
                                e.get("display", "fraction"), "not measured" if other_machine else "missing",
                                baseline=e["value"], tolerance=e["tolerance"],
                                note="not measured on this machine" if other_machine else
                                "in the baseline but no longer measured: update the baseline if that is intended"))
    return rows


def _free_retry_kinds() -> tuple:
    """(Sample flag, pause in s, what the attempt met, how the row's note counts it) for each kind of failing attempt
    that is measured again without using up a retry (Host.free_retries_left); read at call time, as tests set them."""
    return (("busy", BUSY_PAUSE_S, lambda s: "measured while busy", "busy"),
            ("slow_cpu", SLOW_CPU_PAUSE_S, lambda s: f"measured with the CPU slower than at baseline ({_cpu_speed_text(s)})",
             "with a slow CPU"),
            ("other_memory_state", MEMORY_STATE_PAUSE_S,
             lambda s: f"measured with the memory in another state than at baseline ({_memory_state_text(s)})", "in another memory state"))


def _state_note(row: Row, flag: str, count_key: str, state: str, state_text, median_of: str) -> str:
    """A row's note on a sample flagged for too few clean rounds in one of the baseline's states."""
    sample = row.sample
    return (f"{flag}: {sample.detail.get(count_key, 0)} clean rounds of {sample.total_rounds} in the baseline's {state} "
            f"({state_text(sample)}); the median of {median_of}" + ("; the failure may be the machine's: run the gate again" if row.verdict == "FAIL" else ""))


def _state_text(sample: Sample, probe: str, key: str, baseline_key: str, unit: str) -> str:
    now, then = sample.detail.get(key), sample.detail.get(baseline_key)
    return f"{probe} {now:.1f} {unit} against {then:.1f}" if now and then else f"{probe} not read"


def _cpu_speed_text(sample: Sample) -> str:
    return _state_text(sample, "CPU-speed probe", "cpu_speed_gflops", "cpu_speed_baseline_gflops", "GFLOP/s")


def _memory_state_text(sample: Sample) -> str:
    return _state_text(sample, "streaming pass", "stream_gb_s", "stream_baseline_gb_s", "GB/s")


def _update(host: Host, suite_names, patterns, path: Path, machine: dict, runs: int, load_start, tell):
    notes = []
    existing = {}
    if path.exists():
        try:
            old = load_baseline(path)
        except UserError as e:
            notes.append(f"the previous baseline was unreadable and is replaced ({e})")
        else:
            if same_machine(old["machine"], machine) and not other_generation(old["machine"], machine):
                existing = old["metrics"]
            else:
                notes.append(f"the previous baseline came from another machine ({describe_machine(old['machine'])}): replaced entirely")
    if load_start is not None and load_start > 1.0:
        notes.append(f"the 1-minute load average was {load_start:.2f} when this baseline was made (> 1): another process was "
                     "running, so the spreads and tolerances may be wider than this machine needs; remake it when the machine is quiet")
    samples: dict[str, list[Sample]] = {}
    probes_by_name: dict[str, tuple[str, Probe]] = {}
    for run in range(runs):
        host.new_run()
        for suite in suite_names:
            for probe in _probes(host, suite, patterns):  # fresh operands every run: page placement varies too
                if probe.tolerance == "exact" and run > 0:
                    continue
                tell(f"gate: run {run + 1}/{runs}: {probe.name} ...")
                sample = probe.measure()
                for _ in range(RETRIES):  # a busy run says more about the neighbours than the kernel
                    if not sample.busy:
                        break
                    tell(f"gate: {probe.name}: too few clean rounds (machine busy); measuring again")
                    time.sleep(RETRY_PAUSE_S)
                    sample = probe.measure()
                samples.setdefault(probe.name, []).append(sample)
                probes_by_name[probe.name] = (suite, probe)
    rows, entries = [], {}
    for name, (suite, probe) in probes_by_name.items():
        clean = [s for s in samples[name] if not s.busy]
        used = clean if len(clean) >= min(3, len(samples[name])) else samples[name]
        values = [s.value for s in used]
        value = statistics.median(values)
        rounds = statistics.median(s.rounds for s in used)
        # the larger of the run-to-run sigma and the standard error of one run's median
        spread = max(robust_sigma(values), 1.2533 * statistics.median(s.spread for s in used) / math.sqrt(max(rounds, 1)))
        tolerance = tolerance_for(probe.tolerance, value, spread)
        row = Row(name, suite, probe.description, probe.direction, probe.tolerance, probe.display, "baselined",
                  baseline=value, tolerance=tolerance, now=value, attempts=samples[name], spread=spread, run_values=values)
        if probe.tolerance != "exact" and tolerance >= (RELATIVE_CAP * abs(value) if probe.tolerance == "relative" else ABSOLUTE_CAP):
            row.note = f"spread {spread:.3g} hit the tolerance cap: this machine was too noisy for a tight baseline"
        busy_runs = len(samples[name]) - len(clean)
        if busy_runs:
            row.add_note(
                f"{busy_runs} of {len(samples[name])} runs had too few clean rounds (busy)" + (", left out" if used is clean else ""))
        for warning in sorted({s.detail["warning"] for s in samples[name] if s.detail.get("warning")}):
            row.add_note(warning)
        rows.append(row)
        entries[name] = {"value": value, "tolerance": tolerance, "direction": probe.direction, "tolerance_kind": probe.tolerance,
                         "display": probe.display, "spread": spread, "run_values": values,
                         "rounds_per_run": rounds, "description": probe.description}
        speeds = [s.detail["cpu_speed_gflops"] for s in used if s.detail.get("cpu_speed_gflops")]
        if speeds:  # the CPU-speed and memory states the value was measured in: a check counts rounds in these states
            entries[name]["cpu_speed_gflops"] = statistics.median(speeds)
            entries[name]["stream_gb_s"] = statistics.median(s.detail["stream_gb_s"] for s in used)
    kept = {n: e for n, e in existing.items() if n not in entries}
    baseline = {
        "format": BASELINE_FORMAT, "version": BASELINE_VERSION,
        "machine": machine,
        "made_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_1m": load_start,
        "policy": {"runs": runs, **settings()},
        "metrics": dict(sorted((kept | entries).items())),
    }
    write_text_atomically(path, json.dumps(baseline, indent=2) + "\n")
    if kept:
        notes.append(f"kept {len(kept)} metrics of other suites from the previous baseline")
    notes.append(f"baseline written to {path}: {len(entries)} metric(s) from {runs} run(s)")
    return rows, notes


# =============================================================================================================
# Reporting


def _fmt(row: Row, value: float | None) -> str:
    if value is None:
        return "-"
    if row.display == "error":
        return f"{value:+.3f}"
    if row.display == "tokens/s":
        return f"{value:.6g}"
    return f"{value:.3f}"


def _fmt_tolerance(row: Row) -> str:
    if row.tolerance is None:
        return "-"
    if row.tolerance_kind == "exact":
        return f"±{DETERMINISTIC_RTOL:g} rel"
    if row.tolerance_kind == "relative" and row.baseline:
        return f"±{row.tolerance / abs(row.baseline):.0%}"
    return f"±{row.tolerance:.3f}"


def _fmt_change(row: Row) -> str:
    change = row.change()
    if change is None:
        return "-"
    if row.tolerance_kind == "exact":
        return "0" if change == 0 else f"{change:+.2g}"
    if row.tolerance_kind == "absolute" or row.baseline == 0:
        return f"{change:+.3f}"
    return f"{change:+.1%}"


def _fmt_noise(row: Row) -> tuple[str, str]:
    """(rounds, spread) of the sample the verdict rests on: how many repeats, how much they scattered."""
    s = row.sample
    if s is None:
        return "-", "-"
    if row.tolerance_kind == "exact":
        return "1", "0"
    rounds = f"{s.rounds}/{s.total_rounds}" + (" busy" if s.busy else "")
    if row.verdict == "baselined":
        spread = row.spread / abs(row.baseline) if row.tolerance_kind == "relative" and row.baseline else row.spread
        return f"{len(row.run_values)} runs", (f"{spread:.1%}" if row.tolerance_kind == "relative" else f"{spread:.3f}")
    spread = s.spread / abs(s.value) if row.tolerance_kind == "relative" and s.value else s.spread
    return rounds, (f"{spread:.1%}" if row.tolerance_kind == "relative" else f"{spread:.3f}")


def _table_rows(rows: list[Row], update: bool) -> tuple[list[str], list[list[str]], str]:
    """(headers, cells, alignment: one l or r per column)."""
    if update:
        headers = ["metric", "value", "tolerance", "runs", "run spread", "direction", "note"]
        cells = [[r.name, _fmt(r, r.baseline), _fmt_tolerance(r), *_fmt_noise(r), DIRECTION_TEXT[r.direction], r.note] for r in rows]
        return headers, cells, "lrrrrll"
    headers = ["metric", "baseline", "tolerance", "now", "change", "rounds", "spread", "verdict"]
    cells = [[r.name, _fmt(r, r.baseline), _fmt_tolerance(r), _fmt(r, r.now), _fmt_change(r), *_fmt_noise(r),
              r.verdict + (f" ({len(r.attempts)} tries)" if len(r.attempts) > 1 else "")] for r in rows]
    return headers, cells, "lrrrrrrl"


def format_table(rows: list[Row], update: bool = False) -> str:
    from perfsim.report import table

    headers, cells, align = _table_rows(rows, update)
    return table(headers, cells, align)


def format_markdown(rows: list[Row], update: bool, summary: list[str], notes: list[str]) -> str:
    headers, cells, align = _table_rows(rows, update)
    failed = any(r.failed for r in rows)
    title = "baseline written" if update else ("FAIL" if failed else "pass")
    escape = lambda text: str(text).replace("|", "\\|")  # noqa: E731
    lines = [f"## perfsim gate: {title}", ""]
    lines += [f"- {escape(line)}" for line in summary]
    lines += ["", "| " + " | ".join(headers) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    for row, data in zip(rows, cells):
        data = [f"**{escape(c)}**" if row.failed and i == len(data) - 1 else escape(c) for i, c in enumerate(data)]
        lines.append("| " + " | ".join(data) + " |")
    annotated = [r for r in rows if r.note]
    if annotated or notes:
        lines += ["", "Notes:", ""]
        lines += [f"- {escape(n)}" for n in notes]
        lines += [f"- `{r.name}`: {escape(r.note)}" for r in annotated]
    return "\n".join(lines) + "\n"


def _summary(rows: list[Row], update: bool, seconds: float, load_start, load_end, path: Path) -> list[str]:
    load = ""
    if load_start is not None:
        load = f"; 1-minute load average {load_start:.2f} at start, {load_end:.2f} at end"
    if update:
        return [f"gate baseline: {len(rows)} metric(s) measured in {seconds:.0f} s{load}"]
    counts = {}
    for r in rows:
        counts[r.verdict] = counts.get(r.verdict, 0) + 1
    failed = [r.name for r in rows if r.failed]
    verdict = f"FAIL: {len(failed)} regressed ({', '.join(failed)})" if failed else "pass"
    lines = [f"gate: {verdict}; {len(rows)} metric(s) ({', '.join(f'{n} {v}' for v, n in counts.items())}) against {path}, "
             f"in {seconds:.0f} s{load}"]
    measured = [r for r in rows if r.sample is not None and r.tolerance_kind != "exact"]
    if measured:
        rounds = [r.sample.rounds for r in measured]
        spreads = [r.sample.spread / abs(r.sample.value) for r in measured if r.tolerance_kind == "relative" and r.sample.value]
        retried = sum(len(r.attempts) > 1 for r in measured)
        span = f"{min(rounds)}" if min(rounds) == max(rounds) else f"{min(rounds)}-{max(rounds)}"
        lines.append(f"repeats: each measured metric is the median of {span} rounds after a warm-up (the clean ones, unless "
                     f"fewer than {MIN_CLEAN_ROUNDS} were; for a kernel, those in the baseline's CPU-speed state and, of those, in its memory "
                     f"state, each unless fewer than {MIN_CLEAN_ROUNDS} were); "
                     + (f"round-to-round spread (robust sigma) {min(spreads):.1%}-{max(spreads):.1%}, median {statistics.median(spreads):.1%}; "
                        if spreads else "")
                     + f"{retried} metric(s) re-measured after a first attempt beyond tolerance")
        streams = {}
        for r in measured:
            if "stream_gb_s" in r.sample.detail:
                streams.setdefault(r.sample.detail["threads"], []).append(r.sample.detail["stream_gb_s"])
        if streams:
            lines.append("same-run stream read bandwidth: " + ", ".join(
                f"{statistics.median(v):.1f} GB/s at {t} thread(s)" for t, v in sorted(streams.items())))
    return lines


def _noise_notes(rows: list[Row]) -> list[str]:
    busy = [r.name for r in rows if r.sample is not None and r.sample.busy]
    slow = [r.name for r in rows if r.sample is not None and r.sample.slow_cpu]
    memory = [r.name for r in rows if r.sample is not None and r.sample.other_memory_state]
    notes = []
    if busy:
        notes.append(f"{len(busy)} metric(s) got fewer than {MIN_CLEAN_ROUNDS} clean rounds (process CPU time under "
                     f"{CLEAN_CPU_FRACTION:.0%} of threads x wall time: another process had our cores, or the work left threads idle): "
                     "their values are medians of all rounds; if the load average was high, re-run on a quiet machine before trusting a failure")
    if slow:
        notes.append(f"{len(slow)} metric(s) got fewer than {MIN_CLEAN_ROUNDS} clean rounds in the baseline's CPU-speed state (the "
                     f"CPU-speed probe under {CPU_SPEED_FRACTION:.0%} of the baseline's: the CPU ran slower, for this machine's own "
                     "reasons): their values are medians of all clean rounds, which a kernel close to compute-bound reads low")
    if memory:
        notes.append(f"{len(memory)} metric(s) got fewer than {MIN_CLEAN_ROUNDS} clean rounds in the baseline's memory state (the "
                     f"streaming pass beyond {MEMORY_STATE_RATIO:g}x of the baseline's, either way: the neighbours' memory traffic "
                     "moved): their values are medians of the clean rounds in the CPU-speed state, whose share of the pass "
                     "a faster memory state lowers and a slower one raises")
    return notes


# =============================================================================================================
# Command line


def add_gate_arguments(parser) -> None:
    """The options of `perfsim gate` (call on its argparse subparser; then set func=perfsim.gate.main)."""
    parser.add_argument("--suite", action="append", metavar="NAME",
                        help=f"suite to run, repeatable or comma-separated: {', '.join(SUITES)} (default: all)")
    parser.add_argument("--baseline", metavar="PATH", help="baseline JSON (default: this machine's, gates/baseline-<cpu>-<cores>-cores.json of this checkout)")
    parser.add_argument("--update-baseline", action="store_true",
                        help=f"measure {UPDATE_RUNS} times and write the baseline with tolerances from the spread (run on a quiet machine)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="also write the results as a Markdown table (e.g. $GITHUB_STEP_SUMMARY)")
    parser.add_argument("--allow-other-machine", action="store_true",
                        help="compare against a baseline made on another CPU model or core count (same-run ratios only)")
    parser.add_argument("--metric", action="append", metavar="PATTERN",
                        help="only metrics whose name matches this glob, e.g. 'kernels.gemv.*' (repeatable)")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(args) -> int:
    """`perfsim gate` from its parsed arguments (add_gate_arguments); returns the exit code."""
    return run_gate(args.suite, args.baseline, args.update_baseline, args.json, args.markdown, args.allow_other_machine,
                    progress=_stderr, metrics=getattr(args, "metric", None))
