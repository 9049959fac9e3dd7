"""A CPU-speed probe that shares no code with the kernels it is used to judge.

The gate's kernel metrics are a kernel's GB/s over the same-round streaming read. On the Skylake-SP KVM
host the CPU's speed changes state while memory reads on as before: this probe and the q4_0 GEMV's
in-cache compute probe (perfsim.measure.compute_probe_gflops) fell together to 0.56-0.72x for seconds to
minutes at a time, and the one-thread q4_0 GEMV at 3072x8192, close to balanced between compute and
memory, fell from 0.89 of the stream to 0.76 with them (2026-11-28, 2,185 rounds over 5 minutes, the
slowest tenth of this probe's readings against the fastest). A gate can only tell such a state from a
slower kernel with a probe the kernel's code cannot slow, hence this one: the q4_0 probe runs the GEMV
under test, so a change that made its unpacking 1.5x slower would read as a slower CPU.

The kernel: each thread takes its own L1-resident block of DOT_CHAIN_VALUES float32 and runs `reps`
dot products of it with one shared vector, one accumulator each: a chain of dependent FMAs, bound by
the core's clock and what it shares with a neighbour, not by the vector width LLVM picks. Measured on
this host: 21-24 GFLOP/s on one thread in the fast state, 13-16 in the slow one.

Run `python -m perfsim.kernels.probe` to validate it and print its readings beside the q4_0 probe's.
"""

from __future__ import annotations

import time

import numpy as np

from perfsim.cost import Cost
from perfsim.kernels.jit import jit, prange, set_threads

DOT_CHAIN_VALUES = 2048  # 8 KiB per thread, with the shared vector 16 KiB: the 32 KiB L1 holds both
DOT_CHAIN_REPS = 400  # ~80 us a call on one thread in the fast state: long enough to time, short to repeat
PROBE_CALLS = 5  # calls timed per reading, their median


def dot_chain_cost(threads: int, n_values: int = DOT_CHAIN_VALUES, reps: int = DOT_CHAIN_REPS) -> Cost:
    """Two flops (a multiply and an add) per value per repeat per thread; the operands stay in L1."""
    return Cost(flops=2 * threads * n_values * reps, weight_bytes=0)


def dot_chain_reference(blocks: np.ndarray, x: np.ndarray, reps: int) -> np.ndarray:
    """What dot_chain returns: per block, reps x 1e-3 x its dot product with x."""
    return (reps * 1e-3 * (blocks.astype(np.float64) @ x.astype(np.float64))).astype(np.float32)


@jit(parallel=True)
def dot_chain(blocks, x, reps):
    """Per row of `blocks` (one per thread), `reps` dot products with `x`, each a single dependent chain."""
    out = np.zeros(blocks.shape[0], dtype=np.float32)
    for t in prange(blocks.shape[0]):
        block = blocks[t]
        total = np.float32(0.0)
        for _ in range(reps):
            chain = np.float32(0.0)
            for i in range(block.size):
                chain += block[i] * x[i]
            total += chain * np.float32(1e-3)
        out[t] = total
    return out


_OPERANDS: dict[int, tuple] = {}


def cpu_speed_gflops(threads: int) -> float:
    """GFLOP/s of dot_chain on `threads` threads now: the median of PROBE_CALLS timed calls (~0.5 ms)."""
    set_threads(threads)
    if threads not in _OPERANDS:
        rng = np.random.default_rng(0)
        _OPERANDS[threads] = (rng.random((threads, DOT_CHAIN_VALUES), dtype=np.float32),
                              rng.random(DOT_CHAIN_VALUES, dtype=np.float32))
        dot_chain(*_OPERANDS[threads], 4)  # compile or load from Numba's cache, once per thread count
    blocks, x = _OPERANDS[threads]
    seconds = np.empty(PROBE_CALLS)
    for i in range(PROBE_CALLS):
        start = time.perf_counter()
        dot_chain(blocks, x, DOT_CHAIN_REPS)
        seconds[i] = time.perf_counter() - start
    return dot_chain_cost(threads).flops / float(np.median(seconds)) / 1e9


def validate() -> None:
    rng = np.random.default_rng(1)
    blocks, x = rng.random((3, 512), dtype=np.float32), rng.random(512, dtype=np.float32)
    got, want = dot_chain(blocks, x, 7), dot_chain_reference(blocks, x, 7)
    assert np.allclose(got, want, rtol=1e-4), (got, want)


if __name__ == "__main__":
    from perfsim.kernels.jit import max_threads
    from perfsim.measure import compute_probe_gflops

    validate()
    print("reading  threads  dot chain GFLOP/s  q4_0 in-cache probe GFLOP/s  ratio")
    for reading in range(5):
        for threads in range(1, max_threads() + 1):
            chain, q4_0 = cpu_speed_gflops(threads), compute_probe_gflops(threads)
            print(f"{reading:7d}  {threads:7d}  {chain:17.1f}  {q4_0:27.1f}  {q4_0 / chain:5.2f}")
        time.sleep(0.5)
