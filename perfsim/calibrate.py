"""`perfsim calibrate`: measure the host's roofs with microbenchmarks and write a host profile.

What is measured, at each thread count, and never the end-to-end decode it is later compared with:
  - streaming read bandwidth (kernels/stream.py), the memory roof of every op;
  - per kernel, its fixed cost per call, its compute roof (the slope between two problem sizes), and
    how much of its compute fails to hide under the memory traffic (`overlap`, fitted in rounds of one
    streaming pass then a sweep over operands 3x the L3), at shapes no Phi-3 model has (4096-wide
    matrices, 16 heads of 128). For the kernels Phi-3 decode spends its time in by default (q4_0 GEMVs,
    attention, the serial ops: norms, RoPE, kv_append, ...), the fixed cost and the overlap are fitted
    instead on their calls in the engine's decode of small models of other shapes, at two contexts
    (DECODE_SHAPED_MODEL, the larger DECODE_SHAPED_GQA_MODEL with grouped-query attention, and for the
    serial ops DECODE_SHAPED_WIDE_MODEL, the second with an MLP 2.7x wider): what
    those ops cost depends on what runs between them, and stand-ins for that (a producer stream, sweeps
    in a loop of their own) missed by up to 2x, or swung from one calibration to the next. The other
    formats' kernels keep the microbenchmark fits (a tiny problem after a streaming read; attention on
    cold K/V rows; sweeps over operands 3x the L3);
  - multi-head f16 attention's time per K/V byte at other head_dims (64, 80, 96) over its time at 128,
    the head_dim of the decode-shaped model its roofs are fitted on (_attention_head_dim_factors).
The profile has the schema of devices/*.yaml (plus `kernel_roofs` and `calibration`) and is written
to a temporary file then renamed, so an interrupted run never leaves a half-written profile.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from perfsim import __version__
from perfsim.cost import Cost
from perfsim.device import Device, compute_state_factor, device_from_data, load_device_file
from perfsim.errors import UserError
from perfsim.files import write_text_atomically
from perfsim.model import ModelSpec
from perfsim.roofline import roof_s
from perfsim.workload import attention_kernel

CALIBRATION_VERSION = 40  # bump whenever what is measured changes (v40: attention's fixed cost has a term per K/V head, grouped-query attention follows the compute probe at 0.2, the head_dim factors are the mean of three processes'; v39: the q4_0 GEMVs' compute and memory combine as a power mean, their compute roof the probe's median; v38: attention's roofs follow the compute probe at elasticity 0.5; v37: steal during a decode step's probes and passes re-runs it, the head_dim factors' cache reads take turns; v36: a parallel kernel's overlap through the origin when its free fixed cost is negative; v35: head_dim factors from one thread; v34: no second look; v33: compute roofs stated at the median probe of the decode steps, each step probed; v32: the compute probe's calibrated value; v31: calibration's models get K/V passes too; v30: K/V at the rate of a pass over their own cache; v29: a second look at the in-cache roofs; v28: each step's pass samples the weights it streams): older profiles are re-measured
DRAM_BYTES = 96 * 2**20  # operands of the out-of-cache runs: 3x this host class's 32 MiB L3
# Operands of the in-cache runs: an eighth of this host class's 32 MiB L3, and large enough that the
# work (not the ~10 us fixed cost) dominates; 256 KiB runs were too short to time (+-50% roofs).
CACHE_BYTES = 4 * 2**20
PRODUCER_BYTES = 8 * 2**20  # streamed before each timed serial in-cache call (Producer): a quarter of the L3, a 4096x4096 q4_0 GEMV
PRODUCER_REGIONS = 4  # the producer's buffer holds this many regions, read in turn: each read comes from DRAM
SERIAL_ROUNDS = 21  # rounds of the serial kernels' in-cache calls in turn (_serial_call_times)
SERIAL_OUTLIER_RATIO = 3.0  # a serial op's decode point beyond this multiple of its model's short-context one is left out (_roof_from_decode)
OVERLAP_ROUNDS = 9  # rounds of (streaming pass, DRAM sweep) each overlap fit is the median of

# The fixed costs of the serial ops (norms, RoPE, kv_append, residual adds, SiLU, embedding, argmax), and
# the fixed costs and overlaps of the q4_0 GEMVs and of multi-head attention, are timed where decode runs
# them: by the engine's own decode loop, in a model no Phi-3 is (4 layers, hidden 2560, 20 heads of 128,
# MLP 6912: 45 MB of q4_0 weights a layer, so every GEMV reads from DRAM), at contexts of 128 and 4000.
# A serial op costs decode mostly its call path (Python, Numba's dispatch) run cold after a GEMV has
# streamed through the caches, plus a few cache misses. Timed after a synthetic producer instead
# (calibration v6), those fixed costs came out 0.6x to 2x what Phi-3 decode measured, from one
# calibration to the next.
DECODE_SHAPED_MODEL = ModelSpec(name="calibration (not a Phi-3 shape)", n_layers=4, hidden_size=2560, n_heads=20, n_kv_heads=20,
                                intermediate_size=6912, vocab_size=4096, max_context=4096)
# A larger one with grouped-query attention (6 kv heads of 4 query heads each, head_dim 128, hidden 3840,
# MLP 10240: 83 MB of q4_0 weights a layer), one session (f16 K/V, q4_0 embedding). Its attention.f16.gqa
# calls give that kernel's roofs; its q4_0 GEMVs and its serial ops join the first model's points. Groups
# of 4, as Phi-3 Small's and Medium's (and Llama 3's): the scores pass takes a group's heads two at a time,
# and calibration v23's groups of 5 ran a fifth head alone (Small's attention at context 128 on two
# threads came out +27% on average over ten rounds); an even count of kv heads splits evenly over 2 threads.
# A serial op's fixed cost is a line in the K/V bytes a layer's attention reads and in the bytes of
# its own operands, through both models' points (calibration v22): in probe units, Phi-3 Mini's serial
# ops cost 15-20% more a call at context 4096 than at 128, and Phi-3 Small's norms and residual adds
# 2-5 us more a call than Mini's (12 KB more operands). A line in K/V bytes alone (v16-v21) had
# Small's serial ops 10-18% fast on one thread. Refitted offline on the calibrations of 18 rounds of
# sweeps (v17-v20; 288 serial-op group errors: Mini and Small, 1 and 2 threads), the two-column line
# missed by more than 20% at 39 points, K/V bytes alone at 47; Small's mean error on one thread went
# from -18% to -9% (six v20 rounds) and from -10% to +1% (eight v18). A line in operand bytes and the
# bytes a layer streams (v15) extrapolated badly from the two models: 56 of 144 beyond 20%.
DECODE_SHAPED_GQA_MODEL = ModelSpec(name="calibration, grouped-query (not a Phi-3 shape)", n_layers=4, hidden_size=3840, n_heads=24,
                                    n_kv_heads=6, intermediate_size=10240, vocab_size=4096, max_context=4096, head_dim=128)
# A third, for the serial ops only: the second model with an MLP 2.7x wider (27648), so a layer streams 196 MB
# of q4_0 weights against the second's 83 and the first's 45 (Phi-3 Mini 64, Small 123, Medium 192), with
# the second's operands for every op but the MLP's; 3 layers (the first is not timed). A serial op's fixed
# cost grows with the bytes a layer streams between two of its calls (KernelRoof.overhead_us_per_layer_mb);
# in the first two models that grew with the hidden size, and the line through them put it in the operands'
# column: with calibration v26, Phi-3 Small's serial ops came out -10% on average (twelve rounds) and Phi-3
# Medium's -14% to -30% at 11 of 14 points (two rounds), Mini's +2%; with this model (v27, seven rounds) Mini's
# -3.0% (kv_append's slow sessions in), Small's +5.2%, Medium's +4.0%. A first try at the first model's hidden size with an MLP of 41472
# made the residual add after its down projection (2560 x 41472) cost 1.8-3.7x the one after attention,
# against 1.1-1.5x in Phi-3 (down projections 2.7-3.5x as wide as tall); this one's is 7.2x. Its GEMVs
# and attention are not fitted on: those kernels keep the first two models'.
DECODE_SHAPED_WIDE_MODEL = dataclasses.replace(DECODE_SHAPED_GQA_MODEL, name="calibration, wide MLP (not a Phi-3 shape)", n_layers=3,
                                               intermediate_size=27648)
DECODE_SHAPED_WIDE_SESSIONS = (("f16", "q4_0"),)
DECODE_SHAPED_WEIGHTS = "q4_0"  # its GEMVs' fixed cost and overlap are fitted in this decode too
DECODE_SHAPED_CONTEXTS = (128, 4000)  # a layer of the first model streams 45 MB of weights and 1.3 or 41 MB of f16 K/V
DECODE_SHAPED_STEPS = 12  # per session and thread count, each after a streaming pass, as measured decode runs
# (KV cache format, embedding table format) of each session: every format of both gets timed
DECODE_SHAPED_SESSIONS = (("f16", "q4_0"), ("q8_0", "q8_0"), ("f32", "f16"), ("f16", "f32"))
DECODE_SHAPED_GQA_SESSIONS = (("f16", "q4_0"),)  # its .gqa attention kernel, its q4_0 GEMVs and its serial ops are taken from it
# Its one session steps this many times in each round of all the sessions' turns (_decode_shaped_calls):
# 36 steps a context, the only calls the .gqa kernel's compute roof is fitted on, spread over the ~10 s
# the first model's 4 sessions take.
DECODE_SHAPED_GQA_STEPS_PER_ROUND = 3
# (model, its sessions, its steps a round) in the order _decode_shaped_calls is given them: a DecodeShapedPoint's
# `model` is an index into this
DECODE_SHAPED_RUNS = ((DECODE_SHAPED_MODEL, DECODE_SHAPED_SESSIONS, 1),
                      (DECODE_SHAPED_GQA_MODEL, DECODE_SHAPED_GQA_SESSIONS, DECODE_SHAPED_GQA_STEPS_PER_ROUND),
                      (DECODE_SHAPED_WIDE_MODEL, DECODE_SHAPED_WIDE_SESSIONS, 1))
# op name in the engine -> the kernel whose fixed cost it calibrates ({name}: the workload's kernel for that op)
DECODE_SHAPED_OPS = {"token_embd": "embedding.{embedding}", "attn_norm": "rmsnorm", "rope": "rope", "kv_append": "kv_append.{kv}",
                     "attn_residual": "residual_add", "ffn_norm": "rmsnorm", "ffn_act": "silu_mul", "ffn_residual": "residual_add",
                     "output_norm": "rmsnorm", "argmax": "argmax", "attention": "{attention}", "attn_qkv": "{attn_qkv}",
                     "attn_output": "{attn_output}", "ffn_gate_up": "{ffn_gate_up}", "ffn_down": "{ffn_down}", "lm_head": "{lm_head}"}
# The kernel of the compute probe (perfsim.measure.compute_probe_gflops: calibration's in-cache bench of the q4_0 GEMV).
# Its compute roof is the probe's median over the decode steps (the same measurement, taken ~100 times a thread
# count): measured once more on its own, in a window of its own, it came out 0.79-1.16x that median over the
# sixteenth and seventeenth sessions' ten calibrations, and the power mean below turns such an error into up to
# 3% of a GEMV's time.
PROBE_KERNEL = f"gemv.{DECODE_SHAPED_WEIGHTS}"
# A q4_0 GEMV's compute and memory times combine as their power mean with this exponent (KernelRoof.overlap_power),
# its fixed cost fitted on top. A q4_0 GEMV does the same FLOPs per byte at every shape, so the ratio x of its
# compute time to its memory time is the host's state: 0.65-0.74 in the fast one (both thread counts), up to 1.09
# on two threads in the slow ones. Over 16 calibrations (2026-11-28; 5 GEMVs at 2 contexts in each of 2 models,
# 1 and 2 threads), its decode calls took 1.03-1.07x their memory time at x 0.65-0.74 and 1.16-1.24x at x
# 0.92-1.09: the max plus `overlap` x the smaller, fitted in one state, carries that to another badly. Fitted on
# one calibration, predicting the calls of another (same thread count) whose x differed by more than 0.15 (126
# pairs): overlap form rms 6.9% (up to 10.1%); power mean, fixed cost fitted, p = 3: 1.7%, 3.5: 1.7%, 4: 1.8%,
# 5: 2.9%; one thread alone (x within 0.68-0.79) rms 1.0% at 3.5, 1.2% at 4, 2.5% at 3. On 24 sweep points
# (Phi-3 Mini, Small, Medium) measured twice and predicted from each of the 16 calibrations (8 in the fast state, 8
# in mixed ones), tokens/s mean abs. error went 4.0 -> 1.9% and 2.9 -> 2.1% on one set, and 9.3 -> 3.8% and
# 6.2 -> 3.7% on the other, whose two-thread compute probe read 0.51-0.64x the fast calibrations' (the first's 0.58-0.85x).
GEMV_OVERLAP_POWER = 3.5
# Parallel kernels whose fixed cost and overlap come from those decodes (the others' from microbenchmarks)
DECODE_FITTED_KERNELS = {f"gemv.{DECODE_SHAPED_WEIGHTS}", "attention.f16", "attention.q8_0", "attention.f32", "attention.f16.gqa"}


def cache_dir() -> Path:
    return Path(os.environ.get("PERFSIM_CACHE_DIR") or Path.home() / ".cache" / "perfsim")


def host_profile_path() -> Path:
    return cache_dir() / "host.yaml"


def _cpuinfo_fields(cpuinfo: str = "/proc/cpuinfo") -> dict:
    """The first processor's block of /proc/cpuinfo as {key: value}; {} where there is none."""
    fields = {}
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            key, _, value = line.partition(":")
            if not key.strip():
                break  # the first processor's block is enough
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    if name := _cpuinfo_fields().get("model name"):
        return name
    import platform

    return platform.processor() or platform.machine()


def cpu_id(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's vendor, family and model numbers ('AuthenticAMD family 25 model 17'), from /proc/cpuinfo; 'unknown'
    where it has none. A KVM guest's model name can hide the generation: this project's Zen 3 host and its Zen 4 host
    (AVX-512, 2 MiB of L2 a core; the one-thread stream 20-28 GB/s against 17-21) were both 'AMD EPYC'."""
    fields = _cpuinfo_fields(cpuinfo)
    if "cpu family" not in fields or "model" not in fields:
        return "unknown"
    return f"{fields.get('vendor_id', '?')} family {fields['cpu family']} model {fields['model']}"


def host_fingerprint() -> dict:
    """What a host profile is valid for: a profile calibrated with any of these different is re-measured."""
    from perfsim.measure import available_threads

    return {"cpu_model": cpu_model(), "cpu_id": cpu_id(), "cores": available_threads(), "calibration_version": CALIBRATION_VERSION}


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


@dataclass(frozen=True, eq=False)  # compared and hashed by identity
class Call:
    """One benchmark call. `produced`: for a serial kernel, the flat f32 view of the input a parallel
    kernel writes right before it in decode (a GEMV's output vector), or None."""

    run: object  # () -> None
    produced: np.ndarray | None = None
    # The serial op that runs between that parallel kernel and this one in decode (rmsnorm follows the
    # residual add that wrote its x, kv_append follows the RoPE that wrote its k), or None.
    predecessor: object = None


@dataclass(frozen=True)
class KernelBench:
    """Three calls of one kernel: tiny (its fixed cost), in cache (its compute roof), from DRAM (overlap)."""

    kernel: str
    parallel: bool
    tiny: Call | None  # None where the fixed cost is timed in decode: serial kernels and DECODE_FITTED_KERNELS
    in_cache: Call  # operands of CACHE_BYTES
    in_cache_flops: float
    in_cache_quarter: Call  # the same at a quarter of the work: the slope is the compute roof
    dram: object = None  # () -> None: one call on the next of `dram_calls` operands, together 3x the L3
    dram_calls: int = 0
    dram_flops: float = 0.0  # per call
    dram_bytes: float = 0.0  # per call


def _gemv_bench(fmt: str) -> KernelBench:
    from perfsim.kernels.gemv import bind_gemv, random_f16, random_f32, random_q4_0, random_q8_0
    from perfsim.quant import quant_format

    make = {"q4_0": random_q4_0, "q8_0": random_q8_0, "f16": random_f16, "f32": random_f32}[fmt]
    bytes_per_weight = quant_format(fmt).bits_per_element / 8
    cols = 4096
    rng = np.random.default_rng(0)
    x = rng.standard_normal(cols).astype(np.float32)

    def bench(rows, copies=1):
        out = np.empty(rows, np.float32)
        calls = [bind_gemv(make(rows, cols, seed=i), x, out) for i in range(copies)]  # as decode calls them
        state = {"i": 0}

        def call():
            state["i"] += 1
            calls[state["i"] % copies]()

        return call

    cache_rows = max(256, int(CACHE_BYTES / (cols * bytes_per_weight)) // 256 * 256)  # whole 32-row tiles per thread
    dram_rows = int(DRAM_BYTES / 3 / (cols * bytes_per_weight)) // 32 * 32
    in_cache = (Call(bench(cache_rows)), 2.0 * cache_rows * cols, Call(bench(cache_rows // 4)))
    if f"gemv.{fmt}" in DECODE_FITTED_KERNELS:  # fixed cost and overlap come from decode, only the compute roof from here
        return KernelBench(f"gemv.{fmt}", True, None, *in_cache)
    return KernelBench(f"gemv.{fmt}", True, Call(bench(32)), *in_cache, bench(dram_rows, copies=3), 3, 2.0 * dram_rows * cols,
                       dram_rows * cols * bytes_per_weight)


def _attention_bench(fmt: str, group: int = 1) -> KernelBench:
    """Attention of 16 query heads of 128 over 16 / group kv heads: no Phi-3 model has this shape, so
    the calibration must carry over. Grouped-query attention reuses each K/V row for `group` heads
    from L1, a different compute roof, calibrated on its own (kernel key attention.FORMAT.gqa)."""
    from perfsim.kernels.attention import attention, attention_cost, fill_random_kv, kv_append, new_kv_cache

    n_heads, head_dim = 16, 128
    n_kv_heads = n_heads // group

    def cache_of(n_layers, n_positions):
        cache = new_kv_cache(n_layers, n_kv_heads, n_positions, head_dim, fmt)
        fill_random_kv(cache, n_positions)
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

    def cold_tiny(n_layers=16, max_context=2048):
        # One position of each layer's cache, the layers rotated, each head's row 2048 rows from the next
        # one's as in decode, timed after a Producer: what the call costs when every K/V stream starts
        # cold (at Phi-3 Mini's 128 positions that start was most of the time: 197 us a layer measured,
        # 130 predicted from a tiny call on a hot one-position cache).
        cache = new_kv_cache(n_layers, n_kv_heads, max_context, head_dim, fmt)
        rng = np.random.default_rng(0)
        for layer in range(n_layers):
            kv_append(cache, layer, 0, *rng.standard_normal((2, n_kv_heads, head_dim), dtype=np.float32))
        state = {"i": 0}

        def call():
            state["i"] += 1
            attention(q, cache, state["i"] % n_layers, 1, out)

        return call

    cost = lambda n: attention_cost(n_heads, n_kv_heads, head_dim, n, fmt)
    dram_positions = int(DRAM_BYTES / 3 / (cost(1).kv_bytes))
    cache_positions = 1024 * group  # the same bytes in cache for either grouping
    kernel = attention_kernel(fmt, n_heads, n_kv_heads)
    in_cache = (Call(bench(1, cache_positions)), cost(cache_positions).flops, Call(bench(1, cache_positions // 4)))
    if kernel in DECODE_FITTED_KERNELS:  # fixed cost and overlap come from decode, only the compute roof from here
        return KernelBench(kernel, True, None, *in_cache)
    return KernelBench(kernel, True, Call(cold_tiny()), *in_cache, bench(3, dram_positions), 3, cost(dram_positions).flops, cost(dram_positions).bytes)


ATTENTION_HEAD_DIMS = (64, 80, 96)  # multi-head f16 attention's time factor is measured at these, against 128
HEAD_DIM_POSITIONS = 4096  # positions of each head_dim's cache: 8-17 MB a layer, so its fixed cost is ~1-2% of a call
HEAD_DIM_ROUNDS = 40  # 9 rounds (0.1 s) gave head_dim 96 a factor of 1.02-1.23 from one run to the next; 40, 1.04-1.10
HEAD_DIM_PASSES = 5  # reads of each head_dim's cache its time per byte is scaled by
# The head_dim factors are measured with one thread and stated for every thread count. On one thread the factor at
# 96 came out 1.00-1.09 over the fourteen Skylake-SP calibrations of the thirteenth and fourteenth sessions; on two
# it scattered 0.89-1.41 (all three head_dims moving together, against 128), and Phi-3 Mini's attention on two
# threads came out -15% to -23% in the rounds whose factor was 0.89-0.90. Re-predicted with the one-thread factor,
# the twelve rounds' Mini attention on two threads (contexts 1024-4096; round c, whose attention fit was broken,
# left out) erred by 6.0% on average against 9.0%.
HEAD_DIM_THREADS = 1


def _cache_reads_gb_s(caches: dict, flush) -> dict:
    """{key: GB/s of a read of the whole K/V cache caches[key] from DRAM (after a read of `flush`, a buffer 2x
    the L3)}, the median of HEAD_DIM_PASSES; the caches take turns, pass by pass, so a spell of slower memory
    reaches them alike. With the caches read one after another, one calibration (2026-11-28) stated the
    factors at 64, 80 and 96 at 1.18-1.27 against 128, all three together; at 96, 1.19 against 1.00-1.09 in
    the fourteen calibrations of the thirteenth and fourteenth sessions and 1.04-1.07 in six others that day.
    Phi-3 Mini's attention came out +7% to +28% on one thread. Whether a slow spell during 128's reads did it
    is not known; taking turns removes that way for it to happen."""
    from perfsim.kernels.stream import read_chunks_s, sample_chunks, sum_int64

    wholes = {key: sample_chunks(list(cache.arrays), cache.nbytes, 2**20) for key, cache in caches.items()}
    reads = {key: [] for key in caches}
    for _ in range(HEAD_DIM_PASSES):
        for key, whole in wholes.items():
            sum_int64(flush)
            reads[key].append(sum(c.nbytes for c in whole) / read_chunks_s(whole) / 1e9)
    return {key: statistics.median(r) for key, r in reads.items()}


def _attention_head_dim_factors(threads: int, n_heads: int = 16, n_layers: int = 2) -> dict:
    """{head_dim: factor} for multi-head attention over an f16 cache: its time per K/V byte at each of
    ATTENTION_HEAD_DIMS over its time per K/V byte at 128, the head_dim of the decode-shaped model its
    roofs are fitted on. Calls at the four head_dims take turns, rotating over layers, so each reads
    its K/V from DRAM (the others' 200+ MB pass between), as decode reads it; the median of rounds.
    Measured: rows of 96 streamed at 0.68 of the read on one thread and 0.76 on two, rows of 128 at 0.75
    and 0.83; the per-byte roofline had phi-3-mini's attention (96) 7% fast on average over eight rounds
    of sweeps (13% on two threads), and phi-3-small's (128) +2%.

    Each cache is an allocation of its own, and on this KVM host memory reads at a rate that depends on
    where it landed (perfsim.measure.read_kv_pass_gb_s): one calibration's factors on two threads came out
    1.45 at 80 and 1.41 at 96 (1.10-1.16 and 1.03-1.09 in the others) and Phi-3 Mini's attention +50% to
    +157% on two threads. Each head_dim's time per byte is taken in units of its own cache's read rate
    (the median of HEAD_DIM_PASSES reads of the whole cache, each after a read of a buffer 2x the L3)."""
    from perfsim.kernels.attention import attention, attention_cost, fill_random_kv, new_kv_cache
    from perfsim.kernels.jit import set_threads
    from perfsim.kernels.stream import stream_buffer

    set_threads(threads)
    rng = np.random.default_rng(0)
    runs = []
    for head_dim in ATTENTION_HEAD_DIMS + (128,):
        cache = new_kv_cache(n_layers, n_heads, HEAD_DIM_POSITIONS, head_dim, "f16")
        fill_random_kv(cache, HEAD_DIM_POSITIONS)
        q = rng.standard_normal((n_heads, head_dim)).astype(np.float32)
        out = np.empty_like(q)
        attention(q, cache, 0, HEAD_DIM_POSITIONS, out)  # compiles or loads from Numba's cache
        runs.append((head_dim, cache, q, out, attention_cost(n_heads, n_heads, head_dim, HEAD_DIM_POSITIONS).kv_bytes, []))
    for _ in range(HEAD_DIM_ROUNDS):
        for layer in range(n_layers):
            for head_dim, cache, q, out, kv_bytes, seconds_per_byte in runs:
                start = time.perf_counter()
                attention(q, cache, layer, HEAD_DIM_POSITIONS, out)
                seconds_per_byte.append((time.perf_counter() - start) / kv_bytes)
    flush = stream_buffer(64 * 2**20)
    read_gb_s = _cache_reads_gb_s({head_dim: cache for head_dim, cache, *_ in runs}, flush)
    per_byte = {head_dim: statistics.median(samples) * read_gb_s[head_dim] for head_dim, _, _, _, _, samples in runs}
    return {head_dim: _sig(per_byte[head_dim] / per_byte[128]) for head_dim in ATTENTION_HEAD_DIMS}


# The head_dim factors are the mean over this many processes, each measuring them once (_attention_head_dim_factors).
# On this Zen 4 host the factor at 96 holds within a process (six measurements in one: 0.81-0.88; twenty over
# 30 s in another: 16 of them 1.02-1.11) but moves from one process to the next (nine in a row: 0.82-1.09):
# head_dim 128's kernel reads at ~22 or ~27 GB/s a process, 96's at ~25 in both. Calibration's decode fit
# did not follow it: over the twelve rounds of the twentieth and twenty-first sessions, a calibration's
# factor did not predict Phi-3 Mini's attention, and re-predicted with one factor for all (0.95), its mean
# |error| on the 120 points went from 13.1% to 8.7%. Each process takes ~2.2 s (Numba's cache loaded).
HEAD_DIM_PROCESSES = 3


def _attention_head_dim_factors_of_processes(threads: int) -> dict:
    """_attention_head_dim_factors(threads), measured in HEAD_DIM_PROCESSES processes of their own, one after
    another: each factor the mean of theirs. A process that fails is replaced by a measurement in this one."""
    import subprocess
    import sys

    code = "import json, sys; from perfsim.calibrate import _attention_head_dim_factors as f; print(json.dumps(f(int(sys.argv[1]))))"
    runs = []
    for _ in range(HEAD_DIM_PROCESSES):
        try:
            done = subprocess.run([sys.executable, "-c", code, str(threads)], capture_output=True, text=True, timeout=300, check=True)
            runs.append({int(head_dim): float(factor) for head_dim, factor in json.loads(done.stdout.strip().splitlines()[-1]).items()})
        except (subprocess.SubprocessError, OSError, ValueError, IndexError, AttributeError):
            runs.append(_attention_head_dim_factors(threads))
    return {head_dim: _sig(statistics.fmean(run[head_dim] for run in runs)) for head_dim in ATTENTION_HEAD_DIMS}


# Attention's fixed cost per K/V head (KernelRoof.overhead_us_per_kv_head): cold calls at two K/V head counts,
# each at two contexts, head_dim 128; each count's time at no K/V bytes is its line through the two contexts.
KV_HEAD_COUNTS = (16, 32)
KV_HEAD_CONTEXTS = (128, 512)
KV_HEAD_ROUNDS = 30  # 40 rounds gave 2.75 us a K/V head on one thread, three head counts on one line within 3%
KV_HEAD_LAYERS = 4  # the calls rotate over layers of the cache, as decode's do


def _attention_kv_head_us(fmt: str, group: int, threads: int) -> float:
    """Microseconds a call of attention over a `fmt` cache (`group` query heads a K/V head) costs per K/V head,
    beyond its K/V bytes: the slope between KV_HEAD_COUNTS of each count's time at no K/V bytes. Every call
    follows a read of a buffer 2x the L3, as decode's follows the GEMV streaming its layer's q, k and v
    weights, so each K/V head's K and V rows start cold (measured: ~2.7 us a K/V head on one thread, ~1.4 on
    two, with groups of 1 and of 4 alike). The decode-shaped models each have one head count, so their fit
    cannot tell this from the fixed cost a call: it had Phi-3 Mini's attention (32 K/V heads, the first
    model 20) 20% fast at context 128 on one thread, over eight rounds of sweeps."""
    from perfsim.kernels.attention import attention, attention_cost, fill_random_kv, new_kv_cache
    from perfsim.kernels.jit import set_threads
    from perfsim.kernels.stream import stream_buffer, sum_int64

    set_threads(threads)
    rng = np.random.default_rng(0)
    head_dim, runs = 128, []
    for n_kv_heads in KV_HEAD_COUNTS:
        cache = new_kv_cache(KV_HEAD_LAYERS, n_kv_heads, max(KV_HEAD_CONTEXTS), head_dim, fmt)
        fill_random_kv(cache, max(KV_HEAD_CONTEXTS))
        q = rng.standard_normal((n_kv_heads * group, head_dim)).astype(np.float32)
        out = np.empty_like(q)
        attention(q, cache, 0, KV_HEAD_CONTEXTS[0], out)  # compiles or loads from Numba's cache
        runs.append((n_kv_heads, cache, q, out))
    flush = stream_buffer(64 * 2**20)
    seconds = {}
    for i in range(KV_HEAD_ROUNDS):
        for context in KV_HEAD_CONTEXTS:
            for n_kv_heads, cache, q, out in runs:
                sum_int64(flush)
                start = time.perf_counter()
                attention(q, cache, i % KV_HEAD_LAYERS, context, out)
                seconds.setdefault((n_kv_heads, context), []).append(time.perf_counter() - start)
    return _per_kv_head_us({key: statistics.median(times) for key, times in seconds.items()},
                           lambda n_kv_heads, context: attention_cost(n_kv_heads * group, n_kv_heads, head_dim, context, fmt).kv_bytes)


def _per_kv_head_us(call_s: dict, kv_bytes) -> float:
    """From {(K/V heads, context): a call's seconds} at KV_HEAD_COUNTS x KV_HEAD_CONTEXTS and kv_bytes(heads,
    context): the slope over the head counts of each one's time at no K/V bytes, in us (0 when it falls)."""
    short, long = KV_HEAD_CONTEXTS
    at_no_bytes = []
    for n_kv_heads in KV_HEAD_COUNTS:
        per_byte_s = (call_s[n_kv_heads, long] - call_s[n_kv_heads, short]) / (kv_bytes(n_kv_heads, long) - kv_bytes(n_kv_heads, short))
        at_no_bytes.append(call_s[n_kv_heads, short] - per_byte_s * kv_bytes(n_kv_heads, short))
    few, many = KV_HEAD_COUNTS
    return _sig(max((at_no_bytes[1] - at_no_bytes[0]) / (many - few), 0.0) * 1e6)


def _serial_benches() -> list[KernelBench]:
    """Kernels that run on the calling thread: their cost is the call (its fixed cost timed in decode,
    _decode_shaped_calls) plus a little work on operands that are cold in decode (the in-cache runs
    here, each timed after a Producer: the compute roof)."""
    from perfsim.engine import Embedding
    from perfsim.kernels import elementwise as ew
    from perfsim.kernels.attention import kv_append, kv_append_cost, new_kv_cache
    from perfsim.quant import quant_format
    from perfsim.kernels.embedding import embedding_cost

    rng = np.random.default_rng(0)
    vec = lambda n: rng.standard_normal(n).astype(np.float32)
    large = 16384
    benches = []

    # Which input a parallel GEMV writes before each op in decode: silu_mul's gate_up, the residual's
    # delta, rope's q and k, kv_append's k and v (k then rotated by RoPE on the calling thread, its
    # predecessor), argmax's logits, and the delta of the residual add that precedes rmsnorm and writes
    # its x. The embedding's row comes from the table in DRAM: no produced operand.
    # Per-layer parameters rotate over N_LAYERS copies, as decode's do: each layer's norm weights were
    # last read a token ago, so they come from DRAM, not from the L3 a repeated call would find them in.
    N_LAYERS = 32

    def rmsnorm(n):
        x, out, zeros = vec(n), np.empty(n, np.float32), np.zeros(n, np.float32)
        weights, layer = [vec(n) for _ in range(N_LAYERS)], iter(range(10**9))
        return Call(lambda: ew.rmsnorm(x, weights[next(layer) % N_LAYERS], 1e-5, out), zeros, lambda: ew.residual_add(x, zeros))

    def silu_mul(n):
        gate_up, out = vec(2 * n), np.empty(n, np.float32)
        return Call(lambda: ew.silu_mul(gate_up, out), gate_up)

    def residual(n):
        x, d = vec(n), vec(n) * 0
        return Call(lambda: ew.residual_add(x, d), d)

    def argmax(n):
        logits = vec(n)
        return Call(lambda: ew.argmax(logits), logits)

    def rope(n_heads):
        x, tables = vec(n_heads * 128).reshape(n_heads, 128), ew.rope_tables(4, 128)
        return Call(lambda: ew.rope_rotate(x, tables.cos[1], tables.sin[1]), x.reshape(-1))

    benches += [
        KernelBench("rmsnorm", False, None, rmsnorm(large), ew.rmsnorm_cost(large).flops, rmsnorm(large // 4)),
        KernelBench("silu_mul", False, None, silu_mul(large), ew.silu_mul_cost(large).flops, silu_mul(large // 4)),
        KernelBench("residual_add", False, None, residual(large), ew.residual_add_cost(large).flops, residual(large // 4)),
        KernelBench("argmax", False, None, argmax(4 * large), ew.argmax_cost(4 * large).flops, argmax(large)),
        KernelBench("rope", False, None, rope(64), ew.rope_cost(64, 128).flops, rope(16)),
    ]
    for fmt in ("f16", "q8_0", "f32"):
        def append(n_heads, fmt=fmt, n_layers=8, max_context=2048, window=64):
            # As in decode: each call writes the next layer, each head's row 2048 rows (512 KiB at f16)
            # from the next head's, so the rows of one call sit on many pages, and the rows written are
            # new (measured 14 us a call into one small layer, 24 us rotating over 32 layers, 31-38 us in
            # decode). Only the first `window` positions are used, and faulted in now: a first touch (a
            # huge page zeroed) inside a timed call made kv_append look 1000x slower than in decode.
            cache, kv = new_kv_cache(n_layers, n_heads, max_context, 128, fmt), vec(2 * n_heads * 128).reshape(2, n_heads, 128)
            for array in cache.arrays:
                array[:, :, :window] = 0
            call, tables = iter(range(10**9)), ew.rope_tables(4, 128)

            def run():
                i = next(call)
                kv_append(cache, i % n_layers, (i // n_layers) % window, kv[0], kv[1])
            return Call(run, kv.reshape(-1), lambda: ew.rope_rotate(kv[0], tables.cos[1], tables.sin[1]))
        # f32 appends count no FLOPs, so their roof is never divided into; 1 keeps gflops positive.
        flops = kv_append_cost(64, 128, fmt).flops or 1.0
        benches.append(KernelBench(f"kv_append.{fmt}", False, None, append(64), flops, append(16)))
    for fmt in ("q4_0", "q8_0", "f16", "f32"):
        def embedding(n, fmt=fmt):
            f = quant_format(fmt)
            if f.block_size == 1:
                table = vec(N_LAYERS * n).reshape(N_LAYERS, n).astype(np.float16 if fmt == "f16" else np.float32)
            else:
                table = rng.integers(0, 256, size=(N_LAYERS, n // 32 * f.block_bytes), dtype=np.uint8)
                table.reshape(N_LAYERS, -1, f.block_bytes)[:, :, :2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
            emb, out, token = Embedding(f, table), np.empty(n, np.float32), iter(range(10**9))
            return Call(lambda: emb.row(next(token) % N_LAYERS, out))  # a new row each call: from DRAM, as in decode
        benches.append(KernelBench(f"embedding.{fmt}", False, None, embedding(large), embedding_cost(large, quant_format(fmt)).flops,
                                   embedding(large // 4)))
    return benches


class Producer:
    """Runs before each timed in-cache call of a serial kernel (and attention's tiny call) what runs
    before it in decode: every thread streams its share of PRODUCER_BYTES (the next of PRODUCER_REGIONS
    regions of its buffer, so the read comes from DRAM) and writes its share of the call's produced
    operand, as a parallel GEMV writes its output. What a small op costs depends on how much of the
    process's working set the stream has pushed out of the L3 (measured, tiny calls, 1 / 2 threads:
    after 4 MiB rmsnorm 5.4 / 2.9 us, after 16 MiB 13.8 / 6.8). 8 MiB is the size of the calibration's
    own matrices, not a value fitted to a decode."""

    def __init__(self):
        from perfsim.kernels.stream import stream_buffer

        self.data = stream_buffer(PRODUCER_REGIONS * PRODUCER_BYTES)
        self.region = 0
        self.idle = np.zeros(64, np.float32)

    def before(self, call: Call, threads: int):
        from perfsim.kernels.stream import stream_then_write

        operand = self.idle if call.produced is None else call.produced
        source = operand.copy()  # rewritten with its own values: in-place kernels stay on the same inputs
        n = self.data.size // PRODUCER_REGIONS

        def run():
            self.region = (self.region + 1) % PRODUCER_REGIONS
            stream_then_write(self.data, self.region * n, (self.region + 1) * n, threads, source, operand)
            if call.predecessor is not None:
                call.predecessor()

        return run


def _serial_call_times(serial: list[KernelBench], producer: Producer, threads: int) -> dict:
    """{id(call): median seconds} of the in-cache calls of the serial kernels, each after a Producer.

    The kernels take turns, in groups that hold the small ops of one decode configuration (rmsnorm,
    rope, residual_add, silu_mul, argmax, one kv_append format, one embedding format: about the 7 small
    ops of a decode layer), one call size per round. Timed over and over in a loop of its own, a kernel
    keeps its Python and Numba call path warm between calls, which decode never does. A neighbour's
    burst lands in a few rounds, and the median over rounds drops it."""
    by_name = {bench.kernel: bench for bench in serial}
    formats = lambda prefix: sorted(name for name in by_name if name.startswith(prefix))  # noqa: E731
    kv_names, embedding_names = formats("kv_append."), formats("embedding.")
    common = [name for name in by_name if name not in kv_names + embedding_names]
    samples = {}
    for i in range(max(len(kv_names), len(embedding_names))):
        names = common + [kv_names[i % len(kv_names)], embedding_names[i % len(embedding_names)]]
        for size in ("in_cache", "in_cache_quarter"):
            calls = [getattr(by_name[name], size) for name in names]
            befores = [producer.before(call, threads) for call in calls]
            for round_index in range(SERIAL_ROUNDS + 1):  # round 0 warms up (compiles or loads from the cache)
                for call, before in zip(calls, befores):
                    before()
                    start = time.perf_counter()
                    call.run()
                    if round_index:
                        samples.setdefault(id(call), []).append(time.perf_counter() - start)
    # The common kernels' calls are pooled over every group they ran in (4, some seconds apart): taken
    # from their first group alone, rmsnorm's compute roof on 2 threads once came out 0.77 GFLOP/s
    # against 4-13 in eleven other calibrations, and phi-3-mini's norms were over-predicted 2-3x.
    return {key: statistics.median(values) for key, values in samples.items()}


SEED_TILES = 8  # row tiles of 32 drawn at random per decode-shaped matrix, repeated down it (_repeated_q4_0)


def _repeated_q4_0(rows: int, cols: int, seed: int):
    """A random q4_0 matrix whose first SEED_TILES row tiles repeat down the rest, on huge pages as
    random_q4_0's: a q4_0 GEMV's time does not depend on the values it multiplies, and drawing the three
    decode-shaped models' 1.1 GB of random nibbles took 10.5 s of the calibration's minute (repeated: 0.9 s)."""
    from perfsim.kernels.gemv import ROW_TILE, PackedQ4_0, random_q4_0
    from perfsim.kernels.jit import zeros_huge_pages

    seed_tiles = random_q4_0(min(rows, SEED_TILES * ROW_TILE), cols, seed)
    n_tiles = -(-rows // ROW_TILE)
    if n_tiles <= SEED_TILES:
        return seed_tiles
    qs = zeros_huge_pages((n_tiles,) + seed_tiles.qs.shape[1:], np.uint8)
    d = zeros_huge_pages((n_tiles,) + seed_tiles.d.shape[1:], np.uint16)
    for start in range(0, n_tiles, SEED_TILES):
        stop = min(start + SEED_TILES, n_tiles)
        qs[start:stop], d[start:stop] = seed_tiles.qs[: stop - start], seed_tiles.d[: stop - start]
    if rows % ROW_TILE:  # zero scales make the padding rows zero, as random_q4_0 does
        d[-1, :, rows % ROW_TILE :] = 0
    return PackedQ4_0(rows, cols, qs, d)


def _decode_shaped_weights(model: ModelSpec, sessions=DECODE_SHAPED_SESSIONS) -> dict:
    """{embedding format: Weights}: q4_0 layers and head (_repeated_q4_0), one weight set per embedding
    table format (each table 64 random rows repeated: drawing 75M normal floats for an f32 table took 4 s)."""
    from dataclasses import replace

    from perfsim.engine import Embedding, _random_embedding, random_weights
    from perfsim.quant import quant_format

    weights = random_weights(model, DECODE_SHAPED_WEIGHTS, seed=7, make_matrix=_repeated_q4_0)

    def table(fmt):
        rows = _random_embedding(64, model.hidden_size, quant_format(fmt), 7)
        return Embedding(rows.format, np.tile(rows.table, (-(-model.vocab_size // 64), 1))[: model.vocab_size])

    return {fmt: replace(weights, token_embd=table(fmt)) for fmt in {fmt for _, fmt in sessions}}


@dataclass(frozen=True)
class DecodeShapedPoint:
    """One op's call in decode of a decode-shaped model at one context: medians over steps."""

    seconds: float  # one call
    cost: object  # Cost of one call
    kv_bytes: int  # K/V bytes a layer's attention reads at this point's context (Op.layer_kv_bytes)
    stream_gb_s: float  # median of the streaming passes run before the steps, as measured decode takes its roof
    cold_call_us: float = 0.0  # median of the cold-call probes run before the steps (0: none)
    model: int = 0  # which decode-shaped model (_decode_shaped_calls' `models` index)
    op: str = ""  # the engine's op name (attn_norm, ffn_norm, ...): a kernel's ops each have their own points
    layer_weight_bytes: int = 0  # weight bytes a layer of its model streams (Op.layer_weight_bytes)
    kv_stream_gb_s: float = 0.0  # median of the K/V passes run before the steps (0: none; its K/V then at stream_gb_s)
    compute_gflops: float = 0.0  # median of the compute probes run before the steps (0: none)
    kv_heads: int = 0  # attention: its model's K/V heads (Op.kv_heads)

    def speed(self, reference_gflops: float, kernel: str = "gemv.") -> float:
        """How fast this point's steps found `kernel`'s compute against the speed state a compute roof is stated
        at (`reference_gflops` of perfsim.measure.compute_probe_gflops): their median probe over it, at the kernel's
        elasticity (perfsim.device.compute_state_factor; by default a GEMV's, 1); 1.0 without either."""
        ratio = self.compute_gflops / reference_gflops if self.compute_gflops > 0 and reference_gflops > 0 else 1.0
        return compute_state_factor(kernel, ratio)

    def roofs_s(self, gflops: float) -> tuple:
        """(compute, memory) seconds of the call at a compute roof of `gflops` and its own streaming passes,
        as perfsim.roofline times an op of a measured run: its K/V bytes at the K/V pass's rate when there was one."""
        kv_bytes = self.cost.kv_bytes if self.kv_stream_gb_s > 0 else 0
        memory_s = (self.cost.bytes - kv_bytes) / (self.stream_gb_s * 1e9) + (kv_bytes / (self.kv_stream_gb_s * 1e9) if kv_bytes else 0.0)
        return self.cost.flops / (gflops * 1e9), memory_s


def _decode_shaped_calls(models: list, threads: int, probes: list | None = None, compute_probes: list | None = None) -> dict:
    """{kernel: [DecodeShapedPoint, ...]} of the ops in DECODE_SHAPED_OPS, timed by the engine in decode.

    `models`: (weights_by_embedding, sessions, steps_per_round) per model: a session of the weights' model
    per (KV format, embedding format) of `sessions`, at each of DECODE_SHAPED_CONTEXTS. All the sessions'
    steps take turns, DECODE_SHAPED_STEPS rounds, each session stepping `steps_per_round` times a round:
    the host drifts by 30% within a minute, and its compute speed flips between two levels ~1.4x apart
    every 0.1-1 s (grouped-query attention at context 4000, 1 thread: 1400 or 2000 us a call). A kernel
    timed in a window of its own under a second (calibration v16's grouped-query model: 24 steps, 0.7 s)
    came out 34-46 GFLOP/s from one calibration to the next, while phi-3-small's decode ran it at 27-36.
    Each kernel has one point per model, op and context (the norms before attention, before the MLP
    and before the head each their own). The first layer's ops are left out: they
    follow the streaming pass run before each step, which in a 32-layer model 1 layer in 32 does. Each
    step follows a streaming pass and a cold-call probe, as in measured decode; each point keeps the
    median probe of its steps, and all the probes' times are appended to `probes`; likewise the compute
    probe each step follows (perfsim.measure.compute_probe_gflops), appended to `compute_probes`."""
    from perfsim.engine import LAYER_OP_NAMES, Engine
    from perfsim.measure import timed_step
    from perfsim.workload import decode_ops

    samples, costs, kv_bytes, layer_bytes, passes, kv_passes, cold_calls, computes, kv_heads = {}, {}, {}, {}, {}, {}, {}, {}, {}
    first_layer = range(1, 1 + len(LAYER_OP_NAMES))  # op_sequence: token_embd, the layers' ops, the head's
    turns = []  # (steps_per_round, context, session, {(model index, kernel, op name or ""): op sequence indices})
    for model_index, (weights_by_embedding, sessions, steps_per_round) in enumerate(models):
        for kv_format, embedding_format in sessions:
            engine = Engine(weights_by_embedding[embedding_format], kv_format)
            for context in DECODE_SHAPED_CONTEXTS:
                ops = {op.name: op for op in decode_ops(engine.model, engine.formats, context)}
                kernels = {name: kernel.format(kv=kv_format, embedding=embedding_format, **{n: op.kernel for n, op in ops.items()})
                           for name, kernel in DECODE_SHAPED_OPS.items()}
                session = engine.session(context + DECODE_SHAPED_STEPS * steps_per_round)
                session.fill_cache(context - 2)
                for _ in range(2):  # warm-up: compiles or loads the kernels from Numba's cache, faults pages in
                    session.step(max(session.next_token, 0))
                timed = {}
                for i, name in enumerate(session.op_sequence):
                    if name in kernels and i not in first_layer:
                        key = (model_index, kernels[name], name)
                        timed.setdefault(key, []).append(i)
                        costs[key, context] = ops[name].cost
                        kv_heads[key] = ops[name].kv_heads
                        layer_bytes[key, context] = ops["attn_norm"].layer_weight_bytes
                for key in timed:
                    # the norms, RoPE, ... run in every session, whose K/V formats take different bytes
                    kv_bytes.setdefault((key, context), []).append(ops["attn_norm"].layer_kv_bytes)
                turns.append((steps_per_round, context, session, timed))
    for _ in range(DECODE_SHAPED_STEPS):
        for steps_per_round, context, session, timed in turns:
            for _ in range(steps_per_round):
                step = timed_step(session, session.next_token, threads)  # a step with time stolen is run again
                gb_s, probe_us = step.stream_gb_s, step.cold_call_us
                if probes is not None:
                    probes.append(probe_us)
                if compute_probes is not None:
                    compute_probes.append(step.compute_gflops)
                marks = session.marks
                for key, indices in timed.items():
                    samples.setdefault((key, context), []).append(statistics.fmean(marks[i + 1] - marks[i] for i in indices))
                    passes.setdefault((key, context), []).append(gb_s)
                    kv_passes.setdefault((key, context), []).append(step.kv_stream_gb_s)
                    cold_calls.setdefault((key, context), []).append(probe_us)
                    computes.setdefault((key, context), []).append(step.compute_gflops)
    points = {}
    for key, context in samples:
        points.setdefault(key[1], []).append(DecodeShapedPoint(
            statistics.median(samples[key, context]), costs[key, context], round(statistics.fmean(kv_bytes[key, context])),
            statistics.median(passes[key, context]), statistics.median(cold_calls[key, context]), key[0], key[2], layer_bytes[key, context],
            statistics.median(kv_passes[key, context]), statistics.median(computes[key, context]), kv_heads[key]))
    return points


def _compute_roof_gflops(bench: KernelBench, serial_times: dict | None) -> float:
    """The slope between the two in-cache sizes: the compute roof, free of the fixed cost per call.
    Serial kernels' in-cache calls were timed in turn after a Producer (_serial_call_times)."""
    if bench.parallel:
        # The median of 3 slopes, each from the two sizes timed one after the other: a single slope was
        # thrown by the shared host now and then (grouped-query attention on 2 threads: 36 GFLOP/s in one
        # calibration, 52-59 in four runs of it alone), and phi-3-small's attention was over-predicted 2x.
        # (The two sizes timed in turn, call by call, scattered more, 37-82: each evicts the other's data.)
        slopes = []
        for _ in range(3):
            in_cache_s = _median_call_s(bench.in_cache.run, min_repeats=5, min_seconds=0.02)
            quarter_s = _median_call_s(bench.in_cache_quarter.run, min_repeats=5, min_seconds=0.02)
            slopes.append(max(in_cache_s - quarter_s, 0.05 * in_cache_s))
        return 0.75 * bench.in_cache_flops / statistics.median(slopes) / 1e9
    in_cache_s, quarter_s = (serial_times[id(c)] for c in (bench.in_cache, bench.in_cache_quarter))
    return 0.75 * bench.in_cache_flops / max(in_cache_s - quarter_s, 0.05 * in_cache_s) / 1e9


def _nonnegative_line(rows: list, ys: list) -> tuple:
    """(intercept, slopes): the least-squares line through (rows[i], ys[i]) with no negative slope. A
    column whose values hardly vary (under 10%) gets slope 0; when a free fit gives a negative slope, the
    best fit over the columns left is taken (noise made a longer context look faster now and then)."""
    from itertools import combinations

    columns = np.asarray(rows, dtype=float).reshape(len(ys), -1)
    y = np.asarray(ys, dtype=float)
    varying = [j for j in range(columns.shape[1]) if columns[:, j].max() > 1.1 * max(columns[:, j].min(), 0.0)]
    best = (float(np.mean(y)), np.zeros(columns.shape[1]), float(np.sum((y - np.mean(y)) ** 2)))
    for k in range(1, len(varying) + 1):
        for subset in combinations(varying, k):
            design = np.column_stack([np.ones(len(y)), columns[:, subset]])
            if np.linalg.matrix_rank(design) < design.shape[1]:
                continue
            coef = np.linalg.lstsq(design, y, rcond=None)[0]
            if (coef[1:] < 0).any():
                continue
            residual = float(np.sum((design @ coef - y) ** 2))
            if residual < best[2] - 1e-30:
                slopes = np.zeros(columns.shape[1])
                slopes[list(subset)] = coef[1:]
                best = (float(coef[0]), slopes, residual)
    return best[0], best[1]


# An op's multiple of its kernel's line is at least this: every call costs its dispatch, and a multiple of 0
# (an op whose calls all came out under their roof) would be refused by the profile's loader.
MIN_OP_FACTOR = 0.05


def _roof_from_decode(gflops: float, points: list, parallel: bool, cold_call_us: float = 0.0, reference_gflops: float = 0.0,
                      kernel: str = "gemv.", overlap_power: float = 0.0, per_kv_head_us: float = 0.0) -> dict:
    """A kernel's fixed cost and overlap from its calls in decode (_decode_shaped_calls), its compute roof given.

    Serial kernels: the call beyond its roof, fitted as a line in the K/V bytes a layer's attention
    reads, in the bytes of the call's operands and in the weight bytes a layer streams, through the points
    of the three decode-shaped models (each at two contexts; the operands differ between the first two,
    the layer's bytes between the second and the third);
    each point's time beyond the roof is first scaled to the calibration's cold-call probe (`cold_call_us`)
    from its own steps' probes, as compare scales the profile to a run's: the models' steps run a few
    seconds apart, and the host's cold-call cost drifts by 2x within minutes (its spread over repeated
    points: 22% raw, 8% so scaled). No overlap (a few KB). A kernel several ops run (the norms, the
    residual adds) has a factor per op on the line (`overhead_factor_by_op`), from that op's points.
    GEMVs and attention: time - max(compute, memory) = overhead + overlap * min(compute, memory), the
    least-squares line through the points (each op at each context), memory at their own streaming
    passes, compute at the roof `gflops` (stated at the compute probe `reference_gflops`) times each
    point's own speed (DecodeShapedPoint.speed). Fitted on sweeps in a loop of their own, attention
    under-predicted decode's by 11-19% on one thread, in this 4-layer model as in Phi-3 Mini, and the
    q4_0 GEMVs' overlap came out 0.03-0.35 from one calibration to the next. With an `overlap_power` p
    (the q4_0 GEMVs: GEMV_OVERLAP_POWER) the roof is the power mean of compute and memory, and only the
    fixed cost is fitted: the mean over the points of time - (compute^p + memory^p)^(1/p). Attention's calls
    are fitted less `per_kv_head_us` (_attention_kv_head_us) times their model's K/V heads, which the roof
    states as its own term (overhead_us_per_kv_head): its fixed cost is then what a call costs at none."""
    if not parallel:
        # As for the parallel kernels below, FLOPs over seconds of any of its decode calls is a floor
        # under the compute roof: kv_append's in-cache roof on two threads once came out 0.11 GFLOP/s
        # (1.1-1.9 in the other calibrations), which put phi-3-mini's kv_append at 4.6x its measured time.
        gflops = max(gflops, max(p.cost.flops / p.seconds for p in points) / 1e9)
        excess, call_s = [], []  # beyond the roof, and the whole call, each in the calibration's probe units
        for p in points:
            scale = cold_call_us / p.cold_call_us if cold_call_us > 0 and p.cold_call_us > 0 else 1.0
            excess.append((p.seconds - max(p.roofs_s(gflops))) * scale)
            call_s.append(p.seconds * scale)
        # A model's longer-context call costing over SERIAL_OUTLIER_RATIO x its shorter one is left out:
        # kv_append now and then runs 3-18x its usual cost over a whole session at context 4000 (312 us
        # against 17-19 us at 128 and in the other model; 0-3 page faults a step, so not a first touch),
        # and one such calibration over-predicted phi-3-mini's serial ops by up to 475%. Its usual growth
        # from 128 to 4000 positions is 1.1-1.6x. Whole calls are compared, not what is beyond the roof:
        # where the floor above sets the roof, the short call has nothing beyond it, and (calibration v24)
        # a 4.7x call on two threads (85 us against 18) was kept and fitted as 1.5 us per MB of K/V,
        # which put phi-3-mini's kv_append at +94% to +323% on two threads.
        kept = []
        for model, op in sorted({(p.model, p.op) for p in points}):
            own = sorted((i for i, p in enumerate(points) if (p.model, p.op) == (model, op)), key=lambda i: points[i].kv_bytes)
            kept += [i for i in own if call_s[i] <= SERIAL_OUTLIER_RATIO * call_s[own[0]]]
        overhead_s, (per_kv_byte_s, per_operand_byte_s, per_layer_byte_s) = _nonnegative_line(
            [(points[i].kv_bytes, points[i].cost.bytes, points[i].layer_weight_bytes) for i in kept], [excess[i] for i in kept])
        roof = {"gflops": _sig(gflops), "overlap": 0.0, "overhead_us": _sig(max(overhead_s, 0.0) * 1e6),
                 "overhead_us_per_kv_mb": _sig(per_kv_byte_s * 1e12), "overhead_us_per_operand_mb": _sig(per_operand_byte_s * 1e12),
                 "overhead_us_per_layer_mb": _sig(per_layer_byte_s * 1e12)}
        # A kernel run by several ops (the three norms, the two residual adds) costs each of them its own
        # multiple of the line, the op's place in the layer: the norm before attention (after the MLP's
        # down projection and residual add) ran 1.5-1.6x the norm before the MLP, in both decode-shaped
        # models as in Phi-3 Mini and Small (1 and 2 threads); the line alone, through both, had Mini's
        # norm before the MLP +35% and the one before attention -9% (ten rounds, calibration v22).
        ops = sorted({points[i].op for i in kept})
        if len(ops) > 1:
            line_s = [max(overhead_s, 0.0) + per_kv_byte_s * p.kv_bytes + per_operand_byte_s * p.cost.bytes + per_layer_byte_s * p.layer_weight_bytes
                      for p in points]
            factors = {}
            for op in ops:
                own = [i for i in kept if points[i].op == op]
                if sum(line_s[i] for i in own) > 0:
                    factors[op] = round(float(max(sum(excess[i] for i in own) / sum(line_s[i] for i in own), MIN_OP_FACTOR)), 4)
            roof["overhead_factor_by_op"] = factors
        return roof
    # A kernel whose every call in decode is compute-bound by its in-cache roof (grouped-query attention:
    # each K/V row serves 4 query heads) computes in decode at the rate its calls show there: seconds
    # against FLOPs over the contexts, a line whose slope is the roof and whose intercept the fixed cost;
    # its memory traffic hides. Its in-cache roof ran ahead of decode (1 thread: 48-51 GFLOP/s, against
    # 33-37 in phi-3-small's decode); the fit then read the gap as overlap (0.97-1.0) and charged it to
    # the memory time, which phi-3-small's groups of 4 have more of per FLOP: +16% to +27%.
    # FLOPs in the reference state's seconds: a point whose steps found the host at half speed took twice as long
    speeds = [p.speed(reference_gflops, kernel) for p in points]
    per_heads = {"overhead_us_per_kv_head": per_kv_head_us} if per_kv_head_us else {}
    seconds = [p.seconds - per_kv_head_us * 1e-6 * p.kv_heads for p in points]  # a call less its K/V heads' cost
    if overlap_power:
        excess_s = [s - roof_s(*p.roofs_s(gflops * speed), power=overlap_power) for s, p, speed in zip(seconds, points, speeds)]
        return {"gflops": _sig(gflops), "overlap": 0.0, "overlap_power": overlap_power,
                "overhead_us": _sig(max(float(np.mean(excess_s)), 0.0) * 1e6)}
    flops = [p.cost.flops / speed for p, speed in zip(points, speeds)]
    if max(flops) > 1.1 * min(flops) and all(compute_s > memory_s for compute_s, memory_s in (p.roofs_s(gflops * s) for p, s in zip(points, speeds))):
        per_flop_s, overhead_s = np.polyfit(flops, seconds, 1)
        if per_flop_s > 0:
            return {"gflops": _sig(1e-9 / per_flop_s), "overlap": 0.0, "overhead_us": _sig(max(float(overhead_s), 0.0) * 1e6), **per_heads}
    # A kernel computes at least as fast as it did in decode, so FLOPs over seconds of any of its calls
    # there is a floor under its compute roof. The in-cache slope fell below it now and then on 2 threads
    # (grouped-query attention: 39.7 GFLOP/s in one calibration, 48-56 in two others; the fit then clamped
    # overlap and fixed cost to 0, and phi-3-small's attention came out +55% to +75%).
    gflops = max(gflops, max(f / p.seconds for f, p in zip(flops, points)) / 1e9)
    hidden, excess = [], []
    for s, p, speed in zip(seconds, points, speeds):
        compute_s, memory_s = p.roofs_s(gflops * speed)
        hidden.append(min(compute_s, memory_s))
        excess.append(s - max(compute_s, memory_s))
    slope, intercept = np.polyfit(hidden, excess, 1)
    if intercept < 0:
        # A negative fixed cost is none, and the free slope with no fixed cost charged every call more than its
        # points showed: the q4_0 GEMVs' fit came out at overlap 0.25-0.37 with no fixed cost in 3 of 23 Skylake-SP
        # calibrations (0.03-0.15 and 15-92 us in the others), and the fresh-clone CI's gate then measured host
        # accuracy -13% (context 256) and -9% (2048) against +0.4% and +1.9% in its baseline. The slope is then the
        # best line's through the origin.
        slope = float(np.dot(hidden, excess) / np.dot(hidden, hidden))
    overlap = min(max(float(slope), 0.0), 1.0)
    overhead_s = max(float(np.mean(excess)) - overlap * float(np.mean(hidden)), 0.0)  # the line's value, overlap clamped
    return {"gflops": _sig(gflops), "overlap": round(overlap, 4), "overhead_us": _sig(overhead_s * 1e6), **per_heads}


def _serial_roofs(gflops: dict, decode_points: dict, cold_call_us: dict) -> dict:
    """{kernel: {threads: roof}} of the serial kernels, from {threads: {kernel: in-cache GFLOP/s}},
    {threads: {kernel: decode points}} and {threads: cold-call probe us}.

    A serial kernel runs on the calling thread whatever the thread count, so its compute roof is the best
    of its in-cache roofs over the thread counts. Each alone scattered 0.1x-7x between the two (median
    0.9-1.5x, 18 calibrations); kv_append's once came out 0.28 GFLOP/s on two threads (1.5 on one), and
    the floor under it (_roof_from_decode) then charged that kernel's whole short call to compute."""
    kernels = next(iter(gflops.values()))
    return {kernel: {threads: _roof_from_decode(max(by_kernel[kernel] for by_kernel in gflops.values()), decode_points[threads][kernel],
                                                False, cold_call_us[threads])
                     for threads in gflops}
            for kernel in kernels}


def _kernel_roof(bench: KernelBench, stream_read, producer: Producer, threads: int, decode_points: list | None, gflops: float,
                 reference_gflops: float = 0.0, per_kv_head_us: float = 0.0) -> dict:
    """A parallel kernel's roof at `threads` (the serial kernels': _serial_roofs), at its in-cache compute
    roof `gflops` (_compute_roof_gflops, stated at the compute probe `reference_gflops`: _state_normalized);
    attention's fitted on decode, with a fixed cost of `per_kv_head_us` a K/V head (_attention_kv_head_us)."""
    if decode_points:
        return _roof_from_decode(gflops, decode_points, True, reference_gflops=reference_gflops, kernel=bench.kernel,
                                 overlap_power=GEMV_OVERLAP_POWER if bench.kernel == PROBE_KERNEL else 0.0, per_kv_head_us=per_kv_head_us)
    if bench.kernel.startswith("attention"):
        # Attention's fixed cost is the cold start of its K/V streams (see _attention_bench): timed
        # after a Producer, which evicts the cache rows the way a decode layer's GEMVs do.
        before = producer.before(bench.tiny, threads)
    else:
        # In decode every op follows one that has streamed megabytes through the caches, so the fixed
        # cost is timed after an 8 MiB streaming read (a hot loop calls a tiny GEMV ~2x faster).
        before = stream_read
    # Cold calls vary more than hot ones (what the stream left in the L3 varies), and a neighbour's
    # burst once held a whole median of a tiny attention call at 764 us, against 41 us measured alone:
    # the fixed cost is the median of three medians taken apart (11 calls each).
    overhead_s = statistics.median(_median_call_s(bench.tiny.run, min_repeats=11, before=before) for _ in range(3))
    # Rounds of (one streaming pass, then a sweep of back-to-back calls over operands 3x the L3), the
    # memory roof of each round its own pass: the host's bandwidth drifts by 10-30% over a minute
    # (other VMs share its DRAM), which made a fit against a roof taken once swing between 0 and 0.7
    # from run to run. The decode a prediction is compared with takes its roof the same way
    # (perfsim.measure.read_pass_gb_s before each step).
    from perfsim.measure import read_pass_gb_s

    bench.dram()
    fits = []
    for _ in range(OVERLAP_ROUNDS):
        bandwidth = read_pass_gb_s(threads) * 1e9
        start = time.perf_counter()
        for _ in range(bench.dram_calls):
            bench.dram()
        call_s = (time.perf_counter() - start) / bench.dram_calls - overhead_s
        compute_s, memory_s = bench.dram_flops / (gflops * 1e9), bench.dram_bytes / bandwidth
        fits.append((call_s - max(compute_s, memory_s)) / min(compute_s, memory_s))
    overlap = min(max(statistics.median(fits), 0.0), 1.0)
    return {"gflops": _sig(gflops), "overlap": round(overlap, 4), "overhead_us": _sig(overhead_s * 1e6)}


# A GEMV's in-cache roof per thread is the same at every thread count when the host is quiet: the q4_0,
# q8_0, f16 and f32 GEMVs' one- and two-thread roofs per thread agreed within 0.87-1.00 in the Skylake-SP
# calibrations of the twelfth session that nothing disturbed. In two that something did, q4_0's came out
# 32 GFLOP/s on one thread (55 in the others; 0.62 of its two-thread roof per thread) and 62 on two (104-113;
# 0.57), with f16's at 0.45; each time Phi-3's GEMVs at that thread count were predicted 8-20% slow, and
# tokens/s missed by up to -17.5%. Such a roof is measured again, up to GEMV_ROOF_RETRIES times, and
# the faster measurement kept. (Attention's per-thread roofs differ 0.58-1.0 even on a quiet host.)
GEMV_ROOF_AGREEMENT = 0.8
GEMV_ROOF_RETRIES = 2


def _disagreeing_thread_count(gflops_by_threads: dict) -> int | None:
    """The thread count whose roof per thread falls below GEMV_ROOF_AGREEMENT of the best one's, else None."""
    per_thread = {threads: gflops / threads for threads, gflops in gflops_by_threads.items()}
    slowest = min(per_thread, key=per_thread.get)
    return slowest if per_thread[slowest] < GEMV_ROOF_AGREEMENT * max(per_thread.values()) else None


def _sig(x: float) -> float:
    """Four significant digits: the profile stays readable and no small roof rounds to zero."""
    return float(f"{x:.4g}")


def _state_normalized(measure, threads: int, reference_gflops: float, kernel: str = "gemv.") -> float:
    """`measure()`, `kernel`'s in-cache roof in GFLOP/s with `threads` threads, stated at the speed state of the
    compute probe `reference_gflops`: times that over the mean of two probes (perfsim.measure.compute_probe_gflops),
    one right before it and one right after, at the kernel's elasticity (perfsim.device.compute_state_factor; by
    default a GEMV's, 1). This host's compute flips between speed states for a second or more at a time (the
    probe's docstring); a roof measured in one and a decode point in another would put
    the difference into the kernel's fixed cost and overlap, and a run's prediction, scaled by its own
    probes, would then count the state twice or miss it. (Calibrations v29-v32 measured every parallel roof
    a second time at their end and kept the second when 1.1x the first or more. With roofs so stated, the one
    v33 calibration that kept it replaced five, among them f16 attention's on two threads (29.5 -> 33.8
    GFLOP/s), and Phi-3 Mini's attention on two threads came out -17% to -23%: the faster of two noisy
    looks is biased fast. It is gone, and calibration is ~5 s shorter.)"""
    from perfsim.measure import compute_probe_gflops

    before = compute_probe_gflops(threads)
    gflops = measure()
    state = (before + compute_probe_gflops(threads)) / 2
    return gflops * compute_state_factor(kernel, reference_gflops / state) if reference_gflops > 0 and state > 0 else gflops


def _own_cpu_s() -> float:
    """CPU seconds of this process and of its children waited for (the head_dim factors' processes): not
    another process's load. Without the children, those ~7 s read as 10-11% of the cores taken by others."""
    times = os.times()
    return time.process_time() + times.children_user + times.children_system


def measure_host(progress=None, decode_points: dict | None = None) -> dict:
    """All the microbenchmarks; returns the host profile as YAML-ready data. `decode_points`, if given, gets
    {threads: {kernel: [DecodeShapedPoint, ...]}}: the calls in decode the fixed costs and overlaps are fitted on."""
    from perfsim.kernels.jit import set_threads
    from perfsim.kernels.stream import best_read_gb_s, stream_buffer, sum_int64
    from perfsim.measure import available_threads, busy_cpu_s, stolen_cpu_s

    started, busy_s, own_cpu_s, stolen_s = time.perf_counter(), busy_cpu_s(), _own_cpu_s(), stolen_cpu_s()
    report = progress or (lambda done, total, what: None)
    cores = available_threads()
    thread_counts = list(range(1, cores + 1))
    parallel = [_gemv_bench(f) for f in ("q4_0", "q8_0", "f16", "f32")]
    parallel += [_attention_bench(f, group) for f in ("f16", "q8_0", "f32") for group in (1, 4)]
    serial = _serial_benches()
    decode_shaped_runs = [(_decode_shaped_weights(model, sessions), sessions, steps) for model, sessions, steps in DECODE_SHAPED_RUNS]
    total = len(thread_counts) * (2 + len(parallel) + len(serial))
    done = 0
    data = stream_buffer(256 * 2**20)
    flush = stream_buffer(8 * 2**20)
    stream_read = lambda: sum_int64(flush)
    producer = Producer()
    bandwidth_gb_s, cold_call_us, kernel_roofs = {}, {}, {b.kernel: {} for b in parallel + serial}
    serial_gflops, serial_decode_calls = {}, {}  # per thread count: {serial kernel: in-cache roof}, {kernel: decode points}
    wide_model = [model for model, _, _ in DECODE_SHAPED_RUNS].index(DECODE_SHAPED_WIDE_MODEL)
    # the decode points a parallel kernel's fixed cost and overlap are fitted on (None: its own DRAM sweeps)
    fitted_points = lambda bench, threads, calls: [p for p in calls.get(bench.kernel, ()) if p.model != wide_model] or None  # noqa: E731
    first_gflops = {}  # (kernel, threads): the in-cache roof its fit was made at
    head_dim_factors = None  # multi-head attention's, for every thread count
    # per thread count, the median compute probe of the decode steps: every parallel kernel's compute roof is stated at it
    reference_gflops = {}

    def measure_gflops(bench, threads):
        if bench.kernel == PROBE_KERNEL:  # the probe's own measurement: its median over the decode steps
            return reference_gflops[threads]
        set_threads(threads)
        return _state_normalized(lambda: _compute_roof_gflops(bench, None), threads, reference_gflops[threads], bench.kernel)

    gqa_group = DECODE_SHAPED_GQA_MODEL.n_heads // DECODE_SHAPED_GQA_MODEL.n_kv_heads  # .gqa's decode points come from it

    def refit(bench, threads, gflops):  # after this thread count's decode points are in serial_decode_calls
        points = fitted_points(bench, threads, serial_decode_calls[threads])
        per_kv_head_us = 0.0  # attention fitted on decode: its fixed cost a K/V head, measured here (once: only GEMVs are refitted again)
        if points and bench.kernel.startswith("attention."):
            per_kv_head_us = _attention_kv_head_us(bench.kernel.split(".")[1], gqa_group if bench.kernel.endswith(".gqa") else 1, threads)
        return _kernel_roof(bench, stream_read, producer, threads, points, gflops, reference_gflops[threads], per_kv_head_us)

    for threads in thread_counts:
        report(done, total, f"read bandwidth, {threads} threads")
        bandwidth_gb_s[threads] = _sig(best_read_gb_s(threads, data, repeats=9))
        done += 1
        # Serial kernels run on the calling thread, but what runs before them in decode (a GEMV on every
        # thread) sets what they find in the caches: they are measured at each thread count too.
        report(done, total, f"ops in decode of 3 small models, {threads} threads")
        set_threads(threads)
        probes, compute_probes = [], []
        # the q4_0 GEMVs get points from the first two models, the serial ops from all three
        decode_calls = _decode_shaped_calls(decode_shaped_runs, threads, probes, compute_probes)
        cold_call_us[threads] = _sig(statistics.median(probes))
        reference_gflops[threads] = _sig(statistics.median(compute_probes))
        serial_decode_calls[threads] = decode_calls
        if decode_points is not None:
            decode_points[threads] = decode_calls
        done += 1
        for bench in parallel:
            report(done, total, f"{bench.kernel}, {threads} threads")
            first_gflops[bench.kernel, threads] = measure_gflops(bench, threads)
            kernel_roofs[bench.kernel][threads] = refit(bench, threads, first_gflops[bench.kernel, threads])
            if bench.kernel == "attention.f16":  # multi-head, fitted at head_dim 128; measured on one thread (HEAD_DIM_THREADS)
                if head_dim_factors is None:
                    head_dim_factors = _attention_head_dim_factors_of_processes(HEAD_DIM_THREADS)
                kernel_roofs[bench.kernel][threads]["time_factor_by_head_dim"] = dict(head_dim_factors)
            done += 1
        report(done, total, f"serial kernels, {threads} threads")
        serial_times = _serial_call_times(serial, producer, threads)
        serial_gflops[threads] = {bench.kernel: _compute_roof_gflops(bench, serial_times) for bench in serial}
        done += len(serial)
    # a roof out of line with its other thread count is measured again (the probe's kernel's measure_gflops gives
    # its median again, no faster, so it is kept)
    for bench in (b for b in parallel if b.kernel.startswith("gemv.")):
        for _ in range(GEMV_ROOF_RETRIES):
            threads = _disagreeing_thread_count({t: kernel_roofs[bench.kernel][t]["gflops"] for t in thread_counts})
            if threads is None:
                break
            gflops = measure_gflops(bench, threads)
            if gflops <= first_gflops[bench.kernel, threads]:
                break  # as slow again: that is what this thread count does
            kernel_roofs[bench.kernel][threads] = refit(bench, threads, gflops)
            first_gflops[bench.kernel, threads] = gflops
    for kernel, roofs in _serial_roofs(serial_gflops, serial_decode_calls, cold_call_us).items():
        kernel_roofs[kernel].update(roofs)
    del data
    report(total, total, "done")
    import psutil

    # CPU time other processes took while this ran, over the cores' wall time (busy_cpu_s counts ours too)
    seconds = time.perf_counter() - started
    other_load_fraction = max(busy_cpu_s() - busy_s - (_own_cpu_s() - own_cpu_s), 0.0) / (seconds * cores) if busy_s else 0.0
    # and what the hypervisor gave other guests of this VM's vCPUs (/proc/stat's steal)
    stolen_fraction = max(stolen_cpu_s() - stolen_s, 0.0) / (seconds * cores)

    fingerprint = host_fingerprint()
    measured_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    how = f"measured by perfsim calibrate {__version__} on {fingerprint['cpu_model']} at {measured_at}"
    best = lambda prefix: max(r[cores]["gflops"] for k, r in kernel_roofs.items() if k.startswith(prefix)) / 1e3
    return {
        "name": "host",
        "display_name": f"{fingerprint['cpu_model']} (this host, calibrated)",
        "kind": "host",
        "notes": "Calibrated by microbenchmarks of perfsim's own kernels, and by the engine's decode of two 4-layer models no Phi-3 is "
                 "(fixed costs and overlaps of the q4_0 GEMVs, attention and the serial ops); no decode of a predicted model is measured.",
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
                "cold_call_us_by_threads": cold_call_us,
                "compute_probe_gflops_by_threads": reference_gflops,
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
            "units.cpu.cold_call_us_by_threads": f"{how}: perfsim.measure.cold_call_probe_us after each decode step's streaming pass, median",
            "units.cpu.compute_probe_gflops_by_threads": f"{how}: perfsim.measure.compute_probe_gflops before each decode step, median; "
                                                         "every GEMV's and attention's compute roof is stated at it",
            "units.cpu.overhead_us_per_op": f"{how}: one call of a tiny serial kernel",
            "units.cpu.kernel_roofs": f"{how}: per kernel, tiny / in-cache / out-of-cache runs at non-Phi-3 shapes",
        },
        "calibration": dict(fingerprint, measured_at=measured_at, perfsim_version=__version__, seconds=round(seconds, 1),
                            other_load_fraction=round(other_load_fraction, 3), stolen_fraction=round(stolen_fraction, 3)),
    }


def write_profile(data: dict, path: Path) -> Device:
    """Validate, then write to a temporary file and rename: no half-written profile is ever read."""
    device = device_from_data(data, str(path))
    write_text_atomically(path, f"# Host profile written by perfsim calibrate {__version__}; re-run it to refresh.\n"
                            + yaml.safe_dump(data, sort_keys=False))
    return device


# Another process on the cores while calibration ran: once, a second CI run's tests beside `perfsim gate`'s
# calibration took about half of the 2 cores. The two-thread stream read came out 11.2 GB/s (25-36
# otherwise), the q4_0 GEMV's two-thread fixed cost 1508 us (0-43 in eight calibrations that night), and
# the gate's accuracy -65%. Then (twelfth session, Skylake-SP host) a test run during 15 s of a 50 s
# calibration: 19% over the whole calibration, and the two-thread stream read 9.1 GB/s against 22.4 in the
# next quiet one; phi-3-mini's attention on two threads came out +30% to +56%. Quiet calibrations: 0.3-2%.
BUSY_HOST_FRACTION = 0.1


def busy_host_warning(device: Device) -> str | None:
    """A warning when other processes, or the hypervisor for other guests, took more than BUSY_HOST_FRACTION
    of the cores while `device` was calibrated (its roofs are then those of a share of the host), else None."""
    others, stolen = device.calibration.get("other_load_fraction", 0.0), device.calibration.get("stolen_fraction", 0.0)
    if others + stolen <= BUSY_HOST_FRACTION:
        return None
    who = " and ".join(part for part, fraction in (("other processes", others), ("the hypervisor (steal)", stolen)) if fraction > 0)
    return (f"warning: {who} took {100 * (others + stolen):.0f}% of the {device.calibration['cores']} cores while this host was calibrated; "
            f"its roofs may be too low: run 'perfsim calibrate' again on a quiet host")


# A calibration whose streaming read at some thread count came out under this fraction of the previous
# calibration's on the same machine ran in a slower memory state. Measured on this host (2026-11-28): one-thread
# reads of 10.5-12.4 GB/s in its usual state (0.85-1.18x one another), 7.3-8.5 in the slow one (0.59-0.81x the
# usual: this fraction misses only its mildest), which lasted from minutes to about half an hour. The fifteenth
# session's six gates calibrated in it erred up to +14.2%; the sixteenth session's round a (7.3 GB/s) over-predicted
# all its 24 points, by up to +13.6%, its sweeps' memory 1.2-1.5x the calibration's: its q4_0 GEMVs' overlap is
# fitted where their compute hides under slow memory (0.0 and 0.009, against 0.05-0.19 in a usual state).
SLOW_MEMORY_FRACTION = 0.8


def previous_reads(path: Path) -> dict:
    """The streaming reads and date of the profile at `path` when it was calibrated on this CPU model with these
    cores (of any calibration version), as the `calibration` fields a new calibration there keeps them in
    (slow_memory_warning compares with them); {} when there is none, or it is unreadable or another machine's."""
    try:
        old = load_device_file(path)
    except (OSError, UserError):
        return {}
    saved, now = old.calibration, host_fingerprint()
    if not saved or any(saved.get(key) != now[key] for key in ("cpu_model", "cpu_id", "cores")):
        return {}
    return {"previous_bandwidth_gb_s_by_threads": dict(old.unit().bandwidth_gb_s_by_threads), "previous_measured_at": saved["measured_at"]}


def _lowest_under(ratios: dict, fraction: float) -> int | None:
    """The thread count whose ratio is the lowest, if that is under `fraction`; else None."""
    t = min(ratios, key=ratios.get, default=None)
    return t if t is not None and ratios[t] < fraction else None


def slow_memory_warning(device: Device) -> str | None:
    """A warning when `device`'s streaming read at some thread count came out under SLOW_MEMORY_FRACTION of the
    previous calibration's on this machine (previous_reads), else None."""
    previous = device.calibration.get("previous_bandwidth_gb_s_by_threads", {})
    now = device.unit().bandwidth_gb_s_by_threads
    ratios = {t: now[t] / previous[t] for t in now if t in previous}  # the loader keeps positive reads only
    if (t := _lowest_under(ratios, SLOW_MEMORY_FRACTION)) is None:
        return None
    return (f"warning: this calibration's streaming read came out {now[t]:.1f} GB/s on {t} thread(s), {ratios[t]:.2f}x the previous "
            f"calibration's {previous[t]:.1f} ({device.calibration.get('previous_measured_at', '?')}): the host's memory was in a slower "
            "state; predictions from such a profile have over-predicted tokens/s by up to 14% once it was back: run 'perfsim calibrate' "
            "again later")


# A calibration whose compute probe per thread at some thread count came out under this fraction of its one-thread
# probe measured that thread count's roofs in a slower state of the CPU. The ratio was 0.63-1.09 in 19 calibrations on
# the Zen 4 EPYC guest (2026-12-07) and about 1.0 on the Skylake-SP one (45 and 90, 30.5 and 64.3 GFLOP/s). Once it
# was 0.41 (134 GFLOP/s on two threads, 162 on one; the sweeps' steps then read 193-224 on two): that round's
# two-thread attention came out 18-45% slow and its serial ops 3-43%, as a run's probe rescales the GEMVs fully,
# attention at elasticity 0.5 and the serial ops not at all, and tokens/s -4.5% to -18.3% at all 12 two-thread points.
SLOW_COMPUTE_FRACTION = 0.5


def slow_compute_warning(device: Device) -> str | None:
    """A warning when `device`'s compute probe per thread at some thread count came out under SLOW_COMPUTE_FRACTION
    of its one-thread probe (compute_probe_gflops_by_threads), else None."""
    probes = device.unit().compute_probe_gflops_by_threads
    if not probes.get(1):
        return None
    ratios = {t: gflops / t / probes[1] for t, gflops in probes.items() if t > 1}
    if (t := _lowest_under(ratios, SLOW_COMPUTE_FRACTION)) is None:
        return None
    return (f"warning: this calibration's compute probe came out {probes[t]:.0f} GFLOP/s on {t} threads, {ratios[t]:.2f}x its one-thread "
            f"{probes[1]:.0f} per thread: the CPU was in a slower state while the {t}-thread roofs were measured, and predictions at "
            f"{t} threads may be too slow (its attention and serial ops up to 45% here): run 'perfsim calibrate' again")


def calibration_warnings(device: Device) -> list[str]:
    """What the profile's own record says may be wrong with its roofs: busy_host_warning, slow_memory_warning,
    slow_compute_warning."""
    return [w for w in (busy_host_warning(device), slow_memory_warning(device), slow_compute_warning(device)) if w]


def decode_points_path(profile_path: Path) -> Path:
    """Where the decode points a profile's fixed costs and overlaps were fitted on are kept: beside it
    (host.yaml -> host.decode-points.json)."""
    return profile_path.with_name(f"{profile_path.stem}.decode-points.json")


def _decode_points_record(decode_points: dict, measured_at: str) -> dict:
    """JSON-ready {threads: {kernel: [points]}} of measure_host, with the calibration they belong to."""
    return {"calibration_version": CALIBRATION_VERSION, "measured_at": measured_at,
            "models": [dataclasses.asdict(model) for model, _, _ in DECODE_SHAPED_RUNS],  # a point's `model` indexes this list
            "points": [dict(threads=threads, kernel=kernel, **dataclasses.asdict(point))
                       for threads, by_kernel in decode_points.items() for kernel, points in by_kernel.items() for point in points]}


def load_decode_points(profile_path: Path, device: Device) -> dict:
    """{threads: {kernel: [DecodeShapedPoint, ...]}} kept beside the profile at `profile_path` by the calibration
    that wrote `device` (a UserError if they are missing, unreadable or another calibration's): what its fixed
    costs and overlaps were fitted on, to audit or refit them."""
    path = decode_points_path(profile_path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record["measured_at"] != device.calibration.get("measured_at"):
            raise UserError(f"{path} is of the calibration of {record['measured_at']}, not of this profile's "
                            f"({device.calibration.get('measured_at')}); run 'perfsim calibrate' again")
        points = {}
        for row in record["points"]:
            fields = {k: v for k, v in row.items() if k not in ("threads", "kernel")}
            points.setdefault(int(row["threads"]), {}).setdefault(row["kernel"], []).append(
                DecodeShapedPoint(**{**fields, "cost": Cost(**fields["cost"])}))
        return points
    except OSError as e:
        raise UserError(f"cannot read the decode points at {path} ({e.strerror}); run 'perfsim calibrate' to measure them") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"the decode points at {path} are corrupt ({type(e).__name__}: {e}); run 'perfsim calibrate' again") from None


def calibrate_host(progress=None, path: Path | None = None) -> Device:
    """Measures the host and writes its profile at `path` (the cache's by default); the streaming reads of the
    profile it replaces, if that was this machine's, are kept beside the new ones (previous_reads). The decode
    points its fixed costs and overlaps were fitted on are written beside it (decode_points_path), after it:
    an interruption between the two leaves the older points, which load_decode_points then refuses."""
    path = path or host_profile_path()
    previous = previous_reads(path)
    decode_points = {}
    data = measure_host(progress, decode_points)
    data["calibration"].update(previous)
    device = write_profile(data, path)
    if decode_points:
        write_text_atomically(decode_points_path(path), json.dumps(_decode_points_record(decode_points, data["calibration"]["measured_at"])))
    return device


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
    """The saved host profile; missing, stale or corrupt, it is re-measured (with a message). One
    calibrated on a busy host, in a slower memory state than the calibration before it, or with its CPU slower at
    some thread count, is used with a warning each time (busy_host_warning, slow_memory_warning, slow_compute_warning)."""
    path = host_profile_path()
    tell = message or (lambda text: None)
    device, reason = None, None
    if not path.exists():
        reason = f"no host profile at {path}"
    else:
        try:
            device = load_device_file(path)
            if stale := stale_reason(device):
                device, reason = None, f"the host profile at {path} is stale: {stale}"
        except UserError as e:
            reason = f"the host profile at {path} is unreadable ({e})"
    if device is None:
        if not recalibrate:
            raise UserError(f"{reason}; run 'perfsim calibrate'")
        tell(f"{reason}; calibrating this host (under a minute) ...")
        device = calibrate_host(progress, path)
    for warning in calibration_warnings(device):
        tell(warning)
    return device
