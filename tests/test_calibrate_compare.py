"""Host calibration (profile file handling; one real calibration, slow) and predicted-vs-measured."""

import dataclasses
import json
import os
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
from perfsim.measure import measure_decode, measurement_record
from perfsim.model import ModelSpec
from perfsim.report import comparison_record

PERFSIM = [shutil.which("perfsim")] if shutil.which("perfsim") else [sys.executable, "-m", "perfsim"]
TINY = ModelSpec("tiny", n_layers=2, hidden_size=256, n_heads=4, n_kv_heads=2, intermediate_size=512, vocab_size=320, max_context=128)


def fake_profile(bandwidth_gb_s=20.0, cpu_model=None, cores=None, cpu_id=None):
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
                            cpu_id=cpu_id or fingerprint["cpu_id"],
                            measured_at="2026-01-01T00:00:00+00:00", perfsim_version="0.1.0", seconds=1.0),
    }


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PERFSIM_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_write_then_rename_leaves_no_partial_profile(cache, monkeypatch):
    def interrupted(progress=None, decode_points=None):
        raise KeyboardInterrupt
    monkeypatch.setattr(calibrate, "measure_host", interrupted)
    with pytest.raises(KeyboardInterrupt):
        calibrate.calibrate_host()
    assert list(cache.iterdir()) == []


def _some_decode_points() -> dict:
    """{threads: {kernel: [DecodeShapedPoint]}} as measure_host hands them over, every field set."""
    from perfsim.cost import Cost

    def point(seconds, context_kv_bytes, model, op):
        return calibrate.DecodeShapedPoint(seconds, Cost(2.5e6, 1_200_000, context_kv_bytes // 2, 40_960), context_kv_bytes, 18.5, 21.25,
                                           model, op, 45_000_000, 24.0, 150.5, 20 if op == "attention" else 0)
    return {t: {"attention.f16": [point(1e-4 * t, 1_310_720, 0, "attention"), point(2.9e-3 / t, 40_960_000, 0, "attention")],
                "rmsnorm": [point(9e-6, 1_310_720, 2, "attn_norm"), point(7e-6, 1_310_720, 2, "ffn_norm")]} for t in (1, 2)}


def test_calibration_keeps_the_decode_points_its_fits_were_made_on_beside_the_profile(cache, monkeypatch):
    measured = _some_decode_points()

    def measure_host(progress=None, decode_points=None):
        decode_points.update(measured)
        return fake_profile()
    monkeypatch.setattr(calibrate, "measure_host", measure_host)
    device = calibrate.calibrate_host()
    path = calibrate.decode_points_path(calibrate.host_profile_path())
    assert path == cache / "host.decode-points.json"
    assert calibrate.load_decode_points(calibrate.host_profile_path(), device) == measured  # every field, every point
    record = json.loads(path.read_text())
    assert record["calibration_version"] == calibrate.CALIBRATION_VERSION
    assert [model["name"] for model in record["models"]] == [calibrate.DECODE_SHAPED_MODEL.name, calibrate.DECODE_SHAPED_GQA_MODEL.name,
                                                              calibrate.DECODE_SHAPED_WIDE_MODEL.name]
    assert sorted(os.listdir(cache)) == ["host.decode-points.json", "host.yaml"]  # no temporary file left


@pytest.mark.parametrize("problem, message", [("missing", "cannot read the decode points"), ("corrupt", "are corrupt"),
                                              ("a field lost", "are corrupt"), ("another calibration", "not of this profile's")])
def test_decode_points_missing_corrupt_or_of_another_calibration_are_refused(cache, monkeypatch, problem, message):
    monkeypatch.setattr(calibrate, "measure_host", lambda progress=None, decode_points=None: decode_points.update(_some_decode_points()) or fake_profile())
    device = calibrate.calibrate_host()
    path = calibrate.decode_points_path(calibrate.host_profile_path())
    record = json.loads(path.read_text())
    if problem == "missing":
        path.unlink()
    elif problem == "corrupt":
        path.write_text(path.read_text()[:100])
    elif problem == "a field lost":
        del record["points"][0]["seconds"]
        path.write_text(json.dumps(record))
    else:  # a calibration interrupted after its profile was written, before its points: the points are the older one's
        record["measured_at"] = "2025-12-31T23:00:00+00:00"
        path.write_text(json.dumps(record))
    with pytest.raises(UserError, match=message) as error:
        calibrate.load_decode_points(calibrate.host_profile_path(), device)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_an_invalid_measurement_is_never_written(cache):
    data = fake_profile()
    data["memory"]["peak_bandwidth_gb_s"] = 0
    with pytest.raises(UserError):
        calibrate.write_profile(data, calibrate.host_profile_path())
    assert not calibrate.host_profile_path().exists()


@pytest.mark.parametrize("problem", ["missing", "corrupt", "stale cpu", "stale cpu generation", "stale cores"])
def test_missing_corrupt_or_stale_profiles_are_remeasured_with_a_message(cache, monkeypatch, problem):
    path = calibrate.host_profile_path()
    if problem == "corrupt":
        path.write_text("name: host\nmemory: [\n")
    elif problem == "stale cpu":
        path.write_text(yaml.safe_dump(fake_profile(cpu_model="Some Other CPU")))
    elif problem == "stale cpu generation":  # the same model name, as a KVM guest's Zen 3 and Zen 4 both read 'AMD EPYC'
        path.write_text(yaml.safe_dump(fake_profile(cpu_id="AuthenticAMD family 25 model 1")))
    elif problem == "stale cores":
        path.write_text(yaml.safe_dump(fake_profile(cores=64)))
    monkeypatch.setattr(calibrate, "measure_host", lambda progress=None, decode_points=None: fake_profile(bandwidth_gb_s=12.5))
    messages = []
    device = calibrate.load_host_profile(message=messages.append)
    assert device.peak_bandwidth_gb_s == 12.5
    assert len(messages) == 1 and {"missing": "no host profile", "corrupt": "unreadable", "stale cpu": "Some Other CPU",
                                    "stale cpu generation": "family 25 model 1", "stale cores": "cores"}[problem] in messages[0]
    assert load_device_file(path).peak_bandwidth_gb_s == 12.5


def test_cpu_id_tells_apart_what_the_model_name_does_not(tmp_path):
    block = "processor\t: {n}\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: {model}\nmodel name\t: AMD EPYC\n\n"
    zen3, zen4 = tmp_path / "zen3", tmp_path / "zen4"
    zen3.write_text(block.format(n=0, model=1) + block.format(n=1, model=1))
    zen4.write_text(block.format(n=0, model=17) + block.format(n=1, model=99))  # the first processor's block is read
    assert calibrate.cpu_id(str(zen3)) == "AuthenticAMD family 25 model 1"
    assert calibrate.cpu_id(str(zen4)) == "AuthenticAMD family 25 model 17"
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\n\n")
    assert calibrate.cpu_id(str(arm)) == calibrate.cpu_id(str(tmp_path / "missing")) == "unknown"


def test_a_current_profile_is_used_as_it_is(cache, monkeypatch):
    calibrate.host_profile_path().write_text(yaml.safe_dump(fake_profile(bandwidth_gb_s=33.0)))
    monkeypatch.setattr(calibrate, "measure_host", lambda progress=None, decode_points=None: pytest.fail("must not re-measure"))
    assert calibrate.load_host_profile().peak_bandwidth_gb_s == 33.0


def test_a_calibration_whose_cpu_ran_slow_at_some_thread_count_says_so_each_time_it_is_used(cache, monkeypatch, capsys):
    """The compute probe per thread at a thread count under SLOW_COMPUTE_FRACTION of the one-thread probe: the
    round-e calibration (134 GFLOP/s on two threads, 162 on one: 0.41) warns, the 0.63-1.09 of the others do not."""
    from perfsim.cli import main
    from perfsim.device import device_from_data

    def profile(probes):
        data = fake_profile()
        data["units"]["cpu"]["compute_probe_gflops_by_threads"] = probes
        return data

    warning = calibrate.slow_compute_warning(device_from_data(profile({1: 162.0, 2: 134.0}), "e.yaml"))
    assert "134 GFLOP/s on 2 threads, 0.41x its one-thread 162 per thread" in warning and "perfsim calibrate" in warning
    for probes in ({1: 157.8, 2: 197.9}, {1: 147.1, 2: 321.5}, {1: 45.0, 2: 90.0}, {1: 162.0, 2: 162.0}, {2: 134.0}, {}):
        assert calibrate.slow_compute_warning(device_from_data(profile(probes), "ok.yaml")) is None  # 0.63, 1.09, 1.0, 0.5, no one-thread probe
    assert calibrate.slow_compute_warning(device_from_data(profile({1: 162.0, 2: 200.0, 4: 250.0}), "4.yaml")).count("on 4 threads") == 1

    monkeypatch.setattr(calibrate, "measure_host", lambda progress=None, decode_points=None: profile({1: 162.0, 2: 134.0}))
    assert main(["calibrate"]) == 0
    assert warning in capsys.readouterr().err
    messages = []
    calibrate.load_host_profile(message=messages.append)
    assert messages == [warning]


def test_a_calibration_in_a_slower_memory_state_than_the_one_before_says_so_each_time_it_is_used(cache, monkeypatch, capsys):
    from perfsim.cli import main

    path, threads = calibrate.host_profile_path(), range(1, calibrate.host_fingerprint()["cores"] + 1)
    path.write_text(yaml.safe_dump(fake_profile(bandwidth_gb_s=11.6)))
    # the read this host's slow memory state gave (7.3 GB/s on one thread against 11.6 before)
    monkeypatch.setattr(calibrate, "measure_host", lambda progress=None, decode_points=None: fake_profile(bandwidth_gb_s=7.3))
    assert main(["calibrate"]) == 0
    device = load_device_file(path)
    assert device.calibration["previous_bandwidth_gb_s_by_threads"] == {t: 11.6 for t in threads}
    assert device.calibration["previous_measured_at"] == "2026-01-01T00:00:00+00:00"
    warning = calibrate.slow_memory_warning(device)
    assert "7.3 GB/s" in warning and "0.63x the previous calibration's 11.6" in warning
    assert warning in capsys.readouterr().err
    messages = []
    calibrate.load_host_profile(message=messages.append)
    assert messages == [warning]

    # faster than the one before, or within SLOW_MEMORY_FRACTION of it: no warning; it keeps the slow one's reads
    for bandwidth_gb_s in (11.0, 0.81 * 11.0):
        monkeypatch.setattr(calibrate, "measure_host", lambda progress=None, decode_points=None: fake_profile(bandwidth_gb_s=bandwidth_gb_s))
        previous = load_device_file(path).unit().bandwidth_gb_s_by_threads
        device = calibrate.calibrate_host()
        assert device.calibration["previous_bandwidth_gb_s_by_threads"] == previous and calibrate.slow_memory_warning(device) is None
    # another machine's profile is no reference, nor is an unreadable one
    for old in (yaml.safe_dump(fake_profile(bandwidth_gb_s=30.0, cpu_model="Some Other CPU")),
                yaml.safe_dump(fake_profile(bandwidth_gb_s=30.0, cpu_id="AuthenticAMD family 25 model 1")), "name: host\nmemory: [\n"):
        path.write_text(old)
        monkeypatch.setattr(calibrate, "measure_host", lambda progress=None, decode_points=None: fake_profile(bandwidth_gb_s=7.3))
        device = calibrate.calibrate_host()
        assert "previous_bandwidth_gb_s_by_threads" not in device.calibration and calibrate.slow_memory_warning(device) is None

    data = fake_profile()
    data["calibration"].update(previous_bandwidth_gb_s_by_threads={1: -3.0}, previous_measured_at="2026-01-01T00:00:00+00:00")
    with pytest.raises(UserError, match="previous_bandwidth_gb_s_by_threads"):
        calibrate.write_profile(data, path)


def test_measured_decode_counts_the_page_faults_taken_inside_each_step(monkeypatch):
    """A step that touches 32 MiB it has not mapped before takes at least 16 faults (2 MiB pages; 8192 of
    4 KiB), and the record says which step it was."""
    import numpy as np

    from perfsim import engine as engine_module

    real_step, calls = engine_module.Session.step, []

    def step(self, token):
        calls.append(token)
        out = real_step(self, token)
        if len(calls) == 3:  # the warm-up, then the second measured step
            np.ones(32 * 2**20 // 8)
        return out

    monkeypatch.setattr(engine_module.Session, "step", step)
    # no step is re-run for stolen time (which would shift the calls): this shared host steals now and then
    monkeypatch.setattr("perfsim.measure.stolen_cpu_s", lambda path="/proc/stat": 0.0)
    measurement = measure_decode(Engine.random(TINY, "q4_0", "f16"), context=32, n_tokens=4, threads=1)
    faults = measurement.step_page_faults
    assert len(faults) == 4 and all(f >= 0 for f in faults)
    assert faults[1] >= 16 and faults[1] > max(faults[:1] + faults[2:])


def test_steal_time_is_read_from_the_lines_of_the_cpus_this_process_may_use(tmp_path):
    from perfsim.measure import stolen_cpu_s

    ticks = os.sysconf("SC_CLK_TCK")
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text(f"cpu  4406418 96437 1036831 5828686 16999 0 6449 {10 * ticks} 0 0\n"
                    f"cpu0 1 2 3 4 5 6 7 {3 * ticks} 0 0\ncpu1 1 2 3 4 5 6 7 {7 * ticks} 0 0\nintr 1 2 3\n")
    assert stolen_cpu_s(str(stat), {0}) == pytest.approx(3.0)
    assert stolen_cpu_s(str(stat), {1}) == pytest.approx(7.0)
    assert stolen_cpu_s(str(stat), {0, 1}) == pytest.approx(10.0)
    assert stolen_cpu_s(str(stat), {4}) == pytest.approx(10.0)  # no line of its own: the all-CPUs line
    stat.write_text("cpu  4406418 96437 1036831 5828686\ncpu0 1 2 3 4\n")  # a kernel without the column
    assert stolen_cpu_s(str(stat), {0}) == 0.0
    assert stolen_cpu_s(str(tmp_path / "missing")) == 0.0


def test_busy_cpu_time_is_read_from_the_lines_of_the_cpus_this_process_may_use(tmp_path):
    from perfsim.measure import busy_cpu_s

    ticks = os.sysconf("SC_CLK_TCK")
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal: idle, iowait and steal are not busy
    stat.write_text(f"cpu  {34 * ticks} {ticks} {2 * ticks} 1999998 1776 {ticks} {ticks} 1554 0 0\n"
                    f"cpu0 {4 * ticks} {ticks} {2 * ticks} 999999 888 {ticks} {ticks} 777 0 0\n"
                    f"cpu1 {30 * ticks} 0 0 999999 888 0 0 777 0 0\n")
    assert busy_cpu_s(str(stat), {0}) == pytest.approx(9.0)  # what runs on cpu1 is not taken from us
    assert busy_cpu_s(str(stat), {0, 1}) == pytest.approx(39.0)
    assert busy_cpu_s(str(tmp_path / "missing")) == 0.0


def test_a_calibration_on_a_busy_host_says_so(cache, monkeypatch, capsys):
    """Other processes' share of the cores while calibration ran is kept in the profile; over 20%, the
    calibration (perfsim calibrate, or one made on demand) prints a warning that names it."""
    from perfsim.cli import main
    from perfsim.device import device_from_data

    def profile(fraction):
        data = fake_profile()
        data["calibration"]["other_load_fraction"] = fraction
        return data

    quiet, busy = device_from_data(profile(0.05), "q.yaml"), device_from_data(profile(0.45), "b.yaml")
    assert quiet.calibration["other_load_fraction"] == 0.05 and calibrate.busy_host_warning(quiet) is None
    assert calibrate.busy_host_warning(device_from_data(fake_profile(), "old.yaml")) is None  # profiles from before: no record
    assert calibrate.busy_host_warning(device_from_data(profile(0.19), "b19.yaml"))  # measured to spoil a calibration's 2-thread roofs
    stolen = fake_profile()
    stolen["calibration"].update(other_load_fraction=0.04, stolen_fraction=0.08)  # other guests count as others
    assert "hypervisor (steal) took 12%" in calibrate.busy_host_warning(device_from_data(stolen, "s.yaml"))
    warning = calibrate.busy_host_warning(busy)
    assert "45%" in warning and f"{busy.calibration['cores']} cores" in warning and "perfsim calibrate" in warning

    monkeypatch.setattr(calibrate, "measure_host", lambda progress=None, decode_points=None: profile(0.45))
    assert main(["calibrate"]) == 0
    assert capsys.readouterr().err.strip().splitlines()[-1] == warning
    messages = []
    calibrate.load_host_profile(message=messages.append)  # the busy profile, saved: used, and said so again
    assert messages == [warning]
    calibrate.host_profile_path().unlink()
    calibrate.load_host_profile(message=messages.append)  # made on demand
    assert len(messages) == 3 and "no host profile" in messages[1] and messages[2] == warning
    monkeypatch.setattr(calibrate, "measure_host", lambda progress=None, decode_points=None: profile(0.05))
    assert main(["calibrate"]) == 0 and "warning" not in capsys.readouterr().err
    calibrate.load_host_profile(message=messages.append)
    assert len(messages) == 3

    with pytest.raises(UserError, match="other_load_fraction"):
        device_from_data(profile(-0.1), "bad.yaml")


def _decode_with_steal(monkeypatch, stolen_during_call):
    """measure_decode of TINY (4 tokens) with /proc/stat's steal faked: Session.step call number k (the
    warm-up is 1) advances it by stolen_during_call(k) seconds. Returns the measurement and the tokens
    each call decoded at each position."""
    from perfsim import engine as engine_module
    from perfsim import measure

    monkeypatch.undo()  # a second call wraps the real step, not the first call's wrapper
    real_step, calls, stolen = engine_module.Session.step, [], [10.0]

    def step(self, token):
        position = self.position
        out = real_step(self, token)
        calls.append((position, token, self.next_token))
        stolen[0] += stolen_during_call(len(calls))
        return out

    monkeypatch.setattr(engine_module.Session, "step", step)
    monkeypatch.setattr(measure, "stolen_cpu_s", lambda: stolen[0])
    return measure_decode(Engine.random(TINY, "q4_0", "f16"), context=32, n_tokens=4, threads=1), calls


def test_a_step_the_hypervisor_stole_time_from_is_run_again_at_the_same_position(monkeypatch):
    undisturbed, clean_calls = _decode_with_steal(monkeypatch, lambda call: 0.0)
    measurement, calls = _decode_with_steal(monkeypatch, lambda call: 0.25 if call == 4 else 0.0)
    # the warm-up, two steps, the third twice (same position, same token, same result), the fourth
    assert len(calls) == 6 and calls[3] == calls[4] and [c[0] for c in calls[1:]] == [28, 29, 30, 30, 31]
    assert calls[:4] + calls[5:] == clean_calls
    assert measurement.contexts == undisturbed.contexts == (29, 30, 31, 32)
    assert len(measurement.step_seconds) == 4 and len(measurement.set_aside_step_seconds) == 1
    assert measurement.step_steal_s == (0.0, 0.0, 0.0, 0.0) and measurement.stolen_fraction == 0.0
    record = measurement_record(measurement)
    assert record["step_steal_s"] == [0.0] * 4 and len(record["set_aside_step_seconds"]) == 1


def test_a_step_disturbed_every_time_is_kept_after_its_retries_with_what_was_stolen(monkeypatch):
    from perfsim.measure import STEAL_RETRIES

    measurement, calls = _decode_with_steal(monkeypatch, lambda call: 0.0 if call == 1 else 0.125)
    assert len(calls) == 1 + 4 * (1 + STEAL_RETRIES)
    assert measurement.step_steal_s == pytest.approx((0.125,) * 4)
    assert len(measurement.set_aside_step_seconds) == 4 * STEAL_RETRIES
    assert measurement.stolen_fraction == pytest.approx(0.5 / sum(measurement.step_seconds))
    assert measurement_record(measurement)["stolen_fraction"] == pytest.approx(measurement.stolen_fraction)


def test_a_step_whose_passes_the_hypervisor_stole_from_is_run_again_passes_included(monkeypatch):
    """Steal during the probes and passes before the first measured step (not during the step): that step,
    passes included, is run again; what the step itself had stolen stays 0."""
    from perfsim import measure

    real_before, stolen, calls = measure.host_before_step, [10.0], []

    def host_before_step(threads, session):
        calls.append(session.position)
        out = real_before(threads, session)
        if len(calls) == 1:
            stolen[0] += 0.02
        return out

    monkeypatch.setattr(measure, "host_before_step", host_before_step)
    monkeypatch.setattr(measure, "stolen_cpu_s", lambda: stolen[0])
    m = measure_decode(Engine.random(TINY, "q4_0", "f16"), context=32, n_tokens=4, threads=1)
    assert calls == [28, 28, 29, 30, 31]
    assert len(m.set_aside_step_seconds) == 1 and m.step_steal_s == (0.0,) * 4 and len(m.step_stream_gb_s) == 4


def test_sweep_writes_one_record_a_point_and_the_table(cache, tmp_path, monkeypatch):
    from perfsim.gguf_io import Phi3Arch, write_random_phi3_gguf

    gguf = tmp_path / "tiny.gguf"
    write_random_phi3_gguf(gguf, Phi3Arch(n_layer=2, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, n_vocab=320, n_ctx=128), "q4_0", seed=0)
    # a calibration at 1000 GB/s: every point's weights' pass reads far below it, and each says so
    calibrate.host_profile_path().write_text(yaml.safe_dump(fake_profile(bandwidth_gb_s=1000.0)))
    output = tmp_path / "sweep.jsonl"
    command = [sys.executable, "-m", "perfsim", "sweep", "--gguf", str(gguf), "--threads", "1", "--tokens", "2", "--output", str(output),
               "--memory-state-retries", "0"]
    result = subprocess.run(command + ["--contexts", "16,32"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [(r["threads"], r["context"]) for r in records] == [(1, 16), (1, 32)]
    for r in records:
        # the interquartile means (of 2 steps: their mean) of the measured steps and of their predictions
        assert r["predicted_tokens_per_s"] == pytest.approx(1 / statistics.fmean(r["predicted_step_seconds"]))
        assert r["measured_tokens_per_s"] == pytest.approx(1 / statistics.fmean(r["step_seconds"]))
        assert r["error"] == pytest.approx((r["predicted_tokens_per_s"] - r["measured_tokens_per_s"]) / r["measured_tokens_per_s"])
        assert set(r["groups"]) == set(r["step_groups"]) == {"gemv", "attention", "rest"}
        for name, g in r["groups"].items():
            steps = r["step_groups"][name]
            assert g["predicted_s"] == pytest.approx(statistics.fmean(steps["predicted_s"]))
            assert g["measured_s"] == pytest.approx(statistics.fmean(steps["measured_s"]))
            assert g["error"] == pytest.approx((g["predicted_s"] - g["measured_s"]) / g["measured_s"])
        assert len(r["step_seconds"]) == len(r["step_stream_gb_s"]) == len(r["step_steal_s"]) == len(r["step_compute_gflops"]) == 2
        assert r["compute_gflops"] == pytest.approx(statistics.median(r["step_compute_gflops"])) and r["compute_gflops"] > 0
        assert r["stolen_fraction"] == pytest.approx(sum(r["step_steal_s"]) / sum(r["step_seconds"]))
        assert r["memory_state_ratio"] == pytest.approx(statistics.median(r["step_stream_gb_s"]) / 1000.0)
    warnings = [line for line in result.stderr.splitlines() if "the calibration's bandwidth at 1 thread(s)" in line]
    assert [w.split(":")[0] for w in warnings] == ["at context 16", "at context 32"] and "slower state during this run" in warnings[0]
    rows = [line.split() for line in result.stdout.splitlines() if line.split()[:1] == ["1"]]
    assert "re-run" in result.stdout and [row[1] for row in rows] == ["16", "32"]
    assert [int(row[8]) for row in rows] == [len(r["set_aside_step_seconds"]) for r in records]
    assert rows[1][4] == f"{100 * records[1]['error']:+.1f}%"
    # the memory-state ratio of each point, and one try each: --memory-state-retries 0 measures no point again
    assert [row[10] for row in rows] == [f"{r['memory_state_ratio']:.2f}x" for r in records] and [row[11] for row in rows] == ["1", "1"]
    assert all(r["set_aside_memory_state_ratios"] == [] for r in records) and "measuring again" not in result.stderr
    # by default such a point is measured again (here, in process and without the pause, once more)
    import perfsim.compare
    from perfsim.sweep import plan_sweep, run_sweep

    monkeypatch.setattr(perfsim.compare, "MEMORY_STATE_PAUSE_S", 0.0)
    plan = plan_sweep(dict(gguf_path=str(gguf), model_name=None, weights=None, kv_cache="f16"), [16], [1], 2)
    said = []
    (record,) = run_sweep(calibrate.load_host_profile(), plan, [16], [1], 2, memory_state_remeasures=1, say=said.append)
    assert len(record["set_aside_memory_state_ratios"]) == 1 and record["set_aside_memory_state_ratios"][0] < 0.8
    assert len(said) == 1 and "measuring again in 0 s (attempt 2 of 2)" in said[0]

    output.unlink()
    bad = subprocess.run(command + ["--contexts", "16,x"], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and bad.stdout == "" and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "--contexts" in bad.stderr and not output.exists()


def test_a_measurement_reports_the_interquartile_mean_of_its_steps():
    """The mean of the middle half: of 1..16 s, the mean of 5..12 s; a step 100x the others or a
    bimodal half does not move it beyond the middle half's range; under 4 steps, the plain mean."""
    from perfsim.measure import Measurement, interquartile_mean

    assert interquartile_mean(range(16, 0, -1)) == 8.5
    assert interquartile_mean([1.0, 2.0, 6.0]) == 3.0
    assert interquartile_mean([7.0]) == 7.0
    steps = (0.1,) * 7 + (0.14,) * 8 + (10.0,)  # 7 fast steps, 8 in the slow mode, one disturbed
    ops = {"attn_qkv": tuple(s / 2 for s in steps)}
    m = Measurement(model=TINY, formats=Engine.random(TINY, "q4_0", "f16").formats, threads=1, contexts=tuple(range(1, 17)),
                    step_seconds=steps, op_seconds=ops, load_s=0.0, warmup_s=0.0, peak_rss_bytes=0, weights_origin="test")
    assert m.ms_per_token == pytest.approx(1e3 * (3 * 0.1 + 5 * 0.14) / 8)
    assert m.decode_tokens_per_s == pytest.approx(8 / (3 * 0.1 + 5 * 0.14))
    assert m.op_time_s("attn_qkv") == pytest.approx((3 * 0.1 + 5 * 0.14) / 16)
    assert measurement_record(m)["ms_per_token"] == pytest.approx(m.ms_per_token)


def test_a_sessions_streamed_weights_are_the_bytes_the_workload_says_its_gemvs_read():
    """Independent of the engine's layout: perfsim.workload's byte formulas for the GEMVs' weights."""
    from perfsim.workload import decode_ops

    for weights in ("q4_0", "q8_0", "f16"):
        engine = Engine.random(TINY, weights, "f16")
        regions = engine.session(64).streamed_weights()
        assert all(r.flags.c_contiguous for r in regions)
        expected = sum(op.count * op.cost.weight_bytes for op in decode_ops(TINY, engine.formats, 41) if op.kind == "gemv")
        assert sum(r.nbytes for r in regions) == expected, weights
        first, head = engine.weights.layers[0].attn_qkv, engine.weights.lm_head
        assert np.shares_memory(regions[0], getattr(first, "qs", first)) and np.shares_memory(regions[-1], getattr(head, "d", head))


def test_a_sessions_streaming_pass_reads_its_own_memory_but_not_the_end_of_the_last_step(monkeypatch):
    from perfsim import measure

    session = Engine.random(TINY, "q4_0", "f16").session(64)
    session.fill_cache(40)
    assert measure._session_sample(session) is None  # 0.4 MB: the caches would hold it; the pass reads its buffer
    assert measure.read_pass_gb_s(1, session) > 0
    monkeypatch.setattr(measure, "SAME_RUN_STREAM_BYTES", 2**16)
    monkeypatch.setattr(measure, "SAMPLE_CHUNK_BYTES", 2**12)
    monkeypatch.setattr(measure, "SAMPLE_SKIPS_LAST_BYTES", 2**15)
    assert measure._session_sample(session) is None  # made once per session: its weights do not move
    session = session.engine.session(64)
    chunks = measure._session_sample(session)
    assert measure._session_sample(session) is chunks
    assert sum(c.nbytes for c in chunks) > 0.9 * 2**16
    weights = session.weights
    layer_arrays = [a for layer in weights.layers for m in (layer.attn_qkv, layer.attn_output, layer.ffn_gate_up, layer.ffn_down)
                    for a in (m.qs, m.d)]
    assert all(any(np.shares_memory(c, a) for a in layer_arrays) for c in chunks)
    assert not any(np.shares_memory(c, a) for c in chunks for a in (weights.lm_head.qs, weights.lm_head.d))  # the skipped tail
    assert measure.read_pass_gb_s(2, session) > 0


def test_comparison_errors_are_signed_relative_to_the_measurement():
    from perfsim.device import device_from_data

    device = device_from_data(fake_profile(), "fake.yaml")
    engine = Engine.random(TINY, "q4_0", "f16")
    measurement = measure_decode(engine, context=32, n_tokens=4, threads=1)
    # each step follows its own streaming pass
    assert len(measurement.step_stream_gb_s) == 4 and all(bw > 0 for bw in measurement.step_stream_gb_s)
    assert measurement.stream_gb_s == statistics.median(measurement.step_stream_gb_s)
    assert len(measurement.step_cold_call_us) == 4 and measurement.cold_call_us == statistics.median(measurement.step_cold_call_us) > 0
    # Two host states 16x apart, alternating: each step is predicted at its own context and memory roof
    measurement = dataclasses.replace(measurement, step_stream_gb_s=(2.5, 40.0, 2.5, 40.0))
    c = compare(device, measurement)
    assert [p.context for p in c.predictions] == [29, 30, 31, 32]
    assert [p.roofs.bandwidth_bytes_per_s for p in c.predictions] == pytest.approx([2.5e9, 40e9, 2.5e9, 40e9])
    predicted_s = [p.decode_s for p in c.predictions]
    assert predicted_s[0] > 2 * predicted_s[1]  # at 2.5 GB/s this tiny model's decode is mostly its weights' bytes

    # Every step 1.25x its own prediction: +25% tokens/s (the model promised more speed), -20% of time in every group
    op_seconds = {name: tuple(1.25 * t.time_s for p in c.predictions for t in p.ops if t.op.name == name) for name in measurement.op_seconds}
    each_slower = dataclasses.replace(measurement, step_seconds=tuple(1.25 * s for s in predicted_s), op_seconds=op_seconds)
    c = compare(device, each_slower)
    assert c.tokens_per_s_error == pytest.approx(0.25)
    assert all(g["error"] == pytest.approx(-0.2) for g in coarse_groups(c).values())
    assert all(row["error"] == pytest.approx(-0.2) for row in c.group_rows() + c.op_rows())
    assert c.predicted_tokens_per_s == pytest.approx(1 / statistics.fmean(sorted(predicted_s)[1:3]))

    # The same step times with the host states swapped: a slow step now had the fast memory. Predicted
    # and measured steps are each summarized by their interquartile mean, then compared.
    swapped = dataclasses.replace(each_slower, step_stream_gb_s=(40.0, 2.5, 40.0, 2.5))
    c = compare(device, swapped)
    swapped_s = [p.decode_s for p in c.predictions]
    assert swapped_s[0] < swapped_s[1] and c.predicted_tokens_per_s == pytest.approx(1 / statistics.fmean(sorted(swapped_s)[1:3]))
    expected = c.predicted_tokens_per_s / swapped.decode_tokens_per_s - 1
    assert c.tokens_per_s_error == pytest.approx(expected) == pytest.approx(0.25, abs=0.005)  # the contexts differ by a position

    # a slower measurement makes the (same) prediction look more optimistic
    slower = dataclasses.replace(swapped, step_seconds=tuple(2 * s for s in swapped.step_seconds))
    assert compare(device, slower).tokens_per_s_error == pytest.approx(2 * (1 + expected) - 1)
    record = json.loads(json.dumps(comparison_record(c)))
    assert {"predicted", "measured", "error"} <= set(record)
    assert record["error"]["decode_tokens_per_s"] == pytest.approx(expected)
    assert record["predicted"]["step_seconds"] == pytest.approx(swapped_s)
    from perfsim.report import format_comparison

    text = format_comparison(c)
    tokens_line = next(line for line in text.splitlines() if line.startswith("tokens/s"))
    assert tokens_line.split() == ["tokens/s", f"{c.predicted_tokens_per_s:.2f}", f"{swapped.decode_tokens_per_s:.2f}", f"{100 * expected:+.1f}%"]
    middle = sorted(swapped_s)[1:3]  # of 4 steps, the middle 2
    assert f"predicted {1e3 * middle[0]:.2f}-{1e3 * middle[1]:.2f} ms" in text and "2.5-40.0 GB/s" in text
    # the host as each step's passes and probes found it, beside the calibration's probe when the profile has one
    probed = dataclasses.replace(swapped, step_kv_stream_gb_s=(4.0, 5.5, 4.5, 4.0), step_compute_gflops=(66.0, 110.0, 90.0, 100.0))
    assert "weights read 2.5-40.0 GB/s, K/V read 4.0-5.5 GB/s, compute probe 66-110 GFLOP/s\n" in format_comparison(compare(device, probed))
    data = fake_profile()
    data["units"]["cpu"]["compute_probe_gflops_by_threads"] = {1: 105.0}
    text = format_comparison(compare(device_from_data(data, "fake.yaml"), probed))
    assert "compute probe 66-110 GFLOP/s (calibration: 105; GEMV and attention compute roofs scaled by the ratio)" in text
    assert {op["name"] for op in record["error"]["ops"]} == {op["name"] for op in record["measured"]["ops"]}


def test_a_run_whose_memory_state_differs_from_its_calibrations_says_so():
    """The run's weights' passes over the profile's read bandwidth at its thread count: outside 0.8-1.25 the
    text says which of the two found the host slower, and the record carries the ratio."""
    from perfsim.compare import memory_state_ratio
    from perfsim.device import device_from_data
    from perfsim.report import format_comparison

    device = device_from_data(fake_profile(bandwidth_gb_s=20.0), "fake.yaml")
    measurement = measure_decode(Engine.random(TINY, "q4_0", "f16"), context=32, n_tokens=4, threads=1)
    texts = {}
    for passes, ratio in (((29.0, 30.0, 30.0, 31.0), 1.5), ((19.0, 21.0, 20.0, 20.5), 1.0125), ((12.0, 11.0, 12.0, 30.0), 0.6)):
        c = compare(device, dataclasses.replace(measurement, step_stream_gb_s=passes))
        assert c.memory_state_ratio == pytest.approx(ratio) == memory_state_ratio(device, c.measurement)
        assert json.loads(json.dumps(comparison_record(c)))["host_profile"]["memory_state_ratio"] == pytest.approx(ratio)
        texts[ratio] = format_comparison(c)
    assert "warning: this run's weights read 1.50x the calibration's bandwidth at 1 thread(s): the calibration ran in a slower state" in texts[1.5]
    assert "warning: this run's weights read 0.60x the calibration's bandwidth at 1 thread(s): the host's memory was in a slower state" in texts[0.6]
    assert "warning" not in texts[1.0125]
    # a profile without the thread count's bandwidth: no ratio, no warning
    data = fake_profile(bandwidth_gb_s=20.0)
    data["units"]["cpu"]["bandwidth_gb_s_by_threads"] = {2: 20.0}
    data["units"]["cpu"]["single_thread_bandwidth_gb_s"] = 10.0
    c = compare(device_from_data(data, "fake.yaml"), dataclasses.replace(measurement, step_stream_gb_s=(28.0, 29.0, 30.0, 31.0)))
    assert c.memory_state_ratio == 0.0 and "warning" not in format_comparison(c)


def test_a_run_in_another_memory_state_is_measured_again_and_the_closest_attempt_kept(monkeypatch):
    """measured_in_calibrated_state: again while the ratio is outside MEMORY_STATE_RANGE, up to `remeasures` more
    times; the attempt closest to the calibration's state (by the ratio's logarithm) is kept, with the others' ratios."""
    from perfsim.compare import measured_in_calibrated_state
    from perfsim.device import device_from_data
    from perfsim.report import format_comparison

    device = device_from_data(fake_profile(bandwidth_gb_s=20.0), "fake.yaml")
    measurement = measure_decode(Engine.random(TINY, "q4_0", "f16"), context=32, n_tokens=4, threads=1)

    def attempts(*ratios):
        runs = iter([dataclasses.replace(measurement, step_stream_gb_s=(20.0 * r,) * 4) for r in ratios])
        return lambda: next(runs)

    said = []
    kept = measured_in_calibrated_state(device, attempts(1.5, 1.4, 1.1, 1.0), 3, pause_s=0.0, say=said.append)
    assert kept.step_stream_gb_s == (22.0,) * 4 and kept.set_aside_memory_state_ratios == pytest.approx((1.5, 1.4))
    assert len(said) == 2 and "read 1.50x the calibration's bandwidth at 1 thread(s)" in said[0] and "attempt 2 of 4" in said[0]
    # none in range: the budget spent, the closest by log ratio (0.7: |ln| 0.357) beats 1.45 (0.372)
    kept = measured_in_calibrated_state(device, attempts(1.5, 0.7, 1.45), 2, pause_s=0.0)
    assert kept.step_stream_gb_s == (14.0,) * 4 and kept.set_aside_memory_state_ratios == pytest.approx((1.5, 1.45))
    text = format_comparison(compare(device, kept))
    assert "measured 3 times: the other runs' weights read 1.50x, 1.45x the calibration's bandwidth" in text
    assert measured_in_calibrated_state(device, attempts(1.5, 1.0), 0).set_aside_memory_state_ratios == ()  # never again
    # in range at once: measured once, nothing set aside, nothing said
    said.clear()
    assert measured_in_calibrated_state(device, attempts(1.2, 5.0), 2, say=said.append).set_aside_memory_state_ratios == ()
    assert said == [] and "measured" not in format_comparison(compare(device, measurement)).split("\n")[-1]


def test_the_kv_bytes_of_a_run_stream_at_its_kv_pass_and_the_rest_at_its_streaming_pass():
    """with_same_run_host and the roofline: attention's K/V bytes at the K/V pass's rate, its other bytes
    (the query, the output) and every other op's at the streaming pass's; no K/V pass, one rate for all."""
    from perfsim.compare import with_same_run_host
    from perfsim.device import device_from_data
    from perfsim.roofline import op_times, unit_roofs
    from perfsim.workload import decode_ops

    device = device_from_data(fake_profile(), "fake.yaml")
    formats = Engine.random(TINY, "q4_0", "f16").formats
    ops = decode_ops(TINY, formats, 100)
    one_rate = with_same_run_host(device, 1, stream_gb_s=10.0)
    two_rates = with_same_run_host(one_rate, 1, stream_gb_s=10.0, kv_stream_gb_s=4.0)
    assert one_rate.unit().kv_bandwidth_gb_s_by_threads == {} and two_rates.unit().kv_bandwidth_gb_s_by_threads == {1: 4.0}
    assert with_same_run_host(two_rates, 1, stream_gb_s=10.0).unit().kv_bandwidth_gb_s_by_threads == {}  # a run without: none kept
    same = {t.op.name: t for t in op_times(ops, unit_roofs(one_rate, one_rate.unit(), 1))}
    split = {t.op.name: t for t in op_times(ops, unit_roofs(two_rates, two_rates.unit(), 1))}
    for op in ops:
        assert same[op.name].memory_s == pytest.approx(op.bytes / 10e9 * (same[op.name].memory_s * 10e9 / op.bytes))
        expected = same[op.name].memory_s * ((op.bytes - op.kv_bytes) / 10e9 + op.kv_bytes / 4e9) / (op.bytes / 10e9)
        assert split[op.name].memory_s == pytest.approx(expected), op.name
    attention = next(op for op in ops if op.kind == "attention")
    assert attention.kv_bytes > 0.9 * attention.bytes and split["attention"].memory_s > 2 * same["attention"].memory_s
    assert split["attn_qkv"].memory_s == same["attn_qkv"].memory_s  # weights only

    # compare: each step at its own K/V pass
    measurement = measure_decode(Engine.random(TINY, "q4_0", "f16"), context=32, n_tokens=2, threads=1)
    assert measurement.step_kv_stream_gb_s == (0.0, 0.0)  # a tiny cache: no K/V pass
    measurement = dataclasses.replace(measurement, step_stream_gb_s=(10.0, 10.0), step_kv_stream_gb_s=(4.0, 0.0))
    c = compare(device, measurement)
    attention_s = [next(t.memory_s for t in p.ops if t.op.kind == "attention") for p in c.predictions]
    assert attention_s[0] > 2 * attention_s[1]


def test_a_sessions_kv_pass_reads_its_cache_but_not_its_last_layer(monkeypatch):
    from perfsim import measure

    session = Engine.random(TINY, "q4_0", "q8_0").session(64)
    assert measure._session_kv_sample(session) is None and measure.read_kv_pass_gb_s(1, session) == 0.0  # 100 KB
    monkeypatch.setattr(measure, "KV_SAMPLE_MIN_BYTES", 2**12)  # the first layer holds 17 KB
    monkeypatch.setattr(measure, "SAME_RUN_STREAM_BYTES", 2**12)
    monkeypatch.setattr(measure, "SAMPLE_CHUNK_BYTES", 2**9)
    session = session.engine.session(64)
    chunks = measure._session_kv_sample(session)
    assert len(chunks) == 8
    last_layer = [a[-1] for a in session.cache.arrays]
    assert all(any(np.shares_memory(c, a) for a in session.cache.arrays) for c in chunks)
    assert not any(np.shares_memory(c, a) for c in chunks for a in last_layer)
    assert any(np.shares_memory(c, session.cache.k) for c in chunks) and any(np.shares_memory(c, session.cache.v) for c in chunks)
    assert measure.read_kv_pass_gb_s(2, session) > 0
    monkeypatch.setattr(measure, "SAME_RUN_STREAM_BYTES", 2**20)  # more than the cache holds: all of it, once
    session = session.engine.session(64)
    chunks = measure._session_kv_sample(session)
    first_layers = sum(a[:-1].nbytes for a in session.cache.arrays)
    assert first_layers - 64 <= sum(c.nbytes for c in chunks) <= first_layers
    assert len({c.ctypes.data for c in chunks}) == len(chunks)


def test_a_decode_shaped_points_memory_time_takes_its_kv_bytes_at_its_kv_pass():
    from perfsim.cost import Cost

    cost = Cost(flops=1e6, weight_bytes=0, kv_bytes=8_000_000, act_bytes=2_000_000)
    point = calibrate.DecodeShapedPoint(1e-3, cost, 8_000_000, stream_gb_s=10.0)
    assert point.roofs_s(10.0) == pytest.approx((1e-4, 1e-3))
    point = dataclasses.replace(point, kv_stream_gb_s=4.0)
    assert point.roofs_s(10.0) == pytest.approx((1e-4, 2e6 / 10e9 + 8e6 / 4e9))


def test_the_fixed_costs_scale_with_the_cold_call_probe_of_the_run():
    """with_same_run_host: a run whose cold-call probe took 1.5x the calibration's gets every fixed cost at
    its thread count 1.5x (kernel overheads, their per-MB and per-K/V-head terms, the default per op), nothing else."""
    from perfsim.compare import with_same_run_host
    from perfsim.device import device_from_data

    data = fake_profile()
    unit = data["units"]["cpu"]
    unit["kernel_roofs"]["rmsnorm"] = {t: {"gflops": 5.0, "overlap": 0.0, "overhead_us": 6.0, "overhead_us_per_kv_mb": 0.04,
                                         "overhead_us_per_operand_mb": 100.0, "overhead_us_per_layer_mb": 0.02}
                                     for t in unit["kernel_roofs"]["gemv.q4_0"]}
    unit["kernel_roofs"]["attention.f16"] = {1: {"gflops": 20.0, "overlap": 0.0, "overhead_us": 10.0, "overhead_us_per_kv_head": 2.0}}
    unit["cold_call_us_by_threads"] = {1: 20.0}
    device = device_from_data(data, "fake.yaml")
    run = with_same_run_host(device, 1, stream_gb_s=11.0, cold_call_us=30.0).unit()
    assert run.kernel_roofs["attention.f16"][1].overhead_us_per_kv_head == pytest.approx(3.0)
    assert run.bandwidth_gb_s_by_threads[1] == 11.0 and run.overhead_us_per_op == pytest.approx(1.5)
    assert run.kernel_roofs["rmsnorm"][1].overhead_us == pytest.approx(9.0)
    assert run.kernel_roofs["rmsnorm"][1].overhead_us_per_kv_mb == pytest.approx(0.06)
    assert run.kernel_roofs["rmsnorm"][1].overhead_us_per_operand_mb == pytest.approx(150.0)
    assert run.kernel_roofs["rmsnorm"][1].overhead_us_per_layer_mb == pytest.approx(0.03)
    assert run.kernel_roofs["gemv.q4_0"][1].overhead_us == pytest.approx(6.0)
    assert run.kernel_roofs["gemv.q4_0"][1].gflops == 50.0 and run.kernel_roofs["gemv.q4_0"][1].overlap == 0.5
    for t in set(run.kernel_roofs["gemv.q4_0"]) - {1}:  # other thread counts are not this run's
        assert run.kernel_roofs["gemv.q4_0"][t].overhead_us == 4.0
    # no probe in the profile (or none in the run): only the memory roof is the run's
    del data["units"]["cpu"]["cold_call_us_by_threads"]
    plain = with_same_run_host(device_from_data(data, "fake.yaml"), 1, stream_gb_s=11.0, cold_call_us=30.0).unit()
    assert plain.overhead_us_per_op == 1.0 and plain.kernel_roofs["rmsnorm"][1].overhead_us == 6.0
    assert with_same_run_host(device, 1, 11.0).unit().kernel_roofs["rmsnorm"][1].overhead_us == 6.0


def test_the_parallel_kernels_compute_roofs_scale_with_each_steps_compute_probe():
    """with_same_run_host: a step whose compute probe read 0.6x the calibration's (this host's slow state on
    two threads: ~66 GFLOP/s against ~110) gets the compute roof of every GEMV at its thread count 0.6x, of
    multi-head attention sqrt(0.6)x and of grouped-query attention 0.6^0.2 x (their elasticities,
    perfsim.device.probe_elasticity: attention.q8_0.gqa takes the grouped-query one too); their fixed costs
    and overlaps, the serial kernels and the other thread counts stay. compare predicts each step with its
    own probe."""
    from perfsim.compare import with_same_run_host
    from perfsim.device import device_from_data

    data = fake_profile()
    unit = data["units"]["cpu"]
    threads = list(unit["kernel_roofs"]["gemv.q4_0"])
    unit["kernel_roofs"]["attention.f16"] = {t: {"gflops": 30.0, "overlap": 0.4, "overhead_us": 60.0} for t in threads}
    for gqa in ("attention.f16.gqa", "attention.q8_0.gqa"):
        unit["kernel_roofs"][gqa] = {t: {"gflops": 40.0, "overlap": 0.0, "overhead_us": 50.0} for t in threads}
    unit["kernel_roofs"]["rmsnorm"] = {t: {"gflops": 5.0, "overlap": 0.0, "overhead_us": 6.0} for t in threads}
    unit["compute_probe_gflops_by_threads"] = {1: 110.0}
    device = device_from_data(data, "fake.yaml")
    assert device.unit().compute_probe_gflops_by_threads == {1: 110.0}
    run = with_same_run_host(device, 1, stream_gb_s=11.0, compute_gflops=66.0).unit()
    assert run.kernel_roofs["gemv.q4_0"][1].gflops == pytest.approx(30.0)
    assert run.kernel_roofs["attention.f16"][1].gflops == pytest.approx(30.0 * 0.6 ** 0.5)
    assert run.kernel_roofs["attention.f16.gqa"][1].gflops == run.kernel_roofs["attention.q8_0.gqa"][1].gflops == pytest.approx(40.0 * 0.6 ** 0.2)
    assert run.kernel_roofs["gemv.q4_0"][1].overlap == 0.5 and run.kernel_roofs["attention.f16"][1].overhead_us == 60.0
    assert run.kernel_roofs["rmsnorm"][1].gflops == 5.0
    for t in set(threads) - {1}:
        assert run.kernel_roofs["gemv.q4_0"][t].gflops == 50.0 and run.kernel_roofs["attention.f16"][t].gflops == 30.0
    assert with_same_run_host(device, 1, stream_gb_s=11.0).unit().kernel_roofs["gemv.q4_0"][1].gflops == 50.0  # no probe in the run
    del unit["compute_probe_gflops_by_threads"]  # none in the profile
    plain = with_same_run_host(device_from_data(data, "fake.yaml"), 1, stream_gb_s=11.0, compute_gflops=66.0).unit()
    assert plain.kernel_roofs["gemv.q4_0"][1].gflops == 50.0

    # measured decode probes before every step; compare predicts each step with its own probe: a GEMV at
    # 0.6x its roof takes 1/0.6 the compute time
    measurement = measure_decode(Engine.random(TINY, "q4_0", "f16"), context=32, n_tokens=2, threads=1)
    assert len(measurement.step_compute_gflops) == 2 and all(g > 0 for g in measurement.step_compute_gflops)
    assert measurement_record(measurement)["step_compute_gflops"] == list(measurement.step_compute_gflops)
    steps = dataclasses.replace(measurement, step_compute_gflops=(66.0, 110.0))
    slow_gemv, fast_gemv = ([t for t in p.ops if t.op.kind == "gemv"] for p in compare(device, steps).predictions)
    assert [a.compute_s / b.compute_s for a, b in zip(slow_gemv, fast_gemv)] == pytest.approx([110 / 66] * len(slow_gemv))


@pytest.mark.slow
def test_real_calibration_writes_a_valid_profile(tmp_path):
    """How long calibration takes is measured where it is printed (`perfsim calibrate`: 48-56 s in the rounds on
    the development host), not asserted here: in a fresh clone it includes Numba's first compilation of most
    kernels, on a box CI shares (94 s once, in a disturbed hour)."""
    path = tmp_path / "host.yaml"
    result = subprocess.run(PERFSIM + ["calibrate", "--output", str(path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    device = load_device_file(path)
    unit = device.unit()
    assert set(unit.bandwidth_gb_s_by_threads) == set(range(1, unit.cores + 1))
    assert all(1 < bw < 1000 for bw in unit.bandwidth_gb_s_by_threads.values())
    for kernel in ("gemv.q4_0", "gemv.f16", "attention.f16", "rmsnorm", "kv_append.f16", "embedding.q4_0"):
        assert set(unit.kernel_roofs[kernel]) == set(unit.bandwidth_gb_s_by_threads)
    assert set(unit.cold_call_us_by_threads) == set(unit.bandwidth_gb_s_by_threads)
    # multi-head attention's head_dim factors: measured on one thread, the same at every thread count
    factors = [roof.time_factor_by_head_dim for roof in unit.kernel_roofs["attention.f16"].values()]
    assert set(factors[0]) == {64, 80, 96} and all(f == factors[0] for f in factors)
    assert device.calibration["cpu_model"] == calibrate.cpu_model() and device.calibration["seconds"] > 0
    assert 0 <= device.calibration["other_load_fraction"] <= 1
    # the decode points the serial kernels' fixed costs were fitted on are kept beside it: refitted from them, at the
    # profile's compute roofs and cold-call probes, they give the profile's roofs (to its four digits)
    assert "decode points" in result.stdout and calibrate.decode_points_path(path).exists()
    points = calibrate.load_decode_points(path, device)
    assert set(points) == set(unit.bandwidth_gb_s_by_threads)
    for kernel in ("rmsnorm", "rope", "kv_append.f16", "silu_mul", "residual_add"):
        for threads, roof in unit.kernel_roofs[kernel].items():
            refit = calibrate._roof_from_decode(roof.gflops, points[threads][kernel], False, unit.cold_call_us_by_threads[threads])
            for field in ("overhead_us", "overhead_us_per_kv_mb", "overhead_us_per_operand_mb", "overhead_us_per_layer_mb"):
                assert refit[field] == pytest.approx(getattr(roof, field), rel=0.01, abs=1e-3), (kernel, threads, field)


def test_serial_kernels_in_cache_runs_follow_a_producer_that_writes_their_input():
    """Calibration times rope's in-cache runs after a parallel stream that rewrites rope's input (as the
    qkv GEMV does in decode), and rmsnorm's after its decode predecessor, the residual add that writes its x."""
    from perfsim.kernels.jit import set_threads

    benches = {b.kernel: b for b in calibrate._serial_benches()}
    assert all(b.tiny is None for b in benches.values())  # their fixed costs come from decode (next tests)
    producer = calibrate.Producer()
    set_threads(1)
    rope = benches["rope"].in_cache_quarter
    original = rope.produced.copy()
    before_rope = producer.before(rope, 1)
    rope.run()  # rotates its input in place
    assert not np.array_equal(rope.produced, original)
    before_rope()  # restores it, as a GEMV rewrites q and k before every RoPE
    np.testing.assert_array_equal(rope.produced, original)
    norm = benches["rmsnorm"].in_cache_quarter
    calls = []
    norm_with_spy = calibrate.Call(norm.run, norm.produced, lambda: calls.append(1))
    producer.before(norm_with_spy, 1)()
    assert calls == [1]
    assert benches["kv_append.f16"].in_cache.predecessor is not None and benches["silu_mul"].in_cache.predecessor is None


def _serial_roof(bench, times, points, cold_call_us=0.0):
    """A serial kernel's roof at one thread count, by the path measure_host takes: its in-cache roof from
    the timed calls `times`, then _serial_roofs over its decode points."""
    gflops = {1: {bench.kernel: calibrate._compute_roof_gflops(bench, times)}}
    return calibrate._serial_roofs(gflops, {1: {bench.kernel: points}}, {1: cold_call_us})[bench.kernel][1]


def test_a_serial_kernels_fixed_cost_is_its_decode_call_beyond_the_roof_as_a_line_in_k_v_bytes():
    """Hand arithmetic: in-cache calls of 7 us (work W) and 4 us (W/4) make the compute roof 0.75 W / 3 us;
    decode calls of 12 us when a layer's attention reads 1 MB of K/V and 16 us at 41 MB make 0.1 us per MB; the fixed cost
    is 12 us - the call's roof - 0.1 us."""
    from perfsim.cost import Cost

    work_flops = 3e5
    in_cache, quarter = calibrate.Call(lambda: None), calibrate.Call(lambda: None)
    bench = calibrate.KernelBench("rmsnorm", False, None, in_cache, work_flops, quarter)
    times = {id(in_cache): 7e-6, id(quarter): 4e-6}
    call_cost = Cost(flops=20_000, act_bytes=36_000)
    points = [calibrate.DecodeShapedPoint(16e-6, call_cost, 41_000_000, 18.0), calibrate.DecodeShapedPoint(12e-6, call_cost, 1_000_000, 18.0)]
    roof = _serial_roof(bench, times, points)  # memory at the points' own 18 GB/s
    flops_per_s = 0.75 * work_flops / 3e-6
    assert roof["gflops"] == pytest.approx(flops_per_s / 1e9, rel=1e-3)
    roof_s = max(20_000 / flops_per_s, 36_000 / 18e9)  # 0.27 us compute, 2 us memory
    assert roof["overhead_us_per_kv_mb"] == pytest.approx(0.1, rel=1e-3)
    assert roof["overhead_us"] == pytest.approx((12e-6 - roof_s - 0.1e-6) * 1e6, rel=1e-3)
    faster_long = [dataclasses.replace(points[0], seconds=10e-6), points[1]]  # noise made the long context faster: no negative slope
    assert _serial_roof(bench, times, faster_long)["overhead_us_per_kv_mb"] == 0


def test_a_serial_kernels_cost_beyond_its_roof_is_a_line_in_k_v_bytes_over_both_models_each_scaled_to_the_probe():
    """Hand arithmetic: a call costs its roof + 3 us + 0.04 us per MB of K/V a layer's attention reads,
    on a host whose cold-call probe reads 20 us. The first model's two contexts (36 KB of operands; 1 and
    41 MB of K/V) ran at that probe; the second model's (54 KB; 0.4 and 12 MB) while the host's cold calls
    took twice as long (probe 40 us), so everything beyond the roof doubled there. The fit scales each
    point to the calibration's probe and gives the two terms back; the operands' size plays no part."""
    from perfsim.cost import Cost

    flops_per_s = 0.75 * 3e5 / 3e-6
    in_cache, quarter = calibrate.Call(lambda: None), calibrate.Call(lambda: None)
    bench = calibrate.KernelBench("rmsnorm", False, None, in_cache, 3e5, quarter)
    times = {id(in_cache): 7e-6, id(quarter): 4e-6}

    def point(op_bytes, kv_bytes, probe_us, model, extra_s=0.0):
        cost = Cost(flops=op_bytes / 3, act_bytes=op_bytes)
        roof_s = max(cost.flops / flops_per_s, op_bytes / 18e9)
        beyond_s = (3e-6 + 0.04e-6 * kv_bytes / 1e6) * probe_us / 20.0
        return calibrate.DecodeShapedPoint(roof_s + beyond_s + extra_s, cost, kv_bytes, 18.0, probe_us, model)

    points = [point(36_000, 1_000_000, 20.0, 0), point(36_000, 41_000_000, 20.0, 0), point(54_000, 400_000, 40.0, 1), point(54_000, 12_000_000, 40.0, 1)]
    roof = _serial_roof(bench, times, points, cold_call_us=20.0)
    assert roof["overhead_us"] == pytest.approx(3.0, rel=1e-3)
    assert roof["overhead_us_per_kv_mb"] == pytest.approx(0.04, rel=1e-3)
    # the same calls read against a probe of 40 us all through: the first model's now count double
    unscaled = _serial_roof(bench, times, points, cold_call_us=40.0)
    assert unscaled["overhead_us"] == pytest.approx(6.0, rel=1e-3) and unscaled["overhead_us_per_kv_mb"] == pytest.approx(0.08, rel=1e-3)
    # The first model's long context ran 300 us slower a call (kv_append's rare 10x): over 3x its own
    # short context, it is left out and the other three give the same line. 4 us slower (2.1x) is kept.
    slow = [point(36_000, 1_000_000, 20.0, 0), point(36_000, 41_000_000, 20.0, 0, 300e-6)] + points[2:]
    left_out = _serial_roof(bench, times, slow, cold_call_us=20.0)
    assert left_out["overhead_us"] == pytest.approx(3.0, rel=1e-3) and left_out["overhead_us_per_kv_mb"] == pytest.approx(0.04, rel=1e-3)
    kept = [point(36_000, 1_000_000, 20.0, 0), point(36_000, 41_000_000, 20.0, 0, 4e-6)] + points[2:]
    assert _serial_roof(bench, times, kept, cold_call_us=20.0)["overhead_us_per_kv_mb"] > 0.1


def test_a_serial_kernels_cost_beyond_its_roof_grows_with_its_operands_from_one_model_to_the_other():
    """Hand arithmetic: beyond its roof a call costs 3 us + 0.04 us per MB of K/V + 50 us per MB of its
    own operands (36 KB in the first model, 54 KB in the second: 1.8 and 2.7 us); the fit gives the three
    terms back. With operands of one size in both models (argmax: the same vocabulary) that column gets
    no slope, and its cost stays in the fixed part."""
    from perfsim.cost import Cost

    flops_per_s = 0.75 * 3e5 / 3e-6
    in_cache, quarter = calibrate.Call(lambda: None), calibrate.Call(lambda: None)
    bench = calibrate.KernelBench("rmsnorm", False, None, in_cache, 3e5, quarter)
    times = {id(in_cache): 7e-6, id(quarter): 4e-6}

    def point(op_bytes, kv_bytes, model):
        cost = Cost(flops=op_bytes / 3, act_bytes=op_bytes)
        roof_s = max(cost.flops / flops_per_s, op_bytes / 18e9)
        beyond_s = 3e-6 + 0.04e-6 * kv_bytes / 1e6 + 50e-6 * op_bytes / 1e6
        return calibrate.DecodeShapedPoint(roof_s + beyond_s, cost, kv_bytes, 18.0, 20.0, model)

    points = [point(36_000, 1_000_000, 0), point(36_000, 41_000_000, 0), point(54_000, 400_000, 1), point(54_000, 12_000_000, 1)]
    roof = _serial_roof(bench, times, points, cold_call_us=20.0)
    assert roof["overhead_us"] == pytest.approx(3.0, rel=1e-3)
    assert roof["overhead_us_per_kv_mb"] == pytest.approx(0.04, rel=1e-3)
    assert roof["overhead_us_per_operand_mb"] == pytest.approx(50.0, rel=1e-3)
    same_size = [point(16_000, 1_000_000, 0), point(16_000, 41_000_000, 0), point(16_000, 400_000, 1), point(16_000, 12_000_000, 1)]
    roof = _serial_roof(bench, times, same_size, cold_call_us=20.0)
    assert roof["overhead_us_per_operand_mb"] == 0 and roof["overhead_us"] == pytest.approx(3.0 + 0.8, rel=1e-3)


def test_a_decode_shaped_matrix_repeats_its_random_row_tiles_and_multiplies_as_its_reference():
    """300 rows: the 8 random row tiles (256 rows) repeat from row 256 on, the tiles differ from one another,
    the padding rows of the last tile are zero, and the GEMV agrees with the float64 reference."""
    from perfsim.kernels.gemv import gemv, gemv_reference, gemv_tolerance, unpack_to_f32

    weights = calibrate._repeated_q4_0(300, 64, seed=3)
    dense = unpack_to_f32(weights)
    assert dense.shape == (300, 64) and weights.d.shape[0] == 10
    np.testing.assert_array_equal(dense[256:], dense[:44])
    assert not np.array_equal(dense[:32], dense[32:64])
    assert not weights.d[-1, :, 300 % 32 :].any()
    x = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    out = gemv(weights, x, np.zeros(300, np.float32))
    assert (np.abs(out - gemv_reference(weights, x)) <= gemv_tolerance(weights, x)).all()


def test_a_serial_kernels_cost_beyond_its_roof_grows_with_the_bytes_a_layer_streams_apart_from_its_operands():
    """Hand arithmetic: beyond its roof a call costs 3 us + 0.04 us per MB of K/V + 50 us per MB of its own
    operands + 0.03 us per MB a layer streams. The first two models' layers stream 45 and 83 MB and their
    operands are 36 and 54 KB; the third has the second's operands and a 196 MB layer, so the fit tells the
    two columns apart and gives the four terms back. Without the third model the layer's column goes into
    the others (both grow from the first model to the second) and the bytes a 196 MB layer adds are lost."""
    from perfsim.cost import Cost

    flops_per_s = 0.75 * 3e5 / 3e-6
    in_cache, quarter = calibrate.Call(lambda: None), calibrate.Call(lambda: None)
    bench = calibrate.KernelBench("rope", False, None, in_cache, 3e5, quarter)
    times = {id(in_cache): 7e-6, id(quarter): 4e-6}

    def point(op_bytes, kv_bytes, layer_bytes, model):
        cost = Cost(flops=op_bytes / 3, act_bytes=op_bytes)
        roof_s = max(cost.flops / flops_per_s, op_bytes / 18e9)
        beyond_s = 3e-6 + 0.04e-6 * kv_bytes / 1e6 + 50e-6 * op_bytes / 1e6 + 0.03e-6 * layer_bytes / 1e6
        return calibrate.DecodeShapedPoint(roof_s + beyond_s, cost, kv_bytes, 18.0, 20.0, model, "rope", layer_bytes)

    two = [point(36_000, 1_000_000, 45e6, 0), point(36_000, 41_000_000, 45e6, 0), point(54_000, 400_000, 83e6, 1),
           point(54_000, 12_000_000, 83e6, 1)]
    roof = _serial_roof(bench, times, two + [point(54_000, 400_000, 196e6, 2), point(54_000, 12_000_000, 196e6, 2)], cold_call_us=20.0)
    assert roof["overhead_us"] == pytest.approx(3.0, rel=1e-3)
    assert roof["overhead_us_per_kv_mb"] == pytest.approx(0.04, rel=1e-3)
    assert roof["overhead_us_per_operand_mb"] == pytest.approx(50.0, rel=1e-3)
    assert roof["overhead_us_per_layer_mb"] == pytest.approx(0.03, rel=1e-3)
    line_us = lambda r, op_bytes, layer_bytes: r["overhead_us"] + r["overhead_us_per_operand_mb"] * op_bytes / 1e6 + r["overhead_us_per_layer_mb"] * layer_bytes / 1e6  # noqa: E731
    assert line_us(roof, 54_000, 196e6) == pytest.approx(3.0 + 2.7 + 5.88, rel=1e-3)
    without = _serial_roof(bench, times, two, cold_call_us=20.0)
    assert line_us(without, 54_000, 196e6) < 3.0 + 2.7 + 5.88 - 2.0  # a 196 MB layer's 5.88 us, under 4 us of it seen


def test_a_serial_kernel_run_by_several_ops_gets_each_ops_multiple_of_the_shared_line():
    """Hand arithmetic: beyond its roof the norm before attention costs 1.25x and the one before the MLP
    0.75x of 3 us + 0.04 us per MB of K/V + 50 us per MB of operands, at both contexts of both models.
    At each point the two average the line, so the fit gives the line back and each op its factor; a
    kernel one op runs (silu_mul) gets none."""
    from perfsim.cost import Cost

    flops_per_s = 0.75 * 3e5 / 3e-6
    in_cache, quarter = calibrate.Call(lambda: None), calibrate.Call(lambda: None)
    bench = calibrate.KernelBench("rmsnorm", False, None, in_cache, 3e5, quarter)
    times = {id(in_cache): 7e-6, id(quarter): 4e-6}

    def point(op, factor, op_bytes, kv_bytes, model):
        cost = Cost(flops=op_bytes / 3, act_bytes=op_bytes)
        roof_s = max(cost.flops / flops_per_s, op_bytes / 18e9)
        beyond_s = factor * (3e-6 + 0.04e-6 * kv_bytes / 1e6 + 50e-6 * op_bytes / 1e6)
        return calibrate.DecodeShapedPoint(roof_s + beyond_s, cost, kv_bytes, 18.0, 20.0, model, op)

    shapes = ((36_000, 1_000_000, 0), (36_000, 41_000_000, 0), (54_000, 400_000, 1), (54_000, 12_000_000, 1))
    points = [point(op, factor, *shape) for op, factor in (("attn_norm", 1.25), ("ffn_norm", 0.75)) for shape in shapes]
    roof = _serial_roof(bench, times, points, cold_call_us=20.0)
    assert roof["overhead_us"] == pytest.approx(3.0, rel=1e-3)
    assert roof["overhead_us_per_kv_mb"] == pytest.approx(0.04, rel=1e-3)
    assert roof["overhead_us_per_operand_mb"] == pytest.approx(50.0, rel=1e-3)
    assert roof["overhead_factor_by_op"] == pytest.approx({"attn_norm": 1.25, "ffn_norm": 0.75}, rel=1e-3)
    assert yaml.safe_load(yaml.safe_dump(roof)) == roof  # the host profile is written with safe_dump: plain floats
    one_op = _serial_roof(bench, times, [point("ffn_act", 1.0, *shape) for shape in shapes], cold_call_us=20.0)
    assert "overhead_factor_by_op" not in one_op and one_op["overhead_us"] == pytest.approx(3.0, rel=1e-3)


def test_an_op_whose_calls_all_came_out_under_the_line_keeps_a_small_factor_and_the_profile_loads():
    """Hand arithmetic: the norm before attention costs 3 us beyond its roof at every point, the one before
    the MLP 1 us less than its roof (a fit can see that in noise). Its factor is the floor, 0.05 (a factor
    of 0 is refused by the loader: every call pays its dispatch), and the roof loads as a profile's."""
    from perfsim.cost import Cost
    from perfsim.device import device_from_data

    flops_per_s = 0.75 * 3e5 / 3e-6
    in_cache, quarter = calibrate.Call(lambda: None), calibrate.Call(lambda: None)
    bench = calibrate.KernelBench("rmsnorm", False, None, in_cache, 3e5, quarter)
    times = {id(in_cache): 7e-6, id(quarter): 4e-6}

    def point(op, beyond_s, kv_bytes, model):
        cost = Cost(flops=12_000, act_bytes=36_000)
        return calibrate.DecodeShapedPoint(max(cost.flops / flops_per_s, 36_000 / 18e9) + beyond_s, cost, kv_bytes, 18.0, 20.0, model, op)

    shapes = ((1_000_000, 0), (41_000_000, 0), (400_000, 1), (12_000_000, 1))
    points = [point(op, beyond_s, *shape) for op, beyond_s in (("attn_norm", 3e-6), ("ffn_norm", -1e-6)) for shape in shapes]
    roof = _serial_roof(bench, times, points, cold_call_us=20.0)
    assert roof["overhead_factor_by_op"]["ffn_norm"] == calibrate.MIN_OP_FACTOR
    assert roof["overhead_factor_by_op"]["attn_norm"] > 1.0
    data = fake_profile()
    data["units"]["cpu"]["kernel_roofs"]["rmsnorm"] = {1: roof}
    assert device_from_data(data, "fake.yaml").unit().kernel_roofs["rmsnorm"][1].overhead_factor_by_op["ffn_norm"] == 0.05


def test_a_serial_kernels_compute_roof_is_no_slower_than_its_calls_in_decode():
    """Hand arithmetic: in-cache calls of 70 us and 4 us (a disturbed measurement) make a compute roof of
    0.75 x 3e5 FLOPs / 66 us = 3.4 GFLOP/s, under which a decode call of 6e4 FLOPs would take 17.6 us; it
    took 12 us, so it computed at 5 GFLOP/s at least: that is the roof, and nothing is left for the fixed
    cost of that call."""
    from perfsim.cost import Cost

    in_cache, quarter = calibrate.Call(lambda: None), calibrate.Call(lambda: None)
    bench = calibrate.KernelBench("kv_append.f16", False, None, in_cache, 3e5, quarter)
    times = {id(in_cache): 70e-6, id(quarter): 4e-6}
    cost = Cost(flops=6e4, act_bytes=1_000)
    points = [calibrate.DecodeShapedPoint(12e-6, cost, 1_000_000, 18.0), calibrate.DecodeShapedPoint(14e-6, cost, 41_000_000, 18.0)]
    roof = _serial_roof(bench, times, points)
    assert roof["gflops"] == pytest.approx(5.0, rel=1e-3)
    assert roof["overhead_us"] == pytest.approx(0.0, abs=1e-6) and roof["overhead_us_per_kv_mb"] == pytest.approx(0.05, rel=1e-3)


def test_a_serial_outlier_is_left_out_when_the_compute_floor_leaves_the_short_call_nothing_beyond_its_roof():
    """kv_append at 12 us a call (6e4 FLOPs) sets the compute roof's floor at 5 GFLOP/s, so nothing of that
    call is beyond its roof; the same model's long context ran 56 us (4.7x). Compared beyond the roof
    (0 us against 44), no multiple could leave it out; compared as whole calls it is, and the fit is that
    of the three other points. A long call of 2.5x is kept, and steepens the line."""
    from perfsim.cost import Cost

    in_cache, quarter = calibrate.Call(lambda: None), calibrate.Call(lambda: None)
    bench = calibrate.KernelBench("kv_append.f16", False, None, in_cache, 3e5, quarter)
    times = {id(in_cache): 70e-6, id(quarter): 4e-6}
    cost = Cost(flops=6e4, act_bytes=1_000)

    def point(seconds, kv_bytes, model):
        return calibrate.DecodeShapedPoint(seconds, cost, kv_bytes, 18.0, 20.0, model, "kv_append")

    others = [point(12e-6, 1_000_000, 0), point(12e-6, 400_000, 1), point(13e-6, 12_000_000, 1)]
    roof = _serial_roof(bench, times, others + [point(56e-6, 41_000_000, 0)], cold_call_us=20.0)
    assert roof == _serial_roof(bench, times, others, cold_call_us=20.0)
    assert roof["gflops"] == pytest.approx(5.0) and roof["overhead_us_per_kv_mb"] < 0.1
    kept = _serial_roof(bench, times, others + [point(30e-6, 41_000_000, 0)], cold_call_us=20.0)
    assert kept["overhead_us_per_kv_mb"] > 0.3


def test_a_serial_kernels_compute_roof_is_its_best_in_cache_roof_over_the_thread_counts():
    """kv_append's in-cache roof came out 1.5 GFLOP/s on one thread and 0.28 on two (disturbed): both thread
    counts get 1.5, each with its own decode points and probe. With 0.28 the floor (12 us calls of 5120
    FLOPs: 0.43 GFLOP/s) would have set the roof on two threads and left nothing of them as fixed cost."""
    from perfsim.cost import Cost

    cost = Cost(flops=5120, act_bytes=20_480)
    points = lambda seconds: [calibrate.DecodeShapedPoint(s, cost, kv, 18.0, 20.0, 0, "kv_append")  # noqa: E731
                              for s, kv in zip(seconds, (1_000_000, 41_000_000))]
    decode_points = {1: {"kv_append.f16": points((14e-6, 16e-6))}, 2: {"kv_append.f16": points((12e-6, 13e-6))}}
    roofs = calibrate._serial_roofs({1: {"kv_append.f16": 1.5}, 2: {"kv_append.f16": 0.28}}, decode_points, {1: 20.0, 2: 20.0})
    assert set(roofs) == {"kv_append.f16"} and set(roofs["kv_append.f16"]) == {1, 2}
    for threads, roof in roofs["kv_append.f16"].items():
        assert roof == calibrate._roof_from_decode(1.5, decode_points[threads]["kv_append.f16"], False, 20.0)
        assert roof["gflops"] == 1.5
    assert roofs["kv_append.f16"][2]["overhead_us"] == pytest.approx(12.0 - 5120 / 1.5e3 - 1 / 40 * 1.0, rel=1e-2)
    alone = calibrate._roof_from_decode(0.28, decode_points[2]["kv_append.f16"], False, 20.0)
    assert alone["overhead_us"] < 1.0  # what the disturbed roof alone gave


def test_a_gemv_roof_out_of_line_with_its_other_thread_count_is_picked_for_measuring_again():
    # q4_0's in-cache roofs (GFLOP/s at 1 and 2 threads) in four Skylake-SP calibrations of the twelfth session
    assert calibrate._disagreeing_thread_count({1: 55.82, 2: 113.3}) is None  # quiet
    assert calibrate._disagreeing_thread_count({1: 55.13, 2: 107.8}) is None  # quiet
    assert calibrate._disagreeing_thread_count({1: 32.07, 2: 103.7}) == 1  # disturbed on one thread
    assert calibrate._disagreeing_thread_count({1: 54.51, 2: 61.71}) == 2  # disturbed on two
    assert calibrate._disagreeing_thread_count({1: 20.0}) is None  # a one-core host has nothing to compare


def test_a_profile_lists_its_second_looks_as_lines_and_rejects_anything_else():
    from perfsim.device import device_from_data

    data = fake_profile()
    data["calibration"]["second_looks"] = ["gemv.q4_0 at 1 threads: 32.07 -> 55.13 GFLOP/s"]
    assert device_from_data(data, "p.yaml").calibration["second_looks"] == data["calibration"]["second_looks"]
    data["calibration"]["second_looks"] = [{"gemv.q4_0": 55.13}]
    with pytest.raises(UserError, match="second_looks: expected a list of text lines"):
        device_from_data(data, "p.yaml")
    data["calibration"]["second_looks"] = []
    assert "second_looks" not in device_from_data(data, "p.yaml").calibration


def test_the_nonnegative_line_drops_a_column_whose_free_slope_is_negative_and_one_that_hardly_varies():
    x0 = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    x1 = np.array([5.0, 1.0, 4.0, 2.0, 3.0])
    noise = np.array([0.1, -0.2, 0.05, 0.15, -0.1])
    y = 2.0 + 0.5 * x0 - 0.3 * x1 + noise
    intercept, slopes = calibrate._nonnegative_line(list(zip(x0, x1)), list(y))
    free_slope, free_intercept = np.polyfit(x0, y, 1)  # the best line in x0 alone
    assert slopes[1] == 0 and slopes[0] == pytest.approx(free_slope) and intercept == pytest.approx(free_intercept)
    intercept, slopes = calibrate._nonnegative_line([(1.0, 36_000), (2.0, 36_100), (3.0, 36_000)], [1.0, 2.0, 3.0])
    assert slopes[1] == 0 and slopes[0] == pytest.approx(1.0) and intercept == pytest.approx(0.0, abs=1e-12)


def test_a_parallel_kernels_overhead_and_overlap_are_the_line_through_its_decode_calls():
    """Hand arithmetic: compute roof 40 GFLOP/s; one call of 4 MFLOP (100 us) and 2 MB at 20 GB/s (100 us),
    one of 32 MFLOP (800 us) and 20 MB at 10 GB/s (2000 us), one of 8 MFLOP (200 us) and 8 MB at 20 GB/s
    (400 us): with overlap 0.25 and a fixed cost of 30 us they take 155, 2230 and 480 us, and the
    least-squares fit gives those two back."""
    from perfsim.cost import Cost

    point = lambda s, flops, n_bytes, gb_s: calibrate.DecodeShapedPoint(s, Cost(flops=flops, weight_bytes=n_bytes), 0, gb_s)  # noqa: E731
    points = [point(155e-6, 4e6, 2_000_000, 20.0), point(2230e-6, 32e6, 20_000_000, 10.0), point(480e-6, 8e6, 8_000_000, 20.0)]
    roof = calibrate._roof_from_decode(40.0, points, parallel=True)  # memory at each point's own passes
    assert roof["overlap"] == pytest.approx(0.25, abs=1e-4) and roof["overhead_us"] == pytest.approx(30.0, rel=1e-3)
    assert "overhead_us_per_kv_mb" not in roof
    # the in-cache roof is floored at what decode achieved, the fastest call: 4 MFLOP in 155 us, 25.8 GFLOP/s
    # (at 20 GFLOP/s the 32 MFLOP call is still memory-bound: the kernel is not compute-bound in decode)
    assert roof["gflops"] == 40.0 and calibrate._roof_from_decode(20.0, points, parallel=True)["gflops"] == pytest.approx(4e6 / 155e-6 / 1e9, rel=1e-3)


def test_a_negative_fixed_cost_is_none_and_the_overlap_then_the_best_line_through_the_origin():
    """Hand arithmetic: compute roof 40 GFLOP/s, memory 2x compute in each call (100, 200 and 400 us of compute
    against 200, 400 and 800 us of memory); beyond the memory the calls took 20, 50 and 110 us. The free line is
    0.3 x compute - 10 us. Without a fixed cost, the best line through the origin has slope
    (100x20 + 200x50 + 400x110) / (100^2 + 200^2 + 400^2) = 56000 / 210000; it passes 2.2 us above the points'
    mean, so the fixed cost stays 0 (the free slope with none charged each call 10 us more than its points)."""
    from perfsim.cost import Cost

    point = lambda compute_us, excess_us: calibrate.DecodeShapedPoint(  # noqa: E731
        (2 * compute_us + excess_us) * 1e-6, Cost(flops=compute_us * 1e-6 * 40e9, weight_bytes=2 * compute_us * 1e-6 * 20e9), 0, 20.0)
    roof = calibrate._roof_from_decode(40.0, [point(100, 20), point(200, 50), point(400, 110)], parallel=True)
    assert roof["gflops"] == 40.0
    assert roof["overlap"] == pytest.approx(56000 / 210000, abs=1e-4) and roof["overhead_us"] == 0.0


def test_a_kernel_compute_bound_in_every_decode_call_takes_its_roof_from_those_calls():
    """Hand arithmetic: an in-cache roof of 50 GFLOP/s makes both calls compute-bound (2 MFLOP: 40 us against
    0.4 MB at 20 GB/s, 20 us; 60 MFLOP: 1200 us against 12 MB, 600 us). Decode took 100 and 1840 us: the
    line through them is 58 MFLOP per 1740 us (33.3 GFLOP/s) from a fixed cost of 40 us, no overlap."""
    from perfsim.cost import Cost

    points = [calibrate.DecodeShapedPoint(100e-6, Cost(flops=2e6, kv_bytes=400_000), 0, 20.0),
              calibrate.DecodeShapedPoint(1840e-6, Cost(flops=60e6, kv_bytes=12_000_000), 0, 20.0)]
    roof = calibrate._roof_from_decode(50.0, points, parallel=True)
    assert roof["gflops"] == pytest.approx(58e6 / 1740e-6 / 1e9, rel=1e-3)
    assert roof["overhead_us"] == pytest.approx(40.0, rel=1e-3) and roof["overlap"] == 0.0


def test_attentions_fit_takes_the_kv_heads_cost_out_of_its_fixed_cost():
    """The compute-bound hand arithmetic above, its calls now from a model of 20 K/V heads at 1.5 us each
    (30 us of the 40): fitted less that, the fixed cost is 10 us and the roof carries 1.5 us a K/V head, so a
    model of 32 K/V heads is charged 10 + 48 us a call at no FLOPs. The compute roof is the same."""
    from perfsim.cost import Cost

    points = [calibrate.DecodeShapedPoint(100e-6, Cost(flops=2e6, kv_bytes=400_000), 0, 20.0, kv_heads=20),
              calibrate.DecodeShapedPoint(1840e-6, Cost(flops=60e6, kv_bytes=12_000_000), 0, 20.0, kv_heads=20)]
    roof = calibrate._roof_from_decode(50.0, points, parallel=True, kernel="attention.f16", per_kv_head_us=1.5)
    assert roof["gflops"] == pytest.approx(58e6 / 1740e-6 / 1e9, rel=1e-3)
    assert roof["overhead_us"] == pytest.approx(10.0, rel=1e-3) and roof["overhead_us_per_kv_head"] == 1.5
    assert "overhead_us_per_kv_head" not in calibrate._roof_from_decode(50.0, points, parallel=True, kernel="attention.f16")


def test_the_cost_per_kv_head_is_the_slope_of_each_head_counts_time_at_no_kv_bytes():
    """Synthetic cold calls: 40 us + 2.5 us a K/V head + K/V bytes at 25 GB/s (the per-byte rate differs per head
    count, as it may: 20 GB/s at 32 heads). Each count's line through its two contexts gives 80 and 120 us at no
    bytes: 2.5 us a head. Calls that get cheaper with more heads give 0, not a negative cost."""
    kv_bytes = lambda heads, context: heads * context * 512  # noqa: E731
    rate = {16: 25e9, 32: 20e9}
    call_s = {(h, c): (40 + 2.5 * h) * 1e-6 + kv_bytes(h, c) / rate[h] for h in calibrate.KV_HEAD_COUNTS for c in calibrate.KV_HEAD_CONTEXTS}
    assert calibrate._per_kv_head_us(call_s, kv_bytes) == pytest.approx(2.5, rel=1e-3)
    falling = {(h, c): (200 - 2.0 * h) * 1e-6 + kv_bytes(h, c) / 25e9 for h, c in call_s}
    assert calibrate._per_kv_head_us(falling, kv_bytes) == 0.0


def test_decode_points_in_a_slower_state_are_fitted_at_their_own_speed():
    """The first hand-arithmetic fit again, with its 32 MFLOP call run in a state where the compute probe read
    half the reference (55 against 110 GFLOP/s): its compute took 1600 us, not 800, so the call took
    30 + 2000 + 0.25 x 1600 = 2430 us. Fitted at each point's own speed, the roof stated at the reference
    gives overlap 0.25 and 30 us back; without the probes the same points give other values."""
    from perfsim.cost import Cost

    def point(s, flops, n_bytes, gb_s, probe):
        return calibrate.DecodeShapedPoint(s, Cost(flops=flops, weight_bytes=n_bytes), 0, gb_s, compute_gflops=probe)

    points = [point(155e-6, 4e6, 2_000_000, 20.0, 110.0), point(2430e-6, 32e6, 20_000_000, 10.0, 55.0), point(480e-6, 8e6, 8_000_000, 20.0, 110.0)]
    roof = calibrate._roof_from_decode(40.0, points, parallel=True, reference_gflops=110.0)
    assert roof["gflops"] == 40.0
    assert roof["overlap"] == pytest.approx(0.25, abs=1e-4) and roof["overhead_us"] == pytest.approx(30.0, rel=1e-3)
    unprobed = calibrate._roof_from_decode(40.0, points, parallel=True)
    assert unprobed["overlap"] != pytest.approx(0.25, abs=0.02)
    # a compute-bound kernel (the second hand-arithmetic fit), its long call at half speed: 40 + 2 x 1800 us
    points = [calibrate.DecodeShapedPoint(100e-6, Cost(flops=2e6, kv_bytes=400_000), 0, 20.0, compute_gflops=110.0),
              calibrate.DecodeShapedPoint(3640e-6, Cost(flops=60e6, kv_bytes=12_000_000), 0, 20.0, compute_gflops=55.0)]
    roof = calibrate._roof_from_decode(50.0, points, parallel=True, reference_gflops=110.0)
    assert roof["gflops"] == pytest.approx(58e6 / 1740e-6 / 1e9, rel=1e-3) and roof["overhead_us"] == pytest.approx(40.0, rel=1e-3)
    # attention's points are put in the reference state at its elasticity: half the probe is sqrt(0.5) the speed
    assert points[1].speed(110.0, "attention.f16") == pytest.approx(0.5 ** 0.5) and points[1].speed(110.0, "gemv.q4_0") == 0.5
    assert points[1].speed(110.0, "rmsnorm") == 1.0 and points[1].speed(0.0, "attention.f16") == 1.0


def test_a_power_mean_kernels_fit_is_its_fixed_cost_over_the_power_mean_of_its_points():
    """Hand arithmetic: compute roof 40 GFLOP/s at a reference probe of 110, overlap power 3.5. A call of 4 MFLOP
    (100 us) and 2 MB at 20 GB/s (100 us): power mean 2^(1/3.5) x 100 = 121.90 us. One of 32 MFLOP run at half speed
    (probe 55: 1600 us of compute) and 20 MB at 10 GB/s (2000 us): (1600^3.5 + 2000^3.5)^(1/3.5) = 2227.48 us. One of
    8 MFLOP (200 us) and 8 MB at 20 GB/s (400 us): 409.80 us. Taking 25, 35 and 30 us more than those, the fixed
    cost is their mean, 30 us, with no overlap; the max-and-overlap fit reads the same calls otherwise."""
    from perfsim.cost import Cost

    def point(s, flops, n_bytes, gb_s, probe):
        return calibrate.DecodeShapedPoint(s, Cost(flops=flops, weight_bytes=n_bytes), 0, gb_s, compute_gflops=probe)

    assert (1600**3.5 + 2000**3.5) ** (1 / 3.5) == pytest.approx(2227.48, abs=0.01)
    assert 2 ** (1 / 3.5) * 100 == pytest.approx(121.90, abs=0.01) and (200**3.5 + 400**3.5) ** (1 / 3.5) == pytest.approx(409.80, abs=0.01)
    points = [point((121.90 + 25) * 1e-6, 4e6, 2_000_000, 20.0, 110.0), point((2227.48 + 35) * 1e-6, 32e6, 20_000_000, 10.0, 55.0),
              point((409.80 + 30) * 1e-6, 8e6, 8_000_000, 20.0, 110.0)]
    roof = calibrate._roof_from_decode(40.0, points, parallel=True, reference_gflops=110.0, kernel="gemv.q4_0", overlap_power=3.5)
    assert roof == {"gflops": 40.0, "overlap": 0.0, "overlap_power": 3.5, "overhead_us": pytest.approx(30.0, abs=0.01)}
    without = calibrate._roof_from_decode(40.0, points, parallel=True, reference_gflops=110.0, kernel="gemv.q4_0")
    assert "overlap_power" not in without and without["overlap"] > 0.05
    # calls faster than their power mean leave no negative fixed cost
    fast = [point(100e-6, 4e6, 2_000_000, 20.0, 110.0), point(390e-6, 8e6, 8_000_000, 20.0, 110.0)]
    assert calibrate._roof_from_decode(40.0, fast, True, reference_gflops=110.0, overlap_power=3.5)["overhead_us"] == 0.0


def test_an_in_cache_roof_is_stated_at_the_reference_speed_state(monkeypatch):
    """A GEMV roof of 30 GFLOP/s measured between probes that read 50 and 60 (mean 55) is 60 at a reference of
    110, an attention roof 30 x sqrt(2); without a reference it stays as measured."""
    import perfsim.measure

    readings = iter([50.0, 60.0])
    monkeypatch.setattr(perfsim.measure, "compute_probe_gflops", lambda threads: next(readings))
    assert calibrate._state_normalized(lambda: 30.0, 1, 110.0) == pytest.approx(60.0)
    readings = iter([50.0, 60.0])
    assert calibrate._state_normalized(lambda: 30.0, 1, 0.0) == 30.0
    readings = iter([50.0, 60.0])  # attention follows the probe at its elasticity, 0.5: 30 x sqrt(2)
    assert calibrate._state_normalized(lambda: 30.0, 1, 110.0, "attention.f16") == pytest.approx(30.0 * 2 ** 0.5)


def resident_bytes_of(array) -> int:
    """Resident bytes of the mapping that holds `array` (its own mmap: zeros_huge_pages), from /proc/self/smaps."""
    address, region = array.ctypes.data, None
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(x, 16) for x in head.split("-"))
            region = start <= address < end
        elif region and line.startswith("Rss:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no mapping holds the array")


def test_a_session_faults_its_whole_kv_cache_in_before_any_step():
    """A first touch of the cache inside a timed step (a 2 MiB page zeroed, or compacted for) once cost
    kv_append 4x its usual time: a new session's cache is resident at once, like llama.cpp's, and still zero."""
    from perfsim.engine import random_weights

    model = ModelSpec("long", n_layers=4, hidden_size=256, n_heads=2, n_kv_heads=2, intermediate_size=512, vocab_size=320, max_context=16384)
    session = Engine(random_weights(model, "q4_0", seed=0), "f16").session(16384)
    assert session.cache.nbytes == 64 * 2**20  # 4 layers x 2 kv heads x 16384 positions x 128 x f16 x (K, V)
    for array in session.cache.arrays:  # K and V, 32 MiB each in a mapping of its own
        assert resident_bytes_of(array) >= array.nbytes
        assert not array.any()


def test_decode_shaped_calls_time_every_serial_kernel_in_the_engines_decode(monkeypatch):
    """The plumbing of the decode-shaped run, on a tiny model: every serial kernel and format gets a
    positive call time at both contexts, with the K/V bytes a layer's attention reads at each."""
    from perfsim.kernels.jit import set_threads

    monkeypatch.setattr(calibrate, "DECODE_SHAPED_CONTEXTS", (8, 40))
    monkeypatch.setattr(calibrate, "DECODE_SHAPED_STEPS", 2)
    set_threads(1)
    probes = []
    calls = calibrate._decode_shaped_calls([(calibrate._decode_shaped_weights(TINY), calibrate.DECODE_SHAPED_SESSIONS, 1)], 1, probes)
    assert len(probes) == 4 * 2 * 2 and all(p > 0 for p in probes)  # a cold-call probe before each step: 4 sessions x 2 contexts x 2 steps
    kernels = {"rmsnorm", "rope", "residual_add", "silu_mul", "argmax", "gemv.q4_0"} | {f"kv_append.{f}" for f in ("f16", "q8_0", "f32")}
    attention = {f"attention.{f}.gqa" for f in ("f16", "q8_0", "f32")}  # TINY has 4 heads over 2 kv heads
    assert set(calls) == kernels | attention | {f"embedding.{f}" for f in ("q4_0", "q8_0", "f16", "f32")}
    for kernel, points in calls.items():
        assert all(p.seconds > 0 and p.stream_gb_s > 0 and p.cold_call_us > 0 for p in points)
    assert len(calls["rmsnorm"]) == 3 * 2 and len(calls["gemv.q4_0"]) == 5 * 2  # each op at each context
    assert sorted({p.op for p in calls["rmsnorm"]}) == ["attn_norm", "ffn_norm", "output_norm"]
    kv_values = TINY.n_kv_heads * TINY.head_dim * 2  # K and V, per position
    by_context = lambda kernel: sorted(calls[kernel], key=lambda p: p.kv_bytes)  # noqa: E731
    assert [p.kv_bytes for p in by_context("kv_append.f32")] == [c * kv_values * 4 for c in (8, 40)]
    # rmsnorm runs in all four sessions: f16, q8_0 (34 bytes a block of 32), f32, f16 K/V
    assert by_context("rmsnorm")[0].kv_bytes == round(8 * kv_values * (2 + 34 / 32 + 4 + 2) / 4)
    assert sorted(p.cost.kv_bytes for p in calls["attention.f16.gqa"]) == [8 * kv_values * 2, 40 * kv_values * 2]
    assert calls["rmsnorm"][0].cost.flops > 0 and calls["kv_append.f32"][0].cost.flops == 0


def test_decode_shaped_calls_keep_each_models_points_apart_and_step_a_model_more_often(monkeypatch):
    """Two models' sessions take turns: a kernel both run has a point per model and context (not one
    pooling both models' calls), and a model stepping 3 times a round gets 3 times the steps."""
    from perfsim.kernels.jit import set_threads

    monkeypatch.setattr(calibrate, "DECODE_SHAPED_CONTEXTS", (8, 40))
    monkeypatch.setattr(calibrate, "DECODE_SHAPED_STEPS", 2)
    set_threads(1)
    wide = ModelSpec("wide", n_layers=2, hidden_size=256, n_heads=4, n_kv_heads=1, intermediate_size=512, vocab_size=320, max_context=64)
    sessions = (("f16", "q4_0"),)
    probes = []
    calls = calibrate._decode_shaped_calls([(calibrate._decode_shaped_weights(TINY, sessions), sessions, 1),
                                            (calibrate._decode_shaped_weights(wide, sessions), sessions, 3)], 1, probes)
    assert len(probes) == (1 + 3) * 2 * 2  # per model: steps a round x 2 contexts x 2 rounds
    assert len(calls["rmsnorm"]) == 2 * 3 * 2 and len(calls["gemv.q4_0"]) == 2 * 5 * 2  # models x ops x contexts
    kv_per_position = {m.name: m.n_kv_heads * m.head_dim * 2 * 2 for m in (TINY, wide)}
    ffn_norms = [p for p in calls["rmsnorm"] if p.op == "ffn_norm"]
    assert sorted(p.kv_bytes for p in ffn_norms) == sorted(c * v for c in (8, 40) for v in kv_per_position.values())


def test_serial_call_times_pool_a_common_kernels_calls_over_every_group(monkeypatch):
    """rmsnorm runs in each of the 4 groups (one per embedding format); a burst that holds its whole
    first group must not set its time: the median is over its calls in all 4 groups."""
    monkeypatch.setattr(calibrate, "SERIAL_ROUNDS", 5)
    clock = {"now": 0.0, "group": -1}
    monkeypatch.setattr(calibrate.time, "perf_counter", lambda: clock["now"])

    def call(seconds_in_group):
        def run():
            clock["now"] += seconds_in_group(clock["group"])
        return calibrate.Call(run)

    rmsnorm = calibrate.KernelBench("rmsnorm", False, None, call(lambda g: 1.0 if g == 0 else 0.001), 1.0, call(lambda g: 0.0005))
    benches = [rmsnorm]
    benches += [calibrate.KernelBench(f"kv_append.{f}", False, None, call(lambda g: 0.002), 1.0, call(lambda g: 0.001)) for f in ("f16", "q8_0", "f32")]
    benches += [calibrate.KernelBench(f"embedding.{f}", False, None, call(lambda g: 0.003), 1.0, call(lambda g: 0.001))
                for f in ("q4_0", "q8_0", "f16", "f32")]

    class Producer:  # before() is asked once per call, size and group: rmsnorm's in_cache call opens each group
        def before(self, c, threads):
            if c is rmsnorm.in_cache:
                clock["group"] += 1
            return lambda: None

    times = calibrate._serial_call_times(benches, Producer(), 1)
    assert clock["group"] == 3  # four groups
    # 5 rounds a group: 5 slow calls (1 s) in group 0, 15 fast ones (1 ms) in the others
    assert times[id(rmsnorm.in_cache)] == pytest.approx(0.001)
    assert times[id(rmsnorm.in_cache_quarter)] == pytest.approx(0.0005)


def test_attention_head_dim_factors_are_time_per_kv_byte_over_that_at_128(monkeypatch):
    """A fake attention whose seconds per K/V byte are 1.3x, 1.2x and 1.1x at head_dims 64, 80 and 96
    what they are at 128: the factors come out as exactly those."""
    import perfsim.kernels.attention as at

    monkeypatch.setattr(calibrate, "HEAD_DIM_POSITIONS", 64)
    monkeypatch.setattr(calibrate, "HEAD_DIM_ROUNDS", 3)
    clock = {"now": 0.0}
    monkeypatch.setattr(calibrate.time, "perf_counter", lambda: clock["now"])
    per_byte_s = {64: 1.3e-9, 80: 1.2e-9, 96: 1.1e-9, 128: 1.0e-9}

    def fake_attention(q, cache, layer, n_positions, out):
        clock["now"] += per_byte_s[cache.head_dim] * at.attention_cost(q.shape[0], cache.n_kv_heads, cache.head_dim, n_positions).kv_bytes

    monkeypatch.setattr(at, "attention", fake_attention)
    monkeypatch.setattr(calibrate, "_cache_reads_gb_s", lambda caches, flush: dict.fromkeys(caches, 20.0))
    factors = calibrate._attention_head_dim_factors(1, n_heads=2)
    assert factors == {64: pytest.approx(1.3), 80: pytest.approx(1.2), 96: pytest.approx(1.1)}

    # Caches that landed in memory of different speeds: each one's attention slower in proportion to its
    # cache's read rate (the twelfth calibration of this session: 96's 1.4x slower), the same factors.
    read_gb_s = {64: 20.0, 80: 14.0, 96: 14.0, 128: 21.0}
    monkeypatch.setattr(calibrate, "_cache_reads_gb_s", lambda caches, flush: {head_dim: read_gb_s[head_dim] for head_dim in caches})
    intrinsic = dict(per_byte_s)
    for head_dim in per_byte_s:
        per_byte_s[head_dim] = intrinsic[head_dim] * 20.0 / read_gb_s[head_dim]
    factors = calibrate._attention_head_dim_factors(1, n_heads=2)
    assert factors == {64: pytest.approx(1.3), 80: pytest.approx(1.2), 96: pytest.approx(1.1)}


def test_the_head_dim_factors_are_the_mean_of_processes_of_their_own_and_a_failed_one_is_measured_here(monkeypatch):
    """Three processes report 0.85, 1.05 and 0.95 at 96 (this host's per-process states): the profile gets their
    mean, 0.95. A process that fails (or prints nothing usable) is replaced by a measurement in this process."""
    import json
    import subprocess

    reports = iter([{64: 0.8, 80: 0.9, 96: 0.85}, {64: 1.0, 80: 1.1, 96: 1.05}, {64: 0.9, 80: 1.0, 96: 0.95}])
    calls = []

    def fake_run(argv, **kwargs):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 0, stdout="numba says hi\n" + json.dumps(next(reports)) + "\n", stderr="")

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(calibrate, "_attention_head_dim_factors", lambda threads: pytest.fail("measured in this process"))
    assert calibrate._attention_head_dim_factors_of_processes(1) == {64: pytest.approx(0.9), 80: pytest.approx(1.0), 96: pytest.approx(0.95)}
    assert len(calls) == calibrate.HEAD_DIM_PROCESSES and all(argv[-1] == "1" for argv in calls)

    def failing_run(argv, **kwargs):
        raise subprocess.CalledProcessError(1, argv, "", "ImportError")

    monkeypatch.setattr(subprocess, "run", failing_run)
    monkeypatch.setattr(calibrate, "_attention_head_dim_factors", lambda threads: {64: 1.2, 80: 1.1, 96: 1.0})
    assert calibrate._attention_head_dim_factors_of_processes(2) == {64: 1.2, 80: 1.1, 96: 1.0}


@pytest.mark.slow
def test_the_head_dim_factors_of_processes_come_from_real_processes(monkeypatch):
    """The code each process runs imports and measures (nothing is measured in this one): factors near 1 at each head_dim."""
    monkeypatch.setattr(calibrate, "_attention_head_dim_factors", lambda threads: pytest.fail("a process failed"))
    factors = calibrate._attention_head_dim_factors_of_processes(1)
    assert set(factors) == set(calibrate.ATTENTION_HEAD_DIMS) and all(0.3 < f < 3.0 for f in factors.values())


def test_a_caches_read_rate_is_its_whole_bytes_over_the_median_read():
    from perfsim.kernels.attention import new_kv_cache
    from perfsim.kernels.stream import stream_buffer

    cache = new_kv_cache(2, 4, 512, 64, "f16")
    assert 0.5 < calibrate._cache_reads_gb_s({64: cache}, stream_buffer(2**20))[64] < 1000


def test_the_head_dim_caches_reads_take_turns_so_a_slow_spell_reaches_them_alike(monkeypatch):
    """Two caches, 5 passes each: read in turn (a, b, a, b, ...), a spell that halves the rate of the 3rd to 5th
    reads reaches at most two of each cache's five, and both medians stay at their rates. Read one cache
    after the other, it would have taken three of a's five and halved a's median."""
    import perfsim.kernels.stream as stream

    order, rate_gb_s = [], {"a": 10.0, "b": 20.0}
    monkeypatch.setattr(stream, "sample_chunks", lambda arrays, n_bytes, chunk: [type("chunk", (), {"nbytes": 10**9, "key": arrays[0]})()])
    monkeypatch.setattr(stream, "sum_int64", lambda buffer: 0)

    def read_chunks_s(chunks):
        order.append(chunks[0].key)
        slow = 2.0 if len(order) in (3, 4, 5) else 1.0
        return slow * chunks[0].nbytes / (rate_gb_s[chunks[0].key] * 1e9)

    monkeypatch.setattr(stream, "read_chunks_s", read_chunks_s)
    caches = {64: type("cache", (), {"arrays": ["a"], "nbytes": 10**9})(), 128: type("cache", (), {"arrays": ["b"], "nbytes": 10**9})()}
    assert calibrate._cache_reads_gb_s(caches, flush=None) == {64: pytest.approx(10.0), 128: pytest.approx(20.0)}
    assert order == ["a", "b"] * calibrate.HEAD_DIM_PASSES


def test_a_calibrated_profile_carries_multi_head_attentions_head_dim_factors():
    """What calibrate writes, the loader reads back into the roof the roofline uses."""
    data = fake_profile()
    unit = data["units"]["cpu"]
    unit["kernel_roofs"] = {"attention.f16": {1: {"gflops": 30.0, "overlap": 0.4, "overhead_us": 20.0,
                                                  "time_factor_by_head_dim": {64: 1.2, 80: 1.1, 96: 1.07}}}}
    device = calibrate.device_from_data(data, "host.yaml")
    assert device.unit().kernel_roofs["attention.f16"][1].time_factor_by_head_dim == {64: 1.2, 80: 1.1, 96: 1.07}


def test_calibrations_own_cpu_time_counts_the_processes_it_waited_for():
    """A child that burns ~0.3 s of CPU is calibration's own work, not another process's load (the head_dim
    factors run in processes of their own): _own_cpu_s grows by it, this process's CPU time does not."""
    import subprocess
    import sys
    import time

    own, mine = calibrate._own_cpu_s(), time.process_time()
    subprocess.run([sys.executable, "-c", "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass"], check=True)
    assert calibrate._own_cpu_s() - own >= 0.25 and time.process_time() - mine < 0.2
