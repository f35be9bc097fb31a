"""Executors on a real local Ray (2 CPUs) and in-process: same rows, a killed worker, failures kept apart.

One local Ray for the whole module (started once, shut down after). Grids are small and measured without
latency or generation at 128 tokens: only the deterministic columns (sizes, perplexity) are compared, since
timings differ by nature between processes.
"""
import json
import os
import signal

import pytest

from lmcompress_core import sweep
from lmcompress_core.cli import main
from lmcompress_core.compress import CompressionConfig
from lmcompress_core.execute import RETRIES, Outcome, RayExecutor, SerialExecutor, make_executor
from lmcompress_core.models.loading import count_params, estimate_memory_bytes
from lmcompress_core.measure.protocol import EvalProtocol
from lmcompress_core.methods.quantize import QuantizationConfig
from lmcompress_core.measure.sensitivity import layer_sensitivity

ray = pytest.importorskip("ray")

PROTOCOL = {"protocol": EvalProtocol(eval_tokens=128, latency=False, generation=False)}
DETERMINISTIC = ["label", "bits", "sparsity_pct", "method", "size_mb", "packed_bytes", "config"]
MEASURED = ["perplexity", "stderr", "kl_to_base", "top1_agreement"]


@pytest.fixture(scope="module")
def local_ray():
    executor = RayExecutor(num_cpus=2)
    executor.start()
    yield executor
    executor.close()


@pytest.fixture(scope="module")
def configs():
    return sweep.grid((2,), (0.0, 0.5)) + sweep.grid((4,), (0.0,))


@pytest.fixture(scope="module")
def serial_table(tiny_loaded, configs):
    return sweep.run_sweep(tiny_loaded, configs, **PROTOCOL)


def assert_same_rows(table, reference):
    assert list(table["label"]) == list(reference["label"])
    assert table[DETERMINISTIC].equals(reference[DETERMINISTIC])
    for column in MEASURED:  # 1 torch thread per Ray worker vs 2 in-process: float sums may differ in the last bits
        assert table[column].tolist() == pytest.approx(reference[column].tolist(), rel=1e-5)


def test_ray_sweep_returns_the_serial_rows(local_ray, tiny_loaded, configs, serial_table):
    seen = []
    table = sweep.run_sweep(tiny_loaded, configs, executor=local_ray, callback=seen.append, **PROTOCOL)
    assert_same_rows(table, serial_table)
    assert [p.step for p in seen] == [0, 1, 2, 3] and all(p.total == 3 for p in seen)
    assert "ray worker pid" in seen[-1].message
    assert table.attrs["backend"].startswith("ray (local Ray") and table.attrs["failures"] == []
    assert serial_table.attrs["backend"].startswith("serial")


def test_a_killed_worker_loses_nothing(local_ray, tiny_loaded, configs, serial_table):
    killed, messages = [], []

    def kill_on_first_result(progress):
        messages.append(progress.message)
        if progress.step == 1 and not killed:  # one result in: the other worker is mid-task
            killed.extend(local_ray.worker_pids())
            for pid in killed:
                os.kill(pid, signal.SIGKILL)

    table = sweep.run_sweep(tiny_loaded, configs, executor=local_ray, callback=kill_on_first_result, **PROTOCOL)
    assert len(killed) == 2
    assert any("worker died" in m and "retrying once" in m for m in messages), messages
    assert_same_rows(table, serial_table)
    assert table.attrs["failures"] == []
    finished_by = {int(m.rsplit("pid ", 1)[1].rstrip(")")) for m in messages if "done (ray worker pid" in m}
    assert finished_by - set(killed)    # replacement workers finished the retried configurations
    local_ray.release()  # a killed worker whose last result had already arrived is still in the pool


def test_a_failing_task_is_retried_once_and_the_others_are_kept(local_ray, tiny_loaded):
    good = CompressionConfig(quantization=QuantizationConfig(bits=4)).to_dict()
    options = {"protocol": PROTOCOL["protocol"].to_dict()}   # plain data crosses to the workers
    outcomes = list(local_ray.map(tiny_loaded, "evaluate", [{"config": {"bogus": 1}}, {"config": good}], options))
    bad = [o for o in outcomes if o.index == 0]
    assert [(o.attempt, o.retrying, o.ok) for o in bad] == [(1, True, False), (2, False, False)]
    assert all("unknown compression setting" in o.error and "ValueError" in o.error for o in bad)
    assert [o.ok for o in outcomes if o.index == 1] == [True]
    assert next(o for o in outcomes if o.ok).result["size"]["packed_bytes"] > 0


def test_sensitivity_on_ray_matches_in_process(local_ray, tiny_loaded):
    config = CompressionConfig(quantization=QuantizationConfig(bits=4, group_size=32))
    here = layer_sensitivity(tiny_loaded.model, config, bits_list=(2, 4))
    there = layer_sensitivity(tiny_loaded, config, bits_list=(2, 4), executor=local_ray)
    assert list(there["layer"]) == list(here["layer"]) and list(there["bits"]) == list(here["bits"])
    assert there["rel_mse"].tolist() == pytest.approx(here["rel_mse"].tolist(), rel=1e-5)
    with pytest.raises(ValueError, match="LoadedModel"):
        layer_sensitivity(tiny_loaded.model, config, bits_list=(2,), executor=local_ray)


def test_cli_sweep_on_ray_writes_json_lines_and_names_the_backend(local_ray, tmp_path, capsys):
    local_ray.release()   # the command starts its own workers: give the CPUs back
    out = tmp_path / "results.jsonl"
    rc = main(["sweep", "--model", "tiny", "--bits", "2", "--sparsity", "0,0.5", "--method", "rtn",
               "--eval-tokens", "128", "--no-latency", "--backend", "ray", "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["backend"].startswith("ray") and len(summary["rows"]) == 2 and summary["failures"] == []
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 2 and all(line["result"]["perplexity"]["value"] > 1 for line in lines)
    assert "sweep" in captured.err   # the progress bar


def test_resources_come_from_the_memory_preflight(local_ray, tiny_loaded):
    params = count_params(tiny_loaded.model.config)
    resources = RayExecutor(cpus_per_task=1, gpus_per_task=0).task_resources(tiny_loaded)
    assert resources == {"num_cpus": 1, "num_gpus": 0, "memory": estimate_memory_bytes(tiny_loaded.model.config)
                         + 4 * params}
    with pytest.raises(ValueError, match="no Ray node can hold a worker"):
        local_ray._worker_count(3, {**resources, "memory": 1 << 50})
    assert local_ray._worker_count(3, resources) == 2      # 2 CPUs, 1 per worker


# ---------------------------------------------------------------- in-process executor and choices

def test_serial_executor_retries_once_then_reports():
    calls = []

    def flaky(loaded, payload, should_stop=None, **options):
        calls.append(payload["n"])
        if payload["n"] == 0 or (payload["n"] == 1 and calls.count(1) == 1):
            raise RuntimeError(f"boom {payload['n']}")
        return {"n": payload["n"], **options}

    outcomes = list(SerialExecutor({"evaluate": flaky}).map(None, "evaluate", [{"n": 0}, {"n": 1}, {"n": 2}],
                                                            {"x": 1}))
    assert [(o.index, o.attempt, o.ok, o.retrying) for o in outcomes] == [
        (0, 1, False, True), (0, 2, False, False), (1, 1, False, True), (1, 2, True, False), (2, 1, True, False)]
    assert outcomes[0].error == "RuntimeError: boom 0" and outcomes[-1].result == {"n": 2, "x": 1}
    assert RETRIES == 1 and isinstance(outcomes[0], Outcome)


@pytest.mark.parametrize("kwargs,message", [
    (dict(backend="dask"), "unknown backend"),
    (dict(backend="serial", address="auto"), "apply to the ray backend"),
    (dict(backend="ray", address="auto", num_cpus=2), "num_cpus sizes a local Ray"),
    (dict(backend="ray", cpus_per_task=0), "cpus_per_task"),
    (dict(backend="ray", gpus_per_task=-1), "gpus_per_task"),
])
def test_make_executor_rejects_what_cannot_work(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_executor(**kwargs)
