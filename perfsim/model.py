"""Model architecture specs: validated once into a frozen dataclass (gpt-fast's ModelArgs, as data).

Presets live in models.yaml beside this file; `read_hf_config` reads a Hugging Face config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from perfsim.errors import UserError
from perfsim.schema import Fields, load_yaml

MODELS_YAML = Path(__file__).with_name("models.yaml")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int  # per half of the fused gate_up projection
    vocab_size: int
    max_context: int  # tokens
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tied_embeddings: bool = False
    head_dim: int = 0  # 0: derived as hidden_size / n_heads
    source: str = ""

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.n_heads)
        object.__setattr__(self, "_hash", hash(tuple(vars(self).values())))

    def __hash__(self) -> int:  # cached: specs key the workload's caches, hashed ~10^5 times a second
        return self._hash

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def qkv_rows(self) -> int:
        return self.q_dim + 2 * self.kv_dim

    def layer_matrices(self) -> dict[str, tuple[int, int]]:
        """(rows, cols) = (out_features, in_features) of each weight matrix in one layer."""
        return {
            "attn_qkv": (self.qkv_rows, self.hidden_size),
            "attn_output": (self.hidden_size, self.q_dim),
            "ffn_gate_up": (2 * self.intermediate_size, self.hidden_size),
            "ffn_down": (self.hidden_size, self.intermediate_size),
        }

    @property
    def layer_matrix_weights(self) -> int:
        return sum(rows * cols for rows, cols in self.layer_matrices().values())

    @property
    def embedding_weights(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def n_parameters(self) -> int:
        norms = (2 * self.n_layers + 1) * self.hidden_size
        lm_head = 0 if self.tied_embeddings else self.embedding_weights
        return self.n_layers * self.layer_matrix_weights + self.embedding_weights + lm_head + norms


def _spec_from_fields(name: str, f: Fields) -> ModelSpec:
    spec = ModelSpec(
        name=name,
        source=f.text("source", required=False, default=""),
        n_layers=f.integer("n_layers", minimum=1),
        hidden_size=f.integer("hidden_size", minimum=1),
        n_heads=f.integer("n_heads", minimum=1),
        n_kv_heads=f.integer("n_kv_heads", minimum=1),
        intermediate_size=f.integer("intermediate_size", minimum=1),
        vocab_size=f.integer("vocab_size", minimum=1),
        max_context=f.integer("max_context", minimum=1),
        rms_norm_eps=f.number("rms_norm_eps", exclusive_minimum=0, required=False, default=1e-5),
        rope_theta=f.number("rope_theta", exclusive_minimum=0, required=False, default=10000.0),
        tied_embeddings=f.boolean("tied_embeddings", required=False, default=False),
        head_dim=f.integer("head_dim", minimum=1, required=False, default=0),
    )
    f.done()
    if spec.n_heads % spec.n_kv_heads:
        f.fail("n_kv_heads", f"must divide n_heads ({spec.n_heads}), got {spec.n_kv_heads}")
    if spec.head_dim * spec.n_heads != spec.hidden_size and f.data.get("head_dim") is None:
        f.fail("n_heads", f"must divide hidden_size ({spec.hidden_size}) unless head_dim is given")
    return spec


@cache
def preset_models() -> dict[str, ModelSpec]:
    data = load_yaml(MODELS_YAML)
    top = Fields(data, str(MODELS_YAML))
    return {name: _spec_from_fields(name, top.mapping(name)) for name in data}


def get_model(name: str) -> ModelSpec:
    models = preset_models()
    if name not in models:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(models)} (or a path to a config.json)")
    return models[name]


# Hugging Face config.json keys -> ModelSpec fields.
_HF_KEYS = {
    "num_hidden_layers": "n_layers",
    "hidden_size": "hidden_size",
    "num_attention_heads": "n_heads",
    "num_key_value_heads": "n_kv_heads",
    "intermediate_size": "intermediate_size",
    "vocab_size": "vocab_size",
    "max_position_embeddings": "max_context",
    "rms_norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta",
    "tie_word_embeddings": "tied_embeddings",
    "head_dim": "head_dim",
}
_HF_REQUIRED = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size", "max_position_embeddings")


def read_hf_config(path: str | Path) -> ModelSpec:
    """A ModelSpec from a Hugging Face config.json; other keys in the file are ignored (HF configs
    carry many that do not affect cost)."""
    path = Path(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file; expected a model name or a Hugging Face config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise UserError(f"{path}: not a readable JSON config: {e}") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object (a Hugging Face config.json)")
    missing = [key for key in _HF_REQUIRED if key not in config]
    if missing:
        raise UserError(f"{path}: missing {', '.join(missing)} (expected a Hugging Face decoder config.json)")
    fields = {ours: config[theirs] for theirs, ours in _HF_KEYS.items() if config.get(theirs) is not None}
    fields.setdefault("n_kv_heads", config["num_attention_heads"])
    name = config.get("_name_or_path") or path.parent.name or path.stem
    return _spec_from_fields(str(name), Fields(fields, str(path)))


def resolve_model(name_or_path: str) -> ModelSpec:
    if name_or_path.endswith(".json") or "/" in name_or_path:
        return read_hf_config(name_or_path)
    return get_model(name_or_path)
