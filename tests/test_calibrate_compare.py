"""Host calibration (profile file handling; one real calibration, slow) and predicted-vs-measured."""

import dataclasses
import json
import shutil
import statistics
import subprocess
import sys

import numpy as np
import pytest
import yaml

from perfsim import calibrate
from perfsim.compare import coarse_groups, compare
from perfsim.device import load_device_file
from perfsim.engine import Engine
from perfsim.errors import UserError
from perfsim.measure import measure_decode
from perfsim.model import ModelSpec
from perfsim.report import comparison_record

PERFSIM = [shutil.which("perfsim")] if shutil.which("perfsim") else [sys.executable, "-m", "perfsim"]
TINY = ModelSpec("tiny", n_layers=2, hidden_size=256, n_heads=4, n_kv_heads=2, intermediate_size=512, vocab_size=320, max_context=128)


def fake_profile(bandwidth_gb_s=20.0, cpu_model=None, cores=None):
    """A host profile in the calibration's schema, with made-up roofs (for file handling and arithmetic)."""
    fingerprint = calibrate.host_fingerprint()
    kernel = {"gflops": 50.0, "overlap": 0.5, "overhead_us": 4.0}
    threads = list(range(1, fingerprint["cores"] + 1))
    return {
        "name": "host", "display_name": "test host", "kind": "host",
        "memory": {"capacity_gb": 16, "peak_bandwidth_gb_s": bandwidth_gb_s},
        "default_unit": "cpu",
        "units": {"cpu": {
            "type": "cpu", "cores": fingerprint["cores"], "peak_tflops": {"f32": 0.05, "int8": 0.1},
            "compute_efficiency": 1.0, "bandwidth_efficiency": 1.0,
            "bandwidth_gb_s_by_threads": {t: bandwidth_gb_s for t in threads}, "overhead_us_per_op": 1.0,
            "kernel_roofs": {"gemv.q4_0": {t: kernel for t in threads}},
        }},
        "sources": {"memory": "test", "units": "test"},
        "calibration": dict(fingerprint, cpu_model=cpu_model or fingerprint["cpu_model"], cores=cores or fingerprint["cores"],
                            measured_at="2026-01-01T00:00:00+00:00", perfsim_version="0.1.0", seconds=1.0),
    }


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PERFSIM_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_write_then_rename_leaves_no_partial_profile(cache, monkeypatch):
    def interrupted(progress=None):
        raise KeyboardInterrupt
    monkeypatch.setattr(calibrate, "measure_host", interrupted)
    with pytest.raises(KeyboardInterrupt):
        calibrate.calibrate_host()
    assert list(cache.iterdir()) == []


def test_an_invalid_measurement_is_never_written(cache):
    data = fake_profile()
    data["memory"]["peak_bandwidth_gb_s"] = 0
    with pytest.raises(UserError):
        calibrate.write_profile(data, calibrate.host_profile_path())
    assert not calibrate.host_profile_path().exists()


@pytest.mark.parametrize("problem", ["missing", "corrupt", "stale cpu", "stale cores"])
def test_missing_corrupt_or_stale_profiles_are_remeasured_with_a_message(cache, monkeypatch, problem):
    path = calibrate.host_profile_path()
    if problem == "corrupt":
        path.write_text("name: host\nmemory: [\n")
    elif problem == "stale cpu":
        path.write_text(yaml.safe_dump(fake_profile(cpu_model="Some Other CPU")))
    elif problem == "stale cores":
        path.write_text(yaml.safe_dump(fake_profile(cores=64)))
    monkeypatch.setattr(calibrate, "measure_host", lambda progress=None: fake_profile(bandwidth_gb_s=12.5))
    messages = []
    device = calibrate.load_host_profile(message=messages.append)
    assert device.peak_bandwidth_gb_s == 12.5
    assert len(messages) == 1 and {"missing": "no host profile", "corrupt": "unreadable", "stale cpu": "Some Other CPU",
                                    "stale cores": "cores"}[problem] in messages[0]
    assert load_device_file(path).peak_bandwidth_gb_s == 12.5


def test_a_current_profile_is_used_as_it_is(cache, monkeypatch):
    calibrate.host_profile_path().write_text(yaml.safe_dump(fake_profile(bandwidth_gb_s=33.0)))
    monkeypatch.setattr(calibrate, "measure_host", lambda progress=None: pytest.fail("must not re-measure"))
    assert calibrate.load_host_profile().peak_bandwidth_gb_s == 33.0


def test_comparison_errors_are_signed_relative_to_the_measurement():
    from perfsim.device import device_from_data

    device = device_from_data(fake_profile(), "fake.yaml")
    engine = Engine.random(TINY, "q4_0", "f16")
    measurement = measure_decode(engine, context=32, n_tokens=4, threads=1)
    c = compare(device, measurement)
    assert len(c.predictions) == 4 and [p.context for p in c.predictions] == [29, 30, 31, 32]
    # each step follows its own streaming pass; the roof of the comparison is their median
    assert len(measurement.step_stream_gb_s) == 4 and all(bw > 0 for bw in measurement.step_stream_gb_s)
    assert measurement.stream_gb_s == statistics.median(measurement.step_stream_gb_s)
    assert c.predictions[0].roofs.bandwidth_bytes_per_s == pytest.approx(measurement.stream_gb_s * 1e9)
    expected = (c.predicted_tokens_per_s - measurement.decode_tokens_per_s) / measurement.decode_tokens_per_s
    assert c.tokens_per_s_error == pytest.approx(expected)
    # a slower measurement makes the (same) prediction look more optimistic
    slower = dataclasses.replace(measurement, step_seconds=tuple(2 * s for s in measurement.step_seconds))
    assert compare(device, slower).tokens_per_s_error == pytest.approx(2 * (1 + expected) - 1)
    groups = coarse_groups(c)
    assert set(groups) == {"gemv", "attention", "rest"}
    record = json.loads(json.dumps(comparison_record(c)))
    assert {"predicted", "measured", "error"} <= set(record)
    assert record["error"]["decode_tokens_per_s"] == pytest.approx(expected)
    assert {op["name"] for op in record["error"]["ops"]} == {op["name"] for op in record["measured"]["ops"]}


@pytest.mark.slow
def test_real_calibration_writes_a_valid_profile_in_under_a_minute(tmp_path):
    path = tmp_path / "host.yaml"
    result = subprocess.run(PERFSIM + ["calibrate", "--output", str(path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    device = load_device_file(path)
    unit = device.unit()
    assert set(unit.bandwidth_gb_s_by_threads) == set(range(1, unit.cores + 1))
    assert all(1 < bw < 1000 for bw in unit.bandwidth_gb_s_by_threads.values())
    for kernel in ("gemv.q4_0", "gemv.f16", "attention.f16", "rmsnorm", "kv_append.f16", "embedding.q4_0"):
        assert set(unit.kernel_roofs[kernel]) == set(unit.bandwidth_gb_s_by_threads)
    assert device.calibration["cpu_model"] == calibrate.cpu_model()
    assert device.calibration["seconds"] < 90  # "under a minute" on a quiet machine; CI shares the box


def test_serial_kernels_are_timed_after_a_producer_that_writes_their_input():
    """Calibration times rope after a parallel stream that rewrites rope's input (as the qkv GEMV does
    in decode), and rmsnorm after its decode predecessor, the residual add that writes its x."""
    from perfsim.kernels.jit import set_threads

    benches = {b.kernel: b for b in calibrate._serial_benches()}
    producer = calibrate.Producer()
    set_threads(1)
    rope = benches["rope"].tiny
    original = rope.produced.copy()
    before_rope = producer.before(rope, 1)
    rope.run()  # rotates its input in place
    assert not np.array_equal(rope.produced, original)
    before_rope()  # restores it, as a GEMV rewrites q and k before every RoPE
    np.testing.assert_array_equal(rope.produced, original)
    norm = benches["rmsnorm"].tiny
    calls = []
    norm_with_spy = calibrate.Call(norm.run, norm.produced, lambda: calls.append(1))
    producer.before(norm_with_spy, 1)()
    assert calls == [1]
    assert benches["kv_append.f16"].tiny.predecessor is not None and benches["silu_mul"].tiny.predecessor is None
