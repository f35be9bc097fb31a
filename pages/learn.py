"""Learn: quantization grids (textbook min-max and integer zero-point), pruning masks and the KD loss on the chosen model's real weights."""
import streamlit as st

from lmcompress_core.report import learn
from lmcompress_core.report import plots
from pages import common

common.through_app()

st.title("Learn")
loaded = common.current_model()
if loaded is None:
    st.stop()


def error_fall_caption(summary: dict) -> str:
    """The error chart's numbers in words: the measured factor per bit against the textbook's 4×, and why."""
    steps = ", ".join(f"{a}→{b}: ×{f:.1f}" for a, b, f in summary["factors"])
    worse = summary["worse_than_zero"]
    return (f"Measured on this layer: the error falls by a median **×{summary['median']:.1f} per bit** ({steps}). "
            "The textbook ×4 (each bit halves the step; the error goes with its square) holds only once the step is "
            "small against the spread of the weights: with one grid for the whole tensor, the largest weights set "
            "the range, so at 2–3 bits most weights share one or two levels and the error stays high"
            + (f"; at {', '.join(map(str, worse))} bits it is above 1, worse than setting every weight to 0." if worse
               else "."))


st.header("1 · Quantization: a range onto 2ᵇ levels")
names = learn.layer_names(loaded.model)
c1, c2, c3 = st.columns([2, 1, 1])
layer_name = c1.selectbox("Layer", names, key="learn_layer")
bits = c2.select_slider("Bits", [2, 3, 4, 5, 6, 8], value=3, key="learn_bits")
grid = c3.radio("Grid", learn.GRIDS, key="learn_grid", format_func=lambda g: learn.GRID_LABELS[g][0])
st.caption(learn.GRID_LABELS[grid][1])
st.latex(learn.FORMULAS[grid])
layer = learn.pick_layer(loaded.model, layer_name)
numbers = learn.minmax_parameters(layer.weight, bits, grid)
st.latex(rf"\begin{{aligned}}&\min W = {numbers['min']:.4f},\ \max W = {numbers['max']:.4f},\ b = {bits} \\"
         rf"&\Rightarrow\ s = {numbers['scale']:.5f},\ z = {numbers['zero_point']:.4g}\end{{aligned}}")
if grid == "minmax":
    st.caption("With 0 not a level, near-zero weights all round the same way, away from 0.")
weights, levels = learn.histogram_data(layer.weight, bits, grid=grid)
left, right = st.columns(2)
with left:
    common.figure(plots.weight_histogram_figure(weights, levels, bits, layer.name),
                  f"{len(weights):,} weights sampled from {layer.name} {tuple(layer.weight.shape)}; orange lines = the "
                  f"distinct values after one per-tensor round trip on the {learn.GRID_LABELS[grid][0]} grid (the engine's quantize_tensor; "
                  "the numbers above come from the grid_parameters it calls).")
with right:
    bits_list, errors = learn.error_vs_bits(layer.weight, grid=grid)
    common.figure(plots.quant_error_figure(bits_list, errors, chosen=bits),
                  "Relative squared error of the whole layer after a per-tensor round trip on the "
                  f"{learn.GRID_LABELS[grid][0]} grid; 16 = fp16 cast.")
    st.caption(error_fall_caption(learn.error_fall_summary(bits_list, errors)))
if loaded.card.caveat:
    st.caption(f":material/info: {common.md_escape(loaded.card.caveat)}")

st.header("2 · Pruning: which weights go")
common.figure(plots.mask_figure(learn.pruning_masks(layer.weight)),
              f"Top-left 16×16 block of {layer.name}, masks from the engine's prune.layer_mask. Unstructured "
              "magnitude pruning removes the smallest |w| anywhere; 2:4 keeps the 2 largest of every 4 "
              "consecutive inputs — the pattern sparse tensor cores accelerate.")

st.header("3 · Distillation: soft targets and the T² factor")
st.latex(r"\begin{aligned}\mathcal{L} &= \alpha\,T^2\,\mathrm{KL}\!\left(\operatorname{softmax}(z_t/T)\,\Vert\,"
         r"\operatorname{softmax}(z_s/T)\right) \\ &\quad + (1-\alpha)\,\mathrm{CE}(y, z_s)\end{aligned}")
st.markdown("Dividing logits by **T** softens both distributions, so the student also learns how the teacher ranks "
            "the wrong answers. The gradient of the softened KL shrinks like **1/T²**; multiplying by **T²** keeps "
            "the KD term's weight comparable to the cross-entropy whatever T you pick.")
prompt = st.session_state["settings"].get("prompt") or common.DEFAULT_PROMPT
rows = learn.kd_temperature_table(learn.next_token_logits(loaded.model, loaded.tokenizer, prompt))
st.dataframe(rows, hide_index=True)
st.caption("The chosen model's next-token distribution after the Explore prompt, at several temperatures.")

st.header("Two classic mistakes")
st.markdown("Both snippets below run without an error — and one of each pair does nothing. Each was run on a copy "
            f"of **{common.md_escape(layer.name)}** at {bits} bits / 50% sparsity:")
demo = learn.mistakes_demo(loaded.model, layer.name, bits=bits, sparsity=0.5)
# one under the other: two side by side get ~28 characters a line at 1024 px with the sidebar open
for label, changed, snippet in (
        (":material/close: **Quantized values never written back**", demo["quantize_mistake"], learn.MISTAKE_QUANTIZE),
        (":material/check: **Written back**", demo["quantize_correct"], learn.CORRECT_QUANTIZE),
        (":material/close: **A pruning line that changes nothing**", demo["prune_mistake"], learn.MISTAKE_PRUNE),
        (":material/check: **Assigned in place**", demo["prune_correct"], learn.CORRECT_PRUNE)):
    st.markdown(f"{label} — weights changed: {changed:.0%}")
    st.code(snippet, language="python", wrap_lines=True)
st.caption("Measure, don't assume: a size or perplexity that did not move after 'compression' is the tell.")
