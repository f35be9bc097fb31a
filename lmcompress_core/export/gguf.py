"""GGUF export of a compressed Llama-architecture model (SmolLM2, the tiny model), written with the ``gguf`` package.

What is exact and what is converted, tensor by tensor:

* an integer-quantized layer whose grid is a GGUF block type keeps its codes **bit for bit**:
  4-bit symmetric → Q4_0 (w = d·(q − 8)), 4-bit asymmetric → Q4_1 (w = d·q + m), 8-bit symmetric → Q8_0
  (w = d·q, q = code − 128). Blocks are 32 weights along the input; a group of 64 or 128, a per-channel or a
  per-tensor grid repeats its scale in each block, so any group size that is a multiple of 32 maps. GGUF
  stores d (and m) as float16, so the scales are **rounded to fp16**: the de-quantized weights are exactly
  (code − zero)·fp16(scale) for Q4_0/Q8_0; Q4_1 also rounds m = −zero·fp16(scale) to fp16 (an error of at
  most 2⁻¹¹·|m| per weight).
* pruned weights are written as zeros (GGUF has no sparse type): their code is set to the zero-point, so they
  de-quantize to exactly 0 as in our model. Q4_1 needs an integer zero-point for that; with a fractional one
  a pruned layer is written as F16 instead.
* any other integer grid (2, 3, 5, 6 bits, 8-bit asymmetric) has no matching block type: the de-quantized
  weights are written as **F16** (rounded, relative error ≤ 2⁻¹¹).
* float tensors keep the dtype the compressed model holds them in: F32, or BF16/F16 after a 16-bit cast
  (exact). Norms are F32, as llama.cpp expects. Embeddings are quantized only when the setting compressed them.

Tensor names, hyperparameters and the byte-level BPE tokenizer (vocabulary, merges, token types, special ids)
follow llama.cpp's ``convert_hf_to_gguf`` conventions; q/k rows are permuted into llama.cpp's rotary layout.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from lmcompress_core.methods.quantize import QuantizedWeight, _expand
from lmcompress_core.export._source import config_metadata, quantized_weights

BLOCK = 32                                   # weights per Q4_0 / Q4_1 / Q8_0 block
_SYMMETRIC_ZERO = {4: 8, 8: 128}             # our symmetric zero-point: 2**(bits-1)
_FILE_TYPES = {T.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0, T.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
               T.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0, T.F16: gguf.LlamaFileType.MOSTLY_F16,
               T.BF16: gguf.LlamaFileType.MOSTLY_BF16, T.F32: gguf.LlamaFileType.ALL_F32}
_PRE_TOKENIZERS = {  # tokenizer.json pre-tokenizer -> llama.cpp's name for the same split
    json.dumps({"type": "ByteLevel", "use_regex": True}): "gpt-2",
    json.dumps({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                       {"type": "ByteLevel", "use_regex": True}]}): "smollm",
}


@dataclass
class GGUFExport:
    """What export_gguf wrote: the file, each tensor's GGUF type, and what is exact vs converted."""

    path: Path
    tensor_types: dict[str, str]             # GGUF tensor name -> type name ("Q4_0", "F32", ...)
    converted: list[str] = field(default_factory=list)  # layers written as F16 because no block type matches
    note: str = ""

    def type_counts(self) -> dict[str, int]:
        return dict(Counter(self.tensor_types.values()))


# ---------------------------------------------------------------- which GGUF type a layer gets
def block_type(qw: QuantizedWeight) -> tuple[T | None, str]:
    """(GGUF block type that holds these codes exactly, "") or (None, why not)."""
    in_features = qw.shape[1]
    if in_features % BLOCK or (qw.group_size != -1 and qw.group_size % BLOCK):
        return None, f"groups of {qw.group_size} over {in_features} inputs do not split into blocks of 32"
    symmetric = _SYMMETRIC_ZERO.get(qw.bits)
    if symmetric is not None and bool((qw.zeros == symmetric).all()):
        return (T.Q4_0 if qw.bits == 4 else T.Q8_0), ""
    if qw.bits != 4:
        return None, f"{qw.bits}-bit {'asymmetric ' if qw.bits == 8 else ''}codes have no GGUF block type"
    if qw.mask is not None and not _q4_1_keeps_zeros(qw):
        return None, ("pruned weights would not de-quantize to exactly 0 in Q4_1 (m = −zero·d rounded to fp16, or a "
                      "fractional zero-point)")
    return T.Q4_1, ""


def _q4_1_keeps_zeros(qw: QuantizedWeight) -> bool:
    """Whether d·zero + m is exactly 0 in every group once d and m are fp16, as llama.cpp de-quantizes Q4_1."""
    if not bool((qw.zeros == qw.zeros.round()).all()):
        return False
    d = qw.scales.to(torch.float16).to(torch.float32)
    m = (-qw.zeros * d).to(torch.float16).to(torch.float32)
    return bool((d * qw.zeros + m == 0).all())


def gguf_note(config) -> str:
    """Plain-text summary, from the settings alone, of what a GGUF export keeps exactly and what it converts."""
    q, parts = config.quantization, []
    if q is None:
        parts.append("No quantization: weights are written as F32, exactly.")
    elif not q.is_integer:
        parts.append(f"16-bit cast: weights are written as {q.dtype16.upper()}, exactly.")
    else:
        kind = {(4, True): "Q4_0", (4, False): "Q4_1", (8, True): "Q8_0"}.get((q.bits, q.symmetric))
        if kind:
            parts.append(f"{q.bits}-bit {'symmetric' if q.symmetric else 'asymmetric'} codes are written as {kind} "
                         "bit for bit; their scales are rounded to fp16 (GGUF stores d and m as float16).")
        else:
            parts.append(f"{q.bits}-bit {'symmetric' if q.symmetric else 'asymmetric'} codes have no GGUF block "
                         "type: the de-quantized weights are converted to F16 (not the codes you measured).")
        if q.bits == 8 and q.int8_kernel:
            parts.append("The app ran these layers on torch's int8 kernel (activations rounded at run time); the "
                         "file holds the 8-bit weights, and llama.cpp rounds activations its own way.")
    if config.pruning is not None:
        parts.append("Pruned weights are stored as zeros: GGUF has no sparse type, so the file is not smaller.")
    parts.append("Norms are F32; embeddings keep the model's float type unless they were compressed.")
    return " ".join(parts)


# ---------------------------------------------------------------- bit-exact blocks
def _per_block(t: torch.Tensor, group_size: int, shape: tuple[int, int]) -> torch.Tensor:
    """Per-group values [out, n_groups] (per-tensor [1, 1]) -> one value per block of 32 [out, in / 32]."""
    return _expand(t, group_size, shape)[:, ::BLOCK].contiguous()


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """[out, nb] values -> [out, nb, 2] little-endian float16 bytes (round to nearest)."""
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(*x.shape, 2)


def _zero_point_codes(qw: QuantizedWeight) -> torch.Tensor:
    """The codes as uint8 [out, in], pruned positions set to the zero-point so they de-quantize to exactly 0."""
    codes = qw.codes.clone()
    if qw.mask is not None:
        zeros = _expand(qw.zeros, qw.group_size, qw.shape).round().to(torch.uint8)
        codes[~qw.mask] = zeros[~qw.mask]
    return codes


def pack_blocks(qw: QuantizedWeight, kind: T) -> np.ndarray:
    """Q4_0 / Q4_1 / Q8_0 bytes [out, in / 32 · block bytes] holding exactly the codes of ``qw``."""
    out_features, in_features = qw.shape
    nb = in_features // BLOCK
    codes = _zero_point_codes(qw).reshape(out_features, nb, BLOCK)
    d = _per_block(qw.scales, qw.group_size, qw.shape)
    parts = [_fp16_bytes(d)]
    if kind == T.Q8_0:
        parts.append((codes.to(torch.int16) - 128).to(torch.int8).view(torch.uint8))
    else:
        if kind == T.Q4_1:  # w = d·q + m with m = −zero·d, d already rounded to fp16
            zeros = _per_block(qw.zeros, qw.group_size, qw.shape)
            parts.append(_fp16_bytes(-zeros * d.to(torch.float16).to(torch.float32)))
        parts.append(codes[..., :BLOCK // 2] | (codes[..., BLOCK // 2:] << 4))  # ggml's nibble order
    return torch.cat(parts, dim=-1).reshape(out_features, -1).numpy()


# ---------------------------------------------------------------- the model's tensors
def _check_llama(config) -> None:
    if config.model_type != "llama":
        raise ValueError(f"GGUF export supports Llama-architecture models (SmolLM2, the tiny model); "
                         f"this one is {config.model_type!r}: use the Hugging Face folder export")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError("GGUF export: Llama models with attention or MLP biases are not supported")
    if _rope(config).get("rope_type", "default") != "default":
        raise ValueError(f"GGUF export: rope scaling {_rope(config)['rope_type']!r} is not supported")


def _rope(config) -> dict:
    return dict(getattr(config, "rope_parameters", None) or {"rope_theta": getattr(config, "rope_theta", 10000.0)})


def _rotary_rows(out_features: int, n_head: int) -> torch.Tensor:
    """Row order llama.cpp wants for q/k: each head's two rotary halves interleaved (HF keeps them apart)."""
    half = out_features // n_head // 2
    return torch.arange(out_features).reshape(n_head, 2, half).transpose(1, 2).reshape(-1)


def _permuted(qw: QuantizedWeight, rows: torch.Tensor) -> QuantizedWeight:
    pick = (lambda t: t) if qw.scales.shape[0] == 1 else (lambda t: t[rows])
    return QuantizedWeight(qw.codes[rows], pick(qw.scales), pick(qw.zeros), qw.bits, qw.group_size,
                           None if qw.mask is None else qw.mask[rows])


def _head_rows(name: str, config, out_features: int) -> torch.Tensor | None:
    if name.endswith("self_attn.q_proj"):
        return _rotary_rows(out_features, config.num_attention_heads)
    if name.endswith("self_attn.k_proj"):
        return _rotary_rows(out_features, config.num_key_value_heads)
    return None


def _float_array(t: torch.Tensor) -> tuple[np.ndarray, T | None]:
    """A float tensor as written: 1-D always F32 (norms); 2-D in its own dtype (bf16 as raw 16-bit words)."""
    t = t.detach().cpu()
    if t.dim() == 1 or t.dtype == torch.float32:
        return t.to(torch.float32).numpy(), None
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(np.uint16), T.BF16
    return t.to(torch.float16).numpy(), None


def _tensors(cm, qws: dict[str, QuantizedWeight], converted: list[str]):
    """(HF parameter name, array, raw GGUF type or None) for every tensor the file holds, in model order."""
    model, config = cm.model, cm.model.config
    done = set()
    for name, module in model.named_modules():
        qw = qws.get(name)
        if qw is not None:
            done.add(f"{name}.weight")
            rows = _head_rows(name, config, qw.shape[0])
            qw = qw if rows is None else _permuted(qw, rows)
            kind, why = block_type(qw)
            if kind is not None:
                yield f"{name}.weight", pack_blocks(qw, kind), kind
            else:
                converted.append(f"{name}: {why}")
                yield f"{name}.weight", qw.dequantize().to(torch.float16).numpy(), None
    for pname, p in model.named_parameters():
        if pname in done or (pname == "lm_head.weight" and config.tie_word_embeddings):
            continue
        w = p.detach()  # Llama keeps every matrix as [out, in] (no Conv1D)
        rows = _head_rows(pname.rsplit(".", 1)[0], config, w.shape[0]) if w.dim() == 2 else None
        yield (pname, *_float_array(w if rows is None else w[rows]))


# ---------------------------------------------------------------- metadata
def _write_hyperparameters(writer: gguf.GGUFWriter, config, name: str) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    if head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(_rope(config)["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)


def _pre_tokenizer(spec: dict) -> str:
    def essentials(p):
        if p is None:
            return None
        if p.get("type") == "Sequence":
            return {"type": "Sequence", "pretokenizers": [essentials(x) for x in p["pretokenizers"]]}
        keep = {"ByteLevel": ("use_regex",), "Digits": ("individual_digits",)}.get(p.get("type"), ())
        return {"type": p.get("type"), **{k: p.get(k) for k in keep}}

    key = json.dumps(essentials(spec.get("pre_tokenizer")))
    if key not in _PRE_TOKENIZERS:
        raise ValueError(f"GGUF export: the tokenizer's pre-tokenizer {key} has no llama.cpp equivalent here "
                         "(byte-level GPT-2 or SmolLM splits are supported)")
    return _PRE_TOKENIZERS[key]


def _vocabulary(spec: dict, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id and their llama.cpp token types; ids the embedding has but the tokenizer lacks are padding."""
    tokens: list[str | None] = [None] * vocab_size
    types = [gguf.TokenType.NORMAL] * vocab_size
    entries = [(i, t, gguf.TokenType.NORMAL) for t, i in spec["model"]["vocab"].items()]
    entries += [(a["id"], a["content"], gguf.TokenType.CONTROL if a["special"] else gguf.TokenType.USER_DEFINED)
                for a in spec.get("added_tokens", [])]
    for i, token, kind in entries:
        if i >= vocab_size:
            raise ValueError(f"GGUF export: token id {i} ({token!r}) is outside the model's {vocab_size} embeddings")
        tokens[i], types[i] = token, kind
    for i, token in enumerate(tokens):
        if token is None:
            tokens[i], types[i] = f"[PAD{i}]", gguf.TokenType.UNUSED
    return tokens, [int(t) for t in types]


def _write_tokenizer(writer: gguf.GGUFWriter, tokenizer, vocab_size: int) -> None:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise ValueError(f"GGUF export handles byte-level BPE tokenizers; this one is {spec['model']['type']}")
    tokens, types = _vocabulary(spec, vocab_size)
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(_pre_tokenizer(spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{key}_token_id", None)
        if token_id is not None:
            add(int(token_id))
    bos = tokenizer.bos_token_id
    writer.add_add_bos_token(bos is not None and tokenizer("a")["input_ids"][:1] == [bos])
    writer.add_add_space_prefix(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def _file_type(types: dict[str, T]) -> gguf.LlamaFileType:
    """The 'mostly' type llama.cpp shows: the most common type among the 2-D weights."""
    kind = Counter(types.values()).most_common(1)[0][0]
    return _FILE_TYPES.get(kind, gguf.LlamaFileType.ALL_F32)


# ---------------------------------------------------------------- the verb
def export_gguf(cm, tokenizer, path: str | Path, name: str = "lmcompress export") -> GGUFExport:
    """Write the compressed model ``cm`` (a CompressedModel of a Llama model) as one GGUF file at ``path``.

    Raises ValueError for other architectures, rope scaling, biases or a tokenizer llama.cpp cannot name.
    """
    config = cm.model.config
    _check_llama(config)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _write_hyperparameters(writer, config, name)
    _write_tokenizer(writer, tokenizer, config.vocab_size)
    writer.add_string("lmcompress.compression", json.dumps(config_metadata(cm)))
    converted, types, weight_types = [], {}, {}
    for pname, array, raw in _tensors(cm, quantized_weights(cm), converted):
        gguf_name = names.get_name(pname, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"GGUF export: no llama.cpp tensor name for {pname}")
        writer.add_tensor(gguf_name, array, raw_dtype=raw)
        kind = raw if raw is not None else {np.float32: T.F32, np.float16: T.F16}[array.dtype.type]
        types[gguf_name] = kind.name
        if array.ndim == 2 and not gguf_name.startswith("token_embd"):
            weight_types[gguf_name] = kind
    writer.add_file_type(_file_type(weight_types or {"": T.F32}))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    note = gguf_note(cm.config) + (f" Converted to F16: {len(converted)} layer(s)." if converted else "")
    return GGUFExport(path, types, converted, note)
