"""The decode engine against an independent implementation: Hugging Face transformers' Phi-3, with a
small random config, exported to GGUF with the `gguf` package and decoded by perfsim's kernels.

Both sides multiply the same weights: quantized ones go back into the HF model dequantized. For
q8_0/q4_0 weights the engine quantizes each GEMV input to q8_0 (as llama.cpp does); a forward
pre-hook on every HF Linear does the same rounding in torch, so the comparison stays tight.
Tolerances (max |difference| over the logit scale): f32 everywhere differs only by summation order,
1e-4; an f16 KV cache rounds K and V to 11 significant bits, 5e-3 (measured 1e-3); a q8_0 KV cache,
2e-2 (8 bits per 32-block). Without the hook, q8_0 weights differ from f32 activations by ~3% rms
on this (deliberately large-weighted) model, which is the activation rounding, not the kernels.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="golden test needs torch: pip install torch==2.13.0 (or pip install -e '.[test]')")
transformers = pytest.importorskip("transformers", reason="golden test needs transformers: pip install -e '.[test]'")

from gguf import GGMLQuantizationType  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

from perfsim.engine import Engine  # noqa: E402
from perfsim.gguf_io import write_phi3_gguf  # noqa: E402

N_LAYERS, HIDDEN, HEADS, FF, VOCAB, MAX_POS = 2, 256, 4, 512, 512, 128
HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.qkv_proj.weight": "attn_qkv.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
QTYPES = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}


def gguf_name(hf_name):
    if hf_name in HF_TO_GGUF:
        return HF_TO_GGUF[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{LAYER_NAMES[rest]}"


def hf_model(n_kv_heads, seed=0):
    config = transformers.Phi3Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FF, num_hidden_layers=N_LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=n_kv_heads, max_position_embeddings=MAX_POS,
        original_max_position_embeddings=MAX_POS, rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=None,
        tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = transformers.Phi3ForCausalLM(config).eval()
    with torch.no_grad():  # larger weights than HF's init (std 0.02) so that logits separate tokens clearly
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 0.08)
            else:
                p.uniform_(0.5, 1.5)  # norms: not all ones, so a missing norm weight would show
    return model


def export(model, path, weight_type):
    """Write the HF model as a Phi-3 GGUF; quantized types also go back into the HF model, dequantized,
    so both sides multiply exactly the same weights."""
    tensors, types = {}, {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            w = p.detach().numpy().astype(np.float32)
            if p.ndim == 2 and weight_type in QTYPES:
                w = dequantize(quantize(w, QTYPES[weight_type]), QTYPES[weight_type]).reshape(w.shape)
                p.copy_(torch.from_numpy(w))
            elif p.ndim == 2 and weight_type == "f16":
                w = w.astype(np.float16).astype(np.float32)
                p.copy_(torch.from_numpy(w))
            tensors[gguf_name(name)] = w
            types[gguf_name(name)] = weight_type if p.ndim == 2 else "f32"
    arch = dict(n_layer=N_LAYERS, n_embd=HIDDEN, n_ff=FF, n_head=HEADS, n_head_kv=model.config.num_key_value_heads, n_vocab=VOCAB, n_ctx=MAX_POS)
    write_phi3_gguf(path, arch, tensors, types)
    if weight_type in QTYPES:
        quantize_inputs_to_q8_0(model)


def quantize_inputs_to_q8_0(model):
    """Round every Linear's input as the engine's GEMV does: per 32-block, d = amax/127 (f32),
    q = round(x/d) (ties away from zero), x' = q*d."""
    def hook(module, args):
        (x,) = args
        blocks = x.reshape(*x.shape[:-1], -1, 32)
        d = blocks.abs().amax(-1, keepdim=True) / 127
        inverse = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        scaled = blocks * inverse
        q = torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)
        return ((q * d).reshape(x.shape),)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(hook)


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def engine_logits(path, tokens, kv_format):
    session = Engine.from_gguf(path, kv_format=kv_format).session(max_context=len(tokens))
    return np.stack([session.step(t).copy() for t in tokens])


@pytest.mark.parametrize(
    "n_kv_heads, weight_type, kv_format, tolerance",
    [
        (4, "f32", "f32", 1e-4),
        (2, "f32", "f32", 1e-4),  # GQA, as in phi-3-small and -medium
        (4, "f32", "f16", 5e-3),
        (4, "f32", "q8_0", 2e-2),
        (4, "f16", "f32", 1e-4),
        (4, "q8_0", "f32", 3e-3),
        (2, "q4_0", "f32", 1e-3),
        # Rounding K and V moves some activations across a q8_0 rounding boundary, a jump of one
        # quantization step each, which this large-weighted model amplifies: ~3% measured.
        (2, "q4_0", "f16", 6e-2),
    ],
)
def test_logits_match_transformers(tmp_path, n_kv_heads, weight_type, kv_format, tolerance):
    model = hf_model(n_kv_heads)
    path = tmp_path / "tiny.gguf"
    export(model, path, weight_type)
    tokens = list(np.random.default_rng(1).integers(3, VOCAB, size=24))
    expected = hf_logits(model, tokens)
    got = engine_logits(path, tokens, kv_format)
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() / scale < tolerance
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.85


def test_greedy_tokens_match_transformers_for_32_steps(tmp_path):
    model = hf_model(n_kv_heads=4, seed=3)
    path = tmp_path / "tiny.gguf"
    export(model, path, "f32")
    prompt = [1, 17, 42]
    sequence = list(prompt)
    for _ in range(32):  # greedy by hand: generate() would stop at, or suppress, the eos token
        sequence.append(int(hf_logits(model, sequence)[-1].argmax()))
    hf = sequence[len(prompt):]
    session = Engine.from_gguf(path, kv_format="f32").session(max_context=len(prompt) + 32)
    ours = session.generate(prompt, n_new_tokens=32)
    assert ours == hf
