"""Benchmarks: commands that print figures (speed is measured here, never in timed unit tests).

  perfsim bench prediction   CLI latency of `perfsim profile --device a16` and 10,000 in-process predictions
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time


def _median_wall_s(command: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def prediction_sweep(n_predictions: int = 10_000) -> tuple[float, int]:
    """Predict n_predictions configurations (every device x unit x thread count x context), in-process."""
    from perfsim.device import builtin_devices
    from perfsim.model import preset_models
    from perfsim.quant import Formats
    from perfsim.roofline import predict

    devices = list(builtin_devices().values())
    models = list(preset_models().values())
    configs = []
    context = 1
    while len(configs) < n_predictions:
        for device in devices:
            for unit in device.units.values():
                model = models[len(configs) % len(models)]
                configs.append((model, device, unit.name, 1 + context % model.max_context))
        context += 7
    configs = configs[:n_predictions]
    formats = Formats()
    start = time.perf_counter()
    checksum = 0.0
    for model, device, unit_name, ctx in configs:
        checksum += predict(model, formats, device, ctx, unit_name=unit_name).decode_tokens_per_s
    return time.perf_counter() - start, len(configs)


def bench_prediction() -> None:
    perfsim = [shutil.which("perfsim")] if shutil.which("perfsim") else [sys.executable, "-m", "perfsim"]
    command = perfsim + ["profile", "--device", "a16"]
    cli_s = _median_wall_s(command, repeats=7)
    python_s = _median_wall_s([sys.executable, "-c", "pass"], repeats=7)
    sweep_s, n = prediction_sweep()
    print(f"`{' '.join(['perfsim'] + command[len(perfsim):])}`: {1e3 * cli_s:.0f} ms wall, median of 7 "
          f"(a bare `python -c pass` takes {1e3 * python_s:.0f} ms here)")
    print(f"numba imported by the prediction path: {'numba' in sys.modules}")
    print(f"{n:,} predictions in-process (all devices x units x contexts, 3 models): {sweep_s:.3f} s "
          f"({1e6 * sweep_s / n:.1f} us each)")


SUITES = {"prediction": bench_prediction}
