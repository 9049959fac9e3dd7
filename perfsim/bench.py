"""Benchmarks: commands that print figures (speed is measured here, never in timed unit tests).

  perfsim bench prediction   CLI latency of `perfsim profile --device a16` and 10,000 in-process predictions
  perfsim bench decode       stream bandwidth, q4_0 GEMV and attention against it, whole-model decode,
                             and llama.cpp on the same GGUF in the same run (when llama-cpp-python is installed)
"""

from __future__ import annotations

import importlib.util
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


def benchmark_gguf_path():
    """A Phi-3 Mini Q4_0 GGUF with deterministic random weights, written once into perfsim's cache."""
    from perfsim.calibrate import cache_dir
    from perfsim.gguf_io import PHI3_MINI, write_random_phi3_gguf

    path = cache_dir() / "phi3-mini-q4_0-random-seed0.gguf"
    if not path.exists():
        print(f"writing {path} (deterministic random weights, ~2.2 GB) ...", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        write_random_phi3_gguf(tmp, PHI3_MINI, "q4_0", seed=0)
        tmp.rename(path)
    return path


def _llama_cpp_tokens_per_s(path, context: int, n_tokens: int, threads: int) -> float | None:
    """llama.cpp's decode on the same GGUF: a prompt fills the cache to context - n_tokens, then
    n_tokens single-token evals are timed (their interquartile mean), as perfsim's measured decode does."""
    try:
        import llama_cpp
    except ImportError:
        return None
    import os

    from perfsim.measure import interquartile_mean

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=context + 8, n_batch=512, n_threads=threads,
                          n_threads_batch=os.cpu_count(), n_gpu_layers=0, use_mmap=True, verbose=False)
    prompt = [1] + [300 + i % 30000 for i in range(max(context - n_tokens, 1) - 1)]
    llm.eval(prompt)
    token, times = 301, []
    llm.eval([token])  # warm-up
    for i in range(n_tokens):
        start = time.perf_counter()
        llm.eval([token + i])
        times.append(time.perf_counter() - start)
    del llm
    return 1.0 / interquartile_mean(times)


def bench_decode(contexts=(16, 512), n_tokens: int = 16) -> None:
    from perfsim.engine import Engine
    from perfsim.kernels import attention, gemv
    from perfsim.measure import available_threads, measure_decode
    from perfsim.quant import F16

    threads = sorted({1, available_threads()})
    gemv.main(format_names=("q4_0",), thread_counts=tuple(threads))
    print()
    attention.main(formats=(F16,), rounds=3)
    print()
    path = benchmark_gguf_path()
    engine = Engine.from_gguf(path)
    print(f"whole-model decode, {path.name}, mean of the middle half of {n_tokens} tokens ending at each context:")
    print(f"{'threads':>7} {'context':>8} {'perfsim tok/s':>14} {'llama.cpp tok/s':>16} {'ratio':>7}")
    for t in threads:
        for context in contexts:
            ours = measure_decode(engine, context, n_tokens, t).decode_tokens_per_s
            theirs = _llama_cpp_tokens_per_s(path, context, n_tokens, t)
            ratio = f"{ours / theirs:7.2f}" if theirs else "    n/a"
            print(f"{t:>7} {context:>8} {ours:>14.2f} {theirs or float('nan'):>16.2f} {ratio}", flush=True)
    if importlib.util.find_spec("llama_cpp") is None:
        print("llama.cpp: not installed (CMAKE_ARGS=\"-DGGML_NATIVE=ON\" pip install llama-cpp-python)")


SUITES = {"prediction": bench_prediction, "decode": bench_decode}
