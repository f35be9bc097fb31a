"""What every benchmark section shares: loaded models, the evaluation tokens, calibration batches, perplexity.

All perplexities in bench/ come from `lmcompress_core.measure.quality.perplexity` on the same token ids, so ours and
the peers' numbers differ only by the model. The evaluation text is split in two halves by characters:
the first half is evaluated, calibration windows (GPTQ, Wanda, distillation) are drawn from the second
(the tiny model calibrates on its training text, as `measure.evaluate` does), so no method sees the tokens
it is scored on.
"""
from __future__ import annotations

import torch

from bench.common import Scale


class Context:
    def __init__(self, scale: Scale):
        self.scale = scale
        self._loaded: dict = {}
        self._ids: dict = {}
        self._base_ppl: dict = {}

    @property
    def main_model(self) -> str:
        """SmolLM2 ("default") for the real run; the tiny model when a smoke run skips SmolLM2."""
        return "default" if self.scale.include_default else "tiny"

    def loaded(self, name: str):
        """`lmcompress_core.models.loading.load_model(name)`, loaded once per bench run."""
        if name not in self._loaded:
            from lmcompress_core.models.loading import load_model

            self._loaded[name] = load_model(name)
        return self._loaded[name]

    def text_halves(self, name: str) -> tuple[str, str]:
        from lmcompress_core.data import default_text_for, load_text

        text = load_text(default_text_for(name))
        half = len(text) // 2
        return text[:half], text[half:]

    def eval_tokens(self, name: str) -> int:
        return self.scale.tiny_eval_tokens if name == "tiny" else self.scale.eval_tokens

    def eval_ids(self, name: str) -> torch.Tensor:
        """The first `eval_tokens` token ids of the model's evaluation half-text."""
        if name not in self._ids:
            from lmcompress_core.data import token_ids

            ids = token_ids(self.loaded(name).tokenizer, self.text_halves(name)[0])
            self._ids[name] = ids[: self.eval_tokens(name)]
        return self._ids[name]

    def calibration(self, name: str, n_samples: int | None = None) -> torch.Tensor:
        """Calibration windows: the tiny model's training text (as evaluate does), else the unscored half."""
        from lmcompress_core.data import calibration_batches, load_text

        text = load_text("tiny-train") if name == "tiny" else self.text_halves(name)[1]
        return calibration_batches(self.loaded(name).tokenizer, text,
                                   n_samples=n_samples or self.scale.calibration_samples,
                                   seq_len=self.scale.context, seed=0)

    def perplexity(self, model, name: str) -> float:
        """Perplexity of `model` on the model family's evaluation tokens (non-overlapping windows)."""
        from lmcompress_core.measure.quality import perplexity

        ids = self.eval_ids(name)
        with torch.inference_mode():
            result = perplexity(model, ids, context=self.scale.context, stride=self.scale.context,
                                max_tokens=ids.numel())
        report = result[0] if isinstance(result, tuple) else result
        return float(report.value)

    def base_perplexity(self, name: str) -> float:
        if name not in self._base_ppl:
            self._base_ppl[name] = self.perplexity(self.loaded(name).model, name)
        return self._base_ppl[name]
