"""Learn: quantization grids (min-max and integer zero-point), pruning masks and the KD loss on the chosen model's real weights."""
import streamlit as st

from lmcompress_core.report import learn
from lmcompress_core.report import plots
from pages import common

common.through_app()

st.title("Learn")
loaded = common.current_model()
if loaded is None:
    st.stop()

st.header("1 · Quantization: a range onto 2ᵇ levels")
names = learn.layer_names(loaded.model)
c1, c2, c3 = st.columns([2, 1, 1])
layer_name = c1.selectbox("Layer", names, key="learn_layer")
bits = c2.select_slider("Bits", [2, 3, 4, 5, 6, 8], value=3, key="learn_bits")
grid = c3.radio("Grid", learn.GRIDS, key="learn_grid", format_func={
    "integer-zero": "integer zero-point (engine default)", "minmax": "min-max (the seed's rule)"}.get)
st.latex(learn.FORMULAS[grid])
layer = learn.pick_layer(loaded.model, layer_name)
numbers = learn.minmax_parameters(layer.weight, bits, grid)
st.latex(rf"\min W = {numbers['min']:.4f},\ \max W = {numbers['max']:.4f},\ b = {bits}"
         rf"\ \Rightarrow\ s = {numbers['scale']:.5f},\ z = {numbers['zero_point']:.4g}")
if grid == "minmax":
    st.caption("The zero-point stays fractional, so 0 is not a level: near-zero weights all round the same way. "
               "The integer zero-point widens the range to include 0 and rounds z, so 0 is exactly a level.")
weights, levels = learn.histogram_data(layer.weight, bits, grid=grid)
left, right = st.columns(2)
with left:
    common.figure(plots.weight_histogram_figure(weights, levels, bits, layer.name),
                  f"{len(weights):,} weights sampled from {layer.name} {tuple(layer.weight.shape)}; orange lines = the "
                  f"distinct values after one per-tensor round trip on the {grid} grid (the engine's quantize_tensor; "
                  "the numbers above come from the grid_parameters it calls).")
with right:
    bits_list, errors = learn.error_vs_bits(layer.weight, grid=grid)
    common.figure(plots.quant_error_figure(bits_list, errors, chosen=bits),
                  f"Relative squared error of the whole layer after a per-tensor {grid} round trip; 16 = fp16 cast. "
                  "Each bit halves the step, so the error falls about 4× per bit.")

st.header("2 · Pruning: which weights go")
common.figure(plots.mask_figure(learn.pruning_masks(layer.weight)),
              f"Top-left 16×16 block of {layer.name}, masks from the engine's prune.layer_mask. Unstructured "
              "magnitude pruning removes the smallest |w| anywhere; 2:4 keeps the 2 largest of every 4 "
              "consecutive inputs — the pattern sparse tensor cores accelerate.")

st.header("3 · Distillation: soft targets and the T² factor")
st.latex(r"\mathcal{L} = \alpha\,T^2\,\mathrm{KL}\!\left(\operatorname{softmax}(z_t/T)\,\Vert\,"
         r"\operatorname{softmax}(z_s/T)\right) + (1-\alpha)\,\mathrm{CE}(y, z_s)")
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
left, right = st.columns(2)
with left:
    st.markdown(":material/close: **Quantized values never written back** — "
                f"weights changed: {demo['quantize_mistake']:.0%}")
    st.code(learn.MISTAKE_QUANTIZE, language="python")
    st.markdown(":material/close: **A pruning line that changes nothing** — "
                f"weights changed: {demo['prune_mistake']:.0%}")
    st.code(learn.MISTAKE_PRUNE, language="python")
with right:
    st.markdown(f":material/check: **Written back** — weights changed: {demo['quantize_correct']:.0%}")
    st.code(learn.CORRECT_QUANTIZE, language="python")
    st.markdown(f":material/check: **Assigned in place** — weights changed: {demo['prune_correct']:.0%}")
    st.code(learn.CORRECT_PRUNE, language="python")
st.caption("Measure, don't assume: a size or perplexity that did not move after 'compression' is the tell.")
