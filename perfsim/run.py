"""`perfsim run`: check the options, then load or generate weights and measure decode on the host.

Checking comes first and is cheap, so a bad option fails before any calibration or allocation."""

from __future__ import annotations

import time
from dataclasses import dataclass

from perfsim.engine import WEIGHT_FORMATS
from perfsim.errors import UserError
from perfsim.kernels.attention import kv_cache_format
from perfsim.measure import Measurement, check_run, check_threads, measure_decode
from perfsim.model import ModelSpec, resolve_model
from perfsim.quant import Formats, quant_format



@dataclass(frozen=True)
class RunPlan:
    gguf_path: str | None
    model: ModelSpec | None  # None for a GGUF: its architecture is read when loading
    weight_format: str
    kv_cache: str
    context: int
    n_tokens: int
    threads: int
    seed: int


def plan_run(gguf_path=None, model_name=None, weights=None, kv_cache="f16", context=256, n_tokens=16, threads=None, seed=0) -> RunPlan:
    threads = check_threads(threads)
    kv_format = kv_cache_format(kv_cache)
    if gguf_path is not None:
        if model_name or weights:
            raise UserError("--model and --weights come from the GGUF file; give either --gguf or them")
        from perfsim.gguf_io import read_phi3_gguf

        arch = read_phi3_gguf(gguf_path).arch  # validates the file before anything large is allocated
        if context > arch.n_ctx:
            raise UserError(f"context of {context} tokens is longer than {gguf_path}'s limit of {arch.n_ctx} tokens")
        if n_tokens > context:
            raise UserError(f"--tokens ({n_tokens}) cannot exceed --context ({context}): the measured tokens end at the context")
        return RunPlan(gguf_path, None, "", kv_cache, context, n_tokens, threads, seed)
    model = resolve_model(model_name or "phi-3-mini")
    weight_format = quant_format(weights or "q4_0")
    if weight_format.name not in WEIGHT_FORMATS:
        raise UserError(f"the engine runs {', '.join(WEIGHT_FORMATS)} weights, not {weight_format.name}")
    check_run(model, Formats(weights=weight_format, kv_cache=kv_format), context, n_tokens)
    return RunPlan(None, model, weight_format.name, kv_cache, context, n_tokens, threads, seed)


def execute(plan: RunPlan, progress=None, calibrated=None, memory_state_remeasures: int = 0) -> Measurement:
    """Loads or generates the weights, then measures decode. Given the `calibrated` host profile, a run whose memory
    state disagrees with it is measured again, up to `memory_state_remeasures` times
    (perfsim.compare.measured_in_calibrated_state)."""
    from perfsim.engine import Engine  # imports the kernels (and, on first call, Numba)

    say = progress or (lambda message: None)
    start = time.perf_counter()
    if plan.gguf_path is not None:
        say(f"mapping {plan.gguf_path} and repacking its matrices ...")
        engine = Engine.from_gguf(plan.gguf_path, plan.kv_cache)
        check_run(engine.model, engine.formats, plan.context, plan.n_tokens)
    else:
        say(f"generating random {plan.weight_format} weights for {plan.model.name} (seed {plan.seed}) ...")
        engine = Engine.random(plan.model, plan.weight_format, plan.kv_cache, plan.seed)
    load_s = time.perf_counter() - start
    say(f"decoding {plan.n_tokens} tokens up to context {plan.context} with {plan.threads} threads ...")
    measure = lambda: measure_decode(engine, plan.context, plan.n_tokens, plan.threads, load_s, plan.seed)  # noqa: E731
    if calibrated is None:
        return measure()
    from perfsim.compare import measured_in_calibrated_state

    return measured_in_calibrated_state(calibrated, measure, memory_state_remeasures, say=say)


def run_host(gguf_path=None, model_name=None, weights=None, kv_cache="f16", context=256, n_tokens=16, threads=None, seed=0,
             progress=None) -> Measurement:
    return execute(plan_run(gguf_path, model_name, weights, kv_cache, context, n_tokens, threads, seed), progress)
