"""Predicted vs measured on the host, op by op, with signed errors.

The prediction is made at the very contexts the measured steps ran at and averaged like them, from
the calibrated host profile (microbenchmarks only), with its memory roof and its fixed costs as the
microbenchmarks run beside the decode found the host (with_same_run_host). Errors are signed:
(predicted - measured) / measured, so +5% tokens/s means the model promised 5% more speed than the
host delivered.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections import defaultdict
from dataclasses import dataclass

from perfsim.device import Device
from perfsim.measure import Measurement
from perfsim.roofline import predict


@dataclass(frozen=True)
class Comparison:
    device: Device
    measurement: Measurement
    predictions: tuple  # one Prediction per measured context

    @property
    def predicted_ms_per_token(self) -> float:
        return statistics.mean(p.ms_per_token for p in self.predictions)

    @property
    def predicted_tokens_per_s(self) -> float:
        return 1e3 / self.predicted_ms_per_token

    @property
    def tokens_per_s_error(self) -> float:
        measured = self.measurement.decode_tokens_per_s
        return (self.predicted_tokens_per_s - measured) / measured

    def predicted_op_s(self) -> dict:
        """Op name -> mean predicted seconds per token over the measured contexts."""
        totals = defaultdict(float)
        for p in self.predictions:
            for t in p.ops:
                totals[t.op.name] += t.time_s / len(self.predictions)
        return dict(totals)

    def op_rows(self) -> list[dict]:
        predicted = self.predicted_op_s()
        last = self.predictions[-1]
        rows = []
        for t in last.ops:
            measured_s = self.measurement.op_time_s(t.op.name)
            rows.append({
                "name": t.op.name, "kind": t.op.kind, "bound": t.bound,
                "predicted_s": predicted[t.op.name], "measured_s": measured_s,
                "error": (predicted[t.op.name] - measured_s) / measured_s if measured_s > 0 else None,
                "bytes": t.op.bytes, "flops": t.op.flops,
            })
        return rows

    def group_rows(self) -> list[dict]:
        """Per op kind: predicted and measured seconds, signed error, the predicted bound holding most of
        the time, and the measured fraction of the memory roof (achieved bytes/s over stream bandwidth)."""
        bandwidth = self.predictions[-1].roofs.bandwidth_bytes_per_s
        groups, order = {}, []
        for row in self.op_rows():
            g = groups.get(row["kind"])
            if g is None:
                g = groups[row["kind"]] = {"kind": row["kind"], "predicted_s": 0.0, "measured_s": 0.0, "bytes": 0, "bound_s": defaultdict(float)}
                order.append(row["kind"])
            g["predicted_s"] += row["predicted_s"]
            g["measured_s"] += row["measured_s"]
            g["bytes"] += row["bytes"]
            g["bound_s"][row["bound"]] += row["predicted_s"]
        out = []
        for kind in order:
            g = groups[kind]
            out.append({
                "kind": kind, "predicted_s": g["predicted_s"], "measured_s": g["measured_s"],
                "error": (g["predicted_s"] - g["measured_s"]) / g["measured_s"],
                "bound": max(g["bound_s"], key=g["bound_s"].get),
                "measured_memory_roof_fraction": g["bytes"] / g["measured_s"] / bandwidth,
            })
        return out


def with_same_run_host(device: Device, threads: int, stream_gb_s: float, cold_call_us: float = 0.0) -> Device:
    """The calibrated host as measured beside the decode, by microbenchmarks, not the decode: the DRAM
    and the CPU of a shared host drift. Its memory roof at `threads` becomes the streaming read of the
    same run; when both the run and the profile have a cold-call probe (perfsim.measure.cold_call_probe_us),
    every fixed cost per call at `threads` is scaled by the ratio of the two probes."""
    unit = device.unit()
    changes = {"bandwidth_gb_s_by_threads": {**unit.bandwidth_gb_s_by_threads, threads: stream_gb_s}}
    calibrated_probe_us = unit.cold_call_us_by_threads.get(threads, 0.0)
    if cold_call_us > 0 and calibrated_probe_us > 0:
        factor = cold_call_us / calibrated_probe_us
        changes["kernel_roofs"] = {
            kernel: {t: dataclasses.replace(r, overhead_us=r.overhead_us * factor, overhead_us_per_kv_mb=r.overhead_us_per_kv_mb * factor,
                                            overhead_us_per_operand_mb=r.overhead_us_per_operand_mb * factor)
                        if t == threads else r for t, r in roofs.items()}
            for kernel, roofs in unit.kernel_roofs.items()
        }
        changes["overhead_us_per_op"] = unit.overhead_us_per_op * factor
    unit = dataclasses.replace(unit, **changes)
    return dataclasses.replace(device, units={**device.units, unit.name: unit})


def compare(device: Device, measurement: Measurement, same_run_host: bool = True) -> Comparison:
    m = measurement
    if same_run_host and m.stream_gb_s > 0:
        device = with_same_run_host(device, m.threads, m.stream_gb_s, m.cold_call_us)
    predictions = tuple(predict(m.model, m.formats, device, context, prompt_tokens=1, threads=m.threads) for context in m.contexts)
    return Comparison(device, m, predictions)


# The three groups the accuracy targets are stated for.
GROUP_OF_KIND = {"gemv": "gemv", "attention": "attention"}


def coarse_groups(comparison: Comparison) -> dict:
    """GEMVs, attention, and the rest: predicted and measured seconds, signed error."""
    sums = defaultdict(lambda: [0.0, 0.0])
    for row in comparison.op_rows():
        group = GROUP_OF_KIND.get(row["kind"], "rest")
        sums[group][0] += row["predicted_s"]
        sums[group][1] += row["measured_s"]
    return {g: {"predicted_s": p, "measured_s": m, "error": (p - m) / m} for g, (p, m) in sums.items()}
