"""Turning predictions into plain data (for --json, the dashboard and the gate) and into text tables."""

from __future__ import annotations

from collections import defaultdict

from perfsim.roofline import Prediction

GB = 1e9


def op_record(t) -> dict:
    op = t.op
    return {
        "name": op.name,
        "kind": op.kind,
        "count": op.count,
        "flops": op.flops,
        "bytes": op.bytes,
        "weight_bytes": op.cost.weight_bytes * op.count,
        "kv_bytes": op.cost.kv_bytes * op.count,
        "act_bytes": op.cost.act_bytes * op.count,
        "time_s": t.time_s,
        "bound": t.bound,
    }


def prediction_record(p: Prediction) -> dict:
    return {
        "decode_tokens_per_s": p.decode_tokens_per_s,
        "ms_per_token": p.ms_per_token,
        "ttft_ms": p.ttft_ms,
        "weight_bytes_per_token": p.weight_bytes_per_token,
        "memory_bytes": p.memory.total_bytes,
        "memory": {
            "weight_bytes": p.memory.weight_bytes,
            "kv_cache_bytes": p.memory.kv_cache_bytes,
            "activation_bytes": p.memory.activation_bytes,
            "capacity_bytes": p.memory_capacity_bytes,
            "fits": p.fits_in_memory,
        },
        "ops": [op_record(t) for t in p.ops],
    }


def reference_records(p: Prediction) -> list[dict]:
    rows = []
    for ref in p.device.references:
        if ref.model != p.model.name:
            continue
        rows.append({
            "model": ref.model,
            "weights": ref.weights,
            "decode_tokens_per_s": ref.decode_tokens_per_s,
            "relation": ref.relation,
            "claim": ref.claim,
            "source": ref.source,
            "note": ref.note,
            "predicted_minus_reference_pct": 100 * (p.decode_tokens_per_s - ref.decode_tokens_per_s) / ref.decode_tokens_per_s,
        })
    return rows


def profile_record(p: Prediction) -> dict:
    return {
        "device": p.device.name,
        "unit": p.unit.name,
        "threads": p.threads,
        "model": p.model.name,
        "quant": {"weights": p.formats.weights.name, "activations": p.formats.activations.name, "kv_cache": p.formats.kv_cache.name},
        "context": p.context,
        "prompt_tokens": p.prompt_tokens,
        "predicted": prediction_record(p),
        "references": reference_records(p),
    }


def group_by_kind(op_times) -> list[dict]:
    """Op groups in first-seen order: total time, and the bound that holds for most of that time."""
    time_s, bytes_, flops, bound_time = defaultdict(float), defaultdict(float), defaultdict(float), defaultdict(lambda: defaultdict(float))
    for t in op_times:
        time_s[t.op.kind] += t.time_s
        bytes_[t.op.kind] += t.op.bytes
        flops[t.op.kind] += t.op.flops
        bound_time[t.op.kind][t.bound] += t.time_s
    total = sum(time_s.values())
    return [
        {"kind": k, "time_s": time_s[k], "share": time_s[k] / total, "bytes": bytes_[k], "flops": flops[k], "bound": max(bound_time[k], key=bound_time[k].get)}
        for k in time_s
    ]


def table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    """A plain text table; `align` has one 'l' or 'r' per column (numbers right by default)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    align = align or "l" + "r" * (len(headers) - 1)
    def fmt(row):
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)).rstrip()
    return "\n".join([fmt(headers), fmt(["-" * w for w in widths])] + [fmt(r) for r in cells])


def format_profile(p: Prediction, projected: Prediction | None = None) -> str:
    f = p.formats
    unit = f"{p.unit.name} unit" + (f", {p.threads} threads" if p.threads else "")
    m = p.memory
    fits = "fits" if p.fits_in_memory else "DOES NOT FIT"
    lines = [
        f"{p.model.name} on {p.device.display_name} ({unit})",
        f"weights {f.weights.name}, activations {f.activations.name}, KV cache {f.kv_cache.name}; context {p.context} tokens, prompt {p.prompt_tokens} tokens",
        "",
        f"predicted decode      {p.decode_tokens_per_s:8.2f} tokens/s   ({p.ms_per_token:.2f} ms/token)",
        f"time to first token   {p.ttft_ms:8.1f} ms         (prefill of {p.prompt_tokens} tokens)",
        f"weights read / token  {p.weight_bytes_per_token / GB:8.3f} GB",
        f"memory footprint      {m.total_bytes / GB:8.3f} GB of {p.memory_capacity_bytes / GB:.2f} GB usable: {fits}"
        f"  (weights {m.weight_bytes / GB:.3f} + KV cache {m.kv_cache_bytes / GB:.3f} + activations {m.activation_bytes / GB:.3f})",
        "",
    ]
    groups = group_by_kind(p.ops)
    rows = [[g["kind"], f"{1e3 * g['time_s']:.3f}", f"{100 * g['share']:.1f}%", f"{g['bytes'] / 1e6:.1f}", f"{g['flops'] / 1e9:.2f}", g["bound"]] for g in groups]
    lines.append(table(["op group", "ms/token", "share", "MB/token", "GFLOP/token", "bound"], rows, "lrrrrl"))
    if projected is not None:
        lines += ["", f"with this host's measured kernel overheads and compute/memory overlap carried over: "
                      f"{projected.decode_tokens_per_s:.2f} tokens/s ({projected.ms_per_token:.2f} ms/token)"]
    refs = reference_records(p)
    if refs:
        lines += ["", "published measurements for this device and model:"]
        for r in refs:
            lines.append(f"  {r['model']} {r['weights']}: {r['claim']}; predicted {p.decode_tokens_per_s:.2f} tokens/s, "
                         f"{r['predicted_minus_reference_pct']:+.1f}% vs {r['decode_tokens_per_s']:g}")
            lines.append(f"    source: {r['source']}")
            if r["note"]:
                lines.append(f"    note: {r['note']}")
        if p.device.notes:
            lines.append(f"  why they differ: {p.device.notes.strip()}")
    return "\n".join(lines)


def run_record(m) -> dict:
    from perfsim import __version__
    from perfsim.measure import measurement_record

    f = m.formats
    return {
        "perfsim_version": __version__,
        "device": "host",
        "model": m.model.name,
        "quant": {"weights": f.weights.name, "activations": f.activations.name, "kv_cache": f.kv_cache.name},
        "context": m.contexts[-1],
        "measured": measurement_record(m),
    }


def format_measurement(m) -> str:
    from perfsim.measure import measurement_record

    record = measurement_record(m)
    f = m.formats
    lines = [
        f"{m.model.name} measured on this host ({m.threads} threads), weights {f.weights.name} ({m.weights_origin}), KV cache {f.kv_cache.name}",
        f"{len(m.step_seconds)} tokens decoded at contexts {m.contexts[0]}..{m.contexts[-1]}",
        "",
        f"measured decode       {m.decode_tokens_per_s:8.2f} tokens/s   ({m.ms_per_token:.2f} ms/token, mean of the middle half of {len(m.step_seconds)} steps)",
        f"load + repack          {m.load_s:8.2f} s",
        f"JIT warm-up            {m.warmup_s:8.2f} s           (first step minus a steady one)",
        f"peak resident memory  {m.peak_rss_bytes / GB:8.3f} GB",
        "",
    ]
    totals, order = defaultdict(float), []
    for op in record["ops"]:
        if op["kind"] not in totals:
            order.append(op["kind"])
        totals[op["kind"]] += op["time_s"]
    total = sum(totals.values())
    rows = [[k, f"{1e3 * totals[k]:.3f}", f"{100 * totals[k] / total:.1f}%"] for k in order]
    lines.append(table(["op group", "ms/token", "share"], rows, "lrr"))
    return "\n".join(lines)


def comparison_record(c) -> dict:
    from perfsim.compare import coarse_groups
    from perfsim.measure import measurement_record

    record = run_record(c.measurement)
    last = c.predictions[-1]
    predicted = prediction_record(last)
    predicted["decode_tokens_per_s"] = c.predicted_tokens_per_s  # the interquartile mean over the measured steps
    predicted["ms_per_token"] = c.predicted_ms_per_token
    predicted["step_seconds"] = c.predicted_step_s  # each measured step's, at its context and host state
    predicted_op_s = c.predicted_op_s()
    for op in predicted["ops"]:
        op["time_s"] = predicted_op_s[op["name"]]
    record.update(
        predicted=predicted,
        measured=measurement_record(c.measurement),
        error={
            "definition": "(predicted - measured) / measured, each the interquartile mean of the measured steps and of their "
                          "predictions (each at its context, for the host as the passes and probes run right before it found it); "
                          "tokens/s: positive = the model promised more speed than measured",
            "decode_tokens_per_s": c.tokens_per_s_error,
            "ops": [{"name": r["name"], "kind": r["kind"], "error": r["error"]} for r in c.op_rows()],
            "groups": c.group_rows(),
            "gemv_attention_rest": coarse_groups(c),
        },
        host_profile={"path": c.device.path, "calibration": c.device.calibration,
                      "compute_probe_gflops": c.device.unit().compute_probe_gflops_by_threads.get(c.measurement.threads),
                      "memory_state_ratio": c.memory_state_ratio},
    )
    return record


def host_state_text(stream_gb_s, kv_stream_gb_s, compute_gflops, calibrated_gflops: float = 0.0) -> str:
    """One line: the host as the passes and probes before each measured step found it (ranges over the steps;
    a pass or probe of 0: none), the calibration's compute probe beside the run's when known; "" without any."""
    parts = []
    streams = [gb_s for gb_s in stream_gb_s if gb_s > 0]
    if streams:
        parts.append(f"weights read {min(streams):.1f}-{max(streams):.1f} GB/s")
    kv = [gb_s for gb_s in kv_stream_gb_s if gb_s > 0]
    if kv:
        parts.append(f"K/V read {min(kv):.1f}-{max(kv):.1f} GB/s")
    probes = [gflops for gflops in compute_gflops if gflops > 0]
    if probes:
        scaled = f" (calibration: {calibrated_gflops:.0f}; GEMV and attention compute roofs scaled by the ratio)" if calibrated_gflops else ""
        parts.append(f"compute probe {min(probes):.0f}-{max(probes):.0f} GFLOP/s{scaled}")
    return "host as measured before each step: " + ", ".join(parts) if parts else ""


def format_comparison(c) -> str:
    from perfsim.measure import middle_half

    m = c.measurement
    f = m.formats
    measured_steps, predicted_steps = middle_half(m.step_seconds), middle_half(c.predicted_step_s)
    lines = [
        f"{m.model.name} on this host ({m.threads} threads): weights {f.weights.name} ({m.weights_origin}), KV cache {f.kv_cache.name}",
        f"{len(m.step_seconds)} tokens decoded at contexts {m.contexts[0]}..{m.contexts[-1]}; prediction from {c.device.path}",
        "",
        "                 predicted    measured    error   (mean of the middle half of the steps)",
        f"tokens/s         {c.predicted_tokens_per_s:9.2f}   {m.decode_tokens_per_s:9.2f}   {100 * c.tokens_per_s_error:+6.1f}%",
        f"ms/token         {c.predicted_ms_per_token:9.2f}   {m.ms_per_token:9.2f}",
        f"middle half of the steps: measured {1e3 * measured_steps[0]:.2f}-{1e3 * measured_steps[-1]:.2f} ms, predicted "
        f"{1e3 * predicted_steps[0]:.2f}-{1e3 * predicted_steps[-1]:.2f} ms (each step predicted for the host as measured before it)",
        host_state_text(m.each_step_stream_gb_s, m.each_step_kv_stream_gb_s, m.each_step_compute_gflops,
                        c.device.unit().compute_probe_gflops_by_threads.get(m.threads, 0.0)),
    ]
    from perfsim.compare import memory_state_warning

    warning = memory_state_warning(c.memory_state_ratio, m.threads)
    lines += ([warning] if warning else []) + [""]
    rows = [[g["kind"], f"{1e3 * g['predicted_s']:.3f}", f"{1e3 * g['measured_s']:.3f}", f"{100 * g['error']:+.1f}%", g["bound"],
             f"{100 * g['measured_memory_roof_fraction']:.0f}%"] for g in c.group_rows()]
    lines.append(table(["op group", "predicted ms", "measured ms", "error", "bound (predicted)", "of memory roof (measured)"], rows, "lrrrlr"))
    lines += ["", f"load {m.load_s:.1f} s, JIT warm-up {m.warmup_s:.2f} s, peak resident memory {m.peak_rss_bytes / GB:.2f} GB"]
    if m.set_aside_step_seconds:
        lines.append(f"{len(m.set_aside_step_seconds)} steps were run again: the hypervisor took vCPU time for other guests during them (steal)")
    if m.set_aside_memory_state_ratios:
        lines.append(f"measured {len(m.set_aside_memory_state_ratios) + 1} times: the other runs' weights read "
                     f"{', '.join(f'{r:.2f}x' for r in m.set_aside_memory_state_ratios)} the calibration's bandwidth (the host's "
                     "memory in another state than when calibrated); this one is the closest to it")
    if m.stolen_fraction > 0:
        lines.append(f"the hypervisor took {100 * m.stolen_fraction:.0f}% of the steps' wall time in vCPU time for other guests (steal): "
                     "the measurement includes that disturbance")
    return "\n".join(lines)
