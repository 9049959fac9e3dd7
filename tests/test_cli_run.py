"""`perfsim run` and `perfsim profile --device host` through the real command: a tiny model measured
end to end, and every bad input answered with one line and exit code 2 before anything is written."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from perfsim.gguf_io import Phi3Arch, write_random_phi3_gguf

PERFSIM = [shutil.which("perfsim")] if shutil.which("perfsim") else [sys.executable, "-m", "perfsim"]
TINY = Phi3Arch(n_layer=2, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, n_vocab=320, n_ctx=128)


def run(*args, env=None, cwd=None):
    return subprocess.run(PERFSIM + list(args), capture_output=True, text=True, timeout=600, env=env, cwd=cwd)


def assert_user_error(result, *fragments):
    assert result.returncode == 2, result
    assert result.stdout == "" and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_random_phi3_gguf(path, TINY, "q4_0", seed=0)
    return path


def test_run_json_measures_every_op_of_the_workload(tiny_gguf):
    result = run("run", "--gguf", str(tiny_gguf), "--context", "64", "--tokens", "4", "--threads", "1", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    measured = data["measured"]
    assert measured["decode_tokens_per_s"] > 0 and measured["steps"] == 4 and measured["contexts"] == [61, 64]
    names = [op["name"] for op in measured["ops"]]
    assert names[:3] == ["token_embd", "attn_norm", "attn_qkv"] and "lm_head" in names and "attention" in names
    assert all(op["time_s"] > 0 for op in measured["ops"])
    # the sum of the op times is the step time less the timing overhead (a few percent at most)
    assert sum(op["time_s"] for op in measured["ops"]) <= 1.05 * measured["ms_per_token"] / 1e3
    assert measured["peak_rss_bytes"] > 0


def test_run_table(tiny_gguf):
    result = run("run", "--gguf", str(tiny_gguf), "--context", "16", "--tokens", "2", "--threads", "1")
    assert result.returncode == 0, result.stderr
    assert "measured decode" in result.stdout and "JIT warm-up" in result.stdout and "gemv" in result.stdout


@pytest.mark.parametrize("threads", ["0", str(os.cpu_count() + 1)])
def test_threads_out_of_range(threads):
    assert_user_error(run("run", "--threads", threads), "--threads must be between 1 and")


def test_context_longer_than_the_model(tiny_gguf):
    assert_user_error(run("run", "--gguf", str(tiny_gguf), "--context", "129"), "limit of 128")
    assert_user_error(run("run", "--context", "4097"), "limit of 4096")


def test_truncated_gguf(tiny_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    assert_user_error(run("run", "--gguf", str(cut)), str(cut))


def test_not_a_gguf(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a model" * 100)
    assert_user_error(run("run", "--gguf", str(junk)), str(junk))


def test_wrong_architecture(tmp_path):
    import gguf

    path = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_user_error(run("run", "--gguf", str(path)), "llama", "phi3")


def test_unsupported_weight_format_and_device():
    assert_user_error(run("run", "--weights", "int4_g128"), "int4_g128")
    assert_user_error(run("run", "--device", "a16"), "only the host can be measured")
    assert_user_error(run("run", "--gguf", "x.gguf", "--model", "phi-3-mini"), "come from the GGUF file")


def test_host_profile_refuses_bad_options_before_calibrating(tmp_path):
    env = dict(os.environ, PERFSIM_CACHE_DIR=str(tmp_path / "cache"))
    assert_user_error(run("profile", "--device", "host", "--threads", "0", env=env), "--threads")
    assert_user_error(run("profile", "--device", "host", "--context", "9999", env=env), "limit of 4096")
    assert not (tmp_path / "cache").exists()  # nothing written, no calibration started
