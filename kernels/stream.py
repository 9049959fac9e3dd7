"""Streaming read bandwidth: the roof every decode kernel is measured against.

A decode step reads every weight once, so the achievable rate of a long sequential read is the number
a GEMV's achieved GB/s is divided by. The kernel sums a large int64 array (integer adds are
associative, so LLVM vectorizes the sum without fastmath: 4 independent ymm accumulators, `vpaddq`)
split into one contiguous chunk per thread. The array is sized far beyond the 32 MiB L3, so every
repeat streams from DRAM.

Measured when quiet: on the 2-core EPYC (Zen 3, KVM) dev box ~18-20 GB/s on one thread, up to
~35 GB/s on two; on a 2-core Skylake-SP (Xeon @ 2.50GHz, AVX-512, KVM) 11-12 and 22. The boxes are
shared, so take the figures of the same run as the GEMV you compare (`python -m perfsim.kernels.gemv`
prints both); `python -m perfsim.kernels.stream` prints NumPy's sum of the same array beside them.
"""

from __future__ import annotations

import time

import numpy as np

from perfsim.cost import Cost
from perfsim.kernels.jit import jit, prange, set_threads

DEFAULT_N_BYTES = 512 * 2**20  # 16x the L3: the cache holds at most 6% of the array between repeats
_CHUNK_ELEMENTS = 1 << 16  # 512 KiB of int64 per parallel task: fits L2, big enough to hide the task cost


def stream_read_cost(n_bytes: int) -> Cost:
    """One pass over n_bytes, read once (counted as weight bytes: it stands for a decode step's
    weight stream), one add per 8-byte element."""
    return Cost(flops=n_bytes // 8, weight_bytes=n_bytes)


def sum_reference(data: np.ndarray) -> int:
    """Plain NumPy: the wrapped int64 sum the kernel must return."""
    return int(data.sum(dtype=np.int64))


@jit(parallel=True)
def sum_int64(data):
    """Sum of an int64 array (wrapping), in chunks of _CHUNK_ELEMENTS spread over the threads."""
    n_chunks = (data.size + _CHUNK_ELEMENTS - 1) // _CHUNK_ELEMENTS
    partial = np.zeros(n_chunks, dtype=np.int64)
    for chunk in prange(n_chunks):
        start = chunk * _CHUNK_ELEMENTS
        # A view, and an index from 0: with range(start, stop) Numba wraps negative indices in the loop,
        # which LLVM for Skylake-SP (AVX-512) vectorized into gathers: 3.3 GB/s on one thread, against
        # 11.5 GB/s for this loop (and for NumPy's sum) on the same host.
        part = data[start : min(start + _CHUNK_ELEMENTS, data.size)]
        total = np.int64(0)
        for i in range(part.size):
            total += part[i]
        partial[chunk] = total
    return partial.sum()


@jit(parallel=True)
def stream_then_write(data, start, stop, n_chunks, source, operand):
    """What a decode op finds when it starts: `n_chunks` threads (the caller's thread count) each read
    their share of data[start:stop] (megabytes of weights streaming through the caches) and then write
    their contiguous share of `operand` from `source` (f32, flat), as a parallel GEMV writes its output
    vector, half of it from the other core. Returns the sum of the data read (keeps the read alive)."""
    partial = np.zeros(n_chunks, dtype=np.int64)
    n, m = stop - start, operand.size
    for chunk in prange(n_chunks):
        total = np.int64(0)
        part = data[start + chunk * n // n_chunks : start + (chunk + 1) * n // n_chunks]  # views: see sum_int64
        for i in range(part.size):
            total += part[i]
        lo, hi = chunk * m // n_chunks, (chunk + 1) * m // n_chunks
        out, src = operand[lo:hi], source[lo:hi]
        for i in range(out.size):
            out[i] = src[i]
        partial[chunk] = total
    return partial.sum()


@jit(parallel=True)
def sum_int64_chunks(chunks):
    """Sum of every int64 array of `chunks` (a numba.typed.List, wrapping), the chunks spread over the
    threads: a streaming read of memory that other code owns (sample_chunks)."""
    n_chunks = len(chunks)
    partial = np.zeros(n_chunks, dtype=np.int64)
    for chunk in prange(n_chunks):
        part = chunks[np.int64(chunk)]
        total = np.int64(0)
        for i in range(part.size):
            total += part[i]
        partial[chunk] = total
    return partial.sum()


def int64_span(region: np.ndarray, start_byte: int, stop_byte: int) -> np.ndarray:
    """Bytes [start_byte, stop_byte) of a C-contiguous array, as an int64 view of the 8-byte-aligned
    words inside them (no copy: the words are the region's own memory)."""
    flat = region.reshape(-1).view(np.uint8)
    address = flat.ctypes.data
    start = start_byte + (-(address + start_byte)) % 8
    stop = stop_byte - (address + stop_byte) % 8
    return flat[start : max(stop, start)].view(np.int64)


def sample_chunks(regions: list, n_bytes: int, chunk_bytes: int):
    """A numba.typed.List of int64 views (int64_span) of about n_bytes of `regions` (C-contiguous arrays,
    in the order something reads them): n_bytes // chunk_bytes chunks of up to chunk_bytes, centred at
    evenly spaced offsets of the regions laid end to end, each within one region (a region smaller than a
    chunk gives all of itself).

    Why sample instead of reading a buffer of our own: on a KVM guest, memory read at different rates
    depending on where the host placed it. Sixteen 64 MiB buffers of one process read 10.8-11.3 GB/s
    alike on one thread, but 224 across 14 GB read 7.6-12.1 GB/s, each buffer at the same rate round
    after round (rounds correlated 0.74-0.90). A decode step reads its weights wherever they landed,
    so its memory roof is the rate of those pages: a sample across them, not 64 MiB elsewhere."""
    from numba.typed import List

    sizes = np.array([r.nbytes for r in regions], dtype=np.int64)
    ends = np.cumsum(sizes)
    total = int(ends[-1]) if len(sizes) else 0
    chunks = List()
    n_chunks = max(n_bytes // chunk_bytes, 1)
    for k in range(n_chunks if total else 0):
        offset = (2 * k + 1) * total // (2 * n_chunks)
        index = int(np.searchsorted(ends, offset, side="right"))
        region_start = int(ends[index] - sizes[index])
        size = int(sizes[index])
        start = min(max(offset - region_start - chunk_bytes // 2, 0), max(size - chunk_bytes, 0))
        start -= start % 8  # whole words of an aligned region
        span = int64_span(regions[index], start, min(start + chunk_bytes, size))
        if span.size:
            chunks.append(span)
    return chunks


def read_chunks_s(chunks) -> float:
    """Seconds for one parallel pass over sample_chunks' chunks with the current thread count."""
    start = time.perf_counter()
    sum_int64_chunks(chunks)
    return time.perf_counter() - start


def stream_buffer(n_bytes: int = DEFAULT_N_BYTES) -> np.ndarray:
    """An int64 array of n_bytes (rounded down to 8), every page touched so the timing sees no faults."""
    return np.arange(n_bytes // 8, dtype=np.int64)


def read_pass_s(data: np.ndarray) -> float:
    """Seconds for one parallel pass over `data` with the current thread count (call sum_int64 once first)."""
    start = time.perf_counter()
    sum_int64(data)
    return time.perf_counter() - start


def paired_rounds(data: np.ndarray, work, rounds: int) -> tuple[np.ndarray, np.ndarray]:
    """(work seconds, pass seconds) of `rounds` rounds of one streaming pass over `data` then one call
    of work(), after a warm-up round (compiles or loads from Numba's cache, faults pages in). The work's
    rate over its own round's pass rate is a ratio that holds still on a host whose DRAM others share."""
    sum_int64(data)
    work()
    work_seconds, pass_seconds = [], []
    for _ in range(rounds):
        pass_seconds.append(read_pass_s(data))
        start = time.perf_counter()
        work()
        work_seconds.append(time.perf_counter() - start)
    return np.array(work_seconds), np.array(pass_seconds)


def read_bandwidth_gb_s(n_threads: int, n_bytes: int = DEFAULT_N_BYTES, repeats: int = 7, data=None) -> float:
    """Median read bandwidth in GB/s (1e9 bytes/s) of `repeats` passes over n_bytes with n_threads threads.

    Pass `data` (from stream_buffer) to reuse one buffer across thread counts.
    """
    if data is None:
        data = stream_buffer(n_bytes)
    set_threads(n_threads)
    sum_int64(data)  # compile (or load from cache) and warm the page tables
    return data.nbytes / float(np.median([read_pass_s(data) for _ in range(repeats)])) / 1e9


def best_read_gb_s(n_threads: int, data: np.ndarray, repeats: int) -> float:
    """The memory roof: GB/s of the best of `repeats` passes over `data` (a roof is what the machine can
    do; on a shared host the median of 5 passes varied 16-20 GB/s on one core between runs, the best 19-21)."""
    set_threads(n_threads)
    sum_int64(data)
    return data.nbytes / min(read_pass_s(data) for _ in range(repeats)) / 1e9


def validate() -> None:
    data = np.random.default_rng(0).integers(-(2**62), 2**62, size=3 * _CHUNK_ELEMENTS + 17, dtype=np.int64)
    assert sum_int64(data) == sum_reference(data)


if __name__ == "__main__":
    from perfsim.kernels.jit import max_threads

    validate()
    buffer = stream_buffer()
    # NumPy's own sum of the same array (one thread, an independent implementation): the kernel on one
    # thread should read about as fast; 0.29x was the gathers sum_int64 once compiled to on AVX-512 (3.3 GB/s against 11.5).
    numpy_s = []
    for _ in range(7):
        start = time.perf_counter()
        buffer.sum()
        numpy_s.append(time.perf_counter() - start)
    numpy_gb_s = buffer.nbytes / float(np.median(numpy_s)) / 1e9
    print(f"NumPy's sum of the same array, 1 thread: {numpy_gb_s:.1f} GB/s")
    for threads in range(1, max_threads() + 1):
        gb_s = read_bandwidth_gb_s(threads, data=buffer)
        print(f"stream read, {threads} thread(s): {gb_s:.1f} GB/s ({gb_s / numpy_gb_s:.2f}x NumPy's 1-thread sum)")
