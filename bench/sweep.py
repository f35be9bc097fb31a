"""Sweep throughput: the same grid on the tiny model, serial in this process against a local Ray on this machine.

Serial runs the configurations one after another with the bench's torch threads (2 on the reference machine);
Ray runs one worker per CPU, each with one torch thread and its own copy of the model (loaded once per
worker). Both use the same fixed protocol without the report cache, latency or generation (timings inside a
busy sweep would measure the contention, not the model). Each side is timed once: a sweep is slow and its
workers are stateful. What decides the ratio on 2 cores: Ray pays for starting workers and loading the
model in each; it gains where one process cannot keep two threads busy (the tiny model's small matmuls)
and, on a CPU shared with other work, where two processes get a larger share of it than one. The
section's load average at start says which situation a run was in.
"""
from __future__ import annotations

import os

from bench.common import THREADS, timed

BITS, SPARSITIES, METHODS = (2, 3, 4), (0.0, 0.5), ("rtn",)
PROTOCOL = dict(eval_tokens=512, context=256, stride=256, latency=False, generation=False)
COMPARED = ["label", "size_mb", "packed_bytes", "perplexity"]
# what run() returns, key for key (bench/__main__.py checks it)
KEYS = ("headline", "extra", "model", "configurations", "grid", "protocol", "serial_s", "ray_s", "ray_start_s",
        "ray_version", "ray_workers", "serial_threads", "threads_per_worker", "cores", "rows_match", "how")


def run(ctx) -> dict:
    import ray

    from lmcompress_core import clear_cache, sweep
    from lmcompress_core.execute import RayExecutor
    from lmcompress_core.measure.protocol import EvalProtocol

    loaded = ctx.loaded("tiny")
    configs = sweep.grid(BITS, SPARSITIES, METHODS)
    protocol = EvalProtocol(**PROTOCOL)
    clear_cache()   # the serial side computes every configuration, as the fresh Ray workers must
    serial, serial_s = timed(lambda: sweep.run_sweep(loaded, configs, protocol=protocol))
    executor = RayExecutor(num_cpus=THREADS)
    try:
        _, start_s = timed(executor.start)
        table, ray_s = timed(lambda: sweep.run_sweep(loaded, configs, executor=executor, protocol=protocol))
        workers = len(executor.worker_pids())
    finally:
        executor.close()
    same = serial[COMPARED].round(6).equals(table[COMPARED].round(6))
    return {
        "headline": {"sweep_ray_over_serial_s": ray_s / serial_s},
        "extra": {"sweep_ray_with_startup_over_serial_s": (ray_s + start_s) / serial_s},
        "model": "tiny", "configurations": len(configs), "grid": {"bits": BITS, "sparsity": SPARSITIES,
                                                                  "method": METHODS},
        "protocol": PROTOCOL, "serial_s": serial_s, "ray_s": ray_s, "ray_start_s": start_s,
        "ray_version": ray.__version__, "ray_workers": workers, "serial_threads": THREADS,
        "threads_per_worker": 1, "cores": os.cpu_count(), "rows_match": bool(same),
        "how": ("each sweep timed once, wall clock; ray_s includes starting the workers and loading the model "
                "in each (ray.init is ray_start_s, apart); rows_match compares label, sizes and perplexity "
                "rounded to 6 decimals"),
    }
