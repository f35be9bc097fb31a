"""Distillation: the KD loss against a reference, validation, the smaller student, seeding and cancelling."""
import copy
import math

import pytest
import torch

from lmcompress_core.methods.distill import (DEFAULT_TEMPERATURE, DistillationConfig, distill_, format_duration,
                                             keep_every_kth_block_, kd_loss, next_token_distribution, seconds_left,
                                             step_time_estimate, temperature_study, temperature_view)
from lmcompress_core.methods.prune import PruningConfig
from lmcompress_core.methods.quantize import QuantizationConfig

torch.set_num_threads(2)


def reference_kd_loss(s, t, y, temperature, alpha):
    """Written from the formula, one position at a time, in float64."""
    total = 0.0
    for i in range(s.shape[0]):
        zs, zt = s[i].double(), t[i].double()
        p_t = torch.exp(zt / temperature) / torch.exp(zt / temperature).sum()
        p_s = torch.exp(zs / temperature) / torch.exp(zs / temperature).sum()
        kl = (p_t * (p_t.log() - p_s.log())).sum()
        ce = -(zs[y[i]] - torch.log(torch.exp(zs).sum()))
        total += alpha * temperature ** 2 * kl + (1 - alpha) * ce
    return total / s.shape[0]


@pytest.mark.parametrize("temperature, alpha", [(0.5, 0.0), (1.0, 0.5), (2.0, 0.5), (4.0, 1.0), (10.0, 0.3)])
def test_kd_loss_matches_the_formula(temperature, alpha):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(12, 50, generator=g) * 3, torch.randn(12, 50, generator=g) * 3
    y = torch.randint(50, (12,), generator=g)
    expected = reference_kd_loss(s, t, y, temperature, alpha)
    assert kd_loss(s, t, y, temperature, alpha).item() == pytest.approx(expected.item(), rel=1e-5)
    # the [batch, seq, vocab] layout and ignored labels give the same value
    padded_y = torch.cat([y, torch.full((4,), -100)])
    padded = kd_loss(torch.cat([s, s[:4]]).reshape(2, 8, 50), torch.cat([t, t[:4]]).reshape(2, 8, 50),
                     padded_y.reshape(2, 8), temperature, alpha)
    assert padded.item() == pytest.approx(expected.item(), rel=1e-5)


def test_kd_term_vanishes_when_student_equals_teacher():
    z = torch.randn(6, 20)
    assert kd_loss(z, z, torch.zeros(6, dtype=torch.long), 2.0, 1.0).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kwargs, words", [
    ({"temperature": 0}, "temperature must be positive"),
    ({"temperature": -1}, "temperature must be positive"),
    ({"temperature": 0.2}, "between 0.5 and 10"),
    ({"temperature": 11}, "between 0.5 and 10"),
    ({"alpha": 1.5}, "alpha"),
    ({"steps": -1}, "steps must be a whole number between 0 and 10000"),
    ({"steps": 2.5}, "steps must be a whole number"),
    ({"steps": 10 ** 6}, "steps"),
    ({"mode": "teacher"}, "mode must be"),
    ({"keep_every": 0}, "keep_every"),
    ({"lr": 0}, "lr"),
    ({"batch_size": 0}, "batch_size"),
    ({"seq_len": 2}, "seq_len"),
])
def test_bad_config_is_refused_with_a_message(kwargs, words):
    with pytest.raises(ValueError, match=words):
        DistillationConfig(**kwargs)


def test_smaller_student_keeps_every_kth_block_and_still_generates(random_arch):
    import copy

    model = copy.deepcopy(random_arch.model)
    kept = keep_every_kth_block_(model, 2)
    assert kept == [0] and model.config.num_hidden_layers == 1
    ids = torch.randint(model.config.vocab_size, (1, 6))
    assert model.generate(ids, max_new_tokens=5, do_sample=False).shape == (1, 11)


def _teacher_student(random_arch):
    import copy

    teacher = random_arch.model
    student = copy.deepcopy(teacher)
    keep_every_kth_block_(student, 2)
    return teacher, student


def _kl_to_teacher(student, teacher, ids):
    with torch.no_grad():
        return kd_loss(student(input_ids=ids).logits, teacher(input_ids=ids).logits, ids, 1.0, 1.0).item()


def test_training_is_seeded_bounded_and_moves_toward_the_teacher(random_arch):
    import copy

    teacher, student = _teacher_student(random_arch)
    ids = torch.randint(teacher.config.vocab_size, (6, 40), generator=torch.Generator().manual_seed(0))
    config = DistillationConfig(steps=16, lr=3e-4, batch_size=2, seq_len=32, alpha=1.0, temperature=1.0)
    before = _kl_to_teacher(student, teacher, ids[5:])
    first = distill_(copy.deepcopy(student), teacher, config, ids[:5], ids[5:])
    second = distill_(student, teacher, config, ids[:5], ids[5:])
    assert [r["loss"] for r in first] == [r["loss"] for r in second]
    assert len(first) == config.steps + 1 and all(math.isfinite(r["loss"]) for r in first)
    assert "ppl" in first[0] and "ppl" in first[-1]
    elapsed = [r["elapsed_s"] for r in first]   # the clock the progress bar's time left is read from
    assert elapsed == sorted(elapsed) and elapsed[0] > 0
    assert _kl_to_teacher(student, teacher, ids[5:]) < 0.9 * before  # measured 0.23–0.82


def test_cancel_is_checked_every_step(random_arch):
    teacher, student = _teacher_student(random_arch)
    ids = torch.randint(teacher.config.vocab_size, (4, 40))
    steps = []

    class Stop(Exception):
        pass

    def check():
        if len(steps) == 3:
            raise Stop

    with pytest.raises(Stop):
        distill_(student, teacher, DistillationConfig(steps=50, batch_size=2, seq_len=16), ids, None,
                 report=lambda step, total, row: steps.append(step), check=check)
    assert steps == [0, 1, 2]


def test_cancel_is_asked_before_every_block_forward_and_backward(random_arch):
    """A step is long (~6 s on SmolLM2 here): the check also runs before each block (and after the output head)
    of the teacher's and the student's forward and of the student's backward. Stopped in the backward of the first update, the student
    is left as it was (the optimiser never stepped) and the hooks are gone from both models."""
    from lmcompress_core.methods.layers import transformer_blocks

    teacher, student = _teacher_student(random_arch)
    n_teacher, n_student = (len(transformer_blocks(m)[2]) for m in (teacher, student))
    ids = torch.randint(teacher.config.vocab_size, (4, 40), generator=torch.Generator().manual_seed(0))
    config = DistillationConfig(steps=2, batch_size=2, seq_len=16)
    asks = []
    distill_(copy.deepcopy(student), teacher, config, ids, None, check=lambda: asks.append(1))
    # a step asks before it starts, a pass before each block; then per sequence: before it, after the teacher's
    # head and after the student's (and, updating, before the student's head's backward)
    measure = 1 + n_teacher + n_student + 3 * config.batch_size   # step 0 only measures: no backward
    update = 1 + n_teacher + n_student + 4 * config.batch_size + n_student
    assert len(asks) == measure + 2 * update

    class Stop(Exception):
        pass

    def stop_in_backward():
        asks.append(1)
        if len(asks) == measure + update:   # the last ask of the first update: in its backward
            raise Stop

    before = {k: v.clone() for k, v in student.state_dict().items()}
    asks.clear()
    with pytest.raises(Stop):
        distill_(student, teacher, config, ids, None, check=stop_in_backward)
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
    for model in (teacher, student):
        assert all(not b._forward_pre_hooks and not b._forward_hooks for b in transformer_blocks(model)[2])


@pytest.mark.parametrize("ignored", [0, 5])
def test_the_loss_a_sequence_at_a_time_is_the_loss_of_one_call_and_its_gradient(ignored):
    """The step's loss and its gradient at the student's logits, taken a sequence at a time, against one call
    of kd_loss and autograd (labels of -100 in one sequence weigh it less)."""
    from lmcompress_core.methods.distill import _loss_by_sequence

    gen = torch.Generator().manual_seed(0)
    student = torch.randn(3, 7, 50, generator=gen) * 3
    teacher = torch.randn(3, 7, 50, generator=gen) * 3
    labels = torch.randint(50, (3, 7), generator=gen)
    labels[1, :ignored] = -100
    config = DistillationConfig(temperature=2.0, alpha=0.3)
    z = student.clone().requires_grad_(True)
    whole = kd_loss(z, teacher, labels, config.temperature, config.alpha)
    whole.backward()
    asked = []
    loss, grad = _loss_by_sequence(student, teacher, labels, config, True, check=lambda: asked.append(1))
    assert abs(loss - whole.item()) < 1e-5 * abs(whole.item())
    assert torch.allclose(grad, z.grad, rtol=1e-4, atol=1e-7) and len(asked) == 3
    assert _loss_by_sequence(student, teacher, labels, config, False)[1] is None


def test_the_heads_a_sequence_at_a_time_give_the_loss_and_gradients_of_the_whole_batch():
    """With the heads run a sequence at a time: the same loss, the same gradient at the student's hidden states
    and the same gradient in the student's head as the whole batch through its head, kd_loss and autograd."""
    from lmcompress_core.methods.distill import _loss_by_sequence

    gen = torch.Generator().manual_seed(1)
    heads = (torch.nn.Linear(8, 50), torch.nn.Linear(8, 50))
    student, teacher = torch.randn(3, 7, 8, generator=gen), torch.randn(3, 7, 8, generator=gen)
    labels = torch.randint(50, (3, 6), generator=gen)
    config = DistillationConfig(temperature=2.0, alpha=0.3)
    h = student.clone().requires_grad_(True)
    whole = kd_loss(heads[0](h)[:, :-1], heads[1](teacher)[:, :-1].detach(), labels, config.temperature, config.alpha)
    whole.backward()
    expected = heads[0].weight.grad.clone()
    heads[0].weight.grad = None
    loss, grad = _loss_by_sequence(student, teacher, labels, config, True, heads=heads)
    assert abs(loss - whole.item()) < 1e-5 * abs(whole.item())
    assert torch.allclose(grad, h.grad, rtol=1e-4, atol=1e-7)
    assert torch.allclose(heads[0].weight.grad, expected, rtol=1e-4, atol=1e-7)
    assert heads[1].weight.grad is None                   # the teacher's head is never trained


def test_the_hidden_states_through_the_head_are_the_logits(random_arch):
    """_hidden (the forward up to the output head) then the head gives the causal LM's logits, bit for bit."""
    from lmcompress_core.methods.distill import _hidden

    model = random_arch.model
    ids = torch.randint(model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.get_output_embeddings()(_hidden(model, ids)), model(input_ids=ids).logits)


def test_the_heldout_check_is_the_logits_cross_entropy_and_stops_between_head_chunks(random_arch, monkeypatch):
    """heldout_perplexity (the head a chunk of positions at a time) is exp of the model's own logits' mean
    cross-entropy, and asks check() before each chunk: rows × ceil((L − 1) / HEAD_CHUNK) times."""
    import torch.nn.functional as F

    from lmcompress_core.methods import distill

    monkeypatch.setattr(distill, "HEAD_CHUNK", 5)
    model = random_arch.model
    ids = torch.randint(model.config.vocab_size, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].float()
    expected = math.exp(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item())
    asked = []
    assert distill.heldout_perplexity(model, ids, lambda: asked.append(1)) == pytest.approx(expected, rel=1e-5)
    assert len(asked) == 3 * 4


def test_next_token_distribution_is_sorted_and_temperature_flattens():
    class Tokenizer:
        def __call__(self, text, return_tensors):
            return type("Encoded", (), {"input_ids": torch.tensor([[1, 2, 3]])})

        def decode(self, ids):
            return f"<{ids[0]}>"

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.logits = torch.nn.Parameter(torch.linspace(0, 5, 20))

        def forward(self, input_ids, use_cache=False):
            return type("Out", (), {"logits": self.logits.expand(1, input_ids.shape[1], 20)})

    cold = next_token_distribution(Model(), Tokenizer(), "hi", 0.5, top_k=5)
    hot = next_token_distribution(Model(), Tokenizer(), "hi", 5.0, top_k=5)
    assert [t for t, _ in cold] == ["<19>", "<18>", "<17>", "<16>", "<15>"]
    assert all(a[1] >= b[1] for a, b in zip(cold, cold[1:]))
    assert cold[0][1] > hot[0][1]
    with pytest.raises(ValueError, match="prompt is empty"):
        next_token_distribution(Model(), Tokenizer(), "   ", 1.0)
    view = temperature_view(Model(), Tokenizer(), "hi", 4.0, top_k=5)
    assert view.tokens == [t for t, _ in next_token_distribution(Model(), Tokenizer(), "hi", 1.0, top_k=5)]
    assert view.at_one == pytest.approx([p for _, p in next_token_distribution(Model(), Tokenizer(), "hi", 1.0, 5)])
    assert view.at_t == pytest.approx([p for _, p in next_token_distribution(Model(), Tokenizer(), "hi", 4.0, 5)])
    assert view.rest[0] == pytest.approx(1 - sum(view.at_one)) and view.rest[1] > view.rest[0]
    assert view.entropy[0] < view.entropy[1] < view.max_entropy == pytest.approx(math.log(20))


def test_the_default_temperature_is_the_committed_studys_best():
    study = temperature_study()
    assert study is not None and study.best == DEFAULT_TEMPERATURE == DistillationConfig().temperature


def test_time_estimates_and_time_left(tmp_path):
    assert [format_duration(s) for s in (0.4, 45, 60, 200, 3900)] == ["0 s", "45 s", "1 min", "3 min 20 s", "1 h 5 min"]
    assert seconds_left({"step": 4, "elapsed_s": 10.0}, 20) == pytest.approx(32.0)   # 5 steps in 10 s, 16 to go
    config = DistillationConfig()
    tiny = step_time_estimate("tiny", None, config)
    smol = step_time_estimate("default", 134_515_008, config)
    assert 0.05 < tiny.seconds < 1 and 1 < smol.seconds < 20 and "measured on this model" in smol.source
    # another model: the tiny model's time per parameter; twice the tokens per step, twice the time
    other = step_time_estimate("gpt2", 124_000_000, config)
    assert "per parameter" in other.source and 1 < other.seconds < 20
    assert step_time_estimate("tiny", None, DistillationConfig(batch_size=8)).seconds == pytest.approx(2 * tiny.seconds)
    assert other.training_seconds(9) == pytest.approx(10 * other.seconds)   # step 0 measures the starting loss
    assert step_time_estimate("tiny", None, config, path=tmp_path / "missing.json") is None


# ---- recovery and student distillation on the project's tiny model ------------------------------------------

def _windows(tokenizer, text: str, n: int, seq_len: int, seed: int) -> torch.Tensor:
    from lmcompress_core.data import calibration_batches

    return calibration_batches(tokenizer, text, n_samples=n, seq_len=seq_len, seed=seed)


@pytest.fixture(scope="module")
def tiny_texts(tiny_loaded):
    """(model, held-out windows of plays never trained on, calibration windows of the training text)."""
    from lmcompress_core.data import load_text

    tok = tiny_loaded.tokenizer
    heldout = _windows(tok, load_text("tiny-heldout"), 6, 128, seed=1)
    return tiny_loaded.model, heldout, _windows(tok, load_text("tiny-train"), 64, 128, seed=0)


def _ppl(model, windows) -> float:
    from lmcompress_core.methods.distill import heldout_perplexity

    return heldout_perplexity(model, windows)


def _recovered(tiny_texts, compression: dict, **kd) -> tuple[float, object]:
    """Recovered fraction of the lost held-out perplexity, and the distilled CompressedModel (simulated runtime)."""
    from lmcompress_core.compress import CompressionConfig, compress

    model, heldout, calib = tiny_texts
    base = _ppl(model, heldout)
    compressed = _ppl(compress(model, CompressionConfig(**compression, runtime="simulate")).model, heldout)
    config = CompressionConfig(**compression, runtime="simulate", distillation=DistillationConfig(**kd))
    cm = compress(model, config, calibration=calib)
    return (compressed - _ppl(cm.model, heldout)) / (compressed - base), cm


RECOVERY_KD = dict(steps=40, batch_size=4, seq_len=128, seed=0)


@pytest.mark.parametrize("compression, trains, floor", [
    ({"pruning": PruningConfig(sparsity=0.7)}, "grid", 0.3),
    ({"quantization": QuantizationConfig(bits=2, group_size=128)}, "grid", 0.1),
    # codes moving: 0.67 measured here at code_lr 1e-3 (0.78 at 1e-2) against 0.36 for the scales alone
    ({"quantization": QuantizationConfig(bits=2, group_size=128)}, "codes", 0.6),
], ids=["70% magnitude", "2-bit RTN, scales", "2-bit RTN, codes move"])
def test_recovery_wins_back_part_of_the_lost_perplexity(tiny_texts, compression, trains, floor):
    fraction, _ = _recovered(tiny_texts, compression, trains=trains, **RECOVERY_KD)
    assert fraction >= floor, fraction


def test_codes_start_where_compression_left_them(tiny_texts):
    """No update (step 0 only): positions start within a rounding of their codes, so they come back unchanged."""
    from lmcompress_core.compress import CompressionConfig, compress

    model, _, calib = tiny_texts
    compression = dict(quantization=QuantizationConfig(bits=2, group_size=64), runtime="simulate")
    plain = compress(model, CompressionConfig(**compression))
    kd = DistillationConfig(steps=0, batch_size=2, seq_len=64, trains="codes", vectors=False)
    after = _codes_and_masks(compress(model, CompressionConfig(**compression, distillation=kd), calibration=calib))
    for name, (qw, _) in _codes_and_masks(plain).items():
        assert torch.equal(after[name][0].codes, qw.codes), name
        assert torch.equal(after[name][0].scales, qw.scales), name


def _codes_and_masks(cm) -> dict:
    return {name: (m.quantized_weight(), m.keep_mask()) for name, m in cm.layers().items()}


@pytest.mark.parametrize("trains", ["grid", "codes", "weights"])
def test_recovery_keeps_the_compression_and_its_size(tiny_texts, trains):
    from lmcompress_core.compress import CompressionConfig, compress
    from lmcompress_core.measure.evaluation import measure_size

    model, _, calib = tiny_texts
    compression = dict(pruning=PruningConfig(sparsity=0.5), quantization=QuantizationConfig(bits=3, group_size=64),
                       runtime="simulate")
    plain = compress(model, CompressionConfig(**compression))
    kd = DistillationConfig(steps=6, batch_size=2, seq_len=64, lr=1e-2, code_lr=1e-2, trains=trains)
    trained = compress(model, CompressionConfig(**compression, distillation=kd), calibration=calib)
    before, after = _codes_and_masks(plain), _codes_and_masks(trained)
    assert before.keys() == after.keys() and len(after) == 5 * 7
    moved = 0
    for name, (qw, mask) in after.items():
        old_qw, old_mask = before[name]
        assert torch.equal(mask, old_mask), f"{name}: the keep-mask changed"
        weight = trained.model.get_submodule(name).weight.detach()
        assert torch.equal(weight, qw.dequantize()), f"{name}: the weight is not its codes on its grid"
        assert not weight[~mask].any(), f"{name}: a pruned weight came back"
        assert torch.equal(qw.scales.half().float(), qw.scales), f"{name}: scales are no longer float16 values"
        if trains == "grid":
            assert torch.equal(qw.codes, old_qw.codes) and torch.equal(qw.zeros, old_qw.zeros)
            moved += not torch.equal(qw.scales, old_qw.scales)
        elif trains == "codes":   # both move; the zero-points stay
            assert torch.equal(qw.zeros, old_qw.zeros)
            moved += not torch.equal(qw.codes, old_qw.codes) and not torch.equal(qw.scales, old_qw.scales)
        else:
            assert torch.equal(qw.scales, old_qw.scales)
            moved += not torch.equal(qw.codes, old_qw.codes)
    assert moved >= len(after) // 2, "training changed almost nothing"
    size, plain_size = measure_size(trained, model), measure_size(plain, model)
    for field in ("layers_packed_bytes", "dense_bytes", "theoretical_bytes"):
        assert getattr(size, field) == getattr(plain_size, field), field
    # the file's JSON header also records the distillation settings: a few hundred bytes, no tensor bytes
    assert 0 < size.packed_bytes - plain_size.packed_bytes < 1024


def test_a_distilled_student_beats_the_same_student_trained_on_labels_only(tiny_texts):
    from lmcompress_core.compress import CompressionConfig, compress

    model, heldout, calib = tiny_texts
    ppl = {}
    for alpha in (0.0, 0.5):
        config = DistillationConfig(mode="student", keep_every=2, alpha=alpha, temperature=2.0, steps=30,
                                    batch_size=4, seq_len=128, lr=1e-3)
        student = compress(model, CompressionConfig(distillation=config), calibration=calib).model
        assert student.config.num_hidden_layers == 3
        ppl[alpha] = _ppl(student, heldout)
    assert ppl[0.5] < ppl[0.0], ppl


def test_temperature_study_reads_the_bench_result_and_picks_the_best_mean(tmp_path):
    import json

    from lmcompress_core.methods.distill import temperature_study

    by_t = {"1": {"mean": 0.2, "std": 0.05}, "2": {"mean": 0.45, "std": 0.1}, "4": {"mean": None, "std": None}}
    section = {"headline": {"kd_recovered_fraction_by_temperature": by_t},
               "tiny": {"setting": "70% magnitude pruning", "steps": 100, "seeds": [0, 1, 2]}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"sections": {"distillation": section}}))
    study = temperature_study(path)
    assert study.best == 2.0 and study.best_mean == 0.45
    assert study.setting == "tiny model, 70% magnitude pruning, 100 recovery steps, 3 seeds"
    path.write_text(json.dumps({"sections": {}}))
    assert temperature_study(path) is None and temperature_study(tmp_path / "missing.json") is None
