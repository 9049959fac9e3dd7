"""`perfsim run`: load or generate weights, check the options, measure decode on the host."""

from __future__ import annotations

import time

from perfsim.errors import UserError
from perfsim.measure import Measurement, check_run, check_threads, measure_decode
from perfsim.model import resolve_model
from perfsim.quant import Formats, quant_format

ENGINE_WEIGHT_FORMATS = ("q4_0", "q8_0", "f16", "f32")


def _silent(message: str) -> None:
    pass


def run_host(gguf_path=None, model_name=None, weights=None, kv_cache="f16", context=256, n_tokens=16, threads=None, seed=0,
             progress=_silent) -> Measurement:
    from perfsim.engine import KV_CACHE_FORMATS

    progress = progress or _silent
    threads = check_threads(threads)
    if kv_cache not in KV_CACHE_FORMATS:
        raise UserError(f"--kv-cache must be one of {', '.join(KV_CACHE_FORMATS)}, got {kv_cache!r}")
    if gguf_path is not None:
        if model_name or weights:
            raise UserError("--model and --weights come from the GGUF file; give either --gguf or them")
        from perfsim.gguf_io import read_phi3_gguf

        arch = read_phi3_gguf(gguf_path).arch  # validates the file before anything large is allocated
        context_limit, name = arch.n_ctx, gguf_path
        if context > context_limit:
            raise UserError(f"context of {context} tokens is longer than {gguf_path}'s limit of {context_limit} tokens")
    else:
        model = resolve_model(model_name or "phi-3-mini")
        weight_format = quant_format(weights or "q4_0")
        if weight_format.name not in ENGINE_WEIGHT_FORMATS:
            raise UserError(f"the engine runs {', '.join(ENGINE_WEIGHT_FORMATS)} weights, not {weight_format.name}")
        check_run(model, Formats(weights=weight_format, kv_cache=quant_format(kv_cache)), context, n_tokens)

    from perfsim.engine import Engine  # imports the kernels (and, on first call, Numba)

    start = time.perf_counter()
    if gguf_path is not None:
        progress(f"mapping {name} and repacking its matrices ...")
        engine = Engine.from_gguf(gguf_path, kv_cache)
        check_run(engine.model, engine.formats, context, n_tokens)
    else:
        progress(f"generating random {weight_format.name} weights for {model.name} (seed {seed}) ...")
        engine = Engine.random(model, weight_format.name, kv_cache, seed)
    load_s = time.perf_counter() - start
    progress(f"decoding {n_tokens} tokens up to context {context} with {threads} threads ...")
    return measure_decode(engine, context, n_tokens, threads, load_s, seed)
