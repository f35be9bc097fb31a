"""One markdown block per bench section for results.md (tables from the measured rows, nothing recomputed)."""
from __future__ import annotations

from bench.text import fmt, md_table


MODEL_NAMES = {"default": "SmolLM2-135M-Instruct", "tiny": "the tiny model"}


def _name(s: dict) -> str:
    return MODEL_NAMES.get(s.get("model"), str(s.get("model")))


def _interactivity(s: dict) -> list[str]:
    out = ["Time from a configuration change to each result of a Report through `lmcompress_core.measure.evaluation.evaluate` "
           "(no browser), median of the runs. Stages run size → perplexity → generations (streamed) → latency "
           "(while exploring, the compressed model timed alone). *Cold*: the first Report of a fresh process, model "
           "load and the base model's reusable results included. *Change*: the model is loaded and a slider moves "
           "to a configuration not seen before. *Cached*: the app's result cache hit for a configuration seen "
           "before. *First chart* / *perplexity* / *generations*: until that stage is done. *Abandon*: from a new "
           "move (should_stop turning True) to the old run stopping, the largest of 5 points in a change; *while "
           "distilling*: the same with Distil on, at 5 points of one distillation step.", ""]
    rows = []
    for name, m in s.get("models", {}).items():
        rows.append([name, m.get("eval_tokens"), m.get("load_s"), m.get("cold_s"), m.get("change_s"),
                     m.get("cached_s"), m.get("first_chart_s"), m.get("perplexity_chart_s"),
                     m.get("generations_s"), m.get("abandon_s"), m.get("abandon_distil_s")])
    out += md_table(["model", "eval tokens", "load s", "cold s", "change s", "cached s", "first chart s",
                     "perplexity s", "generations s", "abandon s", "abandon while distilling s"], rows)
    for name, m in s.get("models", {}).items():
        stages = m.get("stages_s") or {}
        if stages:
            listed = ", ".join(f"{k} {fmt(v, 2)} s" for k, v in stages.items())
            out += [f"Stages of one change ({name}): {listed}", ""]
    for name, g in (s.get("gptq") or {}).items():
        out += [f"GPTQ ({name}): a first setting compresses in {fmt(g.get('first_compress_s'), 2)} s, a second "
                f"(calibration statistics reused) in {fmt(g.get('second_compress_s'), 2)} s "
                f"(×{fmt(g.get('compress_speedup'), 2)}); whole Reports {fmt(g.get('first_total_s'), 2)} s and "
                f"{fmt(g.get('second_total_s'), 2)} s.", ""]
    return out


def _browser(s: dict) -> list[str]:
    out = [f"Seconds a person waits, measured in {s.get('how')}. *First chart*: a result chart shows new data; "
           "*all charts*: size, latency and perplexity all new; *complete*: the generations shown and the script "
           "finished; *cold*: opening the URL on a fresh server to the first complete page. GPTQ and Wanda moves "
           "are reported apart.", ""]
    rows = []
    for name, m in s.get("models", {}).items():
        for group, g in (m.get("groups") or {}).items():
            rows.append([name, group, g.get("moves"), g.get("first_s"), g.get("all_s"), g.get("complete_s"),
                         m.get("cold_s") if group == "rtn" else None])
    out += md_table(["model", "kind of move", "n", "first chart s", "all charts s", "complete s", "cold s"], rows)
    for name, m in s.get("models", {}).items():
        stops = m.get("interrupts") or []
        if stops:
            each = ", ".join(f"{fmt(x.get('after_s'), 2)} s in → {fmt(x.get('stop_s'), 2)} s" for x in stops)
            out += [f"A move while a run computes ({name}): the interrupted run's script ended at most "
                    f"{fmt(m.get('abandon_s'), 2)} s after the key press ({each}).", ""]
        stops = m.get("distil_interrupts") or []
        if stops:
            each = ", ".join(f"{fmt(x.get('after_s'), 2)} s in → {fmt(x.get('stop_s'), 2)} s" for x in stops)
            out += [f"Distil switched off while distilling ({name}): the distilling run's script ended at most "
                    f"{fmt(m.get('abandon_distil_s'), 2)} s after the click ({each}).", ""]
    phases = ["to_script_s", "preamble_s", "evaluate_s", "evaluate_unstaged_s", "after_evaluate_s",
              "to_complete_after_script_s", "bytes", "server_cpu_s", "browser_cpu_s"]
    rows = [[name, "median move"] + [p.get(k) for k in phases] for name, p in (s.get("profile") or {}).items()]
    rows += [[name, "cold start"] + [m.get("cold_profile", {}).get(k) for k in phases]
             for name, m in s.get("models", {}).items()]
    out += ["Where the time goes (server spans from `LMCOMPRESS_SPANS`, websocket frames counted by the browser):", ""]
    return out + md_table(["model", "case", "release → script s", "page before evaluate s", "evaluate s",
                           "evaluate outside its stages s", "page after evaluate s", "script end → complete s",
                           "websocket bytes", "server CPU s", "Chromium CPU s"], rows)


def _speed(s: dict) -> list[str]:
    out = [f"{_name(s)}, `measure_latency`: {s.get('prompt_tokens')}-token prompt, "
           f"{s.get('new_tokens')} greedy tokens with KV cache, batch 1; variants interleaved over "
           f"{s.get('rounds')} rounds of {s.get('runs_per_round')} runs, "
           "median of round medians. Roofline = measured copy bandwidth / runtime bytes per decoded token.", ""]
    rows = []
    for name, r in s.get("rows", {}).items():
        rows.append([name, r.get("kernel"), r.get("prefill_ms"), r.get("prefill_speedup"),
                     r.get("decode_tokens_per_s"), r.get("decode_speedup"), r.get("roofline_tokens_per_s"),
                     r.get("roofline_speedup"), r.get("decode_fraction_of_roofline")])
    return out + md_table(["variant", "kernel", "prefill ms", "prefill x fp32", "decode tok/s", "decode x fp32",
                         "roofline tok/s", "roofline x fp32", "decode / roofline"], rows)


def _quality(s: dict) -> list[str]:
    out = [f"Perplexity of {_name(s)} on {s.get('eval_tokens')} tokens "
           f"(fp32 baseline {fmt(s.get('base_perplexity'))}); "
           f"GPTQ calibration {s.get('calibration')}. Quantization time is the library's own call; ours includes "
           f"a deep copy of the model ({fmt(s.get('deepcopy_s'), 2)} s). GPTQ is timed once (it is slow and "
           "deterministic); all other rows are medians.", ""]
    rows = []
    for r in s.get("rows", []):
        measured = "failed" if r.get("error") else r.get("perplexity")   # a failed row has no number
        rows.append([r["name"], r.get("bits"), r.get("group_size"), "sym" if r.get("symmetric") else "asym",
                     measured, r.get("ppl_over_fp32"), r.get("quantize_s"), r.get("error", "")])
    out += md_table(["method", "bits", "group", "scheme", "perplexity", "x fp32", "quantize s", "error"], rows)
    extra = s.get("extra") or {}
    if extra:
        pairs = ", ".join(f"`{k}` {fmt(v)}" for k, v in extra.items())
        out += [f"Other like-for-like ratios (ours / theirs): {pairs}", ""]
    werr = s.get("weight_error_int4_g64") or {}
    if werr.get("error"):
        out += [f"Weight error at int4 g64 asym against torchao: failed (`{werr['error']}`).", ""]
    if werr.get("layers"):
        out += [f"Weight error at int4 g64 asym, ‖Ŵ−W‖²/‖W‖² averaged over {werr['layers']} layers: ours "
                f"{werr['mean_rel_mse_ours']:.5f}, torchao {werr['mean_rel_mse_torchao']:.5f}; ours is lower in "
                f"{werr['ours_lower_in']} of {werr['layers']} layers.", ""]
    zero = s.get("integer_zero_point_ppl") or {}
    if "int4_g64" in zero:
        out += ["Diagnostic (bench-side, not the project's quantizer): the same min-max groups of 64 with the range "
                "widened to include 0 and the zero-point rounded to an integer, so 0 is on the grid — perplexity "
                f"{fmt(zero['int4_g64'])} at int4 and {fmt(zero.get('int3_g64'))} at int3.", ""]
    return out


def _pruning(s: dict) -> list[str]:
    out = [f"{_name(s)}: 50% of every linear layer's weights "
           f"(embeddings and LM head kept), perplexity on {s.get('eval_tokens')} tokens; "
           f"fp32 baseline {fmt(s.get('base_perplexity'))}.", ""]
    rows = [[r["method"], r["pattern"], r.get("perplexity"), r.get("prune_s"), r.get("kernel")]
            for r in s.get("rows", [])]
    out += md_table(["method", "pattern", "perplexity", "prune s", "kernel"], rows)
    extra = s.get("extra") or {}
    return out + ([", ".join(f"`{k}` {fmt(v)}" for k, v in extra.items()), ""] if extra else [])


def _distillation(s: dict) -> list[str]:
    tiny, student = s.get("tiny") or {}, s.get("student") or {}
    out = [f"Recovered fraction = (compressed − after) / (compressed − original) held-out perplexity, on text never "
           "trained on: 1 = all of the loss won back, negative = KD made it worse. "
           f"Tiny model, {tiny.get('setting')}: original {fmt(tiny.get('base_perplexity'))}, compressed without KD "
           f"{fmt(tiny.get('compressed_perplexity'))}; {tiny.get('steps')} recovery steps per temperature and seed "
           f"on {tiny.get('calibration_windows')} calibration windows.", ""]
    out += _recovery_table(tiny)
    for big in (s.get("smollm2"), s.get("smollm2_2bit")):
        if big:
            out += [f"SmolLM2, {big.get('setting')}, T = {s.get('best_temperature')} (the tiny study's best), "
                    f"{big.get('steps')} steps: original {fmt(big.get('base_perplexity'))}, compressed "
                    f"{fmt(big.get('compressed_perplexity'))}; train s includes the compression. Trains: grid = the "
                    "scales (codes frozen, the default), codes = the scales and each weight's grid position.", ""]
            out += _recovery_table(big)
    if student:
        out += [f"Smaller student (every {student.get('keep_every')}-th block of the tiny model), {student.get('steps')} "
                f"steps, T = {student.get('temperature')}, same windows and seed: KD (α 0.5) perplexity "
                f"{fmt((student.get('kd') or {}).get('perplexity'))}, cross-entropy only "
                f"{fmt((student.get('ce_only') or {}).get('perplexity'))}, ratio {fmt(student.get('kd_over_ce_only'))}.",
                ""]
    return out


def _recovery_table(part: dict) -> list[str]:
    rows = [[r["temperature"], r.get("seed"), r.get("trains", "grid"), r.get("perplexity"), r.get("recovered_fraction"),
             r.get("train_s")] for r in part.get("rows", [])]
    return md_table(["T", "seed", "trains", "perplexity", "recovered fraction", "train s"], rows)


def _throughput(s: dict) -> list[str]:
    out = [f"Perplexity evaluation of {_name(s)} in {s.get('context')}-token windows, median of the runs. "
           "FLOPs counted from the shapes (2 per linear weight per token + attention); the peak is the best "
           "`torch.mm` of square 512/1024/2048 matrices in the same dtype and threads.", ""]
    rows = []
    for dtype in ("fp32", "bf16"):
        r = s.get(dtype)
        if r:
            rows.append([dtype, r.get("tokens"), r.get("tokens_per_s"), r.get("achieved_gflops"),
                         r.get("peak_gflops"), r.get("peak_shape"), r.get("fraction_of_peak")])
    return out + md_table(["dtype", "tokens", "tokens/s", "achieved GFLOP/s", "matmul peak GFLOP/s", "peak n",
                         "fraction of peak"], rows)


def _sweep(s: dict) -> list[str]:
    out = [f"The same grid ({s.get('configurations')} configurations of {s.get('grid')}) on the tiny model, protocol "
           f"{s.get('protocol')}: serially in this process ({s.get('serial_threads')} torch threads) and on a local "
           f"Ray {s.get('ray_version')} ({s.get('ray_workers')} workers × {s.get('threads_per_worker')} thread, "
           f"{s.get('cores')} cores). {s.get('how')}.", ""]
    rows = [["serial", fmt(s.get("serial_s"), 1)],
            ["Ray (workers started, model loaded in each)", fmt(s.get("ray_s"), 1)],
            ["ray.init", fmt(s.get("ray_start_s"), 1)]]
    out += md_table(["backend", "seconds"], rows)
    return out + [f"Rows identical on both backends: {s.get('rows_match')}. On 2 cores this measures how two "
                  "processes share the machine, not a cluster's speed-up.", ""]


def _llamacpp(s: dict) -> list[str]:
    if s.get("skipped"):
        return [f"Not measured: {s['skipped']}", ""]
    out = [f"Our exported {_name(s)} GGUFs run by llama-cpp-python {s.get('llama_cpp_python')} ({s.get('threads')} "
           f"threads): perplexity on {s.get('eval_tokens')} tokens in windows of {s.get('context')}, decode of "
           f"{s.get('new_tokens')} tokens after {s.get('prompt_tokens')}, median of {s.get('runs')}. {s.get('how')}.",
           ""]
    rows = [[k, r.get("tensor_types"), r.get("ppl_ours"), r.get("ppl_llamacpp"), r.get("ppl_ratio_llamacpp_over_ours"),
             r.get("ppl_ours_real"), r.get("our_kernel"), r.get("decode_tokens_per_s_ours"),
             r.get("decode_tokens_per_s_llamacpp"), r.get("decode_ratio_ours_over_llamacpp")]
            for k, r in (s.get("rows") or {}).items()]
    return out + md_table(["file", "tensor types", "ppl ours (fp32)", "ppl llama.cpp", "ratio", "ppl ours (real)",
                           "our kernel", "ours tok/s", "llama.cpp tok/s", "ours / llama.cpp"], rows)


RENDERERS = {
    "interactivity": ("1. Interactivity", _interactivity),
    "browser": ("1b. Interactivity in the browser", _browser),
    "speed": ("2. Real speedups on SmolLM2", _speed),
    "quality": ("3. Quality against torchao and optimum-quanto", _quality),
    "pruning": ("4. Pruning: magnitude vs Wanda", _pruning),
    "distillation": ("5. Distillation: recovery by temperature, SmolLM2, the smaller student", _distillation),
    "throughput": ("6. Evaluation throughput", _throughput),
    "sweep": ("7. Sweeps: serial against a local Ray", _sweep),
    "llamacpp": ("8. llama.cpp as the runtime peer", _llamacpp),
}


def all_sections(sections: dict) -> list[str]:
    out = []
    for name, (title, render) in RENDERERS.items():
        s = sections.get(name)
        if s is None:
            continue
        out += [f"## {title}", ""]
        if "error" in s:
            out += [f"This section failed: `{s['error']}`", ""]
            continue
        out += render(s)
        out += [f"Section wall time {fmt(s.get('wall_s'), 1)} s.", ""]
    return out
