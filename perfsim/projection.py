"""Projection: a device that cannot be measured here, predicted from its spec sheet and again with the
efficiencies this host's calibration measured for perfsim's own kernels carried over.

Only what is a property of the implementation carries over, and only to a unit of the same kind (a
CPU): each kernel's fixed cost per call and how much of its compute fails to hide under its memory
traffic (`overlap`). The target keeps its own peaks and bandwidths: those are the hardware's.
"""

from __future__ import annotations

import dataclasses

from perfsim.device import ComputeUnit, Device


def carry_over(target: Device, unit_name: str | None, host: Device) -> Device | None:
    """The target device with its unit given the host's kernel overheads and overlaps, or None when
    the units are not of the same kind (a GPU does not run the host's CPU kernels)."""
    unit = target.unit(unit_name)
    host_unit = host.unit()
    if unit.type != host_unit.type:
        return None
    host_threads = max(host_unit.bandwidth_gb_s_by_threads, default=host_unit.cores)
    kernel_roofs = {}
    for kernel, by_threads in host_unit.kernel_roofs.items():
        host_roof = by_threads.get(host_threads) or next(iter(by_threads.values()))
        precision = "int8" if kernel.startswith("gemv.q") else "f16" if kernel == "gemv.f16" else "f32"
        kernel_roofs[kernel] = {
            threads: dataclasses.replace(host_roof, gflops=unit.peak_flops(precision) * unit.compute_efficiency * threads / unit.cores / 1e9)
            for threads in range(1, unit.cores + 1)
        }
    projected: ComputeUnit = dataclasses.replace(unit, kernel_roofs=kernel_roofs)
    return dataclasses.replace(target, units={**target.units, unit.name: projected})
