"""Command line: ``python -m lmcompress_core {models,prepare,compress,evaluate,export,sweep}``.

Errors a person can fix (bad flags, bad values, models that cannot load) print one line ``error: ...`` on
stderr and exit with status 2, never a traceback; Ctrl-C exits with status 130. Long work draws a progress
bar on stderr, so ``--json`` output on stdout stays clean for pipes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """A problem the person running the command can fix; printed as one line."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one ``error: ...`` line (subparsers inherit this class)."""

    def error(self, message: str):
        raise UserError(message)


# ---------------------------------------------------------------- progress on stderr
class ProgressBar:
    """Turns compress.Progress callbacks (or plain message strings) into a one-line bar on stderr."""

    WIDTH = 24

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.stage = None

    def __call__(self, progress) -> None:
        if isinstance(progress, str):
            self._line(progress, final=True)
            return
        total = max(progress.total, 1)
        done = min(max(progress.step, 0), total)
        bar = "#" * round(self.WIDTH * done / total)
        text = f"{progress.stage:<10} [{bar:<{self.WIDTH}}] {done}/{total} {progress.message}"
        new_stage = progress.stage != self.stage
        self.stage = progress.stage
        if self.live or new_stage or done == total:
            self._line(text, final=done == total)

    def _line(self, text: str, final: bool) -> None:
        text = text[:110]
        if self.live:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


# ---------------------------------------------------------------- flags -> CompressionConfig
def _add_model_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny", help="default | tiny | a hub id | a local folder (default: tiny)")


def _add_compression_flags(parser: argparse.ArgumentParser) -> None:
    q = parser.add_argument_group("quantization")
    q.add_argument("--bits", type=int, help="2, 3, 4, 5, 6, 8 (integer codes) or 16 (bf16/fp16 cast); omit for none")
    q.add_argument("--group-size", type=int, default=128, help="32, 64 or 128; 0 = per-channel, -1 = per-tensor")
    q.add_argument("--method", default="rtn", help="rtn | gptq | hqq | mse")
    q.add_argument("--symmetric", action="store_true", help="absmax grid instead of asymmetric min-max")
    q.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                   help="GPTQ: columns by decreasing Hessian diagonal, groups static (default: on)")
    q.add_argument("--gptq-pass", default="sequential",
                   help="GPTQ: sequential (block by block, inputs from the quantized blocks before) | one-pass "
                        "(every Hessian from the float model)")
    q.add_argument("--no-grid-search", action="store_true",
                   help="GPTQ: min-max group grids instead of grids searched on the Hessian")
    q.add_argument("--no-int8-kernel", action="store_true", help="8-bit: simulate in fp32 instead of a real kernel")
    q.add_argument("--runtime", default="real",
                   help="real (int4/int8 weight-only kernels, rest bf16) | simulate (fp32) | dynamic_int8 "
                        "(8-bit: torch dynamic int8, activations quantized too)")
    q.add_argument("--head", default="int8", help="real runtime: int8 (LM head on the int8 kernel) | float")
    q.add_argument("--dtype16", default="bf16", help="bf16 | fp16 (with --bits 16)")
    q.add_argument("--grid", default="integer-zero", help="asymmetric grid: integer-zero (0 on the grid) | minmax")
    q.add_argument("--target-bpw", type=float, help="autopilot: average packed bits per weight of the quantized "
                   "layers (scales and zero-points included); bits per layer from measured sensitivity")
    q.add_argument("--target-mb", type=float, help="autopilot: size of the whole packed file in MB (10^6 bytes)")
    p = parser.add_argument_group("pruning")
    p.add_argument("--sparsity", type=float, default=0.0, help="fraction of weights removed, 0..0.95")
    p.add_argument("--prune-method", default="magnitude", help="magnitude | wanda | sparsegpt")
    p.add_argument("--pattern", default="unstructured", help="unstructured | 2:4 | 4:8")
    p.add_argument("--scope", default="layer", help="layer | global (magnitude only)")
    d = parser.add_argument_group("distillation")
    d.add_argument("--distill-steps", type=int, default=0, help="KD steps (0 = no distillation)")
    d.add_argument("--temperature", type=float, help="KD temperature T, 0.5..10 (default: distill.DEFAULT_TEMPERATURE, "
                   "the app's default too)")
    d.add_argument("--alpha", type=float, default=0.5, help="weight of the KD term, 0..1")
    d.add_argument("--distill-mode", default="recovery", help="recovery | student")
    d.add_argument("--keep-every", type=int, default=2, help="student mode: keep every k-th block")
    d.add_argument("--distill-trains", default="grid", choices=["grid", "codes", "weights"],
                   help="what recovery trains in quantized layers: grid = the scales (codes frozen, the default), "
                        "codes = scales and codes (experimental, see docs/engine.md), "
                        "weights = latent weights (STE)")
    parser.add_argument("--include-embeddings", action="store_true", help="compress embeddings and lm_head too")


def config_from_args(args: argparse.Namespace):
    """The CompressionConfig the flags describe; the configs' own ValueErrors say what is wrong."""
    from lmcompress_core.compress import CompressionConfig
    from lmcompress_core.methods.distill import DEFAULT_TEMPERATURE, DistillationConfig
    from lmcompress_core.methods.prune import PruningConfig
    from lmcompress_core.methods.quantize import QuantizationConfig

    quantization = pruning = distillation = None
    if args.bits is not None:
        granularity = {0: "channel", -1: "tensor"}.get(args.group_size, "group")
        quantization = QuantizationConfig(
            bits=args.bits, granularity=granularity, group_size=args.group_size if granularity == "group" else 128,
            symmetric=args.symmetric, grid=args.grid, method=args.method, act_order=args.act_order,
            calibration_pass=args.gptq_pass, grid_search=not args.no_grid_search,
            int8_kernel=not args.no_int8_kernel, dtype16=args.dtype16)
    if args.sparsity or args.pattern != "unstructured":
        pruning = PruningConfig(sparsity=args.sparsity, method=args.prune_method, pattern=args.pattern,
                                scope=args.scope)
    if args.distill_steps:
        temperature = DEFAULT_TEMPERATURE if args.temperature is None else args.temperature
        distillation = DistillationConfig(temperature=temperature, alpha=args.alpha, steps=args.distill_steps,
                                          mode=args.distill_mode, keep_every=args.keep_every,
                                          trains=args.distill_trains)
    return CompressionConfig(quantization=quantization, pruning=pruning, distillation=distillation,
                             include_embeddings=args.include_embeddings, runtime=args.runtime, head=args.head)


def with_autopilot(args: argparse.Namespace, loaded, config):
    """With --target-bpw / --target-mb: the config whose layer_bits the autopilot chose for this model (the
    --bits/--group-size/--method flags give the base settings; default 4-bit groups of 128)."""
    from dataclasses import replace

    from lmcompress_core.compress import Progress
    from lmcompress_core.methods.autopilot import BudgetConfig, allocate_for
    from lmcompress_core.methods.quantize import QuantizationConfig

    if args.target_bpw is None and args.target_mb is None:
        return config
    base = config.quantization or QuantizationConfig(bits=4, group_size=128, grid=args.grid, method=args.method)
    budget = BudgetConfig(target_bpw=args.target_bpw, target_mb=args.target_mb, base=replace(base, int8_kernel=False))
    bar = ProgressBar()
    allocation = allocate_for(loaded, budget, callback=lambda done, total, what: bar(
        Progress("autopilot", done, total, f"sensitivity: {what}")))
    print(f"autopilot: {allocation.bits_per_weight:.3f} bits per weight, predicted KL {allocation.predicted_kl:.4f}",
          file=sys.stderr)
    return replace(config, quantization=allocation.config)


# ---------------------------------------------------------------- commands
def _cmd_models(args) -> int:
    from lmcompress_core.models.loading import list_models

    rows = list_models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        params = f"{row['params'] / 1e6:.1f}M" if row.get("params") else "?"
        state = "available" if row.get("available") else "needs download"
        print(f"{row['name']:<32} {row.get('source', ''):<9} {params:>8}  {state}")
    return 0


def _cmd_prepare(args) -> int:
    from lmcompress_core.models.loading import prepare_default

    folder = prepare_default(callback=ProgressBar())
    print(f"default model ready in {folder}")
    print(f"decode step of the app's first setting: {_precompile_default()}")
    return 0


def _precompile_default() -> str:
    """Compile the decode step of Explore's first setting (4-bit groups of 128, which 2- and 3-bit share) into the
    disk cache, so the server's own compilation of it takes seconds instead of a minute beside the first moves."""
    from lmcompress_core.compress import CompressionConfig, compress
    from lmcompress_core.methods.quantize import QuantizationConfig
    from lmcompress_core.models.loading import load_model
    from lmcompress_core.runtime.compiled import compile_now

    loaded = load_model("default")
    setting = QuantizationConfig(bits=4, group_size=128, grid="integer-zero")
    return compile_now(compress(loaded.model, CompressionConfig(quantization=setting)).model) or "not compiled"


def _cmd_compress(args) -> int:
    from lmcompress_core.compress import compress
    from lmcompress_core.models.loading import load_model
    from lmcompress_core.runtime.packing import save_compressed
    from lmcompress_core.measure.protocol import calibration_for

    config = config_from_args(args)   # a refused setting fails here, before a model is loaded
    loaded = load_model(args.model)
    config = with_autopilot(args, loaded, config)
    calibration = calibration_for(loaded, config)
    cm = compress(loaded.model, config, calibration=calibration, tokenizer=loaded.tokenizer, callback=ProgressBar())
    written = save_compressed(cm, loaded.model, args.out)
    summary = {"model": loaded.name, "out": str(Path(args.out).resolve()), "packed_bytes": written,
               "kernel": cm.kernel, "config": config.to_dict(), "notes": list(getattr(cm, "notes", []))}
    print(json.dumps(summary, indent=2) if args.json else
          f"wrote {summary['out']}: {written:,} bytes (safetensors + compression.json); kernel: {cm.kernel}")
    return 0


def _cmd_export(args) -> int:
    from lmcompress_core.export import export_hf, gguf_refusal, recipes

    config = config_from_args(args)
    out = Path(args.out)
    if args.format == "recipe":
        text = recipes(config).to_text()
        if args.out == "-":
            print(text)
            return 0
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        summary = {"format": "recipe", "out": str(out.resolve()), "config": config.to_dict()}
    else:
        from lmcompress_core.compress import compress
        from lmcompress_core.measure.protocol import calibration_for
        from lmcompress_core.models.loading import load_model

        if args.format == "gguf" and gguf_refusal(config) is not None:   # before loading or compressing anything
            raise UserError(gguf_refusal(config))
        loaded = load_model(args.model)
        cm = compress(loaded.model, config, calibration=calibration_for(loaded, config), callback=ProgressBar())
        if args.format == "gguf":
            path = out if out.suffix == ".gguf" else out / "model.gguf"
            result = _write_gguf(cm, loaded, path)
            summary = {"tensor_types": result.type_counts(), "converted": result.converted,
                       "file_bytes": result.file_bytes}
        else:
            path = out
            result = export_hf(cm, loaded.tokenizer, path)
            summary = {"dtype": result.dtype}
        summary = {"format": args.format, "model": loaded.name, "out": str(path.resolve()), **summary,
                   "note": result.note, "config": config.to_dict()}
    print(json.dumps(summary, indent=2) if args.json else f"wrote {summary['out']} ({args.format})" + (
        f": {summary['note']}" if "note" in summary else ""))
    return 0


def _write_gguf(cm, loaded, path: Path):
    """The GGUF file, its size and types said on stderr before writing, a progress bar while it is written."""
    from lmcompress_core.compress import Progress
    from lmcompress_core.export import export_gguf, plan_gguf

    plan = plan_gguf(cm, loaded.tokenizer, name=loaded.card.name)
    print(f"GGUF: {plan.summary()}", file=sys.stderr)
    bar = ProgressBar()
    return export_gguf(cm, loaded.tokenizer, path, name=loaded.card.name, plan=plan,
                       callback=lambda done, total, tensor: bar(Progress("export", done, total, tensor)))


def _cmd_evaluate(args) -> int:
    from lmcompress_core.compress import compress
    from lmcompress_core.measure.evaluation import evaluate
    from lmcompress_core.models.loading import load_model
    from lmcompress_core.measure.llamacpp import readout
    from lmcompress_core.measure.protocol import EvalProtocol, calibration_for

    protocol = EvalProtocol(eval_tokens=args.eval_tokens, context=args.context, stride=args.stride or args.context,
                            prompt=args.prompt, new_tokens=args.new_tokens, seed=args.seed,
                            latency=not args.no_latency, generation=not args.no_generation)
    config = config_from_args(args)   # a refused setting fails here, before a model is loaded
    loaded = load_model(args.model)
    config = with_autopilot(args, loaded, config)
    if not args.llamacpp:
        data = evaluate(loaded, config, protocol, callback=ProgressBar()).to_dict()
    else:
        cm = compress(loaded.model, config, calibration=calibration_for(loaded, config, protocol),
                      tokenizer=loaded.tokenizer, callback=ProgressBar())
        data = evaluate(loaded, config, protocol, compressed=cm, callback=ProgressBar()).to_dict()
        data["llamacpp"] = readout(cm, loaded, protocol)
    print(json.dumps(data, indent=2, ensure_ascii=False) if args.json else _summary(data))
    return 0


def _summary(data: dict) -> str:
    size, ppl, lat, gen = data["size"], data["perplexity"], data.get("latency"), data.get("generation")
    lines = [f"model {data['model']}  kernel: {data['kernel']}",
             f"size: theoretical {size['theoretical_bytes']:,} B, packed {size['packed_bytes']:,} B, "
             f"runtime {size['runtime_bytes']:,} B (base {size['base_bytes']:,} B)" + (
                 f" — {size['note']}" if size.get("note") else ""),
             f"perplexity {ppl['value']:.3f} ± {ppl['stderr']:.3f} over {ppl['tokens']} tokens "
             f"(base {data['base_perplexity']:.3f}); KL to base {data['kl_to_base']:.4f} nats; "
             f"top-1 agreement {data['top1_agreement']:.1%}"]
    stats = data.get("quality_stats")
    if stats:
        lines.append(f"KL per token: median {stats['kl_median']:.4f}, p99 {stats['kl_p99']:.4f}, p99.9 "
                     f"{stats['kl_p999']:.4f} nats; same top token {stats['same_top_percent']:.1f}%; "
                     f"RMS Δp {stats['rms_delta_p_percent']:.2f}%")
    if lat:
        speed = data.get("speed") or {}
        lines.append(f"latency: prefill {lat['prefill_ms']:.1f} ms ({lat['prompt_tokens']} tokens), decode "
                     f"{lat['decode_tokens_per_s']:.1f} tok/s (roofline ≤ {lat['roofline_tokens_per_s'] or 0:.0f}), "
                     f"{lat['threads']} threads; against the base (timed alternately): prefill "
                     f"{speed.get('prefill_text', '?')}, decode {speed.get('decode_text', '?')}")
    if "llamacpp" in data:
        from lmcompress_core.measure.llamacpp import sentence

        lines.append(sentence(data["llamacpp"], ppl["value"], lat["decode_tokens_per_s"] if lat else None))
    if gen:
        lines += [f"prompt: {gen['prompt']!r}", f"  base:       {gen['base']!r}",
                  f"  compressed: {gen['compressed']!r}  (first divergence: {gen['first_divergence']})"]
    return "\n".join(lines)


def _cmd_sweep(args) -> int:
    from lmcompress_core import sweep
    from lmcompress_core.measure.protocol import EvalProtocol
    from lmcompress_core.execute import make_executor
    from lmcompress_core.models.loading import load_model

    from lmcompress_core.methods.prune import PruningConfig

    configs = sweep.grid(args.bits, args.sparsity, args.method,
                         quantization=config_from_args(_sweep_template(args)).quantization,
                         pruning=PruningConfig(method=args.prune_method))
    executor = make_executor(args.backend, address=args.address, num_cpus=args.num_cpus,
                             cpus_per_task=args.cpus_per_task, gpus_per_task=args.gpus_per_task)
    loaded = load_model(args.model)
    try:
        protocol = EvalProtocol(eval_tokens=args.eval_tokens, context=args.context, stride=args.context,
                                latency=not args.no_latency, generation=False, latency_runs=args.latency_runs)
        table = sweep.run_sweep(loaded, configs, callback=ProgressBar(), executor=executor, out=args.out,
                                resume=args.resume, protocol=protocol)
    finally:
        executor.close()
    failures = table.attrs["failures"]
    for failure in failures:
        print(f"failed: {failure['label']}: {failure['error']}", file=sys.stderr)
    if args.json:
        rows = json.loads(table.to_json(orient="records"))
        print(json.dumps({"backend": table.attrs["backend"], "out": str(Path(args.out).resolve()), "rows": rows,
                          "failures": failures}, indent=2))
    else:
        print(f"{len(table)} configurations on {table.attrs['backend']}; results in {Path(args.out).resolve()}")
        print(table[["label", "size_mb", "perplexity", "decode_tokens_per_s", "pareto_size"]].to_string(index=False))
    return 1 if failures else 0


def _sweep_template(args) -> argparse.Namespace:
    """The quantization settings every grid point shares (bits and method come from the grid)."""
    return argparse.Namespace(bits=4, group_size=args.group_size, symmetric=args.symmetric, method="rtn",
                              act_order=True, gptq_pass="sequential", no_grid_search=False,
                              no_int8_kernel=False, dtype16="bf16", sparsity=0.0,
                              pattern="unstructured", distill_steps=0, include_embeddings=False, runtime="real",
                              head="int8", grid="integer-zero")


def _comma_list(kind):
    def parse(text: str) -> list:
        try:
            values = [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {kind.__name__}") from None
        if not values:
            raise argparse.ArgumentTypeError("give at least one value")
        return values
    return parse


def _add_sweep_parser(sub) -> None:
    sw = sub.add_parser("sweep", help="evaluate a grid of configurations, serially or on Ray, into JSON lines")
    _add_model_flag(sw)
    sw.add_argument("--bits", type=_comma_list(int), default=[2, 3, 4, 8], help="e.g. 2,3,4,8 (32 = float)")
    sw.add_argument("--sparsity", type=_comma_list(float), default=[0.0, 0.5], help="e.g. 0,0.5")
    sw.add_argument("--method", type=_comma_list(str), default=["rtn"], help="e.g. rtn,gptq")
    sw.add_argument("--prune-method", default="magnitude", help="magnitude | wanda | sparsegpt (sparsity > 0)")
    sw.add_argument("--group-size", type=int, default=128, help="32, 64 or 128; 0 = per-channel, -1 = per-tensor")
    sw.add_argument("--symmetric", action="store_true", help="absmax grid instead of asymmetric min-max")
    sw.add_argument("--eval-tokens", type=int, default=2048, help="tokens scored for perplexity")
    sw.add_argument("--context", type=int, default=256, help="perplexity window length (stride = context)")
    sw.add_argument("--no-latency", action="store_true", help="skip timing (sizes and perplexity only)")
    sw.add_argument("--latency-runs", type=int, default=3, help="timed runs behind each latency median")
    sw.add_argument("--backend", choices=["serial", "ray"], default="serial", help="where configurations run")
    sw.add_argument("--address", default=None, help="ray: auto | ray://host:10001 (default: a local Ray)")
    sw.add_argument("--num-cpus", type=int, default=None, help="ray: CPUs of the local Ray (default: all)")
    sw.add_argument("--cpus-per-task", type=int, default=1, help="ray: CPUs (torch threads) per worker")
    sw.add_argument("--gpus-per-task", type=float, default=0.0, help="ray: GPUs reserved per worker")
    sw.add_argument("--out", required=True, help="JSON-lines file, one line per finished configuration")
    sw.add_argument("--resume", action="store_true", help="skip configurations already finished in --out")
    sw.add_argument("--json", action="store_true", help="print the table as JSON on stdout")
    sw.set_defaults(run=_cmd_sweep)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m lmcompress_core", description="LM Compression Lab: compress and measure LLMs.")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{models,prepare,compress,evaluate,export,sweep}")
    models = sub.add_parser("models", help="list the models the app knows")
    models.add_argument("--json", action="store_true")
    models.set_defaults(run=_cmd_models)
    sub.add_parser("prepare", help="convert the embedded default model to the fast cache").set_defaults(
        run=_cmd_prepare)
    comp = sub.add_parser("compress", help="compress a model and write the packed format")
    _add_model_flag(comp)
    _add_compression_flags(comp)
    comp.add_argument("--out", required=True, help="folder to write (created)")
    comp.add_argument("--json", action="store_true")
    comp.set_defaults(run=_cmd_compress)
    ev = sub.add_parser("evaluate", help="compress and measure size, latency, perplexity, generations")
    _add_model_flag(ev)
    _add_compression_flags(ev)
    ev.add_argument("--eval-tokens", type=int, default=2048, help="tokens scored for perplexity")
    ev.add_argument("--llamacpp", action="store_true",
                    help="also run the exported GGUF in llama.cpp (perplexity on the same tokens, decode tok/s) "
                         "when `make llamacpp` has built it")
    ev.add_argument("--context", type=int, default=256, help="perplexity window length")
    ev.add_argument("--stride", type=int, default=0, help="perplexity window step (0 = context)")
    ev.add_argument("--prompt", default=None, help="generation prompt (default: one per model)")
    ev.add_argument("--new-tokens", type=int, default=32)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--no-latency", action="store_true")
    ev.add_argument("--no-generation", action="store_true")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(run=_cmd_evaluate)
    ex = sub.add_parser("export", help="compress and write a GGUF file, a Hugging Face folder or recipes for other tools")
    _add_model_flag(ex)
    _add_compression_flags(ex)
    ex.add_argument("--format", required=True, choices=("gguf", "hf", "recipe"),
                    help="gguf (Llama models; llama.cpp) | hf (safetensors folder) | recipe (llm-compressor, "
                         "GPTQModel, llama-quantize)")
    ex.add_argument("--out", required=True, help="gguf: a .gguf file or a folder; hf: a folder; recipe: a file or -")
    ex.add_argument("--json", action="store_true")
    ex.set_defaults(run=_cmd_export)
    _add_sweep_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from lmcompress_core.compress import Cancelled
    from lmcompress_core.models.loading import ModelError

    _quiet_libraries()
    # a command's timed runs go through the compiled decode step, compiled first (seconds from the disk cache),
    # never beside a background compilation that would share the cores with them
    os.environ.setdefault("LMCOMPRESS_COMPILE", "wait")
    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except KeyboardInterrupt:
        print("\nerror: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (UserError, ValueError, ModelError, Cancelled, OSError) as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE


def _quiet_libraries() -> None:
    """Our progress bar replaces transformers' own bars and advisory log lines on stderr."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _one_line(exc: Exception) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:500]
