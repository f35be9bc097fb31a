"""Runtime: where a compressed weight lives and what runs it.

    modules.py      CompressedLinear / CompressedEmbedding: integer codes, scales and keep-masks on the module
    kernels.py      Int4Linear, Int4PlanesLinear (5–8-bit groups as two 4-bit planes), Int8Linear, Int8Embedding
                    (torch's real int4pack / int8pack kernels), DequantLinear
    finish.py       the last stage of compress(): simulation modules onto the kernels that really run them
    fused.py        q/k/v and gate/up as one kernel call (the codes concatenated once, each layer a view)
    decode.py       our decode loop for Llama-family models: static KV cache, fused calls, last-position head
    compiled.py     its single-token step compiled by inductor, once per layout, in the background
    int8_dynamic.py torch's dynamic int8 Linear path (smoothed, SQNR-checked)
    packing.py      bit-packing and the on-disk compressed format (safetensors + JSON)
    threads.py      how many CPU threads torch runs a model with (one for small models)
"""
from lmcompress_core.runtime.modules import CompressedEmbedding, CompressedLinear, compressed_layers
from lmcompress_core.runtime.packing import load_compressed, save_compressed

__all__ = ["CompressedEmbedding", "CompressedLinear", "compressed_layers", "load_compressed", "save_compressed"]
