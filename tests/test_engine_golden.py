"""The decode engine against an independent implementation: Hugging Face transformers' Phi-3, with a
small random config, exported to GGUF with the `gguf` package and decoded by perfsim's kernels.

Tolerances: with f32 weights and an f32 KV cache the two differ only by summation order, so logits
agree to 1e-4 relative to their scale. The f16 KV cache rounds K and V to 11 significant bits (2^-11
relative), and q8_0/q4_0 weights make the engine quantize activations to q8_0 (as llama.cpp does;
HF multiplies the same dequantized weights in f32): both bounded at 2% of the logit scale here.
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
            tensors[gguf_name(name)] = w
            types[gguf_name(name)] = weight_type if p.ndim == 2 else "f32"
    arch = dict(n_layer=N_LAYERS, n_embd=HIDDEN, n_ff=FF, n_head=HEADS, n_head_kv=model.config.num_key_value_heads, n_vocab=VOCAB, n_ctx=MAX_POS)
    write_phi3_gguf(path, arch, tensors, types)


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
        (4, "f32", "f16", 2e-2),
        (2, "f32", "f32", 1e-4),  # GQA, as in phi-3-small and -medium
        (4, "f16", "f16", 2e-2),
        (4, "q8_0", "f16", 2e-2),
        (2, "q4_0", "q8_0", 5e-2),
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
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.95


def test_greedy_tokens_match_transformers_for_32_steps(tmp_path):
    model = hf_model(n_kv_heads=4, seed=3)
    path = tmp_path / "tiny.gguf"
    export(model, path, "f32")
    prompt = [1, 17, 42]
    with torch.no_grad():
        hf = model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, min_new_tokens=32)[0, len(prompt):].tolist()
    session = Engine.from_gguf(path, kv_format="f32").session(max_context=len(prompt) + 32)
    ours = session.generate(prompt, n_new_tokens=32)
    assert ours == hf
