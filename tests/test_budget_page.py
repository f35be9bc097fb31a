"""AppTest of the Bit budget page on the tiny model: allocation heatmap, a layer override, the evaluation chart."""
from test_pages import app, figure_titled


def _chosen(fig: dict) -> dict[str, str]:
    marks = fig["data"][1]
    return dict(zip(marks["y"], marks["x"]))


def test_budget_page_allocates_overrides_and_evaluates():
    at = app(eval_tokens=512).run()   # the session's protocol: the measurement below was taken on 512 tokens
    at.switch_page("pages/budget.py").run()
    assert not at.exception, [e.message for e in at.exception]
    chosen = _chosen(figure_titled(at, "Bits per layer"))
    assert len(set(chosen.values())) > 1                      # mixed widths at 3.5 bits per weight
    layer = at.selectbox(key="budget_layer").value
    at.selectbox(key="budget_layer_bits").set_value(16)
    at.button(key="budget_set").click().run()
    assert _chosen(figure_titled(at, "Bits per layer"))[layer] == "float"
    at.button(key="budget_clear").click().run()
    at.button(key="budget_evaluate").click().run()
    assert not at.exception, [e.message for e in at.exception]
    fig = figure_titled(at, "Allocation beside uniform settings")
    uniform, auto = fig["data"][0], fig["data"][1]
    assert len(uniform["x"]) == 4 and len(auto["x"]) == 1
    # the allocation sits between uniform 3- and 4-bit in size and below uniform 2-bit in perplexity (on the
    # under-trained tiny model, 512 tokens: autopilot 3.5 bpw 96.1, uniform 2-bit 99.5 — issue 14 retrains it)
    size = dict(zip(uniform["text"], uniform["x"]))
    assert size["uniform 3-bit"] < auto["x"][0] <= 3.5 < size["uniform 4-bit"]
    assert auto["y"][0] < uniform["y"][uniform["text"].index("uniform 2-bit")]
