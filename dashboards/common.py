"""What every page shares: the sidebar inputs, their state in st.session_state and in the URL, and the
cached calls into perfsim.viz (keyed on plain strings and numbers, so a rerun with the same inputs
costs a cache lookup)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import streamlit as st

from perfsim import viz
from perfsim.device import Device, builtin_devices
from perfsim.errors import UserError
from perfsim.files import write_bytes_atomically
from perfsim.model import ModelSpec, get_model, preset_models
from perfsim.quant import Formats

DEFAULT_STATE = {
    "model": "phi-3-mini",
    "weights": "q4_0",
    "kv_cache": "f16",
    "context": viz.DEFAULT_CONTEXT,
    "devices": ["a16"],
    "all_units": False,
}
HOST_TEXT, HOST_WHERE = "host_profile_text", "host_profile_where"  # the loaded host profile JSON, shared by pages


def _from_query(key: str, text: str):
    """A query parameter's value for `key`, or None if it is not one the widget could hold."""
    if key == "model":
        return text if text in preset_models() else None
    if key == "weights":
        return text if text in viz.WEIGHT_FORMATS else None
    if key == "kv_cache":
        return text if text in viz.KV_CACHE_FORMATS else None
    if key == "context":
        return int(text) if text.isdigit() and int(text) >= 1 else None
    if key == "devices":
        names = [name for name in text.split(",") if name in builtin_devices()]
        return names or None
    if key == "all_units":
        return text.lower() in ("1", "true", "yes")
    return None


def _to_query(value) -> str:
    if isinstance(value, list):
        return ",".join(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def init_state() -> None:
    """The first run of a session takes its inputs from the URL (a shared view), else the defaults.
    Later runs keep them: re-assigning a key stops Streamlit from dropping the value of a widget that
    the current page does not draw, so inputs survive a page switch."""
    for key, default in DEFAULT_STATE.items():
        if key in st.session_state:
            st.session_state[key] = st.session_state[key]
            continue
        value = _from_query(key, st.query_params[key]) if key in st.query_params else None
        st.session_state[key] = default if value is None else value


def sync_query_params() -> None:
    """Write every input to the URL, so that copying it shares this view; only when something changed."""
    wanted = {key: _to_query(st.session_state[key]) for key in DEFAULT_STATE if key in st.session_state}
    if st.query_params.to_dict() != wanted:
        st.query_params.from_dict(wanted)


def model_inputs() -> tuple[ModelSpec, Formats, int]:
    """Sidebar: model, weights and KV-cache formats, context (clamped to the chosen model's limit)."""
    sidebar = st.sidebar
    sidebar.selectbox("Model", list(preset_models()), key="model")
    model = get_model(st.session_state["model"])
    sidebar.selectbox("Weights format", viz.WEIGHT_FORMATS, key="weights", help="int4_gN: grouped int4, N weights per fp16 scale")
    sidebar.selectbox("KV-cache format", viz.KV_CACHE_FORMATS, key="kv_cache")
    # A context longer than a newly chosen model allows would be refused by the widget: clamp it first.
    st.session_state["context"] = max(1, min(int(st.session_state["context"]), model.max_context))
    sidebar.number_input("Context (tokens)", min_value=1, max_value=model.max_context, step=128, key="context",
                         help="positions the decoded token attends to, itself included")
    formats = viz.formats_from_names(st.session_state["weights"], st.session_state["kv_cache"])
    return model, formats, int(st.session_state["context"])


def device_inputs() -> list[str]:
    st.sidebar.multiselect("Devices", list(builtin_devices()), key="devices")
    return list(st.session_state["devices"])


def all_units_input(label: str) -> bool:
    st.sidebar.checkbox(label, key="all_units")
    return bool(st.session_state["all_units"])


def uploaded_device_yaml() -> tuple[str, bytes] | None:
    """Sidebar: a device profile YAML of the user's. A file that fails validation is reported in the
    page with the loader's message and left out; returns (file name, contents) of a valid one."""
    uploaded = st.sidebar.file_uploader("Your device profile (YAML)", type=["yaml", "yml"], key="device_yaml",
                                        help="same schema as perfsim's devices/*.yaml")
    if uploaded is None:
        return None
    contents = uploaded.getvalue()
    try:
        parse_device(uploaded.name, contents)
    except UserError as e:
        st.error(f"Device profile not loaded: {e}")
        return None
    return uploaded.name, contents


@st.cache_data(max_entries=32, show_spinner=False)
def parse_device(where: str, contents: bytes) -> Device:
    return viz.device_from_yaml_text(contents, where)


def chosen_devices(device_names, uploaded: tuple[str, bytes] | None) -> list[Device]:
    """The named built-in profiles, then the uploaded one (renamed if it shares a built-in's name, so
    the charts can tell them apart)."""
    devices = [builtin_devices()[name] for name in device_names]
    if uploaded:
        device = parse_device(*uploaded)
        if device.name in builtin_devices():
            device = dataclasses.replace(device, name=f"{device.name} (uploaded)")
        devices.append(device)
    return devices


def host_profile_source() -> tuple[str, bytes] | None:
    """(where, JSON text) of the host profile loaded on the Host page in this session, else of the one
    at the default path if it exists, else None."""
    if st.session_state.get(HOST_TEXT) is not None:
        return st.session_state[HOST_WHERE], st.session_state[HOST_TEXT]
    path = viz.default_host_profile_path()
    return (str(path), path.read_bytes()) if path.is_file() else None


def host_record(source: tuple[str, bytes] | None) -> tuple[dict | None, str | None]:
    """(record, None), or (None, why the JSON was refused), or (None, None) when there is none."""
    if source is None:
        return None, None
    try:
        return parse_host_profile(*source), None
    except UserError as e:
        return None, str(e)


@st.cache_data(max_entries=8, show_spinner=False)
def parse_host_profile(where: str, text: bytes) -> dict:
    return viz.host_profile_from_text(text, where)


# Cached views: everything a page draws from its inputs. Arguments are hashable plain values, so the
# cache key is cheap; the host record is passed as its source text for the same reason.

@st.cache_data(max_entries=64, show_spinner=False)
def roofline_view(model_name: str, weights: str, kv_cache: str, context: int, device_names: tuple, uploaded,
                  host: tuple | None, all_units: bool):
    model, formats = get_model(model_name), viz.formats_from_names(weights, kv_cache)
    devices = chosen_devices(device_names, uploaded)
    preds, refused = viz.predictions(model, formats, context, devices)
    if all_units:
        refused = viz.refused_units(devices)
    host_rec = parse_host_profile(*host) if host else None
    title = f"Roofline: {viz.configuration_title(model, formats, context)}"
    points = [dict(device=viz.label(p), **pt) for p in preds for pt in viz.op_points(p)]
    return viz.roofline_figure(preds, host_rec, all_units=all_units, title=title), points, refused


@st.cache_data(max_entries=64, show_spinner=False)
def devices_view(model_name: str, weights: str, kv_cache: str, context: int, uploaded, all_units: bool):
    model, formats = get_model(model_name), viz.formats_from_names(weights, kv_cache)
    devices = chosen_devices(list(builtin_devices()), uploaded)
    preds, refused = viz.predictions(model, formats, context, devices, all_units=all_units)
    config = viz.configuration_title(model, formats, context)
    return (viz.device_rows(preds), refused, viz.devices_speed_figure(preds, title=f"Decode speed and time to first token: {config}"),
            viz.memory_figure(preds, title=f"Memory footprint vs usable memory: {config}"))


@st.cache_data(max_entries=64, show_spinner=False)
def context_view(model_name: str, weights: str, kv_cache: str, context: int, device_names: tuple):
    model, formats = get_model(model_name), viz.formats_from_names(weights, kv_cache)
    contexts = viz.context_grid(model.max_context)
    crossover = viz.kv_crossover(model, formats)
    sweep = viz.context_sweep(model, formats, chosen_devices(device_names, None), contexts)
    formats_text = f"{model.name}, weights {formats.weights.name}, KV cache {formats.kv_cache.name}"
    return (crossover, viz.crossover_text(model, crossover),
            viz.context_speed_figure(contexts, sweep, crossover, context, title=f"Decode speed vs context: {formats_text}"),
            viz.context_bytes_figure(model, formats, contexts, crossover, title=f"Bytes per token, weights vs KV cache: {formats_text}"))


@st.cache_data(max_entries=8, show_spinner=False)
def host_figure(where: str, text: bytes):
    record = parse_host_profile(where, text)
    return viz.host_comparison_figure(record, title=f"Host predicted vs measured: {viz.host_config_text(record)}")


MEASURING_MODULES = ("perfsim.calibrate", "perfsim.run", "perfsim.compare")


def measure_host_panel(model: ModelSpec, formats: Formats, context: int) -> None:
    """Buttons that calibrate the host and run a real decode of the sidebar's configuration, as
    `perfsim calibrate` and `perfsim profile --device host --json` do; the record is saved at the
    default path, where the Roofline page finds it too."""
    if any(importlib.util.find_spec(name) is None for name in MEASURING_MODULES):
        st.info("Calibration and measured decode are not available in this version of perfsim.")
        return
    from perfsim import calibrate  # imported here: it brings NumPy kernels the other pages never need

    if st.button("Calibrate this machine", key="calibrate", help="microbenchmarks of the kernels, under a minute"):
        bar = st.progress(0.0, text="calibrating")
        device = calibrate.calibrate_host(progress=lambda done, total, what: bar.progress(done / max(total, 1), text=what))
        st.success(f"Calibrated in {device.calibration['seconds']:.0f} s: {device.display_name}")
        for warning in calibrate.calibration_warnings(device):
            st.warning(warning)
    if st.button("Run a measured decode", key="measure", help=f"{model.name}, random {formats.weights.name} weights"):
        try:
            with st.status(f"Decoding {model.name} on this machine", expanded=True) as status:
                record = measured_host_record(model, formats, context, status.write)
                status.update(label="Measured", state="complete")
        except UserError as e:
            st.error(str(e))
            return
        text = json.dumps(record, indent=2).encode()
        path = viz.default_host_profile_path()
        try:
            write_bytes_atomically(path, text)
        except OSError as e:
            st.warning(f"Measured, but not saved at {path}: {e}")
        st.session_state[HOST_WHERE], st.session_state[HOST_TEXT] = str(path), text


def measured_host_record(model: ModelSpec, formats: Formats, context: int, say) -> dict:
    """The record of `perfsim profile --device host --json` for this configuration (random weights)."""
    from perfsim.calibrate import load_host_profile
    from perfsim.compare import MEMORY_STATE_REMEASURES, compare
    from perfsim.report import comparison_record
    from perfsim.run import execute, plan_run

    plan = plan_run(model_name=model.name, weights=formats.weights.name, kv_cache=formats.kv_cache.name, context=context)
    device = load_host_profile(message=say)
    # as the CLI does by default: a run in another memory state than the calibration's is measured again
    return comparison_record(compare(device, execute(plan, say, device, MEMORY_STATE_REMEASURES)))
