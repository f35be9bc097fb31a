"""The command line: JSON reports, the packed output folder, one-line errors with exit status 2."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lmcompress_core.cli import config_from_args, build_parser, main
from lmcompress_core import data
from lmcompress_core.methods.distill import DistillationConfig
from conftest import byte_bpe_tokenizer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs on one torch thread (conftest.one_thread)."""


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A tiny GPT-2 with its own BPE tokenizer saved as a local model folder (offline, seconds)."""
    folder = tmp_path_factory.mktemp("local-model")
    tokenizer = byte_bpe_tokenizer(data.load_text("web")[:20000], vocab_size=320)
    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=2, n_positions=256, vocab_size=len(tokenizer),
                        bos_token_id=1, eos_token_id=1)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_evaluate_json_has_the_promised_keys(model_folder, capsys):
    rc = main(["evaluate", "--model", model_folder, "--bits", "4", "--sparsity", "0.5", "--eval-tokens", "128",
               "--context", "64", "--new-tokens", "6", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads(captured.out)
    assert {"model", "config", "size", "latency", "perplexity", "base_perplexity", "kl_to_base",
            "top1_agreement", "generation", "how"} <= set(report)
    assert {"theoretical_bytes", "packed_bytes", "runtime_bytes"} <= set(report["size"])
    assert {"prefill_ms", "decode_tokens_per_s", "kernel"} <= set(report["latency"])
    assert {"value", "stderr", "tokens", "context", "stride"} <= set(report["perplexity"])
    assert {"prompt", "base", "compressed", "first_divergence"} <= set(report["generation"])
    assert report["config"]["quantization"]["bits"] == 4 and report["config"]["pruning"]["sparsity"] == 0.5
    assert "bf16 activations" in report["latency"]["kernel"] and report["size"]["simulated"] is False
    assert report["perplexity"]["tokens"] == 126 and report["perplexity"]["stderr"] > 0
    assert "perplexity" in captured.err  # the progress bar went to stderr


def test_compress_writes_a_loadable_packed_folder(model_folder, tmp_path, capsys):
    out = tmp_path / "packed"
    rc = main(["compress", "--model", model_folder, "--bits", "4", "--group-size", "0", "--method", "gptq",
               "--sparsity", "0.5", "--prune-method", "wanda", "--out", str(out), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert rc == 0 and summary["packed_bytes"] == sum(f.stat().st_size for f in out.iterdir())
    meta = json.loads((out / "compression.json").read_text())
    assert meta["compression"]["quantization"]["granularity"] == "channel"
    assert all(layer["sparse"] for name, layer in meta["layers"].items() if name != "lm_head")  # head: int8
    assert meta["layers"]["lm_head"]["bits"] == 8


@pytest.mark.parametrize("argv,message", [
    (["evaluate", "--bits", "7"], "bits must be one of"),
    (["evaluate", "--sparsity", "1.0"], "sparsity"),
    (["evaluate", "--bits", "4", "--group-size", "100"], "group_size"),
    (["evaluate", "--bogus"], "unrecognized arguments"),
    (["evaluate", "--bits", "four"], "invalid int value"),
    (["evaluate", "--model", "/no/such/folder"], "no such model folder"),
    (["compress", "--bits", "4"], "--out"),
    ([], "required"),
])
def test_errors_are_one_line_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


@pytest.mark.parametrize("argv,message", [
    (["--bits", "4", "--method", "hqq", "--symmetric"], "method='hqq' fits an asymmetric grid"),
    (["--bits", "4", "--method", "mse", "--symmetric"], "method='mse' fits an asymmetric grid"),
    (["--bits", "3", "--method", "hqq", "--grid", "minmax"], "grid='minmax' would be ignored"),
    (["--bits", "3", "--method", "mse", "--grid", "minmax"], "grid='minmax' would be ignored"),
    (["--bits", "4", "--runtime", "dynamic_int8"], "needs bits=8 (got bits=4)"),
    (["--runtime", "dynamic_int8"], "needs bits=8 (got no quantization)"),
    (["--bits", "8", "--runtime", "dynamic_int8", "--no-int8-kernel"], "int8_kernel=False"),
])
@pytest.mark.parametrize("command", ["evaluate", "compress"])
def test_settings_that_would_run_something_else_are_refused(command, argv, message, tmp_path, capsys):
    """Each combination that would silently run another method or kernel exits 2 with one error line, before any
    model is loaded (the model named here does not exist)."""
    extra = ["--out", str(tmp_path / "out")] if command == "compress" else []
    assert main([command, "--model", "/no/such/folder", *argv, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


def test_group_size_zero_means_per_channel():
    args = build_parser().parse_args(["evaluate", "--bits", "3", "--group-size", "0", "--symmetric",
                                      "--temperature", "4", "--distill-steps", "5", "--alpha", "0.7"])
    config = config_from_args(args)
    assert config.quantization.granularity == "channel" and config.quantization.symmetric
    assert config.pruning is None
    assert (config.distillation.temperature, config.distillation.steps, config.distillation.alpha) == (4, 5, 0.7)
    shared = config_from_args(build_parser().parse_args(["evaluate", "--distill-steps", "5"]))
    assert shared.distillation.temperature == DistillationConfig().temperature   # the app's default, one place


def test_python_dash_m_entry_point_errors_without_traceback():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "lmcompress_core", "evaluate", "--bits", "7"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2
    assert "error: bits must be one of" in result.stderr and "Traceback" not in result.stderr


def test_evaluate_llamacpp_says_how_to_enable_it_when_it_is_not_built(tiny_loaded, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LMCOMPRESS_LLAMACPP", str(tmp_path))   # an empty folder: no llama_cpp in it
    rc = main(["evaluate", "--model", "tiny", "--bits", "4", "--group-size", "32", "--symmetric", "--llamacpp",
               "--eval-tokens", "128", "--no-generation"])
    out = capsys.readouterr().out
    assert rc == 0 and "llama.cpp: not run — llama.cpp is not built here: `make llamacpp` builds" in out
    assert "latency: prefill" in out   # ours measured as always


@pytest.mark.skipif(not (Path(__file__).parents[1] / ".venv/llamacpp/llama_cpp").is_dir(),
                    reason="llama.cpp is not built (`make llamacpp`; `make bench` builds it too)")
def test_evaluate_llamacpp_reads_the_export_back_on_the_same_tokens(tiny_loaded, capsys):
    rc = main(["evaluate", "--model", "tiny", "--bits", "4", "--group-size", "32", "--symmetric", "--llamacpp",
               "--eval-tokens", "256", "--no-generation", "--json"])
    report = json.loads(capsys.readouterr().out)
    got = report["llamacpp"]
    assert rc == 0 and got["tensor_types"]["Q4_0"] > 0 and got["decode_tokens_per_s"] > 0
    # the same Q4_0 codes on the same tokens: llama.cpp within 2% of ours (fp16 scales and its own arithmetic)
    assert abs(got["perplexity"] / report["perplexity"]["value"] - 1) < 0.02
    assert got["threads"] == report["latency"]["threads"]
