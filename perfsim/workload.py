"""The workload: a pure function from (model, formats, context) to the operations of one decode step.

Every layer runs the same ops, so an op carries `count` (how many times one token runs it: n_layers
for layer ops, 1 for the head) instead of being repeated 32 times; that keeps a prediction to ~16 op
evaluations. The byte/FLOP formulas are the kernels' own (perfsim.kernels.*): the engine times
exactly these op names, so predicted and measured compare op by op.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from perfsim.cost import Cost
from perfsim.errors import UserError
from perfsim.kernels.attention import attention_cost, kv_append_cost, kv_cache_format
from perfsim.kernels.elementwise import argmax_cost, residual_add_cost, rmsnorm_cost, rope_cost, silu_mul_cost
from perfsim.kernels.embedding import embedding_cost
from perfsim.kernels.gemv import gemv_cost
from perfsim.model import ModelSpec
from perfsim.quant import F32, Formats, QuantFormat, quant_format

# Op kinds, in the groups a report shows.
GEMV, ATTENTION, KV_APPEND, NORM, ROPE, ACTIVATION, RESIDUAL, EMBEDDING, SAMPLING = (
    "gemv", "attention", "kv_append", "norm", "rope", "activation", "residual", "embedding", "sampling",
)
OTHER_KINDS = (KV_APPEND, NORM, ROPE, ACTIVATION, RESIDUAL, EMBEDDING, SAMPLING)


@dataclass(frozen=True)
class Op:
    name: str  # what the engine times it as: "attn_qkv", "attention", "lm_head", ...
    kind: str  # gemv | attention | kv_append | norm | rope | activation | residual | embedding | sampling
    cost: Cost  # of ONE execution
    precision: str  # math precision of its FLOPs: "int8" (integer dot products), "f16" or "f32"
    count: int = 1  # executions per token (n_layers for layer ops)
    kernel: str = ""  # the kernel that runs it, e.g. "gemv.q4_0": a calibrated host profile has roofs per kernel
    # Serial ops: the K/V bytes one layer's attention reads at this context; a calibrated host's fixed cost
    # per call grows with it (perfsim.calibrate). 0 otherwise.
    layer_kv_bytes: int = 0
    # Serial ops: the weight bytes one decoder layer's GEMVs stream, from one call of the op to its next (the
    # once-a-step ops get the same); a calibrated host's fixed cost per call grows with it too. 0 otherwise.
    layer_weight_bytes: int = 0
    head_dim: int = 0  # attention ops: the model's; a calibrated host's attention roofs may depend on it
    kv_heads: int = 0  # attention ops: the model's K/V heads; a calibrated host's fixed cost per call grows with them
    # Totals over `count`, derived once: the roofline reads them 10^5 times a second.
    flops: float = field(init=False)
    bytes: int = field(init=False)
    weight_bytes: int = field(init=False)
    kv_bytes: int = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "flops", self.cost.flops * self.count)
        object.__setattr__(self, "bytes", self.cost.bytes * self.count)
        object.__setattr__(self, "weight_bytes", self.cost.weight_bytes * self.count)
        object.__setattr__(self, "kv_bytes", self.cost.kv_bytes * self.count)


def formats_from_names(weights: str, kv_cache: str, activations: str = "f32") -> Formats:
    """The three format choices by name, checked (the KV cache stores only what its kernel reads)."""
    return Formats(weights=quant_format(weights), activations=quant_format(activations), kv_cache=kv_cache_format(kv_cache))


def math_precision(weights: QuantFormat) -> str:
    """Block-quantized integer weights are multiplied as int8 (llama.cpp: q4_0 x q8_0 dot products)."""
    if weights.name in ("f32", "f16"):
        return weights.name
    return "int8"


def attention_kernel(kv_format: str, n_heads: int, n_kv_heads: int) -> str:
    """Calibration key of the attention kernel: grouped-query attention has its own compute roof."""
    return f"attention.{kv_format}" + (".gqa" if n_kv_heads < n_heads else "")


def check_context(model: ModelSpec, context: int, what: str = "context") -> None:
    if context < 1:
        raise UserError(f"{what} must be at least 1 token, got {context}")
    if context > model.max_context:
        raise UserError(f"{what} of {context} tokens is longer than {model.name}'s limit of {model.max_context} tokens")


@lru_cache(maxsize=4096)
def decode_ops(model: ModelSpec, formats: Formats, context: int) -> tuple[Op, ...]:
    """The ops of decoding one token whose attention spans `context` positions (itself included: it
    sits at position context - 1 and the KV cache holds `context` entries after its append), in
    execution order."""
    check_context(model, context)
    w, L, d = formats.weights, model.n_layers, model.hidden_size
    gemv_precision = math_precision(w)
    matrices = model.layer_matrices()

    kv, gemv_kernel = formats.kv_cache.name, f"gemv.{w.name}"

    def layer_gemv(name):
        rows, cols = matrices[name]
        return Op(name, GEMV, gemv_cost(rows, cols, w), gemv_precision, L, gemv_kernel)

    gemvs = {name: layer_gemv(name) for name in matrices}
    attention_op = Op("attention", ATTENTION, attention_cost(model.n_heads, model.n_kv_heads, model.head_dim, context, formats.kv_cache),
                      "f32", L, attention_kernel(kv, model.n_heads, model.n_kv_heads), head_dim=model.head_dim,
                      kv_heads=model.n_kv_heads)
    layer_kv_bytes = attention_op.cost.kv_bytes
    layer_weight_bytes = sum(op.cost.weight_bytes for op in gemvs.values())

    def serial(name, kind, cost, count, kernel):
        return Op(name, kind, cost, "f32", count, kernel, layer_kv_bytes, layer_weight_bytes=layer_weight_bytes)

    return (
        serial("token_embd", EMBEDDING, embedding_cost(d, w), 1, f"embedding.{w.name}"),
        serial("attn_norm", NORM, rmsnorm_cost(d), L, "rmsnorm"),
        gemvs["attn_qkv"],
        serial("rope", ROPE, rope_cost(model.n_heads + model.n_kv_heads, model.head_dim), L, "rope"),
        serial("kv_append", KV_APPEND, kv_append_cost(model.n_kv_heads, model.head_dim, formats.kv_cache), L, f"kv_append.{kv}"),
        attention_op,
        gemvs["attn_output"],
        serial("attn_residual", RESIDUAL, residual_add_cost(d), L, "residual_add"),
        serial("ffn_norm", NORM, rmsnorm_cost(d), L, "rmsnorm"),
        gemvs["ffn_gate_up"],
        serial("ffn_act", ACTIVATION, silu_mul_cost(model.intermediate_size), L, "silu_mul"),
        gemvs["ffn_down"],
        serial("ffn_residual", RESIDUAL, residual_add_cost(d), L, "residual_add"),
        serial("output_norm", NORM, rmsnorm_cost(d), 1, "rmsnorm"),
        Op("lm_head", GEMV, gemv_cost(model.vocab_size, d, w), gemv_precision, 1, gemv_kernel),
        serial("argmax", SAMPLING, argmax_cost(model.vocab_size), 1, "argmax"),
    )


# The ops of a decode step by name, in execution order (any model's: the names do not depend on its shape)
DECODE_OP_NAMES = tuple(op.name for op in decode_ops(ModelSpec("any", 1, 32, 1, 1, 32, 32, 2), Formats(), 1))


def gemm_cost(rows: int, cols: int, n_tokens: int, weights: QuantFormat) -> Cost:
    """Prefill's matrix-matrix product: weights read once for all n_tokens (blocked), activations
    streamed in f32. No perfsim kernel runs prefill; this formula is the simulator's alone."""
    return Cost(
        flops=2 * rows * cols * n_tokens,
        weight_bytes=weights.storage_bytes(rows * cols),
        act_bytes=4 * n_tokens * (rows + cols),
    )


def causal_attention_cost(model: ModelSpec, n_tokens: int, kv_format: QuantFormat) -> Cost:
    """Prefill attention over a prompt of n_tokens: query i sees positions 0..i; K and V are written
    once and read once per query tile (flash-attention style, the tile reuse in cache)."""
    pairs = n_tokens * (n_tokens + 1) // 2
    kv_elements = 2 * model.kv_dim * n_tokens
    return Cost(
        flops=4 * model.n_heads * model.head_dim * pairs,
        kv_bytes=2 * kv_format.storage_bytes(kv_elements),
        act_bytes=2 * 4 * model.q_dim * n_tokens,
    )


@lru_cache(maxsize=1024)
def prefill_ops(model: ModelSpec, formats: Formats, n_tokens: int) -> tuple[Op, ...]:
    """The ops of processing a prompt of n_tokens at once (matrix-matrix), up to the first token's logits."""
    check_context(model, n_tokens, "prompt")
    w, L, d, n = formats.weights, model.n_layers, model.hidden_size, n_tokens
    precision = math_precision(w)
    ops = [Op(name, GEMV, gemm_cost(rows, cols, n, w), precision, L) for name, (rows, cols) in model.layer_matrices().items()]
    ops += [
        Op("attention", ATTENTION, causal_attention_cost(model, n, formats.kv_cache), "f16" if formats.kv_cache.name != "f32" else "f32", L),
        Op("norms_rope_act", NORM, (rmsnorm_cost(d) * 2 + rope_cost(model.n_heads + model.n_kv_heads, model.head_dim) + silu_mul_cost(model.intermediate_size) + residual_add_cost(d) * 2) * n, "f32", L),
        Op("lm_head", GEMV, gemv_cost(model.vocab_size, d, w), precision),  # the last position's logits only
    ]
    return tuple(ops)


@dataclass(frozen=True)
class MemoryFootprint:
    weight_bytes: int  # every tensor, in its stored format
    kv_cache_bytes: int  # K and V for all layers at the context length
    activation_bytes: int  # working buffers of one decode step (or of the prompt, for prefill)

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes + self.activation_bytes


def kv_cache_bytes(model: ModelSpec, kv_format: QuantFormat, n_positions: int) -> int:
    """K and V, every layer: 2 x layers x kv_heads x head_dim x bytes per element, per position."""
    return n_positions * model.n_layers * 2 * kv_format.storage_bytes(model.kv_dim)


def weight_bytes(model: ModelSpec, weights: QuantFormat) -> int:
    matrices = model.n_layers * weights.storage_bytes(model.layer_matrix_weights)
    embeddings = weights.storage_bytes(model.embedding_weights) * (1 if model.tied_embeddings else 2)
    norms = F32.storage_bytes((2 * model.n_layers + 1) * model.hidden_size)
    return matrices + embeddings + norms


@lru_cache(maxsize=4096)
def memory_footprint(model: ModelSpec, formats: Formats, context: int, prompt_tokens: int = 1) -> MemoryFootprint:
    """Resident bytes to decode at `context`: weights, the KV cache sized for it, and f32 buffers
    (residual stream and scratch, qkv, gate_up, logits, attention scores; for the prompt, its rows)."""
    rows = max(prompt_tokens, 1)
    per_row = 4 * (3 * model.hidden_size + model.qkv_rows + 3 * model.intermediate_size)
    scores = 4 * model.n_heads * context
    logits = 4 * model.vocab_size
    return MemoryFootprint(
        weight_bytes=weight_bytes(model, formats.weights),
        kv_cache_bytes=kv_cache_bytes(model, formats.kv_cache, max(context, prompt_tokens)),
        activation_bytes=rows * per_row + scores + logits,
    )
