"""Bit-budget autopilot: which layers can be squeezed and which must stay wide, for a target size.

The user gives a budget — average bits per weight of the quantized layers (packed: codes plus the float16 scale
and the zero-point of every group), or a packed file size in MB — and ``allocate`` returns a ``QuantizationConfig``
whose ``layer_bits`` gives each layer its bit-width, chosen to minimise the predicted damage under the budget.

Damage of a layer at b bits = the KL divergence KL(p_base ‖ p) that quantizing that layer alone adds to the
model's next-token distributions. It starts from a second-order prediction, KL ≈ ½ Σ F_ij ΔW_ij², with ΔW the
layer's quantization error at b bits (from the base config's quantizer; the MSE grid and GPTQ fit on the
Hessians of the same calibration tokens) and F the diagonal of the Fisher information of the weights,
estimated once per model from a few calibration sequences: labels are sampled from the model's own distribution
(so this is the true Fisher, whose per-token scores have zero mean, and the square of a whole sequence's gradient
is an unbiased estimate of the sum over its tokens), one backward pass per sample. Rounding errors are close to
independent across weights, so the diagonal keeps the expected value of ½ δᵀFδ.

The prediction alone fails where it matters most: at 2–3 bits a layer's error is no longer small, the real KL
grows faster than quadratically, and errors of many layers compound (SmolLM2 at 3.0 bpw: 54 of 210 layers sent to
2 bits, perplexity 168 against 40 for uniform 3-bit). So each width below 8 bits is checked against real
forwards: for each kind of layer (q_proj, down_proj, …: the name with its block number removed) the KL is
measured with every layer of that kind quantized at that width, and that kind's predictions at that width are
scaled by real / Σ predicted. That is one forward per kind and width (7 × 3 on SmolLM2) instead of one per layer
and width (630); ``measured_kl`` checks an allocation against a real forward. Damages are then taken as additive
across layers, and a greedy allocation spends the budget where it buys the largest drop in damage per bit: every
layer starts at the narrowest width and the best upgrade (any wider width, largest Δdamage / Δbits that still
fits) is applied until nothing fits. The measurement is cached per (model, calibration tokens, grid settings) in
this process and on disk (JSON beside the converted models), so a new server or CLI call does not measure again.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from lmcompress_core.methods.layers import input_statistics, linear_layers, set_weight_matrix_, weight_matrix
from lmcompress_core.methods.quantize import FLOAT_LAYER, INTEGER_BITS, QuantizationConfig, quantize_weight

CHOICES = (2, 3, 4, 8)
FISHER_SAMPLES = 2           # label draws per calibration sequence
MEASURE_BELOW = 8            # widths below this get their prediction rescaled by a measured KL (8 bits: quadratic)
SCALE_BITS = 16              # a float16 scale per group, as the packed file stores it
FLOAT_ZERO_BITS = 16         # a zero-point that is not an integer code: float16 (integer ones take the codes' width)
FLOAT_BITS = 32              # a layer kept float is stored at float32 in the packed file
_CACHE: dict = {}


@dataclass(frozen=True)
class BudgetConfig:
    target_bpw: float | None = None    # average packed bits per weight of the quantized layers (scales included)
    target_mb: float | None = None     # or: the whole packed file in MB (10^6 bytes), embeddings included
    choices: tuple = CHOICES           # bit-widths a layer may get; 16 = keep it float (stored fp32)
    base: QuantizationConfig = field(default_factory=lambda: QuantizationConfig(bits=4, group_size=128))

    def __post_init__(self):
        if (self.target_bpw is None) == (self.target_mb is None):
            raise ValueError("give exactly one budget: target_bpw (e.g. 3.5) or target_mb (e.g. 60)")
        if self.target_bpw is not None and not 2 <= self.target_bpw <= 32:
            raise ValueError(f"target_bpw must be between 2 and 32 bits per weight; got {self.target_bpw!r}")
        if self.target_mb is not None and not self.target_mb > 0:
            raise ValueError(f"target_mb must be a positive size in MB; got {self.target_mb!r}")
        choices = tuple(sorted(set(self.choices)))
        if not choices or any(b not in INTEGER_BITS + (FLOAT_LAYER,) for b in choices):
            raise ValueError(f"choices must be bit-widths from 2, 3, 4, 5, 6, 8 or 16; got {self.choices!r}")
        if self.base.granularity != "group" or not self.base.is_integer or self.base.layer_bits:
            raise ValueError("the autopilot's base must be a per-group integer QuantizationConfig without layer_bits")
        object.__setattr__(self, "choices", choices)


@dataclass
class Allocation:
    bits: dict[str, int]                       # layer name -> chosen bit-width (16 = float)
    damage: dict[str, dict[int, float]]        # layer name -> {bits: predicted KL in nats}
    numel: dict[str, int]                      # layer name -> weights
    shapes: dict[str, tuple[int, int]]         # layer name -> [out, in]
    bits_per_weight: float                     # achieved, packed, scales and zeros included
    predicted_kl: float                        # Σ damage of the chosen widths
    config: QuantizationConfig                 # base settings + layer_bits for every layer off the base width


def layer_cost_bits(shape: tuple[int, int], bits: int, group_size: int, integer_zeros: bool = True) -> int:
    """Packed bits of one [out, in] layer at ``bits``: codes plus, per group, a 16-bit scale and a zero-point (an
    integer code at ``bits`` bits, or a 16-bit float when ``integer_zeros`` is False), as packing.py writes them."""
    out_features, in_features = shape
    if bits == FLOAT_LAYER:
        return out_features * in_features * FLOAT_BITS
    per_group = SCALE_BITS + (bits if integer_zeros else FLOAT_ZERO_BITS)
    return out_features * in_features * bits + out_features * math.ceil(in_features / group_size) * per_group


def _cache_key(model, model_name: str, ids: torch.Tensor, base: QuantizationConfig, choices) -> tuple:
    digest = hashlib.sha1(ids.cpu().numpy().tobytes()).hexdigest()
    settings = (base.granularity, base.group_size, base.symmetric, base.grid, base.method)
    return model_name, _weights_digest(model), digest, settings, tuple(choices)


def _weights_digest(model) -> str:
    """A cheap fingerprint of the weights (names, shapes, first and last values of each tensor): a folder whose
    files changed under the same name gets a new disk entry, not the old model's damage."""
    h = hashlib.sha1()
    for name, p in model.state_dict().items():
        flat = p.detach().reshape(-1)
        h.update(f"{name}{tuple(p.shape)}".encode())
        h.update(torch.cat([flat[:16], flat[-16:]]).float().numpy().tobytes())
    return h.hexdigest()


def damage_file(key: tuple) -> Path:
    """Where the measurement for ``key`` is kept on disk: JSON under the model cache (never pickle)."""
    from lmcompress_core.models.loading import cache_root

    name = hashlib.sha1(json.dumps(list(map(str, key))).encode()).hexdigest()[:20]
    folder = os.environ.get("LMCOMPRESS_SENSITIVITY_CACHE") or cache_root() / "sensitivity"
    return Path(folder) / f"{name}.json"


def _read_damage(path: Path) -> dict[str, dict[int, float]] | None:
    try:
        data = json.loads(path.read_text())
        return {layer: {int(b): float(v) for b, v in widths.items()} for layer, widths in data["damage"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None   # missing or unreadable: measured again


def _write_damage(path: Path, damage: dict, seconds: float) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"damage": damage, "seconds": round(seconds, 1)}))
        tmp.replace(path)
    except OSError:
        pass   # a read-only cache only costs a new measurement next time


def cached_damage(model, ids: torch.Tensor, base: QuantizationConfig, choices=CHOICES,
                  model_name: str = "") -> dict[str, dict[int, float]] | None:
    """The damage ``measure_damage`` would return without measuring (this process's cache, then the disk), or
    None; a disk hit is kept in the process cache too."""
    if not model_name:
        return None
    key = _cache_key(model, model_name, ids, base, choices)
    if key not in _CACHE:
        found = _read_damage(damage_file(key))
        if found is None:
            return None
        _CACHE[key] = found
    return _CACHE[key]


# Seconds per million weights of the measurement on this project's 2-core machine (SmolLM2, 134.5 M weights, idle:
# 73 s with RTN, 218 s with the MSE grid, whose Hessians and grid search come on top): an estimate shown before
# a person starts it, never a measurement.
SECONDS_PER_MILLION = {"rtn": 0.55, "hqq": 0.7, "mse": 1.6, "gptq": 1.6}


def expected_seconds(model, base: QuantizationConfig) -> float:
    """A rough duration of ``measure_damage`` for this model and quantizer (see SECONDS_PER_MILLION)."""
    weights = sum(p.numel() for p in model.parameters()) / 1e6
    return max(1.0, weights * SECONDS_PER_MILLION.get(base.method, 1.6))


def measure_damage(model, ids: torch.Tensor, base: QuantizationConfig, choices=CHOICES, model_name: str = "",
                   callback: Callable[[int, int, str], None] | None = None) -> dict[str, dict[int, float]]:
    """{layer: {bits: KL in nats per token}} for every linear layer and choice (16 = float = 0): the Fisher
    prediction, rescaled per kind of layer and width by the KL measured when every layer of that kind is
    quantized at that width (``_measured_factors``).

    ``ids`` are calibration token ids [n, seq_len] (4 × 128 tokens are enough to rank layers); ``model`` is not
    modified; ``callback(done, total, what)`` reports progress per layer quantized and per KL measured. When model_name is given the result is cached per
    (model_name, ids, grid settings, choices) in this process and on disk (JSON, with the weights' fingerprint),
    so a new server, session or CLI call reuses it.
    """
    found = cached_damage(model, ids, base, choices, model_name)
    if found is not None:
        return found
    started = time.perf_counter()
    hessians = _hessians(model, ids) if base.method in ("mse", "gptq") else {}
    fisher = fisher_diagonal(model, ids)
    work = copy.deepcopy(model).float().eval()
    base_logp = _log_probs(work, ids)
    damage = {name: {FLOAT_LAYER: 0.0} for name in fisher} if FLOAT_LAYER in choices else {name: {} for name in fisher}
    widths = [b for b in choices if b != FLOAT_LAYER]
    tick = _Ticks(callback, len(widths) * (len(fisher) + len({layer_kind(n) for n in fisher})))
    for bits in widths:
        approx = {}
        for name, m in linear_layers(work).items():   # one report per layer: a page can stop between two
            approx[name] = quantize_weight(weight_matrix(m), replace(base, bits=bits), hessians.get(name)).dequantize()
            tick(f"{bits}-bit: {name}")
        predicted = {name: 0.5 * float((fisher[name] * (weight_matrix(m) - approx[name]).pow(2)).sum())
                     for name, m in linear_layers(work).items()}
        factors = (_measured_factors(work, ids, base_logp, approx, predicted, tick) if bits < MEASURE_BELOW
                   else tick.skip(len({layer_kind(n) for n in approx})) or {})
        for name, value in predicted.items():
            damage[name][bits] = value * factors.get(layer_kind(name), 1.0)
    if model_name:
        key = _cache_key(model, model_name, ids, base, choices)
        _CACHE[key] = damage
        _write_damage(damage_file(key), damage, time.perf_counter() - started)
    return damage


def layer_kind(name: str) -> str:
    """The layer's name with its block number replaced by *: model.layers.3.mlp.down_proj -> model.layers.*.mlp.down_proj."""
    return re.sub(r"\.\d+\.", ".*.", name)


class _Ticks:
    """Counts the units of a measurement and hands (done, total, what) to an optional callback."""

    def __init__(self, callback: Callable[[int, int, str], None] | None, total: int):
        self.callback, self.total, self.done = callback, total, 0

    def __call__(self, what: str) -> None:
        self.done += 1
        if self.callback is not None:
            self.callback(min(self.done, self.total), self.total, what)

    def skip(self, units: int, what: str = "no KL to measure at this width") -> None:
        self.done += units - 1
        self(what)


def _measured_factors(work, ids, base_logp, approx: dict, predicted: dict,
                      tick: Callable[[str], None] = lambda what: None) -> dict[str, float]:
    """{kind: real KL / Σ predicted KL} with every layer of that kind quantized (``approx``) and the rest float.

    The quadratic prediction holds for small errors; at 2 and 3 bits a layer's error is large and the real KL
    grows faster (SmolLM2: the unscaled prediction sent 54 of 210 layers to 2 bits and ended at perplexity 168),
    and the layers of one kind add up worse than independently. One forward per kind and width."""
    by_kind: dict[str, list[str]] = {}
    for name in approx:
        by_kind.setdefault(layer_kind(name), []).append(name)
    layers = linear_layers(work)
    factors = {}
    for kind, names in by_kind.items():
        saved = {name: weight_matrix(layers[name]) for name in names}
        for name in names:
            set_weight_matrix_(layers[name], approx[name])
        real = _kl_to(work, ids, base_logp)
        for name in names:
            set_weight_matrix_(layers[name], saved[name])
        total = sum(predicted[name] for name in names)
        factors[kind] = max(real, 0.0) / total if total > 0 else 1.0
        tick(f"measured KL of every {kind}")
    return factors


@torch.inference_mode()
def _log_probs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    return [F.log_softmax(model(input_ids=row[None], use_cache=False).logits[0].float(), -1)
            for row in ids.reshape(-1, ids.shape[-1])]


@torch.inference_mode()
def _kl_to(model, ids: torch.Tensor, base_logp: list[torch.Tensor]) -> float:
    """Mean KL(p_base ‖ p_model) per token over ``ids``, given the base's log-probabilities."""
    total, count = 0.0, 0
    for row, base in zip(ids.reshape(-1, ids.shape[-1]), base_logp):
        logp = F.log_softmax(model(input_ids=row[None], use_cache=False).logits[0].float(), -1)
        total, count = total + float((base.exp() * (base - logp)).sum()), count + row.numel()
    return total / count


def _hessians(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """{layer: H = 2XXᵀ/n of its inputs on ``ids``}: what GPTQ and the MSE grid score their errors on."""
    return input_statistics(model, linear_layers(model), ids.reshape(-1, ids.shape[-1]), hessian=True).hessian


def fisher_diagonal(model, ids: torch.Tensor, samples: int = FISHER_SAMPLES, seed: int = 0) -> dict[str, torch.Tensor]:
    """Diagonal Fisher information per linear layer weight ([out, in]), per scored token, labels drawn from the
    model itself; computed on a private copy (the base model is shared and never gets gradients)."""
    work = copy.deepcopy(model).float().eval()
    layers = linear_layers(work)
    for p in work.parameters():
        p.requires_grad_(False)
    for m in layers.values():
        m.weight.requires_grad_(True)
    ids = ids.reshape(-1, ids.shape[-1])
    generator = torch.Generator().manual_seed(seed)
    fisher = {name: torch.zeros_like(weight_matrix(m)) for name, m in layers.items()}
    for row in ids:
        logits = work(input_ids=row[None], use_cache=False).logits[0, :-1].float()
        logp = F.log_softmax(logits, dim=-1)
        for s in range(samples):
            labels = torch.multinomial(logp.detach().exp(), 1, generator=generator)[:, 0]
            grads = torch.autograd.grad(logp.gather(1, labels[:, None]).sum(),
                                        [m.weight for m in layers.values()], retain_graph=s < samples - 1)
            for (name, m), g in zip(layers.items(), grads):
                fisher[name] += (g.t() if isinstance(m, Conv1D) else g).pow(2)
    tokens = samples * ids.shape[0] * (ids.shape[1] - 1)
    return {name: f / tokens for name, f in fisher.items()}


def measured_kl(model, ids: torch.Tensor, config: QuantizationConfig) -> float:
    """The real mean KL(p_base ‖ p) per token when ``config`` quantizes the model (calibrated on ``ids``), run
    simulated in fp32 as the damages are measured: only the codes differ, not the kernels."""
    from lmcompress_core.compress import CompressionConfig, compress

    quantized = compress(model, CompressionConfig(quantization=config, runtime="simulate"), calibration=ids).model
    return _kl_to(quantized, ids, _log_probs(model, ids))


def allocate_bits(damage: dict[str, dict[int, float]], shapes: dict[str, tuple[int, int]], budget_bits: float,
                  group_size: int, integer_zeros: bool = True) -> dict[str, int]:
    """Greedy: all layers at their narrowest choice, then the upgrade with the most damage saved per extra bit
    that still fits, until none fits. Raises ValueError when even the narrowest widths exceed the budget."""
    cost = {n: {b: layer_cost_bits(shapes[n], b, group_size, integer_zeros) for b in damage[n]} for n in damage}
    chosen = {n: min(damage[n]) for n in damage}
    spent = sum(cost[n][b] for n, b in chosen.items())
    if spent > budget_bits:
        weights = sum(math.prod(s) for s in shapes.values())
        raise ValueError(f"the budget is below the narrowest setting: every layer at {min(chosen.values())} bits "
                         f"already takes {spent / weights:.2f} bits per weight")
    while True:
        best, best_ratio = None, 0.0
        for n, current in chosen.items():
            for b, d in damage[n].items():
                extra = cost[n][b] - cost[n][current]
                if extra > 0 and spent + extra <= budget_bits:
                    ratio = (damage[n][current] - d) / extra
                    if ratio > best_ratio:
                        best, best_ratio = (n, b, extra), ratio
        if best is None:
            return chosen
        n, b, extra = best
        chosen[n], spent = b, spent + extra


# A fixed mix in the style of llama.cpp's k-quant presets (Q3_K_M, Q4_K_M): no measurement, more bits where
# experience says errors cost most — attention's value and output projections and the MLP's down projection, and
# the first and last blocks. The bar the measured allocation has to clear at the same budget.
RULE_MIX_KINDS = ("v_proj", "o_proj", "down_proj", "c_proj", "dense_4h_to_h", "fc2")


def _block(name: str) -> int | None:
    found = re.search(r"\.(\d+)\.", name)
    return int(found.group(1)) if found else None


def rule_priority(names: list[str]) -> list[str]:
    """Layers in the order a rule mix upgrades them: the important kinds in the first and last eighth of the
    blocks, then those kinds everywhere, then every other layer of the first and last blocks, then the rest."""
    blocks = [b for b in map(_block, names) if b is not None]
    last = max(blocks, default=0)
    edge = max(1, (last + 1) // 8)

    def rank(name: str) -> int:
        block, important = _block(name), name.rsplit(".", 1)[-1] in RULE_MIX_KINDS
        at_edge = block is not None and (block < edge or block > last - edge)
        return (0 if at_edge else 1) if important else (2 if at_edge else 3)
    return sorted(names, key=lambda n: (rank(n), names.index(n)))


def rule_mix(shapes: dict[str, tuple[int, int]], budget_bits: float, group_size: int, widths=(2, 3, 4, 5, 6, 8),
             integer_zeros: bool = True) -> dict[str, int]:
    """Every layer at the widest single width the budget allows, then layers moved one width up in
    ``rule_priority`` order while the budget holds (a pass per width). Raises ValueError below the narrowest."""
    names = list(shapes)
    cost = lambda n, b: layer_cost_bits(shapes[n], b, group_size, integer_zeros)   # noqa: E731
    fitting = [w for w in widths if sum(cost(n, w) for n in names) <= budget_bits]
    if not fitting:
        raise ValueError(f"the budget is below every layer at {min(widths)} bits")
    chosen = dict.fromkeys(names, max(fitting))
    spent = sum(cost(n, b) for n, b in chosen.items())
    for name in rule_priority(names) * 2:   # a second pass lets the first layers go up two widths
        wider = [w for w in widths if w > chosen[name]]
        if wider and spent - cost(name, chosen[name]) + cost(name, wider[0]) <= budget_bits:
            spent += cost(name, wider[0]) - cost(name, chosen[name])
            chosen[name] = wider[0]
    return chosen


def rule_mix_for(model, budget: BudgetConfig) -> Allocation:
    """The rule mix as an Allocation (no damage measured: its damage table is empty)."""
    shapes = {n: tuple(weight_matrix(m).shape) for n, m in linear_layers(model).items()}
    widths = tuple(b for b in budget.choices if b != FLOAT_LAYER)
    chosen = rule_mix(shapes, budget_bits(budget, model, shapes), budget.base.group_size, widths,
                      budget.base.integer_zero_points)
    return allocation_from(chosen, {n: {} for n in shapes}, shapes, budget.base)


def config_for(bits: dict[str, int], base: QuantizationConfig) -> QuantizationConfig:
    """``base`` at the most common width, with an exact-name ``layer_bits`` pattern for every other layer."""
    common = Counter(b for b in bits.values() if b != FLOAT_LAYER).most_common(1)
    width = common[0][0] if common else base.bits
    overrides = tuple((f"^{re.escape(name)}$", b) for name, b in bits.items() if b != width)
    return replace(base, bits=width, layer_bits=overrides, int8_kernel=False)


def budget_bits(budget: BudgetConfig, model, shapes: dict[str, tuple[int, int]]) -> float:
    """The bits the chosen layers may take: target_bpw × their weights, or the MB target minus everything else
    the packed file stores at its dtype (embeddings, norms, biases)."""
    weights = sum(math.prod(s) for s in shapes.values())
    if budget.target_bpw is not None:
        return budget.target_bpw * weights
    layer_weights = {id(m.weight) for m in linear_layers(model).values()}
    dense = sum(p.numel() * p.element_size() * 8 for p in model.parameters() if id(p) not in layer_weights)
    return budget.target_mb * 1e6 * 8 - dense


def allocate(model, ids: torch.Tensor, budget: BudgetConfig, model_name: str = "",
             callback: Callable[[int, int, str], None] | None = None) -> Allocation:
    """Measure (or reuse) per-layer damage on ``ids`` and assign bits per layer under ``budget``."""
    damage = measure_damage(model, ids, budget.base, budget.choices, model_name=model_name, callback=callback)
    shapes = {n: tuple(weight_matrix(m).shape) for n, m in linear_layers(model).items()}
    chosen = allocate_bits(damage, shapes, budget_bits(budget, model, shapes), budget.base.group_size,
                           budget.base.integer_zero_points)
    return allocation_from(chosen, damage, shapes, budget.base)


def allocation_from(bits: dict[str, int], damage: dict, shapes: dict, base: QuantizationConfig) -> Allocation:
    """An Allocation for given widths (the autopilot's, or with a person's overrides applied)."""
    numel = {n: math.prod(s) for n, s in shapes.items()}
    spent = sum(layer_cost_bits(shapes[n], b, base.group_size, base.integer_zero_points) for n, b in bits.items())
    return Allocation(dict(bits), damage, numel, dict(shapes), spent / sum(numel.values()),
                      sum(damage[n][b] for n, b in bits.items() if b in damage[n]), config_for(bits, base))


def with_overrides(allocation: Allocation, overrides: dict[str, int], base: QuantizationConfig) -> Allocation:
    """The allocation with some layers set by hand (a person's choice beats the prediction); bits per weight
    and predicted damage follow, so the budget may no longer hold."""
    unknown = set(overrides) - set(allocation.bits)
    if unknown:
        raise ValueError(f"no such layer(s) in this allocation: {', '.join(sorted(unknown))}")
    return allocation_from({**allocation.bits, **overrides}, allocation.damage, allocation.shapes, base)


def uniform_bits_per_weight(model, bits: int, group_size: int) -> float:
    """Packed bits per weight of every linear layer at one width (the uniform setting beside an allocation)."""
    shapes = [tuple(weight_matrix(m).shape) for m in linear_layers(model).values()]
    return sum(layer_cost_bits(s, bits, group_size) for s in shapes) / sum(math.prod(s) for s in shapes)


def calibration_ids(loaded, eval_tokens: int = 2048, text: str | None = None, n_samples: int = 4,
                    seq_len: int = 128) -> torch.Tensor:
    """A few calibration sequences, from the same place evaluate calibrates (never the scored tokens)."""
    from lmcompress_core.compress import CompressionConfig
    from lmcompress_core.measure.protocol import EvalProtocol, calibration_for

    return calibration_for(loaded, CompressionConfig(), EvalProtocol(text=text, eval_tokens=eval_tokens),
                           n_samples=n_samples, seq_len=seq_len, force=True)


def allocate_for(loaded, budget: BudgetConfig, eval_tokens: int = 2048, text: str | None = None,
                 callback: Callable[[int, int, str], None] | None = None) -> Allocation:
    """``allocate`` on a loaded model with its calibration text (cached per model, text and grid settings)."""
    ids = calibration_ids(loaded, eval_tokens, text)
    return allocate(loaded.model, ids, budget, model_name=loaded.name, callback=callback)
