"""GEMV, y = W @ x, for the weight formats of a decode step: q4_0, q8_0, f16, f32.

Decode reads every weight once per token and does one multiply-add per weight, so a GEMV is a
streaming read: its roof is the memory read bandwidth (kernels/stream.py) and the whole game is
doing the arithmetic fast enough to keep up with it. At 4.5 bits per weight, 35 GB/s of DRAM
bandwidth delivers 62 G weights/s; 2 Zen 3 cores must unpack and multiply-add 31 G weights/s each.

This file, top to bottom:
  gemv_cost                      bytes and FLOPs; the simulator uses this same function
  PackedQ4_0, PackedQ8_0         kernel-friendly layouts (f16/f32 weights are plain (rows, cols) arrays)
  pack_*, random_*, unpack_to_f32, quantize_q8_0(_reference)
  gemv_reference                 plain NumPy, float64
  gemv                           dispatch to the Numba kernels
  validate, main                 `python -m perfsim.kernels.gemv` prints the benchmark

Layout of the quantized formats (the idea that makes them fast): rows are packed in tiles of 32 and,
within a tile and a block of 32 columns, the bytes of the 32 rows are interleaved so that one 32-byte
vector load holds the same 2 bytes of 16 different rows. The innermost loop then runs ACROSS rows,
one 16-bit lane per row, with the activation broadcast: no horizontal sums, and an int16 sum per row
and block that is scaled once per block. Row-wise dot products (GGUF's layout) spend their time in
per-block horizontal reductions. One thread, q4_0 1024x4096 resident in L3 (so compute-bound):
    naive row-wise Numba loop on the GGUF bytes       1.4 G weights/s
    tiles, bytes zero-extended per row (first try)   ~15-20
    tiles, 16-bit lanes, portable (below)            ~27
    tiles, AVX2 pmaddubsw (below)                    ~45-50
From DRAM with both cores, the AVX2 kernel streams at 85-97% of the read bandwidth measured in the
same run (python -m perfsim.kernels.gemv; numbers in the report of that run).

Two code paths for q4_0 and q8_0 share that layout:
  portable   plain Numba loops; LLVM vectorizes them (vpmullw/vpaddw on AVX2, checked in the asm).
  avx2       the same loops, with the inner block dot written as LLVM IR calling pmaddubsw
             (q4_0) / pmaddwd (q8_0): 2x fewer instructions per weight. Used when the CPU Numba
             compiles for has AVX2 (checked at run time); `gemv(..., portable=True)` forces the
             portable path, and the tests run both.
fp16 scales and f16 weights are converted with LLVM's target-independent `fpext half to float`
(vcvtph2ps with F16C, a library call elsewhere): Numba itself has no float16 arithmetic.

Numbers quoted in comments come from the 2-core EPYC (Zen 3, KVM) dev box.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from perfsim.cost import Cost
from perfsim.kernels.jit import LazyIntrinsic, f16_to_f32, jit, llvm_prefetch, prange, set_threads, threads_in_use, zeros_huge_pages
from perfsim.quant import F16, F32, Q4_0, Q8_0, QuantFormat

ROW_TILE = 32  # rows per tile: 2 x 16 int16 lanes, i.e. two 256-bit vectors per step
BLOCK = 32  # weights per q4_0 / q8_0 block (one fp16 scale each)
Q4_TILE_BLOCK_BYTES = ROW_TILE * BLOCK // 2  # 512 bytes of nibbles per (tile, block)
Q8_TILE_BLOCK_BYTES = ROW_TILE * BLOCK  # 1024 int8 per (tile, block)


# ---------------------------------------------------------------------------------------------
# Cost: the single source of truth for bytes and FLOPs (pure Python, no NumPy needed)


def gemv_cost(rows: int, cols: int, weight_format: QuantFormat) -> Cost:
    """Bytes and FLOPs of one GEMV of a (rows, cols) matrix stored in weight_format.

    weight_bytes is the stored size of the matrix, scales included: repacking into tiles does not
    change it (rows that are not a multiple of the tile are padded in memory; that padding, at most
    31 rows, is not counted). Block-quantized weights multiply a q8_0-quantized copy of x
    (llama.cpp style: cols/32 blocks of 34 bytes); float weights read x as f32. y is written as f32.
    """
    weight_bytes = weight_format.storage_bytes(rows * cols)
    x_bytes = Q8_0.storage_bytes(cols) if weight_format.block_size > 1 else 4 * cols
    return Cost(flops=2 * rows * cols, weight_bytes=weight_bytes, act_bytes=x_bytes + 4 * rows)


# ---------------------------------------------------------------------------------------------
# Packed weights


@dataclass(frozen=True)
class PackedQ4_0:
    """A q4_0 matrix in row tiles. Same bytes as GGUF: 16 nibble bytes + one fp16 scale per 32 weights.

    qs[t, b, :] holds the 512 nibble bytes of rows 32t..32t+31, columns 32b..32b+31, ordered
    [pair p: 8][half h: 2][row i: 16][byte c: 2] = byte 2p+c of GGUF block b of row 32t+16h+i.
    GGUF byte m holds weight m in its low nibble and weight m+16 in its high nibble, so one 16-bit
    lane holds 4 weights of one row: 2p, 2p+1 (low nibbles) and 2p+16, 2p+17 (high nibbles).
    d[t, b, i] is the fp16 scale (as uint16 bits) of block b of row 32t+i.
    Rows are padded with zero blocks up to a multiple of 32; padded rows are never written to y.
    """

    rows: int
    cols: int
    qs: np.ndarray  # uint8 (n_tiles, cols/32, 512)
    d: np.ndarray  # uint16 fp16 bits (n_tiles, cols/32, 32)

    format = Q4_0


@dataclass(frozen=True)
class PackedQ8_0:
    """A q8_0 matrix in row tiles: 32 int8 + one fp16 scale per 32 weights, as in GGUF.

    qs[t, b, :] holds [pair p: 16][half h: 2][row i: 16][byte c: 2] = weight 2p+c of block b of row
    32t+16h+i; d as in PackedQ4_0. Rows padded to a multiple of 32 with zero blocks.
    """

    rows: int
    cols: int
    qs: np.ndarray  # int8 (n_tiles, cols/32, 1024)
    d: np.ndarray  # uint16 fp16 bits (n_tiles, cols/32, 32)

    format = Q8_0


Weights = PackedQ4_0 | PackedQ8_0 | np.ndarray  # f16 / f32 weights: (rows, cols) float16 / float32


def weight_format(weights: Weights) -> QuantFormat:
    if isinstance(weights, (PackedQ4_0, PackedQ8_0)):
        return weights.format
    return {np.dtype(np.float16): F16, np.dtype(np.float32): F32}[weights.dtype]


def weight_shape(weights: Weights) -> tuple[int, int]:
    if isinstance(weights, (PackedQ4_0, PackedQ8_0)):
        return weights.rows, weights.cols
    return weights.shape


def _n_tiles(rows: int) -> int:
    return (rows + ROW_TILE - 1) // ROW_TILE


def _check_cols(cols: int, what: str) -> None:
    if cols % BLOCK:
        raise ValueError(f"{what} needs a column count that is a multiple of {BLOCK} (one block); got {cols}")


def _gguf_blocks(raw: np.ndarray, block_bytes: int, what: str) -> tuple[int, int, np.ndarray]:
    """(rows, cols, blocks (rows, cols/32, block_bytes)) of raw GGUF bytes, rows of whole blocks."""
    raw = np.asarray(raw)
    if raw.dtype != np.uint8 or raw.ndim != 2:
        raise ValueError(f"{what} expects raw GGUF bytes as uint8 (rows, bytes per row); got {raw.dtype} {raw.shape}")
    if raw.shape[1] % block_bytes:
        raise ValueError(
            f"{what}: a row of {raw.shape[1]} bytes is not a whole number of {block_bytes}-byte blocks, "
            f"so the column count is not a multiple of {BLOCK}"
        )
    rows, n_blocks = raw.shape[0], raw.shape[1] // block_bytes
    return rows, n_blocks * BLOCK, raw.reshape(rows, n_blocks, block_bytes)


@jit(parallel=True)
def _pack_tiles(blocks, qs, d):
    """GGUF blocks uint8 (rows, n_blocks, 2 + payload) -> qs (n_tiles, n_blocks, 32 * payload), d uint16
    (n_tiles, n_blocks, 32). Payload byte 2p+c of row 32t+16h+i lands at ((p*2 + h)*16 + i)*2 + c; rows
    past the end (the last tile's padding) stay zero, with a zero scale. A copy loop: 2.2 GB of Phi-3
    Mini q4_0 repack in ~2 s, where NumPy's 6-D transpose took ~30 s."""
    rows, n_blocks, n_pairs = blocks.shape[0], blocks.shape[1], (blocks.shape[2] - 2) // 2
    for t in prange(qs.shape[0]):
        for r in range(min(32, rows - t * 32)):
            row, h, i = t * 32 + r, r // 16, r % 16
            for b in range(n_blocks):
                d[t, b, r] = np.uint16(blocks[row, b, 0]) | (np.uint16(blocks[row, b, 1]) << np.uint16(8))
                for p in range(n_pairs):
                    base = ((p * 2 + h) * 16 + i) * 2
                    qs[t, b, base] = blocks[row, b, 2 + 2 * p]
                    qs[t, b, base + 1] = blocks[row, b, 3 + 2 * p]


def _pack(raw: np.ndarray, block_bytes: int, what: str):
    rows, cols, blocks = _gguf_blocks(raw, block_bytes, what)
    n_tiles, n_blocks = _n_tiles(rows), cols // BLOCK
    qs = zeros_huge_pages((n_tiles, n_blocks, ROW_TILE * (block_bytes - 2)), np.uint8)
    d = zeros_huge_pages((n_tiles, n_blocks, ROW_TILE), np.uint16)
    _pack_tiles(np.ascontiguousarray(blocks), qs, d)
    return rows, cols, qs, d


def pack_q4_0(raw: np.ndarray) -> PackedQ4_0:
    """GGUF Q4_0 bytes, uint8 (rows, cols/32*18), as GGUFReader exposes them -> PackedQ4_0."""
    rows, cols, qs, d = _pack(raw, Q4_0.block_bytes, "pack_q4_0")
    return PackedQ4_0(rows, cols, qs, d)


def pack_q8_0(raw: np.ndarray) -> PackedQ8_0:
    """GGUF Q8_0 bytes, uint8 (rows, cols/32*34) -> PackedQ8_0."""
    rows, cols, qs, d = _pack(raw, Q8_0.block_bytes, "pack_q8_0")
    return PackedQ8_0(rows, cols, qs.view(np.int8), d)


def unpack_to_f32(weights: Weights) -> np.ndarray:
    """The dequantized (rows, cols) float32 matrix (tests and references only: 4 bytes per weight)."""
    if not isinstance(weights, (PackedQ4_0, PackedQ8_0)):
        return np.asarray(weights, dtype=np.float32)
    n_tiles, n_blocks = weights.qs.shape[:2]
    d = weights.d.view(np.float16).astype(np.float32)  # (t, b, 32 rows)
    if isinstance(weights, PackedQ4_0):
        q = weights.qs.reshape(n_tiles, n_blocks, 8, 2, 16, 2)  # t b p h i c
        low, high = (q & 15).astype(np.int8) - 8, (q >> 4).astype(np.int8) - 8
        values = np.stack([low, high], axis=2)  # t b nib p h i c; weight = 16*nib + 2p + c
        values = values.transpose(0, 4, 5, 1, 2, 3, 6).reshape(n_tiles, 32, n_blocks, 32)
    else:
        q = weights.qs.reshape(n_tiles, n_blocks, 16, 2, 16, 2)  # t b p h i c; weight = 2p + c
        values = q.transpose(0, 3, 4, 1, 2, 5).reshape(n_tiles, 32, n_blocks, 32)
    dense = values.astype(np.float32) * d.transpose(0, 2, 1)[:, :, :, None]
    return dense.reshape(n_tiles * 32, weights.cols)[: weights.rows]


# ---------------------------------------------------------------------------------------------
# Deterministic random weights, generated directly in the packed layout, a few tiles at a time.
#
# Scales: each GEMV should keep the activation RMS about the same (gain ~1, like a Xavier init), so
# a 32-layer random model neither blows up nor vanishes: d = 1 / (rms(q) * sqrt(cols)). q4_0 nibbles
# are drawn from 1..15 (values -7..7, zero mean, rms 4.32); q8_0 from -127..127 (rms 73.6). Each
# block scale is jittered by +-25% so the kernels cannot get away with ignoring scales.
# cols=3072: q4_0 d ~ 0.0042, q8_0 d ~ 0.00025 (fp16 normals, well above fp16's 6e-5 subnormal edge).

_RANDOM_TILES_PER_CHUNK = 64  # 2048 rows: ~3 MB of q4_0 at cols=3072 per numpy call
_Q4_RANDOM_RMS = float(np.sqrt(np.mean(np.arange(-7, 8) ** 2)))
_Q8_RANDOM_RMS = float(np.sqrt(np.mean(np.arange(-127, 128) ** 2)))


def _random_scales(rng, shape, cols: int, rms_q: float) -> np.ndarray:
    d = rng.uniform(0.75, 1.25, size=shape) / (rms_q * np.sqrt(cols))
    return d.astype(np.float16).view(np.uint16)


def _random_packed(rows: int, cols: int, seed: int, bytes_per_tile_block: int, random_bytes, rms_q: float):
    _check_cols(cols, "a random block-quantized matrix")
    n_tiles, n_blocks = _n_tiles(rows), cols // BLOCK
    rng = np.random.default_rng(seed)
    qs = zeros_huge_pages((n_tiles, n_blocks, bytes_per_tile_block), np.uint8)
    d = zeros_huge_pages((n_tiles, n_blocks, ROW_TILE), np.uint16)
    for start in range(0, n_tiles, _RANDOM_TILES_PER_CHUNK):
        stop = min(start + _RANDOM_TILES_PER_CHUNK, n_tiles)
        qs[start:stop] = random_bytes(rng, (stop - start, n_blocks, bytes_per_tile_block))
        d[start:stop] = _random_scales(rng, (stop - start, n_blocks, ROW_TILE), cols, rms_q)
    padded_rows = n_tiles * ROW_TILE - rows
    if padded_rows:  # zero scales make the padding rows zero, as pack_* does
        d[-1, :, ROW_TILE - padded_rows :] = 0
    return qs, d


def _random_nibble_bytes(rng, shape):
    return (rng.integers(1, 16, size=shape, dtype=np.uint8) | (rng.integers(1, 16, size=shape, dtype=np.uint8) << 4)).astype(np.uint8)


def _random_int8_bytes(rng, shape):
    return rng.integers(-127, 128, size=shape, dtype=np.int8).view(np.uint8)


def random_q4_0(rows: int, cols: int, seed: int = 0) -> PackedQ4_0:
    qs, d = _random_packed(rows, cols, seed, Q4_TILE_BLOCK_BYTES, _random_nibble_bytes, _Q4_RANDOM_RMS)
    return PackedQ4_0(rows, cols, qs, d)


def random_q8_0(rows: int, cols: int, seed: int = 0) -> PackedQ8_0:
    qs, d = _random_packed(rows, cols, seed, Q8_TILE_BLOCK_BYTES, _random_int8_bytes, _Q8_RANDOM_RMS)
    return PackedQ8_0(rows, cols, qs.view(np.int8), d)


def _random_float(rows: int, cols: int, seed: int, dtype) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = zeros_huge_pages((rows, cols), dtype)
    chunk_rows = _RANDOM_TILES_PER_CHUNK * ROW_TILE
    for start in range(0, rows, chunk_rows):
        stop = min(start + chunk_rows, rows)
        w[start:stop] = rng.standard_normal((stop - start, cols), dtype=np.float32) / np.float32(np.sqrt(cols))
    return w


def random_f16(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """N(0, 1/cols) weights as float16 (rows, cols): RMS gain ~1 per GEMV."""
    return _random_float(rows, cols, seed, np.float16)


def random_f32(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    return _random_float(rows, cols, seed, np.float32)


# ---------------------------------------------------------------------------------------------
# q8_0 activation quantization, bit-exact with llama.cpp's quantize_row_q8_0_ref except that the
# scale is kept in f32 (llama.cpp rounds it to fp16 for storage; x is transient here, the extra
# 2 bytes per block stay in L1). Only the fast-math flags that cannot change a finite result are
# on: `amax / 127` must stay a division and `x * (1/d)` one rounding. With them the rounding loop
# vectorizes: 3.5 us for 3072 values instead of 10.9 us (7% of a 3072x3072 q4_0 GEMV from DRAM).
# (The max stays a scalar chain: LLVM unrolls the 32 iterations before it could vectorize them.)


def quantize_q8_0_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Plain NumPy: q = roundf(x * (1/d)) with d = amax/127 per block of 32, ties away from zero."""
    blocks = np.asarray(x, np.float32).reshape(-1, BLOCK)
    d = np.abs(blocks).max(axis=1) / np.float32(127)
    with np.errstate(divide="ignore"):
        inverse = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    scaled = blocks * inverse[:, None]
    q = np.sign(scaled) * np.floor(np.abs(scaled).astype(np.float64) + 0.5)
    return q.astype(np.int8).reshape(-1), d


@jit(fastmath={"nnan", "ninf", "nsz"})
def _quantize_q8_0_into(x, qs, d, block_sums):
    """x f32[cols] -> qs int8[cols], d f32[cols/32], block_sums int32[cols/32] (sum of qs per block)."""
    for b in range(d.size):
        block = x[b * 32 : b * 32 + 32]
        amax = np.float32(0)
        for i in range(32):
            amax = max(amax, abs(block[i]))
        scale = np.float32(amax / np.float32(127))
        inverse = np.float32(1) / scale if scale != 0 else np.float32(0)
        total = 0
        for i in range(32):
            scaled = np.float32(block[i] * inverse)
            # roundf, ties away from zero; in float64, |scaled| + 0.5 is exact
            q = np.int32(np.floor(abs(np.float64(scaled)) + 0.5))
            q = -q if scaled < 0 else q
            qs[b * 32 + i] = q
            total += q
        d[b] = scale
        block_sums[b] = total


def quantize_q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x f32[cols] (cols a multiple of 32) -> (qs int8[cols], d f32[cols/32]); x ~= qs * repeat(d, 32)."""
    _check_cols(x.size, "q8_0 quantization")
    qs, d, _ = _quantized_activation(np.ascontiguousarray(x, dtype=np.float32).reshape(-1))
    return qs, d


# ---------------------------------------------------------------------------------------------
# Reference


def gemv_reference(weights: Weights, x: np.ndarray) -> np.ndarray:
    """y = W @ x in float64 from the dequantized weights; for q4_0/q8_0, x goes through the same q8_0
    quantization the kernels apply. The kernels agree with it to
        |y - y_ref| <= 1e-5 * (|W| @ |x'|) + 1e-30   (x' the quantized x),
    the float32 rounding of the per-block sums, whatever the order they are added in.
    """
    x = np.asarray(x, np.float32)
    if isinstance(weights, (PackedQ4_0, PackedQ8_0)):
        qs, d = quantize_q8_0_reference(x)
        x = qs.astype(np.float64) * np.repeat(d.astype(np.float64), BLOCK)
    return unpack_to_f32(weights).astype(np.float64) @ x.astype(np.float64)


def gemv_tolerance(weights: Weights, x: np.ndarray) -> np.ndarray:
    """The per-row bound stated in gemv_reference."""
    x = np.asarray(x, np.float32)
    if isinstance(weights, (PackedQ4_0, PackedQ8_0)):
        qs, d = quantize_q8_0_reference(x)
        x = qs.astype(np.float64) * np.repeat(d.astype(np.float64), BLOCK)
    return 1e-5 * (np.abs(unpack_to_f32(weights)).astype(np.float64) @ np.abs(x.astype(np.float64))) + 1e-30


# ---------------------------------------------------------------------------------------------
# LLVM-level helpers, built on first use so importing this module does not import Numba.





def _build_prefetch_512():
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def prefetch_512(typingctx, array, byte_offset):
        """Prefetch the 8 cache lines at array.data + byte_offset into L1 (LLVM's target-independent
        llvm.prefetch: prefetcht0 on x86; never faults, so it may point past the array's end)."""

        def codegen(context, builder, signature, args):
            data = builder.bitcast(context.make_array(signature.args[0])(context, builder, args[0]).data, ir.IntType(8).as_pointer())
            start = builder.gep(data, [args[1]])
            for line in range(8):
                llvm_prefetch(builder, builder.gep(start, [ir.Constant(ir.IntType(64), 64 * line)]), for_write=False)
            return context.get_dummy_value()

        return types.void(array, types.int64), codegen

    return prefetch_512


_prefetch_512 = LazyIntrinsic(_build_prefetch_512)


def _vector_pointer(context, builder, array_type, array, element_offset: int, vector_type):
    """Pointer to a vector_type at array[element_offset] (unaligned loads and stores)."""
    from llvmlite import ir

    data = context.make_array(array_type)(context, builder, array).data
    return builder.bitcast(builder.gep(data, [ir.Constant(ir.IntType(64), element_offset)]), vector_type.as_pointer())


def _splat(builder, scalar, vector_type):
    """A vector_type whose lanes all hold `scalar` (vpbroadcastw/vpbroadcastd)."""
    from llvmlite import ir

    vector = builder.insert_element(ir.Constant(vector_type, None), scalar, ir.Constant(ir.IntType(32), 0))
    lanes = ir.VectorType(ir.IntType(32), vector_type.count)
    return builder.shuffle_vector(vector, vector, ir.Constant(lanes, [0] * vector_type.count))


def _build_q4_block_sums_avx2():
    """sums[i] = int16 sum over the 32 weights of row i of one (tile, block) of nibble * xq.

    Arguments: qs[t, b] (512 uint8), the block's 32 int8 activations, sums (32 int16, written).
    Per 16 rows and pair p: one 32-byte load, low nibbles `and 0x0f`, high nibbles `psrlw 4 + and`,
    then pmaddubsw (unsigned nibble x signed int8, adjacent products added) against the broadcast
    activation pairs (x[2p], x[2p+1]) and (x[2p+16], x[2p+17]). The sums use the unsigned nibble n
    (0..15), not n-8: they wrap in int16, and the caller subtracts 8*sum(xq) modulo 2**16, which gives
    the exact sum of (n-8)*xq because that fits int16 (|.| <= 32*8*127 = 32512). pmaddubsw cannot
    saturate: 2*15*127 = 3810. 8 instructions per 64 weights vs ~16 for the portable int16 loop.
    """
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    i8x32, i16x16 = ir.VectorType(ir.IntType(8), 32), ir.VectorType(ir.IntType(16), 16)

    @intrinsic
    def q4_block_sums_avx2(typingctx, qs, xq, sums):
        def codegen(context, builder, signature, args):
            (qs_type, xq_type, sums_type), (qs_value, xq_value, sums_value) = signature.args, args
            pmaddubsw = builder.module.declare_intrinsic("llvm.x86.avx2.pmadd.ub.sw", fnty=ir.FunctionType(i16x16, [i8x32, i8x32]))
            low_mask, four = ir.Constant(i8x32, [0x0F] * 32), ir.Constant(i8x32, [4] * 32)

            def broadcast_pair(k):  # the int8 pair (xq[k], xq[k+1]) in all 16 lanes
                pair = builder.load(_vector_pointer(context, builder, xq_type, xq_value, k, ir.IntType(16)), align=1)
                return builder.bitcast(_splat(builder, pair, i16x16), i8x32)

            sums = [ir.Constant(i16x16, [0] * 16), ir.Constant(i16x16, [0] * 16)]
            for p in range(8):
                x_low, x_high = broadcast_pair(2 * p), broadcast_pair(2 * p + 16)
                for half in range(2):
                    nibbles = builder.load(_vector_pointer(context, builder, qs_type, qs_value, 64 * p + 32 * half, i8x32), align=1)
                    low, high = builder.and_(nibbles, low_mask), builder.lshr(nibbles, four)
                    sums[half] = builder.add(sums[half], builder.call(pmaddubsw, [low, x_low]))
                    sums[half] = builder.add(sums[half], builder.call(pmaddubsw, [high, x_high]))
            for half in range(2):
                builder.store(sums[half], _vector_pointer(context, builder, sums_type, sums_value, 16 * half, i16x16), align=1)
            return context.get_dummy_value()

        return types.void(qs, xq, sums), codegen

    return q4_block_sums_avx2


_q4_block_sums_avx2 = LazyIntrinsic(_build_q4_block_sums_avx2)


def _build_q8_block_sums_avx2():
    """sums[i] = int32 sum over the 32 weights of row i of one (tile, block) of q8_0 of w * xq.

    Arguments: qs[t, b] (1024 int8), the block's 32 int8 activations, sums (32 int32, written).
    Per 8 rows and pair p: vpmovsxbw of 16 bytes (8 rows x 2 weights) to int16, then pmaddwd against
    the broadcast int16 pair (x[2p], x[2p+1]) leaves each row's 2-term sum in an int32 lane.
    """
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    i8x16, i16x16, i32x8 = (ir.VectorType(ir.IntType(8), 16), ir.VectorType(ir.IntType(16), 16), ir.VectorType(ir.IntType(32), 8))

    @intrinsic
    def q8_block_sums_avx2(typingctx, qs, xq, sums):
        def codegen(context, builder, signature, args):
            (qs_type, xq_type, sums_type), (qs_value, xq_value, sums_value) = signature.args, args
            pmaddwd = builder.module.declare_intrinsic("llvm.x86.avx2.pmadd.wd", fnty=ir.FunctionType(i32x8, [i16x16, i16x16]))
            sums = [ir.Constant(i32x8, [0] * 8) for _ in range(4)]
            for p in range(16):
                pair8 = builder.load(_vector_pointer(context, builder, xq_type, xq_value, 2 * p, ir.VectorType(ir.IntType(8), 2)), align=1)
                pair32 = builder.bitcast(builder.sext(pair8, ir.VectorType(ir.IntType(16), 2)), ir.IntType(32))
                x_pair = builder.bitcast(_splat(builder, pair32, i32x8), i16x16)
                for quarter in range(4):
                    weights = builder.load(_vector_pointer(context, builder, qs_type, qs_value, 64 * p + 16 * quarter, i8x16), align=1)
                    products = builder.call(pmaddwd, [builder.sext(weights, i16x16), x_pair])
                    sums[quarter] = builder.add(sums[quarter], products)
            for quarter in range(4):
                builder.store(sums[quarter], _vector_pointer(context, builder, sums_type, sums_value, 8 * quarter, i32x8), align=1)
            return context.get_dummy_value()

        return types.void(qs, xq, sums), codegen

    return q8_block_sums_avx2


_q8_block_sums_avx2 = LazyIntrinsic(_build_q8_block_sums_avx2)


@functools.cache
def avx2_available() -> bool:
    """True if the CPU Numba compiles for (the host, unless NUMBA_CPU_NAME says otherwise) has AVX2."""
    from numba.core import config

    if config.CPU_NAME and config.CPU_NAME != "host":
        return "+avx2" in (config.CPU_FEATURES or "")
    import llvmlite.binding as llvm

    return bool(llvm.get_host_cpu_features().get("avx2", False))


# ---------------------------------------------------------------------------------------------
# Kernels. The quantized ones split the row tiles into one contiguous run per thread, and each
# thread allocates its scratch once: with `prange` over the tiles, two small arrays per tile cost
# ~3 points of the streaming rate at 3072x3072 from DRAM on 2 threads (87% -> 90%, both called
# directly, A/B in one process, 9 x 5 rounds; no difference in cache).


# Every index below is a loop counter from 0, on a (tile, block) view (a thread's run of tiles is a
# slice, indexed from 0): LLVM then knows no index is negative and drops Numba's wraparound check,
# which otherwise turned the contiguous loads of the fp16 scales into 32 scalar inserts per block
# (measured: 1.6x slower q4_0 avx2 kernel).


PREFETCH_BYTES_AHEAD = 2048  # measured 1024/2048/4096: 2048 best, +5-15% GB/s from DRAM over none


@jit()
def _prefetch_ahead(qs_tile, d_tile, block, block_bytes):
    """Software prefetch of the weights PREFETCH_BYTES_AHEAD ahead of block `block` of a tile (into the
    next tile past its end, which is what this thread reads next), and of the scales 8 blocks ahead.
    The hardware prefetcher alone left the kernel at ~70% of the streaming rate on one thread."""
    ahead = block * block_bytes + PREFETCH_BYTES_AHEAD
    for half in range(block_bytes // 512):
        _prefetch_512(qs_tile, ahead + 512 * half)
    if block % 8 == 0:
        _prefetch_512(d_tile, (block + 8) * 64)


@jit()
def _add_scaled_block(acc, sums, d, x_scale):
    """acc[i] += sums[i] * d[i] * x_scale over the 32 rows of a tile, for one block."""
    for i in range(32):
        acc[i] += np.float32(sums[i]) * (f16_to_f32(d[i]) * x_scale)


@jit()
def _add_scaled_q4_block(acc, sums, x_sum, d, x_scale):
    """_add_scaled_block for int16 sums of unsigned nibbles: subtracting 8*sum(xq) modulo 2**16
    recovers the exact sum of (nibble-8)*xq, which fits int16."""
    offset = np.int16(8 * x_sum)
    for i in range(32):
        acc[i] += np.float32(np.int16(sums[i] - offset)) * (f16_to_f32(d[i]) * x_scale)


@jit()
def _thread_tiles(part, n_parts, n_tiles):
    """The tiles thread `part` of n_parts owns: a contiguous run, sizes differing by at most one."""
    return part * n_tiles // n_parts, (part + 1) * n_tiles // n_parts


@jit()
def _store_tile(out, tile, acc):
    for i in range(min(32, out.size - tile * 32)):
        out[tile * 32 + i] = acc[i]


@jit()
def _quantized_activation(x):
    xq = np.empty(x.size, np.int8)
    x_scale = np.empty(x.size // 32, np.float32)
    x_sums = np.empty(x.size // 32, np.int32)
    _quantize_q8_0_into(x, xq, x_scale, x_sums)
    return xq, x_scale, x_sums


# The GEMV kernels quantize x themselves, before the parallel loop: one Numba call per GEMV.
# (2 calls and 3 NumPy allocations in Python cost ~4 us more per GEMV, 2.5% of a 3072x3072 q4_0.)


@jit()
def _nibbles_dot(lane, x_a, x_b, x_c, x_d):
    """The 4 nibbles of one uint16 lane (weights 2p, 2p+16, 2p+1, 2p+17 of a row) times their x."""
    return (lane & 15) * x_a + ((lane >> 8) & 15) * x_b + ((lane >> 4) & 15) * x_c + (lane >> 12) * x_d


@jit(parallel=True)
def _gemv_q4_0_portable(qs16, d, x, out, n_parts):
    """qs16: PackedQ4_0.qs viewed as uint16 (n_tiles, n_blocks, 256): lane 32p+i = row i, pair p."""
    n_tiles, n_blocks = qs16.shape[0], qs16.shape[1]
    xq, x_scale, x_sums = _quantized_activation(x)
    x16 = xq.astype(np.int16)
    for part in prange(n_parts):
        acc = np.empty(32, np.float32)
        sums = np.empty(32, np.int16)
        first, stop = _thread_tiles(part, n_parts, n_tiles)
        qs_part, d_part = qs16[first:stop], d[first:stop]
        for t in range(stop - first):
            acc[:] = 0
            for b in range(n_blocks):
                _prefetch_ahead(qs_part[t], d_part[t], b, 512)
                lanes, v = qs_part[t, b], x16[b * 32 : b * 32 + 32]
                # The 8 pairs of a block are written out so that the only loop left, over the 32 rows, is
                # the one LLVM vectorizes, with the sums in registers: with a loop over pairs around it,
                # the sums went through memory on every pair (behind a runtime alias check): 20 -> 27 G
                # weights/s. (In a function of its own, the same loop lost ~10%.)
                for i in range(32):
                    sums[i] = np.int16(
                        _nibbles_dot(lanes[i], v[0], v[1], v[16], v[17])
                        + _nibbles_dot(lanes[32 + i], v[2], v[3], v[18], v[19])
                        + _nibbles_dot(lanes[64 + i], v[4], v[5], v[20], v[21])
                        + _nibbles_dot(lanes[96 + i], v[6], v[7], v[22], v[23])
                        + _nibbles_dot(lanes[128 + i], v[8], v[9], v[24], v[25])
                        + _nibbles_dot(lanes[160 + i], v[10], v[11], v[26], v[27])
                        + _nibbles_dot(lanes[192 + i], v[12], v[13], v[28], v[29])
                        + _nibbles_dot(lanes[224 + i], v[14], v[15], v[30], v[31])
                    )
                _add_scaled_q4_block(acc, sums, x_sums[b], d_part[t, b], x_scale[b])
            _store_tile(out, first + t, acc)


@jit(parallel=True)
def _gemv_q4_0_avx2(qs, d, x, out, n_parts):
    n_tiles, n_blocks = qs.shape[0], qs.shape[1]
    xq, x_scale, x_sums = _quantized_activation(x)
    for part in prange(n_parts):
        acc = np.empty(32, np.float32)
        sums = np.empty(32, np.int16)
        first, stop = _thread_tiles(part, n_parts, n_tiles)
        qs_part, d_part = qs[first:stop], d[first:stop]
        for t in range(stop - first):
            acc[:] = 0
            for b in range(n_blocks):
                _prefetch_ahead(qs_part[t], d_part[t], b, 512)
                _q4_block_sums_avx2(qs_part[t, b], xq[b * 32 : b * 32 + 32], sums)
                _add_scaled_q4_block(acc, sums, x_sums[b], d_part[t, b], x_scale[b])
            _store_tile(out, first + t, acc)


@jit()
def _int8_pair_dot(lane, x_a, x_b):
    """The 2 int8 weights of one int16 lane times their x, widened once: |w*x| <= 127*127, so the
    2-term sum fits int16."""
    return np.int32(np.int16(np.int16(np.int16(lane << 8) >> 8) * x_a + np.int16(lane >> 8) * x_b))


@jit(parallel=True)
def _gemv_q8_0_portable(qs16, d, x, out, n_parts):
    """qs16: PackedQ8_0.qs viewed as int16 (n_tiles, n_blocks, 512): lane 32p+i = row i, pair p."""
    n_tiles, n_blocks = qs16.shape[0], qs16.shape[1]
    xq, x_scale, _ = _quantized_activation(x)
    x16 = xq.astype(np.int16)
    for part in prange(n_parts):
        acc = np.empty(32, np.float32)
        sums = np.empty(32, np.int32)
        first, stop = _thread_tiles(part, n_parts, n_tiles)
        qs_part, d_part = qs16[first:stop], d[first:stop]
        for t in range(stop - first):
            acc[:] = 0
            for b in range(n_blocks):
                _prefetch_ahead(qs_part[t], d_part[t], b, 1024)
                lanes, v = qs_part[t, b], x16[b * 32 : b * 32 + 32]
                for i in range(32):  # pairs written out as in _gemv_q4_0_portable: 10 -> 13 G weights/s
                    sums[i] = (
                        _int8_pair_dot(lanes[i], v[0], v[1])
                        + _int8_pair_dot(lanes[32 + i], v[2], v[3])
                        + _int8_pair_dot(lanes[64 + i], v[4], v[5])
                        + _int8_pair_dot(lanes[96 + i], v[6], v[7])
                        + _int8_pair_dot(lanes[128 + i], v[8], v[9])
                        + _int8_pair_dot(lanes[160 + i], v[10], v[11])
                        + _int8_pair_dot(lanes[192 + i], v[12], v[13])
                        + _int8_pair_dot(lanes[224 + i], v[14], v[15])
                        + _int8_pair_dot(lanes[256 + i], v[16], v[17])
                        + _int8_pair_dot(lanes[288 + i], v[18], v[19])
                        + _int8_pair_dot(lanes[320 + i], v[20], v[21])
                        + _int8_pair_dot(lanes[352 + i], v[22], v[23])
                        + _int8_pair_dot(lanes[384 + i], v[24], v[25])
                        + _int8_pair_dot(lanes[416 + i], v[26], v[27])
                        + _int8_pair_dot(lanes[448 + i], v[28], v[29])
                        + _int8_pair_dot(lanes[480 + i], v[30], v[31])
                    )
                _add_scaled_block(acc, sums, d_part[t, b], x_scale[b])
            _store_tile(out, first + t, acc)


@jit(parallel=True)
def _gemv_q8_0_avx2(qs, d, x, out, n_parts):
    n_tiles, n_blocks = qs.shape[0], qs.shape[1]
    xq, x_scale, _ = _quantized_activation(x)
    for part in prange(n_parts):
        acc = np.empty(32, np.float32)
        sums = np.empty(32, np.int32)
        first, stop = _thread_tiles(part, n_parts, n_tiles)
        qs_part, d_part = qs[first:stop], d[first:stop]
        for t in range(stop - first):
            acc[:] = 0
            for b in range(n_blocks):
                _prefetch_ahead(qs_part[t], d_part[t], b, 1024)
                _q8_block_sums_avx2(qs_part[t, b], xq[b * 32 : b * 32 + 32], sums)
                _add_scaled_block(acc, sums, d_part[t, b], x_scale[b])
            _store_tile(out, first + t, acc)


@jit(parallel=True)
def _gemv_f32(w, x, out, n_parts):
    """Row-wise dot products: f32 weights are 4 bytes each, so the FMA rate is never the limit.
    n_parts is not used: prange already hands each thread one contiguous run of rows, and a row
    allocates nothing."""
    for r in prange(w.shape[0]):
        total = np.float32(0)
        for c in range(w.shape[1]):
            total += w[r, c] * x[c]
        out[r] = total


@jit(parallel=True)
def _gemv_f16(w_bits, x, out, n_parts):
    """w_bits: the float16 weights viewed as uint16. vcvtph2ps + vfmadd per 8 weights. n_parts: as in _gemv_f32."""
    for r in prange(w_bits.shape[0]):
        total = np.float32(0)
        for c in range(w_bits.shape[1]):
            total += f16_to_f32(w_bits[r, c]) * x[c]
        out[r] = total


# ---------------------------------------------------------------------------------------------
# Dispatch


def gemv(weights: Weights, x: np.ndarray, out: np.ndarray, portable: bool = False) -> np.ndarray:
    """out[:] = weights @ x (float32). q4_0/q8_0 weights multiply a q8_0-quantized x (llama.cpp
    style: integer dot products per block); `portable=True` skips the AVX2 path. Returns out."""
    kernel, args = _kernel_and_args(weights, np.ascontiguousarray(x), out, portable)
    kernel(*args, threads_in_use())
    return out


def bind_gemv(weights: Weights, x: np.ndarray, out: np.ndarray, portable: bool = False):
    """gemv(weights, x, out) as a call without arguments, checked once, here: decode binds each matrix
    to its session's buffers. A call goes straight to the compiled kernel. gemv()'s checks and
    dispatch cost ~4 us a call, which the 3072x3072 q4_0 GEMV from DRAM on 2 threads felt as 3-4 points
    of the streaming rate (83% -> 87%, A/B in one process): Python's objects are cold in the caches
    after each 5 MB of weights streams through them."""
    if not x.flags.c_contiguous:
        raise ValueError("bind_gemv: x must be contiguous (a call reads it in place, every time)")
    kernel, args = _kernel_and_args(weights, x, out, portable)

    def call() -> None:
        # compiles (or loads) on the first call only; kernel(...) would do the same through
        # LazyKernel.__call__, measured 0.3-0.6 us slower a call (~224 calls a token)
        kernel.compile()(*args, threads_in_use())

    return call


def _kernel_and_args(weights: Weights, x: np.ndarray, out: np.ndarray, portable: bool):
    """The kernel for weights' format and path, and its arguments but the last, after checking shapes and
    types. Every kernel's last argument is the number of threads, one contiguous run of tiles (or rows)
    each (a Numba kernel that asks for it itself cannot be cached)."""
    rows, cols = weight_shape(weights)
    if x.shape != (cols,) or x.dtype != np.float32:
        raise ValueError(f"gemv: x must be float32 of shape ({cols},); got {x.dtype} {x.shape}")
    if out.shape != (rows,) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"gemv: out must be contiguous float32 of shape ({rows},); got {out.dtype} {out.shape}")
    portable = portable or not avx2_available()
    if isinstance(weights, PackedQ4_0):
        return (_gemv_q4_0_portable, (weights.qs.view(np.uint16), weights.d, x, out)) if portable else (_gemv_q4_0_avx2, (weights.qs, weights.d, x, out))
    if isinstance(weights, PackedQ8_0):
        return (_gemv_q8_0_portable, (weights.qs.view(np.int16), weights.d, x, out)) if portable else (_gemv_q8_0_avx2, (weights.qs, weights.d, x, out))
    if weights.dtype == np.float16:
        return _gemv_f16, (weights.view(np.uint16), x, out)
    if weights.dtype == np.float32:
        return _gemv_f32, (weights, x, out)
    raise ValueError(f"gemv: unsupported weights {type(weights).__name__} {getattr(weights, 'dtype', '')}")


def validate(rows: int = 100, cols: int = 256, seed: int = 0) -> None:
    """Every format and path against gemv_reference, within the bound stated there."""
    x = np.random.default_rng(seed).standard_normal(cols).astype(np.float32)
    for make in (random_q4_0, random_q8_0, random_f16, random_f32):
        weights = make(rows, cols, seed)
        expected, bound = gemv_reference(weights, x), gemv_tolerance(weights, x)
        for portable in (False, True):
            y = gemv(weights, x, np.empty(rows, np.float32), portable=portable)
            worst = np.max(np.abs(y - expected) / bound)
            assert worst <= 1, f"{make.__name__} portable={portable}: error {worst:.2f}x the bound"


# ---------------------------------------------------------------------------------------------
# Benchmark: `python -m perfsim.kernels.gemv [q4_0 q8_0 f16 f32]`
#
# Napkin math, 2-core Zen 3 at ~3.1 GHz, DRAM read ~19 GB/s on one core, ~35 GB/s on two (measured
# on this VM when the box is quiet; the brief's 30 GB/s for one core was not seen here):
#   q4_0  4.5 bits/weight: 35 GB/s = 62 G weights/s, i.e. 31 G/s per core = 10 weights per cycle.
#         The portable int16 loop issues ~20 vector instructions per 64 weights (per 16-bit lane:
#         3 extracts, 4 multiplies, 4 adds, plus loads) -> ~3 weights/instruction: 3.3 instructions
#         per cycle just to keep up, more than it sustains (measured ~27 G/s per core). pmaddubsw
#         needs 8 per 64 weights (8 weights/instruction): ~50 G/s per core, so two cores outrun DRAM.
#   q8_0  8.5 bits/weight: 35 GB/s = 33 G weights/s, 16.5 G/s per core.
#   f16   2 bytes/weight: 17.5 G weights/s; f32: 8.75 G weights/s. One FMA per 8 weights is far
#         below the FMA rate, so both are pure streaming reads.
# Phi-3 Mini decode reads ~2.15 GB of q4_0 weights per token: at 35 GB/s, 16 tokens/s at best.
#
# Each call must stream from DRAM, as in a decode step, where the whole model cycles through memory
# and the matrix a GEMV reads was last touched 2 GB ago. The benchmark does what decode does: it sweeps
# over copies of the matrix, >= 4x the 32 MiB L3 in all, each with its own pages, so every call reads
# its matrix from DRAM while the calls run back to back. Each sweep follows one streaming pass over
# 256 MiB (kernels/stream.py), and the figure is the median over rounds of the ratio of the two rates:
# another process's memory traffic slows both alike, so the ratio holds still on a shared machine.
# (Until 2026-11-27 each call was timed alone right after the 256 MiB pass. That adds a fixed
# ~60 us per call on this host, on 1 thread as on 2, that back-to-back calls do not pay: a least-
# squares fit of time vs matrix size over 2.7-42 MB gave 57-63 us of intercept, which a 5.3 MB
# 3072x3072 matrix felt as -20%. Decode never runs a GEMV right after a 256 MiB pass.)

PHI3_MINI_SHAPES = ((9216, 3072), (3072, 3072), (16384, 3072), (3072, 8192), (32064, 3072))  # qkv, o, gate_up, down, lm_head
_FORMATS_BY_NAME = {"q4_0": Q4_0, "q8_0": Q8_0, "f16": F16, "f32": F32}
_RANDOM = {"q4_0": random_q4_0, "q8_0": random_q8_0, "f16": random_f16, "f32": random_f32}
DRAM_SWEEP_BYTES = 128 * 2**20  # 4x the L3: a matrix read this many bytes ago is gone from every cache


@dataclass(frozen=True)
class GemvTiming:
    seconds: float  # median over rounds of one gemv() call (a sweep's time / its calls), quantizing x included
    weight_gb_s: float  # weight bytes (gemv_cost) / seconds
    weights_per_s: float
    stream_gb_s: float  # median of the streaming passes before the sweeps
    fraction_of_stream: float  # median over rounds of the sweep's weight GB/s / the pass's GB/s
    best_fraction_of_stream: float  # fastest sweep / fastest pass: the uncontended estimate


def dram_copies(weights: Weights, min_total_bytes: int = DRAM_SWEEP_BYTES) -> list:
    """`weights` and copies of it (a memcpy each, with its own pages), at least 3 and together at
    least min_total_bytes of stored weights: a sweep over them reads every matrix from DRAM."""
    rows, cols = weight_shape(weights)
    n_copies = max(3, -(-min_total_bytes // gemv_cost(rows, cols, weight_format(weights)).weight_bytes))

    def copy(array):
        out = zeros_huge_pages(array.shape, array.dtype)
        out[...] = array
        return out

    if isinstance(weights, (PackedQ4_0, PackedQ8_0)):
        return [weights] + [type(weights)(rows, cols, copy(weights.qs), copy(weights.d)) for _ in range(n_copies - 1)]
    return [weights] + [copy(weights) for _ in range(n_copies - 1)]


def benchmark_gemv(weights: Weights, n_threads: int, stream_data: np.ndarray, rounds: int = 15, portable: bool = False) -> GemvTiming:
    """Time gemv() from DRAM in sweeps over dram_copies(weights), each right after a pass over stream_data."""
    from perfsim.kernels.stream import paired_rounds

    rows, cols = weight_shape(weights)
    weight_bytes = gemv_cost(rows, cols, weight_format(weights)).weight_bytes
    copies = dram_copies(weights)
    x, out = np.random.default_rng(1).standard_normal(cols).astype(np.float32), np.empty(rows, np.float32)
    set_threads(n_threads)

    calls = [bind_gemv(matrix, x, out, portable) for matrix in copies]  # as decode calls them

    def sweep():
        for call in calls:
            call()

    sweep_seconds, stream_seconds = paired_rounds(stream_data, sweep, rounds)
    seconds = sweep_seconds / len(copies)
    stream_rates = stream_data.nbytes / stream_seconds
    fractions = (weight_bytes / seconds) / stream_rates
    best = (weight_bytes / seconds.min()) / stream_rates.max()
    median_s = float(np.median(seconds))
    return GemvTiming(median_s, weight_bytes / median_s / 1e9, rows * cols / median_s, float(np.median(stream_rates)) / 1e9,
                      float(np.median(fractions)), float(best))


def main(format_names=("q4_0", "q8_0", "f16", "f32"), thread_counts=(1, 2)) -> None:
    from perfsim.kernels.stream import read_bandwidth_gb_s, stream_buffer

    validate()
    stream_data = stream_buffer(256 * 2**20)
    for n in thread_counts:
        print(f"stream read, {n} thread(s): {read_bandwidth_gb_s(n, data=stream_data, repeats=15):.1f} GB/s (median of 15)")
    print(f"AVX2 path available: {avx2_available()}")
    print(f"GEMV from DRAM: sweeps over copies of each matrix ({DRAM_SWEEP_BYTES >> 20} MiB or more), each sweep right after "
          f"a {stream_data.nbytes >> 20} MiB streaming pass; 'of stream' is the median over rounds of their ratio")
    print(f"{'format':<14}{'rows x cols':>12}{'threads':>8}{'us':>8}{'GB/s':>7}{'G w/s':>7}{'stream':>8}{'of stream':>10}{'best/best':>10}")
    for name in format_names:
        paths = ((False, "avx2" if avx2_available() else "portable"), (True, "portable")) if name in ("q4_0", "q8_0") else ((False, ""),)
        for rows, cols in PHI3_MINI_SHAPES:
            weights = _RANDOM[name](rows, cols, seed=0)
            for portable, path in paths:
                if portable and path == paths[0][1]:
                    continue  # no AVX2: the first row already was the portable path
                for n in thread_counts:
                    timing = benchmark_gemv(weights, n, stream_data, portable=portable)
                    print(
                        f"{name + ' ' + path:<14}{f'{rows}x{cols}':>12}{n:>8}{timing.seconds * 1e6:>8.0f}"
                        f"{timing.weight_gb_s:>7.1f}{timing.weights_per_s / 1e9:>7.1f}{timing.stream_gb_s:>8.1f}"
                        f"{timing.fraction_of_stream:>10.0%}{timing.best_fraction_of_stream:>10.0%}",
                        flush=True,
                    )


if __name__ == "__main__":
    import sys

    main(tuple(sys.argv[1:]) or ("q4_0", "q8_0", "f16", "f32"))
