"""The workload's byte and FLOP counts, pinned by hand arithmetic, and the roofline on a device whose
answer can be worked out on paper."""

import dataclasses

import pytest

from perfsim.device import builtin_devices, device_from_data
from perfsim.errors import UserError
from perfsim.model import get_model
from perfsim.quant import F16, F32, Q4_0, Q8_0, Formats, quant_format
from perfsim.roofline import predict
from perfsim.workload import GEMV, decode_ops, kv_cache_bytes, memory_footprint, prefill_ops, weight_bytes

MINI = get_model("phi-3-mini")
LAYER_WEIGHTS = 113_246_208  # per layer: qkv 9216x3072 + o 3072x3072 + gate_up 16384x3072 + down 3072x8192
LM_HEAD_WEIGHTS = 32064 * 3072


def gemv_bytes(fmt, context=1, model=MINI):
    ops = decode_ops(model, Formats(weights=fmt), context)
    layer = sum(op.weight_bytes for op in ops if op.kind == GEMV and op.name != "lm_head")
    (lm_head,) = [op.weight_bytes for op in ops if op.name == "lm_head"]
    return layer, lm_head


@pytest.mark.parametrize(
    "fmt, layer_bytes, lm_head_bytes",
    [
        (Q4_0, 2_038_431_744, 55_406_592),  # 113,246,208 x 32 x 18/32, and 98,500,608 x 18/32
        (Q8_0, LAYER_WEIGHTS * 32 * 34 // 32, LM_HEAD_WEIGHTS * 34 // 32),
        (F16, LAYER_WEIGHTS * 32 * 2, LM_HEAD_WEIGHTS * 2),
        (F32, LAYER_WEIGHTS * 32 * 4, LM_HEAD_WEIGHTS * 4),
    ],
)
def test_weight_bytes_per_token(fmt, layer_bytes, lm_head_bytes):
    assert gemv_bytes(fmt) == (layer_bytes, lm_head_bytes)


def test_gemv_flops_are_two_per_weight():
    ops = decode_ops(MINI, Formats(), 1)
    assert sum(op.flops for op in ops if op.kind == GEMV) == 2 * (32 * LAYER_WEIGHTS + LM_HEAD_WEIGHTS)


@pytest.mark.parametrize(
    "model_name, kv, per_token_bytes",
    [
        ("phi-3-mini", F16, 2 * 32 * 32 * 96 * 2),  # 2 (K,V) x layers x kv_heads x head_dim x bytes
        ("phi-3-mini", F32, 2 * 32 * 32 * 96 * 4),
        ("phi-3-mini", Q8_0, 2 * 32 * 32 * 96 * 34 // 32),
        ("phi-3-small", F16, 2 * 32 * 8 * 128 * 2),  # GQA: 8 kv heads, not 32
        ("phi-3-medium", F16, 2 * 40 * 10 * 128 * 2),
    ],
)
def test_kv_cache_grows_per_token_of_context(model_name, kv, per_token_bytes):
    model = get_model(model_name)
    assert kv_cache_bytes(model, kv, 101) - kv_cache_bytes(model, kv, 100) == per_token_bytes
    # the attention op reads exactly that much more per token of context
    def attention_kv(ctx):
        (att,) = [op for op in decode_ops(model, Formats(kv_cache=kv), ctx) if op.name == "attention"]
        return att.cost.kv_bytes * att.count
    assert attention_kv(1001) - attention_kv(1000) == per_token_bytes


def test_ops_run_in_decoder_order_with_layer_counts():
    names = [op.name for op in decode_ops(MINI, Formats(), 10)]
    assert names == ["token_embd", "attn_norm", "attn_qkv", "rope", "kv_append", "attention", "attn_output", "attn_residual",
                     "ffn_norm", "ffn_gate_up", "ffn_act", "ffn_down", "ffn_residual", "output_norm", "lm_head", "argmax"]
    counts = {op.name: op.count for op in decode_ops(MINI, Formats(), 10)}
    assert counts["attn_qkv"] == 32 and counts["lm_head"] == 1


def test_memory_footprint_adds_weights_kv_and_activations():
    mem = memory_footprint(MINI, Formats(), 4096)
    assert mem.kv_cache_bytes == 4096 * 2 * 32 * 32 * 96 * 2  # 1.61 GB at the full context, f16
    assert mem.weight_bytes == weight_bytes(MINI, Q4_0) == 32 * LAYER_WEIGHTS * 18 // 32 + 2 * LM_HEAD_WEIGHTS * 18 // 32 + 65 * 3072 * 4
    assert 0 < mem.activation_bytes < 10_000_000
    assert mem.total_bytes == mem.weight_bytes + mem.kv_cache_bytes + mem.activation_bytes


def test_prefill_reads_weights_once_and_scales_flops_with_the_prompt():
    one, many = prefill_ops(MINI, Formats(), 1), prefill_ops(MINI, Formats(), 64)
    gemv = lambda ops: [op for op in ops if op.kind == GEMV and op.name != "lm_head"]
    assert sum(op.weight_bytes for op in gemv(one)) == sum(op.weight_bytes for op in gemv(many))
    assert sum(op.flops for op in gemv(many)) == 64 * sum(op.flops for op in gemv(one))


def test_context_limits():
    decode_ops(MINI, Formats(), 4096)  # the full context is allowed
    with pytest.raises(UserError, match="longer than phi-3-mini's limit of 4096"):
        decode_ops(MINI, Formats(), 4097)
    with pytest.raises(UserError, match="at least 1"):
        decode_ops(MINI, Formats(), 0)


# A device whose roofline answer is easy to work out: 100 GB/s achievable, 1 TFLOPS per precision,
# 10 us per op (all numbers cited, as the loader demands).
PAPER = {
    "name": "paper", "display_name": "Paper device", "kind": "laptop",
    "memory": {"capacity_gb": 8, "peak_bandwidth_gb_s": 200},
    "default_unit": "cpu",
    "units": {"cpu": {"type": "cpu", "cores": 4, "peak_tflops": {"f32": 2, "f16": 2, "int8": 2}, "compute_efficiency": 0.5,
                      "bandwidth_efficiency": 0.5, "single_thread_bandwidth_gb_s": 40, "overhead_us_per_op": 10}},
    "sources": {"memory": "paper", "units": "paper"},
}


def test_roofline_time_is_the_larger_roof_plus_overhead():
    device = device_from_data(PAPER, "paper.yaml")
    p = predict(MINI, Formats(), device, context=1, prompt_tokens=1)
    for t in p.ops:
        op = t.op
        memory_s, compute_s, overhead_s = op.bytes / 100e9, op.flops / 1e12, 10e-6 * op.count
        assert t.time_s == pytest.approx(max(memory_s, compute_s) + overhead_s)
        assert t.bound == ("overhead" if overhead_s > max(memory_s, compute_s) else "memory" if memory_s >= compute_s else "compute")
    (qkv,) = [t for t in p.ops if t.op.name == "attn_qkv"]
    assert qkv.bound == "memory"
    assert p.decode_tokens_per_s == pytest.approx(1 / sum(t.time_s for t in p.ops))


def test_a_calibrated_serial_kernel_costs_more_per_call_the_more_k_v_a_layers_attention_reads():
    """Paper arithmetic: rmsnorm's calibrated fixed cost is 5 us + 0.1 us per MB of K/V a layer's attention
    reads: f16, 32 heads x 96 x 2 bytes x (K and V) = 12,288 bytes a position."""
    data = dict(PAPER, units={"cpu": dict(PAPER["units"]["cpu"], kernel_roofs={"rmsnorm": {
        1: {"gflops": 1000.0, "overlap": 0.0, "overhead_us": 5.0, "overhead_us_per_kv_mb": 0.1}}})})
    device = device_from_data(data, "paper.yaml")
    for context in (1000, 4000):
        p = predict(MINI, Formats(), device, context=context, threads=1)
        (norm,) = [t for t in p.ops if t.op.name == "attn_norm"]
        kv_bytes = 12_288 * context
        assert norm.op.layer_kv_bytes == kv_bytes
        roof_s = max(norm.op.bytes / 40e9, norm.op.flops / 1e12)
        assert norm.time_s == pytest.approx(roof_s + 32 * (5e-6 + 0.1e-6 * kv_bytes / 1e6))
    (qkv,) = [op for op in decode_ops(MINI, Formats(), 4000) if op.name == "attn_qkv"]
    assert qkv.layer_kv_bytes == 0  # a GEMV's fixed cost is its own


def test_a_calibrated_serial_kernel_costs_more_per_call_the_larger_its_operands():
    """Paper arithmetic: rmsnorm's fixed cost 5 us + 200 us per MB of its own operands; Phi-3 Mini's norm
    reads x and its weight and writes its output, 3 x 3072 f32 = 36,864 bytes: 5 + 7.3728 us a call."""
    data = dict(PAPER, units={"cpu": dict(PAPER["units"]["cpu"], kernel_roofs={"rmsnorm": {
        1: {"gflops": 1000.0, "overlap": 0.0, "overhead_us": 5.0, "overhead_us_per_operand_mb": 200.0}}})})
    p = predict(MINI, Formats(), device_from_data(data, "paper.yaml"), context=1000, threads=1)
    (norm,) = [t for t in p.ops if t.op.name == "attn_norm"]
    assert norm.op.cost.bytes == 3 * 3072 * 4
    roof_s = max(norm.op.bytes / 40e9, norm.op.flops / 1e12)
    assert norm.time_s == pytest.approx(roof_s + 32 * (5e-6 + 7.3728e-6))


def test_a_calibrated_serial_kernel_costs_more_per_call_the_more_bytes_a_layer_streams():
    """Paper arithmetic: rope's fixed cost 5 us + 0.03 us per MB a decoder layer's GEMVs stream. Phi-3 Mini's
    layer holds 9216x3072 + 3072x3072 + 16384x3072 + 3072x8192 = 113,246,208 q4_0 weights (18 bytes per 32):
    63,700,992 bytes, 6.911 us a call; Medium's 7680x5120 + 5120x5120 + 35840x5120 + 5120x17920 =
    340,787,200 weights, 191,692,800 bytes, 10.751 us. The GEMVs and attention carry no layer bytes."""
    data = dict(PAPER, units={"cpu": dict(PAPER["units"]["cpu"], kernel_roofs={"rope": {
        1: {"gflops": 1000.0, "overlap": 0.0, "overhead_us": 5.0, "overhead_us_per_layer_mb": 0.03}}})})
    device = device_from_data(data, "paper.yaml")
    for model, layer_bytes, per_call_us in ((MINI, 63_700_992, 5 + 0.03 * 63.700992), (get_model("phi-3-medium"), 191_692_800, 5 + 0.03 * 191.6928)):
        p = predict(model, Formats(weights=Q4_0), device, context=1000, threads=1)
        (rope,) = [t for t in p.ops if t.op.name == "rope"]
        assert rope.op.layer_weight_bytes == layer_bytes
        assert rope.overhead_s == pytest.approx(model.n_layers * per_call_us * 1e-6)
        assert all(t.op.layer_weight_bytes == 0 for t in p.ops if t.op.kind in ("gemv", "attention"))


def test_a_calibrated_attention_costs_more_per_call_the_more_kv_heads_its_model_has():
    """Paper arithmetic: attention.f16's fixed cost 10 us + 2.5 us per K/V head a call. Phi-3 Mini has 32 K/V
    heads: 90 us a call, 32 calls; the same roof without the per-head term charges 10 us. The roof times stay."""
    def attention(per_kv_head_us):
        roof = {"gflops": 1000.0, "overlap": 0.0, "overhead_us": 10.0, "overhead_us_per_kv_head": per_kv_head_us}
        data = dict(PAPER, units={"cpu": dict(PAPER["units"]["cpu"], kernel_roofs={"attention.f16": {1: roof}})})
        p = predict(MINI, Formats(), device_from_data(data, "paper.yaml"), context=1000, threads=1)
        (op,) = [t for t in p.ops if t.op.name == "attention"]
        return op

    with_heads, without = attention(2.5), attention(0.0)
    assert with_heads.op.kv_heads == 32
    assert with_heads.overhead_s == pytest.approx(32 * 90e-6) and without.overhead_s == pytest.approx(32 * 10e-6)
    assert with_heads.time_s - without.time_s == pytest.approx(32 * 32 * 2.5e-6)
    assert (with_heads.compute_s, with_heads.memory_s) == (without.compute_s, without.memory_s)


def test_a_calibrated_serial_kernels_fixed_cost_is_scaled_by_its_ops_own_factor():
    """Paper arithmetic: rmsnorm's fixed cost 5 us + 200 us per MB of operands (7.3728 us for Mini's
    36,864 bytes) a call; the norm before attention pays 1.5x that, the one before the MLP 0.5x, and the
    output norm, with no factor of its own, 1x. The roof times are untouched."""
    roof = {"gflops": 1000.0, "overlap": 0.0, "overhead_us": 5.0, "overhead_us_per_operand_mb": 200.0,
            "overhead_factor_by_op": {"attn_norm": 1.5, "ffn_norm": 0.5}}
    data = dict(PAPER, units={"cpu": dict(PAPER["units"]["cpu"], kernel_roofs={"rmsnorm": {1: roof}})})
    p = predict(MINI, Formats(), device_from_data(data, "paper.yaml"), context=1000, threads=1)
    norms = {t.op.name: t for t in p.ops if t.op.kernel == "rmsnorm"}
    assert set(norms) == {"attn_norm", "ffn_norm", "output_norm"}
    for name, factor, calls in (("attn_norm", 1.5, 32), ("ffn_norm", 0.5, 32), ("output_norm", 1.0, 1)):
        roof_s = max(norms[name].op.bytes / 40e9, norms[name].op.flops / 1e12)
        assert norms[name].overhead_s == pytest.approx(calls * factor * (5e-6 + 7.3728e-6))
        assert norms[name].time_s == pytest.approx(roof_s + calls * factor * (5e-6 + 7.3728e-6))


def test_a_calibrated_attention_time_factor_applies_at_its_head_dim_only():
    """Paper arithmetic: attention.f16 (multi-head) 10 GFLOP/s, overlap 0.5, 20 us a call; at head_dim 96
    its roof time is 1.1x, the fixed cost not. Phi-3 Mini (head_dim 96) gets the factor; a model of the
    same heads at head_dim 128 does not, nor does Mini's grouped-query cousin's kernel (.gqa)."""
    roof = {"gflops": 10.0, "overlap": 0.5, "overhead_us": 20.0, "time_factor_by_head_dim": {96: 1.1, 64: 1.3}}
    data = dict(PAPER, units={"cpu": dict(PAPER["units"]["cpu"], kernel_roofs={"attention.f16": {1: roof}})})
    device = device_from_data(data, "paper.yaml")
    wide = dataclasses.replace(MINI, name="mini at head_dim 128", hidden_size=32 * 128, head_dim=128)
    for model, factor in ((MINI, 1.1), (wide, 1.0)):
        p = predict(model, Formats(), device, context=2048, threads=1)
        (attention,) = [t for t in p.ops if t.op.name == "attention"]
        assert attention.op.head_dim == model.head_dim
        memory_s, compute_s = attention.op.bytes / 40e9, attention.op.flops / 10e9
        roof_s = max(memory_s, compute_s) + 0.5 * min(memory_s, compute_s)
        assert attention.time_s == pytest.approx(factor * roof_s + 32 * 20e-6)


def test_a_calibrated_gemv_with_an_overlap_power_takes_the_power_mean_of_its_compute_and_memory():
    """Paper arithmetic: gemv.q4_0 at 40 GFLOP/s, overlap power 3.5, 30 us a call, one thread (40 GB/s). Phi-3 Mini's
    attn_qkv (9216 x 3072 q4_0: 15,925,248 bytes, and 40,128 of activations; 56,623,104 FLOPs) computes in 1415.6 us and
    streams in 399.1 us; (1415.6^3.5 + 399.1^3.5)^(1/3.5) = 1420.4 us (the max alone: 1415.6). At equal times the power mean is 2^(1/3.5) =
    1.219x either; without a power the same roof is the max plus overlap x the smaller."""
    from perfsim.roofline import roof_s

    assert roof_s(1.0, 1.0, power=3.5) == pytest.approx(2 ** (1 / 3.5))
    assert roof_s(1.0, 1.0, overlap=0.25, power=3.5) == pytest.approx(2 ** (1 / 3.5) + 0.25)
    assert roof_s(2.0, 1.0, overlap=0.25) == 2.25 and roof_s(1.0, 2.0, overlap=0.25) == 2.25
    assert roof_s(3.0, 0.0, power=3.5) == pytest.approx(3.0)
    roof = {"gflops": 40.0, "overlap": 0.0, "overlap_power": 3.5, "overhead_us": 30.0}
    data = dict(PAPER, units={"cpu": dict(PAPER["units"]["cpu"], kernel_roofs={"gemv.q4_0": {1: roof}})})
    p = predict(MINI, Formats(weights=Q4_0), device_from_data(data, "paper.yaml"), context=1000, threads=1)
    (qkv,) = [t for t in p.ops if t.op.name == "attn_qkv"]
    assert qkv.op.count == 32 and qkv.op.cost.weight_bytes == 15_925_248 and qkv.op.cost.bytes == 15_965_376
    assert qkv.op.cost.flops == 56_623_104
    compute_us, memory_us = 56_623_104 / 40e3, 15_965_376 / 40e3
    assert qkv.time_s == pytest.approx(32 * ((compute_us**3.5 + memory_us**3.5) ** (1 / 3.5) + 30.0) * 1e-6)
    assert qkv.time_s == pytest.approx(32 * 1450.37e-6, rel=1e-5) and qkv.bound == "compute"
    assert p.decode_s == pytest.approx(sum(t.time_s for t in p.ops))


def test_an_overlap_power_must_be_a_number_at_least_one():
    for value, expected in ((0.5, ">= 1"), ("smooth", "number")):
        roof = {"gflops": 10.0, "overlap": 0.0, "overhead_us": 5.0, "overlap_power": value}
        assert "overlap_power" in _kernel_roof_error("gemv.q4_0", roof, expected)


def _kernel_roof_error(kernel: str, roof: dict, expected: str) -> str:
    """The loader's one-line message for a profile whose only calibrated roof is `roof` (1 thread)."""
    data = dict(PAPER, units={"cpu": dict(PAPER["units"]["cpu"], kernel_roofs={kernel: {1: roof}})})
    with pytest.raises(UserError, match=expected) as e:
        device_from_data(data, "paper.yaml")
    assert "\n" not in str(e.value)
    return str(e.value)


def test_a_time_factor_by_head_dim_must_be_positive_numbers_by_whole_head_dims():
    for factors, expected in (({96: 0}, "> 0"), ({"96": 1.1}, "head_dim"), ({96: "fast"}, "number")):
        roof = {"gflops": 10.0, "overlap": 0.5, "overhead_us": 20.0, "time_factor_by_head_dim": factors}
        assert "time_factor_by_head_dim" in _kernel_roof_error("attention.f16", roof, expected)


def test_a_fixed_cost_per_operand_mb_must_be_a_number_at_least_zero():
    for value, expected in ((-1.0, ">= 0"), ("slow", "number")):
        roof = {"gflops": 10.0, "overlap": 0.0, "overhead_us": 5.0, "overhead_us_per_operand_mb": value}
        assert "overhead_us_per_operand_mb" in _kernel_roof_error("rmsnorm", roof, expected)


def test_a_fixed_cost_per_layer_mb_must_be_a_number_at_least_zero():
    for value, expected in ((-0.5, ">= 0"), ("slow", "number")):
        roof = {"gflops": 10.0, "overlap": 0.0, "overhead_us": 5.0, "overhead_us_per_layer_mb": value}
        assert "overhead_us_per_layer_mb" in _kernel_roof_error("rope", roof, expected)


def test_a_fixed_cost_per_kv_head_must_be_a_number_at_least_zero():
    for value, expected in ((-2.0, ">= 0"), ("slow", "number")):
        roof = {"gflops": 10.0, "overlap": 0.0, "overhead_us": 5.0, "overhead_us_per_kv_head": value}
        assert "overhead_us_per_kv_head" in _kernel_roof_error("attention.f16", roof, expected)


def test_an_overhead_factor_by_op_must_be_a_positive_number_by_decode_op_name():
    for factors, expected in (({"attn_norm": 0}, "> 0"), ({"pre_norm": 1.2}, "decode op name"), ({"ffn_norm": "x"}, "number")):
        roof = {"gflops": 10.0, "overlap": 0.0, "overhead_us": 5.0, "overhead_factor_by_op": factors}
        assert "overhead_factor_by_op" in _kernel_roof_error("rmsnorm", roof, expected)


def test_cpu_bandwidth_saturates_with_threads():
    device = device_from_data(PAPER, "paper.yaml")
    bandwidth = lambda threads: predict(MINI, Formats(), device, 1, threads=threads).roofs.bandwidth_bytes_per_s
    assert [bandwidth(t) / 1e9 for t in (1, 2, 3, 4)] == [40, 80, 100, 100]  # 40 per core, capped at 0.5 x 200


def test_prefill_of_a_long_prompt_is_compute_bound():
    device = device_from_data(PAPER, "paper.yaml")
    p = predict(MINI, Formats(), device, context=1, prompt_tokens=512)
    flops = sum(op.flops for op in prefill_ops(MINI, Formats(), 512))
    assert p.prefill_s >= flops / 1e12  # at least the compute roof
    assert p.prefill_s < 1.2 * flops / 1e12 + 0.01


def test_a16_prediction_sits_within_a_factor_of_two_of_the_published_figure():
    # Not a fit to 12 tokens/s: the fractions come from cited measurements; this guards against a
    # unit slip (GB vs GiB, bits vs bytes) that would put it off by 8x or 1000x.
    p = predict(MINI, Formats(), builtin_devices()["a16"], context=256)
    assert 6 < p.decode_tokens_per_s < 24
    assert p.fits_in_memory


def test_phi3_medium_f16_does_not_fit_a_phone():
    p = predict(get_model("phi-3-medium"), Formats(weights=F16), builtin_devices()["a16"], context=256)
    assert not p.fits_in_memory


def test_grouped_int4_reads_fewer_bytes_than_q4_0():
    g128 = gemv_bytes(quant_format("int4_g128"))[0]
    assert g128 == 32 * LAYER_WEIGHTS * 66 // 128 < gemv_bytes(Q4_0)[0]
