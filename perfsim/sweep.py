"""`perfsim sweep`: predicted and measured decode over contexts and thread counts, as JSON lines.

The weights are made (or mapped) once; each point then decodes its own tokens at its own context."""

from __future__ import annotations

import json
import time

from perfsim.compare import MEMORY_STATE_REMEASURES, coarse_group, compare, group_summary, measured_in_calibrated_state
from perfsim.errors import UserError
from perfsim.measure import check_threads, measure_decode
from perfsim.run import plan_run


def parse_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--{what} expects comma-separated whole numbers, got {text!r}") from None
    if not values:
        raise UserError(f"--{what} is empty")
    return values


def sweep_points(contexts: list[int], threads: list[int]) -> list[tuple[int, int]]:
    return [(t, c) for t in threads for c in contexts]


def plan_sweep(plan_args: dict, contexts: list[int], threads: list[int], n_tokens: int):
    """Checks every point before anything runs; returns the plan of the longest context."""
    for t in threads:
        check_threads(t)
    return [plan_run(context=c, n_tokens=n_tokens, threads=threads[0], **plan_args) for c in sorted(contexts)][-1]


def run_sweep(device, plan, contexts: list[int], threads: list[int], n_tokens: int, output_path=None, progress=None,
              memory_state_remeasures: int = MEMORY_STATE_REMEASURES, say=None):
    """Yields one record per (threads, context) point; appends each as a JSON line to output_path. A point measured
    while the host's memory was in another state than when calibrated is measured again, up to
    `memory_state_remeasures` times (perfsim.compare.measured_in_calibrated_state; `say` gets its messages)."""
    from perfsim.engine import Engine

    if plan.gguf_path:
        engine = Engine.from_gguf(plan.gguf_path, plan.kv_cache)
    else:
        engine = Engine.random(plan.model, plan.weight_format, plan.kv_cache, plan.seed)
    points = sweep_points(contexts, threads)
    out = open(output_path, "w", encoding="utf-8") if output_path else None
    try:
        for i, (t, c) in enumerate(points):
            if progress:
                progress(i, len(points), f"{t} threads, context {c}")
            start = time.perf_counter()
            measurement = measured_in_calibrated_state(device, lambda: measure_decode(engine, c, n_tokens, t), memory_state_remeasures,
                                                       say=say)
            comparison = compare(device, measurement)
            step_groups = comparison.step_groups(coarse_group)
            record = {
                "model": engine.model.name, "weights": engine.formats.weights.name, "kv_cache": engine.formats.kv_cache.name,
                "threads": t, "context": c, "tokens": n_tokens,
                "predicted_tokens_per_s": comparison.predicted_tokens_per_s,
                "measured_tokens_per_s": measurement.decode_tokens_per_s,
                "error": comparison.tokens_per_s_error,
                "groups": {g: group_summary(*steps) for g, steps in step_groups.items()},
                "step_groups": {g: {"predicted_s": p, "measured_s": m} for g, (p, m) in step_groups.items()},
                "ops": [{k: row[k] for k in ("name", "predicted_s", "measured_s", "error")} for row in comparison.op_rows()],
                "step_seconds": list(measurement.step_seconds),
                "predicted_step_seconds": comparison.predicted_step_s,
                "step_stream_gb_s": list(measurement.step_stream_gb_s),
                "step_kv_stream_gb_s": list(measurement.step_kv_stream_gb_s),
                "step_cold_call_us": list(measurement.step_cold_call_us),
                "step_page_faults": list(measurement.step_page_faults),
                "step_steal_s": list(measurement.step_steal_s),
                "stolen_fraction": measurement.stolen_fraction,
                "set_aside_step_seconds": list(measurement.set_aside_step_seconds),
                "calibrated_cold_call_us": device.unit().cold_call_us_by_threads.get(t),
                "compute_gflops": measurement.compute_gflops,
                "step_compute_gflops": list(measurement.step_compute_gflops),
                "calibrated_compute_gflops": device.unit().compute_probe_gflops_by_threads.get(t),
                "memory_state_ratio": comparison.memory_state_ratio,
                "set_aside_memory_state_ratios": list(measurement.set_aside_memory_state_ratios),
                "seconds": time.perf_counter() - start,
            }
            if out:
                out.write(json.dumps(record) + "\n")
                out.flush()
            yield record
        if progress:
            progress(len(points), len(points), "done")
    finally:
        if out:
            out.close()
