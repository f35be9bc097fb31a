"""Take a compressed model away: a GGUF file (llama.cpp), a Hugging Face folder, and recipes for other tools.

    export_gguf(cm, tokenizer, path)      -> GGUFExport   codes bit-exact where a GGUF block type matches
    plan_gguf(cm, tokenizer)              -> GGUFPlan     the file's tensors, types and exact size, before writing
    gguf_refusal(config)                  -> str | None   why no GGUF type holds a setting's codes (None: one does)
    export_hf(cm, tokenizer, folder)      -> HFExport     de-quantized safetensors any transformers loads
    recipes(config)                       -> Recipes      llm-compressor YAML, GPTQModel config, llama-quantize
    gguf_note(config)                     -> str          what a GGUF export keeps exactly, before building it
    prepare_download(model, config, fmt)  -> Download     one export as a file and what it holds, for the app
    download_bytes(model, config, fmt)    -> bytes        the same file's bytes alone
"""
from lmcompress_core.export.download import FORMATS, Download, download_bytes, download_note, prepare_download
from lmcompress_core.export.gguf import GGUFExport, GGUFPlan, export_gguf, gguf_note, gguf_refusal, plan_gguf
from lmcompress_core.export.hf import HFExport, export_hf
from lmcompress_core.export.recipes import Recipes, recipes

__all__ = ["FORMATS", "Download", "GGUFExport", "GGUFPlan", "HFExport", "Recipes", "download_bytes", "download_note",
           "export_gguf", "export_hf", "gguf_note", "gguf_refusal", "plan_gguf", "prepare_download", "recipes"]
