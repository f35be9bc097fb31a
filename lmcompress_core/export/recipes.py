"""The same compression setting for the tools people use at scale: an llm-compressor recipe (YAML), a GPTQModel
QuantizeConfig and a ``llama-quantize`` command line — each with the list of what it cannot express.

These are translations, not exports: each tool re-runs its own algorithm on the original weights, so its codes
will differ from ours (for our exact codes use the GGUF or Hugging Face export). YAML is written with PyYAML,
which transformers and gguf already require.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import yaml

# llama.cpp types nearest to each (bits, symmetric) setting; K-quants stand in where no legacy type exists
_LLAMA_TYPES = {(4, True): "Q4_0", (4, False): "Q4_1", (5, True): "Q5_0", (5, False): "Q5_1",
                (8, True): "Q8_0", (8, False): "Q8_0", (6, True): "Q6_K", (6, False): "Q6_K",
                (3, True): "Q3_K_M", (3, False): "Q3_K_M", (2, True): "Q2_K", (2, False): "Q2_K"}


@dataclass
class Recipes:
    llmcompressor_yaml: str
    gptqmodel: dict                   # GPTQModel QuantizeConfig arguments (None values omitted)
    llama_quantize: str               # a shell command line
    cannot_express: dict[str, list[str]] = field(default_factory=dict)  # tool -> what it drops or changes

    def to_text(self) -> str:
        """All three, with their limits, as one plain-text document (what the CLI writes)."""
        parts = [("llm-compressor recipe (YAML)", self.llmcompressor_yaml, "llm-compressor"),
                 ("GPTQModel QuantizeConfig (JSON)", json.dumps(self.gptqmodel, indent=2), "GPTQModel"),
                 ("llama.cpp", self.llama_quantize, "llama-quantize")]
        out = []
        for title, body, tool in parts:
            limits = self.cannot_express.get(tool) or ["nothing known"]
            out += [f"# ---- {title}", body.rstrip(), f"# {tool} cannot express:"] + [f"#   - {x}" for x in limits] + [""]
        return "\n".join(out)


# ---------------------------------------------------------------- llm-compressor
def _weights_scheme(q) -> dict:
    scheme = {"num_bits": q.bits, "type": "int", "symmetric": q.symmetric, "strategy": q.granularity}
    if q.granularity == "group":
        scheme["group_size"] = q.group_size
    if q.method == "gptq":
        scheme["actorder"] = "weight" if q.act_order else None
    return scheme


def _quant_modifier(config) -> dict:
    q = config.quantization
    group = {"targets": ["Embedding", "Linear"] if config.include_embeddings else ["Linear"],
             "weights": _weights_scheme(q)}
    if q.bits == 8 and q.int8_kernel:  # torch's dynamic int8: activations rounded per tensor at run time
        group["input_activations"] = {"num_bits": 8, "type": "int", "symmetric": False, "strategy": "tensor",
                                      "dynamic": True}
    body = {"ignore": [] if config.include_embeddings else ["lm_head"], "config_groups": {"group_0": group}}
    if q.method == "gptq":
        return {"GPTQModifier": {**body, "dampening_frac": q.damp}}
    return {"QuantizationModifier": body}


def _prune_modifier(p) -> dict:
    structure = "0:0" if p.pattern == "unstructured" else p.pattern
    if p.method in ("wanda", "sparsegpt"):
        name = {"wanda": "WandaPruningModifier", "sparsegpt": "SparseGPTModifier"}[p.method]
        return {name: {"sparsity": p.effective_sparsity, "mask_structure": structure,
                       "targets": ["Linear"], "ignore": ["lm_head"]}}
    return {"MagnitudePruningModifier": {"init_sparsity": p.effective_sparsity, "final_sparsity": p.effective_sparsity,
                                         "start": 0, "end": 1, "update_frequency": 1, "mask_structure": structure,
                                         "targets": ["re:.*(proj|fc|dense).*weight"]}}


def _llmcompressor(config) -> tuple[str, list[str]]:
    stages, limits, q = {}, [], config.quantization
    if config.pruning is not None and config.pruning.effective_sparsity > 0:
        stages["sparsity_stage"] = {"sparsity_modifiers": _prune_modifier(config.pruning)}
        if config.pruning.scope == "global":
            limits.append("global magnitude ranking across layers (its modifiers rank each layer on its own)")
        if config.pruning.method == "magnitude":
            limits.append("one-shot magnitude pruning: MagnitudePruningModifier is a training schedule; "
                          "init = final sparsity applies the mask at once")
    if q is not None and q.is_integer:
        if q.bits == 8 and q.int8_kernel and q.smooth_alpha > 0:
            stages["smooth_stage"] = {"smoothing_modifiers": {"SmoothQuantModifier": {"smoothing_strength": q.smooth_alpha}}}
            limits.append(f"the per-layer SQNR floor ({q.int8_sqnr_floor_db:g} dB) that keeps lossy layers in float")
        stages["quant_stage"] = {"quant_modifiers": _quant_modifier(config)}
        if not q.symmetric:
            limits.append("our min-max zero-point rounding: compressed-tensors' observer computes its own")
        if q.bits not in (4, 8):
            limits.append(f"{q.bits}-bit codes are accepted by compressed-tensors but vLLM's kernels run 4 and 8 bits")
    elif q is not None:
        limits.append(f"a plain {q.dtype16} cast needs no recipe: load the model with dtype={q.dtype16}")
    if config.distillation is not None:
        limits.append("knowledge distillation (recovery training after compression)")
    return yaml.safe_dump(stages, sort_keys=False) if stages else "{}\n", limits


# ---------------------------------------------------------------- GPTQModel and llama.cpp
def _gptqmodel(config) -> tuple[dict, list[str]]:
    q, limits = config.quantization, []
    if q is None or not q.is_integer:
        return {}, ["no integer quantization in this setting"]
    group = {"group": q.group_size, "channel": -1, "tensor": -1}[q.granularity]
    settings = {"bits": q.bits, "group_size": group, "desc_act": q.act_order, "sym": q.symmetric,
                "damp_percent": q.damp}
    if q.granularity == "tensor":
        limits.append("per-tensor scales (group_size=-1 is per output channel, the closest)")
    if q.method == "rtn":
        limits.append("round-to-nearest: GPTQModel always runs GPTQ on calibration data")
    if q.bits not in (2, 3, 4, 8):
        limits.append(f"{q.bits}-bit codes (GPTQModel supports 2, 3, 4 and 8)")
    if config.pruning is not None:
        limits.append("pruning (GPTQModel only quantizes)")
    if q.bits == 8 and q.int8_kernel:
        limits.append("int8 activations and SmoothQuant (GPTQModel is weight-only)")
    if config.distillation is not None:
        limits.append("knowledge distillation")
    return settings, limits


def _llama_quantize(config) -> tuple[str, list[str]]:
    q, limits = config.quantization, []
    if q is None:
        kind = "F16"
        limits.append("no quantization in this setting: F16 is the nearest plain file")
    elif not q.is_integer:
        kind = {"bf16": "BF16", "fp16": "F16"}[q.dtype16]
    else:
        kind = _LLAMA_TYPES[(q.bits, q.symmetric)]
        limits.append("our exact codes: llama-quantize re-rounds from float with its own grid "
                      "(Q4_0 uses d = max/−8, ours absmax/7); `export --format gguf` keeps our codes")
        if q.granularity != "group" or q.group_size != 32:
            limits.append(f"{q.granularity} scales{f' of {q.group_size}' if q.granularity == 'group' else ''}: "
                          "llama.cpp blocks are 32 weights (256 for K-quants)")
        if q.method == "gptq":
            limits.append("GPTQ error feedback (closest: an importance matrix, llama-imatrix then --imatrix)")
        if q.bits == 8 and not q.symmetric:
            limits.append("asymmetric 8-bit (Q8_0 is symmetric)")
    if config.pruning is not None:
        limits.append("pruning (GGUF has no sparse type)")
    if config.distillation is not None:
        limits.append("knowledge distillation")
    command = f"llama-quantize model-f16.gguf model-{kind}.gguf {kind}"
    if q is None or not q.is_integer:
        command = f"python convert_hf_to_gguf.py MODEL_FOLDER --outtype {kind.lower()} --outfile model-{kind}.gguf"
    return command, limits


def recipes(config) -> Recipes:
    """llm-compressor YAML, GPTQModel config and llama-quantize command for a CompressionConfig."""
    yaml_text, llmc = _llmcompressor(config)
    gptq, gptq_limits = _gptqmodel(config)
    command, llama = _llama_quantize(config)
    return Recipes(yaml_text, gptq, command,
                   {"llm-compressor": llmc, "GPTQModel": gptq_limits, "llama-quantize": llama})
