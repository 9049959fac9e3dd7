"""The decode engine: Phi-3's forward pass for one token at a time, with a KV cache, on perfsim's
Numba kernels, timing each op under the workload's op names (perfsim.workload.decode_ops).

Weights come from a GGUF file (memory-mapped; q4_0/q8_0 matrices repacked into the GEMV's row tiles,
same bytes, and the file pages dropped behind them) or are generated deterministically, directly in
the packed format (never a float32 copy of the model).

Shapes (Phi-3 Mini): hidden 3072, qkv 9216 = q 3072 + k 3072 + v 3072, gate_up 16384, ff 8192,
heads 32 x head_dim 96, vocab 32064. All activations are f32.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from perfsim.errors import UserError
from perfsim.kernels.attention import KVCache, attention, fill_random_kv, kv_append, kv_cache_format, new_kv_cache
from perfsim.kernels.embedding import embedding_row
from perfsim.kernels.elementwise import argmax, residual_add, rmsnorm, rope_rotate, rope_tables, silu_mul
from perfsim.kernels.gemv import bind_gemv, pack_q4_0, pack_q8_0, random_f16, random_f32, random_q4_0, random_q8_0
from perfsim.model import ModelSpec
from perfsim.quant import F32, Formats, QuantFormat, quant_format
from perfsim.workload import DECODE_OP_NAMES as OP_NAMES
from perfsim.workload import check_context

LAYER_OP_NAMES = OP_NAMES[1:-3]  # once per layer, in order; token_embd before them, output_norm, lm_head, argmax after


@dataclass(frozen=True)
class Layer:
    attn_norm: np.ndarray  # f32[hidden]
    attn_qkv: object  # GEMV weights (rows = q_dim + 2 kv_dim, cols = hidden)
    attn_output: object  # (hidden, q_dim)
    ffn_norm: np.ndarray  # f32[hidden]
    ffn_gate_up: object  # (2 ff, hidden): gate rows, then up rows
    ffn_down: object  # (hidden, ff)


@dataclass(frozen=True)
class Embedding:
    """token_embd in its stored format, rows dequantized one at a time (one row is read per token)."""

    format: QuantFormat
    table: np.ndarray  # q4_0/q8_0: uint8 (vocab, hidden/32 * block bytes), GGUF blocks; f16/f32: (vocab, hidden)

    def row(self, token: int, out: np.ndarray) -> None:
        embedding_row(self.table, self.format.name, token, out)


@dataclass(frozen=True)
class Weights:
    model: ModelSpec
    weight_format: QuantFormat  # of the layer matrices and the lm_head
    token_embd: Embedding
    layers: tuple
    output_norm: np.ndarray  # f32[hidden]
    lm_head: object  # (vocab, hidden)
    origin: str  # "random (seed 0)" or the GGUF path


# --- weights from a GGUF file ------------------------------------------------------------------------------


def _gemv_weights(gguf, name: str):
    tensor = gguf.tensors[name]
    if tensor.type == "q4_0":
        packed = pack_q4_0(tensor.data)
    elif tensor.type == "q8_0":
        packed = pack_q8_0(tensor.data)
    else:
        return tensor.data  # f16/f32: the mapped array itself, not copied
    gguf.release(name)  # the packed copy replaces the file pages: resident memory stays ~ file size
    return packed


def load_gguf(path: str | Path) -> Weights:
    from perfsim.gguf_io import read_phi3_gguf

    gguf = read_phi3_gguf(path)
    a = gguf.arch
    if a.n_rot != a.head_dim:
        raise UserError(f"{path}: partial rotary embeddings (rope.dimension_count {a.n_rot} < head dim {a.head_dim}) are not supported")
    name = str(gguf.metadata.get("general.name") or Path(path).stem)
    model = ModelSpec(name, a.n_layer, a.n_embd, a.n_head, a.n_head_kv, a.n_ff, a.n_vocab, a.n_ctx, a.rms_eps, a.rope_theta)
    types = {t.type for n, t in gguf.tensors.items() if len(t.shape) == 2 and n != "token_embd.weight"}
    if len(types) != 1:
        raise UserError(f"{path}: the layer matrices mix formats {sorted(types)}; perfsim models one weight format per model")
    embd = gguf.tensors["token_embd.weight"]
    layers = tuple(
        Layer(
            attn_norm=np.asarray(gguf.tensors[f"blk.{i}.attn_norm.weight"].data, np.float32),
            attn_qkv=_gemv_weights(gguf, f"blk.{i}.attn_qkv.weight"),
            attn_output=_gemv_weights(gguf, f"blk.{i}.attn_output.weight"),
            ffn_norm=np.asarray(gguf.tensors[f"blk.{i}.ffn_norm.weight"].data, np.float32),
            ffn_gate_up=_gemv_weights(gguf, f"blk.{i}.ffn_up.weight"),
            ffn_down=_gemv_weights(gguf, f"blk.{i}.ffn_down.weight"),
        )
        for i in range(a.n_layer)
    )
    return Weights(
        model=model,
        weight_format=quant_format(types.pop()),
        token_embd=Embedding(quant_format(embd.type), embd.data),
        layers=layers,
        output_norm=np.asarray(gguf.tensors["output_norm.weight"].data, np.float32),
        lm_head=_gemv_weights(gguf, "output.weight"),
        origin=str(path),
    )


# --- deterministic random weights ----------------------------------------------------------------------------

_RANDOM_MATRIX = {"q4_0": random_q4_0, "q8_0": random_q8_0, "f16": random_f16, "f32": random_f32}
WEIGHT_FORMATS = tuple(_RANDOM_MATRIX)  # what the engine runs (and what a GGUF may hold)


def _random_embedding(vocab: int, hidden: int, fmt: QuantFormat, seed: int) -> Embedding:
    rng = np.random.default_rng(seed)
    if fmt.block_size == 1:
        return Embedding(fmt, _RANDOM_MATRIX[fmt.name](vocab, hidden, seed))
    table = rng.integers(0, 256, size=(vocab, hidden // 32 * fmt.block_bytes), dtype=np.uint8)
    blocks = table.reshape(vocab, -1, fmt.block_bytes)
    # fp16 scales giving rows of RMS ~1 (the embedding output feeds an RMSNorm, so the scale is free)
    scale = np.float16(1 / 4.6 if fmt.name == "q4_0" else 1 / 73.6)
    blocks[:, :, :2] = np.full(blocks.shape[:2], scale, np.float16).view(np.uint8).reshape(vocab, -1, 2)
    return Embedding(fmt, table)


def random_weights(model: ModelSpec, weight_format: str | QuantFormat = "q4_0", seed: int = 0, make_matrix=None) -> Weights:
    """Phi-3-shaped weights from a seeded generator, each matrix made directly in the GEMV's format
    (by `make_matrix(rows, cols, seed=...)` when given: calibration's repeated row tiles)."""
    fmt = quant_format(weight_format) if isinstance(weight_format, str) else weight_format
    if fmt.name not in _RANDOM_MATRIX:
        raise UserError(f"the engine runs {', '.join(WEIGHT_FORMATS)} weights, not {fmt.name}")
    make = make_matrix or _RANDOM_MATRIX[fmt.name]
    shapes = model.layer_matrices()
    ones = np.ones(model.hidden_size, np.float32)

    def layer(i):
        matrices = {name: make(rows, cols, seed=seed * 1000 + 10 * i + k) for k, (name, (rows, cols)) in enumerate(shapes.items())}
        return Layer(ones, matrices["attn_qkv"], matrices["attn_output"], ones, matrices["ffn_gate_up"], matrices["ffn_down"])

    return Weights(
        model=model,
        weight_format=fmt,
        token_embd=_random_embedding(model.vocab_size, model.hidden_size, fmt, seed * 1000 + 998),
        layers=tuple(layer(i) for i in range(model.n_layers)),
        output_norm=ones,
        lm_head=make(model.vocab_size, model.hidden_size, seed=seed * 1000 + 999),
        origin=f"random (seed {seed})",
    )


# --- the engine ------------------------------------------------------------------------------------------------


def _matrix_arrays(matrix) -> list:
    """The arrays of a GEMV's weights: a packed matrix's row tiles and scales, or the f16/f32 array itself."""
    return [matrix.qs, matrix.d] if hasattr(matrix, "qs") else [matrix]


class Engine:
    def __init__(self, weights: Weights, kv_format: str = "f16"):
        self.weights = weights
        self.model = weights.model
        self.formats = Formats(weights=weights.weight_format, activations=F32, kv_cache=kv_cache_format(kv_format))

    @classmethod
    def from_gguf(cls, path, kv_format: str = "f16") -> "Engine":
        return cls(load_gguf(path), kv_format)

    @classmethod
    def random(cls, model: ModelSpec, weight_format="q4_0", kv_format: str = "f16", seed: int = 0) -> "Engine":
        return cls(random_weights(model, weight_format, seed), kv_format)

    def session(self, max_context: int) -> "Session":
        check_context(self.model, max_context)
        return Session(self, max_context)


class Session:
    """One sequence being decoded: its KV cache, its position, and scratch buffers."""

    def __init__(self, engine: Engine, max_context: int):
        m = engine.model
        self.engine, self.model, self.weights = engine, m, engine.weights
        self.max_context = max_context
        self.cache: KVCache = new_kv_cache(m.n_layers, m.n_kv_heads, max_context, m.head_dim, engine.formats.kv_cache)
        # Fault the whole cache in now, as llama.cpp clears its KV buffer when it creates a context: a first
        # touch inside a timed step (a 2 MiB page zeroed, memory compacted for it) once made Phi-3 Mini's
        # kv_append take 124 us a call over a 16-token sweep point, against ~30 us at the same context in others.
        for array in self.cache.arrays:
            array.reshape(-1).view(np.uint8)[::4096] = 0
        self.rope = rope_tables(max_context, m.head_dim, m.rope_theta)
        self.position = 0  # of the next token
        self.next_token = -1  # argmax of the last logits
        self.marks = []  # of the last step: perf_counter() at its start and after each op of op_sequence
        # The ops of one step in execution order: the workload's names, layer ops once per layer.
        self.op_sequence = OP_NAMES[:1] + LAYER_OP_NAMES * m.n_layers + OP_NAMES[-3:]
        f32 = np.float32
        self.x = np.zeros(m.hidden_size, f32)  # residual stream
        self.xn = np.zeros(m.hidden_size, f32)  # normed input of a block
        self.qkv = np.zeros(m.qkv_rows, f32)
        self.attn = np.zeros(m.q_dim, f32)  # attention output, heads concatenated
        self.proj = np.zeros(m.hidden_size, f32)  # a block's output projection
        self.gate_up = np.zeros(2 * m.intermediate_size, f32)
        self.act = np.zeros(m.intermediate_size, f32)
        self.logits = np.zeros(m.vocab_size, f32)
        q_dim, kv_dim = m.q_dim, m.kv_dim
        self.q = self.qkv[:q_dim].reshape(m.n_heads, m.head_dim)
        self.k = self.qkv[q_dim : q_dim + kv_dim].reshape(m.n_kv_heads, m.head_dim)
        self.v = self.qkv[q_dim + kv_dim :].reshape(m.n_kv_heads, m.head_dim)
        self.qk = self.qkv[: q_dim + kv_dim].reshape(m.n_heads + m.n_kv_heads, m.head_dim)  # rotated in one call
        self.attn_heads = self.attn.reshape(m.n_heads, m.head_dim)
        # Each GEMV bound to its input and output buffers once: a call then goes straight to its kernel.
        w = self.weights
        self.layer_gemvs = tuple(
            (bind_gemv(layer.attn_qkv, self.xn, self.qkv), bind_gemv(layer.attn_output, self.attn, self.proj),
             bind_gemv(layer.ffn_gate_up, self.xn, self.gate_up), bind_gemv(layer.ffn_down, self.act, self.proj))
            for layer in w.layers
        )
        self.lm_head = bind_gemv(w.lm_head, self.xn, self.logits)

    def streamed_weights(self) -> list:
        """The GEMV weight arrays a step streams from memory (row tiles and scales of a packed matrix), in
        the order it reads them: each layer's QKV, output, gate/up and down projections, then the lm_head
        (perfsim.measure.read_pass_gb_s samples them)."""
        regions = []
        for layer in self.weights.layers:
            for matrix in (layer.attn_qkv, layer.attn_output, layer.ffn_gate_up, layer.ffn_down):
                regions += _matrix_arrays(matrix)
        return regions + _matrix_arrays(self.weights.lm_head)

    def step(self, token: int) -> np.ndarray:
        """Decode one token at self.position; returns the logits (a buffer reused by the next step)."""
        m, w, pos = self.model, self.weights, self.position
        if pos >= self.max_context:
            raise UserError(f"the session holds {self.max_context} positions; position {pos} is beyond it")
        if not 0 <= token < m.vocab_size:
            raise UserError(f"token {token} is outside the vocabulary (0..{m.vocab_size - 1})")
        clock = time.perf_counter
        eps, cos, sin = m.rms_norm_eps, self.rope.cos[pos], self.rope.sin[pos]
        x, xn = self.x, self.xn
        marks = [clock()]  # one after each op, in the order of self.op_sequence
        tick = marks.append

        w.token_embd.row(token, x); tick(clock())  # noqa: E702 (op and its mark on one line)
        for i, (layer, (qkv, output, gate_up, down)) in enumerate(zip(w.layers, self.layer_gemvs)):
            rmsnorm(x, layer.attn_norm, eps, xn); tick(clock())  # noqa: E702
            qkv(); tick(clock())  # noqa: E702 (xn -> self.qkv)
            rope_rotate(self.qk, cos, sin); tick(clock())  # noqa: E702
            kv_append(self.cache, i, pos, self.k, self.v); tick(clock())  # noqa: E702
            attention(self.q, self.cache, i, pos + 1, self.attn_heads); tick(clock())  # noqa: E702
            output(); tick(clock())  # noqa: E702 (self.attn -> self.proj)
            residual_add(x, self.proj); tick(clock())  # noqa: E702
            rmsnorm(x, layer.ffn_norm, eps, xn); tick(clock())  # noqa: E702
            gate_up(); tick(clock())  # noqa: E702 (xn -> self.gate_up)
            silu_mul(self.gate_up, self.act); tick(clock())  # noqa: E702
            down(); tick(clock())  # noqa: E702 (self.act -> self.proj)
            residual_add(x, self.proj); tick(clock())  # noqa: E702
        rmsnorm(x, w.output_norm, eps, xn); tick(clock())  # noqa: E702
        self.lm_head(); tick(clock())  # noqa: E702 (xn -> self.logits)
        self.next_token = int(argmax(self.logits)); tick(clock())  # noqa: E702

        self.marks = marks
        self.position = pos + 1
        return self.logits

    @property
    def op_seconds(self) -> dict:
        """Seconds of each op of the last step, summed over layers (zeros before the first step)."""
        seconds = dict.fromkeys(OP_NAMES, 0.0)
        for name, start, stop in zip(self.op_sequence, self.marks, self.marks[1:]):
            seconds[name] += stop - start
        return seconds

    def generate(self, prompt: list[int], n_new_tokens: int) -> list[int]:
        """Greedy decoding: feed the prompt token by token, then n_new_tokens argmax tokens."""
        for token in prompt:
            self.step(token)
        out = []
        for _ in range(n_new_tokens):
            out.append(self.next_token)
            self.step(self.next_token)
        return out

    def fill_cache(self, n_positions: int, seed: int = 0) -> None:
        """Positions 0..n_positions-1 get random K and V (N(0,1)), as if that many tokens had been
        decoded: decode speed at a context does not depend on what the cache holds, and decoding 4096
        tokens to get there would take minutes."""
        if not 0 <= n_positions <= self.max_context:
            raise UserError(f"cannot fill {n_positions} positions of a {self.max_context}-position cache")
        fill_random_kv(self.cache, n_positions, seed)
        self.position = n_positions
