"""plots.py: every builder returns a figure whose data carries the numbers it was given."""
import math

import pandas as pd
import pytest

from lmcompress_core.report import plots


def fake_report(bits=4, ppl=12.0, packed=2_000_000, model="tiny"):
    return {
        "model": model,
        "config": {"quantization": {"bits": bits, "granularity": "group", "group_size": 128,
                                    "symmetric": False, "method": "rtn"},
                   "pruning": {"sparsity": 0.5, "method": "magnitude", "pattern": "unstructured"}},
        "size": {"theoretical_bytes": packed * 0.9, "packed_bytes": packed, "runtime_bytes": 8_000_000,
                 "base_bytes": 8_000_000, "simulated": True, "note": "fake"},
        "latency": {"prefill_ms": 5.0, "decode_tokens_per_s": 300.0, "kernel": "fp32 dense — quantization simulated",
                    "threads": 2, "prompt_tokens": 64, "new_tokens": 16, "runs": 5,
                    "roofline_tokens_per_s": 900.0, "bandwidth_gb_s": 10.0},
        "perplexity": {"value": ppl, "stderr": 0.3, "tokens": 512, "context": 256, "stride": 256,
                       "text": "tiny-heldout"},
        "base_perplexity": {"value": 10.0, "stderr": 0.25, "tokens": 512, "context": 256, "stride": 256,
                            "text": "tiny-heldout"},
        "kl_to_base": 0.05, "top1_agreement": 0.9,
        "generation": {"prompt": "To be", "base": "To be or not", "compressed": "To be or nope",
                       "first_divergence": 3},
        "timings": {},
    }


def test_config_label_names_every_method():
    label = plots.config_label(fake_report()["config"])
    assert "4-bit" in label and "g128" in label and "RTN" in label and "50% magnitude" in label
    assert plots.config_label({}) == "fp32 (uncompressed)"
    assert plots.config_label({"quantization": {"bits": 16, "dtype16": "fp16"}}) == "fp16"
    assert "2:4" in plots.config_label({"pruning": {"sparsity": 0.5, "pattern": "2:4", "method": "wanda"}})


def test_size_figure_plots_bytes_in_mb_against_base():
    fig = plots.size_figure(fake_report(packed=2_000_000))
    bar = fig.data[0]
    assert list(bar.x) == ["base", "theory", "packed", "in RAM"]
    assert bar.y[0] == pytest.approx(8.0) and bar.y[2] == pytest.approx(2.0)


def test_latency_figure_puts_the_base_beside_the_compressed_model_with_the_speed_ratio():
    report = fake_report()
    report["latency"].update(kernel="int8 (real, torch dynamic)", prefill_ms=2.5, decode_tokens_per_s=600.0)
    report["base_latency"] = {"prefill_ms": 5.0, "decode_tokens_per_s": 300.0, "kernel": "float32 dense (base)"}
    report["speed"] = {"prefill_text": "×2.00", "decode_text": "≈ 1× (within the noise of the runs)"}
    fig = plots.latency_figure(report)
    bars = {(trace.x[0], trace.xaxis): (trace.y[0], trace.text[0]) for trace in fig.data}
    assert bars[("base", "x")][0] == 5.0 and bars[("compressed", "x")][0] == 2.5
    # the ratio printed is the one the measurement supports (from the alternating runs), never recomputed here
    assert bars[("compressed", "x")][1].endswith("×2.00") and bars[("compressed", "x2")][1].endswith("≈ 1×")


def test_latency_figure_names_the_kind_of_kernel_in_one_short_line():
    """The title's kernel line stays one short line whatever the engine's kernel text (a long one ran into the
    panel titles); the whole text and the roofline are in the caption's details, not on the bars."""
    fig = plots.latency_figure(fake_report())
    assert fig.layout.title.text == "Latency<br><sup>simulated: dense float weights</sup>"
    assert fig.data[1].y[0] == pytest.approx(300.0) and "roofline" not in fig.data[1].text[0]
    long = fake_report()
    long["latency"]["kernel"] = ("210 layer(s) on int4pack (real, aten _weight_int4pack_mm_for_cpu, groups of 128), "
                                 "bf16 activations; LM head int8 (real, aten int8pack)")
    title = plots.latency_figure(long).layout.title.text
    assert title == "Latency<br><sup>real int4 kernel</sup>"
    assert plots.latency_figure(long).layout.margin.t >= 100   # two title lines above the panel titles


@pytest.mark.parametrize("kernel, kind", [
    ("int8 weight-only (real, aten int8pack), bf16 activations; LM head int8 (real, aten int8pack)", "real int8 kernel"),
    ("int8 (real, torch dynamic; activations quantized too)", "torch dynamic int8"),
    ("fp32 dense — quantization simulated", "simulated: dense float weights"),
    ("210 layer(s) de-quantized once to dense bf16 (no kernel takes them: bf16 speed), bf16 activations; LM head "
     "int8 (real, aten int8pack)", "dense bf16: no kernel for these codes"),
    ("6-bit codes in groups as two 4-bit planes (real, aten int4pack, groups of 64/128; 8 bits held per weight), "
     "bf16 activations; LM head int8 (real, aten int8pack)", "real int4 kernel, two planes"),
    ("int4 weight-only (real, aten int4pack, groups of 64) + 8-bit codes in groups as two 4-bit planes (real, aten "
     "int4pack, groups of 64; 8 bits held per weight), bf16 activations; LM head int8 (real, aten int8pack)",
     "real int4 kernel"),
    ("", "kernel unknown"),
])
def test_kernel_kind_in_a_few_words(kernel, kind):
    assert plots.kernel_kind(kernel) == kind


@pytest.mark.parametrize("ppl, log", [(14.0, False), (99.0, False), (101.0, True), (1.9e6, True)])
def test_perplexity_axis_turns_logarithmic_past_ten_times_the_base(ppl, log):
    fig = plots.perplexity_figure(fake_report(ppl=ppl))   # base 10.0
    assert (fig.layout.yaxis.type == "log") is log
    # the values are in the category labels, under the bars: never inside a bar nor under an error bar
    assert fig.data[0].text is None and fig.data[0].x[1].endswith(f"<b>{plots._ppl_text(ppl)}</b>")
    if log:   # both bars inside the visible range of a log axis (its range is in log10 units)
        low, high = fig.layout.yaxis.range
        assert low < math.log10(10.0) < math.log10(ppl) < high


def test_headlines_are_one_plain_sentence_per_chart():
    report = fake_report(ppl=14.0)
    lines = plots.headlines(report)
    assert set(lines) == {"size", "latency", "perplexity"}
    assert all(line.count(". ") == 0 and line.endswith(".") and len(line) < 170 for line in lines.values()), lines
    assert "14.0 against 10.0" in lines["perplexity"] and "×1.4" in lines["perplexity"]


@pytest.mark.parametrize("ratio, words", [(2.1, "2.1× faster"), (0.61, "1.6× slower"), (1.02, "about as fast"),
                                          (0.3, "3.3× slower"), (None, "")])
def test_speed_ratio_in_words(ratio, words):
    assert plots.slower_or_faster(ratio) == words


def test_perplexity_figure_has_error_bars_kl_and_top1():
    fig = plots.perplexity_figure(fake_report(ppl=14.0))
    assert list(fig.data[0].y) == [10.0, 14.0]
    assert list(fig.data[0].error_y.array) == [0.25, 0.3]
    assert "KL 0.050" in fig.layout.title.text and "top-1 90%" in fig.layout.title.text


def test_base_perplexity_as_plain_float_is_accepted():
    report = fake_report()
    report["base_perplexity"] = 9.5
    assert plots.perplexity_figure(report).data[0].y[0] == 9.5


def test_report_how_is_the_reports_own_text_only():
    report = fake_report()
    report["how"] = {"size": "counted by hand", "perplexity": "over 512 tokens", "kl_to_base": "mean KL"}
    how = plots.report_how(report)
    assert how["size"] == "counted by hand" and how["perplexity"].startswith("over 512 tokens") and "mean KL" in how[
        "perplexity"]
    assert plots.report_how(fake_report()) == {}   # an imported run without captions gets none, not made-up ones


def test_trail_figure_draws_every_run_and_the_frontier():
    trail = [fake_report(bits=2, ppl=30.0, packed=1_000_000), fake_report(bits=8, ppl=10.1, packed=4_000_000),
             fake_report(bits=4, ppl=40.0, packed=3_000_000)]
    fig = plots.trail_figure(trail, current=1)
    runs = [t for t in fig.data if t.name == "runs"][0]
    assert list(runs.y) == [30.0, 10.1, 40.0]
    frontier = [t for t in fig.data if t.name == "frontier"][0]
    assert list(frontier.x) == [1.0, 4.0]   # the 4-bit run is dominated
    assert "2-bit" in runs.customdata[0][1]


def test_empty_trail_gives_an_empty_figure():
    assert len(plots.trail_figure([]).data) == 0


def test_pareto_figure_separates_frontier_from_dominated():
    df = pd.DataFrame({"size_mb": [1, 2, 3], "perplexity": [5.0, 4.0, 6.0], "label": ["a", "b", "c"]})
    fig = plots.pareto_figure(df, "size_mb", "perplexity", "t", "MB", "ppl")
    front = [t for t in fig.data if t.name == "Pareto frontier"][0]
    assert list(front.customdata[:, 0]) == ["a", "b"]


def test_sensitivity_heatmap_is_layers_by_bits():
    df = pd.DataFrame({"layer": ["l0", "l0", "l1", "l1"], "bits": [2, 4, 2, 4],
                       "rel_mse": [0.1, 0.01, 0.2, 0.02], "sqnr_db": [10.0, 20.0, 7.0, 17.0]})
    fig = plots.sensitivity_heatmap(df)
    assert list(fig.data[0].x) == ["2-bit", "4-bit"] and list(fig.data[0].y) == ["l0", "l1"]
    assert fig.data[0].z[1][0] == 7.0


def test_topk_figure_shows_both_temperatures_on_the_same_tokens():
    view = {"temperature": 4.0, "tokens": [" the", "\n"], "at_one": [0.6, 0.3], "at_t": [0.0004, 0.0003],
            "rest": [0.1, 0.9993], "vocab": 49152}
    fig = plots.topk_figure(view)
    assert [t.name for t in fig.data] == ["T = 1", "T = 4"]
    assert list(fig.data[0].x) == ["␣the", "↵", "other 49,150 tokens"]
    assert list(fig.data[1].y) == [0.0004, 0.0003, 0.9993]
    # log axis whose range reaches below the smallest bar: every bar of both temperatures has a visible height
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis.range[0] <= math.log10(0.0003) - 0.1
    assert fig.layout.yaxis.range[1] >= 0


def test_recovery_by_temperature_figure_draws_mean_and_std_and_marks_the_best():
    fig = plots.recovery_by_temperature_figure({"4": {"mean": 0.5, "std": 0.1}, "1": {"mean": 0.2, "std": None},
                                                "8": {"mean": None, "std": None}}, best=4.0)
    assert list(fig.data[0].x) == [1.0, 4.0] and list(fig.data[0].y) == [0.2, 0.5]
    assert list(fig.data[0].error_y.array) == [0.0, 0.1]
    assert any(s.x0 == 4.0 for s in fig.layout.shapes)


def test_loss_curve_and_learn_figures():
    fig = plots.loss_curve_figure([{"step": 0, "loss": 2.0, "ppl": 9.0}, {"step": 1, "loss": 1.5}])
    assert list(fig.data[0].y) == [2.0, 1.5] and list(fig.data[1].y) == [9.0]
    hist = plots.weight_histogram_figure([0.1, -0.2, 0.3], [-0.2, 0.0, 0.3], 2, "layer")
    assert len(hist.layout.shapes) == 3
    err = plots.quant_error_figure([2, 4, 8], [0.1, 0.01, 0.0001], chosen=4)
    assert err.data[1].x[0] == 4
    textbook = err.data[2]   # the 4×-per-bit rule through the widest integer width (8 bits)
    assert list(textbook.x) == [2, 4, 8] and textbook.y[-1] == 0.0001 and textbook.y[1] == pytest.approx(0.0256)
    masks = plots.mask_figure({"unstructured": [[True, False]], "2:4": [[False, True]]})
    assert len(masks.data) == 2 and list(masks.data[1].z[0]) == [0, 1]


def test_point_labels_are_placed_apart_and_printed_on_the_chart():
    xs, ys, texts = [1.0, 1.05, 1.1, 5.0], [10.0, 10.1, 10.0, 20.0], ["2-bit", "3-bit", "4-bit", "original"]
    spots = plots.label_positions(xs, ys, texts)
    assert len(set(spots[:3])) == 3          # three crowded points: three different sides
    px, py = [(x - 1) / 4 * 560 for x in xs], [(y - 10) / 10 * 300 for y in ys]   # the default plot box

    def overlap(chosen):
        boxes = [plots._label_box(s, a, b, 0.6 * 13 * len(t), 15) for s, a, b, t in zip(chosen, px, py, texts)]
        return sum(plots._overlap(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert overlap(["top center"] * 4) > 0 and overlap(spots) == 0
    df = pd.DataFrame({"size_mb": xs, "perplexity": ys, "label": texts, "short_label": texts,
                       "is_original": [False, False, False, True]})
    fig = plots.pareto_figure(df, "size_mb", "perplexity", "t", "MB", "ppl", text="short_label")
    original = [t for t in fig.data if t.name == "original"][0]
    assert list(original.text) == ["original"] and original.marker.symbol == "diamond"
    assert "text" in [t for t in fig.data if t.name == "Pareto frontier"][0].mode


def test_a_frontier_note_replaces_the_frontier():
    df = pd.DataFrame({"ms": [1.0, 2.0], "perplexity": [5.0, 4.0], "label": ["a", "b"]})
    fig = plots.pareto_figure(df, "ms", "perplexity", "Latency", "ms", "ppl", note="every point ran one kernel")
    assert "every point ran one kernel" in fig.layout.title.text
    assert len([t for t in fig.data if t.name == "Pareto frontier"][0].x) == 0
    assert not [t for t in fig.data if t.mode == "lines"]
