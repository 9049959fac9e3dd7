"""Read and write Phi-3 models in llama.cpp's GGUF format.

Reading (`read_phi3_gguf`) memory-maps the file with `gguf.GGUFReader`: tensor data are read-only
np.memmap views into the file, never copies. Every problem with the file (missing, not a GGUF,
truncated, corrupt, not phi3, a missing tensor, a wrong shape, an unsupported tensor type) is a
UserError with one line that names the file and what is wrong.

Shapes are given in math order, row-major: a weight is (out_features, in_features) = (rows, cols),
a norm weight is (n,). GGUF stores dimensions the other way round (ne0 = cols comes first); the
conversion is done here and nowhere else. Tensor data, as GGUFReader exposes it:
  f32 / f16      float32 / float16 array of shape (rows, cols)  (or (n,) for a norm)
  q8_0 / q4_0    uint8 array of shape (rows, cols // 32 * block_bytes), block_bytes 34 / 18: each
                 row is cols // 32 blocks of [fp16 scale d][32 int8 | 16 bytes of nibbles]

Memory: mapping costs nothing until pages are touched; touched pages count in the process's resident
set (as file-backed pages: the kernel can drop them, they are not anonymous memory). A caller that
repacks the weights into its own layout should call `model.release(name)` after repacking each
tensor: madvise(MADV_DONTNEED) removes that tensor's pages from the process (the data stay valid:
touching them again re-reads them from the page cache or the file). Repack-and-release keeps the
resident set at about (repacked weights + one tensor) instead of (repacked weights + file size).

Writing (`write_phi3_gguf`, `write_random_phi3_gguf`) streams tensor by tensor through GGUFWriter's
streaming API (tensor infos first, then write_tensor_data one tensor at a time), so a full Phi-3 Mini
file (2.15 GB in q4_0) is generated holding one tensor at a time (peak RSS about 150 MB). The files
carry the metadata and a synthetic SentencePiece ("llama") vocabulary that llama.cpp needs to load
them (with_tokenizer=False writes no vocabulary: perfsim reads such a file, llama.cpp refuses it).
Checked against llama.cpp (llama-cpp-python 0.3.36): it loads these files and its logits match a
numpy Phi-3 forward pass over the tensors as documented here (qkv rows = [q; k; v], ffn_up rows =
[gate; up], RoPE NeoX-style over n_rot dims) to within its own rounding; see tests/test_gguf_io.py.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter, GGMLQuantizationType, LlamaFileType, TokenType
from gguf.constants import GGML_QUANT_SIZES, GGML_QUANT_VERSION
from gguf.quants import quantize as _gguf_quantize

from perfsim.errors import UserError

ARCH = "phi3"
GGUF_MAGIC = b"GGUF"

# perfsim's type names <-> GGML types. Only these four are supported.
TYPE_NAMES: dict[GGMLQuantizationType, str] = {
    GGMLQuantizationType.F32: "f32",
    GGMLQuantizationType.F16: "f16",
    GGMLQuantizationType.Q8_0: "q8_0",
    GGMLQuantizationType.Q4_0: "q4_0",
}
GGML_TYPES: dict[str, GGMLQuantizationType] = {v: k for k, v in TYPE_NAMES.items()}
SUPPORTED_TYPES = tuple(GGML_TYPES)

# Metadata keys (llama.cpp's `phi3.` keys) -> Phi3Arch field.
_KEYS = {
    "n_layer": f"{ARCH}.block_count",
    "n_embd": f"{ARCH}.embedding_length",
    "n_ff": f"{ARCH}.feed_forward_length",
    "n_head": f"{ARCH}.attention.head_count",
    "n_head_kv": f"{ARCH}.attention.head_count_kv",
    "rms_eps": f"{ARCH}.attention.layer_norm_rms_epsilon",
    "n_ctx": f"{ARCH}.context_length",
    "n_rot": f"{ARCH}.rope.dimension_count",
}
# llama.cpp treats these two as optional (defaults: n_head_kv = n_head, n_rot = head dim); so do we.
_OPTIONAL_KEYS = {"n_head_kv", "n_rot"}


@dataclass(frozen=True)
class Phi3Arch:
    """Phi-3 architecture numbers, plain ints and floats."""

    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_vocab: int
    n_ctx: int = 4096
    n_rot: int | None = None  # rotary dims; None = the whole head (Phi-3)
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        for f in ("n_layer", "n_embd", "n_ff", "n_head", "n_head_kv", "n_vocab", "n_ctx"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"Phi3Arch.{f} must be a positive int, got {v!r}")
            object.__setattr__(self, f, int(v))
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not a multiple of n_head {self.n_head}")
        if self.n_head % self.n_head_kv:
            raise ValueError(f"n_head {self.n_head} is not a multiple of n_head_kv {self.n_head_kv}")
        if self.n_rot is None:
            object.__setattr__(self, "n_rot", self.head_dim)
        object.__setattr__(self, "n_rot", int(self.n_rot))
        if not 0 < self.n_rot <= self.head_dim or self.n_rot % 2:
            raise ValueError(f"n_rot {self.n_rot} must be even and within the head dim {self.head_dim}")
        object.__setattr__(self, "rms_eps", float(self.rms_eps))
        object.__setattr__(self, "rope_theta", float(self.rope_theta))

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def qkv_rows(self) -> int:
        return self.n_embd + 2 * self.n_head_kv * self.head_dim

    @classmethod
    def coerce(cls, arch: Phi3Arch | Mapping[str, Any]) -> Phi3Arch:
        if isinstance(arch, cls):
            return arch
        if isinstance(arch, Mapping):
            names = {f.name for f in fields(cls)}
            unknown = set(arch) - names
            if unknown:
                raise ValueError(f"unknown Phi3Arch fields {sorted(unknown)}; known: {sorted(names)}")
            return cls(**dict(arch))
        raise TypeError(f"arch must be a Phi3Arch or a mapping, got {type(arch).__name__}")


# microsoft/Phi-3-mini-4k-instruct (DATA.md)
PHI3_MINI = Phi3Arch(n_layer=32, n_embd=3072, n_ff=8192, n_head=32, n_head_kv=32, n_vocab=32064, n_ctx=4096)


def phi3_tensor_shapes(arch: Phi3Arch | Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Phi-3 GGUF, in file order, name -> math shape ((rows, cols) or (n,) for norms)."""
    a = Phi3Arch.coerce(arch)
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (a.n_vocab, a.n_embd)}
    for i in range(a.n_layer):
        p = f"blk.{i}."
        shapes[p + "attn_norm.weight"] = (a.n_embd,)
        shapes[p + "attn_qkv.weight"] = (a.qkv_rows, a.n_embd)
        shapes[p + "attn_output.weight"] = (a.n_embd, a.n_head * a.head_dim)
        shapes[p + "ffn_norm.weight"] = (a.n_embd,)
        shapes[p + "ffn_up.weight"] = (2 * a.n_ff, a.n_embd)  # gate rows then up rows
        shapes[p + "ffn_down.weight"] = (a.n_embd, a.n_ff)
    shapes["output_norm.weight"] = (a.n_embd,)
    shapes["output.weight"] = (a.n_vocab, a.n_embd)
    return shapes


def data_shape(type_name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the array holding a tensor of math shape `shape` stored as `type_name`."""
    block, block_bytes = GGML_QUANT_SIZES[GGML_TYPES[type_name]]
    if block == 1:
        return tuple(shape)
    if shape[-1] % block:
        raise ValueError(f"{type_name} needs a row length (cols) that is a multiple of {block}; got {shape[-1]}")
    return (*shape[:-1], shape[-1] // block * block_bytes)


def storage_bytes(type_name: str, shape: tuple[int, ...]) -> int:
    block, block_bytes = GGML_QUANT_SIZES[GGML_TYPES[type_name]]
    return math.prod(shape) // block * block_bytes


class GgufTensor(NamedTuple):
    type: str  # 'f32' | 'f16' | 'q8_0' | 'q4_0'
    shape: tuple[int, ...]  # math order: (rows, cols) = (out_features, in_features); (n,) for norms
    data: np.memmap  # read-only view into the file, see the module docstring for its layout


@dataclass(frozen=True, eq=False)
class GgufModel:
    """A Phi-3 GGUF mapped in memory. `tensors[name]` = GgufTensor(type, shape, data)."""

    path: Path
    arch: Phi3Arch
    tensors: Mapping[str, GgufTensor]
    file_size: int
    file_map: np.memmap = field(repr=False)  # the whole file, read-only; tensor data are views into it
    offsets: Mapping[str, tuple[int, int]] = field(repr=False)  # name -> (byte offset in file, n bytes)
    metadata: Mapping[str, Any] = field(repr=False)  # scalar and string metadata (arrays left out)

    @property
    def tensor_bytes(self) -> int:
        return sum(n for _, n in self.offsets.values())

    def release(self, name: str | None = None) -> int:
        """Drop the pages of tensor `name` (all tensors if None) from this process's resident set.

        madvise(MADV_DONTNEED) on the page-aligned range covering the tensor. The mapping is read-only
        and file-backed, so nothing is lost: the arrays stay valid and re-read from the page cache or the
        file if touched again. Returns the number of bytes advised.
        """
        names = list(self.offsets) if name is None else [name]
        total = 0
        for n in names:
            if n not in self.offsets:
                raise KeyError(n)
            off, nbytes = self.offsets[n]
            total += _dontneed(self.file_map, off, nbytes)
        return total


# ---------------------------------------------------------------------------------------------- read


class _Truncated(Exception):
    pass


class _BadTensor(Exception):
    pass


class _CheckedReader(GGUFReader):
    """GGUFReader that refuses to read past the end of the file (the stock one silently returns short
    arrays there, which then fail with an unrelated message)."""

    def _get(self, offset, dtype, count=1, override_order=None):  # type: ignore[override]
        end = int(offset) + np.dtype(dtype).itemsize * int(count)
        if end > len(self.data):
            raise _Truncated(
                f"the file is truncated (or its header is corrupt): it needs bytes up to offset {end:,} "
                f"but has {len(self.data):,}"
            )
        return super()._get(offset, dtype, count, override_order)

    def _get_field_parts(self, orig_offs, raw_type):  # type: ignore[override]
        # Metadata arrays (the 32064-token vocabulary: tokens, scores, types) are skipped over in one
        # pass instead of one numpy view per element (3 s -> 0.05 s for Phi-3). The field keeps
        # parts [item type, count, raw bytes]; its values are not decoded (perfsim does not use them).
        if raw_type != GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        sub = GGUFValueType(int(itype[0]))
        n = int(alen[0])
        start = orig_offs + 12
        if sub == GGUFValueType.STRING:
            size = len(self.data)
            view = memoryview(self.data)
            pos = start
            for _ in range(n):
                if pos + 8 > size:
                    break
                pos += 8 + int.from_bytes(view[pos : pos + 8], "little")
            end = pos
        elif sub in self.gguf_scalar_to_np:
            end = start + n * np.dtype(self.gguf_scalar_to_np[sub]).itemsize
        else:  # nested arrays: rare, leave them to the stock reader
            return super()._get_field_parts(orig_offs, raw_type)
        blob = self._get(start, np.uint8, end - start)  # raises _Truncated past the end of the file
        return end - orig_offs, [itype, alen, blob], [], [GGUFValueType.ARRAY, sub]

    def _build_tensors(self, start_offs, fields):  # type: ignore[override]
        # Name the tensor when its type is unknown or its data lie past the end of the file.
        for f in fields:
            try:
                _, name_data, _, dims, raw_dtype, offset_tensor = f.parts
                name = bytes(name_data).decode("utf-8", "replace")
                raw, off = int(raw_dtype[0]), int(offset_tensor[0])
                n_elems = math.prod(int(d) for d in dims)
            except Exception:
                break  # unexpected internal layout: let the stock reader check it
            try:
                qtype = GGMLQuantizationType(raw)
            except ValueError:
                raise _BadTensor(f"tensor '{name}' has an unknown type id {raw}") from None
            block, block_bytes = GGML_QUANT_SIZES[qtype]
            end = int(start_offs) + off + n_elems // block * block_bytes
            if end > len(self.data):
                raise _Truncated(
                    f"the file is truncated (or its header is corrupt): tensor '{name}' needs bytes up to "
                    f"offset {end:,} "
                    f"but the file has {len(self.data):,}"
                )
        super()._build_tensors(start_offs, fields)


def _fail(path: Path, what: str) -> UserError:
    return UserError(f"{path}: {' '.join(what.split())}")  # one line, whatever the reader said


def read_phi3_gguf(path: str | os.PathLike[str]) -> GgufModel:
    """Open a Phi-3 GGUF (memory-mapped) and validate it; see the module docstring."""
    path = Path(path)
    if not path.exists():
        raise _fail(path, "no such file")
    if path.is_dir():
        raise _fail(path, "is a directory, not a GGUF file")
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise _fail(path, f"cannot read the file ({e.strerror or e})") from None
    if file_size == 0:
        raise _fail(path, "the file is empty, not a GGUF file")
    if head != GGUF_MAGIC:
        raise _fail(path, f"not a GGUF file (it starts with {head!r}, a GGUF file starts with b'GGUF')")
    try:
        reader = _CheckedReader(path, "r")
    except (_Truncated, _BadTensor) as e:
        raise _fail(path, str(e)) from None
    except Exception as e:  # the reader raises ValueError, KeyError, IndexError... on corrupt files
        raise _fail(path, f"corrupt GGUF file ({type(e).__name__}: {e})") from None
    if reader.byte_order != "I":
        raise _fail(path, "big-endian GGUF files are not supported")

    meta = _scalar_metadata(path, reader)
    arch_name = meta.get("general.architecture")
    if arch_name is None:
        raise _fail(path, f"no general.architecture in the metadata; perfsim reads {ARCH} (Phi-3) models")
    if arch_name != ARCH:
        raise _fail(path, f"the model architecture is '{arch_name}', but perfsim reads only {ARCH} (Phi-3) models")

    by_name = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in by_name:
        raise _fail(path, "missing tensor 'token_embd.weight'")
    embd_dims = [int(d) for d in by_name["token_embd.weight"].shape]
    if len(embd_dims) != 2:
        raise _fail(path, f"tensor 'token_embd.weight' has {len(embd_dims)} dimensions, expected 2")
    arch = _arch_from_metadata(path, meta, n_vocab=embd_dims[1])

    n_tok = _array_len(reader, "tokenizer.ggml.tokens")
    if n_tok is not None and n_tok != arch.n_vocab:
        raise _fail(path, f"the tokenizer has {n_tok} tokens but token_embd has {arch.n_vocab} rows")

    tensors: dict[str, GgufTensor] = {}
    offsets: dict[str, tuple[int, int]] = {}
    for name, shape in phi3_tensor_shapes(arch).items():
        t = by_name.get(name)
        if t is None:
            raise _fail(path, f"missing tensor '{name}' (expected shape {_fmt(shape)} for this {ARCH} model)")
        got = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF ne0 = cols comes first
        if got != shape:
            raise _fail(path, f"tensor '{name}' has shape {_fmt(got)}, expected {_fmt(shape)}")
        type_name = TYPE_NAMES.get(t.tensor_type)
        if type_name is None:
            raise _fail(
                path,
                f"tensor '{name}' has type {t.tensor_type.name}; perfsim supports {', '.join(SUPPORTED_TYPES)}",
            )
        if len(shape) == 1 and type_name not in ("f32", "f16"):
            raise _fail(path, f"norm tensor '{name}' has type {type_name}; expected f32 or f16")
        end = t.data_offset + t.n_bytes
        if end > file_size:
            raise _fail(
                path,
                f"the file is truncated: tensor '{name}' lies at bytes {t.data_offset:,}..{end:,} "
                f"but the file has {file_size:,}",
            )
        data = t.data
        if data.shape != data_shape(type_name, shape) or not isinstance(data, np.memmap):
            raise _fail(path, f"tensor '{name}': unexpected data layout {data.shape} {type(data).__name__}")
        tensors[name] = GgufTensor(type_name, shape, data)
        offsets[name] = (int(t.data_offset), int(t.n_bytes))

    return GgufModel(
        path=path,
        arch=arch,
        tensors=MappingProxyType(tensors),
        file_size=file_size,
        file_map=reader.data,
        offsets=MappingProxyType(offsets),
        metadata=MappingProxyType(meta),
    )


def _fmt(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def _scalar_metadata(path: Path, reader: GGUFReader) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or not f.types or f.types[0] == GGUFValueType.ARRAY:
            continue
        try:
            meta[key] = f.contents()
        except Exception as e:
            raise _fail(path, f"corrupt metadata value for '{key}' ({type(e).__name__}: {e})") from None
    return meta


def _array_len(reader: GGUFReader, key: str) -> int | None:
    f = reader.fields.get(key)
    if f is None or not f.types or f.types[0] != GGUFValueType.ARRAY:
        return None
    return int(f.parts[4][0])  # parts: key length, key, value type, item type, count, ...


def _f32(v: float) -> float:
    """A float32 metadata value as the shortest decimal that round-trips it (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(v)))


def _arch_from_metadata(path: Path, meta: Mapping[str, Any], n_vocab: int) -> Phi3Arch:
    values: dict[str, Any] = {"n_vocab": n_vocab}
    for attr, key in _KEYS.items():
        if key not in meta:
            if attr in _OPTIONAL_KEYS:
                continue
            raise _fail(path, f"missing metadata key '{key}'")
        v = meta[key]
        if attr == "rms_eps":
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < 1):
                raise _fail(path, f"metadata '{key}' = {v!r} is not a small positive number")
            values[attr] = _f32(v)
        else:
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise _fail(path, f"metadata '{key}' = {v!r} is not a positive integer")
            values[attr] = int(v)
    theta = meta.get(f"{ARCH}.rope.freq_base")
    if isinstance(theta, (int, float)) and not isinstance(theta, bool) and theta > 0:
        values["rope_theta"] = _f32(theta)
    values.setdefault("n_head_kv", values["n_head"])
    try:
        return Phi3Arch(**values)
    except ValueError as e:
        raise _fail(path, f"inconsistent architecture metadata: {e}") from None


# ------------------------------------------------------------------------------------ page release

_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)
_PAGE = mmap.PAGESIZE


def _dontneed(file_map: np.memmap, offset: int, nbytes: int) -> int:
    """madvise(MADV_DONTNEED) over [offset, offset + nbytes) widened to whole pages. Safe on a
    read-only file mapping: a neighbour's pages caught at the edges are simply re-read when touched."""
    if nbytes <= 0:
        return 0
    start = offset // _PAGE * _PAGE
    end = min(-(-(offset + nbytes) // _PAGE) * _PAGE, len(file_map))
    if end <= start:
        return 0
    mm = getattr(file_map, "_mmap", None)
    if mm is not None and hasattr(mm, "madvise") and getattr(file_map, "offset", 0) == 0:
        mm.madvise(_MADV_DONTNEED, start, end - start)
    else:  # fall back to libc on the array's own address
        base = file_map.__array_interface__["data"][0]
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.madvise(ctypes.c_void_p(base + start), ctypes.c_size_t(end - start), _MADV_DONTNEED) != 0:
            raise OSError(ctypes.get_errno(), "madvise failed")
    return end - start


# --------------------------------------------------------------------------------------------- write

# Synthetic SentencePiece vocabulary, laid out like Llama/Phi-3's: <unk> <s> </s>, the 256 byte tokens,
# then Phi-3's two control tokens <|endoftext|> (eos) and <|end|> (end of turn). llama.cpp needs the
# byte tokens (<0x0A> is its newline token) and, for a model whose general.name contains "phi3", the
# <|endoftext|> token (it sets attributes on it by name and fails when it is missing).
_UNK, _BOS = 0, 1
_SPECIAL = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["<|endoftext|>", "<|end|>"]
_EOS = _SPECIAL.index("<|endoftext|>")
_N_SPECIAL = len(_SPECIAL)  # 261


def synthetic_vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """tokens, scores, token types for a llama-style (SPM) vocab of exactly n_vocab entries:
    <unk>, <s>, </s>, the byte tokens <0x00>..<0xFF>, <|endoftext|>, <|end|>, then filler pieces
    '▁t261', '▁t262', ... (distinct, decreasing scores)."""
    if n_vocab < _N_SPECIAL:
        raise ValueError(
            f"a llama-style vocab needs at least {_N_SPECIAL} tokens (5 special + 256 bytes), got {n_vocab}"
        )
    tokens = _SPECIAL + [f"\u2581t{i}" for i in range(_N_SPECIAL, n_vocab)]
    scores = [0.0] * _N_SPECIAL + [-float(i - _N_SPECIAL) for i in range(_N_SPECIAL, n_vocab)]
    types = [int(TokenType.UNKNOWN), int(TokenType.CONTROL), int(TokenType.CONTROL)]
    types += [int(TokenType.BYTE)] * 256 + [int(TokenType.CONTROL)] * 2
    types += [int(TokenType.NORMAL)] * (n_vocab - _N_SPECIAL)
    return tokens, scores, types


_FILE_TYPES = {
    "f32": LlamaFileType.ALL_F32,
    "f16": LlamaFileType.MOSTLY_F16,
    "q8_0": LlamaFileType.MOSTLY_Q8_0,
    "q4_0": LlamaFileType.MOSTLY_Q4_0,
}


def _resolve_types(
    shapes: Mapping[str, tuple[int, ...]], tensor_types: Mapping[str, str] | str | None
) -> dict[str, str]:
    """Type per tensor: norms default to f32; a str applies to all 2-D weights; a mapping overrides."""
    out = {}
    for name, shape in shapes.items():
        if isinstance(tensor_types, str):
            t = tensor_types if len(shape) == 2 else "f32"
        elif tensor_types is None:
            t = "f32"
        else:
            t = tensor_types.get(name, "f32")
        if t not in GGML_TYPES:
            raise ValueError(f"tensor {name}: type {t!r} not among {SUPPORTED_TYPES}")
        data_shape(t, shape)  # raises if cols is not a multiple of the block size
        out[name] = t
    if isinstance(tensor_types, Mapping):
        unknown = set(tensor_types) - set(shapes)
        if unknown:
            raise ValueError(f"tensor_types names tensors a phi3 model does not have: {sorted(unknown)[:5]}")
    return out


def _stream_write(
    path: str | os.PathLike[str],
    arch: Phi3Arch,
    types: Mapping[str, str],
    produce: Callable[[str, tuple[int, ...], str], np.ndarray],
    with_tokenizer: bool,
    name: str,
) -> Path:
    """Write a phi3 GGUF calling produce(name, shape, type) once per tensor, in file order, and writing
    its bytes before asking for the next. Written to a temporary name, renamed when complete."""
    path = Path(path)
    shapes = phi3_tensor_shapes(arch)
    tmp = path.with_name(path.name + ".partial")
    w = GGUFWriter(tmp, ARCH)
    w.add_string("general.name", name)
    main_type = types["blk.0.attn_qkv.weight"] if arch.n_layer else types["output.weight"]
    w.add_uint32("general.file_type", int(_FILE_TYPES[main_type]))
    w.add_uint32("general.quantization_version", GGML_QUANT_VERSION)
    w.add_uint32(_KEYS["n_ctx"], arch.n_ctx)
    w.add_uint32(_KEYS["n_embd"], arch.n_embd)
    w.add_uint32(_KEYS["n_ff"], arch.n_ff)
    w.add_uint32(_KEYS["n_layer"], arch.n_layer)
    w.add_uint32(_KEYS["n_head"], arch.n_head)
    w.add_uint32(_KEYS["n_head_kv"], arch.n_head_kv)
    w.add_float32(_KEYS["rms_eps"], arch.rms_eps)
    w.add_uint32(_KEYS["n_rot"], arch.n_rot)
    w.add_float32(f"{ARCH}.rope.freq_base", arch.rope_theta)
    if with_tokenizer:
        tokens, scores, toktypes = synthetic_vocab(arch.n_vocab)
        w.add_string("tokenizer.ggml.model", "llama")
        w.add_string("tokenizer.ggml.pre", "default")
        w.add_array("tokenizer.ggml.tokens", tokens)
        w.add_array("tokenizer.ggml.scores", scores)
        w.add_array("tokenizer.ggml.token_type", toktypes)
        w.add_uint32("tokenizer.ggml.unknown_token_id", _UNK)
        w.add_uint32("tokenizer.ggml.bos_token_id", _BOS)
        w.add_uint32("tokenizer.ggml.eos_token_id", _EOS)
        w.add_uint32("tokenizer.ggml.padding_token_id", _EOS)
        w.add_bool("tokenizer.ggml.add_bos_token", True)
        w.add_bool("tokenizer.ggml.add_eos_token", False)
    for tname, shape in shapes.items():
        t = types[tname]
        w.add_tensor_info(tname, shape, np.dtype(np.float32), storage_bytes(t, shape), raw_dtype=GGML_TYPES[t])
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for tname, shape in shapes.items():
            t = types[tname]
            arr = np.ascontiguousarray(produce(tname, shape, t))
            want = data_shape(t, shape)
            if arr.shape != want or arr.nbytes != storage_bytes(t, shape):
                raise ValueError(f"tensor {tname}: produced {arr.shape} {arr.dtype}, expected {want} for {t}")
            w.write_tensor_data(arr)
            del arr
        w.close()
        os.replace(tmp, path)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return path


def quantize(x: np.ndarray, type_name: str) -> np.ndarray:
    """Float array (rows, cols) -> the array GGUF stores for `type_name` (gguf.quants.quantize)."""
    return _gguf_quantize(np.asarray(x, dtype=np.float32), GGML_TYPES[type_name])


def write_phi3_gguf(
    path: str | os.PathLike[str],
    arch: Phi3Arch | Mapping[str, Any],
    tensors: Mapping[str, np.ndarray],
    tensor_types: Mapping[str, str] | str | None = None,
    with_tokenizer: bool = True,
    name: str = "perfsim-phi3",
) -> Path:
    """Write a Phi-3 GGUF that llama.cpp loads.

    tensors: name -> float array in math shape (see phi3_tensor_shapes); every phi3 tensor is required.
    tensor_types: name -> 'f32'|'f16'|'q8_0'|'q4_0' (missing names: f32), or one type name for all 2-D
      weights (norms stay f32). Tensors are quantized with gguf.quants.quantize one at a time, as they
      are written; `tensors` may be a lazy mapping that builds each array on access.
    with_tokenizer: add a synthetic llama-style vocabulary of arch.n_vocab tokens (llama.cpp refuses a
      model without tokenizer metadata).
    """
    a = Phi3Arch.coerce(arch)
    shapes = phi3_tensor_shapes(a)
    missing = [n for n in shapes if n not in tensors]
    if missing:
        raise ValueError(f"{len(missing)} phi3 tensors missing, e.g. {missing[:3]}")
    extra = [n for n in tensors if n not in shapes]
    if extra:
        raise ValueError(f"tensors not part of a phi3 model: {extra[:3]}")
    types = _resolve_types(shapes, tensor_types)

    def produce(tname: str, shape: tuple[int, ...], t: str) -> np.ndarray:
        x = np.asarray(tensors[tname])
        if x.shape != shape:
            raise ValueError(f"tensor {tname} has shape {x.shape}, expected {shape}")
        return quantize(x, t)

    return _stream_write(path, a, types, produce, with_tokenizer, name)


def random_weight_std(cols: int) -> float:
    """Std of the random weights: 0.64/sqrt(cols), so a matvec after an RMSNorm gives outputs of rms
    about 0.64 and 32 layers of residual updates stay well within float range."""
    return 0.64 / math.sqrt(cols)


# E[(q - 8)^2] for a uniform nibble q in 0..15, E[q^2] for a uniform int8 in -127..127
_Q4_RMS = math.sqrt(sum((q - 8) ** 2 for q in range(16)) / 16)
_Q8_RMS = math.sqrt(sum(q * q for q in range(-127, 128)) / 255)


def random_tensor(shape: tuple[int, ...], type_name: str, rng: np.random.Generator) -> np.ndarray:
    """Deterministic random data for one tensor, directly in its stored form (no float32 copy of a
    quantized tensor): norms are ones; q4_0 = random nibbles + fp16 scales d0 * U(0.5, 1.5);
    q8_0 = random int8 in -127..127 + fp16 scales; f16/f32 = normal(0, std)."""
    if len(shape) == 1:
        return np.ones(shape, dtype=np.float16 if type_name == "f16" else np.float32)
    rows, cols = shape
    std = random_weight_std(cols)
    if type_name in ("f32", "f16"):
        out = rng.standard_normal(shape, dtype=np.float32)
        out *= std
        return out.astype(np.float16) if type_name == "f16" else out
    nb = cols // 32
    if type_name == "q4_0":
        d0, payload = std / _Q4_RMS, 16
    else:
        d0, payload = std / _Q8_RMS, 32
    blocks = np.empty((rows, nb, 2 + payload), dtype=np.uint8)
    d = (rng.random((rows, nb), dtype=np.float32) + np.float32(0.5)) * np.float32(d0)
    blocks[:, :, :2] = d.astype(np.float16).view(np.uint8).reshape(rows, nb, 2)
    del d
    q = rng.integers(0, 256, size=(rows, nb, payload), dtype=np.uint8)
    if type_name == "q8_0":
        q[q == 0x80] = 0x81  # int8 -128 -> -127: keep the symmetric range quantize() produces
    blocks[:, :, 2:] = q
    del q
    return blocks.reshape(rows, nb * (2 + payload))


def write_random_phi3_gguf(
    path: str | os.PathLike[str],
    arch: Phi3Arch | Mapping[str, Any] = PHI3_MINI,
    weight_type: str = "q4_0",
    seed: int = 0,
    with_tokenizer: bool = True,
) -> Path:
    """Write a Phi-3 GGUF with deterministic random weights, one tensor at a time.

    All 2-D weights (token_embd and output included) are `weight_type`; norms are f32 ones. (llama.cpp's
    own Q4_0 Phi-3 files keep token_embd in q4_0 but output in q6_K, a type perfsim does not support, so
    here output is q4_0 too.) Tensor i is drawn from np.random.default_rng([seed, i]): the same seed gives
    the same file, byte for byte. Peak memory: about two copies of the largest tensor in its stored form.
    """
    a = Phi3Arch.coerce(arch)
    if weight_type not in GGML_TYPES:
        raise ValueError(f"weight_type {weight_type!r} not among {SUPPORTED_TYPES}")
    shapes = phi3_tensor_shapes(a)
    types = _resolve_types(shapes, weight_type)
    index = {n: i for i, n in enumerate(shapes)}

    def produce(tname: str, shape: tuple[int, ...], t: str) -> np.ndarray:
        return random_tensor(shape, t, np.random.default_rng([seed, index[tname]]))

    return _stream_write(path, a, types, produce, with_tokenizer, f"perfsim-random-phi3-{weight_type}-seed{seed}")
