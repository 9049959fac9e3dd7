"""perfsim.gguf_io: Phi-3 GGUF reading (memory-mapped, validated) and streaming writing."""

from __future__ import annotations

import math
import re

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from perfsim.errors import UserError
from perfsim.gguf_io import (
    PHI3_MINI,
    GgufModel,
    Phi3Arch,
    phi3_tensor_shapes,
    random_weight_std,
    read_phi3_gguf,
    synthetic_vocab,
    write_phi3_gguf,
    write_random_phi3_gguf,
)

# Tiny but not square anywhere it matters: qkv rows (256 + 2*2*64 = 512) != cols, ffn_up 1024 x 256,
# ffn_down 256 x 512, grouped-query attention (4 heads, 2 kv heads).
TINY = Phi3Arch(n_layer=2, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, n_vocab=320, n_ctx=512)


def _float_tensors(arch: Phi3Arch, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in phi3_tensor_shapes(arch).items():
        if len(shape) == 1:
            out[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[name] = (0.05 * rng.standard_normal(shape)).astype(np.float32)
    return out


def _write_custom(path, arch=TINY, arch_name="phi3", drop=(), override=None, drop_keys=()):
    """A GGUF written directly with gguf.GGUFWriter, to make files the perfsim writer would not."""
    override = override or {}
    w = gguf.GGUFWriter(path, arch_name)
    keys = {
        "block_count": arch.n_layer,
        "embedding_length": arch.n_embd,
        "feed_forward_length": arch.n_ff,
        "attention.head_count": arch.n_head,
        "attention.head_count_kv": arch.n_head_kv,
        "context_length": arch.n_ctx,
        "rope.dimension_count": arch.n_rot,
    }
    for k, v in keys.items():
        if k not in drop_keys:
            w.add_uint32(f"{arch_name}.{k}", v)
    if "attention.layer_norm_rms_epsilon" not in drop_keys:
        w.add_float32(f"{arch_name}.attention.layer_norm_rms_epsilon", arch.rms_eps)
    for name, x in _float_tensors(arch).items():
        if name in drop:
            continue
        if name in override:
            x, qtype = override[name]
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _user_error(path, pattern: str) -> str:
    with pytest.raises(UserError) as exc:
        read_phi3_gguf(path)
    msg = str(exc.value)
    assert re.search(pattern, msg), msg
    assert str(path) in msg, msg  # names the file
    assert "\n" not in msg  # one line
    return msg


# ------------------------------------------------------------------------------- shapes and round trip


def test_phi3_mini_shapes_match_the_published_parameter_count():
    shapes = phi3_tensor_shapes(PHI3_MINI)
    assert len(shapes) == 1 + 6 * 32 + 2
    assert shapes["blk.0.attn_qkv.weight"] == (9216, 3072)
    assert shapes["blk.31.ffn_up.weight"] == (16384, 3072)  # gate and up fused
    assert shapes["blk.0.ffn_down.weight"] == (3072, 8192)
    assert shapes["token_embd.weight"] == shapes["output.weight"] == (32064, 3072)
    assert sum(math.prod(s) for s in shapes.values()) == 3_821_079_552  # DATA.md, untied lm_head


def test_round_trip_shapes_types_arch_and_data(tmp_path):
    src = _float_tensors(TINY)
    types = {
        "token_embd.weight": "q4_0",
        "output.weight": "q8_0",
        "blk.0.attn_qkv.weight": "q4_0",
        "blk.0.attn_output.weight": "f16",
        "blk.0.ffn_up.weight": "q4_0",
        "blk.0.ffn_down.weight": "q8_0",
        "blk.1.ffn_up.weight": "f32",
    }
    path = write_phi3_gguf(tmp_path / "rt.gguf", TINY, src, types)
    m = read_phi3_gguf(path)
    assert isinstance(m, GgufModel)
    assert m.arch == TINY  # every number, rms_eps read back as 1e-05 exactly
    assert type(m.arch.n_layer) is int and type(m.arch.rms_eps) is float
    assert m.arch.head_dim == 64 and m.arch.n_rot == 64
    assert set(m.tensors) == set(phi3_tensor_shapes(TINY))
    for name, x in src.items():
        t = m.tensors[name]
        want_type = types.get(name, "f32")
        assert t.type == want_type, name
        assert t.shape == x.shape, name
        if want_type in ("q4_0", "q8_0"):
            qt = QT.Q4_0 if want_type == "q4_0" else QT.Q8_0
            block_bytes = 18 if want_type == "q4_0" else 34
            assert t.data.dtype == np.uint8 and t.data.shape == (x.shape[0], x.shape[1] // 32 * block_bytes)
            np.testing.assert_array_equal(t.data, gguf.quants.quantize(x, qt), err_msg=name)
            deq = gguf.quants.dequantize(np.asarray(t.data), qt)
            assert deq.shape == x.shape
            assert np.abs(deq - x).max() < 0.1 * np.abs(x).max()
        elif want_type == "f16":
            assert t.data.dtype == np.float16 and t.data.shape == x.shape
            np.testing.assert_array_equal(t.data, x.astype(np.float16))
        else:
            assert t.data.dtype == np.float32 and t.data.shape == x.shape
            np.testing.assert_array_equal(t.data, x)


def test_gguf_stores_dims_reversed_and_we_undo_it(tmp_path):
    path = write_phi3_gguf(tmp_path / "dims.gguf", TINY, _float_tensors(TINY), "q4_0", with_tokenizer=False)
    raw = {t.name: [int(d) for d in t.shape] for t in gguf.GGUFReader(path).tensors}
    # GGUF ne0 is the row length (cols = in_features): ffn_up is ne = [n_embd, 2 * n_ff]
    assert raw["blk.0.ffn_up.weight"] == [256, 1024]
    assert raw["blk.0.ffn_down.weight"] == [512, 256]
    assert raw["token_embd.weight"] == [256, 320]  # as llama.cpp expects: {n_embd, n_vocab}
    m = read_phi3_gguf(path)
    assert m.tensors["blk.0.ffn_up.weight"].shape == (1024, 256)
    assert m.tensors["blk.0.ffn_down.weight"].shape == (256, 512)
    assert m.arch.n_vocab == 320  # from token_embd's shape


def test_tensor_data_are_read_only_views_of_the_mapped_file(tmp_path):
    path = write_random_phi3_gguf(tmp_path / "mm.gguf", TINY, "q4_0")
    m = read_phi3_gguf(path)
    base = m.file_map.__array_interface__["data"][0]
    assert isinstance(m.file_map, np.memmap) and m.file_map.size == path.stat().st_size
    for name, t in m.tensors.items():
        assert isinstance(t.data, np.memmap), name
        assert not t.data.flags.owndata and not t.data.flags.writeable, name
        assert np.shares_memory(t.data, m.file_map), name
        off, nbytes = m.offsets[name]
        assert t.data.__array_interface__["data"][0] - base == off  # the file's own bytes, in place
        assert t.data.nbytes == nbytes
    # and those bytes are what the file holds at that offset
    off, nbytes = m.offsets["blk.1.ffn_down.weight"]
    with open(path, "rb") as f:
        f.seek(off)
        assert f.read(nbytes) == m.tensors["blk.1.ffn_down.weight"].data.tobytes()


def _rss_file_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status")


def test_release_drops_the_tensor_pages_from_the_resident_set(tmp_path):
    arch = Phi3Arch(n_layer=1, n_embd=256, n_ff=512, n_head=4, n_head_kv=4, n_vocab=8192)
    path = write_random_phi3_gguf(tmp_path / "big.gguf", arch, "f32", with_tokenizer=False)
    m = read_phi3_gguf(path)
    emb = m.tensors["token_embd.weight"].data  # 8 MB of f32
    before = _rss_file_kb()
    assert np.isfinite(emb.sum())  # touch every page
    touched = _rss_file_kb()
    assert touched - before > 6_000
    assert m.release("token_embd.weight") >= emb.nbytes
    released = _rss_file_kb()
    assert touched - released > 6_000
    assert np.isfinite(emb.sum())  # still valid after release: pages come back from the file


def test_random_writer_is_deterministic_and_sane(tmp_path):
    a = write_random_phi3_gguf(tmp_path / "a.gguf", TINY, "q4_0", seed=0)
    b = write_random_phi3_gguf(tmp_path / "b.gguf", TINY, "q4_0", seed=0)
    c = write_random_phi3_gguf(tmp_path / "c.gguf", TINY, "q4_0", seed=1)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert not list(tmp_path.glob("*.partial"))
    m = read_phi3_gguf(a)
    assert m.tensors["output.weight"].type == "q4_0" and m.tensors["token_embd.weight"].type == "q4_0"
    assert m.tensors["output_norm.weight"].type == "f32"
    np.testing.assert_array_equal(m.tensors["blk.0.attn_norm.weight"].data, 1.0)
    for name in ("blk.0.ffn_up.weight", "blk.1.ffn_down.weight"):
        t = m.tensors[name]
        w = gguf.quants.dequantize(np.asarray(t.data), QT.Q4_0)
        assert np.isfinite(w).all()
        assert abs(w.std() / random_weight_std(t.shape[1]) - 1) < 0.1, name
    q8 = read_phi3_gguf(write_random_phi3_gguf(tmp_path / "q8.gguf", TINY, "q8_0"))
    w = gguf.quants.dequantize(np.asarray(q8.tensors["blk.0.attn_qkv.weight"].data), QT.Q8_0)
    assert abs(w.std() / random_weight_std(256) - 1) < 0.1


def test_synthetic_vocab_has_llama_byte_tokens(tmp_path):
    tokens, scores, types = synthetic_vocab(320)
    assert len(tokens) == len(set(tokens)) == len(scores) == len(types) == 320
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and tokens[3 + 10] == "<0x0A>"
    assert "<|endoftext|>" in tokens  # llama.cpp fails on a "phi3"-named model without it
    m = read_phi3_gguf(write_random_phi3_gguf(tmp_path / "tok.gguf", TINY))
    assert m.metadata["tokenizer.ggml.model"] == "llama"
    assert m.metadata["general.architecture"] == "phi3"
    assert m.metadata["general.file_type"] == 2  # MOSTLY_Q4_0
    with pytest.raises(ValueError, match="at least 261"):
        synthetic_vocab(100)


# ------------------------------------------------------------------------------------ bad files


def test_missing_file(tmp_path):
    _user_error(tmp_path / "nope.gguf", "no such file")


def test_empty_and_garbage_files(tmp_path):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    _user_error(empty, "empty")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _user_error(junk, "not a GGUF file")
    # right magic, garbage after it
    junk2 = tmp_path / "junk2.gguf"
    junk2.write_bytes(b"GGUF" + np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _user_error(junk2, "corrupt|truncated")


def test_truncated_files(tmp_path):
    path = write_random_phi3_gguf(tmp_path / "t.gguf", TINY)
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 1000])  # inside the last tensor
    _user_error(cut, r"truncated.*tensor 'output\.weight'")
    cut.write_bytes(data[:200])  # inside the metadata
    _user_error(cut, "truncated")
    cut.write_bytes(data[:3000])  # inside the vocabulary (tokenizer.ggml.tokens)
    _user_error(cut, "truncated")


def test_wrong_architecture(tmp_path):
    path = _write_custom(tmp_path / "llama.gguf", arch_name="llama")
    _user_error(path, r"architecture is 'llama'.*phi3")


@pytest.mark.parametrize("qtype", [QT.Q4_1, QT.BF16])
def test_unsupported_tensor_type(tmp_path, qtype):
    x = _float_tensors(TINY)["blk.1.ffn_down.weight"]
    path = _write_custom(tmp_path / "t.gguf", override={"blk.1.ffn_down.weight": (x, qtype)})
    _user_error(path, rf"'blk\.1\.ffn_down\.weight' has type {qtype.name}")


def test_unknown_tensor_type_id(tmp_path):
    path = write_random_phi3_gguf(tmp_path / "t.gguf", TINY, with_tokenizer=False)
    data = bytearray(path.read_bytes())
    # tensor info: name, n_dims (u32), dims (u64 each), type (u32), offset (u64)
    name = b"blk.0.ffn_norm.weight"
    at = data.index(len(name).to_bytes(8, "little") + name) + 8 + len(name)
    assert int.from_bytes(data[at : at + 4], "little") == 1  # one dim
    type_at = at + 4 + 8
    assert int.from_bytes(data[type_at : type_at + 4], "little") == 0  # F32
    data[type_at : type_at + 4] = (999).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    _user_error(path, r"tensor 'blk\.0\.ffn_norm\.weight' has an unknown type id 999")


def test_missing_tensor(tmp_path):
    path = _write_custom(tmp_path / "t.gguf", drop={"blk.1.attn_qkv.weight"})
    _user_error(path, r"missing tensor 'blk\.1\.attn_qkv\.weight'")


def test_wrong_shape(tmp_path):
    # ffn_up with n_ff rows (gate only) instead of the fused 2 * n_ff
    x = np.zeros((TINY.n_ff, TINY.n_embd), dtype=np.float32)
    path = _write_custom(tmp_path / "t.gguf", override={"blk.0.ffn_up.weight": (x, QT.F32)})
    _user_error(path, r"'blk\.0\.ffn_up\.weight' has shape \(512, 256\), expected \(1024, 256\)")


def test_missing_metadata_key(tmp_path):
    path = _write_custom(tmp_path / "t.gguf", drop_keys={"feed_forward_length"})
    _user_error(path, r"missing metadata key 'phi3\.feed_forward_length'")


def test_writer_rejects_incomplete_tensor_sets(tmp_path):
    src = _float_tensors(TINY)
    del src["output.weight"]
    with pytest.raises(ValueError, match="missing"):
        write_phi3_gguf(tmp_path / "x.gguf", TINY, src)
    assert not (tmp_path / "x.gguf").exists()


# ------------------------------------------------------------------------------- llama.cpp agrees


def _numpy_phi3_logits(m: GgufModel, toks: list[int]) -> np.ndarray:
    """Reference Phi-3 forward pass (float64) over the tensors exactly as gguf_io documents them."""
    qt = {"f32": QT.F32, "f16": QT.F16, "q8_0": QT.Q8_0, "q4_0": QT.Q4_0}
    W = {
        n: gguf.quants.dequantize(np.asarray(t.data), qt[t.type]).reshape(t.shape).astype(np.float64)
        for n, t in m.tensors.items()
    }
    a, T, hd = m.arch, len(toks), m.arch.head_dim

    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + a.rms_eps) * w

    def rope(x):  # NeoX style: pairs (i, i + n_rot/2)
        half = a.n_rot // 2
        ang = np.arange(T)[:, None] * a.rope_theta ** (-np.arange(half) * 2 / a.n_rot)[None]
        c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]
        x1, x2 = x[..., :half], x[..., half : a.n_rot]
        return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s, x[..., a.n_rot :]], -1)

    x = W["token_embd.weight"][toks]
    kv = a.n_head_kv * hd
    for i in range(a.n_layer):
        p = f"blk.{i}."
        qkv = rms(x, W[p + "attn_norm.weight"]) @ W[p + "attn_qkv.weight"].T
        q = rope(qkv[:, : a.n_embd].reshape(T, a.n_head, hd))
        k = rope(qkv[:, a.n_embd : a.n_embd + kv].reshape(T, a.n_head_kv, hd))
        v = qkv[:, a.n_embd + kv :].reshape(T, a.n_head_kv, hd)
        k, v = (np.repeat(z, a.n_head // a.n_head_kv, 1) for z in (k, v))
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + np.triu(np.full((T, T), -np.inf), 1)
        pr = np.exp(s - s.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", pr, v).reshape(T, a.n_embd) @ W[p + "attn_output.weight"].T
        gu = rms(x, W[p + "ffn_norm.weight"]) @ W[p + "ffn_up.weight"].T
        g, u = gu[:, : a.n_ff], gu[:, a.n_ff :]  # gate rows first, then up
        x = x + (g / (1 + np.exp(-g)) * u) @ W[p + "ffn_down.weight"].T
    return rms(x[-1], W["output_norm.weight"]) @ W["output.weight"].T


@pytest.mark.parametrize("weight_type", ["f32", "q4_0"])
def test_llama_cpp_loads_our_files_and_agrees_with_the_documented_layout(tmp_path, weight_type):
    llama_cpp = pytest.importorskip("llama_cpp")
    arch = Phi3Arch(n_layer=2, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, n_vocab=512, n_ctx=512)
    path = write_random_phi3_gguf(tmp_path / "l.gguf", arch, weight_type, seed=3)
    toks = [1, 300, 301, 302, 400]
    ref = _numpy_phi3_logits(read_phi3_gguf(path), toks)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, logits_all=False, verbose=False)
    llm.eval(toks)
    got = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(arch.n_vocab,))
    assert np.isfinite(got).all()
    # llama.cpp rounds activations to q8 for quantized matmuls: allow a few percent there
    tol = 0.01 if weight_type == "f32" else 0.05
    assert np.abs(got - ref).max() < tol * np.abs(ref).max()
    del llm
