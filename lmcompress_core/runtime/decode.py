"""Our own forward pass for Llama-family models: a static KV cache, fused projections, two-matmul attention.

transformers' step is general (dynamic cache objects, masks, attention dispatch, a module call per norm): on
SmolLM2 at batch 1 its overhead costs about as much as the int4 kernels themselves (profiled here: 210 int4 calls
4.5 ms of a 20 ms step; CPU flash attention on one query 2.2 ms). This loop runs the same modules' kernels:

* q/k/v and gate/up as one kernel call each where the layers share a kernel (``runtime.fused``; no second copy);
* keys and values written into preallocated tensors (grown when a run needs more positions);
* one query's attention as two small float32 matmuls over the grouped heads; a prompt's as causal SDPA;
* the LM head on the last position only (a prompt's other logits are never read by a decoder).

Numbers equal transformers' within the rounding of the activations' dtype (tests/test_decode.py). Prefill and
decode both run through it; perplexity keeps transformers' forward (every position's logits).
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from lmcompress_core.runtime.fused import FusedProjection, fuse

LOOP = "lmcompress static-cache loop, eager (fused q/k/v and gate/up where one kernel runs them)"
LOOP_COMPILED = "lmcompress static-cache loop, prompt eager, each new token one torch.compile (inductor) graph"
FAMILIES = ("llama", "mistral", "qwen2")   # same block: RMSNorm, rotary q/k, GQA attention, SiLU-gated MLP
_GROW = 256   # cache positions are allocated in steps of this many
STEP_CAPACITY = 256   # the compiled single-token step's cache (static shapes); other caches run eager
# keys, values and attention in float32 whatever the weights: 1 query × 100 keys of SmolLM2's grouped heads take
# 19 µs in float32 against 82 µs in bf16 (no bf16 matmul units on this CPU; measured here), and round less
ATTENTION = torch.float32


def refusal(model: nn.Module) -> str | None:
    """Why this loop cannot run ``model`` (None: it can)."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in FAMILIES:
        return f"the {kind or 'unknown'} architecture is not a Llama-family block ({', '.join(FAMILIES)})"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act} is not SiLU"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "sliding-window attention (the loop attends to every earlier position)"
    if rope.get("rope_type") == "dynamic":
        return "dynamic rotary scaling changes with the sequence length"
    if next(model.parameters()).device.type != "cpu":
        return "the loop runs on the CPU (CUDA keeps transformers' forward)"
    return None


@dataclass
class KVCache:
    """One run's keys and values (per layer [kv heads, capacity, head dim]), the rotary tables, and its length."""
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    cos: torch.Tensor
    sin: torch.Tensor
    length: int = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[1]


class _Block:
    """One decoder layer's modules, with its fused calls (None: the parts run one by one)."""

    def __init__(self, layer: nn.Module):
        attn, mlp = layer.self_attn, layer.mlp
        self.attn_norm, self.mlp_norm = layer.input_layernorm, layer.post_attention_layernorm
        self.q, self.k, self.v, self.o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.gate, self.up, self.down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.scaling = attn.scaling
        self.qkv = fuse([self.q, self.k, self.v])
        self.gate_up = fuse([self.gate, self.up])

    def modules(self) -> list[nn.Module]:
        return [self.attn_norm, self.mlp_norm, self.q, self.k, self.v, self.o, self.gate, self.up, self.down]

    def fused(self) -> list[FusedProjection]:
        return [f for f in (self.qkv, self.gate_up) if f is not None]

    def project_qkv(self, x):
        return self.qkv(x) if self.qkv is not None else (self.q(x), self.k(x), self.v(x))

    def mlp(self, x):
        gate, up = self.gate_up(x) if self.gate_up is not None else (self.gate(x), self.up(x))
        return self.down(F.silu(gate) * up)


class Decoder:
    """The forward pass of one model at batch 1; each run keeps its own ``KVCache`` (sessions never share one)."""

    def __init__(self, model: nn.Module):
        why = refusal(model)
        if why is not None:
            raise ValueError(f"the static-cache loop cannot run this model: {why}")
        config, body = model.config, model.model
        self.body, self.head = body, model.get_output_embeddings()   # no reference to the model: it keys the cache
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        with torch.inference_mode(False):   # fused storage: ordinary tensors, like the weights, whoever asks
            self.blocks = [_Block(layer) for layer in body.layers]
        # the residual stream's dtype after the first norm (an int8 embedding hands bf16 rows to a float32 norm)
        embedded = body.embed_tokens(torch.zeros(1, 1, dtype=torch.long)).dtype
        self.dtype = torch.promote_types(embedded, body.norm.weight.dtype)

    def intact(self) -> bool:
        return all(f.intact() for b in self.blocks for f in b.fused())

    def modules(self) -> list[nn.Module]:
        """Every module the loop reads, in order."""
        return [self.body.embed_tokens, self.body.norm, self.head] + [m for b in self.blocks for m in b.modules()]

    def fused_calls(self) -> int:
        """How many fused kernel calls one token makes (2 per layer when every layer fuses)."""
        return sum(len(b.fused()) for b in self.blocks)

    @torch.inference_mode()   # inference tensors, like every step's inputs: one kind of tensor for compiled graphs
    def new_cache(self, capacity: int) -> KVCache:
        capacity = -(-capacity // _GROW) * _GROW
        shape = (self.kv_heads, capacity, self.head_dim)
        cos, sin = self.body.rotary_emb(torch.zeros(1, dtype=self.dtype), torch.arange(capacity)[None])
        return KVCache([torch.zeros(shape, dtype=ATTENTION) for _ in self.blocks],
                       [torch.zeros(shape, dtype=ATTENTION) for _ in self.blocks],
                       cos[0].to(self.dtype), sin[0].to(self.dtype))

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache: KVCache, step: Callable | None = None) -> torch.Tensor:
        """Logits [vocab] (float32) of the last of ``ids`` [1, T], appended after the cache's ``length`` tokens.
        ``step`` (``runtime.compiled``'s) runs a single token where the cache has room for it."""
        start, count = cache.length, ids.shape[-1]
        if step is not None and count == 1 and start < cache.capacity == STEP_CAPACITY:
            cache.length += 1
            return step(self, ids.reshape(1, 1).clone(), torch.tensor([start]), cache.keys, cache.values, cache.cos,
                        cache.sin)
        cache = self._room(cache, start + count)
        h = self.body.embed_tokens(ids.reshape(1, -1))[0]
        for i, block in enumerate(self.blocks):
            h = h + self._attention(block, _norm(block.attn_norm, h), cache, i, start)
            h = h + block.mlp(_norm(block.mlp_norm, h))
        cache.length = start + count
        return self.head(_norm(self.body.norm, h[-1:]))[0].float()

    def _attention(self, block: _Block, x, cache: KVCache, i: int, start: int):
        count, d, heads = x.shape[0], self.head_dim, self.heads
        q, k, v = block.project_qkv(x)
        at = slice(start, start + count)
        # queries and keys rotated in one call: [count, heads + kv heads, d] → [heads + kv heads, count, d]
        qk = _rotate(torch.cat((q, k), -1).view(count, -1, d).transpose(0, 1), cache.cos[at], cache.sin[at])
        q = qk[:heads].to(ATTENTION) * block.scaling
        cache.keys[i][:, at] = qk[heads:]
        cache.values[i][:, at] = v.view(count, self.kv_heads, d).transpose(0, 1)
        keys, values = cache.keys[i][:, :start + count], cache.values[i][:, :start + count]
        if count == 1:
            out = (q.view(self.kv_heads, -1, d) @ keys.transpose(1, 2)).softmax(-1) @ values
        else:
            mask = torch.ones(count, start + count, dtype=torch.bool).tril(start)
            out = F.scaled_dot_product_attention(q[None], keys[None], values[None], attn_mask=mask,
                                                 scale=1.0, enable_gqa=True)[0]
        out = out.reshape(heads, count, d).transpose(0, 1).reshape(count, heads * d)
        return block.o(out.to(self.dtype))

    def _room(self, cache: KVCache, needed: int) -> KVCache:
        """The cache itself, or grown (in place of its tensors) to hold ``needed`` positions."""
        if needed <= cache.capacity:
            return cache
        grown, kept = self.new_cache(needed), slice(0, cache.length)
        for old, new in zip(cache.keys + cache.values, grown.keys + grown.values):
            new[:, kept] = old[:, kept]
        cache.keys, cache.values, cache.cos, cache.sin = grown.keys, grown.values, grown.cos, grown.sin
        return cache


def token_step(decoder: Decoder, token: torch.Tensor, position: torch.Tensor, keys: list[torch.Tensor],
               values: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """One token at ``position`` (a [1] tensor) with static shapes: attention over the whole capacity, the
    positions not written yet masked out; what ``runtime.compiled`` compiles (the weights are read off
    ``decoder``, so they enter the graph as inputs, never as constants)."""
    d, heads, kv_heads = decoder.head_dim, decoder.heads, decoder.kv_heads
    h = decoder.body.embed_tokens(token)[0]
    cos, sin = cos.index_select(0, position), sin.index_select(0, position)
    hidden = torch.arange(keys[0].shape[1]) > position
    for i, block in enumerate(decoder.blocks):
        q, k, v = block.project_qkv(_norm(block.attn_norm, h))
        qk = _rotate(torch.cat((q, k), -1).view(1, -1, d).transpose(0, 1), cos, sin)
        keys[i][:, position] = qk[heads:].to(ATTENTION)
        values[i][:, position] = v.view(1, kv_heads, d).transpose(0, 1).to(ATTENTION)
        # two small matmuls (inductor calls mkl for them: faster here than its own fused loops, 92 vs 78 tok/s)
        scores = (qk[:heads].to(ATTENTION) * block.scaling).view(kv_heads, -1, d) @ keys[i].transpose(1, 2)
        out = scores.masked_fill(hidden, float("-inf")).softmax(-1) @ values[i]
        h = h + block.o(out.reshape(1, heads * d).to(decoder.dtype))
        h = h + block.mlp(_norm(block.mlp_norm, h))
    return decoder.head(_norm(decoder.body.norm, h))[0].float()


def _norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Llama's RMSNorm as one fused op, in the dtype transformers' module returns (its weight's, for a float32
    weight: the statistics in float32 either way)."""
    weight = module.weight
    return F.rms_norm(x.to(weight.dtype), weight.shape, weight, module.variance_epsilon)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as transformers' Llama applies it (halves rotated, not interleaved)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


_decoders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def decoder_for(model: nn.Module) -> Decoder | None:
    """The model's Decoder (built once, shared by its runs; rebuilt after a device move), or None when the loop
    cannot run it (then transformers' forward does: ``refusal`` says why)."""
    if refusal(model) is not None:
        return None
    with _lock:
        decoder = _decoders.get(model)
        if decoder is None or not decoder.intact():
            decoder = _decoders[model] = Decoder(model)
        return decoder
