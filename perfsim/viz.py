"""Figures and tables for the dashboard and the HTML report: pure functions from predictions (and host
profile records) to Plotly figures and rows of plain values.

No Streamlit here, so the same figures go into `write_html_report`; and no Numba: the workload's cost
formulas are pure Python, so a page rerun stays in the milliseconds. Bytes are decimal (1e9 = 1 GB).
"""

from __future__ import annotations

import html
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import plotly.graph_objects as go
import yaml
from plotly.colors import qualitative
from plotly.subplots import make_subplots

import perfsim
from perfsim.device import Device, builtin_devices, device_from_data
from perfsim.errors import UserError
from perfsim.files import write_bytes_atomically
from perfsim.model import ModelSpec, get_model
from perfsim.quant import Formats
from perfsim.roofline import Prediction, predict, resolve_threads, unit_roofs
from perfsim.kernels.attention import KV_FORMAT_NAMES
from perfsim.workload import decode_ops, formats_from_names

GB = 1e9
WEIGHT_FORMATS = ("q4_0", "int4_g32", "int4_g128", "q8_0", "f16", "f32")
KV_CACHE_FORMATS = KV_FORMAT_NAMES  # what the decode engine can store its cache in
DEFAULT_CONTEXT = 256  # tokens, as `perfsim profile`
REPORT_DEVICES = ("a16", "ryzen-7840u", "rtx-4090")  # a phone, a laptop, a GPU: the roofline's spread
HOST_PROFILE_KEYS = ("device", "model", "quant", "context", "predicted", "measured", "error", "perfsim_version")
COLORS = qualitative.Plotly + qualitative.D3
PRECISION_DASH = {"f32": "solid", "f16": "dash", "int8": "dot"}
BOUND_SYMBOL = {"memory": "circle", "compute": "square", "overhead": "x"}
RELATION_SYMBOL = {">": "triangle-right", "<": "triangle-left", "=": "diamond", "~": "diamond-open"}


# --- inputs ---------------------------------------------------------------------------------------

def device_from_yaml_text(text: str | bytes, where: str) -> Device:
    """A device profile from the text of a YAML file (an upload); every failure is a UserError."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{where}: not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    return device_from_data(data, where)


def predictions(model: ModelSpec, formats: Formats, context: int, devices: list[Device], all_units: bool = False) -> tuple[list[Prediction], list[str]]:
    """One prediction per device at its default unit, or per unit of every device; and, for each unit
    the roofline refuses (a profile it cannot time), why, so a page can say what it left out."""
    preds, refused = [], []
    for device in devices:
        for unit_name in (device.units if all_units else [device.default_unit]):
            try:
                preds.append(predict(model, formats, device, context, unit_name=unit_name))
            except UserError as e:
                refused.append(f"{device.name} {unit_name}: {e}")
    return preds, refused


def label(p: Prediction) -> str:
    return f"{p.device.name} {p.unit.name}"


# --- roofline -------------------------------------------------------------------------------------

def roof_rows(device: Device, unit_names=None, threads_by_unit=None) -> list[dict]:
    """The roofs of a device's units: achievable bandwidth and compute for each precision the unit lists
    (a precision it lacks runs on the next one's roof, which is already drawn). CPU units at all cores
    unless `threads_by_unit` says otherwise."""
    rows = []
    for unit_name in unit_names or device.units:
        unit = device.unit(unit_name)
        threads = (threads_by_unit or {}).get(unit_name) or resolve_threads(unit, None)
        try:
            roofs = unit_roofs(device, unit, threads)
        except UserError:  # a unit the roofline cannot time; predictions() reports why
            continue
        for precision in unit.peak_tflops:
            flops_per_s = roofs.flops(precision)
            rows.append({
                "device": device.name, "unit": unit_name, "threads": threads, "precision": precision,
                "bandwidth_bytes_per_s": roofs.bandwidth_bytes_per_s, "flops_per_s": flops_per_s,
                "ridge_flops_per_byte": flops_per_s / roofs.bandwidth_bytes_per_s,
            })
    return rows


def refused_units(devices: list[Device]) -> list[str]:
    """The units whose roofs the roofline refuses to compute, with its reason."""
    refused = []
    for device in devices:
        for unit in device.units.values():
            try:
                unit_roofs(device, unit, resolve_threads(unit, None))
            except UserError as e:
                refused.append(f"{device.name} {unit.name}: {e}")
    return refused


def op_points(p: Prediction) -> list[dict]:
    """Each decode op as a roofline point; ops without FLOPs (a KV append) have no place on a log axis."""
    return [
        {
            "op": t.op.name, "kind": t.op.kind, "count": t.op.count, "flops": t.op.flops, "bytes": t.op.bytes,
            "intensity_flops_per_byte": t.op.flops / t.op.bytes, "time_s": t.time_s,
            "achieved_flops_per_s": t.op.flops / t.time_s, "bound": t.bound,
        }
        for t in p.ops if t.op.flops > 0 and t.op.bytes > 0
    ]


def host_op_points(record: dict, which: str) -> list[dict]:
    """Roofline points of a host profile record: `which` is "predicted" or "measured" (measured ops carry
    only a time; their FLOPs and bytes are the predicted op's of the same name, the same formula)."""
    predicted = {op["name"]: op for op in record["predicted"]["ops"]}
    times = {op["name"]: op["time_s"] for op in record[which]["ops"]}
    points = []
    for name, op in predicted.items():
        time_s = times.get(name)
        if not time_s or not op.get("flops") or not op.get("bytes"):
            continue
        points.append({
            "op": name, "kind": op["kind"], "count": op.get("count", 1), "flops": op["flops"], "bytes": op["bytes"],
            "intensity_flops_per_byte": op["flops"] / op["bytes"], "time_s": time_s,
            "achieved_flops_per_s": op["flops"] / time_s, "bound": op.get("bound", "") if which == "predicted" else "measured",
        })
    return points


_POINT_HOVER = (
    "<b>%{customdata[0]}</b> (%{customdata[1]}, x%{customdata[2]} per token)<br>"
    "FLOPs %{customdata[3]:.4s}<br>bytes %{customdata[4]:.4s}B<br>intensity %{x:.3g} FLOP/byte<br>"
    "time %{customdata[5]:.4f} ms/token<br>achieved %{y:.4s}FLOP/s<br>bound: %{customdata[6]}<extra>%{fullData.name}</extra>"
)


def _points_trace(points: list[dict], name: str, color: str, symbol: str) -> go.Scatter:
    return go.Scatter(
        x=[pt["intensity_flops_per_byte"] for pt in points],
        y=[pt["achieved_flops_per_s"] for pt in points],
        mode="markers", name=name,
        marker={"color": color, "size": 10, "line": {"width": 1, "color": "white"}, "symbol": symbol},
        customdata=[[pt["op"], pt["kind"], pt["count"], pt["flops"], pt["bytes"], 1e3 * pt["time_s"], pt["bound"]] for pt in points],
        hovertemplate=_POINT_HOVER,
    )


def _log_range(values, pad: float) -> list[float]:
    return [math.log10(min(values) / pad), math.log10(max(values) * pad)]


def roofline_figure(preds: list[Prediction], host_record: dict | None = None, all_units: bool = True, title: str | None = None) -> go.Figure:
    """Log-log roofline: the roofs of each prediction's device (every unit, or the predicted one), and
    the decode ops as points at (FLOPs / byte, FLOPs / predicted time); a host record adds its
    predicted and measured points."""
    roofs, drawn = [], set()
    for p in preds:
        for unit_name in (p.device.units if all_units else [p.unit.name]):
            if (p.device.name, unit_name) not in drawn:
                drawn.add((p.device.name, unit_name))
                roofs += roof_rows(p.device, [unit_name], {p.unit.name: p.threads})
    unit_keys = dict.fromkeys([(r["device"], r["unit"]) for r in roofs] + [(p.device.name, p.unit.name) for p in preds])
    color_of = {key: COLORS[i % len(COLORS)] for i, key in enumerate(unit_keys)}
    # (legend name, points, color, marker symbol): per prediction a trace per bound, so the legend
    # explains the symbols; the host's in black, open diamonds predicted and filled ones measured.
    point_traces = [
        (f"{label(p)} ops, {bound}-bound", [pt for pt in op_points(p) if pt["bound"] == bound], color_of[(p.device.name, p.unit.name)], symbol)
        for p in preds for bound, symbol in BOUND_SYMBOL.items()
    ]
    if host_record is not None:
        point_traces += [(f"host {which} ({host_short_config(host_record)})", host_op_points(host_record, which), "black", symbol)
                         for which, symbol in (("predicted", "diamond-open"), ("measured", "diamond"))]
    point_traces = [t for t in point_traces if t[1]]
    all_points = [pt for _, pts, _, _ in point_traces for pt in pts]

    x_range = _log_range([pt["intensity_flops_per_byte"] for pt in all_points] + [r["ridge_flops_per_byte"] for r in roofs] or [0.1, 100], 4.0)
    x_lo, x_hi = 10 ** x_range[0], 10 ** x_range[1]
    fig = go.Figure()
    for r in roofs:
        ridge = r["ridge_flops_per_byte"]
        xs = [x_lo, min(max(ridge, x_lo), x_hi), x_hi]
        fig.add_trace(go.Scatter(
            x=xs, y=[min(r["bandwidth_bytes_per_s"] * x, r["flops_per_s"]) for x in xs], mode="lines",
            name=f"{r['device']} {r['unit']} {r['precision']} roof", legendgroup=f"{r['device']} {r['unit']}",
            line={"color": color_of[(r["device"], r["unit"])], "dash": PRECISION_DASH[r["precision"]], "width": 2},
            hovertemplate=(f"<b>{r['device']} {r['unit']}</b>" + (f", {r['threads']} threads" if r["threads"] else "")
                           + f"<br>memory roof {r['bandwidth_bytes_per_s'] / GB:.1f} GB/s<br>{r['precision']} roof "
                           f"{r['flops_per_s'] / 1e12:.3g} TFLOP/s<br>ridge {ridge:.3g} FLOP/byte<extra></extra>"),
        ))
    for name, pts, color, symbol in point_traces:
        fig.add_trace(_points_trace(pts, name, color, symbol))
    y_range = _log_range([pt["achieved_flops_per_s"] for pt in all_points] + [r["flops_per_s"] for r in roofs] or [1e9, 1e12], 3.0)
    fig.update_layout(
        title=title or "Roofline",
        xaxis={"type": "log", "title": "arithmetic intensity (FLOP/byte)", "range": x_range},
        yaxis={"type": "log", "title": "achieved FLOP/s", "exponentformat": "SI", "range": y_range},
        legend={"font": {"size": 11}}, margin={"t": 60}, height=max(560, 30 * len(fig.data) + 160),  # room for the legend
    )
    return fig


# --- devices --------------------------------------------------------------------------------------

def model_references(p: Prediction) -> list:
    """Published measurements of this model on this prediction's device and unit (a reference that names
    no unit is placed on the device's default unit)."""
    return [r for r in p.device.references if r.model == p.model.name and (r.unit or p.device.default_unit) == p.unit.name]


def device_rows(preds: list[Prediction]) -> list[dict]:
    rows = []
    for p in preds:
        refs = model_references(p)
        rows.append({
            "device": p.device.name,
            "unit": p.unit.name + (f" ({p.threads} threads)" if p.threads else ""),
            "decode tokens/s": p.decode_tokens_per_s,
            "ms/token": p.ms_per_token,
            "TTFT ms": p.ttft_ms,
            "memory GB": p.memory.total_bytes / GB,
            "usable GB": p.memory_capacity_bytes / GB,
            "fits": p.fits_in_memory,
            "published": "; ".join(f"{r.claim} ({r.weights})" for r in refs),
            "predicted vs published %": (100 * (p.decode_tokens_per_s - refs[0].decode_tokens_per_s) / refs[0].decode_tokens_per_s) if refs else None,
        })
    return rows


def devices_speed_figure(preds: list[Prediction], title: str | None = None) -> go.Figure:
    """Decode tokens/s and time to first token side by side, fastest device on top; published
    references for the same model as markers on the tokens/s bars."""
    preds = sorted(preds, key=lambda p: p.decode_tokens_per_s)
    labels = [label(p) for p in preds]
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=("decode tokens/s (predicted)", "time to first token, ms (predicted)"))
    fig.add_trace(go.Bar(y=labels, x=[p.decode_tokens_per_s for p in preds], orientation="h", name="predicted decode tokens/s",
                         marker_color=COLORS[0], text=[f"{p.decode_tokens_per_s:.1f}" for p in preds], textposition="auto",
                         hovertemplate="%{y}: %{x:.2f} tokens/s<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Bar(y=labels, x=[p.ttft_ms for p in preds], orientation="h", name="predicted TTFT ms",
                         marker_color=COLORS[1], text=[f"{p.ttft_ms:.0f}" for p in preds], textposition="auto",
                         hovertemplate="%{y}: %{x:.1f} ms to first token (prompt %{customdata} tokens)<extra></extra>",
                         customdata=[p.prompt_tokens for p in preds]), row=1, col=2)
    refs = [(label(p), r) for p in preds for r in model_references(p)]
    if refs:
        fig.add_trace(go.Scatter(
            y=[lab for lab, _ in refs], x=[r.decode_tokens_per_s for _, r in refs], mode="markers", name="published measurement",
            marker={"symbol": [RELATION_SYMBOL[r.relation] for _, r in refs], "size": 16, "color": "black"},
            customdata=[[r.claim, r.weights, r.source] for _, r in refs],
            hovertemplate="%{y}: published %{customdata[0]} (%{customdata[1]})<br>%{customdata[2]}<extra></extra>",
        ), row=1, col=1)
    fig.update_layout(title=title or "Decode speed and time to first token", height=max(340, 28 * len(preds) + 180),
                      legend={"orientation": "h", "y": -0.25}, margin={"t": 90})
    fig.update_xaxes(title_text="tokens/s", row=1, col=1)
    fig.update_xaxes(title_text="ms", row=1, col=2)
    return fig


def memory_figure(preds: list[Prediction], title: str | None = None) -> go.Figure:
    """Resident bytes (weights + KV cache + activations) as a share of each device's usable memory, so
    devices from 4 GB to 80 GB share one linear axis; past 100% the model does not fit. The footprint
    does not depend on the unit: one bar per device."""
    by_device = {p.device.name: p for p in preds}
    preds = sorted(by_device.values(), key=lambda p: p.memory.total_bytes / p.memory_capacity_bytes)
    names = [p.device.name for p in preds]
    fig = go.Figure()
    for part, color in (("weight_bytes", COLORS[0]), ("kv_cache_bytes", COLORS[2]), ("activation_bytes", COLORS[4])):
        fig.add_trace(go.Bar(
            y=names, x=[100 * getattr(p.memory, part) / p.memory_capacity_bytes for p in preds], orientation="h", marker_color=color,
            name=part.removesuffix("_bytes").replace("_", " "), customdata=[getattr(p.memory, part) / GB for p in preds],
            hovertemplate="%{y}: %{customdata:.3f} GB, %{x:.1f}% of usable memory<extra>%{fullData.name}</extra>"))
    fig.add_trace(go.Scatter(
        y=names, x=[100 * p.memory.total_bytes / p.memory_capacity_bytes for p in preds], mode="text", showlegend=False,
        text=[f"  {p.memory.total_bytes / GB:.2f} of {p.memory_capacity_bytes / GB:g} GB" + ("" if p.fits_in_memory else ": DOES NOT FIT") for p in preds],
        textposition="middle right", hoverinfo="skip"))
    fig.add_vline(x=100, line_color="crimson", line_dash="dash", annotation_text="usable memory", annotation_position="top")
    widest = max([100 * p.memory.total_bytes / p.memory_capacity_bytes for p in preds] + [100])
    fig.update_layout(title=title or "Memory footprint vs usable memory", barmode="stack",
                      xaxis={"title": "% of the device's usable memory", "range": [0, 1.3 * widest]},
                      height=max(300, 28 * len(preds) + 160), legend={"orientation": "h", "y": -0.25}, margin={"t": 90})
    return fig


# --- context --------------------------------------------------------------------------------------

def context_grid(max_context: int, n_points: int = 32, start: int = 128) -> list[int]:
    """Evenly spaced contexts from `start` to the model's limit (KV bytes grow linearly with context)."""
    start = min(start, max_context)
    step = (max_context - start) / max(n_points - 1, 1)
    return sorted({round(start + i * step) for i in range(n_points)} | {max_context})


def bytes_per_token(model: ModelSpec, formats: Formats, context: int) -> tuple[int, int]:
    """(weight bytes, KV-cache bytes) read and written by one decoded token at `context`."""
    ops = decode_ops(model, formats, context)
    return sum(op.cost.weight_bytes * op.count for op in ops), sum(op.cost.kv_bytes * op.count for op in ops)


@dataclass(frozen=True)
class Crossover:
    """Where a token's KV-cache bytes overtake its weight bytes."""

    context: int | None  # first context within the model's limit, None if they never do
    extrapolated_context: int | None  # where the (linear) KV growth would cross beyond the limit
    kv_share_at_limit: float  # KV bytes / weight bytes at max_context


def kv_crossover(model: ModelSpec, formats: Formats) -> Crossover:
    weights_at_limit, kv_at_limit = bytes_per_token(model, formats, model.max_context)
    if kv_at_limit > weights_at_limit:
        lo, hi = 1, model.max_context  # KV bytes grow with context: bisect for the first that exceeds
        while lo < hi:
            mid = (lo + hi) // 2
            weights, kv = bytes_per_token(model, formats, mid)
            lo, hi = (lo, mid) if kv > weights else (mid + 1, hi)
        return Crossover(lo, None, kv_at_limit / weights_at_limit)
    _, kv_one = bytes_per_token(model, formats, 1)
    slope = (kv_at_limit - kv_one) / max(model.max_context - 1, 1)
    extrapolated = int(1 + (weights_at_limit - kv_one) / slope) + 1 if slope > 0 else None
    return Crossover(None, extrapolated, kv_at_limit / weights_at_limit)


def crossover_text(model: ModelSpec, crossover: Crossover) -> str:
    if crossover.context is not None:
        return f"KV-cache bytes per token overtake weight bytes at context {crossover.context:,} tokens."
    text = (f"KV-cache bytes per token stay below weight bytes up to {model.name}'s limit of {model.max_context:,} tokens "
            f"({100 * crossover.kv_share_at_limit:.0f}% of them there)")
    if crossover.extrapolated_context:
        text += f"; growing linearly they would overtake at about {crossover.extrapolated_context:,} tokens"
    return text + "."


def context_sweep(model: ModelSpec, formats: Formats, devices: list[Device], contexts: list[int]) -> dict[str, list[float]]:
    """Predicted decode tokens/s at each context, per device (default unit)."""
    return {f"{d.name} {d.default_unit}": [predict(model, formats, d, c).decode_tokens_per_s for c in contexts] for d in devices}


def context_speed_figure(contexts: list[int], tokens_per_s: dict[str, list[float]], crossover: Crossover,
                         chosen_context: int | None = None, title: str | None = None) -> go.Figure:
    fig = go.Figure()
    for i, (name, values) in enumerate(tokens_per_s.items()):
        fig.add_trace(go.Scatter(x=contexts, y=values, mode="lines+markers", name=name, marker={"size": 5}, line={"color": COLORS[i % len(COLORS)]},
                                 hovertemplate="context %{x}: %{y:.2f} tokens/s<extra>%{fullData.name}</extra>"))
    if crossover.context is not None:
        fig.add_vline(x=crossover.context, line_dash="dash", line_color="crimson",
                      annotation_text=f"KV > weights from {crossover.context:,}", annotation_position="top left")
    if chosen_context is not None:
        fig.add_vline(x=chosen_context, line_dash="dot", line_color="gray", annotation_text=f"context {chosen_context:,}", annotation_position="bottom right")
    fig.update_layout(title=title or "Decode speed vs context", xaxis_title="context (tokens)", yaxis_title="decode tokens/s (predicted)",
                      yaxis={"rangemode": "tozero"}, height=480)
    return fig


def context_bytes_figure(model: ModelSpec, formats: Formats, contexts: list[int], crossover: Crossover, title: str | None = None) -> go.Figure:
    pairs = [bytes_per_token(model, formats, c) for c in contexts]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=contexts, y=[w / GB for w, _ in pairs], mode="lines", name="weight bytes per token", line={"color": COLORS[0]},
                             hovertemplate="context %{x}: weights %{y:.3f} GB/token<extra></extra>"))
    fig.add_trace(go.Scatter(x=contexts, y=[kv / GB for _, kv in pairs], mode="lines", name="KV-cache bytes per token", line={"color": COLORS[2]},
                             hovertemplate="context %{x}: KV cache %{y:.3f} GB/token<extra></extra>"))
    if crossover.context is not None:
        fig.add_vline(x=crossover.context, line_dash="dash", line_color="crimson", annotation_text=f"crossover {crossover.context:,}")
    fig.update_layout(title=title or "Bytes per token: weights vs KV cache", xaxis_title="context (tokens)", yaxis_title="GB read/written per token",
                      yaxis={"rangemode": "tozero"}, height=420)
    return fig


# --- host profile ---------------------------------------------------------------------------------

def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(str(version).split(".")[:2])


def check_host_profile(data, where: str) -> dict:
    """A host profile record (`perfsim profile --device host --json`) with the keys the pages read, from
    this major.minor version of perfsim; anything else is a UserError saying why."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a JSON object from 'perfsim profile --device host --json'")
    missing = [key for key in HOST_PROFILE_KEYS if key not in data]
    if missing:
        raise UserError(f"{where}: missing {', '.join(missing)}; expected the output of 'perfsim profile --device host --json'")
    if _major_minor(data["perfsim_version"]) != _major_minor(perfsim.__version__):
        raise UserError(f"{where}: written by perfsim {data['perfsim_version']}, this is perfsim {perfsim.__version__}; "
                        f"the versions must match in major.minor (re-run 'perfsim profile --device host --json')")
    for side in ("predicted", "measured"):
        ops = data[side].get("ops") if isinstance(data[side], dict) else None
        if not isinstance(ops, list) or not all(isinstance(op, dict) and "name" in op and "time_s" in op for op in ops):
            raise UserError(f"{where}: {side}.ops: expected a list of ops with name and time_s")
        if not isinstance(data[side].get("decode_tokens_per_s"), (int, float)):
            raise UserError(f"{where}: {side}.decode_tokens_per_s: expected a number")
    if not all("kind" in op for op in data["predicted"]["ops"]):
        raise UserError(f"{where}: predicted.ops: every op needs its kind")
    if not isinstance(data["error"], dict) or not isinstance(data["error"].get("decode_tokens_per_s"), (int, float)):
        raise UserError(f"{where}: error.decode_tokens_per_s: expected a number")
    return data


def host_profile_from_text(text: str | bytes, where: str) -> dict:
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{where}: not valid JSON: {e}") from None
    return check_host_profile(data, where)


def signed_error(predicted: float, measured: float) -> float:
    """(predicted - measured) / measured: on times, negative means the roofline is optimistic."""
    return (predicted - measured) / measured if measured else float("nan")


def host_group_rows(record: dict) -> list[dict]:
    """Predicted and measured ms/token per op group (kind), first-seen order, with the signed error of
    the time; measured ops are grouped by the kind of the predicted op of the same name."""
    kind_of = {op["name"]: op["kind"] for op in record["predicted"]["ops"]}
    predicted_s, measured_s, bound = {}, {}, {}
    for op in record["predicted"]["ops"]:
        predicted_s[op["kind"]] = predicted_s.get(op["kind"], 0.0) + op["time_s"]
        bound.setdefault(op["kind"], op.get("bound", ""))
    for op in record["measured"]["ops"]:
        kind = kind_of.get(op["name"], "other")
        measured_s[kind] = measured_s.get(kind, 0.0) + op["time_s"]
    kinds = list(dict.fromkeys(list(predicted_s) + list(measured_s)))
    rows = [{
        "op group": kind,
        "predicted ms/token": 1e3 * predicted_s.get(kind, 0.0),
        "measured ms/token": 1e3 * measured_s.get(kind, 0.0),
        "time error %": 100 * signed_error(predicted_s.get(kind, 0.0), measured_s.get(kind, 0.0)),
        "predicted bound": bound.get(kind, ""),
    } for kind in kinds]
    total_predicted, total_measured = sum(predicted_s.values()), sum(measured_s.values())
    rows.append({"op group": "total", "predicted ms/token": 1e3 * total_predicted, "measured ms/token": 1e3 * total_measured,
                 "time error %": 100 * signed_error(total_predicted, total_measured), "predicted bound": ""})
    return rows


def host_state_text(record: dict) -> str:
    """The host as the passes and probes before each measured step found it (perfsim.report.host_state_text);
    "" for a record without them (one written before they existed)."""
    from perfsim.report import host_state_text as state_text

    measured = record["measured"]
    return state_text(measured.get("step_stream_gb_s") or [], measured.get("step_kv_stream_gb_s") or [],
                      measured.get("step_compute_gflops") or [], (record.get("host_profile") or {}).get("compute_probe_gflops") or 0.0)


def memory_state_text(record: dict) -> str:
    """The warning when the run's weights' passes and the calibration's read bandwidth disagree
    (perfsim.compare.memory_state_warning); "" when they agree or the record has no ratio."""
    from perfsim.compare import memory_state_warning

    return memory_state_warning((record.get("host_profile") or {}).get("memory_state_ratio") or 0.0, record["measured"].get("threads", 0))


def host_config_text(record: dict) -> str:
    quant = record["quant"] if isinstance(record["quant"], dict) else {"weights": record["quant"]}
    parts = ", ".join(f"{k} {v}" for k, v in quant.items())
    return f"{record['model']} on {record['device']}: {parts}; context {record['context']} tokens (perfsim {record['perfsim_version']})"


def host_short_config(record: dict) -> str:
    quant = record["quant"] if isinstance(record["quant"], dict) else {"weights": record["quant"]}
    return f"{record['model']} {quant.get('weights', '')}, context {record['context']}"


def host_comparison_figure(record: dict, title: str | None = None) -> go.Figure:
    rows = [r for r in host_group_rows(record) if r["op group"] != "total"]
    groups = [r["op group"] for r in rows]
    fig = go.Figure()
    fig.add_trace(go.Bar(x=groups, y=[r["predicted ms/token"] for r in rows], name="predicted", marker_color=COLORS[0],
                         hovertemplate="%{x}: %{y:.3f} ms/token predicted<extra></extra>"))
    fig.add_trace(go.Bar(x=groups, y=[r["measured ms/token"] for r in rows], name="measured", marker_color=COLORS[1],
                         text=[f"{r['time error %']:+.0f}%" for r in rows], textposition="outside",
                         hovertemplate="%{x}: %{y:.3f} ms/token measured<extra></extra>"))
    fig.update_layout(title=title or "Host: predicted vs measured per op group", barmode="group", yaxis_title="ms/token",
                      height=440, annotations=[{"text": "labels: (predicted - measured) / measured time", "xref": "paper", "yref": "paper",
                                                "x": 1, "y": 1.08, "showarrow": False, "font": {"size": 11}}])
    return fig


def default_host_profile_path() -> Path:
    """Where the dashboard keeps the last measured host profile JSON: beside the calibrated host.yaml
    (PERFSIM_CACHE_DIR, default ~/.cache/perfsim); PERFSIM_HOST_PROFILE names another file."""
    if os.environ.get("PERFSIM_HOST_PROFILE"):
        return Path(os.environ["PERFSIM_HOST_PROFILE"])
    return Path(os.environ.get("PERFSIM_CACHE_DIR") or Path.home() / ".cache" / "perfsim") / "host-profile.json"


# --- the standalone HTML report -------------------------------------------------------------------

def configuration_title(model: ModelSpec, formats: Formats, context: int) -> str:
    return f"{model.name}, weights {formats.weights.name}, KV cache {formats.kv_cache.name}, context {context:,} tokens"


def report_figures(model_name: str, weights: str, kv_cache: str, context: int, host_record: dict | None = None,
                   device_names=REPORT_DEVICES) -> list[go.Figure]:
    """The dashboard's figures for one configuration, titled, in page order."""
    model, formats, devices = get_model(model_name), formats_from_names(weights, kv_cache), builtin_devices()
    chosen = [devices[name] for name in device_names if name in devices]
    config = configuration_title(model, formats, context)
    all_preds, _ = predictions(model, formats, context, list(devices.values()))
    contexts = context_grid(model.max_context)
    crossover = kv_crossover(model, formats)
    figures = [
        roofline_figure(predictions(model, formats, context, chosen)[0], host_record, title=f"Roofline: {config}"),
        devices_speed_figure(all_preds, title=f"Decode speed and time to first token: {config}"),
        memory_figure(all_preds, title=f"Memory footprint vs usable memory: {config}"),
        context_speed_figure(contexts, context_sweep(model, formats, chosen, contexts), crossover, context,
                             title=f"Decode speed vs context: {model.name}, weights {formats.weights.name}, KV cache {formats.kv_cache.name}"),
        context_bytes_figure(model, formats, contexts, crossover, title=f"Bytes per token, weights vs KV cache: {model.name}"),
    ]
    if host_record is not None:
        figures.append(host_comparison_figure(host_record, title=f"Host predicted vs measured: {host_config_text(host_record)}"))
    return figures


def figure_title(fig: go.Figure) -> str:
    return fig.layout.title.text or ""


def report_html(figures: list[go.Figure], heading: str) -> str:
    """One page: plotly.js inline once in <head> (the file opens offline), then each figure."""
    from plotly.offline import get_plotlyjs

    body = "\n".join(f'<section>{fig.to_html(include_plotlyjs=False, full_html=False, config={"displaylogo": False})}</section>' for fig in figures)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(heading)}</title>\n'
            f'<script type="text/javascript">{get_plotlyjs()}</script>\n'
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222} section{margin:2em 0}</style>\n"
            f"</head><body>\n<h1>{html.escape(heading)}</h1>\n<p>perfsim {html.escape(perfsim.__version__)}: roofline predictions "
            f"(decimal GB).</p>\n{body}\n</body></html>\n")


def write_html_report(path, model_name: str = "phi-3-mini", weights: str = "q4_0", kv_cache: str = "f16",
                      context: int = DEFAULT_CONTEXT, host_profile_json=None) -> Path:
    """Write the dashboard's figures as one standalone HTML file (no network needed to open it); a host
    profile JSON (its path) adds measured points and the predicted-vs-measured chart. Written to a
    temporary file beside `path`, then renamed, so a reader never sees half a report."""
    path = Path(path)
    host_record = None
    if host_profile_json is not None:
        try:
            text = Path(host_profile_json).read_text(encoding="utf-8")
        except OSError as e:
            raise UserError(f"{host_profile_json}: cannot read: {e}") from None
        host_record = host_profile_from_text(text, str(host_profile_json))
    model = get_model(model_name)
    heading = f"perfsim report: {configuration_title(model, formats_from_names(weights, kv_cache), context)}"
    page = report_html(report_figures(model_name, weights, kv_cache, context, host_record), heading)
    if not path.parent.is_dir():
        raise UserError(f"{path}: directory {path.parent} does not exist")
    write_bytes_atomically(path, page.encode("utf-8"))
    return path
