"""Models: load a causal LM and its tokenizer safely, unpack uploaded archives, train the tiny model.

    load_model(name) -> LoadedModel     the embedded default, the tiny model, a hub id or a local folder
    list_models()                       what the model picker offers
    extract_model_archive(upload)       a .zip/.tar upload unpacked under limits (archive.py)
    python -m lmcompress_core.models.train_tiny    re-train assets/models/tiny (train_tiny.py)
"""
from lmcompress_core.models.files import ModelError
from lmcompress_core.models.loading import LoadedModel, list_models, load_model

__all__ = ["LoadedModel", "ModelError", "list_models", "load_model"]
