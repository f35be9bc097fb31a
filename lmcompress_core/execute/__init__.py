"""Executors for sweeps and per-layer sensitivity: serial in this process (the default) or Ray.

    executor = make_executor("ray", address="auto")           # or "serial" / a local Ray with num_cpus
    for outcome in executor.map(loaded, "evaluate", payloads, options): ...

``map`` yields one Outcome per attempt in completion order; payloads, options and results are plain data.
``ResultLog`` keeps finished results as JSON lines so an interrupted sweep resumes where it stopped.
"""
from __future__ import annotations

from lmcompress_core.execute.base import RETRIES, Executor, Outcome
from lmcompress_core.execute.log import ResultLog
from lmcompress_core.execute.ray_backend import RayExecutor, memory_per_worker
from lmcompress_core.execute.serial import SerialExecutor
from lmcompress_core.execute.tasks import TASKS

__all__ = ["Executor", "Outcome", "RETRIES", "ResultLog", "RayExecutor", "SerialExecutor", "TASKS",
           "BACKENDS", "make_executor", "memory_per_worker"]

BACKENDS = ("serial", "ray")


def make_executor(backend: str = "serial", address: str | None = None, num_cpus: int | None = None,
                  cpus_per_task: int = 1, gpus_per_task: float = 0.0) -> Executor:
    """The executor a person chose by name; Ray options given to the serial backend are an error."""
    if backend == "serial":
        if address or num_cpus is not None or gpus_per_task:
            raise ValueError("address, num_cpus and GPUs apply to the ray backend; choose backend 'ray'")
        return SerialExecutor()
    if backend == "ray":
        return RayExecutor(address=address, num_cpus=num_cpus, cpus_per_task=cpus_per_task,
                           gpus_per_task=gpus_per_task)
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
