"""The prediction CLI, driven through the real `perfsim` command: output, JSON shape, and every bad
input answered with one line on stderr and exit code 2."""

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from perfsim.device import builtin_devices

PERFSIM = [shutil.which("perfsim")] if shutil.which("perfsim") else [sys.executable, "-m", "perfsim"]


def run(*args, cwd=None):
    return subprocess.run(PERFSIM + list(args), capture_output=True, text=True, cwd=cwd, timeout=120)


def assert_user_error(result, *fragments):
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_profile_a16_prints_prediction_and_published_reference(tmp_path):
    result = run("profile", "--device", "a16", cwd=tmp_path)  # any directory: profiles ship with the package
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for fragment in ("tokens/s", "ms/token", "time to first token", "memory footprint", "gemv", "attention", "more than 12 tokens/s", "2404.14219"):
        assert fragment in out


def test_profile_json_has_the_documented_fields():
    result = run("profile", "--device", "a16", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert {"device", "model", "quant", "context", "predicted"} <= set(data)
    predicted = data["predicted"]
    for key in ("decode_tokens_per_s", "ms_per_token", "ttft_ms", "weight_bytes_per_token", "memory_bytes", "ops"):
        assert key in predicted
    assert abs(predicted["ms_per_token"] * predicted["decode_tokens_per_s"] - 1000) < 1e-6
    for op in predicted["ops"]:
        assert {"name", "kind", "flops", "bytes", "time_s", "bound"} <= set(op)
    assert abs(sum(op["time_s"] for op in predicted["ops"]) * 1e3 - predicted["ms_per_token"]) < 1e-9
    # q4_0: 2,038,431,744 bytes of layer weights + 55,406,592 lm_head + one 3072-wide embedding row.
    assert predicted["weight_bytes_per_token"] == 2_038_431_744 + 55_406_592 + 1728 + sum(
        op["weight_bytes"] for op in predicted["ops"] if op["kind"] == "norm")
    assert data["references"][0]["decode_tokens_per_s"] == 12


def test_options_change_the_prediction():
    def tps(*args):
        return json.loads(run("profile", "--json", *args).stdout)["predicted"]["decode_tokens_per_s"]
    q4, f16 = tps("--device", "ryzen-7840u"), tps("--device", "ryzen-7840u", "--weights", "f16")
    assert 3 < q4 / f16 < 4  # 16 / 4.5 bits, minus the fixed per-op and KV-cache parts
    assert tps("--device", "ryzen-7840u", "--threads", "1") < q4
    assert tps("--device", "ryzen-7840u", "--context", "4096") < q4


def test_devices_and_models_tables():
    devices = run("devices")
    assert devices.returncode == 0
    assert all(name in devices.stdout for name in builtin_devices())
    models = run("models")
    assert models.returncode == 0 and "3.82B" in models.stdout and "phi-3-medium" in models.stdout


def test_device_file_outside_the_package(tmp_path):
    data = yaml.safe_load(open(builtin_devices()["t4"].path))
    data["name"] = "my-t4"
    path = tmp_path / "my-t4.yaml"
    path.write_text(yaml.safe_dump(data))
    result = run("profile", "--device-file", str(path), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["device"] == "my-t4"


def test_unknown_device_lists_known_names():
    assert_user_error(run("profile", "--device", "pixel-9"), "unknown device 'pixel-9'", "a16", "h100-sxm")


def test_unknown_model_lists_known_names():
    assert_user_error(run("profile", "--device", "a16", "--model", "llama-7b"), "unknown model 'llama-7b'", "phi-3-mini")


def test_context_beyond_the_model_limit_is_an_error_not_a_clamp():
    assert_user_error(run("profile", "--device", "a16", "--context", "4097"), "4097", "limit of 4096")


def test_threads_beyond_cores_and_on_a_gpu():
    assert_user_error(run("profile", "--device", "ryzen-7840u", "--threads", "9"), "between 1 and 8")
    assert_user_error(run("profile", "--device", "ryzen-7840u", "--threads", "0"), "between 1 and 8")
    assert_user_error(run("profile", "--device", "a16", "--threads", "2"), "CPU units", "gpu")


def test_unknown_weight_format():
    assert_user_error(run("profile", "--device", "a16", "--weights", "q3_k"), "unknown format 'q3_k'")


def test_argument_errors_are_one_line_too():
    assert_user_error(run("profile", "--device", "a16", "--context", "many"), "--context", "whole number")
    assert_user_error(run("profile", "--bogus"), "unrecognized arguments: --bogus")


def write_profile(tmp_path, edit):
    data = yaml.safe_load(open(builtin_devices()["a16"].path))
    edit(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize(
    "edit, fragments",
    [
        (lambda d: d["memory"].pop("peak_bandwidth_gb_s"), ["memory.peak_bandwidth_gb_s", "missing"]),
        (lambda d: d["units"]["gpu"].update(warp_size=32), ["units.gpu.warp_size", "unknown key"]),
        (lambda d: d["memory"].update(peak_bandwidth_gb_s=-51.2), ["memory.peak_bandwidth_gb_s", "expected a number > 0"]),
        (lambda d: d["memory"].update(peak_bandwidth_gb_s=0), ["memory.peak_bandwidth_gb_s", "expected a number > 0"]),
        (lambda d: d["memory"].update(capacity_gb="six"), ["memory.capacity_gb", "expected a number, got a string"]),
        (lambda d: d.update(units=[1, 2]), ["units", "expected a mapping, got a list"]),
    ],
)
def test_bad_profile_names_file_field_and_expectation(tmp_path, edit, fragments):
    path = write_profile(tmp_path, edit)
    assert_user_error(run("profile", "--device-file", path), path, *fragments)


def test_invalid_yaml_and_missing_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n")
    assert_user_error(run("profile", "--device-file", str(path)), str(path), "not valid YAML", "line")
    assert_user_error(run("profile", "--device-file", str(tmp_path / "nope.yaml")), "nope.yaml", "no such file")


def test_yaml_tags_are_not_executed(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("!!python/object/apply:os.system ['echo pwned']\n")
    assert_user_error(run("profile", "--device-file", str(path)), str(path), "not valid YAML")
