"""Model specs and storage formats, pinned to published numbers and hand arithmetic."""

import json

import pytest

from perfsim.errors import UserError
from perfsim.model import get_model, preset_models, read_hf_config
from perfsim.quant import Q4_0, Q8_0, quant_format


def test_phi3_mini_parameter_count_matches_the_published_total():
    # Phi-3 report: 3.8B; exact count of microsoft/Phi-3-mini-4k-instruct with its untied lm_head.
    assert get_model("phi-3-mini").n_parameters == 3_821_079_552


@pytest.mark.parametrize("name, head_dim, kv_dim", [("phi-3-mini", 96, 3072), ("phi-3-small", 128, 1024), ("phi-3-medium", 128, 1280)])
def test_head_dim_and_gqa_kv_width(name, head_dim, kv_dim):
    model = get_model(name)
    assert model.head_dim == head_dim
    assert model.kv_dim == kv_dim
    assert model.qkv_rows == model.hidden_size + 2 * kv_dim


def test_phi3_mini_layer_has_113m_matrix_weights():
    assert get_model("phi-3-mini").layer_matrix_weights == 113_246_208


def test_phi3_medium_is_about_14b():
    assert 13.5e9 < get_model("phi-3-medium").n_parameters < 14.5e9


def test_hf_config_json_reads_like_the_preset(tmp_path):
    # Keys and values of microsoft/Phi-3-mini-4k-instruct's config.json (abridged; extra keys ignored).
    config = {
        "architectures": ["Phi3ForCausalLM"], "hidden_size": 3072, "intermediate_size": 8192, "max_position_embeddings": 4096,
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0, "sliding_window": 2047, "tie_word_embeddings": False, "vocab_size": 32064, "torch_dtype": "bfloat16",
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    spec = read_hf_config(path)
    preset = get_model("phi-3-mini")
    assert spec.n_parameters == preset.n_parameters
    assert (spec.head_dim, spec.n_kv_heads, spec.max_context) == (96, 32, 4096)


def test_hf_config_without_kv_heads_means_multi_head(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"hidden_size": 256, "intermediate_size": 512, "max_position_embeddings": 128,
                                "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 100}))
    assert read_hf_config(path).n_kv_heads == 4


def test_hf_config_missing_key_is_a_user_error(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"hidden_size": 256}))
    with pytest.raises(UserError, match="missing num_hidden_layers"):
        read_hf_config(path)


def test_hf_config_with_kv_heads_not_dividing_heads_is_refused(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"hidden_size": 256, "intermediate_size": 512, "max_position_embeddings": 128,
                                "num_attention_heads": 4, "num_key_value_heads": 3, "num_hidden_layers": 2, "vocab_size": 100}))
    with pytest.raises(UserError, match="n_kv_heads: must divide n_heads"):
        read_hf_config(path)


def test_presets_are_the_three_phi3_models():
    assert set(preset_models()) == {"phi-3-mini", "phi-3-small", "phi-3-medium"}


@pytest.mark.parametrize("name, bits", [("f32", 32), ("f16", 16), ("q8_0", 8.5), ("q4_0", 4.5), ("int4_g128", 4.125), ("int4_g32", 4.5), ("int4_g64", 4.25)])
def test_bits_per_weight_include_the_scales(name, bits):
    assert quant_format(name).bits_per_element == bits


def test_block_storage_is_exact():
    assert Q4_0.storage_bytes(3072 * 3072) == 3072 * 3072 * 18 // 32
    assert Q8_0.storage_bytes(64) == 68
    with pytest.raises(ValueError, match="multiple"):
        Q4_0.storage_bytes(33)


@pytest.mark.parametrize("bad", ["q3_k", "int4_g0", "int4_g7", "", "fp8"])
def test_unknown_format_names_the_known_ones(bad):
    with pytest.raises(UserError, match="expected one of: f32, f16, q8_0, q4_0"):
        quant_format(bad)
