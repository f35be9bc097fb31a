"""The on-disk compressed format (safetensors + a JSON metadata file), its codes packed by runtime/bits.py.

Written by hand because it is the point of the project: the *packed* size the app shows is the byte
count of the files written here, not an estimate. ``packed_file_bytes`` gives that count from the format's
layout (``pack_model(..., planned=True)``: every tensor's dtype and shape, the bulky ones not computed) without
writing anything; the tests check it against the files written. The format:

* quantized layers: integer codes bit-packed densely (two 4-bit codes per byte; 3-, 5-, 6-bit codes
  run across byte boundaries), a scale per group (fp16 when that is lossless, else fp32) and a zero-point per
  group: bit-packed at the codes' width when it is an integer code (the integer-zero and symmetric grids: 0 lies
  on the grid, so the zero-point is one of the codes; llama.cpp's K-quants likewise store small integers, not
  floats), else as a float like the scales (HQQ's fitted and the seed's min-max zero-points are fractional);
* pruned layers: only the kept weights (or kept codes) plus the keep-mask in a real sparse format,
  a bitmask (1 bit per weight) or row-compressed column indices (bit-packed), the smaller per layer;
* every other tensor (embeddings, norms, biases, layers left float) stored as it is, tied tensors once;
* each layer's runtime module (``CompressedLinear``, ``Int4Linear``, ``Int8Linear``, ...), so reloading gives
  back the same modules on the same kernels; a tied input embedding reading the LM head's int8 table is named;
* int8-kernel layers smoothed with SmoothQuant: their fp32 smoothing factors s, ``<name>.int8_smoothing_factors``,
  so the reloaded layer multiplies the same de-quantized weights by the same s before its own int8 rounding;
* ``compression.json`` holds the layout, the model config and the compression config.

``load_compressed`` rebuilds a model whose outputs are identical to the compressed model's.
"""
from __future__ import annotations

import copy
import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save, save_file

from lmcompress_core.methods.prune import count_kept, kept_values
from lmcompress_core.methods.quantize import QuantizedWeight
from lmcompress_core.runtime import kernels, modules
from lmcompress_core.runtime.bits import pack_codes, packed_nbytes, unpack_codes
from lmcompress_core.runtime.int8_dynamic import SmoothedInt8Linear
from lmcompress_core.runtime.kernels import Int8Embedding
from lmcompress_core.runtime.modules import compressed_layers

FORMAT = "lmcompress-packed"
FORMAT_VERSION = 4          # 3: each layer names its runtime module (Int4Linear, ...); 4: integer zero-points packed
_READABLE_VERSIONS = (3, 4)
SMOOTHING_SUFFIX = ".int8_smoothing_factors"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "compression.json"


@dataclass(frozen=True)
class Planned:
    """A tensor of the packed format known by its dtype and shape only (``pack_model(..., planned=True)``): what
    its size needs, with the tensor's ``numel()`` and ``element_size()``, not its data."""
    dtype: torch.dtype
    shape: tuple[int, ...]

    @classmethod
    def bytes(cls, n: int) -> "Planned":
        """A 1-D uint8 stream of ``n`` bytes (bit-packed codes, a packed mask)."""
        return cls(torch.uint8, (n,))

    def numel(self) -> int:
        return math.prod(self.shape)

    def element_size(self) -> int:
        return self.dtype.itemsize


# ---------------------------------------------------------------- sparse keep-masks
def mask_encoding_nbytes(mask: torch.Tensor, nnz: int | None = None) -> dict[str, int]:
    """Bytes of each sparse encoding of a bool keep-mask [out, in]: 'bitmask' and 'index' (row counts + columns).
    ``nnz``: the mask's count of kept weights, when the caller has it already."""
    rows, cols = mask.shape
    nnz = count_kept(mask) if nnz is None else nnz
    index = packed_nbytes(rows, _width(cols)) + packed_nbytes(nnz, _width(cols - 1))
    return {"bitmask": packed_nbytes(mask.numel(), 1), "index": index}


def encode_mask(mask: torch.Tensor, nnz: int | None = None,
                planned: bool = False) -> tuple[str, dict[str, torch.Tensor]]:
    """Encode a keep-mask in the smaller of the two sparse formats; returns (format name, tensors).
    ``planned``: the tensors as ``Planned`` (dtype and shape only; nothing encoded)."""
    sizes = mask_encoding_nbytes(mask, nnz)
    rows, cols = mask.shape
    if sizes["bitmask"] <= sizes["index"]:
        if planned:
            return "bitmask", {"mask": Planned.bytes(sizes["bitmask"])}
        return "bitmask", {"mask": pack_codes(mask.reshape(-1).to(torch.uint8), 1)}
    if planned:
        nnz = count_kept(mask) if nnz is None else nnz
        return "index", {"row_counts": Planned.bytes(packed_nbytes(rows, _width(cols))),
                         "columns": Planned.bytes(packed_nbytes(nnz, _width(cols - 1)))}
    counts = mask.sum(1)
    columns = mask.nonzero()[:, 1]  # row-major order, matching weight[mask]
    return "index", {"row_counts": pack_codes(counts, _width(cols)),
                     "columns": pack_codes(columns, _width(cols - 1))}


def decode_mask(fmt: str, tensors: dict[str, torch.Tensor], shape: tuple[int, int], nnz: int) -> torch.Tensor:
    rows, cols = shape
    if fmt == "bitmask":
        return unpack_codes(tensors["mask"], 1, rows * cols).view(rows, cols).bool()
    counts = unpack_codes(tensors["row_counts"], _width(cols), rows).to(torch.int64)
    columns = unpack_codes(tensors["columns"], _width(cols - 1), nnz).to(torch.int64)
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    mask[torch.repeat_interleave(torch.arange(rows), counts), columns] = True
    return mask


def _width(max_value: int) -> int:
    """Bits needed to store integers 0..max_value."""
    return max(1, int(max_value).bit_length())


# ---------------------------------------------------------------- one layer
def _compact_float(t: torch.Tensor) -> tuple[torch.Tensor, str]:
    """fp16 when the round trip is exact (lossless), else fp32: reloading must give identical outputs."""
    t = t.detach().to(torch.float32).contiguous()
    half = t.to(torch.float16)
    if torch.equal(half.to(torch.float32), t):
        return half, "float16"
    return t, "float32"


def _compact_zeros(zeros: torch.Tensor, bits: int) -> tuple[torch.Tensor, str]:
    """Zero-points that are integer codes, bit-packed at ``bits`` like the codes ("codes"); others as floats."""
    z = zeros.detach().to(torch.float32)
    if torch.equal(z, z.round()) and bool(((z >= 0) & (z < 2 ** bits)).all()):
        return pack_codes(z.to(torch.int64), bits), "codes"
    return _compact_float(z)


def pack_layer(name: str, weight: torch.Tensor | None, qweight=None, mask: torch.Tensor | None = None,
               planned: bool = False):
    """Pack one [out, in] weight: (tensors keyed '<name>.weight.<part>', metadata dict). ``planned``: the
    bulky tensors (codes, kept values, the mask's encoding) as ``Planned``, not computed; scales and zero-points
    are computed either way (their dtype depends on their values); the metadata is the same."""
    prefix = f"{name}.weight."
    tensors: dict[str, torch.Tensor] = {}
    nnz = None if mask is None else count_kept(mask)
    if qweight is not None:
        shape = tuple(qweight.shape)
        meta = {"kind": "quantized", "shape": list(shape), "bits": int(qweight.bits),
                "group_size": int(qweight.group_size)}
        tensors[prefix + "scales"], meta["scales_dtype"] = _compact_float(qweight.scales)
        tensors[prefix + "zeros"], meta["zeros_dtype"] = _compact_zeros(qweight.zeros, qweight.bits)
        meta["groups"] = int(qweight.scales.numel())
        if planned:
            tensors[prefix + "codes"] = Planned.bytes(packed_nbytes(math.prod(shape) if nnz is None else nnz,
                                                                    qweight.bits))
        else:
            codes = qweight.codes.to(torch.uint8)
            tensors[prefix + "codes"] = pack_codes(codes if mask is None else kept_values(codes, mask), qweight.bits)
    else:
        shape = tuple(weight.shape)
        meta = {"kind": "pruned", "shape": list(shape)}
        tensors[prefix + "values"] = Planned(weight.dtype, (nnz,)) if planned else kept_values(weight, mask)
    meta["dtype"] = str(weight.dtype).replace("torch.", "") if weight is not None else "float32"
    if mask is not None:
        mask = mask.cpu().bool()
        fmt, parts = encode_mask(mask, nnz, planned)
        meta.update(sparse=fmt, nnz=nnz, sparse_sizes=mask_encoding_nbytes(mask, nnz))
        tensors.update({prefix + k: v for k, v in parts.items()})
    meta["bytes"] = sum(t.numel() * t.element_size() for t in tensors.values())
    return tensors, meta


def unpack_layer_parts(name: str, meta: dict, tensors: dict[str, torch.Tensor]):
    """(QuantizedWeight or None, float weight or None, keep-mask or None) of one packed layer."""
    prefix = f"{name}.weight."
    shape = tuple(meta["shape"])
    mask = None
    if meta.get("sparse"):
        parts = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        mask = decode_mask(meta["sparse"], parts, shape, meta["nnz"])
    if meta["kind"] == "pruned":
        values = tensors[prefix + "values"]
        weight = torch.zeros(shape, dtype=values.dtype)
        weight[mask] = values
        return None, weight, mask

    numel = math.prod(shape) if mask is None else meta["nnz"]
    kept = unpack_codes(tensors[prefix + "codes"], meta["bits"], numel)
    codes = kept.view(shape) if mask is None else torch.zeros(shape, dtype=torch.uint8).masked_scatter_(mask, kept)
    scales = tensors[prefix + "scales"].to(torch.float32)
    zeros = tensors[prefix + "zeros"]
    if meta.get("zeros_dtype") == "codes":
        zeros = unpack_codes(zeros, meta["bits"], scales.numel()).view(scales.shape)
    qw = QuantizedWeight(codes=codes, scales=scales, zeros=zeros.to(torch.float32),
                         bits=meta["bits"], group_size=meta["group_size"], mask=mask)
    return qw, None, mask


def unpack_layer(name: str, meta: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Rebuild the float [out, in] weight of one packed layer."""
    qw, weight, _ = unpack_layer_parts(name, meta, tensors)
    return weight if qw is None else qw.dequantize().to(getattr(torch, meta["dtype"]))


# ---------------------------------------------------------------- whole model
def pack_model(cm, base_model=None, check=None, planned: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """All tensors and the metadata of the packed format for a CompressedModel (nothing written).

    The compressed layers are read from the modules themselves (``quantized_weight()`` / ``keep_mask()``).
    ``check()`` (optional) is called before each layer and may raise to cancel. ``planned``: each layer's bulky
    tensors as ``Planned`` (see pack_layer): what ``packed_file_bytes`` needs, in a fraction of the time.
    """

    held = compressed_layers(cm.model)
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    for name, module in sorted(held.items()):
        if check is not None:
            check()
        parts, layers[name] = _pack_module(name, module, planned)
        tensors.update(parts)
    names = {id(m): n for n, m in cm.model.named_modules()}
    tied_embeddings = {n: names[id(m._head[0])] for n, m in cm.model.named_modules() if isinstance(m, Int8Embedding)}
    skipped = tuple(f"{n}." for n in list(held) + list(tied_embeddings))
    dense, tied = _dense_tensors(cm.model, skipped, held)
    tensors.update(dense)
    meta = {
        "format": FORMAT, "version": FORMAT_VERSION,
        "model_config": cm.model.config.to_dict(),
        "compression": cm.config.to_dict(),
        "kernel": cm.kernel,
        "layers": layers, "tied": tied, "tied_embeddings": tied_embeddings,
        # non-persistent buffers (rotary tables) are rebuilt by the architecture; their dtype follows a cast
        "buffer_dtypes": {n: str(b.dtype).replace("torch.", "") for n, b in cm.model.named_buffers()
                          if not n.startswith(skipped)},
        "dense_bytes": sum(t.numel() * t.element_size() for t in dense.values()),
        "same_architecture_as_base": base_model is not None and _same_architecture(cm.model, base_model),
    }
    return tensors, meta


def _pack_module(name: str, module, planned: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    qweight = module.quantized_weight(codes=not planned)
    mask = qweight.mask if qweight is not None else module.keep_mask()
    weight = None if qweight is not None else module.weight.detach()
    parts, meta = pack_layer(name, weight, qweight, mask, planned)
    meta["module"] = type(module).__name__
    if isinstance(getattr(module, "weight", None), torch.Tensor):
        meta["dtype"] = str(module.weight.dtype).replace("torch.", "")
    parts.update(_smoothing_tensors(name, module, meta))
    return parts, meta


def _smoothing_tensors(name: str, module, meta: dict) -> dict[str, torch.Tensor]:
    """A SmoothQuant-smoothed int8 layer's factors s (fp32, one per input channel), counted in the layer's bytes."""

    if not isinstance(getattr(module, "kernel", None), SmoothedInt8Linear):
        return {}
    smooth = module.kernel.smooth.contiguous()
    meta["smoothing_factors"] = name + SMOOTHING_SUFFIX
    meta["bytes"] += smooth.numel() * smooth.element_size()
    return {name + SMOOTHING_SUFFIX: smooth}


def _layer_bias(module):
    bias = getattr(module, "bias", None)
    if bias is None and hasattr(module, "kernel"):
        bias = module.kernel.bias()  # torch's dynamic int8 Linear keeps its bias in packed params
    return bias


def _dense_tensors(model, skipped: tuple[str, ...], held: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every stored tensor except compressed weights (their biases included), as it is; tied tensors once."""
    dense: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    items = [(k, v) for k, v in model.state_dict().items() if not k.startswith(skipped)]
    items += [(f"{n}.bias", _layer_bias(m)) for n, m in held.items() if _layer_bias(m) is not None]
    for key, value in items:
        if not isinstance(value, torch.Tensor):
            continue
        identity = (value.data_ptr(), tuple(value.shape), tuple(value.stride()), value.dtype)
        if identity in seen:
            tied[key] = seen[identity]
            continue
        seen[identity] = key
        value = value.detach().contiguous()
        if value.untyped_storage().nbytes() != value.numel() * value.element_size():
            value = value.clone()  # a view into a larger buffer: safetensors stores whole, unshared tensors
        dense[key] = value
    return dense, tied


def _same_architecture(model, base_model) -> bool:
    return model.config.to_dict() == base_model.config.to_dict()


def save_compressed(cm, base_model, folder) -> int:
    """Write ``cm`` in the packed format to ``folder`` (created); returns the bytes written (both files)."""
    tensors, meta = pack_model(cm, base_model)
    return write_packed(tensors, meta, folder)


def write_packed(tensors: dict[str, torch.Tensor], meta: dict, folder) -> int:
    """Write what :func:`pack_model` returned; the bytes written (safetensors file + JSON file)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata=_FILE_METADATA)
    (folder / META_FILE).write_bytes(_meta_json(meta))
    return os.path.getsize(folder / WEIGHTS_FILE) + os.path.getsize(folder / META_FILE)


def packed_file_bytes(tensors: dict, meta: dict) -> int:
    """The bytes :func:`write_packed` writes for these tensors (data or ``Planned``) and metadata, nothing written."""
    return safetensors_nbytes(tensors, _FILE_METADATA) + len(_meta_json(meta))


_FILE_METADATA = {"format": FORMAT}


def _meta_json(meta: dict) -> bytes:
    return json.dumps(meta, indent=1, default=str).encode()


def safetensors_nbytes(tensors: dict, metadata: dict[str, str] | None = None) -> int:
    """The size of the file safetensors' ``save_file`` writes for ``tensors`` (data or ``Planned``), not writing
    it: 8 bytes giving the header's length, the JSON header (each tensor's dtype, shape and data offsets) padded
    with spaces to a multiple of 8, then the data. The offsets, and so their digits, follow the library's order
    of the tensors (by dtype, then by name), which is read off the library itself, with its dtype names."""
    rank, names = _safetensors_dtypes(tuple(sorted({t.dtype for t in tensors.values()}, key=str)))
    header: dict = {} if metadata is None else {"__metadata__": metadata}
    offset = 0
    for key in sorted(tensors, key=lambda k: (rank[tensors[k].dtype], k)):
        tensor = tensors[key]
        end = offset + tensor.numel() * tensor.element_size()
        header[key] = {"dtype": names[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, end]}
        offset = end
    text = len(json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode())
    return 8 + text + (-text) % 8 + offset


@functools.lru_cache(maxsize=32)
def _safetensors_dtypes(dtypes: tuple[torch.dtype, ...]) -> tuple[dict, dict]:
    """({dtype: its place in safetensors' order}, {dtype: its name in the header}), from one small file that
    the library writes with one one-element tensor of each dtype (its data offsets give the order)."""
    blob = save({f"t{i}": torch.zeros(1, dtype=d) for i, d in enumerate(dtypes)})
    header = json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")])
    header.pop("__metadata__", None)
    order = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    return ({dtypes[int(k[1:])]: i for i, k in enumerate(order)},
            {dtypes[int(k[1:])]: header[k]["dtype"] for k in order})


def load_compressed(folder, base_model) -> torch.nn.Module:
    """Rebuild the compressed model from ``folder`` into the same runtime modules; ``base_model`` gives the
    architecture (never mutated)."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{folder} is not a packed compressed model: {exc}") from None
    if meta.get("format") != FORMAT or meta.get("version") not in _READABLE_VERSIONS:
        raise ValueError(f"{folder} holds an unknown format ({meta.get('format')} v{meta.get('version')}); "
                         f"this version reads v{FORMAT_VERSION}: compress the model again")
    tensors = load_file(str(folder / WEIGHTS_FILE))
    model = _skeleton(meta["model_config"], base_model)
    layer_parts = tuple(f"{n}.weight." for n in meta["layers"])
    for key, value in tensors.items():
        if not key.startswith(layer_parts) and not key.endswith(SMOOTHING_SUFFIX):
            _set_tensor(model, key, value)
    for alias, target in meta["tied"].items():
        _set_tensor(model, alias, model.get_parameter(target) if _is_param(model, target) else
                    model.get_buffer(target))
    for name, layer in meta["layers"].items():
        qw, weight, mask = unpack_layer_parts(name, layer, tensors)
        smooth = tensors.get(layer.get("smoothing_factors", ""))
        model.set_submodule(name, _rebuild_layer(layer, model.get_submodule(name), qw, weight, mask, smooth))
    _rebuild_tied_embeddings_(model, meta.get("tied_embeddings", {}))
    for name, dtype in meta.get("buffer_dtypes", {}).items():
        buffer = model.get_buffer(name)
        if buffer is not None and buffer.is_floating_point():
            _set_tensor(model, name, buffer.to(getattr(torch, dtype)))
    return model.eval()


def _rebuild_layer(layer: dict, old, qw, weight, mask, smooth):
    """The runtime module a packed layer was saved from, built from its codes (or pruned weight) and bias."""

    kind = layer["module"]
    if kind in ("Int4Linear", "Int4PlanesLinear", "Int8Linear", "DequantLinear"):
        return getattr(kernels, kind)(qw, old.bias)
    if kind == "ActivationInt8Linear":
        from lmcompress_core.runtime.int8_dynamic import int8_linear

        plain = torch.nn.Linear(qw.shape[1], qw.shape[0], bias=old.bias is not None)
        with torch.no_grad():
            plain.weight.copy_(qw.dequantize())
            if old.bias is not None:
                plain.bias.copy_(old.bias)
        return kernels.ActivationInt8Linear(qw, int8_linear(plain, smooth))
    module = getattr(modules, kind).from_layer(old)
    module.to(getattr(torch, layer["dtype"]))  # before the codes: the fp32 grid must not be cast
    if qw is not None:
        module.set_quantized_(qw)
    else:
        with torch.no_grad():
            module.weight.copy_(weight)
        module.mask_bits = modules.pack_mask(mask)
    return module


def _rebuild_tied_embeddings_(model, tied: dict[str, str]) -> None:

    for embedding, head in tied.items():
        old = model.get_submodule(embedding)
        model.set_submodule(embedding, Int8Embedding(model.get_submodule(head), getattr(old, "padding_idx", None)))


def _skeleton(config_dict: dict, base_model):
    """A model of the stored architecture: a copy of the base when it matches, else built from the config."""
    if config_dict == base_model.config.to_dict():
        return copy.deepcopy(base_model)
    config = type(base_model.config).from_dict(config_dict)
    return type(base_model)(config)


def _is_param(model, key: str) -> bool:
    module_name, _, attr = key.rpartition(".")
    return attr in model.get_submodule(module_name)._parameters


def _set_tensor(model, key: str, value: torch.Tensor) -> None:
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        param = value if isinstance(value, torch.nn.Parameter) else torch.nn.Parameter(value, requires_grad=False)
        module._parameters[attr] = param
    elif attr in module._buffers:
        module._buffers[attr] = value
    else:
        raise ValueError(f"packed file holds {key}, which this architecture does not have")
