"""GEMV kernels against independent references: gguf's own (de)quantizers and float64 NumPy."""

import re

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from hypothesis import given, settings
from hypothesis import strategies as st

from perfsim.kernels import gemv as g
from perfsim.quant import F16, F32, Q4_0, Q8_0, grouped_int4

RANDOM_WEIGHTS = {"q4_0": g.random_q4_0, "q8_0": g.random_q8_0, "f16": g.random_f16, "f32": g.random_f32}
QUANTIZED = ("q4_0", "q8_0")
PATHS = [pytest.param(True, id="portable")] + (
    [pytest.param(False, id="avx2")] if g.avx2_available() else []
)


# --- cost, pinned by hand ---------------------------------------------------------------------


def test_gemv_cost_q4_0_3072x3072():
    cost = g.gemv_cost(3072, 3072, Q4_0)
    assert cost.weight_bytes == 3072 * 3072 * 18 // 32 == 5_308_416
    assert cost.flops == 2 * 3072 * 3072
    assert cost.act_bytes == 3072 // 32 * 34 + 3072 * 4 == 15_552  # q8_0 x in, f32 y out


def test_gemv_cost_other_formats():
    assert g.gemv_cost(32064, 3072, Q8_0).weight_bytes == 32064 * 3072 // 32 * 34
    assert g.gemv_cost(3072, 8192, F16) == g.gemv_cost(3072, 8192, F16)  # value type
    f16 = g.gemv_cost(3072, 8192, F16)
    assert (f16.weight_bytes, f16.act_bytes) == (3072 * 8192 * 2, 8192 * 4 + 3072 * 4)
    assert g.gemv_cost(16, 64, F32).weight_bytes == 16 * 64 * 4
    assert g.gemv_cost(16, 256, grouped_int4(128)).weight_bytes == 16 * 2 * 66


def test_gemv_cost_rejects_partial_blocks():
    with pytest.raises(ValueError, match="multiple"):
        g.gemv_cost(3072, 3000, Q4_0)


# --- packing against gguf ---------------------------------------------------------------------


def _gguf_raw(rows, cols, qtype, seed=0):
    data = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    data[0, :32] = 0  # an all-zero block: scale 0
    return gguf.quants.quantize(data, qtype)


@pytest.mark.parametrize("rows", [1, 32, 45, 70])
def test_pack_q4_0_matches_gguf_dequantize(rows):
    raw = _gguf_raw(rows, 96, GGMLQuantizationType.Q4_0)
    assert raw.shape == (rows, 96 // 32 * 18)
    packed = g.pack_q4_0(raw)
    assert packed.qs.nbytes + packed.d.nbytes == g._n_tiles(rows) * 32 * 96 // 32 * 18
    expected = gguf.quants.dequantize(raw, GGMLQuantizationType.Q4_0)
    np.testing.assert_array_equal(g.unpack_to_f32(packed), expected)


@pytest.mark.parametrize("rows", [1, 33])
def test_pack_q8_0_matches_gguf_dequantize(rows):
    raw = _gguf_raw(rows, 64, GGMLQuantizationType.Q8_0)
    expected = gguf.quants.dequantize(raw, GGMLQuantizationType.Q8_0)
    np.testing.assert_array_equal(g.unpack_to_f32(g.pack_q8_0(raw)), expected)


def test_pack_pads_rows_with_zero_scales():
    packed = g.pack_q4_0(_gguf_raw(45, 64, GGMLQuantizationType.Q4_0))
    assert packed.qs.shape == (2, 2, 512) and packed.d.shape == (2, 2, 32)
    assert not packed.d[1, :, 45 - 32 :].any()


@pytest.mark.parametrize("pack, block_bytes", [(g.pack_q4_0, 18), (g.pack_q8_0, 34)])
def test_pack_rejects_partial_blocks(pack, block_bytes):
    with pytest.raises(ValueError, match="multiple of 32"):
        pack(np.zeros((4, block_bytes + 1), np.uint8))


def test_pack_rejects_wrong_dtype():
    with pytest.raises(ValueError, match="uint8"):
        g.pack_q4_0(np.zeros((4, 18), np.int16))


# --- q8_0 activation quantization against gguf ------------------------------------------------


def test_quantize_q8_0_matches_gguf_bit_for_bit():
    x = np.random.default_rng(1).standard_normal(256).astype(np.float32) * 3
    x[32:64] = np.arange(32) - 15.5  # amax 16.5: exact .5 ties after scaling in some lanes
    x[64:96] = 0  # zero block: d = 0, q = 0
    x[96:128] = np.float32(127) * np.array([0.5, -1.5, 2.5, -2.5] * 8, np.float32) / 127  # ties
    x[96] = 127
    qs, d = g.quantize_q8_0(x)
    raw = gguf.quants.quantize(x[None, :], GGMLQuantizationType.Q8_0).reshape(-1, 34)
    np.testing.assert_array_equal(qs, raw[:, 2:].view(np.int8).reshape(-1))
    np.testing.assert_array_equal(d.astype(np.float16), raw[:, :2].copy().view(np.float16).reshape(-1))
    ref_qs, ref_d = g.quantize_q8_0_reference(x)
    np.testing.assert_array_equal(qs, ref_qs)
    np.testing.assert_array_equal(d, ref_d)


def test_quantize_q8_0_rounds_ties_away_from_zero():
    x = np.zeros(32, np.float32)
    x[:4] = [127, 2.5, -2.5, 0.5]  # d = 1 exactly
    qs, d = g.quantize_q8_0(x)
    assert d[0] == 1 and list(qs[:4]) == [127, 3, -3, 1]  # half-to-even would give 2, -2, 0


def test_quantize_q8_0_rejects_partial_block():
    with pytest.raises(ValueError, match="multiple of 32"):
        g.quantize_q8_0(np.zeros(40, np.float32))


# --- gemv against the float64 reference -------------------------------------------------------


def _check_gemv(fmt, rows, cols, seed, portable):
    weights = RANDOM_WEIGHTS[fmt](rows, cols, seed)
    x = np.random.default_rng(seed + 1).standard_normal(cols).astype(np.float32)
    buffer = np.full(rows + 8, 12345.0, np.float32)  # sentinels after y catch writes past the end
    y = g.gemv(weights, x, buffer[:rows], portable=portable)
    error = np.abs(y - g.gemv_reference(weights, x))
    assert np.all(error <= g.gemv_tolerance(weights, x)), f"worst error {error.max():.3g}"
    assert np.all(buffer[rows:] == 12345.0)


@pytest.mark.parametrize("portable", PATHS)
@pytest.mark.parametrize("fmt", QUANTIZED)
@settings(max_examples=12, deadline=None)
@given(rows=st.integers(1, 100), n_blocks=st.integers(1, 10), seed=st.integers(0, 2**16))
def test_gemv_quantized_matches_reference(fmt, portable, rows, n_blocks, seed):
    _check_gemv(fmt, rows, 32 * n_blocks, seed, portable)


@pytest.mark.parametrize("fmt", ["f16", "f32"])
@settings(max_examples=12, deadline=None)
@given(rows=st.integers(1, 100), cols=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_gemv_float_matches_reference(fmt, rows, cols, seed):
    _check_gemv(fmt, rows, cols, seed, portable=False)


@pytest.mark.parametrize("portable", PATHS)
@pytest.mark.parametrize("rows", [1, 31, 33, 95])
def test_gemv_q4_0_rows_not_a_multiple_of_the_tile(rows, portable):
    _check_gemv("q4_0", rows, 64, seed=rows, portable=portable)


@pytest.mark.parametrize("portable", PATHS)
def test_gemv_q4_0_from_gguf_bytes(portable):
    """End to end from real GGUF blocks: gemv == dequantize (gguf) @ q8_0-rounded x."""
    raw = _gguf_raw(40, 128, GGMLQuantizationType.Q4_0, seed=5)
    x = np.random.default_rng(6).standard_normal(128).astype(np.float32)
    x[:32] = 0  # a zero activation block
    y = g.gemv(g.pack_q4_0(raw), x, np.empty(40, np.float32), portable=portable)
    qs, d = g.quantize_q8_0_reference(x)
    w = gguf.quants.dequantize(raw, GGMLQuantizationType.Q4_0).astype(np.float64)
    x_rounded = qs * np.repeat(d.astype(np.float64), 32)
    np.testing.assert_allclose(y, w @ x_rounded, rtol=0, atol=1e-5 * (np.abs(w) @ np.abs(x_rounded)).max())


def test_gemv_extreme_nibbles_do_not_overflow():
    """All-0 and all-15 nibbles with |xq| = 127 everywhere: the int16 sums sit at their limits."""
    for byte in (0x00, 0xFF):
        for portable in [p.values[0] for p in PATHS]:
            w = g.random_q4_0(32, 64, 0)
            w = g.PackedQ4_0(32, 64, np.full_like(w.qs, byte), w.d)
            x = np.where(np.arange(64) % 2, 1.0, -1.0).astype(np.float32)
            y = g.gemv(w, x, np.empty(32, np.float32), portable=portable)
            assert np.all(np.abs(y - g.gemv_reference(w, x)) <= g.gemv_tolerance(w, x))


def test_gemv_rejects_bad_shapes():
    w = g.random_q4_0(8, 64)
    with pytest.raises(ValueError, match=r"x must be float32 of shape \(64,\)"):
        g.gemv(w, np.zeros(32, np.float32), np.empty(8, np.float32))
    with pytest.raises(ValueError, match=r"out must be contiguous float32 of shape \(8,\)"):
        g.gemv(w, np.zeros(64, np.float32), np.empty(9, np.float32))


@pytest.mark.parametrize("fmt, portable", [(f, p) for f in QUANTIZED for p in (False, True)] + [("f16", False), ("f32", False)])
def test_every_thread_split_gives_the_reference(fmt, portable):
    """The kernels split the tiles into one run per thread: 1, 2, 3 and 7 runs (more than the 4 tiles
    of 100 rows) all cover every row once, with no run writing past the end."""
    weights = RANDOM_WEIGHTS[fmt](100, 96, 3)
    x = np.random.default_rng(4).standard_normal(96).astype(np.float32)
    kernel, args = g._kernel_and_args(weights, x, np.empty(100, np.float32), portable)
    expected, bound = g.gemv_reference(weights, x), g.gemv_tolerance(weights, x)
    for n_parts in (1, 2, 3, 7):
        buffer = np.full(108, 12345.0, np.float32)
        kernel(*args[:-1], buffer[:100], n_parts)
        assert np.all(np.abs(buffer[:100] - expected) <= bound), n_parts
        assert np.all(buffer[100:] == 12345.0)


@pytest.mark.parametrize("threads", [1, 2])
def test_bound_gemv_reads_its_buffers_at_each_call(threads):
    """bind_gemv: checked once, then each call computes from whatever x holds now, on the threads now set."""
    from perfsim.kernels.jit import max_threads, set_threads

    if threads > max_threads():
        pytest.skip("one core")
    w = g.random_q4_0(70, 128, 1)
    x, out = np.zeros(128, np.float32), np.empty(70, np.float32)
    call = g.bind_gemv(w, x, out)
    set_threads(threads)
    try:
        for seed in (1, 2):
            x[:] = np.random.default_rng(seed).standard_normal(128)
            call()
            np.testing.assert_array_equal(out, g.gemv(w, x, np.empty(70, np.float32)))
    finally:
        set_threads(max_threads())
    with pytest.raises(ValueError, match="x must be contiguous"):
        g.bind_gemv(w, np.zeros(256, np.float32)[::2], out)
    with pytest.raises(ValueError, match=r"out must be contiguous float32 of shape \(70,\)"):
        g.bind_gemv(w, x, np.empty(71, np.float32))


# --- random weights ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(RANDOM_WEIGHTS))
def test_random_weights_are_deterministic_and_keep_rms(fmt):
    a, b, c = (RANDOM_WEIGHTS[fmt](96, 1024, seed) for seed in (7, 7, 8))
    dense_a = g.unpack_to_f32(a)
    np.testing.assert_array_equal(dense_a, g.unpack_to_f32(b))
    assert not np.array_equal(dense_a, g.unpack_to_f32(c))
    x = np.random.default_rng(0).standard_normal(1024)
    gain = np.sqrt(np.mean((dense_a @ x) ** 2) / np.mean(x**2))
    assert 0.8 < gain < 1.25, gain  # a 32-layer random model keeps a sane activation scale


def test_random_rejects_partial_blocks():
    with pytest.raises(ValueError, match="multiple of 32"):
        g.random_q4_0(4, 40)


# --- codegen: the portable loop must stay vectorized -------------------------------------------


@pytest.mark.skipif(not g.avx2_available(), reason="checks x86 AVX2 assembly")
def test_kernels_vectorize():
    import numba

    def assembly(kernel, *args):
        kernel.compile()  # resolves the helpers it calls
        fresh = numba.njit(fastmath=True, error_model="numpy")(kernel.py_func)  # serial: same loops, faster compile
        fresh(*args)
        return fresh.inspect_asm(fresh.signatures[0])

    q4 = g.random_q4_0(32, 64)
    x, out = np.ones(64, np.float32), np.empty(32, np.float32)
    portable = assembly(g._gemv_q4_0_portable, q4.qs.view(np.uint16), q4.d, x, out, 1)
    # 16 int16 lanes per instruction or more: LLVM picks ymm for Skylake-SP, zmm for Zen 4 (znver4)
    assert re.search(r"vpmullw\t(\(|%[yz]mm)", portable)
    assert "vpmaddubsw" in assembly(g._gemv_q4_0_avx2, q4.qs, q4.d, x, out, 1)


# --- the streaming-read kernel ----------------------------------------------------------------


def test_stream_sum_matches_numpy_and_cost():
    from perfsim.kernels import stream

    data = np.random.default_rng(0).integers(-(2**62), 2**62, size=3 * stream._CHUNK_ELEMENTS + 17, dtype=np.int64)
    assert stream.sum_int64(data) == stream.sum_reference(data)  # wrapping int64 sum, chunked
    assert stream.stream_read_cost(2**20) == stream.Cost(flops=2**17, weight_bytes=2**20)
    assert stream.read_bandwidth_gb_s(1, data=data[: 2**16], repeats=2) > 0


def test_stream_kernels_compile_to_plain_loads_not_gathers():
    """The pass is the memory roof of every host prediction. Indexed data[i] over range(start, stop)
    inside prange, Numba wrapped negative indices and LLVM for Skylake-SP (AVX-512) vectorized that into
    gathers: 3.3 GB/s on one thread where the loop over a view read 11.5 (every prediction -68%). On a CPU
    without AVX-512 LLVM emits no gathers either way, so this can only fail where the CPU has them."""
    import re

    import numba

    from perfsim.kernels import stream

    data, operand = np.arange(3 * stream._CHUNK_ELEMENTS, dtype=np.int64), np.zeros(64, np.float32)
    chunks = stream.sample_chunks([data], data.nbytes // 2, data.nbytes // 8)
    for kernel, args in ((stream.sum_int64, (data,)), (stream.stream_then_write, (data, 7, data.size - 5, 2, operand.copy(), operand)),
                         (stream.sum_int64_chunks, (chunks,))):
        kernel.compile()  # swaps in numba.prange
        fresh = numba.njit(parallel=True, fastmath=True, error_model="numpy")(kernel.py_func)  # not from the cache
        fresh(*args)
        asm = fresh.overloads[fresh.signatures[0]].library.get_asm_str()  # with the parallel loop's body
        assert not re.findall(r"\bv\w*(?:gather|scatter)\w*", asm), kernel.__name__


@pytest.mark.parametrize("n_chunks", [1, 2, 3])
def test_stream_then_write_reads_its_range_and_copies_the_operand(n_chunks):
    from perfsim.kernels import stream

    data = np.random.default_rng(1).integers(-(2**40), 2**40, size=10_001, dtype=np.int64)
    source = np.random.default_rng(2).standard_normal(37).astype(np.float32)
    operand = np.zeros(37, np.float32)
    total = stream.stream_then_write(data, 123, 9_876, n_chunks, source, operand)
    assert total == stream.sum_reference(data[123:9_876])  # every element of the range once, none outside
    np.testing.assert_array_equal(operand, source)  # every element written, whatever the thread split


def test_int64_span_is_the_aligned_words_of_the_regions_own_bytes():
    from perfsim.kernels import stream

    region = np.arange(1001, dtype=np.uint16).reshape(7, 143)  # 2002 bytes, rows not 8-byte multiples
    for start, stop in ((0, 2002), (3, 1999), (9, 17), (5, 6)):
        span = stream.int64_span(region, start, stop)
        assert np.shares_memory(span, region) or span.size == 0
        address = region.ctypes.data
        first = start + (-(address + start)) % 8
        assert span.ctypes.data == address + first or span.size == 0
        assert span.nbytes == max((stop - (address + stop) % 8) - first, 0)
        raw = region.reshape(-1).view(np.uint8)[first : first + span.nbytes]
        assert span.tobytes() == raw.tobytes()  # the same bytes, in place


def test_sample_chunks_spread_over_the_regions_in_order_and_sum_like_numpy():
    from perfsim.kernels import stream

    rng = np.random.default_rng(3)
    # regions as a step reads them: big weight matrices, small K/V rows, one region smaller than a chunk
    regions = [rng.integers(-(2**40), 2**40, size=n, dtype=np.int64) for n in (40_000, 300, 70_000, 10, 50_000)]
    chunk_bytes = 8 * 1000
    chunks = stream.sample_chunks(regions, 20 * chunk_bytes, chunk_bytes)
    assert len(chunks) == 20
    owners = [next(i for i, r in enumerate(regions) if np.shares_memory(c, r)) for c in chunks]
    assert owners == sorted(owners)  # read in the regions' order
    total = sum(r.nbytes for r in regions)
    share = [sum(c.nbytes for c, o in zip(chunks, owners) if o == i) / r.nbytes for i, r in enumerate(regions)]
    # each big region gets chunks in proportion to its bytes (20 evenly spaced offsets over 1.28 MB)
    for i in (0, 2, 4):
        assert abs(owners.count(i) - 20 * regions[i].nbytes / total) <= 1
    assert all(s <= 1 for s in share)
    for c, o in zip(chunks, owners):  # whole chunks inside their region (a 300-word region gives all of itself)
        assert c.nbytes == min(chunk_bytes, regions[o].nbytes)
    starts = [c.ctypes.data for c in chunks]
    assert len(set(starts)) == len(starts)  # no chunk read twice
    assert stream.sum_int64_chunks(chunks) == sum(stream.sum_reference(c) for c in chunks)
    assert stream.read_chunks_s(chunks) > 0
    assert len(stream.sample_chunks([], 10 * chunk_bytes, chunk_bytes)) == 0


def test_dram_copies_have_their_own_pages_and_cover_the_requested_bytes():
    w = g.random_q4_0(64, 256)
    copies = g.dram_copies(w, min_total_bytes=100_000)
    one = g.gemv_cost(64, 256, g.Q4_0).weight_bytes
    assert len(copies) == max(3, -(-100_000 // one)) and len(copies) * one >= 100_000
    assert all(not np.shares_memory(c.qs, w.qs) and not np.shares_memory(c.d, w.d) for c in copies[1:])
    x = np.random.default_rng(0).standard_normal(256).astype(np.float32)
    expected = g.gemv(w, x, np.empty(64, np.float32))
    for c in copies:
        np.testing.assert_array_equal(g.gemv(c, x, np.empty(64, np.float32)), expected)


def test_huge_page_arrays_start_on_a_2_mib_boundary():
    """The kernel backs only 2 MiB-aligned stretches with huge pages: an unaligned 5.3 MB matrix kept up to
    half its bytes on 4 KiB pages (measured ~30 us more per matrix read from DRAM)."""
    from perfsim.kernels.jit import zeros_huge_pages

    for shape, dtype in (((96, 96, 512), np.uint8), ((1_400_001,), np.float32)):
        a = zeros_huge_pages(shape, dtype)
        assert a.shape == shape and a.dtype == dtype and a.flags.c_contiguous and a.flags.writeable
        assert a.ctypes.data % (2 << 20) == 0 and not a.any()
        a[...] = 1  # the whole array is writable, up to its last byte
        assert a.sum() == a.size
