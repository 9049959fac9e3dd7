"""The `perfsim` command: thin commands that call one library function each and format the result.

argparse (stdlib) rather than click: it imports in ~5 ms, and the prediction path must answer
instantly. Every user error is one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from perfsim.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + message; we want one line
        raise UserError(f"{self.prog}: {message} (see '{self.prog} --help')")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    return value


def _nonnegative_int(text: str) -> int:
    value = _positive_int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def _add_memory_state_option(p, prefix: str):
    from perfsim.compare import MEMORY_STATE_PAUSE_S, MEMORY_STATE_RANGE, MEMORY_STATE_REMEASURES

    p.add_argument("--memory-state-retries", type=_nonnegative_int, default=MEMORY_STATE_REMEASURES, metavar="N",
                   help=f"{prefix}measure a run again, {MEMORY_STATE_PAUSE_S:g} s later, up to N times, while its weights read outside "
                        f"{MEMORY_STATE_RANGE[0]:g}-{MEMORY_STATE_RANGE[1]:g}x the calibration's bandwidth, and compare the closest "
                        f"(default {MEMORY_STATE_REMEASURES}; 0: never)")


def _add_model_options(p):
    p.add_argument("--model", default="phi-3-mini", help="preset name (see 'perfsim models') or a Hugging Face config.json path")
    p.add_argument("--weights", "--quant", dest="weights", default="q4_0", help="weight format: f32, f16, q8_0, q4_0, int4_gN (default q4_0)")
    p.add_argument("--activations", default="f32", help="activation format (default f32)")
    p.add_argument("--kv-cache", default="f16", help="KV cache format: f32, f16, q8_0 (default f16)")
    p.add_argument("--context", type=_positive_int, default=256, help="tokens the decoded token attends to, itself included (default 256)")


def _device_args(p):
    p.add_argument("--device", help="device profile name (see 'perfsim devices')")
    p.add_argument("--device-file", metavar="PATH", help="a device profile YAML outside the package")
    p.add_argument("--unit", help="compute unit of the device (default: the profile's default_unit)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="perfsim", description="Hardware-aware performance simulator and profiler for small language models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("profile", help="predict decode speed of a model on a device")
    _device_args(p)
    _add_model_options(p)
    p.add_argument("--prompt", type=_positive_int, default=128, help="prompt tokens for time to first token (default 128)")
    p.add_argument("--threads", type=_positive_int, help="CPU threads (default: all cores of a CPU unit)")
    p.add_argument("--gguf", metavar="PATH", help="with --device host: decode this Phi-3 GGUF (default: random weights)")
    p.add_argument("--tokens", type=_positive_int, default=16, help="with --device host: tokens decoded and timed (default 16)")
    _add_memory_state_option(p, "with --device host: ")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("run", help="measure real decode on this host with perfsim's Numba kernels")
    p.add_argument("--device", default="host", help="only 'host' can be measured")
    p.add_argument("--gguf", metavar="PATH", help="Phi-3 GGUF file (Q4_0, Q8_0, F16, F32); default: deterministic random weights")
    p.add_argument("--model", help="model preset for random weights (default phi-3-mini)")
    p.add_argument("--weights", "--quant", dest="weights", help="weight format for random weights: q4_0 (default), q8_0, f16, f32")
    p.add_argument("--kv-cache", default="f16", help="KV cache format: f16 (default), q8_0, f32")
    p.add_argument("--context", type=_positive_int, default=256, help="context of the last measured token (default 256)")
    p.add_argument("--tokens", type=_positive_int, default=16, help="tokens decoded and timed (default 16)")
    p.add_argument("--threads", type=_positive_int, help="Numba threads (default: all cores)")
    p.add_argument("--seed", type=_positive_int, default=0, help="seed of the random weights (default 0)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("sweep", help="predicted and measured decode on this host over contexts and thread counts")
    p.add_argument("--gguf", metavar="PATH", help="Phi-3 GGUF file (default: random weights)")
    p.add_argument("--model", help="model preset for random weights (default phi-3-mini)")
    p.add_argument("--weights", "--quant", dest="weights", help="weight format for random weights (default q4_0)")
    p.add_argument("--kv-cache", default="f16", help="KV cache format (default f16)")
    p.add_argument("--contexts", default="128,512,1024,2048,4096", help="comma-separated contexts (default 128,512,1024,2048,4096)")
    p.add_argument("--threads", default=None, help="comma-separated thread counts (default 1..all cores)")
    # 16, as perfsim profile: over the twelve rounds of the tenth session, the first 8 steps of each point alone had
    # tokens/s within 10% at 94% (Mini) and 91% (Small) of points, all 16 at 96% and 95%.
    p.add_argument("--tokens", type=_positive_int, default=16, help="tokens timed per point (default 16)")
    p.add_argument("--output", metavar="PATH", help="also write the records as JSON lines to PATH")
    _add_memory_state_option(p, "")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("calibrate", help="measure this host's roofs and write its profile (under a minute)")
    p.add_argument("--output", metavar="PATH", help="where to write the profile (default: the cache, used by --device host)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("dashboard", help="start the Streamlit dashboard")
    p.add_argument("--port", type=_positive_int, default=8501, help="port to serve on (default 8501)")
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("report", help="write the dashboard's figures as one standalone HTML file")
    p.add_argument("--html", metavar="PATH", required=True, help="where to write the report")
    _add_model_options(p)
    p.add_argument("--host-json", metavar="PATH", help="a saved 'perfsim profile --device host --json' to add measured points")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("gate", help="CI performance gate: same-run ratios against a committed baseline (exit 1 on a regression)")
    from perfsim.gate import add_gate_arguments, main as gate_main

    add_gate_arguments(p)
    p.set_defaults(func=gate_main)

    p = sub.add_parser("devices", help="list device profiles")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_devices)

    p = sub.add_parser("models", help="list model presets")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)
    p = sub.add_parser("bench", help="run a benchmark and print its figures")
    p.add_argument("suite", help="prediction or decode")
    p.set_defaults(func=cmd_bench)
    return parser


def _formats(args):
    from perfsim.workload import formats_from_names

    return formats_from_names(args.weights, args.kv_cache, args.activations)


def _device(args):
    from perfsim.device import get_device, load_device_file

    if args.device_file and args.device:
        raise UserError("give --device NAME or --device-file PATH, not both")
    if args.device_file:
        return load_device_file(args.device_file)
    if not args.device:
        raise UserError("missing --device NAME (see 'perfsim devices') or --device-file PATH")
    return get_device(args.device)


def cmd_profile_host(args) -> int:
    from perfsim.calibrate import load_host_profile
    from perfsim.compare import compare
    from perfsim.report import comparison_record, format_comparison
    from perfsim.run import execute, plan_run

    if args.unit not in (None, "cpu"):
        raise UserError(f"the host has one unit, cpu; got --unit {args.unit}")
    if args.device_file:
        raise UserError("--device host measures this machine; --device-file is for predictions")
    gguf = args.gguf
    model = None if gguf else args.model
    weights = None if gguf else args.weights
    plan = plan_run(gguf, model, weights, args.kv_cache, args.context, args.tokens, args.threads)
    device = load_host_profile(progress=None if args.json else progress_bar, message=_progress)
    measurement = execute(plan, None if args.json else _progress, device, args.memory_state_retries)
    comparison = compare(device, measurement)
    print(json.dumps(comparison_record(comparison), indent=2) if args.json else format_comparison(comparison))
    return 0


def cmd_profile(args) -> int:
    from perfsim.model import resolve_model

    if args.device == "host":
        return cmd_profile_host(args)
    if args.gguf:
        raise UserError("--gguf is for --device host (a measured run); a prediction needs only --model and --weights")
    from perfsim.report import format_profile, prediction_record, profile_record
    from perfsim.roofline import predict

    device = _device(args)
    prediction = predict(resolve_model(args.model), _formats(args), device, args.context, args.prompt, args.unit, args.threads)
    projected = _projection(prediction, args)
    record = profile_record(prediction)
    if projected is not None:
        record["projected_with_host_efficiencies"] = prediction_record(projected)
    print(json.dumps(record, indent=2) if args.json else format_profile(prediction, projected))
    return 0


def _projection(prediction, args):
    """The prediction again with this host's measured kernel efficiencies, if a host profile exists
    (never calibrates: a prediction must stay instant) and the unit is of the host's kind."""
    from perfsim.calibrate import host_profile_path
    from perfsim.device import load_device_file
    from perfsim.projection import carry_over
    from perfsim.roofline import predict

    path = host_profile_path()
    if not path.exists():
        return None
    try:
        host = load_device_file(path)
    except UserError:
        return None  # a corrupt cache is re-measured by --device host; a prediction just goes without
    projected_device = carry_over(prediction.device, prediction.unit.name, host)
    if projected_device is None:
        return None
    p = prediction
    return predict(p.model, p.formats, projected_device, p.context, p.prompt_tokens, p.unit.name, p.threads)


def cmd_run(args) -> int:
    from perfsim.report import format_measurement, run_record
    from perfsim.run import run_host

    if args.device != "host":
        raise UserError(f"only the host can be measured, got --device {args.device!r}; 'perfsim profile --device {args.device}' predicts it")
    measurement = run_host(args.gguf, args.model, args.weights, args.kv_cache, args.context, args.tokens, args.threads, args.seed,
                           progress=None if args.json else _progress)
    print(json.dumps(run_record(measurement), indent=2) if args.json else format_measurement(measurement))
    return 0


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def progress_bar(done: int, total: int, what: str) -> None:
    width = 30
    filled = width * done // max(total, 1)
    end = "\n" if done >= total else ""
    print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {what:<40}", end=end, file=sys.stderr, flush=True)


def cmd_sweep(args) -> int:
    from perfsim.calibrate import load_host_profile
    from perfsim.compare import MEMORY_STATE_RANGE, memory_state_warning
    from perfsim.measure import available_threads
    from perfsim.report import table
    from perfsim.sweep import parse_list, plan_sweep, run_sweep

    contexts = parse_list(args.contexts, "contexts")
    threads = parse_list(args.threads, "threads") if args.threads else list(range(1, available_threads() + 1))
    plan_args = dict(gguf_path=args.gguf, model_name=None if args.gguf else args.model, weights=None if args.gguf else args.weights,
                     kv_cache=args.kv_cache)
    plan = plan_sweep(plan_args, contexts, threads, args.tokens)
    device = load_host_profile(progress=progress_bar, message=_progress)
    rows, records = [], []
    for record in run_sweep(device, plan, contexts, threads, args.tokens, args.output, None if args.json else progress_bar,
                            args.memory_state_retries, say=_progress):
        if args.json:
            print(json.dumps(record), flush=True)
        records.append(record)
        g = record["groups"]
        rows.append([record["threads"], record["context"], f"{record['predicted_tokens_per_s']:.2f}", f"{record['measured_tokens_per_s']:.2f}",
                     f"{100 * record['error']:+.1f}%"] + [f"{100 * g[k]['error']:+.1f}%" if k in g else "" for k in ("gemv", "attention", "rest")]
                    + [len(record["set_aside_step_seconds"]), f"{100 * record['stolen_fraction']:.0f}%",
                       f"{record['memory_state_ratio']:.2f}x", 1 + len(record["set_aside_memory_state_ratios"])])
    if not args.json:
        print(table(["threads", "context", "predicted tok/s", "measured tok/s", "error", "gemv", "attention", "rest", "re-run", "stolen",
                     "memory", "tries"], rows, "rrrrrrrrrrrr"))
        print("re-run: steps run again because the hypervisor stole vCPU time during them (/proc/stat steal); stolen: what it still took "
              "during the steps kept, over their wall time; memory: the weights' passes over the calibration's read bandwidth; "
              "tries: runs of the point (another is made while memory is outside "
              f"{MEMORY_STATE_RANGE[0]:g}-{MEMORY_STATE_RANGE[1]:g}x, up to --memory-state-retries)")
    for record in records:
        warning = memory_state_warning(record["memory_state_ratio"], record["threads"])
        if warning:
            print(f"at context {record['context']}: {warning}", file=sys.stderr)
    return 0


def cmd_calibrate(args) -> int:
    from pathlib import Path

    from perfsim.calibrate import calibrate_host, calibration_warnings, decode_points_path, host_profile_path

    path = Path(args.output) if args.output else host_profile_path()
    device = calibrate_host(progress_bar, path)
    unit = device.unit()
    bandwidths = ", ".join(f"{t} threads {bw:.1f} GB/s" for t, bw in unit.bandwidth_gb_s_by_threads.items())
    print(f"host profile written to {path} ({device.calibration['seconds']:.0f} s): read bandwidth {bandwidths}; "
          f"the decode points its fixed costs were fitted on in {decode_points_path(path).name} beside it")
    for warning in calibration_warnings(device):
        print(warning, file=sys.stderr)
    return 0


def cmd_dashboard(args) -> int:
    import subprocess

    from perfsim.dashboards import MAIN_PAGE

    print(f"perfsim dashboard: http://localhost:{args.port} (Ctrl-C stops it)", flush=True)
    command = [sys.executable, "-m", "streamlit", "run", str(MAIN_PAGE), "--server.port", str(args.port),
               "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    return subprocess.call(command)


def cmd_report(args) -> int:
    from perfsim.viz import write_html_report

    from perfsim.model import resolve_model
    from perfsim.workload import check_context

    _formats(args)  # checks the format names
    check_context(resolve_model(args.model), args.context)
    path = write_html_report(args.html, args.model, args.weights, args.kv_cache, args.context, args.host_json)
    print(f"report written to {path}")
    return 0


def cmd_devices(args) -> int:
    from perfsim.device import builtin_devices
    from perfsim.report import table

    devices = builtin_devices().values()
    if args.json:
        print(json.dumps([{"name": d.name, "display_name": d.display_name, "kind": d.kind, "peak_bandwidth_gb_s": d.peak_bandwidth_gb_s,
                           "memory_capacity_gb": d.memory_capacity_gb, "units": list(d.units), "default_unit": d.default_unit} for d in devices], indent=2))
        return 0
    rows = [[d.name, d.display_name, d.kind, f"{d.peak_bandwidth_gb_s:g}", f"{d.memory_capacity_gb:g}",
             ", ".join(f"{u}*" if u == d.default_unit else u for u in d.units), len(d.references)] for d in devices]
    print(table(["name", "device", "kind", "peak GB/s", "memory GB", "units (* default)", "references"], rows, "lllrrlr"))
    return 0


def cmd_models(args) -> int:
    from perfsim.model import preset_models
    from perfsim.report import table

    models = preset_models().values()
    if args.json:
        print(json.dumps([dataclasses.asdict(m) | {"n_parameters": m.n_parameters} for m in models], indent=2))
        return 0
    rows = [[m.name, f"{m.n_parameters / 1e9:.2f}B", m.n_layers, m.hidden_size, f"{m.n_heads}/{m.n_kv_heads}", m.head_dim,
             m.intermediate_size, m.vocab_size, m.max_context] for m in models]
    print(table(["name", "params", "layers", "hidden", "heads/kv", "head_dim", "ffn", "vocab", "context"], rows))
    return 0


def cmd_bench(args) -> int:
    from perfsim.bench import SUITES

    if args.suite not in SUITES:
        raise UserError(f"unknown benchmark {args.suite!r}; expected one of: {', '.join(SUITES)}")
    SUITES[args.suite]()
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UserError as e:
        print(f"perfsim: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("perfsim: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
