"""The dashboard pages through Streamlit's AppTest (widgets set, then the figures and numbers shown are
checked against perfsim's own predictions), and the standalone HTML report."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from plotly.offline import get_plotlyjs
from streamlit.testing.v1 import AppTest

import perfsim
from perfsim import viz
from perfsim.dashboards import MAIN_PAGE, PAGE_FILES, common
from perfsim.device import builtin_devices, get_device
from perfsim.errors import UserError
from perfsim.model import get_model
from perfsim.quant import Formats, quant_format
from perfsim.report import profile_record
from perfsim.roofline import predict, resolve_threads, unit_roofs
from perfsim.workload import decode_ops

MINI = get_model("phi-3-mini")
A16_YAML = (Path(builtin_devices()["a16"].path)).read_text(encoding="utf-8")
# Measured / predicted time per op kind in the fake host profile: distinct, so each group's error is known.
HOST_SLOWDOWN = {"gemv": 1.25, "attention": 1.6}
OTHER_SLOWDOWN = 2.0


@pytest.fixture(autouse=True)
def no_host_profile_of_this_machine(monkeypatch, tmp_path):
    """Pages look for a saved host profile at a default path; point it at an empty place."""
    monkeypatch.setenv("PERFSIM_HOST_PROFILE", str(tmp_path / "no-host-profile.json"))


def page(title: str) -> AppTest:
    return AppTest.from_file(str(PAGE_FILES[title]), default_timeout=60)


def charts(at: AppTest) -> list[dict]:
    return [json.loads(element.proto.spec) for element in at.get("plotly_chart")]


def traces(chart: dict, name_part: str) -> list[dict]:
    return [t for t in chart["data"] if name_part in t.get("name", "")]


def host_profile_record(version: str = perfsim.__version__) -> dict:
    """A record shaped like `perfsim profile --device host --json`: the i7-1360p's prediction as the
    host's, and 'measured' times that are the predicted ones times HOST_SLOWDOWN."""
    record = profile_record(predict(MINI, Formats(), get_device("i7-1360p"), 256))
    record["device"] = "host"
    measured_ops = [{"name": op["name"], "time_s": op["time_s"] * HOST_SLOWDOWN.get(op["kind"], OTHER_SLOWDOWN)}
                    for op in record["predicted"]["ops"]]
    measured_tokens_per_s = 1 / sum(op["time_s"] for op in measured_ops)
    predicted_tokens_per_s = record["predicted"]["decode_tokens_per_s"]
    record["measured"] = {"decode_tokens_per_s": measured_tokens_per_s, "ms_per_token": 1e3 / measured_tokens_per_s, "ops": measured_ops}
    record["error"] = {"decode_tokens_per_s": (predicted_tokens_per_s - measured_tokens_per_s) / measured_tokens_per_s,
                       "ops": [{"name": m["name"], "time_s": (p["time_s"] - m["time_s"]) / m["time_s"]}
                               for p, m in zip(record["predicted"]["ops"], measured_ops)]}
    record["perfsim_version"] = version
    return record


def device_yaml(**changes) -> bytes:
    """The a16 profile renamed to my-phone, with `changes` applied to its memory and gpu unit."""
    data = yaml.safe_load(A16_YAML)
    data["name"], data["display_name"] = "my-phone", "My phone"
    for key, value in changes.items():
        section = data["memory"] if key in data["memory"] else data["units"]["gpu"]
        section[key] = value
    return yaml.safe_dump(data).encode()


# --- Roofline ---------------------------------------------------------------------------------------

def test_roofline_shows_the_roofs_of_each_device_and_its_decode_ops():
    at = page("Roofline").run()
    at.multiselect(key="devices").set_value(["a16", "rtx-4090"])
    at.number_input(key="context").set_value(1024)
    at.run()
    assert not at.exception and not at.error
    [chart] = charts(at)
    assert chart["layout"]["title"]["text"] == "Roofline: phi-3-mini, weights q4_0, KV cache f16, context 1,024 tokens"
    assert chart["layout"]["xaxis"]["type"] == chart["layout"]["yaxis"]["type"] == "log"
    for name in ("a16", "rtx-4090"):
        device = get_device(name)
        unit = device.unit()
        roofs = unit_roofs(device, unit, resolve_threads(unit, None))
        roof_traces = traces(chart, f"{name} {unit.name} ")
        roof_traces = [t for t in roof_traces if t["name"].endswith(" roof")]
        assert sorted(t["name"] for t in roof_traces) == sorted(f"{name} {unit.name} {p} roof" for p in unit.peak_tflops)
        for t in roof_traces:  # flat part at the achievable peak, slope = achievable bandwidth
            assert max(t["y"]) == pytest.approx(roofs.flops(t["name"].split()[-2]))
            assert t["y"][0] / t["x"][0] == pytest.approx(roofs.bandwidth_bytes_per_s)
        prediction = predict(MINI, Formats(), device, 1024)
        expected = {t.op.name: t.op.flops / t.time_s for t in prediction.ops if t.op.flops > 0}
        op_traces = traces(chart, f"{name} {unit.name} ops")
        shown = {c[0]: y for t in op_traces for c, y in zip(t["customdata"], t["y"])}
        assert shown == pytest.approx(expected)
        lm_head = next(t for t in prediction.ops if t.op.name == "lm_head")
        assert any(t["name"] == f"{name} {unit.name} ops, {lm_head.bound}-bound" and "lm_head" in [c[0] for c in t["customdata"]] for t in op_traces)
    assert at.query_params["devices"] == "a16,rtx-4090" and at.query_params["context"] == "1024"


def test_roofline_every_unit_adds_their_roofs():
    at = page("Roofline").run()
    at.checkbox(key="all_units").check().run()
    [chart] = charts(at)
    device = get_device("a16")
    expected = []
    for unit in device.units.values():
        try:
            unit_roofs(device, unit, resolve_threads(unit, None))
        except UserError:  # a unit the roofline refuses is reported, not drawn
            continue
        expected += [f"a16 {unit.name} {p} roof" for p in unit.peak_tflops]
    assert sorted(t["name"] for t in chart["data"] if t["name"].endswith(" roof")) == sorted(expected)
    assert len(at.warning) == len(viz.refused_units([device]))


def test_roofline_starts_from_the_url_query_parameters():
    at = page("Roofline")
    at.query_params.update({"devices": "m2,t4", "context": "2048", "weights": "q8_0", "kv_cache": "f32", "all_units": "false"})
    at.run()
    assert at.multiselect(key="devices").value == ["m2", "t4"]
    assert at.number_input(key="context").value == 2048
    assert at.selectbox(key="weights").value == "q8_0"
    [chart] = charts(at)
    assert chart["layout"]["title"]["text"] == "Roofline: phi-3-mini, weights q8_0, KV cache f32, context 2,048 tokens"
    assert {t["name"].split(" ops")[0] for t in chart["data"] if " ops" in t["name"]} == {"m2 gpu", "t4 gpu"}


def test_roofline_ignores_query_parameters_it_cannot_use():
    at = page("Roofline")
    at.query_params.update({"devices": "nonesuch", "context": "-3", "weights": "q3_k", "model": "gpt-5"})
    at.run()
    assert not at.exception
    assert at.multiselect(key="devices").value == ["a16"]
    assert at.number_input(key="context").value == viz.DEFAULT_CONTEXT
    assert at.selectbox(key="weights").value == "q4_0" and at.selectbox(key="model").value == "phi-3-mini"


def test_context_is_clamped_to_a_newly_chosen_models_limit():
    at = page("Roofline").run()
    at.selectbox(key="model").set_value("phi-3-small").run()
    at.number_input(key="context").set_value(8000).run()
    at.selectbox(key="model").set_value("phi-3-mini").run()
    assert not at.exception
    assert at.number_input(key="context").value == MINI.max_context == 4096
    assert charts(at)[0]["layout"]["title"]["text"].endswith("context 4,096 tokens")


def test_roofline_uploaded_device_that_fails_validation_shows_the_message():
    at = page("Roofline").run()
    at.file_uploader(key="device_yaml").set_value(("my-phone.yaml", device_yaml(compute_efficiency=1.5), "application/x-yaml"))
    at.run()
    assert not at.exception
    [error] = at.error
    assert "my-phone.yaml: units.gpu.compute_efficiency: expected a number <= 1, got 1.5" in error.value
    [chart] = charts(at)
    assert not traces(chart, "my-phone")  # left out, the rest of the page still drawn
    assert traces(chart, "a16 gpu ops")


def test_roofline_uploaded_device_is_drawn_beside_the_chosen_ones():
    at = page("Roofline").run()
    at.file_uploader(key="device_yaml").set_value(("my-phone.yaml", device_yaml(peak_bandwidth_gb_s=102.4), "application/x-yaml"))
    at.run()
    assert not at.error and not at.exception
    [chart] = charts(at)
    [a16_f32] = traces(chart, "a16 gpu f32 roof")
    [mine_f32] = traces(chart, "my-phone gpu f32 roof")
    assert mine_f32["y"][0] / mine_f32["x"][0] == pytest.approx(2 * a16_f32["y"][0] / a16_f32["x"][0])  # twice the bandwidth


def test_roofline_uploaded_device_with_a_built_in_name_is_told_apart():
    at = page("Roofline").run()
    at.file_uploader(key="device_yaml").set_value(("my-a16.yaml", A16_YAML.encode(), "application/x-yaml"))
    at.run()
    [chart] = charts(at)
    assert traces(chart, "a16 gpu f32 roof") and traces(chart, "a16 (uploaded) gpu f32 roof")


def test_roofline_uploaded_file_that_is_not_yaml_shows_the_parse_error():
    at = page("Roofline").run()
    at.file_uploader(key="device_yaml").set_value(("broken.yaml", b"name: [unclosed\n", "application/x-yaml"))
    at.run()
    assert not at.exception
    assert "broken.yaml: not valid YAML" in at.error[0].value


def test_roofline_places_the_host_profile_measured_ops(tmp_path, monkeypatch):
    record = host_profile_record()
    path = tmp_path / "host-profile.json"
    path.write_text(json.dumps(record))
    monkeypatch.setenv("PERFSIM_HOST_PROFILE", str(path))
    at = page("Roofline").run()
    [chart] = charts(at)
    [measured] = traces(chart, "host measured (phi-3-mini q4_0, context 256)")
    [predicted] = traces(chart, "host predicted (phi-3-mini q4_0, context 256)")
    times = {op["name"]: op["time_s"] for op in record["measured"]["ops"]}
    flops = {op["name"]: op["flops"] for op in record["predicted"]["ops"]}
    assert {c[0]: y for c, y in zip(measured["customdata"], measured["y"])} == pytest.approx(
        {name: flops[name] / times[name] for name in times if flops[name] > 0})
    assert len(predicted["x"]) == len(measured["x"])


# --- Devices ----------------------------------------------------------------------------------------

def test_devices_table_and_charts_show_the_predictions():
    at = page("Devices").run()
    at.selectbox(key="weights").set_value("q8_0")
    at.number_input(key="context").set_value(512)
    at.run()
    assert not at.exception and not at.error
    formats = Formats(weights=quant_format("q8_0"))
    table = at.dataframe[0].value.set_index("device")
    assert sorted(table.index) == sorted(builtin_devices())
    columns = json.loads(at.dataframe[0].proto.columns)
    assert columns["decode tokens/s"]["type_config"]["format"] == "%.2f"
    a16 = predict(MINI, formats, get_device("a16"), 512)
    assert f"{table.loc['a16', 'decode tokens/s']:.2f}" == f"{a16.decode_tokens_per_s:.2f}"
    assert table.loc["a16", "decode tokens/s"] == pytest.approx(a16.decode_tokens_per_s, rel=1e-12)
    assert table.loc["a16", "TTFT ms"] == pytest.approx(a16.ttft_ms)
    assert table.loc["a16", "memory GB"] == pytest.approx(a16.memory.total_bytes / 1e9)
    assert table.loc["a16", "usable GB"] == 4
    assert table.loc["a16", "published"] == "more than 12 tokens/s (q4_0)"
    assert table.loc["a16", "predicted vs published %"] == pytest.approx(100 * (a16.decode_tokens_per_s - 12) / 12)

    speed, memory = charts(at)
    [bars] = traces(speed, "predicted decode tokens/s")
    assert len(bars["y"]) == len(builtin_devices())
    assert dict(zip(bars["y"], bars["x"]))["a16 gpu"] == pytest.approx(a16.decode_tokens_per_s)
    assert bars["x"] == sorted(bars["x"])  # slowest at the bottom, fastest on top
    [published] = traces(speed, "published measurement")
    assert published["y"] == ["a16 gpu"] and published["x"] == [12]
    [weights] = traces(memory, "weight")
    assert dict(zip(weights["y"], weights["x"]))["a16"] == pytest.approx(100 * a16.memory.weight_bytes / 4e9)


def test_devices_every_unit_gives_a_row_per_unit():
    at = page("Devices").run()
    at.checkbox(key="all_units").check().run()
    table = at.dataframe[0].value
    expected_rows = sum(len(d.units) for d in builtin_devices().values()) - len(at.warning)
    assert len(table) == expected_rows
    assert {u.split()[0] for u in table[table.device == "a16"].unit} >= {"gpu", "cpu"}


def test_devices_uploaded_device_that_fails_validation_shows_the_message():
    data = yaml.safe_load(device_yaml())
    del data["sources"]["memory.peak_bandwidth_gb_s"]
    at = page("Devices").run()
    at.file_uploader(key="device_yaml").set_value(("my-phone.yaml", yaml.safe_dump(data).encode(), "application/x-yaml"))
    at.run()
    assert not at.exception
    assert "no source for memory.peak_bandwidth_gb_s" in at.error[0].value
    assert "my-phone" not in set(at.dataframe[0].value.device)


def test_devices_uploaded_device_gets_its_row():
    at = page("Devices").run()
    at.file_uploader(key="device_yaml").set_value(("my-phone.yaml", device_yaml(usable_gb=2), "application/x-yaml"))
    at.run()
    table = at.dataframe[0].value.set_index("device")
    assert bool(table.loc["my-phone", "fits"]) is False  # 2.27 GB of q4_0 phi-3-mini in 2 GB
    assert table.loc["my-phone", "decode tokens/s"] == pytest.approx(table.loc["a16", "decode tokens/s"])


# --- Context ----------------------------------------------------------------------------------------

def first_context_where_kv_exceeds_weights(model, formats) -> int | None:
    """By brute force over every context, independent of viz.kv_crossover's bisection."""
    for context in range(1, model.max_context + 1):
        ops = decode_ops(model, formats, context)
        if sum(op.cost.kv_bytes * op.count for op in ops) > sum(op.cost.weight_bytes * op.count for op in ops):
            return context
    return None


def test_context_page_marks_where_kv_reads_overtake_weight_reads():
    at = page("Context").run()
    at.selectbox(key="kv_cache").set_value("f32")
    at.multiselect(key="devices").set_value(["a16", "m2"])
    at.run()
    assert not at.exception and not at.error
    formats = Formats(kv_cache=quant_format("f32"))
    crossover = first_context_where_kv_exceeds_weights(MINI, formats)
    assert crossover is not None and 1 < crossover < MINI.max_context
    assert at.metric[0].value == f"{crossover:,} tokens"
    speed, byte_chart = charts(at)
    lines = [t for t in speed["data"] if t["mode"] == "lines+markers"]
    assert [t["name"] for t in lines] == ["a16 gpu", "m2 gpu"]
    for t in lines:
        device = get_device(t["name"].split()[0])
        assert t["x"][0] == 128 and t["x"][-1] == MINI.max_context
        assert t["y"][-1] == pytest.approx(predict(MINI, formats, device, MINI.max_context).decode_tokens_per_s)
        assert t["y"] == sorted(t["y"], reverse=True)  # more context, more KV bytes, slower
    assert crossover in [shape["x0"] for shape in speed["layout"]["shapes"]]
    assert crossover in [shape["x0"] for shape in byte_chart["layout"]["shapes"]]


def test_context_page_says_when_kv_stays_below_weights():
    at = page("Context").run()  # q4_0 weights, f16 KV cache: 2.1 GB of weights vs 1.6 GB of KV at 4096
    assert first_context_where_kv_exceeds_weights(MINI, Formats()) is None
    assert at.metric[0].value == "beyond the limit"
    assert "stay below weight bytes up to phi-3-mini's limit of 4,096 tokens" in at.markdown[0].value


# --- Host profile -----------------------------------------------------------------------------------

def upload_host_json(at: AppTest, record: dict, name: str = "host.json") -> AppTest:
    at.file_uploader(key="host_json").set_value((name, json.dumps(record).encode(), "application/json"))
    return at.run()


def test_host_page_shows_predicted_vs_measured_per_op_group():
    record = host_profile_record()
    at = upload_host_json(page("Host profile").run(), record)
    assert not at.exception and not at.error
    assert [m.value for m in at.metric] == [
        f"{record['predicted']['decode_tokens_per_s']:.2f}", f"{record['measured']['decode_tokens_per_s']:.2f}",
        f"{100 * record['error']['decode_tokens_per_s']:+.1f}%"]
    table = at.dataframe[0].value.set_index("op group")
    for kind in ("gemv", "attention", "norm"):
        slowdown = HOST_SLOWDOWN.get(kind, OTHER_SLOWDOWN)
        predicted_ms = 1e3 * sum(op["time_s"] for op in record["predicted"]["ops"] if op["kind"] == kind)
        assert table.loc[kind, "predicted ms/token"] == pytest.approx(predicted_ms)
        assert table.loc[kind, "measured ms/token"] == pytest.approx(slowdown * predicted_ms)
        assert table.loc[kind, "time error %"] == pytest.approx(100 * (1 - slowdown) / slowdown)  # (predicted - measured) / measured
    assert table.loc["total", "measured ms/token"] == pytest.approx(record["measured"]["ms_per_token"])
    [chart] = charts(at)
    assert [t["name"] for t in chart["data"]] == ["predicted", "measured"]
    assert chart["data"][1]["text"][chart["data"][1]["x"].index("gemv")] == "-20%"


def test_host_page_says_how_the_passes_and_probes_before_the_steps_found_the_host():
    record = host_profile_record()
    at = upload_host_json(page("Host profile").run(), record)
    assert not any("host as measured" in c.value for c in at.caption)  # a record without them
    record["measured"].update(step_stream_gb_s=[10.0, 12.5], step_kv_stream_gb_s=[8.0, 9.0], step_compute_gflops=[50.0, 56.0])
    record["host_profile"] = {"path": "host.yaml", "calibration": {}, "compute_probe_gflops": 55.0}
    at = upload_host_json(page("Host profile").run(), record)
    assert not at.exception and not at.error
    assert ("host as measured before each step: weights read 10.0-12.5 GB/s, K/V read 8.0-9.0 GB/s, compute probe 50-56 GFLOP/s "
            "(calibration: 55; GEMV and attention compute roofs scaled by the ratio)") in [c.value for c in at.caption]
    assert not at.warning  # no ratio in the record: no warning
    record["measured"]["threads"] = 2  # as measurement_record has it
    record["host_profile"]["memory_state_ratio"] = 1.5  # the weights read 1.5x the calibration's bandwidth
    at = upload_host_json(page("Host profile").run(), record)
    assert [w.value for w in at.warning] == [viz.memory_state_text(record)]
    assert at.warning[0].value.startswith("warning: this run's weights read 1.50x the calibration's bandwidth at 2 thread(s)")
    record["host_profile"]["memory_state_ratio"] = 1.1
    assert not upload_host_json(page("Host profile").run(), record).warning


def test_host_page_refuses_a_profile_from_another_version():
    at = upload_host_json(page("Host profile").run(), host_profile_record(version="0.2.0"), "old.json")
    assert not at.exception
    [error] = at.error
    assert "written by perfsim 0.2.0, this is perfsim " + perfsim.__version__ in error.value
    assert "major.minor" in error.value
    assert not at.dataframe


def test_host_page_refuses_a_profile_without_the_measured_side():
    record = host_profile_record()
    del record["measured"], record["error"]
    at = upload_host_json(page("Host profile").run(), record, "predicted-only.json")
    assert not at.exception
    assert "predicted-only.json: missing measured, error" in at.error[0].value


def test_host_page_refuses_text_that_is_not_json():
    at = page("Host profile").run()
    at.file_uploader(key="host_json").set_value(("notes.json", b"decode was fast", "application/json"))
    at.run()
    assert not at.exception
    assert "notes.json: not valid JSON" in at.error[0].value


def test_host_page_measuring_is_offered_only_when_perfsim_can_measure():
    at = page("Host profile").run()
    if all(importlib.util.find_spec(name) for name in common.MEASURING_MODULES):
        assert {b.key for b in at.button} == {"calibrate", "measure"}
    else:
        assert any("not available in this version" in info.value for info in at.info)
    assert any("No host profile yet" in info.value for info in at.info)


@pytest.mark.skipif(not all(importlib.util.find_spec(name) for name in common.MEASURING_MODULES), reason="this perfsim cannot measure")
def test_host_page_buttons_calibrate_then_measure_and_show_the_result(monkeypatch, tmp_path):
    """The page's wiring, with perfsim's measuring functions replaced by fakes (the real ones take a
    minute and are tested with the CLI): progress reaches the bar, the record is saved and shown."""
    from perfsim import calibrate, compare, report, run

    calls = []

    def fake_calibrate_host(progress=None):
        for done in range(3):
            progress(done, 2, f"step {done}")
        calls.append("calibrate")
        # calibrated in a slower memory state than the calibration before it (calibrate.slow_memory_warning)
        calibration = {"seconds": 42.0, "previous_bandwidth_gb_s_by_threads": {1: 11.6}, "previous_measured_at": "2026-11-28T12:00:00+00:00"}
        return SimpleNamespace(calibration=calibration, display_name="Fake CPU (this host, calibrated)",
                               unit=lambda: SimpleNamespace(bandwidth_gb_s_by_threads={1: 7.3}, compute_probe_gflops_by_threads={}))

    record = host_profile_record()
    monkeypatch.setattr(calibrate, "calibrate_host", fake_calibrate_host)
    monkeypatch.setattr(calibrate, "load_host_profile", lambda message=None: "host device")
    monkeypatch.setattr(run, "plan_run", lambda **plan: calls.append(plan) or "plan")
    monkeypatch.setattr(run, "execute", lambda plan, progress=None, calibrated=None, memory_state_remeasures=0:
                        calls.append((calibrated, memory_state_remeasures)) or "measurement")
    monkeypatch.setattr(compare, "compare", lambda device, measurement: (device, measurement))
    monkeypatch.setattr(report, "comparison_record", lambda comparison: record if comparison == ("host device", "measurement") else None)
    at = page("Host profile").run()
    at.button(key="calibrate").click().run()
    assert calls == ["calibrate"] and "Calibrated in 42 s" in at.success[0].value
    assert len(at.warning) == 1 and "0.63x the previous calibration's 11.6" in at.warning[0].value
    at.number_input(key="context").set_value(512)
    at.button(key="measure").click().run()
    assert not at.exception and not at.error
    assert calls[1] == {"model_name": "phi-3-mini", "weights": "q4_0", "kv_cache": "f16", "context": 512}
    assert calls[2] == ("host device", compare.MEMORY_STATE_REMEASURES)  # measured again in another memory state, as the CLI
    assert json.loads(Path(os.environ["PERFSIM_HOST_PROFILE"]).read_text()) == record  # saved for the Roofline page
    assert at.metric[1].value == f"{record['measured']['decode_tokens_per_s']:.2f}"


# --- speed path and the HTML report -----------------------------------------------------------------

def test_prediction_pages_never_import_numba():
    """Roofline and Devices rerun on every widget change; Numba's import alone takes about a second."""
    script = (
        "import sys\nfrom streamlit.testing.v1 import AppTest\nfrom perfsim.dashboards import PAGE_FILES\n"
        "for title in ('Roofline', 'Devices'):\n"
        "    at = AppTest.from_file(str(PAGE_FILES[title]), default_timeout=60).run()\n"
        "    assert not at.exception, at.exception\n"
        "print(sorted(m for m in sys.modules if m == 'numba' or m.startswith('numba.')))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_main_page_is_the_roofline_script():
    assert Path(MAIN_PAGE).is_file() and Path(MAIN_PAGE) == PAGE_FILES["Roofline"]


def test_html_report_is_one_standalone_file_with_every_figure(tmp_path):
    host_json = tmp_path / "host.json"
    host_json.write_text(json.dumps(host_profile_record()))
    path = viz.write_html_report(tmp_path / "report.html", context=512, host_profile_json=host_json)
    assert path == tmp_path / "report.html" and sorted(p.name for p in tmp_path.iterdir()) == ["host.json", "report.html"]
    page_text = path.read_text(encoding="utf-8")
    assert get_plotlyjs()[:2000] in page_text  # the plotly.js bundle itself, inline
    assert not re.search(r"<script[^>]*\bsrc=", page_text)  # nothing to fetch: it opens offline
    titles = [viz.figure_title(f) for f in viz.report_figures("phi-3-mini", "q4_0", "f16", 512, host_profile_record())]
    assert len(titles) == 6 and titles[0] == "Roofline: phi-3-mini, weights q4_0, KV cache f16, context 512 tokens"
    for title in titles:
        assert json.dumps(title)[1:-1] in page_text
    assert page_text.count('class="plotly-graph-div"') == 6


def test_html_report_refuses_a_host_profile_from_another_version(tmp_path):
    host_json = tmp_path / "old.json"
    host_json.write_text(json.dumps(host_profile_record(version="9.1.0")))
    with pytest.raises(UserError, match="written by perfsim 9.1.0"):
        viz.write_html_report(tmp_path / "report.html", host_profile_json=host_json)
    assert not (tmp_path / "report.html").exists()
