"""GGUF export of a compressed Llama-architecture model (SmolLM2, the tiny model), written with the ``gguf`` package.

Which GGUF type each compressed layer gets, bit for bit or re-rounded, and which settings no type can hold
(refused with the reason), is ``gguf_blocks.py``. Here: the plan of the file — every tensor's GGUF name, type,
shape and bytes, and the file's exact size — made before anything is written (``plan_gguf``, for a page to show
before a download), then the file written from it tensor by tensor with a progress callback (``export_gguf``).

* float tensors keep the dtype the compressed model holds them in: F32, or BF16/F16 after a cast (exact); the
  real runtime runs the rest of the model in bf16, so there they are BF16. Norms are F32, as llama.cpp expects.
* a tied input embedding and LM head are one tensor (token_embd; llama.cpp reuses it as the output): the int8
  table the real runtime runs both from is written once, as Q8_0, never as a float copy beside a duplicate.
* pruned weights are written as zeros (GGUF has no sparse type).

Tensor names, hyperparameters and the byte-level BPE tokenizer (vocabulary, merges, token types, special ids)
follow llama.cpp's ``convert_hf_to_gguf`` conventions; q/k rows are permuted into llama.cpp's rotary layout.
"""
from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from lmcompress_core.export._source import config_metadata, quantized_weights
from lmcompress_core.export.gguf_blocks import (block_type, gguf_note, gguf_refusal, pack_blocks,  # noqa: F401
                                                rerounded_q8_0, tensor_bytes)
from lmcompress_core.methods.quantize import QuantizedWeight

ALIGNMENT = gguf.GGUF_DEFAULT_ALIGNMENT       # every tensor's data starts on a multiple of this
_FILE_TYPES = {T.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0, T.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
               T.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0, T.F16: gguf.LlamaFileType.MOSTLY_F16,
               T.BF16: gguf.LlamaFileType.MOSTLY_BF16, T.F32: gguf.LlamaFileType.ALL_F32}
_PRE_TOKENIZERS = {  # tokenizer.json pre-tokenizer -> llama.cpp's name for the same split
    json.dumps({"type": "ByteLevel", "use_regex": True}): "gpt-2",
    json.dumps({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                       {"type": "ByteLevel", "use_regex": True}]}): "smollm",
}


@dataclass
class PlannedTensor:
    """One tensor of the file as planned: its names, GGUF type, shape, bytes and how it holds the model's values."""

    name: str                # GGUF tensor name ("blk.0.attn_q.weight")
    source: str              # the model's parameter it comes from
    kind: T
    shape: tuple[int, ...]
    nbytes: int
    how: str                 # "bit for bit", "float", or why the values were re-rounded
    make: Callable[[], np.ndarray] = field(repr=False, compare=False)   # the bytes, computed when written


@dataclass
class GGUFPlan:
    """The file an export will write, known before writing: every tensor and the exact size in bytes."""

    tensors: list[PlannedTensor]
    metadata_bytes: int      # header, key-values (tokenizer included) and tensor infos

    @property
    def file_bytes(self) -> int:
        data = sum(_aligned(t.nbytes) for t in self.tensors)
        return _aligned(self.metadata_bytes) + data

    @property
    def tensor_types(self) -> dict[str, str]:
        return {t.name: t.kind.name for t in self.tensors}

    @property
    def converted(self) -> list[str]:
        """Layers whose values are re-rounded (8-bit, not bit for bit), with why."""
        return [f"{t.source.removesuffix('.weight')}: {t.how}" for t in self.tensors
                if t.how not in ("bit for bit", "float")]

    def type_counts(self) -> dict[str, int]:
        return dict(Counter(self.tensor_types.values()))

    def summary(self) -> str:
        """One line a page can show before the download: size and what is quantized."""
        counts = ", ".join(f"{n} {kind}" for kind, n in sorted(self.type_counts().items(), key=lambda kv: -kv[1]))
        quantized = sum(t.nbytes for t in self.tensors if t.kind in (T.Q4_0, T.Q4_1, T.Q8_0))
        return (f"{self.file_bytes / 1e6:.1f} MB ({counts}); {quantized / 1e6:.1f} MB of it in quantized blocks" +
                (f"; {len(self.converted)} tensor(s) re-rounded to Q8_0" if self.converted else ""))


@dataclass
class GGUFExport:
    """What export_gguf wrote: the file, each tensor's GGUF type, and what is exact vs re-rounded."""

    path: Path
    tensor_types: dict[str, str]             # GGUF tensor name -> type name ("Q4_0", "F32", ...)
    converted: list[str] = field(default_factory=list)  # layers re-rounded to Q8_0 (not bit for bit), with why
    note: str = ""
    file_bytes: int = 0                      # the size planned before writing (equal to the file's, tested)

    def type_counts(self) -> dict[str, int]:
        return dict(Counter(self.tensor_types.values()))


def _aligned(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


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


def _float_tensor(gguf_name: str, pname: str, t: torch.Tensor) -> PlannedTensor:
    """A float tensor as written: 1-D always F32 (norms); 2-D in its own dtype (bf16 as raw 16-bit words)."""
    t = t.detach().cpu()
    if t.dim() == 1 or t.dtype == torch.float32:
        kind, make = T.F32, lambda: t.to(torch.float32).numpy()
    elif t.dtype == torch.bfloat16:
        kind, make = T.BF16, lambda: t.contiguous().view(torch.int16).numpy().view(np.uint16)
    else:
        kind, make = T.F16, lambda: t.to(torch.float16).numpy()
    return PlannedTensor(gguf_name, pname, kind, tuple(t.shape), tensor_bytes(kind, tuple(t.shape)), "float", make)


def _quantized_tensor(gguf_name: str, name: str, qw: QuantizedWeight) -> PlannedTensor:
    """A compressed layer in the GGUF type that holds its codes (re-rounded to Q8_0 where block_type says so)."""
    kind, why = block_type(qw)
    if kind is None:
        raise ValueError(f"GGUF export refused: no GGUF type holds layer {name} ({why}); the Hugging Face export "
                         "holds any setting")
    make = (lambda: rerounded_q8_0(qw)) if why else (lambda: pack_blocks(qw, kind))
    return PlannedTensor(gguf_name, f"{name}.weight", kind, tuple(qw.shape), tensor_bytes(kind, tuple(qw.shape)),
                         why or "bit for bit", make)


def _module_name(model, module) -> str | None:
    return next((name for name, m in model.named_modules() if m is module), None)


def _one_table_when_tied(model, qws: dict[str, QuantizedWeight]) -> dict[str, QuantizedWeight]:
    """With tied embeddings llama.cpp reads the output from token_embd: the head's codes (the int8 table both
    run from) go there, once, and no output tensor is written."""
    embed, head = (_module_name(model, m) for m in (model.get_input_embeddings(), model.get_output_embeddings()))
    if not model.config.tie_word_embeddings or head not in qws or embed is None:
        return qws
    qws = dict(qws)
    qws[embed] = qws.pop(head)
    return qws


def _planned_tensors(cm) -> list[PlannedTensor]:
    """Every tensor the file holds, in model order: compressed layers, then the float parameters left."""
    model, config = cm.model, cm.model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    qws = _one_table_when_tied(model, quantized_weights(cm))
    head = _module_name(model, model.get_output_embeddings())
    planned, done = [], set()
    for name in (n for n, _ in model.named_modules() if n in qws):
        rows = _head_rows(name, config, qws[name].shape[0])
        qw = qws[name] if rows is None else _permuted(qws[name], rows)
        planned.append(_quantized_tensor(_gguf_name(names, f"{name}.weight"), name, qw))
        done.add(f"{name}.weight")
    for pname, p in model.named_parameters():
        if pname in done or (config.tie_word_embeddings and pname == f"{head}.weight"):
            continue
        rows = _head_rows(pname.rsplit(".", 1)[0], config, p.shape[0]) if p.dim() == 2 else None
        planned.append(_float_tensor(_gguf_name(names, pname), pname, p if rows is None else p.detach()[rows]))
    return planned


def _gguf_name(names, pname: str) -> str:
    gguf_name = names.get_name(pname, try_suffixes=(".weight", ".bias"))
    if gguf_name is None:
        raise ValueError(f"GGUF export: no llama.cpp tensor name for {pname}")
    return gguf_name


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


def _file_type(tensors: list[PlannedTensor]) -> gguf.LlamaFileType:
    """The 'mostly' type llama.cpp shows: the most common type among the 2-D weights but the token embedding."""
    kinds = [t.kind for t in tensors if len(t.shape) == 2 and not t.name.startswith("token_embd")] or [T.F32]
    return _FILE_TYPES.get(Counter(kinds).most_common(1)[0][0], gguf.LlamaFileType.ALL_F32)


def _writer(cm, tokenizer, path: Path, name: str, tensors: list[PlannedTensor]) -> gguf.GGUFWriter:
    """A writer holding the file's metadata and every tensor's info (no tensor data yet)."""
    config = cm.model.config
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _write_hyperparameters(writer, config, name)
    _write_tokenizer(writer, tokenizer, config.vocab_size)
    writer.add_string("lmcompress.compression", json.dumps(config_metadata(cm)))
    writer.add_file_type(_file_type(tensors))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for t in tensors:   # a non-uint8 dtype: the shape is taken as the tensor's own, not a byte shape
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    return writer


# ---------------------------------------------------------------- the verbs
def plan_gguf(cm, tokenizer, name: str = "lmcompress export") -> GGUFPlan:
    """The file ``export_gguf`` would write, before writing it: each tensor's GGUF type, shape and bytes, what is
    bit for bit and what re-rounded, and the exact file size (its metadata is written to a temporary file to be
    counted; no tensor data is computed).

    Raises ValueError for other architectures, rope scaling, biases, a tokenizer llama.cpp cannot name, and codes
    no GGUF type holds (``gguf_refusal`` says which settings, from the settings alone).
    """
    _check_llama(cm.model.config)
    refusal = gguf_refusal(cm.config)
    if refusal is not None:
        raise ValueError(refusal)
    tensors = _planned_tensors(cm)
    with tempfile.TemporaryDirectory(prefix="lmcompress-gguf-plan-") as folder:
        writer = _writer(cm, tokenizer, Path(folder) / "plan.gguf", name, tensors)
        metadata_bytes = writer.fout[0].tell()
        writer.close()
    return GGUFPlan(tensors, metadata_bytes)


def export_gguf(cm, tokenizer, path: str | Path, name: str = "lmcompress export",
                callback: Callable[[int, int, str], None] | None = None, plan: GGUFPlan | None = None) -> GGUFExport:
    """Write the compressed model ``cm`` (a CompressedModel of a Llama model) as one GGUF file at ``path``, tensor
    by tensor as ``plan`` (``plan_gguf``'s, made here when not given) lays it out; ``callback(bytes_done,
    bytes_total, tensor_name)`` after each tensor. A failed write leaves no partial file."""
    plan = plan or plan_gguf(cm, tokenizer, name)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = _writer(cm, tokenizer, path, name, plan.tensors)
    try:
        done, total = 0, sum(t.nbytes for t in plan.tensors)
        for t in plan.tensors:
            writer.write_tensor_data(t.make())   # checks the bytes against the planned size
            done += t.nbytes
            if callback is not None:
                callback(done, total, t.name)
    except BaseException:
        writer.close()
        path.unlink(missing_ok=True)
        raise
    writer.close()
    note = gguf_note(cm.config) + (f" Re-rounded to Q8_0: {len(plan.converted)} tensor(s)." if plan.converted else "")
    return GGUFExport(path, plan.tensor_types, plan.converted, note, plan.file_bytes)
